"""``kill -9`` under load in cluster mode: nothing a sender was told was accepted is lost.

    python -m contrib.bench.cluster_crash                          # 10 rounds, 3 nodes
    python -m contrib.bench.cluster_crash --rounds 2 --nodes 2 --pairs 6
    python -m contrib.bench.cluster_crash --kill redis --appendfsync everysec

Issue 12's failure guarantees, with real processes: one Redis (``appendonly yes``,
``appendfsync always``, or ``--appendfsync``), N relayd nodes (``store.engine = "redis"``,
each ``relayd serve`` in a process of its own, one state directory for their store keys), and
clients spread over the nodes (pair *i*'s sender on node *i mod N*, its recipient on node
*i + 1 mod N*). Each sender keeps ``--window`` acknowledged messages outstanding (sent, not
yet final); each recipient acknowledges every message it gets. The clients are this process,
on Trio, speaking raw frames (the SDK's WebSocket, ``relayd.client._ws``), so that every
receipt is seen as sent.

A round registers fresh pairs and runs traffic until ``--before`` messages were accepted;
then it kills, with SIGKILL, one node (``--kill node``: round *r* kills node *r mod N*) or
Redis (``--kill redis``: started again at once, on its port and its data). A killed node's
clients see their sockets drop and reconnect to the next node that answers; each sender sends
again, with the same msgid, what no receipt answered (relayd deduplicates), and a message
refused with an error frame (``store_unavailable``) after the pause the frame asks for. Traffic
goes on until ``--after`` more were accepted; then the senders stop, and the round waits (at
most ``--settle`` s) until every message has its final receipt and every accepted one has
arrived. A killed node is started again before the next round.

Counted per round and in total: ``sent`` (distinct msgids), ``accepted`` (a receipt said
``queued``, ``queued_offline``, ``pending_ack``, or a final ``delivered``/``acknowledged``),
``delivered`` (distinct msgids that reached their recipient), ``lost`` (accepted, never
delivered; ``lost_oldest_s``: how long before the kill the oldest of them was accepted),
``duplicates`` (copies beyond the first), ``redelivered`` (deliveries marked
``redelivered: true``), ``unmarked_duplicates`` (a copy not so marked), ``not_final`` (no
final receipt by the end; ``unfinished``: of those not lost), ``misrouted`` (wrong
``from``/``to``/content), ``resent`` (sent again after a reconnect), ``retried`` (after an
error frame), ``reconnects``, ``in_flight_at_kill`` (messages sent and not yet final when the
kill came; ``victim_in_flight``: of pairs with a client on the killed node). ``ok``: nothing
unmarked, misrouted or unfinished, and nothing lost, except that with Redis on ``everysec``
killed, what it accepted in the last EVERYSEC_WINDOW seconds may be. One JSON line, appended
to contrib/bench/results/results.jsonl (``--results``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import trio

from relayd.client._errors import ClientError
from relayd.client._ws import Closed, WebSocket, connect

from ._proc import RESULTS, record
from ._servers import BENCH_SETTINGS, Settings, TomlValue, merge, render_config

ACCEPTED = frozenset({"queued", "queued_offline", "pending_ack", "delivered", "acknowledged"})
FINAL = frozenset({"delivered", "acknowledged", "failed", "expired"})
START_TIMEOUT = 30.0  # a process (Redis, a node) says it is ready within this
CONNECT_TIMEOUT = 5.0  # a socket's connect, handshake and welcome, together
RETRY_MAX = 0.5  # a client that no node welcomed tries them all again after at most this
REDIS_READY = b"Ready to accept connections"
KILLS = ("node", "redis")
# A socket that is gone: closed (its code), or broken under a write (the SDK's WebSocket
# raises the stream's error then, not Closed).
BROKEN = (Closed, anyio.BrokenResourceError, anyio.ClosedResourceError)


def close_code(exc: BaseException) -> int:
    return exc.code if isinstance(exc, Closed) else 1006


@dataclass
class CrashParams:
    rounds: int = 10
    nodes: int = 3
    pairs: int = 12
    window: int = 4
    before: int = 400  # messages accepted before the kill
    after: int = 400  # more accepted after it
    settle: float = 30.0
    appendfsync: str = "always"
    lease: float = 10.0  # store.lease (relayd's default)
    kill: str = "node"  # or "redis": kill -9 of Redis (started again at once)


# --- processes -------------------------------------------------------------------------------


class Child:
    """A child process whose output goes to a log file, read as it comes (so that its pipe
    never fills) until a line says it is ready."""

    def __init__(self, process: trio.Process, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path
        self._ready = trio.Event()
        self.ready_line: bytes | None = None

    @classmethod
    async def start(
        cls,
        nursery: trio.Nursery,
        argv: list[str],
        log_path: Path,
        is_ready: Callable[[bytes], bool],
        *,
        env: dict[str, str] | None = None,
    ) -> Child:
        """Start ``argv`` and return once a line of its output passes ``is_ready``.

        Raises:
            RuntimeError: it exited first, or said nothing of the kind in START_TIMEOUT.
        """
        process = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        child = cls(process, log_path)
        nursery.start_soon(child._drain, is_ready)
        with trio.move_on_after(START_TIMEOUT):
            await child._ready.wait()
        if child.ready_line is None:
            child.kill()
            await child.wait()
            tail = (await trio.Path(log_path).read_text(errors="replace"))[-2000:]
            raise RuntimeError(f"{argv[0]} did not get ready:\n{tail}")
        return child

    async def _drain(self, is_ready: Callable[[bytes], bool]) -> None:
        assert self.process.stdout is not None
        buffer = b""
        with self.log_path.open("ab") as log:
            async with self.process.stdout:
                while chunk := await self.process.stdout.receive_some():
                    log.write(chunk)
                    if self.ready_line is None:
                        buffer += chunk
                        *lines, buffer = buffer.split(b"\n")
                        self.ready_line = next((line for line in lines if is_ready(line)), None)
                        if self.ready_line is not None:
                            self._ready.set()
        self._ready.set()  # it exited: whoever waits for it to be ready hears so

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()

    async def stop(self) -> None:
        """SIGTERM, and wait for it (SIGKILL after START_TIMEOUT)."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(START_TIMEOUT):
                await self.process.wait()
            self.kill()
        await self.wait()

    async def wait(self) -> int:
        with trio.fail_after(START_TIMEOUT):
            return await self.process.wait()


