"""Registering benchmark clients over relayd's REST API (``POST /register``).

A minimal HTTP/1.1 client on asyncio streams, keep-alive, a few connections in parallel:
registering 10,000 clients one request at a time is what the idle scenario needs, and the
standard library has no asyncio HTTP client.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Credentials:
    """A registered client: what a generator needs to open its socket."""

    uuid: str
    token: str

    def to_json(self) -> list[str]:
        return [self.uuid, self.token]

    @classmethod
    def from_json(cls, doc: list[str]) -> Credentials:
        return cls(doc[0], doc[1])


class HttpError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class _Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, Any]:
        """One request; the answer's status and body (parsed as JSON when it is JSON)."""
        payload = json.dumps(body).encode() if body is not None else b""
        kind = "Content-Type: application/json\r\n" if body is not None else ""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"{kind}Content-Length: {len(payload)}\r\n\r\n"
        ).encode()
        for attempt in range(2):
            if self._streams is None:
                self._streams = await asyncio.open_connection(self.host, self.port)
            reader, writer = self._streams
            try:
                writer.write(head + payload)
                await writer.drain()
                return await _read_response(reader)
            except (ConnectionError, asyncio.IncompleteReadError):
                # The server closed an idle keep-alive connection: reconnect once.
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, Any]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(chunk[:-2])
        body = b"".join(parts)
    else:
        body = await reader.read()
    if headers.get("content-type", "").startswith("application/json"):
        return status, json.loads(body) if body else None
    return status, body.decode("utf-8", "replace")


async def register_many(
    http_url: str, count: int, *, prefix: str = "bench", concurrency: int = 8
) -> tuple[list[Credentials], float]:
    """Register ``count`` clients; return their credentials (in order) and the seconds taken."""
    parts = urlsplit(http_url)
    results: list[Credentials | None] = [None] * count
    next_index = 0
    started = time.monotonic()

    async def worker() -> None:
        nonlocal next_index
        conn = _Connection(parts.hostname or "127.0.0.1", parts.port or 80)
        try:
            while next_index < count:
                i = next_index
                next_index += 1
                while True:
                    # A uuid of our own: the seed's first version requires one.
                    body = {"name": f"{prefix}-{i}", "uuid": str(uuid.uuid4())}
                    status, doc = await conn.request("POST", "/register", body)
                    if status == 429:  # should not happen with the bench settings
                        await asyncio.sleep(float(doc["error"]["details"].get("retry_after", 1)))
                        continue
                    if status != 200:
                        raise HttpError(status, doc)
                    break
                # The seed's first version answers "token".
                results[i] = Credentials(doc["uuid"], doc.get("access_token") or doc["token"])
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
    done = [c for c in results if c is not None]
    assert len(done) == count
    return done, time.monotonic() - started


async def call_all(
    http_url: str,
    calls: list[tuple[str, str, dict[str, Any] | None]],
    *,
    concurrency: int = 8,
) -> list[tuple[int, Any]]:
    """Make each ``(method, path, body)`` request, on ``concurrency`` keep-alive connections
    in parallel; the answers (status, body) in the calls' order. The topics' routes take the
    token as ``?token=`` in the path, so a call needs no header of its own."""
    parts = urlsplit(http_url)
    answers: list[tuple[int, Any] | None] = [None] * len(calls)
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        conn = _Connection(parts.hostname or "127.0.0.1", parts.port or 80)
        try:
            while next_index < len(calls):
                i = next_index
                next_index += 1
                answers[i] = await conn.request(*calls[i])
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(calls)))))
    return [a for a in answers if a is not None]


class MetricsScraper:
    """Reads a few gauges from relayd's ``GET /metrics`` (Prometheus text), best effort: a
    relayd without the route, or an answer that does not parse, gives an empty dict."""

    WANTED: tuple[str, ...] = (
        "relayd_pending_commit",
        "relayd_store_queue",
        "relayd_queued_messages",
        "relayd_connections",
    )

    def __init__(self, http_url: str) -> None:
        parts = urlsplit(http_url)
        self._conn = _Connection(parts.hostname or "127.0.0.1", parts.port or 80)

    async def scrape(self) -> dict[str, float]:
        try:
            status, text = await asyncio.wait_for(self._conn.request("GET", "/metrics"), 5)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            return {}
        if status != 200 or not isinstance(text, str):
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(self.WANTED):
                name, _, value = line.rpartition(" ")
                try:
                    out[name.replace("relayd_", "")] = float(value)
                except ValueError:
                    continue
        return out

    def close(self) -> None:
        self._conn.close()
