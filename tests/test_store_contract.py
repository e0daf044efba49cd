"""The rest of the store's contract, on every engine (the ``target`` fixture): what the tests of
test_store.py and test_keys_store.py leave out, so that an engine that keeps this contract can
stand in for another. Each test pins the SQLite store's behaviour; the Redis engine must match.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio

from relayd._errors import StoreError
from relayd._relay.records import (
    ClearKeyNotice,
    Duplicate,
    FindExpired,
    Finish,
    Insert,
    Inserted,
    KeyNotice,
    LoadKeyNotices,
    LoadQueue,
    LoadReceipts,
    Purge,
    QueuePage,
    RecentMessage,
    Refused,
    SetAttempts,
    SetReceiptPending,
    Status,
    StoredReceipt,
    StoreOp,
)
from relayd._store import InviteRecord, MessageRecord

from .store_support import AnyStore, Target
from .support import IO_DEADLINE
from .test_keys_store import key
from .test_store import UUID_A, UUID_B, client

UUID_C = "0b6f3b0e-1c1e-4c39-9a59-3f0f8f0c0a03"
# A time that 14 significant digits (Lua's tostring) would not keep.
PRECISE = 1712345678.1234567


@pytest.fixture
async def store(target: Target) -> AsyncIterator[AnyStore]:
    """The target's store with three live clients: A, B and C."""
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            for uuid, name in ((UUID_A, "alice"), (UUID_B, "bob"), (UUID_C, "carol")):
                assert await store.insert_client(client(uuid, name=name)) == "inserted"
            yield store


def message(
    seq: int,
    *,
    sender: str = UUID_A,
    recipient: str = UUID_B,
    msgid: str | None = None,
    fields: str = '{"content": "hi"}',
    accepted_at: float = 1.0,
    expires_at: float = 1e9,
) -> Insert:
    return Insert(
        None,
        seq,
        sender,
        recipient,
        f"m{seq}" if msgid is None else msgid,
        False,
        True,
        fields,
        accepted_at,
        expires_at,
    )


async def run(store: AnyStore, *ops: StoreOp, max_queued: int = 100) -> list[Any]:
    return await store.execute(ops, max_queued=max_queued)


async def queue(store: AnyStore, recipient: str = UUID_B) -> list[int]:
    [page] = await run(store, LoadQueue(recipient, 0, 100, 1 << 20))
    assert isinstance(page, QueuePage)
    return [row.seq for row in page.rows]


# --- clients --------------------------------------------------------------------------------


async def test_rename_and_set_roles_change_only_live_clients(store: AnyStore) -> None:
    await store.rename_client(UUID_A, "alicia")
    assert await store.set_roles(UUID_A, ("client", "admin"))
    found = await store.get_client(UUID_A)
    assert found is not None
    assert (found.name, found.roles) == ("alicia", ("client", "admin"))
    assert await store.delete_client(UUID_A, 5.0)
    await store.rename_client(UUID_A, "ghost")
    assert not await store.set_roles(UUID_A, ("admin",))
    assert not await store.set_roles("nobody", ("admin",))
    tombstone = await store.get_client(UUID_A)
    assert tombstone is not None
    assert (tombstone.name, tombstone.roles) == ("alicia", ("client", "admin"))


async def test_clients_created_together_are_listed_by_uuid(target: Target) -> None:
    async with target.open() as store:
        for uuid in (UUID_C, UUID_A, UUID_B):
            assert await store.insert_client(client(uuid, at=PRECISE)) == "inserted"
        listed = await store.list_clients()
    assert [c.uuid for c in listed] == [UUID_A, UUID_B, UUID_C]
    assert {c.created_at for c in listed} == {PRECISE}


