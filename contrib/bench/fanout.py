"""Fan-out (issue 13): one publisher, N subscribers of one topic, all on one relayd.

    python -m contrib.bench.fanout                                   # sqlite, N = 10, 100, 1000
    python -m contrib.bench.fanout --engines sqlite,redis --subscribers 100 --publishes 100

For each engine and each N (``--subscribers``), a fresh relayd (``relayd serve``, the bench
settings, SQLite with ``synchronous = full`` or a Redis with ``appendfsync always``) gets N + 1
clients, registered over REST. The publisher creates a topic (``POST /topics/create``), each
subscriber subscribes (``POST /topics/subscribe?token=``), and all N + 1 open their sockets
(the REST port's ``/ws`` by default). Then, for each ``--acks`` variant (``false``: the
publisher sends ``acknowledge: false``; ``true``: ``acknowledge: true``, each subscriber acks
every delivery at once, and the publisher gets ``topic_update`` counts), on the same daemon
and topic, two phases:

* ``paced``: ``--paced`` publishes, one at a time: the next goes out when the last subscriber
  has the previous one. What a publish costs when nothing else is in flight: the latency
  from the publish (the frame's send) to the first and to the last subscriber's receipt.
* ``burst``: ``--publishes`` publishes, each sent as soon as the previous one's ``topic_sent``
  comes back (one publish awaiting its answer at a time: what one publisher can push; the
  deliveries then queue behind, which is the load). Deliveries per second are N x M over the
  time from the first publish to the last subscriber's receipt of the last one; each
  publish's latency to its last subscriber is reported too (it includes the queue). With
  acknowledgements, the run then waits until every publish's ``topic_update`` says it is
  final (``pending`` 0) and checks its counts.

``--publishes`` is capped at ``--max-deliveries`` ÷ N (default 30,000: 30 publishes at
N = 1,000) and ``--paced`` at ``--max-paced-deliveries`` ÷ N (10,000: 10 at N = 1,000), so
that the default run stays under about two minutes on two cores. relayd's
``topics.max_watched`` is raised above a variant's publishes, so that every publish gets its
final ``topic_update``.

Besides RSS, each row has the peaks of relayd's own gauges (``GET /metrics``, every 0.5 s):
``held_for_recipients_peak_mib`` is ``relayd_message_memory_bytes{for="recipients"}``, the
bytes of messages held for online recipients, where each subscriber's delivery counts its own
copy. With a large ``--content-size`` (16384, say) it shows how many copies of one publish
are in memory at once.

Every delivery is checked: its topic, sender, msgid and content length; a second copy
without ``redelivered: true``; offsets that go backwards; and at the end, every subscriber
must have had every publish (``lost``). The daemon's RSS is sampled from ``/proc`` every
100 ms (``rss_peak_mib`` per variant; ``VmHWM`` at the end), its CPU per delivery over the
burst, the store's commits over the burst, and its counters' changes (``redelivered``, the
time from a delivery's write to its ack). One JSON line per engine, N and variant is appended to
contrib/bench/results/results.jsonl (``--results`` elsewhere); the command exits 1 when a row
is not ``ok``.

The generator is this process: asyncio on uvloop, each socket the ``websockets`` sans-I/O
protocol of ``_worker.py`` (a frame is handled in the callback that parsed it: a delivery is
checked, timed and acknowledged there, and the burst's next publish goes out from the
``topic_sent``'s callback). Its CPU is in each row (``gen_cpu_util``): with 1,000 sockets it
takes a share of the two cores, and a receipt's time includes its own queue.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from ._proc import RESULTS, machine_jiffies, machine_usage, other_cores, raise_nofile, record
from ._rest import Credentials, HttpError, MetricsScraper, call_all, register_many
from ._servers import Relayd, Settings, relay_settings
from ._stats import latency_summary
from ._worker import WsConn, open_ws

TOPIC = "bench-fanout"
# sqlite: a file, synchronous = full; sqlite-memory: ":memory:" (no fsync: what the disk
# costs); redis: a redis-server of the run's own, appendfsync always.
ENGINES = ("sqlite", "sqlite-memory", "redis")
STORES = {"sqlite": "file", "sqlite-memory": "memory", "redis": "redis"}
ACK = '{"type":"ack","msgid":"%s"}'
# '"' and '\\' never appear in what is interpolated here (ids, digits, 'x'): valid JSON.
PUBLISH = '{"topic_id":"%s","msgid":"%s","acknowledge":%s,"content":"%s"}'


def now_ns() -> int:
    return time.monotonic_ns()


# --- what the run expects, and what it saw -------------------------------------------------


@dataclass
class Publication:
    """One publish: when it went out, and what came of it."""

    msgid: str
    expected: int  # subscribers that must get it
    acknowledge: bool
    sent_ns: int = 0
    answered_ns: int = 0  # its topic_sent
    subscribers: int | None = None  # topic_sent's count
    offset: int | None = None
    received: int = 0
    first_ns: int = 0
    last_ns: int = 0
    updates: int = 0  # topic_update frames about it
    counts: dict[str, int] | None = None  # the last topic_update's
    final_ns: int = 0  # a topic_update with pending 0
    # Called when it is answered, complete, or final (see :func:`until_all`).
    watchers: list[Callable[[Publication], None]] = field(default_factory=list)

    @property
    def answered(self) -> bool:
        return self.answered_ns > 0

    @property
    def complete(self) -> bool:
        """Every subscriber has it, and its publisher was answered."""
        return self.received >= self.expected and self.answered_ns > 0

    @property
    def final(self) -> bool:
        return self.final_ns > 0

    def changed(self) -> None:
        for watcher in list(self.watchers):
            watcher(self)


@dataclass
class Tally:
    """Findings shared by every socket of a run: protocol breaches (``anomalies``, with the
    first frames as samples) and notable but documented events (``info``)."""

    anomalies: collections.Counter[str] = field(default_factory=collections.Counter)
    info: collections.Counter[str] = field(default_factory=collections.Counter)
    samples: list[str] = field(default_factory=list)

    def anomaly(self, kind: str, text: str) -> None:
        self.anomalies[kind] += 1
        if self.anomalies[kind] <= 5:  # a few of each kind
            self.samples.append(f"{kind}: {text[:300]}")


class Topic:
    """What is published in the topic, by msgid, and who publishes."""

    def __init__(self, topic_id: str, publisher: str, content_size: int) -> None:
        self.id = topic_id
        self.publisher = publisher
        self.content_size = content_size
        self.publications: dict[str, Publication] = {}
        self.tally = Tally()
        self.on_answer: Callable[[Publication], None] | None = None

    def frame(self, publication: Publication) -> str:
        content = "x" * self.content_size
        flag = "true" if publication.acknowledge else "false"
        return PUBLISH % (self.id, publication.msgid, flag, content)


class Client:
    """One client's socket: its welcome awaited, its frames parsed and handed to
    :meth:`frame` in the callback that read them."""

    role = "client"

    def __init__(self, creds: Credentials, topic: Topic) -> None:
        self.creds = creds
        self.topic = topic
        self.conn: WsConn | None = None
        self.welcomed: asyncio.Future[int] | None = None
        self.frames: collections.Counter[str] = collections.Counter()
        self.closes: collections.Counter[str] = collections.Counter()

    async def connect(self, url: str, within: float) -> int:
        """Open the socket; the monotonic ns when its ``connection`` frame came."""
        self.welcomed = asyncio.get_running_loop().create_future()
        conn = await open_ws(url, self.creds.token, self.on_text, self.on_close, within=within)
        try:
            welcomed = await asyncio.wait_for(asyncio.shield(self.welcomed), within)
        except BaseException:
            conn.abort()
            raise
        self.conn = conn
        return welcomed

    def on_close(self, code: int | None) -> None:
        self.closes[str(code)] += 1
        self.conn = None
        if self.welcomed is not None and not self.welcomed.done():
            self.welcomed.set_exception(RuntimeError(f"closed before the welcome: {code}"))

    def on_text(self, text: str) -> None:
        at = now_ns()
        try:
            doc = json.loads(text)
            kind = str(doc.get("type"))
            self.frames[kind] += 1
            if kind == "connection":
                welcomed = self.welcomed
                if welcomed is not None and not welcomed.done():
                    if doc.get("uuid") == self.creds.uuid:
                        welcomed.set_result(at)
                    else:
                        welcomed.set_exception(RuntimeError(f"welcome: {text[:200]}"))
            elif kind == "error":
                self.topic.tally.anomaly(f"{self.role}_error:{doc.get('code')}", text)
            else:
                self.frame(kind, doc, at)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self.topic.tally.anomaly("unreadable_frame", f"{exc!r}: {text}")

    def frame(self, kind: str, doc: dict[str, Any], at: int) -> None:
        self.topic.tally.info[f"{self.role}_frame:{kind}"] += 1


class Subscriber(Client):
    """A subscriber: every delivery checked, timed, and acknowledged if it asks."""

    role = "subscriber"

    def __init__(self, creds: Credentials, topic: Topic) -> None:
        super().__init__(creds, topic)
        self.seen: set[str] = set()
        self.last_offset = 0
        self.last_delivery_ns = 0  # its latest first delivery's receipt
        self.presence_events = 0  # in the presence frames it got
        self.presence_truncated = 0  # presence frames that said they left events out

    def frame(self, kind: str, doc: dict[str, Any], at: int) -> None:
        if kind == "message":
            self.delivered(doc, at)
        elif kind == "ack_received":
            # "unknown": relayd took the ack too late (past relay.ack_timeout and the backoff:
            # the delivery was queued again) or for a copy already acknowledged. Allowed;
            # the copy sent again comes marked redelivered.
            if doc.get("status") != "acknowledged":
                self.topic.tally.info[f"ack_received_{doc.get('status')}"] += 1
        elif kind == "presence":
            self.presence_events += len(doc["events"])
            self.presence_truncated += bool(doc.get("truncated"))
        else:
            super().frame(kind, doc, at)

    def delivered(self, doc: dict[str, Any], at: int) -> None:
        topic = self.topic
        tally = topic.tally
        msgid = doc["msgid"]
        publication = topic.publications.get(msgid)
        if (
            publication is None
            or doc.get("topic_id") != topic.id
            or doc.get("from") != topic.publisher
            or len(doc.get("content", "")) != topic.content_size
            or not isinstance(doc.get("offset"), int)
        ):
            tally.anomaly("misrouted_or_corrupt", json.dumps(doc))
            return
        if doc.get("acknowledge") and self.conn is not None:
            self.conn.send_text(ACK % msgid)
        if msgid in self.seen:
            if doc.get("redelivered") is True:
                tally.info["redelivered"] += 1
            else:
                tally.anomaly("duplicate_not_marked_redelivered", json.dumps(doc))
            return
        self.seen.add(msgid)
        offset = doc["offset"]
        if offset <= self.last_offset:
            tally.anomaly("offset_went_back", f"{offset} after {self.last_offset}: {msgid}")
        self.last_offset = max(self.last_offset, offset)
        if publication.offset is not None and offset != publication.offset:
            tally.anomaly("offset_not_topic_sents", f"{offset} != {publication.offset}")
        publication.received += 1
        self.last_delivery_ns = at
        if publication.first_ns == 0:
            publication.first_ns = at
        publication.last_ns = at
        if publication.received == publication.expected:
            publication.changed()


class Publisher(Client):
    """The publisher: its ``topic_sent`` and ``topic_update`` frames checked and timed."""

    role = "publisher"

    def publish(self, publication: Publication) -> None:
        self.topic.publications[publication.msgid] = publication
        publication.sent_ns = now_ns()
        conn = self.conn
        if conn is None or not conn.send_text(self.topic.frame(publication)):
            self.topic.tally.anomaly("publisher_socket_closed", publication.msgid)

    def frame(self, kind: str, doc: dict[str, Any], at: int) -> None:
        if kind == "topic_sent":
            self.answered(doc, at)
        elif kind == "topic_update":
            self.updated(doc, at)
        else:
            super().frame(kind, doc, at)

    def answered(self, doc: dict[str, Any], at: int) -> None:
        topic = self.topic
        publication = topic.publications.get(doc["msgid"])
        if publication is None or doc.get("topic_id") != topic.id:
            topic.tally.anomaly("topic_sent_unknown", json.dumps(doc))
            return
        if publication.answered_ns:
            topic.tally.anomaly("topic_sent_twice", json.dumps(doc))
            return
        publication.answered_ns = at
        publication.subscribers = doc.get("subscribers")
        publication.offset = doc.get("offset")
        if doc.get("duplicate"):
            topic.tally.anomaly("topic_sent_duplicate", json.dumps(doc))
        if publication.subscribers != publication.expected:
            topic.tally.anomaly(
                "topic_sent_subscribers", f"{publication.subscribers} != {publication.expected}"
            )
        if topic.on_answer is not None:
            topic.on_answer(publication)
        publication.changed()

    def updated(self, doc: dict[str, Any], at: int) -> None:
        topic = self.topic
        publication = topic.publications.get(doc["msgid"])
        if publication is None or doc.get("topic") != topic.id:
            topic.tally.anomaly("topic_update_unknown", json.dumps(doc))
            return
        if not publication.acknowledge:
            topic.tally.anomaly("topic_update_without_acknowledge", json.dumps(doc))
        publication.updates += 1
        publication.counts = {
            k: int(doc[k])
            for k in ("subscribers", "delivered", "acknowledged", "failed", "expired", "pending")
        }
        if publication.counts["pending"] == 0 and not publication.final_ns:
            publication.final_ns = at
            publication.changed()


# --- setting a run up ----------------------------------------------------------------------


def fanout_settings(engine: str, transport: str, clients: int, watched: int) -> Settings:
    """The bench settings, plus: room for every socket from 127.0.0.1 (relayd's per-address
    limit is 1,000), and ``topics.max_watched`` above the publishes of a variant, so that
    every publish's final ``topic_update`` comes and its counts can be checked (relayd's
    default watches a connection's last 100)."""
    limit = clients + 100
    layer: Settings = {
        "websocket": {"max_connections": limit, "max_connections_per_ip": limit},
        "topics": {"max_watched": watched},
    }
    return relay_settings(store=STORES[engine], transport=transport, extra=layer)


