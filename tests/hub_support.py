"""The relay hub on fake sockets, for tests under Trio's fake clock.

:class:`Peer` is a :class:`relayd._relay.transport.Transport` whose other end is the test: it
sends frames in, reads frames out, can stop reading (writes block, as on a socket whose peer
does not drain it), read slowly (each frame takes ``write_delay``), stop answering pings, or
vanish. :func:`start_hub` runs a real :class:`~relayd._relay.hub.Hub` on a real in-memory
store with the store calls made inline (:class:`GatedStore` can hold them back, as a store
that lags), and an :class:`AuthService` whose clock is ``EPOCH + trio.current_time()``: under
``autojump_clock`` every timer fires at an exact virtual instant.

Clients are inserted straight into the store and their tokens minted by the codec, so that no
KDF runs in a worker thread (the fake clock could jump while it did).
"""

from __future__ import annotations

import json
import uuid as uuid_module
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from relayd._auth import CLIENT_ROLES, AuthService
from relayd._cluster import RedisCluster
from relayd._config import Config, structure
from relayd._engine import Engine
from relayd._redis import RedisStore
from relayd._relay.hub import Hub
from relayd._relay.records import StoreOp
from relayd._relay.transport import TransportClosed
from relayd._store import ClientRecord, Store, inline_executor
from relayd._tokens import TokenCodec

from .support import TEST_SECRET, _merge

EPOCH = 1_700_000_000.0
# No wait in these tests is longer than this in virtual time.
VIRTUAL_DEADLINE = 3600.0


def virtual_clock() -> float:
    return EPOCH + trio.current_time()


class Peer:
    """One fake socket, seen from the client's side."""

    def __init__(self, *, token: str | None, remote: str, pong_observable: bool) -> None:
        self.token = token
        self.remote = remote
        self.pong_observable = pong_observable
        self.lean = False
        self._inbound_send, self._inbound = trio.open_memory_channel[str | bytes | None](64)
        self.frames: list[dict[str, Any]] = []  # written by relayd, not read by the test yet
        self._arrived = trio.Event()
        self.reading = trio.Event()  # while unset, relayd's writes block
        self.reading.set()
        self.answer_pings = True
        self.write_delay = 0.0  # virtual seconds each frame takes to go out: a slow link
        self.pings = 0
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.closed = trio.Event()
        self.close_hangs = False  # the close handshake never completes: no reply comes
        self.served = trio.Event()  # the hub is done with this socket

    # --- the Transport side (relayd calls these) -------------------------------------------

    async def receive(self) -> str | bytes:
        if self.closed.is_set():
            raise TransportClosed(self.close_code)
        item = await self._inbound.receive()
        if item is None:
            raise TransportClosed(1006, "peer vanished")
        return item

    coalesces = False
    rest = False
    bounded_writes = False  # the hub's write timer bounds its writes
    writes_inline = True

    async def send_frames(self, texts: Sequence[str]) -> None:
        for text in texts:
            await self.send(text)

    def try_send(self, texts: Sequence[str]) -> bool | None:
        # Like a socket with room: written at once while the client reads and the link is fast.
        if not self.reading.is_set() or self.write_delay or self.closed.is_set():
            return None
        for text in texts:
            self._deliver(text)
        return True

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()

    def _deliver(self, text: str) -> None:
        self.frames.append(json.loads(text))
        self._arrived.set()
        self._arrived = trio.Event()

    async def send(self, text: str) -> None:
        await self.reading.wait()
        if self.write_delay:
            await trio.sleep(self.write_delay)
        if self.closed.is_set():
            raise TransportClosed(self.close_code)
        self._deliver(text)

    async def ping(self) -> None:
        self.pings += 1
        if not self.answer_pings:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()

    async def close(self, code: int, reason: str) -> None:
        if not self.closed.is_set():
            self.close_code = code
            self.close_reason = reason
            self.closed.set()
            self._arrived.set()
        if self.close_hangs:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()

    # --- the test's side --------------------------------------------------------------------

    async def say(self, frame: Mapping[str, Any] | str | bytes) -> None:
        """Send ``frame`` to relayd, as the client."""
        data = json.dumps(frame) if isinstance(frame, Mapping) else frame
        await self._inbound_send.send(data)

    def vanish(self) -> None:
        """The network drops the connection: relayd's next read fails."""
        self._inbound_send.send_nowait(None)

    async def next(self) -> dict[str, Any]:
        """The next frame relayd wrote. Fails if relayd closes the socket first."""
        with trio.fail_after(VIRTUAL_DEADLINE):
            while not self.frames:
                if self.closed.is_set():
                    raise AssertionError(f"closed ({self.close_code}) while waiting for a frame")
                await self._arrived.wait()
        return self.frames.pop(0)

    async def next_of(self, kind: str) -> dict[str, Any]:
        """The next frame of type ``kind``; frames of other types before it are dropped."""
        while True:
            frame = await self.next()
            if frame.get("type") == kind:
                return frame

    async def wait_closed(self) -> int | None:
        with trio.fail_after(VIRTUAL_DEADLINE):
            await self.closed.wait()
        return self.close_code

    async def wait_served(self) -> None:
        """Until the hub is done with this socket (and has told the core)."""
        with trio.fail_after(VIRTUAL_DEADLINE):
            await self.served.wait()


