"""Sending over REST beside sending over a socket (issue 14): messages per second accepted by
one relayd, each path on its own, on each engine.

    python -m contrib.bench.rest_send                               # sqlite and redis, 10 s each
    python -m contrib.bench.rest_send --engines sqlite --seconds 5 --senders 16

For each engine a fresh relayd (``relayd serve``, the bench settings, ``synchronous = full``
SQLite or a Redis with ``appendfsync always``) gets ``--senders`` clients, each sending to a
recipient of its own that stays offline (so every message is stored, ``acknowledge: true``,
256 characters of content), for ``--seconds``:

* ``ws``: each sender on its socket (the REST port's ``/ws``), ``--window`` messages
  outstanding, the next sent as each ``delivery_status`` comes;
* ``rest``: each sender ``POST /messages`` on a keep-alive connection of its own, one request
  at a time (a device or a script: it waits for the answer, ``202 queued_offline``).

One JSON line per engine and path is appended to contrib/bench/results/results.jsonl
(``--results`` elsewhere): messages per second, the daemon's CPU (cores) and CPU per message,
and the first receipt's latency (median and p99, ms). The generator is one asyncio process
(the ``websockets`` client), so on a 2-core machine it shares the cores with relayd, as in
every scenario here: compare the two paths, not the absolute numbers with other machines'.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import websockets

from ._proc import RESULTS, cpu_seconds, record
from ._rest import Credentials, HttpError, register_many
from ._servers import Relayd, relay_settings

CONTENT = "x" * 256


async def _post(
    streams: tuple[asyncio.StreamReader, asyncio.StreamWriter], host: str, token: str, body: bytes
) -> tuple[int, dict[str, Any]]:
    reader, writer = streams
    writer.write(
        (
            f"POST /messages HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
    )
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length"))
    doc: dict[str, Any] = json.loads(await reader.readexactly(length))
    return int(lines[0].split()[1]), doc


async def rest_sender(
    http_url: str, sender: Credentials, to: str, until: float, latencies: list[float]
) -> int:
    parts = urlsplit(http_url)
    host = f"{parts.hostname}:{parts.port}"
    streams = await asyncio.open_connection(parts.hostname, parts.port)
    sent = 0
    try:
        while time.monotonic() < until:
            body = json.dumps({"to": to, "acknowledge": True, "content": CONTENT}).encode()
            started = time.monotonic()
            status, doc = await _post(streams, host, sender.token, body)
            if status != 202 or doc["status"] != "queued_offline":
                raise HttpError(status, doc)
            latencies.append(time.monotonic() - started)
            sent += 1
    finally:
        streams[1].close()
    return sent


async def ws_sender(
    ws_url: str, sender: Credentials, to: str, until: float, window: int, latencies: list[float]
) -> int:
    headers = {"Authorization": f"Bearer {sender.token}"}
    async with websockets.connect(ws_url, additional_headers=headers) as socket:
        welcome = json.loads(await socket.recv())
        assert welcome["type"] == "connection", welcome
        sent_at: dict[str, float] = {}
        answered = 0
        n = 0

        async def send_one() -> None:
            nonlocal n
            n += 1
            msgid = f"m{n}"
            sent_at[msgid] = time.monotonic()
            frame = {"to": to, "msgid": msgid, "acknowledge": True, "content": CONTENT}
            await socket.send(json.dumps(frame))

        for _ in range(window):
            await send_one()
        while sent_at:
            frame = json.loads(await socket.recv())
            if frame.get("type") != "delivery_status":
                continue
            if frame["status"] != "queued_offline":
                raise RuntimeError(f"unexpected receipt: {frame}")
            latencies.append(time.monotonic() - sent_at.pop(frame["msgid"]))
            answered += 1
            if time.monotonic() < until:
                await send_one()
        return answered


async def run_path(
    relayd: Relayd, path: str, pairs: list[tuple[Credentials, str]], args: argparse.Namespace
) -> dict[str, Any]:
    latencies: list[float] = []
    cpu0 = cpu_seconds(relayd.pid)
    started = time.monotonic()
    until = started + args.seconds
    if path == "rest":
        jobs = [rest_sender(relayd.http_url, s, to, until, latencies) for s, to in pairs]
    else:
        jobs = [
            ws_sender(relayd.main_ws_url, s, to, until, args.window, latencies) for s, to in pairs
        ]
    counts = await asyncio.gather(*jobs)
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(relayd.pid) - cpu0
    total = sum(counts)
    latencies.sort()
    return {
        "messages": total,
        "seconds": round(elapsed, 3),
        "msgs_per_s": round(total / elapsed, 1),
        "daemon_cpu_util": round(cpu / elapsed, 3),
        "daemon_cpu_us_per_msg": round(cpu / total * 1e6, 1) if total else None,
        "receipt_ms_p50": round(statistics.median(latencies) * 1000, 2),
        "receipt_ms_p99": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
    }


async def bench_engine(engine: str, args: argparse.Namespace) -> None:
    store = "redis" if engine == "redis" else "file"
    relayd = await Relayd.start(relay_settings(store=store))
    try:
        clients, _ = await register_many(relayd.http_url, 2 * args.senders)
        senders, recipients = clients[: args.senders], clients[args.senders :]
        pairs = [(s, r.uuid) for s, r in zip(senders, recipients, strict=True)]
        for path in args.paths.split(","):
            row = await run_path(relayd, path, pairs, args)
            record(
                {
                    "scenario": "rest_send",
                    "engine": engine,
                    "path": path,
                    "senders": args.senders,
                    "window": args.window if path == "ws" else 1,
                    **row,
                },
                args.results,
            )
        await relayd.stop()
    finally:
        await relayd.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="sqlite,redis")
    parser.add_argument("--paths", default="ws,rest")
    parser.add_argument("--senders", type=int, default=32)
    parser.add_argument("--window", type=int, default=1, help="ws: messages outstanding")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for engine in args.engines.split(","):
        asyncio.run(bench_engine(engine, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
