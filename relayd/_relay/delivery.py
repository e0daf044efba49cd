"""Delivery: accepted messages routed to their recipients, acknowledged, redelivered, expired.

:class:`Delivery` owns every message in memory and each connected client's
:class:`~relayd._relay.model.Recipient` (its mailbox, unacked window and store cursor). It
accepts a message (seq, staging), routes it once it may go (rules 2-4 of the core's module
docstring), pumps mailboxes into sockets within the window and buffer bounds, loads queues from
the store, turns written frames into unacked or delivered messages, times acks out, backs off
before a redelivery, sweeps expired messages, and parks what a departing client leaves behind.
Each outcome is told to the sender through :class:`~relayd._relay.receipts.Receipts`; every
frame goes out through :class:`~relayd._relay.sessions.Sessions`.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable
from typing import Any

from relayd._ratelimit import RateLimiter

from . import frames as F
from .context import Context, TimerKind
from .effects import Announce, ReserveSeqs, insert_op
from .frames import CloseCode, ProtocolError
from .model import Message, Phase, Recipient, Session, Where, move
from .receipts import Receipts
from .records import (
    FindExpired,
    Inserted,
    LoadQueue,
    Purge,
    QueuePage,
    Refused,
    SetAttempts,
    Status,
    StoredMessage,
)
from .seqs import SeqPool
from .sessions import Sessions

# Expired messages read per store query; a full page asks for the next at once.
SWEEP_PAGE = 1000
# Topic messages whose content is shared by the subscribers here that load them (see _shared).
SHARED_FIELDS = 256


class Delivery:
    """Messages in memory and the recipients they wait for. ``seqs``: where message seqs come
    from; ``limiter``: the per-client message rate; ``may_message(sender, recipient)``: whether
    the roles allow it (``None``: anyone may message anyone); ``cluster``: other nodes share
    the store, so a message stored for a client that is not here is announced."""

    def __init__(
        self,
        ctx: Context,
        sessions: Sessions,
        receipts: Receipts,
        *,
        seqs: SeqPool,
        limiter: RateLimiter,
        may_message: Callable[[str, str], bool] | None,
        cluster: bool,
    ) -> None:
        self.ctx = ctx
        self.sessions = sessions
        self.receipts = receipts
        self._seqs = seqs
        self._limiter = limiter
        self._may_message = may_message
        self._cluster = cluster
        self.recipients: dict[str, Recipient] = {}
        self.staging: dict[str, deque[Message]] = {}
        self._by_seq: dict[int, Message] = {}
        self.pending_commit = 0
        self.store_down = False  # the store failed its last batch: refuse new messages
        self._reads_in_flight = 0
        self._finished_while_reading: set[int] = set()
        # Attempt counts written to the store and not committed yet, by seq.
        self._counts_written: dict[int, int] = {}
        self._shared_fields: dict[tuple[str, str], str] = {}  # oldest first (see _shared)
        self._shared_frames: dict[tuple[str, str], str] = {}  # first attempts' (see _frame)

    # --- frames in -------------------------------------------------------------------------

    def accept(self, session: Session, doc: dict[str, Any], now: float) -> None:
        """A message frame from ``session``'s client: accept it, stage it, route what may go.

        Raises:
            ProtocolError: the frame is refused (its error frame says why).
        """
        assert session.client is not None
        self._accept(session.client, doc, now, session=session)

    def submit(self, sender: str, doc: dict[str, Any], now: float, ticket: int) -> tuple[str, str]:
        """A message from ``sender`` without a session (see :meth:`RelayCore.submit`), whose
        first answer goes to ``ticket``; its msgid and recipient. The rate was taken already.

        Raises:
            ProtocolError: the message is refused (nothing is answered on ``ticket``).
        """
        return self._accept(sender, doc, now, ticket=ticket)

    def _accept(
        self,
        sender: str,
        doc: dict[str, Any],
        now: float,
        *,
        session: Session | None = None,
        ticket: int | None = None,
    ) -> tuple[str, str]:
        """Accept a message from ``sender``, stage it, route what may go; its msgid and
        recipient. Its first answer goes to ``session``, or (submitted without one) to
        ``ticket``: the one acceptance, dedupe and receipt path for both (issue 14)."""
        envelope = F.parse_envelope(doc)
        if envelope.sender is not None and envelope.sender != sender:
            raise ProtocolError(
                F.MESSAGE_SENDER_MISMATCH, "from: is not the authenticated client", field="from"
            )
        if self._may_message is not None and not self._may_message(sender, envelope.to):
            raise ProtocolError(
                F.NOT_PERMITTED,
                "your roles do not allow messaging this client",
                field="to",
                details={"to": envelope.to, "msgid": envelope.msgid},
            )
        if session is not None:
            wait = self._limiter.acquire(sender, now)
            if wait > 0:
                raise F.RateLimited(wait, msgid=envelope.msgid, to=envelope.to)
        msgid = envelope.msgid or F.new_msgid()
        known = self.receipts.remembered(sender, msgid)
        if known is not None:
            if ticket is not None:
                told = known[1].value if known[1] is not None else "accepted"
                self.receipts.answer(ticket, msgid, envelope.to, told, now, duplicate=True)
            else:
                assert session is not None
                self.receipts.send_receipt(
                    session, msgid, envelope.to, known[1], now, first=True, duplicate=True
                )
            return msgid, envelope.to
        seq = None if self.store_down else self._seqs.take()
        self.reserve_seqs()
        if seq is None:
            raise ProtocolError(
                F.STORE_UNAVAILABLE,
                "the store cannot take messages now; send again later",
                details={"msgid": msgid, "to": envelope.to, "retry_after": 1.0},
                strike=False,
            )
        relay = self.ctx.relay
        ttl = min(envelope.ttl or relay.default_ttl, relay.max_ttl)
        recipient = self.recipients.get(envelope.to)
        waiting = len(self.staging.get(envelope.to, ()))
        has_room = (
            recipient is not None
            and recipient.session.phase is Phase.ACTIVE
            and self._has_room(recipient, waiting)
        )
        direct = has_room and not envelope.acknowledge
        message = Message(
            sender=sender,
            recipient=envelope.to,
            msgid=msgid,
            high=envelope.priority == "high",
            acknowledge=envelope.acknowledge,
            fields=F.encode(envelope.fields(sender, msgid, now)),
            accepted_at=now,
            expires_at=now + ttl,
            durable=not direct,
            seq=seq,
            conversation_id=envelope.conversation_id or None,
        )
        if ticket is not None:
            self.receipts.bind(ticket, message)
        self.ctx.metrics.events["accepted"] += 1
        self.receipts.remember(message, now)
        self._stage(message, front=False)
        self.drain_staging(message.recipient, now)
        return msgid, envelope.to

    def ack(self, session: Session, doc: dict[str, Any], now: float) -> None:
        """An ``ack`` frame from ``session``'s client.

        Raises:
            ProtocolError: no msgid.
        """
        msgid = doc.get("msgid")
        if not isinstance(msgid, str) or not msgid:
            raise ProtocolError(
                F.INVALID_ACK, "msgid: must be the msgid of a received message", field="msgid"
            )
        recipient = self._acknowledge(session, msgid, now)
        if recipient is None:
            self.sessions.send(session, F.ack_received_frame(msgid, "unknown", now))
            return
        if not session.lean:
            self.sessions.send(session, F.ack_received_frame(msgid, "acknowledged", now))
        self.pump(recipient, now)

    def acknowledge(self, session: Session, msgid: str, now: float) -> bool:
        """An ack over REST (``POST /messages/{msgid}/ack``) on the client's REST session:
        ``False`` if it holds no unacknowledged delivery of ``msgid`` (never handed to it,
        acknowledged or finished already, or handed to another session of the client)."""
        recipient = self._acknowledge(session, msgid, now)
        if recipient is None:
            return False
        self.pump(recipient, now)
        return True

    def _acknowledge(self, session: Session, msgid: str, now: float) -> Recipient | None:
        """Finish the delivery of ``msgid`` that ``session`` holds unacknowledged: its
        recipient, or ``None`` if it holds none."""
        assert session.client is not None
        recipient = self.recipients.get(session.client)
        message = recipient.unacked.get(msgid) if recipient is not None else None
        if recipient is None or message is None or message.sid != session.sid:
            return None
        del recipient.unacked[msgid]
        if message.written_at:  # an ack may come before relayd hears the write completed
            self.ctx.metrics.ack_latency.observe(now - message.written_at)
        self.finish(message, Status.ACKNOWLEDGED, now)
        return recipient

    def reserve_seqs(self) -> None:
        """Ask the store for the next block of seqs if the pool runs low (cluster mode)."""
        if self._seqs.low:
            self._seqs.reserving = True
            self.ctx.actions.append(ReserveSeqs(self._seqs.block))

    # --- staging and routing ---------------------------------------------------------------

    def _stage(self, message: Message, *, front: bool) -> None:
        queue = self.staging.setdefault(message.recipient, deque())
        if front:
            queue.appendleft(message)
        else:
            queue.append(message)
        move(message, Where.STAGED)
        if message.durable and not message.committed:
            if self.sessions.online(message.recipient):
                # It may go out as soon as it is stored: see Message.recorded_attempts.
                message.recorded_attempts = message.attempts + 1
            self.pending_commit += 1
            self.ctx.actions.append(insert_op(message))

    def drain_staging(self, client: str, now: float) -> None:
        """Route staged messages for ``client`` in order, up to the first not yet ready."""
        queue = self.staging.get(client)
        while queue:
            head = queue[0]
            if head.durable and not head.committed:
                return
            queue.popleft()
            if not self._route(head, now):
                return
        self.staging.pop(client, None)

    def _route(self, message: Message, now: float) -> bool:
        """Send a ready message on its way. False if it had to go back to staging."""
        recipient = self.recipients.get(message.recipient)
        if now >= message.expires_at:
            self.finish(message, Status.EXPIRED, now)
            return True
        online = recipient is not None and recipient.session.phase is Phase.ACTIVE
        # Cursor rule: a queued message at or below the cursor is never left in the store
        # alone, since loading only looks above the cursor.
        below_cursor = (
            recipient is not None and message.committed and message.seq <= recipient.cursor
        )
        has_room = recipient is not None and self._has_room(recipient)
        if online and recipient is not None and (has_room or below_cursor):
            if message.committed:
                self._by_seq[message.seq] = message
                recipient.cursor = max(recipient.cursor, message.seq)
            self._hold(recipient, message)
            move(message, Where.MAILBOX)
            (recipient.high if message.high else recipient.normal).append(message)
            if message.acknowledge:
                self.receipts.tell(message, Status.PENDING_ACK, now)
            self.pump(recipient, now)
            return True
        if not message.durable:
            # Conditions changed while it waited: it must be stored after all.
            message.durable = True
            self._stage(message, front=True)
            return False
        self._record_attempts(message)
        self._forget(message)
        if recipient is not None:
            recipient.backlog = True
            recipient.stored_since += 1
        elif self._cluster:
            self.ctx.actions.append(Announce("wake", message.recipient, message.seq))
        self.receipts.tell(message, Status.QUEUED if online else Status.QUEUED_OFFLINE, now)
        return True

    def _has_room(self, recipient: Recipient, waiting: int = 0) -> bool:
        """Whether a new message for ``recipient`` may join its mailbox (``waiting``: others
        staged ahead of it)."""
        relay = self.ctx.relay
        return (
            not recipient.backlog
            and recipient.mailbox_len() + waiting < relay.mailbox_size
            and recipient.held_bytes < relay.mailbox_bytes
        )

    # --- recipients come and go ------------------------------------------------------------

    def connected(self, session: Session, previous: Session | None) -> None:
        """``session`` became its client's active one, replacing ``previous`` (if any), which
        is closed here: what the old socket did not finish goes out first on the new one."""
        assert session.client is not None
        recipient = self.recipients.get(session.client)
        if previous is not None and recipient is not None:
            # The old socket's unsent frames come back in `closed`; deliver after them.
            self.sessions.close(
                previous, CloseCode.REPLACED, "replaced by a newer connection", abort=True
            )
            recipient.session = session
            recipient.paused = True
        else:
            if previous is not None:
                self.sessions.close(previous, CloseCode.REPLACED, "replaced by a newer connection")
            recipient = self.recipients[session.client] = Recipient(session.client, session)
            self._load(recipient)

    def unsent(self, message: Message, sid: int) -> bool:
        """``message`` was handed to closed session ``sid`` and never written: ``True`` if it
        goes back (it was sent last on ``sid``), not counted as an attempt."""
        if message.where is not Where.SENT or message.sid != sid:
            return False
        message.attempts -= 1
        return True

    def interrupted(self, message: Message, sid: int, now: float) -> bool:
        """The write of ``message`` to closed session ``sid`` was cut off: ``True`` if it goes
        back (it asks for an ack); otherwise it fails, since it may have arrived."""
        if message.where is not Where.SENT or message.sid != sid:
            return False
        if message.acknowledge:
            return True
        # At most once: it may have arrived, so it is not sent again.
        self.finish(message, Status.FAILED, now, reason="connection_lost")
        return False

    def disconnected(
        self, session: Session, *, was_active: bool, returned: list[Message], now: float
    ) -> None:
        """Closed ``session`` leaves ``returned`` (sent, not written or not surely) and its
        unacked messages: to its successor if it was replaced, to the store otherwise."""
        assert session.client is not None
        client = session.client
        recipient = self.recipients.get(client)
        if was_active:
            if recipient is not None:
                del self.recipients[client]
                self._requeue(recipient, session.sid, returned)
                self._unload(recipient, now)
        elif recipient is not None:
            # Replaced: what the old socket did not finish goes first on the new one.
            self._requeue(recipient, session.sid, returned)
            recipient.paused = False
            self.pump(recipient, now)
        else:
            # Replaced, and its successor has gone too: what it did not finish is stored.
            self._park(client, returned, now)

    def _requeue(self, recipient: Recipient, sid: int, returned: list[Message]) -> None:
        """Put messages sent on ``sid`` but not acknowledged back at the head of the mailbox."""
        unacked = [m for m in recipient.unacked.values() if m.sid == sid and m not in returned]
        again = sorted(unacked, key=lambda m: m.seq) + returned
        for message in reversed(again):
            recipient.unacked.pop(message.msgid, None)
            message.gen += 1
            move(message, Where.MAILBOX)
            (recipient.high if message.high else recipient.normal).appendleft(message)

    def _unload(self, recipient: Recipient, now: float) -> None:
        """The client went offline: its messages leave memory for the store."""
        self._park(
            recipient.client,
            [*recipient.unacked.values(), *recipient.high, *recipient.normal],
            now,
        )
        recipient.unacked.clear()
        recipient.high.clear()
        recipient.normal.clear()

    def _park(self, client: str, messages: list[Message], now: float) -> None:
        """``messages`` for the offline ``client`` leave memory: durable ones stay in the
        store, the rest are stored now. Their seqs, allocated at acceptance, keep them in send
        order there.
        """
        to_store: list[Message] = []
        stored: list[int] = []
        for message in messages:
            message.gen += 1
            self._release(message)
            if message.durable:
                stored.append(message.seq)
                self._record_attempts(message)
                self._forget(message)
                if message.status is None:
                    # An acknowledge:false message waits for its only receipt, delivered; it
                    # will not come soon. (A message loaded later from the store is taken to
                    # have been told it was queued.)
                    self.receipts.tell(message, Status.QUEUED_OFFLINE, now)
            else:
                message.durable = True  # never sent, so never an attempt: see unsent
                to_store.append(message)
        if stored and self._cluster:
            # The client may be on another node already, which may have loaded its queue
            # before these came here (see wake).
            self.ctx.actions.append(Announce("wake", client, min(stored)))
        if to_store:
            queue = self.staging.setdefault(client, deque())
            queue.extendleft(reversed(to_store))
            for message in to_store:
                move(message, Where.STAGED)
                self.pending_commit += 1
                self.ctx.actions.append(insert_op(message))

    def _record_attempts(self, message: Message) -> None:
        """Bring the store's attempt count of a stored message up to date, and when it was
        first written (its row may not know yet: see Message.delivered_at)."""
        if message.attempts != message.recorded_attempts or message.delivered_at is not None:
            message.recorded_attempts = message.attempts
            # A read already queued reads the count before this write: see _message_from_row.
            self._counts_written[message.seq] = message.attempts
            self.ctx.actions.append(
                SetAttempts(message.seq, message.attempts, at=message.delivered_at)
            )

    def _forget(self, message: Message) -> None:
        """The message leaves memory; the store keeps it."""
        move(message, Where.STORED)
        self._by_seq.pop(message.seq, None)
        self._release(message)

    def _hold(self, recipient: Recipient, message: Message) -> None:
        """``message`` is in ``recipient``'s memory now (see Recipient.held_bytes)."""
        if message.holder is not recipient:
            self._release(message)
            message.holder = recipient
            recipient.held_bytes += message.size

    def _release(self, message: Message) -> None:
        holder, message.holder = message.holder, None
        if holder is not None:
            holder.held_bytes -= message.size

    def wake(self, client: str, seq: int, now: float) -> None:
        """See :meth:`RelayCore.wake`."""
        recipient = self.recipients.get(client)
        if recipient is None:
            return
        recipient.rewind = min(recipient.rewind, seq - 1)
        recipient.backlog = True
        recipient.stored_since += 1
        if recipient.loading is None:
            self.pump(recipient, now)

    # --- the mailbox to the socket ---------------------------------------------------------

    def pump(self, recipient: Recipient, now: float) -> None:
        """Move messages from the mailbox to the socket while the window and buffer allow."""
        session = recipient.session
        if recipient.paused or session.phase is not Phase.ACTIVE:
            return
        relay = self.ctx.relay
        window = relay.inflight_window
        # Deliveries take at most half of the socket's buffer; receipts and control frames
        # have the rest (see RelayCore.readable).
        room = max(1, self.ctx.ws.outbound_buffer // 2)
        while recipient.high or recipient.normal:
            if session.queued >= room or len(recipient.unacked) >= window:
                break
            if session.rest and session.credit <= 0:
                break  # a REST session's deliveries go out only to a waiting pull
            queue = recipient.high or recipient.normal
            message = queue[0]
            if message.acknowledge and message.msgid in recipient.unacked:
                break  # same msgid still unacked: wait, so acks stay unambiguous
            if message.durable and message.recorded_attempts == 0:
                self._count_first_attempts(recipient, now)
            if message.recording:
                break  # its row does not count this attempt yet: see Message
            queue.popleft()
            if now >= message.expires_at:
                self.finish(message, Status.EXPIRED, now)
                continue
            message.attempts += 1
            if message.durable and message.attempts > message.recorded_attempts:
                self._record_attempts(message)  # a redelivery's count
            message.gen += 1
            move(message, Where.SENT)
            message.sid = session.sid
            if message.acknowledge:
                recipient.unacked[message.msgid] = message
            redelivered = message.attempts > 1
            if redelivered:
                self.ctx.metrics.events["redelivered"] += 1
            text = self._frame(message, redelivered)
            self.sessions.send(session, text, message)
            if session.rest:
                session.credit -= 1
        if (
            recipient.backlog
            and recipient.loading is None
            and recipient.mailbox_len() <= relay.mailbox_size // 2
            and recipient.held_bytes <= relay.mailbox_bytes // 2
        ):
            self._load(recipient)

    def _count_first_attempts(self, recipient: Recipient, now: float) -> None:
        """Have the store count a first attempt for every stored message in the recipient's
        mailbox that counts none: one write for all, before any of them goes out."""
        for message in itertools.chain(recipient.high, recipient.normal):
            if message.durable and message.recorded_attempts == 0:
                message.recorded_attempts = 1
                message.recording = True
                self.ctx.actions.append(SetAttempts(message.seq, 1, ref=message))

    def drained(self, session: Session, now: float) -> None:
        """Frames of ``session`` were written: fill its socket again from the mailbox."""
        recipient = self.recipients.get(session.client) if session.client else None
        if recipient is not None and recipient.session is session:
            self.pump(recipient, now)

    def written(self, session: Session, message: Message, now: float) -> None:
        """``message``'s frame was written to ``session``: it awaits its ack, or is delivered."""
        if message.where is not Where.SENT or message.sid != session.sid:
            return
        if message.attempts == 1:
            self.ctx.metrics.delivery_latency.observe(now - message.accepted_at)
        if message.acknowledge:
            move(message, Where.UNACKED)
            message.written_at = now
            if message.delivered_at is None:
                message.delivered_at = now
            self.ctx.at(now + self.ctx.relay.ack_timeout, TimerKind.ACK, message, message.gen)
        else:
            self.finish(message, Status.DELIVERED, now)

    # --- timers ----------------------------------------------------------------------------

    def ack_timeout(self, message: Message, gen: int, now: float) -> None:
        if message.gen != gen or message.where is not Where.UNACKED:
            return
        relay = self.ctx.relay
        recipient = self.recipients.get(message.recipient)
        if message.attempts >= relay.max_attempts or now >= message.expires_at:
            if recipient is not None:
                recipient.unacked.pop(message.msgid, None)
            expired = now >= message.expires_at
            self.finish(
                message,
                Status.EXPIRED if expired else Status.FAILED,
                now,
                reason="" if expired else "not_acknowledged",
            )
            if recipient is not None:
                self.pump(recipient, now)
            return
        move(message, Where.BACKOFF)
        delay = min(relay.backoff_initial * 2 ** (message.attempts - 1), relay.backoff_max)
        self.ctx.at(now + delay, TimerKind.BACKOFF, message, message.gen)

    def backoff_done(self, message: Message, gen: int, now: float) -> None:
        if message.gen != gen or message.where is not Where.BACKOFF:
            return
        recipient = self.recipients.get(message.recipient)
        if recipient is None:
            return
        del recipient.unacked[message.msgid]
        move(message, Where.MAILBOX)
        (recipient.high if message.high else recipient.normal).appendleft(message)
        self.pump(recipient, now)

    def sweep(self, now: float) -> None:
        """Look for expired messages in the store, and purge what is past keeping."""
        self._read(FindExpired(now, SWEEP_PAGE))
        relay, retention = self.ctx.relay, self.ctx.retention
        self.ctx.actions.append(
            Purge(  # history keeps a message's record for its retention, if longer
                finished_before=now - max(relay.dedupe_window, retention),
                receipts_before=now - max(relay.max_ttl, retention),
                now=now,
            )
        )

    # --- outcomes --------------------------------------------------------------------------

    def finish(self, message: Message, status: Status, now: float, *, reason: str = "") -> None:
        """The message reached its final ``status``: record it and tell its sender."""
        self.ctx.metrics.events[status.value] += 1
        if self._reads_in_flight:
            self._finished_while_reading.add(message.seq)
        move(message, Where.DONE)
        message.gen += 1
        self._by_seq.pop(message.seq, None)
        self._release(message)
        self.receipts.tell(message, status, now, reason=reason)

    # --- store results ---------------------------------------------------------------------

    def inserted(self, message: Message, outcome: Any, now: float) -> None:
        """The store ran ``message``'s :class:`~relayd._relay.records.Insert`."""
        self.pending_commit -= 1
        if isinstance(outcome, Inserted):
            message.committed = True
            if message.where is Where.STAGED:
                self._by_seq[outcome.seq] = message
            return
        # Refused: take it out of staging and say why.
        queue = self.staging.get(message.recipient)
        if queue is not None and message in queue:
            queue.remove(message)
        if message.status is not None:
            # Its sender was told it was on its way (delivered straight from memory, then
            # parked when its recipient left): it fails, with a receipt, not in silence.
            code = outcome.code if isinstance(outcome, Refused) else "duplicate"
            self.finish(message, Status.FAILED, now, reason=code)
            return
        move(message, Where.DONE)
        self.receipts.refused(message, outcome, now)

    def record_written(self, reader: str, msgid: str, sender: str | None) -> None:
        """``reader`` read ``msgid``: if that message waits in memory for its ack, written
        to ``reader`` already, its row learns when (it does at its Finish otherwise), so that
        the read finds it delivered."""
        recipient = self.recipients.get(reader)
        message = recipient.unacked.get(msgid) if recipient is not None else None
        if (
            message is not None
            and message.delivered_at is not None
            and message.committed
            and (sender is None or message.sender == sender)
        ):
            self.ctx.actions.append(
                SetAttempts(message.seq, message.recorded_attempts, at=message.delivered_at)
            )

    def attempts_written(self, op: SetAttempts, now: float) -> None:
        """The store ran a :class:`~relayd._relay.records.SetAttempts`."""
        if isinstance(op.ref, Message):
            op.ref.recording = False
            if op.ref.holder is not None:
                self.pump(op.ref.holder, now)
        elif self._counts_written.get(op.seq) == op.attempts:
            del self._counts_written[op.seq]

    def _shared(self, row: StoredMessage) -> str:
        """A topic message's fields, one string for every subscriber here that loads it: a
        publish to thousands holds its content once in memory, not once per subscriber (each
        load from the store makes a new string). The last ``SHARED_FIELDS`` messages loaded
        are remembered; one loaded after it was forgotten is simply not shared."""
        if row.topic is None:
            return row.fields
        return _newest(self._shared_fields, (row.sender, row.msgid), lambda: row.fields)

    def _frame(self, message: Message, redelivered: bool) -> str:
        """The delivery's frame. A topic message's first attempt is one frame for every
        subscriber here (the last ``SHARED_FIELDS`` remembered), as its fields are one string:
        a socket's queue holds a reference, not a copy of a publish to thousands."""
        if message.topic is None or redelivered:
            return F.delivery_frame(
                message.fields,
                attempt=message.attempts,
                redelivered=redelivered,
                offset=message.offset,
            )
        return _newest(
            self._shared_frames,
            (message.sender, message.msgid),
            lambda: F.delivery_frame(
                message.fields, attempt=1, redelivered=False, offset=message.offset
            ),
        )

    def _message_from_row(self, row: StoredMessage) -> Message:
        known = self.receipts.remembered(row.sender, row.msgid)
        # A count written after this read was queued is the truth, not the row's.
        attempts = self._counts_written.get(row.seq, row.attempts)
        message = Message(
            sender=row.sender,
            recipient=row.recipient,
            msgid=row.msgid,
            high=row.high,
            acknowledge=row.acknowledge,
            fields=self._shared(row),
            accepted_at=row.accepted_at,
            expires_at=row.expires_at,
            durable=True,
            seq=row.seq,
            topic=row.topic,
            offset=row.offset,
            attempts=attempts,
            recorded_attempts=attempts,
            committed=True,
        )
        # Its sender was told something when it was stored; later receipts are updates.
        message.status = Status.QUEUED
        if known is not None and known[1] is not None:
            message.status = known[1]
        return message

    def _load(self, recipient: Recipient) -> None:
        relay = self.ctx.relay
        op = LoadQueue(
            recipient.client,
            int(min(recipient.cursor, recipient.rewind)),
            relay.mailbox_size - recipient.mailbox_len(),
            max(1, relay.mailbox_bytes - recipient.held_bytes),
        )
        recipient.loading = op
        recipient.rewind = math.inf
        recipient.load_mark = recipient.stored_since
        self._read(op)

    def _read(self, op: LoadQueue | FindExpired) -> None:
        """Ask the store for queued messages. Until the answer comes, messages finished here
        are remembered: the answer may still show them queued."""
        self._reads_in_flight += 1
        self.ctx.actions.append(op)

    def _read_done(self) -> None:
        self._reads_in_flight -= 1
        if not self._reads_in_flight:
            self._finished_while_reading.clear()

    def loaded(self, op: LoadQueue, page: QueuePage, now: float) -> None:
        """The store answered a :class:`~relayd._relay.records.LoadQueue`."""
        self._loaded(op, page, now)
        self._read_done()

    def _loaded(self, op: LoadQueue, page: QueuePage, now: float) -> None:
        recipient = self.recipients.get(op.recipient)
        if recipient is None or recipient.loading is not op:
            return  # the client left, or came back, since
        recipient.loading = None
        # A message still staged for the recipient goes before every row after it: the page
        # stops there, and the rest is loaded once it has been routed (rule 3).
        staged = self.staging.get(op.recipient)
        first_staged = min((m.seq for m in staged), default=None) if staged else None
        more = page.more
        rewound = op.after < recipient.cursor
        last = op.after  # the last row this load took in
        for row in page.rows:
            if first_staged is not None and row.seq > first_staged:
                more = True
                break
            last = row.seq
            recipient.cursor = max(recipient.cursor, row.seq)
            if row.seq in self._by_seq or row.seq in self._finished_while_reading:
                continue
            message = self._message_from_row(row)
            self._by_seq[row.seq] = message
            self._hold(recipient, message)
            move(message, Where.MAILBOX)
            (recipient.high if message.high else recipient.normal).append(message)
        if more and rewound:
            # A rewound load stopped early: the next one goes on from where this one did.
            recipient.rewind = min(recipient.rewind, last)
        if not more and recipient.stored_since == recipient.load_mark:
            recipient.backlog = False
        self.pump(recipient, now)
        self.drain_staging(op.recipient, now)

    def expired_found(self, rows: list[StoredMessage], now: float) -> None:
        """The store answered a sweep's :class:`~relayd._relay.records.FindExpired`."""
        self._expired_found(rows, now)
        self._read_done()

    def _expired_found(self, rows: list[StoredMessage], now: float) -> None:
        for row in rows:
            if row.seq in self._finished_while_reading:
                continue  # acknowledged (or otherwise finished) since the sweep looked
            message = self._by_seq.get(row.seq)
            if message is None:
                message = self._message_from_row(row)
            else:
                recipient = self.recipients.get(message.recipient)
                queues = [self.staging.get(message.recipient, deque())]
                if recipient is not None:
                    if recipient.unacked.get(message.msgid) is message:
                        del recipient.unacked[message.msgid]
                    queues += [recipient.high, recipient.normal]
                for queue in queues:
                    if message in queue:
                        queue.remove(message)
            self.finish(message, Status.EXPIRED, now)
        if len(rows) == SWEEP_PAGE:
            self._read(FindExpired(now, SWEEP_PAGE))


def _newest(
    table: dict[tuple[str, str], str], key: tuple[str, str], make: Callable[[], str]
) -> str:
    """``table[key]``, made by ``make()`` if missing, and now the newest of the at most
    ``SHARED_FIELDS`` entries ``table`` keeps (the oldest goes to make room)."""
    value = table.pop(key, None)
    if value is None:
        value = make()
        if len(table) >= SHARED_FIELDS:
            del table[next(iter(table))]
    table[key] = value
    return value
