"""``kill -9`` of a cluster node under load: nothing a sender was told was accepted is lost.

    python -m contrib.bench.cluster_crash                          # 10 rounds, 3 nodes
    python -m contrib.bench.cluster_crash --rounds 2 --nodes 2 --pairs 6

Issue 12's failure guarantee, with real processes: one Redis (``appendonly yes``,
``appendfsync always``), N relayd nodes (``store.engine = "redis"``, each ``relayd serve`` in
a process of its own, one state directory for their store keys), and clients spread over the
nodes (pair *i*'s sender on node *i mod N*, its recipient on node *i + 1 mod N*). Each sender
keeps ``--window`` acknowledged messages outstanding (sent, not yet final); each recipient
acknowledges every message it gets. The clients are this process, on Trio, speaking raw
frames (the SDK's WebSocket, ``relayd.client._ws``), so that every receipt is seen as sent.

A round registers fresh pairs and runs traffic until ``--before`` messages were accepted;
then it kills one node with SIGKILL (round *r* kills node *r mod N*). That node's clients see
their sockets drop and reconnect to the next node that answers; each sender sends again, with
the same msgid, what no receipt answered (relayd deduplicates). Traffic goes on until
``--after`` more were accepted; then the senders stop, and the round waits (at most
``--settle`` s) until every message has its final receipt and every accepted one has
arrived. The killed node is started again before the next round.

Counted per round and in total: ``sent`` (distinct msgids), ``accepted`` (a receipt said
``queued``, ``queued_offline``, ``pending_ack``, or a final ``delivered``/``acknowledged``),
``delivered`` (distinct msgids that reached their recipient), ``lost`` (accepted, never
delivered: must be 0), ``duplicates`` (copies beyond the first), ``redelivered`` (deliveries
marked ``redelivered: true``), ``unmarked_duplicates`` (a copy not so marked: must be 0),
``not_final`` (no final receipt by the end), ``misrouted`` (wrong ``from``/``to``/content),
``resent`` (sent again after a reconnect), ``reconnects``, ``in_flight_at_kill`` (messages
sent and not yet final when the node died; ``victim_in_flight``: of pairs with a client on
it). One JSON line, appended to contrib/bench/results/results.jsonl (``--results``).
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

import httpx
import trio

from relayd.client._errors import ClientError
from relayd.client._ws import Closed, WebSocket, connect

from ._proc import RESULTS, record
from ._servers import BENCH_SETTINGS, Settings, merge, render_config

ACCEPTED = frozenset({"queued", "queued_offline", "pending_ack", "delivered", "acknowledged"})
FINAL = frozenset({"delivered", "acknowledged", "failed", "expired"})
START_TIMEOUT = 30.0  # a process (Redis, a node) says it is ready within this
CONNECT_TIMEOUT = 5.0  # a socket's connect, handshake and welcome, together
RETRY_MAX = 0.5  # a client that no node welcomed tries them all again after at most this
REDIS_READY = b"Ready to accept connections"


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
    nursery: trio.Nursery, binary: str, data: Path, *extra: str
) -> tuple[Child, str]:
    """A Redis of the run's own on a free loopback port; it and its URL."""
    port = free_port()
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
    accepted: bool = False
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
    retry: list[str] = field(default_factory=list)  # refused with an error: send again
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
            o.final is not None and (not o.accepted or pair.received[msgid])
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
                if not first:
                    # Unanswered (its node died first): sent again, same msgid.
                    for msgid in [m for m, o in pair.sent.items() if not o.answered]:
                        self.resent += 1
                        await self._send(ws, pair, msgid, home)
                first = False
                await self._top_up(ws, pair, home)
                while True:
                    self._receipt(pair, json.loads(await ws.receive()))
                    self.changed()
                    await self._top_up(ws, pair, home)
            except Closed as exc:
                self.closes[f"sender {exc.code}"] += 1
                home = (home + 1) % len(self.nodes)

    async def _send(self, ws: WebSocket, pair: Pair, msgid: str, node: int) -> None:
        outgoing = pair.sent[msgid]
        outgoing.node = node
        outgoing.answered = False
        outgoing.seen.append(f"sent to {node}")
        content = f"{pair.sender}>{pair.recipient}#{msgid}"
        frame = {"to": pair.recipient, "msgid": msgid, "acknowledge": True, "content": content}
        await ws.send(json.dumps(frame))

    async def _top_up(self, ws: WebSocket, pair: Pair, node: int) -> None:
        retry, pair.retry = pair.retry, []
        for msgid in retry:
            await self._send(ws, pair, msgid, node)
        while not self.stopping and pair.outstanding() < self.window:
            msgid = f"r{self.number}p{pair.index}-{pair.next_seq}"
            pair.next_seq += 1
            pair.sent[msgid] = Outgoing(node)
            await self._send(ws, pair, msgid, node)

    def _receipt(self, pair: Pair, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind in ("delivery_status", "delivery_update"):
            outgoing = pair.sent.get(frame.get("msgid", ""))
            if outgoing is None or frame.get("to") != pair.recipient:
                self.misrouted += 1
                self.anomaly(frame)
                return
            outgoing.answered = True
            status = frame.get("status")
            outgoing.seen.append(f"{status}{' (duplicate)' if frame.get('duplicate') else ''}")
            if status in ACCEPTED and not outgoing.accepted:
                outgoing.accepted = True
                self.accepted += 1
            if status in FINAL:
                outgoing.final = status
        elif kind == "error":
            error = frame.get("error", {})
            self.errors[str(error.get("code"))] += 1
            msgid = error.get("details", {}).get("msgid")
            if msgid in pair.sent and not pair.sent[msgid].accepted:
                pair.sent[msgid].seen.append(f"error {error.get('code')}")
                pair.sent[msgid].answered = True
                pair.retry.append(msgid)

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
            except Closed as exc:
                self.closes[f"recipient {exc.code}"] += 1
                home = (home + 1) % len(self.nodes)

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
            if (o.accepted and not p.received[m]) or o.final is None
        ]
        return out[:10]

    def tally(self) -> dict[str, Any]:
        sent = [(p, m, o) for p in self.pairs for m, o in p.sent.items()]
        accepted = [(p, m) for p, m, o in sent if o.accepted]
        return {
            "sent": len(sent),
            "accepted": len(accepted),
            "delivered": sum(1 for p in self.pairs for n in p.received.values() if n),
            "lost": sum(1 for p, m in accepted if not p.received[m]),
            "duplicates": sum(n - 1 for p in self.pairs for n in p.received.values() if n > 1),
            "redelivered": self.redelivered,
            "unmarked_duplicates": self.unmarked_duplicates,
            "not_final": sum(1 for _, _, o in sent if o.final is None),
            "not_acknowledged": sum(1 for _, _, o in sent if o.final not in (None, "acknowledged")),
            "misrouted": self.misrouted,
            "resent": self.resent,
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


async def crash_round(
    number: int, nodes: list[Node], p: CrashParams
) -> tuple[Round, dict[str, Any]]:
    """Round ``number`` (see the module docstring); the killed node is left dead."""
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
    victim = nodes[number % count]
    facts: dict[str, Any] = {"round": number, "killed": victim.index}
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
        facts["victim_in_flight"] = state.in_flight(victim.index)
        facts["killed_after_s"] = round(time.monotonic() - started, 3)
        victim.child.kill()
        killed_at = time.monotonic()
        await victim.child.wait()
        with trio.fail_after(p.settle):
            await state.until(lambda: state.accepted >= p.before + p.after)
        state.stopping = True
        stopped = time.monotonic()
        facts["traffic_after_kill_s"] = round(stopped - killed_at, 3)
        with trio.move_on_after(p.settle):
            await state.until(state.settled)
        facts["settle_s"] = round(time.monotonic() - stopped, 3)
        clients.cancel_scope.cancel()
    facts.update(state.tally())
    lost = state.lost_samples()
    if lost:
        facts["lost_samples"] = lost
    facts["errors"] = dict(state.errors)
    facts["closes"] = dict(state.closes)
    if state.samples:
        facts["anomaly_samples"] = state.samples
    return state, facts


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
    "reconnects",
    "in_flight_at_kill",
    "victim_in_flight",
)


