"""``relayd serve --workers N`` as a real process tree, for tests: the supervisor's stderr
(its lines and its workers', JSON) is read all along, and a test waits for the line it needs.

Every wait is bounded by :data:`PROCESS_DEADLINE`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

# Start-up of the process tree, and each wait for a line or an exit, is bounded by this.
PROCESS_DEADLINE = 30.0

Line = dict[str, Any]


def workers_config(tmp_path: Path, redis_url: str | None, extra: str = "") -> Path:
    """A config for ``relayd serve --workers``: the redis engine at ``redis_url`` (``None``:
    the sqlite engine), port 0, JSON logs."""
    store = f'[store]\nengine = "redis"\nurl = "{redis_url}"\ntimeout = 1.0\n' if redis_url else ""
    path = tmp_path / "relayd.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        "drain_timeout = 5.0\n"
        '[http]\nlisten = "127.0.0.1:0"\n'
        "[auth]\nkdf_cost = 1024\n"
        '[log]\nformat = "json"\n' + store + extra,
        encoding="utf-8",
    )
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without ``RELAYD_*`` and systemd's variables, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RELAYD_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")
    }
    env.update(extra)
    return env


class Workers:
    """A running ``relayd serve --workers`` and what it logged so far."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lines: list[Line] = []
        self._changed = trio.Event()
        self._ended = False  # stderr is at its end: every process of the tree has exited
        self.code: int | None = None

    async def _read(self) -> None:
        stderr = self.process.stderr
        assert stderr is not None
        buffer = b""
        while chunk := await stderr.receive_some():
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                try:
                    line = json.loads(raw)
                except ValueError:  # a traceback, say: kept as it is
                    line = {"msg": raw.decode(errors="replace")}
                self.lines.append(line)
            self._changed.set()
            self._changed = trio.Event()
        self._ended = True
        self._changed.set()

    async def line(self, test: Callable[[Line], bool], *, start: int = 0) -> int:
        """The index of the first line from ``start`` on that passes ``test``, once logged."""
        with trio.fail_after(PROCESS_DEADLINE):
            while True:
                for index in range(start, len(self.lines)):
                    if test(self.lines[index]):
                        return index
                if self._ended:
                    raise AssertionError(f"relayd exited; it logged:\n{self.log()}")
                await self._changed.wait()

    async def supervisor_says(self, msg: str, *, start: int = 0, **fields: Any) -> int:
        """The index of the supervisor's first line ``msg`` (with ``fields``) from ``start``."""
        return await self.line(
            lambda line: (
                line.get("logger") == "relayd.workers"
                and line.get("msg") == msg
                and all(line.get(k) == v for k, v in fields.items())
            ),
            start=start,
        )

    async def worker_says(self, worker: int, msg: str) -> int:
        """The index of the first line ``msg`` that ``worker`` logged itself."""
        return await self.line(
            lambda line: (
                line.get("logger") != "relayd.workers"
                and line.get("worker") == worker
                and line.get("msg") == msg
            )
        )

    async def ready(self) -> tuple[str, int]:
        """Wait until the supervisor says every worker is ready; the HTTP address."""
        index = await self.supervisor_says("relayd ready")
        host, _, port = self.lines[index]["http"].removeprefix("http://").rpartition(":")
        return host, int(port)

    def pid(self, worker: int) -> int:
        """The pid of ``worker``'s latest process."""
        started = [
            line["pid"]
            for line in self.lines
            if line.get("msg") == "worker started" and line.get("worker") == worker
        ]
        assert started, f"worker {worker} never started"
        pid: int = started[-1]
        return pid

    def worker_lines(self, worker: int) -> list[Line]:
        """What ``worker`` logged itself (not what the supervisor said about it)."""
        return [
            line
            for line in self.lines
            if line.get("logger") != "relayd.workers" and line.get("worker") == worker
        ]

    def log(self) -> str:
        return "\n".join(json.dumps(line) for line in self.lines)

    async def wait(self) -> int:
        """Wait for the supervisor to exit; its exit code."""
        with trio.fail_after(PROCESS_DEADLINE):
            self.code = await self.process.wait()
        return self.code


@asynccontextmanager
async def relayd_workers(
    config: Path, count: int, env: Mapping[str, str], *, own_group: bool = False
) -> AsyncIterator[Workers]:
    """``relayd serve --workers count``; on the way out, whatever still runs is killed (the
    supervisor, then any worker it left). ``own_group``: the supervisor leads a process group
    of its own, as a shell's foreground job does (a terminal's Ctrl-C goes to that group)."""
    # The supervisor's temporary directory (the workers' notify sockets) goes in one of the
    # test's, removed with it even when the supervisor is killed and cannot remove its own.
    with tempfile.TemporaryDirectory(prefix="rw-") as tmp:
        async with _relayd_workers(config, count, {**env, "TMPDIR": tmp}, own_group) as workers:
            yield workers


@asynccontextmanager
async def _relayd_workers(
    config: Path, count: int, env: Mapping[str, str], own_group: bool
) -> AsyncIterator[Workers]:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "relayd", "serve", "--config", str(config), "--workers", str(count)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=dict(env),
        process_group=0 if own_group else None,
    )
    workers = Workers(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(workers._read)
            try:
                yield workers
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.fail_after(PROCESS_DEADLINE):
            if process.returncode is None:
                process.kill()
                await process.wait()
            _kill_left_workers(workers)
            if process.stderr is not None:
                await process.stderr.aclose()


def _kill_left_workers(workers: Workers) -> None:
    """Kill the workers still running (their stdin closed: they would drain and go on their
    own), each only while its pid is still a relayd worker's."""
    for line in workers.lines:
        if line.get("msg") != "worker started":
            continue
        pid = line["pid"]
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"--worker" in command:
                os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass
