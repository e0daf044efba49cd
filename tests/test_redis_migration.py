"""The Redis engine's layout migrations (relayd/_redis/store.lua ``migrate``), on a real server:
data written by layout 1's or layout 2's own script (frozen copies, tests/fixtures) is opened
by this relayd (layout 3) and must then be, key for key, what this relayd would have written
itself, and answer every read the same; an interrupted migration resumes, two nodes may migrate
at once, and a migration run again changes nothing. Layout 3 (topics) changed nothing that
layout 2 wrote: its data is left as it was, but for the version.

Each history is written twice, under two prefixes of one database: ``old:`` by the old
layout's script, then migrated; ``new:`` by this relayd from the start.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import coredis
import pytest
import trio

from relayd._atrest import StoreKeys
from relayd._engine import HistoryQuery, TopicRecord
from relayd._redis import LAYOUT_VERSION, RedisStore
from relayd._redis._link import Link
from relayd._redis._url import connect, parse_url
from relayd._relay.records import (
    Duplicate,
    FindExpired,
    Finish,
    Insert,
    Inserted,
    LoadQueue,
    LoadReceipts,
    Publish,
    Published,
    Purge,
    QueuePage,
    SetAttempts,
    SetReceiptPending,
    Status,
    StoreOp,
)

from .store_support import KEY_1, redis_dump
from .support import IO_DEADLINE
from .test_store import UUID_A, UUID_B, client

UUID_C = "0b6f3b0e-1c1e-4c39-9a59-3f0f8f0c0a03"
CLIENTS = (UUID_A, UUID_B, UUID_C)
KEYS = StoreKeys.from_bytes([("k1", KEY_1)], "<test keys>")
LAYOUT_1 = (Path(__file__).parent / "fixtures" / "redis_layout_1.lua").read_text(encoding="utf-8")
LAYOUT_1_SHA = hashlib.sha1(LAYOUT_1.encode("utf-8")).hexdigest()
LAYOUT_2 = (Path(__file__).parent / "fixtures" / "redis_layout_2.lua").read_text(encoding="utf-8")
LAYOUT_2_SHA = hashlib.sha1(LAYOUT_2.encode("utf-8")).hexdigest()
MAX_QUEUED = 100
BULK = 17  # messages A -> B beyond the handful of special ones: several migration pages
TOPIC_LIMITS: dict[str, Any] = {"max_subscribers": 10, "max_subscriptions": 10}


# The fields of each operation that layout 1's script takes: this relayd's, less those
# layout 2 added since (a conversation, keep_content, a delivery time), which layout 1 never
# had and this history never sets.
LAYOUT_1_FIELDS = {"I": 15, "F": 6, "A": 3}
# A purge's page and skip (how to walk, not what is stored): layout 1 purged in one call.
LAYOUT_1_PURGE = 3
# A purge's ``now`` (topics' history, which layout 3 added): layout 2 had none to trim.
LAYOUT_2_PURGE = 5


def layout_1_op(op: list[Any]) -> list[Any]:
    if op[0] == "G":
        return op[:LAYOUT_1_PURGE]
    size = LAYOUT_1_FIELDS.get(op[0], len(op))
    assert not any(op[size:]), f"layout 1 cannot store {op}"
    return op[:size]


def layout_2_op(op: list[Any]) -> list[Any]:
    assert op[0] != "B", "layout 2 has no topics"
    if op[0] == "G":
        return op[:LAYOUT_2_PURGE]
    return op


class Layout1Link(Link):
    """The store's link, calling layout 1's script instead of this relayd's."""

    script, sha = LAYOUT_1, LAYOUT_1_SHA

    def old_op(self, op: list[Any]) -> list[Any]:
        return layout_1_op(op)

    def purged(self, reply: list[int]) -> list[int]:
        return [0, 0, 0]  # layout 1 purged all at once: nothing more to purge

    async def call(self, operation: str, args: Any, *, write: bool) -> Any:
        if operation != "execute":
            return await super().call(operation, args, write=write)
        ops = args[1:]
        replies = await super().call(
            operation, [args[0], *(self.old_op(op) for op in ops)], write=write
        )
        return [
            self.purged(reply) if op[0] == "G" else reply
            for op, reply in zip(ops, replies, strict=True)
        ]

    async def load(self) -> None:
        await self.command("SCRIPT LOAD", lambda client: client.script_load(self.script))

    async def _evalsha(self, client: coredis.Redis[bytes], arguments: list[Any]) -> Any:
        return await client.evalsha(self.sha, args=arguments)


