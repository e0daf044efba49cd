"""The transport of a REST session (rule 8 of ``core.py``): no socket, a buffer that pulls
drain.

``GET /messages/pending`` opens a client's REST session with its first pull, through
:meth:`Hub.serve <relayd._relay.hub.Hub.serve>` like any socket: the same authentication,
the same claim of the client in cluster mode, the same delivery machinery. What the core
writes to it lands here at once (``writes_inline``): a delivered message in :attr:`outbox`,
which the waiting pull takes; the welcome frame makes it :attr:`ready`; an error frame says why
it was refused or ended. Everything else the core may send a session (a token warning, a
shutdown notice) has no reader here and is dropped: receipts and key changes never come (the
core keeps them owed for a socket).

The outbox is bounded by the core, which hands a REST session no more deliveries than the
waiting pull may take (``relay.pull_max_limit`` at most).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import trio

from .transport import TransportClosed


class RestTransport:
    """A REST session's end of the hub. ``notify``: called whenever something a pull waits
    for changes (a delivery, readiness, the end)."""

    pong_observable = False
    coalesces = False
    writes_inline = True
    bounded_writes = True  # nothing to write to: a write never waits
    lean = True
    rest = True

    def __init__(self, sid: int, remote: str, token: str, notify: Callable[[], None]) -> None:
        self.sid = sid
        self.remote = remote
        self.token: str | None = token
        self.token_id = ""  # the jti of the token the session runs on (kept by the hub)
        self.outbox: list[dict[str, Any]] = []  # delivered messages no pull has taken yet
        self.ready = False  # the core made it its client's active session
        self.error: tuple[str, str] | None = None  # (code, message) of its first error frame
        self.ended = False
        self.pull: object | None = None  # the pull waiting now, if any (the newest wins)
        self._notify = notify
        self._closed = trio.Event()

    def try_send(self, texts: Sequence[str]) -> bool:
        for text in texts:
            doc = json.loads(text)
            kind = doc.get("type")
            if kind == "message":
                self.outbox.append(doc)
            elif kind == "connection":
                self.ready = True
            elif kind == "error" and self.error is None:
                self.error = (str(doc["error"]["code"]), str(doc["error"]["message"]))
        self._notify()
        return True

    async def send(self, text: str) -> None:
        await self.send_frames([text])

    async def send_frames(self, texts: Sequence[str]) -> None:
        if self.ended:
            raise TransportClosed(None, "ended")
        self.try_send(texts)
        await trio.lowlevel.checkpoint()

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive(self) -> str | bytes:
        """Nothing is ever read from a REST session (acks come through the core directly):
        this waits until the session ends."""
        await self._closed.wait()
        raise TransportClosed(None, "ended")

    async def ping(self) -> None:  # pragma: no cover - the core never asks this transport
        raise NotImplementedError("a REST session has no socket to ping")

    async def close(self, code: int, reason: str) -> None:
        self.end()
        await trio.lowlevel.checkpoint()

    def end(self) -> None:
        """The session is over: the pulls waiting on it return."""
        if not self.ended:
            self.ended = True
            self._closed.set()
            self._notify()

    def take(self, limit: int) -> list[dict[str, Any]]:
        taken = self.outbox[:limit]
        del self.outbox[:limit]
        return taken
