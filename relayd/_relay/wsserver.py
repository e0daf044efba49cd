"""The dedicated WebSocket listener: relayd's own WebSocket server on Trio.

The WebSocket protocol itself is the ``websockets`` package's sans-I/O ``ServerProtocol``
(handshake, framing, control frames, the closing handshake, RFC 6455's failure codes); its
frame parsing costs about a quarter of wsproto's, with C-accelerated unmasking. Around it,
one Trio task per socket reads, parses and hands whole messages to the hub; the hub's writer
task writes. There is no reader task and memory channel per socket in between, as
trio-websocket has: one task switch less per frame received, and less memory per socket.

Rules:

1. Everything written to the socket is taken from the protocol (``data_to_send``) and written
   under the socket's send lock, in one go: frames, pongs and the close frame leave in the
   order the protocol made them, and nothing follows a close frame.
2. A write cancelled before it ended may have left a frame half-written; from then on nothing
   more is written (a close frame would land inside that frame) and :meth:`close` just drops
   the connection: the client sees 1006.
3. A frame that breaks RFC 6455 (or a text message that is not UTF-8) gets the close frame the
   RFC asks for (1002, 1007; 1009 past ``websocket.max_frame_bytes``), then the connection is
   closed: :meth:`WebsocketsTransport.receive` raises :class:`TransportClosed` with that code.
4. Handshakes are refused with a JSON error body and relayd's security headers: a wrong path
   (404), a browser ``Origin`` not in ``websocket.allowed_origins`` (403), a malformed
   upgrade request (the status ``websockets`` chose). A handshake not done within
   ``websocket.auth_timeout`` is dropped.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import ssl
from collections import deque
from collections.abc import Sequence
from functools import partial

import trio
from attrs import frozen
from websockets.datastructures import Headers
from websockets.exceptions import InvalidState
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from relayd._browser import security_headers
from relayd._config import WebsocketConfig, parse_address
from relayd._errors import ApiError, NotFound

from .hub import CLOSE_TIMEOUT, Hub
from .listeners import origin_refusal_error, refused_origin
from .transport import TransportClosed, read_handshake, split_target

log = logging.getLogger("relayd.ws")

# Bytes read from a socket at once.
RECEIVE_BYTES = 65_536
# RFC 6455's code for a connection that ended without a close frame (never sent on the wire).
ABNORMAL_CLOSURE = 1006


class WebsocketsTransport:
    """One accepted WebSocket on the dedicated listener (see the module docstring)."""

    pong_observable = True
    coalesces = True
    rest = False
    bounded_writes = False  # the hub's write timer bounds them

    def __init__(
        self,
        stream: trio.abc.Stream,
        protocol: ServerProtocol,
        *,
        remote: str,
        token: str | None,
        lean: bool,
    ) -> None:
        self._stream = stream
        self._protocol = protocol
        self.remote = remote
        self.token = token
        self.lean = lean
        self._send_lock = trio.StrictFIFOLock()
        # Parsed, not yet handled (frames that came with the handshake are parsed already).
        self._frames: deque[Frame] = deque(protocol.events_received())  # type: ignore[arg-type]
        self._fragments: list[bytes] = []  # of a message that is not finished yet
        self._fragmented_text = False
        self._pongs: dict[bytes, trio.Event] = {}  # pings awaiting their pong, by payload
        self._cut_off = False  # rule 2
        # Bytes taken by try_send and not written yet: they go before anything else (rule 1).
        self._unsent = b""
        # The socket, for writes that must not wait (plain TCP only: TLS records are the SSL
        # stream's to make).
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None
        self.writes_inline = self._fd is not None

    # --- reading ------------------------------------------------------------------------------

    async def receive(self) -> str | bytes:
        """The next whole message (text or binary).

        Raises:
            TransportClosed: the peer closed (with its code), broke the protocol (with the
                code relayd sent, rule 3) or went away (1006).
        """
        while True:
            while self._frames:
                message = self._take(self._frames.popleft())
                if message is not None:
                    return message
            await self._flush()  # pongs and the close handshake's answer (rule 1)
            if self._protocol.state is State.CLOSED or self._protocol.close_expected():
                raise self._closed()
            try:
                data = await self._stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise TransportClosed(ABNORMAL_CLOSURE, "connection lost") from None
            if data:
                self._protocol.receive_data(data)
            else:
                self._protocol.receive_eof()
            self._frames.extend(self._protocol.events_received())  # type: ignore[arg-type]

    def _take(self, frame: Frame) -> str | bytes | None:
        """A finished message, or ``None`` (a control frame, a fragment)."""
        opcode = frame.opcode
        if opcode is Opcode.PONG:
            pong = self._pongs.pop(bytes(frame.data), None)
            if pong is not None:
                pong.set()
            return None
        if opcode not in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
            return None  # a ping (the protocol answers it) or the close frame
        if opcode is not Opcode.CONT:
            self._fragmented_text = opcode is Opcode.TEXT
        if not frame.fin:
            self._fragments.append(bytes(frame.data))
            return None
        data = b"".join([*self._fragments, frame.data]) if self._fragments else bytes(frame.data)
        self._fragments.clear()
        if not self._fragmented_text:
            return data
        try:
            return data.decode()
        except UnicodeDecodeError as exc:
            self._protocol.fail(1007, f"invalid UTF-8 at position {exc.start}")
            self._frames.clear()
            return None

    def _done(self) -> bool:
        """Whether the closing handshake is over: the peer's close frame is in (the server
        then closes the TCP connection first, RFC 6455 section 7.1.1)."""
        return self._protocol.close_rcvd is not None or self._protocol.state is State.CLOSED

    def _closed(self) -> TransportClosed:
        protocol = self._protocol
        if protocol.close_rcvd is not None and protocol.close_rcvd_then_sent:
            return TransportClosed(protocol.close_rcvd.code, protocol.close_rcvd.reason)
        if protocol.close_sent is not None:
            return TransportClosed(protocol.close_sent.code, protocol.close_sent.reason)
        return TransportClosed(ABNORMAL_CLOSURE, "connection lost")

    # --- writing ------------------------------------------------------------------------------

    async def _flush(self) -> None:
        """Write what the protocol has for the peer (rule 1). Raises :class:`TransportClosed`
        when the socket is gone."""
        async with self._send_lock:
            chunks = self._protocol.data_to_send()
            if not (chunks or self._unsent) or self._cut_off:
                return
            data = self._unsent + b"".join(chunks)
            self._unsent = b""
            written = False
            try:
                if data:
                    await self._stream.send_all(data)
                written = True
                if chunks and chunks[-1] == b"":  # the protocol ends our side of the connection
                    await self._stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                written = True  # nothing more can be written anyway
                raise TransportClosed(ABNORMAL_CLOSURE, "connection lost") from None
            finally:
                if not written:
                    self._cut_off = True  # rule 2

    async def send_frames(self, texts: Sequence[str]) -> None:
        try:
            for text in texts:
                self._protocol.send_text(text.encode())
        except InvalidState:  # the closing handshake has begun
            raise self._closed() from None
        await self._flush()

    async def send(self, text: str) -> None:
        await self.send_frames([text])

    def try_send(self, texts: Sequence[str]) -> bool | None:
        if (
            self._fd is None
            or self._cut_off
            or self._unsent
            or self._send_lock.locked()
            or self._protocol.state is not State.OPEN
        ):
            return None
        for text in texts:
            self._protocol.send_text(text.encode())
        data = b"".join(self._protocol.data_to_send())
        try:
            written = os.write(self._fd, data)
        except BlockingIOError:
            written = 0
        except OSError:  # the connection is gone: flush() finds out and says so
            written = 0
        if written == len(data):
            return True
        self._unsent = data[written:]
        return False

    async def flush(self) -> None:
        await self._flush()

    async def ping(self) -> None:
        payload = os.urandom(8)
        pong = self._pongs[payload] = trio.Event()
        try:
            self._protocol.send_ping(payload)
        except InvalidState:
            raise self._closed() from None
        await self._flush()
        await pong.wait()

    async def close(self, code: int, reason: str) -> None:
        """Send the close frame and wait for the peer's (bounded by the caller), then drop the
        connection; after a cut-off write, just drop it (rule 2)."""
        try:
            if not self._cut_off and self._protocol.state is State.OPEN:
                self._protocol.send_close(code, reason)
                await self._flush()
                while not self._done():
                    data = await self._stream.receive_some(RECEIVE_BYTES)
                    if not data:
                        break
                    self._protocol.receive_data(data)
                    self._protocol.events_received()
        finally:
            await self._stream.aclose()


# --- the listener -------------------------------------------------------------------------------


@frozen
class _Site:
    """What the listener's answers to handshakes carry besides their own headers."""

    tls: bool
    worker: int | None = None  # in a worker of relayd serve --workers: Relayd-Worker

    def refusal(self, status: int, error: ApiError) -> Response:
        body = json.dumps(error.to_json()).encode()
        headers = Headers(
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
                *((k.decode(), v.decode()) for k, v in security_headers(tls=self.tls)),
            ]
        )
        self.mark(headers)
        return Response(status, error.code.replace("_", " "), headers, body)

    def mark(self, headers: Headers) -> None:
        if self.worker is not None:
            headers["Relayd-Worker"] = str(self.worker)