def _checked(answers: list[tuple[int, Any]], what: str) -> None:
    for status, body in answers:
        if status != 200:
            raise HttpError(status, f"{what}: {body}")


async def setup_topic(
    daemon: Relayd,
    subscribers: int,
    *,
    topic_id: str = TOPIC,
    content_size: int,
    presence: bool = False,
) -> tuple[Topic, Credentials, list[Credentials], dict[str, float]]:
    """Register the publisher and the subscribers, create the topic (``presence`` set with
    ``PATCH /topics/{id}`` if asked), subscribe them: the topic, the publisher's and the
    subscribers' credentials, and the seconds each step took."""
    timings: dict[str, float] = {}
    started = time.monotonic()
    clients, _ = await register_many(daemon.http_url, subscribers + 1, concurrency=8)
    timings["register_s"] = round(time.monotonic() - started, 2)
    publisher, subs = clients[0], clients[1:]
    create = {"topic_id": topic_id, "metadata": {"bench": "fanout"}}
    _checked(
        await call_all(
            daemon.http_url, [("POST", f"/topics/create?token={publisher.token}", create)]
        ),
        "create",
    )
    if presence:
        _checked(
            await call_all(
                daemon.http_url,
                [("PATCH", f"/topics/{topic_id}?token={publisher.token}", {"presence": True})],
            ),
            "presence",
        )
    started = time.monotonic()
    calls: list[tuple[str, str, dict[str, Any] | None]] = [
        ("POST", f"/topics/subscribe?token={c.token}", {"topic_id": topic_id}) for c in subs
    ]
    _checked(await call_all(daemon.http_url, calls, concurrency=8), "subscribe")
    timings["subscribe_s"] = round(time.monotonic() - started, 2)
    return Topic(topic_id, publisher.uuid, content_size), publisher, subs, timings


