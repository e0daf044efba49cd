"""Publishing to topics: a publish frame becomes one :class:`Publish` in the store (one message,
a delivery per subscriber), its publisher is answered ``topic_sent``, and each subscriber's
delivery then takes the direct-message path from the store (rule 11 of the core's docstring).

* **Fan-out never copies a message per subscriber in memory.** The store writes the
  deliveries; the core only wakes the subscribers online here (in cluster mode, announces the
  others to their nodes), and each loads its own delivery when its mailbox has room, as it
  loads any queued message.
* **No receipt per subscriber.** A topic delivery's final status is recorded, never told
  (see :meth:`Receipts.tell`). A publisher that asked for acknowledgements (``acknowledge:
  true``) is told counts instead (seed clients, which never ask, take any frame with a
  ``topic_id`` for a message, so they are sent none): while deliveries of a
  message it published are pending, and it is connected, every ``topics.update_interval`` the
  core asks the driver for the counts of the messages it watches (:class:`CountTopics`) and
  sends a ``topic_update`` for each whose counts changed: at most one a message per interval,
  whatever the number of subscribers. A session watches at most ``max_watched`` messages
  (the oldest stops being watched first); its status stays readable over REST.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from attrs import define, frozen

from relayd._engine import TopicCounts
from relayd._ratelimit import RateLimiter

from . import frames as F
from .context import Context, TimerKind
from .delivery import Delivery
from .effects import Announce, BroadcastNote, CountTopics
from .frames import ProtocolError
from .model import Phase, Session
from .records import BROADCAST, Duplicate, Publish, Published, PublishOutcome, Refused
from .sessions import Sessions

# Answered with the seed system's codes where it had one.
_REFUSALS = {
    "topic_not_found": (F.TOPIC_NOT_FOUND, "no topic has this id"),
    "not_subscribed": (F.NOT_SUBSCRIBED_TO_TOPIC, "subscribe to the topic to publish in it"),
    "not_permitted": (F.NOT_PERMITTED, "only the topic's owner (or an admin) publishes in it"),
}


@frozen(eq=False)
class PublishRef:
    """Who published: handed back with the store's answer."""

    sid: int
    client: str


@define
class Watch:
    """A published message whose counts its publisher is told (see the module docstring)."""

    sid: int
    topic: str
    msgid: str
    expires_at: float
    told: TopicCounts | None = None


