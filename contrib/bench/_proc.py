"""Process measurements from ``/proc`` (Linux), and where results go.

No psutil: CPU seconds come from ``/proc/<pid>/stat`` (utime + stime, every thread of the
process), resident memory from ``VmRSS`` in ``/proc/<pid>/status``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from pathlib import Path
from typing import Any

_CLK_TCK = os.sysconf("SC_CLK_TCK")

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent.parent
RESULTS = BENCH_DIR / "results" / "results.jsonl"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat") as fh:
        stat = fh.read()
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants that are alive (``/proc/<pid>/task/*/children``)."""
    found = [pid]
    for current in found:
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as fh:
                    found += [int(child) for child in fh.read().split()]
            except FileNotFoundError:
                continue
    return found


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (``VmRSS``)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def git_revision() -> str:
    """``git describe --always --dirty`` of the checkout (the daemon under test)."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def record(row: dict[str, Any], path: Path = RESULTS) -> None:
    """Print ``row`` as one JSON line and append it to the results file."""
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "git": git_revision(), **row}
    line = json.dumps(row, separators=(",", ":"))
    print(line, flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(line + "\n")


def machine_jiffies() -> list[int]:
    """The machine's CPU time so far, all cores: user, nice, system, idle, iowait, irq,
    softirq, steal (``/proc/stat``)."""
    with open("/proc/stat") as fh:
        fields = fh.readline().split()
    return [int(v) for v in fields[1:9]]


def machine_usage(before: list[int], after: list[int]) -> dict[str, float]:
    """Fractions of the machine's CPU time (all cores) between two samples."""
    delta = [a - b for a, b in zip(after, before, strict=True)]
    total = sum(delta) or 1
    return {
        "busy": round(1 - (delta[3] + delta[4]) / total, 3),
        "steal": round(delta[7] / total, 3),
    }


def other_cores(machine: dict[str, float], *measured: float) -> float:
    """Cores' worth of CPU that neither the measured processes nor the idle loop account for:
    other work on the machine (and the kernel's share). Above ~0.3 a run was disturbed."""
    cores = os.cpu_count() or 1
    return round(machine["busy"] * cores - sum(measured), 2)
