"""History in the store, on every engine (the ``target`` fixture): what a client sent and
received, paged by seq in either order, filtered by box, peer and conversation; content kept
only when the relay asks (``keep_content``: ``history.retention``); delivery times recorded."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio

from relayd._engine import HistoryEntry, HistoryQuery
from relayd._relay.records import Finish, Insert, Purge, SetAttempts, Status
from relayd._store import Store, thread_executor

from .store_support import AnyStore, Target
from .support import IO_DEADLINE
from .test_store import UUID_A, UUID_B, client
from .test_store_contract import UUID_C, message


@pytest.fixture
async def store(target: Target) -> AsyncIterator[AnyStore]:
    """The target's store with three live clients: A, B and C."""
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            for uuid, name in ((UUID_A, "alice"), (UUID_B, "bob"), (UUID_C, "carol")):
                assert await store.insert_client(client(uuid, name=name)) == "inserted"
            yield store


def talk(seq: int, sender: str, recipient: str, conversation: str | None = None) -> Insert:
    return attrs.evolve(
        message(seq, sender=sender, recipient=recipient, fields=f'{{"content": "c{seq}"}}'),
        conversation_id=conversation,
        accepted_at=float(seq),
    )


async def page(store: AnyStore, client: str, **kwargs: object) -> list[int]:
    return [entry.seq for entry in await store.history(HistoryQuery(client, **kwargs))]  # type: ignore[arg-type]


async def pages(store: AnyStore, client: str, size: int, **kwargs: object) -> list[list[int]]:
    """Every page of ``client``'s history, following the cursor."""
    found: list[list[int]] = []
    cursor: int | None = None
    while True:
        seqs = await page(store, client, cursor=cursor, limit=size, **kwargs)
        if not seqs:
            return found
        found.append(seqs)
        cursor = seqs[-1]


async def seed_talk(store: AnyStore) -> None:
    # A and B talk in conversation "x"; C writes to A outside it; A writes a note to itself.
    await store.execute(
        [
            talk(1, UUID_A, UUID_B, "x"),
            talk(2, UUID_B, UUID_A, "x"),
            talk(3, UUID_C, UUID_A),
            talk(4, UUID_A, UUID_B, "x"),
            talk(5, UUID_A, UUID_A),
            talk(6, UUID_B, UUID_C),
        ],
        max_queued=100,
    )


async def test_history_is_both_boxes_newest_first_in_pages(store: AnyStore) -> None:
    await seed_talk(store)
    assert await pages(store, UUID_A, 2) == [[5, 4], [3, 2], [1]]
    assert await pages(store, UUID_A, 2, newest_first=False) == [[1, 2], [3, 4], [5]]
    # B sees neither C's message to A nor A's note to itself.
    assert await page(store, UUID_B) == [6, 4, 2, 1]


async def test_boxes_peers_and_conversations_filter(store: AnyStore) -> None:
    await seed_talk(store)
    assert await page(store, UUID_A, box="inbox") == [5, 3, 2]
    assert await page(store, UUID_A, box="sent") == [5, 4, 1]
    assert await page(store, UUID_A, peer=UUID_B) == [4, 2, 1]
    assert await page(store, UUID_A, peer=UUID_B, box="inbox") == [2]
    assert await page(store, UUID_A, peer=UUID_C) == [3]
    assert await page(store, UUID_A, conversation_id="x") == [4, 2, 1]
    assert await page(store, UUID_A, conversation_id="x", box="sent") == [4, 1]
    assert await page(store, UUID_C, conversation_id="x") == []
    assert await page(store, UUID_A, peer=UUID_C, conversation_id="x") == []


async def test_pages_are_stable_while_messages_arrive(store: AnyStore) -> None:
    await seed_talk(store)
    first = await page(store, UUID_A, limit=2)
    await store.execute([talk(7, UUID_B, UUID_A), talk(8, UUID_A, UUID_C)], max_queued=100)
    # Newest first, the next page goes on below the cursor: nothing skipped, nothing twice.
    assert await page(store, UUID_A, limit=2, cursor=first[-1]) == [3, 2]
    # Oldest first, what arrived meanwhile comes at the end.
    assert await pages(store, UUID_A, 3, newest_first=False) == [[1, 2, 3], [4, 5, 7], [8]]


