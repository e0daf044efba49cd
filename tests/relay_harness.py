"""A fake link for the sans-I/O relay core: the core, a real SQLite store, and sockets as lists.

:class:`CoreHarness` plays the hub's part synchronously, with time as a plain number the test
moves: it carries out the core's actions (frames land in a per-session outbox, store
operations run against a real in-memory SQLite store in one transaction, as the hub's group
commit does, tokens are checked against a table the test fills) and feeds the results back.
Nothing is written to a "socket" until the test says so (:meth:`CoreHarness.flush`), so tests
can hold writes back to model a slow consumer, or cut a session with frames still unwritten.

Typical use::

    h = CoreHarness()
    alice = h.client("alice")
    bob = h.client("bob")
    a = h.connect(alice)          # authenticated; welcome frame read
    b = h.connect(bob)
    h.send(a, {"to": bob.uuid, "content": "hi", "acknowledge": True})
    [message] = h.messages(b)     # delivered frames only
    h.send(b, {"type": "ack", "msgid": message["msgid"]})
"""

from __future__ import annotations

import json
import sqlite3
import uuid as uuid_module
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import attrs

from relayd._config import RelayConfig, TopicsConfig, WebsocketConfig
from relayd._relay import records
from relayd._relay.core import RelayCore, Ticket
from relayd._relay.effects import (
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
from relayd._relay.model import Identity, Ref
from relayd._relay.seqs import SeqPool
from relayd._store import _connect, transaction
from relayd._store_messages import _apply, last_message_seq, recent_messages
from relayd._store_topics import topic_counts

T0 = 1_000_000.0  # the harness's epoch: `now` starts here


@attrs.define
class Bus:
    """Cluster mode for harnesses: nodes (cores) sharing one store, as relayd/_cluster.py
    links them through Redis. Claims, the seq counter and hints are kept here; hints are
    delivered when a node's store batch commits, unless ``hold`` (then they wait in
    ``held``, to model hints that come late or are lost)."""

    nodes: list[CoreHarness] = attrs.Factory(list)
    counter: int = 0  # the store's seq counter (what relayd/_redis reserves from)
    epochs: int = 0
    claims: dict[str, tuple[CoreHarness, int]] = attrs.Factory(dict)
    hold: bool = False
    held: list[Callable[[], None]] = attrs.Factory(list)  # hints and kicks, undelivered

    def reserve(self, count: int) -> int:
        start = self.counter + 1
        self.counter += count
        return start

    def claim(self, node: CoreHarness, client: str) -> tuple[int, int]:
        """``(epoch, floor)``; the previous holder, on another node, is kicked."""
        self.epochs += 1
        epoch = self.epochs
        previous = self.claims.get(client)
        self.claims[client] = (node, epoch)
        if previous is not None and previous[0] is not node:
            self._deliver(previous[0], lambda n: n.core.replaced_elsewhere(client, epoch, n.now))
        return epoch, self.counter

    def _deliver(self, node: CoreHarness, note: Callable[[CoreHarness], None]) -> None:
        def deliver() -> None:
            note(node)
            node.run()

        if self.hold:
            self.held.append(deliver)
        else:
            deliver()

    def announce(self, sender: CoreHarness, announce: Announce) -> None:
        for node in self.nodes:
            if node is sender:
                continue
            if announce.kind == "wake":
                self._deliver(node, lambda n: n.core.wake(announce.client, announce.seq, n.now))
            else:
                self._deliver(node, lambda n: n.core.receipts_owed(announce.client, announce.seq))

    def release(self) -> None:
        """Deliver the held hints and kicks, in order."""
        self.hold = False
        held, self.held = self.held, []
        for deliver in held:
            deliver()


@attrs.frozen
class Client:
    uuid: str
    name: str
    token: str


@attrs.define
class SessionLog:
    """What one fake socket saw."""

    sid: int
    outbox: list[tuple[str, Ref | None]] = attrs.Factory(list)  # queued, not yet written
    written: list[dict[str, Any]] = attrs.Factory(list)  # frames the peer has, unread
    closed: tuple[int, str] | None = None  # the close the core asked for
    aborted: bool = False
    pings: int = 0
    gone: bool = False  # the harness told the core it closed


# Each delivery with its message's columns, as one row per (message, recipient).
DELIVERY_ROWS = (
    "SELECT d.*, m.msgid, m.high, m.acknowledge, m.fields, m.key_id, m.accepted_at"
    " FROM deliveries d JOIN messages m ON m.id = d.message"
)


class CoreHarness:
    """The relay core driven synchronously. See the module docstring."""

    db: sqlite3.Connection

    def __init__(
        self,
        relay: RelayConfig | None = None,
        websocket: WebsocketConfig | None = None,
        *,
        db: sqlite3.Connection | None = None,
        now: float = T0,
        auto_store: bool = True,
        auto_flush: bool = True,
        bus: Bus | None = None,
        seq_block: int = 100,
        topics: TopicsConfig | None = None,
        permits: Callable[[str, str], bool] | None = None,
    ) -> None:
        """``bus``: a node of a cluster (its store is the bus's first node's)."""
        self.relay = relay or RelayConfig()
        self.ws = websocket or WebsocketConfig()
        self.now = now
        self.bus = bus
        first = bus.nodes[0] if bus is not None and bus.nodes else None
        if first is not None:
            db = first.db
        self.db = db if db is not None else _connect(":memory:", "full")
        # Seqs come in reserved blocks, as the hub's do; a publish reserves from the same
        # counter (the bus's, in a cluster).
        self._reserved = 0
        if bus is not None:
            bus.nodes.append(self)
        seqs = SeqPool.reserved(seq_block)
        seqs.add(self.reserve(seq_block), seq_block)
        self.core = RelayCore(
            self.relay,
            self.ws,
            now=now,
            last_seq=last_message_seq(self.db),
            seqs=seqs,
            recent=recent_messages(
                self.db, since=now - self.relay.dedupe_window, limit=self.relay.dedupe_max_entries
            ),
            cluster=bus is not None,
            topics=topics,
            permits=permits,
        )
        # A cluster's nodes check tokens against one table, as they share the store.
        self.tokens: dict[str, Identity] = first.tokens if first is not None else {}
        self.sessions: dict[int, SessionLog] = {}
        self.pending_store: list[records.StoreOp] = []
        self.pending_announces: list[Announce] = []  # published after the next commit
        self.pending_auth: list[Authenticate] = []
        self.auto_store = auto_store
        self.auto_flush = auto_flush
        self.auto_auth = True
        self.commits = 0
        self.executed: list[records.StoreOp] = []  # every store operation run, in order
        self._next_sid = 1
        self.log: dict[int, list[dict[str, Any]]] = defaultdict(list)  # every frame written
        self.answers: dict[int, Answer] = {}  # what submitters were answered, by ticket
        self.counted: list[tuple[int, ...]] = []  # the CountTopics asked for, in order
        self.seen: list[tuple[str, float]] = []  # the Seen asked for, in order
        self.hold_counts = False  # CountTopics wait in held_counts for answer_counts()
        self.held_counts: list[CountTopics] = []

    def reserve(self, count: int, db: sqlite3.Connection | None = None) -> int:
        """The first of ``count`` fresh seqs: from the bus, or above every seq stored."""
        if self.bus is not None:
            return self.bus.reserve(count)
        start = max(self._reserved, last_message_seq(self.db)) + 1
        self._reserved = start + count - 1
        return start

    # --- clients ------------------------------------------------------------------------------

    def client(self, name: str, *, ttl: float = 900.0) -> Client:
        """Register a client in the store and give it a token valid for ``ttl``."""
        client_uuid = str(uuid_module.uuid4())
        with transaction(self.db):
            self.db.execute(
                "INSERT INTO clients (uuid, name, secret_hash, roles, created_at,"
                " tokens_valid_after) VALUES (?, ?, '', 'client', ?, ?)",
                (client_uuid, name, self.now, self.now),
            )
        return Client(client_uuid, name, self.token_for(client_uuid, name, ttl=ttl))

    def token_for(
        self, client_uuid: str, name: str, *, ttl: float = 900.0, login: str | None = None
    ) -> str:
        """A token for the client, issued now; ``login``: the refresh family it belongs to.
        The token's text is also its jti."""
        token = f"token-{len(self.tokens)}-{name}"
        self.tokens[token] = Identity(client_uuid, name, self.now, self.now + ttl, token, login)
        return token

    # --- driving the core ---------------------------------------------------------------------

    def open(
        self,
        *,
        remote: str = "10.0.0.1",
        token: str | None = None,
        pong: bool = False,
        lean: bool = False,
        rest: bool = False,
    ) -> int:
        sid = self._next_sid
        self._next_sid += 1
        self.sessions[sid] = SessionLog(sid)
        self.core.open(
            sid, remote, self.now, token=token, pong_observable=pong, lean=lean, rest=rest
        )
        self.run()
        return sid

    def connect(self, client: Client, **kwargs: Any) -> int:
        """Open and authenticate a session for ``client``; check and drop its welcome frame."""
        sid = self.open(token=client.token, **kwargs)
        welcome = self.read(sid)
        assert welcome[0]["type"] == "connection", welcome
        self.sessions[sid].written[:0] = welcome[1:]
        return sid

    def pull(self, sid: int, limit: int = 100) -> list[dict[str, Any]]:
        """A pull on REST session ``sid`` that returns at once: the deliveries it takes."""
        self.core.pull(sid, limit, self.now)
        self.run()
        self.core.pull_done(sid, self.now)
        self.run()
        return self.messages(sid)

    def send(self, sid: int, frame: dict[str, Any] | str | bytes) -> None:
        data = json.dumps(frame) if isinstance(frame, dict) else frame
        self.core.receive(sid, data, self.now)
        self.run()

    def submit(self, client: Client, doc: dict[str, Any]) -> Ticket:
        """Send ``doc`` as ``client`` without a session (a REST send); the answer, when it
        comes, is in :attr:`answers` under the ticket's id.

        Raises:
            ProtocolError: refused at once, as the core refused it.
        """
        ticket = self.core.submit(client.uuid, doc, self.now)
        self.run()
        return ticket

    def advance(self, seconds: float) -> None:
        """Move time forward, firing every timer due on the way, in order."""
        target = self.now + seconds
        while True:
            deadline = self.core.next_deadline()
            if deadline is None or deadline > target:
                break
            self.now = max(self.now, deadline)
            self.core.tick(self.now)
            self.run()
        self.now = target
        self.core.tick(self.now)
        self.run()

    def disconnect(self, sid: int, *, written: int = 0, interrupted: int = 0) -> None:
        """The socket went away. The first ``written`` frames of its outbox were written as it
        went (and never reported), the next ``interrupted`` were being written when it broke,
        the rest never were: what the hub tells the core when a socket ends mid-batch."""
        log = self.sessions[sid]
        done = log.outbox[:written]
        for text, _ in done:
            doc = json.loads(text)
            log.written.append(doc)
            self.log[sid].append(doc)
        refs = [ref for _, ref in log.outbox[written:]]
        cut = [r for r in refs[:interrupted] if r is not None]
        unsent = [r for r in refs[interrupted:] if r is not None]
        log.outbox.clear()
        log.gone = True
        self.core.closed(
            sid,
            self.now,
            written=(len(done), [r for _, r in done if r is not None]),
            unsent=unsent,
            interrupted=cut,
        )
        self.run()

    def flush(self, sid: int | None = None) -> None:
        """Write every queued frame of ``sid`` (or of every session) and report it written."""
        for log in [self.sessions[sid]] if sid is not None else list(self.sessions.values()):
            if log.gone or not log.outbox:
                continue
            batch, log.outbox = log.outbox, []
            for text, _ in batch:
                doc = json.loads(text)
                log.written.append(doc)
                self.log[log.sid].append(doc)
            self.core.written(log.sid, len(batch), [r for _, r in batch if r is not None], self.now)
            self._carry_out()
            self._finish_closes()

    def run(self) -> None:
        """Carry out actions until the core is quiet (store ops too, if ``auto_store``)."""
        while True:
            progressed = self._carry_out()
            if self.auto_store and (self.pending_store or self.pending_announces):
                self.commit()
                progressed = True
            if self.auto_auth and self.pending_auth:
                self.resolve_auth()
                progressed = True
            if self.auto_flush:
                before = sum(len(s.outbox) for s in self.sessions.values())
                if before:
                    self.flush()
                    progressed = True
            self._finish_closes()
            if not progressed and not self._has_work():
                return

    def _has_work(self) -> bool:
        return bool(
            (self.auto_store and self.pending_store)
            or (self.auto_auth and self.pending_auth)
            or (self.auto_flush and any(s.outbox for s in self.sessions.values() if not s.gone))
        )

    def _carry_out(self) -> bool:
        actions = self.core.take_actions()
        for action in actions:
            if isinstance(action, Send):
                log = self.sessions[action.sid]
                assert not log.gone, f"frame for closed session {action.sid}: {action.text}"
                log.outbox.append((action.text, action.ref))
            elif isinstance(action, Close):
                log = self.sessions[action.sid]
                log.closed = (action.code, action.reason)
                log.aborted = action.abort
            elif isinstance(action, Authenticate):
                self.pending_auth.append(action)
            elif isinstance(action, Ping):
                self.sessions[action.sid].pings += 1
            elif isinstance(action, ReserveSeqs):
                self.core.seqs_reserved(self.reserve(action.count), action.count)
            elif isinstance(action, Seen):
                self.seen.append((action.client, action.at))
            elif isinstance(action, LoadMemberships):
                rows = self.db.execute(
                    "SELECT t.id, t.presence FROM topic_members m JOIN topics t"
                    " ON t.id = m.topic WHERE m.client = ? ORDER BY t.id",
                    (action.client,),
                ).fetchall()
                loaded = [(row[0], bool(row[1])) for row in rows]
                self.core.memberships_loaded(action.sid, loaded, self.now)
            elif isinstance(action, PresenceNote | TypingNote | BroadcastNote):
                # Here at once, as the hub does; on the other nodes of a cluster via the bus.
                for node in [self] + [
                    n for n in (self.bus.nodes if self.bus else []) if n is not self
                ]:
                    if isinstance(action, PresenceNote):
                        node.core.presence_event(action, node.now)
                    elif isinstance(action, BroadcastNote):
                        node.core.broadcast_heard(action)
                    else:
                        node.core.typed(action, node.now)
                    if node is not self:
                        node.run()
            elif isinstance(action, CountTopics):
                self.counted.append(action.messages)
                if self.hold_counts:
                    self.held_counts.append(action)  # answered by answer_counts()
                else:
                    self.core.topics_counted(topic_counts(self.db, action.messages), self.now)
            elif isinstance(action, Announce):
                self.pending_announces.append(action)
            elif isinstance(action, Answer):
                assert action.ticket not in self.answers, f"ticket answered twice: {action}"
                self.answers[action.ticket] = action
            else:
                self.pending_store.append(action)
        return bool(actions)

    def _finish_closes(self) -> None:
        """A session the core closed goes away: at once if aborted, else once its frames are
        written (as the hub's writer does)."""
        for log in list(self.sessions.values()):
            if log.closed is None or log.gone:
                continue
            if log.aborted or (not log.outbox and self.auto_flush):
                self.disconnect(log.sid)

    def execute(self, ops: list[records.StoreOp]) -> list[Any]:
        """Run ``ops`` in one transaction, as the hub's store task does, without telling the
        core yet (that is :meth:`commit`'s second half, ``core.store_done``)."""
        with transaction(self.db):
            max_queued = self.relay.max_queued_per_recipient
            results = [
                _apply(self.db, op, max_queued, None, lambda _, n: self.reserve(n)) for op in ops
            ]
        self.commits += 1
        self.executed += ops
        return results

    def answer_counts(self) -> None:
        """Answer the held CountTopics, with the store's counts as they are now."""
        held, self.held_counts = self.held_counts, []
        for action in held:
            self.core.topics_counted(topic_counts(self.db, action.messages), self.now)
        self.run()

    def commit(self) -> list[Any]:
        """Run the pending store operations in one transaction and report the results."""
        ops, self.pending_store = self.pending_store, []
        announces, self.pending_announces = self.pending_announces, []
        results = self.execute(ops)
        self.core.store_done(ops, results, self.now)
        self._carry_out()
        if self.bus is not None:
            for announce in announces:
                self.bus.announce(self, announce)
        return results

    def resolve_auth(self) -> None:
        pending, self.pending_auth = self.pending_auth, []
        for action in pending:
            who = self.tokens.get(action.token)
            if who is None:
                self.core.auth_failed(
                    action.sid, "token_invalid", "bad token", self.now, refresh=action.refresh
                )
            elif self.now > who.expires_at:
                self.core.auth_failed(
                    action.sid, "token_expired", "expired", self.now, refresh=action.refresh
                )
            else:
                if self.bus is not None and not action.refresh:
                    epoch, floor = self.bus.claim(self, who.client)
                    who = attrs.evolve(who, epoch=epoch)
                    self.core.raise_seq_floor(floor)
                    self._carry_out()  # the reservation (see ReserveSeqs)
                self.core.authenticated(action.sid, who, self.now, refresh=action.refresh)
            self._carry_out()

    # --- reading what the peers got ---------------------------------------------------------

    def read(self, sid: int) -> list[dict[str, Any]]:
        """Every frame written to ``sid`` since the last read."""
        log = self.sessions[sid]
        frames, log.written = log.written, []
        return frames

    def messages(self, sid: int) -> list[dict[str, Any]]:
        """The delivered messages among the frames written to ``sid`` since the last read;
        the other frames are kept for :meth:`read`."""
        log = self.sessions[sid]
        delivered = [f for f in log.written if f.get("type") == "message"]
        log.written = [f for f in log.written if f.get("type") != "message"]
        return delivered

    def receipts(self, sid: int) -> list[tuple[str, str, str]]:
        """``(type, msgid, status)`` of the receipts written to ``sid`` since the last read."""
        log = self.sessions[sid]
        kinds = ("delivery_status", "delivery_update")
        found = [(f["type"], f["msgid"], f["status"]) for f in log.written if f["type"] in kinds]
        log.written = [f for f in log.written if f["type"] not in kinds]
        return found

    def stored(self, where: str = "1", *args: Any) -> list[sqlite3.Row]:
        return list(
            self.db.execute(f"SELECT * FROM ({DELIVERY_ROWS}) WHERE {where} ORDER BY seq", args)
        )

    def restart(self) -> CoreHarness:
        """A new core on the same store, as after a crash: sessions and memory are gone."""
        other = CoreHarness(
            self.relay,
            self.ws,
            db=self.db,
            now=self.now,
            auto_store=self.auto_store,
            auto_flush=self.auto_flush,
        )
        other.tokens = dict(self.tokens)
        return other
