"""``relayd serve --workers N``: real process trees on a real Redis server.

The supervisor and its workers are real ``python -m relayd serve`` processes; a test waits for
what it needs in their logs (JSON on the supervisor's stderr, which the workers share), on a
socket, or for an exit, each bounded. Which worker answered is in the ``Relayd-Worker`` header
of every HTTP response and WebSocket handshake.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from .support import TEST_SECRET, HttpClient
from .workers_support import (
    PROCESS_DEADLINE,
    clean_env,
    relayd_workers,
    workers_config,
)
from .ws_support import WsClient, connect_url


async def workers_answering(http: HttpClient, wanted: set[str]) -> None:
    """Ask ``/health/ready`` (a connection each) until every worker in ``wanted`` answered."""
    answered: set[str] = set()
    with trio.fail_after(PROCESS_DEADLINE):
        while not wanted <= answered:
            response = await http.get("/health/ready")
            assert response.status == 200, response
            answered.add(response.headers["relayd-worker"])


def worker_of(client: WsClient) -> str:
    headers = dict(client.connection.handshake_headers)
    return headers[b"relayd-worker"].decode()


# Sockets opened at most to find one on each worker: the kernel spreads connections at
# random, so that 16 land on one worker of two once in 2**15 runs.
MAX_TRIES = 16


async def one_socket_per_worker(stack: AsyncExitStack, url: str, count: int) -> dict[str, WsClient]:
    """Open sockets (no token yet) until one is on each of ``count`` workers; the others stay
    open, unused, until ``stack`` closes. Each connection is bounded by its own deadline."""
    sockets: dict[str, WsClient] = {}
    for _ in range(MAX_TRIES):
        client = await stack.enter_async_context(connect_url(url))
        sockets.setdefault(worker_of(client), client)
        if len(sockets) == count:
            return sockets
    raise AssertionError(f"{MAX_TRIES} sockets all landed on workers {sorted(sockets)}")


async def authenticated(client: WsClient, token: str) -> None:
    await client.send({"type": "auth", "token": token})
    frame = await client.next()
    assert frame["type"] == "connection", frame


async def test_two_workers_share_the_port_and_a_message_crosses_from_one_to_the_other(
    tmp_path: Path, redis_url: str
) -> None:
    # No RELAYD_SECRET: the signing secret is generated, once, by the supervisor.
    async with relayd_workers(workers_config(tmp_path, redis_url), 2, clean_env()) as workers:
        host, port = await workers.ready()
        http = HttpClient(host, port)
        await workers_answering(http, {"1", "2"})
        alice = await http.register("alice")
        bob = await http.register("bob")
        async with AsyncExitStack() as stack:
            on = await one_socket_per_worker(stack, f"ws://{host}:{port}/ws", 2)
            a, b = on["1"], on["2"]
            await authenticated(a, alice["access_token"])
            await authenticated(b, bob["access_token"])
            await a.send({"to": bob["uuid"], "msgid": "m1", "acknowledge": True, "content": "hi"})
            message = await b.next_of("message")
            assert (message["from"], message["content"]) == (alice["uuid"], "hi")
            await b.send({"type": "ack", "msgid": "m1"})
            update = await a.next_of("delivery_update")
            assert (update["msgid"], update["status"]) == ("m1", "acknowledged")
    generated = [line for line in workers.lines if "generated" in line["msg"]]
    assert [(line["logger"], "worker" in line) for line in generated] == [("relayd.auth", False)]
    for worker in (1, 2):
        own = workers.worker_lines(worker)
        assert any(line["msg"] == "relayd ready" for line in own)
        loaded = [line for line in own if line["msg"] == "signing secret loaded"]
        assert [line["from"] for line in loaded] == [str(tmp_path / "state" / "signing-secret")]


async def test_sigterm_drains_every_worker_and_the_supervisor_exits_0(
    tmp_path: Path, redis_url: str
) -> None:
    env = clean_env(RELAYD_SECRET=TEST_SECRET)
    async with relayd_workers(workers_config(tmp_path, redis_url), 2, env) as workers:
        host, port = await workers.ready()
        http = HttpClient(host, port)
        alice = await http.register("alice")
        bob = await http.register("bob")
        async with AsyncExitStack() as stack:
            on = await one_socket_per_worker(stack, f"ws://{host}:{port}/ws", 2)
            await authenticated(on["1"], alice["access_token"])
            await authenticated(on["2"], bob["access_token"])
            workers.process.send_signal(signal.SIGTERM)
            # Each worker closes its session as a drain does: 1001, going away.
            assert [await on[k].closed() for k in ("1", "2")] == [1001, 1001]
        assert await workers.wait() == 0
    exits = [line for line in workers.lines if line["msg"] == "worker exited"]
    assert sorted((line["worker"], line["code"]) for line in exits) == [(1, 0), (2, 0)]
    for worker in (1, 2):
        assert any(line["msg"] == "relayd stopped" for line in workers.worker_lines(worker))


async def test_a_worker_killed_with_sigkill_is_restarted_and_serves_again(
    tmp_path: Path, redis_url: str
) -> None:
    env = clean_env(RELAYD_SECRET=TEST_SECRET)
    async with relayd_workers(workers_config(tmp_path, redis_url), 2, env) as workers:
        host, port = await workers.ready()
        killed = workers.pid(1)
        os.kill(killed, signal.SIGKILL)
        exited = await workers.supervisor_says("worker exited unexpectedly", worker=1)
        assert (workers.lines[exited]["code"], workers.lines[exited]["signal"]) == (
            -signal.SIGKILL,
            "SIGKILL",
        )
        restart = await workers.supervisor_says("restarting worker", start=exited)
        assert workers.lines[restart]["delay_s"] == 0.5
        await workers.supervisor_says("worker ready", worker=1, start=restart)
        assert workers.pid(1) != killed
        # The new worker 1 answers on the shared port (the old one is gone).
        await workers_answering(HttpClient(host, port), {"1", "2"})
        workers.process.send_signal(signal.SIGTERM)
        assert await workers.wait() == 0


async def test_a_ctrl_c_to_the_foreground_group_drains_each_worker_once(
    tmp_path: Path, redis_url: str
) -> None:
    """A terminal sends SIGINT to its foreground process group: the workers, in a group of
    their own, get it once, from the supervisor (twice would stop them at once, exit 1)."""
    env = clean_env(RELAYD_SECRET=TEST_SECRET)
    config = workers_config(tmp_path, redis_url)
    async with relayd_workers(config, 2, env, own_group=True) as workers:
        await workers.ready()
        os.killpg(workers.process.pid, signal.SIGINT)
        assert await workers.wait() == 0
    for worker in (1, 2):
        said = [line["msg"] for line in workers.worker_lines(worker)]
        assert said.count("SIGINT received: draining (send it again to stop at once)") == 1
        assert "SIGINT received again: stopping now" not in said


async def test_supervisor_killed_its_workers_drain_and_exit(tmp_path: Path, redis_url: str) -> None:
    env = clean_env(RELAYD_SECRET=TEST_SECRET)
    async with relayd_workers(workers_config(tmp_path, redis_url), 2, env) as workers:
        await workers.ready()
        workers.process.kill()
        for worker in (1, 2):
            gone = await workers.worker_says(worker, "the supervisor is gone: draining")
            stopped = await workers.worker_says(worker, "relayd stopped")
            assert gone < stopped


async def test_the_sqlite_engine_refuses_workers_with_exit_code_2(tmp_path: Path) -> None:
    config = workers_config(tmp_path, None)
    with trio.fail_after(PROCESS_DEADLINE):
        result = await trio.run_process(
            [sys.executable, "-m", "relayd", "serve", "--config", str(config), "--workers", "2"],
            env=clean_env(RELAYD_SECRET=TEST_SECRET),
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 2
    assert result.stderr.decode() == (
        "relayd: configuration error:\n"
        'serve --workers 2 needs store.engine = "redis": one process owns a SQLite store'
        ' (docs/operations.md, "Several workers on one machine")\n'
    )
    assert not (tmp_path / "state").exists()  # refused before anything was done


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a unix socket's path is at most 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="rw-") as path:
        yield Path(path)


async def next_message(sock: trio.socket.SocketType, *, skip_watchdog: bool = True) -> list[str]:
    with trio.fail_after(PROCESS_DEADLINE):
        while True:
            fields = (await sock.recv(4096)).decode().split("\n")
            if fields != ["WATCHDOG=1"] or not skip_watchdog:
                return fields


async def test_systemd_hears_ready_when_both_workers_are_then_reloading_and_stopping(
    tmp_path: Path, redis_url: str, short_dir: Path
) -> None:
    """The supervisor plays the unit's main process: ``NOTIFY_SOCKET`` is a datagram socket
    this test owns, with a watchdog of 1 s (workers ping every 0.5 s)."""
    address = str(short_dir / "notify.sock")
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
    await sock.bind(address)
    env = clean_env(RELAYD_SECRET=TEST_SECRET, NOTIFY_SOCKET=address, WATCHDOG_USEC="1000000")
    with sock:
        async with relayd_workers(workers_config(tmp_path, redis_url), 2, env) as workers:
            ready = await next_message(sock)
            assert ready[0] == "READY=1"
            assert ready[1].startswith("STATUS=serving on http://127.0.0.1:")
            assert ready[1].endswith(" with 2 workers")
            # READY=1 went once both workers were ready: the supervisor heard both first.
            said = await workers.supervisor_says("relayd ready")
            heard = [
                workers.lines[i]["worker"]
                for i in range(said)
                if workers.lines[i].get("msg") == "worker ready"
            ]
            assert sorted(heard) == [1, 2]
            # The workers' pings reach systemd (a round of both, every 0.5 s).
            assert await next_message(sock, skip_watchdog=False) == ["WATCHDOG=1"]

            workers.process.send_signal(signal.SIGHUP)
            reloading = await next_message(sock)
            assert reloading[0] == "RELOADING=1"
            assert reloading[1].startswith("MONOTONIC_USEC=")
            assert await next_message(sock) == ["READY=1", "STATUS=reloaded"]
            said = await workers.supervisor_says("relayd reloaded")
            reloaded = [
                workers.lines[i]["worker"]
                for i in range(said)
                if workers.lines[i].get("msg") == "worker reloaded"
            ]
            assert sorted(reloaded) == [1, 2]

            workers.process.send_signal(signal.SIGTERM)
            assert await next_message(sock) == ["STOPPING=1", "STATUS=draining"]
            assert await workers.wait() == 0
    # The workers spoke to the supervisor only: every line the unit's socket got was its own.
    assert not any(line["msg"].startswith("cannot notify") for line in workers.lines)