def redis_binary() -> str | None:
    return shutil.which("redis-server") or shutil.which("valkey-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def start_redis(
    nursery: trio.Nursery, binary: str, data: Path, *extra: str, port: int | None = None
) -> tuple[Child, str]:
    """A Redis of the run's own on a loopback port (a free one by default); it and its URL."""
    port = free_port() if port is None else port
    argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data)]
    argv += ["--save", "", "--protected-mode", "no", *extra]
    child = await Child.start(nursery, argv, data / "redis.log", lambda line: REDIS_READY in line)
    return child, f"redis://127.0.0.1:{port}/0"


@dataclass
class Node:
    """A relayd node: ``relayd serve`` in a process of its own."""

    index: int
    child: Child
    http_url: str
    ws_url: str
    starts: int = 1

    @property
    def alive(self) -> bool:
        return self.child.process.returncode is None


def node_settings(redis_url: str, extra: Settings | None = None) -> Settings:
    """A node's settings: the bench's, on ``redis_url``, plus ``extra``."""
    return merge(
        BENCH_SETTINGS,
        {
            "http": {"listen": "127.0.0.1:0"},
            "websocket": {"listen": ""},
            "store": {"engine": "redis", "url": redis_url},
        },
        extra or {},
    )


def _ready_urls(line: bytes) -> tuple[str, str] | None:
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("msg") != "relayd ready":
        return None
    return str(doc["http"]), str(doc["ws"])