async def test_set_secret_holds_only_while_its_proof_holds(store: AnyStore) -> None:
    secret = client().secret_hash
    # Replacing a hash that is no longer the client's: refused, nothing revoked.
    assert not await store.set_secret(UUID_A, "new", revoke_at=50.0, replacing="stale")
    found = await store.get_client(UUID_A)
    assert found is not None
    assert (found.secret_hash, found.tokens_valid_after) == (secret, 100.0)
    # A token issued before the client's tokens were revoked proves nothing.
    assert await store.revoke_client_tokens(UUID_A, 120.0)
    assert not await store.set_secret(UUID_A, "new", revoke_at=None, token_issued_at=110.0)
    assert await store.set_secret(
        UUID_A, "new", revoke_at=130.0, replacing=secret, token_issued_at=120.0
    )
    found = await store.get_client(UUID_A)
    assert found is not None
    assert (found.secret_hash, found.tokens_valid_after) == ("new", 130.0)


async def test_token_holder_is_the_client_and_whether_the_login_lives(store: AnyStore) -> None:
    assert await store.token_holder("nobody", "fam") == (None, True)
    alice = await store.get_client(UUID_A)
    assert await store.token_holder(UUID_A, None) == (alice, True)
    assert await store.create_family("fam", UUID_A, "j1", 100.0, 1000.0)
    assert await store.create_family("bobs", UUID_B, "j2", 100.0, 1000.0)
    assert await store.token_holder(UUID_A, "fam") == (alice, True)
    assert await store.token_holder(UUID_A, "bobs") == (alice, False)  # another's login
    assert await store.token_holder(UUID_A, "gone") == (alice, False)
    assert await store.revoke_family("fam", 105.0, "logout")
    assert await store.token_holder(UUID_A, "fam") == (alice, False)


async def test_a_family_is_created_only_while_its_proof_holds(
    store: AnyStore, target: Target
) -> None:
    secret = client().secret_hash
    assert not await store.create_family("f1", UUID_A, "j", 100.0, 1e3, secret_hash="stale")
    assert await store.create_family("f1", UUID_A, "j", 100.0, 1e3, secret_hash=secret)
    assert await store.revoke_client_tokens(UUID_A, 150.0)
    assert not await store.create_family("f2", UUID_A, "j", 160.0, 1e3, token_issued_at=140.0)
    assert await store.create_family("f2", UUID_A, "j", 160.0, 1e3, token_issued_at=150.0)
    assert await store.get_family("f2") is not None
    assert await store.delete_client(UUID_A, 170.0)
    assert not await store.create_family("f3", UUID_A, "j", 180.0, 1e3, secret_hash=secret)
    assert await store.get_family("f3") is None
    # A family id is created once (SQLite's primary key says so in its own words).
    assert await store.create_family("f9", UUID_B, "j", 100.0, 1e3)
    refusal = sqlite3.IntegrityError if target.engine == "sqlite" else StoreError
    with pytest.raises(refusal):
        await store.create_family("f9", UUID_B, "j", 100.0, 1e3)


async def test_invites_are_listed_newest_first_then_by_id(store: AnyStore) -> None:
    for invite, at in (("b", 10.0), ("c", 20.0), ("a", 10.0)):
        assert await store.create_invite(invite, by="op", at=at, expires_at=99.0, max_open=9)
    assert await store.insert_client(client("0b6f3b0e-0000", at=30.0), invite="a") == "inserted"
    assert await store.list_invites() == [
        InviteRecord("c", 20.0, "op", 99.0, None, None),
        InviteRecord("a", 10.0, "op", 99.0, 30.0, "0b6f3b0e-0000"),
        InviteRecord("b", 10.0, "op", 99.0, None, None),
    ]


# --- seqs ----------------------------------------------------------------------------------


async def test_reserved_seqs_are_fresh_and_the_highest_is_the_last(store: AnyStore) -> None:
    assert await store.last_message_seq() == 0
    assert await store.reserve_seqs(3) == 1
    assert await store.last_message_seq() == 3
    assert await store.reserve_seqs(1) == 4
    # A message stored above the reservations raises the mark; one below leaves it.
    assert await run(store, message(10)) == [Inserted(10)]
    assert await store.last_message_seq() == 10
    assert await store.reserve_seqs(2) == 11
    assert await run(store, message(5)) == [Inserted(5)]
    assert await store.last_message_seq() == 12
    with pytest.raises(ValueError, match="at least one"):
        await store.reserve_seqs(0)


