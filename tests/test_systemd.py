"""relayd tells systemd the truth: READY=1 once it serves, STOPPING=1 when it drains, and
WATCHDOG=1 at half of WatchdogSec, to a notify socket this test owns.

The daemon runs under ``autojump_clock`` (store inline, token clock virtual) so the watchdog's
pings land at exact virtual instants.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from relayd import Addresses, Daemon
from relayd._store import inline_executor
from relayd._systemd import Notifier

from .hub_support import virtual_clock
from .support import TEST_ENV, HttpClient, make_config


async def test_notify_sequence_ready_watchdog_stopping(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    address = str(tmp_path / "notify.sock")
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
    await sock.bind(address)
    received: list[tuple[float, list[str]]] = []

    async def listen() -> None:
        while True:
            data = await sock.recv(4096)
            received.append((trio.current_time(), data.decode().split("\n")))

    environ = {**TEST_ENV, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "4000000"}
    daemon = Daemon(
        make_config(tmp_path),
        environ=environ,
        clock=virtual_clock,
        store_executor=inline_executor,
    )
    with sock:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen)
            addresses: Addresses = await nursery.start(daemon.run)
            t0 = trio.current_time()
            # Ready means ready: the HTTP port answers by the time systemd hears READY=1.
            assert (await HttpClient(*addresses.http).get("/health/ready")).status == 200
            await trio.sleep(5.0)
            daemon.stop()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    kinds = [fields[0] for _, fields in received]
    assert kinds[0] == "READY=1"
    assert received[0][1][1].startswith("STATUS=serving on http://127.0.0.1:")
    assert kinds[-1] == "STOPPING=1"
    # Half of WatchdogSec: every 2 s from the start, until the stop at t0 + 5.
    pings = [at for at, fields in received if fields == ["WATCHDOG=1"]]
    assert pings == [t0, t0 + 2.0, t0 + 4.0]


def test_abstract_socket_names_and_watchdog_settings() -> None:
    notifier = Notifier({"NOTIFY_SOCKET": "@relayd/notify", "WATCHDOG_USEC": "30000000"})
    assert notifier.address == "\0relayd/notify"
    assert notifier.watchdog_interval == 15.0
    # A watchdog meant for another process (WATCHDOG_PID) is not ours to ping.
    other = Notifier({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None
    assert not Notifier({}).enabled


def test_a_vanished_notify_socket_is_logged_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with caplog.at_level(logging.WARNING, logger="relayd"):
        notifier.ready("serving")  # no listener: a warning, no exception
    assert "cannot notify systemd" in caplog.text


UNIT = Path(__file__).parent.parent / "contrib" / "relayd.service"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


async def test_relayd_started_as_the_unit_starts_it_reports_ready_then_stopping(
    tmp_path: Path,
) -> None:
    """``relayd serve`` with the unit's environment (state directory, the secret as a
    credential, the watchdog) and a notify socket, as systemd runs it under Type=notify."""
    unit = unit_settings()
    assert unit["Type"] == ["notify"]
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "signing-secret").write_text(TEST_ENV["RELAYD_SECRET"])
    state = tmp_path / "state"
    environ = dict(
        entry.replace("%d", str(credentials)).split("=", 1) for entry in unit["Environment"]
    )
    environ["RELAYD_STATE_DIR"] = str(state)  # the unit's StateDirectory, here
    watchdog_sec = float(unit["WatchdogSec"][0].removesuffix("s"))
    exec_start = unit["ExecStart"][0].split()
    assert exec_start[1:3] == ["serve", "--config"]
    config = tmp_path / "relayd.toml"
    config.write_text('[http]\nlisten = "127.0.0.1:0"\n[auth]\nkdf_cost = 1024\n')
    address = str(tmp_path / "notify.sock")
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
    await sock.bind(address)
    env = {
        "PATH": os.environ.get("PATH", ""),
        **environ,
        "NOTIFY_SOCKET": address,
        "WATCHDOG_USEC": str(int(watchdog_sec * 1e6)),
    }
    with sock, trio.fail_after(30):
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "relayd", "serve", "--config", str(config)],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        try:
            messages = [(await sock.recv(4096)).decode().split("\n") for _ in range(2)]
            ready = next(m for m in messages if m[0] == "READY=1")
            assert ready[1].startswith("STATUS=serving on http://127.0.0.1:")
            assert ["WATCHDOG=1"] in messages
            assert (state / "relayd.sqlite3").exists()
            process.send_signal(signal.SIGTERM)
            while (message := (await sock.recv(4096)).decode().split("\n")) == ["WATCHDOG=1"]:
                pass
            assert message == ["STOPPING=1", "STATUS=draining"]
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
