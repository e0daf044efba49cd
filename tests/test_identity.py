"""The identity lifecycle (issue 15): registering an existing UUID again with proof, rotating a
client's secret, an admin's reset of a lost one, and invite-only registration. Against a real
relayd on a loopback port; the admin commands as subprocesses, live and on the stopped store."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from relayd import _kdf

from .store_support import Target, at_rest_holding
from .support import Engine, HttpClient, HttpResponse, RunningRelayd, start_relayd
from .test_admin import cli, config_file, file_config
from .test_rest import (
    REGISTER_KEYS,
    SOME_UUID,
    TOKEN_KEYS,
    admin_token,
    assert_error,
    assert_ok,
    assert_token_pair,
    assert_token_refused,
    assert_token_works,
    login,
    start_daemon,
)
from .test_revocation import revoked_and_closed
from .ws_support import welcomed, ws_connect

AGAIN_KEYS = REGISTER_KEYS - {"client_secret"}


class ManualClock:
    """A wall clock that stands still until the test moves it (whole milliseconds)."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now = round(self.now + 0.001, 3)
        return self.now


async def register_again(
    http: HttpClient, uuid: str, name: str = "alice", *, token: str | None = None, **body: Any
) -> Any:
    return await http.post("/register", {"name": name, "uuid": uuid, **body}, token=token)


# --- registering an existing UUID again --------------------------------------------------------


