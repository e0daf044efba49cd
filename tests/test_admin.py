"""``relayd admin`` (through the running daemon, or its store when stopped) and
``relayd backup`` (a store a fresh relayd starts from, clients and queued messages intact)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from relayd import Config
from relayd._admin import REDIS_BACKUP
from relayd._relay.frames import CloseCode

from .support import SQLITE, TEST_ENV, Engine, HttpClient, RunningRelayd, make_config, start_relayd
from .ws_support import ws_connect

DEADLINE = 30.0


def file_config(state: Path, engine: Engine = SQLITE, **sections: Any) -> Config:
    """A store that outlives the daemon, on ``engine``: on SQLite a file in ``state``."""
    return make_config(
        state.parent,
        {"state_dir": str(state), "store": {"path": "relayd.sqlite3"}, **sections},
        engine,
    )


def config_file(tmp_path: Path, state: Path, listen: str, engine: Engine = SQLITE) -> Path:
    """The configuration file of :func:`file_config`'s daemon, for the ``relayd`` commands."""
    path = tmp_path / "cli.toml"
    path.write_text(
        f'state_dir = "{state}"\n[http]\nlisten = "{listen}"\n'
        f'[store]\n{engine.toml}path = "relayd.sqlite3"\n[auth]\nkdf_cost = 1024\n'
    )
    return path


