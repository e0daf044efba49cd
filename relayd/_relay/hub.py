"""The hub: the Trio driver of the relay core.

The core (``core.py``) decides; the hub does the I/O it asks for. The hub owns:

* one **timer task** that sleeps until the core's next deadline and calls ``tick``;
* one **store task** that runs the core's store operations in order, as many as are waiting
  (up to ``commit_max_batch``) in each transaction — a group commit — and hands the results
  back;
* per socket (:meth:`Hub.serve`, run in the task of whichever listener accepted it), a nursery
  with a **reader** (frames → core) and a **writer** that drains the socket's bounded
  **outbound memory channel** (core → frames). The core never puts more frames in that channel
  than it holds (it counts them), so a full channel is a bug, not a policy.

Backpressure: a recipient's deliveries stop at its in-flight window and its outbound buffer
(the rest waits in its mailbox, then in the store); a writer stuck longer than
``write_timeout`` gets its socket closed with 4008 (see :meth:`Hub._write`), as does a socket
whose outbound buffer overflows (the core's call); each such slow consumer is logged and
counted; while too many messages await a commit, readers stop reading, so senders feel the
store's pace through TCP.

Shutdown (:meth:`Hub.shutdown`) is layered, with deadlines: every session is told and closed
with 1001 after its queued frames; sessions still open at the grace deadline are cut; what
they leave behind is flushed to the store; then the hub's tasks stop.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio
from attrs import define, field, frozen

from relayd._auth import AuthService, Revocation
from relayd._config import Config
from relayd._engine import Engine
from relayd._errors import (
    ApiError,
    ClusterUnavailable,
    Conflict,
    RateLimited,
    StoreError,
    StoreUnavailable,
    TokenError,
    Unavailable,
)
from relayd._log import audit, conn_id
from relayd._roles import RoleDirectory, RolePolicy
from relayd._tokens import Claims

from . import frames as F
from .core import RelayCore
from .effects import (
    Action,
    Announce,
    Answer,
    Authenticate,
    BroadcastNote,
    Close,
    CountTopics,
    LoadMemberships,
    Ping,
    PresenceNote,
    ReserveSeqs,
    Seen,
    Send,
    TypingNote,
)
from .frames import CLIENT_CONNECTED, CloseCode, ProtocolError
from .model import Identity, Ref
from .records import (
    ClearKeyNotice,
    ClearReadPending,
    Finish,
    KeyNotice,
    MarkRead,
    Purge,
    ReadOutcome,
    SetAttempts,
    SetReceiptPending,
    StoreOp,
)
from .rest import RestTransport
from .seqs import SeqPool

if TYPE_CHECKING:  # coredis is imported only when the Redis engine is used
    from relayd._cluster import RedisCluster
from .transport import Transport, TransportClosed, abort_after

log = logging.getLogger("relayd.relay")

# Seconds a close frame may take to go out before the socket is just dropped.
CLOSE_TIMEOUT = 2.0
# Frames a writer takes from its channel per round (one core call per round).
WRITE_BATCH = 64
# Store operations nobody waits for (a final status, a receipt marked told, an attempt count,
# a purge) ride with the next commit someone waits for, or go on their own after this long. At
# light load that is one commit per message instead of three. A crash loses at most this much
# of them, which at-least-once delivery covers already: an acknowledged message is delivered
# again (flagged redelivered), a final receipt told again.
DEFER_COMMIT = 0.05
# A group commit of at most this many operations runs on the event loop's thread when the last
# one took less than INLINE_SECONDS: handing it to a worker thread and back costs more CPU than
# the commit itself at light load (each hop two system wake-ups and the GIL changing hands),
# while the loop, blocked that long, has nothing else to do. Bigger batches, or a disk that got
# slow, go to the thread, and the loop serves sockets meanwhile.
INLINE_OPS = 8
INLINE_SECONDS = 0.001
# After a failed batch, the store is tried again after this long, doubling up to the max.
STORE_RETRY = 0.1
STORE_RETRY_MAX = 2.0
# Seconds a REST read waits for its store operation (queued behind the others) to be answered.
READ_TIMEOUT = 10.0
# Cluster mode: message seqs reserved from the store at a time (see relayd/_relay/seqs.py).
SEQ_BLOCK = 1000
NOTE_BATCH = 500  # notes published in one round trip
MAX_NOTES = 20_000  # notes waiting at most: past it, the oldest ephemeral ones are dropped
EPHEMERAL_NOTES = frozenset({"presence", "typing", "broadcast"})
# Bytes written to a socket at once, at most, where frames are coalesced: past write_timeout
# without completing a write, a socket counts as not draining, so a write must stay small.
WRITE_CHUNK_BYTES = 128 * 1024


def _chunks(batch: list[_Outgoing], *, coalesce: bool) -> Iterator[list[_Outgoing]]:
    """``batch`` in chunks for one write each: single frames, or frames up to
    ``WRITE_CHUNK_BYTES`` (counted in characters, a lower bound on bytes)."""
    if not coalesce:
        for outgoing in batch:
            yield [outgoing]
        return
    chunk: list[_Outgoing] = []
    size = 0
    for outgoing in batch:
        if chunk and size + len(outgoing.text) > WRITE_CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(outgoing)
        size += len(outgoing.text)
    if chunk:
        yield chunk


def _retry_pause(failures: int) -> float:
    """How long to wait after the ``failures``-th failure in a row of a store call."""
    return float(min(STORE_RETRY_MAX, STORE_RETRY * 2 ** (failures - 1)))


def _urgent(op: StoreOp | Announce) -> bool:
    """Whether someone waits for ``op``: a read, a message's acceptance, an owed receipt's
    record, a first attempt counted before a delivery (see DEFER_COMMIT)."""
    if isinstance(op, SetAttempts):
        return op.ref is not None
    return not isinstance(
        op, Finish | SetReceiptPending | Purge | ClearKeyNotice | ClearReadPending
    )


@define(eq=False)
class _ReadWaiter:
    """A REST read waiting for its :class:`MarkRead`'s answer."""

    done: trio.Event = field(factory=trio.Event)
    outcome: ReadOutcome | None = None


@frozen
class _Outgoing:
    text: str
    ref: Ref | None


@frozen
class _CloseItem:
    code: int
    reason: str


@define(eq=False)
class _Handle:
    """A socket being served: what the hub needs to reach it."""

    sid: int
    transport: Transport
    # Frames (and the close) for the socket, not yet taken by a write. Bounded by the core,
    # which never queues more than websocket.outbound_buffer frames on a socket. (A list: an
    # empty one costs a tenth of an empty deque, on every idle socket.)
    queue: list[_Outgoing | _CloseItem] = field(factory=list)
    writing: bool = False  # a writer task owns the socket's writes
    more: trio.Event = field(factory=trio.Event)  # frames queued for a standing writer
    scope: trio.CancelScope = field(factory=trio.CancelScope)
    nursery: trio.Nursery | None = None
    close_request: tuple[int, str] | None = None
    # The close handshake on the way out runs shielded; shutdown's deadline cancels it.
    closing: trio.CancelScope | None = None
    batch: list[_Outgoing] = field(factory=list)  # being written
    sent: int = 0  # of `batch`, written so far
    chunk: int = 1  # of `batch`, after `sent`, in the write under way
    pinging: bool = False
    claim: tuple[str, int] | None = None  # cluster mode: (client, epoch) it claimed
    ended: bool = False  # cluster mode: its claim and channel were given back (see _unclaim)
    watching: str | None = None  # cluster mode: the client whose channel it watches