class GatedStore(Store):
    """A store whose message operations (:meth:`execute`) wait while ``gate`` is unset: a
    store that lags. The other calls (clients, tokens) go through."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = trio.Event()
        self.gate.set()
        self.waiting = 0  # batches held at the gate now

    async def execute(self, ops: Sequence[StoreOp], **kwargs: Any) -> list[Any]:
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        return await super().execute(ops, **kwargs)


class GatedRedisStore(RedisStore):
    """A Redis store whose seq reservations wait while ``gate`` is unset (a reservation that
    is slow to come back); ``held`` is set once one waits there."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = trio.Event()
        self.gate.set()
        self.held = trio.Event()

    async def reserve_seqs(self, count: int) -> int:
        if not self.gate.is_set():
            self.held.set()
            await self.gate.wait()
        return await super().reserve_seqs(count)


class RecordingStore(GatedStore):
    """A :class:`GatedStore` that records each group commit as it starts: when, the kinds of
    its operations, and whether it ran on the event loop's thread (``inline``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commits: list[tuple[float, list[str]]] = []
        self.inline: list[bool] = []  # whether each ran on the event loop's thread

    async def execute(self, ops: Sequence[StoreOp], **kwargs: Any) -> list[Any]:
        self.commits.append((trio.current_time(), [type(op).__name__ for op in ops]))
        self.inline.append(kwargs.get("inline", False))
        return await super().execute(ops, **kwargs)


@attrs.frozen
class TestClient:
    uuid: str
    name: str
    token: str


@attrs.define
class HubEnv:
    hub: Hub
    store: Engine
    auth: AuthService
    config: Config
    nursery: trio.Nursery

    async def client(self, name: str) -> TestClient:
        uuid = str(uuid_module.uuid4())
        now = self.auth.now
        record = ClientRecord(uuid, name, "", CLIENT_ROLES, now, now)
        assert await self.store.insert_client(record) == "inserted"
        return TestClient(uuid, name, self.token(uuid))

    async def register(self, name: str) -> tuple[TestClient, str]:
        """Register a client through the auth service: the client, with the access token of
        its first login, and that login's refresh token."""
        registered = await self.auth.register(name, None, source=None)
        tokens = registered.tokens
        client = TestClient(registered.client.uuid, name, tokens.access.token)
        return client, tokens.refresh.token

    def token(self, uuid: str, *, ttl: float | None = None) -> str:
        issued = self.auth.codec.issue(
            sub=uuid,
            token_use="access",
            roles=CLIENT_ROLES,
            ttl=self.config.auth.access_ttl if ttl is None else ttl,
        )
        return issued.token

    def open(
        self, token: str | None = None, *, remote: str = "10.0.0.1", pong: bool = True
    ) -> Peer:
        """A socket accepted by a listener, served by the hub from now on. ``pong``: its
        transport sends protocol pings and sees their pongs (as the dedicated listener's);
        without, it cannot ping at all (as on the main port, where hypercorn pings)."""
        peer = Peer(token=token, remote=remote, pong_observable=pong)
        self.nursery.start_soon(self._serve, peer)
        return peer

    async def _serve(self, peer: Peer) -> None:
        await self.hub.serve(peer)
        peer.served.set()

    async def connect(self, client: TestClient, *, pong: bool = True) -> Peer:
        """Open and authenticate a socket for ``client``; return once its welcome arrived."""
        peer = self.open(client.token, pong=pong)
        welcome = await peer.next()
        assert welcome["type"] == "connection", welcome
        return peer


def hub_config(overrides: Mapping[str, Any] | None = None) -> Config:
    base: dict[str, Any] = {"store": {"path": ":memory:"}, "auth": {"kdf_cost": 1024}}
    return structure(_merge(base, overrides or {}), "<hub test config>")


@asynccontextmanager
async def running_hub(
    overrides: Mapping[str, Any] | None = None,
    *,
    store: Engine | None = None,
    cluster: RedisCluster | None = None,
) -> AsyncIterator[HubEnv]:
    """A hub (and its store, by default an in-memory SQLite one) for the body of the ``async
    with``; shut down on exit. With ``cluster``, a node of it (its store is on Redis)."""
    config = hub_config(overrides)
    async with _store(store) as opened, trio.open_nursery() as nursery:
        codec = TokenCodec(
            TEST_SECRET.encode(),
            issuer=config.auth.issuer,
            audience=config.auth.audience,
            leeway=config.auth.leeway,
            clock=virtual_clock,
        )
        auth = AuthService(opened, codec, config.auth)
        await auth.load()
        hub = await Hub.open(config, opened, auth, clock=virtual_clock, cluster=cluster)
        await nursery.start(hub.run)
        if cluster is not None:
            await nursery.start(cluster.run, hub)
        env = HubEnv(hub, opened, auth, config, nursery)
        yield env
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def gated_store() -> AsyncIterator[GatedStore]:
    """An in-memory :class:`GatedStore`, gate open, to pass to :func:`running_hub`."""
    async with GatedStore.open(":memory:", executor=inline_executor) as store:
        assert isinstance(store, GatedStore)
        yield store


@asynccontextmanager
async def _store(store: Engine | None) -> AsyncIterator[Engine]:
    if store is not None:
        yield store
        return
    async with Store.open(":memory:", executor=inline_executor) as opened:
        yield opened
