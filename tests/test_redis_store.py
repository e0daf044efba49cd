"""What the Redis engine promises beyond the store's contract (tests/test_store*.py run that on
both engines): one round trip per call, batches that are all or nothing, the script loaded
again when Redis lost it, clear errors within the deadline when Redis is away, its key layout
(what a deletion leaves; no content at rest, RDB and AOF included), WAIT for replicas,
Sentinel, TLS and its URLs. All against real servers (tests/redis_support.py).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import pytest
import trio
import trio.testing
import trustme

from relayd._atrest import StoreKeys, UndecryptableRow
from relayd._engine import HistoryQuery
from relayd._errors import SchemaTooNewError, StoreError, StoreUnavailable
from relayd._redis import LAYOUT_VERSION, RedisStore, RedisUrlError, parse_url
from relayd._relay.records import (
    Finish,
    Insert,
    Inserted,
    LoadQueue,
    Purge,
    QueuePage,
    SetAttempts,
    SetReceiptPending,
    Status,
    StoreOp,
)

from .redis_support import (
    RedisServer,
    command,
    require_redis,
    start_redis,
    start_sentinel,
    stop_redis,
)
from .store_support import KEY_1, Target, files_holding, holds, point_message_at, redis_dump
from .support import IO_DEADLINE
from .test_keys_store import key
from .test_store import UUID_A, UUID_B, client
from .test_store_contract import UUID_C
from .test_store_history import talk

KEYS = StoreKeys.from_bytes([("k1", KEY_1)], "<test keys>")
SECRET_TEXT = "the-launch-code-is-0000"


def queued(seq: int, fields: str = '{"content": "hi"}') -> Insert:
    return Insert(None, seq, UUID_A, UUID_B, f"m{seq}", False, True, fields, 1.0, 1e9)


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis server for this test alone (it may stop it, or change its settings)."""
    server = start_redis(require_redis(), tmp_path)
    try:
        yield server
    finally:
        stop_redis(server)


def url_of(server: RedisServer, db: int = 0) -> str:
    return f"redis://{server.host}:{server.port}/{db}"


# --- one round trip, all or nothing ---------------------------------------------------------


