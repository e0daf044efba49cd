"""The scenarios. Each starts what it measures in its own process(es), runs a bounded load
against it from generator processes, stops it, and returns one result row."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ._harness import Sampler, Worker, kill_all, start_workers
from ._proc import machine_usage, other_cores, raise_nofile
from ._rest import MetricsScraper, register_many
from ._servers import EchoServer, Relayd, SeedV1, Settings, merge, relay_settings
from ._stats import Merged

# The seed system's first version, a bare forwarder with no guarantees (issue 5): the
# reference for `acknowledge: false`. Measured elsewhere, on the same kind of machine.
SEED_BARE_FORWARDER_MSGS_PER_S = 8_800


def _split(items: list[Any], parts: int) -> list[list[Any]]:
    parts = max(1, min(parts, len(items)))
    return [items[i::parts] for i in range(parts)]


def _cpu_util(values: list[float], seconds: float) -> list[float]:
    return [round(v / seconds, 3) for v in values]


def _integrity(merged: Merged, groups: list[str] | None = None) -> dict[str, Any]:
    outcome = merged.groups()
    total: dict[str, int] = {}
    for name, counts in outcome.items():
        if groups is None or name in groups:
            for key, value in counts.items():
                total[key] = total.get(key, 0) + value
    anomalies = merged.summed("anomalies")
    return {
        "sent": total.get("sent", 0),
        "received": total.get("received", 0),
        "lost": total.get("lost", 0),
        "unconfirmed": total.get("unconfirmed", 0),
        "not_final": total.get("not_final", 0),
        "failed": total.get("failed", 0),
        "anomalies": dict(anomalies),
        "errors": dict(merged.summed("errors")),
        "closes": dict(merged.summed("closes")),
        "info": dict(merged.summed("info")),
        "complete": all(r.get("complete") for r in merged.results),
    }


def _clean(integrity: dict[str, Any]) -> bool:
    return bool(
        integrity["lost"] == 0
        and integrity["unconfirmed"] == 0
        and integrity["not_final"] == 0
        and not integrity["anomalies"]
        and integrity["complete"]
    )


# --- relay runs ------------------------------------------------------------------------------


@dataclass
class RelayParams:
    pairs: int = 25
    window: int = 10
    ack: bool = True
    store: str = "file"
    transport: str = "main"
    seconds: float = 10.0
    warmup: float = 2.0
    procs: int = 1
    content_size: int = 256
    lean: bool = False  # the lean receipt profile (relayd.v1.lean)
    # "seed-v1": the same load against the seed system's bare forwarder (no ack only).
    against: str = "relayd"
    workers: int = 1  # relayd serve --workers N (needs --store redis)


@dataclass
class RelaySession:
    merged: Merged
    daemon: Sampler
    workers: list[Worker]
    bounds: list[float]
    stop_s: float
    exit_code: int | None
    log: dict[str, Any]
    register_s: float


async def relay_session(
    settings: Settings,
    pair_specs: list[dict[str, Any]],
    common: dict[str, Any],
    *,
    procs: int,
    offsets: list[float],
    stop_offset: float,
    settle: float = 30.0,
    scrape_metrics: bool = False,
    seed_v1: bool = False,
    relayd_workers: int = 1,
) -> RelaySession:
    """Start relayd, register the pairs' clients, run the generators on the timeline
    (``offsets`` from t0 bound the measured phases; senders stop at ``stop_offset``), wait
    until every message is accounted for (at most ``settle`` s), stop relayd."""
    raise_nofile()
    daemon: Relayd | SeedV1 = await (
        SeedV1.start() if seed_v1 else Relayd.start(settings, workers=relayd_workers)
    )
    workers: list[Worker] = []
    try:
        creds, register_s = await register_many(daemon.http_url, 2 * len(pair_specs))
        if seed_v1:
            common = {**common, "seed_v1": True}
        for i, spec in enumerate(pair_specs):
            spec.update(idx=i, sender=creds[2 * i].to_json(), recipient=creds[2 * i + 1].to_json())
        specs = [
            {"mode": "relay", "url": daemon.ws_url, "drain_timeout": settle, **common, "pairs": c}
            for c in _split(pair_specs, procs)
        ]
        workers = await start_workers(specs, within=60)
        t0 = time.monotonic() + 0.3
        bounds = [t0 + o for o in offsets]
        sampler = Sampler(daemon.cpu, daemon.rss)
        go = {"cmd": "go", "t0": t0, "phases": bounds, "stop": t0 + stop_offset}
        for worker in workers:
            await worker.send(go)
        scraper = MetricsScraper(daemon.http_url) if scrape_metrics else None
        tasks = [
            asyncio.create_task(sampler.bounds(bounds)),
            asyncio.create_task(sampler.periodic(t0, scraper.scrape if scraper else None)),
        ]
        results = await asyncio.gather(
            *(w.event("result", stop_offset + settle + 60) for w in workers)
        )
        for task in tasks:
            task.cancel()
        if scraper is not None:
            scraper.close()
        for worker in workers:
            await worker.finish()
        stop_s = await daemon.stop()
        return RelaySession(
            Merged(results),
            sampler,
            workers,
            bounds,
            stop_s,
            daemon.exit_code,
            daemon.log_summary(),
            register_s,
        )
    finally:
        await kill_all(workers)
        await daemon.cleanup()


def _relay_metrics(
    session: RelaySession, group: str, first: int, last: int, seconds: float
) -> dict[str, Any]:
    merged = session.merged
    phases = range(first, last)
    delivered = merged.count(group, phases)
    frames = merged.delta("frames_in", first, last) + merged.delta("frames_out", first, last)
    daemon_cpu = session.daemon.at_bounds[last]["cpu"] - session.daemon.at_bounds[first]["cpu"]
    gen_cpu = merged.per_process("cpu", first, last)
    machine = machine_usage(session.daemon.machine[first], session.daemon.machine[last])
    machine["other_cores"] = other_cores(machine, daemon_cpu / seconds, sum(gen_cpu) / seconds)
    return {
        "msgs_per_s": round(delivered / seconds, 1),
        **merged.latency(group, phases),
        "frames_per_s": round(frames / seconds, 1),
        "frames_per_msg": round(frames / delivered, 2) if delivered else None,
        "daemon_cpu_util": round(daemon_cpu / seconds, 3),
        "daemon_cpu_us_per_msg": round(1e6 * daemon_cpu / delivered, 1) if delivered else None,
        "gen_cpu_util": _cpu_util(gen_cpu, seconds),
        "machine": machine,
    }


async def direct(p: RelayParams, *, name: str = "direct") -> dict[str, Any]:
    """N sender->recipient pairs, each with at most W messages outstanding."""
    settings = relay_settings(store=p.store, transport=p.transport)
    seed_v1 = p.against == "seed-v1"
    if seed_v1 and p.ack:
        raise SystemExit("the seed's first version has no acknowledgements: pass --no-ack")
    session = await relay_session(
        settings,
        [{} for _ in range(p.pairs)],
        {"window": p.window, "ack": p.ack, "content_size": p.content_size, "lean": p.lean},
        procs=p.procs,
        offsets=[p.warmup, p.warmup + p.seconds],
        stop_offset=p.warmup + p.seconds,
        seed_v1=seed_v1,
        relayd_workers=p.workers,
    )
    integrity = _integrity(session.merged)
    metrics = _relay_metrics(session, "main", 0, 1, p.seconds)
    where = "seed-v1" if seed_v1 else f"{p.store} {p.transport}"
    if p.workers > 1:
        where += f" x{p.workers}"
    label = f"{name} {'ack' if p.ack else 'noack'} {where} N={p.pairs} W={p.window}"
    if p.lean:
        label += " lean"
    return {
        "scenario": name,
        "label": label,
        "params": asdict(p),
        **metrics,
        "ok": _clean(integrity) and "died" not in session.log and session.exit_code == 0,
        "integrity": integrity,
        "daemon_rss_kib_end": session.daemon.at_bounds[-1]["rss_kib"],
        "daemon_stop_s": round(session.stop_s, 3),
        "daemon_exit": session.exit_code,
        "daemon_log": session.log,
    }


# --- open loop --------------------------------------------------------------------------------


@dataclass
class OpenLoopParams:
    pairs: int = 5
    ack: bool = True
    store: str = "file"
    transport: str = "dedicated"
    capacity: float = 0.0  # msgs/s; 0: measured first, closed loop (25 pairs, W = 10)
    loads: str = "0.2,0.5"  # fractions of the capacity offered
    seconds: float = 10.0
    warmup: float = 2.0
    content_size: int = 256


async def openloop(p: OpenLoopParams) -> dict[str, Any]:
    """A fixed offered rate (fractions of the capacity), spread over N pairs, each message
    stamped with the time it was due: latency percentiles that show queueing, which a closed
    loop (the sender waits for its receipts) hides."""
    capacity = p.capacity
    if capacity <= 0:
        closed = await direct(
            RelayParams(
                pairs=25,
                window=10,
                ack=p.ack,
                store=p.store,
                transport=p.transport,
                content_size=p.content_size,
            )
        )
        capacity = float(closed["msgs_per_s"])
    settings = relay_settings(store=p.store, transport=p.transport)
    runs: list[dict[str, Any]] = []
    clean = True
    for load in (float(x) for x in p.loads.split(",")):
        rate = load * capacity / p.pairs
        session = await relay_session(
            settings,
            [{"rate": rate} for _ in range(p.pairs)],
            {"window": 1, "ack": p.ack, "content_size": p.content_size},
            procs=1,
            offsets=[p.warmup, p.warmup + p.seconds],
            stop_offset=p.warmup + p.seconds,
        )
        integrity = _integrity(session.merged)
        clean = clean and _clean(integrity) and "died" not in session.log
        runs.append(
            {
                "load": load,
                "offered_msgs_per_s": round(load * capacity, 1),
                **_relay_metrics(session, "main", 0, 1, p.seconds),
                "integrity_ok": _clean(integrity),
            }
        )
    return {
        "scenario": "openloop",
        "label": f"openloop {'ack' if p.ack else 'noack'} {p.store} {p.transport} N={p.pairs}",
        "params": asdict(p),
        "capacity_msgs_per_s": capacity,
        "runs": runs,
        "ok": clean,
    }


# --- the ceiling -----------------------------------------------------------------------------


@dataclass
class CeilingParams:
    server: str = "asgi"
    conns: int = 50
    window: int = 5
    seconds: float = 10.0
    warmup: float = 2.0
    procs: int = 1
    content_size: int = 256


async def ceiling(p: CeilingParams) -> dict[str, Any]:
    """The same generator against a bare echo server: the frames/s the stack can carry."""
    raise_nofile()
    server = await EchoServer.start(p.server)
    workers: list[Worker] = []
    try:
        specs = [
            {
                "mode": "echo",
                "url": server.url,
                "conns": n,
                "window": p.window,
                "content_size": p.content_size,
            }
            for n in [len(c) for c in _split(list(range(p.conns)), p.procs)]
        ]
        workers = await start_workers(specs, within=60)
        t0 = time.monotonic() + 0.3
        bounds = [t0 + p.warmup, t0 + p.warmup + p.seconds]
        sampler = Sampler(server.cpu, server.rss)
        for worker in workers:
            await worker.send({"cmd": "go", "t0": t0, "phases": bounds, "stop": bounds[-1]})
        task = asyncio.create_task(sampler.bounds(bounds))
        results = await asyncio.gather(
            *(w.event("result", p.warmup + p.seconds + 60) for w in workers)
        )
        task.cancel()
        for worker in workers:
            await worker.finish()
    finally:
        await kill_all(workers)
        await server.stop()
    merged = Merged(results)
    echoes = merged.count("echo", [0])
    frames = merged.delta("frames_in", 0, 1) + merged.delta("frames_out", 0, 1)
    server_cpu = sampler.at_bounds[1]["cpu"] - sampler.at_bounds[0]["cpu"]
    transport = "main" if p.server == "asgi" else "dedicated"
    gen_cpu = merged.per_process("cpu", 0, 1)
    machine = machine_usage(sampler.machine[0], sampler.machine[1])
    machine["other_cores"] = other_cores(machine, server_cpu / p.seconds, sum(gen_cpu) / p.seconds)
    return {
        "scenario": "ceiling",
        "label": f"ceiling {p.server} ({transport}) conns={p.conns} W={p.window}",
        "params": asdict(p),
        "transport": transport,
        "echoes_per_s": round(echoes / p.seconds, 1),
        "frames_per_s": round(frames / p.seconds, 1),
        **merged.latency("echo", [0]),
        "server_cpu_util": round(server_cpu / p.seconds, 3),
        "gen_cpu_util": _cpu_util(gen_cpu, p.seconds),
        "machine": machine,
        "ok": not merged.summed("anomalies"),
        "anomalies": dict(merged.summed("anomalies")),
    }


# --- idle connections ------------------------------------------------------------------------


@dataclass
class IdleParams:
    conns: int = 10_000
    transport: str = "main"
    store: str = "file"
    heartbeat: float = 20.0
    hold: float = 45.0
    procs: int = 2
    concurrency: int = 100
    register_concurrency: int = 16
    connect_within: float = 300.0


async def idle(p: IdleParams) -> dict[str, Any]:
    """M authenticated sockets that do nothing but answer heartbeats."""
    nofile = raise_nofile()
    limit = p.conns + 100
    # A client silent this long is closed (4002): shorter than the hold, so a socket whose
    # pongs did not count would not survive it.
    timeout = 2 * p.heartbeat
    settings = relay_settings(
        store=p.store,
        transport=p.transport,
        extra={
            "websocket": {
                "max_connections": limit,
                "max_connections_per_ip": limit,
                "heartbeat_interval": p.heartbeat,
                "heartbeat_timeout": timeout,
            }
        },
    )
    daemon = await Relayd.start(settings)
    workers: list[Worker] = []
    try:
        creds, register_s = await register_many(
            daemon.http_url, p.conns, concurrency=p.register_concurrency
        )
        await asyncio.sleep(1.0)
        rss_before = daemon.rss()
        specs = [
            {
                "mode": "idle",
                "url": daemon.ws_url,
                "clients": [c.to_json() for c in chunk],
                "concurrency": p.concurrency,
                "connect_within": p.connect_within,
            }
            for chunk in _split(creds, p.procs)
        ]
        cpu_before_connect = daemon.cpu()
        workers = await start_workers(specs, within=p.connect_within + 120)
        started = min(w.ready["started"] for w in workers)
        finished = max(w.ready["finished"] for w in workers)
        opened = sum(w.ready["open"] for w in workers)
        cpu_connect = daemon.cpu() - cpu_before_connect
        await asyncio.sleep(2.0)
        rss_after = daemon.rss()
        cpu_hold_start = daemon.cpu()
        hold_start = time.monotonic()
        for worker in workers:
            await worker.send({"cmd": "go", "until": hold_start + p.hold})
        results = await asyncio.gather(*(w.event("result", p.hold + 120) for w in workers))
        hold_s = time.monotonic() - hold_start
        cpu_hold = daemon.cpu() - cpu_hold_start
        rss_end = daemon.rss()
        # Stopped with every socket still open: the drain of M idle sessions, timed.
        stop_s = await daemon.stop(within=120)
        for worker in workers:
            await worker.finish()
        log = daemon.log_summary()
    finally:
        await kill_all(workers)
        await daemon.cleanup()

    def total(key: str) -> int:
        return sum(int(r[key]) for r in results)

    failures: dict[str, int] = {}
    for worker in workers:
        for key, n in worker.ready["failures"].items():
            failures[key] = failures.get(key, 0) + n
    closes: dict[str, int] = {}
    for r in results:
        for key, n in r["closes"].items():
            closes[key] = closes.get(key, 0) + n
    alive = total("alive")
    per_conn = (rss_after - rss_before) / opened if opened else 0.0
    return {
        "scenario": "idle",
        "label": f"idle {p.transport} M={p.conns}",
        "params": asdict(p),
        "nofile": nofile,
        "register_per_s": round(p.conns / register_s, 1),
        "opened": opened,
        "connect_per_s": round(opened / (finished - started), 1),
        "connect_s": round(finished - started, 2),
        "connect_failures": failures,
        "daemon_cpu_ms_per_connect": round(1000 * cpu_connect / opened, 3) if opened else None,
        "rss_before_mib": round(rss_before / 1024, 1),
        "rss_after_mib": round(rss_after / 1024, 1),
        "rss_end_mib": round(rss_end / 1024, 1),
        "rss_kib_per_conn": round(per_conn, 2),
        "hold_s": round(hold_s, 1),
        "daemon_cpu_util_idle": round(cpu_hold / hold_s, 3),
        # CPU per socket per heartbeat interval while idle: the heartbeat's cost.
        "daemon_us_per_heartbeat": (
            round(1e6 * cpu_hold / (opened * hold_s / p.heartbeat), 1) if opened else None
        ),
        "alive_after_hold": alive,
        "closed_during_hold": closes,
        "protocol_pings_min": min(r["protocol_pings_min"] for r in results),
        "json_pings_min": min(r["json_pings_min"] for r in results),
        "sockets_without_ping": total("sockets_without_ping"),
        "probe_s": round(max(r["probe_s"] for r in results), 2),
        "probe_p50_ms": max(r["probe_p50_ms"] or 0 for r in results),
        "probe_max_ms": max(r["probe_max_ms"] or 0 for r in results),
        "daemon_stop_s": round(stop_s, 3),
        "daemon_exit": daemon.exit_code,
        "daemon_log": log,
        "ok": opened == p.conns
        and daemon.exit_code == 0
        and alive == p.conns
        and total("sockets_without_ping") == 0
        and "died" not in log,
    }


# --- slow consumer ---------------------------------------------------------------------------


@dataclass
class SlowParams:
    pairs: int = 25
    window: int = 10
    ack: bool = True
    slow_ack: bool = True
    slow_rate: float = 200.0
    rcvbuf: int = 4096
    keep_rcvbuf: bool = False
    store: str = "file"
    transport: str = "main"
    warmup: float = 2.0
    before: float = 2.0
    stall: float = 12.0
    after: float = 4.0
    baseline: bool = True
    settle: float = 30.0


async def slow(p: SlowParams) -> dict[str, Any]:
    """One recipient stops reading while the other pairs run; then it reads again."""
    settings = relay_settings(store=p.store, transport=p.transport)
    common = {"window": p.window, "ack": p.ack}
    others = p.pairs - 1
    baseline: dict[str, Any] | None = None
    if p.baseline:
        seconds = p.before + p.stall + p.after
        base = await relay_session(
            settings,
            [{} for _ in range(others)],
            common,
            procs=1,
            offsets=[p.warmup, p.warmup + seconds],
            stop_offset=p.warmup + seconds,
        )
        baseline = _relay_metrics(base, "main", 0, 1, seconds)
        baseline["integrity_ok"] = _clean(_integrity(base.merged))
    stall_at = p.warmup + p.before
    slow_pair = {
        "group": "slow",
        "rate": p.slow_rate,
        "ack": p.slow_ack,
        "stall_at": stall_at,
        "stall_for": p.stall,
    }
    if p.rcvbuf:
        slow_pair["rcvbuf"] = p.rcvbuf
        slow_pair["keep_rcvbuf"] = p.keep_rcvbuf
    end = stall_at + p.stall + p.after
    session = await relay_session(
        settings,
        [{} for _ in range(others)] + [slow_pair],
        common,
        procs=1,
        offsets=[p.warmup, stall_at, stall_at + p.stall, end],
        stop_offset=end,
        settle=p.settle,
        scrape_metrics=True,
    )
    merged = session.merged
    phases = {"before": 0, "during": 1, "after": 2}
    per_phase: dict[str, dict[str, Any]] = {}
    lengths = {"before": p.before, "during": p.stall, "after": p.after}
    for name, index in phases.items():
        metrics = _relay_metrics(session, "main", index, index + 1, lengths[name])
        # The generator's frame counters include the slow pair's: not the others' alone.
        metrics.pop("frames_per_s")
        metrics.pop("frames_per_msg")
        per_phase[name] = metrics
    slow_outcome = dict(merged.groups().get("slow", {}))
    others_integrity = _integrity(merged, ["main"])
    rss = session.daemon.series
    during = [kib for t, kib in rss if p.warmup + p.before <= t < stall_at + p.stall]
    result: dict[str, Any] = {
        "scenario": "slow",
        "label": f"slow {'ack' if p.slow_ack else 'noack'} {p.store} {p.transport} N={p.pairs}",
        "params": asdict(p),
        "others": per_phase,
        "baseline": baseline,
        "others_during_vs_baseline": (
            round(per_phase["during"]["msgs_per_s"] / baseline["msgs_per_s"], 3)
            if baseline and baseline["msgs_per_s"]
            else None
        ),
        "others_during_vs_before": (
            round(per_phase["during"]["msgs_per_s"] / per_phase["before"]["msgs_per_s"], 3)
            if per_phase["before"]["msgs_per_s"]
            else None
        ),
        "slow": slow_outcome,
        "slow_closes": dict(merged.summed("closes")),
        "slow_arrivals_per_s": next(
            (r["arrivals"]["slow"] for r in merged.results if "slow" in r.get("arrivals", {})),
            None,
        ),
        "rss_mib_start": round(rss[0][1] / 1024, 1) if rss else None,
        "rss_mib_max_during_stall": round(max(during) / 1024, 1) if during else None,
        "rss_mib_max": round(max(k for _, k in rss) / 1024, 1) if rss else None,
        "rss_mib_end": round(rss[-1][1] / 1024, 1) if rss else None,
        "rss_series": [[t, round(k / 1024, 1)] for t, k in rss[::2]],
        "daemon_gauges": session.daemon.gauges,
        "integrity_others": others_integrity,
        "anomalies": dict(merged.summed("anomalies")),
        "anomaly_samples": [s for r in merged.results for s in r.get("anomaly_samples", [])][:5],
        "info": dict(merged.summed("info")),
        "errors": dict(merged.summed("errors")),
        "complete": all(r.get("complete") for r in merged.results),
        "settle_s": max(r.get("settle_s", 0) for r in merged.results),
        "daemon_stop_s": round(session.stop_s, 3),
        "daemon_log": session.log,
    }
    result["ok"] = bool(
        _clean(others_integrity)
        and slow_outcome.get("lost", 0) == 0
        and slow_outcome.get("not_final", 0) == 0
        and not result["anomalies"]
        and result["complete"]
        and "died" not in session.log
    )
    return result


# --- drain -----------------------------------------------------------------------------------


@dataclass
class DrainParams:
    conns: int = 1000
    window: int = 2
    ack: bool = True
    transport: str = "main"
    warmup: float = 1.0
    seconds: float = 5.0
    procs: int = 1
    drain_timeout: float = 10.0


async def drain(p: DrainParams) -> dict[str, Any]:
    """Traffic on every connection, SIGTERM, time to exit; restart on the same state dir
    and check that every message whose acceptance was confirmed is delivered."""
    raise_nofile()
    pairs = p.conns // 2
    settings = merge(
        relay_settings(store="file", transport=p.transport),
        {"": {"drain_timeout": p.drain_timeout}},
    )
    first = await Relayd.start(settings)
    second: Relayd | None = None
    workers: list[Worker] = []
    try:
        creds, _ = await register_many(first.http_url, 2 * pairs)
        specs_pairs = [
            {
                "idx": i,
                "sender": creds[2 * i].to_json(),
                "recipient": creds[2 * i + 1].to_json(),
            }
            for i in range(pairs)
        ]
        specs = [
            {
                "mode": "relay",
                "url": first.ws_url,
                "window": p.window,
                "ack": p.ack,
                "reconnect": "command",
                "drain_timeout": 60.0,
                "pairs": chunk,
            }
            for chunk in _split(specs_pairs, p.procs)
        ]
        workers = await start_workers(specs, within=120)
        t0 = time.monotonic() + 0.3
        bounds = [t0 + p.warmup, t0 + p.warmup + p.seconds]
        sampler = Sampler(first.cpu, first.rss)
        for worker in workers:
            await worker.send({"cmd": "go", "t0": t0, "phases": bounds, "stop": t0 + 3600})
        await sampler.bounds(bounds)
        sessions_log_before = time.monotonic()
        stop_s = await first.stop(within=p.drain_timeout + 20)
        exit_code = first.exit_code
        downs = await asyncio.gather(*(w.event("down", 60) for w in workers))
        down_after_s = max(d["t"] for d in downs) - sessions_log_before
        second = await Relayd.start(settings, state_dir=first.state_dir, secret=first.secret)
        for worker in workers:
            await worker.send({"cmd": "reconnect", "url": second.ws_url})
        results = await asyncio.gather(*(w.event("result", 120) for w in workers))
        for worker in workers:
            await worker.finish()
        stop2_s = await second.stop()
        log = second.log_summary()
    finally:
        await kill_all(workers)
        if second is not None:
            await second.cleanup()
        await first.cleanup()
    merged = Merged(results)
    integrity = _integrity(merged)
    throughput = merged.count("main", [0]) / p.seconds
    return {
        "scenario": "drain",
        "label": f"drain {p.transport} conns={p.conns} W={p.window}",
        "params": asdict(p),
        "msgs_per_s_before": round(throughput, 1),
        "in_flight_at_sigterm": sum(d["outstanding"] for d in downs),
        "drain_exit_s": round(stop_s, 3),
        "exit_code": exit_code,
        "all_closed_after_s": round(down_after_s, 3),
        "reconnect_s": round(max(r["down"]["reconnect_s"] for r in results), 2),
        "resent_after_restart": sum(r["down"]["resent"] for r in results),
        "settle_s": round(max(r["settle_s"] for r in results), 2),
        **{k: integrity[k] for k in ("sent", "received", "lost", "unconfirmed", "not_final")},
        "failed": integrity["failed"],
        "anomalies": integrity["anomalies"],
        "anomaly_samples": [s for r in merged.results for s in r.get("anomaly_samples", [])][:5],
        "info": integrity["info"],
        "errors": integrity["errors"],
        "closes": integrity["closes"],
        "complete": integrity["complete"],
        "restart_stop_s": round(stop2_s, 3),
        "exit_code_restart": second.exit_code if second else None,
        "daemon_log": log,
        "ok": _clean(integrity) and exit_code == 0,
    }


# --- hoarders --------------------------------------------------------------------------------


def _count_lines(path: Path, needle: str) -> int:
    with path.open(errors="replace") as fh:
        return sum(needle in line for line in fh)


@dataclass
class HoardParams:
    clients: int = 10
    messages: int = 200
    content_size: int = 60_000
    ack: bool = False
    store: str = "file"
    transport: str = "main"
    write_timeout: float = 5.0
    settle: float = 60.0
    # Seconds to watch RSS after the drop: past one of relayd's memory trims (every 30 s).
    after: float = 35.0


async def hoard(p: HoardParams) -> dict[str, Any]:
    """Clients that send big messages to themselves and never read: what each pins in the
    daemon (RSS over the run) until relayd drops it as a slow consumer, and after."""
    from ._worker import open_ws  # the generator's client, here in the harness process

    settings = relay_settings(
        store=p.store,
        transport=p.transport,
        extra={"websocket": {"write_timeout": p.write_timeout}},
    )
    raise_nofile()
    daemon = await Relayd.start(settings)
    try:
        creds, _ = await register_many(daemon.http_url, p.clients, prefix="hoarder")
        sampler = Sampler(daemon.cpu, daemon.rss, every=0.25)
        t0 = time.monotonic()
        periodic = asyncio.create_task(sampler.periodic(t0))
        await asyncio.sleep(0.5)
        rss_start = daemon.rss()
        conns = []
        for cred in creds:
            conn = await open_ws(daemon.ws_url, cred.token, lambda _: None, rcvbuf=4096)
            assert conn.transport is not None
            conn.transport.pause_reading()  # never reads again
            conns.append((cred, conn))
        padding = "x" * p.content_size
        for i in range(p.messages):
            for cred, conn in conns:
                frame = {
                    "to": cred.uuid,
                    "msgid": f"h{i}",
                    "content": padding,
                    "acknowledge": p.ack,
                }
                conn.send_text(json.dumps(frame))
            await asyncio.sleep(0)
        sent_s = time.monotonic() - t0
        # A client that never reads may never notice its socket was dropped: ask relayd.
        scraper = MetricsScraper(daemon.http_url)
        all_dropped = False
        try:
            while time.monotonic() < t0 + sent_s + p.settle:
                gauges = await scraper.scrape()
                if gauges.get("connections") == 0:
                    all_dropped = True
                    break
                await asyncio.sleep(0.25)
        finally:
            scraper.close()
        dropped_s = time.monotonic() - t0
        closes = {"slow_consumer_lines": _count_lines(daemon.log_path, "slow consumer")}
        await asyncio.sleep(p.after)
        rss_after = daemon.rss()
        periodic.cancel()
        for _, conn in conns:
            conn.abort()
        stop_s = await daemon.stop()
        log = daemon.log_summary()
    finally:
        await daemon.cleanup()
    rss = [k for _, k in sampler.series]
    peak = max(rss) if rss else 0
    result: dict[str, Any] = {
        "scenario": "hoard",
        "label": f"hoard {'ack' if p.ack else 'noack'} {p.store} {p.transport} N={p.clients}",
        "params": asdict(p),
        "offered_mib_per_client": round(p.messages * p.content_size / 2**20, 1),
        "rss_mib_start": round(rss_start / 1024, 1),
        "rss_mib_peak": round(peak / 1024, 1),
        "rss_mib_after": round(rss_after / 1024, 1),
        "peak_mib_per_client": round((peak - rss_start) / 1024 / p.clients, 2),
        "after_mib_per_client": round((rss_after - rss_start) / 1024 / p.clients, 2),
        "sent_s": round(sent_s, 2),
        "dropped_s": round(dropped_s, 2),
        "closes": closes,
        "rss_series": [[t, round(k / 1024, 1)] for t, k in sampler.series[::4]],
        "daemon_stop_s": round(stop_s, 3),
        "daemon_log": log,
    }
    result["ok"] = all_dropped and "died" not in log
    return result
