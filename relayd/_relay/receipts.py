"""The sender's side: receipts, the dedupe memory, and key changes owed to correspondents.

:class:`Receipts` tells a message's sender what became of it (rule 4 of the core's module
docstring): at once if the sender is online and its socket has room, otherwise as a receipt
owed in the store, loaded page by page when the sender connects or its socket drains. It
remembers, per ``(sender, msgid)`` within the dedupe window, the last status told (so a
message sent again is answered as a duplicate), and counts what each sender has sent that
awaits its first receipt (which bounds reading from it: see :meth:`Receipts.may_read`). Key
changes (rule 7) travel the same way: pushed when there is room, owed in the store otherwise.

Read receipts (rule 9) too, owed apart from the final status: a delivery's row says which of
the two its sender is still owed, and each is marked told on its own once its frame is
written, so neither can clear the other. A receipt on its way to a socket is still owed in the
store until then: a page loaded meanwhile skips it (:attr:`Receipts._telling`), so that it is
told once.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, OrderedDict
from collections.abc import Iterable
from typing import Any

import attrs

from . import frames as F
from .context import Context
from .effects import Announce, Answer, insert_op
from .model import Message, Phase, ReadRef, ReceiptRef, Ref, Session
from .records import (
    FINAL,
    ClearKeyNotice,
    ClearReadPending,
    Duplicate,
    Finish,
    KeyNotice,
    LoadKeyNotices,
    LoadReceipts,
    RecentMessage,
    Refused,
    SetReceiptPending,
    Status,
    StoredReceipt,
)
from .sessions import Sessions


class Receipts:
    """``cluster``: other nodes share the store, so a receipt stored for a sender that is not
    here is announced (see :class:`Announce`)."""

    def __init__(
        self,
        ctx: Context,
        sessions: Sessions,
        *,
        recent: Iterable[RecentMessage],
        cluster: bool,
    ) -> None:
        self.ctx = ctx
        self.sessions = sessions
        self._cluster = cluster
        # (sender, msgid) -> (accepted at, the last status its sender was told; None: none yet)
        self._recent: OrderedDict[tuple[str, str], tuple[float, Status | None]] = OrderedDict()
        for known in recent:
            self._recent[(known.sender, known.msgid)] = (
                known.accepted_at,
                known.status or Status.QUEUED,
            )
        # Messages accepted from each client whose first receipt is not sent yet, and their
        # bytes.
        self._awaiting: Counter[str] = Counter()
        self._awaiting_bytes: Counter[str] = Counter()
        # Stored receipts handed to a socket whose row says they are owed until their frame is
        # written and that write committed: (seq, True for a read receipt). A page of owed
        # receipts loaded meanwhile skips them. At most the frames on the sockets, and one
        # commit's worth.
        self._telling: set[tuple[int, bool]] = set()
        # Final receipts of messages never stored (delivered straight from memory) on their
        # way to the sender's socket, by (recipient, msgid) and sender: their row is written
        # once the frame is. A read of one stores it first (see store_for_read).
        self._unstored: dict[tuple[str, str], dict[str, ReceiptRef]] = {}
        self._flushed: set[int] = set()  # of those, the seqs stored early for a read
        # Submissions without a session (RelayCore.submit) whose submitter waits for the first
        # answer: ticket -> its message, once accepted (None before).
        self._tickets: dict[int, Message | None] = {}
        self._ticket_ids = itertools.count(1)

    # --- the dedupe memory and what senders await ------------------------------------------

    def remember(self, message: Message, now: float) -> None:
        """``message`` was accepted: keep its id for deduplication, within the window and the
        entry bound, and count it as awaiting its first receipt."""
        self._awaiting[message.sender] += 1
        self._awaiting_bytes[message.sender] += message.size
        recent = self._recent
        recent[message.key] = (now, None)
        relay = self.ctx.relay
        horizon = now - relay.dedupe_window
        while recent and (
            len(recent) > relay.dedupe_max_entries or next(iter(recent.values()))[0] < horizon
        ):
            recent.popitem(last=False)

    def remembered(self, sender: str, msgid: str) -> tuple[float, Status | None] | None:
        """(accepted at, the last status told) of a message in the dedupe memory, if it is."""
        return self._recent.get((sender, msgid))

    def recent_status(self, sender: str, msgid: str) -> tuple[float, str | None] | None:
        """See :meth:`RelayCore.recent_status`."""
        known = self._recent.get((sender, msgid))
        if known is None:
            return None
        return known[0], None if known[1] is None else known[1].value

    def _told_first(self, message: Message) -> None:
        """The sender got its first answer about ``message`` (a receipt or an error)."""
        count = self._awaiting[message.sender] - 1
        if count > 0:
            self._awaiting[message.sender] = count
            self._awaiting_bytes[message.sender] -= message.size
        else:
            del self._awaiting[message.sender]
            del self._awaiting_bytes[message.sender]

    def may_read(self, client: str) -> bool:
        """Whether fewer than a quarter of an outbound buffer's worth of ``client``'s messages
        (and fewer than ``read_ahead_bytes`` of them) await their first receipt."""
        ws = self.ctx.ws
        return self._awaiting.get(client, 0) < max(1, ws.outbound_buffer // 4) and (
            self._awaiting_bytes.get(client, 0) < ws.read_ahead_bytes
        )

    def dedupe_entries(self) -> int:
        return len(self._recent)

    def awaiting_bytes(self) -> int:
        return sum(self._awaiting_bytes.values())

    # --- submissions without a session ---------------------------------------------------

    def open_ticket(self) -> int:
        """A ticket for a submission whose submitter waits for its first answer."""
        ticket = next(self._ticket_ids)
        self._tickets[ticket] = None
        return ticket

    @property
    def tickets(self) -> int:
        """Submitters waiting for a first answer."""
        return len(self._tickets)

    def bind(self, ticket: int, message: Message) -> None:
        """``message`` was accepted for ``ticket``: its first answer goes there."""
        message.ticket = ticket
        self._tickets[ticket] = message

    def abandon(self, ticket: int) -> None:
        """The submitter of ``ticket`` stopped waiting (its deadline, or it went away): what
        its message is told from now on goes where a socket's would (its sender's live
        session, or owed in the store), as updates."""
        message = self._tickets.pop(ticket, None)
        if message is not None and message.ticket == ticket:
            message.ticket = None
            message.answered = True

    def answer(
        self,
        ticket: int,
        msgid: str,
        recipient: str,
        status: str,
        now: float,
        *,
        reason: str = "",
        duplicate: bool = False,
    ) -> None:
        """Answer ``ticket`` with a receipt (``status``: a Status value, or ``accepted``)."""
        if duplicate:
            self.ctx.metrics.events["duplicate"] += 1
        receipt = F.receipt_doc(
            "", msgid, recipient, status, now, reason=reason, duplicate=duplicate
        )
        self._tickets.pop(ticket, None)
        self.ctx.actions.append(Answer(ticket, receipt=receipt))

    def refuse(
        self, ticket: int, code: str, text: str, details: dict[str, Any] | None = None
    ) -> None:
        """Answer ``ticket`` with a refusal: the error a socket would have been sent."""
        self.ctx.metrics.events[f"error:{code}"] += 1
        self._tickets.pop(ticket, None)
        self.ctx.actions.append(Answer(ticket, error=code, message=text, details=details))

    def _tell_ticket(self, message: Message, status: Status, now: float, reason: str) -> None:
        """The first receipt of a submitted message goes to its waiting submitter. A final
        one is told by that answer: it is recorded as told, not owed."""
        assert message.ticket is not None
        ticket, message.ticket = message.ticket, None
        if status in FINAL:
            if message.committed:
                self.ctx.actions.append(Finish(message.seq, status, now, False, reason))
            else:  # delivered straight from memory: its row is written now, as told
                self.ctx.actions.append(
                    insert_op(message, status=status, receipt_pending=False, reason=reason)
                )
        self.answer(ticket, message.msgid, message.recipient, status.value, now, reason=reason)

    # --- telling ---------------------------------------------------------------------------

    @property
    def page(self) -> int:
        """Owed receipts and key changes are loaded a quarter of an outbound buffer at a time."""
        return max(1, self.ctx.ws.outbound_buffer // 4)

    @property
    def _room(self) -> int:
        """Final receipts are sent while fewer frames than this wait on the socket."""
        return max(1, self.ctx.ws.outbound_buffer * 3 // 4)

    def tell(self, message: Message, status: Status, now: float, *, reason: str = "") -> None:
        """Tell the sender ``status``. A final status is stored if the sender is offline.
        A topic's delivery only has its final status recorded: its publisher is told counts
        (relayd/_relay/topics.py), never a receipt per subscriber."""
        if message.topic is not None:
            message.status = status
            if status in FINAL:
                self.ctx.actions.append(
                    Finish(
                        message.seq,
                        status,
                        now,
                        False,
                        reason,
                        delivered_at=message.delivered_at,
                        keep_content=self.ctx.retention > 0,
                    )
                )
            return
        first = message.status is None
        message.status = status
        if first:
            self._told_first(message)
        known = self._recent.get(message.key)
        if known is not None:
            self._recent[message.key] = (known[0], status)
        if first and message.ticket is not None:
            self._tell_ticket(message, status, now, reason)
            return
        sender = self.sessions.teller(message.sender)
        online = sender is not None
        ref: ReceiptRef | None = None
        if status in FINAL:
            # The receipt is owed until its frame is written (see ReceiptRef).
            if message.committed:
                self.ctx.actions.append(
                    Finish(
                        message.seq,
                        status,
                        now,
                        True,
                        reason,
                        delivered_at=message.delivered_at,
                        keep_content=self.ctx.retention > 0,
                    )
                )
                ref = ReceiptRef(message.seq)
            else:
                owed = insert_op(
                    message,
                    status=status,
                    receipt_pending=True,
                    reason=reason,
                    keep_content=self.ctx.retention > 0,
                )
                if not online:
                    self.ctx.actions.append(owed)
                ref = ReceiptRef(message.seq, owed)
            if not online and self._cluster:
                self.ctx.actions.append(Announce("receipts", message.sender, message.seq))
        if online and sender is not None and not (sender.lean and status is Status.PENDING_ACK):
            self.send_receipt(
                sender,
                message.msgid,
                message.recipient,
                status,
                now,
                first=first and not message.answered,
                reason=reason,
                ref=ref,
            )

    def send_receipt(
        self,
        session: Session,
        msgid: str,
        recipient: str,
        status: Status | None,
        now: float,
        *,
        first: bool,
        reason: str = "",
        duplicate: bool = False,
        ref: Ref | None = None,
    ) -> None:
        """Send a receipt frame (``first``: the message's first; ``status`` ``None``:
        accepted), or keep a final one owed if the socket is crowded."""
        if duplicate:
            self.ctx.metrics.events["duplicate"] += 1
        value = status.value if status is not None else "accepted"
        frame = F.receipt_frame(
            msgid, recipient, value, now, first=first, reason=reason, duplicate=duplicate
        )
        self._send(session, frame, ref)

    def send_read(
        self, session: Session, seq: int, msgid: str, recipient: str, read_at: float, now: float
    ) -> None:
        """Send a read receipt frame, or keep it owed if the socket is crowded."""
        self._send(session, F.read_frame(msgid, recipient, read_at, now), ReadRef(seq))

    def _send(self, session: Session, frame: str, ref: Ref | None) -> None:
        if isinstance(ref, ReceiptRef | ReadRef) and session.queued >= self._room:
            # A burst of receipts (a group commit, a sweep) would crowd the socket: the rest
            # stay owed in the store and are loaded as it drains.
            if isinstance(ref, ReceiptRef):
                self.sessions.owe(ref)
            session.receipts_more = True
            session.receipt_cursor = min(session.receipt_cursor, ref.seq - 1)
            return
        if session.phase is not Phase.CLOSING and session.queued < self.ctx.ws.outbound_buffer:
            self._track(ref)  # it will be queued (else Sessions.send keeps it owed)
        self.sessions.send(session, frame, ref)

    def _track(self, ref: Ref | None) -> None:
        if isinstance(ref, ReadRef):
            self._telling.add((ref.seq, True))
        elif isinstance(ref, ReceiptRef) and ref.owed is None:
            self._telling.add((ref.seq, False))
        elif isinstance(ref, ReceiptRef) and ref.owed is not None:
            key = (ref.owed.recipient, ref.owed.msgid)
            self._unstored.setdefault(key, {})[ref.owed.sender] = ref

    def _untrack(self, ref: ReceiptRef | ReadRef) -> None:
        if isinstance(ref, ReadRef):
            self._telling.discard((ref.seq, True))
            return
        self._telling.discard((ref.seq, False))
        if ref.owed is not None:
            key = (ref.owed.recipient, ref.owed.msgid)
            pending = self._unstored.get(key)
            if pending is not None and pending.get(ref.owed.sender) is ref:
                del pending[ref.owed.sender]
                if not pending:
                    del self._unstored[key]

    def store_for_read(self, reader: str, msgid: str, sender: str | None) -> None:
        """``reader`` read ``msgid`` (from ``sender``): a final receipt of it on its way to its
        sender, for a message never stored, is stored now (as owed), so that the read finds
        its row. When its frame is written it is marked told (see :meth:`written`)."""
        pending = self._unstored.get((reader, msgid))
        if pending is None:
            return
        for from_, ref in list(pending.items()):
            if (sender is None or from_ == sender) and ref.owed is not None:
                self.ctx.actions.append(ref.owed)
                self._flushed.add(ref.seq)
                self._telling.add((ref.seq, False))
                del pending[from_]
        if not pending:
            del self._unstored[(reader, msgid)]

    def untold(self, ref: ReceiptRef | ReadRef) -> None:
        """A receipt's frame was not (surely) written: it stays owed (see
        :meth:`Sessions.owe`), and a page loaded from now on may tell it."""
        self._untrack(ref)
        if isinstance(ref, ReceiptRef):
            self._flushed.discard(ref.seq)
            self.sessions.owe(ref)

    def cleared(self, op: SetReceiptPending | ClearReadPending) -> None:
        """Receipts marked told are committed: a load from now on does not find them."""
        if isinstance(op, ClearReadPending):
            for seq in op.seqs:
                self._telling.discard((seq, True))
        elif not op.pending:
            for seq in op.seqs:
                self._telling.discard((seq, False))

    def tell_read(
        self, sender: str, seq: int, msgid: str, recipient: str, read_at: float, now: float
    ) -> None:
        """``recipient`` read ``msgid``, and ``sender`` is owed the read receipt (stored):
        told now if it is here and its socket has room; announced if it may be on another
        node; else loaded when it connects."""
        session = self.sessions.active.get(sender)
        if session is not None and session.phase is Phase.ACTIVE and session.receipts is not None:
            # A page of owed receipts is being loaded: it may hold this delivery's final
            # status, which the read must not overtake. Loaded with it, or right after it.
            self.owed(sender, seq)
        elif session is not None and session.phase is Phase.ACTIVE:
            self.send_read(session, seq, msgid, recipient, read_at, now)
        elif self._cluster:
            self.ctx.actions.append(Announce("receipts", sender, seq))

    def refused(self, message: Message, outcome: object, now: float) -> None:
        """The store refused ``message``, whose sender was told nothing yet: say why (a
        duplicate is answered with the status its sender was told the first time)."""
        self._told_first(message)
        ticket, message.ticket = message.ticket, None
        sender = self.sessions.teller(message.sender)
        if isinstance(outcome, Duplicate):
            self._recent[message.key] = (now, outcome.status or Status.QUEUED)
            if ticket is not None:
                status = outcome.status or Status.QUEUED
                self.answer(
                    ticket, message.msgid, message.recipient, status.value, now, duplicate=True
                )
            elif sender is not None:
                self.send_receipt(
                    sender,
                    message.msgid,
                    message.recipient,
                    outcome.status or Status.QUEUED,
                    now,
                    first=True,
                    duplicate=True,
                )
            return
        self._recent.pop(message.key, None)
        if not isinstance(outcome, Refused):
            return
        text = (
            "no such recipient"
            if outcome.code == F.UNKNOWN_RECIPIENT
            else "the recipient's queue is full"
        )
        details = {"msgid": message.msgid, "to": message.recipient}
        if ticket is not None:
            self.refuse(ticket, outcome.code, text, details)
        elif sender is not None:
            self.sessions.error(sender, outcome.code, text, now, details)

    # --- owed receipts ---------------------------------------------------------------------

    def connected(self, session: Session) -> None:
        """``session`` became its client's active one: load what the store owes it."""
        self.load(session)
        self.load_key_notices(session)

    def load(self, session: Session) -> None:
        """Load the next page of receipts owed to the session's client: a page fits in a
        quarter of its outbound buffer, and the next is loaded once that has drained."""
        assert session.client is not None
        op = LoadReceipts(session.client, session.receipt_cursor, self.page)
        session.receipts = op
        session.receipts_more = False
        self.ctx.actions.append(op)

    def loaded(self, op: LoadReceipts, rows: list[StoredReceipt], now: float) -> None:
        session = self.sessions.active.get(op.sender)
        if session is None or session.receipts is not op:
            return  # the client left, or came back, since
        session.receipts = None
        if session.phase is not Phase.ACTIVE:
            return
        session.receipts_more = len(rows) == op.limit
        for row in rows:
            session.receipt_cursor = max(session.receipt_cursor, row.seq)
            # The final status first: a read receipt never overtakes it.
            if row.final and row.status is not None and (row.seq, False) not in self._telling:
                self.send_receipt(
                    session,
                    row.msgid,
                    row.recipient,
                    row.status,
                    now,
                    first=False,
                    reason=row.reason,
                    ref=ReceiptRef(row.seq),
                )
            if row.read_at is not None and (row.seq, True) not in self._telling:
                self.send_read(session, row.seq, row.msgid, row.recipient, row.read_at, now)
        if session.receipt_rewind < math.inf:
            # Hinted while this load was under way: look again from below the hint.
            session.receipt_cursor = int(min(session.receipt_cursor, session.receipt_rewind))
            session.receipt_rewind = math.inf
            if session.queued <= self.page:
                self.load(session)
            else:
                session.receipts_more = True  # loaded once the socket drains (see drained)

    def owed(self, client: str, seq: int) -> None:
        """See :meth:`RelayCore.receipts_owed`."""
        session = self.sessions.teller(client)
        if session is None:
            return
        if session.receipts is None:
            session.receipt_cursor = min(session.receipt_cursor, seq - 1)
            self.load(session)
        else:
            session.receipt_rewind = min(session.receipt_rewind, seq - 1)

    def written(self, ref: ReceiptRef, told: list[int]) -> None:
        """A receipt frame was written: a stored receipt's seq joins ``told`` (marked told in
        one write for all); a receipt never stored is, as told."""
        if ref.owed is not None:
            self._untrack(ref)
        if ref.owed is None or ref.seq in self._flushed:
            self._flushed.discard(ref.seq)
            told.append(ref.seq)
        else:  # keep a trace, for deduplication across a restart
            self.ctx.actions.append(attrs.evolve(ref.owed, receipt_pending=False))

    def announce_owed(self, client: str, refs: Iterable[Ref]) -> None:
        """Cluster mode: ``refs`` of a closed session of ``client`` were not (surely) written;
        the receipts among them stored only now, and the read receipts, are announced."""
        owed = [
            r.seq for r in refs if (isinstance(r, ReceiptRef) and r.owed) or isinstance(r, ReadRef)
        ]
        if owed and self._cluster:
            # Stored only now (or, a read receipt, since that session loaded its receipts):
            # the client's session on another node may have loaded them already.
            self.ctx.actions.append(Announce("receipts", client, min(owed)))

    def drained(self, session: Session) -> None:
        """Frames of ``session`` were written: load more of what it is owed if it has room."""
        if session.phase is not Phase.ACTIVE or session.queued > self.page:
            return
        if session.receipts_more and session.receipts is None:
            self.load(session)
        if session.notices_more and session.notices is None and session.notices_out == 0:
            self.load_key_notices(session)

    # --- key changes -----------------------------------------------------------------------

    def key_changed(self, notices: Iterable[KeyNotice], now: float) -> None:
        """See :meth:`RelayCore.key_changed`."""
        for notice in notices:
            session = self.sessions.teller(notice.reader)
            if session is not None:
                self._send_key_notice(session, notice, now)

    def _send_key_notice(self, session: Session, notice: KeyNotice, now: float) -> None:
        if session.queued >= self._room:
            # A burst of key changes would crowd the socket: the rest stay owed in the store
            # and are loaded as it drains.
            session.notices_more = True
            return
        session.notices_out += 1
        frame = F.key_changed_frame(
            notice.client,
            notice.algorithm,
            notice.fingerprint,
            notice.previous,
            changed_at=notice.changed_at,
            now=now,
        )
        self.sessions.send(session, frame, notice)

    def load_key_notices(self, session: Session) -> None:
        """Load the next page of key changes owed to the session's client (a page fits in a
        quarter of its outbound buffer; the next is loaded once they are written)."""
        assert session.client is not None
        op = LoadKeyNotices(session.client, self.page)
        session.notices = op
        session.notices_more = False
        self.ctx.actions.append(op)

    def key_notices_loaded(self, op: LoadKeyNotices, rows: list[KeyNotice], now: float) -> None:
        session = self.sessions.active.get(op.reader)
        if session is None or session.notices is not op:
            return  # the client left, or came back, since
        session.notices = None
        if session.phase is not Phase.ACTIVE:
            return
        session.notices_more = len(rows) == op.limit
        for notice in rows:
            self._send_key_notice(session, notice, now)

    def notice_written(self, session: Session, notice: KeyNotice) -> None:
        """A key change's frame was written: it is owed no more."""
        session.notices_out -= 1
        self.ctx.actions.append(ClearKeyNotice(notice))
