"""Cluster mode: many relayd nodes on one Redis (or Valkey) server.

Theory of operation:

* The store (``relayd/_redis``) is the truth: every queued message, receipt, key change,
  revocation and client lives there, so any node can serve any client. What this module adds
  is how nodes find out quickly, and who holds a client's session.
* **Claims.** A client's live session is on one node at a time. Authenticating a session
  *claims* the client (:meth:`RedisCluster.claim`): one Lua script writes
  ``claim:<client>`` = ``<node>|<epoch>`` (epochs only grow), publishes a ``kick`` to the
  client's channel when another session held it, and returns the message seq counter, which
  becomes the node's seq floor (see ``relayd/_relay/seqs.py``). A kicked node closes its
  session with 4009; what that session had not had acknowledged stays queued in the store,
  and the new node delivers it as a redelivery. A REST session's claim (a pull's, see
  ``relayd/_relay/rest.py``) is marked so in ``restclaim:<client>``; it is refused, atomically,
  while a socket's claim of a live node holds the client (a pull never kicks a socket), and
  taken over by any socket's.
* **Leases.** A claim is only as live as its node: ``node:<id>`` is renewed every third of
  ``store.lease`` and expires after it (it counts from when the renewal was sent). A node
  without a successful renewal for two thirds of its lease (it was partitioned, or paused)
  assumes its claims are about to be taken, and *fences* itself before the lease can
  expire: every session is closed with 1013 and no new one opens until Redis answers again
  and the node hears the bus again (it publishes a ``probe`` there after each renewal, until
  it hears it), so that a session it takes can watch its client's channel. The directory's
  ``online`` is a live claim of a live node.
* **Nodes that leave.** Each renewal also sets the node's expiry in ``nodes`` (a sorted set),
  and drops the nodes whose lease has run out; if it dropped any, it publishes a ``resync``
  on ``bus``. A node publishes its hints after its commit: one killed in between (or stopped
  before its last hints went out) leaves messages and receipts in the store that nobody
  announced, for clients on other nodes. So a node that leaves, crashed or stopped, makes
  every node resync once its lease has run out (within ``lease`` and a third after it).
* **Hints.** Each node subscribes to the channel of every client it holds
  (``c:<client>``) and to the broadcast channel (``bus``). What another node must hear is
  published after the store has it: a message queued for a client (``wake``), a receipt owed
  to one (``receipts``), a key change owed to one (``key``), a kick; on ``bus``, revocations
  and role changes. A hint is never the truth: a lost one delays, never loses. Redis drops
  published messages only for a subscriber that is disconnected; when the subscription comes
  back, the node *resyncs*: every client it holds looks in the store again, and the revoked
  access tokens are reloaded from it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

import anyio
import coredis
import coredis.exceptions
import trio
from attrs import frozen
from coredis.retry import CompositeRetryPolicy, ConstantRetryPolicy, ExponentialBackoffRetryPolicy

from ._auth import Revocation
from ._errors import ClusterUnavailable, StoreError
from ._redis._link import Link
from ._redis._url import connect, parse_url
from ._relay.effects import BroadcastNote, PresenceNote, TypingNote
from ._relay.records import KeyNotice

log = logging.getLogger("relayd.cluster")

# Claim a client: take its claim (newest wins), kick the old holder, return the seq floor. A
# REST session's claim (ARGV[4] '1') is marked in KEYS[4], and refused ({0, 0}) while a socket's
# claim of a live node (ARGV[5]: the node prefix) holds the client.
_CLAIM = """
local previous = redis.call('GET', KEYS[1])
if ARGV[4] == '1' and previous and previous ~= redis.call('GET', KEYS[4]) then
  local node = string.match(previous, '^(.*)|')
  if node and redis.call('EXISTS', ARGV[5] .. node) == 1 then
    return {0, 0}
  end
