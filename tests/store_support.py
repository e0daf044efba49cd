"""The store's tests run on every engine: the ``target`` fixture names one, and opens it.

Parameters: ``sqlite-memory`` (``:memory:``, the inline executor), ``sqlite-file`` (a file, the
thread executor), ``sqlite-encrypted`` (the same with store keys), ``redis`` and
``redis-encrypted`` (a flushed database of the session's Redis server, see
``tests/redis_support.py``). A test that needs what only one engine has reads
:attr:`Target.engine`, or asks for its own store.

The helpers at the end read and alter what an engine stores, the way only a test should: to
check what is at rest, or to tamper with it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import attrs
import coredis
import pytest
import trio

from relayd._atrest import StoreKeys
from relayd._redis import LAYOUT_VERSION, RedisStore
from relayd._schema import SCHEMA_VERSION
from relayd._store import Executor, Store, inline_executor, thread_executor

AnyStore = Store | RedisStore
KEY_1 = bytes(range(32))
TEST_KEYS = StoreKeys.from_bytes([("k1", KEY_1)], "<test keys>")
_UNSET: Any = object()


@attrs.frozen
class Target:
    """Where and how a test opens its store (again and again: the data stays)."""

    engine: Literal["sqlite", "redis"]
    location: str  # a path, ":memory:", or a Redis URL
    executor: Executor = thread_executor
    keys: StoreKeys | None = None

    @asynccontextmanager
    async def open(self, *, keys: StoreKeys | None = _UNSET) -> AsyncIterator[AnyStore]:
        """Open the store, with the target's keys unless ``keys`` says otherwise."""
        keys = self.keys if keys is _UNSET else keys
        if self.engine == "redis":
            async with RedisStore.open(self.location, keys=keys) as redis:
                yield redis
        else:
            async with Store.open(self.location, executor=self.executor, keys=keys) as sqlite:
                yield sqlite

    @property
    def schema_version(self) -> int:
        """What ``schema_version()`` answers on this engine."""
        return LAYOUT_VERSION if self.engine == "redis" else SCHEMA_VERSION

    @property
    def persistent(self) -> bool:
        return self.location != ":memory:"


ENGINES = ["sqlite-memory", "sqlite-file", "sqlite-encrypted", "redis", "redis-encrypted"]


def _target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    param: str = request.param
    keys = TEST_KEYS if param.endswith("-encrypted") else None
    if param.startswith("redis"):
        url: str = request.getfixturevalue("redis_url")  # only the Redis targets need Redis
        return Target("redis", url, keys=keys)
    if param == "sqlite-memory":
        return Target("sqlite", ":memory:", inline_executor)
    return Target("sqlite", str(tmp_path / "relayd.sqlite3"), thread_executor, keys)


@pytest.fixture(params=ENGINES)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    """A store on each engine (see the module's docstring)."""
    return _target(request, tmp_path)


@pytest.fixture(params=[engine for engine in ENGINES if engine != "sqlite-memory"])
def persistent_target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    """A store on each engine whose data outlives closing it (not ``:memory:``)."""
    return _target(request, tmp_path)


@pytest.fixture(params=["sqlite-file", "redis"])
def engine_target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    """One persistent store per engine, opened without store keys unless a test gives some."""
    return _target(request, tmp_path)


# --- what is at rest ----------------------------------------------------------------------------


async def redis_dump(url: str) -> dict[bytes, Any]:
    """Every key of the URL's database and its value, as Redis holds it (SCAN, then one read
    per key by its type)."""
    dump: dict[bytes, Any] = {}
    async with coredis.Redis.from_url(url) as client:
        async for key in client.scan_iter(count=1000):
            kind = await client.type(key)
            if kind == b"string":
                dump[key] = await client.get(key)
            elif kind == b"hash":
                dump[key] = await client.hgetall(key)
            elif kind == b"set":
                dump[key] = await client.smembers(key)
            elif kind == b"zset":
                dump[key] = await client.zrange(key, 0, -1, withscores=True)
            else:
                dump[key] = kind  # the store never makes one: a test will say so
    return dump


def holds(value: Any, needle: bytes) -> bool:
    """Whether ``needle`` is anywhere in a value of :func:`redis_dump`."""
    if isinstance(value, bytes):
        return needle in value
    if isinstance(value, dict):
        return any(holds(k, needle) or holds(v, needle) for k, v in value.items())
    if isinstance(value, list | tuple | set):
        return any(holds(item, needle) for item in value)
    return needle in str(value).encode()


def files_holding(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


async def at_rest_holding(target: Target, needle: bytes) -> list[str]:
    """Where ``needle`` is at rest: the SQLite files (database, WAL, journal) or the Redis
    keys (names and values) that hold it."""
    if target.engine == "sqlite":
        found = await trio.to_thread.run_sync(files_holding, Path(target.location).parent, needle)
        return [str(path) for path in found]
    dump = await redis_dump(target.location)
    return [repr(key) for key, value in dump.items() if holds(key, needle) or holds(value, needle)]


async def stored_messages(target: Target) -> list[tuple[int, str | None, bytes]]:
    """``(seq, key_id, fields)`` of every stored message, as the engine keeps them."""
    if target.engine == "sqlite":
        db = sqlite3.connect(target.location)
        try:
            rows = db.execute("SELECT id, key_id, fields FROM messages ORDER BY id").fetchall()
        finally:
            db.close()
        return [
            (seq, key_id, fields if isinstance(fields, bytes) else fields.encode())
            for seq, key_id, fields in rows
        ]
    dump = await redis_dump(target.location)
    found = []
    for key, value in dump.items():
        if key.startswith(b"relayd:m:"):
            key_id = value.get(b"k")
            found.append((int(key[len(b"relayd:m:") :]), key_id and key_id.decode(), value[b"f"]))
    return sorted(found)


async def point_message_at(
    target: Target, seq: int, recipient: str, *, address: bool = False
) -> None:
    """Tamper with a stored message: make ``recipient`` its recipient, as one who can write the
    store but holds no key could. On Redis, the delivery ``seq`` is moved to ``recipient``'s
    queue; with ``address``, its message's address is changed too."""
    if target.engine == "sqlite":
        db = sqlite3.connect(target.location)
        with db:
            db.execute("UPDATE deliveries SET recipient = ? WHERE seq = ?", (recipient, seq))
        db.close()
        return
    async with coredis.Redis.from_url(target.location) as client:
        old = await client.hget(f"relayd:dl:{seq}", "r")
        assert old is not None
        await client.hset(f"relayd:dl:{seq}", {"r": recipient})
        if address:
            message = await client.hget(f"relayd:dl:{seq}", "m")
            assert message is not None
            await client.hset(b"relayd:m:" + message, {"r": recipient})
        await client.zrem(b"relayd:q:" + old, [str(seq)])
        await client.zadd(f"relayd:q:{recipient}", {str(seq): seq})
        await client.sadd("relayd:queues", [recipient])
