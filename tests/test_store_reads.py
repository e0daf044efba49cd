"""Read receipts in the store, on every engine (the ``target`` fixture): ``MarkRead`` records
when a delivery's recipient read it and owes its sender the receipt, apart from the final
status; a client with read receipts off has its reads kept to itself."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from relayd._engine import HistoryQuery
from relayd._relay.records import (
    ClearReadPending,
    Finish,
    LoadReceipts,
    MarkRead,
    Purge,
    ReadCode,
    ReadOutcome,
    SetAttempts,
    SetReceiptPending,
    Status,
    StoredReceipt,
    StoreOp,
)

from .store_support import AnyStore, Target
from .support import IO_DEADLINE
from .test_store import UUID_A, UUID_B, client
from .test_store_contract import PRECISE, UUID_C, message


@pytest.fixture
async def store(target: Target) -> AsyncIterator[AnyStore]:
    """The target's store with three live clients: A, B and C."""
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            for uuid, name in ((UUID_A, "alice"), (UUID_B, "bob"), (UUID_C, "carol")):
                assert await store.insert_client(client(uuid, name=name)) == "inserted"
            yield store


async def run(store: AnyStore, *ops: StoreOp) -> list[Any]:
    return await store.execute(ops, max_queued=100)


def read(msgid: str = "m1", *, reader: str = UUID_B, sender: str | None = None) -> MarkRead:
    return MarkRead(None, reader, msgid, sender, PRECISE)


async def owed(store: AnyStore, sender: str = UUID_A) -> list[StoredReceipt]:
    [rows] = await run(store, LoadReceipts(sender, 0, 100))
    return list(rows)


async def test_only_a_delivery_written_to_its_recipient_can_be_read_and_only_once(
    store: AnyStore,
) -> None:
    await run(store, message(1))
    assert await run(store, read()) == [ReadOutcome(ReadCode.NOT_DELIVERED, 1, UUID_A)]
    assert await owed(store) == []
    await run(store, SetAttempts(1, 1, at=2.0))  # written: pending_ack
    assert await run(store, read()) == [ReadOutcome(ReadCode.READ, 1, UUID_A, PRECISE, owed=True)]
    # Owed to its sender though its final status is not known yet.
    assert await owed(store) == [
        StoredReceipt(1, "m1", UUID_B, None, None, "", final=False, read_at=PRECISE)
    ]
    # Again: nothing changes, and nobody is owed a second receipt.
    again = MarkRead(None, UUID_B, "m1", None, 99.0)
    assert await run(store, again) == [ReadOutcome(ReadCode.ALREADY_READ, 1, UUID_A, PRECISE)]
    await run(store, ClearReadPending((1,)))
    assert await owed(store) == []
    assert await run(store, again) == [ReadOutcome(ReadCode.ALREADY_READ, 1, UUID_A, PRECISE)]
    assert await owed(store) == []
    record = await store.message_record("m1", UUID_A)
    assert record is not None
    assert (record.delivered_at, record.read_at) == (2.0, PRECISE)


async def test_only_the_recipient_may_mark_a_delivery_read(store: AnyStore) -> None:
    await run(store, message(1), Finish(1, Status.DELIVERED, 2.0, receipt_pending=False))
    assert await run(store, read("nothing")) == [ReadOutcome(ReadCode.UNKNOWN_MESSAGE)]
    # Its sender, and a third client, are told it is not theirs: nothing is marked.
    assert await run(store, read(reader=UUID_A)) == [ReadOutcome(ReadCode.NOT_YOURS)]
    assert await run(store, read(reader=UUID_C)) == [ReadOutcome(ReadCode.NOT_YOURS)]
    # Naming another sender than its own is no way round it.
    assert await run(store, read(sender=UUID_C)) == [ReadOutcome(ReadCode.NOT_YOURS)]
    record = await store.message_record("m1", UUID_B)
    assert record is not None
    assert record.read_at is None
    assert await owed(store) == []


async def test_from_picks_one_of_two_senders_deliveries_of_one_msgid(store: AnyStore) -> None:
    await run(
        store,
        message(1, msgid="same"),
        message(2, sender=UUID_C, msgid="same"),
        Finish(1, Status.DELIVERED, 2.0, receipt_pending=False),
        Finish(2, Status.DELIVERED, 2.0, receipt_pending=False),
    )
    assert await run(store, read("same", sender=UUID_A)) == [
        ReadOutcome(ReadCode.READ, 1, UUID_A, PRECISE, owed=True)
    ]
    # Without it, the newest delivery of that msgid to the reader.
    assert await run(store, read("same")) == [
        ReadOutcome(ReadCode.READ, 2, UUID_C, PRECISE, owed=True)
    ]
    assert [r.seq for r in await owed(store, UUID_A)] == [1]
    assert [r.seq for r in await owed(store, UUID_C)] == [2]