async def start_node(
    nursery: trio.Nursery, index: int, state: Path, settings: Settings, secret: str, starts: int
) -> Node:
    """Node ``index`` (its ``starts``-th start), on the shared state directory."""
    config = state / f"node{index}.toml"
    config.write_text(render_config(state, settings))
    child = await Child.start(
        nursery,
        [sys.executable, "-m", "relayd", "serve", "--config", str(config)],
        state / f"node{index}-{starts}.log",
        lambda line: _ready_urls(line) is not None,
        env={**os.environ, "RELAYD_SECRET": secret},
    )
    assert child.ready_line is not None
    urls = _ready_urls(child.ready_line)
    assert urls is not None
    return Node(index, child, urls[0], urls[1], starts)


# --- clients ---------------------------------------------------------------------------------


@dataclass
class Outgoing:
    """A message a sender sent: what it was told about it."""

    node: int  # the node it was (last) sent to
    answered: bool = False  # a receipt answered it (else: sent again after a reconnect)
    accepted_at: float | None = None  # when a receipt first said it was accepted
    final: str | None = None
    seen: list[str] = field(default_factory=list)  # what happened to it, in order


@dataclass
class Pair:
    """A sender, its recipient, and where each is connected."""

    index: int
    sender: str
    sender_token: str
    recipient: str
    recipient_token: str
    sender_node: int
    recipient_node: int
    next_seq: int = 0
    sent: dict[str, Outgoing] = field(default_factory=dict)  # msgid -> it, in send order
    received: Counter[str] = field(default_factory=Counter)  # msgid -> copies

    def outstanding(self) -> int:
        return sum(1 for o in self.sent.values() if o.final is None)


