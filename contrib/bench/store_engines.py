"""The store engines side by side: ``execute`` batches of relayd-shaped operations.

    python -m contrib.bench.store_engines                       # every engine, batches 1, 16, 64
    python -m contrib.bench.store_engines --engines redis --batches 64 --seconds 5

A *cycle* of B messages is one ``execute`` batch, as the relay's group commit makes them: B
``Insert`` (content sealed with a store key, as the daemon does), the ``LoadQueue`` that pages
them in, a ``SetAttempts`` and a ``Finish`` for each; every 50 cycles a ``Purge`` keeps the
store small. Each engine runs cycles for ``--seconds`` after ``--warmup``, and reports per
message: the benchmark process's CPU (``client_cpu_us_per_msg``: the store's Python side,
coredis or SQLite included, its worker thread too), Redis's CPU (``server_cpu_us_per_msg``,
from ``/proc``) and messages per second of wall time.

Engines: ``sqlite`` (a file, ``synchronous = full``: a commit is an fsync), ``sqlite-memory``
(``:memory:``, no disk), ``redis`` (a redis-server of its own, no persistence) and
``redis-aof`` (``appendonly yes``, ``appendfsync always``: an answer is an fsync). Redis runs
on this machine, over loopback. One JSON line per engine and batch size, appended to
contrib/bench/results/results.jsonl (``--results`` elsewhere).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from relayd._atrest import StoreKeys
from relayd._redis import RedisStore
from relayd._relay.records import (
    Finish,
    Insert,
    LoadQueue,
    Purge,
    SetAttempts,
    Status,
    StoreOp,
)
from relayd._store import ClientRecord, Store

from ._proc import RESULTS, cpu_seconds, record

ENGINES = ("sqlite", "sqlite-memory", "redis", "redis-aof")
SENDER = "0b6f3b0e-1c1e-4c39-9a59-3f0f8f0c0a01"
RECIPIENT = "0b6f3b0e-1c1e-4c39-9a59-3f0f8f0c0a02"
CONTENT = '{"content": "' + "x" * 256 + '"}'  # the harness's 256-character messages
KEYS = StoreKeys.from_bytes([("bench", bytes(range(32)))], "<bench keys>")
PURGE_EVERY = 50
READY_LINE = b"Ready to accept connections"


def cycle(first: int, size: int, now: float) -> list[StoreOp]:
    """B messages accepted, paged in, counted and acknowledged: one batch."""
    seqs = range(first, first + size)
    return [
        *(
            Insert(None, seq, SENDER, RECIPIENT, f"m{seq}", False, True, CONTENT, now, now + 3600)
            for seq in seqs
        ),
        LoadQueue(RECIPIENT, first - 1, size, 1 << 20),
        *(SetAttempts(seq, 1) for seq in seqs),
        *(Finish(seq, Status.ACKNOWLEDGED, now, receipt_pending=False) for seq in seqs),
    ]


class RedisServer:
    """A redis-server (or valkey-server) of the benchmark's own, on a free loopback port."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        binary = shutil.which("redis-server") or shutil.which("valkey-server")
        if binary is None:
            raise SystemExit("store_engines: the redis engines need redis-server (or valkey)")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        argv = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(data_dir)]
        argv += ["--save", "", "--protected-mode", "no", *extra]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if READY_LINE in line:
                break
        else:
            raise SystemExit(f"store_engines: {binary} exited before it was ready")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(20)
        assert self.process.stdout is not None
        self.process.stdout.close()


@asynccontextmanager
async def opened(engine: str, workdir: Path) -> AsyncIterator[tuple[Any, Callable[[], float]]]:
    """The engine's store (empty, two clients) and a function that reads its server's CPU
    seconds (0 for SQLite, which has none)."""
    server: RedisServer | None = None
    if engine.startswith("redis"):
        extra = ("--appendonly", "yes", "--appendfsync", "always") if engine == "redis-aof" else ()
        server = RedisServer(workdir, *extra)
    try:
        store: Any
        if server is not None:
            async with RedisStore.open(server.url, keys=KEYS) as store:
                await _clients(store)
                pid = server.process.pid
                yield store, lambda: cpu_seconds(pid)
        else:
            path = ":memory:" if engine == "sqlite-memory" else str(workdir / "bench.sqlite3")
            async with Store.open(path, keys=KEYS) as store:
                await _clients(store)
                yield store, lambda: 0.0
    finally:
        if server is not None:
            server.stop()


async def _clients(store: Any) -> None:
    for uuid in (SENDER, RECIPIENT):
        await store.insert_client(ClientRecord(uuid, uuid[-4:], "x", ("client",), 1.0, 1.0))


async def measure(engine: str, size: int, seconds: float, warmup: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="relayd-bench-store-") as workdir:
        async with opened(engine, Path(workdir)) as (store, server_cpu):
            seq = 1
            cycles = 0

            async def run_cycles(until: float) -> None:
                nonlocal seq, cycles
                while time.monotonic() < until:
                    now = time.time()
                    await store.execute(cycle(seq, size, now), max_queued=1 << 30)
                    seq += size
                    cycles += 1
                    if cycles % PURGE_EVERY == 0:
                        await store.execute([Purge(now, now)], max_queued=1 << 30)

            await run_cycles(time.monotonic() + warmup)
            first_seq, cycles = seq, 0
            cpu0, server0, wall0 = time.process_time(), server_cpu(), time.monotonic()
            await run_cycles(wall0 + seconds)
            cpu, server, wall = (
                time.process_time() - cpu0,
                server_cpu() - server0,
                time.monotonic() - wall0,
            )
    messages = seq - first_seq
    return {
        "scenario": "store_engines",
        "label": f"store_engines {engine} B={size}",
        "params": {"engine": engine, "batch": size, "seconds": seconds, "warmup": warmup},
        "messages": messages,
        "batches": cycles,
        "msgs_per_s": round(messages / wall, 1),
        "client_cpu_us_per_msg": round(cpu / messages * 1e6, 1),
        "server_cpu_us_per_msg": round(server / messages * 1e6, 1) if server else None,
        "ms_per_batch": round(wall / cycles * 1e3, 3),
        "ok": messages > 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m contrib.bench.store_engines", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated")
    parser.add_argument("--batches", default="1,16,64", help="messages per batch, comma-separated")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured, per run")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--tag", default="", help="free text stored with each row")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where rows are appended")
    args = parser.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {', '.join(ENGINES)}")
    ok = True
    for size in (int(b) for b in args.batches.split(",") if b):
        for engine in engines:
            row = trio.run(measure, engine, size, args.seconds, args.warmup)
            row["cpus"] = os.cpu_count()
            if args.tag:
                row["tag"] = args.tag
            record(row, args.results)
            ok = ok and bool(row["ok"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