async def test_the_final_status_and_the_read_receipt_are_owed_apart(store: AnyStore) -> None:
    await run(store, message(1), message(2), SetAttempts(1, 1, at=2.0), SetAttempts(2, 1, at=2.0))
    # 1: final, then read; told its final status: the read is still owed.
    await run(store, Finish(1, Status.ACKNOWLEDGED, 3.0, receipt_pending=True), read("m1"))
    # 2: read, then final; told its read receipt: the final status is still owed.
    await run(store, read("m2"), Finish(2, Status.ACKNOWLEDGED, 4.0, receipt_pending=True))
    assert await owed(store) == [
        StoredReceipt(1, "m1", UUID_B, Status.ACKNOWLEDGED, 3.0, "", final=True, read_at=PRECISE),
        StoredReceipt(2, "m2", UUID_B, Status.ACKNOWLEDGED, 4.0, "", final=True, read_at=PRECISE),
    ]
    await run(store, SetReceiptPending((1,), pending=False), ClearReadPending((2,)))
    assert await owed(store) == [
        StoredReceipt(1, "m1", UUID_B, Status.ACKNOWLEDGED, 3.0, "", final=False, read_at=PRECISE),
        StoredReceipt(2, "m2", UUID_B, Status.ACKNOWLEDGED, 4.0, "", final=True, read_at=None),
    ]
    await run(store, ClearReadPending((1,)), SetReceiptPending((2,), pending=False))
    assert await owed(store) == []


async def test_a_client_with_read_receipts_off_keeps_its_reads_to_itself(store: AnyStore) -> None:
    assert await store.set_read_receipts(UUID_B, False)
    found = await store.get_client(UUID_B)
    assert found is not None
    assert not found.read_receipts
    await run(store, message(1), Finish(1, Status.DELIVERED, 2.0, receipt_pending=False))
    assert await run(store, read()) == [ReadOutcome(ReadCode.READ, 1, UUID_A, PRECISE)]
    assert await owed(store) == []
    # Its own status and history show the read; its sender's do not.
    mine = await store.message_record("m1", UUID_B)
    theirs = await store.message_record("m1", UUID_A)
    assert mine is not None
    assert theirs is not None
    assert (mine.read_at, theirs.read_at) == (PRECISE, None)
    [inbox] = await store.history(HistoryQuery(UUID_B))
    [sent] = await store.history(HistoryQuery(UUID_A))
    assert (inbox.read_at, sent.read_at) == (PRECISE, None)
    # Turned on again: a read from then on is told; the one before stays hidden.
    assert await store.set_read_receipts(UUID_B, True)
    found = await store.get_client(UUID_B)
    assert found is not None
    assert found.read_receipts
    await run(store, message(2), Finish(2, Status.DELIVERED, 2.0, receipt_pending=False))
    assert await run(store, read("m2")) == [
        ReadOutcome(ReadCode.READ, 2, UUID_A, PRECISE, owed=True)
    ]
    theirs = await store.message_record("m1", UUID_A)
    assert theirs is not None
    assert theirs.read_at is None
    [newer, _] = await store.history(HistoryQuery(UUID_A))
    assert newer.read_at == PRECISE


async def test_read_receipts_of_unknown_or_deleted_clients_cannot_be_set(store: AnyStore) -> None:
    assert not await store.set_read_receipts("nobody", False)
    assert await store.delete_client(UUID_C, 5.0)
    assert not await store.set_read_receipts(UUID_C, False)
    listed = {c.uuid: c.read_receipts for c in await store.list_clients()}
    assert listed == {UUID_A: True, UUID_B: True}


async def test_an_owed_read_receipt_outlives_the_purge_until_told(store: AnyStore) -> None:
    await run(store, message(1), Finish(1, Status.DELIVERED, 2.0, receipt_pending=False), read())
    await run(store, Purge(finished_before=10.0, receipts_before=0.0))
    assert [r.seq for r in await owed(store)] == [1]
    await run(store, ClearReadPending((1,)), Purge(finished_before=10.0, receipts_before=0.0))
    assert await owed(store) == []
    assert await store.message_record("m1", UUID_A) is None


async def test_deleting_the_reader_keeps_the_read_receipt_its_sender_is_owed(
    store: AnyStore,
) -> None:
    await run(store, message(1), Finish(1, Status.DELIVERED, 2.0, receipt_pending=False), read())
    assert await store.delete_client(UUID_B, 5.0)
    assert [r.read_at for r in await owed(store)] == [PRECISE]
