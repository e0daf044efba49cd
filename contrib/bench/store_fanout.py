"""A topic's fan-out in the store: how long one ``Publish`` to N subscribers holds each engine.

    python -m contrib.bench.store_fanout                          # both engines, N = 1,000, 10,000
    python -m contrib.bench.store_fanout --engines redis --subscribers 10000 --rounds 5

Per engine and N: a topic with N subscribers (clients registered and subscribed through the
store), then ``--rounds`` publishes, each one ``execute`` batch holding one ``Publish`` (content
sealed with a store key, as the daemon does), each storing one message and N deliveries.
Reported, medians over the rounds: ``publish_ms``, the batch's wall time as relayd sees it (on
Redis: reserving the message's id, then the script, then reading its answer); on Redis,
``held_ms``, the script's own time on the server (``SLOWLOG``): how long Redis ran nothing else
(and ``held_min_ms``, the least of the rounds: on a shared machine, the least disturbed);
``counts_ms``, reading one message's counts; and ``delete_topic_ms`` (and ``delete_held_ms``),
deleting the topic with its N members once, at the end. One JSON line per engine and N, appended
to contrib/bench/results/results.jsonl (``--results`` elsewhere).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import coredis
import trio

from relayd._engine import TopicRecord
from relayd._redis import RedisStore
from relayd._relay.records import Publish, Published
from relayd._store import ClientRecord, Store

from ._proc import RESULTS, record
from .store_engines import CONTENT, KEYS, RedisServer

ENGINES = ("sqlite", "redis")
OWNER = str(uuid.UUID(int=0))
JOINERS = 8  # concurrent registrations (on Redis, several connections)


@asynccontextmanager
async def opened(engine: str, workdir: Path) -> AsyncIterator[tuple[Any, str | None]]:
    """The engine's empty store, and its Redis URL (``None`` for SQLite)."""
    if engine == "sqlite":
        async with Store.open(str(workdir / "bench.sqlite3"), keys=KEYS) as store:
            yield store, None
        return
    server = RedisServer(workdir)
    try:
        async with RedisStore.open(server.url, keys=KEYS) as redis:
            yield redis, server.url
    finally:
        server.stop()


async def held_ms(url: str | None) -> float | None:
    """The longest command Redis ran since the last call (its slow log, reset), in ms."""
    if url is None:
        return None
    async with coredis.Redis.from_url(url) as client:
        entries = await client.slowlog_get(128)
        await client.slowlog_reset()
    return max((entry.duration for entry in entries), default=0) / 1000


async def measure(engine: str, subscribers: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="relayd-bench-fanout-") as workdir:
        async with opened(engine, Path(workdir)) as (store, url):
            members = [str(uuid.UUID(int=n + 1)) for n in range(subscribers)]
            await store.insert_client(ClientRecord(OWNER, "owner", "x", ("client",), 1.0, 1.0))
            await store.create_topic(TopicRecord("bench", OWNER), max_owned=1)

            async def join(some: list[str]) -> None:
                for member in some:
                    record = ClientRecord(member, member[-6:], "x", ("client",), 1.0, 1.0)
                    await store.insert_client(record)
                    await store.subscribe(
                        "bench", member, 1.0, max_subscribers=subscribers, max_subscriptions=1
                    )

            async with trio.open_nursery() as nursery:
                for n in range(JOINERS):
                    nursery.start_soon(join, members[n::JOINERS])
            if url is not None:
                async with coredis.Redis.from_url(url) as client:
                    await client.config_set({"slowlog-log-slower-than": 0})
            publish_ms, held, counts_ms = [], [], []
            for n in range(rounds):
                await held_ms(url)
                now = time.time()
                op = Publish(None, "bench", OWNER, f"p{n}", False, True, CONTENT, now, now + 3600)
                start = time.perf_counter()
                [outcome] = await store.execute([op], max_queued=1 << 30)
                publish_ms.append((time.perf_counter() - start) * 1000)
                held.append(await held_ms(url))
                assert isinstance(outcome, Published)
                assert outcome.subscribers == subscribers
                start = time.perf_counter()
                await store.topic_counts([outcome.message])
                counts_ms.append((time.perf_counter() - start) * 1000)
            await held_ms(url)
            start = time.perf_counter()
            assert await store.delete_topic("bench")
            delete_ms = (time.perf_counter() - start) * 1000
            delete_held = await held_ms(url)
    return {
        "scenario": "store_fanout",
        "label": f"store_fanout {engine} N={subscribers}",
        "params": {"engine": engine, "subscribers": subscribers, "rounds": rounds},
        "publish_ms": round(statistics.median(publish_ms), 2),
        "held_ms": None if url is None else round(statistics.median(h or 0 for h in held), 2),
        "held_min_ms": None if url is None else round(min(h or 0 for h in held), 2),
        "counts_ms": round(statistics.median(counts_ms), 3),
        "delete_topic_ms": round(delete_ms, 2),
        "delete_held_ms": delete_held,
        "ok": True,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m contrib.bench.store_fanout", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated")
    parser.add_argument("--subscribers", default="1000,10000", help="comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="publishes per engine and N")
    parser.add_argument("--tag", default="", help="free text stored with each row")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where rows are appended")
    args = parser.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {', '.join(ENGINES)}")
    for size in (int(n) for n in args.subscribers.split(",") if n):
        for engine in engines:
            row = trio.run(measure, engine, size, args.rounds)
            row["cpus"] = os.cpu_count()
            if args.tag:
                row["tag"] = args.tag
            record(row, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