end
local epoch = redis.call('INCR', KEYS[2])
local value = ARGV[1] .. '|' .. epoch
redis.call('SET', KEYS[1], value)
if ARGV[4] == '1' then
  redis.call('SET', KEYS[4], value)
else
  redis.call('DEL', KEYS[4])
end
if previous then
  redis.call('PUBLISH', ARGV[2], cjson.encode({k = 'kick', c = ARGV[3], e = epoch}))
end
return {epoch, tonumber(redis.call('GET', KEYS[3]) or '0')}
"""

# Release a claim (and its REST mark, KEYS[2]), if it is still the one this session made.
_RELEASE = """
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# Which of the clients (KEYS) hold a claim of a node that is alive (ARGV[1]: the node prefix).
_ONLINE = """
local online = {}
for i, key in ipairs(KEYS) do
  local claim = redis.call('GET', key)
  if claim then
    local node = string.match(claim, '^(.*)|')
    if node and redis.call('EXISTS', ARGV[1] .. node) == 1 then
      online[#online + 1] = i
    end
  end
end
return online
"""

# Renew this node's lease (KEYS[1], in the node set KEYS[2]: ARGV[1] its id, ARGV[2] the
# lease in ms); drop the nodes whose lease ran out and, if any, publish a resync (on ARGV[3]).
_RENEW = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], ms + tonumber(ARGV[2]), ARGV[1])
local gone = redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ms)
if gone > 0 then
  redis.call('PUBLISH', ARGV[3], cjson.encode({k = 'resync', gone = gone}))