async def connect_all(
    subscribers: list[Subscriber], url: str, *, concurrency: int, within: float
) -> list[int]:
    """Open every subscriber's socket, ``concurrency`` handshakes at once (all of them with
    ``concurrency`` 0): the ns each was welcomed."""
    limit = asyncio.Semaphore(concurrency or len(subscribers))

    async def one(sub: Subscriber) -> int:
        async with limit:
            return await sub.connect(url, within)

    return list(await asyncio.gather(*(one(s) for s in subscribers)))


class Gauges(MetricsScraper):
    """What a fan-out run follows in ``GET /metrics``: the bytes of messages relayd holds for
    online recipients (one copy per subscriber's delivery shows here), where messages wait,
    open sockets, and the counters of messages, acks and the store's commits."""

    WANTED: tuple[str, ...] = (
        "relayd_message_memory_bytes",
        "relayd_queued_messages",
        "relayd_store_queue",
        "relayd_store_commit_seconds_count",
        "relayd_store_commit_seconds_sum",
        "relayd_connections",
        "relayd_messages_total",
        "relayd_ack_latency_seconds",
        "relayd_dedupe_entries",
    )


class DaemonWatch:
    """While a phase runs: the daemon's RSS every ``every`` s (``/proc``), and its gauges
    every ``gauges_every`` s; the peak of each."""

    def __init__(self, daemon: Relayd, every: float = 0.1, gauges_every: float = 0.5) -> None:
        self.daemon = daemon
        self.every = every
        self.gauges_every = gauges_every
        self.peak = 0
        self.gauge_peaks: dict[str, float] = {}
        self._scraper = Gauges(daemon.http_url)
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> DaemonWatch:
        self.peak = self.daemon.rss()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._rss()), loop.create_task(self._gauges())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._scraper.close()
        self.peak = max(self.peak, self.daemon.rss())

    async def _rss(self) -> None:
        while True:
            self.peak = max(self.peak, self.daemon.rss())
            await asyncio.sleep(self.every)

    async def _gauges(self) -> None:
        while True:
            for name, value in (await self._scraper.scrape()).items():
                if name.split("{")[0].endswith(("_count", "_sum", "_total", "_bucket")):
                    continue  # counters: their peak is their last value
                self.gauge_peaks[name] = max(value, self.gauge_peaks.get(name, value))
            await asyncio.sleep(self.gauges_every)


