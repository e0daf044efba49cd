"""The ASGI application hypercorn serves on the main port, and serving it.

WebSocket scopes on the relay's path go straight to relayd's own ASGI handler (Quart's
websocket machinery costs a task and a channel hop per message for nothing relayd uses);
everything else goes to the Quart-Trio app.

The HTTP half also mends a trap of quart-trio on hypercorn's Trio worker: quart-trio runs a
request in a nursery that it cancels as soon as the response is sent, and hypercorn does the
work that follows the last body chunk — closing the socket after ``Connection: close``, or
arming the keep-alive idle timer — inside that very ``send``. Cancelled there, that work never
happens: connections stay open until the client leaves and shutdown waits on them. So the send
that completes a response runs shielded, bounded by a deadline.

And a trap of hypercorn's Trio worker itself: it writes every byte inside a shielded
``send_all`` with no deadline. A peer that keeps its connection open but stops reading blocks
that write forever: nothing can cancel it, so relayd's ``write_timeout`` never fires and
shutdown never ends. relayd runs hypercorn with a ``TCPServer`` whose shielded write is
bounded by ``websocket.write_timeout``; past it the connection is closed. A write asked for
by a task that is already cancelled (shutdown past its deadline: hypercorn then still sends a
1011 close to every open WebSocket) is dropped and the connection closed: at 10,000 sockets
those writes alone would take seconds the drain deadline does not have.

That ``TCPServer`` also picks the read timeout per connection, where hypercorn has one for
all: ``websocket.heartbeat_timeout`` once a connection carries a WebSocket (a pong is a read),
``http.request_timeout`` otherwise.

And WebSockets are served by a ``WSStream`` that answers a frame breaking RFC 6455 with the
close frame the RFC asks for (1002, or 1007 for text that is not UTF-8) where hypercorn's
drops the connection without one. Both replace hypercorn's classes when serving starts
(:func:`install_hypercorn_hooks`), each only if the internals it builds on are still there;
otherwise relayd runs on hypercorn's own, with a warning.
"""

from __future__ import annotations

import itertools
import logging
import math
import struct
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import Any

import hypercorn.protocol.h2
import hypercorn.protocol.h11
import hypercorn.trio.run
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import FrameTooLargeError, WSStream
from hypercorn.trio import serve
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Ping
from wsproto.events import Message as WsMessage
from wsproto.frame_protocol import CloseReason

from ._config import Config, parse_address
from ._hypercorn import ProtocolHooks, RelaydConfig, missing_hooks
from ._log import conn_id
from ._relay.frames import CloseCode

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
# Loosely typed: Quart's __call__ is typed with its own, narrower scope types.
ASGIApp = Callable[..., Awaitable[None]]

log = logging.getLogger("relayd.http")

# The completing send writes at most one buffer to a socket hypercorn already owns.
FINISH_TIMEOUT = 10.0
# Seconds a WebSocket write past write_timeout has to finish its frame, so that a close frame
# (4008) can follow it; as long as the relay gives a close frame to go out (hub.CLOSE_TIMEOUT).
SLOW_CONSUMER_GRACE = 2.0
_SLOW_CONSUMER_REASON = b"write timeout"
# A server's close frame (FIN, opcode 8, unmasked): 4008 and its reason.
_SLOW_CONSUMER_CLOSE = (
    bytes([0x88, 2 + len(_SLOW_CONSUMER_REASON)])
    + struct.pack("!H", CloseCode.SLOW_CONSUMER)
    + _SLOW_CONSUMER_REASON
)


