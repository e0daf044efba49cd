"""Every scenario, several rounds, interleaved; and the Markdown summary of a sweep.

A sweep runs each scenario as its own ``python -m contrib.bench ...`` process, round after
round, so that a noisy minute hurts one run of each kind rather than every run of one kind.
Runs that are compared (file vs memory store, relay vs echo on a transport) sit next to each
other in a round, and their order flips every other round. Ratios are computed within a round,
then their median is quoted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ._proc import REPO
from ._scenarios import SEED_BARE_FORWARDER_MSGS_PER_S
from ._stats import median

# (key, arguments); a list of them is a group run back to back, its order flipped in odd rounds.
Step = tuple[str, list[str]]
PLAN: list[list[Step]] = [
    [
        ("ceiling asgi", ["ceiling", "--server", "asgi"]),
        ("direct ack file main", ["direct", "--ack", "--store", "file", "--transport", "main"]),
    ],
    [
        ("direct ack memory main", ["direct", "--ack", "--store", "memory"]),
        ("direct noack file main", ["direct", "--no-ack", "--store", "file"]),
        ("direct noack memory main", ["direct", "--no-ack", "--store", "memory"]),
    ],
    [
        ("ceiling trio", ["ceiling", "--server", "trio"]),
        ("direct ack file dedicated", ["direct", "--ack", "--transport", "dedicated"]),
    ],
    [
        (
            "direct ack memory dedicated",
            ["direct", "--ack", "--store", "memory", "--transport", "dedicated"],
        ),
        ("direct noack file dedicated", ["direct", "--no-ack", "--transport", "dedicated"]),
        (
            "direct noack memory dedicated",
            ["direct", "--no-ack", "--store", "memory", "--transport", "dedicated"],
        ),
    ],
    [
        ("latency main", ["latency", "--transport", "main"]),
        ("latency dedicated", ["latency", "--transport", "dedicated"]),
    ],
    [("slow ack", ["slow"]), ("slow noack", ["slow", "--no-slow-ack"])],
    [("drain", ["drain"])],
    [("idle", ["idle"])],
]


def run_sweep(rounds: int, only: str, results: Path) -> int:
    sweep_id = time.strftime("%Y%m%d-%H%M%S")
    prefixes = [p.strip() for p in only.split(",") if p.strip()]
    failures = 0
    print(f"sweep {sweep_id}: {rounds} rounds -> {results}", file=sys.stderr)
    for round_no in range(1, rounds + 1):
        for group in PLAN:
            steps = group if round_no % 2 else list(reversed(group))
            for key, args in steps:
                if prefixes and not any(key.startswith(p) for p in prefixes):
                    continue
                command = [
                    sys.executable,
                    "-m",
                    "contrib.bench",
                    *args,
                    "--results",
                    str(results),
                    "--tag",
                    f"sweep={sweep_id};round={round_no};key={key}",
                ]
                started = time.monotonic()
                print(f"[round {round_no}] {key} ...", file=sys.stderr, flush=True)
                done = subprocess.run(command, cwd=REPO, check=False, stdout=subprocess.DEVNULL)
                took = time.monotonic() - started
                status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
                print(f"[round {round_no}] {key}: {status} ({took:.0f} s)", file=sys.stderr)
                failures += done.returncode != 0
    print(f"sweep {sweep_id} done; summary: python -m contrib.bench summary", file=sys.stderr)
    return 1 if failures else 0


# --- the summary ------------------------------------------------------------------------------


def _tag(row: dict[str, Any]) -> dict[str, str]:
    out = {}
    for part in str(row.get("tag", "")).split(";"):
        key, _, value = part.partition("=")
        if key:
            out[key] = value
    return out


def _get(row: dict[str, Any], path: str) -> Any:
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _fmt(value: float, digits: int = 0) -> str:
    if value != value:  # NaN
        return "-"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _med(rows: Iterable[dict[str, Any]], path: str) -> float:
    values = []
    for row in rows:
        value = _get(row, path)
        if isinstance(value, list):  # per-process CPU: the total
            value = sum(value)
        if isinstance(value, (int, float)):
            values.append(float(value))
    return median(values)


Column = tuple[str, str, int]  # header, path in the row, decimals


def _table(
    title: str, keys: list[str], by_key: dict[str, list[dict[str, Any]]], columns: list[Column]
) -> list[str]:
    present = [k for k in keys if k in by_key]
    if not present:
        return []
    lines = [
        f"### {title}",
        "",
        "| run | n | " + " | ".join(c[0] for c in columns) + " | clean |",
        "|---|---|" + "---|" * len(columns) + "---|",
    ]
    for key in present:
        rows = by_key[key]
        clean = sum(1 for r in rows if r.get("ok"))
        cells = [_fmt(_med(rows, path), digits) for _, path, digits in columns]
        lines.append(f"| {key} | {len(rows)} | " + " | ".join(cells) + f" | {clean}/{len(rows)} |")
    lines.append("")
    return lines


def _ratio(
    by_round: dict[str, dict[str, dict[str, Any]]],
    numerator: tuple[str, Callable[[dict[str, Any]], float]],
    denominator: tuple[str, Callable[[dict[str, Any]], float]],
) -> tuple[float, int]:
    """Median over rounds of numerator/denominator, both taken from the same round."""
    values = []
    for rows in by_round.values():
        top, bottom = rows.get(numerator[0]), rows.get(denominator[0])
        if top is not None and bottom is not None:
            b = denominator[1](bottom)
            if b:
                values.append(numerator[1](top) / b)
    return median(values), len(values)


def summarize(results: Path, sweep: str) -> str:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    sweeps = [_tag(r).get("sweep") for r in rows if _tag(r).get("sweep")]
    if not sweeps:
        return "no sweep in " + str(results)
    sweep = sweep or str(sweeps[-1])
    wanted = set(sweep.split(","))
    chosen = [r for r in rows if _tag(r).get("sweep") in wanted]
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    by_round: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for row in chosen:
        tag = _tag(row)
        by_key[tag["key"]].append(row)
        by_round[f"{tag['sweep']}:{tag['round']}"][tag["key"]] = row
    gits = sorted({str(r.get("git")) for r in chosen})
    out = [
        f"Sweep `{sweep}`: {len(by_round)} rounds, relayd at {', '.join(gits)}. "
        "Medians over rounds; `clean` counts runs with nothing lost, duplicated without "
        "`redelivered`, misrouted or left unfinished.",
        "",
    ]
    relay_cols: list[Column] = [
        ("msgs/s", "msgs_per_s", 0),
        ("p50 ms", "p50_ms", 1),
        ("p90 ms", "p90_ms", 1),
        ("p99 ms", "p99_ms", 1),
        ("max ms", "max_ms", 1),
        ("frames/msg", "frames_per_msg", 2),
        ("daemon µs CPU/msg", "daemon_cpu_us_per_msg", 0),
        ("daemon CPU", "daemon_cpu_util", 2),
        ("generator CPU", "gen_cpu_util", 2),
        ("other CPU", "machine.other_cores", 2),
    ]
    direct_keys = [
        f"direct {a} {s} {t}"
        for t in ("main", "dedicated")
        for a in ("ack", "noack")
        for s in ("file", "memory")
    ]
    out += _table("Direct relay (N = 25, W = 10, 256 B)", direct_keys, by_key, relay_cols)
    out += _table(
        "Light-load latency (N = 5, W = 1, acknowledged, durable)",
        ["latency main", "latency dedicated"],
        by_key,
        relay_cols,
    )
    out += _table(
        "The stack's ceiling: bare echo (50 sockets, 5 in flight each)",
        ["ceiling asgi", "ceiling trio"],
        by_key,
        [
            ("echoes/s", "echoes_per_s", 0),
            ("frames/s", "frames_per_s", 0),
            ("p50 ms", "p50_ms", 1),
            ("p99 ms", "p99_ms", 1),
            ("server CPU", "server_cpu_util", 2),
            ("generator CPU", "gen_cpu_util", 2),
            ("other CPU", "machine.other_cores", 2),
        ],
    )

    def msgs(row: dict[str, Any]) -> float:
        return float(row.get("msgs_per_s") or 0)

    def frames(row: dict[str, Any]) -> float:
        return float(row.get("frames_per_s") or 0)

    def four_frames(row: dict[str, Any]) -> float:
        return 4 * msgs(row)

    ratio_lines = [
        "### Ratios (each computed within a round, then the median)",
        "",
        "| ratio | median | rounds |",
        "|---|---|---|",
    ]
    for transport, echo in (("main", "ceiling asgi"), ("dedicated", "ceiling trio")):
        for acked in ("ack", "noack"):
            key = f"direct {acked} file {transport}"
            value, n = _ratio(by_round, (key, frames), (echo, frames))
            ratio_lines.append(f"| {key}: relay frames/s ÷ echo frames/s | {value:.2f} | {n} |")
        key = f"direct ack file {transport}"
        value, n = _ratio(by_round, (key, four_frames), (echo, frames))
        ratio_lines.append(
            f"| {key}: 4 x msgs/s ÷ echo frames/s (the issue's 4-frame model) | {value:.2f} | {n} |"
        )
    for transport in ("main", "dedicated"):
        for acked in ("ack", "noack"):
            file_key = f"direct {acked} file {transport}"
            memory_key = f"direct {acked} memory {transport}"
            value, n = _ratio(by_round, (file_key, msgs), (memory_key, msgs))
            ratio_lines.append(
                f"| {acked} {transport}: durable msgs/s ÷ `:memory:` msgs/s | {value:.2f} | {n} |"
            )
    for transport in ("main", "dedicated"):
        for store in ("file", "memory"):
            key = f"direct noack {store} {transport}"
            if key in by_key:
                value = _med(by_key[key], "msgs_per_s") / SEED_BARE_FORWARDER_MSGS_PER_S
                ratio_lines.append(
                    f"| {key}: msgs/s ÷ the seed's bare forwarder (8,800) | {value:.2f} | "
                    f"{len(by_key[key])} |"
                )
    ratio_lines = [line for line in ratio_lines if not line.endswith("| nan | 0 |")]
    if len(ratio_lines) > 4:
        out += [*ratio_lines, ""]

    out += _table(
        "Idle connections",
        ["idle"],
        by_key,
        [
            ("sockets", "opened", 0),
            ("RSS KiB/conn", "rss_kib_per_conn", 1),
            ("connects/s", "connect_per_s", 0),
            ("daemon ms CPU/connect", "daemon_cpu_ms_per_connect", 2),
            ("registrations/s", "register_per_s", 0),
            ("alive after hold", "alive_after_hold", 0),
            ("min protocol pings", "protocol_pings_min", 0),
            ("min JSON pings", "json_pings_min", 0),
            ("idle daemon CPU", "daemon_cpu_util_idle", 2),
            ("stop s", "daemon_stop_s", 2),
        ],
    )
    out += _table(
        "Slow consumer (24 pairs, W = 10, alone; then with a 25th pair sending 200 msgs/s "
        "open-loop to a recipient that stops reading for 12 s)",
        ["slow ack", "slow noack"],
        by_key,
        [
            ("others msgs/s, alone", "baseline.msgs_per_s", 0),
            ("before", "others.before.msgs_per_s", 0),
            ("during", "others.during.msgs_per_s", 0),
            ("after", "others.after.msgs_per_s", 0),
            ("p99 ms alone", "baseline.p99_ms", 1),
            ("p99 ms during", "others.during.p99_ms", 1),
            ("during ÷ alone", "others_during_vs_baseline", 2),
            ("RSS MiB start", "rss_mib_start", 1),
            ("RSS MiB max", "rss_mib_max", 1),
            ("slow: sent", "slow.sent", 0),
            ("slow: lost", "slow.lost", 0),
            ("slow: unfinished", "slow.not_final", 0),
        ],
    )
    out += _table(
        "Drain (1,000 sockets, W = 2, acknowledged, durable), SIGTERM, restart",
        ["drain"],
        by_key,
        [
            ("msgs/s before", "msgs_per_s_before", 0),
            ("in flight", "in_flight_at_sigterm", 0),
            ("exit s", "drain_exit_s", 2),
            ("reconnect s", "reconnect_s", 2),
            ("sent", "sent", 0),
            ("re-sent", "resent_after_restart", 0),
            ("lost", "lost", 0),
            ("unfinished", "not_final", 0),
        ],
    )
    return "\n".join(out)
