"""A reconnect storm (issue 13): every subscriber of a topic drops its socket at once, misses
messages, and reconnects at once.

    python -m contrib.bench.reconnect_storm                        # sqlite, 1,000 subscribers
    python -m contrib.bench.reconnect_storm --presence --rounds 1 --engines sqlite,redis

One relayd per engine (``relayd serve``, the bench settings of ``fanout.py``), N subscribers
(``--subscribers``) of one topic and its publisher, registered and subscribed over REST; with
``--presence`` the topic's presence setting is turned on (``PATCH /topics/{id}``
``{"presence": true}``) and the presence frames each subscriber gets are counted. All connect
(50 handshakes at a time), and ``--warmup`` publishes go out one at a time, each reaching
everyone. Then, ``--rounds`` times:

1. every subscriber drops its socket at once (``--drop abort``: a TCP reset, as when a network
   or a proxy goes; ``--drop close``: a WebSocket close), and the run waits until relayd's
   ``relayd_connections`` gauge says only the publisher is left (``noticed_s``);
2. the publisher publishes ``--missed`` messages (K, ``acknowledge: true`` unless
   ``--no-ack``), each when the previous one's ``topic_sent`` comes back; each must say it
   went to N subscribers: they are subscribed, only away;
3. every subscriber reconnects at the same instant (all N handshakes in flight; one that
   fails is tried again 0.25 s later, until ``--within``), and the run waits until every
   one has every missed message.

A row per engine and round (appended to contrib/bench/results/results.jsonl, ``--results``
elsewhere): ``connected_s`` (the storm's start to the last welcome) and each socket's time
to its welcome (p50, p99), failed attempts by reason, ``caught_up_s`` (to the last
subscriber's last missed message) and each subscriber's (p50, p99), what was lost or came
twice, the final ``topic_update`` counts (every subscriber acknowledged each missed message),
presence frames, and the daemon's CPU over the storm and RSS before it, at its peak (sampled
every 100 ms) and after. The command exits 1 when a row is not ``ok``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import time
from typing import Any

import uvloop

from ._proc import machine_jiffies, machine_usage, other_cores, raise_nofile, record
from ._servers import Relayd
from ._stats import latency_summary
from ._worker import HandshakeFailed
from .fanout import (
    ENGINES,
    DaemonWatch,
    Publication,
    Publisher,
    Subscriber,
    Topic,
    add_common,
    connect_all,
    counter_deltas,
    counts_findings,
    fanout_settings,
    mib,
    now_ns,
    paced,
    scrape,
    send_chained,
    setup_topic,
    until_all,
    vm_hwm_kib,
)

RETRY_AFTER = 0.25


async def wait_connections(daemon: Relayd, count: int, within: float) -> float | None:
    """Poll ``GET /metrics`` (every 20 ms) until relayd counts ``count`` open sockets: the
    seconds that took, ``None`` if it did not within ``within``."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        gauges = await scrape(daemon)
        if gauges.get("connections") == count:
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    return None


async def drop_all(subscribers: list[Subscriber], how: str) -> None:
    """Every subscriber's socket at once: reset (``abort``) or closed (``close``); returns
    when this side has seen each one go."""
    closing = []
    for sub in subscribers:
        conn = sub.conn
        if conn is None:
            continue
        closing.append(conn.closed)
        if how == "abort":
            conn.abort()
        else:
            conn.close()
    await asyncio.wait_for(asyncio.gather(*closing), 30)


async def reconnect(
    sub: Subscriber, url: str, deadline: float, failures: collections.Counter[str]
) -> int:
    """Connect until welcomed (a failed attempt is tried again after ``RETRY_AFTER`` s, until
    ``deadline``): the monotonic ns of the welcome."""
    while True:
        try:
            return await sub.connect(url, max(1.0, deadline - time.monotonic()))
        except (OSError, HandshakeFailed, RuntimeError, TimeoutError) as exc:
            failures[type(exc).__name__ + ": " + str(exc)[:80]] += 1
            if time.monotonic() + RETRY_AFTER > deadline:
                raise
        await asyncio.sleep(RETRY_AFTER)