class Layout2Link(Layout1Link):
    """The store's link, calling layout 2's script instead of this relayd's."""

    script, sha = LAYOUT_2, LAYOUT_2_SHA

    def old_op(self, op: list[Any]) -> list[Any]:
        return layout_2_op(op)

    def purged(self, reply: list[int]) -> list[int]:
        return [*reply, 0]  # no topic message to age out of a history


@asynccontextmanager
async def layout_1_store(
    url: str, prefix: str, keys: StoreKeys | None
) -> AsyncIterator[RedisStore]:
    """A store whose every call runs layout 1's script: relayd as it was, writing layout 1."""
    async with connect(parse_url(url), connect_timeout=IO_DEADLINE) as redis:
        link = Layout1Link(
            redis, where="old", prefix=prefix, timeout=IO_DEADLINE, wait_replicas=0, wait_timeout=0
        )
        await link.load()
        assert await link.call("layout", [1], write=False) == 1
        yield RedisStore(link, keys=keys, prefix=prefix)


@asynccontextmanager
async def layout_2_store(
    url: str, prefix: str, keys: StoreKeys | None
) -> AsyncIterator[RedisStore]:
    """A store whose every call runs layout 2's script: relayd as it was, writing layout 2."""
    async with connect(parse_url(url), connect_timeout=IO_DEADLINE) as redis:
        link = Layout2Link(
            redis, where="old", prefix=prefix, timeout=IO_DEADLINE, wait_replicas=0, wait_timeout=0
        )
        await link.load()
        assert await link.call("layout", [2], write=False) == [2, 0]
        yield RedisStore(link, keys=keys, prefix=prefix)


@asynccontextmanager
async def new_link(url: str, prefix: str) -> AsyncIterator[Link]:
    """This relayd's script, called directly: a node that runs some migration steps."""
    async with connect(parse_url(url), connect_timeout=IO_DEADLINE) as redis:
        link = Link(
            redis, where="new", prefix=prefix, timeout=IO_DEADLINE, wait_replicas=0, wait_timeout=0
        )
        await link.load()
        yield link


def queued(seq: int, sender: str, recipient: str, fields: str = "") -> Insert:
    return Insert(
        None,
        seq,
        sender,
        recipient,
        f"m{seq}",
        seq % 2 == 0,
        seq % 3 != 0,
        fields or f'{{"content": "message {seq}"}}',
        10.0 + seq,
        1000.0 + seq,
    )


# What the history leaves, by seq (each message has one delivery, seq == id):
QUEUED_WITH_ATTEMPTS = 1  # A -> B, queued, delivered twice
OWED_TO_A = 2  # A -> B, acknowledged; A is owed its receipt
TOLD = 3  # B -> A, delivered; B was told; purged by the history's Purge
FINAL_AT_INSERT = 4  # C -> A, stored final (C offline), receipt owed to C
EXPIRED = 5  # C -> B, expired, receipt owed to C
TO_C = 6  # B -> C, queued (plain ASCII, then a long text)
FIRST_BULK = 10
SEQS = [*range(1, 7), 90, 91, *range(FIRST_BULK, FIRST_BULK + BULK)]  # every seq it uses


