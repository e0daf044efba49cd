"""What a session needs from the socket that carries it, and the two sockets relayd offers.

A session never knows which transport carried it: the hub drives any :class:`Transport`.
Two exist:

* :class:`AsgiTransport` — ``/ws`` on the main HTTP port, straight from hypercorn's ASGI
  websocket scope (no Quart machinery in between). ASGI can neither send pings nor report
  pongs: hypercorn sends the protocol pings (every ``heartbeat_interval``) and drops a peer
  silent for ``heartbeat_timeout`` (relayd's ``TCPServer`` in ``relayd/_hypercorn.py`` sets that
  read timeout); relayd's own heartbeat stays off.
* :class:`~relayd._relay.wsserver.WebsocketsTransport` — the optional dedicated listener
  (``[websocket] listen``), relayd's own server on the ``websockets`` sans-I/O protocol.
  Heartbeats are WebSocket pings; their pongs count as liveness.

Both authenticate *before* any frame is read: the token offered in the handshake (``?token=``,
``Authorization: Bearer``, or a ``bearer.<token>`` entry in ``Sec-WebSocket-Protocol``) is
extracted here; otherwise the client must send an ``auth`` frame first.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import trio
from attrs import frozen

log = logging.getLogger("relayd.ws")

SUBPROTOCOL = "relayd.v1"
# The same protocol with the lean receipt profile: a sender is told only what it cannot infer
# (queued, and the final status), never pending_ack; an acker gets no ack_received.
LEAN_SUBPROTOCOL = "relayd.v1.lean"
BEARER_PREFIX = "bearer."


class TransportClosed(Exception):
    """The peer (or the network) closed the socket."""

    def __init__(self, code: int | None, reason: str | None = None) -> None:
        super().__init__(f"closed ({code}): {reason or ''}")
        self.code = code
        self.reason = reason


class Transport(Protocol):
    remote: str
    token: str | None
    lean: bool  # the client chose the lean receipt profile
    rest: bool  # a REST session's (relayd/_relay/rest.py), not a socket
    pong_observable: bool
    coalesces: bool  # send_frames writes several frames at once
    # try_send can write without waiting (else the hub keeps a writer task for the socket)
    writes_inline: bool
    # Every write is bounded by write_timeout below the transport, which also logs, counts and
    # closes a slow consumer: the hub's own write timer stays off.
    bounded_writes: bool

    async def receive(self) -> str | bytes:
        """The next frame. Raises :class:`TransportClosed` when the socket is gone."""
        ...

    async def send(self, text: str) -> None:
        """Write one text frame. Cancelling it may leave the frame half-written.

        Raises:
            TransportClosed: the socket is gone (the frame may or may not have gone out).
        """
        ...

    async def send_frames(self, texts: Sequence[str]) -> None:
        """Write text frames in order, in as few socket writes as the transport can. If it
        raises or is cancelled, each of them may or may not have arrived.

        Raises:
            TransportClosed: the socket is gone.
        """
        ...

    def try_send(self, texts: Sequence[str]) -> bool | None:
        """Write text frames now, without waiting, if the transport can: ``True`` when all of
        them are written, ``False`` when they are taken but not all written yet (:meth:`flush`
        ends that write), ``None`` when nothing was taken (write them with
        :meth:`send_frames`)."""
        ...

    async def flush(self) -> None:
        """End the write :meth:`try_send` began. Cancelling it may leave a frame half-written.

        Raises:
            TransportClosed: the socket is gone.
        """
        ...

    async def ping(self) -> None:
        """Send a protocol ping and return when its pong arrives (``pong_observable`` only)."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Send a close frame (best effort: the peer may be gone). If a write was cut off,
        and may have left a frame half-written, drop the connection without one instead."""
        ...


@frozen
class Handshake:
    """What the client offered: a token (if any) and the subprotocol relayd selects."""

    token: str | None
    subprotocol: str | None

    @property
    def lean(self) -> bool:
        """Whether the client chose the lean receipt profile (docs/protocol.md)."""
        return self.subprotocol == LEAN_SUBPROTOCOL


def read_handshake(
    query: str, headers: Iterable[tuple[str, str]], subprotocols: Sequence[str]
) -> Handshake:
    """Find the client's token: ``?token=``, ``Authorization: Bearer``, a ``bearer.`` subprotocol.

    The token itself is never selected as the subprotocol (it would be echoed in the
    response): relayd selects ``relayd.v1.lean`` when offered, else ``relayd.v1`` when
    offered, and browsers must offer one of them next to the ``bearer.<token>`` entry.
    """
    token: str | None = None
    values = parse_qs(query, keep_blank_values=False).get("token")
    if values:
        token = values[0]
    if token is None:
        for name, value in headers:
            if name.lower() == "authorization":
                scheme, _, credentials = value.partition(" ")
                if scheme.lower() == "bearer" and credentials.strip():
                    token = credentials.strip()
                    break
    if token is None:
        for entry in subprotocols:
            if entry.startswith(BEARER_PREFIX) and len(entry) > len(BEARER_PREFIX):
                token = entry[len(BEARER_PREFIX) :]
                break
    chosen = next((p for p in (LEAN_SUBPROTOCOL, SUBPROTOCOL) if p in subprotocols), None)
    return Handshake(token, chosen)


# --- ASGI (main port) ---------------------------------------------------------------------------


class AsgiTransport:
    """A websocket scope of hypercorn's. Its writes are shielded from cancellation: a frame is
    never cut off, and with relayd's hypercorn hooks (``bounded_writes``, see
    ``relayd/_hypercorn.py``) each is bounded by write_timeout, its slow consumer handled there."""

    pong_observable = False
    coalesces = False  # ASGI sends one frame per message
    rest = False
    writes_inline = False

    def __init__(
        self,
        receive: Any,
        send: Any,
        *,
        remote: str,
        token: str | None,
        lean: bool = False,
        bounded_writes: bool = False,
    ) -> None:
        self._receive = receive
        self._send = send
        self.remote = remote
        self.token = token
        self.lean = lean
        self.bounded_writes = bounded_writes
        self._closed = False

    async def receive(self) -> str | bytes:
        event = await self._receive()
        if event["type"] == "websocket.receive":
            text = event.get("text")
            if text is not None:
                return str(text)
            return bytes(event.get("bytes") or b"")
        self._closed = True
        raise TransportClosed(event.get("code"), event.get("reason"))

    async def send(self, text: str) -> None:
        if self._closed:
            raise TransportClosed(None, "disconnected")
        try:
            await self._send({"type": "websocket.send", "text": text})
        except OSError:
            # relayd's hypercorn hook: the connection was gone, or dropped during the write
            # (a slow consumer). Without the hook, hypercorn drops such a send silently and
            # the reader is the first to know.
            self._closed = True
            raise TransportClosed(None, "disconnected") from None
        if self._closed:
            raise TransportClosed(None, "disconnected")

    async def send_frames(self, texts: Sequence[str]) -> None:
        for text in texts:
            await self.send(text)

    def try_send(self, texts: Sequence[str]) -> bool | None:
        return None  # an ASGI send is a coroutine: the writer task does them

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()

    async def ping(self) -> None:  # pragma: no cover - the core never asks this transport
        raise NotImplementedError("ASGI cannot ping; hypercorn pings this socket")

    async def close(self, code: int, reason: str) -> None:
        """Send the close frame, then wait for the client's (bounded by the caller): dropping
        the connection at once would make the client's reply fail, and some clients then
        discard the frames they read just before the close."""
        if self._closed:
            return
        self._closed = True
        await self._send({"type": "websocket.close", "code": code, "reason": reason})
        while (await self._receive())["type"] != "websocket.disconnect":
            pass


def split_target(target: str) -> tuple[str, str]:
    parts = urlsplit(target)
    return parts.path, parts.query


async def abort_after(seconds: float, transport: Transport, code: int, reason: str) -> None:
    """Close ``transport`` with ``code``, giving up after ``seconds`` (the peer may not read)."""
    with (
        trio.move_on_after(seconds),
        contextlib.suppress(TransportClosed, trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await transport.close(code, reason)
