"""Support for the client SDK's tests: both event loops, a relayd subprocess, stores.

A *scenario* is an ``async def`` written for anyio: it runs under Trio as it is, and under
asyncio with :func:`run_scenario`, which gives it its own asyncio loop in a worker thread (the
test's Trio loop, which may host an in-process relayd, keeps running meanwhile). A scenario
bounds itself with ``anyio.fail_after``: a worker thread cannot be cancelled from outside.
"""

from __future__ import annotations

import functools
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import trio

from relayd._tokens import TokenCodec
from relayd.client import Credentials, MemoryCredentials, RestClient

from .support import TEST_SECRET, Engine, RunningRelayd

BACKENDS = ["trio", "asyncio"]
# A scenario's own deadline: it must finish (pass or fail) within this.
SCENARIO_DEADLINE = 40.0
READY_RE = re.compile(r"relayd ready .*\bhttp=(http://\S+)")


async def run_scenario(backend: str, scenario: Callable[[], Awaitable[None]]) -> None:
    """Run ``scenario`` under ``backend``: in this Trio task, or on a fresh asyncio loop in a
    worker thread."""
    if backend == "trio":
        await scenario()
    else:
        await trio.to_thread.run_sync(functools.partial(anyio.run, scenario, backend="asyncio"))


def url_of(relayd: RunningRelayd) -> str:
    host, port = relayd.addresses.http
    return f"http://{host}:{port}"


def admin_token() -> str:
    codec = TokenCodec(
        TEST_SECRET.encode(), issuer="relayd", audience="relayd", leeway=0.0, clock=time.time
    )
    return codec.issue(sub="operator:test", token_use="access", roles=("admin",), ttl=600).token


class RecordingStore(MemoryCredentials):
    """Memory credentials that keep every version saved, in order, and let a test wait for
    the n-th save."""

    def __init__(self, credentials: Credentials) -> None:
        super().__init__(credentials)
        self.saved: list[Credentials] = []
        self._changed = anyio.Event()

    async def save(self, credentials: Credentials) -> None:
        await super().save(credentials)
        self.saved.append(credentials)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_saves(self, count: int) -> None:
        while len(self.saved) < count:
            await self._changed.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def write_daemon_config(tmp_path: Path, port: int, engine: Engine, extra: str = "") -> Path:
    """A config for a ``relayd serve`` subprocess on ``engine``, with a store that survives
    restarts (on SQLite a file)."""
    path = tmp_path / "relayd-test.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        "drain_timeout = 5.0\n"
        "[http]\n"
        f'listen = "127.0.0.1:{port}"\n'
        f"[store]\n{engine.toml}"
        'path = "relayd.sqlite3"\n'
        "[auth]\n"
        "kdf_cost = 1024\n" + extra,
        encoding="utf-8",
    )
    return path


def daemon_env(**extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_")}
    env["RELAYD_SECRET"] = TEST_SECRET
    env.update(extra)
    return env


async def registered(url: str, name: str) -> MemoryCredentials:
    """A newly registered client's credentials, in memory."""
    async with RestClient(url) as rest:
        return MemoryCredentials(await rest.register(name))


class DaemonProcess:
    """``relayd serve`` as a subprocess, driven from anyio (so from either event loop); its
    stderr is read all along (a full pipe would block it). Use it in ``async with``: on exit,
    a daemon still running is killed."""

    def __init__(self, config: Path, env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.env = dict(env or daemon_env())
        self.process: anyio.abc.Process | None = None
        self.url = ""
        self.stderr = b""
        self._group: anyio.abc.TaskGroup | None = None
        self._drained = anyio.Event()

    async def __aenter__(self) -> DaemonProcess:
        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        await self.ensure_stopped()
        assert self._group is not None
        return await self._group.__aexit__(*exc_info)

    async def _drain(self, stream: anyio.abc.ByteReceiveStream, done: anyio.Event) -> None:
        async for chunk in stream:
            self.stderr += chunk
        done.set()

    async def start(self) -> str:
        """Start it and wait for its ready line; return its HTTP URL."""
        self.process = await anyio.open_process(
            [sys.executable, "-m", "relayd", "serve", "--config", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=self.env,
        )
        assert self.process.stderr is not None
        buffer = b""
        while True:
            try:
                chunk = await self.process.stderr.receive()
            except anyio.EndOfStream:
                raise AssertionError(f"relayd exited before it was ready:\n{buffer!r}") from None
            buffer += chunk
            match = READY_RE.search(buffer.decode("utf-8", "replace"))
            if match:
                self.stderr += buffer
                self.url = match.group(1)
                self._drained = anyio.Event()
                assert self._group is not None
                self._group.start_soon(self._drain, self.process.stderr, self._drained)
                return self.url

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Signal it (SIGTERM: drain, close sessions with 1001; SIGKILL: crash); wait for it to
        exit and return its exit code. Its stderr is read to the end meanwhile."""
        process = self.process
        assert process is not None
        assert process.stderr is not None
        process.send_signal(sig)
        await self._drained.wait()
        code = await process.wait()
        await process.aclose()
        self.process = None
        return code

    async def ensure_stopped(self) -> None:
        if self.process is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await self.stop(signal.SIGKILL)


def scenario_of(function: Callable[..., Awaitable[None]], *args: Any) -> Callable[[], Any]:
    """``function(*args)`` as a scenario bounded by :data:`SCENARIO_DEADLINE`."""

    async def bounded() -> None:
        with anyio.fail_after(SCENARIO_DEADLINE):
            await function(*args)

    return bounded