HISTORY: list[list[StoreOp]] = [
    [
        queued(QUEUED_WITH_ATTEMPTS, UUID_A, UUID_B),
        queued(OWED_TO_A, UUID_A, UUID_B),
        queued(TOLD, UUID_B, UUID_A),
    ],
    [
        SetAttempts(QUEUED_WITH_ATTEMPTS, 2),
        Finish(OWED_TO_A, Status.ACKNOWLEDGED, 20.0, receipt_pending=True),
        Finish(TOLD, Status.DELIVERED, 21.0, receipt_pending=True),
        attrs.evolve(
            queued(FINAL_AT_INSERT, UUID_C, UUID_A),
            status=Status.DELIVERED,
            receipt_pending=True,
        ),
        queued(EXPIRED, UUID_C, UUID_B),
        queued(TO_C, UUID_B, UUID_C, '{"content": "' + "é" * 300 + '"}'),
    ],
    [
        SetReceiptPending((TOLD,), pending=False),
        Finish(EXPIRED, Status.EXPIRED, 22.0, receipt_pending=True, reason="ttl"),
        Purge(finished_before=21.5, receipts_before=0.0),
        # A duplicate of a stored message, and one of a purged one (stored again).
        attrs.evolve(queued(90, UUID_A, UUID_B), msgid=f"m{OWED_TO_A}"),
        attrs.evolve(queued(91, UUID_B, UUID_A), msgid=f"m{TOLD}"),
    ],
    [queued(seq, UUID_A, UUID_B) for seq in range(FIRST_BULK, FIRST_BULK + BULK)],
    [
        Finish(seq, Status.ACKNOWLEDGED, 30.0, receipt_pending=seq % 2 == 0)
        for seq in range(FIRST_BULK, FIRST_BULK + BULK, 3)
    ],
]


async def write_history(store: RedisStore) -> list[list[Any]]:
    """The history's batches on ``store``; their results."""
    for uuid in CLIENTS:
        assert await store.insert_client(client(uuid, name=uuid[-2:])) == "inserted"
    return [await store.execute(batch, max_queued=MAX_QUEUED) for batch in HISTORY]


async def reads(store: RedisStore) -> dict[str, Any]:
    """Everything the store's contract lets one read about messages."""
    batch: list[StoreOp] = [
        op
        for uuid in CLIENTS
        for op in (LoadQueue(uuid, 0, 100, 1 << 20), LoadReceipts(uuid, 0, 100))
    ]
    results = await store.execute([*batch, FindExpired(1e9, 100)], max_queued=MAX_QUEUED)
    return {
        "execute": results,
        "undelivered": [await store.undelivered(uuid, -1) for uuid in CLIENTS],
        "records": [
            await store.message_record(f"m{seq}", uuid) for seq in SEQS for uuid in CLIENTS
        ],
        "known": [await store.msgid_known(f"m{seq}") for seq in SEQS],
        "history": [
            await store.history(HistoryQuery(uuid, box=box, peer=peer, newest_first=newest))
            for uuid in CLIENTS
            for box in ("all", "inbox", "sent")
            for peer in (None, UUID_B)
            for newest in (True, False)
        ],
        "recent": await store.recent_messages(0.0, -1),
        "keys": await store.keys_in_use(),
        "depths": await store.queue_depths(),
        "last": await store.last_message_seq(),
        "layout": await store.schema_version(),
    }


async def later(store: RedisStore) -> list[list[Any]]:
    """What happens next, on migrated data as on data that never was: a queued delivery is
    finished (its content goes), a message is sent again (a duplicate), a receipt is told,
    old ones are purged, a new message is stored."""
    return [
        await store.execute(batch, max_queued=MAX_QUEUED)
        for batch in (
            [Finish(QUEUED_WITH_ATTEMPTS, Status.FAILED, 40.0, receipt_pending=True)],
            [queued(QUEUED_WITH_ATTEMPTS, UUID_A, UUID_B), queued(200, UUID_A, UUID_B)],
            [SetReceiptPending((OWED_TO_A, FINAL_AT_INSERT), pending=False)],
            [Purge(finished_before=35.0, receipts_before=25.0)],
        )
    ]


async def layout(url: str, prefix: str, keys: StoreKeys | None) -> dict[bytes, Any]:
    """The database's keys under ``prefix``, the prefix taken off; sealed content (random
    nonces) stands as its key id, the content itself being checked by :func:`reads`."""
    dump = await redis_dump(url)
    found: dict[bytes, Any] = {}
    for key, value in dump.items():
        if key.startswith(prefix.encode()):
            name = key[len(prefix) :]
            if keys is not None and name.startswith(b"m:") and b"k" in value:
                value = {**value, b"f": b"sealed with " + value[b"k"]}
            found[name] = value
    return found


