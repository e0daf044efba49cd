"""What the Redis engine does of its own for topics (tests/test_store_topics.py runs the
contract on both engines): a batch holding a Publish is two round trips and still all or
nothing; a Publish run again (its answer lost) finds itself; its deliveries' seqs pass every
seq of its batch; a 10,000-subscriber publish; the key layout (history indexes, nothing left
behind, no content at rest); a deleted client's topics and aged history go a page per call.
All against a real server (tests/redis_support.py).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import attrs
import coredis
import pytest
import trio

from relayd._engine import HistoryQuery, TopicCounts, TopicRecord
from relayd._errors import StoreError, StoreUnavailable
from relayd._redis import RedisStore
from relayd._relay.records import (
    Duplicate,
    Finish,
    Inserted,
    LoadQueue,
    Publish,
    Published,
    Purge,
    QueuePage,
    Status,
    StoreOp,
)

from .store_support import holds, redis_dump
from .support import IO_DEADLINE
from .test_redis_store import KEYS, counting_proxy, history_indexes, history_indexes_due
from .test_store import UUID_A, UUID_B, client
from .test_store_contract import UUID_C, message
from .test_store_topics import UUID_D

LIMITS: dict[str, Any] = {"max_subscribers": 20_000, "max_subscriptions": 10}
SECRET = "the-room-secret-4242"
TOPIC_KEY = re.compile(rb"relayd:((t|tm|th|ct|to|tp):|topics|tha)")


def publish(msgid: str, sender: str = UUID_A, topic: str = "room", **kwargs: Any) -> Publish:
    fields = f'{{"topic_id": "{topic}", "content": "{SECRET} {msgid}"}}'
    return attrs.evolve(
        Publish(None, topic, sender, msgid, False, True, fields, 10.0, 1e6), **kwargs
    )


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    """A store with content sealed, clients A, B, C and D, and A's room that B and C are in."""
    with trio.fail_after(IO_DEADLINE):
        async with RedisStore.open(redis_url, keys=KEYS) as store:
            for uuid_ in (UUID_A, UUID_B, UUID_C, UUID_D):
                assert await store.insert_client(client(uuid_)) == "inserted"
            await make_room(store, "room", UUID_A, UUID_B, UUID_C)
            yield store


async def make_room(store: RedisStore, topic: str, owner: str, *members: str, **kw: Any) -> None:
    record = attrs.evolve(TopicRecord(topic, owner, created_at=1.0), **kw)
    assert await store.create_topic(record, max_owned=10) == "created"
    for member in members:
        assert await store.subscribe(topic, member, 2.0, **LIMITS) == "subscribed"


async def run(store: RedisStore, *ops: StoreOp, max_queued: int = 100) -> list[Any]:
    return await store.execute(ops, max_queued=max_queued)


def without(dump: dict[bytes, Any], *names: str) -> dict[bytes, Any]:
    return {k: v for k, v in dump.items() if k not in {f"relayd:{n}".encode() for n in names}}


# --- round trips, all or nothing, run again ---------------------------------------------------


async def test_a_publish_batch_is_two_round_trips(redis_url: str, nursery: trio.Nursery) -> None:
    """The message's id is reserved first (its content is sealed for it in Python), then the
    batch runs; a batch run again reuses the id (no third call)."""
    proxy, url = await counting_proxy(nursery, redis_url)
    with trio.fail_after(IO_DEADLINE):
        async with RedisStore.open(url, keys=KEYS) as store:
            for uuid_ in (UUID_A, UUID_B):
                await store.insert_client(client(uuid_))
            await make_room(store, "room", UUID_A, UUID_B)
            batch: list[StoreOp] = [publish("m1"), publish("m2"), LoadQueue(UUID_B, 0, 10, 1 << 20)]
            proxy.commands.clear()
            first, second, page = await run(store, *batch)
            assert proxy.commands == ["EVALSHA", "EVALSHA"]
            assert isinstance(first, Published)
            assert isinstance(second, Published)
            assert second.message == first.message + 1  # reserved together
            assert isinstance(page, QueuePage)
            assert [row.offset for row in page.rows] == [1, 2]
            proxy.commands.clear()
            assert await run(store, *batch[:2]) == [first, second]
            assert proxy.commands == ["EVALSHA"]


