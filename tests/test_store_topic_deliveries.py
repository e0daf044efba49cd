"""A topic's message among the rest of the store, on every engine (the ``target`` fixture): its
deliveries in history (their content opens, sealed for the topic), in message records, queue
reads and expiry; its counts after purges; what ``recent_messages`` and ``keys_in_use`` make of
it; its content and record kept while its topic's history keeps it, and gone after. Each test
pins the SQLite store's behaviour (tests/test_store_topics.py has the topics' own contract).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from relayd._engine import HistoryQuery, TopicCounts
from relayd._relay.records import (
    FindExpired,
    Finish,
    Published,
    Purge,
    RecentMessage,
    SetAttempts,
    Status,
)

from .store_support import AnyStore, Target
from .support import IO_DEADLINE
from .test_store import UUID_A, UUID_B, client
from .test_store_contract import UUID_C, message
from .test_store_topics import UUID_D, publish, room, run, topic

FIELDS = '{"topic_id":"room","content":"m1"}'


@pytest.fixture
async def store(target: Target) -> AsyncIterator[AnyStore]:
    """The target's store with four live clients (A, B, C, D), and a room of A's that B and C
    subscribe to."""
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            for uuid, name in ((UUID_A, "alice"), (UUID_B, "bob"), (UUID_C, "carol")):
                assert await store.insert_client(client(uuid, name=name)) == "inserted"
            assert await store.insert_client(client(UUID_D, name="dave")) == "inserted"
            await room(store, UUID_B, UUID_C)
            yield store


async def published(store: AnyStore, msgid: str = "m1", **kwargs: object) -> Published:
    [outcome] = await run(store, publish(msgid, **kwargs))  # type: ignore[arg-type]
    assert isinstance(outcome, Published)
    return outcome


async def test_each_delivery_is_in_history_and_opens(store: AnyStore) -> None:
    outcome = await published(store)
    seqs = dict(outcome.deliveries)
    [received] = await store.history(HistoryQuery(UUID_B))
    assert (received.seq, received.sender, received.recipient) == (seqs[UUID_B], UUID_A, UUID_B)
    assert received.fields == FIELDS
    # Its publisher's history lists it once, in the topic's: not once per subscriber here
    # (with a peer, the one delivery to that peer is there).
    assert await store.history(HistoryQuery(UUID_A, box="sent")) == []
    [to_c] = await store.history(HistoryQuery(UUID_A, box="sent", peer=UUID_C))
    assert (to_c.seq, to_c.fields) == (seqs[UUID_C], FIELDS)
    # Final, its content stays while the topic's history keeps the message.
    await run(store, Finish(seqs[UUID_B], Status.ACKNOWLEDGED, 11.0, False))
    await run(store, Finish(seqs[UUID_C], Status.ACKNOWLEDGED, 11.0, False))
    assert [e.fields for e in await store.history(HistoryQuery(UUID_C))] == [FIELDS]


async def test_the_publisher_s_record_is_its_newest_delivery(store: AnyStore) -> None:
    outcome = await published(store)
    newest = max(seq for _, seq in outcome.deliveries)
    record = await store.message_record("m1", UUID_A)
    assert record is not None
    assert (record.seq, record.sender, record.recipient) == (newest, UUID_A, UUID_C)
    mine = await store.message_record("m1", UUID_B)
    assert mine is not None
    assert (mine.seq, mine.recipient) == (dict(outcome.deliveries)[UUID_B], UUID_B)
    assert await store.message_record("m1", UUID_D) is None
    # A message that went to nobody has no delivery to report.
    assert await store.create_topic(topic("empty"), max_owned=10) == "created"
    await published(store, "lonely", topic_id="empty")
    assert await store.message_record("lonely", UUID_A) is None
    assert await store.msgid_known("lonely")


async def test_queue_reads_and_expiry_carry_the_topic_and_offset(store: AnyStore) -> None:
    await published(store, "m1", at=10.0)
    outcome = await published(store, "m2", at=20.0)
    count, rows = await store.undelivered(UUID_C, 10)
    assert count == 2
    assert [(row.msgid, row.topic, row.offset, row.fields) for row in rows][1] == (
        "m2",
        "room",
        2,
        '{"topic_id":"room","content":"m2"}',
    )
    assert await store.queue_depths() == {UUID_B: 2, UUID_C: 2}
    [expired] = await run(store, FindExpired(1015.0, 10))
    assert isinstance(expired, list)
    assert sorted((row.recipient, row.msgid, row.offset) for row in expired) == [
        (UUID_B, "m1", 1),
        (UUID_C, "m1", 1),
    ]
    assert outcome.offset == 2


async def test_counts_are_of_the_deliveries_left_after_a_purge(store: AnyStore) -> None:
    outcome = await published(store)
    seqs = dict(outcome.deliveries)
    await run(
        store,
        SetAttempts(seqs[UUID_B], 1, at=11.0),
        Finish(seqs[UUID_B], Status.DELIVERED, 12.0, False),
        Purge(finished_before=20.0, receipts_before=0.0),
    )
    assert await store.topic_counts([outcome.message]) == {outcome.message: TopicCounts(1)}
    await run(store, Finish(seqs[UUID_C], Status.EXPIRED, 13.0, False))
    assert await store.topic_counts([outcome.message]) == {
        outcome.message: TopicCounts(1, expired=1)
    }
    await run(store, Purge(finished_before=20.0, receipts_before=0.0))
    # No delivery left: the topic's history keeps the message, with its content.
    assert await store.topic_counts([outcome.message]) == {outcome.message: TopicCounts(0)}
    [kept] = await store.topic_messages("room", since=0, limit=10, now=20.0)
    assert kept.fields == FIELDS
    # Out of the history, it goes.
    await store.update_topic("room", history_count=0)
    assert await store.topic_counts([outcome.message]) == {}
    assert not await store.msgid_known("m1")
    assert await store.keys_in_use() == {}


async def test_content_is_stored_once_and_kept_while_queued_or_in_history(
    store: AnyStore, target: Target
) -> None:
    key = None if target.keys is None else "k1"
    outcome = await published(store)
    assert await store.keys_in_use() == {key: 1}
    # Out of the history while a delivery still waits: the content stays for it.
    await store.update_topic("room", history_count=0)
    assert await store.topic_messages("room", since=0, limit=10, now=20.0) == []
    assert await store.keys_in_use() == {key: 1}
    [(_, first), (_, second)] = outcome.deliveries
    await run(store, Finish(first, Status.ACKNOWLEDGED, 11.0, False))
    assert await store.keys_in_use() == {key: 1}
    await run(store, Finish(second, Status.ACKNOWLEDGED, 11.0, False))
    assert await store.keys_in_use() == {}
    assert await store.topic_counts([outcome.message]) == {
        outcome.message: TopicCounts(2, acknowledged=2)
    }


async def test_recent_messages_leave_a_topic_s_out(store: AnyStore) -> None:
    await run(store, message(1, sender=UUID_D, recipient=UUID_B, accepted_at=5.0))
    await published(store, "m1", at=6.0)
    assert await store.recent_messages(0.0, 10) == [RecentMessage(UUID_D, "m1", 5.0, None)]


async def test_a_reopened_store_opens_a_topic_s_sealed_content(persistent_target: Target) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with persistent_target.open() as store:
            for uuid in (UUID_A, UUID_B):
                assert await store.insert_client(client(uuid)) == "inserted"
            await room(store, UUID_B)
            await published(store)
        # Opening checks that the keys open the first message sealed with each key.
        async with persistent_target.open() as store:
            [kept] = await store.topic_messages("room", since=0, limit=10, now=20.0)
            assert kept.fields == FIELDS
            [(_, row)] = [(r.seq, r) for r in (await store.undelivered(UUID_B, 10))[1]]
            assert row.fields == FIELDS
