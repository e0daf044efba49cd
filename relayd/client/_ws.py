"""A WebSocket client connection: wsproto (sans-I/O) over an anyio TCP or TLS stream.

It runs wherever anyio does (asyncio, Trio). One task reads (:meth:`WebSocket.receive`) and
any task may write (:meth:`WebSocket.send`; writes are serialised). Pings are answered as
they are read; a close frame from relayd is answered, and surfaces as :class:`Closed` with its
code. A write cut off by cancellation leaves half a frame on the wire, so it breaks the
connection: every later call raises :class:`Closed` (1006).
"""

from __future__ import annotations

import collections
import contextlib
import math
import ssl
from collections.abc import Sequence
from urllib.parse import urlsplit

import anyio
import anyio.abc
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from ._errors import ClientError

ABNORMAL_CLOSURE = 1006
MESSAGE_TOO_BIG = 1009
PROTOCOL_ERROR = 1002
READ_SIZE = 65_536
# The server's handshake answer, and the body of a refusal, are read up to this much.
MAX_HANDSHAKE_BYTES = 65_536


class Closed(ClientError):
    """The connection is closed: ``code`` is the close frame's (1006: no close frame)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"WebSocket closed ({code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason


class HandshakeRejected(ClientError):
    """relayd answered the upgrade with an HTTP status instead of 101."""

    def __init__(self, status: int) -> None:
        super().__init__(f"WebSocket handshake refused with HTTP {status}")
        self.status = status


def websocket_url(http_url: str, path: str = "/ws") -> str:
    """relayd's WebSocket URL for its HTTP(S) URL.

    >>> websocket_url("https://relay.example.com/")
    'wss://relay.example.com/ws'
    """
    parts = urlsplit(http_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return f"{scheme}://{parts.netloc}{path}"


class WebSocket:
    def __init__(
        self, stream: anyio.abc.ByteStream, connection: WSConnection, max_message_chars: int
    ) -> None:
        self._stream = stream
        self._ws = connection
        self._max = max_message_chars
        self._events: collections.deque[Event] = collections.deque()
        self._parts: list[str] = []
        self._size = 0
        self._write_lock = anyio.Lock()
        self._closed: Closed | None = None

    @property
    def closed(self) -> Closed | None:
        return self._closed

    async def send(self, text: str) -> None:
        """Write one text message.

        Raises:
            Closed: the connection is closed (or breaks now).

        Cancelled in the middle, the connection is broken (half a frame may be out).
        """
        await self._write(TextMessage(data=text))

    async def receive(self, idle_timeout: float = math.inf) -> str:
        """The next text message. Nothing at all read (not even a ping) for ``idle_timeout``
        seconds: the connection is taken for dead and dropped.

        Raises:
            Closed: relayd closed the connection (its code), or it broke or fell silent (1006).
        """
        while True:
            if self._closed is not None:
                raise self._closed
            while self._events:
                text = await self._handle(self._events.popleft())
                if text is not None:
                    return text
            data = b""
            with anyio.move_on_after(idle_timeout):
                try:
                    data = await self._stream.receive(READ_SIZE)
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass
                except OSError:
                    pass
            if not data:
                await self.abort(ABNORMAL_CLOSURE, "connection lost or silent")
                continue
            try:
                self._ws.receive_data(data)
                self._events.extend(self._ws.events())
            except RemoteProtocolError:
                await self.close(PROTOCOL_ERROR, "protocol error")
                await self.abort(PROTOCOL_ERROR, "relayd broke the WebSocket protocol")

    async def close(self, code: int = 1000, reason: str = "", timeout: float = 2.0) -> None:
        """Send a close frame (within ``timeout``), then drop the connection. Never raises;
        safe to call under cancellation (it shields itself, for at most ``timeout``)."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(timeout):
            if self._closed is None and self._ws.state is ConnectionState.OPEN:
                with contextlib.suppress(Closed):
                    await self._write(CloseConnection(code=code, reason=reason))
        await self.abort(code, reason)

    async def abort(self, code: int = ABNORMAL_CLOSURE, reason: str = "") -> None:
        """Drop the connection without a close frame."""
        if self._closed is None:
            self._closed = Closed(code, reason)
        await anyio.aclose_forcefully(self._stream)

    async def _handle(self, event: Event) -> str | None:
        if isinstance(event, TextMessage):
            self._size += len(event.data)
            if self._size > self._max:
                await self.close(MESSAGE_TOO_BIG, "message too big")
                raise Closed(MESSAGE_TOO_BIG, "a message from relayd was too big")
            self._parts.append(event.data)
            if not event.message_finished:
                return None
            text = "".join(self._parts)
            self._parts.clear()
            self._size = 0
            return text
        if isinstance(event, Ping):
            await self._write(event.response())
        elif isinstance(event, CloseConnection):
            if self._ws.state is ConnectionState.REMOTE_CLOSING:
                with contextlib.suppress(Closed):
                    await self._write(event.response())
            self._closed = Closed(event.code, event.reason or "")
            await anyio.aclose_forcefully(self._stream)
            raise self._closed
        elif isinstance(event, BytesMessage):
            await self.close(1003, "binary frames are not expected")
            raise Closed(1003, "relayd sent a binary frame")
        return None

    async def _write(self, event: Event) -> None:
        async with self._write_lock:
            if self._closed is not None:
                raise self._closed
            try:
                data = self._ws.send(event)
            except LocalProtocolError:
                raise Closed(ABNORMAL_CLOSURE, "the connection is closing") from None
            try:
                await self._stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                # The connection broke (reset, closed): as documented, that is Closed.
                closed = self._closed = Closed(ABNORMAL_CLOSURE, "connection lost while writing")
                await anyio.aclose_forcefully(self._stream)
                raise closed from exc
            except BaseException:
                # Cancelled mid-write: the stream may hold half a frame.
                self._closed = Closed(ABNORMAL_CLOSURE, "connection lost while writing")
                await anyio.aclose_forcefully(self._stream)
                raise
        # A write that finished still counts as lost if the stream broke meanwhile.