class Round:
    """One round's clients and what they saw."""

    def __init__(self, number: int, nodes: list[Node], pairs: list[Pair], window: int) -> None:
        self.number = number
        self.nodes = nodes
        self.pairs = pairs
        self.window = window
        self.stopping = False  # senders send nothing new
        self.accepted = 0
        self.redelivered = 0
        self.unmarked_duplicates = 0
        self.misrouted = 0
        self.resent = 0
        self.retried = 0
        self.reconnects = 0
        self.welcomed = 0
        self.errors: Counter[str] = Counter()
        self.closes: Counter[str] = Counter()
        self.samples: list[dict[str, Any]] = []  # the first anomalous frames
        self._changed = trio.Event()

    def changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, done: Callable[[], bool]) -> None:
        """Wait until ``done()`` holds (checked after every frame a client handles)."""
        while not done():
            await self._changed.wait()

    def anomaly(self, frame: dict[str, Any]) -> None:
        if len(self.samples) < 5:
            self.samples.append(frame)

    def settled(self) -> bool:
        """Every message has its final receipt, and every accepted one has arrived."""
        return self.stopping and all(
            o.final is not None and (o.accepted_at is None or pair.received[msgid])
            for pair in self.pairs
            for msgid, o in pair.sent.items()
        )

    # --- the clients' tasks ---

    async def connect(self, home: int, token: str) -> tuple[WebSocket, int]:
        """A welcomed socket on node ``home`` or, if it does not answer, on the next that
        does; and that node's index."""
        attempt = 0
        while True:
            for step in range(len(self.nodes)):
                index = (home + step) % len(self.nodes)
                ws = await self._try(self.nodes[index].ws_url, token)
                if ws is not None:
                    return ws, index
            attempt += 1
            # No node welcomed it (all restarting, or refusing): a pause before the next try.
            await trio.sleep(min(RETRY_MAX, 0.05 * attempt))

    async def _try(self, url: str, token: str) -> WebSocket | None:
        ws: WebSocket | None = None
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                ws = await connect(url, headers=[("Authorization", f"Bearer {token}")])
                welcome = json.loads(await ws.receive())
        except (OSError, ClientError, trio.TooSlowError) as exc:
            self.errors[f"connect: {type(exc).__name__}"] += 1
            if ws is not None:
                await ws.abort()
            return None
        except BaseException:
            if ws is not None:
                await ws.abort()
            raise
        if welcome.get("type") != "connection":
            self.errors[f"welcome: {welcome.get('type')}"] += 1
            await ws.close()
            return None
        return ws

    async def sender(self, pair: Pair) -> None:
        home = pair.sender_node
        first = True
        while True:
            ws, home = await self.connect(home, pair.sender_token)
            if not first:
                self.reconnects += 1
            try:
                async with trio.open_nursery() as retries:
                    if not first:
                        # What no receipt answered (its node died first, or it was refused):
                        # sent again, same msgid.
                        for msgid in [m for m, o in pair.sent.items() if not o.answered]:
                            self.resent += 1
                            await self._send(ws, pair, msgid, home)
                    first = False
                    await self._top_up(ws, pair, home)
                    while True:
                        refused = self._receipt(pair, json.loads(await ws.receive()))
                        if refused is not None:
                            retries.start_soon(self._retry, ws, pair, home, *refused)
                        self.changed()
                        await self._top_up(ws, pair, home)
            except* BROKEN as group:
                for exc in group.exceptions:
                    self.closes[f"sender {close_code(exc)}"] += 1
                home = (home + 1) % len(self.nodes)
            finally:
                await ws.abort()  # closed already, or the round is over

    async def _send(self, ws: WebSocket, pair: Pair, msgid: str, node: int) -> None:
        outgoing = pair.sent[msgid]
        outgoing.node = node
        outgoing.seen.append(f"sent to {node}")
        content = f"{pair.sender}>{pair.recipient}#{msgid}"
        frame = {"to": pair.recipient, "msgid": msgid, "acknowledge": True, "content": content}
        await ws.send(json.dumps(frame))

    async def _retry(self, ws: WebSocket, pair: Pair, node: int, msgid: str, after: float) -> None:
        """Send a refused message again after the pause relayd asked for."""
        await trio.sleep(after)
        if not pair.sent[msgid].answered:
            self.retried += 1
            await self._send(ws, pair, msgid, node)

    async def _top_up(self, ws: WebSocket, pair: Pair, node: int) -> None:
        while not self.stopping and pair.outstanding() < self.window:
            msgid = f"r{self.number}p{pair.index}-{pair.next_seq}"
            pair.next_seq += 1
            pair.sent[msgid] = Outgoing(node)
            await self._send(ws, pair, msgid, node)

    def _receipt(self, pair: Pair, frame: dict[str, Any]) -> tuple[str, float] | None:
        """Take a frame in; a message refused by an error frame, and when to send it again."""
        kind = frame.get("type")
        if kind in ("delivery_status", "delivery_update"):
            outgoing = pair.sent.get(frame.get("msgid", ""))
            if outgoing is None or frame.get("to") != pair.recipient:
                self.misrouted += 1
                self.anomaly(frame)
                return None
            outgoing.answered = True
            status = frame.get("status")
            outgoing.seen.append(f"{status}{' (duplicate)' if frame.get('duplicate') else ''}")
            if status in ACCEPTED and outgoing.accepted_at is None:
                outgoing.accepted_at = time.monotonic()
                self.accepted += 1
            if status in FINAL:
                outgoing.final = status
        elif kind == "error":
            error = frame.get("error", {})
            self.errors[str(error.get("code"))] += 1
            details = error.get("details", {})
            msgid = details.get("msgid")
            if msgid in pair.sent and not pair.sent[msgid].answered:
                pair.sent[msgid].seen.append(f"error {error.get('code')}")
                return msgid, float(details.get("retry_after", RETRY_MAX))
        return None

    async def recipient(self, pair: Pair) -> None:
        home = pair.recipient_node
        first = True
        while True:
            ws, home = await self.connect(home, pair.recipient_token)
            if first:
                self.welcomed += 1
                first = False
            else:
                self.reconnects += 1
            self.changed()
            try:
                while True:
                    frame = json.loads(await ws.receive())
                    if frame.get("type") != "message":
                        continue
                    self._delivery(pair, frame)
                    self.changed()
                    if frame.get("acknowledge"):
                        await ws.send(json.dumps({"type": "ack", "msgid": frame["msgid"]}))
            except BROKEN as exc:
                self.closes[f"recipient {close_code(exc)}"] += 1
                home = (home + 1) % len(self.nodes)
            finally:
                await ws.abort()  # closed already, or the round is over

    def _delivery(self, pair: Pair, frame: dict[str, Any]) -> None:
        msgid = str(frame.get("msgid"))
        expected = f"{pair.sender}>{pair.recipient}#{msgid}"
        if (
            msgid not in pair.sent
            or frame.get("from") != pair.sender
            or frame.get("to") != pair.recipient
            or frame.get("content") != expected
        ):
            self.misrouted += 1
            self.anomaly(frame)
            return
        pair.sent[msgid].seen.append(f"delivered attempt {frame.get('attempt')}")
        if frame.get("redelivered") is True:
            self.redelivered += 1
        elif pair.received[msgid]:
            self.unmarked_duplicates += 1
            self.anomaly(frame)
        pair.received[msgid] += 1

    # --- the outcome ---

    def in_flight(self, node: int | None = None) -> int:
        """Messages sent and not yet final (of pairs with a client on ``node``)."""
        return sum(
            p.outstanding()
            for p in self.pairs
            if node is None or node in (p.sender_node, p.recipient_node)
        )

    def lost_samples(self) -> list[dict[str, Any]]:
        """The first messages lost or left unfinished, with what their sender was told."""
        out = [
            {
                "msgid": m,
                "to": p.recipient,
                "sent_to_node": o.node,
                "final": o.final,
                "received": p.received[m],
                "seen": o.seen,
            }
            for p in self.pairs
            for m, o in p.sent.items()
            if (o.accepted_at is not None and not p.received[m]) or o.final is None
        ]
        return out[:10]

    def tally(self, killed_at: float) -> dict[str, Any]:
        sent = [(p, m, o) for p in self.pairs for m, o in p.sent.items()]
        lost = [o for p, m, o in sent if o.accepted_at is not None and not p.received[m]]
        ages = [killed_at - o.accepted_at for o in lost if o.accepted_at is not None]
        lost_ids = {id(o) for o in lost}
        return {
            "sent": len(sent),
            "accepted": sum(1 for _, _, o in sent if o.accepted_at is not None),
            "delivered": sum(1 for p in self.pairs for n in p.received.values() if n),
            "lost": len(lost),
            # How long before the kill the oldest lost message was accepted (negative: after).
            "lost_oldest_s": round(max(ages), 3) if ages else None,
            "duplicates": sum(n - 1 for p in self.pairs for n in p.received.values() if n > 1),
            "redelivered": self.redelivered,
            "unmarked_duplicates": self.unmarked_duplicates,
            "not_final": sum(1 for _, _, o in sent if o.final is None),
            # Not final, and not lost either: a receipt or a delivery still owed.
            "unfinished": sum(1 for _, _, o in sent if o.final is None and id(o) not in lost_ids),
            "not_acknowledged": sum(1 for _, _, o in sent if o.final not in (None, "acknowledged")),
            "misrouted": self.misrouted,
            "resent": self.resent,
            "retried": self.retried,
            "reconnects": self.reconnects,
        }