@define(eq=False)
class _Waiter:
    """A request waiting for the first answer to the message it submitted."""

    done: trio.Event = field(factory=trio.Event)
    answer: Answer | None = None


class Hub:
    """Runs a :class:`RelayCore` for the daemon. Make one with :meth:`open`, then start
    :meth:`run` in a nursery."""

    def __init__(
        self,
        config: Config,
        store: Engine,
        auth: AuthService,
        core: RelayCore,
        *,
        clock: Callable[[], float],
        cluster: RedisCluster | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.cluster = cluster
        self._store_failures = 0  # batches failed in a row (the store is down while > 0)
        # Hints to publish, their batches committed: the lowest seq per (kind, client), so at
        # most one note per client and kind waits, however many messages (see Announce).
        self._announces: dict[tuple[str, str], int] = {}
        self._publishing = False  # a task publishes them
        # Notes for every node (revocations, roles, presence, typing...), published in order
        # by one task (see _publish_soon).
        self._notes: list[tuple[str, dict[str, Any]]] = []
        self._noting = False
        self._seen_due: dict[str, float] = {}  # last_seen to record (one task: _record_seen)
        self._seeing = False
        self._memberships_due: dict[int, str] = {}  # sockets whose topics to load, in order
        self._loading_memberships = False
        self._resync_due = False  # a publish failed: every node must look in the store
        self._seqs_ready = trio.Event()
        self.releasing = 0  # cluster mode: ended sessions whose claims are being released
        # Cluster mode: clients with claims being made here -> (how many, the highest epoch
        # of a kick heard meanwhile).
        self._claiming: dict[str, tuple[int, int]] = {}
        self.revocations_reloaded = 0  # cluster mode: resyncs whose revocations were reloaded
        self.auth = auth
        self.clock = clock
        self.core = core
        self._sids = itertools.count(1)
        self._handles: dict[int, _Handle] = {}
        self._store_queue: deque[StoreOp | Announce] = deque()
        self._store_busy = False
        self._store_wakeup = trio.Event()
        self._urgent_queued = 0  # operations in the queue that someone waits for
        self._store_urgent = trio.Event()
        self._queued_since = 0.0  # when the queue last went from empty to not
        self._last_commit = 0.0  # seconds the last group commit took
        self._timer_wakeup = trio.Event()
        self._sleeping_until = math.inf
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._unflushed: dict[int, _Handle] = {}  # sockets with frames queued by _dispatch
        # Submissions without a session (see submit): those waiting for their first answer,
        # by ticket, and how many requests are in submit at all.
        self._waiters: dict[int, _Waiter] = {}
        self._submitting = 0
        self.closing = False
        self._stopped = False  # shutdown's deadline has passed
        self._rest: dict[str, RestTransport] = {}  # each client's REST session here, by uuid
        self.pulls = 0  # pulls in progress (bounded by relay.max_pulls_waiting)
        auth.subscribe(self.revoked)
        if cluster is not None:
            auth.subscribe(self._publish_revocation)
            auth.subscribe_roles(self._publish_roles, local_only=True)

    @classmethod
    async def open(
        cls,
        config: Config,
        store: Engine,
        auth: AuthService,
        *,
        clock: Callable[[], float],
        cluster: RedisCluster | None = None,
    ) -> Hub:
        """A hub resuming from what ``store`` holds: message seqs continue above the highest
        ever stored (in cluster mode: from blocks reserved in the store), and deduplication
        remembers the messages of the last dedupe window."""
        now = clock()
        relay = config.relay
        policy = RolePolicy.from_config(config.roles)
        # Every client's roles, kept in memory and told of every change: what a publish in a
        # topic may do, and (if some role may not message everyone) whom each message may go to.
        directory = RoleDirectory(policy, await auth.client_roles())
        auth.subscribe_roles(directory.update)
        may_message = None if policy.messaging_is_open else directory.may_message
        # Seqs come in blocks the store reserves, on either engine: a publish takes its
        # deliveries' seqs from the store too, above every block (see records.Publish).
        seqs = SeqPool.reserved(SEQ_BLOCK)
        seqs.add(await store.reserve_seqs(SEQ_BLOCK), SEQ_BLOCK)
        core = RelayCore(
            relay,
            config.websocket,
            now=now,
            seqs=seqs,
            recent=await store.recent_messages(now - relay.dedupe_window, relay.dedupe_max_entries),
            may_message=may_message,
            cluster=cluster is not None,
            retention=config.history.retention,
            topics=config.topics,
            permits=directory.allows,
        )
        return cls(config, store, auth, core, clock=clock, cluster=cluster)

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the timer and store tasks until :meth:`shutdown` completes (or cancellation)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._timer_loop)
            nursery.start_soon(self._store_loop)
            task_status.started()
        self._nursery = None

    @property
    def nursery(self) -> trio.Nursery:
        """Where the dedicated listener spawns its connection handlers."""
        assert self._nursery is not None, "the hub is not running"
        return self._nursery

    def _signal(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, done: Callable[[], bool]) -> None:
        """Wait until ``done()`` holds; it is checked whenever the hub's state changes (a
        commit, a session ending, the store failing or recovering...)."""
        await self._until(done)

    async def _until(self, done: Callable[[], bool]) -> None:
        while not done():
            await self._changed.wait()

    async def shutdown(self, deadline: float) -> None:
        """Drain by ``deadline`` (Trio time): notice and 1001 to every session, cut the
        stragglers, flush the store, stop. The last quarter (at most 2 s) of the time left is
        kept for cutting and flushing."""
        self.closing = True
        self._store_urgent.set()  # nothing waits for a later commit any more
        reserve = min(2.0, max(0.0, deadline - trio.current_time()) / 4)
        self.core.drain(self.clock())
        self._apply()
        log.info("draining sessions", extra={"fields": {"sessions": len(self._handles)}})
        with trio.move_on_at(deadline - reserve):
            await self._until(lambda: not self._handles)
        if self._handles:
            log.warning("cutting sessions", extra={"fields": {"sessions": len(self._handles)}})
            for handle in list(self._handles.values()):
                self._cut(handle, CloseCode.GOING_AWAY, "server shutting down")
        with trio.move_on_at(deadline):
            await self._until(lambda: not self._handles)
            await self._until(lambda: not self._store_queue and not self._store_busy)
        # Out of time: the close handshakes still under way end here, unfinished.
        self._stopped = True
        for waiter in self._waiters.values():
            waiter.done.set()  # answered "accepted": the store has what was committed
        for handle in self._handles.values():
            if handle.closing is not None:
                handle.closing.cancel()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # --- dispatching the core's actions ----------------------------------------------------

    def _apply(self) -> None:
        """Carry out what the core decided. Call after every call into the core.

        Frames for a socket nobody is writing to are written at once when its transport can
        do that without waiting (``try_send``): no task switch, and the core hears they were
        written before this returns. Otherwise a writer task is started for the socket; it
        writes until the socket's queue is empty, then ends: an idle socket has no writer.
        """
        core = self.core
        while True:
            actions = core.take_actions()
            if not actions and not self._unflushed:
                break
            self._dispatch(actions)
            unflushed, self._unflushed = self._unflushed, {}
            for handle in unflushed.values():
                self._flush(handle)
        deadline = core.next_deadline()
        if deadline is not None and deadline < self._sleeping_until:
            self._timer_wakeup.set()

    def _dispatch(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                handle = self._handles.get(action.sid)
                if handle is not None:
                    handle.queue.append(_Outgoing(action.text, action.ref))
                    self._unflushed[handle.sid] = handle
            elif isinstance(action, Close):
                handle = self._handles.get(action.sid)
                if handle is None:
                    continue
                if action.code == CloseCode.SLOW_CONSUMER:
                    # The core's only 4008: not even a control frame fits in the socket's
                    # outbound buffer (the writer's own 4008 does not come this way).
                    self._slow_consumer(action.sid, "outbound_buffer")
                if action.abort:
                    self._cut(handle, action.code, action.reason)
                else:
                    handle.queue.append(_CloseItem(action.code, action.reason))
                    self._unflushed[handle.sid] = handle
            elif isinstance(action, Authenticate):
                if self._nursery is not None:
                    self._nursery.start_soon(
                        self._authenticate, action.sid, action.token, action.refresh
                    )
            elif isinstance(action, ReserveSeqs):
                self._spawn(self._reserve_seqs, action.count)
            elif isinstance(action, CountTopics):
                self._spawn(self._count_topics, action.messages)
            elif isinstance(action, LoadMemberships):
                self._memberships_due[action.sid] = action.client
                if not self._loading_memberships:
                    self._loading_memberships = self._spawn(self._load_memberships)
            elif isinstance(action, PresenceNote):
                self._presence(action)
            elif isinstance(action, TypingNote):
                self._typing(action)
            elif isinstance(action, Seen):
                self._seen_due[action.client] = action.at
                if not self._seeing:
                    self._seeing = self._spawn(self._record_seen)
            elif isinstance(action, BroadcastNote):
                self.core.broadcast_heard(action)
                if self.cluster is not None:
                    note = {"k": "broadcast", "from": self.cluster.node, "n": attrs.asdict(action)}
                    self._publish_soon([("", note)])
            elif isinstance(action, Announce):
                # Published once every store operation queued before it is committed.
                if not self._store_queue:
                    self._queued_since = trio.current_time()
                self._store_queue.append(action)
                self._urgent_queued += 1
                self._store_urgent.set()
                self._store_wakeup.set()
            elif isinstance(action, Answer):
                waiter = self._waiters.get(action.ticket)
                if waiter is not None:
                    waiter.answer = action
                    waiter.done.set()
            elif isinstance(action, Ping):
                handle = self._handles.get(action.sid)
                if handle is not None and handle.nursery is not None and not handle.pinging:
                    handle.pinging = True
                    try:
                        handle.nursery.start_soon(self._ping, handle)
                    except RuntimeError:  # the session's nursery closed: it is ending anyway
                        handle.pinging = False
            else:
                if not self._store_queue:
                    self._queued_since = trio.current_time()
                self._store_queue.append(action)
                if _urgent(action):
                    self._urgent_queued += 1
                    self._store_urgent.set()
                self._store_wakeup.set()

    def _take(self, handle: _Handle) -> tuple[list[_Outgoing], _CloseItem | None]:
        """The next frames to write to ``handle``'s socket (at most WRITE_BATCH), and the close
        that follows them, if one is queued right behind."""
        batch: list[_Outgoing] = []
        queue = handle.queue
        for taken, item in enumerate(queue[:WRITE_BATCH], 1):
            if isinstance(item, _CloseItem):
                del queue[:taken]
                return batch, item
            batch.append(item)
        del queue[: len(batch)]
        return batch, None

    def _flush(self, handle: _Handle) -> None:
        """Write what is queued for ``handle`` now if its transport can without waiting, else
        have a writer task do it (see :meth:`_apply`)."""
        if not handle.transport.writes_inline:
            handle.more.set()  # its standing writer takes them
            return
        while handle.queue and not handle.writing and handle.nursery is not None:
            batch, close = self._take(handle)
            taken = handle.transport.try_send([o.text for o in batch]) if batch else True
            if taken is None:  # nothing taken: the writer writes all of it
                handle.queue[:0] = [*batch, close] if close is not None else batch
                self._start_writer(handle, [], None)
            elif taken:
                self._written(handle, batch)
                if close is not None:
                    self._cut(handle, close.code, close.reason)
            else:  # taken, partly written: the writer finishes it
                self._start_writer(handle, batch, close)

    def _start_writer(
        self, handle: _Handle, started: list[_Outgoing], close: _CloseItem | None
    ) -> None:
        assert handle.nursery is not None
        handle.batch, handle.sent, handle.chunk = started, 0, len(started)
        try:
            handle.nursery.start_soon(self._writer, handle, started, close)
        except RuntimeError:
            # The session's nursery is closing (its socket ended, e.g. a slow consumer cut
            # while a store batch was applied): nothing more is written to it. When it ends,
            # _finish tells the core the started batch was cut off and the queue never sent.
            handle.nursery = None
            return
        handle.writing = True

    def _written(self, handle: _Handle, batch: list[_Outgoing]) -> None:
        """``batch`` is written: tell the core (its actions are dispatched by :meth:`_apply`),
        and wake readers that wait for this socket to drain."""
        refs = [o.ref for o in batch if o.ref is not None]
        self.core.written(handle.sid, len(batch), refs, self.clock())
        self._signal()

    def _slow_consumer(self, sid: int, where: str) -> None:
        """Log and count a socket dropped as a slow consumer (``where``: what caught it)."""
        self.core.metrics.slow_consumer_drops[where] += 1
        token = conn_id.set(f"ws{sid}")  # the line names the socket, whichever task logs it
        try:
            log.info("slow consumer: closing", extra={"fields": {"detected_by": where}})
        finally:
            conn_id.reset(token)

    def _cut(self, handle: _Handle, code: int, reason: str) -> None:
        """End a session now; its close frame is attempted on the way out."""
        if handle.close_request is None:
            handle.close_request = (code, reason)
        handle.scope.cancel()

    # --- timers and the store ---------------------------------------------------------------

    async def _timer_loop(self) -> None:
        core = self.core
        while True:
            deadline = core.next_deadline()
            self._timer_wakeup = trio.Event()
            if deadline is None:
                self._sleeping_until = math.inf
                await self._timer_wakeup.wait()
            else:
                self._sleeping_until = deadline
                with trio.move_on_at(trio.current_time() + (deadline - self.clock())):
                    await self._timer_wakeup.wait()
            self._sleeping_until = -math.inf  # awake: no wakeups needed
            core.tick(self.clock())
            self._apply()

    @property
    def _accepting(self) -> bool:
        """False while the store lags: too many messages, or operations, wait for it."""
        return self.core.accepting and len(self._store_queue) < self.core.relay.max_pending_commit

    async def _store_loop(self) -> None:
        while True:
            max_batch = self.core.relay.commit_max_batch
            max_queued = self.core.relay.max_queued_per_recipient
            while not self._store_queue:
                self._store_wakeup = trio.Event()
                await self._store_wakeup.wait()
            if not self._urgent_queued and not self.closing:
                self._store_urgent = trio.Event()
                with trio.move_on_at(self._queued_since + DEFER_COMMIT):
                    await self._store_urgent.wait()
            taken: list[StoreOp | Announce] = []
            while self._store_queue and len(taken) < max_batch:
                taken.append(self._store_queue.popleft())
            ops = [op for op in taken if not isinstance(op, Announce)]
            self._store_busy = True
            started = time.perf_counter()
            inline = len(ops) <= INLINE_OPS and self._last_commit < INLINE_SECONDS
            try:
                results = (
                    await self.store.execute(ops, max_queued=max_queued, inline=inline)
                    if ops
                    else []
                )
            except StoreUnavailable as exc:
                self._store_busy = False
                await self._store_failed(taken, exc)
                continue
            self._urgent_queued -= sum(map(_urgent, taken))
            if self._store_queue:
                self._queued_since = trio.current_time()
            self._last_commit = time.perf_counter() - started
            self.core.metrics.commit_latency.observe(self._last_commit)
            self._store_busy = False
            if self._store_failures:
                log.info(
                    "store available again", extra={"fields": {"failed": self._store_failures}}
                )
                self._store_failures = 0
                self.core.store_recovered()
            self.core.store_done(ops, results, self.clock())
            self._apply()
            for done, result in zip(ops, results, strict=True):
                if isinstance(done, MarkRead) and isinstance(done.ref, _ReadWaiter):
                    done.ref.outcome = result
                    done.ref.done.set()
            self._signal()
            if self.cluster is not None:
                for op in taken:
                    if isinstance(op, Announce):
                        key = (op.kind, op.client)
                        self._announces[key] = min(self._announces.get(key, op.seq), op.seq)
                if self._announces and not self._publishing:
                    self._publishing = self._spawn(self._publish_announces)

    async def _store_failed(self, taken: list[StoreOp | Announce], exc: StoreError) -> None:
        """The store could not take a batch now (unreachable, too slow, out of space): put it
        back and try again after a pause (growing to STORE_RETRY_MAX). It may have been
        applied with its answer lost: running it again is harmless (an Insert finds itself,
        a Finish or SetAttempts writes the same). Meanwhile sockets stay open, new messages
        are refused (``store_unavailable``) and ``/health/ready`` answers 503. Any other
        store error is a bug or corrupt data: it stops relayd, as it always did."""
        self._store_queue.extendleft(reversed(taken))
        self._store_failures += 1
        if self._store_failures == 1:
            log.error("store unavailable: retrying", extra={"fields": {"error": str(exc)}})
            self.core.store_failed()
            self._apply()
            self._signal()
        await trio.sleep(_retry_pause(self._store_failures))

    @property
    def store_available(self) -> bool:
        """False while the store fails (see :meth:`_store_failed`) or, in cluster mode, while
        this node has lost its lease."""
        return not self._store_failures and not (self.cluster is not None and self.cluster.fenced)

    # --- authentication ----------------------------------------------------------------------

    async def _authenticate(self, sid: int, token: str, refresh: bool) -> None:
        handle = self._handles.get(sid)
        remote = handle.transport.remote if handle is not None else None
        try:
            claims = await self.auth.authenticate(token)
            if claims.is_operator:
                raise TokenError("token_invalid", "operator tokens cannot open relay sessions")
            client = await self.auth.get_client(claims.sub)
            epoch = 0
            if self.cluster is not None and not refresh and handle is not None:
                self._claiming_begins(client.uuid)
                try:
                    epoch = await self._claim(handle, client.uuid)
                except BaseException:
                    self._claiming_ends(client.uuid)
                    raise
        except ApiError as exc:
            audit("ws_auth_failed", source=remote, reason=exc.code, refresh=refresh or None)
            self.core.metrics.events[f"auth_failed:{exc.code}"] += 1
            self.core.auth_failed(sid, exc.code, exc.message, self.clock(), refresh=refresh)
        except StoreError as exc:
            # The store could not check the token (Redis unreachable, or refusing): the
            # client tries again later; this node goes on.
            log.warning("authentication not checked", extra={"fields": {"error": str(exc)}})
            code = "store_unavailable"
            self.core.metrics.events[f"auth_failed:{code}"] += 1
            message = "the store cannot be reached now; try again later"
            self.core.auth_failed(sid, code, message, self.clock(), refresh=refresh)
        else:
            who = Identity(
                client.uuid, client.name, claims.iat, claims.exp, claims.jti, claims.family, epoch
            )
            log.debug("authenticated", extra={"fields": {"sid": sid, "client": client.uuid}})
            self.core.authenticated(sid, who, self.clock(), refresh=refresh)
            if epoch:
                kicked = self._claiming_ends(client.uuid)
                if kicked > epoch:  # a newer claim elsewhere, heard while this one was made
                    self.core.replaced_elsewhere(client.uuid, kicked, self.clock())
        self._apply()

    # --- cluster mode ------------------------------------------------------------------------

    async def _claim(self, handle: _Handle, client: str) -> int:
        """Watch ``client``'s channel, then claim it for this session (see relayd/_cluster.py);
        the claim's epoch. Seqs for what it sends here sort above what it sent elsewhere.

        Raises:
            ApiError: ``store_unavailable``: Redis did not answer in time;
                ``client_connected``: a REST session's claim, refused (see RedisCluster.claim).
        """
        cluster = self.cluster
        assert cluster is not None
        try:
            await cluster.watch(client)
            handle.watching = client  # from here on, _unclaim gives it back
            self._ended_meanwhile(handle)
            claim = await cluster.claim(client, rest=handle.transport.rest)
            if claim is None:
                # A REST session never takes a client from its live socket on another node.
                raise ApiError("the client has a live WebSocket session", code=CLIENT_CONNECTED)
            handle.claim = (client, claim.epoch)
            self._ended_meanwhile(handle)
        except ClusterUnavailable as exc:
            log.warning("claim failed", extra={"fields": {"error": str(exc)}})
            raise ApiError("the store cannot take sessions now", code="store_unavailable") from None
        if self.core.raise_seq_floor(claim.floor):
            self._apply()
            with trio.move_on_after(cluster.timeout):
                await self._seqs_ready.wait()
        return claim.epoch

    def _spawn(self, fn: Callable[..., Awaitable[None]], *args: Any) -> bool:
        """Start ``fn(*args)`` in the hub's nursery; ``False`` if the hub has stopped (then
        what it would do is moot: a hint, a release, a reservation)."""
        if self._nursery is None:
            return False
        try:
            self._nursery.start_soon(fn, *args)
        except RuntimeError:  # the nursery is closing: the hub is stopping
            return False
        return True

    def _ended_meanwhile(self, handle: _Handle) -> None:
        """The session ended while its claim was being made: give back what it took.

        Raises:
            ApiError: it ended (the core ignores an answer for a session it closed).
        """
        if handle.ended:
            self._unclaim(handle)
            raise ApiError("the session ended", code="connection_closed")

    def _claiming_begins(self, client: str) -> None:
        refs, kicked = self._claiming.get(client, (0, 0))
        self._claiming[client] = (refs + 1, kicked)

    def _claiming_ends(self, client: str) -> int:
        """The highest epoch of a kick heard for ``client`` while a claim of it was being made
        here (0: none)."""
        refs, kicked = self._claiming.pop(client)
        if refs > 1:
            self._claiming[client] = (refs - 1, kicked)
        return kicked

    def _unclaim(self, handle: _Handle) -> None:
        """The session ended: release its claim and channel (in the background), once."""
        handle.ended = True
        if self.cluster is None or self._nursery is None:
            return
        claim, watching = handle.claim, handle.watching
        handle.claim = handle.watching = None
        if (claim is not None or watching is not None) and self._spawn(
            self._release, claim, watching
        ):
            self.releasing += 1

    async def _release(self, claim: tuple[str, int] | None, watching: str | None) -> None:
        assert self.cluster is not None
        try:
            if claim is not None:
                await self.cluster.release(*claim)
            if watching is not None:
                await self.cluster.unwatch(watching)
        finally:
            self.releasing -= 1
            self._signal()

    async def _reserve_seqs(self, count: int) -> None:
        """Reserve ``count`` seqs for the core, trying again after a pause (growing to
        STORE_RETRY_MAX) while the store fails: one reservation at a time, never a storm."""
        failures = 0
        while True:
            try:
                start = await self.store.reserve_seqs(count)
            except StoreError as exc:
                if not failures:
                    log.warning(
                        "seqs not reserved: retrying", extra={"fields": {"error": str(exc)}}
                    )
                failures += 1
                await trio.sleep(_retry_pause(failures))
                continue
            break
        self.core.seqs_reserved(start, count)
        self._seqs_ready.set()
        self._seqs_ready = trio.Event()
        self._apply()
        self._signal()

    async def _count_topics(self, messages: tuple[int, ...]) -> None:
        """Read the counts a :class:`CountTopics` asks for (within the store's deadline)."""
        try:
            counts = await self.store.topic_counts(messages)
        except StoreError as exc:
            log.warning("topic counts not read", extra={"fields": {"error": str(exc)}})
            self.core.topics_not_counted()
        else:
            self.core.topics_counted(counts, self.clock())
        self._apply()
        self._signal()

    async def _load_memberships(self) -> None:
        """Live sockets' topics, for presence and typing (see relayd/_relay/presence.py), one
        at a time from one task (a reconnect storm queues them; a socket gone meanwhile is
        skipped). A store that cannot answer leaves the session without them (logged):
        messages still flow, presence and typing in topics do not, until it reconnects."""
        try:
            while self._memberships_due:
                sid = next(iter(self._memberships_due))
                client = self._memberships_due.pop(sid)
                if not self.core.live(sid):
                    continue
                try:
                    rows = await self.store.memberships(client)
                except StoreError as exc:
                    log.warning("topics not loaded", extra={"fields": {"error": str(exc)}})
                    continue
                self.core.memberships_loaded(sid, rows, self.clock())
                self._apply()
                self._signal()
        finally:
            self._loading_memberships = False

    async def _record_seen(self) -> None:
        """Record when clients were last connected, all those waiting in one store call, from
        one task (best effort: logged if not)."""
        try:
            while self._seen_due:
                seen, self._seen_due = self._seen_due, {}
                try:
                    await self.store.set_last_seen(seen)
                except StoreError as exc:
                    log.info("last_seen not recorded", extra={"fields": {"error": str(exc)}})
        finally:
            self._seeing = False

    def _presence(self, note: PresenceNote) -> None:
        """A presence event: applied here (what the core decides is carried out by the
        :meth:`_apply` loop under way), and told to every other node."""
        self.core.presence_event(note, self.clock())
        if self.cluster is not None:
            self._publish_soon(
                [("", {"k": "presence", "from": self.cluster.node, "n": attrs.asdict(note)})]
            )

    def _typing(self, note: TypingNote) -> None:
        """A typing indicator: to its readers here, and (cluster mode) to the node of its
        reader, or every node for a topic."""
        self.core.typed(note, self.clock())
        if self.cluster is None:
            return
        body = {"k": "typing", "from": self.cluster.node, "n": attrs.asdict(note)}
        if note.to is None:
            self._publish_soon([("", body)])
        elif not self.core.online(note.to):
            self._publish_soon([(note.to, body)])

    def topic_changed(self, topic: str, presence: bool | None) -> None:
        """A topic's presence setting changed, or it was deleted or created (``None``): the
        live sockets here, and on every node, learn it (a REST route, here)."""
        self.core.topic_changed(topic, presence)
        self._apply()
        if self.cluster is not None:
            note = {"t": topic, "p": presence}
            self._publish_soon([("", {"k": "topic", "from": self.cluster.node, "n": note})])

    def topic_heard(self, topic: str, presence: bool | None) -> None:
        self.core.topic_changed(topic, presence)
        self._apply()

    def membership_changed(self, topic: str, client: str, *, joined: bool, presence: bool) -> None:
        """``client`` subscribed to ``topic`` or left it (a REST route, here): its session (on
        any node) learns it, and with presence on, the topic's subscribers are told."""
        self.core.membership_changed(
            topic, client, joined=joined, presence=presence, now=self.clock()
        )
        self._apply()
        self._signal()
        if self.cluster is not None:
            note = {"t": topic, "c": client, "j": joined, "p": presence}
            self._publish_soon([("", {"k": "member", "from": self.cluster.node, "n": note})])

    async def _publish_announces(self) -> None:
        """Publish the waiting hints, one round trip at a time, until none wait."""
        try:
            while self._announces:
                announces, self._announces = self._announces, {}
                notes: list[tuple[str, dict[str, Any]]] = [
                    (client, {"k": kind, "c": client, "s": seq})
                    for (kind, client), seq in announces.items()
                ]
                await self._publish(notes)
        finally:
            self._publishing = False

    async def _publish(self, notes: list[tuple[str, dict[str, Any]]]) -> None:
        """Publish hints; one that cannot go out makes every node resync once Redis is back
        (a hint is never the truth: it may be late, never lost)."""
        assert self.cluster is not None
        if self._resync_due:
            notes = [*notes, ("", {"k": "resync"})]
        try:
            await self.cluster.publish(notes)
        except ClusterUnavailable as exc:
            if not self._resync_due:
                log.warning("hints not published", extra={"fields": {"error": str(exc)}})
            self._resync_due = True
        else:
            self._resync_due = False

    def _publish_soon(self, notes: list[tuple[str, dict[str, Any]]]) -> None:
        """Publish ``notes`` from the one task that publishes notes, in batches of NOTE_BATCH
        (one round trip each): a reconnect storm's presence notes are a few round trips, not a
        task and a call each. Past MAX_NOTES waiting, the oldest of those never stored
        (presence, typing, broadcasts: at most once) are dropped, and counted."""
        self._notes.extend(notes)
        if len(self._notes) > MAX_NOTES:
            kept, dropped = [], 0
            excess = len(self._notes) - MAX_NOTES
            for note in self._notes:
                if dropped < excess and note[1].get("k") in EPHEMERAL_NOTES:
                    dropped += 1
                    continue
                kept.append(note)
            self._notes = kept
            self.core.metrics.events["notes_dropped"] += dropped
        if not self._noting:
            self._noting = self._spawn(self._publish_notes)

    async def _publish_notes(self) -> None:
        try:
            while self._notes:
                batch, self._notes = self._notes[:NOTE_BATCH], self._notes[NOTE_BATCH:]
                await self._publish(batch)
        finally:
            self._noting = False

    def _publish_revocation(self, revocation: Revocation) -> None:
        assert self.cluster is not None
        note = {"k": "revoked", "from": self.cluster.node, "r": attrs.asdict(revocation)}
        self._publish_soon([("", note)])

    def _publish_roles(self, client: str, roles: tuple[str, ...] | None) -> None:
        assert self.cluster is not None
        note = {
            "k": "roles",
            "from": self.cluster.node,
            "c": client,
            "roles": None if roles is None else list(roles),
        }
        self._publish_soon([("", note)])

    # The cluster's Listener (relayd/_cluster.py): what this node hears from the others.

    def wake(self, client: str, seq: int) -> None:
        self.core.wake(client, seq, self.clock())
        self._apply()

    def receipts_owed(self, client: str, seq: int) -> None:
        self.core.receipts_owed(client, seq)
        self._apply()

    def presence_heard(self, note: PresenceNote) -> None:
        self.core.presence_event(note, self.clock())
        self._apply()

    def broadcast_heard(self, note: BroadcastNote) -> None:
        self.core.broadcast_heard(note)
        self._apply()

    def typing_heard(self, note: TypingNote) -> None:
        self.core.typed(note, self.clock())
        self._apply()

    def member_heard(self, topic: str, client: str, joined: bool, presence: bool) -> None:
        self.core.membership_changed(
            topic, client, joined=joined, presence=presence, now=self.clock()
        )
        self._apply()

    def kicked(self, client: str, epoch: int) -> None:
        claiming = self._claiming.get(client)
        if claiming is not None:  # a session here may not be active yet: see _authenticate
            self._claiming[client] = (claiming[0], max(claiming[1], epoch))
        self.core.replaced_elsewhere(client, epoch, self.clock())
        self._apply()
        self._signal()

    def key_changed(self, notice: KeyNotice) -> None:
        self.core.key_changed([notice], self.clock())
        self._apply()

    def revoked_elsewhere(self, revocation: Revocation) -> None:
        self.auth.revoked_elsewhere(revocation)
        self.revoked(revocation)

    def roles_changed(self, client: str, roles: tuple[str, ...] | None) -> None:
        self.auth.roles_changed_elsewhere(client, roles)
        self._signal()

    def resync(self) -> None:
        """Hints may have been lost, or this node has its lease again (``store_available``
        may have changed): every client here looks in the store."""
        self.core.resync(self.clock())
        self._apply()
        self._signal()
        self._spawn(self._verify_claims)
        self._spawn(self._reload_revocations)

    async def _reload_revocations(self) -> None:
        """After a resync: an access token another node revoked while its hint could not reach
        this one is refused from now on, and a session here running on it is closed (4003),
        as the hint would have closed it."""
        try:
            await self.auth.reload_revocations()
        except StoreError as exc:
            log.warning("revocations not reloaded", extra={"fields": {"error": str(exc)}})
            return
        now = self.clock()
        for client, token_id in self.core.active_tokens():
            if self.auth.is_revoked(token_id):
                self.core.revoke(client, now, token_id=token_id, reason="token_revoked")
        self._apply()
        self.revocations_reloaded += 1
        self._signal()

    async def _verify_claims(self) -> None:
        """After a resync: a session whose claim another node took while a kick could not
        reach this one is closed (4009), as the kick would have."""
        assert self.cluster is not None
        claims = [h.claim for h in self._handles.values() if h.claim is not None]
        try:
            lost = await self.cluster.lost(claims)
        except ClusterUnavailable as exc:
            log.warning("claims not verified", extra={"fields": {"error": str(exc)}})
            return
        for client, epoch in lost:
            self.core.replaced_elsewhere(client, epoch, self.clock())
        self._apply()

    def fenced(self) -> None:
        """This node lost its lease: its claims may be taken. Close every session (1013)."""
        self.core.fence(self.clock())
        self._apply()
        self._signal()

    # --- sessions ----------------------------------------------------------------------------

    def revoked(self, revocation: Revocation) -> None:
        """Tokens were revoked (see :class:`Revocation`): a session running on one of them is
        closed with 4003 at once."""
        self.core.revoke(
            revocation.client,
            self.clock(),
            login=revocation.family,
            token_id=revocation.token_id,
            reason=revocation.reason,
        )
        self._apply()

    def keys_changed(self, notices: list[KeyNotice]) -> None:
        """Key changes were committed (see relayd/_keys.py): each online correspondent is sent
        its ``key_changed`` frame at once; the others get theirs when they connect (in
        cluster mode, those on other nodes are told at once too)."""
        self.core.key_changed(notices, self.clock())
        self._apply()
        if self.cluster is not None:
            elsewhere = [n for n in notices if not self.core.online(n.reader)]
            self._publish_soon([(n.reader, {"k": "key", "n": attrs.asdict(n)}) for n in elsewhere])

    async def online(self, clients: Sequence[str]) -> set[str]:
        """Which of ``clients`` have a live session: here, or (cluster mode) on any node.

        Raises:
            ClusterUnavailable: Redis did not answer.
        """
        if self.cluster is not None:
            return await self.cluster.online(clients)
        return {client for client in clients if self.core.online(client)}

    def recent_status(self, sender: str, msgid: str) -> tuple[float, str | None] | None:
        """When a message of ``sender``'s was accepted and the last status it was told, while
        deduplication remembers it (``relay.dedupe_window``)."""
        return self.core.recent_status(sender, msgid)

    # --- REST sessions (GET /messages/pending; rule 8 of core.py) ---------------------------

    async def pull(
        self, token: str, claims: Claims, *, remote: str, wait: float, limit: int
    ) -> list[dict[str, Any]]:
        """Up to ``limit`` deliveries for the client of ``token`` (verified as ``claims``),
        waiting up to ``wait`` seconds for the first: each a delivered ``message`` frame. The
        client's REST session here is opened by its first pull (authenticated and, in cluster
        mode, claimed as a socket's session is). A newer pull of the same client makes one
        still waiting return at once, empty. Cancelled, what the pull was handed stays for
        the next (it is in flight: unacknowledged, it is redelivered after the ack timeout).

        Raises:
            Unavailable: ``too_many_pulls`` (``relay.max_pulls_waiting``), or the session
                could not open (``store_unavailable``, ``shutting_down``, ...).
            Conflict: ``client_connected``: the client has a live WebSocket session.
            TokenError: the token was refused when the session opened.
        """
        if self.pulls >= self.core.relay.max_pulls_waiting:
            raise Unavailable(
                "too many pulls are waiting; try again later",
                code="too_many_pulls",
                details={"retry_after": 1},
                headers={"Retry-After": "1"},
            )
        self.pulls += 1
        try:
            transport = await self._rest_session(token, claims, remote)
            return await self._pull(transport, wait, limit)
        finally:
            self.pulls -= 1

    async def _rest_session(self, token: str, claims: Claims, remote: str) -> RestTransport:
        """The client's REST session here, opened if it has none, once it is ready."""
        transport = self._rest.get(claims.sub)
        if transport is not None and not transport.ended:
            if transport.token_id != claims.jti and transport.ready:
                # A newer token: the session runs on it from now on (as a refresh frame does).
                transport.token_id = claims.jti
                who = Identity(claims.sub, "", claims.iat, claims.exp, claims.jti, claims.family)
                self.core.authenticated(transport.sid, who, self.clock(), refresh=True)
                self._apply()
        else:
            transport = RestTransport(self.new_sid(), remote, token, self._signal)
            transport.token_id = claims.jti
            if self.closing or not self._spawn(self._serve_rest, claims.sub, transport):
                raise Unavailable("relayd is shutting down", code="shutting_down")
            self._rest[claims.sub] = transport
        sid = transport.sid
        # The first load from the store is part of opening: a pull that finds nothing then
        # can say that nothing waits.
        with trio.move_on_after(self.core.ws.auth_timeout):
            await self._until(
                lambda: transport.ended or (transport.ready and self.core.pull_ready(sid))
            )
        if transport.ended and not transport.ready:
            raise _refusal(transport.error)
        if not transport.ready:
            raise Unavailable("the REST session did not open in time", code="store_unavailable")
        return transport

    async def _pull(
        self, transport: RestTransport, wait: float, limit: int
    ) -> list[dict[str, Any]]:
        me = transport.pull = object()
        self._signal()  # a pull still waiting on this session returns
        sid = transport.sid
        self.core.pull(sid, max(0, limit - len(transport.outbox)), self.clock())
        self._apply()
        try:
            with trio.move_on_after(wait):
                await self._until(
                    lambda: bool(transport.outbox) or transport.ended or transport.pull is not me
                )
        finally:
            if transport.pull is me:
                transport.pull = None
                self.core.pull_done(sid, self.clock())
                self._apply()
        if transport.pull is not None:
            return []  # a newer pull took over: what waits is its
        return transport.take(limit)

    async def _serve_rest(self, client: str, transport: RestTransport) -> None:
        try:
            await self.serve(transport, sid=transport.sid)
        finally:
            transport.end()
            if self._rest.get(client) is transport:
                del self._rest[client]
            self._signal()

    def pulling(self, client: str) -> bool:
        """Whether a pull of ``client``'s waits on its REST session here now."""
        transport = self._rest.get(client)
        return transport is not None and transport.pull is not None

    @property
    def waiting_pulls(self) -> int:
        """Pulls waiting on a REST session here now (opened, not yet returned)."""
        return sum(transport.pull is not None for transport in self._rest.values())

    def acknowledge(self, client: str, msgid: str) -> bool:
        """``POST /messages/{msgid}/ack``: ``True`` if ``client``'s REST session here held
        that delivery unacknowledged (its sender is told ``acknowledged``)."""
        transport = self._rest.get(client)
        if transport is None or transport.ended:
            return False
        done = self.core.acknowledge(transport.sid, msgid, self.clock())
        self._apply()
        return done

    async def mark_read(self, reader: str, msgid: str, sender: str | None) -> ReadOutcome:
        """``POST /messages/{msgid}/read``: as a ``read`` frame of ``reader``'s (the sender is
        told the same way), in order with the store operations before it. Cancelled, it
        leaves the read to be recorded all the same.

        Raises:
            StoreUnavailable: the store is failing, or did not answer within READ_TIMEOUT.
        """
        if not self.store_available:
            raise StoreUnavailable("the store cannot take reads now")
        waiter = _ReadWaiter()
        self.core.read(waiter, reader, msgid, sender, self.clock())
        self._apply()
        with trio.move_on_after(READ_TIMEOUT):
            await waiter.done.wait()
        if waiter.outcome is None:
            raise StoreUnavailable("the store did not record the read in time")
        return waiter.outcome

    async def queue_depths(self) -> dict[str, int]:
        """Undelivered messages in the store, per recipient."""
        return await self.store.queue_depths()

    @property
    def store_backlog(self) -> int:
        """Store operations waiting for the next group commit."""
        return len(self._store_queue)

    async def submit(
        self, client: str, doc: dict[str, Any], *, deadline: float, max_waiting: int
    ) -> dict[str, Any]:
        """Send ``doc`` as ``client`` without a session (``POST /messages``; see
        :meth:`RelayCore.submit`) and wait until ``deadline`` (Trio time) for its first
        receipt: the fields of its ``delivery_status`` frame, or, past the deadline, a receipt
        with status ``accepted`` (its receipts then go where an offline sender's go). At most
        ``max_waiting`` requests are in here at once. While the store lags, it waits to be
        read, as a socket does. Cancelled, it leaves the message accepted (if it was), its
        receipts going where an offline sender's go.

        Raises:
            ProtocolError: refused, at once or as its answer (``unknown_recipient``,
                ``queue_full``); ``server_busy`` past ``max_waiting``, or when the store
                lagged until the deadline.
        """
        if self._submitting >= max_waiting:
            raise ProtocolError(
                F.SERVER_BUSY,
                "too many messages sent over REST await their first receipt; retry later",
                details={"retry_after": 1.0},
                strike=False,
            )
        self._submitting += 1
        try:
            with trio.move_on_at(deadline):
                await self._until(lambda: self._accepting or self.closing)
            if not self._accepting and not self.closing:
                raise ProtocolError(
                    F.SERVER_BUSY,
                    "relayd is catching up with its store; retry later",
                    details={"retry_after": 1.0},
                    strike=False,
                )
            return await self._submitted(client, doc, deadline)
        finally:
            self._submitting -= 1

    async def _submitted(self, client: str, doc: dict[str, Any], deadline: float) -> dict[str, Any]:
        try:
            ticket = self.core.submit(client, doc, self.clock())
        except ProtocolError:
            self._apply()  # a refusal may have decided actions too (a seq reservation)
            raise
        waiter = self._waiters[ticket.id] = _Waiter()
        try:
            self._apply()  # its answer may be among the actions already (a duplicate)
            with trio.move_on_at(deadline):
                await waiter.done.wait()
        finally:
            del self._waiters[ticket.id]
            if waiter.answer is None:
                self.core.abandon(ticket.id)
                self._apply()
        answer = waiter.answer
        if answer is None:
            return F.receipt_doc("", ticket.msgid, ticket.to, "accepted", self.clock())
        if answer.error:
            raise ProtocolError(answer.error, answer.message, details=answer.details, strike=False)
        assert answer.receipt is not None
        return answer.receipt

    def new_sid(self) -> int:
        """An id for a socket about to be served (see :meth:`serve`)."""
        return next(self._sids)

    async def serve(self, transport: Transport, *, sid: int | None = None) -> None:
        """Serve one accepted socket until it closes. Runs in the listener's task for it.
        ``sid``: the socket's id, if the listener took one from :meth:`new_sid` already."""
        if sid is None:
            sid = self.new_sid()
        token = conn_id.set(f"ws{sid}")
        handle = _Handle(sid, transport)
        self._handles[sid] = handle
        log.debug("socket opened", extra={"fields": {"remote": transport.remote}})
        try:
            with handle.scope:
                async with trio.open_nursery() as nursery:
                    handle.nursery = nursery
                    self.core.open(
                        sid,
                        transport.remote,
                        self.clock(),
                        token=transport.token,
                        pong_observable=transport.pong_observable,
                        lean=transport.lean,
                        rest=transport.rest,
                    )
                    transport.token = None  # checked by now, or on its way: not kept
                    if not transport.writes_inline:
                        self._start_writer(handle, [], None)
                    self._apply()
                    await self._reader(handle)
                    nursery.cancel_scope.cancel()
        except Exception:
            # A bug, or a transport failing in a way it should not: it ends this session
            # only, never the listener or the other sessions.
            log.exception("session failed", extra={"fields": {"sid": sid}})
            handle.close_request = (CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            handle.nursery = None  # closed: nothing more may start in it (see _apply)
            self._finish(handle)
            self._unclaim(handle)
            if handle.close_request is not None:
                code, reason = handle.close_request
                handle.closing = trio.CancelScope(shield=True)
                with handle.closing:
                    if self._stopped:
                        handle.closing.cancel()
                    await abort_after(CLOSE_TIMEOUT, transport, code, reason)
            # Only now is the socket done with: the drain waits for this.
            del self._handles[sid]
            log.debug("socket closed", extra={"fields": {"close": handle.close_request}})
            self._signal()
            conn_id.reset(token)

    def _finish(self, handle: _Handle) -> None:
        """Tell the core what became of the frames the session had been given."""
        now = self.clock()
        done = handle.batch[: handle.sent]
        written = (len(done), [o.ref for o in done if o.ref is not None])
        cut = handle.sent + handle.chunk  # the frames being written when it ended
        interrupted = [o.ref for o in handle.batch[handle.sent : cut] if o.ref is not None]
        unsent = [o.ref for o in handle.batch[cut:] if o.ref is not None]
        unsent += [o.ref for o in handle.queue if isinstance(o, _Outgoing) and o.ref is not None]
        handle.queue.clear()
        self.core.closed(handle.sid, now, written=written, unsent=unsent, interrupted=interrupted)
        self._apply()

    async def _reader(self, handle: _Handle) -> None:
        core = self.core
        transport = handle.transport
        while True:
            # Backpressure: while the store lags, or this socket has a full queue of frames
            # for its client, stop reading. Commits and writes signal _changed.
            while not (self._accepting and core.readable(handle.sid)):
                await self._changed.wait()
            try:
                data = await transport.receive()
                core.metrics.frames_in += 1
            except TransportClosed:
                return
            # The seqs may have run out while it waited (a claim empties them, on Redis).
            await self._until(lambda: self._accepting)
            core.receive(handle.sid, data, self.clock())
            self._apply()

    async def _writer(
        self, handle: _Handle, started: list[_Outgoing], close: _CloseItem | None
    ) -> None:
        """Write the socket's queue until it is empty, then end; or, for a transport that
        cannot write inline, wait for more (a standing writer: starting a task per burst would
        cost more than the task switch it spares). ``started``: a batch the transport took and
        has not written all of yet (its ``flush`` ends it)."""
        # Started from whichever task made the frames: what it logs is this socket's.
        conn_id.set(f"ws{handle.sid}")
        try:
            batch = started
            while True:
                if not batch and close is None:
                    batch, close = self._take(handle)
                    if not batch and close is None:
                        if handle.transport.writes_inline:
                            return
                        handle.more = trio.Event()
                        await handle.more.wait()
                        continue
                handle.batch, handle.sent = batch, 0
                try:
                    on_time = await self._write(handle, batch, flush=batch is started)
                except TransportClosed:
                    handle.scope.cancel()
                    return
                if not on_time:
                    self._slow_consumer(handle.sid, "write_timeout")
                    self._cut(handle, CloseCode.SLOW_CONSUMER, "write timeout")
                    return
                handle.batch = []
                self._written(handle, batch)
                self._apply()
                if close is not None:
                    self._cut(handle, close.code, close.reason)
                    return
                batch, started = [], []
        finally:
            handle.writing = False

    async def _write(self, handle: _Handle, batch: list[_Outgoing], *, flush: bool) -> bool:
        """Write ``batch`` chunk by chunk; return False if the socket is a slow consumer.

        A chunk still being written ``write_timeout`` after it began (the deadline moves on
        with every chunk) makes the socket a slow consumer. It then gets ``CLOSE_TIMEOUT``
        more to end, so that the 4008 close frame can follow whole frames; a chunk that does
        not end by then is cut off, and the transport drops the connection instead of writing
        a close frame into the middle of a frame. A transport that bounds its own writes
        (``bounded_writes``) catches slow consumers itself, and this never returns False.

        Raises:
            TransportClosed: the socket is gone.
        """
        transport = handle.transport
        limit = math.inf if transport.bounded_writes else self.core.ws.write_timeout
        chunks = [batch] if flush else _chunks(batch, coalesce=transport.coalesces)
        for chunk in chunks:
            handle.chunk = len(chunk)
            due = trio.current_time() + limit
            with trio.move_on_at(due + CLOSE_TIMEOUT) as grace:
                if flush:  # the transport took these frames already
                    await transport.flush()
                else:
                    await transport.send_frames([o.text for o in chunk])
            if grace.cancelled_caught:
                return False
            handle.sent += len(chunk)
            handle.chunk = 0
            if trio.current_time() > due:
                return False
        return True

    async def _ping(self, handle: _Handle) -> None:
        try:
            await handle.transport.ping()
        except TransportClosed:
            return
        finally:
            handle.pinging = False
        self.core.pong(handle.sid, self.clock())
        self._apply()


def _refusal(error: tuple[str, str] | None) -> ApiError:
    """What a pull answers when the REST session it opened was refused (its error frame)."""
    code, message = error or ("connection_closed", "the REST session ended")
    if code == CLIENT_CONNECTED:
        return Conflict(
            "the client has a live WebSocket session: receive on it, or close it first",
            code=code,
        )
    if code.startswith("token_") or code in ("not_authenticated", "missing_token"):
        return TokenError(code, message)
    if code == "too_many_connections":
        return RateLimited(1.0)
    return Unavailable(message, code=code, details={"retry_after": 1}, headers={"Retry-After": "1"})