class _BoundedWriteTCPServer(ProtocolHooks, TCPServer):
    """hypercorn's ``TCPServer``, with its shielded write bounded and its read timeout chosen
    per connection (see the module docstring), and relayd's HTTP/1.1 hooks
    (``relayd/_hypercorn.py``). Installed by :func:`install_hypercorn_hooks`."""

    async def protocol_send(self, event: Event) -> None:
        timeout: float | None = getattr(self.config, "relayd_write_timeout", None)
        if not isinstance(event, RawData) or timeout is None:
            await super().protocol_send(event)
            return
        if trio.current_effective_deadline() == -math.inf:
            # Cancelled (shielded writes, like a response's last chunk, never are): the
            # connection is being torn down, and what is left unwritten stays so.
            await self.stream.aclose()
            return
        gone = False
        async with self.send_lock:
            try:
                gone = await self._send_bounded(event.data, seconds=timeout)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                gone = True
        if gone:
            await self.protocol.handle(Closed())

    async def _send_bounded(self, data: bytes, *, seconds: float) -> bool:
        """Write ``data``; past ``seconds`` the peer is a slow consumer and the connection is
        closed. Return whether it was.

        A WebSocket's write then gets ``SLOW_CONSUMER_GRACE`` more to finish its frame: if the
        peer reads again by then, a 4008 close frame follows the whole frame (a close frame
        after half a frame would be garbage to it), given as long again to go out; else the
        peer sees the connection drop. Either way the drop is logged and counted.
        """
        websocket = _carries_websocket(self)
        started = trio.current_time()
        grace = SLOW_CONSUMER_GRACE if websocket else 0.0
        # One scope, shielded from outside cancellation and bounded by its deadline.
        with trio.CancelScope(shield=True, deadline=started + seconds + grace) as scope:
            await self.stream.send_all(data)
        if trio.current_time() <= started + seconds and not scope.cancelled_caught:
            return False
        if websocket:
            close_frame = not scope.cancelled_caught and _open_http11_websocket(self)
            _count_slow_consumer(self.config, "rest_port_write")
            log.info(
                "slow consumer: closing",
                extra={"fields": {"detected_by": "rest_port_write", "close_frame": close_frame}},
            )
            if close_frame:
                with trio.CancelScope(shield=True) as closing:
                    closing.deadline = trio.current_time() + SLOW_CONSUMER_GRACE
                    await self.stream.send_all(_SLOW_CONSUMER_CLOSE)
        else:
            log.debug("HTTP client not reading its response: closing")
        await self.stream.aclose()
        return True

    async def _read_data(self) -> None:
        # hypercorn 0.18's loop, with the read timeout chosen per read: a WebSocket peer may
        # be silent for heartbeat_timeout (hypercorn's pings get answered, and a pong is a
        # read), an HTTP client for request_timeout.
        while True:
            try:
                with trio.fail_after(self._read_timeout()):
                    data = await self.stream.receive_some(MAX_RECV)
            except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
                break
            else:
                await self.protocol.handle(RawData(bytes(data)))
                if data == b"":
                    break
        await self.protocol.handle(Closed())

    def _read_timeout(self) -> float:
        timeouts: tuple[float, float] | None = getattr(self.config, "relayd_read_timeouts", None)
        if timeouts is None:
            return float(self.config.read_timeout or math.inf)
        http, websocket = timeouts
        return websocket if _carries_websocket(self) else http


def _carries_websocket(server: TCPServer) -> bool:
    """Whether the connection was upgraded to a WebSocket (HTTP/1.1), or carries one (h2)."""
    protocol = getattr(getattr(server, "protocol", None), "protocol", None)
    if isinstance(protocol, H11Protocol):
        return isinstance(getattr(protocol, "stream", None), WSStream)
    if isinstance(protocol, H2Protocol):
        streams = getattr(protocol, "streams", {})
        return any(isinstance(stream, WSStream) for stream in streams.values())
    return False


def _open_http11_websocket(server: TCPServer) -> bool:
    """Whether the connection is an HTTP/1.1 one upgraded to a WebSocket that neither side
    has begun to close: a close frame may then be written to the socket as it is (on h2, a
    WebSocket is framed in h2 frames)."""
    protocol = getattr(getattr(server, "protocol", None), "protocol", None)
    stream = getattr(protocol, "stream", None) if isinstance(protocol, H11Protocol) else None
    connection = getattr(stream, "connection", None) if isinstance(stream, WSStream) else None
    return getattr(connection, "state", None) is ConnectionState.OPEN


def _count_slow_consumer(config: HypercornConfig, where: str) -> None:
    counts: Counter[str] | None = getattr(config, "relayd_slow_consumer_drops", None)
    if counts is not None:
        counts[where] += 1


class _WebsocketGone(OSError):
    """A message sent on a WebSocket that is closed, or that closed while it was written (the
    ASGI spec's ``OSError`` for a send on a closed connection)."""