async def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    env = {"PATH": os.environ.get("PATH", ""), **TEST_ENV}
    with trio.fail_after(DEADLINE):
        return await trio.run_process(
            [sys.executable, "-m", "relayd", *args],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def queue_for(relayd: RunningRelayd, sender: dict[str, Any], to: str, count: int) -> None:
    async with ws_connect(relayd, sender["access_token"]) as socket:
        await socket.next()
        for i in range(count):
            await socket.send({"to": to, "msgid": f"m{i}", "acknowledge": True, "content": str(i)})
            assert (await socket.next())["status"] == "queued_offline"


async def test_admin_through_the_daemon_then_through_the_store(
    tmp_path: Path, engine: Engine
) -> None:
    state = tmp_path / "state"
    async with trio.open_nursery() as nursery:
        relayd = await start_relayd(nursery, file_config(state, engine))
        host, port = relayd.addresses.http
        config = config_file(tmp_path, state, f"{host}:{port}", engine)
        alice = await relayd.http.register("alice")
        bob = await relayd.http.register("bob")
        await queue_for(relayd, alice, bob["uuid"], 3)
        async with ws_connect(relayd, alice["access_token"]) as socket:
            await socket.next()
            listed = await cli("admin", "clients", "--config", str(config))
            assert listed.returncode == 0, listed.stderr
            rows = {line.split()[0]: line.split() for line in listed.stdout.decode().splitlines()}
            assert rows[alice["uuid"]][1:] == ["yes", "0", "alice"]
            assert rows[bob["uuid"]][1:] == ["no", "3", "bob"]
            queues = await cli("admin", "queues", "--config", str(config))
            assert queues.stdout.decode().split() == [bob["uuid"], "3"]
            revoked = await cli("admin", "revoke", alice["uuid"], "--config", str(config))
            assert revoked.returncode == 0, revoked.stderr
            assert await socket.closed() == CloseCode.REVOKED
        relayd.daemon.stop()

    # relayd is stopped: the same commands work on the store.
    listed = await cli("admin", "clients", "--config", str(config))
    assert listed.returncode == 0, listed.stderr
    assert b"online state unknown" in listed.stderr
    assert f"{bob['uuid']}  -            3  bob".encode() in listed.stdout
    deleted = await cli("admin", "delete", bob["uuid"], "--config", str(config))
    assert deleted.returncode == 0, deleted.stderr
    listed = await cli("admin", "clients", "--config", str(config))
    assert bob["uuid"].encode() not in listed.stdout
    missing = await cli("admin", "revoke", bob["uuid"], "--config", str(config))
    assert (missing.returncode, b"no client" in missing.stderr) == (1, True)
    bad = await cli("admin", "revoke", "not-a-uuid", "--config", str(config))
    assert bad.returncode == 2


@pytest.mark.sqlite_only("relayd backup copies a SQLite store; Redis has its own (operations.md)")
async def test_backup_while_running_restores_clients_and_queued_messages(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    target = tmp_path / "backup.sqlite3"
    async with trio.open_nursery() as nursery:
        relayd = await start_relayd(nursery, file_config(state))
        config = config_file(tmp_path, state, "127.0.0.1:0")
        alice = await relayd.http.register("alice")
        bob = await relayd.http.register("bob")
        await queue_for(relayd, alice, bob["uuid"], 3)
        result = await cli("backup", str(target), "--config", str(config))
        assert result.returncode == 0, result.stderr
        assert b"2 clients, 3 queued messages" in result.stderr
        assert (target.stat().st_mode & 0o777) == 0o600
        again = await cli("backup", str(target), "--config", str(config))
        assert (again.returncode, b"does not overwrite" in again.stderr) == (1, True)
        relayd.daemon.stop()

    fresh = tmp_path / "fresh"
    fresh.mkdir(mode=0o700)
    shutil.copy(target, fresh / "relayd.sqlite3")
    # Message content is encrypted at rest: a restore needs the key file, kept apart.
    shutil.copy(state / "store-keys", fresh / "store-keys")
    async with trio.open_nursery() as nursery:
        relayd = await start_relayd(nursery, file_config(fresh))
        http: HttpClient = relayd.http
        login = await http.post(
            "/auth/token", {"uuid": bob["uuid"], "client_secret": bob["client_secret"]}
        )
        assert login.status == 200, login
        async with ws_connect(relayd, login.json()["access_token"]) as socket:
            assert (await socket.next())["type"] == "connection"
            got = [await socket.next() for _ in range(3)]
            assert [(m["msgid"], m["from"]) for m in got] == [
                (f"m{i}", alice["uuid"]) for i in range(3)
            ]
        listed = await http.get("/clients", token=login.json()["access_token"])
        assert set(listed.json()["clients"]) == {alice["uuid"], bob["uuid"]}
        relayd.daemon.stop()


async def test_backup_on_the_redis_engine_says_how_redis_is_backed_up(
    tmp_path: Path, redis_url: str
) -> None:
    config = config_file(tmp_path, tmp_path / "state", "127.0.0.1:0", Engine("redis", redis_url))
    target = tmp_path / "backup.sqlite3"
    result = await cli("backup", str(target), "--config", str(config))
    assert result.returncode == 1, result.stderr
    assert result.stderr.decode() == f"relayd: {REDIS_BACKUP}\n"
    assert not target.exists()


@pytest.mark.sqlite_only("the state directory's lock says a daemon runs; Redis nodes take none")
async def test_admin_leaves_the_store_alone_while_the_daemon_runs_out_of_reach(
    tmp_path: Path,
) -> None:
    """Nothing answers at the address in the config, yet the daemon runs (it listens
    elsewhere): the command must not write to the store under it, and says why."""
    state = tmp_path / "state"
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        elsewhere = probe.getsockname()[1]
    async with trio.open_nursery() as nursery:
        relayd = await start_relayd(nursery, file_config(state))
        alice = await relayd.http.register("alice")
        config = config_file(tmp_path, state, f"127.0.0.1:{elsewhere}")
        deleted = await cli("admin", "delete", alice["uuid"], "--config", str(config))
        stderr = deleted.stderr.decode()
        assert deleted.returncode == 1, stderr
        assert f"nothing answers at http://127.0.0.1:{elsewhere}, but relayd serve (pid" in stderr
        assert f"(pid {os.getpid()} on {socket.gethostname()}, started " in stderr
        assert "pass --url" in stderr
        # Alice was not deleted behind the daemon's back.
        login = await relayd.http.post(
            "/auth/token", {"uuid": alice["uuid"], "client_secret": alice["client_secret"]}
        )
        assert login.status == 200, login
        relayd.daemon.stop()
