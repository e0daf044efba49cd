"""The processes under test: relayd (with a generated config) and the bare echo servers.

Each runs in its own process, started here and stopped with SIGTERM. relayd logs JSON to a
file in its state directory; the harness finds the bound ports in its ``relayd ready`` line
and, at the end, counts the warnings and errors it logged.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._proc import REPO, cpu_seconds, process_tree, rss_kib

TomlValue = str | int | float | bool
Settings = dict[str, dict[str, TomlValue]]

# What every benchmark run changes from relayd's defaults, and why.
BENCH_SETTINGS: Settings = {
    "http": {
        # Clients are registered over REST from one address: lift the per-IP rate limit.
        "register_per_minute": 1_000_000.0,
        "register_burst": 1_000_000,
        "auth_per_minute": 1_000_000.0,
        "auth_burst": 1_000_000,
    },
    "auth": {
        # scrypt at the default cost (16384) takes ~50 ms per registration; registering
        # 10,000 clients would take minutes. The relay path never runs the KDF.
        "kdf_cost": 1024,
        # Longer than any run, so no token_expiring frame or expiry interferes.
        "access_ttl": 3600.0,
    },
    "websocket": {
        # The per-client send rate limit is a policy, not a cost: lift it so the relay, not
        # the limiter, is what gets measured (it still runs on every message).
        "messages_per_second": 1_000_000.0,
        "message_burst": 1_000_000,
    },
    "log": {"format": "json", "level": "info"},
}


def _toml(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def merge(*layers: Settings) -> Settings:
    out: Settings = {}
    for layer in layers:
        for section, values in layer.items():
            out.setdefault(section, {}).update(values)
    return out


def render_config(state_dir: Path, settings: Settings) -> str:
    top = settings.get("", {})
    lines = [f"state_dir = {_toml(str(state_dir))}"]
    lines += [f"{k} = {_toml(v)}" for k, v in top.items()]
    for section, values in settings.items():
        if section:
            lines.append(f"\n[{section}]")
            lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def relay_settings(
    *, store: str = "file", transport: str = "main", extra: Settings | None = None
) -> Settings:
    """Bench settings for a store (``file``, ``memory``, or ``redis``: the Redis engine on a
    server the run starts, see :class:`RedisServer`) and transport (``main`` or
    ``dedicated``), plus ``extra``."""
    if store == "redis":
        engine: dict[str, TomlValue] = {"engine": "redis"}  # the url comes with the server
    else:
        engine = {"path": ":memory:" if store == "memory" else "relayd.sqlite3"}
    layer: Settings = {
        "http": {"listen": "127.0.0.1:0"},
        "websocket": {"listen": "127.0.0.1:0" if transport == "dedicated" else ""},
        "store": engine,
    }
    return merge(BENCH_SETTINGS, layer, extra or {})


@dataclass
class RedisServer:
    """A redis-server for one run, in the run's state directory, on a free loopback port,
    with ``appendonly yes`` and ``appendfsync always``: an answered write is on disk, as a
    commit is with SQLite's ``synchronous = full``. Its CPU shows in a row's
    ``machine.other_cores``."""

    process: asyncio.subprocess.Process
    url: str

    @classmethod
    async def start(cls, data_dir: Path, within: float = 20.0) -> RedisServer:
        binary = shutil.which("redis-server") or shutil.which("valkey-server")
        if binary is None:
            raise RuntimeError("--store redis needs redis-server (apt-get install redis-server)")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        process = await asyncio.create_subprocess_exec(
            binary,
            *("--bind", "127.0.0.1", "--port", str(port), "--dir", str(data_dir)),
            *("--save", "", "--appendonly", "yes", "--appendfsync", "always"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert process.stdout is not None
        try:
            async with asyncio.timeout(within):
                while b"Ready to accept connections" not in await process.stdout.readline():
                    if process.stdout.at_eof():
                        raise RuntimeError("redis-server exited before it was ready")
        except BaseException:
            process.kill()
            await process.wait()
            raise
        return cls(process, f"redis://127.0.0.1:{port}/0")

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


@dataclass
class Relayd:
    """A relayd process. ``await Relayd.start(settings)``; ``await stop()``."""

    state_dir: Path
    process: asyncio.subprocess.Process
    http_url: str
    ws_url: str
    log_path: Path
    secret: str
    owns_dir: bool = True
    redis: RedisServer | None = None  # the Redis engine's server, if the run started one
    stopped: bool = False
    exit_code: int | None = None
    died: bool = False  # it had exited before it was told to stop

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def start(
        cls,
        settings: Settings,
        *,
        state_dir: Path | None = None,
        secret: str | None = None,
        within: float = 30.0,
        workers: int = 1,
    ) -> Relayd:
        owns = state_dir is None
        if state_dir is None:
            state_dir = Path(tempfile.mkdtemp(prefix="relayd-bench-"))
        secret = secret or secrets.token_urlsafe(48)
        redis = None
        store = settings.get("store", {})
        if store.get("engine") == "redis" and not store.get("url"):
            redis = await RedisServer.start(state_dir)
            settings = merge(settings, {"store": {"url": redis.url}})
        config = state_dir / "bench.toml"
        config.write_text(render_config(state_dir, settings))
        # One log per start: a restart on the same state dir keeps the first one.
        n = len(list(state_dir.glob("relayd*.log")))
        log_path = state_dir / f"relayd{n}.log"
        env = {**os.environ, "RELAYD_SECRET": secret}
        exe = Path(sys.executable).with_name("relayd")
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                str(exe),
                "serve",
                "--config",
                str(config),
                *(["--workers", str(workers)] if workers > 1 else []),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                cwd=state_dir,
            )
        deadline = time.monotonic() + within
        offset = 0
        while True:
            with log_path.open("rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
            # Only whole lines.
            end = chunk.rfind(b"\n") + 1
            offset += end
            for raw in chunk[:end].splitlines():
                doc = _parse(raw)
                if doc is not None and doc.get("msg") == "relayd ready":
                    return cls(
                        state_dir,
                        process,
                        str(doc["http"]),
                        str(doc["ws"]),
                        log_path,
                        secret,
                        owns_dir=owns,
                        redis=redis,
                    )
            if process.returncode is not None or time.monotonic() > deadline:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                if redis is not None:
                    await redis.stop()
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"relayd did not start (exit {process.returncode}):\n{tail}")
            await asyncio.sleep(0.02)

    @property
    def main_ws_url(self) -> str:
        return self.http_url.replace("http", "ws", 1) + "/ws"

    def cpu(self) -> float:
        """relayd's CPU seconds: with ``--workers``, the supervisor's and its workers'."""
        return sum(cpu_seconds(pid) for pid in process_tree(self.pid))

    def rss(self) -> int:
        return sum(rss_kib(pid) for pid in process_tree(self.pid))

    async def stop(self, within: float = 30.0) -> float:
        """SIGTERM, and wait for the exit: the seconds it took (SIGKILL after ``within``)."""
        if self.stopped:
            return 0.0
        self.stopped = True
        if self.process.returncode is not None:
            self.died = True
            self.exit_code = self.process.returncode
            return 0.0
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), within)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
        self.exit_code = self.process.returncode
        return time.monotonic() - started

    def log_summary(self) -> dict[str, Any]:
        """Counts of the daemon's log lines by level; the warning and error messages."""
        levels: collections.Counter[str] = collections.Counter()
        notable: collections.Counter[str] = collections.Counter()
        for path in sorted(self.state_dir.glob("relayd*.log")):
            for raw in path.read_bytes().splitlines():
                doc = _parse(raw)
                if doc is None:
                    levels["unparsed"] += 1
                    if raw.strip():
                        notable["unparsed: " + raw.decode(errors="replace")[:160]] += 1
                    continue
                level = str(doc.get("level", "?"))
                levels[level] += 1
                if level in ("warning", "error", "critical"):
                    notable[f"{level}: {doc.get('msg')}"] += 1
        summary: dict[str, Any] = {
            "levels": dict(levels),
            "notable": dict(notable.most_common(12)),
        }
        if self.died:
            summary["died"] = {"exit": self.exit_code, "tail": self.log_tail()}
        return summary

    def log_tail(self, lines: int = 25) -> list[str]:
        """The last lines of the latest log, audit lines left out."""
        raw = self.log_path.read_text(errors="replace").splitlines()
        return [line[:400] for line in raw if '"relayd.audit"' not in line][-lines:]

    async def cleanup(self) -> None:
        """Kill the daemon if it still runs; remove its state directory unless the run
        failed (an exception is on its way out), the daemon died, or ``BENCH_KEEP_STATE=1``
        is set — then say where it is, for a look at the log and the store."""
        failed = sys.exc_info()[1] is not None
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        if self.redis is not None:
            await self.redis.stop()
        if not self.owns_dir:
            return
        if os.environ.get("BENCH_KEEP_STATE") == "1" or self.died or failed:
            print(f"bench: kept {self.state_dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.state_dir, ignore_errors=True)


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


SEED_V1_COMMIT = "31572f1"


@dataclass
class SeedV1:
    """The seed system's first version (swifty-server at ``SEED_V1_COMMIT``: FastAPI on
    uvicorn + uvloop, in memory, no acks, no store): the bare forwarder issue 11 compares the
    no-ack relay with. ``BENCH_SEED_V1`` names its checkout, with a virtualenv in ``venv/``
    (see contrib/bench/README.md). Its logging below warning is off, and uvicorn's access log."""

    process: asyncio.subprocess.Process
    http_url: str
    ws_url: str
    log_path: Path
    exit_code: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def start(cls, within: float = 30.0) -> SeedV1:
        home = Path(os.environ.get("BENCH_SEED_V1", ""))
        python = home / "venv" / "bin" / "python"
        if not os.environ.get("BENCH_SEED_V1") or not python.exists():
            raise RuntimeError(
                "set BENCH_SEED_V1 to a checkout of swifty-server at commit"
                f" {SEED_V1_COMMIT} with its requirements in venv/ (contrib/bench/README.md)"
            )
        with socket.socket() as probe:  # a free port for uvicorn
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        log_path = Path(tempfile.mkdtemp(prefix="seed-v1-")) / "seed.log"
        env = {**os.environ, "JWT_SECRET_KEY": secrets.token_urlsafe(48)}
        with log_path.open("wb") as log:
            # Its app logs every message at INFO (basicConfig): turned off, as in issue 11.
            launcher = (
                "import logging, uvicorn; logging.disable(logging.INFO); uvicorn.run("
                f"'main:app', host='127.0.0.1', port={port}, loop='uvloop',"
                " log_level='warning', access_log=False)"
            )
            process = await asyncio.create_subprocess_exec(
                str(python),
                "-c",
                launcher,
                cwd=home,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + within
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                if process.returncode is not None or time.monotonic() > deadline:
                    tail = log_path.read_text()[-2000:]
                    raise RuntimeError(f"seed v1 did not start: {tail}") from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            break
        base = f"127.0.0.1:{port}"
        return cls(process, f"http://{base}", f"ws://{base}/ws", log_path)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        return rss_kib(self.pid)

    async def stop(self, within: float = 10.0) -> float:
        started = time.monotonic()
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), within)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        self.exit_code = 0  # uvicorn's exit on SIGTERM; the run's integrity is what counts
        return time.monotonic() - started

    def log_summary(self) -> dict[str, Any]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return {"levels": {"lines": len(lines)}, "notable": {line[:160]: 1 for line in lines[-5:]}}

    async def cleanup(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        shutil.rmtree(self.log_path.parent, ignore_errors=True)


@dataclass
class EchoServer:
    """A bare echo server (``contrib/bench/echo.py``) in its own process."""

    kind: str
    process: asyncio.subprocess.Process
    url: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def start(cls, kind: str, within: float = 20.0) -> EchoServer:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "contrib.bench.echo",
            kind,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), within)
        doc = json.loads(line)
        return cls(kind, process, f"ws://127.0.0.1:{doc['port']}/ws")

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        return rss_kib(self.pid)

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