async def test_concurrent_reservations_never_overlap(store: AnyStore) -> None:
    firsts: list[int] = []

    async def reserve() -> None:
        firsts.append(await store.reserve_seqs(4))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(reserve)
    assert sorted(firsts) == list(range(1, 81, 4))


# --- the queue ------------------------------------------------------------------------------


async def test_each_operation_sees_the_ones_before_it(store: AnyStore) -> None:
    results = await run(
        store,
        message(1),
        LoadQueue(UUID_B, 0, 10, 1 << 20),
        Finish(1, Status.DELIVERED, 2.0, receipt_pending=True),
        LoadQueue(UUID_B, 0, 10, 1 << 20),
        LoadReceipts(UUID_A, 0, 10),
        message(2),
        message(3),
        max_queued=1,
    )
    assert results[0] == Inserted(1)
    assert isinstance(results[1], QueuePage)
    assert [row.seq for row in results[1].rows] == [1]
    assert results[2] is None
    assert results[3] == QueuePage([], more=False)
    assert results[4] == [StoredReceipt(1, "m1", UUID_B, Status.DELIVERED, 2.0, "")]
    # The finish made room for one: the next insert fills it.
    assert results[5:] == [Inserted(2), Refused("queue_full")]
    assert await run(store) == []


async def test_a_duplicate_says_what_became_of_the_original(store: AnyStore) -> None:
    assert await run(store, message(1), message(2)) == [Inserted(1), Inserted(2)]
    await run(store, Finish(1, Status.ACKNOWLEDGED, 3.0, receipt_pending=False))
    again = [attrs.evolve(message(1), seq=7), attrs.evolve(message(2), seq=8)]
    assert await run(store, *again) == [
        Duplicate(1, Status.ACKNOWLEDGED),
        Duplicate(2, None),
    ]
    # Another sender may use the same msgid.
    assert await run(store, message(9, sender=UUID_C, msgid="m1")) == [Inserted(9)]
    # A duplicate is a duplicate even to nobody, and even when the queue is full.
    assert await run(store, attrs.evolve(message(10, msgid="m2"), recipient="x"), max_queued=0) == [
        Duplicate(2, None)
    ]


async def test_a_receipt_is_stored_for_an_offline_sender_without_a_queue(store: AnyStore) -> None:
    receipt = attrs.evolve(
        message(1, recipient="nobody", fields=""),
        status=Status.FAILED,
        receipt_pending=True,
        reason="expired_offline",
        accepted_at=PRECISE,
    )
    assert await run(store, receipt, max_queued=0) == [Inserted(1)]
    assert await store.queue_depths() == {}
    [receipts] = await run(store, LoadReceipts(UUID_A, 0, 10))
    assert receipts == [StoredReceipt(1, "m1", "nobody", Status.FAILED, PRECISE, "expired_offline")]
    assert await run(store, attrs.evolve(receipt, seq=2)) == [Duplicate(1, Status.FAILED)]


async def test_receipts_are_owed_until_told(store: AnyStore) -> None:
    await run(store, message(1), message(2), message(3), message(4, sender=UUID_C))
    await run(
        store,
        Finish(1, Status.ACKNOWLEDGED, 5.0, receipt_pending=True),
        Finish(2, Status.FAILED, 6.0, receipt_pending=True, reason="max_attempts"),
        Finish(4, Status.DELIVERED, 7.0, receipt_pending=True),
        Finish(1, Status.EXPIRED, 8.0, receipt_pending=False),  # final already: no change
    )
    [owed] = await run(store, LoadReceipts(UUID_A, 0, 10))
    assert owed == [
        StoredReceipt(1, "m1", UUID_B, Status.ACKNOWLEDGED, 5.0, ""),
        StoredReceipt(2, "m2", UUID_B, Status.FAILED, 6.0, "max_attempts"),
    ]
    [after_one] = await run(store, LoadReceipts(UUID_A, 1, 1))
    assert [r.seq for r in after_one] == [2]
    # Told: no longer owed; a queued message has no receipt to owe.
    await run(store, SetReceiptPending((1, 3), pending=False))
    [owed] = await run(store, LoadReceipts(UUID_A, 0, 10))
    assert [r.seq for r in owed] == [2]
    await run(store, SetReceiptPending((1, 3), pending=True))
    [owed] = await run(store, LoadReceipts(UUID_A, 0, 10))
    assert [r.seq for r in owed] == [1, 2]
    assert await queue(store) == [3]


