"""Topics in the store, on every engine (the ``target`` fixture): creation and its limits,
visibility, subscriptions and their limits, publishing (one message, a delivery per subscriber
but the sender, an offset each), history trimmed by count and age, counts of a published
message's deliveries, deletion of a topic and of a client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio

from relayd._engine import TopicCounts, TopicRecord
from relayd._relay.records import (
    BROADCAST,
    Duplicate,
    Finish,
    LoadQueue,
    MarkRead,
    Publish,
    Published,
    Purge,
    QueuePage,
    ReadCode,
    Refused,
    SetAttempts,
    Status,
)

from .store_support import AnyStore, Target
from .support import IO_DEADLINE
from .test_store import UUID_A, UUID_B, client
from .test_store_contract import UUID_C, message

UUID_D = "dddddddd-dddd-4ddd-8ddd-dddddddddddd"
LIMITS: dict[str, Any] = {"max_subscribers": 100, "max_subscriptions": 100}


@pytest.fixture
async def store(target: Target) -> AsyncIterator[AnyStore]:
    """The target's store with four live clients: A, B, C and D."""
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            for uuid, name in ((UUID_A, "alice"), (UUID_B, "bob"), (UUID_C, "carol")):
                assert await store.insert_client(client(uuid, name=name)) == "inserted"
            assert await store.insert_client(client(UUID_D, name="dave")) == "inserted"
            yield store


def topic(topic_id: str = "room", creator: str = UUID_A, **settings: Any) -> TopicRecord:
    return attrs.evolve(TopicRecord(topic_id, creator, created_at=1.0), **settings)


def publish(
    msgid: str,
    sender: str = UUID_A,
    topic_id: str = "room",
    *,
    at: float = 10.0,
    admin: bool = False,
    fields: str | None = None,
) -> Publish:
    return Publish(
        ref=None,
        topic=topic_id,
        sender=sender,
        msgid=msgid,
        high=False,
        acknowledge=True,
        fields=fields or f'{{"topic_id":"{topic_id}","content":"{msgid}"}}',
        accepted_at=at,
        expires_at=at + 1000.0,
        admin=admin,
    )


async def run(store: AnyStore, *ops: object, max_queued: int = 100) -> list[Any]:
    return await store.execute(list(ops), max_queued=max_queued)  # type: ignore[arg-type]


async def room(store: AnyStore, *members: str, **settings: Any) -> None:
    assert await store.create_topic(topic(**settings), max_owned=10) == "created"
    for member in members:
        assert await store.subscribe("room", member, 2.0, invited=True, **LIMITS) == "subscribed"


async def queue(store: AnyStore, recipient: str) -> list[tuple[int, str | None, int | None]]:
    [page] = await run(store, LoadQueue(recipient, 0, 100, 1 << 20))
    assert isinstance(page, QueuePage)
    return [(row.seq, row.topic, row.offset) for row in page.rows]


# --- topics ---------------------------------------------------------------------------------


async def test_a_topic_is_created_once_and_read_back(store: AnyStore) -> None:
    created = topic(metadata='{"about": "x"}', access="private", publish="owner", presence=True)
    assert await store.create_topic(created, max_owned=10) == "created"
    assert await store.create_topic(topic(creator=UUID_B), max_owned=10) == "exists"
    assert await store.get_topic("room") == created
    assert await store.get_topic("nope") is None


async def test_a_creator_owns_at_most_max_owned_topics(store: AnyStore) -> None:
    assert await store.create_topic(topic("t1"), max_owned=2) == "created"
    assert await store.create_topic(topic("t2"), max_owned=2) == "created"
    assert await store.create_topic(topic("t3"), max_owned=2) == "too_many"
    assert await store.create_topic(topic("t3", creator=UUID_B), max_owned=2) == "created"