async def test_a_refused_batch_with_a_publish_writes_nothing(
    store: RedisStore, redis_url: str
) -> None:
    assert await run(store, message(1, sender=UUID_D, recipient=UUID_B)) == [Inserted(1)]
    before = await redis_dump(redis_url)
    seq = int(before[b"relayd:seq"])
    # Its Insert takes a seq that holds another message: the publish before it (its message,
    # deliveries, offset and history) must not stay behind.
    batch: list[StoreOp] = [publish("m1"), attrs.evolve(message(1), msgid="another")]
    with pytest.raises(StoreError, match="seq 1 holds another message") as refused:
        await run(store, *batch)
    assert not isinstance(refused.value, StoreUnavailable)
    after = await redis_dump(redis_url)
    # Only the id reserved for the message before the batch ran (a gap, never reused).
    assert after == {**before, b"relayd:seq": str(seq + 1).encode()}


async def test_a_publish_run_again_finds_itself(store: RedisStore, redis_url: str) -> None:
    """The hub runs a batch again when its answer was lost (it may have been applied): the
    same Publish answers what it stored, not a duplicate of itself, and stores nothing more;
    another with the same msgid is a duplicate."""
    await run(store, message(1, sender=UUID_D, recipient=UUID_C))  # C's queue is full
    op = publish("m1")
    [first] = await run(store, op, max_queued=1)
    assert isinstance(first, Published)
    assert (first.deliveries, first.full) == (((UUID_B, first.message + 1),), 1)
    stored = await redis_dump(redis_url)
    assert await run(store, op, max_queued=1) == [first]
    assert await redis_dump(redis_url) == stored
    again = publish("m1")
    assert await run(store, again) == [Duplicate(first.message, None)]


async def test_a_publish_s_seqs_pass_every_seq_of_its_batch(store: RedisStore) -> None:
    """The core stores Inserts with seqs it reserved; an Insert whose seq is above the counter
    (reserved by no one) must still not meet a delivery's seq: the Publish takes its seqs
    above every Insert of the batch, before or after it."""
    top = await store.last_message_seq()
    after = message(top + 3, sender=UUID_D, recipient=UUID_B)  # the publish's id is top + 1
    before = message(top + 9, sender=UUID_D, recipient=UUID_C)
    results = await run(store, before, publish("m1"), after)
    assert results[0] == Inserted(top + 9)
    assert results[2] == Inserted(top + 3)
    outcome = results[1]
    assert isinstance(outcome, Published)
    assert outcome.message == top + 1
    assert [seq for _, seq in outcome.deliveries] == [top + 10, top + 11]
    for recipient, inserted in ((UUID_B, top + 3), (UUID_C, top + 9)):
        [page] = await run(store, LoadQueue(recipient, 0, 10, 1 << 20))
        assert [(row.seq, row.topic) for row in page.rows] == [
            (inserted, None),
            (dict(outcome.deliveries)[recipient], "room"),
        ]


# --- at scale --------------------------------------------------------------------------------


