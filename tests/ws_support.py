"""WebSocket clients for end-to-end tests: trio-websocket over loopback, every wait bounded."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio_websocket

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


async def welcomed(client: WsClient) -> dict[str, Any]:
    """Read the client's first frame: the welcome (``connection``) frame; return it."""
    frame = await client.next()
    assert frame["type"] == "connection", frame
    return frame


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