class Topics:
    """``permits(client, permission)``: what the client's roles grant now (``admin`` publishes
    in any topic)."""

    def __init__(
        self,
        ctx: Context,
        sessions: Sessions,
        delivery: Delivery,
        limiter: RateLimiter,
        *,
        cluster: bool,
        permits: Callable[[str, str], bool] | None,
    ) -> None:
        self.ctx = ctx
        self.sessions = sessions
        self.delivery = delivery
        self._limiter = limiter
        self._cluster = cluster
        self._permits = permits
        # By message id, oldest first; and how many each session has.
        self.watches: OrderedDict[int, Watch] = OrderedDict()
        self._watched_by: dict[int, int] = {}
        self._counting: tuple[int, ...] | None = None  # the messages a CountTopics asks for
        self._timer_armed = False

    # --- publishing ------------------------------------------------------------------------

    def publish(self, session: Session, doc: dict[str, Any], now: float) -> None:
        """A publish frame from ``session``'s client.

        Raises:
            ProtocolError: refused before the store is asked (its error frame says why).
        """
        sender = session.client
        assert sender is not None
        publication = F.parse_publication(doc)
        if self._permits is not None and not self._permits(sender, "publish"):
            raise ProtocolError(
                F.NOT_PERMITTED,
                "your roles do not allow publishing in topics",
                details={"permission": "publish", "topic_id": publication.topic_id},
            )
        if publication.sender is not None and publication.sender != sender:
            raise ProtocolError(
                F.MESSAGE_SENDER_MISMATCH, "from: is not the authenticated client", field="from"
            )
        wait = self._limiter.acquire(sender, now)
        if wait > 0:
            raise F.RateLimited(wait, msgid=publication.msgid)
        msgid = publication.msgid or F.new_msgid()
        fields = F.encode(publication.fields(sender, msgid, now))
        admin = self._permits is not None and self._permits(sender, "admin")
        self._store(session, publication.topic_id, publication, msgid, fields, now, admin=admin)
        self.ctx.metrics.events["published"] += 1

    def broadcast(self, session: Session, doc: dict[str, Any], now: float) -> None:
        """A ``broadcast`` frame (admins only): to every live socket, or (with
        ``topics.broadcast_durable``) stored for every client, as a publish to everyone.

        Raises:
            ProtocolError: refused (not an admin, malformed, over the rate, store down).
        """
        sender = session.client
        assert sender is not None
        if self._permits is None or not self._permits(sender, "broadcast"):
            raise ProtocolError(
                F.NOT_PERMITTED,
                "your roles do not allow broadcasting (admins may)",
                details={"permission": "broadcast"},
            )
        announcement = F.parse_announcement(doc)
        if announcement.sender is not None and announcement.sender != sender:
            raise ProtocolError(
                F.MESSAGE_SENDER_MISMATCH, "from: is not the authenticated client", field="from"
            )
        wait = self._limiter.acquire(sender, now)
        if wait > 0:
            raise F.RateLimited(wait, msgid=announcement.msgid)
        msgid = announcement.msgid or F.new_msgid()
        fields = F.encode(announcement.fields(sender, msgid, now))
        self.ctx.metrics.events["broadcast"] += 1
        if not self.ctx.topics.broadcast_durable:
            self.ctx.actions.append(BroadcastNote(sender, F.broadcast_frame(fields)))
            self.sessions.send(
                session, F.broadcast_sent_frame(msgid, now, durable=False, recipients=None)
            )
            return
        self._store(session, BROADCAST, announcement, msgid, fields, now, admin=True)

    def _store(
        self,
        session: Session,
        topic: str,
        given: F.Publication | F.Announcement,
        msgid: str,
        fields: str,
        now: float,
        *,
        admin: bool,
    ) -> None:
        """Ask the store for a :class:`Publish` of ``fields`` to ``topic``.

        Raises:
            ProtocolError: ``store_unavailable``: the store failed its last batch.
        """
        if self.delivery.store_down:
            raise ProtocolError(
                F.STORE_UNAVAILABLE,
                "the store cannot take messages now; send it again later",
                details={"msgid": msgid, "topic_id": topic, "retry_after": 1.0},
                strike=False,
            )
        assert session.client is not None
        relay = self.ctx.relay
        ttl = min(given.ttl or relay.default_ttl, relay.max_ttl)
        self.delivery.pending_commit += 1
        self.ctx.actions.append(
            Publish(
                ref=PublishRef(session.sid, session.client),
                topic=topic,
                sender=session.client,
                msgid=msgid,
                high=given.priority == "high",
                acknowledge=given.acknowledge,
                fields=fields,
                accepted_at=now,
                expires_at=now + ttl,
                admin=admin,
                conversation_id=given.conversation_id or None,
            )
        )

    def heard(self, note: BroadcastNote) -> None:
        """A broadcast (from this node or another): to every live socket here but the
        sender's."""
        for client, session in self.sessions.active.items():
            if client != note.sender and session.phase is Phase.ACTIVE and not session.rest:
                self.sessions.send(session, note.frame)

    def published(self, op: Publish, outcome: PublishOutcome, now: float) -> None:
        """The store ran ``op``: wake the subscribers, answer the publisher."""
        self.delivery.pending_commit -= 1
        ref: PublishRef = op.ref
        session = self.sessions.by_sid.get(ref.sid)
        if session is not None and session.phase is not Phase.ACTIVE:
            session = None
        if op.topic == BROADCAST:
            self._broadcast_stored(op, outcome, session, now)
            return
        if isinstance(outcome, Refused):
            if session is not None:
                code, text = _REFUSALS.get(outcome.code, (outcome.code, outcome.code))
                self.sessions.error(
                    session, code, text, now, {"topic_id": op.topic, "msgid": op.msgid}
                )
            return
        if isinstance(outcome, Duplicate):
            self.ctx.metrics.events["duplicate"] += 1
            if session is not None:
                self.sessions.send(
                    session,
                    F.topic_sent_frame(op.topic, op.msgid, 0, now, offset=None, duplicate=True),
                )
            return
        assert isinstance(outcome, Published)
        self._wake(outcome, now)
        if session is not None:
            self.sessions.send(
                session,
                F.topic_sent_frame(
                    op.topic,
                    op.msgid,
                    outcome.subscribers,
                    now,
                    offset=outcome.offset,
                    duplicate=False,
                ),
            )
            if outcome.subscribers and op.acknowledge:
                self._watch(session, op, outcome.message, now)

    def _broadcast_stored(
        self, op: Publish, outcome: PublishOutcome, session: Session | None, now: float
    ) -> None:
        if isinstance(outcome, Published):
            self._wake(outcome, now)
        if session is None:
            return
        if isinstance(outcome, Refused):
            self.sessions.error(session, F.NOT_PERMITTED, "only admins broadcast", now)
            return
        recipients = outcome.subscribers if isinstance(outcome, Published) else None
        self.sessions.send(
            session,
            F.broadcast_sent_frame(
                op.msgid,
                now,
                durable=True,
                recipients=recipients,
                duplicate=isinstance(outcome, Duplicate),
            ),
        )
        if isinstance(outcome, Published) and outcome.subscribers and op.acknowledge:
            self._watch(session, op, outcome.message, now)

    def _wake(self, outcome: Published, now: float) -> None:
        """Each subscriber online here loads its delivery; the others' nodes are told."""
        local = self.delivery.recipients
        for recipient, seq in outcome.deliveries:
            if recipient in local:
                self.delivery.wake(recipient, seq, now)
            elif self._cluster:
                self.ctx.actions.append(Announce("wake", recipient, seq))

    # --- counts for the publisher ----------------------------------------------------------

    def _watch(self, session: Session, op: Publish, message: int, now: float) -> None:
        limit = self.ctx.topics.max_watched
        if limit <= 0:
            return
        if self._watched_by.get(session.sid, 0) >= limit:
            oldest = next(m for m, w in self.watches.items() if w.sid == session.sid)
            self._unwatch(oldest)
        self.watches[message] = Watch(session.sid, op.topic, op.msgid, op.expires_at)
        self._watched_by[session.sid] = self._watched_by.get(session.sid, 0) + 1
        if not self._timer_armed:
            self._timer_armed = True
            self.ctx.at(now + self.ctx.topics.update_interval, TimerKind.TOPIC_COUNTS, None, 0)

    def _unwatch(self, message: int) -> None:
        watch = self.watches.pop(message)
        left = self._watched_by[watch.sid] - 1
        if left:
            self._watched_by[watch.sid] = left
        else:
            del self._watched_by[watch.sid]

    def count_due(self, now: float) -> None:
        """The counts timer fired: forget what nobody waits for, ask for the rest."""
        self._timer_armed = False
        for message, watch in list(self.watches.items()):
            session = self.sessions.by_sid.get(watch.sid)
            if session is None or session.phase is not Phase.ACTIVE or now >= watch.expires_at:
                self._unwatch(message)
        if not self.watches:
            return
        if self._counting is None:
            self._counting = tuple(self.watches)
            self.ctx.actions.append(CountTopics(self._counting))
        self._timer_armed = True
        self.ctx.at(now + self.ctx.topics.update_interval, TimerKind.TOPIC_COUNTS, None, 0)

    def counted(self, counts: Mapping[int, TopicCounts], now: float) -> None:
        """The driver ran a :class:`CountTopics`: tell each publisher what changed."""
        asked, self._counting = self._counting or (), None
        for message, found in counts.items():
            watch = self.watches.get(message)
            if watch is None:
                continue
            session = self.sessions.by_sid.get(watch.sid)
            if session is None or session.phase is not Phase.ACTIVE:
                self._unwatch(message)
                continue
            if found != watch.told:
                watch.told = found
                self.sessions.send(
                    session,
                    F.topic_update_frame(watch.topic, watch.msgid, counts_doc(found), now),
                )
            if found.pending == 0:
                self._unwatch(message)
        # Asked for and not found: gone from the store. (One published while the count was
        # under way was not asked for: it waits for the next.)
        for message in [m for m in asked if m in self.watches and m not in counts]:
            self._unwatch(message)

    def count_failed(self) -> None:
        """The counts could not be read now: the next tick asks again."""
        self._counting = None


def counts_doc(counts: TopicCounts) -> dict[str, int]:
    """A ``topic_update``'s counts (and the status route's)."""
    return {
        "subscribers": counts.total,
        "delivered": counts.delivered,
        "acknowledged": counts.acknowledged,
        "failed": counts.failed,
        "expired": counts.expired,
        "pending": counts.pending,
    }