def _subprotocols(request: Request) -> list[str]:
    return [
        entry.strip()
        for value in request.headers.get_all("Sec-WebSocket-Protocol")
        for entry in value.split(",")
        if entry.strip()
    ]


def _peer(stream: trio.abc.Stream) -> str:
    inner = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if not isinstance(inner, trio.SocketStream):
        return "-"
    try:
        return str(inner.socket.getpeername()[0])
    except OSError:
        return "-"


async def _read_request(
    stream: trio.abc.Stream, protocol: ServerProtocol
) -> tuple[Request, bytes] | None:
    """The upgrade request and the bytes that came after it (frames sent right behind), or
    ``None`` if the peer left or sent no valid HTTP request."""
    received = bytearray()  # bounded as the protocol's own buffer: it refuses long headers
    while True:
        for event in protocol.events_received():
            if not isinstance(event, Request):
                return None
            end = received.find(b"\r\n\r\n") + 4  # where the protocol's parser stopped
            return event, bytes(received[end:])
        if protocol.state is not State.CONNECTING or protocol.handshake_exc is not None:
            return None
        data = await stream.receive_some(RECEIVE_BYTES)
        if not data:
            return None
        received += data
        protocol.receive_data(data)


async def _answer(stream: trio.abc.Stream, protocol: ServerProtocol, response: Response) -> None:
    protocol.send_response(response)
    await stream.send_all(b"".join(protocol.data_to_send()))