# --- the run ---------------------------------------------------------------------------------


async def register(http_url: str, count: int, prefix: str) -> list[tuple[str, str]]:
    """``count`` new clients, registered on ``http_url``: their (uuid, access token)."""
    out: list[tuple[str, str]] = []
    async with httpx.AsyncClient(base_url=http_url, timeout=CONNECT_TIMEOUT) as http:
        for i in range(count):
            response = await http.post("/register", json={"name": f"{prefix}-{i}"})
            response.raise_for_status()
            doc = response.json()
            out.append((doc["uuid"], doc["access_token"]))
    return out


class Cluster:
    """The run's processes: one Redis and the nodes, and how to kill and start them again."""

    def __init__(self, nursery: trio.Nursery, binary: str, work: Path, p: CrashParams) -> None:
        self.nursery = nursery
        self.binary = binary
        self.data = work / "redis"
        self.state = work / "state"
        self.p = p
        self.secret = os.urandom(32).hex()
        self.redis: Child | None = None
        self.port = free_port()
        self.nodes: list[Node] = []

    async def start(self) -> None:
        self.data.mkdir()
        self.state.mkdir()
        await self.start_redis()
        # The first node writes the store keys the others read.
        for index in range(self.p.nodes):
            self.nodes.append(await self._start_node(index, 1))

    async def start_redis(self) -> None:
        fsync = ("--appendonly", "yes", "--appendfsync", self.p.appendfsync)
        self.redis, _ = await start_redis(
            self.nursery, self.binary, self.data, *fsync, port=self.port
        )

    async def _start_node(self, index: int, starts: int) -> Node:
        url = f"redis://127.0.0.1:{self.port}/0"
        store: dict[str, TomlValue] = {"lease": self.p.lease, "timeout": min(2.0, self.p.lease / 3)}
        settings = node_settings(url, {"store": store})
        return await start_node(self.nursery, index, self.state, settings, self.secret, starts)

    async def kill(self, what: str, index: int) -> None:
        """SIGKILL of node ``index`` (``what`` = ``node``) or of Redis, and the wait for it."""
        child = self.nodes[index].child if what == "node" else self.redis
        assert child is not None
        child.kill()
        await child.wait()

    async def restart_node(self, index: int) -> None:
        dead = self.nodes[index]
        self.nodes[index] = await self._start_node(index, dead.starts + 1)

    async def stop(self) -> None:
        for node in self.nodes:
            await node.child.stop()
        if self.redis is not None:
            await self.redis.stop()