class _RelaydWSStream(WSStream):
    """hypercorn's ``WSStream`` with two repairs. Installed by :func:`install_hypercorn_hooks`.

    * A frame that breaks RFC 6455 gets the close frame the RFC asks for (1002, or 1007 for
      text that is not UTF-8) before the connection closes; hypercorn just drops it.
    * A message sent once the connection is gone raises :class:`_WebsocketGone`; hypercorn
      drops it silently, and the relay would count it as written.
    """

    async def app_send(self, message: Any) -> None:
        sending = message is not None and message["type"] == "websocket.send"
        if sending and self.closed:
            raise _WebsocketGone("the WebSocket is closed")
        await super().app_send(message)
        if sending and self.closed:  # the socket was dropped while the message was written
            raise _WebsocketGone("the WebSocket closed while the message was written")

    async def _handle_events(self) -> None:
        # hypercorn 0.18's loop, with the first branch added. wsproto reports a frame that
        # broke the protocol as a CloseConnection event with its code while the connection is
        # still OPEN (a close frame from the peer moves it to REMOTE_CLOSING first).
        for event in self.connection.events():
            if isinstance(event, CloseConnection) and self.connection.state is ConnectionState.OPEN:
                await self._send_wsproto_event(CloseConnection(event.code, event.reason))
                await self.send(StreamClosed(stream_id=self.stream_id))
                break
            if isinstance(event, WsMessage):
                try:
                    self.buffer.extend(event)
                except FrameTooLargeError:
                    await self._send_wsproto_event(
                        CloseConnection(code=CloseReason.MESSAGE_TOO_BIG)
                    )
                    break
                if event.message_finished:
                    assert self.app_put is not None
                    await self.app_put(self.buffer.to_message())
                    self.buffer.clear()
            elif isinstance(event, Ping):
                await self._send_wsproto_event(event.response())
            elif isinstance(event, CloseConnection):
                if self.connection.state == ConnectionState.REMOTE_CLOSING:
                    await self._send_wsproto_event(event.response())
                await self.send(StreamClosed(stream_id=self.stream_id))


# What each hook needs of hypercorn's internals (their names), checked before it is installed.
_TCP_SERVER_INTERNALS = ("protocol_send", "_read_data")
_WS_STREAM_INTERNALS = ("app_send", "_handle_events", "_send_wsproto_event")
_installed: set[str] = set()


def install_hypercorn_hooks() -> None:
    """Have hypercorn serve connections with relayd's ``TCPServer`` and WebSockets with its
    ``WSStream``. Called whenever serving starts; each hook is installed once. A hypercorn
    whose internals moved keeps its own classes, with a warning saying what is lost."""
    if "tcp_server" not in _installed:
        if _install([hypercorn.trio.run], TCPServer, _BoundedWriteTCPServer, _TCP_SERVER_INTERNALS):
            _installed.add("tcp_server")
        else:
            log.warning("cannot hook hypercorn's TCPServer: write_timeout holds on /ws only partly")
    if "ws_stream" not in _installed:
        modules = [hypercorn.protocol.h11, hypercorn.protocol.h2]
        if _install(modules, WSStream, _RelaydWSStream, _WS_STREAM_INTERNALS):
            _installed.add("ws_stream")
        else:
            log.warning(
                "cannot hook hypercorn's WSStream: on the REST port, frames that break the "
                "WebSocket protocol get no close frame"
            )


def _install(
    modules: list[Any], original: type, replacement: type, internals: tuple[str, ...]
) -> bool:
    """Make ``modules`` use ``replacement`` wherever they use ``original``, if they all do and
    ``original`` still has the ``internals`` that ``replacement`` builds on."""
    name = original.__name__
    if not all(getattr(module, name, None) in (original, replacement) for module in modules):
        return False
    if not all(hasattr(original, attribute) for attribute in internals):
        return False
    for module in modules:
        setattr(module, name, replacement)
    return True


def writes_bounded() -> bool:
    """Whether hypercorn's socket writes are bounded by ``write_timeout`` (relayd's
    ``TCPServer`` is installed): slow consumers on the REST port are caught, logged and
    counted there, and the WebSocket messages of a connection it dropped fail to send."""
    return "tcp_server" in _installed and "ws_stream" in _installed


