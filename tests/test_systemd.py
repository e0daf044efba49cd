"""relayd tells systemd the truth: READY=1 once it serves, STOPPING=1 when it drains, and
WATCHDOG=1 at half of WatchdogSec, to a notify socket this test owns.

The daemon runs under ``autojump_clock`` (store inline, token clock virtual) so the watchdog's
pings land at exact virtual instants.
"""

from __future__ import annotations

import logging
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