async def crash_round(number: int, cluster: Cluster) -> dict[str, Any]:
    """Round ``number`` (see the module docstring): its facts. A killed node is left dead;
    a killed Redis is started again at once, on its port and its data."""
    p = cluster.p
    nodes = cluster.nodes
    count = len(nodes)
    creds = await register(nodes[number % count].http_url, 2 * p.pairs, f"r{number}")
    pairs = [
        Pair(
            i,
            *creds[2 * i],
            *creds[2 * i + 1],
            sender_node=i % count,
            recipient_node=(i + 1) % count,
        )
        for i in range(p.pairs)
    ]
    state = Round(number, nodes, pairs, p.window)
    victim = number % count
    facts: dict[str, Any] = {"round": number, "killed": victim if p.kill == "node" else "redis"}
    async with trio.open_nursery() as clients:
        for pair in pairs:
            clients.start_soon(state.recipient, pair)
        with trio.fail_after(START_TIMEOUT):
            await state.until(lambda: state.welcomed == p.pairs)
        for pair in pairs:
            clients.start_soon(state.sender, pair)
        started = time.monotonic()
        with trio.fail_after(p.settle):
            await state.until(lambda: state.accepted >= p.before)
        facts["in_flight_at_kill"] = state.in_flight()
        facts["victim_in_flight"] = state.in_flight(victim if p.kill == "node" else None)
        facts["killed_after_s"] = round(time.monotonic() - started, 3)
        facts["errors_before_kill"] = dict(state.errors)
        killed_at = time.monotonic()
        await cluster.kill(p.kill, victim)
        if p.kill == "redis":
            await cluster.start_redis()
            facts["redis_down_s"] = round(time.monotonic() - killed_at, 3)
        with trio.fail_after(p.settle):
            await state.until(lambda: state.accepted >= p.before + p.after)
        state.stopping = True
        stopped = time.monotonic()
        facts["traffic_after_kill_s"] = round(stopped - killed_at, 3)
        with trio.move_on_after(p.settle):
            await state.until(state.settled)
        facts["settle_s"] = round(time.monotonic() - stopped, 3)
        clients.cancel_scope.cancel()
    facts.update(state.tally(killed_at))
    lost = state.lost_samples()
    if lost:
        facts["lost_samples"] = lost
    facts["errors"] = dict(state.errors)
    facts["closes"] = dict(state.closes)
    if state.samples:
        facts["anomaly_samples"] = state.samples
    return facts