async def written_twice(url: str, keys: StoreKeys | None, old_store: Any = layout_1_store) -> None:
    """The history under ``old:`` by an old layout (``old_store``: layout 1's by default; not
    migrated yet), and under ``new:`` by this relayd; both write the same outcomes."""
    async with old_store(url, "old:", keys) as old:
        old_results = await write_history(old)
    async with RedisStore.open(url, keys=keys, prefix="new:") as new:
        assert await write_history(new) == old_results
    assert old_results[2][3:] == [Duplicate(OWED_TO_A, Status.ACKNOWLEDGED), Inserted(91)]


async def assert_same(url: str, keys: StoreKeys | None, *, page: int = 4) -> dict[str, Any]:
    """``old:`` opened (migrated, ``page`` messages a round trip) is ``new:``, key for key,
    and answers every read the same, then and after more of the same operations. Returns
    what ``old:`` answered first."""
    async with (
        RedisStore.open(url, keys=keys, prefix="old:", migration_page=page) as old,
        RedisStore.open(url, keys=keys, prefix="new:") as new,
    ):
        assert await layout(url, "old:", keys) == await layout(url, "new:", keys)
        found = await reads(old)
        assert found == await reads(new)
        assert await later(old) == await later(new)
        assert await reads(old) == await reads(new)
    assert await layout(url, "old:", keys) == await layout(url, "new:", keys)
    return found


@pytest.mark.parametrize("keys", [None, KEYS], ids=["plain", "sealed"])
async def test_layout_1_data_is_migrated_to_what_this_layout_writes(
    redis_url: str, keys: StoreKeys | None
) -> None:
    with trio.fail_after(IO_DEADLINE * 4):
        await written_twice(redis_url, keys)
        before = await layout(redis_url, "old:", keys)
        assert before[b"schema"] == b"1"
        assert not any(name.startswith(b"dl:") for name in before)
        found = await assert_same(redis_url, keys)
    # Not only what layout 2 writes: what the history says.
    assert found["layout"] == LAYOUT_VERSION == 3
    load_a, receipts_a, load_b, receipts_b, load_c, receipts_c, expired = found["execute"]
    bulk_queued = [s for s in range(FIRST_BULK, FIRST_BULK + BULK) if (s - FIRST_BULK) % 3]
    assert [row.seq for row in load_a.rows] == [91]
    assert [row.seq for row in load_b.rows] == [QUEUED_WITH_ATTEMPTS, *bulk_queued]
    assert load_b.rows[0].attempts == 2
    assert [(row.seq, row.fields) for row in load_c.rows] == [
        (TO_C, '{"content": "' + "é" * 300 + '"}')
    ]
    assert [(r.seq, r.status) for r in receipts_a] == [
        (OWED_TO_A, Status.ACKNOWLEDGED),
        *((s, Status.ACKNOWLEDGED) for s in (10, 16, 22)),
    ]
    assert receipts_b == []
    assert [(r.seq, r.status, r.reason) for r in receipts_c] == [
        (FINAL_AT_INSERT, Status.DELIVERED, ""),
        (EXPIRED, Status.EXPIRED, "ttl"),
    ]
    assert sorted(row.seq for row in expired) == sorted([1, TO_C, 91, *bulk_queued])
    assert found["depths"] == {UUID_A: 1, UUID_B: 1 + len(bulk_queued), UUID_C: 1}
    # Content kept: the queued deliveries' messages, and the one stored final.
    assert found["keys"] == {None if keys is None else "k1": 3 + len(bulk_queued) + 1}
    # History, which layout 1 had no index for: A's, newest first (its first query).
    history_a = found["history"][0]
    bulk = range(FIRST_BULK + BULK - 1, FIRST_BULK - 1, -1)
    assert [entry.seq for entry in history_a] == [
        91,
        *bulk,
        FINAL_AT_INSERT,
        OWED_TO_A,
        QUEUED_WITH_ATTEMPTS,
    ]
    at_insert = history_a[1 + BULK]
    assert (at_insert.status, at_insert.delivered_at) == ("delivered", 10.0 + FINAL_AT_INSERT)
    record = found["records"][SEQS.index(TOLD) * len(CLIENTS) + CLIENTS.index(UUID_A)]
    assert (record.seq, record.sender, record.status) == (91, UUID_B, None)