async def connect(
    url: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    subprotocols: Sequence[str] = (),
    ssl_context: ssl.SSLContext | None = None,
    max_message_chars: int = 1 << 20,
) -> WebSocket:
    """Open a WebSocket to ``url`` (``ws://`` or ``wss://``). The caller bounds the time.

    Raises:
        HandshakeRejected: relayd answered with an HTTP status (403, 429, 503...).
        OSError: the TCP or TLS connection failed.
        Closed: the connection broke during the handshake.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or parts.hostname is None:
        raise ValueError(f"not a WebSocket URL: {url!r}")
    tls = parts.scheme == "wss"
    port = parts.port or (443 if tls else 80)
    stream: anyio.abc.ByteStream
    if tls:
        stream = await anyio.connect_tcp(
            parts.hostname, port, tls=True, ssl_context=ssl_context, tls_standard_compatible=False
        )
    else:
        stream = await anyio.connect_tcp(parts.hostname, port)
    try:
        connection = WSConnection(ConnectionType.CLIENT)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        request = Request(
            host=parts.netloc.rpartition("@")[2],
            target=target,
            extra_headers=[(k.encode(), v.encode()) for k, v in headers],
            subprotocols=list(subprotocols),
        )
        await stream.send(connection.send(request))
        pending = await _handshake(stream, connection)
    except BaseException:
        await anyio.aclose_forcefully(stream)
        raise
    socket = WebSocket(stream, connection, max_message_chars)
    socket._events.extend(pending)
    return socket


async def _handshake(stream: anyio.abc.ByteStream, connection: WSConnection) -> list[Event]:
    received = 0
    status: int | None = None
    while True:
        try:
            data = await stream.receive(READ_SIZE)
        except (anyio.EndOfStream, anyio.BrokenResourceError) as exc:
            if status is not None:
                raise HandshakeRejected(status) from None
            raise Closed(ABNORMAL_CLOSURE, "connection lost during the handshake") from exc
        received += len(data)
        try:
            connection.receive_data(data)
            events = list(connection.events())
        except RemoteProtocolError as exc:
            raise Closed(PROTOCOL_ERROR, f"bad handshake answer: {exc}") from None
        for index, event in enumerate(events):
            if isinstance(event, AcceptConnection):
                return events[index + 1 :]
            if isinstance(event, RejectConnection):
                status = event.status_code
                if not event.has_body:
                    raise HandshakeRejected(status)
            elif isinstance(event, RejectData) and event.body_finished:
                raise HandshakeRejected(status or 0)
        if received > MAX_HANDSHAKE_BYTES:
            raise HandshakeRejected(status or 0)