TOTALS = (
    "sent",
    "accepted",
    "delivered",
    "lost",
    "duplicates",
    "redelivered",
    "unmarked_duplicates",
    "not_final",
    "misrouted",
    "resent",
    "retried",
    "reconnects",
    "in_flight_at_kill",
    "victim_in_flight",
)
# appendfsync everysec: Redis answers before its fsync, once a second (a write it postponed
# behind a slow fsync waits at most 2 s): a kill -9 may lose what it answered in that time.
EVERYSEC_WINDOW = 2.0


def ok(row: dict[str, Any], p: CrashParams) -> bool:
    """Nothing unmarked, misrouted or left unfinished; nothing lost, or with Redis on
    ``everysec`` killed, only what was accepted within EVERYSEC_WINDOW before the kill."""
    if any(row[k] for k in ("unmarked_duplicates", "misrouted", "unfinished")):
        return False
    if p.kill == "redis" and p.appendfsync == "everysec":
        oldest = row["lost_oldest_s"]
        return oldest is None or float(oldest) <= EVERYSEC_WINDOW
    return bool(row["lost"] == 0)


@contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="relayd-cluster-crash-"))
    failed = True
    try:
        yield path
        failed = False
    finally:
        if keep or failed:
            print(f"cluster_crash: kept {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


async def run(p: CrashParams, work: Path, binary: str) -> dict[str, Any]:
    """Every round of ``p`` in ``work`` (a Redis and the nodes' state); one result row."""
    if p.kill not in KILLS:
        raise ValueError(f"kill: {p.kill!r} is not one of {', '.join(KILLS)}")
    rounds: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, binary, work, p)
        try:
            await cluster.start()
            for number in range(p.rounds):
                rounds.append(await crash_round(number, cluster))
                if p.kill == "node" and number + 1 < p.rounds:
                    await cluster.restart_node(number % p.nodes)
        finally:
            await cluster.stop()
    totals: dict[str, Any] = {k: sum(r[k] for r in rounds) for k in TOTALS}
    totals["unfinished"] = sum(r["unfinished"] for r in rounds)
    ages = [r["lost_oldest_s"] for r in rounds if r["lost_oldest_s"] is not None]
    totals["lost_oldest_s"] = max(ages, default=None)
    errors: Counter[str] = Counter()
    for r in rounds:
        errors.update(r["errors"])
    return {
        "scenario": "cluster_crash",
        "label": (
            f"cluster_crash kill={p.kill} nodes={p.nodes} pairs={p.pairs} W={p.window}"
            f" appendfsync={p.appendfsync} rounds={p.rounds}"
        ),
        "params": asdict(p),
        **totals,
        "errors": dict(errors),
        "rounds": rounds,
        "cpus": os.cpu_count(),
        "ok": ok(totals, p) and all(ok(r, p) for r in rounds) and len(rounds) == p.rounds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m contrib.bench.cluster_crash", description=__doc__.split("\n\n")[0]
    )
    defaults = CrashParams()
    for name, value in asdict(defaults).items():
        parser.add_argument(
            "--" + name.replace("_", "-"), type=type(value), default=value, help=f"default: {value}"
        )
    parser.add_argument("--tag", default="", help="free text stored with the row")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the row is appended")
    args = parser.parse_args(argv)
    params = CrashParams(**{k: getattr(args, k) for k in asdict(defaults)})
    binary = redis_binary()
    if binary is None:
        raise SystemExit("cluster_crash: needs redis-server (or valkey-server)")
    with workdir(os.environ.get("BENCH_KEEP_STATE") == "1") as work:
        row = trio.run(run, params, work, binary)
    if args.tag:
        row["tag"] = args.tag
    record(row, args.results)
    return 0 if row["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
