"""One relayd per state directory: ``state_dir/relayd.lock`` (see ``relayd/_lock.py``).

Two daemons on one store split delivery between them; the second must refuse to start and
name the first. ``relayd admin`` on a stopped daemon's store takes the lock too, so that no
daemon starts under its writes. (Subprocess daemons, ``kill -9`` and the CLI's exit code are in
test_cli.py; an admin command facing a running daemon it cannot reach is in test_admin.py.)
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import trio

from relayd import Config, Daemon
from relayd._admin import Admin
from relayd._lock import LOCK_FILE, Holder, StateDirLocked
from relayd._store import Store
from relayd._tokens import TokenCodec

from .support import IO_DEADLINE, TEST_ENV, TEST_SECRET, make_config, start_relayd


def iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


async def run_briefly(config: Config) -> None:
    """Run a daemon that stops as soon as it is ready (asked to before it starts)."""
    daemon = Daemon(config, environ=TEST_ENV)
    daemon.stop()
    with trio.fail_after(IO_DEADLINE):
        await daemon.run()


async def test_a_second_daemon_on_the_same_state_dir_refuses_to_start_naming_the_first(
    tmp_path: Path,
) -> None:
    # A :memory: store: the lock is about the state directory, whatever the store.
    config = make_config(tmp_path)
    lock_file = config.state_path / LOCK_FILE
    before = time.time()
    with trio.fail_after(IO_DEADLINE):
        async with trio.open_nursery() as nursery:
            first = await start_relayd(nursery, config)
            record = lock_file.read_text()
            holder = Holder.from_json(record)
            assert holder is not None, record
            assert (holder.command, holder.pid, holder.host) == (
                "serve",
                os.getpid(),
                socket.gethostname(),
            )
            assert before <= holder.started <= time.time()

            with pytest.raises(StateDirLocked) as refused:
                await start_relayd(nursery, config)
            assert refused.value.holder == holder
            message = str(refused.value)
            named = f"relayd serve (pid {os.getpid()} on {socket.gethostname()}, started "
            assert f"{named}{iso(holder.started)})" in message, message
            assert str(lock_file) in message
            # The refused daemon left the record and the first daemon alone.
            assert lock_file.read_text() == record
            assert (await first.http.get("/health/ready")).status == 200
            first.daemon.stop()

    # A clean stop releases the lock: the next daemon starts and names itself.
    await run_briefly(config)


def unused_port() -> int:
    """A loopback port nothing listens on (just bound and released by this process)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_admin_on_a_stopped_daemon_holds_the_lock_while_it_uses_the_store(
    tmp_path: Path,
) -> None:
    config = make_config(
        tmp_path,
        {"http": {"listen": f"127.0.0.1:{unused_port()}"}, "store": {"path": "relayd.sqlite3"}},
    )
    config.state_path.mkdir(mode=0o700)

    async def create_store() -> None:
        async with Store.open(config.store_path, synchronous="full"):
            pass

    trio.run(create_store)
    codec = TokenCodec(
        TEST_SECRET.encode(), issuer="relayd", audience="relayd", leeway=0.0, clock=time.time
    )
    with Admin(config, codec, None) as admin:
        assert admin.clients() == []
        assert admin.offline
        # While the admin command works on the store, no daemon can start on it.
        with pytest.raises(StateDirLocked, match=rf"relayd admin \(pid {os.getpid()} on "):
            trio.run(run_briefly, config)
    trio.run(run_briefly, config)
