"""The recipient's side of read receipts: a ``read`` frame (or ``POST /messages/{msgid}/read``)
becomes a :class:`MarkRead` in the store, and its answer goes back to the reader and, as a read
receipt, to the sender (rule 9 of the core's module docstring).

The store decides what a read finds (the delivery is the reader's, was written to it, was read
before, or the reader keeps its reads private: see :class:`MarkRead`): it holds the truth for
every node. A reader's frames whose store operations are under way are counted, and reading it
pauses past a quarter of its outbound buffer (see :meth:`RelayCore.readable`), so their answers
always fit in its socket; each counts against the client's message rate too.
"""

from __future__ import annotations

from typing import Any

from relayd._ratelimit import RateLimiter

from . import frames as F
from .context import Context
from .delivery import Delivery
from .model import Phase, Session
from .receipts import Receipts
from .records import MarkRead, ReadCode, ReadOutcome
from .sessions import Sessions

_REFUSALS = {
    ReadCode.UNKNOWN_MESSAGE: "no message with this msgid was sent to you",
    ReadCode.NOT_YOURS: "this message was not sent to you: only its recipient may mark it read",
    ReadCode.NOT_DELIVERED: "this message was not delivered to you yet",
}


def refusal(code: ReadCode) -> str:
    """What a refused read's error says (``code`` neither ``read`` nor ``already_read``)."""
    return _REFUSALS[code]


class Reads:
    """``limiter``: the per-client message rate, which read frames count against."""

    def __init__(
        self,
        ctx: Context,
        sessions: Sessions,
        receipts: Receipts,
        delivery: Delivery,
        limiter: RateLimiter,
    ) -> None:
        self.ctx = ctx
        self.sessions = sessions
        self.receipts = receipts
        self.delivery = delivery
        self._limiter = limiter

    def frame(self, session: Session, doc: dict[str, Any], now: float) -> None:
        """A ``read`` frame from ``session``'s client.

        Raises:
            ProtocolError: a bad field; over the message rate.
        """
        assert session.client is not None
        msgid, sender = F.parse_read(doc)
        wait = self._limiter.acquire(session.client, now)
        if wait > 0:
            raise F.RateLimited(wait, msgid=msgid)
        session.reads += 1
        self.request(session.sid, session.client, msgid, sender, now)

    def request(self, ref: Any, reader: str, msgid: str, sender: str | None, now: float) -> None:
        """Mark ``reader``'s delivery of ``msgid`` (from ``sender``) read; ``ref`` (a session
        id, or the REST route's waiter) comes back with the answer."""
        self.receipts.store_for_read(reader, msgid, sender)
        self.delivery.record_written(reader, msgid, sender)
        self.ctx.actions.append(MarkRead(ref, reader, msgid, sender, now))

    def done(self, op: MarkRead, outcome: ReadOutcome, now: float) -> None:
        """The store answered ``op``: its reader is answered (on its socket, if it came from
        one), and its sender told, if it is owed the read receipt."""
        self.ctx.metrics.events[f"read:{outcome.code.value}"] += 1
        if isinstance(op.ref, int):
            self._answer(op, outcome, now)
        if outcome.owed and outcome.read_at is not None:
            self.receipts.tell_read(
                outcome.sender, outcome.seq, op.msgid, op.reader, outcome.read_at, now
            )

    def _answer(self, op: MarkRead, outcome: ReadOutcome, now: float) -> None:
        session = self.sessions.by_sid.get(op.ref)
        if session is None:
            return
        session.reads -= 1
        if session.phase is not Phase.ACTIVE:
            return
        if outcome.code in (ReadCode.READ, ReadCode.ALREADY_READ):
            assert outcome.read_at is not None
            frame = F.read_received_frame(
                op.msgid, outcome.sender, outcome.code.value, outcome.read_at, now
            )
            self.sessions.send(session, frame)
            return
        # An honest client meets each of these (a stale msgid, a race with the delivery):
        # not a refused frame, no strike.
        details = {"field": "msgid", "msgid": op.msgid}
        if op.sender is not None:
            details["from"] = op.sender
        self.sessions.error(session, outcome.code.value, refusal(outcome.code), now, details)
