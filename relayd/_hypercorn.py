"""hypercorn, mended: its traps, measured here, and relayd's repairs, installed at start.

hypercorn serves relayd's HTTP port (the REST API and ``/ws``). Its Trio worker has defects a
daemon facing the internet cannot keep; each is mended by a subclass, and :func:`install_hooks`
puts the subclasses in place when serving starts — each only if the hypercorn internals it
builds on are still there, otherwise relayd runs on hypercorn's own class with a warning that
says what is lost (no import-time patching, no silent fallback).

* **Unbounded writes.** hypercorn writes every byte inside a shielded ``send_all`` with no
  deadline: a peer that keeps its connection open but stops reading blocks that write forever,
  so ``write_timeout`` never fires and shutdown never ends. :class:`RelaydTCPServer` bounds the
  write by ``websocket.write_timeout`` (a WebSocket's write then gets ``SLOW_CONSUMER_GRACE``
  to finish its frame, so that a 4008 close frame can follow it), logs and counts the slow
  consumer, and closes the connection. A write asked for by a task that is already cancelled
  (shutdown past its deadline: hypercorn then still sends a 1011 close to every open
  WebSocket) is dropped and the connection closed.
* **One read timeout for all.** :class:`RelaydTCPServer` picks it per connection:
  ``websocket.heartbeat_timeout`` once it carries a WebSocket (a pong is a read),
  ``http.request_timeout`` otherwise.
* **WebSocket protocol errors dropped in silence.** :class:`RelaydWSStream` answers a frame
  that breaks RFC 6455 with the close frame the RFC asks for (1002, or 1007 for text that is
  not UTF-8), and fails a send on a connection already gone (hypercorn drops it silently, and
  the relay would count it as written).
* **Framing errors get no JSON.** When h11 cannot parse a request (a bad chunk size,
  conflicting ``Content-Length`` headers, a head over ``h11_max_incomplete_size``, a
  ``Transfer-Encoding`` other than ``chunked``), hypercorn answers the status h11 suggests with
  an empty body. :class:`RelaydH11Protocol` sends relayd's error shape instead, and closes the
  connection as hypercorn does. It can do so only while no response has started on the
  connection; an error in a request body that arrives after the app began its answer just
  closes the connection.
* **Early answers do not say ``Connection: close``.** A response that starts before the
  request's body has been read to its end (a 401, 415 or 429 answered from the head alone, or
  a GET with an unread body) ends with hypercorn closing the connection, since the rest of the
  body would be read as the next request; a keep-alive client's next request met EOF.
  :class:`RelaydH11Protocol` adds ``Connection: close`` to such responses.
* **Closing races the write in progress.** hypercorn closes a connection (``send_eof``, then
  ``aclose``) without its send lock. A client that closes while its request body is still
  expected makes hypercorn close at once, while the app may be writing its response: trio's
  conflict detector then raises ``BusyResourceError`` in the app's write, logged as "Error in
  ASGI Framework". :class:`RelaydTCPServer` takes the send lock to close.

:class:`RelaydConfig` also adds relayd's security headers (``relayd/_browser.py``) to every
response hypercorn writes for relayd: the app's, the WebSocket refusals, and the error
responses above. All but one: the ``Content-Security-Policy`` is per response (the page under
``/app/`` names its own), so :class:`RelaydH11Protocol` and :class:`RelaydH2Protocol` add the
API's policy to each response that names none. Should either of them not be installed, the
API's policy goes on every response again: the page then cannot run, and nothing else changes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import struct
import warnings
from collections import Counter
from itertools import chain
from typing import Any

import h11
import hypercorn.protocol
import hypercorn.protocol.h2
import hypercorn.protocol.h11
import hypercorn.trio.run
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.events import InformationalResponse, Response, StreamClosed
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import FrameTooLargeError, WSStream
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Ping
from wsproto.events import Message as WsMessage
from wsproto.frame_protocol import CloseReason

from ._browser import security_headers, with_default_csp
from ._config import Config
from ._relay.frames import CloseCode

log = logging.getLogger("relayd.http")

# What hypercorn's framing errors mean, by the status h11 suggests (h11's error_status_hint).
FRAMING_ERRORS = {
    400: ("bad_request", "the request is not valid HTTP/1.1; the connection is closed"),
    431: ("headers_too_large", "the request's head is too large; the connection is closed"),
    501: (
        "unsupported_transfer_encoding",
        "only Transfer-Encoding: chunked is supported; the connection is closed",
    ),
}


def framing_error_body(status: int) -> bytes:
    code, message = FRAMING_ERRORS.get(
        status, ("http_error", "the request cannot be served; the connection is closed")
    )
    return json.dumps({"error": {"code": code, "message": message, "details": {}}}).encode()


WORKER_HEADER = b"relayd-worker"


class RelaydConfig(HypercornConfig):
    """hypercorn's settings, with relayd's security headers on every response (the
    ``Content-Security-Policy`` only where relayd's protocols cannot add it per response),
    and ``Relayd-Worker`` in a worker of ``relayd serve --workers``."""

    relayd_worker: int | None = None

    def response_headers(self, protocol: str) -> list[tuple[bytes, bytes]]:
        headers: list[tuple[bytes, bytes]] = super().response_headers(protocol)
        headers += security_headers(tls=self.ssl_enabled, csp=not csp_per_response())
        if self.relayd_worker is not None:
            headers.append((WORKER_HEADER, str(self.relayd_worker).encode()))
        return headers


def _with_default_csp(event: StreamEvent) -> StreamEvent:
    """A response's head with the API's ``Content-Security-Policy``, unless it names its own."""
    if isinstance(event, Response | InformationalResponse):
        return dataclasses.replace(event, headers=with_default_csp(event.headers))
    return event


def _says_close(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(
        name.lower() == b"connection" and b"close" in value.lower() for name, value in headers
    )


class RelaydH11Protocol(H11Protocol):
    """hypercorn's HTTP/1.1 protocol, with JSON framing errors, honest early answers and the
    ``Content-Security-Policy`` chosen per response."""

    async def stream_send(self, event: StreamEvent) -> None:
        event = _with_default_csp(event)
        if (
            isinstance(event, Response)
            and event.status_code >= 200
            and self.connection.their_state is not h11.DONE
            and not _says_close(event.headers)
        ):
            # The request's body is not all in: hypercorn will close after this response.
            headers = [*event.headers, (b"connection", b"close")]
            event = dataclasses.replace(event, headers=headers)
        await super().stream_send(event)

    async def _send_error_response(self, status_code: int) -> None:
        body = framing_error_body(status_code)
        head = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await self._send_h11_event(
            h11.Response(
                status_code=status_code,
                headers=with_default_csp(chain(head, self.config.response_headers("h11"))),
            )
        )
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())


class RelaydH2Protocol(H2Protocol):
    """hypercorn's HTTP/2 protocol, with the ``Content-Security-Policy`` chosen per response.
    Installed by :func:`install_hooks`."""

    async def stream_send(self, event: StreamEvent) -> None:
        await super().stream_send(_with_default_csp(event))


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


class RelaydTCPServer(TCPServer):
    """hypercorn's ``TCPServer``, with its writes bounded, its read timeout chosen per
    connection, its closing taking the send lock, and its HTTP/1.1 connections speaking
    :class:`RelaydH11Protocol` (see the module docstring). Installed by :func:`install_hooks`.
    """

    _relayd_protocol: ProtocolWrapper

    @property
    def protocol(self) -> ProtocolWrapper:
        return self._relayd_protocol

    @protocol.setter
    def protocol(self, wrapper: ProtocolWrapper) -> None:
        # hypercorn's TCPServer.run builds the wrapper and assigns it before using it: the
        # HTTP/1.1 protocol it made has seen nothing yet and is swapped for relayd's.
        if type(wrapper.protocol) is H11Protocol:
            wrapper.protocol = RelaydH11Protocol(
                wrapper.app,
                wrapper.config,
                wrapper.context,
                wrapper.task_group,
                wrapper.state,
                wrapper.ssl,
                wrapper.client,
                wrapper.server,
                wrapper.send,
            )
        self._relayd_protocol = wrapper

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, Closed):
            async with self.send_lock:  # not while the app's write is under way
                await self._close()
            await self.protocol.handle(Closed())
            return
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


class RelaydWSStream(WSStream):
    """hypercorn's ``WSStream`` with two repairs. Installed by :func:`install_hooks`.

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
_H2_PROTOCOL_INTERNALS = ("stream_send",)
_installed: set[str] = set()


def install_hooks() -> None:
    """Have hypercorn serve connections with :class:`RelaydTCPServer` and WebSockets with
    :class:`RelaydWSStream`. Called whenever serving starts; each hook is installed once. A
    hypercorn whose internals moved keeps its own classes, with a warning saying what is lost.
    """
    if "tcp_server" not in _installed:
        if _install([hypercorn.trio.run], TCPServer, RelaydTCPServer, _TCP_SERVER_INTERNALS):
            _installed.add("tcp_server")
        else:
            log.warning("cannot hook hypercorn's TCPServer: write_timeout holds on /ws only partly")
    if "ws_stream" not in _installed:
        modules = [hypercorn.protocol.h11, hypercorn.protocol.h2]
        if _install(modules, WSStream, RelaydWSStream, _WS_STREAM_INTERNALS):
            _installed.add("ws_stream")
        else:
            log.warning(
                "cannot hook hypercorn's WSStream: on the REST port, frames that break the "
                "WebSocket protocol get no close frame"
            )
    if "h2_protocol" not in _installed:
        if _install([hypercorn.protocol], H2Protocol, RelaydH2Protocol, _H2_PROTOCOL_INTERNALS):
            _installed.add("h2_protocol")
        else:
            log.warning(
                "cannot hook hypercorn's H2Protocol: every response gets the API's "
                "Content-Security-Policy, and the page under /app/ cannot run"
            )
    for missing in missing_hooks():
        log.warning("hypercorn changed (%s): relayd's HTTP/1.1 fixes are off", missing)


def missing_hooks() -> list[str]:
    """What of the above hypercorn no longer lets relayd do (empty: all of it)."""
    missing = []
    server = getattr(hypercorn.trio.run, "TCPServer", object)
    if not issubclass(server, RelaydTCPServer):
        missing.append("hypercorn.trio.run.TCPServer is not relayd's")
    elif "protocol" not in TCPServer.run.__code__.co_names:
        missing.append("TCPServer.run no longer sets self.protocol")
    for name in ("stream_send", "_send_error_response", "_send_h11_event"):
        if not callable(getattr(H11Protocol, name, None)):
            missing.append(f"H11Protocol.{name}")
    for name in ("app", "config", "context", "task_group", "state", "send"):
        if name not in ProtocolWrapper.__init__.__code__.co_names:
            missing.append(f"ProtocolWrapper.{name}")
    if not callable(getattr(HypercornConfig, "response_headers", None)):
        missing.append("Config.response_headers")
    if not issubclass(getattr(hypercorn.protocol, "H2Protocol", object), RelaydH2Protocol):
        missing.append("hypercorn.protocol.H2Protocol is not relayd's")
    return missing


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


def csp_per_response() -> bool:
    """Whether every response hypercorn writes passes through relayd's protocols, which add
    the API's ``Content-Security-Policy`` to those that name none; if not, :class:`RelaydConfig`
    adds it to every response."""
    return "tcp_server" in _installed and "h2_protocol" in _installed


def writes_bounded() -> bool:
    """Whether hypercorn's socket writes are bounded by ``write_timeout`` (relayd's
    ``TCPServer`` is installed): slow consumers on the REST port are caught, logged and
    counted there, and the WebSocket messages of a connection it dropped fail to send."""
    return "tcp_server" in _installed and "ws_stream" in _installed


def hypercorn_config(
    config: Config,
    *,
    graceful_timeout: float,
    bind: str | None = None,
    slow_consumer_drops: Counter[str] | None = None,
    reuse_port: bool = False,
    worker: int | None = None,
) -> HypercornConfig:
    """Hypercorn's settings for the HTTP port (or, with ``bind``, another listener).

    ``slow_consumer_drops`` counts the WebSockets dropped because a socket write stalled
    (under ``rest_port_write``). ``reuse_port``: bind with ``SO_REUSEPORT``, so that other
    processes that do too (the workers of ``relayd serve --workers``) share the port.
    ``worker``: the worker's number, sent in a ``Relayd-Worker`` header on every response.
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
    hypercorn.relayd_worker = worker
    if reuse_port:
        _reuse_port(hypercorn)
    if config.tls.enabled:
        hypercorn.certfile = config.tls.cert_file
        hypercorn.keyfile = config.tls.key_file
    return hypercorn


# hypercorn binds its sockets with SO_REUSEPORT when it runs several worker processes of its
# own (its config's ``workers`` above 1). relayd starts its workers itself (``relayd serve
# --workers``) and asks hypercorn for the socket option that way.
_REUSE_PORT_WORKERS = 2


def _reuse_port(config: HypercornConfig) -> None:
    config.workers = _REUSE_PORT_WORKERS
    # hypercorn's ``serve`` then warns that it starts no workers: true, and intended.
    warnings.filterwarnings(
        "ignore", message="The config `workers` has no affect when using serve", category=Warning
    )


def set_write_timeout(config: HypercornConfig, seconds: float) -> None:
    """Bound the socket writes of the connections ``config`` serves by ``seconds`` from now on
    (``websocket.write_timeout``, reloaded)."""
    config.relayd_write_timeout = seconds  # type: ignore[attr-defined]
