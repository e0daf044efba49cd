"""The real ``relayd`` command, run as a subprocess: check-config, token mint, serve and signals.

Each test writes its own config into ``tmp_path`` (a free loopback port, a volatile store, a
cheap KDF) and runs ``python -m relayd`` there with a clean ``RELAYD_*`` environment. Nothing
sleeps: every wait is for an event (a log line on stderr, EOF, the process's exit) under a
deadline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio

from relayd import Config, TokenError, load_config
from relayd._config import structure
from relayd._store import Store
from relayd._tokens import TokenCodec

from .support import HttpClient

SECRET = "cli-test-signing-secret-0123456789-abcdefghijklmnop"
DEADLINE = 30.0
READY_RE = re.compile(r"relayd ready .*\bhttp=(http://\S+)")


# --- helpers ------------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without any ``RELAYD_*`` variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_")}
    env.update(extra)
    return env


def _toml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def write_config(tmp_path: Path, overrides: Mapping[str, Any] | None = None) -> Path:
    """A test config file in ``tmp_path``; ``overrides`` maps keys (or sections) to values."""
    data: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "drain_timeout": 5.0,
        "http": {"listen": "127.0.0.1:0"},
        "store": {"path": ":memory:"},
        "auth": {"kdf_cost": 1024},
    }
    for key, value in (overrides or {}).items():
        if isinstance(value, Mapping):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    lines = [f"{k} = {_toml_scalar(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for section, values in data.items():
        if isinstance(values, dict):
            lines.append(f"[{section}]")
            lines.extend(f"{k} = {_toml_scalar(v)}" for k, v in values.items())
    path = tmp_path / "test-relayd.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def relayd_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "relayd", *args]


async def run_cli(
    tmp_path: Path, *args: str, env: Mapping[str, str]
) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(DEADLINE):
        return await trio.run_process(
            relayd_command(*args),
            cwd=tmp_path,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


class ServeProcess:
    """A running ``relayd serve`` whose stderr is read line by line on demand."""

    def __init__(self, process: trio.Process) -> None:
        assert process.stderr is not None
        self.process = process
        self._stderr = process.stderr
        self._pending = b""
        self._cursor = 0
        self.lines: list[str] = []

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    async def _read_more(self) -> bool:
        chunk = await self._stderr.receive_some(65536)
        if not chunk:
            if self._pending:
                self.lines.append(self._pending.decode("utf-8", "replace"))
                self._pending = b""
            return False
        *complete, self._pending = (self._pending + chunk).split(b"\n")
        self.lines.extend(line.decode("utf-8", "replace") for line in complete)
        return True

    async def wait_for_line(self, needle: str | re.Pattern[str]) -> str:
        """The next stderr line (after the last one returned) that contains ``needle``."""
        while True:
            while self._cursor < len(self.lines):
                line = self.lines[self._cursor]
                self._cursor += 1
                found = needle.search(line) if isinstance(needle, re.Pattern) else needle in line
                if found:
                    return line
            if not await self._read_more():
                raise AssertionError(f"stderr ended before {needle!r} appeared:\n{self.stderr}")

    async def wait_ready(self) -> HttpClient:
        line = await self.wait_for_line(READY_RE)
        match = READY_RE.search(line)
        assert match is not None
        url = urlsplit(match.group(1))
        assert url.hostname is not None
        assert url.port is not None
        return HttpClient(url.hostname, url.port)

    async def exit_code(self) -> int:
        """Read stderr to EOF, then reap the process."""
        while await self._read_more():
            pass
        return await self.process.wait()


@asynccontextmanager
async def serving(
    tmp_path: Path, config: Path, env: Mapping[str, str]
) -> AsyncIterator[ServeProcess]:
    process = await trio.lowlevel.open_process(
        relayd_command("serve", "--config", str(config)),
        cwd=tmp_path,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield ServeProcess(process)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                await process.wait()
            assert process.stderr is not None
            await process.stderr.aclose()


def codec_for(secret: bytes, config: Config, *, leeway: float = 0.0) -> TokenCodec:
    return TokenCodec(
        secret,
        issuer=config.auth.issuer,
        audience=config.auth.audience,
        leeway=leeway,
        clock=time.time,
    )


# --- check-config -------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["env", "secret_file", "none"])
async def test_check_config_prints_the_effective_config(tmp_path: Path, source: str) -> None:
    file_secret = "file-held-signing-secret-abcdefghijklmnopqrstuvwxyz"
    overrides: dict[str, Any] = {}
    extra_env = {"RELAYD_HTTP__MAX_BODY_BYTES": "4321", "RELAYD_LOG__FORMAT": "json"}
    secret_path = tmp_path / "secret"
    if source == "env":
        extra_env["RELAYD_SECRET"] = SECRET
    elif source == "secret_file":
        secret_path.write_text(file_secret + "\n")
        secret_path.chmod(0o600)
        overrides["auth"] = {"secret_file": str(secret_path)}
    config_path = write_config(tmp_path, overrides)

    result = await run_cli(
        tmp_path, "check-config", "--config", str(config_path), env=clean_env(**extra_env)
    )

    stdout = result.stdout.decode()
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    parsed = tomllib.loads(stdout)
    expected = load_config(config_path, environ=extra_env)
    assert structure(parsed, "<check-config output>") == expected
    assert parsed["http"]["max_body_bytes"] == 4321
    assert parsed["log"]["format"] == "json"
    # The origin of the secret, never the secret.
    origin = re.search(r"^# signing secret: (.*)$", stdout, re.MULTILINE)
    assert origin is not None, stdout
    generated = tmp_path / "state" / "signing-secret"
    if source == "env":
        assert origin.group(1) == "$RELAYD_SECRET"
    elif source == "secret_file":
        assert origin.group(1) == str(secret_path)
    else:
        assert origin.group(1).startswith(str(generated))
        assert not generated.exists(), "check-config must not generate the secret"
    for secret in (SECRET, file_secret):
        assert secret not in stdout
        assert secret not in stderr
    # Where the store keys are, never generated here either.
    keys = tmp_path / "state" / "store-keys"
    assert f"# store keys: {keys} (generated on first start)" in stdout
    assert not keys.exists()


@pytest.mark.parametrize("command", [["check-config"], ["serve"], ["token", "mint"]])
async def test_bad_config_exits_2_naming_file_and_key(tmp_path: Path, command: list[str]) -> None:
    config_path = write_config(tmp_path, {"http": {"listen": 8000}, "auth": {"kdf_costs": 1}})
    with trio.fail_after(DEADLINE):
        result = await run_cli(
            tmp_path, *command, "--config", str(config_path), env=clean_env(RELAYD_SECRET=SECRET)
        )
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert f"{config_path}: http.listen: must be a string" in stderr
    assert f"{config_path}: auth.kdf_costs: unknown key; did you mean 'kdf_cost'?" in stderr
    assert result.stdout == b""


async def test_bad_env_override_exits_2_naming_the_variable(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    env = clean_env(RELAYD_SECRET=SECRET, RELAYD_HTTP__MAX_BODY_BYTES="lots")
    result = await run_cli(tmp_path, "check-config", "--config", str(config_path), env=env)
    assert result.returncode == 2
    assert "RELAYD_HTTP__MAX_BODY_BYTES" in result.stderr.decode()


# --- token mint ---------------------------------------------------------------------------------


async def test_token_mint_prints_a_verifiable_operator_token(tmp_path: Path) -> None:
    config_path = write_config(
        tmp_path, {"auth": {"issuer": "cli-test-issuer", "audience": "cli-test-audience"}}
    )
    config = load_config(config_path, environ={})
    before = time.time()
    result = await run_cli(
        tmp_path,
        "token",
        "mint",
        "--config",
        str(config_path),
        "--role",
        "admin",
        "--name",
        "ops",
        "--ttl",
        "60",
        env=clean_env(RELAYD_SECRET=SECRET),
    )
    after = time.time()
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 1, lines
    token = lines[0]

    claims = codec_for(SECRET.encode(), config).verify(token, use="access")
    assert claims.roles == ("admin",)
    assert claims.sub == "operator:ops"
    assert claims.token_use == "access"
    assert claims.exp - claims.iat == pytest.approx(60.0, abs=0.01)
    assert before - 1 <= claims.iat <= after + 1
    assert token not in result.stderr.decode()
    # Issuer and audience come from the config: each default alone refuses the token.
    defaults = Config().auth
    for issuer, audience, complaint in [
        (defaults.issuer, config.auth.audience, "wrong issuer"),
        (config.auth.issuer, defaults.audience, "wrong audience"),
    ]:
        codec = TokenCodec(
            SECRET.encode(), issuer=issuer, audience=audience, leeway=0.0, clock=time.time
        )
        with pytest.raises(TokenError, match=complaint):
            codec.verify(token, use="access")


@pytest.mark.parametrize("ttl", ["0", "inf", "1e300"])
async def test_token_mint_refuses_a_ttl_that_is_not_a_positive_finite_lifetime(
    tmp_path: Path, ttl: str
) -> None:
    """``--ttl inf`` must not mint an admin token that never expires (``"exp": Infinity``)."""
    config_path = write_config(tmp_path)
    result = await run_cli(
        tmp_path,
        *["token", "mint", "--config", str(config_path), "--ttl", ttl],
        env=clean_env(RELAYD_SECRET=SECRET),
    )
    assert result.returncode == 2, result.stderr.decode()
    assert result.stdout == b"", "a token was printed"
    assert "--ttl" in result.stderr.decode()


@pytest.mark.parametrize("command", [["serve"], ["token", "mint"], ["check-config"]])
async def test_short_secret_exits_2(tmp_path: Path, command: list[str]) -> None:
    config_path = write_config(tmp_path)
    short = "x" * 31
    result = await run_cli(
        tmp_path, *command, "--config", str(config_path), env=clean_env(RELAYD_SECRET=short)
    )
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "configuration error" in stderr
    assert "at least 32 bytes" in stderr


async def test_short_secret_file_exits_2(tmp_path: Path) -> None:
    secret_path = tmp_path / "short-secret"
    secret_path.write_text("too-short\n")
    secret_path.chmod(0o600)
    config_path = write_config(tmp_path, {"auth": {"secret_file": str(secret_path)}})
    result = await run_cli(tmp_path, "serve", "--config", str(config_path), env=clean_env())
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "at least 32 bytes" in stderr
    assert "too-short" not in stderr


# --- serve --------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_serve_is_ready_then_stops_cleanly_on_signal(
    tmp_path: Path, signum: signal.Signals
) -> None:
    config_path = write_config(tmp_path)
    with trio.fail_after(DEADLINE):
        async with serving(tmp_path, config_path, clean_env(RELAYD_SECRET=SECRET)) as serve:
            client = await serve.wait_ready()
            response = await client.get("/health/ready")
            assert response.status == 200
            assert response.json() == {"status": "ready"}

            serve.process.send_signal(signum)
            code = await serve.exit_code()
    assert code == 0, serve.stderr
    assert f"{signum.name} received: draining" in serve.stderr
    assert "relayd stopped" in serve.stderr
    assert SECRET not in serve.stderr


LATE_BODY = b'{"name": "late"}'


async def start_unfinished_request(client: HttpClient) -> trio.SocketStream:
    """Open a connection and send a request whose body is not finished: it is in flight, and
    the drain must wait for it. (A request whose *headers* are unfinished is not waited for:
    the server drops it as soon as the drain starts.) ``Expect: 100-continue`` tells when the
    server has taken the request up: it answers 100 once the request is handed to the app."""
    stream = await trio.open_tcp_stream(client.host, client.port)
    head = (
        b"POST /register HTTP/1.1\r\nHost: relayd\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(LATE_BODY)
    )
    await stream.send_all(head)
    interim = b""
    while not interim.endswith(b"\r\n\r\n"):
        interim += await stream.receive_some(1)
    assert interim.startswith(b"HTTP/1.1 100 "), interim
    await stream.send_all(LATE_BODY[:5])
    return stream


async def receive_all(stream: trio.SocketStream) -> bytes:
    chunks = []
    while chunk := await stream.receive_some(65536):
        chunks.append(chunk)
    return b"".join(chunks)


async def test_drain_lets_an_in_flight_request_finish(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, {"drain_timeout": 30.0})
    with trio.fail_after(DEADLINE):
        async with serving(tmp_path, config_path, clean_env(RELAYD_SECRET=SECRET)) as serve:
            client = await serve.wait_ready()
            stream = await start_unfinished_request(client)
            async with stream:
                serve.process.send_signal(signal.SIGTERM)
                await serve.wait_for_line(re.compile(r"\brelayd: draining\b"))
                await stream.send_all(LATE_BODY[5:])
                response = await receive_all(stream)
            code = await serve.exit_code()
    assert response.startswith(b"HTTP/1.1 200 "), response[:200]
    assert b'"name":"late"' in response
    assert code == 0, serve.stderr
    assert "relayd stopped" in serve.stderr


async def test_second_signal_forces_the_stop(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, {"drain_timeout": 30.0})
    with trio.fail_after(DEADLINE):
        async with serving(tmp_path, config_path, clean_env(RELAYD_SECRET=SECRET)) as serve:
            client = await serve.wait_ready()
            stream = await start_unfinished_request(client)
            async with stream:
                serve.process.send_signal(signal.SIGTERM)
                await serve.wait_for_line(re.compile(r"\brelayd: draining\b"))
                started = trio.current_time()
                serve.process.send_signal(signal.SIGTERM)
                with trio.fail_after(10):
                    code = await serve.exit_code()
                elapsed = trio.current_time() - started
    assert code == 1, serve.stderr
    assert "SIGTERM received again: stopping now" in serve.stderr
    assert "relayd stopped" not in serve.stderr
    assert elapsed < 10


async def test_generated_secret_is_written_once_and_reused(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    secret_path = tmp_path / "state" / "signing-secret"
    env = clean_env()  # no RELAYD_SECRET, no auth.secret_file
    assert not secret_path.exists()

    with trio.fail_after(DEADLINE):
        async with serving(tmp_path, config_path, env) as serve:
            await serve.wait_ready()
            assert secret_path.exists()
            serve.process.send_signal(signal.SIGTERM)
            code = await serve.exit_code()
    assert code == 0, serve.stderr
    warnings = [line for line in serve.lines if " WARNING " in line]
    assert any(str(secret_path) in line for line in warnings), serve.stderr
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret_path.parent.stat().st_mode) == 0o700
    contents = secret_path.read_bytes()
    secret = contents.strip()
    assert len(secret) >= 32
    assert secret.decode() not in serve.stderr

    # A second run reuses the file: unchanged, no new warning, and its tokens verify with it.
    result = await run_cli(tmp_path, "token", "mint", "--config", str(config_path), env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert secret_path.read_bytes() == contents
    assert "generated" not in result.stderr.decode()
    token = result.stdout.decode().strip()
    claims = codec_for(secret, load_config(config_path, environ={})).verify(token, use="access")
    assert claims.sub == "operator:admin"


# --- the state directory's lock -----------------------------------------------------------------


async def test_a_second_serve_on_the_same_state_dir_exits_1_naming_the_first_until_it_dies(
    tmp_path: Path,
) -> None:
    """The second daemon refuses; after ``kill -9`` of the first (no clean release), the kernel
    has dropped its lock and a new daemon starts."""
    config_path = write_config(tmp_path)
    env = clean_env(RELAYD_SECRET=SECRET)
    with trio.fail_after(DEADLINE):
        async with serving(tmp_path, config_path, env) as first:
            await first.wait_ready()
            second = await run_cli(tmp_path, "serve", "--config", str(config_path), env=env)
            stderr = second.stderr.decode()
            assert second.returncode == 1, stderr
            holder = f"relayd serve (pid {first.process.pid} on {socket.gethostname()}, started "
            assert f"{tmp_path / 'state'} is in use by {holder}" in stderr, stderr
            assert str(tmp_path / "state" / "relayd.lock") in stderr
            assert "Traceback" not in stderr

            first.process.send_signal(signal.SIGKILL)
            assert await first.exit_code() == -signal.SIGKILL
        async with serving(tmp_path, config_path, env) as third:
            client = await third.wait_ready()
            assert (await client.get("/health/ready")).status == 200
            third.process.send_signal(signal.SIGTERM)
            assert await third.exit_code() == 0, third.stderr


# --- a closed stdout ----------------------------------------------------------------------------


async def run_with_stdout_closed(
    tmp_path: Path, *args: str, env: Mapping[str, str]
) -> subprocess.CompletedProcess[bytes]:
    """Run ``relayd ARGS`` with stdout a pipe whose reader has already left, as in
    ``relayd admin clients | head`` once ``head`` has exited: every write to it fails (EPIPE)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        with trio.fail_after(DEADLINE):
            return await trio.run_process(
                relayd_command(*args),
                cwd=tmp_path,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=write_end,
                capture_stderr=True,
                check=False,
            )
    finally:
        os.close(write_end)


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize(
    "command", [["check-config"], ["token", "mint"], ["admin", "clients"]], ids=" ".join
)
async def test_a_closed_stdout_ends_the_command_quietly_with_141(
    tmp_path: Path, command: list[str], buffered: bool
) -> None:
    """Buffered (Python's default for a pipe), the write that fails is the last flush;
    unbuffered (``PYTHONUNBUFFERED``), it is the first print."""
    with socket.socket() as probe:  # a loopback port nothing listens on: no daemon answers
        probe.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{probe.getsockname()[1]}"
    config_path = write_config(
        tmp_path, {"http": {"listen": nowhere}, "store": {"path": "relayd.sqlite3"}}
    )
    (tmp_path / "state").mkdir(mode=0o700)
    async with Store.open(str(tmp_path / "state" / "relayd.sqlite3"), synchronous="full"):
        pass  # a stopped daemon's store, for `relayd admin clients` to list
    env = clean_env(RELAYD_SECRET=SECRET)
    env.pop("PYTHONUNBUFFERED", None)
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    result = await run_with_stdout_closed(tmp_path, *command, "--config", str(config_path), env=env)
    stderr = result.stderr.decode()
    assert result.returncode == 128 + signal.SIGPIPE, stderr
    for noise in ("Traceback", "BrokenPipeError", "Exception ignored"):
        assert noise not in stderr, stderr