async def test_listing_shows_open_topics_and_private_ones_of_the_viewer_in_pages(
    store: AnyStore,
) -> None:
    for name in ("a", "b", "c"):
        assert await store.create_topic(topic(name), max_owned=10) == "created"
    assert await store.create_topic(topic("p", access="private"), max_owned=10) == "created"
    assert await store.subscribe("p", UUID_B, 2.0, invited=True, **LIMITS) == "subscribed"

    async def ids(viewer: str | None, everything: bool = False, **kwargs: object) -> list[str]:
        found = await store.list_topics(viewer, everything=everything, **kwargs)  # type: ignore[arg-type]
        return [t.id for t in found]

    assert await ids(UUID_C, after=None, limit=10) == ["a", "b", "c"]
    assert await ids(None, after=None, limit=10) == ["a", "b", "c"]
    assert await ids(UUID_B, after=None, limit=10) == ["a", "b", "c", "p"]
    assert await ids(UUID_C, True, after=None, limit=10) == ["a", "b", "c", "p"]
    assert await ids(UUID_A, after=None, limit=10) == ["a", "b", "c", "p"]  # its owner
    assert await ids(UUID_B, after=None, limit=2) == ["a", "b"]
    assert await ids(UUID_B, after="b", limit=2) == ["c", "p"]


async def test_settings_change_and_a_smaller_history_trims_at_once(store: AnyStore) -> None:
    await room(store, UUID_B)
    await run(store, *(publish(f"m{i}") for i in range(1, 5)))
    changed = await store.update_topic(
        "room", metadata='{"v": 2}', access="private", history_count=2, presence=True
    )
    assert changed is not None
    assert (changed.metadata, changed.access, changed.publish, changed.presence) == (
        '{"v": 2}',
        "private",
        "members",
        True,
    )
    assert changed.history_count == 2
    kept = await store.topic_messages("room", since=0, limit=10, now=20.0)
    assert [m.offset for m in kept] == [3, 4]
    assert await store.update_topic("nope", presence=True) is None


# --- subscriptions --------------------------------------------------------------------------


async def test_subscriptions_count_and_refuse_clearly(store: AnyStore) -> None:
    assert await store.create_topic(topic(), max_owned=10) == "created"
    assert await store.subscribe("room", UUID_B, 2.0, **LIMITS) == "subscribed"
    assert await store.subscribe("room", UUID_B, 3.0, **LIMITS) == "already"
    assert await store.subscribe("nope", UUID_B, 2.0, **LIMITS) == "topic_not_found"
    unknown = "eeeeeeee-eeee-4eee-8eee-eeeeeeeeeeee"
    assert await store.subscribe("room", unknown, 2.0, **LIMITS) == "unknown_client"
    assert await store.is_subscribed("room", UUID_B)
    assert not await store.is_subscribed("room", UUID_C)
    found = await store.get_topic("room")
    assert found is not None
    assert found.subscribers == 1
    assert await store.unsubscribe("room", UUID_B) == "unsubscribed"
    assert await store.unsubscribe("room", UUID_B) == "not_subscribed"
    assert await store.unsubscribe("nope", UUID_B) == "topic_not_found"
    found = await store.get_topic("room")
    assert found is not None
    assert found.subscribers == 0


async def test_a_private_topic_takes_only_invited_members(store: AnyStore) -> None:
    assert await store.create_topic(topic(access="private"), max_owned=10) == "created"
    assert await store.subscribe("room", UUID_B, 2.0, **LIMITS) == "private"
    assert await store.subscribe("room", UUID_B, 2.0, invited=True, **LIMITS) == "subscribed"


async def test_subscriber_and_subscription_limits(store: AnyStore) -> None:
    assert await store.create_topic(topic(), max_owned=10) == "created"
    assert await store.create_topic(topic("other"), max_owned=10) == "created"
    one: dict[str, Any] = {"max_subscribers": 1, "max_subscriptions": 100}
    assert await store.subscribe("room", UUID_B, 2.0, **one) == "subscribed"
    assert await store.subscribe("room", UUID_C, 2.0, **one) == "topic_full"
    single: dict[str, Any] = {"max_subscribers": 100, "max_subscriptions": 1}
    assert await store.subscribe("other", UUID_B, 2.0, **single) == "too_many"
    assert await store.subscribe("other", UUID_C, 2.0, **single) == "subscribed"


