"""The sender's ledger: which messages are owed to relayd, and what became of each.

A pure state machine (no I/O, no clock: callers pass ``now``). Each message the application
sends is an :class:`Entry` that moves through :class:`Phase`:

    QUEUED --write--> WRITTEN --non-final receipt--> ACCEPTED --final receipt--> FINAL
       ^                 |  \\------------------- final receipt -------------------^
       |                 |   \\-- refused (unknown_recipient, queue_full) --------^
       +-- session ends -+
       +-- rate_limited -+   (and sending pauses for ``retry_after``; so for store_unavailable)

Rules:

1. A message is owed until relayd has answered it (a receipt, or an error frame naming its
   msgid). When a session ends, every WRITTEN message goes back to QUEUED and is written again,
   in send order, on the next session with the **same msgid**: relayd deduplicates by
   ``(from, msgid)`` and answers a message it already had with ``duplicate: true``.
2. An ACCEPTED message is stored by relayd; its final receipt comes on whichever session is
   live when it is decided (relayd keeps owed receipts for an offline sender), so it is never
   written again.
3. Bounded: at most ``window`` messages are QUEUED or WRITTEN (relayd reads a client only while
   few of its messages await their first receipt, so more would only wait in the socket), and
   at most ``capacity`` are tracked in all. :meth:`room` says whether another may be added;
   the client makes ``send()`` wait for room (with a deadline) rather than drop anything.
4. Receipts for msgids the ledger does not hold (owed from an earlier run, or repeated after
   a reconnect: receipts are sent at least once) change nothing and are reported as such.
"""

from __future__ import annotations

import enum
from typing import Any

from attrs import define, field

from ._frames import ErrorFrame, Receipt, Status

# relayd's error codes that refuse a message for good.
_REFUSALS = frozenset({"unknown_recipient", "queue_full"})
# relayd's error codes that refuse a message for now: nothing was stored, send it again after
# ``details.retry_after`` seconds (docs/protocol.md).
_NOT_NOW = frozenset({"rate_limited", "store_unavailable"})


class Phase(enum.Enum):
    QUEUED = "queued"  # to be written on the current (or next) session
    WRITTEN = "written"  # written; relayd has not answered yet
    ACCEPTED = "accepted"  # relayd stored it; awaiting the final receipt
    FINAL = "final"


@define(eq=False)
class Entry:
    msgid: str
    frame: dict[str, Any] = field(repr=False)
    seq: int
    phase: Phase = Phase.QUEUED
    receipts: list[Receipt] = field(factory=list)
    writes: int = 0

    @property
    def final(self) -> Receipt | None:
        last = self.receipts[-1] if self.receipts else None
        return last if last is not None and last.final else None


# A handle keeps at most this many receipts: relayd sends each status once per session, and a
# re-sent duplicate or a repeated receipt adds one; past it, repeats are not kept.
MAX_RECEIPTS_PER_ENTRY = 16


@define
class Ledger:
    window: int = 256
    capacity: int = 10_000
    _owed: dict[str, Entry] = field(factory=dict, init=False)  # QUEUED or WRITTEN, by seq
    _accepted: dict[str, Entry] = field(factory=dict, init=False)
    _seq: int = field(default=0, init=False)
    paused_until: float = field(default=0.0, init=False)

    def room(self) -> bool:
        return len(self._owed) < self.window and len(self) < self.capacity

    def __len__(self) -> int:
        return len(self._owed) + len(self._accepted)

    def __contains__(self, msgid: str) -> bool:
        return msgid in self._owed or msgid in self._accepted

    def add(self, msgid: str, frame: dict[str, Any]) -> Entry:
        """Track a new message, QUEUED. The caller checked :meth:`room`.

        Raises:
            ValueError: ``msgid`` is already being tracked.
        """
        if msgid in self:
            raise ValueError(f"msgid {msgid!r} is already being sent")
        self._seq += 1
        entry = Entry(msgid, frame, self._seq)
        self._owed[msgid] = entry
        return entry

    def next_to_write(self, now: float) -> Entry | None:
        """The oldest QUEUED message, unless sending is paused (rate limited) at ``now``."""
        if now < self.paused_until:
            return None
        for entry in self._owed.values():
            if entry.phase is Phase.QUEUED:
                return entry
        return None

    def has_queued(self) -> bool:
        return any(entry.phase is Phase.QUEUED for entry in self._owed.values())

    def written(self, entry: Entry) -> None:
        if entry.phase is Phase.QUEUED:
            entry.phase = Phase.WRITTEN
            entry.writes += 1

    def receipt(self, receipt: Receipt) -> Entry | None:
        """Apply a receipt; return the entry it moved, or None if it is not ours (or the
        entry is already final)."""
        entry = self._owed.pop(receipt.msgid, None) or self._accepted.pop(receipt.msgid, None)
        if entry is None:
            return None
        self._record(entry, receipt)
        if receipt.final:
            entry.phase = Phase.FINAL
        else:
            entry.phase = Phase.ACCEPTED
            self._accepted[entry.msgid] = entry
        return entry

    def refused(self, error: ErrorFrame, now: float) -> Entry | None:
        """Apply an error frame that names one of our msgids: refused for now (rate limited,
        the store unavailable), it goes back to the queue and sending pauses; refused for good,
        it becomes FINAL (REJECTED)."""
        msgid = error.msgid
        entry = self._owed.get(msgid) if msgid is not None else None
        if entry is None:
            return None
        if error.code in _NOT_NOW:
            retry = error.details.get("retry_after")
            wait = float(retry) if isinstance(retry, int | float) and retry > 0 else 1.0
            self.paused_until = max(self.paused_until, now + wait)
            entry.phase = Phase.QUEUED
            return entry
        if error.code in _REFUSALS:
            del self._owed[entry.msgid]
            to = error.details.get("to")
            rejected = Receipt(
                msgid=entry.msgid,
                status=Status.REJECTED,
                to=to if isinstance(to, str) else "",
                reason=error.code,
                kind="error",
            )
            self._record(entry, rejected)
            entry.phase = Phase.FINAL
            return entry
        return None

    def session_ended(self) -> None:
        """Everything written but not answered is owed again, in send order."""
        for entry in self._owed.values():
            entry.phase = Phase.QUEUED

    def pending(self) -> list[Entry]:
        """Every tracked entry (owed, then accepted), for closing the client."""
        return [*self._owed.values(), *self._accepted.values()]

    def _record(self, entry: Entry, receipt: Receipt) -> None:
        if len(entry.receipts) < MAX_RECEIPTS_PER_ENTRY or receipt.final:
            entry.receipts.append(receipt)