async def test_ten_thousand_subscribers_take_one_message_and_a_delivery_each(
    redis_url: str,
) -> None:
    subscribers = [str(uuid.UUID(int=n + 1)) for n in range(10_000)]
    with trio.fail_after(IO_DEADLINE * 6):
        async with RedisStore.open(redis_url, keys=KEYS) as store:
            await store.insert_client(client(UUID_A))
            await make_room(store, "big", UUID_A)

            async def join(members: list[str]) -> None:
                for member in members:
                    assert await store.insert_client(client(member)) == "inserted"
                    assert await store.subscribe("big", member, 2.0, **LIMITS) == "subscribed"

            async with trio.open_nursery() as nursery:
                for n in range(8):
                    nursery.start_soon(join, subscribers[n::8])
            top = await store.last_message_seq()
            [outcome] = await run(store, publish("big1", topic="big"), max_queued=10)
            assert isinstance(outcome, Published)
            assert outcome.message == top + 1
            assert outcome.deliveries == tuple(
                (member, top + 2 + n) for n, member in enumerate(sorted(subscribers))
            )
            assert await store.reserve_seqs(1) == top + 2 + 10_000
            await run(
                store,
                Finish(top + 2, Status.ACKNOWLEDGED, 11.0, False),
                Finish(top + 3, Status.FAILED, 11.0, False),
            )
            counts = await store.topic_counts([outcome.message])
            assert counts == {outcome.message: TopicCounts(10_000, acknowledged=1, failed=1)}
            last = subscribers[-1]
            [page] = await run(store, LoadQueue(last, 0, 10, 1 << 20))
            assert [(row.topic, row.msgid) for row in page.rows] == [("big", "big1")]
            # The content is stored once, sealed, in the one message (a dump of every key
            # would take long: 10,000 clients).
            assert await keys_like(redis_url, "m:*") == [f"relayd:m:{outcome.message}".encode()]
            async with coredis.Redis.from_url(redis_url) as redis:
                stored = await redis.hgetall(f"relayd:m:{outcome.message}")
            assert stored[b"k"] == b"k1"
            assert not holds(stored, SECRET.encode())
            # Deleted, the topic's members' subscriptions go in its one call.
            assert await store.delete_topic("big")
            assert await store.client_topics(last) == []
            assert await keys_like(redis_url, "ct:*") == []


async def keys_like(url: str, pattern: str) -> list[bytes]:
    async with coredis.Redis.from_url(url) as redis:
        return [key async for key in redis.scan_iter(match=f"relayd:{pattern}", count=10_000)]


# --- the key layout ---------------------------------------------------------------------------


async def test_topic_deliveries_are_indexed_and_nothing_is_left_behind(
    store: RedisStore, redis_url: str
) -> None:
    """A topic's deliveries are in the history indexes as a message's are (but its sender's
    sent index: its publisher's history lists the message once, in the topic's); once a topic's
    history let its messages go and their deliveries were purged, and the topic and its
    owner were deleted, nothing of it is left but what SQLite keeps (the clients' rows)."""

    async def consistent() -> dict[bytes, Any]:
        dump = await redis_dump(redis_url)
        assert history_indexes(dump) == history_indexes_due(dump)
        return dump

    [one, two] = await run(
        store, publish("m1", conversation_id="x"), publish("m2", sender=UUID_B, accepted_at=50.0)
    )
    assert isinstance(one, Published)
    assert isinstance(two, Published)
    dump = await consistent()
    assert f"relayd:hcs:{UUID_A}:x".encode() not in history_indexes(dump)
    assert history_indexes(dump)[f"relayd:hcr:{UUID_B}:x".encode()] == {
        seq for recipient, seq in one.deliveries if recipient == UUID_B
    }
    ends = [
        Finish(seq, Status.DELIVERED, 20.0, False)
        for outcome in (one, two)
        for _, seq in outcome.deliveries
    ]
    await run(store, *ends, Purge(finished_before=30.0, receipts_before=0.0))
    dump = await consistent()
    assert not any(k.startswith(b"relayd:dl:") for k in dump)
    # The history keeps both messages, and their content, with no delivery left.
    assert [m.msgid for m in await store.topic_messages("room", since=0, limit=9, now=60.0)] == [
        "m1",
        "m2",
    ]
    # m1 ages out (history_age: a day) with the purge; m2 goes with its topic.
    await run(store, Purge(finished_before=0.0, receipts_before=0.0, now=86_420.0))
    assert [m.msgid for m in await store.topic_messages("room", since=0, limit=9, now=60.0)] == [
        "m2"
    ]
    assert await store.delete_client(UUID_A, 100.0)
    assert await store.get_topic("room") is None
    dump = await consistent()
    clients = [f"c:{uuid_}" for uuid_ in (UUID_A, UUID_B, UUID_C, UUID_D)]
    assert set(dump) == {
        f"relayd:{name}".encode() for name in ("schema", "seq", "clients", *clients)
    }


