"""Test support: configs, a running daemon, and a small HTTP client.

The HTTP client is built on h11 (already installed with hypercorn) so that tests control the
bytes on the wire: malformed bodies, ``Connection`` headers, raw sockets.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import h11
import trio

from relayd import Addresses, Config, Daemon
from relayd._config import structure
from relayd._store import Executor, thread_executor

# Only for tests; long enough for HS256 (32 bytes minimum).
TEST_SECRET = "test-signing-secret-for-relayd-tests-only-0123456789"
TEST_ENV = {"RELAYD_SECRET": TEST_SECRET}
# I/O in tests never waits longer than this for anything.
IO_DEADLINE = 10.0
# The 13 fields of the seed system's messages (shared/reference/seed-protocol.md), in order:
# what every delivered message carries.
SEED_FIELDS = (
    "to",
    "from",
    "timestamp",
    "priority",
    "subject",
    "msgid",
    "acknowledge",
    "content",
    "action",
    "event",
    "status",
    "conversation_id",
    "msgno",
)


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# Longer than Redis takes to answer on a loaded test machine (see Engine.autojump_threshold).
REDIS_AUTOJUMP_THRESHOLD = 1.0
# The engines a test's relayd runs on: the ``engine`` fixture's parameters (tests/conftest.py).
ENGINE_NAMES = ["sqlite", "redis"]


@attrs.frozen
class Engine:
    """The store engine a test's relayd runs on.

    ``sqlite``: the embedded store, ``:memory:`` unless the test's overrides name a file.
    ``redis``: ``url``, a database of the session's Redis server flushed for this test alone
    (tests/redis_support.py); like a file, it outlives the daemons that use it, so a test that
    restarts relayd finds what the first daemon stored.
    """

    name: Literal["sqlite", "redis"]
    url: str = ""

    @property
    def selected(self) -> dict[str, Any]:
        """The ``[store]`` keys that put relayd on this engine."""
        if self.name == "redis":
            return {"engine": "redis", "url": self.url}
        return {"engine": "sqlite"}

    @property
    def store(self) -> dict[str, Any]:
        """The ``[store]`` section of :func:`make_config`: on SQLite, a volatile store."""
        return self.selected if self.name == "redis" else {**self.selected, "path": ":memory:"}

    @property
    def autojump_threshold(self) -> float:
        """For a daemon under ``autojump_clock``: the real seconds every task must have waited
        before virtual time jumps. On SQLite (called inline) none; on Redis the daemon waits
        for replies on a socket, and a jump then would time them out."""
        return REDIS_AUTOJUMP_THRESHOLD if self.name == "redis" else 0.0

    @property
    def toml(self) -> str:
        """The keys that select this engine, as lines of a ``[store]`` section."""
        return "".join(f"{key} = {json.dumps(value)}\n" for key, value in self.selected.items())


SQLITE = Engine("sqlite")


def make_config(
    tmp_path: Path, overrides: Mapping[str, Any] | None = None, engine: Engine = SQLITE
) -> Config:
    """A config for tests: a free loopback port, a store on ``engine`` (on SQLite, a volatile
    one), a cheap KDF."""
    base: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "http": {"listen": "127.0.0.1:0"},
        "store": engine.store,
        "auth": {"kdf_cost": 1024},
    }
    return structure(_merge(base, overrides or {}), "<test config>")


@attrs.frozen
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error_code(self) -> str:
        code: str = self.json()["error"]["code"]
        return code


class HttpClient:
    """One request per connection, ``Connection: close``, bounded by ``IO_DEADLINE``."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        token: str | None = None,
    ) -> HttpResponse:
        all_headers = {"Host": f"{self.host}:{self.port}", "Connection": "close"}
        if json_body is not None:
            body = json.dumps(json_body).encode()
            all_headers["Content-Type"] = "application/json"
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        all_headers.update(headers or {})
        if body is not None:
            all_headers["Content-Length"] = str(len(body))
        with trio.fail_after(IO_DEADLINE):
            stream = await trio.open_tcp_stream(self.host, self.port)
            async with stream:
                return await _exchange(stream, method, path, all_headers, body)

    async def get(self, path: str, **kwargs: Any) -> HttpResponse:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, json_body: Any = None, **kwargs: Any) -> HttpResponse:
        return await self.request("POST", path, json_body=json_body, **kwargs)

    async def put(self, path: str, json_body: Any = None, **kwargs: Any) -> HttpResponse:
        return await self.request("PUT", path, json_body=json_body, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> HttpResponse:
        return await self.request("DELETE", path, **kwargs)

    async def register(self, name: str = "alice", uuid: str | None = None) -> dict[str, Any]:
        """Register a client and return the 200 body (fails the test on any other status)."""
        body: dict[str, Any] = {"name": name}
        if uuid is not None:
            body["uuid"] = uuid
        response = await self.post("/register", body)
        assert response.status == 200, response
        doc: dict[str, Any] = response.json()
        return doc


async def _exchange(
    stream: trio.abc.Stream,
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes | None,
) -> HttpResponse:
    conn = h11.Connection(our_role=h11.CLIENT)
    data = conn.send(h11.Request(method=method, target=path, headers=list(headers.items())))
    if body:
        data += conn.send(h11.Data(data=body))
    data += conn.send(h11.EndOfMessage())
    # The server may answer (413) and close before reading everything.
    with contextlib.suppress(trio.BrokenResourceError):
        await stream.send_all(data)
    status = 0
    response_headers: dict[str, str] = {}
    chunks: list[bytes] = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Response):
            status = event.status_code
            response_headers = {k.decode().lower(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    return HttpResponse(status, response_headers, b"".join(chunks))


@attrs.define
class RunningRelayd:
    daemon: Daemon
    addresses: Addresses

    @property
    def http(self) -> HttpClient:
        return HttpClient(*self.addresses.http)


async def start_relayd(
    nursery: trio.Nursery,
    config: Config,
    *,
    environ: Mapping[str, str] = TEST_ENV,
    store_executor: Executor = thread_executor,
) -> RunningRelayd:
    """Start the daemon in ``nursery`` and return once it is ready."""
    daemon = Daemon(config, environ=environ, store_executor=store_executor)
    addresses: Addresses = await nursery.start(daemon.run)
    return RunningRelayd(daemon, addresses)


# The two listeners a WebSocket session may use: the REST port, or the dedicated listener.
TRANSPORTS = ["main", "dedicated"]


async def start_on(
    nursery: trio.Nursery, tmp_path: Path, transport: str, engine: Engine = SQLITE
) -> RunningRelayd:
    """relayd on ``engine`` with its WebSockets on ``transport`` (one of ``TRANSPORTS``)."""
    overrides: dict[str, Any] = {}
    if transport == "dedicated":
        overrides["websocket"] = {"listen": "127.0.0.1:0"}
    return await start_relayd(nursery, make_config(tmp_path, overrides, engine))