async def _handshake_then_serve(
    hub: Hub, config: WebsocketConfig, site: _Site, stream: trio.abc.Stream
) -> None:
    transport = await _handshake(hub, config, site, stream)
    # The handshake's request, headers and response die with its frame: kept in this one for
    # the whole session, they were ~3.5 KiB per idle socket (tracemalloc).
    if transport is not None:
        await hub.serve(transport)


async def _handshake(
    hub: Hub, config: WebsocketConfig, site: _Site, stream: trio.abc.Stream
) -> WebsocketsTransport | None:
    """Read the upgrade request and answer it: the session's transport, or ``None`` once a
    refusal is written (or the peer left)."""
    protocol = ServerProtocol(max_size=config.max_frame_bytes)
    with trio.move_on_after(config.auth_timeout):
        received = await _read_request(stream, protocol)
    if received is None:
        if protocol.handshake_exc is not None:  # not an upgrade request relayd can parse
            error = ApiError("not a WebSocket upgrade request", code="bad_request")
            await _answer(stream, protocol, site.refusal(400, error))
        return None
    request, behind = received
    path, query = split_target(request.path)
    if path != config.path:
        error = NotFound("no WebSocket endpoint here")
        await _answer(stream, protocol, site.refusal(404, error))
        return None
    headers = list(request.headers.raw_items())
    origin = refused_origin(headers, hub.core.ws.allowed_origins)
    if origin is not None:
        await _answer(stream, protocol, site.refusal(403, origin_refusal_error(origin)))
        return None
    handshake = read_handshake(query, headers, _subprotocols(request))
    response = protocol.accept(request)
    if response.status_code != 101:
        reason = (response.body or b"").decode(errors="replace").strip()
        error = ApiError(reason or "not a valid WebSocket handshake", code="bad_request")
        await _answer(stream, protocol, site.refusal(response.status_code, error))
        return None
    if handshake.subprotocol is not None:
        response.headers["Sec-WebSocket-Protocol"] = handshake.subprotocol
    site.mark(response.headers)
    await _answer(stream, protocol, response)
    # The session gets a protocol of its own, open from the start: the handshake's keeps the
    # request in its parser's frame for as long as it lives (~2.5 KiB per idle socket).
    session = ServerProtocol(max_size=config.max_frame_bytes, state=State.OPEN)
    if behind:
        session.receive_data(behind)
    return WebsocketsTransport(
        stream, session, remote=_peer(stream), token=handshake.token, lean=handshake.lean
    )