end
return gone
"""

ONLINE_PAGE = 500  # clients asked about in one script call
# A subscription that failed for good is opened again after this long (coredis itself retries
# a lost connection, with a growing pause).
RESUBSCRIBE_PAUSE = 1.0
# How coredis reconnects a subscription it lost: at once, then after a pause growing to
# RESUBSCRIBE_PAUSE (its default grows to 16 s: a node back from an outage would stay deaf,
# and fenced, that long); a subscription that is not confirmed in time is tried twice more.
_RESUBSCRIBE_POLICY = CompositeRetryPolicy(
    ExponentialBackoffRetryPolicy(
        (coredis.exceptions.ConnectionError,),
        retries=None,
        base_delay=0.1,
        max_delay=RESUBSCRIBE_PAUSE,
        jitter=True,
    ),
    ConstantRetryPolicy((TimeoutError,), retries=2, delay=0.1),
)
# What ends a subscription: Redis refused or dropped it, or coredis closed it under us (6.9,
# cancelled, unsubscribes on the connection it has just closed).
_SUBSCRIPTION_ERRORS = (
    coredis.exceptions.RedisError,
    OSError,
    TimeoutError,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
)
SEQ_KEY = "seq"  # the message seq counter, under the prefix (see relayd/_redis)


@frozen
class Claim:
    """A session's claim on its client: ``epoch`` orders claims; ``floor`` is the message
    seq counter when it was made."""

    epoch: int
    floor: int


class Listener(Protocol):
    """What a node does with what it hears from the others."""

    def wake(self, client: str, seq: int) -> None: ...
    def receipts_owed(self, client: str, seq: int) -> None: ...
    def kicked(self, client: str, epoch: int) -> None: ...
    def key_changed(self, notice: KeyNotice) -> None: ...
    def revoked_elsewhere(self, revocation: Revocation) -> None: ...
    def roles_changed(self, client: str, roles: tuple[str, ...] | None) -> None: ...
    def presence_heard(self, note: PresenceNote) -> None: ...
    def typing_heard(self, note: TypingNote) -> None: ...
    def broadcast_heard(self, note: BroadcastNote) -> None: ...
    def member_heard(self, topic: str, client: str, joined: bool, presence: bool) -> None: ...
    def topic_heard(self, topic: str, presence: bool | None) -> None: ...
    def resync(self) -> None: ...
    def fenced(self) -> None: ...


def new_node_id() -> str:
    """A node's id for one run: host, pid and a random part (a restarted node is new)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class RedisCluster:
    """The cluster as one node sees it. Open with :meth:`open`, then start :meth:`run`."""

    def __init__(
        self,
        redis: coredis.Redis[bytes],
        *,
        prefix: str,
        node: str,
        lease: float,
        timeout: float,
        seq_key: str,
        where: str = "redis",
    ) -> None:
        self._redis = redis
        # Calls go through the store's link: one deadline and one translation of errors.
        self._link = Link(
            redis, where=where, prefix=prefix, timeout=timeout, wait_replicas=0, wait_timeout=0
        )
        self._prefix = prefix
        self.node = node
        self.lease = lease
        self.timeout = timeout
        self._seq_key = seq_key
        self._claim = redis.register_script(_CLAIM)
        self._release = redis.register_script(_RELEASE)
        self._online = redis.register_script(_ONLINE)
        self._renew_lease = redis.register_script(_RENEW)
        self._pubsub: Any = None
        self._watched: dict[str, int] = {}  # client -> sessions here that watch it
        self._renewed_at = -math.inf  # Trio time the last successful renewal was sent
        self._renewal = trio.Event()  # set by the next successful renewal
        self.fenced = False

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        url: str,
        *,
        prefix: str,
        lease: float,
        call_timeout: float,
        seq_key: str,
        node: str | None = None,
    ) -> AsyncIterator[RedisCluster]:
        """Connect (lazily: the first call connects) and close at the end."""
        endpoint = parse_url(url)
        async with connect(endpoint, connect_timeout=call_timeout) as redis:
            yield cls(
                redis,
                prefix=prefix,
                node=node or new_node_id(),
                lease=lease,
                timeout=call_timeout,
                seq_key=seq_key,
                where=endpoint.where,
            )

    # --- key names ----------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)

    def channel(self, client: str) -> str:
        return self._key("c", client)

    @property
    def _bus(self) -> str:
        return self._key("bus")

    # --- calls ----------------------------------------------------------------------------

    async def _call(self, what: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        """``await fn()`` within ``timeout``.

        Raises:
            ClusterUnavailable: Redis did not answer in time, or refused (see
                :meth:`relayd._redis._link.Link.command`).
        """
        try:
            return await self._link.command(what, lambda _: fn())
        except StoreError as exc:
            raise ClusterUnavailable(str(exc)) from None

    async def claim(self, client: str, *, rest: bool = False) -> Claim | None:
        """Take ``client`` for a session on this node (see the module docstring); ``rest``:
        for a REST session, which is refused (``None``) while a socket holds the client.

        Raises:
            ClusterUnavailable: Redis did not answer; the client was not claimed.
        """
        if self.fenced:
            raise ClusterUnavailable("this node lost contact with redis")
        epoch, floor = await self._call(
            "claim",
            lambda: self._claim(
                keys=[
                    self._key("claim", client),
                    self._key("epochs"),
                    self._seq_key,
                    self._key("restclaim", client),
                ],
                args=[
                    self.node,
                    self.channel(client),
                    client,
                    "1" if rest else "0",
                    self._key("node", ""),
                ],
            ),
        )
        if not int(epoch):
            return None
        return Claim(int(epoch), int(floor))

    async def release(self, client: str, epoch: int) -> None:
        """The session of claim ``epoch`` ended: release the claim unless a newer one took
        it. Best effort: a claim left behind dies with this node's lease."""
        try:
            await self._call(
                "release",
                lambda: self._release(
                    keys=[self._key("claim", client), self._key("restclaim", client)],
                    args=[f"{self.node}|{epoch}"],
                ),
            )
        except ClusterUnavailable as exc:
            log.warning("claim not released", extra={"fields": {"error": str(exc)}})

    async def online(self, clients: Sequence[str]) -> set[str]:
        """Which of ``clients`` have a live session on some node.

        Raises:
            ClusterUnavailable: Redis did not answer.
        """
        found: set[str] = set()
        for start in range(0, len(clients), ONLINE_PAGE):
            page = list(clients[start : start + ONLINE_PAGE])
            indexes = await self._call(
                "online",
                lambda page=page: self._online(  # type: ignore[misc]
                    keys=[self._key("claim", c) for c in page], args=[self._key("node", "")]
                ),
            )
            found.update(page[int(i) - 1] for i in indexes)
        return found

    async def watch(self, client: str) -> None:
        """Hear ``client``'s channel (before its session claims it, so no hint is missed
        between the claim and the first load).

        Raises:
            ClusterUnavailable: the subscription was not confirmed in time.
        """
        count = self._watched.get(client, 0)
        self._watched[client] = count + 1
        if count == 0 and self._pubsub is not None:
            try:
                await self._call("subscribe", lambda: self._pubsub.subscribe(self.channel(client)))
            except ClusterUnavailable:
                self._forget(client)
                raise

    async def unwatch(self, client: str) -> None:
        """No session here watches ``client`` any more. Best effort."""
        if self._forget(client) and self._pubsub is not None:
            try:
                await self._call(
                    "unsubscribe", lambda: self._pubsub.unsubscribe(self.channel(client))
                )
            except ClusterUnavailable as exc:
                log.warning("channel not unsubscribed", extra={"fields": {"error": str(exc)}})

    def _forget(self, client: str) -> bool:
        count = self._watched.get(client, 0) - 1
        if count > 0:
            self._watched[client] = count
            return False
        self._watched.pop(client, None)
        return True

    async def publish(self, notes: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Publish each ``(client, note)`` on the client's channel (``client`` ``""``: on
        the broadcast channel), in one round trip.

        Raises:
            ClusterUnavailable: Redis did not answer; the notes may or may not have gone out.
        """
        if not notes:
            return

        async def send() -> None:
            async with self._redis.pipeline(transaction=False) as pipe:
                for client, note in notes:
                    channel = self.channel(client) if client else self._bus
                    pipe.publish(channel, json.dumps(note, separators=(",", ":")))

        await self._call("publish", send)

    # --- the node's own tasks ---------------------------------------------------------------

    async def run(
        self, listener: Listener, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep this node's lease and hear the cluster, until cancelled. Started once the
        lease is first taken and the broadcast channel is heard."""
        await self._renew()
        async with trio.open_nursery() as nursery:
            await nursery.start(self._listen, listener)
            nursery.start_soon(self._keep_lease, listener)
            task_status.started()

    async def _renew(self) -> None:
        """Renew the lease, or raise ClusterUnavailable. The lease counts from before the
        call was sent: Redis starts it no earlier. Nodes whose lease ran out are dropped, and
        every node told to resync (see the module docstring)."""
        sent = trio.current_time()
        ms = max(1, int(self.lease * 1000))
        gone = await self._call(
            "lease",
            lambda: self._renew_lease(
                keys=[self._key("node", self.node), self._key("nodes")],
                args=[self.node, ms, self._bus],
            ),
        )
        self._renewed_at = sent
        self._renewal.set()
        self._renewal = trio.Event()
        if gone:
            log.info("nodes gone: every node resyncs", extra={"fields": {"gone": int(gone)}})

    @property
    def _fence_at(self) -> float:
        """When this node fences itself unless a renewal succeeds first: two thirds of the
        lease after the last successful renewal was sent, a third before it can expire."""
        return self._renewed_at + self.lease * 2 / 3

    async def _keep_lease(self, listener: Listener) -> None:
        """Renew the lease every third of it, and fence (see the module docstring) at two
        thirds of it past the last renewal, until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_lease, listener)
            await self._renew_every_third(listener)

    async def _renew_every_third(self, listener: Listener) -> None:
        """Send a renewal a third of the lease after the previous one was sent (whether it
        succeeded or not: the lease counts from the send). While the node is not fenced, a
        renewal still unanswered at the fence point is abandoned there, so the next one goes
        out at once. A renewal sent after the lease expired (the node was paused) fences the
        node too: other nodes may hold its clients."""
        sent = self._renewed_at
        while True:
            await trio.sleep_until(sent + self.lease / 3)
            sent = trio.current_time()
            before = self._renewed_at
            # A renewal sent at or after the fence point is not cut: the node is fencing.
            deadline = self._fence_at if self._fence_at > sent else math.inf
            with trio.move_on_at(deadline) as scope:
                try:
                    await self._renew()
                except ClusterUnavailable:
                    continue  # the watchdog fences at the fence point
            if scope.cancelled_caught:
                continue  # abandoned at the fence point
            if self._renewed_at - before >= self.lease and not self.fenced:
                self._fence(listener, "the lease expired before it was renewed")
            if self.fenced:
                await self._probe()

    async def _watch_lease(self, listener: Listener) -> None:
        """Fence the node at its fence point (:attr:`_fence_at`) unless a renewal succeeded
        by then, whether a renewal is in flight or not; a fenced node waits for its next
        renewal."""
        while True:
            if trio.current_time() < self._fence_at:
                await trio.sleep_until(self._fence_at)  # a renewal meanwhile moves it: look again
            elif not self.fenced:
                self._fence(listener, "no renewal of the lease for two thirds of it")
            else:
                await self._renewal.wait()

    async def _probe(self) -> None:
        """A fenced node that has its lease again asks the bus whether it hears it: its
        subscription may still be reconnecting, and a session it took meanwhile could not
        watch its channel. It takes sessions again once it hears its own probe (see
        :meth:`_heard`). Best effort: the next renewal probes again."""
        try:
            await self.publish([("", {"k": "probe", "from": self.node})])
        except ClusterUnavailable as exc:
            log.warning("probe not published", extra={"fields": {"error": str(exc)}})

    def _unfence(self, listener: Listener) -> None:
        """This node holds its lease and hears the cluster again: it takes sessions again,
        and every client here looks in the store for what it missed."""
        if not self.fenced or trio.current_time() >= self._fence_at:
            return  # too late: the watchdog would fence it again (see _watch_lease)
        log.info("lease renewed and the cluster heard: accepting sessions again")
        self.fenced = False
        listener.resync()

    def _fence(self, listener: Listener, why: str) -> None:
        log.error(
            "lease lost: closing every session until redis answers",
            extra={"fields": {"error": why}},
        )
        self.fenced = True
        listener.fenced()

    async def lost(self, claims: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
        """Which of ``claims`` (client, epoch) this node no longer holds, each with the epoch
        that replaced it (its own plus one when none did: the claim is gone, as after a Redis
        restart without persistence). For after a resync: a kick may have been lost.

        Raises:
            ClusterUnavailable: Redis did not answer.
        """
        lost: list[tuple[str, int]] = []
        for start in range(0, len(claims), ONLINE_PAGE):
            page = list(claims[start : start + ONLINE_PAGE])
            current = await self._call(
                "claims",
                lambda page=page: self._redis.mget(  # type: ignore[misc]
                    [self._key("claim", client) for client, _ in page]
                ),
            )
            for (client, epoch), value in zip(page, current, strict=True):
                if value != f"{self.node}|{epoch}".encode():
                    held = None if value is None else value.rpartition(b"|")[2]
                    lost.append((client, int(held) if held and held.isdigit() else epoch + 1))
        return lost

    async def _listen(
        self, listener: Listener, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Hear the bus and the watched channels, until cancelled. Started once the first
        subscription is confirmed (its failure is the caller's). After that, a subscription
        that fails for good (coredis gave up on it) is opened again after a pause; every
        subscription after the first, coredis's own after a reconnect included, is followed by
        a resync, since what was published meanwhile is lost."""
        started = False

        def ready() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        while True:
            try:
                await self._listen_on(listener, ready, restored=started)
            except* _SUBSCRIPTION_ERRORS as group:
                if not started:
                    raise
                if trio.current_effective_deadline() != -math.inf:  # not on the way out
                    log.warning(
                        "redis subscription lost: subscribing again",
                        extra={"fields": {"error": repr(group.exceptions[0])}},
                    )
            await trio.sleep(RESUBSCRIBE_PAUSE)

    async def _listen_on(
        self, listener: Listener, ready: Callable[[], None], *, restored: bool
    ) -> None:
        """One subscription, heard until it fails (raises). ``restored``: an earlier one
        was lost, so the first confirmation of this one calls for a resync too.

        coredis reconnects on its own and subscribes again, but its message iterator ends
        when it is read between the two (coredis 6.9): messages are read one by one instead.
        """
        bus = self._bus.encode()
        resync_on_subscribe = restored
        # A subscription's confirmation may take as long as any call (coredis waits 1 s by
        # default: a reconnect storm's thousand subscriptions took longer, and each refused a
        # session as if Redis had not answered).
        async with self._redis.pubsub(
            channels=[self._bus],
            max_idle_seconds=5,
            retry_policy=_RESUBSCRIBE_POLICY,
            subscription_timeout=self.timeout,
        ) as pubsub:
            self._pubsub = pubsub
            try:
                if self._watched:
                    await pubsub.subscribe(*(self.channel(c) for c in self._watched))
                ready()
                while True:
                    message = await pubsub.get_message()
                    if message is None:
                        continue
                    kind = message["type"]
                    if kind == "subscribe" and message["channel"] == bus:
                        # Every channel of one SUBSCRIBE is heard by the time it is confirmed.
                        if resync_on_subscribe:
                            log.info("redis subscription restored: resync")
                            listener.resync()
                        resync_on_subscribe = True
                    elif kind == "message" and isinstance(message["data"], bytes):
                        self._heard(listener, message["data"])
            finally:
                self._pubsub = None

    def _heard(self, listener: Listener, data: bytes) -> None:
        try:
            note = json.loads(data)
            kind = note["k"]
            if kind == "resync":
                listener.resync()
            elif kind == "probe" and note.get("from") == self.node:
                self._unfence(listener)
            elif kind == "wake":
                listener.wake(note["c"], int(note["s"]))
            elif kind == "receipts":
                listener.receipts_owed(note["c"], int(note["s"]))
            elif kind == "kick":
                listener.kicked(note["c"], int(note["e"]))
            elif kind == "key":
                listener.key_changed(KeyNotice(**note["n"]))
            elif kind == "revoked" and note.get("from") != self.node:
                listener.revoked_elsewhere(Revocation(**note["r"]))
            elif kind == "presence" and note.get("from") != self.node:
                listener.presence_heard(PresenceNote(**note["n"]))
            elif kind == "broadcast" and note.get("from") != self.node:
                listener.broadcast_heard(BroadcastNote(**note["n"]))
            elif kind == "typing" and note.get("from") != self.node:
                listener.typing_heard(TypingNote(**note["n"]))
            elif kind == "topic" and note.get("from") != self.node:
                body = note["n"]
                presence = body["p"]
                listener.topic_heard(body["t"], None if presence is None else bool(presence))
            elif kind == "member" and note.get("from") != self.node:
                body = note["n"]
                listener.member_heard(body["t"], body["c"], bool(body["j"]), bool(body["p"]))
            elif kind == "roles" and note.get("from") != self.node:
                roles = note["roles"]
                listener.roles_changed(note["c"], None if roles is None else tuple(roles))
        except (ValueError, KeyError, TypeError) as exc:
            # Another (newer?) node speaks a note this one does not know: a hint lost.
            log.warning("unreadable cluster note", extra={"fields": {"error": str(exc)}})
