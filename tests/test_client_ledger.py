"""The sender's ledger (``relayd.client._ledger``): what is owed to relayd, and what became of
each message. Pure: no I/O, no clock."""

from __future__ import annotations

from typing import Any

import pytest

from relayd.client import Receipt, Status
from relayd.client._frames import ErrorFrame
from relayd.client._ledger import MAX_RECEIPTS_PER_ENTRY, Entry, Ledger, Phase

BOB = "8cb0dec9-9342-4eba-89f7-28f97513c0c5"


def frame(msgid: str) -> dict[str, Any]:
    return {"type": "message", "to": BOB, "msgid": msgid, "content": msgid}


def write_all(ledger: Ledger, now: float = 0.0) -> list[str]:
    """Write every message the ledger offers, as the client's writer does; their msgids."""
    written = []
    while (entry := ledger.next_to_write(now)) is not None:
        ledger.written(entry)
        written.append(entry.msgid)
    return written


def receipt(msgid: str, status: Status) -> Receipt:
    return Receipt(msgid=msgid, status=status, to=BOB)


def error(code: str, msgid: str, **details: Any) -> ErrorFrame:
    return ErrorFrame(code, code, {"msgid": msgid, **details})


def test_messages_are_written_once_in_send_order() -> None:
    ledger = Ledger()
    entries = [ledger.add(m, frame(m)) for m in ("a", "b", "c")]
    assert [e.phase for e in entries] == [Phase.QUEUED] * 3
    assert write_all(ledger) == ["a", "b", "c"]
    assert [e.phase for e in entries] == [Phase.WRITTEN] * 3
    assert write_all(ledger) == []


def test_unanswered_messages_are_written_again_with_the_same_msgid_after_a_session_ends() -> None:
    ledger = Ledger()
    for m in ("a", "b", "c"):
        ledger.add(m, frame(m))
    write_all(ledger)
    ledger.receipt(receipt("b", Status.PENDING_ACK))  # b is stored by relayd
    ledger.session_ended()
    assert write_all(ledger) == ["a", "c"]
    entries = {entry.msgid: entry for entry in ledger.pending()}
    assert (entries["a"].writes, entries["b"].writes, entries["c"].writes) == (2, 1, 2)
    assert entries["a"].frame["msgid"] == "a"


def test_a_final_receipt_ends_the_tracking() -> None:
    ledger = Ledger()
    entry = ledger.add("a", frame("a"))
    write_all(ledger)
    assert ledger.receipt(receipt("a", Status.PENDING_ACK)) is entry
    assert (entry.phase, entry.final) == (Phase.ACCEPTED, None)
    assert ledger.receipt(receipt("a", Status.ACKNOWLEDGED)) is entry
    assert (entry.phase, entry.final) == (Phase.FINAL, receipt("a", Status.ACKNOWLEDGED))
    assert [r.status for r in entry.receipts] == ["pending_ack", "acknowledged"]
    assert "a" not in ledger
    assert len(ledger) == 0


def test_receipts_for_msgids_it_does_not_hold_change_nothing() -> None:
    ledger = Ledger()
    entry = ledger.add("a", frame("a"))
    write_all(ledger)
    assert ledger.receipt(receipt("from-an-earlier-run", Status.DELIVERED)) is None
    assert ledger.receipt(receipt("a", Status.DELIVERED)) is entry
    # The same final receipt again (receipts come at least once): not ours any more.
    assert ledger.receipt(receipt("a", Status.DELIVERED)) is None
    assert len(entry.receipts) == 1


@pytest.mark.parametrize("code", ["rate_limited", "store_unavailable"])
def test_refused_for_now_goes_back_to_the_queue_and_sending_pauses(code: str) -> None:
    ledger = Ledger()
    entry = ledger.add("a", frame("a"))
    ledger.add("b", frame("b"))
    write_all(ledger, now=10.0)
    assert ledger.refused(error(code, "a", retry_after=2), now=10.5) is entry
    assert entry.phase is Phase.QUEUED
    assert ledger.paused_until == 12.5
    assert ledger.has_queued()
    assert ledger.next_to_write(now=12.4) is None
    assert write_all(ledger, now=12.5) == ["a"]
    assert entry.writes == 2


def test_rate_limited_without_retry_after_pauses_one_second() -> None:
    ledger = Ledger()
    ledger.add("a", frame("a"))
    write_all(ledger)
    ledger.refused(error("rate_limited", "a"), now=3.0)
    assert ledger.paused_until == 4.0


@pytest.mark.parametrize("code", ["unknown_recipient", "queue_full"])
def test_a_refusal_for_good_is_a_final_rejected_receipt(code: str) -> None:
    ledger = Ledger()
    entry = ledger.add("a", frame("a"))
    write_all(ledger)
    assert ledger.refused(error(code, "a", to=BOB), now=0.0) is entry
    assert entry.phase is Phase.FINAL
    assert entry.final == Receipt(
        msgid="a", status=Status.REJECTED, to=BOB, reason=code, kind="error"
    )
    assert "a" not in ledger


def test_other_errors_naming_a_msgid_change_nothing() -> None:
    ledger = Ledger()
    entry = ledger.add("a", frame("a"))
    write_all(ledger)
    assert ledger.refused(error("invalid_message", "a"), now=0.0) is None
    assert ledger.refused(error("queue_full", "not-ours"), now=0.0) is None
    assert entry.phase is Phase.WRITTEN


def test_room_is_bounded_by_the_window_and_the_capacity() -> None:
    ledger = Ledger(window=2, capacity=3)
    for m in ("a", "b"):
        ledger.add(m, frame(m))
    assert not ledger.room()  # two owed: the window is full
    write_all(ledger)
    ledger.receipt(receipt("a", Status.PENDING_ACK))
    assert ledger.room()  # a is accepted: one owed, two tracked
    ledger.add("c", frame("c"))
    ledger.receipt(receipt("b", Status.PENDING_ACK))
    assert not ledger.room()  # one owed, but three tracked: the capacity is full
    ledger.receipt(receipt("a", Status.ACKNOWLEDGED))
    assert ledger.room()


def test_a_msgid_already_tracked_is_refused() -> None:
    ledger = Ledger()
    ledger.add("a", frame("a"))
    with pytest.raises(ValueError, match="already being sent"):
        ledger.add("a", frame("a"))


def test_receipts_kept_per_message_are_bounded_but_the_final_one_is_always_kept() -> None:
    ledger = Ledger()
    entry: Entry = ledger.add("a", frame("a"))
    write_all(ledger)
    for _ in range(MAX_RECEIPTS_PER_ENTRY + 5):
        ledger.receipt(receipt("a", Status.PENDING_ACK))
    assert len(entry.receipts) == MAX_RECEIPTS_PER_ENTRY
    ledger.receipt(receipt("a", Status.ACKNOWLEDGED))
    assert len(entry.receipts) == MAX_RECEIPTS_PER_ENTRY + 1
    assert entry.final is not None
