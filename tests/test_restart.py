"""What relayd promises survives a restart on a store that outlives the daemon (a SQLite file,
or a Redis database): clients, secrets, refresh families and revocations.

Each phase runs a daemon in a nursery of its own and stops it with ``Daemon.stop()``; the phase
ends when ``Daemon.run`` has returned (the nursery exits), so the next daemon opens a store the
previous one has closed. Both daemons share one :class:`MillisecondClock` (see test_rest.py for
why these tests do not run on the raw wall clock).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from relayd import Addresses, Config, Daemon

from .support import TEST_ENV, Engine, HttpClient, HttpResponse, RunningRelayd, make_config

# Start, serve a phase and drain; generous, but bounded.
PHASE_DEADLINE = 30.0


class MillisecondClock:
    """The wall clock on whole, strictly increasing milliseconds."""

    def __init__(self) -> None:
        self._last = 0.0

    def __call__(self) -> float:
        now = max(round(time.time(), 3), round(self._last + 0.001, 3))
        self._last = now
        return now


@asynccontextmanager
async def running(config: Config, clock: MillisecondClock) -> AsyncIterator[RunningRelayd]:
    """relayd for the body of the ``async with``; on exit, stop it and wait for ``run``."""
    with trio.fail_after(PHASE_DEADLINE):
        async with trio.open_nursery() as inner:
            daemon = Daemon(config, environ=TEST_ENV, clock=clock)
            addresses: Addresses = await inner.start(daemon.run)
            try:
                yield RunningRelayd(daemon, addresses)
            finally:
                daemon.stop()


def file_config(tmp_path: Path, engine: Engine) -> Config:
    """A store that outlives the daemon on ``engine``: on SQLite a file under ``state_dir``,
    on Redis the test's database."""
    config = make_config(tmp_path, {"store": {"path": "relayd.sqlite3"}}, engine)
    assert Path(config.store_path).parent == tmp_path / "state"
    return config


def ok(response: HttpResponse) -> dict[str, Any]:
    assert response.status == 200, response
    doc: dict[str, Any] = response.json()
    return doc


def error_code(response: HttpResponse, status: int) -> str:
    assert response.status == status, response
    doc = response.json()
    assert set(doc) == {"error"}, doc
    assert set(doc["error"]) == {"code", "message", "details"}, doc
    code: str = doc["error"]["code"]
    return code


async def refresh(http: HttpClient, token: str) -> HttpResponse:
    return await http.post("/auth/refresh", {"refresh_token": token})


async def test_clients_and_tokens_survive_a_restart(tmp_path: Path, engine: Engine) -> None:
    config = file_config(tmp_path, engine)
    clock = MillisecondClock()
    async with running(config, clock) as relayd:
        alice = await relayd.http.register("alice")
        bob = await relayd.http.register("bob")
    if engine.name == "sqlite":
        assert await trio.Path(config.store_path).is_file()

    async with running(config, clock) as relayd:
        http = relayd.http
        # The access token issued by the first daemon still authenticates...
        listed = ok(await http.get("/clients", token=alice["access_token"]))
        # ...and the directory still has both clients, as they were.
        assert listed["clients"] == {alice["uuid"]: "alice", bob["uuid"]: "bob"}
        assert listed["items"][0] == {
            "uuid": alice["uuid"],
            "name": "alice",
            "created_at": alice["created_at"],
            "last_seen": None,
            "online": False,
        }
        # The secret still logs in.
        login = ok(
            await http.post(
                "/auth/token", {"uuid": alice["uuid"], "client_secret": alice["client_secret"]}
            )
        )
        ok(await http.get("/clients", token=login["access_token"]))
        # The refresh family still rotates, and still knows which token is spent.
        rotated = ok(await refresh(http, alice["refresh_token"]))
        ok(await http.get("/clients", token=rotated["access_token"]))
        assert error_code(await refresh(http, alice["refresh_token"]), 401) == "refresh_reused"
        # The UUID is still taken.
        taken = await http.post("/register", {"name": "eve", "uuid": alice["uuid"]})
        assert error_code(taken, 409) == "uuid_taken"
        # Bob's tokens are his own: untouched by alice's reuse.
        ok(await refresh(http, bob["refresh_token"]))


async def test_a_rotation_before_the_restart_is_remembered(tmp_path: Path, engine: Engine) -> None:
    config = file_config(tmp_path, engine)
    clock = MillisecondClock()
    async with running(config, clock) as relayd:
        alice = await relayd.http.register("alice")
        rotated = ok(await refresh(relayd.http, alice["refresh_token"]))

    async with running(config, clock) as relayd:
        # The token spent before the restart is still spent: reuse.
        reused = await refresh(relayd.http, alice["refresh_token"])
        assert error_code(reused, 401) == "refresh_reused"
        # Reuse revoked the family, including its newest token.
        newest = await refresh(relayd.http, rotated["refresh_token"])
        assert error_code(newest, 401) == "token_revoked"


async def test_revocations_survive_a_restart(tmp_path: Path, engine: Engine) -> None:
    config = file_config(tmp_path, engine)
    clock = MillisecondClock()
    async with running(config, clock) as relayd:
        http = relayd.http
        alice = await http.register("alice")
        kept = ok(
            await http.post(
                "/auth/token", {"uuid": alice["uuid"], "client_secret": alice["client_secret"]}
            )
        )
        # Log out alice's first login, and revoke its access token.
        ok(await http.post("/auth/revoke", {"refresh_token": alice["refresh_token"]}))
        ok(await http.post("/auth/revoke", {"access_token": alice["access_token"]}))
        assert error_code(await refresh(http, alice["refresh_token"]), 401) == "token_revoked"

    async with running(config, clock) as relayd:
        http = relayd.http
        assert error_code(await refresh(http, alice["refresh_token"]), 401) == "token_revoked"
        revoked = await http.get("/clients", token=alice["access_token"])
        assert error_code(revoked, 401) == "token_revoked"
        # What was not revoked still works.
        ok(await http.get("/clients", token=kept["access_token"]))
        ok(await refresh(http, kept["refresh_token"]))


async def test_deletion_and_admin_revocation_survive_a_restart(
    tmp_path: Path, engine: Engine
) -> None:
    config = file_config(tmp_path, engine)
    clock = MillisecondClock()
    async with running(config, clock) as relayd:
        http = relayd.http
        alice = await http.register("alice")
        bob = await http.register("bob")
        services = relayd.daemon.services
        assert services is not None
        admin = services.auth.mint_operator_token("ops", ("admin",), 600).token
        ok(await http.post(f"/admin/clients/{bob['uuid']}/revoke", token=admin))
        ok(await http.delete(f"/clients/{alice['uuid']}", token=alice["access_token"]))

    async with running(config, clock) as relayd:
        http = relayd.http
        assert error_code(await refresh(http, bob["refresh_token"]), 401) == "token_revoked"
        revoked = await http.get("/clients", token=bob["access_token"])
        assert error_code(revoked, 401) == "token_revoked"
        login = ok(
            await http.post(
                "/auth/token", {"uuid": bob["uuid"], "client_secret": bob["client_secret"]}
            )
        )
        listed = ok(await http.get("/clients", token=login["access_token"]))
        assert listed["clients"] == {bob["uuid"]: "bob"}
        taken = await http.post("/register", {"name": "alice", "uuid": alice["uuid"]})
        assert error_code(taken, 409) == "uuid_taken"