async def test_subscribers_and_a_clients_topics_are_listed(store: AnyStore) -> None:
    await room(store, UUID_C, UUID_B, UUID_D)
    assert await store.create_topic(topic("other"), max_owned=10) == "created"
    assert await store.subscribe("other", UUID_B, 2.0, **LIMITS) == "subscribed"
    assert await store.topic_subscribers("room", after=None, limit=10) == sorted(
        [UUID_B, UUID_C, UUID_D]
    )
    assert await store.topic_subscribers("room", after=UUID_B, limit=1) == [UUID_C]
    assert await store.client_topics(UUID_B) == ["other", "room"]
    assert await store.client_topics(UUID_A) == []


# --- publishing -----------------------------------------------------------------------------


async def test_a_publish_stores_one_message_and_a_delivery_per_other_subscriber(
    store: AnyStore,
) -> None:
    await room(store, UUID_A, UUID_B, UUID_C)
    [outcome] = await run(store, publish("m1"))
    assert isinstance(outcome, Published)
    assert outcome.offset == 1
    assert sorted(r for r, _ in outcome.deliveries) == sorted([UUID_B, UUID_C])
    assert outcome.subscribers == 2
    assert outcome.full == 0
    seqs = [seq for _, seq in outcome.deliveries]
    assert len(set(seqs)) == 2
    assert outcome.message not in seqs
    # Each subscriber's queue holds its delivery, with the topic and offset; not the sender's.
    for recipient, seq in outcome.deliveries:
        assert await queue(store, recipient) == [(seq, "room", 1)]
    assert await queue(store, UUID_A) == []
    [second] = await run(store, publish("m2", sender=UUID_B))
    assert isinstance(second, Published)
    assert second.offset == 2
    assert min(s for _, s in second.deliveries) > max(seqs)


async def test_publish_seqs_never_collide_with_reserved_ones(store: AnyStore) -> None:
    await room(store, UUID_A, UUID_B)
    first = await store.reserve_seqs(10)
    [outcome] = await run(store, publish("m1"))
    assert isinstance(outcome, Published)
    assert outcome.message > first + 9
    assert await store.reserve_seqs(1) > max(s for _, s in outcome.deliveries)
    # A direct message with a seq of the first block is stored beside the fan-out.
    [inserted] = await run(store, message(first, sender=UUID_C, recipient=UUID_B))
    assert not isinstance(inserted, Refused)
    assert [seq for seq, _, _ in await queue(store, UUID_B)] == sorted(
        [first, *(s for _, s in outcome.deliveries)]
    )


async def test_who_may_publish(store: AnyStore) -> None:
    await room(store, UUID_B)
    [unknown] = await run(store, publish("x", topic_id="nope"))
    assert unknown == Refused("topic_not_found")
    [stranger] = await run(store, publish("m1", sender=UUID_C))
    assert stranger == Refused("not_subscribed")
    [owner] = await run(store, publish("m2", sender=UUID_A))  # the owner, not subscribed
    assert isinstance(owner, Published)
    assert [r for r, _ in owner.deliveries] == [UUID_B]
    [admin] = await run(store, publish("m3", sender=UUID_C, admin=True))
    assert isinstance(admin, Published)
    await store.update_topic("room", publish="owner")
    [member] = await run(store, publish("m4", sender=UUID_B))
    assert member == Refused("not_permitted")
    [owner_again] = await run(store, publish("m5", sender=UUID_A))
    assert isinstance(owner_again, Published)
    assert owner_again.offset == 3


async def test_a_duplicate_publish_is_found_and_stores_nothing(store: AnyStore) -> None:
    await room(store, UUID_B)
    [first, again] = await run(store, publish("m1"), publish("m1"))
    assert isinstance(first, Published)
    assert again == Duplicate(first.message, None)
    assert len(await queue(store, UUID_B)) == 1
    found = await store.get_topic("room")
    assert found is not None
    assert found.last_offset == 1