async def test_registering_again_with_the_secret_is_a_new_login(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice = await http.register("alice", uuid=SOME_UUID)
    doc = assert_ok(
        await register_again(http, SOME_UUID, "alice's phone", client_secret=alice["client_secret"])
    )
    assert set(doc) == AGAIN_KEYS
    assert (doc["uuid"], doc["name"], doc["created"]) == (SOME_UUID, "alice's phone", False)
    assert doc["created_at"] == alice["created_at"]
    assert_token_pair(doc, now=alice["created_at"])
    await assert_token_works(http, doc["access_token"])
    # A new login beside the old one: the first tokens and the secret still work.
    await assert_token_works(http, alice["access_token"])
    assert doc["refresh_token"] != alice["refresh_token"]
    await login(http, SOME_UUID, alice["client_secret"])
    found = assert_ok(await http.get(f"/clients/{SOME_UUID}", token=doc["access_token"]))
    assert found["name"] == "alice's phone"


async def test_registering_again_with_an_own_access_token(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice = await http.register("alice", uuid=SOME_UUID)
    doc = assert_ok(await register_again(http, SOME_UUID.upper(), token=alice["access_token"]))
    assert set(doc) == AGAIN_KEYS
    assert (doc["uuid"], doc["created"]) == (SOME_UUID, False)
    await assert_token_works(http, doc["access_token"])


async def test_registering_again_with_a_wrong_proof_is_refused(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice = await http.register("alice", uuid=SOME_UUID)
    bob = await http.register("bob")
    wrong = await register_again(http, SOME_UUID, "mallory", client_secret=bob["client_secret"])
    assert_error(wrong, 401, "invalid_client")
    someone_else = await register_again(http, SOME_UUID, "mallory", token=bob["access_token"])
    assert_error(someone_else, 409, "uuid_taken")
    garbage = await register_again(http, SOME_UUID, "mallory", token="not-a-jwt")
    assert_error(garbage, 401, "token_invalid")
    assert_ok(await http.post("/auth/revoke", {"access_token": alice["access_token"]}))
    revoked = await register_again(http, SOME_UUID, "mallory", token=alice["access_token"])
    assert_error(revoked, 401, "token_revoked")
    # Nothing changed hands: the name is alice's, and only alice's secret logs in.
    fresh = await login(http, SOME_UUID, alice["client_secret"])
    found = assert_ok(await http.get(f"/clients/{SOME_UUID}", token=fresh["access_token"]))
    assert found["name"] == "alice"


async def test_a_deleted_uuid_stays_taken_even_with_its_old_secret(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice = await http.register("alice", uuid=SOME_UUID)
    assert_ok(await http.delete(f"/clients/{SOME_UUID}", token=alice["access_token"]))
    again = await register_again(http, SOME_UUID, client_secret=alice["client_secret"])
    assert_error(again, 409, "uuid_taken")


async def test_proof_for_a_uuid_never_registered_registers_it(relayd: RunningRelayd) -> None:
    doc = assert_ok(await register_again(relayd.http, SOME_UUID, client_secret="made-up"))
    assert set(doc) == REGISTER_KEYS
    assert (doc["uuid"], doc["created"]) == (SOME_UUID, True)
    assert doc["client_secret"] != "made-up"


async def test_proof_works_when_registration_is_closed(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start_daemon(nursery, tmp_path, engine, {"auth": {"registration": "closed"}})
    http = relayd.http
    made = await http.post(
        "/register", {"name": "alice", "uuid": SOME_UUID}, token=admin_token(relayd)
    )
    alice = assert_ok(made)
    again = await register_again(http, SOME_UUID, client_secret=alice["client_secret"])
    assert assert_ok(again)["created"] is False
    newcomer = await http.post("/register", {"name": "bob", "client_secret": "x"})
    assert_error(newcomer, 403, "registration_closed")


# --- rotating a secret --------------------------------------------------------------------------


async def test_rotating_with_the_current_secret(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice = await http.register("alice")
    path = f"/clients/{alice['uuid']}/secret"
    doc = assert_ok(await http.post(path, {"client_secret": alice["client_secret"]}))
    assert set(doc) == {"uuid", "client_secret"}
    assert doc["client_secret"] != alice["client_secret"]
    await login(http, alice["uuid"], doc["client_secret"])
    old = await http.post(
        "/auth/token", {"uuid": alice["uuid"], "client_secret": alice["client_secret"]}
    )
    assert_error(old, 401, "invalid_client")
    # Without revoke_tokens, what was issued before keeps working.
    await assert_token_works(http, alice["access_token"])
    # The old secret no longer proves anything, here either.
    assert_error(await http.post(path, {"client_secret": alice["client_secret"]}), 401)


async def test_rotating_with_an_access_token(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice = await http.register("alice")
    bob = await http.register("bob")
    path = f"/clients/{alice['uuid']}/secret"
    doc = assert_ok(await http.post(path, {}, token=alice["access_token"]))
    await login(http, alice["uuid"], doc["client_secret"])
    assert_error(await http.post(path, {}, token=bob["access_token"]), 403, "not_yours")
    assert_error(await http.post(path, {}), 401, "missing_token")
    assert_error(await http.post(path, {}, token=admin_token(relayd)), 403, "not_yours")
    unknown = await http.post(f"/clients/{SOME_UUID}/secret", {"client_secret": "guess"})
    assert_error(unknown, 401, "invalid_client")
    assert_error(await http.post(path, {"revoke_tokens": "yes"}), 422)


async def test_rotating_with_revoke_tokens_ends_every_earlier_token_and_session(
    relayd: RunningRelayd,
) -> None:
    http = relayd.http
    alice = await http.register("alice")
    async with ws_connect(relayd, alice["access_token"]) as session:
        await welcomed(session)
        rotated = await http.post(
            f"/clients/{alice['uuid']}/secret",
            {"client_secret": alice["client_secret"], "revoke_tokens": True},
        )
        doc = assert_ok(rotated)
        assert set(doc) == {"uuid", "client_secret"} | TOKEN_KEYS - {"uuid"}
        await revoked_and_closed(session, "secret_rotated")
    await assert_token_refused(http, alice["access_token"])
    refused = await http.post("/auth/refresh", {"refresh_token": alice["refresh_token"]})
    assert_error(refused, 401, "token_revoked")
    await assert_token_works(http, doc["access_token"])
    assert_ok(await http.post("/auth/refresh", {"refresh_token": doc["refresh_token"]}))
    async with ws_connect(relayd, doc["access_token"]) as session:
        await welcomed(session)


async def test_rotation_is_limited_like_logins(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start_daemon(nursery, tmp_path, engine, {"http": {"auth_burst": 2}})
    http = relayd.http
    alice = await http.register("alice")
    path = f"/clients/{alice['uuid']}/secret"
    for _ in range(2):
        assert_error(await http.post(path, {"client_secret": "guess"}), 401, "invalid_client")
    assert_error(await http.post(path, {"client_secret": alice["client_secret"]}), 429)


# --- an admin's reset ---------------------------------------------------------------------------


async def test_an_admin_resets_a_lost_secret(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice = await http.register("alice")
    bob = await http.register("bob")
    path = f"/admin/clients/{alice['uuid']}/reset-secret"
    assert_error(await http.post(path, token=bob["access_token"]), 403, "admin_required")
    assert_error(await http.post(path, token=alice["access_token"]), 403, "admin_required")
    async with ws_connect(relayd, alice["access_token"]) as session:
        await welcomed(session)
        doc = assert_ok(await http.post(path, token=admin_token(relayd)))
        assert set(doc) == {"uuid", "client_secret"}
        await revoked_and_closed(session, "secret_reset")
    await assert_token_refused(http, alice["access_token"])
    old = await http.post(
        "/auth/token", {"uuid": alice["uuid"], "client_secret": alice["client_secret"]}
    )
    assert_error(old, 401, "invalid_client")
    fresh = await login(http, alice["uuid"], doc["client_secret"])
    await assert_token_works(http, fresh["access_token"])
    await assert_token_works(http, bob["access_token"])
    missing = await http.post(f"/admin/clients/{SOME_UUID}/reset-secret", token=admin_token(relayd))
    assert_error(missing, 404, "unknown_client")


async def rotation_racing_a_reset(
    relayd: RunningRelayd, alice: dict[str, Any], body: dict[str, Any], token: str | None
) -> HttpResponse:
    """Rotate alice's secret with ``body`` (and ``token``) while the KDF is held, commit an
    admin's reset (as the route commits it) at that moment, then let the rotation go on.
    Returns the rotation's answer, after checking that the reset's secret is the one kept."""
    services = relayd.daemon.services
    assert services is not None
    assert services.store is not None
    kdf = services.auth._kdf_limiter
    borrowers = [object() for _ in range(int(kdf.total_tokens))]
    for borrower in borrowers:
        await kdf.acquire_on_behalf_of(borrower)
    answers = []

    async def rotate() -> None:
        path = f"/clients/{alice['uuid']}/secret"
        answers.append(await relayd.http.post(path, body, token=token))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(rotate)
        while kdf.statistics().tasks_waiting == 0:  # the proof is read; the KDF is awaited
            await trio.testing.wait_all_tasks_blocked()
        reset_hash = _kdf.hash_secret(
            _kdf.new_client_secret(), n=relayd.daemon.config.auth.kdf_cost
        )
        stored = await services.store.set_secret(
            alice["uuid"], reset_hash, revoke_at=services.auth.now
        )
        assert stored
        for borrower in borrowers:
            kdf.release_on_behalf_of(borrower)
    holder = await services.store.get_client(alice["uuid"])
    assert holder is not None
    assert holder.secret_hash == reset_hash
    [answer] = answers
    return answer


async def test_a_rotation_proved_with_the_old_secret_does_not_undo_a_reset(
    relayd: RunningRelayd,
) -> None:
    """``POST /clients/{uuid}/secret`` checks the secret (the KDF, tens of ms), then stores a
    new one. A reset committed in between must win: else whoever holds the old secret (the
    reason for the reset) takes the identity back with a rotation in flight."""
    alice = await relayd.http.register("alice")
    answer = await rotation_racing_a_reset(
        relayd, alice, {"client_secret": alice["client_secret"]}, None
    )
    assert_error(answer, 401, "invalid_client")


async def test_a_rotation_proved_with_a_token_does_not_undo_a_reset(
    relayd: RunningRelayd,
) -> None:
    """The same with an access token for proof: the token is checked, the new secret hashed
    (the KDF), then stored. A reset committed in between revokes that token: the rotation
    must not store a secret for its holder."""
    alice = await relayd.http.register("alice")
    answer = await rotation_racing_a_reset(relayd, alice, {}, alice["access_token"])
    assert_error(answer, 401, "token_revoked")


# --- invites ------------------------------------------------------------------------------------


@pytest.fixture
async def invite_only(nursery: trio.Nursery, tmp_path: Path, engine: Engine) -> RunningRelayd:
    return await start_daemon(
        nursery,
        tmp_path,
        engine,
        {
            "auth": {"registration": "invite", "max_open_invites": 3},
            "store": {"path": "relayd.sqlite3"},
        },
    )


async def mint(relayd: RunningRelayd, **body: Any) -> dict[str, Any]:
    return assert_ok(await relayd.http.post("/admin/invites", body, token=admin_token(relayd)))


async def test_invite_only_registration(invite_only: RunningRelayd) -> None:
    http = invite_only.http
    assert_error(await http.post("/register", {"name": "alice"}), 403, "invite_required")
    made_up = await http.post("/register", {"name": "alice", "invite": "rinv_made-up"})
    assert_error(made_up, 403, "invite_invalid")
    invite = await mint(invite_only)
    assert invite["invite"].startswith("rinv_")
    assert (invite["used_at"], invite["used_by"], invite["created_by"]) == (
        None,
        None,
        "operator:ops",
    )
    alice = assert_ok(await http.post("/register", {"name": "alice", "invite": invite["invite"]}))
    assert alice["created"] is True
    await assert_token_works(http, alice["access_token"])
    spent = await http.post("/register", {"name": "mallory", "invite": invite["invite"]})
    assert_error(spent, 403, "invite_invalid")
    listed = assert_ok(await http.get("/admin/invites", token=admin_token(invite_only)))
    assert listed["count"] == 1
    (item,) = listed["items"]
    assert item["id"] == invite["id"]
    assert item["used_by"] == alice["uuid"]
    assert item["used_at"] is not None
    # An admin token still registers without a code; clients cannot mint or list invites.
    by_admin = await http.post("/register", {"name": "bob"}, token=admin_token(invite_only))
    assert assert_ok(by_admin)["created"] is True
    assert_error(await http.post("/admin/invites", {}, token=alice["access_token"]), 403)
    assert_error(await http.get("/admin/invites", token=alice["access_token"]), 403)


async def test_an_invite_is_spent_only_with_a_client_made(invite_only: RunningRelayd) -> None:
    http = invite_only.http
    alice = await http.post("/register", {"name": "alice", "uuid": SOME_UUID, "invite": "x"})
    assert_error(alice, 403, "invite_invalid")
    first = await mint(invite_only)
    taken = assert_ok(
        await http.post("/register", {"name": "a", "uuid": SOME_UUID, "invite": first["invite"]})
    )
    second = await mint(invite_only)
    # A taken UUID does not spend the code.
    conflict = await http.post(
        "/register", {"name": "b", "uuid": SOME_UUID, "invite": second["invite"]}
    )
    assert_error(conflict, 409, "uuid_taken")
    assert_ok(await http.post("/register", {"name": "b", "invite": second["invite"]}))
    assert taken["uuid"] == SOME_UUID


async def test_two_registrations_racing_for_one_code_make_one_client(
    invite_only: RunningRelayd,
) -> None:
    http = invite_only.http
    code = (await mint(invite_only))["invite"]
    statuses: list[int] = []

    async def register(name: str) -> None:
        response = await http.post("/register", {"name": name, "invite": code})
        statuses.append(response.status)

    async with trio.open_nursery() as nursery:
        for name in ("alice", "mallory"):
            nursery.start_soon(register, name)
    assert sorted(statuses) == [200, 403]


async def test_open_invites_are_bounded(invite_only: RunningRelayd) -> None:
    for _ in range(3):
        await mint(invite_only)
    full = await invite_only.http.post("/admin/invites", {}, token=admin_token(invite_only))
    assert_error(full, 409, "too_many_invites")


@pytest.mark.parametrize("ttl", [59, 90 * 86_400 + 1, "600", None, True])
async def test_an_invite_lifetime_out_of_range_is_422(invite_only: RunningRelayd, ttl: Any) -> None:
    response = await invite_only.http.post(
        "/admin/invites", {"ttl": ttl}, token=admin_token(invite_only)
    )
    if ttl is None:  # null: the default
        assert_ok(response)
    else:
        assert assert_error(response, 422)["details"]["field"] == "ttl"


async def test_an_expired_invite_is_refused(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    clock = ManualClock()
    relayd = await start_daemon(
        nursery, tmp_path, engine, {"auth": {"registration": "invite"}}, clock=clock
    )
    invite = await mint(relayd, ttl=60)
    assert invite["expires_at"] == pytest.approx(invite["created_at"] + 60)
    clock.now += 61
    expired = await relayd.http.post("/register", {"name": "alice", "invite": invite["invite"]})
    assert_error(expired, 403, "invite_invalid")


async def test_the_store_keeps_only_the_code_s_hash(
    invite_only: RunningRelayd, engine: Engine
) -> None:
    code = (await mint(invite_only))["invite"]
    config = invite_only.daemon.config
    at_rest = Target(engine.name, engine.url or config.store_path)
    assert await at_rest_holding(at_rest, code.encode()) == []
    digest = hashlib.sha256(code.encode()).hexdigest().encode()
    assert await at_rest_holding(at_rest, digest) != []


# --- the admin commands -------------------------------------------------------------------------


def invite_config_file(tmp_path: Path, state: Path, listen: str, engine: Engine) -> Path:
    path = config_file(tmp_path, state, listen, engine)
    path.write_text(path.read_text().replace("[auth]\n", '[auth]\nregistration = "invite"\n'))
    return path


async def test_admin_commands_live_and_on_the_stopped_store(tmp_path: Path, engine: Engine) -> None:
    state = tmp_path / "state"
    overrides = {"auth": {"registration": "invite"}}
    async with trio.open_nursery() as nursery:
        relayd = await start_relayd(nursery, file_config(state, engine, **overrides))
        http = relayd.http
        host, port = relayd.addresses.http
        config = invite_config_file(tmp_path, state, f"{host}:{port}", engine)
        minted = await cli("admin", "invite", "--ttl", "600", "--config", str(config))
        assert minted.returncode == 0, minted.stderr
        code = minted.stdout.decode().strip()
        alice = assert_ok(await http.post("/register", {"name": "alice", "invite": code}))
        reset = await cli("admin", "reset-secret", alice["uuid"], "--config", str(config))
        assert reset.returncode == 0, reset.stderr
        secret = reset.stdout.decode().strip()
        await login(http, alice["uuid"], secret)
        await assert_token_refused(http, alice["access_token"])
        relayd.daemon.stop()

    listed = await cli("admin", "invites", "--config", str(config))
    assert listed.returncode == 0, listed.stderr
    assert alice["uuid"] in listed.stdout.decode()
    offline_code = await cli("admin", "invite", "--config", str(config))
    assert offline_code.returncode == 0, offline_code.stderr
    offline_reset = await cli("admin", "reset-secret", alice["uuid"], "--config", str(config))
    assert offline_reset.returncode == 0, offline_reset.stderr
    bad_ttl = await cli("admin", "invite", "--ttl", "5", "--config", str(config))
    assert bad_ttl.returncode == 2
    missing = await cli("admin", "reset-secret", SOME_UUID, "--config", str(config))
    assert (missing.returncode, b"no client" in missing.stderr) == (1, True)

    async with trio.open_nursery() as nursery:
        relayd = await start_relayd(nursery, file_config(state, engine, **overrides))
        http = relayd.http
        await login(http, alice["uuid"], offline_reset.stdout.decode().strip())
        bob = await http.post(
            "/register", {"name": "bob", "invite": offline_code.stdout.decode().strip()}
        )
        assert assert_ok(bob)["created"] is True
        relayd.daemon.stop()
