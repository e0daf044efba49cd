"""The relay core: sessions, routing, mailboxes, acks, redelivery, expiry and receipts, as a
sans-I/O state machine.

It takes events — a socket opened, a frame received, frames written, a store operation done,
time passed — and answers with actions — send this frame, close that socket, verify this
token, run these store operations — which :meth:`RelayCore.take_actions` hands to the driver
(``relayd._relay.hub``). It never does I/O, never reads a clock and never imports trio: every
event carries ``now``, and every timer is data (:meth:`next_deadline`, :meth:`tick`).

Its modules follow the dependency direction, each importing only those before it:

- ``records.py``: stored messages and the store operations (the store's view);
- ``model.py``: sessions, messages, recipients, and the table of moves a message may make;
- ``frames.py``: the wire format, every frame in and out;
- ``effects.py``: the actions; ``seqs.py``: message seqs; ``stats.py``: counters;
- ``context.py``: what every part shares (settings, metrics, the actions decided, timers);
- ``sessions.py``: session lifecycle (admission, authentication, tokens, heartbeats,
  revocation, shutdown), and the one way a frame reaches a socket;
- ``receipts.py``: the sender's side (receipts told or owed, the dedupe memory, key changes);
- ``delivery.py``: messages in memory (acceptance, staging, routing, mailboxes, acks,
  redelivery, expiry, loading from and parking in the store);
- ``reads.py``: the recipient's side of read receipts (``read`` frames, their answers);
- ``topics.py``: publishing to topics (rule 11) and the publisher's counts;
- ``presence.py``: memberships of live sockets, presence events and typing (rule 12);
- this module, :class:`RelayCore`: the events the driver calls, each routed to those parts.

Rules that hold between any two events:

1. A session is PENDING until a token is verified; while PENDING only an ``auth`` frame is
   read and nothing is delivered. At most one session per client is ACTIVE: a newer one
   replaces the older, which is closed with 4009; ``Sessions.active[client]`` names only the
   newest.
2. Every accepted message is in exactly one place: *staged* (waiting for its commit, or behind
   an earlier message to the same recipient that is), *stored* only (the recipient is offline
   or has a backlog), in its recipient's *mailbox*, *sent* (handed to the recipient's socket,
   write unconfirmed), *unacked* (written, awaiting an ack or a redelivery), or *done*.
3. Staging is FIFO per recipient, and so is each mailbox priority. Hence first deliveries from
   one sender to one recipient keep send order, except that ``priority: "high"`` overtakes
   normal messages waiting in the recipient's mailbox.
4. A durable message's first receipt follows its commit. A message is durable when the sender
   asks for an ack, when the recipient is offline, or when the recipient's mailbox is full or
   backlogged; otherwise (``acknowledge: false`` to a connected recipient with room) it goes
   straight to the mailbox and its only receipt, ``delivered``, follows the socket write.
5. Memory is bounded: per recipient ``mailbox_size`` ready messages and ``inflight_window``
   unacked ones; per session ``outbound_buffer`` frames; ``max_pending_commit`` messages
   awaiting a commit (beyond it the driver stops reading senders); ``dedupe_max_entries``
   remembered message ids. Everything else waits in the store.
6. The store is told every state change of a durable message, in the order the core decided
   it; the core never lets the store decide (expiry candidates are read, then decided here).
7. A key change (``key_changed``, see relayd/_keys.py) is owed in the store until its frame is
   written: pushed at once to an online correspondent with room on its socket, otherwise
   loaded from the store when it connects or when its socket drains. So it is told at least
   once; a change landing while its correspondent connects may be told twice.
8. A *REST session* (``rest``; ``GET /messages/pending``) is a session without a socket: its
   transport is a buffer that pulls drain. It is a client's active session like any other
   (rule 1; a socket that authenticates replaces it with 4009), except that it never
   replaces a live socket (it is refused, ``client_connected``), it is handed deliveries only
   while a pull waits and at most as many as that pull may take (its ``credit``), it is told
   no receipts and no key changes (they stay owed for the client's next socket), and it ends
   ``relay.pull_idle_timeout`` after its last pull.
9. A read receipt is decided by the store (``MarkRead``: only a delivery's recipient, only once
   it was written to it, only once) and then owed in the store, apart from the final status,
   until its frame is written to the sender: told at once to a sender online here (announced
   to the other nodes in cluster mode), else loaded with the final receipts when it connects
   or its socket drains. A receipt on its way to a socket is never loaded again meanwhile, so
   neither receipt is told twice nor lost while the other is told.
10. A message submitted without a session (:meth:`RelayCore.submit`, a REST send) takes the
    same path as a socket's from acceptance on; only its first answer goes elsewhere: to the
    ticket its submitter waits on, while it waits. It opens no session, so it never replaces
    its client's live one.
11. A message published to a topic (``topics.py``) is stored by one :class:`Publish` (the
    store decides who may publish and who subscribes, and writes one delivery per
    subscriber); the core holds none of its deliveries until a subscriber here loads its own
    from the store, as any queued message. A topic's delivery is told to nobody (rule 4 does
    not apply): its publisher gets ``topic_sent`` once, then counts.
12. Presence and typing (``presence.py``) are never stored and told at most once: a live
    socket's memberships are loaded when it becomes active and kept while it lives; presence
    events reach the topic's other live sockets, coalesced per session and topic to one frame
    per ``topics.presence_interval``; a client's replacement by a newer socket is not offline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from attrs import frozen

from relayd._config import RelayConfig, TopicsConfig, WebsocketConfig
from relayd._engine import TopicCounts
from relayd._ratelimit import RateLimiter

from . import frames as F
from .context import Context, TimerKind
from .delivery import Delivery
from .effects import Action, BroadcastNote, PresenceNote, TypingNote
from .frames import CloseCode, ProtocolError
from .model import Identity, Message, Phase, ReadRef, ReceiptRef, Ref, Session
from .presence import Presence
from .reads import Reads
from .receipts import Receipts
from .records import (
    ClearReadPending,
    FindExpired,
    Insert,
    KeyNotice,
    LoadKeyNotices,
    LoadQueue,
    LoadReceipts,
    MarkRead,
    Publish,
    RecentMessage,
    SetAttempts,
    SetReceiptPending,
    StoreOp,
)
from .seqs import SeqPool
from .sessions import Sessions
from .stats import RelayStats
from .topics import Topics

__all__ = ["RelayCore", "Ticket", "TimerKind"]


@frozen
class Ticket:
    """A message submitted without a session (see :meth:`RelayCore.submit`): ``id`` names the
    :class:`~relayd._relay.effects.Answer` meant for it; ``msgid`` is the message's (relayd's
    own if the submitter gave none), ``to`` its recipient."""

    id: int
    msgid: str
    to: str


class RelayCore:
    """See the module docstring. All methods are synchronous and cheap; none blocks.

    It owns the shared :class:`Context` and the three parts, each owning its own state:
    :attr:`sessions` (:class:`Sessions`), :attr:`receipts` (:class:`Receipts`) and
    :attr:`delivery` (:class:`Delivery`); an event that concerns more than one is routed here,
    part by part, in the order the rules need.
    """

    def __init__(
        self,
        relay: RelayConfig,
        websocket: WebsocketConfig,
        *,
        now: float,
        last_seq: int = 0,
        seqs: SeqPool | None = None,
        recent: Iterable[RecentMessage] = (),
        may_message: Callable[[str, str], bool] | None = None,
        cluster: bool = False,
        retention: float = 0.0,
        topics: TopicsConfig | None = None,
        permits: Callable[[str, str], bool] | None = None,
    ) -> None:
        """``last_seq``: the highest message seq the store ever held; new ones go above.
        ``seqs``: where seqs come from instead (reserved in blocks: cluster mode).
        ``cluster``: other nodes share the store: announce what they must hear (see
        :class:`Announce`).
        ``recent``: the store's messages within the dedupe window, oldest first.
        ``may_message(sender, recipient)``: whether the roles allow it (``None``: anyone may
        message anyone).
        ``retention``: ``history.retention``: how long a message keeps its content (and its
        record) after its final status.
        ``topics``: the ``[topics]`` settings; ``permits(client, permission)``: what a
        client's roles grant now (``None``: nobody is an admin)."""
        self._ctx = ctx = Context(relay, websocket, retention, topics)
        self._may_message = may_message
        self._seqs = seqs if seqs is not None else SeqPool.endless(last_seq)
        # Messages and token refreshes count against one per-client rate.
        self._send_limiter = RateLimiter(
            rate=websocket.messages_per_second, burst=websocket.message_burst
        )
        self.sessions = Sessions(ctx, self._send_limiter)
        self.receipts = Receipts(ctx, self.sessions, recent=recent, cluster=cluster)
        self.delivery = Delivery(
            ctx,
            self.sessions,
            self.receipts,
            seqs=self._seqs,
            limiter=self._send_limiter,
            may_message=may_message,
            cluster=cluster,
        )
        self.reads = Reads(ctx, self.sessions, self.receipts, self.delivery, self._send_limiter)
        self.topics = Topics(
            ctx,
            self.sessions,
            self.delivery,
            self._send_limiter,
            cluster=cluster,
            permits=permits,
        )
        self.presence = Presence(
            ctx, self.sessions, self._send_limiter, may_message=may_message, permits=permits
        )
        ctx.at(now + relay.sweep_interval, TimerKind.SWEEP, None, 0)

    def reconfigure(
        self,
        relay: RelayConfig,
        websocket: WebsocketConfig,
        retention: float | None = None,
        topics: TopicsConfig | None = None,
    ) -> None:
        """New settings (a reload): limits and timers apply from the next decision on."""
        self._ctx.relay = relay
        self._ctx.ws = websocket
        if topics is not None:
            self._ctx.topics = topics
        if retention is not None:
            self._ctx.retention = retention
        self._send_limiter.reconfigure(
            rate=websocket.messages_per_second, burst=websocket.message_burst
        )
        self.sessions.reconfigure()

    # --- outputs and state -----------------------------------------------------------------

    def take_actions(self) -> list[Action]:
        """The actions decided since the last call, in order."""
        return self._ctx.take_actions()

    @property
    def relay(self) -> RelayConfig:
        return self._ctx.relay

    @property
    def ws(self) -> WebsocketConfig:
        return self._ctx.ws

    @property
    def metrics(self) -> RelayStats:
        return self._ctx.metrics

    @property
    def draining(self) -> bool:
        return self.sessions.draining

    @property
    def store_down(self) -> bool:
        """The store failed its last batch: new messages are refused."""
        return self.delivery.store_down

    @property
    def pending_commit(self) -> int:
        """Messages waiting for their store commit."""
        return self.delivery.pending_commit

    @property
    def accepting(self) -> bool:
        """False while too many messages await a commit: stop reading senders until True."""
        if self.delivery.store_down:
            return True  # read on, and refuse each message with store_unavailable
        return (
            self.delivery.pending_commit < self._ctx.relay.max_pending_commit
            and self._seqs.remaining > 0
        )

    @property
    def session_count(self) -> int:
        return len(self.sessions.by_sid)

    def online(self, client: str) -> bool:
        return self.sessions.online(client)

    def live(self, sid: int) -> bool:
        """Whether session ``sid`` is open and authenticated."""
        session = self.sessions.by_sid.get(sid)
        return session is not None and session.phase is Phase.ACTIVE

    def readable(self, sid: int) -> bool:
        """Whether to read the next frame of ``sid``. Not while its socket is half full, nor
        while a quarter of its buffer's worth of its messages (or ``read_ahead_bytes`` of
        them) await their first receipt: what a client sends can never make more frames for it
        than its socket holds, nor hold more than that much memory before it is stored."""
        session = self.sessions.by_sid.get(sid)
        if session is None:
            return True  # read on: the transport will report the close
        half = max(1, self._ctx.ws.outbound_buffer // 2)
        if session.queued >= half or session.client is None:
            return session.queued < half
        if session.reads >= max(1, self._ctx.ws.outbound_buffer // 4):
            return False  # their answers must fit in the socket (see Reads)
        return self.receipts.may_read(session.client)

    def stats(self) -> dict[str, int]:
        """Gauges for metrics."""
        recipients = self.delivery.recipients.values()
        return {
            "sessions": len(self.sessions.by_sid),
            "sessions_pending": self.sessions.pending_auth,
            "sessions_active": len(self.sessions.active),
            "mailbox": sum(r.mailbox_len() for r in recipients),
            "unacked": sum(len(r.unacked) for r in recipients),
            "staged": sum(len(q) for q in self.delivery.staging.values()),
            "pending_commit": self.delivery.pending_commit,
            "dedupe_entries": self.receipts.dedupe_entries(),
            "held_bytes": sum(r.held_bytes for r in recipients),
            "awaiting_bytes": self.receipts.awaiting_bytes(),
        }

    def active_tokens(self) -> list[tuple[str, str]]:
        """``(client, jti)`` of the token each active session runs on."""
        return self.sessions.active_tokens()

    def recent_status(self, sender: str, msgid: str) -> tuple[float, str | None] | None:
        """(accepted at, the last status its sender was told) of a message within the
        dedupe window; ``None`` if it is not remembered."""
        return self.receipts.recent_status(sender, msgid)

    # --- timers ----------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return self._ctx.next_deadline()

    def tick(self, now: float) -> None:
        """Fire every timer due at ``now``."""
        for kind, target, gen in self._ctx.due(now):
            if kind is TimerKind.ACK:
                self.delivery.ack_timeout(target, gen, now)
            elif kind is TimerKind.BACKOFF:
                self.delivery.backoff_done(target, gen, now)
            elif kind is TimerKind.HEARTBEAT:
                self.sessions.heartbeat(target, now)
            elif kind is TimerKind.AUTH:
                self.sessions.auth_timeout(target, now)
            elif kind is TimerKind.TOKEN:
                self.sessions.token_timer(target, now)
            elif kind is TimerKind.SWEEP:
                self._sweep(now)
            elif kind is TimerKind.IDLE:
                self.sessions.idle(target, now)
            elif kind is TimerKind.TOPIC_COUNTS:
                self.topics.count_due(now)
            elif kind is TimerKind.PRESENCE:
                self.presence.flush(now)

    def _sweep(self, now: float) -> None:
        relay = self._ctx.relay
        self.sessions.forget_revocations(now - relay.sweep_interval)
        self.delivery.sweep(now)
        self._ctx.at(now + relay.sweep_interval, TimerKind.SWEEP, None, 0)

    # --- sessions --------------------------------------------------------------------------

    def open(
        self,
        sid: int,
        remote: str,
        now: float,
        *,
        token: str | None = None,
        pong_observable: bool = False,
        lean: bool = False,
        rest: bool = False,
    ) -> None:
        """A socket was accepted. ``token``: one offered in the URL, a header or a subprotocol;
        ``lean``: the client chose the lean receipt profile (no ``pending_ack`` receipts, no
        ``ack_received``); ``rest``: a REST session, opened by a pull with its token (rule 8).

        Connection limits: a socket is *admitted* — counted against ``max_connections`` and
        ``max_connections_per_ip``, or refused with 4029 — as soon as it offers a token, in the
        handshake or in an ``auth`` frame. Until then it *waits*, against limits of its own:
        past ``max_pending_auth_per_ip`` waiting sockets from one address, or
        ``max_pending_auth`` in all, the oldest waiting one is closed (4029) to make room. So
        sockets that never authenticate cannot lock out a client that presents a token.
        """
        self.sessions.open(
            sid, remote, now, token=token, pong_observable=pong_observable, lean=lean, rest=rest
        )

    def authenticated(self, sid: int, who: Identity, now: float, *, refresh: bool) -> None:
        """A token offered by session ``sid`` verified as ``who``."""
        opened = self.sessions.authenticated(sid, who, now, refresh=refresh)
        if opened is None:
            return
        session, previous = opened
        self.delivery.connected(session, previous)
        if not session.rest:
            self.receipts.connected(session)
            self.presence.connected(session, previous, now)
        self.delivery.drain_staging(who.client, now)
        held, session.held = session.held, []
        for data in held:
            self.receive(sid, data, now)

    def auth_failed(self, sid: int, code: str, message: str, now: float, *, refresh: bool) -> None:
        """A token offered by session ``sid`` was refused (``code`` as in the REST API)."""
        self.sessions.auth_failed(sid, code, message, now, refresh=refresh)

    def pong(self, sid: int, now: float) -> None:
        """The transport saw a pong (or any sign of life below the frame level)."""
        self.sessions.pong(sid, now)

    def revoke(
        self,
        client: str,
        now: float,
        *,
        login: str | None = None,
        token_id: str | None = None,
        reason: str = "revoked",
    ) -> None:
        """Tokens were revoked: all of ``client``'s (it was revoked or deleted), those of one
        ``login`` (its refresh family), or one access token (``token_id``). The client's
        session is closed with 4003 at once if it runs on a revoked token."""
        self.sessions.revoke(client, now, login=login, token_id=token_id, reason=reason)

    # --- REST sessions (rule 8) ------------------------------------------------------------

    def pull(self, sid: int, limit: int, now: float) -> None:
        """A pull waits on REST session ``sid`` for at most ``limit`` deliveries: what its
        mailbox holds goes out now (as frames on the session, written as soon as handed to
        the pull), more as it arrives, until :meth:`pull_done`."""
        session = self.sessions.pull_begins(sid, limit, now)
        if session is not None:
            self.delivery.drained(session, now)

    def pull_done(self, sid: int, now: float) -> None:
        """The pull on REST session ``sid`` returned; its idle time counts from ``now``."""
        self.sessions.pull_ends(sid, now)

    def pull_ready(self, sid: int) -> bool:
        """Whether REST session ``sid`` has loaded what the store held for its client when
        it opened (or has ended): a pull that finds nothing can say nothing waits."""
        session = self.sessions.by_sid.get(sid)
        if session is None or session.phase is not Phase.ACTIVE or session.client is None:
            return True
        recipient = self.delivery.recipients.get(session.client)
        return recipient is None or recipient.session is not session or recipient.loading is None

    def acknowledge(self, sid: int, msgid: str, now: float) -> bool:
        """``POST /messages/{msgid}/ack`` on REST session ``sid``: ``True`` if it held that
        delivery unacknowledged (its sender is told ``acknowledged``), ``False`` if not."""
        session = self.sessions.by_sid.get(sid)
        if session is None or session.phase is not Phase.ACTIVE or not session.rest:
            return False
        return self.delivery.acknowledge(session, msgid, now)

    def drain(self, now: float) -> None:
        """Shutdown: tell every session, then close it with 1001 once its frames are written."""
        self.sessions.drain(now)

    def closed(
        self,
        sid: int,
        now: float,
        *,
        written: tuple[int, Iterable[Ref]] = (0, ()),
        unsent: Iterable[Ref] = (),
        interrupted: Iterable[Ref] = (),
    ) -> None:
        """Session ``sid`` is gone. ``written``: the count and refs of frames written since
        the last :meth:`written`; ``unsent``: frames never written, in queue order;
        ``interrupted``: frames whose write was cut off (they may or may not have arrived)."""
        session = self.sessions.closed(sid)
        if session is None:
            return
        self._account_written(session, written[0], written[1], now)
        returned: list[Message] = []
        for ref in unsent:
            if isinstance(ref, ReceiptRef | ReadRef):
                self.receipts.untold(ref)
            elif isinstance(ref, KeyNotice):
                continue  # owed in the store until written
            elif self.delivery.unsent(ref, sid):
                returned.append(ref)
        for ref in interrupted:
            if isinstance(ref, ReceiptRef | ReadRef):
                self.receipts.untold(ref)  # it may have arrived: receipts are told at least once
            elif isinstance(ref, KeyNotice):
                continue  # it may have arrived: key changes are told at least once
            elif self.delivery.interrupted(ref, sid, now):
                returned.append(ref)
        if session.client is None:
            return
        self.receipts.announce_owed(session.client, (*unsent, *interrupted))
        was_active = self.sessions.deactivate(session)
        self.presence.disconnected(session, now, offline=was_active and not session.moved)
        self.delivery.disconnected(session, was_active=was_active, returned=returned, now=now)

    # --- messages without a session ----------------------------------------------------------

    def submit(self, client: str, doc: dict[str, Any], now: float) -> Ticket:
        """A message from ``client`` that comes without a session (``POST /messages``): the
        same validation, rate, dedupe, acceptance, routing and receipts as a ``message`` frame
        (rule 10), and no session is opened. Its first answer comes as an
        :class:`~relayd._relay.effects.Answer` for the ticket: the receipt a socket would get
        as ``delivery_status``, or the refusal the store decides (``unknown_recipient``,
        ``queue_full``; a duplicate is a receipt). Later receipts go to the client's live
        session, on any node, else are owed as to an offline sender. The driver calls
        :meth:`abandon` if it stops waiting first.

        Every submission counts against the client's message rate, valid or not, and at most
        as many of its messages as a socket may have unanswered (see :meth:`readable`) wait
        for their first answer.

        Raises:
            ProtocolError: refused at once (invalid, another client's ``from``, not permitted,
                over the rate, the store down, shutting down): nothing was accepted.
        """
        if self.sessions.draining:
            raise ProtocolError(F.SHUTTING_DOWN, "relayd is shutting down", strike=False)
        kind = doc.get("type")
        if kind is not None and kind != "message":
            raise ProtocolError(
                F.UNKNOWN_TYPE,
                "only messages are sent this way (no type, or message)",
                field="type",
            )
        if not self.receipts.may_read(client):
            raise ProtocolError(
                F.RATE_LIMITED,
                "too many of your messages await their first receipt; retry once answered",
                details={"retry_after": 1.0},
            )
        wait = self._send_limiter.acquire(client, now)
        if wait > 0:
            raise F.RateLimited(wait)
        ticket = self.receipts.open_ticket()
        try:
            msgid, to = self.delivery.submit(client, doc, now, ticket)
        except ProtocolError:
            self.receipts.abandon(ticket)
            raise
        return Ticket(ticket, msgid, to)

    def abandon(self, ticket: int) -> None:
        """The submitter of ``ticket`` stopped waiting before its answer (its deadline, or it
        went away): the message goes on, and its receipts go where an offline sender's do,
        or to its live session, as updates."""
        self.receipts.abandon(ticket)

    # --- frames in and out -----------------------------------------------------------------

    def receive(self, sid: int, data: str | bytes, now: float) -> None:
        """Session ``sid`` sent a frame."""
        sessions = self.sessions
        session = sessions.by_sid.get(sid)
        if session is None or session.phase is Phase.CLOSING:
            return
        session.last_seen = now
        limit = self._ctx.ws.max_frame_bytes
        # The socket libraries count characters; a character is at most 4 bytes.
        if len(data) > limit // 4 and isinstance(data, str) and len(data.encode()) > limit:
            sessions.close(session, CloseCode.MESSAGE_TOO_BIG, "frame too big", abort=True)
            return
        if session.phase is Phase.PENDING:
            self._receive_pending(session, data, now)
            return
        if isinstance(data, bytes):
            self._error(session, F.BINARY_UNSUPPORTED, "binary frames are not supported", now)
            sessions.strike(session, now)
            return
        try:
            doc = F.decode(data)
            kind = doc.get("type")
            if (kind is None and "topic_id" in doc and "to" not in doc) or kind == "publish":
                self.topics.publish(session, doc, now)
            elif kind is None or kind == "message":
                self.delivery.accept(session, doc, now)
            elif kind == "ack":
                self.delivery.ack(session, doc, now)
            elif kind == "read":
                self.reads.frame(session, doc, now)
            elif kind == "typing":
                self.presence.typing(session, doc, now)
            elif kind == "broadcast":
                self.topics.broadcast(session, doc, now)
            elif kind in ("refresh", "refresh_token"):
                sessions.refresh(session, doc, now)
            elif kind == "ping":
                sessions.send(session, F.pong_frame(now))
            elif kind == "pong":
                pass  # answers JSON pings that relayd no longer sends: accepted, ignored
            elif kind == "auth":
                raise ProtocolError(F.ALREADY_AUTHENTICATED, "this connection is authenticated")
            else:
                raise ProtocolError(
                    F.UNKNOWN_TYPE, f"unknown frame type {str(kind)[:64]!r}", field="type"
                )
        except ProtocolError as exc:
            self._error(session, exc.code, exc.message, now, exc.details)
            if exc.strike:
                sessions.strike(session, now)

    def _receive_pending(self, session: Session, data: str | bytes, now: float) -> None:
        """Before authentication only an ``auth`` frame is read; anything else closes 4001."""
        if session.authenticating:
            # A client may send right behind the token it offered.
            self.sessions.hold(session, data, now)
            return
        try:
            doc = F.decode(data) if isinstance(data, str) else None
        except ProtocolError:
            doc = None
        token = doc.get("token") if doc is not None else None
        if doc is None or doc.get("type") != "auth":
            self._error(session, F.NOT_AUTHENTICATED, "authenticate first", now)
            self.sessions.close(session, CloseCode.AUTH_FAILED, "not authenticated")
        elif not isinstance(token, str) or not token:
            self._error(session, "missing_token", "token: must be a non-empty string", now)
            self.sessions.close(session, CloseCode.AUTH_FAILED, "missing_token")
        else:
            self.sessions.verify(session, token, now)

    def _error(
        self,
        session: Session,
        code: str,
        message: str,
        now: float,
        details: dict[str, Any] | None = None,
    ) -> None:
        self.sessions.error(session, code, message, now, details)

    def written(self, sid: int, count: int, refs: Iterable[Ref], now: float) -> None:
        """``count`` frames queued on ``sid`` were written; ``refs`` are theirs that had one."""
        session = self.sessions.by_sid.get(sid)
        if session is None:
            return
        self._account_written(session, count, refs, now)
        self.receipts.drained(session)
        self.delivery.drained(session, now)

    def _account_written(
        self, session: Session, count: int, refs: Iterable[Ref], now: float
    ) -> None:
        """What a write completes: deliveries become unacked or delivered, receipts told."""
        session.queued -= count
        self._ctx.metrics.frames_out += count
        told: list[int] = []
        read: list[int] = []
        for ref in refs:
            if isinstance(ref, ReceiptRef):
                self.receipts.written(ref, told)
            elif isinstance(ref, ReadRef):
                read.append(ref.seq)
            elif isinstance(ref, KeyNotice):
                self.receipts.notice_written(session, ref)
            else:
                self.delivery.written(session, ref, now)
        if told:
            self._ctx.actions.append(SetReceiptPending(tuple(told), pending=False))
        if read:
            self._ctx.actions.append(ClearReadPending(tuple(read)))

    def key_changed(self, notices: Iterable[KeyNotice], now: float) -> None:
        """Key changes were committed, each owed to a correspondent (its ``reader``): an online
        one is sent the frame now, if its socket has room; the store keeps the rest owed (see
        rule 7)."""
        self.receipts.key_changed(notices, now)

    def read(self, ref: Any, reader: str, msgid: str, sender: str | None, now: float) -> None:
        """``reader`` read ``msgid`` (from ``sender``; ``None``: the newest delivery of it to
        ``reader``), said over REST: a :class:`MarkRead` with ``ref``, which comes back with
        the store's answer (see :meth:`store_done`); the sender is told as for a ``read``
        frame."""
        self.reads.request(ref, reader, msgid, sender, now)

    # --- the store -------------------------------------------------------------------------

    def store_done(self, ops: list[StoreOp], results: list[Any], now: float) -> None:
        """The store ran ``ops`` (in order); ``results`` are theirs."""
        delivery = self.delivery
        touched: set[str] = set()
        for op, result in zip(ops, results, strict=True):
            if isinstance(op, Insert) and isinstance(op.ref, Message):
                delivery.inserted(op.ref, result, now)
                touched.add(op.recipient)
            elif isinstance(op, LoadQueue):
                delivery.loaded(op, result, now)
            elif isinstance(op, LoadReceipts):
                self.receipts.loaded(op, result, now)
            elif isinstance(op, LoadKeyNotices):
                self.receipts.key_notices_loaded(op, result, now)
            elif isinstance(op, FindExpired):
                delivery.expired_found(result, now)
            elif isinstance(op, SetAttempts):
                delivery.attempts_written(op, now)
            elif isinstance(op, MarkRead):
                self.reads.done(op, result, now)
            elif isinstance(op, SetReceiptPending | ClearReadPending):
                self.receipts.cleared(op)
            elif isinstance(op, Publish):
                self.topics.published(op, result, now)
        for client in touched:
            delivery.drain_staging(client, now)

    def memberships_loaded(self, sid: int, rows: list[tuple[str, bool]], now: float) -> None:
        """The driver ran a :class:`~relayd._relay.effects.LoadMemberships`."""
        self.presence.loaded(sid, rows, now)

    def presence_event(self, note: PresenceNote, now: float) -> None:
        """A presence event, from this node or another (see rule 12)."""
        self.presence.event(note.topic, note.client, note.event, now)

    def membership_changed(
        self, topic: str, client: str, *, joined: bool, presence: bool, now: float
    ) -> None:
        """``client`` subscribed to ``topic`` or left it (over REST, on any node)."""
        self.presence.membership_changed(topic, client, joined, presence, now)

    def broadcast_heard(self, note: BroadcastNote) -> None:
        """A broadcast, from this node or another: to every live socket here."""
        self.topics.heard(note)

    def topic_changed(self, topic: str, presence: bool | None) -> None:
        """A topic's presence setting changed, or it was deleted or created (``None``): the
        live sockets here learn it (rule 12)."""
        self.presence.topic_changed(topic, presence)

    def typed(self, note: TypingNote, now: float) -> None:
        """A typing indicator, from this node or another: to its readers here."""
        self.presence.typed(note, now)

    def topics_counted(self, counts: dict[int, TopicCounts], now: float) -> None:
        """The driver ran a :class:`~relayd._relay.effects.CountTopics`."""
        self.topics.counted(counts, now)

    def topics_not_counted(self) -> None:
        """A :class:`~relayd._relay.effects.CountTopics` failed: asked again at the next tick."""
        self.topics.count_failed()

    def store_failed(self) -> None:
        """The store failed a batch (it will be retried): refuse new messages meanwhile."""
        self.delivery.store_down = True

    def store_recovered(self) -> None:
        self.delivery.store_down = False

    # --- cluster mode ----------------------------------------------------------------------

    def seqs_reserved(self, start: int, count: int) -> None:
        """The store reserved seqs ``start`` .. ``start + count - 1`` (see :class:`ReserveSeqs`)."""
        self._seqs.add(start, count)
        self.delivery.reserve_seqs()  # a block that came back below a floor raised meanwhile

    def raise_seq_floor(self, floor: int) -> bool:
        """A client arrived whose messages so far had seqs up to ``floor`` (on other nodes):
        what it sends here must sort after them (see relayd/_relay/seqs.py). ``True`` if
        seqs must be reserved first (a :class:`ReserveSeqs` is among the actions)."""
        if not self._seqs.raise_floor(floor):
            return False
        self.delivery.reserve_seqs()
        return True

    def wake(self, client: str, seq: int, now: float) -> None:
        """Another node stored a message for ``client`` at ``seq``: load it if the client is
        here. (The cursor goes back below ``seq``: a parked message can sort below what was
        loaded already; what is in memory is not loaded twice.)"""
        self.delivery.wake(client, seq, now)

    def receipts_owed(self, client: str, seq: int) -> None:
        """Another node stored a receipt owed to ``client`` at ``seq``: tell it if it is here."""
        self.receipts.owed(client, seq)

    def replaced_elsewhere(self, client: str, epoch: int, now: float) -> None:
        """A newer session of ``client`` (claim ``epoch``) opened on another node: the one
        here, if older, is closed with 4009 at once; what it had not had acknowledged is
        loaded from the store there."""
        self.sessions.replaced_elsewhere(client, epoch)

    def resync(self, now: float) -> None:
        """Hints may have been lost (the bus reconnected): every client here looks in the
        store again for messages, receipts and key changes it is owed."""
        for client, recipient in self.delivery.recipients.items():
            self.delivery.wake(client, 1, now)
            self.receipts.owed(client, 1)
            session = recipient.session
            if session.notices is None and session.phase is Phase.ACTIVE and not session.rest:
                self.receipts.load_key_notices(recipient.session)

    def fence(self, now: float) -> None:
        """Cluster mode: this node lost its lease, so other nodes may hold its clients now:
        every session is closed with 1013 (try again later: on another node, or here once
        Redis answers again)."""
        self.sessions.fence(now)
