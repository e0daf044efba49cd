"""The relay core: sessions, routing, mailboxes, acks, redelivery, expiry and receipts, as a
sans-I/O state machine.

It takes events — a socket opened, a frame received, frames written, a store operation done,
time passed — and answers with actions — send this frame, close that socket, verify this
token, run these store operations — which :meth:`RelayCore.take_actions` hands to the driver
(``relayd._relay.hub``). It never does I/O, never reads a clock and never imports trio: every
event carries ``now``, and every timer is data (:meth:`next_deadline`, :meth:`tick`).

Its modules follow the dependency direction: ``records.py`` (stored messages and the store
operations), ``model.py`` (sessions, messages, recipients, and the table of moves a message may
make), ``effects.py`` (the actions), ``seqs.py`` (message seqs), then this module, which routes
events to decisions.

Rules that hold between any two events:

1. A session is PENDING until a token is verified; while PENDING only an ``auth`` frame is
   read and nothing is delivered. At most one session per client is ACTIVE: a newer one
   replaces the older, which is closed with 4009; ``_active[client]`` names only the newest.
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
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from relayd._config import RelayConfig, WebsocketConfig
from relayd._ratelimit import RateLimiter

from . import frames as F
from .effects import Action, Announce, Authenticate, Close, Ping, ReserveSeqs, Send
from .frames import CloseCode, ProtocolError
from .model import (
    Identity,
    Message,
    Phase,
    ReceiptRef,
    Recipient,
    Ref,
    Session,
    Where,
    move,
)
from .records import (
    FINAL,
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
    StoredMessage,
    StoredReceipt,
    StoreOp,
)
from .seqs import SeqPool
from .stats import RelayStats

MAX_HELD_FRAMES = 16


class TimerKind(enum.Enum):
    AUTH = 1
    HEARTBEAT = 2
    TOKEN = 3
    ACK = 5
    BACKOFF = 6
    SWEEP = 7


# --- the core -----------------------------------------------------------------------------------


class RelayCore:
    """See the module docstring. All methods are synchronous and cheap; none blocks."""

    SWEEP_PAGE = 1000

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
    ) -> None:
        """``last_seq``: the highest message seq the store ever held; new ones go above.
        ``seqs``: where seqs come from instead (reserved in blocks: cluster mode).
        ``cluster``: other nodes share the store: announce what they must hear (see
        :class:`Announce`).
        ``recent``: the store's messages within the dedupe window, oldest first.
        ``may_message(sender, recipient)``: whether the roles allow it (``None``: anyone may
        message anyone)."""
        self.relay = relay
        self._may_message = may_message
        self.ws = websocket
        self.draining = False
        self.metrics = RelayStats()
        self._actions: list[Action] = []
        self._sessions: dict[int, Session] = {}
        self._active: dict[str, Session] = {}
        self._recipients: dict[str, Recipient] = {}
        self._staging: dict[str, deque[Message]] = {}
        self._by_seq: dict[int, Message] = {}
        # (sender, msgid) -> (accepted at, the last status its sender was told; None: none yet)
        self._recent: OrderedDict[tuple[str, str], tuple[float, Status | None]] = OrderedDict()
        # Messages accepted from each client whose first receipt is not sent yet, and their
        # bytes.
        self._awaiting: Counter[str] = Counter()
        self._awaiting_bytes: Counter[str] = Counter()
        # Admitted sockets (see open), in total and per source address.
        self._admitted = 0
        self._per_ip: Counter[str] = Counter()
        # Sockets with no token yet, oldest first, in all and per source address.
        self._waiting: dict[int, Session] = {}
        self._waiting_per_ip: dict[str, dict[int, Session]] = {}
        self._pending_auth = 0
        # Recent revocations, to refuse tokens whose check was in flight when they happened:
        # ("client", uuid) -> when (tokens issued before it), ("login", family) and
        # ("token", jti) -> when.
        self._revoked: dict[tuple[str, str], float] = {}
        self.pending_commit = 0
        self._timers: list[tuple[float, int, TimerKind, Any, int]] = []
        self._timer_seq = itertools.count()
        self._seqs = seqs if seqs is not None else SeqPool.endless(last_seq)
        self._cluster = cluster
        self.store_down = False  # the store failed its last batch: refuse new messages
        self._reads_in_flight = 0
        self._finished_while_reading: set[int] = set()
        # Attempt counts written to the store and not committed yet, by seq.
        self._counts_written: dict[int, int] = {}
        for known in recent:
            self._recent[(known.sender, known.msgid)] = (
                known.accepted_at,
                known.status or Status.QUEUED,
            )
        self._send_limiter = RateLimiter(
            rate=websocket.messages_per_second, burst=websocket.message_burst
        )
        self._strikes = RateLimiter(rate=1.0, burst=websocket.max_strikes)
        self._at(now + relay.sweep_interval, TimerKind.SWEEP, None, 0)

    def reconfigure(self, relay: RelayConfig, websocket: WebsocketConfig) -> None:
        """New settings (a reload): limits and timers apply from the next decision on."""
        self.relay = relay
        self.ws = websocket
        self._send_limiter.reconfigure(
            rate=websocket.messages_per_second, burst=websocket.message_burst
        )
        self._strikes.reconfigure(rate=1.0, burst=websocket.max_strikes)

    # --- outputs ---------------------------------------------------------------------------

    def take_actions(self) -> list[Action]:
        """The actions decided since the last call, in order."""
        actions, self._actions = self._actions, []
        return actions

    @property
    def accepting(self) -> bool:
        """False while too many messages await a commit: stop reading senders until True."""
        if self.store_down:
            return True  # read on, and refuse each message with store_unavailable
        return self.pending_commit < self.relay.max_pending_commit and self._seqs.remaining > 0

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def online(self, client: str) -> bool:
        session = self._active.get(client)
        return session is not None and session.phase is Phase.ACTIVE

    def stats(self) -> dict[str, int]:
        """Gauges for metrics."""
        mailbox = sum(r.mailbox_len() for r in self._recipients.values())
        unacked = sum(len(r.unacked) for r in self._recipients.values())
        return {
            "sessions": len(self._sessions),
            "sessions_pending": self._pending_auth,
            "sessions_active": len(self._active),
            "mailbox": mailbox,
            "unacked": unacked,
            "staged": sum(len(q) for q in self._staging.values()),
            "pending_commit": self.pending_commit,
            "dedupe_entries": len(self._recent),
            "held_bytes": sum(r.held_bytes for r in self._recipients.values()),
            "awaiting_bytes": sum(self._awaiting_bytes.values()),
        }

    # --- timers ----------------------------------------------------------------------------

    def _at(self, deadline: float, kind: TimerKind, target: Any, gen: int) -> None:
        heapq.heappush(self._timers, (deadline, next(self._timer_seq), kind, target, gen))

    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def tick(self, now: float) -> None:
        """Fire every timer due at ``now``."""
        while self._timers and self._timers[0][0] <= now:
            _, _, kind, target, gen = heapq.heappop(self._timers)
            if kind is TimerKind.ACK:
                self._ack_timeout(target, gen, now)
            elif kind is TimerKind.BACKOFF:
                self._backoff_done(target, gen, now)
            elif kind is TimerKind.HEARTBEAT:
                self._heartbeat(target, now)
            elif kind is TimerKind.AUTH:
                self._auth_timeout(target, now)
            elif kind is TimerKind.TOKEN:
                self._token_timer(target, gen, now)
            elif kind is TimerKind.SWEEP:
                self._sweep(now)

    # --- frames out ------------------------------------------------------------------------

    def _send(self, session: Session, text: str, ref: Ref | None = None) -> None:
        if session.phase is Phase.CLOSING:
            if isinstance(ref, ReceiptRef):
                self._owe(ref)
            return
        if session.queued >= self.ws.outbound_buffer:
            # Not even control frames fit: the socket has stopped draining.
            if isinstance(ref, ReceiptRef):
                self._owe(ref)
            self._close(session, CloseCode.SLOW_CONSUMER, "not reading", abort=True)
            return
        session.queued += 1
        self._actions.append(Send(session.sid, text, ref))

    def _error(
        self,
        session: Session,
        code: str,
        message: str,
        now: float,
        details: dict[str, Any] | None = None,
    ) -> None:
        self.metrics.events[f"error:{code}"] += 1
        self._send(session, F.error_frame(code, message, now, details=details))

    def _close(self, session: Session, code: int, reason: str, *, abort: bool = False) -> None:
        if session.phase is Phase.CLOSING:
            return
        if session.phase is Phase.PENDING:
            self._pending_auth -= 1
            self._unwait(session)
        session.phase = Phase.CLOSING
        self._actions.append(Close(session.sid, code, reason, abort))

    def _strike(self, session: Session, now: float) -> None:
        """Count a refused frame; too many in a row closes the session (4029)."""
        if self._strikes.acquire(str(session.sid), now) > 0:
            self._error(session, F.RATE_LIMITED, "too many refused frames", now)
            self._close(session, CloseCode.TRY_LATER, "too many refused frames")

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
    ) -> None:
        """A socket was accepted. ``token``: one offered in the URL, a header or a subprotocol;
        ``lean``: the client chose the lean receipt profile (no ``pending_ack`` receipts, no
        ``ack_received``).

        Connection limits: a socket is *admitted* — counted against ``max_connections`` and
        ``max_connections_per_ip``, or refused with 4029 — as soon as it offers a token, in the
        handshake or in an ``auth`` frame. Until then it *waits*, against limits of its own:
        past ``max_pending_auth_per_ip`` waiting sockets from one address, or
        ``max_pending_auth`` in all, the oldest waiting one is closed (4029) to make room. So
        sockets that never authenticate cannot lock out a client that presents a token.
        """
        session = Session(sid, remote, now, now, pong_observable, lean=lean)
        self._sessions[sid] = session
        self._pending_auth += 1
        if self.draining:
            self._error(session, F.SHUTTING_DOWN, "relayd is shutting down", now)
            self._close(session, CloseCode.GOING_AWAY, "server shutting down")
            return
        self._at(now + self.ws.auth_timeout, TimerKind.AUTH, sid, 0)
        if token is None:
            self._wait(session, now)
        else:
            self._verify(session, token, now)

    def _wait(self, session: Session, now: float) -> None:
        """Let a socket wait for its ``auth`` frame, closing the oldest waiting one if this
        one takes the last place, from its address or in all."""
        mine = self._waiting_per_ip.setdefault(session.remote, {})
        mine[session.sid] = session
        self._waiting[session.sid] = session
        for waiting, limit in (
            (mine, self.ws.max_pending_auth_per_ip),
            (self._waiting, self.ws.max_pending_auth),
        ):
            if len(waiting) > limit:
                oldest = next(iter(waiting.values()))
                self._error(oldest, F.TOO_MANY_CONNECTIONS, "too many unauthenticated sockets", now)
                self._close(oldest, CloseCode.TRY_LATER, "too many unauthenticated sockets")

    def _unwait(self, session: Session) -> None:
        if self._waiting.pop(session.sid, None) is None:
            return
        mine = self._waiting_per_ip[session.remote]
        del mine[session.sid]
        if not mine:
            del self._waiting_per_ip[session.remote]

    def _verify(self, session: Session, token: str, now: float) -> None:
        """Admit the socket (or refuse it, 4029) and have its token checked."""
        self._unwait(session)
        ws = self.ws
        if self._admitted >= ws.max_connections or (
            self._per_ip[session.remote] >= ws.max_connections_per_ip
        ):
            self._error(session, F.TOO_MANY_CONNECTIONS, "too many connections", now)
            self._close(session, CloseCode.TRY_LATER, "too many connections")
            return
        session.admitted = True
        self._admitted += 1
        self._per_ip[session.remote] += 1
        session.authenticating = True
        self._actions.append(Authenticate(session.sid, token, refresh=False))

    def authenticated(self, sid: int, who: Identity, now: float, *, refresh: bool) -> None:
        """A token offered by session ``sid`` verified as ``who``."""
        session = self._sessions.get(sid)
        if session is None or session.phase is Phase.CLOSING:
            return
        session.authenticating = False
        if self._was_revoked(who):
            self.auth_failed(sid, "token_revoked", "the token was revoked", now, refresh=refresh)
            return
        if refresh:
            if who.client != session.client:
                self._error(session, "token_invalid", "the token belongs to another client", now)
                self._close(session, CloseCode.AUTH_FAILED, "token_invalid")
                return
            session.expires_at = who.expires_at
            session.token_id, session.login = who.token_id, who.login
            self._arm_token_timers(session, now)
            self._send(session, F.token_refreshed_frame(who.expires_at, now))
            return
        if session.phase is not Phase.PENDING:
            return
        self._pending_auth -= 1
        session.phase = Phase.ACTIVE
        session.client = who.client
        session.token_id, session.login = who.token_id, who.login
        session.epoch = who.epoch
        session.expires_at = who.expires_at
        session.last_seen = session.last_ping = now
        previous = self._active.get(who.client)
        self._active[who.client] = session
        welcome = F.connection_frame(
            who.client,
            who.name,
            now,
            lean=session.lean,
            token_expires_at=who.expires_at,
            heartbeat_interval=self.ws.heartbeat_interval,
        )
        self._send(session, welcome)
        self._arm_token_timers(session, now)
        if session.pong_observable:
            # Otherwise the server under the transport pings and drops a silent peer.
            self._at(now + self.ws.heartbeat_interval, TimerKind.HEARTBEAT, session.sid, 0)
        recipient = self._recipients.get(who.client)
        if previous is not None and recipient is not None:
            # The old socket's unsent frames come back in `closed`; deliver after them.
            self._close(previous, CloseCode.REPLACED, "replaced by a newer connection", abort=True)
            recipient.session = session
            recipient.paused = True
        else:
            if previous is not None:
                self._close(previous, CloseCode.REPLACED, "replaced by a newer connection")
            recipient = self._recipients[who.client] = Recipient(who.client, session)
            self._load(recipient)
        self._load_receipts(session)
        self._load_key_notices(session)
        self._drain_staging(who.client, now)
        held, session.held = session.held, []
        for data in held:
            self.receive(sid, data, now)

    def auth_failed(self, sid: int, code: str, message: str, now: float, *, refresh: bool) -> None:
        """A token offered by session ``sid`` was refused (``code`` as in the REST API)."""
        session = self._sessions.get(sid)
        if session is None or session.phase is Phase.CLOSING:
            return
        session.authenticating = False
        session.held.clear()
        self._error(session, code, message, now)
        if refresh:
            self._strike(session, now)
        else:
            self._close(session, CloseCode.AUTH_FAILED, code)

    def _arm_token_timers(self, session: Session, now: float) -> None:
        """Make sure a timer fires by the session's next token event (the warning, then the
        expiry). One pending timer per session: a refresh that moves the expiry later leaves
        it in place, and it re-arms itself when it fires."""
        due = self._next_token_event(session, now)
        if session.token_timer is None or due < session.token_timer:
            session.token_timer = due
            self._at(due, TimerKind.TOKEN, session.sid, 0)

    def _next_token_event(self, session: Session, now: float) -> float:
        warn_at = session.expires_at - self.ws.token_warning
        warned = session.warned_for == session.expires_at
        if self.ws.token_warning > 0 and not warned and warn_at > now:
            return warn_at
        return session.expires_at

    def _token_timer(self, sid: int, _: int, now: float) -> None:
        session = self._sessions.get(sid)
        if session is None or session.phase is not Phase.ACTIVE:
            return
        if session.token_timer is not None and now < session.token_timer:
            return  # a stale entry: an earlier timer took its place
        session.token_timer = None
        if now >= session.expires_at:
            self._error(
                session, "token_expired", "the access token expired; reconnect with a new one", now
            )
            self._close(session, CloseCode.AUTH_FAILED, "token_expired")
            return
        if (
            self.ws.token_warning > 0
            and session.warned_for != session.expires_at
            and now >= session.expires_at - self.ws.token_warning
        ):
            session.warned_for = session.expires_at
            self._send(session, F.token_expiring_frame(session.expires_at, now))
        self._arm_token_timers(session, now)

    def _auth_timeout(self, sid: int, now: float) -> None:
        session = self._sessions.get(sid)
        if session is not None and session.phase is Phase.PENDING:
            self._error(session, F.NOT_AUTHENTICATED, "no valid token in time", now)
            self._close(session, CloseCode.AUTH_FAILED, "authentication timed out")

    def _heartbeat(self, sid: int, now: float) -> None:
        session = self._sessions.get(sid)
        if session is None or session.phase is not Phase.ACTIVE:
            return
        ws = self.ws
        silent_until = session.last_seen + ws.heartbeat_timeout
        if now >= silent_until:
            self._close(session, CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout", abort=True)
            return
        if now >= session.last_ping + ws.heartbeat_interval:
            session.last_ping = now
            self._actions.append(Ping(session.sid))
        next_at = min(session.last_ping + ws.heartbeat_interval, silent_until)
        self._at(next_at, TimerKind.HEARTBEAT, session.sid, 0)

    def pong(self, sid: int, now: float) -> None:
        """The transport saw a pong (or any sign of life below the frame level)."""
        session = self._sessions.get(sid)
        if session is not None:
            session.last_seen = now

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
        if login is not None:
            key = ("login", login)
        elif token_id is not None:
            key = ("token", token_id)
        else:
            key = ("client", client)
        self._revoked[key] = now
        session = self._active.get(client)
        if session is None or session.phase is not Phase.ACTIVE:
            return
        if (login is not None and session.login != login) or (
            token_id is not None and session.token_id != token_id
        ):
            return
        text = F.revoked_text(reason)
        self._error(session, "token_revoked", text, now, {"reason": reason})
        self._close(session, CloseCode.REVOKED, reason)

    # --- cluster mode and the store's health ------------------------------------------------

    def _reserve_seqs(self) -> None:
        if self._seqs.low:
            self._seqs.reserving = True
            self._actions.append(ReserveSeqs(self._seqs.block))

    def seqs_reserved(self, start: int, count: int) -> None:
        """The store reserved seqs ``start`` .. ``start + count - 1`` (see :class:`ReserveSeqs`)."""
        self._seqs.add(start, count)
        self._reserve_seqs()  # a block that came back below a floor raised meanwhile

    def raise_seq_floor(self, floor: int) -> bool:
        """A client arrived whose messages so far had seqs up to ``floor`` (on other nodes):
        what it sends here must sort after them (see relayd/_relay/seqs.py). ``True`` if
        seqs must be reserved first (a :class:`ReserveSeqs` is among the actions)."""
        if not self._seqs.raise_floor(floor):
            return False
        self._reserve_seqs()
        return True

    def wake(self, client: str, seq: int, now: float) -> None:
        """Another node stored a message for ``client`` at ``seq``: load it if the client is
        here. (The cursor goes back below ``seq``: a parked message can sort below what was
        loaded already; what is in memory is not loaded twice.)"""
        recipient = self._recipients.get(client)
        if recipient is None:
            return
        recipient.rewind = min(recipient.rewind, seq - 1)
        recipient.backlog = True
        recipient.stored_since += 1
        if recipient.loading is None:
            self._pump(recipient, now)

    def receipts_owed(self, client: str, seq: int) -> None:
        """Another node stored a receipt owed to ``client`` at ``seq``: tell it if it is here."""
        session = self._active.get(client)
        if session is None or session.phase is not Phase.ACTIVE:
            return
        if session.receipts is None:
            session.receipt_cursor = min(session.receipt_cursor, seq - 1)
            self._load_receipts(session)
        else:
            session.receipt_rewind = min(session.receipt_rewind, seq - 1)

    def replaced_elsewhere(self, client: str, epoch: int, now: float) -> None:
        """A newer session of ``client`` (claim ``epoch``) opened on another node: the one
        here, if older, is closed with 4009 at once; what it had not had acknowledged is
        loaded from the store there."""
        session = self._active.get(client)
        if session is None or session.epoch >= epoch or session.phase is Phase.CLOSING:
            return
        self._close(session, CloseCode.REPLACED, "replaced by a newer connection", abort=True)

    def resync(self, now: float) -> None:
        """Hints may have been lost (the bus reconnected): every client here looks in the
        store again for messages, receipts and key changes it is owed."""
        for client, recipient in self._recipients.items():
            self.wake(client, 1, now)
            self.receipts_owed(client, 1)
            if recipient.session.notices is None and recipient.session.phase is Phase.ACTIVE:
                self._load_key_notices(recipient.session)

    def fence(self, now: float) -> None:
        """Cluster mode: this node lost its lease, so other nodes may hold its clients now:
        every session is closed with 1013 (try again later: on another node, or here once
        Redis answers again)."""
        for session in list(self._sessions.values()):
            self._error(session, F.STORE_UNAVAILABLE, "this node lost contact with the store", now)
            self._close(session, CloseCode.TRY_AGAIN_LATER, "lost contact with the store")

    def store_failed(self) -> None:
        """The store failed a batch (it will be retried): refuse new messages meanwhile."""
        self.store_down = True

    def store_recovered(self) -> None:
        self.store_down = False

    def active_tokens(self) -> list[tuple[str, str]]:
        """``(client, jti)`` of the token each active session runs on."""
        return [(client, s.token_id) for client, s in self._active.items() if s.token_id]

    def recent_status(self, sender: str, msgid: str) -> tuple[float, str | None] | None:
        """(accepted at, the last status its sender was told) of a message within the
        dedupe window; ``None`` if it is not remembered."""
        known = self._recent.get((sender, msgid))
        if known is None:
            return None
        return known[0], None if known[1] is None else known[1].value

    def _was_revoked(self, who: Identity) -> bool:
        revoked = self._revoked
        if who.issued_at < revoked.get(("client", who.client), float("-inf")):
            return True
        if who.login is not None and ("login", who.login) in revoked:
            return True
        return ("token", who.token_id) in revoked

    def drain(self, now: float) -> None:
        """Shutdown: tell every session, then close it with 1001 once its frames are written."""
        self.draining = True
        for session in list(self._sessions.values()):
            if session.phase is Phase.ACTIVE:
                self._send(session, F.shutdown_frame(now))
            self._close(session, CloseCode.GOING_AWAY, "server shutting down")

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
        session = self._sessions.get(sid)
        if session is None:
            return
        if session.phase is Phase.PENDING:
            self._pending_auth -= 1
            self._unwait(session)
        session.phase = Phase.CLOSING  # nothing more is queued on it from here
        self._account_written(session, written[0], written[1], now)
        del self._sessions[sid]
        if session.admitted:
            self._admitted -= 1
            self._per_ip[session.remote] -= 1
            if self._per_ip[session.remote] <= 0:
                del self._per_ip[session.remote]
        returned: list[Message] = []
        for ref in unsent:
            if isinstance(ref, ReceiptRef):
                self._owe(ref)
            elif isinstance(ref, KeyNotice):
                continue  # owed in the store until written
            elif ref.where is Where.SENT and ref.sid == sid:
                ref.attempts -= 1  # never written: not an attempt
                returned.append(ref)
        for ref in interrupted:
            if isinstance(ref, ReceiptRef):
                self._owe(ref)  # it may have arrived: receipts are told at least once
            elif isinstance(ref, KeyNotice):
                continue  # it may have arrived: key changes are told at least once
            elif ref.where is Where.SENT and ref.sid == sid:
                if ref.acknowledge:
                    returned.append(ref)
                else:  # at most once: it may have arrived, so it is not sent again
                    self._finish(ref, Status.FAILED, now, reason="connection_lost")
        client = session.client
        if client is None:
            return
        owed = [r.seq for r in (*unsent, *interrupted) if isinstance(r, ReceiptRef) and r.owed]
        if owed and self._cluster:
            # Stored only now: the client's session on another node may have loaded its
            # receipts already.
            self._actions.append(Announce("receipts", client, min(owed)))
        recipient = self._recipients.get(client)
        if self._active.get(client) is session:
            del self._active[client]
            if recipient is not None:
                del self._recipients[client]
                self._requeue(recipient, sid, returned)
                self._unload(recipient, now)
        elif recipient is not None:
            # Replaced: what the old socket did not finish goes first on the new one.
            self._requeue(recipient, sid, returned)
            recipient.paused = False
            self._pump(recipient, now)
        else:
            # Replaced, and its successor has gone too: what it did not finish is stored.
            self._park(client, returned, now)

    def _owe(self, ref: ReceiptRef) -> None:
        """A final receipt was not (surely) written: keep it owed in the store."""
        if ref.owed is not None:
            self._actions.append(ref.owed)
        # A stored message's row says the receipt is owed until its frame is written.

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
                    self._tell(message, Status.QUEUED_OFFLINE, now)
            else:
                message.durable = True  # never sent, so never an attempt: see closed()
                to_store.append(message)
        if stored and self._cluster:
            # The client may be on another node already, which may have loaded its queue
            # before these came here (see wake).
            self._actions.append(Announce("wake", client, min(stored)))
        if to_store:
            queue = self._staging.setdefault(client, deque())
            queue.extendleft(reversed(to_store))
            for message in to_store:
                move(message, Where.STAGED)
                self.pending_commit += 1
                self._actions.append(self._insert_op(message))

    def _record_attempts(self, message: Message) -> None:
        """Bring the store's attempt count of a stored message up to date."""
        if message.attempts != message.recorded_attempts:
            message.recorded_attempts = message.attempts
            # A read already queued reads the count before this write: see _message_from_row.
            self._counts_written[message.seq] = message.attempts
            self._actions.append(SetAttempts(message.seq, message.attempts))

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

    def _has_room(self, recipient: Recipient, waiting: int = 0) -> bool:
        """Whether a new message for ``recipient`` may join its mailbox (``waiting``: others
        staged ahead of it)."""
        return (
            not recipient.backlog
            and recipient.mailbox_len() + waiting < self.relay.mailbox_size
            and recipient.held_bytes < self.relay.mailbox_bytes
        )

    # --- frames in -------------------------------------------------------------------------

    def receive(self, sid: int, data: str | bytes, now: float) -> None:
        """Session ``sid`` sent a frame."""
        session = self._sessions.get(sid)
        if session is None or session.phase is Phase.CLOSING:
            return
        session.last_seen = now
        limit = self.ws.max_frame_bytes
        # The socket libraries count characters; a character is at most 4 bytes.
        if len(data) > limit // 4 and isinstance(data, str) and len(data.encode()) > limit:
            self._close(session, CloseCode.MESSAGE_TOO_BIG, "frame too big", abort=True)
            return
        if session.phase is Phase.PENDING:
            self._receive_pending(session, data, now)
            return
        if isinstance(data, bytes):
            self._error(session, F.BINARY_UNSUPPORTED, "binary frames are not supported", now)
            self._strike(session, now)
            return
        try:
            doc = F.decode(data)
            kind = doc.get("type")
            if kind is None or kind == "message":
                self._receive_message(session, doc, now)
            elif kind == "ack":
                self._receive_ack(session, doc, now)
            elif kind in ("refresh", "refresh_token"):
                token = doc.get("token")
                if not isinstance(token, str) or not token:
                    raise ProtocolError(
                        F.INVALID_MESSAGE_FORMAT, "token: must be a string", field="token"
                    )
                # Checking a token costs the store a read: refreshes count against the
                # message rate, and one at a time.
                assert session.client is not None
                wait = self._send_limiter.acquire(session.client, now)
                if wait > 0:
                    raise F.RateLimited(wait)
                if session.authenticating:
                    raise ProtocolError(
                        F.REFRESH_IN_PROGRESS, "a refresh is being checked; wait for its answer"
                    )
                session.authenticating = True
                self._actions.append(Authenticate(sid, token, refresh=True))
            elif kind == "ping":
                self._send(session, F.pong_frame(now))
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
                self._strike(session, now)

    def _receive_pending(self, session: Session, data: str | bytes, now: float) -> None:
        """Before authentication only an ``auth`` frame is read; anything else closes 4001."""
        if session.authenticating:
            # A client may send right behind the token it offered: those frames are read
            # once the token is verified (and dropped if it is not).
            if len(session.held) < MAX_HELD_FRAMES:
                session.held.append(data)
                return
            self._error(session, F.NOT_AUTHENTICATED, "too many frames before authentication", now)
            self._close(session, CloseCode.AUTH_FAILED, "not authenticated")
            return
        try:
            doc = F.decode(data) if isinstance(data, str) else None
        except ProtocolError:
            doc = None
        token = doc.get("token") if doc is not None else None
        if doc is None or doc.get("type") != "auth":
            self._error(session, F.NOT_AUTHENTICATED, "authenticate first", now)
            self._close(session, CloseCode.AUTH_FAILED, "not authenticated")
        elif not isinstance(token, str) or not token:
            self._error(session, "missing_token", "token: must be a non-empty string", now)
            self._close(session, CloseCode.AUTH_FAILED, "missing_token")
        else:
            self._verify(session, token, now)

    def _receive_message(self, session: Session, doc: dict[str, Any], now: float) -> None:
        assert session.client is not None
        sender = session.client
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
        wait = self._send_limiter.acquire(sender, now)
        if wait > 0:
            raise F.RateLimited(wait, msgid=envelope.msgid, to=envelope.to)
        msgid = envelope.msgid or F.new_msgid()
        known = self._recent.get((sender, msgid))
        if known is not None:
            self._send_receipt_frame(
                session, "delivery_status", msgid, envelope.to, known[1], now, duplicate=True
            )
            return
        seq = None if self.store_down else self._seqs.take()
        self._reserve_seqs()
        if seq is None:
            raise ProtocolError(
                F.STORE_UNAVAILABLE,
                "the store cannot take messages now; send again later",
                details={"msgid": msgid, "to": envelope.to, "retry_after": 1.0},
                strike=False,
            )
        ttl = min(envelope.ttl or self.relay.default_ttl, self.relay.max_ttl)
        recipient = self._recipients.get(envelope.to)
        waiting = len(self._staging.get(envelope.to, ()))
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
        )
        self.metrics.events["accepted"] += 1
        self._awaiting[sender] += 1
        self._awaiting_bytes[sender] += message.size
        self._remember(message, now)
        self._stage(message, front=False)
        self._drain_staging(message.recipient, now)

    def _receive_ack(self, session: Session, doc: dict[str, Any], now: float) -> None:
        assert session.client is not None
        msgid = doc.get("msgid")
        if not isinstance(msgid, str) or not msgid:
            raise ProtocolError(
                F.INVALID_ACK, "msgid: must be the msgid of a received message", field="msgid"
            )
        recipient = self._recipients.get(session.client)
        message = recipient.unacked.get(msgid) if recipient is not None else None
        if recipient is None or message is None or message.sid != session.sid:
            self._send(session, F.ack_received_frame(msgid, "unknown", now))
            return
        del recipient.unacked[msgid]
        if message.written_at:  # an ack may come before relayd hears the write completed
            self.metrics.ack_latency.observe(now - message.written_at)
        self._finish(message, Status.ACKNOWLEDGED, now)
        if not session.lean:
            self._send(session, F.ack_received_frame(msgid, "acknowledged", now))
        self._pump(recipient, now)

    # --- acceptance and routing ------------------------------------------------------------

    def _remember(self, message: Message, now: float) -> None:
        """Keep the message id for deduplication, within the window and the entry bound."""
        recent = self._recent
        recent[message.key] = (now, None)
        horizon = now - self.relay.dedupe_window
        while recent and (
            len(recent) > self.relay.dedupe_max_entries or next(iter(recent.values()))[0] < horizon
        ):
            recent.popitem(last=False)

    def _stage(self, message: Message, *, front: bool) -> None:
        queue = self._staging.setdefault(message.recipient, deque())
        if front:
            queue.appendleft(message)
        else:
            queue.append(message)
        move(message, Where.STAGED)
        if message.durable and not message.committed:
            if self.online(message.recipient):
                # It may go out as soon as it is stored: see Message.recorded_attempts.
                message.recorded_attempts = message.attempts + 1
            self.pending_commit += 1
            self._actions.append(self._insert_op(message))

    def _insert_op(self, message: Message, **final: Any) -> Insert:
        """Store ``message``: queued, or with ``final`` (status, reason...) only its receipt."""
        return Insert(
            ref=None if final else message,
            seq=message.seq,
            sender=message.sender,
            recipient=message.recipient,
            msgid=message.msgid,
            high=message.high,
            acknowledge=message.acknowledge,
            fields="" if final else message.fields,
            accepted_at=message.accepted_at,
            expires_at=message.expires_at,
            attempts=message.recorded_attempts,
            **final,
        )

    def _drain_staging(self, client: str, now: float) -> None:
        """Route staged messages for ``client`` in order, up to the first not yet ready."""
        queue = self._staging.get(client)
        while queue:
            head = queue[0]
            if head.durable and not head.committed:
                return
            queue.popleft()
            if not self._route(head, now):
                return
        self._staging.pop(client, None)

    def _route(self, message: Message, now: float) -> bool:
        """Send a ready message on its way. False if it had to go back to staging."""
        recipient = self._recipients.get(message.recipient)
        if now >= message.expires_at:
            self._finish(message, Status.EXPIRED, now)
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
                self._tell(message, Status.PENDING_ACK, now)
            self._pump(recipient, now)
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
            self._actions.append(Announce("wake", message.recipient, message.seq))
        self._tell(message, Status.QUEUED if online else Status.QUEUED_OFFLINE, now)
        return True

    # --- delivery --------------------------------------------------------------------------

    def _pump(self, recipient: Recipient, now: float) -> None:
        """Move messages from the mailbox to the socket while the window and buffer allow."""
        session = recipient.session
        if recipient.paused or session.phase is not Phase.ACTIVE:
            return
        window = self.relay.inflight_window
        # Deliveries take at most half of the socket's buffer; receipts and control frames
        # have the rest (see readable).
        room = max(1, self.ws.outbound_buffer // 2)
        while recipient.high or recipient.normal:
            if session.queued >= room or len(recipient.unacked) >= window:
                break
            queue = recipient.high or recipient.normal
            message = queue[0]
            if message.acknowledge and message.msgid in recipient.unacked:
                break  # same msgid still unacked: wait, so acks stay unambiguous
            if message.durable and message.recorded_attempts == 0:
                self._count_first_attempts(recipient)
            if message.recording:
                break  # its row does not count this attempt yet: see Message
            queue.popleft()
            if now >= message.expires_at:
                self._finish(message, Status.EXPIRED, now)
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
                self.metrics.events["redelivered"] += 1
            text = F.delivery_frame(
                message.fields, attempt=message.attempts, redelivered=redelivered
            )
            self._send(session, text, message)
        if (
            recipient.backlog
            and recipient.loading is None
            and recipient.mailbox_len() <= self.relay.mailbox_size // 2
            and recipient.held_bytes <= self.relay.mailbox_bytes // 2
        ):
            self._load(recipient)

    def _count_first_attempts(self, recipient: Recipient) -> None:
        """Have the store count a first attempt for every stored message in the recipient's
        mailbox that counts none: one write for all, before any of them goes out."""
        for message in itertools.chain(recipient.high, recipient.normal):
            if message.durable and message.recorded_attempts == 0:
                message.recorded_attempts = 1
                message.recording = True
                self._actions.append(SetAttempts(message.seq, 1, ref=message))

    def _attempt_counted(self, message: Message, now: float) -> None:
        message.recording = False
        if message.holder is not None:
            self._pump(message.holder, now)

    def _load(self, recipient: Recipient) -> None:
        op = LoadQueue(
            recipient.client,
            int(min(recipient.cursor, recipient.rewind)),
            self.relay.mailbox_size - recipient.mailbox_len(),
            max(1, self.relay.mailbox_bytes - recipient.held_bytes),
        )
        recipient.loading = op
        recipient.rewind = math.inf
        recipient.load_mark = recipient.stored_since
        self._read(op)

    def written(self, sid: int, count: int, refs: Iterable[Ref], now: float) -> None:
        """``count`` frames queued on ``sid`` were written; ``refs`` are theirs that had one."""
        session = self._sessions.get(sid)
        if session is None:
            return
        self._account_written(session, count, refs, now)
        if (
            session.receipts_more
            and session.receipts is None
            and session.queued <= self._receipt_page
            and session.phase is Phase.ACTIVE
        ):
            self._load_receipts(session)
        if (
            session.notices_more
            and session.notices is None
            and session.notices_out == 0
            and session.queued <= self._receipt_page
            and session.phase is Phase.ACTIVE
        ):
            self._load_key_notices(session)
        recipient = self._recipients.get(session.client) if session.client else None
        if recipient is not None and recipient.session is session:
            self._pump(recipient, now)

    def _account_written(
        self, session: Session, count: int, refs: Iterable[Ref], now: float
    ) -> None:
        """What a write completes: deliveries become unacked or delivered, receipts told."""
        sid = session.sid
        session.queued -= count
        self.metrics.frames_out += count
        told: list[int] = []
        for ref in refs:
            if isinstance(ref, ReceiptRef):
                if ref.owed is None:
                    told.append(ref.seq)
                else:  # keep a trace, for deduplication across a restart
                    self._actions.append(attrs.evolve(ref.owed, receipt_pending=False))
                continue
            if isinstance(ref, KeyNotice):
                session.notices_out -= 1
                self._actions.append(ClearKeyNotice(ref))
                continue
            if ref.where is not Where.SENT or ref.sid != sid:
                continue
            if ref.attempts == 1:
                self.metrics.delivery_latency.observe(now - ref.accepted_at)
            if ref.acknowledge:
                move(ref, Where.UNACKED)
                ref.written_at = now
                self._at(now + self.relay.ack_timeout, TimerKind.ACK, ref, ref.gen)
            else:
                self._finish(ref, Status.DELIVERED, now)
        if told:
            self._actions.append(SetReceiptPending(tuple(told), pending=False))

    def _ack_timeout(self, message: Message, gen: int, now: float) -> None:
        if message.gen != gen or message.where is not Where.UNACKED:
            return
        recipient = self._recipients.get(message.recipient)
        if message.attempts >= self.relay.max_attempts or now >= message.expires_at:
            if recipient is not None:
                recipient.unacked.pop(message.msgid, None)
            expired = now >= message.expires_at
            self._finish(
                message,
                Status.EXPIRED if expired else Status.FAILED,
                now,
                reason="" if expired else "not_acknowledged",
            )
            if recipient is not None:
                self._pump(recipient, now)
            return
        move(message, Where.BACKOFF)
        delay = min(
            self.relay.backoff_initial * 2 ** (message.attempts - 1), self.relay.backoff_max
        )
        self._at(now + delay, TimerKind.BACKOFF, message, message.gen)

    def _backoff_done(self, message: Message, gen: int, now: float) -> None:
        if message.gen != gen or message.where is not Where.BACKOFF:
            return
        recipient = self._recipients.get(message.recipient)
        if recipient is None:
            return
        del recipient.unacked[message.msgid]
        move(message, Where.MAILBOX)
        (recipient.high if message.high else recipient.normal).appendleft(message)
        self._pump(recipient, now)

    # --- outcomes and receipts -------------------------------------------------------------

    def _finish(self, message: Message, status: Status, now: float, *, reason: str = "") -> None:
        """The message reached its final ``status``: record it and tell its sender."""
        self.metrics.events[status.value] += 1
        if self._reads_in_flight:
            self._finished_while_reading.add(message.seq)
        move(message, Where.DONE)
        message.gen += 1
        self._by_seq.pop(message.seq, None)
        self._release(message)
        self._tell(message, status, now, reason=reason)

    def _tell(self, message: Message, status: Status, now: float, *, reason: str = "") -> None:
        """Tell the sender ``status``. A final status is stored if the sender is offline."""
        first = message.status is None
        message.status = status
        if first:
            self._told_first(message)
        known = self._recent.get(message.key)
        if known is not None:
            self._recent[message.key] = (known[0], status)
        sender = self._active.get(message.sender)
        online = sender is not None and sender.phase is Phase.ACTIVE
        ref: ReceiptRef | None = None
        if status in FINAL:
            # The receipt is owed until its frame is written (see ReceiptRef).
            if message.committed:
                self._actions.append(Finish(message.seq, status, now, True, reason))
                ref = ReceiptRef(message.seq)
            else:
                owed = self._insert_op(message, status=status, receipt_pending=True, reason=reason)
                if not online:
                    self._actions.append(owed)
                ref = ReceiptRef(message.seq, owed)
            if not online and self._cluster:
                self._actions.append(Announce("receipts", message.sender, message.seq))
        if online and sender is not None and not (sender.lean and status is Status.PENDING_ACK):
            kind = "delivery_status" if first else "delivery_update"
            self._send_receipt_frame(
                sender, kind, message.msgid, message.recipient, status, now, reason=reason, ref=ref
            )

    def _send_receipt_frame(
        self,
        session: Session,
        kind: str,
        msgid: str,
        recipient: str,
        status: Status | None,
        now: float,
        *,
        reason: str = "",
        duplicate: bool = False,
        ref: Ref | None = None,
    ) -> None:
        if duplicate:
            self.metrics.events["duplicate"] += 1
        if isinstance(ref, ReceiptRef) and session.queued >= self._receipt_room:
            # A burst of final receipts (a group commit, a sweep) would crowd the socket: the
            # rest stay owed in the store and are loaded as it drains.
            self._owe(ref)
            session.receipts_more = True
            session.receipt_cursor = min(session.receipt_cursor, ref.seq - 1)
            return
        value = status.value if status is not None else "accepted"
        frame = F.receipt_frame(
            kind, msgid, recipient, value, now, reason=reason, duplicate=duplicate
        )
        self._send(session, frame, ref)

    # --- store results ---------------------------------------------------------------------

    def store_done(self, ops: list[StoreOp], results: list[Any], now: float) -> None:
        """The store ran ``ops`` (in order); ``results`` are theirs."""
        touched: set[str] = set()
        for op, result in zip(ops, results, strict=True):
            if isinstance(op, Insert) and isinstance(op.ref, Message):
                self._inserted(op.ref, result, now)
                touched.add(op.recipient)
            elif isinstance(op, LoadQueue):
                self._loaded(op, result, now)
                self._read_done()
            elif isinstance(op, LoadReceipts):
                self._receipts_loaded(op, result, now)
            elif isinstance(op, LoadKeyNotices):
                self._key_notices_loaded(op, result, now)
            elif isinstance(op, FindExpired):
                self._expired_found(result, now)
                self._read_done()
            elif isinstance(op, SetAttempts):
                if isinstance(op.ref, Message):
                    self._attempt_counted(op.ref, now)
                elif self._counts_written.get(op.seq) == op.attempts:
                    del self._counts_written[op.seq]
        for client in touched:
            self._drain_staging(client, now)

    def _inserted(self, message: Message, outcome: Any, now: float) -> None:
        self.pending_commit -= 1
        if isinstance(outcome, Inserted):
            message.committed = True
            if message.where is Where.STAGED:
                self._by_seq[outcome.seq] = message
            return
        # Refused: take it out of staging and say why.
        queue = self._staging.get(message.recipient)
        if queue is not None and message in queue:
            queue.remove(message)
        if message.status is not None:
            # Its sender was told it was on its way (delivered straight from memory, then
            # parked when its recipient left): it fails, with a receipt, not in silence.
            code = outcome.code if isinstance(outcome, Refused) else "duplicate"
            self._finish(message, Status.FAILED, now, reason=code)
            return
        self._told_first(message)
        move(message, Where.DONE)
        sender = self._active.get(message.sender)
        if isinstance(outcome, Duplicate):
            self._recent[message.key] = (now, outcome.status or Status.QUEUED)
            if sender is not None:
                self._send_receipt_frame(
                    sender,
                    "delivery_status",
                    message.msgid,
                    message.recipient,
                    outcome.status or Status.QUEUED,
                    now,
                    duplicate=True,
                )
            return
        self._recent.pop(message.key, None)
        if sender is not None and isinstance(outcome, Refused):
            text = (
                "no such recipient"
                if outcome.code == F.UNKNOWN_RECIPIENT
                else "the recipient's queue is full"
            )
            self._error(
                sender, outcome.code, text, now, {"msgid": message.msgid, "to": message.recipient}
            )

    def _told_first(self, message: Message) -> None:
        """The sender got its first answer about ``message`` (a receipt or an error)."""
        count = self._awaiting[message.sender] - 1
        if count > 0:
            self._awaiting[message.sender] = count
            self._awaiting_bytes[message.sender] -= message.size
        else:
            del self._awaiting[message.sender]
            del self._awaiting_bytes[message.sender]

    def _message_from_row(self, row: StoredMessage) -> Message:
        known = self._recent.get((row.sender, row.msgid))
        # A count written after this read was queued is the truth, not the row's.
        attempts = self._counts_written.get(row.seq, row.attempts)
        message = Message(
            sender=row.sender,
            recipient=row.recipient,
            msgid=row.msgid,
            high=row.high,
            acknowledge=row.acknowledge,
            fields=row.fields,
            accepted_at=row.accepted_at,
            expires_at=row.expires_at,
            durable=True,
            seq=row.seq,
            attempts=attempts,
            recorded_attempts=attempts,
            committed=True,
        )
        # Its sender was told something when it was stored; later receipts are updates.
        message.status = Status.QUEUED
        if known is not None and known[1] is not None:
            message.status = known[1]
        return message

    def _loaded(self, op: LoadQueue, page: QueuePage, now: float) -> None:
        recipient = self._recipients.get(op.recipient)
        if recipient is None or recipient.loading is not op:
            return  # the client left, or came back, since
        recipient.loading = None
        # A message still staged for the recipient goes before every row after it: the page
        # stops there, and the rest is loaded once it has been routed (rule 3).
        staged = self._staging.get(op.recipient)
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
        self._pump(recipient, now)
        self._drain_staging(op.recipient, now)

    def _load_receipts(self, session: Session) -> None:
        """Load the next page of receipts owed to the session's client: a page fits in a
        quarter of its outbound buffer, and the next is loaded once that has drained."""
        assert session.client is not None
        op = LoadReceipts(session.client, session.receipt_cursor, self._receipt_page)
        session.receipts = op
        session.receipts_more = False
        self._actions.append(op)

    @property
    def _receipt_page(self) -> int:
        return max(1, self.ws.outbound_buffer // 4)

    @property
    def _receipt_room(self) -> int:
        """Final receipts are sent while fewer frames than this wait on the socket."""
        return max(1, self.ws.outbound_buffer * 3 // 4)

    def readable(self, sid: int) -> bool:
        """Whether to read the next frame of ``sid``. Not while its socket is half full, nor
        while a quarter of its buffer's worth of its messages (or ``read_ahead_bytes`` of
        them) await their first receipt: what a client sends can never make more frames for it
        than its socket holds, nor hold more than that much memory before it is stored."""
        session = self._sessions.get(sid)
        if session is None:
            return True  # read on: the transport will report the close
        buffer = self.ws.outbound_buffer
        if session.queued >= max(1, buffer // 2) or session.client is None:
            return session.queued < max(1, buffer // 2)
        return self._awaiting.get(session.client, 0) < max(1, buffer // 4) and (
            self._awaiting_bytes.get(session.client, 0) < self.ws.read_ahead_bytes
        )

    def _receipts_loaded(self, op: LoadReceipts, rows: list[StoredReceipt], now: float) -> None:
        session = self._active.get(op.sender)
        if session is None or session.receipts is not op:
            return  # the client left, or came back, since
        session.receipts = None
        if session.phase is not Phase.ACTIVE:
            return
        session.receipts_more = len(rows) == op.limit
        for row in rows:
            session.receipt_cursor = max(session.receipt_cursor, row.seq)
            self._send_receipt_frame(
                session,
                "delivery_update",
                row.msgid,
                row.recipient,
                row.status,
                now,
                reason=row.reason,
                ref=ReceiptRef(row.seq),
            )
        if session.receipt_rewind < math.inf:
            # Hinted while this load was under way: look again from below the hint.
            session.receipt_cursor = int(min(session.receipt_cursor, session.receipt_rewind))
            session.receipt_rewind = math.inf
            if session.queued <= self._receipt_page:
                self._load_receipts(session)
            else:
                session.receipts_more = True  # loaded once the socket drains (see written)

    # --- key changes ---------------------------------------------------------------------

    def key_changed(self, notices: Iterable[KeyNotice], now: float) -> None:
        """Key changes were committed, each owed to a correspondent (its ``reader``): an online
        one is sent the frame now, if its socket has room; the store keeps the rest owed (see
        rule 7)."""
        for notice in notices:
            session = self._active.get(notice.reader)
            if session is not None and session.phase is Phase.ACTIVE:
                self._send_key_notice(session, notice, now)

    def _send_key_notice(self, session: Session, notice: KeyNotice, now: float) -> None:
        if session.queued >= self._receipt_room:
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
        self._send(session, frame, notice)

    def _load_key_notices(self, session: Session) -> None:
        """Load the next page of key changes owed to the session's client (a page fits in a
        quarter of its outbound buffer; the next is loaded once they are written)."""
        assert session.client is not None
        op = LoadKeyNotices(session.client, self._receipt_page)
        session.notices = op
        session.notices_more = False
        self._actions.append(op)

    def _key_notices_loaded(self, op: LoadKeyNotices, rows: list[KeyNotice], now: float) -> None:
        session = self._active.get(op.reader)
        if session is None or session.notices is not op:
            return  # the client left, or came back, since
        session.notices = None
        if session.phase is not Phase.ACTIVE:
            return
        session.notices_more = len(rows) == op.limit
        for notice in rows:
            self._send_key_notice(session, notice, now)

    def _sweep(self, now: float) -> None:
        # A revocation is remembered only to refuse tokens whose check was in flight when it
        # happened; the store refuses them from then on.
        horizon = now - self.relay.sweep_interval
        self._revoked = {key: at for key, at in self._revoked.items() if at >= horizon}
        self._read(FindExpired(now, self.SWEEP_PAGE))
        self._actions.append(
            Purge(
                finished_before=now - self.relay.dedupe_window,
                receipts_before=now - self.relay.max_ttl,
            )
        )
        self._at(now + self.relay.sweep_interval, TimerKind.SWEEP, None, 0)

    def _read(self, op: LoadQueue | FindExpired) -> None:
        """Ask the store for queued messages. Until the answer comes, messages finished here
        are remembered: the answer may still show them queued."""
        self._reads_in_flight += 1
        self._actions.append(op)

    def _read_done(self) -> None:
        self._reads_in_flight -= 1
        if not self._reads_in_flight:
            self._finished_while_reading.clear()

    def _expired_found(self, rows: list[StoredMessage], now: float) -> None:
        for row in rows:
            if row.seq in self._finished_while_reading:
                continue  # acknowledged (or otherwise finished) since the sweep looked
            message = self._by_seq.get(row.seq)
            if message is None:
                message = self._message_from_row(row)
            else:
                recipient = self._recipients.get(message.recipient)
                queues = [self._staging.get(message.recipient, deque())]
                if recipient is not None:
                    if recipient.unacked.get(message.msgid) is message:
                        del recipient.unacked[message.msgid]
                    queues += [recipient.high, recipient.normal]
                for queue in queues:
                    if message in queue:
                        queue.remove(message)
            self._finish(message, Status.EXPIRED, now)
        if len(rows) == self.SWEEP_PAGE:
            self._read(FindExpired(now, self.SWEEP_PAGE))