async def test_a_full_queue_fails_that_subscribers_delivery_only(store: AnyStore) -> None:
    await room(store, UUID_B, UUID_C)
    await run(store, message(1, sender=UUID_D, recipient=UUID_B))
    [outcome] = await run(store, publish("m1"), max_queued=1)
    assert isinstance(outcome, Published)
    assert [r for r, _ in outcome.deliveries] == [UUID_C]
    assert outcome.full == 1
    counts = await store.topic_counts([outcome.message])
    assert counts == {outcome.message: TopicCounts(total=2, failed=1)}


async def test_counts_follow_each_delivery(store: AnyStore) -> None:
    await room(store, UUID_B, UUID_C, UUID_D)
    [outcome] = await run(store, publish("m1"))
    assert isinstance(outcome, Published)
    seqs = dict(outcome.deliveries)
    assert await store.topic_counts([outcome.message]) == {outcome.message: TopicCounts(3)}
    await run(
        store,
        Finish(seqs[UUID_B], Status.ACKNOWLEDGED, 11.0, False),
        Finish(seqs[UUID_C], Status.EXPIRED, 12.0, False),
    )
    counts = (await store.topic_counts([outcome.message, 999_999]))[outcome.message]
    assert counts == TopicCounts(total=3, acknowledged=1, expired=1)
    assert counts.pending == 1


async def test_a_topic_delivery_owes_its_publisher_no_read_receipt(store: AnyStore) -> None:
    await room(store, UUID_B)
    [outcome] = await run(store, publish("m1"))
    assert isinstance(outcome, Published)
    [(_, seq)] = outcome.deliveries
    [_, read] = await run(
        store, SetAttempts(seq, 1, at=11.0), MarkRead(None, UUID_B, "m1", None, 12.0)
    )
    assert read.code is ReadCode.READ
    assert not read.owed


# --- history --------------------------------------------------------------------------------


async def test_history_pages_by_offset_and_keeps_content_after_delivery(store: AnyStore) -> None:
    await room(store, UUID_B)
    results = await run(store, *(publish(f"m{i}", at=10.0 + i) for i in range(1, 6)))
    for outcome in results:
        assert isinstance(outcome, Published)
        [(_, seq)] = outcome.deliveries
        await run(store, Finish(seq, Status.ACKNOWLEDGED, 20.0, False))
    page = await store.topic_messages("room", since=0, limit=2, now=30.0)
    assert [(m.offset, m.msgid, m.sender) for m in page] == [(1, "m1", UUID_A), (2, "m2", UUID_A)]
    assert page[0].fields == '{"topic_id":"room","content":"m1"}'
    assert page[0].accepted_at == 11.0
    rest = await store.topic_messages("room", since=2, limit=10, now=30.0)
    assert [m.offset for m in rest] == [3, 4, 5]
    assert await store.topic_messages("nope", since=0, limit=10, now=30.0) == []


async def test_history_keeps_the_last_history_count(store: AnyStore) -> None:
    await room(store, UUID_B, history_count=2)
    await run(store, *(publish(f"m{i}") for i in range(1, 5)))
    kept = await store.topic_messages("room", since=0, limit=10, now=20.0)
    assert [m.offset for m in kept] == [3, 4]
    # Trimmed from history, a message still waiting for a subscriber is still delivered.
    assert [offset for _, _, offset in await queue(store, UUID_B)] == [1, 2, 3, 4]


async def test_history_forgets_what_is_older_than_history_age(store: AnyStore) -> None:
    await room(store, UUID_B, history_age=100.0)
    await run(store, publish("old", at=10.0), publish("new", at=200.0))
    # Read at 150, "old" (10) is past 100 s: hidden even before a purge.
    kept = await store.topic_messages("room", since=0, limit=10, now=150.0)
    assert [m.msgid for m in kept] == ["new"]
    await run(store, Purge(finished_before=0.0, receipts_before=0.0, now=250.0))
    assert [m.msgid for m in await store.topic_messages("room", since=0, limit=10, now=0.0)] == [
        "new"
    ]