async def test_attempts_are_recorded_while_queued(store: AnyStore) -> None:
    await run(store, message(1), message(2))
    await run(
        store,
        SetAttempts(1, 2),
        Finish(2, Status.DELIVERED, 3.0, receipt_pending=False),
        SetAttempts(2, 5),
    )
    [page] = await run(store, LoadQueue(UUID_B, 0, 10, 1 << 20))
    assert isinstance(page, QueuePage)
    assert [(row.seq, row.attempts) for row in page.rows] == [(1, 2)]
    record = await store.message_record("m2", UUID_A)
    assert record is not None
    assert record.attempts == 0


async def test_expired_messages_are_found_soonest_first(store: AnyStore) -> None:
    # Ties in seq order, 9 before 10 (not as text).
    expiries = {8: 50.0, 10: 30.0, 9: 30.0, 11: 10.0, 12: 70.0}
    await run(store, *(message(seq, expires_at=at) for seq, at in expiries.items()))
    await run(store, Finish(11, Status.ACKNOWLEDGED, 5.0, receipt_pending=False))
    [found] = await run(store, FindExpired(50.0, 10))
    assert [(row.seq, row.expires_at) for row in found] == [(9, 30.0), (10, 30.0), (8, 50.0)]
    [first] = await run(store, FindExpired(50.0, 1))
    assert [row.seq for row in first] == [9]
    assert [row.fields for row in found] == ['{"content": "hi"}'] * 3


async def test_purge_forgets_finished_messages_told_or_too_old(store: AnyStore) -> None:
    await run(store, *(message(seq) for seq in range(1, 6)))
    await run(
        store,
        Finish(1, Status.ACKNOWLEDGED, 10.0, receipt_pending=False),  # told, old: goes
        Finish(2, Status.ACKNOWLEDGED, 30.0, receipt_pending=False),  # told, recent: stays
        Finish(3, Status.FAILED, 10.0, receipt_pending=True),  # owed, not too old: stays
        Finish(4, Status.FAILED, 5.0, receipt_pending=True),  # owed, too old: goes
    )
    await run(store, Purge(finished_before=20.0, receipts_before=8.0))
    assert await store.message_record("m1", UUID_A) is None
    assert await store.message_record("m4", UUID_A) is None
    assert not await store.msgid_known("m1")
    assert await store.msgid_known("m2")
    [owed] = await run(store, LoadReceipts(UUID_A, 0, 10))
    assert [r.seq for r in owed] == [3]
    assert await queue(store) == [5]
    # Forgotten for deduplication too: the msgid is new again.
    assert await run(store, message(6, msgid="m1")) == [Inserted(6)]
    assert await store.last_message_seq() == 6


