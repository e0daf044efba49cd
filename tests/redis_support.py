"""A real Redis (or Valkey) server for the tests that need one: started on a free loopback
port with its data in a temporary directory, and stopped after the test session.

Where neither ``redis-server`` nor ``valkey-server`` is installed, the tests that need one are
skipped; with ``REQUIRE_REDIS_TESTS=1`` (set by ``.ci/run``, which installs Redis) they fail.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

READY_LINE = b"Ready to accept connections"
START_TIMEOUT = 20.0


@attrs.frozen
class RedisServer:
    """A running server: ``url`` names database 0 on it."""

    host: str
    port: int
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_reader: threading.Thread  # drains its log, so that the pipe never fills

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"


def server_binary() -> str | None:
    """``redis-server`` or ``valkey-server``, whichever is installed (``RELAYD_TEST_REDIS``
    is not read: relayd reads ``RELAYD_*`` as its own configuration)."""
    for name in ("redis-server", "valkey-server"):
        path = shutil.which(name)
        if path is not None:
            return path
    return None


def require_redis() -> str:
    """The server binary, or skip the test (fail it under ``REQUIRE_REDIS_TESTS=1``)."""
    binary = server_binary()
    if binary is None:
        reason = "neither redis-server nor valkey-server is installed"
        if os.environ.get("REQUIRE_REDIS_TESTS") == "1":
            pytest.fail(f"REQUIRE_REDIS_TESTS=1, but {reason}")
        pytest.skip(reason)
    return binary


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_redis(binary: str, data_dir: Path, *extra: str, port: int | None = None) -> RedisServer:
    """Start a server in the foreground and return once it says it accepts connections.

    ``extra``: more ``redis-server`` arguments (``--appendonly yes`` ...); ``port``: the port
    to listen on (a free one by default; a stopped server's, to start it again).
    """
    port = _free_port() if port is None else port
    argv = [
        binary,
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(data_dir),
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
        *extra,
    ]
    return _start(argv, READY_LINE, port, data_dir)


def start_sentinel(binary: str, data_dir: Path, primary: RedisServer, service: str) -> RedisServer:
    """A Redis Sentinel that knows ``primary`` as ``service`` (quorum 1), ready once it
    monitors it; its config file (which Sentinel rewrites) is in ``data_dir``."""
    port = _free_port()
    config = data_dir / "sentinel.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {data_dir}\n"
        f"sentinel monitor {service} {primary.host} {primary.port} 1\n"
    )
    return _start([binary, str(config), "--sentinel"], b"+monitor master", port, data_dir)


def _start(argv: list[str], ready_line: bytes, port: int, data_dir: Path) -> RedisServer:
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    seen: list[bytes] = []
    try:
        # Its log says when it is ready; a server that exits says why.
        for line in process.stdout:
            seen.append(line)
            if ready_line in line:
                break
        else:
            raise RuntimeError(
                f"{argv[0]} exited before it was ready: {b''.join(seen).decode(errors='replace')}"
            )
    except BaseException:
        process.kill()
        process.wait(START_TIMEOUT)
        raise
    log_reader = threading.Thread(target=process.stdout.read, daemon=True)
    log_reader.start()
    return RedisServer("127.0.0.1", port, data_dir, process, log_reader)


def command(server: RedisServer, *commands: tuple[str, ...]) -> list[bytes]:
    """Send ``commands`` on one connection, in order, and return each one's reply line
    (``b"+OK"``, ``b":1"``...). For fixtures only: relayd speaks to Redis through coredis."""
    replies: list[bytes] = []
    with (
        socket.create_connection((server.host, server.port), timeout=START_TIMEOUT) as sock,
        sock.makefile("rb") as reader,
    ):
        for words in commands:
            request = [b"*%d\r\n" % len(words)]
            for word in words:
                data = word.encode()
                request.append(b"$%d\r\n%s\r\n" % (len(data), data))
            sock.sendall(b"".join(request))
            line = reader.readline().rstrip(b"\r\n")
            if line.startswith(b"-"):
                raise RuntimeError(f"redis refused {words[0]}: {line.decode(errors='replace')}")
            replies.append(line)
    return replies


def stop_redis(server: RedisServer) -> None:
    """Stop the server (SIGTERM, then SIGKILL past the timeout) and close its log pipe."""
    server.process.terminate()
    try:
        server.process.wait(START_TIMEOUT)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(START_TIMEOUT)
    server.log_reader.join(START_TIMEOUT)
    assert server.process.stdout is not None
    server.process.stdout.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real Redis server for the whole test session (tests keep apart by key prefix or
    by flushing, see :func:`redis_url`). Under pytest-xdist each worker is a session of its
    own, with a server of its own."""
    binary = require_redis()
    with tempfile.TemporaryDirectory(prefix="relayd-redis-") as data:
        server = start_redis(binary, Path(data))
        try:
            yield server
        finally:
            stop_redis(server)


_databases = iter(range(1, 16))


@pytest.fixture
def redis_url(redis_server: RedisServer, request: pytest.FixtureRequest) -> str:
    """A URL for this test alone: a database of the session's server, flushed before use.

    Redis has 16 databases; tests take 1-15 in turn and flush the one they get, so a test
    never sees another's keys (tests do not run concurrently within one pytest process, and
    each xdist worker process has a server of its own)."""
    global _databases
    try:
        db = next(_databases)
    except StopIteration:
        _databases = iter(range(1, 16))
        db = next(_databases)
    command(redis_server, ("SELECT", str(db)), ("FLUSHDB",))
    return f"redis://{redis_server.host}:{redis_server.port}/{db}"