async def _connection(
    hub: Hub, config: WebsocketConfig, site: _Site, stream: trio.abc.Stream
) -> None:
    # Runs in the hub's nursery: nothing a peer does may escape from here.
    try:
        await _handshake_then_serve(hub, config, site, stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError, TransportClosed):
        pass  # the peer left during the handshake
    except Exception:
        log.exception("dedicated listener: connection failed")
    finally:
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
            await stream.aclose()


async def open_listeners(
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    backlog: int,
    *,
    reuse_port: bool = False,
) -> list[trio.SocketListener] | list[trio.SSLListener[trio.SocketStream]]:
    """The listening sockets, with relayd's backlog. ``reuse_port``: bound with
    ``SO_REUSEPORT``, so that other processes that do too (the workers of ``relayd serve
    --workers``) share the port."""
    if reuse_port:
        listeners = await _reuse_port_listeners(host, port, backlog)
        if ssl_context is None:
            return listeners
        return [
            trio.SSLListener(listener, ssl_context, https_compatible=True) for listener in listeners
        ]
    if ssl_context is None:
        return await trio.open_tcp_listeners(port, host=host, backlog=backlog)
    return await trio.open_ssl_over_tcp_listeners(
        port, ssl_context, host=host, https_compatible=True, backlog=backlog
    )


async def _reuse_port_listeners(host: str, port: int, backlog: int) -> list[trio.SocketListener]:
    """``trio.open_tcp_listeners``, with ``SO_REUSEPORT`` on every socket (trio has no way to
    add a socket option before binding)."""
    addresses = await trio.socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners: list[trio.SocketListener] = []
    unsupported: list[OSError] = []
    try:
        for family, kind, proto, _, address in addresses:
            try:
                sock = trio.socket.socket(family, kind, proto)
            except OSError as exc:
                # As trio: a host without IPv6 (or IPv4) still listens on the other family.
                if exc.errno != errno.EAFNOSUPPORT:
                    raise
                unsupported.append(exc)
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:  # as trio: the IPv4 address gets its own socket
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(address)
                sock.listen(backlog)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    if not listeners:
        raise OSError(errno.EAFNOSUPPORT, f"no address of {host!r} can be listened on") from (
            unsupported[0] if unsupported else None
        )
    return listeners


async def serve_dedicated(
    hub: Hub,
    config: WebsocketConfig,
    *,
    ssl_context: ssl.SSLContext | None = None,
    backlog: int,
    reuse_port: bool = False,
    worker: int | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``config.listen`` until cancelled, ``backlog`` connections waiting to be accepted
    at most. Connections are served in the hub's nursery, so cancelling this (shutdown) only
    stops accepting: open sessions are drained by the hub like any other.

    ``reuse_port`` and ``worker``: in a worker of ``relayd serve --workers``, the sockets are
    bound with ``SO_REUSEPORT`` and every answer says ``Relayd-Worker: <worker>``.
    """
    host, port = parse_address(config.listen)
    listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(
        await open_listeners(host, port, ssl_context, backlog, reuse_port=reuse_port)
    )
    first = listeners[0]
    socket_listener = first.transport_listener if isinstance(first, trio.SSLListener) else first
    assert isinstance(socket_listener, trio.SocketListener)
    bound = int(socket_listener.socket.getsockname()[1])
    handler = partial(_connection, hub, config, _Site(ssl_context is not None, worker))
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(trio.serve_listeners, handler, listeners, handler_nursery=hub.nursery)
        )
        task_status.started((host, bound))