async def test_a_message_record_is_the_newest_the_client_sent_or_received(
    store: AnyStore,
) -> None:
    await run(
        store,
        message(1, msgid="x", accepted_at=PRECISE),  # A to B
        message(2, sender=UUID_B, recipient=UUID_A, msgid="x"),  # B to A
        message(3, sender=UUID_C, recipient=UUID_B, msgid="x"),  # C to B
        Finish(1, Status.FAILED, PRECISE + 1, receipt_pending=True, reason="max_attempts"),
        SetAttempts(3, 4),
    )
    assert await store.message_record("x", UUID_A) == MessageRecord(
        2, UUID_B, UUID_A, "x", None, "", 0, 1.0, 1e9, None, message=2
    )
    assert await store.message_record("x", UUID_B) == MessageRecord(
        3, UUID_C, UUID_B, "x", None, "", 4, 1.0, 1e9, None, message=3
    )
    await run(store, Finish(2, Status.EXPIRED, 9.0, receipt_pending=False))
    record = await store.message_record("x", UUID_A)
    assert record is not None
    assert (record.seq, record.status, record.finished_at) == (2, "expired", 9.0)
    assert await store.message_record("x", "stranger") is None
    assert await store.message_record("y", UUID_A) is None
    assert await store.msgid_known("x")
    assert not await store.msgid_known("y")
    await run(store, message(4, msgid="xx"))  # a msgid that starts with another
    record = await store.message_record("x", UUID_B)
    assert record is not None
    assert record.seq == 3


async def test_a_failed_message_keeps_its_record(store: AnyStore) -> None:
    await run(
        store,
        message(1, accepted_at=PRECISE),
        Finish(1, Status.FAILED, PRECISE + 1, receipt_pending=True, reason="max_attempts"),
    )
    assert await store.message_record("m1", UUID_B) == MessageRecord(
        1, UUID_A, UUID_B, "m1", "failed", "max_attempts", 0, PRECISE, 1e9, PRECISE + 1, message=1
    )


async def test_recent_messages_are_the_newest_since_oldest_first(store: AnyStore) -> None:
    await run(
        store,
        message(1, accepted_at=10.0),
        message(2, accepted_at=20.0),
        message(3, accepted_at=PRECISE),
        message(4, accepted_at=30.0),
        Finish(2, Status.DELIVERED, 25.0, receipt_pending=False),
    )
    assert await store.recent_messages(20.0, 10) == [
        RecentMessage(UUID_A, "m2", 20.0, Status.DELIVERED),
        RecentMessage(UUID_A, "m3", PRECISE, None),
        RecentMessage(UUID_A, "m4", 30.0, None),
    ]
    assert [m.msgid for m in await store.recent_messages(0.0, 2)] == ["m3", "m4"]
    assert await store.recent_messages(PRECISE + 1, 10) == []


async def test_undelivered_counts_the_queue_and_lists_its_oldest(store: AnyStore) -> None:
    await run(store, *(message(seq, fields=f'{{"n": {seq}}}') for seq in range(1, 5)))
    await run(store, message(5, recipient=UUID_C))
    await run(store, Finish(1, Status.DELIVERED, 2.0, receipt_pending=False))
    count, rows = await store.undelivered(UUID_B, 2)
    assert count == 3
    assert [(row.seq, row.fields) for row in rows] == [(2, '{"n": 2}'), (3, '{"n": 3}')]
    assert await store.undelivered(UUID_A, 5) == (0, [])
    assert await store.queue_depths() == {UUID_B: 3, UUID_C: 1}
    assert await store.queued_total() == 4
    # A queue emptied has no depth at all.
    await run(
        store, *(Finish(seq, Status.EXPIRED, 3.0, receipt_pending=False) for seq in (2, 3, 4))
    )
    assert await store.queue_depths() == {UUID_C: 1}


async def test_content_in_use_is_counted_per_key(store: AnyStore, target: Target) -> None:
    await run(store, message(1), message(2), message(3, fields=""))
    await run(store, Finish(1, Status.DELIVERED, 2.0, receipt_pending=False))
    key = None if target.keys is None else target.keys.current
    assert await store.keys_in_use() == {key: 1}
    await run(store, Finish(2, Status.DELIVERED, 2.0, receipt_pending=False))
    assert await store.keys_in_use() == {}


async def test_content_of_any_size_and_script_comes_back_as_it_went(store: AnyStore) -> None:
    texts = ["", "a", "é" * 20, "ü" * 200, "€" * 30_000, "𝄞" * 70_000, '{"a": "\\u0000"}']
    await run(store, *(message(seq, fields=t) for seq, t in enumerate(texts, 1)))
    [page] = await run(store, LoadQueue(UUID_B, 0, 100, 1 << 30))
    assert isinstance(page, QueuePage)
    assert [row.fields for row in page.rows] == texts


