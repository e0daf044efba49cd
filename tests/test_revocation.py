"""Revocation end to end: a revoked token is refused on every path at once, and the live
session that runs on it is closed with 4003 at once, on both transports and both engines, and
across a restart.

A login is a refresh family: its refresh tokens and the access tokens issued with them carry
the same ``fam``. Presenting a spent refresh token again (reuse) and logging out revoke the
login; ``POST /auth/revoke`` with an access token revokes that one token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from relayd._relay.frames import CloseCode

from .support import TRANSPORTS, Engine, HttpClient, RunningRelayd, start_on
from .test_restart import MillisecondClock, file_config, running
from .ws_support import WsClient, welcomed, ws_connect


@pytest.fixture(params=TRANSPORTS)
async def relayd(
    request: pytest.FixtureRequest, nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> RunningRelayd:
    return await start_on(nursery, tmp_path, request.param, engine)


async def refresh(http: HttpClient, refresh_token: str) -> dict[str, Any]:
    response = await http.post("/auth/refresh", {"refresh_token": refresh_token})
    assert response.status == 200, response
    doc: dict[str, Any] = response.json()
    return doc


async def refused(http: HttpClient, access_token: str) -> str:
    """The error code ``GET /clients`` answers with 401 for ``access_token``."""
    response = await http.get("/clients", token=access_token)
    assert response.status == 401, response
    return response.error_code


async def revoked_and_closed(client: WsClient, reason: str) -> None:
    frame = await client.next()
    assert frame["type"] == "error", frame
    assert frame["error"]["code"] == "token_revoked"
    assert frame["error"]["details"] == {"reason": reason}
    assert await client.closed() == CloseCode.REVOKED


async def refused_at_connect(relayd: RunningRelayd, access_token: str) -> None:
    async with ws_connect(relayd, access_token) as client:
        frame = await client.next()
        assert frame["error"]["code"] == "token_revoked", frame
        assert await client.closed() == CloseCode.AUTH_FAILED


async def test_refresh_reuse_refuses_every_access_token_of_the_login_and_closes_its_session(
    relayd: RunningRelayd,
) -> None:
    http = relayd.http
    alice = await http.register("alice")
    first_access, spent = alice["access_token"], alice["refresh_token"]
    second = await refresh(http, spent)
    async with ws_connect(relayd, first_access) as session:
        await welcomed(session)
        reuse = await http.post("/auth/refresh", {"refresh_token": spent})
        assert reuse.status == 401
        assert reuse.error_code == "refresh_reused"
        await revoked_and_closed(session, "refresh_reused")
    # Older and newer access tokens of the login: refused on REST and on the socket.
    for access in (first_access, second["access_token"]):
        assert await refused(http, access) == "token_revoked"
        await refused_at_connect(relayd, access)
    # And the newest refresh token too: the whole login is gone.
    again = await http.post("/auth/refresh", {"refresh_token": second["refresh_token"]})
    assert again.status == 401
    assert again.error_code == "token_revoked"


async def test_another_login_of_the_same_client_is_untouched(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice = await http.register("alice")
    login = await http.post(
        "/auth/token", {"uuid": alice["uuid"], "client_secret": alice["client_secret"]}
    )
    assert login.status == 200
    other = login.json()
    async with ws_connect(relayd, other["access_token"]) as session:
        await welcomed(session)
        await refresh(http, alice["refresh_token"])
        reuse = await http.post("/auth/refresh", {"refresh_token": alice["refresh_token"]})
        assert reuse.error_code == "refresh_reused"
        assert await refused(http, alice["access_token"]) == "token_revoked"
        # The other login's session carries on: it answers a ping frame.
        await session.send({"type": "ping"})
        assert (await session.next())["type"] == "pong"
    assert (await http.get("/clients", token=other["access_token"])).status == 200


async def test_logging_out_closes_the_session_running_on_the_login(
    relayd: RunningRelayd,
) -> None:
    http = relayd.http
    alice = await http.register("alice")
    async with ws_connect(relayd, alice["access_token"]) as session:
        await welcomed(session)
        out = await http.post("/auth/revoke", {"refresh_token": alice["refresh_token"]})
        assert out.status == 200
        await revoked_and_closed(session, "logged_out")
    assert await refused(http, alice["access_token"]) == "token_revoked"


async def test_revoking_an_access_token_closes_the_session_using_it_at_once(
    relayd: RunningRelayd,
) -> None:
    http = relayd.http
    alice = await http.register("alice")
    spare = await refresh(http, alice["refresh_token"])
    async with ws_connect(relayd, alice["access_token"]) as session:
        await welcomed(session)
        # Revoking another token of the same login leaves this session alone...
        out = await http.post("/auth/revoke", {"access_token": spare["access_token"]})
        assert out.status == 200
        await session.send({"type": "ping"})
        assert (await session.next())["type"] == "pong"
        # ...revoking its own closes it.
        out = await http.post("/auth/revoke", {"access_token": alice["access_token"]})
        assert out.status == 200
        await revoked_and_closed(session, "token_revoked")
    await refused_at_connect(relayd, alice["access_token"])


async def test_a_login_revoked_by_reuse_stays_revoked_across_a_restart(
    tmp_path: Path, engine: Engine
) -> None:
    config = file_config(tmp_path, engine)
    clock = MillisecondClock()
    async with running(config, clock) as relayd:
        http = relayd.http
        alice = await http.register("alice")
        second = await refresh(http, alice["refresh_token"])
        reuse = await http.post("/auth/refresh", {"refresh_token": alice["refresh_token"]})
        assert reuse.error_code == "refresh_reused"
    async with running(config, clock) as relayd:
        for access in (alice["access_token"], second["access_token"]):
            assert await refused(relayd.http, access) == "token_revoked"
            await refused_at_connect(relayd, access)