async def test_an_interrupted_migration_goes_on_from_where_it_stopped(redis_url: str) -> None:
    with trio.fail_after(IO_DEADLINE * 4):
        await written_twice(redis_url, KEYS)
        async with new_link(redis_url, "old:") as link:
            # A node that ran two round trips of 4 messages, then died.
            total = await messages_stored(redis_url, "old:")
            assert await link.call("migrate", [LAYOUT_VERSION, 4], write=True) == total - 4
            assert await link.call("migrate", [LAYOUT_VERSION, 4], write=True) == total - 8
        half = await layout(redis_url, "old:", KEYS)
        assert half[b"schema"] == b"3"  # relayd of layout 1 refuses it from the first step
        assert half[b"schema:migration"] == {b"rank": b"8"}
        assert sum(name.startswith(b"dl:") for name in half) == 8
        async with new_link(redis_url, "old:") as link:
            assert await link.call("layout", [LAYOUT_VERSION], write=False) == [3, 1]
        await assert_same(redis_url, KEYS, page=5)
        assert b"schema:migration" not in await layout(redis_url, "old:", KEYS)


async def test_two_nodes_migrating_at_once_share_the_work(redis_url: str) -> None:
    with trio.fail_after(IO_DEADLINE * 4):
        await written_twice(redis_url, None)
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(open_and_close, redis_url, "old:", 2)
        await assert_same(redis_url, None)


async def test_a_migration_run_again_changes_nothing(redis_url: str) -> None:
    """Each message is split once: one already split is skipped, should the cursor lag."""
    with trio.fail_after(IO_DEADLINE * 4):
        await written_twice(redis_url, KEYS)
        await open_and_close(redis_url, "old:", 4)
        migrated = await layout(redis_url, "old:", KEYS)
        async with coredis.Redis.from_url(redis_url) as redis:
            await redis.hset("old:schema:migration", {"rank": "0"})
        await open_and_close(redis_url, "old:", 4)
        assert await layout(redis_url, "old:", KEYS) == migrated
        await assert_same(redis_url, KEYS)


@pytest.mark.parametrize("keys", [None, KEYS], ids=["plain", "sealed"])
async def test_layout_2_data_is_left_as_it_was_but_for_its_version(
    redis_url: str, keys: StoreKeys | None
) -> None:
    """Layout 3 added keys and message fields of topics, and changed nothing layout 2 wrote:
    opening layout 2's data writes the new version (and no migration cursor), nothing else;
    the data then answers and goes on as this relayd's own, and takes topics."""
    with trio.fail_after(IO_DEADLINE * 4):
        await written_twice(redis_url, keys, layout_2_store)
        before = await layout(redis_url, "old:", None)  # as stored: sealed content too
        assert before[b"schema"] == b"2"
        await open_and_close(redis_url, "old:", 4)
        assert await layout(redis_url, "old:", None) == {**before, b"schema": b"3"}
        await assert_same(redis_url, keys)
        async with RedisStore.open(redis_url, keys=keys, prefix="old:") as old:
            assert await old.create_topic(TopicRecord("room", UUID_A), max_owned=1) == "created"
            assert await old.subscribe("room", UUID_B, 50.0, **TOPIC_LIMITS) == "subscribed"
            last = await old.last_message_seq()
            publish = Publish(None, "room", UUID_A, "p1", False, True, '{"c": 1}', 50.0, 1e4)
            [published, page] = await old.execute(
                [publish, LoadQueue(UUID_B, last, 10, 1 << 20)], max_queued=MAX_QUEUED
            )
            assert published == Published(last + 1, 1, ((UUID_B, last + 2),))
            assert isinstance(page, QueuePage)
            assert [(m.seq, m.topic, m.offset, m.fields) for m in page.rows] == [
                (last + 2, "room", 1, '{"c": 1}')
            ]


async def open_and_close(url: str, prefix: str, page: int) -> None:
    async with RedisStore.open(url, keys=None, prefix=prefix, migration_page=page):
        pass


async def messages_stored(url: str, prefix: str) -> int:
    async with coredis.Redis.from_url(url) as redis:
        return await redis.zcard(f"{prefix}acc")