async def test_a_deleted_client_s_topics_go_a_page_per_call_and_a_cut_deletion_is_finished(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deleted client's subscriptions end with its tombstone; its messages leave the topics'
    histories a page (FORGET_PAGE) per call, then the topics it owns go one per call (each may
    have many members); cut short, the next open of the store finishes it."""
    monkeypatch.setattr("relayd._redis._store.FORGET_PAGE", 2)
    calls: list[str] = []
    with trio.fail_after(IO_DEADLINE):
        async with RedisStore.open(redis_url) as store:
            for uuid_ in (UUID_A, UUID_B, UUID_C):
                await store.insert_client(client(uuid_))
            await make_room(store, "bs", UUID_B, UUID_A, UUID_C)
            await make_room(store, "a1", UUID_A, UUID_B)
            await make_room(store, "a2", UUID_A, UUID_C)
            await run(store, *(publish(f"m{n}", topic="bs") for n in range(3)))
            await run(store, publish("c1", sender=UUID_C, topic="bs"))
            call = store._call

            async def counted(operation: str, *args: Any, write: bool = True) -> Any:
                calls.append(operation)
                return await call(operation, *args, write=write)

            monkeypatch.setattr(store, "_call", counted)
            assert await store.delete_client(UUID_A, 20.0)
            # The tombstone's call finds no sent side (its 3 messages to C are a topic's
            # deliveries, kept out of its sent index; still queued: kept); then come its
            # received side, its 3 messages in "bs" (two pages), "a1", "a2".
            assert calls == ["delete_client"] + ["forget_history"] * 4
            assert await store.client_topics(UUID_B) == []  # "a1" went
            assert await store.topic_subscribers("bs", after=None, limit=9) == [UUID_C]
            left = await store.topic_messages("bs", since=0, limit=9, now=20.0)
            assert [m.msgid for m in left] == ["c1"]
            # Cut short: the tombstone is made, then the node stops.
            await make_room(store, "cs", UUID_C, UUID_B)
            assert await call("delete_client", UUID_C, "40.0", 1) == [1, 1]
            # Its subscriptions ended with the tombstone; its topic waits for the next pages.
            assert await store.topic_subscribers("bs", after=None, limit=9) == []
            assert await store.get_topic("cs") is not None
            assert await store.client_topics(UUID_B) == ["cs"]
        async with RedisStore.open(redis_url) as store:
            assert await store.get_topic("cs") is None
            assert await store.client_topics(UUID_B) == []
            assert await store.topic_messages("bs", since=0, limit=9, now=40.0) == []
    dump = await redis_dump(redis_url)
    assert b"relayd:forget" not in dump
    # Of the topics, B's "bs" is left, with no member and no history.
    assert {k for k in dump if TOPIC_KEY.match(k)} == {
        b"relayd:t:bs",
        b"relayd:topics",
        b"relayd:topics:open",
        f"relayd:to:{UUID_B}".encode(),
    }


async def test_aged_messages_leave_their_history_a_page_per_call(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("relayd._redis._codec.PURGE_PAGE", 2)
    await store.update_topic("room", history_age=100.0)
    await run(store, *(publish(f"m{n}", accepted_at=float(n)) for n in range(5)))
    await run(store, publish("young", accepted_at=150.0))
    calls: list[str] = []
    call = store._call

    async def counted(operation: str, *args: Any, write: bool = True) -> Any:
        calls.append(operation)
        return await call(operation, *args, write=write)

    monkeypatch.setattr(store, "_call", counted)
    await run(store, Purge(finished_before=0.0, receipts_before=0.0, now=200.0))
    # The batch's page (m0, m1), then m2-m3, then m4 and the end.
    assert calls == ["trim_aged"] * 2
    monkeypatch.setattr(store, "_call", call)
    kept = await store.topic_messages("room", since=0, limit=9, now=0.0)
    assert [m.msgid for m in kept] == ["young"]
    # Their deliveries still wait, with their content.
    assert len((await store.undelivered(UUID_B, 10))[1]) == 6
    history = await store.history(HistoryQuery(UUID_B, newest_first=False))
    assert all(SECRET in entry.fields for entry in history)