def ms_since(start_ns: int, values: list[int]) -> dict[str, float]:
    return latency_summary([(v - start_ns) // 1000 for v in values if v])


async def storm(
    daemon: Relayd,
    publisher: Publisher,
    subscribers: list[Subscriber],
    topic: Topic,
    index: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    n = len(subscribers)
    tally = topic.tally
    before = collections.Counter(tally.anomalies)
    info_before = collections.Counter(tally.info)
    gauges_before = await scrape(daemon)
    samples_before = len(tally.samples)
    presence_before = [
        (s.frames["presence"], s.presence_events, s.presence_truncated) for s in subscribers
    ]
    rss_before = daemon.rss()
    cpu_before = daemon.cpu()
    await drop_all(subscribers, args.drop)
    noticed = await wait_connections(daemon, 1, 30)
    if noticed is None:
        tally.anomaly("disconnects_not_noticed", "relayd still counts sockets after 30 s")
    missed = [Publication(f"storm{index}-{i}", n, args.ack) for i in range(args.missed)]
    send_chained(publisher, topic, missed)
    if not await until_all(missed, lambda p: p.answered, 30):
        tally.anomaly("topic_sent_missing", "a publish while away was not answered in 30 s")
    rss_away = daemon.rss()
    failures: collections.Counter[str] = collections.Counter()
    async with DaemonWatch(daemon) as watch:
        jiffies, gen_cpu = machine_jiffies(), time.process_time()
        start_ns = now_ns()
        deadline = time.monotonic() + args.within
        results = await asyncio.gather(
            *(reconnect(s, daemon.ws_url, deadline, failures) for s in subscribers),
            return_exceptions=True,
        )
        welcomed = [r for r in results if isinstance(r, int)]
        caught_up = await until_all(
            missed, lambda p: p.complete, max(1.0, deadline - time.monotonic())
        )
        end_ns = now_ns()
        cpu = daemon.cpu() - cpu_before
        gen_cpu = time.process_time() - gen_cpu
        machine = machine_usage(jiffies, machine_jiffies())
    final_ok = True
    if args.ack:
        final_ok = await until_all(missed, lambda p: p.final, 10)
        counts_findings(missed, n, tally)
    rss_after = daemon.rss()
    counters = counter_deltas(gauges_before, await scrape(daemon))
    received = sum(p.received for p in missed)
    expected = n * len(missed)
    presence = [
        (s.frames["presence"] - f, s.presence_events - e, s.presence_truncated - t)
        for s, (f, e, t) in zip(subscribers, presence_before, strict=True)
    ]
    anomalies = tally.anomalies - before
    lost = expected - received
    storm_s = (end_ns - start_ns) / 1e9
    return {
        "round": index,
        "noticed_s": round(noticed, 3) if noticed is not None else None,
        "reconnected": len(welcomed),
        "not_reconnected": n - len(welcomed),
        "connected_s": round((max(welcomed) - start_ns) / 1e9, 3) if welcomed else None,
        "welcome_ms": ms_since(start_ns, welcomed),
        "connect_failures": dict(failures.most_common(8)),
        "caught_up": caught_up,
        "caught_up_s": round((max(s.last_delivery_ns for s in subscribers) - start_ns) / 1e9, 3)
        if caught_up
        else None,
        "caught_up_ms": ms_since(start_ns, [s.last_delivery_ns for s in subscribers]),
        "storm_s": round(storm_s, 3),
        "daemon_cpu_s": round(cpu, 2),
        "daemon_cpu_ms_per_reconnect": round(cpu / n * 1000, 2),
        "gen_cpu_s": round(gen_cpu, 2),
        "machine": {
            **machine,
            "other_cores": other_cores(machine, cpu / storm_s, gen_cpu / storm_s),
        },
        # Presence frames each subscriber got from its drop to the end of the round, the
        # events in them, and those that said they left events out (``truncated``).
        "presence_frames": sum(p[0] for p in presence),
        "presence_frames_max_per_subscriber": max((p[0] for p in presence), default=0),
        "presence_events": sum(p[1] for p in presence),
        "presence_events_max_per_subscriber": max((p[1] for p in presence), default=0),
        "presence_truncated_frames": sum(p[2] for p in presence),
        "rss_before_mib": mib(rss_before),
        "rss_away_mib": mib(rss_away),
        "rss_peak_mib": mib(watch.peak),
        "rss_after_mib": mib(rss_after),
        "vm_hwm_mib": mib(vm_hwm_kib(daemon.pid)),
        "gauge_peaks": watch.gauge_peaks,
        "counters": counters,
        "integrity": {
            "expected": expected,
            "received": received,
            "lost": lost,
            "anomalies": dict(anomalies),
            "info": dict(tally.info - info_before),
            "samples": tally.samples[samples_before:],
        },
        "ok": lost == 0 and not anomalies and caught_up and final_ok and len(welcomed) == n,
    }


async def bench_engine(engine: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    n = args.subscribers
    watched = args.warmup + args.rounds * args.missed + 10
    daemon = await Relayd.start(fanout_settings(engine, args.transport, n + 1, watched))
    rows: list[dict[str, Any]] = []
    try:
        topic, pub_creds, sub_creds, timings = await setup_topic(
            daemon, n, content_size=args.content_size, presence=args.presence
        )
        publisher = Publisher(pub_creds, topic)
        subscribers = [Subscriber(c, topic) for c in sub_creds]
        await publisher.connect(daemon.ws_url, 30)
        started = time.monotonic()
        await connect_all(subscribers, daemon.ws_url, concurrency=50, within=60)
        timings["connect_s"] = round(time.monotonic() - started, 2)
        warm = await paced(publisher, topic, args.warmup, n, args.ack, "warmup")
        warm_ok = all(p.complete for p in warm)
        for index in range(args.rounds):
            row = await storm(daemon, publisher, subscribers, topic, index, args)
            rows.append(
                {
                    "scenario": "reconnect_storm",
                    "label": f"reconnect_storm {engine} N={n} round {index}",
                    "params": {
                        "engine": engine,
                        "subscribers": n,
                        "missed": args.missed,
                        "ack": args.ack,
                        "drop": args.drop,
                        "presence": args.presence,
                        "transport": args.transport,
                        "content_size": args.content_size,
                    },
                    "setup": timings,
                    **row,
                    "ok": row["ok"] and warm_ok,
                }
            )
        stop_s = await daemon.stop()
        log = daemon.log_summary()
        errors = sum(log["levels"].get(level, 0) for level in ("error", "critical"))
        for row in rows:
            row["stop_s"] = round(stop_s, 2)
            row["daemon_log"] = log
            row["cpus"] = os.cpu_count()
            row["ok"] = row["ok"] and not errors and not log.get("died")
    finally:
        await daemon.cleanup()
    return rows


async def bench(args: argparse.Namespace) -> bool:
    raise_nofile()
    ok = True
    for engine in args.engines.split(","):
        try:
            rows = await bench_engine(engine, args)
        except Exception as exc:
            rows = [
                {
                    "scenario": "reconnect_storm",
                    "label": f"reconnect_storm {engine} N={args.subscribers}",
                    "params": {"engine": engine, "subscribers": args.subscribers},
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m contrib.bench.reconnect_storm", description=__doc__.split("\n\n")[0]
    )
    add_common(parser)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="storms, one after the other")
    parser.add_argument("--missed", type=int, default=20, help="publishes while they are away")
    parser.add_argument("--warmup", type=int, default=3, help="publishes before the first storm")
    parser.add_argument(
        "--ack", action=argparse.BooleanOptionalAction, default=True, help="acknowledge: true"
    )
    parser.add_argument("--drop", default="abort", choices=["abort", "close"])
    parser.add_argument(
        "--presence",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="turn the topic's presence on (PATCH /topics/{id})",
    )
    parser.add_argument(
        "--within", type=float, default=60.0, help="s for all to reconnect and catch up"
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.engines.split(",")) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {', '.join(ENGINES)}")
    return 0 if uvloop.run(bench(args)) else 1


if __name__ == "__main__":
    sys.exit(main())