def _finishing(send: Send, timeout: float) -> Send:
    async def send_finishing_shielded(message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            with trio.CancelScope(shield=True), trio.move_on_after(timeout):
                await send(message)
        else:
            await send(message)

    return send_finishing_shielded


async def _not_found(send: Send) -> None:
    body = (
        b'{"error": {"code": "not_found", "message": "no WebSocket endpoint here", "details": {}}}'
    )
    await send(
        {
            "type": "websocket.http.response.start",
            "status": 404,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "websocket.http.response.body", "body": body})


class Dispatcher:
    """Route ASGI scopes: the relay's WebSocket path to ``websocket_app``, the rest to Quart."""

    def __init__(
        self,
        http_app: ASGIApp,
        *,
        websocket_app: ASGIApp | None = None,
        websocket_path: str = "/ws",
        finish_timeout: float = FINISH_TIMEOUT,
    ) -> None:
        self.http_app = http_app
        self.websocket_app = websocket_app
        self.websocket_path = websocket_path
        self.finish_timeout = finish_timeout
        self._requests = 0  # HTTP requests being answered
        self._ids = itertools.count(1)
        self._idle = trio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no HTTP request is being answered."""
        await self._idle.wait()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if self._requests == 0:
                self._idle = trio.Event()
            self._requests += 1
            # Every line logged while answering carries the request's id.
            token = conn_id.set(f"http{next(self._ids)}")
            try:
                await self.http_app(scope, receive, _finishing(send, self.finish_timeout))
            finally:
                conn_id.reset(token)
                self._requests -= 1
                if self._requests == 0:
                    self._idle.set()
        elif kind == "websocket":
            if self.websocket_app is not None and scope["path"] == self.websocket_path:
                await self.websocket_app(scope, receive, send)
            else:
                await _not_found(send)
        else:
            await self.http_app(scope, receive, send)


def metrics_app(render: Callable[[], Awaitable[bytes]], content_type: str) -> ASGIApp:
    """An ASGI app answering ``GET /metrics`` and nothing else (the metrics listener)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                kind = event["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            return
        if scope["path"] == "/metrics" and scope["method"] in ("GET", "HEAD"):
            status, headers, body = 200, [(b"content-type", content_type.encode())], await render()
        else:
            status = 404
            headers = [(b"content-type", b"application/json")]
            body = (
                b'{"error": {"code": "not_found", "message": "only /metrics here", "details": {}}}'
            )
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def hypercorn_config(
    config: Config,
    *,
    graceful_timeout: float,
    bind: str | None = None,
    slow_consumer_drops: Counter[str] | None = None,
) -> HypercornConfig:
    """Hypercorn's settings for the HTTP port (or, with ``bind``, another listener).

    ``slow_consumer_drops`` counts the WebSockets dropped because a socket write stalled
    (under ``rest_port_write``).
    """
    http = config.http
    ws = config.websocket
    hypercorn = RelaydConfig()
    hypercorn.bind = [bind or http.listen]
    hypercorn.keep_alive_timeout = http.keep_alive_timeout
    hypercorn.backlog = http.backlog
    hypercorn.graceful_timeout = graceful_timeout
    # The silence tolerated on a connection: a request's pauses (request_timeout), or a
    # WebSocket peer's (heartbeat_timeout: clients that ignore relayd's JSON pings still
    # answer the WebSocket pings hypercorn sends every heartbeat_interval). relayd's
    # TCPServer picks one per connection; hypercorn's own has one for all: the longer.
    hypercorn.read_timeout = max(http.request_timeout, ws.heartbeat_timeout)  # type: ignore[assignment]
    hypercorn.relayd_read_timeouts = (http.request_timeout, ws.heartbeat_timeout)  # type: ignore[attr-defined]
    hypercorn.websocket_ping_interval = ws.heartbeat_interval
    hypercorn.websocket_max_message_size = ws.max_frame_bytes
    hypercorn.accesslog = None
    hypercorn.errorlog = logging.getLogger("relayd.hypercorn")
    hypercorn.include_server_header = False
    hypercorn.relayd_write_timeout = ws.write_timeout  # type: ignore[attr-defined]
    hypercorn.relayd_slow_consumer_drops = slow_consumer_drops  # type: ignore[attr-defined]
    if config.tls.enabled:
        hypercorn.certfile = config.tls.cert_file
        hypercorn.keyfile = config.tls.key_file
    return hypercorn


def set_write_timeout(config: HypercornConfig, seconds: float) -> None:
    """Bound the socket writes of the connections ``config`` serves by ``seconds`` from now on
    (``websocket.write_timeout``, reloaded)."""
    config.relayd_write_timeout = seconds  # type: ignore[attr-defined]


async def serve_http(
    app: ASGIApp,
    config: HypercornConfig,
    *,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until ``shutdown`` is set, then drain for ``config.graceful_timeout``.

    Reports the bound ``(host, port)`` through ``task_status`` once listening.
    """
    install_hypercorn_hooks()
    for missing in missing_hooks():
        log.warning("hypercorn changed (%s): relayd's HTTP/1.1 fixes are off", missing)
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            partial(serve, app, config, shutdown_trigger=shutdown.wait)
        )
        task_status.started(parse_address(binds[0].partition("://")[2]))