def counter_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What the daemon's counters say happened between two scrapes: messages by event
    (``redelivered``: deliveries sent again, after an ack timeout or a reconnect), and the
    time from a delivery's write to its ack (mean, and the bucket bounds under which half and
    99 % of the acks came)."""

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    events = {
        key.split('"')[1]: int(delta(key))
        for key in after
        if key.startswith("messages_total{") and delta(key)
    }
    acks = delta("ack_latency_seconds_count")
    out: dict[str, Any] = {"events": events, "acks": int(acks)}
    if acks:
        out["ack_mean_ms"] = round(delta("ack_latency_seconds_sum") / acks * 1000, 1)
        buckets = sorted(
            (float(key.split('"')[1]), delta(key))
            for key in after
            if key.startswith("ack_latency_seconds_bucket{")
        )
        for q in (50, 99):
            out[f"ack_p{q}_under_s"] = next(
                (bound for bound, count in buckets if count >= acks * q / 100), None
            )
    return out


async def scrape(daemon: Relayd) -> dict[str, float]:
    scraper = Gauges(daemon.http_url)
    try:
        return await scraper.scrape()
    finally:
        scraper.close()


def vm_hwm_kib(pid: int) -> int:
    """The process's peak resident set so far (``VmHWM`` in ``/proc/<pid>/status``)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def mib(kib: float) -> float:
    return round(kib / 1024, 1)