def ok(row: dict[str, Any]) -> bool:
    """Nothing lost, unfinished, unmarked or misrouted."""
    return all(row[k] == 0 for k in ("lost", "not_final", "unmarked_duplicates", "misrouted"))


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
    secret = os.urandom(32).hex()
    data = work / "redis"
    state = work / "state"
    data.mkdir()
    state.mkdir()
    rounds: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        redis, url = await start_redis(
            nursery, binary, data, "--appendonly", "yes", "--appendfsync", p.appendfsync
        )
        settings = node_settings(url, {"store": {"lease": p.lease}})
        nodes: list[Node] = []
        try:
            # The first node writes the store keys the others read.
            nodes.append(await start_node(nursery, 0, state, settings, secret, 1))
            for i in range(1, p.nodes):
                nodes.append(await start_node(nursery, i, state, settings, secret, 1))
            for number in range(p.rounds):
                _, facts = await crash_round(number, nodes, p)
                rounds.append(facts)
                dead = nodes[number % p.nodes]
                if number + 1 < p.rounds:
                    nodes[dead.index] = await start_node(
                        nursery, dead.index, state, settings, secret, dead.starts + 1
                    )
        finally:
            for node in nodes:
                await node.child.stop()
            await redis.stop()
    totals = {k: sum(r[k] for r in rounds) for k in TOTALS}
    errors: Counter[str] = Counter()
    for r in rounds:
        errors.update(r["errors"])
    return {
        "scenario": "cluster_crash",
        "label": (
            f"cluster_crash nodes={p.nodes} pairs={p.pairs} W={p.window}"
            f" appendfsync={p.appendfsync} rounds={p.rounds}"
        ),
        "params": asdict(p),
        **totals,
        "errors": dict(errors),
        "rounds": rounds,
        "cpus": os.cpu_count(),
        "ok": ok(totals) and len(rounds) == p.rounds,
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
