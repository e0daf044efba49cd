"""WebSocket clients for end-to-end tests: trio-websocket over loopback, every wait bounded."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio_websocket
import wsproto
import wsproto.events

from .support import IO_DEADLINE, RunningRelayd


class WsClient:
    """A connected client socket: JSON frames in and out, with deadlines."""

    def __init__(self, connection: trio_websocket.WebSocketConnection) -> None:
        self.connection = connection

    async def send(self, frame: Mapping[str, Any] | str | bytes) -> None:
        data = json.dumps(frame) if isinstance(frame, Mapping) else frame
        with trio.fail_after(IO_DEADLINE):
            await self.connection.send_message(data)

    async def next(self) -> dict[str, Any]:
        with trio.fail_after(IO_DEADLINE):
            doc: dict[str, Any] = json.loads(await self.connection.get_message())
        return doc

    async def next_of(self, kind: str) -> dict[str, Any]:
        """The next frame of type ``kind``; frames of other types before it are dropped."""
        while True:
            frame = await self.next()
            if frame.get("type") == kind:
                return frame

    async def closed(self) -> int | None:
        """Read until relayd closes the socket; return the close code."""
        with trio.fail_after(IO_DEADLINE):
            try:
                while True:
                    await self.connection.get_message()
            except trio_websocket.ConnectionClosed as exc:
                return None if exc.reason is None else exc.reason.code

    @property
    def subprotocol(self) -> str | None:
        return self.connection.subprotocol


def ws_url(relayd: RunningRelayd, token: str | None = None) -> str:
    url = relayd.addresses.websocket_url
    return url if token is None else f"{url}?token={token}"


@asynccontextmanager
async def ws_connect(
    relayd: RunningRelayd,
    token: str | None = None,
    *,
    how: str = "query",
    subprotocols: Sequence[str] = (),
    message_queue_size: int = 1,
) -> AsyncIterator[WsClient]:
    """A socket to relayd, offering ``token`` the way ``how`` says: ``query`` (``?token=``),
    ``header`` (``Authorization: Bearer``), ``subprotocol`` (``bearer.<token>``, with
    ``relayd.v1``) or ``frame`` (an ``auth`` frame first)."""
    headers: list[tuple[str, str]] = []
    offered = list(subprotocols)
    url = ws_url(relayd)
    if token is not None:
        if how == "query":
            url = ws_url(relayd, token)
        elif how == "header":
            headers.append(("Authorization", f"Bearer {token}"))
        elif how == "subprotocol":
            offered += ["relayd.v1", f"bearer.{token}"]
    async with connect_url(
        url, subprotocols=offered, headers=headers, message_queue_size=message_queue_size
    ) as client:
        if token is not None and how == "frame":
            await client.send({"type": "auth", "token": token})
        yield client


@asynccontextmanager
async def connect_url(
    url: str,
    *,
    subprotocols: Sequence[str] = (),
    headers: Sequence[tuple[str, str]] = (),
    message_queue_size: int = 1,
) -> AsyncIterator[WsClient]:
    """A trio-websocket client socket to ``url``. With ``message_queue_size=0`` it stops
    reading its socket as soon as one message waits unread."""
    async with trio_websocket.open_websocket_url(
        url,
        subprotocols=subprotocols,
        message_queue_size=message_queue_size,
        extra_headers=[(k.encode(), v.encode()) for k, v in headers],
        connect_timeout=IO_DEADLINE,
        disconnect_timeout=IO_DEADLINE,
    ) as connection:
        yield WsClient(connection)
    # trio-websocket's client waits for the server's TCP close after a close handshake the
    # server started, and leaks its socket (a ResourceWarning) when its nursery is cancelled
    # first. Closing an already closed stream is a no-op.
    await connection._stream.aclose()


class RawSocket:
    """A WebSocket client on a bare TCP stream, driven by wsproto: it reads only when asked,
    never answers a close or a ping on its own, and costs one socket and no task."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)

    @classmethod
    async def open(cls, host: str, port: int, path: str = "/ws") -> RawSocket:
        """Connect and send the upgrade request (the answer is read with :meth:`event`)."""
        with trio.fail_after(IO_DEADLINE):
            stream = await trio.open_tcp_stream(host, port)
            raw = cls(stream)
            await stream.send_all(raw.ws.send(wsproto.events.Request(host=host, target=path)))
        return raw

    async def event(self) -> wsproto.events.Event:
        """The next event relayd's bytes make: the handshake's answer, a frame, the close.
        Pings (hypercorn sends them on the main port) are skipped, unanswered."""
        with trio.fail_after(IO_DEADLINE):
            while True:
                for event in self.ws.events():
                    if not isinstance(event, wsproto.events.Ping):
                        return event
                data = await self.stream.receive_some(65536)
                if not data:
                    raise AssertionError("relayd dropped the connection without a close frame")
                self.ws.receive_data(data)

    async def close_code(self) -> int:
        """Read until relayd's close frame; return its code."""
        while True:
            event = await self.event()
            if isinstance(event, wsproto.events.CloseConnection):
                return event.code