async def test_a_zero_history_keeps_nothing(store: AnyStore) -> None:
    await room(store, history_count=0)
    [outcome] = await run(store, publish("m1"))  # nobody else subscribed
    assert isinstance(outcome, Published)
    assert outcome.subscribers == 0
    assert await store.topic_messages("room", since=0, limit=10, now=20.0) == []


# --- deletion -------------------------------------------------------------------------------


async def test_deleting_a_topic_ends_subscriptions_and_history_not_waiting_deliveries(
    store: AnyStore,
) -> None:
    await room(store, UUID_B)
    [outcome] = await run(store, publish("m1"))
    assert isinstance(outcome, Published)
    assert await store.delete_topic("room")
    assert not await store.delete_topic("room")
    assert await store.get_topic("room") is None
    assert await store.client_topics(UUID_B) == []
    assert await store.topic_messages("room", since=0, limit=10, now=20.0) == []
    assert [seq for seq, _, _ in await queue(store, UUID_B)] == [s for _, s in outcome.deliveries]
    # The id may be taken again, offsets from 1.
    await room(store, UUID_B)
    [again] = await run(store, publish("m2"))
    assert isinstance(again, Published)
    assert again.offset == 1


async def test_deleting_a_client_ends_its_topics_and_subscriptions(store: AnyStore) -> None:
    await room(store, UUID_B, UUID_C)
    assert await store.create_topic(topic("bobs", creator=UUID_B), max_owned=10) == "created"
    await run(store, publish("m1", sender=UUID_B))
    assert await store.delete_client(UUID_B, 50.0)
    assert await store.get_topic("bobs") is None
    found = await store.get_topic("room")
    assert found is not None
    assert found.subscribers == 1
    assert await store.topic_subscribers("room", after=None, limit=10) == [UUID_C]
    # What it published left the room's history.
    assert await store.topic_messages("room", since=0, limit=10, now=60.0) == []


# --- memberships and broadcasts -------------------------------------------------------------


async def test_memberships_say_which_topics_keep_presence(store: AnyStore) -> None:
    await room(store, UUID_B, presence=True)
    assert await store.create_topic(topic("quiet"), max_owned=10) == "created"
    assert await store.subscribe("quiet", UUID_B, 2.0, **LIMITS) == "subscribed"
    assert await store.memberships(UUID_B) == [("quiet", False), ("room", True)]
    assert await store.memberships(UUID_C) == []


async def test_a_broadcast_goes_to_every_live_client_but_its_sender_in_no_history(
    store: AnyStore,
) -> None:
    assert await store.delete_client(UUID_D, 5.0)
    [refused] = await run(store, publish("b0", topic_id=BROADCAST))
    assert refused == Refused("not_permitted")
    [outcome] = await run(store, publish("b1", topic_id=BROADCAST, admin=True))
    assert isinstance(outcome, Published)
    assert outcome.offset == 0
    assert sorted(r for r, _ in outcome.deliveries) == sorted([UUID_B, UUID_C])
    assert [(topic, offset) for _, topic, offset in await queue(store, UUID_B)] == [
        (BROADCAST, None)
    ]
    assert await store.topic_messages(BROADCAST, since=0, limit=10, now=20.0) == []
    counts = await store.topic_counts([outcome.message])
    assert counts == {outcome.message: TopicCounts(total=2)}


async def test_a_direct_message_reusing_a_published_msgid_is_a_duplicate(store: AnyStore) -> None:
    await room(store, UUID_B)
    [outcome] = await run(store, publish("m1"))
    assert isinstance(outcome, Published)
    seq = await store.reserve_seqs(1)
    [again] = await run(store, message(seq, sender=UUID_A, recipient=UUID_C, msgid="m1"))
    assert again == Duplicate(outcome.message, None)
