"""Cluster-mode failures with real pieces: relayd nodes in this process or as ``relayd serve``
children (the cluster crash benchmark's, ``contrib/bench/cluster_crash.py``), each on a Redis
server of the test's own that the test may kill, pause or restart.

Small ``store.lease`` and ``store.timeout`` keep the tests fast; every wait is for an event
(a frame, a close, a process's exit), under a deadline.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import pytest
import trio

from contrib.bench.cluster_crash import Node, node_settings, start_node
from relayd._config import Config

from .redis_support import RedisServer, require_redis, start_redis, stop_redis
from .support import IO_DEADLINE, TEST_SECRET, make_config

# Quick to notice an outage: a call fails after a second, a node without Redis for two
# seconds fences itself. Not quicker: a node in the test's process, on a loaded machine with
# every write fsynced (AOF_ALWAYS), has missed a tighter lease (0.3 s calls, 1 s lease) and
# closed its sessions 1013 in the middle of a test.
QUICK_STORE: dict[str, Any] = {"timeout": 2.0, "lease": 6.0}
AOF_ALWAYS = ("--appendonly", "yes", "--appendfsync", "always")


def node_config(
    tmp_path: Path, url: str, *, sections: dict[str, Any] | None = None, **store: Any
) -> Config:
    """An in-process node on ``url`` (state in ``tmp_path / "state"``, shared by the nodes);
    ``sections``: more config (``roles``...)."""
    return make_config(
        tmp_path,
        {
            "store": {"engine": "redis", "url": url, **QUICK_STORE, **store},
            "relay": {"ack_timeout": 30.0},
            **(sections or {}),
        },
    )


@asynccontextmanager
async def node_process(
    tmp_path: Path, url: str, *, index: int = 1, **store: Any
) -> AsyncIterator[Node]:
    """``relayd serve`` as a child process on ``url``, sharing ``tmp_path / "state"`` (start
    an in-process node first: it writes the store keys); killed at the end if it still
    runs."""
    settings = node_settings(url, {"store": {**QUICK_STORE, **store}})
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, index, tmp_path / "state", settings, TEST_SECRET, 1)
        try:
            yield node
        finally:
            node.child.kill()
            await node.child.wait()


class OwnRedis:
    """A Redis server of the test's own: killed, and started again on its port and data."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.binary = require_redis()
        self.extra = extra
        self.server = start_redis(self.binary, data_dir, *extra)

    @property
    def url(self) -> str:
        return self.server.url

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last AOF write or fsync."""
        self.server.process.kill()
        self.server.process.wait()
        stop_redis(self.server)  # reaped: this only closes its log pipe

    def restart(self) -> None:
        self.server = start_redis(
            self.binary, self.server.data_dir, *self.extra, port=self.server.port
        )

    def stop(self) -> None:
        if self.server.process.poll() is None:
            stop_redis(self.server)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    """A Redis of this test's own with ``appendfsync always``."""
    data = tmp_path / "redis"
    data.mkdir()
    redis = OwnRedis(data, *AOF_ALWAYS)
    try:
        yield redis
    finally:
        redis.stop()


class Subscriber:
    """A subscription of the test's own to one channel (raw RESP on a socket): it proves what
    relayd published, and when."""

    def __init__(self, server: RedisServer, channel: str) -> None:
        self._sock = socket.create_connection((server.host, server.port), timeout=IO_DEADLINE)
        self._reader = self._sock.makefile("rb")
        data = channel.encode()
        self._sock.sendall(b"*2\r\n$9\r\nSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(data), data))
        assert self._read()[0] == b"subscribe"

    def _read(self) -> list[bytes]:
        """One push message: an array of bulk strings and integers."""
        header = self._reader.readline()
        assert header.startswith(b"*"), header
        items: list[bytes] = []
        for _ in range(int(header[1:])):
            line = self._reader.readline().rstrip(b"\r\n")
            if line.startswith(b"$"):
                items.append(self._reader.read(int(line[1:]) + 2)[:-2])
            else:
                items.append(line[1:])
        return items

    async def next_message(self) -> bytes:
        """The next message published on the channel (within IO_DEADLINE)."""
        kind, _, data = await trio.to_thread.run_sync(self._read)
        assert kind == b"message", kind
        return data

    def close(self) -> None:
        with closing(self._sock):
            self._reader.close()