async def test_a_page_that_one_row_fills_says_more_wait(store: AnyStore) -> None:
    await run(store, message(1, fields="x" * 5000), message(2))
    [page] = await run(store, LoadQueue(UUID_B, 0, 10, 100))
    assert isinstance(page, QueuePage)
    assert ([row.seq for row in page.rows], page.more) == ([1], True)


async def test_key_notices_are_loaded_oldest_first_and_bounded(store: AnyStore) -> None:
    for owner in (UUID_B, UUID_C):
        assert await store.publish_keys(owner, [key(1)], 1.0, max_superseded=4, max_notices=9)
        assert await store.read_keys(owner, UUID_A, 2.0, max_readers=9) is not None
    await store.publish_keys(UUID_C, [key(2)], 3.0, max_superseded=4, max_notices=9)
    await store.publish_keys(UUID_B, [key(3)], 4.0, max_superseded=4, max_notices=9)
    [owed] = await run(store, LoadKeyNotices(UUID_A, 10))
    assert [(n.client, n.changed_at) for n in owed] == [(UUID_C, 3.0), (UUID_B, 4.0)]
    [first] = await run(store, LoadKeyNotices(UUID_A, 1))
    assert first == owed[:1]
    # A notice whose fingerprint or time does not match what is owed clears nothing.
    stale = attrs.evolve(owed[0], changed_at=2.5)
    await run(store, ClearKeyNotice(stale), ClearKeyNotice(attrs.evolve(owed[1], fingerprint="0")))
    [again] = await run(store, LoadKeyNotices(UUID_A, 10))
    assert again == owed
    assert isinstance(again[0], KeyNotice)


async def test_key_notices_of_one_instant_are_loaded_by_client_then_algorithm(
    store: AnyStore,
) -> None:
    for owner in (UUID_C, UUID_B):
        ed = attrs.evolve(key(7), algorithm="ed25519")
        await store.publish_keys(owner, [key(1), ed], 1.0, max_superseded=4, max_notices=9)
        await store.read_keys(owner, UUID_A, 2.0, max_readers=9)
    for owner in (UUID_C, UUID_B):
        ed = attrs.evolve(key(8), algorithm="ed25519")
        await store.publish_keys(owner, [ed, key(2)], 3.0, max_superseded=4, max_notices=9)
    [owed] = await run(store, LoadKeyNotices(UUID_A, 10))
    assert [(n.client, n.algorithm) for n in owed] == [
        (UUID_B, "ed25519"),
        (UUID_B, "x25519"),
        (UUID_C, "ed25519"),
        (UUID_C, "x25519"),
    ]
    [first] = await run(store, LoadKeyNotices(UUID_A, 1))
    assert first == owed[:1]


async def test_a_batch_that_is_not_operations_is_refused(store: AnyStore) -> None:
    with pytest.raises(TypeError, match="not a store operation"):
        await run(store, message(1), "DROP TABLE")  # type: ignore[arg-type]
    assert await queue(store) == []


async def test_a_seq_that_holds_another_message_fails_the_batch(
    store: AnyStore, target: Target
) -> None:
    assert await run(store, message(1)) == [Inserted(1)]
    with pytest.raises(StoreError):
        await run(store, message(2), message(1, msgid="other"))
    # Nothing of the batch was written.
    assert await queue(store) == [1]
    assert not await store.msgid_known("m2")


async def test_an_insert_run_again_is_inserted_not_a_duplicate(store: AnyStore) -> None:
    """A batch whose answer was lost (a deadline, a failed WAIT) is run again by the hub:
    its Inserts find themselves, not a duplicate; another seq with the msgid is one."""
    assert await run(store, message(7)) == [Inserted(7)]
    assert await run(store, message(7)) == [Inserted(7)]
    assert await run(store, message(8, msgid="m7")) == [Duplicate(7, None)]
    assert await queue(store) == [7]
