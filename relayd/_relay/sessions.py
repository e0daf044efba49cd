"""Session lifecycle: sockets admitted, authenticated, kept alive, refreshed, revoked, closed.

:class:`Sessions` owns every session and the index of the active one per client (rule 1 of
the core's module docstring), the connection limits, the token and heartbeat timers and the
recent revocations. It is also the one way a frame reaches a socket (:meth:`Sessions.send`),
so the outbound buffer bound (rule 5) holds for every frame. It knows nothing of messages:
when a session becomes active or goes, the core tells delivery and receipts.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from relayd._ratelimit import RateLimiter

from . import frames as F
from .context import Context, TimerKind
from .effects import Authenticate, Close, Ping, Send
from .frames import CloseCode, ProtocolError
from .model import Identity, Phase, ReceiptRef, Ref, Session

# Frames a client may send behind its token while relayd checks it; more closes 4001.
MAX_HELD_FRAMES = 16


class Sessions:
    """The sessions, by id and by client. ``limiter``: the per-client message rate, which a
    token refresh counts against too (it costs the store a read)."""

    def __init__(self, ctx: Context, limiter: RateLimiter) -> None:
        self.ctx = ctx
        self.limiter = limiter
        self.strikes = RateLimiter(rate=1.0, burst=ctx.ws.max_strikes)
        self.draining = False
        self.by_sid: dict[int, Session] = {}
        self.active: dict[str, Session] = {}
        # Admitted sockets (see open), in total and per source address.
        self._admitted = 0
        self._per_ip: Counter[str] = Counter()
        # Sockets with no token yet, oldest first, in all and per source address.
        self._waiting: dict[int, Session] = {}
        self._waiting_per_ip: dict[str, dict[int, Session]] = {}
        self.pending_auth = 0
        # Recent revocations, to refuse tokens whose check was in flight when they happened:
        # ("client", uuid) -> when (tokens issued before it), ("login", family) and
        # ("token", jti) -> when.
        self._revoked: dict[tuple[str, str], float] = {}

    def reconfigure(self) -> None:
        """The settings in the context changed."""
        self.strikes.reconfigure(rate=1.0, burst=self.ctx.ws.max_strikes)

    def online(self, client: str) -> bool:
        session = self.active.get(client)
        return session is not None and session.phase is Phase.ACTIVE

    def teller(self, client: str) -> Session | None:
        """The session told ``client``'s receipts and key changes: its active socket's. A REST
        session takes deliveries only; while it is the active one, they stay owed."""
        session = self.active.get(client)
        if session is None or session.phase is not Phase.ACTIVE or session.rest:
            return None
        return session

    def active_tokens(self) -> list[tuple[str, str]]:
        """``(client, jti)`` of the token each active session runs on."""
        return [(client, s.token_id) for client, s in self.active.items() if s.token_id]

    # --- frames out ------------------------------------------------------------------------

    def send(self, session: Session, text: str, ref: Ref | None = None) -> None:
        """Queue a frame on the session's socket, unless it is closing or full (then a final
        receipt stays owed, and a full socket is closed 4008)."""
        if session.phase is Phase.CLOSING:
            if isinstance(ref, ReceiptRef):
                self.owe(ref)
            return
        if session.queued >= self.ctx.ws.outbound_buffer:
            # Not even control frames fit: the socket has stopped draining.
            if isinstance(ref, ReceiptRef):
                self.owe(ref)
            self.close(session, CloseCode.SLOW_CONSUMER, "not reading", abort=True)
            return
        session.queued += 1
        self.ctx.actions.append(Send(session.sid, text, ref))

    def owe(self, ref: ReceiptRef) -> None:
        """A final receipt was not (surely) written: keep it owed in the store."""
        if ref.owed is not None:
            self.ctx.actions.append(ref.owed)
        # A stored message's row says the receipt is owed until its frame is written.

    def error(
        self,
        session: Session,
        code: str,
        message: str,
        now: float,
        details: dict[str, Any] | None = None,
    ) -> None:
        self.ctx.metrics.events[f"error:{code}"] += 1
        self.send(session, F.error_frame(code, message, now, details=details))

    def close(self, session: Session, code: int, reason: str, *, abort: bool = False) -> None:
        if session.phase is Phase.CLOSING:
            return
        if session.phase is Phase.PENDING:
            self.pending_auth -= 1
            self._unwait(session)
        session.phase = Phase.CLOSING
        self.ctx.actions.append(Close(session.sid, code, reason, abort))

    def strike(self, session: Session, now: float) -> None:
        """Count a refused frame; too many in a row closes the session (4029)."""
        if self.strikes.acquire(str(session.sid), now) > 0:
            self.error(session, F.RATE_LIMITED, "too many refused frames", now)
            self.close(session, CloseCode.TRY_LATER, "too many refused frames")

    # --- admission and authentication ------------------------------------------------------

    def open(
        self,
        sid: int,
        remote: str,
        now: float,
        *,
        token: str | None,
        pong_observable: bool,
        lean: bool,
        rest: bool = False,
    ) -> None:
        """See :meth:`RelayCore.open`."""
        # A REST session is lean: an ack is answered by its HTTP response, not a frame.
        session = Session(sid, remote, now, now, pong_observable, lean=lean or rest, rest=rest)
        self.by_sid[sid] = session
        self.pending_auth += 1
        if self.draining:
            self.error(session, F.SHUTTING_DOWN, "relayd is shutting down", now)
            self.close(session, CloseCode.GOING_AWAY, "server shutting down")
            return
        self.ctx.at(now + self.ctx.ws.auth_timeout, TimerKind.AUTH, sid, 0)
        if token is None:
            self._wait(session, now)
        else:
            self.verify(session, token, now)

    def _wait(self, session: Session, now: float) -> None:
        """Let a socket wait for its ``auth`` frame, closing the oldest waiting one if this
        one takes the last place, from its address or in all."""
        mine = self._waiting_per_ip.setdefault(session.remote, {})
        mine[session.sid] = session
        self._waiting[session.sid] = session
        for waiting, limit in (
            (mine, self.ctx.ws.max_pending_auth_per_ip),
            (self._waiting, self.ctx.ws.max_pending_auth),
        ):
            if len(waiting) > limit:
                oldest = next(iter(waiting.values()))
                self.error(oldest, F.TOO_MANY_CONNECTIONS, "too many unauthenticated sockets", now)
                self.close(oldest, CloseCode.TRY_LATER, "too many unauthenticated sockets")

    def _unwait(self, session: Session) -> None:
        if self._waiting.pop(session.sid, None) is None:
            return
        mine = self._waiting_per_ip[session.remote]
        del mine[session.sid]
        if not mine:
            del self._waiting_per_ip[session.remote]

    def verify(self, session: Session, token: str, now: float) -> None:
        """Admit the socket (or refuse it, 4029) and have its token checked."""
        self._unwait(session)
        ws = self.ctx.ws
        if self._admitted >= ws.max_connections or (
            self._per_ip[session.remote] >= ws.max_connections_per_ip
        ):
            self.error(session, F.TOO_MANY_CONNECTIONS, "too many connections", now)
            self.close(session, CloseCode.TRY_LATER, "too many connections")
            return
        session.admitted = True
        self._admitted += 1
        self._per_ip[session.remote] += 1
        session.authenticating = True
        self.ctx.actions.append(Authenticate(session.sid, token, refresh=False))

    def hold(self, session: Session, data: str | bytes, now: float) -> None:
        """A frame arrived while the session's token is checked: it is read once the token
        is verified (and dropped if it is not); past ``MAX_HELD_FRAMES`` the socket is closed
        4001."""
        if len(session.held) < MAX_HELD_FRAMES:
            session.held.append(data)
            return
        self.error(session, F.NOT_AUTHENTICATED, "too many frames before authentication", now)
        self.close(session, CloseCode.AUTH_FAILED, "not authenticated")

    def refresh(self, session: Session, doc: dict[str, Any], now: float) -> None:
        """A ``refresh`` frame: have its token checked, one at a time.

        Raises:
            ProtocolError: no token, over the message rate, or a refresh still being checked.
        """
        token = doc.get("token")
        if not isinstance(token, str) or not token:
            raise ProtocolError(F.INVALID_MESSAGE_FORMAT, "token: must be a string", field="token")
        # Checking a token costs the store a read: refreshes count against the message rate,
        # and one at a time.
        assert session.client is not None
        wait = self.limiter.acquire(session.client, now)
        if wait > 0:
            raise F.RateLimited(wait)
        if session.authenticating:
            raise ProtocolError(
                F.REFRESH_IN_PROGRESS, "a refresh is being checked; wait for its answer"
            )
        session.authenticating = True
        self.ctx.actions.append(Authenticate(session.sid, token, refresh=True))

    def authenticated(
        self, sid: int, who: Identity, now: float, *, refresh: bool
    ) -> tuple[Session, Session | None] | None:
        """A token offered by session ``sid`` verified as ``who``. If that made the session
        active: it and the session of the same client it replaces (``None`` if none), which
        the caller closes (see rule 1)."""
        session = self.by_sid.get(sid)
        if session is None or session.phase is Phase.CLOSING:
            return None
        session.authenticating = False
        if self._was_revoked(who):
            self.auth_failed(sid, "token_revoked", "the token was revoked", now, refresh=refresh)
            return None
        if refresh:
            if who.client != session.client:
                self.error(session, "token_invalid", "the token belongs to another client", now)
                self.close(session, CloseCode.AUTH_FAILED, "token_invalid")
                return None
            session.expires_at = who.expires_at
            session.token_id, session.login = who.token_id, who.login
            self._arm_token_timers(session, now)
            self.send(session, F.token_refreshed_frame(who.expires_at, now))
            return None
        if session.phase is not Phase.PENDING:
            return None
        previous = self.active.get(who.client)
        if session.rest and previous is not None and _is_live_socket(previous):
            # A pull never takes over a live socket (deliveries would swing between a socket
            # and a poller): the socket is how that client receives.
            self.error(session, F.CLIENT_CONNECTED, "the client has a live WebSocket session", now)
            self.close(session, CloseCode.REPLACED, F.CLIENT_CONNECTED)
            return None
        self.pending_auth -= 1
        session.phase = Phase.ACTIVE
        session.client = who.client
        session.token_id, session.login = who.token_id, who.login
        session.epoch = who.epoch
        session.expires_at = who.expires_at
        session.last_seen = session.last_ping = now
        self.active[who.client] = session
        welcome = F.connection_frame(
            who.client,
            who.name,
            now,
            lean=session.lean,
            token_expires_at=who.expires_at,
            heartbeat_interval=self.ctx.ws.heartbeat_interval,
        )
        self.send(session, welcome)
        self._arm_token_timers(session, now)
        if session.pong_observable:
            # Otherwise the server under the transport pings and drops a silent peer.
            self.ctx.at(now + self.ctx.ws.heartbeat_interval, TimerKind.HEARTBEAT, sid, 0)
        if session.rest:
            self.ctx.at(now + self.ctx.relay.pull_idle_timeout, TimerKind.IDLE, sid, 0)
        return session, previous

    def auth_failed(self, sid: int, code: str, message: str, now: float, *, refresh: bool) -> None:
        """A token offered by session ``sid`` was refused (``code`` as in the REST API)."""
        session = self.by_sid.get(sid)
        if session is None or session.phase is Phase.CLOSING:
            return
        session.authenticating = False
        session.held.clear()
        self.error(session, code, message, now)
        if refresh:
            self.strike(session, now)
        else:
            self.close(session, CloseCode.AUTH_FAILED, code)

    # --- timers ----------------------------------------------------------------------------

    def _arm_token_timers(self, session: Session, now: float) -> None:
        """Make sure a timer fires by the session's next token event (the warning, then the
        expiry). One pending timer per session: a refresh that moves the expiry later leaves
        it in place, and it re-arms itself when it fires."""
        due = self._next_token_event(session, now)
        if session.token_timer is None or due < session.token_timer:
            session.token_timer = due
            self.ctx.at(due, TimerKind.TOKEN, session.sid, 0)

    def _next_token_event(self, session: Session, now: float) -> float:
        warning = self.ctx.ws.token_warning
        warn_at = session.expires_at - warning
        warned = session.warned_for == session.expires_at
        if warning > 0 and not warned and warn_at > now:
            return warn_at
        return session.expires_at

    def token_timer(self, sid: int, now: float) -> None:
        session = self.by_sid.get(sid)
        if session is None or session.phase is not Phase.ACTIVE:
            return
        if session.token_timer is not None and now < session.token_timer:
            return  # a stale entry: an earlier timer took its place
        session.token_timer = None
        if now >= session.expires_at:
            self.error(
                session, "token_expired", "the access token expired; reconnect with a new one", now
            )
            self.close(session, CloseCode.AUTH_FAILED, "token_expired")
            return
        warning = self.ctx.ws.token_warning
        if (
            warning > 0
            and session.warned_for != session.expires_at
            and now >= session.expires_at - warning
        ):
            session.warned_for = session.expires_at
            self.send(session, F.token_expiring_frame(session.expires_at, now))
        self._arm_token_timers(session, now)

    def idle(self, sid: int, now: float) -> None:
        """A REST session's idle timer: it ends ``pull_idle_timeout`` after its last pull
        ended (one timer per session, re-armed when it fires early)."""
        session = self.by_sid.get(sid)
        if session is None or session.phase is not Phase.ACTIVE:
            return
        timeout = self.ctx.relay.pull_idle_timeout
        due = now + timeout if session.pulling else session.last_seen + timeout
        if now < due:
            self.ctx.at(due, TimerKind.IDLE, sid, 0)
            return
        self.close(session, CloseCode.NORMAL, "idle")

    # --- pulls (REST sessions) -------------------------------------------------------------

    def pull_begins(self, sid: int, limit: int, now: float) -> Session | None:
        """A pull of at most ``limit`` deliveries waits on REST session ``sid``: the session,
        if it is active."""
        session = self.by_sid.get(sid)
        if session is None or session.phase is not Phase.ACTIVE or not session.rest:
            return None
        session.pulling = True
        session.credit = limit
        session.last_seen = now
        return session

    def pull_ends(self, sid: int, now: float) -> None:
        """The pull on REST session ``sid`` returned: nothing more is handed out until the
        next; the idle time counts from now."""
        session = self.by_sid.get(sid)
        if session is not None and session.rest:
            session.pulling = False
            session.credit = 0
            session.last_seen = now

    def auth_timeout(self, sid: int, now: float) -> None:
        session = self.by_sid.get(sid)
        if session is not None and session.phase is Phase.PENDING:
            self.error(session, F.NOT_AUTHENTICATED, "no valid token in time", now)
            self.close(session, CloseCode.AUTH_FAILED, "authentication timed out")

    def heartbeat(self, sid: int, now: float) -> None:
        session = self.by_sid.get(sid)
        if session is None or session.phase is not Phase.ACTIVE:
            return
        ws = self.ctx.ws
        silent_until = session.last_seen + ws.heartbeat_timeout
        if now >= silent_until:
            self.close(session, CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout", abort=True)
            return
        if now >= session.last_ping + ws.heartbeat_interval:
            session.last_ping = now
            self.ctx.actions.append(Ping(session.sid))
        next_at = min(session.last_ping + ws.heartbeat_interval, silent_until)
        self.ctx.at(next_at, TimerKind.HEARTBEAT, session.sid, 0)

    def pong(self, sid: int, now: float) -> None:
        session = self.by_sid.get(sid)
        if session is not None:
            session.last_seen = now

    # --- revocation, replacement, shutdown -------------------------------------------------

    def revoke(
        self, client: str, now: float, *, login: str | None, token_id: str | None, reason: str
    ) -> None:
        """See :meth:`RelayCore.revoke`."""
        if login is not None:
            key = ("login", login)
        elif token_id is not None:
            key = ("token", token_id)
        else:
            key = ("client", client)
        self._revoked[key] = now
        session = self.active.get(client)
        if session is None or session.phase is not Phase.ACTIVE:
            return
        if (login is not None and session.login != login) or (
            token_id is not None and session.token_id != token_id
        ):
            return
        self.error(session, "token_revoked", F.revoked_text(reason), now, {"reason": reason})
        self.close(session, CloseCode.REVOKED, reason)

    def _was_revoked(self, who: Identity) -> bool:
        revoked = self._revoked
        if who.issued_at < revoked.get(("client", who.client), float("-inf")):
            return True
        if who.login is not None and ("login", who.login) in revoked:
            return True
        return ("token", who.token_id) in revoked

    def forget_revocations(self, before: float) -> None:
        """A revocation is remembered only to refuse tokens whose check was in flight when it
        happened; the store refuses them from then on."""
        self._revoked = {key: at for key, at in self._revoked.items() if at >= before}

    def replaced_elsewhere(self, client: str, epoch: int) -> None:
        """See :meth:`RelayCore.replaced_elsewhere`."""
        session = self.active.get(client)
        if session is None or session.epoch >= epoch or session.phase is Phase.CLOSING:
            return
        session.moved = True
        self.close(session, CloseCode.REPLACED, "replaced by a newer connection", abort=True)

    def fence(self, now: float) -> None:
        """See :meth:`RelayCore.fence`."""
        for session in list(self.by_sid.values()):
            self.error(session, F.STORE_UNAVAILABLE, "this node lost contact with the store", now)
            self.close(session, CloseCode.TRY_AGAIN_LATER, "lost contact with the store")

    def drain(self, now: float) -> None:
        """See :meth:`RelayCore.drain`."""
        self.draining = True
        for session in list(self.by_sid.values()):
            if session.phase is Phase.ACTIVE:
                self.send(session, F.shutdown_frame(now))
            self.close(session, CloseCode.GOING_AWAY, "server shutting down")

    # --- closed ----------------------------------------------------------------------------

    def closed(self, sid: int) -> Session | None:
        """Session ``sid``'s socket is gone: it is forgotten, and closing, so nothing more is
        queued on it. Still the active one of its client, if it was: see :meth:`deactivate`."""
        session = self.by_sid.pop(sid, None)
        if session is None:
            return None
        if session.phase is Phase.PENDING:
            self.pending_auth -= 1
            self._unwait(session)
        session.phase = Phase.CLOSING
        if session.admitted:
            self._admitted -= 1
            self._per_ip[session.remote] -= 1
            if self._per_ip[session.remote] <= 0:
                del self._per_ip[session.remote]
        return session

    def deactivate(self, session: Session) -> bool:
        """Forget ``session`` as its client's active one: ``False`` if it had been replaced."""
        assert session.client is not None
        if self.active.get(session.client) is not session:
            return False
        del self.active[session.client]
        return True


def _is_live_socket(session: Session) -> bool:
    return session.phase is Phase.ACTIVE and not session.rest