# --- the phases ----------------------------------------------------------------------------


async def until_all(
    publications: list[Publication], done: Callable[[Publication], bool], within: float
) -> bool:
    """Wait (at most ``within`` s) until ``done`` holds for every publication: whether it
    did. ``done`` is checked whenever one is answered, complete or final."""
    pending = {id(p) for p in publications if not done(p)}
    if not pending:
        return True
    finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def changed(publication: Publication) -> None:
        if id(publication) in pending and done(publication):
            pending.discard(id(publication))
            if not pending and not finished.done():
                finished.set_result(None)

    for publication in publications:
        publication.watchers.append(changed)
    try:
        await asyncio.wait_for(finished, within)
    except TimeoutError:
        return False
    finally:
        for publication in publications:
            publication.watchers.remove(changed)
    return True


def send_chained(publisher: Publisher, topic: Topic, publications: list[Publication]) -> None:
    """Send the first publication now, and each next one from the callback of the previous
    one's ``topic_sent``: one publish awaiting its answer at a time."""
    following = dict(zip(map(id, publications), publications[1:], strict=False))

    def answered(publication: Publication) -> None:
        after = following.pop(id(publication), None)
        if after is not None:
            publisher.publish(after)
        if not following:
            topic.on_answer = None

    topic.on_answer = answered if following else None
    publisher.publish(publications[0])


