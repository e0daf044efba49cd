"""Who is in which topic, here: presence and typing indicators (rule 12 of the core's
docstring).

When a client's socket becomes active, the driver loads its memberships (the topics it
subscribes to, and which of them have presence on: :class:`LoadMemberships`); this part keeps
them for the client's live session, and the reverse map, topic to the sessions here in it.
Every node keeps its own; a change of membership or presence is a :class:`PresenceNote` that
the driver applies here and, in cluster mode, tells every other node.

* **Presence** (a topic's ``presence`` setting): a subscriber that comes online or goes
  offline (its only socket closes; not when a newer one replaces it, here or on another
  node), joins or leaves, is an event for the topic's other subscribers with a live socket.
  Events wait per session and topic, the latest per client winning, and go out together
  every ``topics.presence_interval`` as one ``presence`` frame, at most
  ``topics.max_presence_events`` of them (beyond: ``truncated``, and the client reads
  ``GET /topics/{id}/presence``). A reconnect storm costs each subscriber one frame per
  interval and topic, however many reconnect.
* **Typing** (a ``typing`` frame, to a client or a topic the sender is in): passed on at most
  once, never stored, to live sockets only; a sender's typing frames to one target closer
  than ``topics.typing_interval`` apart are dropped (counted in the metrics).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from attrs import define, field

from relayd._api import canonical_uuid
from relayd._ratelimit import RateLimiter

from . import frames as F
from .context import Context, TimerKind
from .effects import LoadMemberships, PresenceNote, Seen, TypingNote
from .frames import ProtocolError
from .model import Phase, Session
from .sessions import Sessions

EVENTS = ("online", "offline", "joined", "left")
TYPING_ENTRIES = 10_000  # (sender, target) pairs whose last typing frame is remembered


@define
class Memberships:
    """A live session's topics (``presence``: those with presence on)."""

    topics: set[str] = field(factory=set)
    presence: set[str] = field(factory=set)


