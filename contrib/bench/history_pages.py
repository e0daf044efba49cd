"""What a page of history costs when the history is big: ``RedisStore.history`` (or SQLite's)
on one client's N messages with 10 peers.

    python -m contrib.bench.history_pages                         # redis, 100,000 messages
    python -m contrib.bench.history_pages --engines redis,sqlite --messages 20000

The store is filled with ``--messages`` messages of one client (half sent, half received,
round-robin over ``--peers`` peers, both ways with each; each pair's messages in one
conversation), every one final with its content kept (256 characters, sealed with a store key,
as the daemon does), in batches of 1,000. Then each query below is asked ``--pages`` times, a
page of ``--limit`` at a cursor drawn at random over the whole history (a page deep in it costs
what the first does, if the indexes do their work): ``all`` (both boxes, newest first),
``peer`` (with one peer), ``inbox peer`` (what one peer sent it), ``conversation`` (one
conversation), ``oldest`` (both boxes, oldest first). One JSON line per engine and query is
appended to contrib/bench/results/results.jsonl (``--results`` elsewhere): the median, p99 and
max of a page's wall time in ms (the round trip, the script or the SQL, decrypting the page)
and, on Redis, the server's own CPU per page.

With ``--load``, the pages are asked while another task runs the relay's own store traffic as
fast as the store takes it (batches of 64 messages accepted, loaded, counted and acknowledged
between two other clients, as the group commit writes them, and a purge every 50 batches):
the row says how many messages a second that load moved meanwhile. Each row also gives the
store's size per 1,000 messages kept: the SQLite file (WAL checkpointed), or Redis's
``used_memory``, grown by the fill.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from relayd._engine import HistoryQuery
from relayd._relay.records import Finish, Insert, Purge, Status, StoreOp
from relayd._store import ClientRecord

from ._proc import RESULTS, record
from .store_engines import CONTENT, PURGE_EVERY, cycle, opened

ENGINES = ("redis", "sqlite")
CLIENT = "0b6f3b0e-1c1e-4c39-9a59-3f0f8f0c0a01"
BATCH = 1000


def peer(n: int) -> str:
    return f"0b6f3b0e-1c1e-4c39-9a59-3f0f8f0c{n + 0xB00:04x}"


def fill_batch(first: int, size: int, peers: int) -> list[StoreOp]:
    """Messages ``first``.. of the client, half to and half from its peers, each pair's in
    its conversation, finished with their content kept."""
    ops: list[StoreOp] = []
    at = time.time()
    for seq in range(first, first + size):
        other = peer(seq % peers)
        sender, recipient = (CLIENT, other) if (seq // peers) % 2 else (other, CLIENT)
        ops.append(
            Insert(
                None,
                seq,
                sender,
                recipient,
                f"m{seq}",
                False,
                True,
                CONTENT,
                at,
                at + 1e9,
                conversation_id=f"c-{other}",
            )
        )
    ops += [
        Finish(seq, Status.ACKNOWLEDGED, at, False, keep_content=True)
        for seq in range(first, first + size)
    ]
    return ops


LOAD_BATCH = 64


async def size_of(store: Any, engine: str, workdir: Path) -> int:
    """Bytes the store takes now: the SQLite file (its WAL checkpointed), or Redis's
    ``used_memory``."""
    if engine.startswith("redis"):
        info = await store._link.command("info", lambda client: client.info("memory"))
        return int(info["used_memory"])
    # Checkpointed first: the WAL's frames are copies of pages the file will hold.
    await store._run(lambda db: db.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
    files = await trio.to_thread.run_sync(lambda: list(workdir.glob("bench.sqlite3*")))
    return sum([(await trio.Path(path).stat()).st_size for path in files])


def queries(cursor: int, limit: int) -> dict[str, HistoryQuery]:
    other = peer(3)
    return {
        "all": HistoryQuery(CLIENT, cursor=cursor, limit=limit),
        "peer": HistoryQuery(CLIENT, peer=other, cursor=cursor, limit=limit),
        "inbox peer": HistoryQuery(CLIENT, box="inbox", peer=other, cursor=cursor, limit=limit),
        "conversation": HistoryQuery(
            CLIENT, conversation_id=f"c-{other}", cursor=cursor, limit=limit
        ),
        "oldest": HistoryQuery(CLIENT, newest_first=False, cursor=cursor, limit=limit),
    }


async def measure(engine: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="relayd-bench-history-") as workdir:
        async with opened(engine, Path(workdir)) as (store, server_cpu):
            for n in range(args.peers):
                other = peer(n)
                await store.insert_client(
                    ClientRecord(other, other[-4:], "x", ("client",), 1.0, 1.0)
                )
            empty = await size_of(store, engine, Path(workdir))
            filled = time.monotonic()
            for first in range(1, args.messages + 1, BATCH):
                size = min(BATCH, args.messages + 1 - first)
                await store.execute(fill_batch(first, size, args.peers), max_queued=1 << 30)
            filled = time.monotonic() - filled
            per_thousand = (await size_of(store, engine, Path(workdir)) - empty) / (
                args.messages / 1000
            )
            draw = random.Random(args.seed)
            times: dict[str, list[float]] = {}
            server: dict[str, float] = {}
            loaded = 0
            async with trio.open_nursery() as nursery:
                if args.load:

                    async def load() -> None:
                        nonlocal loaded
                        seq = args.messages + 1
                        while True:
                            now = time.time()
                            await store.execute(cycle(seq, LOAD_BATCH, now), max_queued=1 << 30)
                            seq += LOAD_BATCH
                            loaded += LOAD_BATCH
                            if loaded % (LOAD_BATCH * PURGE_EVERY) == 0:
                                # A day's retention: what the fill kept stays, as on a relay
                                # keeping history (its purge finds nothing to do yet).
                                horizon = now - 86_400
                                await store.execute([Purge(horizon, horizon)], max_queued=1 << 30)

                    nursery.start_soon(load)
                began = time.monotonic()
                for _ in range(args.pages):
                    # Far enough from either end for a full page of one side with one peer.
                    margin = args.limit * args.peers * 4
                    cursor = draw.randrange(margin, args.messages - margin)
                    for name, query in queries(cursor, args.limit).items():
                        cpu, start = server_cpu(), time.perf_counter()
                        page = await store.history(query)
                        times.setdefault(name, []).append(time.perf_counter() - start)
                        server[name] = server.get(name, 0.0) + server_cpu() - cpu
                        assert len(page) == args.limit, (name, cursor, len(page))
                load_rate = loaded / (time.monotonic() - began)
                nursery.cancel_scope.cancel()
    for name, spent in times.items():
        ms = sorted(t * 1e3 for t in spent)
        rows.append(
            {
                "scenario": "history_pages",
                "label": f"history_pages {engine} {name}",
                "params": {
                    "engine": engine,
                    "query": name,
                    "messages": args.messages,
                    "peers": args.peers,
                    "limit": args.limit,
                    "pages": args.pages,
                    "load": args.load,
                },
                "fill_s": round(filled, 1),
                "bytes_per_1000_messages": round(per_thousand),
                "load_msgs_per_s": round(load_rate) if args.load else None,
                "median_ms": round(statistics.median(ms), 3),
                "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3),
                "max_ms": round(ms[-1], 3),
                # Redis's CPU (its /proc ticks: 10 ms apiece, hence the many pages).
                "server_cpu_us_per_page": round(server[name] / len(ms) * 1e6, 1)
                if engine == "redis"
                else None,
                "ok": True,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m contrib.bench.history_pages", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--engines", default="redis", help="comma-separated: redis, sqlite")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--peers", type=int, default=10)
    parser.add_argument("--limit", type=int, default=50, help="entries per page")
    parser.add_argument("--pages", type=int, default=200, help="pages asked, per query")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument(
        "--load", action="store_true", help="ask the pages under the relay's store traffic"
    )
    parser.add_argument("--tag", default="", help="free text stored with each row")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where rows are appended")
    args = parser.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {', '.join(ENGINES)}")
    for engine in engines:
        for row in trio.run(measure, engine, args):
            row["cpus"] = os.cpu_count()
            if args.tag:
                row["tag"] = args.tag
            record(row, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