async def paced(
    publisher: Publisher, topic: Topic, count: int, n: int, acknowledge: bool, label: str
) -> list[Publication]:
    """``count`` publishes, each when the last subscriber has the one before."""
    done: list[Publication] = []
    for i in range(count):
        publication = Publication(f"{label}-paced-{i}", n, acknowledge)
        publisher.publish(publication)
        done.append(publication)
        if not await until_all([publication], lambda p: p.complete, 30):
            topic.tally.anomaly(
                "paced_publish_not_complete",
                f"{publication.msgid}: {publication.received}/{n} after 30 s",
            )
            break
    return done


async def burst(
    publisher: Publisher,
    topic: Topic,
    count: int,
    n: int,
    acknowledge: bool,
    label: str,
    settle: float,
) -> tuple[list[Publication], bool]:
    """``count`` publishes, chained on their ``topic_sent`` (:func:`send_chained`); then
    wait (at most ``settle`` s) until every subscriber has every one: the publications, and
    whether they all completed."""
    publications = [Publication(f"{label}-burst-{i}", n, acknowledge) for i in range(count)]
    send_chained(publisher, topic, publications)
    return publications, await until_all(publications, lambda p: p.complete, settle)


def counts_findings(publications: list[Publication], n: int, tally: Tally) -> None:
    """Note what the final ``topic_update`` counts say that they should not: a publish
    never told about, or whose subscribers did not all acknowledge it."""
    for p in publications:
        counts = p.counts
        if counts is None:
            tally.anomaly("no_topic_update", f"{p.msgid} (offset {p.offset})")
        elif not p.final_ns:
            tally.anomaly("no_final_topic_update", f"{p.msgid}: {counts}")
        elif counts["acknowledged"] != n or counts["subscribers"] != n:
            tally.anomaly("counts_not_all_acknowledged", f"{p.msgid}: {counts}")
        elif counts["failed"] or counts["expired"]:
            tally.anomaly("counts_failed_or_expired", f"{p.msgid}: {counts}")