@attrs.define
class CountingProxy:
    """A TCP relay between the store and Redis that notes the name of every command the store
    sends: how many round trips a call costs, seen from outside the client library."""

    upstream: tuple[str, int]
    port: int = 0
    commands: list[str] = attrs.field(factory=list)
    silent: bool = False  # True: Redis's replies go nowhere, as from a server that hangs

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, downstream: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream(*self.upstream)
        async with upstream, downstream, trio.open_nursery() as nursery:
            nursery.start_soon(self._requests, downstream, upstream)
            nursery.start_soon(self._replies, upstream, downstream)

    async def _requests(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        buffer = b""
        async for chunk in source:
            buffer += chunk
            while (parsed := _command(buffer)) is not None:
                name, buffer = parsed
                self.commands.append(name)
            await sink.send_all(chunk)

    async def _replies(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        async for chunk in source:
            if not self.silent:
                await sink.send_all(chunk)


def _command(buffer: bytes) -> tuple[str, bytes] | None:
    """The name of the first RESP command in ``buffer`` and what follows it; ``None`` if the
    command is not all there yet."""
    head, sep, rest = buffer.partition(b"\r\n")
    if not sep:
        return None
    assert head.startswith(b"*"), head
    words: list[bytes] = []
    for _ in range(int(head[1:])):
        length, sep, rest = rest.partition(b"\r\n")
        if not sep or len(rest) < int(length[1:]) + 2:
            return None
        words.append(rest[: int(length[1:])])
        rest = rest[int(length[1:]) + 2 :]
    return words[0].decode().upper(), rest


async def counting_proxy(nursery: trio.Nursery, url: str) -> tuple[CountingProxy, str]:
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    proxy = CountingProxy((parts.hostname, parts.port))
    await nursery.start(proxy.serve)
    return proxy, f"redis://127.0.0.1:{proxy.port}{parts.path}"


def cycle(first: int, size: int) -> list[StoreOp]:
    """A relayd-shaped batch: ``size`` messages accepted, loaded, counted, acknowledged."""
    seqs = range(first, first + size)
    return [
        *(queued(seq) for seq in seqs),
        LoadQueue(UUID_B, first - 1, size, 1 << 20),
        *(SetAttempts(seq, 1) for seq in seqs),
        *(Finish(seq, Status.ACKNOWLEDGED, 2.0, receipt_pending=False) for seq in seqs),
    ]


async def test_every_call_is_one_round_trip(redis_url: str, nursery: trio.Nursery) -> None:
    proxy, url = await counting_proxy(nursery, redis_url)
    with trio.fail_after(IO_DEADLINE):
        async with RedisStore.open(url, keys=KEYS) as store:
            for uuid in (UUID_A, UUID_B):
                await store.insert_client(client(uuid))
            first = 1
            for size in (1, 16, 64):
                proxy.commands.clear()
                results = await store.execute(cycle(first, size), max_queued=1000)
                assert proxy.commands == ["EVALSHA"]
                page = results[size]
                assert isinstance(page, QueuePage)
                assert len(page.rows) == size
                first += size
            proxy.commands.clear()
            await store.publish_keys(UUID_A, [key(1)], 1.0, max_superseded=4, max_notices=4)
            await store.read_keys(UUID_A, UUID_B, 2.0, max_readers=4)
            await store.list_clients()
            await store.history(HistoryQuery(UUID_A, peer=UUID_B, limit=50))
            await store.delete_client(UUID_B, 3.0)
            assert proxy.commands == ["EVALSHA"] * 5


async def test_a_refused_batch_writes_nothing(redis_url: str) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with RedisStore.open(redis_url, keys=KEYS) as store:
            for uuid in (UUID_A, UUID_B):
                await store.insert_client(client(uuid))
            assert await store.execute([queued(1)], max_queued=10) == [Inserted(1)]
            before = await redis_dump(redis_url)
            # Its second insert takes a seq that holds another message: the first, and the
            # finish before it, must not stay behind.
            batch: list[StoreOp] = [
                Finish(1, Status.ACKNOWLEDGED, 2.0, receipt_pending=True),
                queued(2),
                attrs.evolve(queued(1), msgid="another"),
            ]
            with pytest.raises(StoreError, match="seq 1 holds another message") as refused:
                await store.execute(batch, max_queued=10)
            assert not isinstance(refused.value, StoreUnavailable)
            assert await redis_dump(redis_url) == before


async def test_the_script_is_loaded_again_when_redis_lost_it(
    redis_server: RedisServer, redis_url: str, nursery: trio.Nursery
) -> None:
    proxy, url = await counting_proxy(nursery, redis_url)
    with trio.fail_after(IO_DEADLINE):
        async with RedisStore.open(url) as store:
            for uuid in (UUID_A, UUID_B):
                await store.insert_client(client(uuid))
            assert await store.execute([queued(1)], max_queued=10) == [Inserted(1)]
            command(redis_server, ("SCRIPT", "FLUSH"))
            proxy.commands.clear()
            assert await store.execute([queued(2)], max_queued=10) == [Inserted(2)]
            # NOSCRIPT ran nothing: loaded, then run once.
            assert proxy.commands == ["EVALSHA", "SCRIPT", "EVALSHA"]
            assert (await store.undelivered(UUID_B, 10))[0] == 2


# --- Redis away --------------------------------------------------------------------------------


async def test_a_stopped_server_is_unavailable_within_the_deadline_and_then_back(
    own_server: RedisServer,
) -> None:
    where = f"{own_server.host}:{own_server.port}"
    async with RedisStore.open(url_of(own_server), call_timeout=2.0) as store:
        await store.insert_client(client(UUID_A))
        await trio.to_thread.run_sync(stop_redis, own_server)
        for call in (
            partial(store.get_client, UUID_A),
            partial(store.execute, [queued(1)], max_queued=10),
            partial(store.reserve_seqs, 1),
        ):
            with trio.fail_after(2.5), pytest.raises(StoreUnavailable, match=where) as caught:
                await call()
            assert "cannot reach Redis" in str(caught.value)
        # The same port again (empty: it kept nothing): the store works again as it was.
        restarted = await trio.to_thread.run_sync(
            partial(start_redis, require_redis(), own_server.data_dir, port=own_server.port)
        )
        try:
            with trio.fail_after(IO_DEADLINE):
                assert await store.insert_client(client(UUID_B)) == "inserted"
                assert [c.uuid for c in await store.list_clients()] == [UUID_B]
        finally:
            await trio.to_thread.run_sync(stop_redis, restarted)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_opening_an_unreachable_server_says_where_and_never_the_password() -> None:
    port = _closed_port()
    with trio.fail_after(IO_DEADLINE), pytest.raises(StoreUnavailable) as caught:
        async with RedisStore.open(f"redis://:s3cret-pw@127.0.0.1:{port}/2"):
            pytest.fail("the store opened")  # pragma: no cover
    message = str(caught.value)
    assert message.startswith(f"redis://127.0.0.1:{port}/2: cannot reach Redis")
    assert "s3cret-pw" not in message


async def test_a_server_that_never_answers_fails_at_the_deadline_exactly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with socket.socket() as silent:  # accepts connections (its backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        start = trio.current_time()
        with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{port}/0"):
            async with RedisStore.open(f"redis://127.0.0.1:{port}/0", call_timeout=3.0):
                pytest.fail("the store opened")  # pragma: no cover
        assert trio.current_time() == start + 3.0


async def test_a_server_that_stops_answering_fails_each_call_at_its_deadline(
    redis_url: str, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # Virtual time jumps only once nothing happened for a while of real time: the real
    # server's answers come well before.
    autojump_clock.autojump_threshold = 1.0
    proxy, url = await counting_proxy(nursery, redis_url)
    async with RedisStore.open(url, call_timeout=4.0) as store:
        await store.insert_client(client(UUID_A))
        proxy.silent = True
        for call in (partial(store.get_client, UUID_A), partial(store.reserve_seqs, 1)):
            start = trio.current_time()
            with pytest.raises(StoreUnavailable, match="did not answer within 4 s"):
                await call()
            assert trio.current_time() == start + 4.0


async def test_a_replica_is_no_primary(own_server: RedisServer, tmp_path: Path) -> None:
    (tmp_path / "replica").mkdir()
    replica = start_redis(
        require_redis(), tmp_path / "replica", "--replicaof", own_server.host, str(own_server.port)
    )
    try:
        with trio.fail_after(IO_DEADLINE), pytest.raises(StoreUnavailable, match="read only"):
            async with RedisStore.open(url_of(replica)):
                pytest.fail("the store opened")  # pragma: no cover
    finally:
        stop_redis(replica)


async def test_a_key_of_another_type_is_a_store_error_not_an_outage(
    redis_server: RedisServer, redis_url: str
) -> None:
    db = urlsplit(redis_url).path.strip("/")
    with trio.fail_after(IO_DEADLINE):
        async with RedisStore.open(redis_url) as store:
            command(redis_server, ("SELECT", db), ("SET", "relayd:queues", "not a set"))
            with pytest.raises(StoreError, match="key holding the wrong kind of value") as caught:
                await store.queue_depths()
            assert not isinstance(caught.value, StoreUnavailable)


async def test_a_server_out_of_memory_is_unavailable(own_server: RedisServer) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with RedisStore.open(url_of(own_server)) as store:
            command(own_server, ("CONFIG", "SET", "maxmemory", "1"))
            with pytest.raises(StoreUnavailable, match="OOM"):
                await store.insert_client(client(UUID_A))
            command(own_server, ("CONFIG", "SET", "maxmemory", "0"))
            assert await store.insert_client(client(UUID_A)) == "inserted"


# --- layout ------------------------------------------------------------------------------------


async def test_a_newer_layout_is_refused(redis_server: RedisServer, redis_url: str) -> None:
    db = urlsplit(redis_url).path.strip("/")
    newer = LAYOUT_VERSION + 1
    command(redis_server, ("SELECT", db), ("SET", "relayd:schema", str(newer)))
    with (
        trio.fail_after(IO_DEADLINE),
        pytest.raises(SchemaTooNewError, match=f"layout version {newer}"),
    ):
        async with RedisStore.open(redis_url):
            pytest.fail("the store opened")  # pragma: no cover


async def test_a_message_and_its_delivery_pointed_at_another_recipient_do_not_decrypt(
    redis_url: str,
) -> None:
    """tests/test_atrest.py points a delivery at another client (its message's address no
    longer matches); here the message's address goes with it, which the content's binding
    to (id, sender, address, msgid) catches."""
    target = Target("redis", redis_url, keys=KEYS)
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            await store.insert_client(client(UUID_A))
            await store.insert_client(client(UUID_B))
            await store.execute([queued(1, SECRET_TEXT)], max_queued=9)  # A to B
        await point_message_at(target, 1, UUID_A, address=True)
        with pytest.raises(UndecryptableRow, match="does not decrypt with key 'k1'"):
            async with target.open():
                pytest.fail("the store opened")  # pragma: no cover


async def test_prefixes_keep_installations_apart(redis_url: str) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with (
            RedisStore.open(redis_url, prefix="one:") as one,
            RedisStore.open(redis_url, prefix="two:") as two,
        ):
            await one.insert_client(client(UUID_A))
            await two.insert_client(client(UUID_B))
            await one.execute([queued(1)], max_queued=9)
            await two.execute(
                [attrs.evolve(queued(1), sender=UUID_B, recipient=UUID_B)], max_queued=9
            )
            assert [c.uuid for c in await one.list_clients()] == [UUID_A]
            assert [c.uuid for c in await two.list_clients()] == [UUID_B]
            assert await one.queue_depths() == {}  # UUID_B is no client of "one"
    keys = set(await redis_dump(redis_url))
    assert all(k.startswith((b"one:", b"two:")) for k in keys), keys


async def test_a_deleted_client_leaves_only_what_sqlite_keeps(redis_url: str) -> None:
    """SQLite keeps a deleted client's row (a tombstone), what still waits for it, and an
    invite it spent; its families, keys, readers, notices and history go (tests/test_store.py,
    tests/test_keys_store.py, tests/test_store_history.py). Here: every key or value that
    still names the client."""
    gone = UUID_A
    with trio.fail_after(IO_DEADLINE):
        async with RedisStore.open(redis_url, keys=KEYS) as store:
            await store.create_invite("inv", by="op", at=1.0, expires_at=99.0, max_open=9)
            assert await store.insert_client(client(gone, at=2.0), invite="inv") == "inserted"
            await store.insert_client(client(UUID_B))
            await store.create_family("fam", gone, "j", 3.0, 99.0)
            for owner, reader in ((gone, UUID_B), (UUID_B, gone)):
                await store.publish_keys(owner, [key(1)], 3.0, max_superseded=4, max_notices=4)
                await store.read_keys(owner, reader, 4.0, max_readers=4)
                await store.publish_keys(owner, [key(2)], 5.0, max_superseded=4, max_notices=4)
            to_b, to_gone = queued(1), attrs.evolve(queued(2), sender=UUID_B, recipient=gone)
            await store.execute([to_b, to_gone], max_queued=9)
            await store.execute([Finish(1, Status.FAILED, 6.0, receipt_pending=True)], max_queued=9)
            assert await store.delete_client(gone, 7.0)
    dump = await redis_dump(redis_url)
    naming = {k for k, v in dump.items() if holds(k, gone.encode()) or holds(v, gone.encode())}
    kept = {
        f"relayd:{name}".encode()
        for name in (
            f"c:{gone}",  # the tombstone
            # gone -> B, final, is history, gone with its indexes (dedupe, receipts owed...).
            "m:2",  # B -> gone, its delivery still queued for it, and their indexes
            "dl:2",
            f"rid:{gone}",
            f"q:{gone}",
            "queues",
            f"hr:{gone}",
            f"hp:{UUID_B}:{gone}",
            "i:inv",  # spent by it
        )
    }
    assert naming == kept
    assert set(dump[f"relayd:c:{gone}".encode()]) == {b"n", b"h", b"r", b"ca", b"tv", b"da"}


# --- history's indexes ------------------------------------------------------------------------

HISTORY_INDEX = re.compile(rb"relayd:(hr|hs|hp|hcr|hcs|hcp):")


def history_indexes(dump: dict[bytes, Any]) -> dict[bytes, set[int]]:
    """The history indexes in ``dump``: key -> the seqs it holds (each scored by itself)."""
    found: dict[bytes, set[int]] = {}
    for name, members in dump.items():
        if HISTORY_INDEX.match(name):
            assert all(score == int(member) for member, score in members), name
            found[name] = {int(member) for member, _ in members}
    return found


def history_indexes_due(dump: dict[bytes, Any]) -> dict[bytes, set[int]]:
    """The history indexes the deliveries in ``dump`` call for (the package's key layout):
    each delivery in its recipient's, its sender's (not a topic's delivery: its publisher's
    history lists it once, in the topic's), the two's, and those again within its message's
    conversation."""
    due: dict[bytes, set[int]] = {}
    for name, row in dump.items():
        if not name.startswith(b"relayd:dl:"):
            continue
        sender, recipient = row[b"s"], row[b"r"]
        message = dump[b"relayd:m:" + row[b"m"]]
        indexes = [b"hr:" + recipient, b"hs:" + sender, b"hp:" + sender + b":" + recipient]
        if b"tp" in message:
            indexes.remove(b"hs:" + sender)
        conversation = message.get(b"cv")
        if conversation is not None:
            indexes += [b"hc" + index[1:] + b":" + conversation for index in indexes]
        for index in indexes:
            due.setdefault(b"relayd:" + index, set()).add(int(name.removeprefix(b"relayd:dl:")))
    return due


async def test_history_indexes_hold_every_delivery_and_nothing_else(redis_url: str) -> None:
    """Through inserts, finishes, purges and a client's deletion, each history index holds
    exactly the deliveries it should: none missing (a page would skip it), none left behind
    (an orphan would grow forever); and once every message is purged, nothing but the clients
    is left."""

    async def consistent() -> dict[bytes, Any]:
        dump = await redis_dump(redis_url)
        assert history_indexes(dump) == history_indexes_due(dump)
        return dump

    a, b = UUID_A.encode(), UUID_B.encode()
    with trio.fail_after(IO_DEADLINE):
        async with RedisStore.open(redis_url, keys=KEYS) as store:
            for uuid in (UUID_A, UUID_B, UUID_C):
                await store.insert_client(client(uuid))
            final_at_insert = attrs.evolve(
                talk(5, UUID_C, UUID_B, "x"), status=Status.DELIVERED, receipt_pending=True
            )
            await store.execute(
                [
                    talk(1, UUID_A, UUID_B, "x"),
                    talk(2, UUID_B, UUID_A, "x"),
                    talk(3, UUID_C, UUID_A),
                    talk(4, UUID_A, UUID_A, "note"),
                    final_at_insert,
                    talk(6, UUID_B, UUID_C),
                ],
                max_queued=10,
            )
            indexes = history_indexes(await consistent())
            assert indexes[b"relayd:hcp:" + a + b":" + b + b":x"] == {1}
            assert indexes[b"relayd:hp:" + a + b":" + a] == {4}
            assert indexes[b"relayd:hr:" + a] == {2, 3, 4}
            finals = [
                Finish(seq, Status.ACKNOWLEDGED, 10.0 + seq, False, keep_content=True)
                for seq in (1, 2, 3, 4)
            ]
            await store.execute(finals, max_queued=10)
            await consistent()
            await store.execute([Purge(finished_before=12.5, receipts_before=0.0)], max_queued=10)
            assert set(history_indexes(await consistent())[b"relayd:hs:" + a]) == {4}
            assert await store.delete_client(UUID_A, 20.0)
            assert not any(a in index for index in history_indexes(await consistent()))
            await store.execute(
                [
                    Finish(6, Status.DELIVERED, 21.0, False),
                    SetReceiptPending((5,), pending=False),
                    Purge(finished_before=30.0, receipts_before=0.0),
                ],
                max_queued=10,
            )
    dump = await consistent()
    assert set(dump) == {
        f"relayd:{name}".encode()
        for name in ("schema", "seq", "clients", f"c:{UUID_A}", f"c:{UUID_B}", f"c:{UUID_C}")
    }


async def test_a_big_history_is_forgotten_a_page_at_a_time_and_a_cut_deletion_finished_at_open(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleting a client deletes its history a page per call (Redis runs nothing else during
    one); a deletion cut short between pages is finished by the next open of the store."""
    monkeypatch.setattr("relayd._redis._store.FORGET_PAGE", 2)
    calls: list[str] = []
    with trio.fail_after(IO_DEADLINE):
        async with RedisStore.open(redis_url) as store:
            for uuid in (UUID_A, UUID_B):
                await store.insert_client(client(uuid))
            sent = [talk(seq, UUID_A, UUID_B) for seq in range(1, 8)]
            await store.execute(sent, max_queued=100)
            finals = [Finish(seq, Status.DELIVERED, 10.0, False) for seq in range(1, 7)]
            await store.execute(finals, max_queued=100)
            call = store._call

            async def counted(operation: str, *args: Any, write: bool = True) -> Any:
                calls.append(operation)
                return await call(operation, *args, write=write)

            monkeypatch.setattr(store, "_call", counted)
            assert await store.delete_client(UUID_A, 20.0)
            # 7 deliveries on the sent side, 0 received: pages of 2, the first two with the
            # tombstone, then three more (1-2, 3-4; 5-6, 7, the received side).
            assert calls == ["delete_client"] + ["forget_history"] * 3
            # What waits (7) stays; the final ones are gone from B's history too.
            assert [e.seq for e in await store.history(HistoryQuery(UUID_B))] == [7]
            # Cut short: the tombstone and two pages of one are made, then the node stops.
            await store.insert_client(client(UUID_C))
            await store.execute([talk(seq, UUID_C, UUID_B) for seq in (8, 9, 10)], max_queued=9)
            ends = [Finish(seq, Status.DELIVERED, 30.0, False) for seq in (8, 9, 10)]
            await store.execute(ends, max_queued=100)
            assert await call("delete_client", UUID_C, "40.0", 1) == [1, 1]
            assert [e.seq for e in await store.history(HistoryQuery(UUID_B))] == [10, 7]
        assert UUID_C.encode() in (await redis_dump(redis_url))[b"relayd:forget"]
        async with RedisStore.open(redis_url) as store:
            assert [e.seq for e in await store.history(HistoryQuery(UUID_B))] == [7]
    assert b"relayd:forget" not in await redis_dump(redis_url)


async def test_a_purge_goes_a_page_per_call_past_what_it_keeps(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A purge looks at a page of the oldest finished deliveries per call (Redis runs nothing
    else during one), and steps past those it keeps (a receipt still owed), so that they never
    stop it from reaching the rest."""
    monkeypatch.setattr("relayd._redis._codec.PURGE_PAGE", 2)
    calls: list[str] = []
    with trio.fail_after(IO_DEADLINE):
        async with RedisStore.open(redis_url) as store:
            for uuid in (UUID_A, UUID_B):
                await store.insert_client(client(uuid))
            await store.execute([talk(seq, UUID_A, UUID_B) for seq in range(1, 9)], max_queued=99)
            # The two oldest keep a receipt owed (its sender never came); the next five were
            # told; the last still waits.
            finals = [Finish(seq, Status.DELIVERED, float(seq), seq <= 2) for seq in range(1, 8)]
            await store.execute(finals, max_queued=99)
            call = store._call

            async def counted(operation: str, *args: Any, write: bool = True) -> Any:
                calls.append(operation)
                return await call(operation, *args, write=write)

            monkeypatch.setattr(store, "_call", counted)
            await store.execute([Purge(finished_before=100.0, receipts_before=0.0)], max_queued=9)
            # The batch's page (1, 2: kept), then 3-4, 5-6, 7 and the end.
            assert calls == ["purge"] * 3
            left = await store.history(HistoryQuery(UUID_B, newest_first=False))
            assert [entry.seq for entry in left] == [1, 2, 8]


async def test_no_content_at_rest_in_redis_its_rdb_or_its_aof(tmp_path: Path) -> None:
    server = start_redis(
        require_redis(),
        tmp_path,
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--rdbcompression",
        "no",  # else a snapshot could hide text by compressing it
    )
    plain_text = "a-plain-text-control-1111"
    try:
        with trio.fail_after(IO_DEADLINE):
            async with (
                RedisStore.open(url_of(server), keys=KEYS) as sealed,
                RedisStore.open(url_of(server), prefix="plain:") as plain,
            ):
                assert sealed.durability == "aof-always"
                for store, text in ((sealed, SECRET_TEXT), (plain, plain_text)):
                    await store.insert_client(client(UUID_A))
                    await store.insert_client(client(UUID_B))
                    await store.execute([queued(1, f'{{"content": "{text}"}}')], max_queued=9)
            command(server, ("SAVE",))
        dump = await redis_dump(url_of(server))
        at_rest = await trio.to_thread.run_sync(files_holding, tmp_path, SECRET_TEXT.encode())
        controls = await trio.to_thread.run_sync(files_holding, tmp_path, plain_text.encode())
    finally:
        stop_redis(server)
    assert not any(
        holds(k, SECRET_TEXT.encode()) or holds(v, SECRET_TEXT.encode()) for k, v in dump.items()
    )
    assert at_rest == []
    # The same check finds content stored without keys: in the RDB file and in the AOF.
    assert {path.suffix for path in controls} == {".rdb", ".aof"}, controls


# --- durability ----------------------------------------------------------------------------------


async def test_writes_wait_for_their_replicas(tmp_path: Path) -> None:
    binary = require_redis()
    (tmp_path / "primary").mkdir()
    (tmp_path / "replica").mkdir()
    primary = start_redis(binary, tmp_path / "primary")
    replica = start_redis(
        binary, tmp_path / "replica", "--replicaof", primary.host, str(primary.port)
    )
    try:
        # The replica is in sync once it acknowledges a write.
        assert command(primary, ("SET", "sync", "1"), ("WAIT", "1", "20000"))[1] == b":1"
        with trio.fail_after(IO_DEADLINE):
            async with RedisStore.open(url_of(primary), wait_replicas=1, wait_timeout=5) as store:
                assert await store.insert_client(client(UUID_A)) == "inserted"
            assert command(replica, ("EXISTS", f"relayd:c:{UUID_A}")) == [b":1"]
            async with RedisStore.open(url_of(primary), wait_replicas=2, wait_timeout=0.2) as store:
                with pytest.raises(StoreUnavailable, match="fewer than 2 replicas"):
                    await store.insert_client(client(UUID_B))
        # Not as durable as asked, but on the primary (and its one replica).
        assert command(primary, ("EXISTS", f"relayd:c:{UUID_B}")) == [b":1"]
    finally:
        stop_redis(replica)
        stop_redis(primary)


async def test_the_server_s_persistence_is_reported(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with RedisStore.open(redis_url) as store:
            assert store.durability == "rdb"
    assert "Redis persistence: rdb (a crash may lose acknowledged writes)" in caplog.text


# --- Sentinel, TLS, URLs ---------------------------------------------------------------------


async def test_a_sentinel_url_finds_the_primary(own_server: RedisServer, tmp_path: Path) -> None:
    (tmp_path / "sentinel").mkdir()
    sentinel = start_sentinel(require_redis(), tmp_path / "sentinel", own_server, "relayd-main")
    try:
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/relayd-main/3"
        with trio.fail_after(IO_DEADLINE):
            async with RedisStore.open(url) as store:
                assert store.where == url
                assert await store.insert_client(client(UUID_A)) == "inserted"
        assert command(own_server, ("SELECT", "3"), ("EXISTS", f"relayd:c:{UUID_A}"))[1] == b":1"
    finally:
        stop_redis(sentinel)


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[RedisServer, Path]]:
    """A server that speaks only TLS, with a certificate for localhost, and its CA's file."""
    ca = trustme.CA()
    certificate = ca.issue_cert("localhost")
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    certificate.cert_chain_pems[0].write_to_path(str(cert_file))
    certificate.private_key_pem.write_to_path(str(key_file))
    tls_port = _closed_port()
    server = start_redis(
        require_redis(),
        tmp_path,
        "--tls-port",
        str(tls_port),
        "--port",
        "0",
        "--tls-cert-file",
        str(cert_file),
        "--tls-key-file",
        str(key_file),
        "--tls-ca-cert-file",
        str(ca_file),
        "--tls-auth-clients",
        "no",
    )
    try:
        yield attrs.evolve(server, port=tls_port), ca_file
    finally:
        stop_redis(server)


async def test_rediss_checks_the_server_s_certificate(
    tls_server: tuple[RedisServer, Path], tmp_path: Path
) -> None:
    server, ca_file = tls_server
    with trio.fail_after(IO_DEADLINE):
        url = f"rediss://localhost:{server.port}/0?ssl_ca_certs={ca_file}"
        async with RedisStore.open(url) as store:
            assert await store.insert_client(client(UUID_A)) == "inserted"
        # Another CA, or the right CA for another name: refused.
        other_ca = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other_ca))
        for wrong in (
            f"rediss://localhost:{server.port}/0?ssl_ca_certs={other_ca}",
            f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={ca_file}",
        ):
            with pytest.raises(StoreUnavailable, match="cannot reach Redis"):
                async with RedisStore.open(wrong):
                    pytest.fail("the store opened")  # pragma: no cover


def test_urls_say_where_without_their_passwords() -> None:
    forms = {
        "redis://:pw@db.example:6380/2": "redis://db.example:6380/2",
        "redis://localhost": "redis://localhost:6379/0",
        "rediss://user:pw@db.example/1?ssl_ca_certs=/ca.pem": "rediss://db.example:6379/1",
        "unix:///run/redis.sock?db=4": "unix:///run/redis.sock?db=4",
        "redis+sentinel://:pw@s1:26380,s2,[::1]:26381/main/5?sentinel_password=spw": (
            "redis+sentinel://s1:26380,s2:26379,::1:26381/main/5"
        ),
    }
    for url, where in forms.items():
        endpoint = parse_url(url)
        assert endpoint.where == where
        assert "pw" not in repr(endpoint).replace("password", "")
    sentinel = parse_url("redis+sentinel://u:pw@s1/main?sentinel_password=spw")
    assert (sentinel.service, sentinel.db, sentinel.username, sentinel.password) == (
        "main",
        0,
        "u",
        "pw",
    )
    assert sentinel.sentinel_password == "spw"


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("http://localhost", "the scheme 'http' is not one of"),
        ("redis+sentinel://s1:26379", "names its service"),
        ("redis+sentinel://s1:port/main", "'port' is not a port"),
        ("redis://localhost/zero", "the database 'zero' is not a number"),
        ("redis://localhost:99999/0", "the port is not a number"),
    ],
)
def test_a_bad_url_is_refused_saying_why(url: str, complaint: str) -> None:
    with pytest.raises(RedisUrlError, match=complaint):
        parse_url(url)


async def test_tls_files_that_cannot_be_read_are_a_url_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-ca.pem"
    expected = f"cannot load its TLS files \\({re.escape(str(missing))}\\): .*No such file"
    with pytest.raises(RedisUrlError, match=expected):
        async with RedisStore.open(f"rediss://localhost:1/0?ssl_ca_certs={missing}"):
            pytest.fail("the store opened")  # pragma: no cover


async def test_two_nodes_never_reserve_the_same_seq(redis_url: str) -> None:
    firsts: list[int] = []

    async def node(store: RedisStore) -> None:
        for _ in range(25):
            firsts.append(await store.reserve_seqs(3))

    with trio.fail_after(IO_DEADLINE):
        async with RedisStore.open(redis_url) as a, RedisStore.open(redis_url) as b:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(node, a)
                nursery.start_soon(node, b)
            assert await a.last_message_seq() == 150
    assert sorted(firsts) == list(range(1, 151, 3))


async def test_a_closed_store_says_so(redis_url: str) -> None:
    async with RedisStore.open(redis_url) as store:
        pass
    with pytest.raises(StoreError, match="the store is closed"):
        await store.list_clients()