class Presence:
    """``may_message(sender, recipient)``: whether roles let one client reach another (typing
    to a client follows the same rule as a message); ``None``: anyone may."""

    def __init__(
        self,
        ctx: Context,
        sessions: Sessions,
        limiter: RateLimiter,
        *,
        may_message: Callable[[str, str], bool] | None,
        permits: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.ctx = ctx
        self.sessions = sessions
        self._limiter = limiter
        self._may_message = may_message
        self._permits = permits
        # Sessions whose memberships are being loaded, with the changes heard meanwhile, to
        # apply after the rows (a load may have been read before a change or after it: the
        # change applied again changes nothing).
        self.loading: dict[int, list[tuple[str, bool | None, bool | None]]] = {}
        self.of: dict[int, Memberships] = {}  # by sid: live sockets whose memberships loaded
        self.members: dict[str, set[int]] = {}  # topic -> sids here in it
        # (sid, topic) -> client -> event, waiting for the next flush; and which overflowed.
        self.pending: dict[tuple[int, str], dict[str, str]] = {}
        self.truncated: set[tuple[int, str]] = set()
        self._flush_armed = False
        self._last_typing: dict[tuple[str, str], float] = {}  # (sender, target) -> when

    # --- memberships -----------------------------------------------------------------------

    def connected(self, session: Session, previous: Session | None, now: float) -> None:
        """A socket became its client's active one: load its memberships. Until they come,
        it holds those of the socket it replaced here (if any), so that it is offline when it
        closes first, and it is in its topics meanwhile."""
        if session.rest or session.client is None:
            return
        self.ctx.actions.append(Seen(session.client, now))
        inherited = self.of.pop(previous.sid, None) if previous is not None else None
        if previous is not None and inherited is not None:
            self.of[session.sid] = inherited
            for topic in inherited.topics:
                sids = self.members.setdefault(topic, set())
                sids.discard(previous.sid)
                sids.add(session.sid)
        self._load(session.sid, session.client)

    def _load(self, sid: int, client: str) -> None:
        self.loading[sid] = []
        self.ctx.actions.append(LoadMemberships(sid, client))

    def loaded(self, sid: int, rows: Iterable[tuple[str, bool]], now: float) -> None:
        """The driver loaded a session's memberships: ``(topic, presence)`` each; the changes
        heard while they were read are applied after them."""
        changes = self.loading.pop(sid, [])
        session = self.sessions.by_sid.get(sid)
        if session is None or session.phase is not Phase.ACTIVE or session.client is None:
            return
        if self.sessions.active.get(session.client) is not session:
            return
        mine = self.of.get(sid)
        if mine is not None:  # inherited, or loaded before: the store's rows replace them
            for topic in list(mine.topics):
                self._leave(sid, mine, topic)
        mine = self.of.setdefault(sid, Memberships())
        for topic, presence in rows:
            self._join(sid, mine, topic, presence)
            if presence:
                self._note(topic, session.client, "online")
        for topic, joined, keeps in changes:
            if joined is None:  # the topic's settings (keeps None: deleted or created)
                self._topic_changed(sid, mine, topic, keeps)
            elif joined:
                self._join(sid, mine, topic, bool(keeps))
            else:
                self._leave(sid, mine, topic)

    def _join(self, sid: int, mine: Memberships, topic: str, presence: bool) -> None:
        mine.topics.add(topic)
        if presence:
            mine.presence.add(topic)
        self.members.setdefault(topic, set()).add(sid)

    def _leave(self, sid: int, mine: Memberships, topic: str) -> None:
        mine.topics.discard(topic)
        mine.presence.discard(topic)
        sids = self.members.get(topic)
        if sids is not None:
            sids.discard(sid)
            if not sids:
                del self.members[topic]

    def disconnected(self, session: Session, now: float, *, offline: bool) -> None:
        """A session ended; ``offline``: it was its client's last live socket (not replaced)."""
        if offline and session.client is not None and not session.rest:
            self.ctx.actions.append(Seen(session.client, now))
        self.loading.pop(session.sid, None)
        mine = self.of.pop(session.sid, None)
        if mine is None:
            return
        announced = sorted(mine.presence)
        for topic in list(mine.topics):
            self._leave(session.sid, mine, topic)
        for key in [k for k in self.pending if k[0] == session.sid]:
            del self.pending[key]
            self.truncated.discard(key)
        if offline and session.client is not None:
            for topic in announced:
                self._note(topic, session.client, "offline")

    def membership_changed(
        self, topic: str, client: str, joined: bool, presence: bool, now: float
    ) -> None:
        """``client`` joined or left ``topic`` (on any node): its session here, if any, learns
        it; with presence on, the topic's subscribers here are told."""
        session = self.sessions.active.get(client)
        if session is not None and session.sid in self.loading:
            self.loading[session.sid].append((topic, joined, presence))
        mine = self.of.get(session.sid) if session is not None else None
        if session is not None and mine is not None:
            if joined:
                self._join(session.sid, mine, topic, presence)
            else:
                self._leave(session.sid, mine, topic)
        if presence:
            self.event(topic, client, "joined" if joined else "left", now)

    def topic_changed(self, topic: str, presence: bool | None) -> None:
        """A topic's presence setting changed (``presence``), or it was deleted or created
        anew (``None``: nobody here is in it any more; a topic created with that id starts
        with no members)."""
        for sid in list(self.members.get(topic, ())):
            mine = self.of.get(sid)
            if mine is not None:
                self._topic_changed(sid, mine, topic, presence)
        for changes in self.loading.values():
            changes.append((topic, None, presence))

    def _topic_changed(
        self, sid: int, mine: Memberships, topic: str, presence: bool | None
    ) -> None:
        if topic not in mine.topics:
            return
        if presence is None:
            self._leave(sid, mine, topic)
        elif presence:
            mine.presence.add(topic)
        else:
            mine.presence.discard(topic)

    def _note(self, topic: str, client: str, event: str) -> None:
        """An event for every node (this one included: the driver applies it here too)."""
        self.ctx.actions.append(PresenceNote(topic, client, event))

    # --- presence events -------------------------------------------------------------------

    def event(self, topic: str, client: str, event: str, now: float) -> None:
        """A presence ``event`` of ``client`` in ``topic``: wait for the next flush in every
        other live session here with presence on in that topic."""
        limit = self.ctx.topics.max_presence_events
        for sid in self.members.get(topic, ()):
            mine = self.of.get(sid)
            session = self.sessions.by_sid.get(sid)
            if mine is None or session is None or topic not in mine.presence:
                continue
            if session.client is None or session.client == client:
                continue
            if self._permits is not None and not self._permits(session.client, "presence"):
                continue  # its roles do not let it see presence (the ``presence`` grant)
            key = (sid, topic)
            waiting = self.pending.setdefault(key, {})
            if client in waiting or len(waiting) < limit:
                waiting[client] = event
            else:
                self.truncated.add(key)
        if self.pending and not self._flush_armed:
            self._flush_armed = True
            self.ctx.at(now + self.ctx.topics.presence_interval, TimerKind.PRESENCE, None, 0)

    def flush(self, now: float) -> None:
        """The presence timer fired: one frame per session and topic with events waiting,
        at most a quarter of a session's outbound buffer of them per interval (a client in
        many topics with someone who comes online gets them over several intervals, never
        more than its socket holds); the rest wait for the next."""
        self._flush_armed = False
        pending, self.pending = self.pending, {}
        truncated, self.truncated = self.truncated, set()
        budget = max(1, self.ctx.ws.outbound_buffer // 4)
        sent: dict[int, int] = {}
        for (sid, topic), events in pending.items():
            session = self.sessions.by_sid.get(sid)
            if session is None or session.phase is not Phase.ACTIVE:
                continue
            if sent.get(sid, 0) >= budget or session.queued >= budget:
                self.pending[(sid, topic)] = events  # next time
                if (sid, topic) in truncated:
                    self.truncated.add((sid, topic))
                continue
            sent[sid] = sent.get(sid, 0) + 1
            self.sessions.send(
                session,
                F.presence_frame(topic, events, now, truncated=(sid, topic) in truncated),
            )
        if self.pending:
            self._flush_armed = True
            self.ctx.at(now + self.ctx.topics.presence_interval, TimerKind.PRESENCE, None, 0)

    # --- typing ----------------------------------------------------------------------------

    def typing(self, session: Session, doc: dict[str, Any], now: float) -> None:
        """A ``typing`` frame: to a client (``to``) or a topic the sender is in
        (``topic_id``); ``state`` ``"typing"`` (the default) or ``"stopped"``.

        Raises:
            ProtocolError: malformed, or a topic the sender is not in.
        """
        sender = session.client
        assert sender is not None
        state = doc.get("state", "typing")
        if state not in ("typing", "stopped"):
            raise ProtocolError(
                F.INVALID_MESSAGE_FORMAT, "state: must be typing or stopped", field="state"
            )
        to, topic = doc.get("to"), doc.get("topic_id")
        if (to is None) == (topic is None):
            raise ProtocolError(
                F.INVALID_MESSAGE_FORMAT,
                "typing: give either to (a client) or topic_id (a topic)",
                field="to",
            )
        if to is not None:
            try:
                target = canonical_uuid(to) if isinstance(to, str) else ""
            except ValueError:
                target = ""
            if not target:
                raise ProtocolError(
                    F.INVALID_MESSAGE_FORMAT, "to: must be a client uuid", field="to"
                )
            if self._may_message is not None and not self._may_message(sender, target):
                raise ProtocolError(
                    F.NOT_PERMITTED, "your roles do not allow messaging this client", field="to"
                )
            key = target
        else:
            if not F.valid_topic_id(topic):
                raise ProtocolError(
                    F.INVALID_MESSAGE_FORMAT, "topic_id: not a topic id", field="topic_id"
                )
            mine = self.of.get(session.sid)
            if mine is None or topic not in mine.topics:
                raise ProtocolError(
                    F.NOT_SUBSCRIBED_TO_TOPIC,
                    "subscribe to the topic to tell it you are typing",
                    details={"topic_id": topic},
                    strike=False,
                )
            key = "#" + str(topic)
        last = self._last_typing.get((sender, key))
        if last is not None and now - last < self.ctx.topics.typing_interval:
            self.ctx.metrics.events["typing_dropped"] += 1
            return
        if self._limiter.acquire(sender, now) > 0:
            self.ctx.metrics.events["typing_dropped"] += 1  # over the client's message rate
            return
        self._remember_typing(sender, key, now)
        self.ctx.metrics.events["typing"] += 1
        note = TypingNote(sender, state, to=target if to is not None else None, topic=topic)
        self.ctx.actions.append(note)

    def _remember_typing(self, sender: str, key: str, now: float) -> None:
        """Bounded by TYPING_ENTRIES: when full, those older than the interval go, and if
        that is not enough, the oldest half (a target forgotten early is rate-limited again
        from its next frame on: the message rate still holds)."""
        table = self._last_typing
        if len(table) >= TYPING_ENTRIES:
            horizon = now - self.ctx.topics.typing_interval
            table = {k: t for k, t in table.items() if t >= horizon}
            if len(table) >= TYPING_ENTRIES // 2:
                table = dict(list(table.items())[len(table) - TYPING_ENTRIES // 2 :])
            self._last_typing = table
        table.pop((sender, key), None)
        table[(sender, key)] = now  # the newest last

    def typed(self, note: TypingNote, now: float) -> None:
        """A typing note (from this node or another): pass it to its live sockets here."""
        frame = F.typing_frame(note.sender, note.state, now, topic=note.topic)
        if note.to is not None:
            session = self.sessions.teller(note.to)
            if session is not None:
                self.sessions.send(session, frame)
            return
        for sid in self.members.get(note.topic or "", ()):
            session = self.sessions.by_sid.get(sid)
            if (
                session is not None
                and session.client != note.sender
                and session.phase is Phase.ACTIVE
            ):
                self.sessions.send(session, frame)