def latencies(publications: list[Publication], attr: str) -> dict[str, float]:
    values = [(getattr(p, attr) - p.sent_ns) // 1000 for p in publications if getattr(p, attr)]
    return latency_summary(values)


# --- one engine and N ----------------------------------------------------------------------


async def run_variant(
    daemon: Relayd,
    publisher: Publisher,
    subscribers: list[Subscriber],
    topic: Topic,
    acknowledge: bool,
    args: argparse.Namespace,
) -> dict[str, Any]:
    n = len(subscribers)
    label = "ack" if acknowledge else "noack"
    tally_before = (
        collections.Counter(topic.tally.anomalies),
        collections.Counter(topic.tally.info),
    )
    samples_before = len(topic.tally.samples)
    rss_start = daemon.rss()
    async with DaemonWatch(daemon) as rss:
        count = max(1, min(args.paced, args.max_paced_deliveries // n))
        paced_pubs = await paced(publisher, topic, count, n, acknowledge, label)
        publishes = max(1, min(args.publishes, args.max_deliveries // n))
        gauges0, jiffies0 = await scrape(daemon), machine_jiffies()
        cpu0, gen0, wall0 = daemon.cpu(), time.process_time(), time.monotonic()
        burst_pubs, completed = await burst(
            publisher, topic, publishes, n, acknowledge, label, args.settle
        )
        wall = time.monotonic() - wall0
        cpu, gen_cpu = daemon.cpu() - cpu0, time.process_time() - gen0
        gauges1, machine = await scrape(daemon), machine_usage(jiffies0, machine_jiffies())
        final_ok = True
        if acknowledge:
            final_ok = await until_all(
                paced_pubs + burst_pubs, lambda p: p.final, args.final_within
            )
    rss_end = daemon.rss()
    everything = paced_pubs + burst_pubs
    received = sum(p.received for p in everything)
    expected = n * len(everything)
    first = burst_pubs[0].sent_ns
    last_delivery = max((p.last_ns for p in burst_pubs), default=first)
    last_answer = max((p.answered_ns for p in burst_pubs), default=first)
    span_s = (last_delivery - first) / 1e9
    if acknowledge:
        counts_findings(everything, n, topic.tally)
    anomalies = topic.tally.anomalies - tally_before[0]
    info = topic.tally.info - tally_before[1]
    updates = [p.updates for p in everything]
    commit_key = "store_commit_seconds"
    commits = int(gauges1.get(f"{commit_key}_count", 0) - gauges0.get(f"{commit_key}_count", 0))
    commit_s = gauges1.get(f"{commit_key}_sum", 0.0) - gauges0.get(f"{commit_key}_sum", 0.0)
    held = rss.gauge_peaks.get('message_memory_bytes{for="recipients"}', 0.0)
    lost = expected - received
    return {
        "acknowledge": acknowledge,
        "paced": {
            "publishes": len(paced_pubs),
            "first_ms": latencies(paced_pubs, "first_ns"),
            "last_ms": latencies(paced_pubs, "last_ns"),
            "topic_sent_ms": latencies(paced_pubs, "answered_ns"),
        },
        "burst": {
            "publishes": len(burst_pubs),
            "deliveries": n * len(burst_pubs),
            "span_s": round(span_s, 3),
            "deliveries_per_s": round(n * len(burst_pubs) / span_s) if span_s > 0 else None,
            "publishes_per_s": round(len(burst_pubs) / ((last_answer - first) / 1e9), 1)
            if last_answer > first
            else None,
            "last_ms": latencies(burst_pubs, "last_ns"),
            "topic_sent_ms": latencies(burst_pubs, "answered_ns"),
            "daemon_cpu_util": round(cpu / wall, 3),
            "daemon_cpu_us_per_delivery": round(cpu / (n * len(burst_pubs)) * 1e6, 1),
            "gen_cpu_util": round(gen_cpu / wall, 3),
            "machine": {
                **machine,
                "other_cores": other_cores(machine, cpu / wall, gen_cpu / wall),
            },
            "store_commits": commits,
            "counters": counter_deltas(gauges0, gauges1),
            "store_commit_ms_mean": round(commit_s / commits * 1000, 2) if commits else None,
            "all_received": completed,
        },
        "final_s": round((max(p.final_ns for p in everything) - first) / 1e9, 3)
        if acknowledge and final_ok
        else None,
        "topic_updates_per_publish_max": max(updates) if updates else 0,
        "rss_start_mib": mib(rss_start),
        "rss_peak_mib": mib(rss.peak),
        "rss_end_mib": mib(rss_end),
        "vm_hwm_mib": mib(vm_hwm_kib(daemon.pid)),
        # Peaks of the gauges sampled every 0.5 s: bytes of messages held for recipients
        # (each subscriber's delivery counts its own copy), and where messages waited.
        "held_for_recipients_peak_mib": round(held / 2**20, 2),
        "gauge_peaks": rss.gauge_peaks,
        "integrity": {
            "expected": expected,
            "received": received,
            "lost": lost,
            "anomalies": dict(anomalies),
            "info": dict(info),
            "samples": topic.tally.samples[samples_before:],
        },
        "ok": lost == 0 and not anomalies and completed and final_ok,
    }


async def bench_n(engine: str, n: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    acks = [a == "true" for a in args.acks.split(",") if a]
    watched = (args.paced + args.publishes) + 10
    daemon = await Relayd.start(fanout_settings(engine, args.transport, n + 1, watched))
    rows: list[dict[str, Any]] = []
    try:
        rss_idle = daemon.rss()
        topic, pub_creds, sub_creds, timings = await setup_topic(
            daemon, n, content_size=args.content_size
        )
        rss_registered = daemon.rss()
        publisher = Publisher(pub_creds, topic)
        subscribers = [Subscriber(c, topic) for c in sub_creds]
        started = time.monotonic()
        await publisher.connect(daemon.ws_url, 30)
        await connect_all(subscribers, daemon.ws_url, concurrency=50, within=60)
        timings["connect_s"] = round(time.monotonic() - started, 2)
        await asyncio.sleep(1.0)  # let the handshakes' garbage settle before the baseline
        rss_connected = daemon.rss()
        for acknowledge in acks:
            variant = await run_variant(daemon, publisher, subscribers, topic, acknowledge, args)
            rows.append(
                {
                    "scenario": "fanout",
                    "label": f"fanout {engine} N={n} {'ack' if acknowledge else 'noack'}",
                    "params": {
                        "engine": engine,
                        "subscribers": n,
                        "transport": args.transport,
                        "content_size": args.content_size,
                        "paced": args.paced,
                        "publishes": args.publishes,
                        "max_deliveries": args.max_deliveries,
                    },
                    "setup": timings,
                    "rss_idle_mib": mib(rss_idle),
                    "rss_registered_mib": mib(rss_registered),
                    "rss_connected_mib": mib(rss_connected),
                    "rss_kib_per_subscriber": round((rss_connected - rss_registered) / (n + 1), 1),
                    **variant,
                }
            )
        stop_s = await daemon.stop()
        log = daemon.log_summary()
        closes = collections.Counter[str]()
        for sub in subscribers:
            closes.update(sub.closes)
        for row in rows:
            row["stop_s"] = round(stop_s, 2)
            row["daemon_log"] = log
            row["closes_before_stop"] = dict(closes)
            row["cpus"] = os.cpu_count()
            errors = sum(log["levels"].get(level, 0) for level in ("error", "critical"))
            row["ok"] = row["ok"] and not errors and not log.get("died")
    finally:
        await daemon.cleanup()
    return rows


async def bench(args: argparse.Namespace) -> bool:
    raise_nofile()
    ok = True
    for engine in args.engines.split(","):
        for n in (int(x) for x in args.subscribers.split(",")):
            try:
                rows = await bench_n(engine, n, args)
            except Exception as exc:
                ok = False
                rows = [
                    {
                        "scenario": "fanout",
                        "label": f"fanout {engine} N={n}",
                        "params": {"engine": engine, "subscribers": n},
                        "error": f"{type(exc).__name__}: {exc}"[:2000],
                        "ok": False,
                    }
                ]
            for row in rows:
                if args.tag:
                    row["tag"] = args.tag
                record(row, args.results)
                ok = ok and bool(row["ok"])
    return ok


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engines", default="sqlite", help="comma-separated: sqlite, sqlite-memory, redis"
    )
    parser.add_argument("--transport", default="main", choices=["main", "dedicated"])
    parser.add_argument("--content-size", type=int, default=256, help="characters of content")
    parser.add_argument("--tag", default="", help="free text stored with each row")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where rows are appended")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m contrib.bench.fanout", description=__doc__.split("\n\n")[0]
    )
    add_common(parser)
    parser.add_argument("--subscribers", default="10,100,1000", help="comma-separated N")
    parser.add_argument("--acks", default="false,true", help="variants: false, true")
    parser.add_argument("--paced", type=int, default=20, help="publishes one at a time")
    parser.add_argument("--publishes", type=int, default=200, help="burst publishes (M)")
    parser.add_argument(
        "--max-deliveries", type=int, default=30_000, help="M is capped at this ÷ N"
    )
    parser.add_argument(
        "--max-paced-deliveries",
        type=int,
        default=10_000,
        help="the paced count is capped at this ÷ N",
    )
    parser.add_argument(
        "--settle", type=float, default=60.0, help="s to wait for every delivery of a burst"
    )
    parser.add_argument(
        "--final-within",
        type=float,
        default=10.0,
        help="s to wait, after the burst's last delivery, for every final topic_update",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.engines.split(",")) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {', '.join(ENGINES)}")
    return 0 if uvloop.run(bench(args)) else 1


if __name__ == "__main__":
    sys.exit(main())