async def test_an_entry_says_what_became_of_the_message(store: AnyStore) -> None:
    await store.execute([talk(1, UUID_A, UUID_B, "x"), talk(2, UUID_A, UUID_B)], max_queued=10)
    await store.execute(
        [
            SetAttempts(1, 1, at=10.0),
            SetAttempts(1, 2, at=20.0),  # a redelivery: delivered_at stays the first
            Finish(1, Status.ACKNOWLEDGED, 30.0, True, keep_content=True),
            Finish(2, Status.DELIVERED, 40.0, False),
        ],
        max_queued=10,
    )
    [second, first] = await store.history(HistoryQuery(UUID_B))
    assert first == HistoryEntry(
        seq=1,
        msgid="m1",
        sender=UUID_A,
        recipient=UUID_B,
        fields='{"content": "c1"}',
        conversation_id="x",
        status="acknowledged",
        reason="",
        attempts=2,
        accepted_at=1.0,
        delivered_at=10.0,
        read_at=None,
        finished_at=30.0,
    )
    # Without keep_content, the content goes at the final status, as it always did.
    assert (second.fields, second.status, second.delivered_at) == ("", "delivered", 40.0)


async def test_a_waiting_message_is_history_too(store: AnyStore) -> None:
    await store.execute([talk(1, UUID_A, UUID_B)], max_queued=10)
    [entry] = await store.history(HistoryQuery(UUID_A, box="sent"))
    assert (entry.status, entry.fields, entry.delivered_at) == (None, '{"content": "c1"}', None)


async def test_purged_messages_leave_history(store: AnyStore) -> None:
    await store.execute([talk(1, UUID_A, UUID_B), talk(2, UUID_A, UUID_B)], max_queued=10)
    await store.execute([Finish(1, Status.DELIVERED, 5.0, False, keep_content=True)], max_queued=10)
    await store.execute([Purge(finished_before=6.0, receipts_before=6.0)], max_queued=10)
    assert await page(store, UUID_B) == [2]


async def test_a_deleted_client_leaves_no_history(store: AnyStore) -> None:
    await seed_talk(store)
    finals = [Finish(seq, Status.DELIVERED, 9.0, seq == 2, keep_content=True) for seq in (1, 2, 3)]
    await store.execute(finals, max_queued=100)
    assert await store.delete_client(UUID_A, 10.0)
    # What A sent or was sent whose status is final is gone (1, 3, and A's note 5 stays only
    # while it waits: it is not final); B keeps what A sent that still waits for it (4) and
    # its own message to A whose receipt it is still owed (2).
    assert await page(store, UUID_B) == [6, 4, 2]
    assert await page(store, UUID_C) == [6]


async def test_an_attempt_counted_is_not_a_delivery(store: AnyStore) -> None:
    """The relay counts a message's first attempt before it can reach the socket (so that a
    crash never hides a delivery): only the time it was written, when the relay says it, is
    its delivered_at; an attempt taken back (never made) takes that back too."""
    going = attrs.evolve(talk(1, UUID_A, UUID_B), attempts=1)
    await store.execute([going, talk(2, UUID_A, UUID_B)], max_queued=10)
    [second, first] = await store.history(HistoryQuery(UUID_B))
    assert (first.attempts, first.delivered_at, second.delivered_at) == (1, None, None)
    await store.execute([SetAttempts(1, 1, at=5.0)], max_queued=10)
    [_, first] = await store.history(HistoryQuery(UUID_B))
    assert first.delivered_at == 5.0
    await store.execute([SetAttempts(1, 0)], max_queued=10)
    [_, first] = await store.history(HistoryQuery(UUID_B))
    assert (first.attempts, first.delivered_at) == (0, None)


async def test_history_is_read_beside_the_writer(tmp_path: Path) -> None:
    """On a SQLite file, a page of history is read on a connection of its own: it is answered
    while the writer is busy with a batch, and never waits for it."""
    path = tmp_path / "odd name #1?.sqlite3"  # quoted in the reader's URI
    with trio.fail_after(IO_DEADLINE):
        async with Store.open(str(path), executor=thread_executor) as store:
            for uuid, name in ((UUID_A, "alice"), (UUID_B, "bob")):
                await store.insert_client(client(uuid, name=name))
            await store.execute([talk(1, UUID_A, UUID_B)], max_queued=10)
            async with store._limiter:  # the writer is busy
                [entry] = await store.history(HistoryQuery(UUID_B))
            assert entry.fields == '{"content": "c1"}'
