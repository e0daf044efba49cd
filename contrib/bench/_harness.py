"""Driving generator processes, and sampling the process under test while they run."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ._proc import REPO, cpu_seconds, machine_jiffies

# Result lines carry every latency sample; allow them to be long.
_LINE_LIMIT = 1 << 28


class WorkerError(RuntimeError):
    pass


class Worker:
    """One generator process (``contrib/bench/_worker.py``)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.ready: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def start(cls, spec: dict[str, Any]) -> Worker:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "contrib.bench._worker",
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            limit=_LINE_LIMIT,
        )
        worker = cls(process)
        await worker.send(spec)
        return worker

    async def send(self, doc: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(doc).encode() + b"\n")
        await self.process.stdin.drain()

    async def event(self, name: str, within: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), within)
        except TimeoutError:
            raise WorkerError(f"generator {self.pid}: no {name!r} within {within:.0f} s") from None
        if not line:
            await self.process.wait()
            raise WorkerError(f"generator {self.pid} exited ({self.process.returncode})")
        doc: dict[str, Any] = json.loads(line)
        if doc.get("event") != name:
            raise WorkerError(f"generator {self.pid}: expected {name!r}, got {doc.get('event')!r}")
        return doc

    def cpu(self) -> float:
        try:
            return cpu_seconds(self.pid)
        except OSError:
            return 0.0

    async def finish(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


async def start_workers(specs: list[dict[str, Any]], within: float) -> list[Worker]:
    workers = [await Worker.start(spec) for spec in specs]
    try:
        readies = await asyncio.gather(*(w.event("ready", within) for w in workers))
    except BaseException:
        await kill_all(workers)
        raise
    for worker, ready in zip(workers, readies, strict=True):
        worker.ready = ready
    return workers


async def kill_all(workers: list[Worker]) -> None:
    for worker in workers:
        if worker.process.returncode is None:
            worker.process.kill()
            await worker.process.wait()


class Sampler:
    """Samples a process's CPU seconds and RSS at given instants and every ``every`` s."""

    def __init__(
        self, cpu: Callable[[], float], rss: Callable[[], int], every: float = 0.5
    ) -> None:
        self._cpu = cpu
        self._rss = rss
        self.every = every
        self.at_bounds: list[dict[str, float]] = []
        self.machine: list[list[int]] = []
        self.series: list[tuple[float, int]] = []
        self.gauges: list[dict[str, float]] = []

    def snapshot(self) -> dict[str, float]:
        try:
            return {"t": time.monotonic(), "cpu": self._cpu(), "rss_kib": self._rss()}
        except OSError:
            return {"t": time.monotonic(), "cpu": float("nan"), "rss_kib": 0}

    async def bounds(self, bounds: list[float]) -> None:
        for bound in bounds:
            await asyncio.sleep(max(0.0, bound - time.monotonic()))
            self.at_bounds.append(self.snapshot())
            self.machine.append(machine_jiffies())

    async def periodic(
        self, start: float, scrape: Callable[[], Awaitable[dict[str, float]]] | None = None
    ) -> None:
        """RSS every ``every`` s; with ``scrape``, the daemon's gauges every other sample."""
        n = 0
        while True:
            snap = self.snapshot()
            t = round(snap["t"] - start, 2)
            self.series.append((t, int(snap["rss_kib"])))
            if scrape is not None and n % 2 == 0:
                gauges = await scrape()
                if gauges:
                    self.gauges.append({"t": t, **gauges})
            n += 1
            await asyncio.sleep(max(0.0, snap["t"] + self.every - time.monotonic()))
