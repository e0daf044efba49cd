"""End-to-end tests of the REST API against a real relayd on a loopback port.

Every test talks HTTP to a running :class:`~relayd.Daemon`; nothing in relayd is called
directly except to mint operator tokens and to read or set readiness.

Most tests run the daemon on :class:`MillisecondClock`, the wall clock on whole, strictly
increasing milliseconds. relayd stores ``tokens_valid_after`` at full clock precision but
rounds a token's ``iat`` to the millisecond, so on the raw wall clock a token issued in the same
millisecond as its registration can be refused as revoked (see
``test_registration_tokens_work_when_issued_in_the_same_millisecond``). The millisecond clock
keeps that one bug out of every other test; the tests named ``..._on_the_wall_clock`` and
``..._same_millisecond`` expose it.
"""

from __future__ import annotations

import json
import logging
import time
import uuid as uuid_module
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from relayd import Addresses, Daemon
from relayd._http import Readiness

from .support import (
    TEST_ENV,
    Engine,
    HttpClient,
    HttpResponse,
    RunningRelayd,
    make_config,
    start_relayd,
)

ACCESS_TTL = 900.0
REFRESH_TTL = 2_592_000.0
REGISTER_KEYS = {
    "uuid",
    "name",
    "created_at",
    "last_seen",
    "created",
    "client_secret",
    "access_token",
    "refresh_token",
    "token_type",
    "expires_in",
    "expires_at",
    "refresh_expires_in",
    "refresh_expires_at",
}
TOKEN_KEYS = REGISTER_KEYS - {"name", "created_at", "last_seen", "created", "client_secret"}
CLIENT_KEYS = {"uuid", "name", "created_at", "last_seen", "online"}
SOME_UUID = "6b2b6c3e-6f5c-4a5b-9d1a-1f6e3c2a9b10"


# --- helpers ------------------------------------------------------------------------------------


class MillisecondClock:
    """The wall clock on whole milliseconds, strictly increasing by at least 1 ms per call."""

    def __init__(self) -> None:
        self._last = 0.0

    def __call__(self) -> float:
        now = max(round(time.time(), 3), round(self._last + 0.001, 3))
        self._last = now
        return now


class SteppingClock:
    """A fake wall clock that advances ``step`` seconds on every reading."""

    def __init__(self, start: float, step: float) -> None:
        self._next = start
        self._step = step

    def __call__(self) -> float:
        now = self._next
        self._next += self._step
        return now


async def start_daemon(
    nursery: trio.Nursery,
    tmp_path: Path,
    engine: Engine,
    overrides: Mapping[str, Any] | None = None,
    *,
    clock: Callable[[], float] | None = None,
) -> RunningRelayd:
    """Start relayd on ``engine`` with ``overrides`` on ``clock`` (a fresh
    :class:`MillisecondClock`)."""
    daemon = Daemon(
        make_config(tmp_path, overrides, engine),
        environ=TEST_ENV,
        clock=MillisecondClock() if clock is None else clock,
    )
    addresses: Addresses = await nursery.start(daemon.run)
    return RunningRelayd(daemon, addresses)


@pytest.fixture
async def relayd(nursery: trio.Nursery, tmp_path: Path, engine: Engine) -> RunningRelayd:
    """Overrides conftest's ``relayd``: the same daemon, on :class:`MillisecondClock`."""
    return await start_daemon(nursery, tmp_path, engine)


def assert_error(
    response: HttpResponse,
    status: int,
    code: str | None = None,
    *,
    extra_keys: Sequence[str] = (),
) -> dict[str, Any]:
    """Assert ``response`` is a JSON error of relayd's one shape; return its ``error`` object.

    The body must be exactly ``{"error": {"code": str, "message": str, "details": dict}}``
    (plus ``extra_keys`` at the top level, as readiness adds ``status``).
    """
    assert response.status == status, response
    assert response.headers.get("content-type", "").startswith("application/json"), response
    doc = response.json()
    assert isinstance(doc, dict), doc
    assert set(doc) == {"error", *extra_keys}, doc
    error = doc["error"]
    assert isinstance(error, dict), doc
    assert set(error) == {"code", "message", "details"}, doc
    assert isinstance(error["code"], str), doc
    assert error["code"], doc
    assert isinstance(error["message"], str), doc
    assert error["message"], doc
    assert isinstance(error["details"], dict), doc
    if code is not None:
        assert error["code"] == code, doc
    return error


def assert_ok(response: HttpResponse) -> dict[str, Any]:
    assert response.status == 200, response
    assert response.headers.get("content-type", "").startswith("application/json"), response
    doc = response.json()
    assert isinstance(doc, dict), doc
    return doc


def assert_token_pair(doc: Mapping[str, Any], *, now: float) -> None:
    """The token half of a register/login/refresh answer is complete and consistent."""
    assert isinstance(doc["access_token"], str)
    assert doc["access_token"]
    assert isinstance(doc["refresh_token"], str)
    assert doc["refresh_token"]
    assert doc["access_token"] != doc["refresh_token"]
    assert doc["token_type"] == "bearer"
    for prefix, ttl in (("", ACCESS_TTL), ("refresh_", REFRESH_TTL)):
        expires_in = doc[f"{prefix}expires_in"]
        expires_at = doc[f"{prefix}expires_at"]
        assert isinstance(expires_in, int)
        assert not isinstance(expires_in, bool)
        assert ttl - 60 <= expires_in <= ttl, doc
        assert isinstance(expires_at, int | float)
        assert abs(expires_at - (now + ttl)) < 60, doc
        assert abs(expires_at - expires_in - now) < 60, doc


async def login(http: HttpClient, client_uuid: str, secret: str) -> dict[str, Any]:
    return assert_ok(await http.post("/auth/token", {"uuid": client_uuid, "client_secret": secret}))


async def assert_token_works(http: HttpClient, token: str) -> None:
    assert_ok(await http.get("/clients", token=token))


async def assert_token_refused(http: HttpClient, token: str, code: str = "token_revoked") -> None:
    response = await http.get("/clients", token=token)
    assert_error(response, 401, code)
    assert response.headers.get("www-authenticate") == "Bearer", response


def admin_token(relayd: RunningRelayd) -> str:
    services = relayd.daemon.services
    assert services is not None
    return services.auth.mint_operator_token("ops", ("admin",), 600).token


# --- registration -------------------------------------------------------------------------------


async def test_register_answers_exactly_the_documented_keys(relayd: RunningRelayd) -> None:
    before = time.time()
    response = await relayd.http.post("/register", {"name": "alice"})
    doc = assert_ok(response)
    assert set(doc) == REGISTER_KEYS
    assert doc["name"] == "alice"
    assert isinstance(doc["created_at"], int | float)
    assert before - 5 <= doc["created_at"] <= time.time() + 5
    assert isinstance(doc["client_secret"], str)
    assert len(doc["client_secret"]) >= 32
    assert_token_pair(doc, now=doc["created_at"])
    # What registration hands out works at once.
    await assert_token_works(relayd.http, doc["access_token"])
    await login(relayd.http, doc["uuid"], doc["client_secret"])


async def test_register_strips_the_name(relayd: RunningRelayd) -> None:
    doc = assert_ok(await relayd.http.post("/register", {"name": "  bob  "}))
    assert doc["name"] == "bob"
    listed = assert_ok(await relayd.http.get(f"/clients/{doc['uuid']}", token=doc["access_token"]))
    assert listed["name"] == "bob"


async def test_register_generates_a_uuid_when_none_is_given(relayd: RunningRelayd) -> None:
    first = await relayd.http.register("alice")
    second = await relayd.http.register("alice")
    for doc in (first, second):
        parsed = uuid_module.UUID(doc["uuid"])
        assert str(parsed) == doc["uuid"]  # canonical: lowercase, hyphenated
        assert parsed.version == 4
    assert first["uuid"] != second["uuid"]


@pytest.mark.parametrize(
    "given",
    [
        SOME_UUID.upper(),
        SOME_UUID.replace("-", ""),
        "{" + SOME_UUID.upper() + "}",
        "urn:uuid:" + SOME_UUID,
    ],
)
async def test_register_canonicalises_the_uuid(relayd: RunningRelayd, given: str) -> None:
    doc = await relayd.http.register("alice", uuid=given)
    assert doc["uuid"] == SOME_UUID
    token = doc["access_token"]
    assert assert_ok(await relayd.http.get(f"/clients/{SOME_UUID}", token=token))["uuid"] == (
        SOME_UUID
    )
    listed = assert_ok(await relayd.http.get("/clients", token=token))
    assert listed["clients"] == {SOME_UUID: "alice"}
    # Logging in with any spelling of the UUID reaches the same client.
    assert (await login(relayd.http, given, doc["client_secret"]))["uuid"] == SOME_UUID


@pytest.mark.parametrize("spelling", [SOME_UUID, SOME_UUID.upper()])
async def test_registering_a_taken_uuid_conflicts(relayd: RunningRelayd, spelling: str) -> None:
    alice = await relayd.http.register("alice", uuid=SOME_UUID)
    response = await relayd.http.post("/register", {"name": "mallory", "uuid": spelling})
    assert_error(response, 409, "uuid_taken")
    # The original client is untouched: its tokens, its secret and its name.
    await assert_token_works(relayd.http, alice["access_token"])
    assert_ok(await relayd.http.post("/auth/refresh", {"refresh_token": alice["refresh_token"]}))
    await login(relayd.http, SOME_UUID, alice["client_secret"])
    found = assert_ok(await relayd.http.get(f"/clients/{SOME_UUID}", token=alice["access_token"]))
    assert found["name"] == "alice"


# --- tokens -------------------------------------------------------------------------------------


async def test_login_with_the_secret_issues_a_new_pair(relayd: RunningRelayd) -> None:
    alice = await relayd.http.register("alice")
    doc = await login(relayd.http, alice["uuid"], alice["client_secret"])
    assert set(doc) == TOKEN_KEYS
    assert doc["uuid"] == alice["uuid"]
    assert_token_pair(doc, now=time.time())
    assert doc["access_token"] != alice["access_token"]
    assert doc["refresh_token"] != alice["refresh_token"]
    await assert_token_works(relayd.http, doc["access_token"])
    # A login is a new refresh family: the registration's one still works.
    assert_ok(await relayd.http.post("/auth/refresh", {"refresh_token": alice["refresh_token"]}))
    assert_ok(await relayd.http.post("/auth/refresh", {"refresh_token": doc["refresh_token"]}))


async def test_login_with_a_wrong_secret_is_refused(relayd: RunningRelayd) -> None:
    alice = await relayd.http.register("alice")
    wrong = await relayd.http.post(
        "/auth/token", {"uuid": alice["uuid"], "client_secret": alice["client_secret"] + "x"}
    )
    assert_error(wrong, 401, "invalid_client")
    unknown = await relayd.http.post(
        "/auth/token", {"uuid": SOME_UUID, "client_secret": alice["client_secret"]}
    )
    # An unknown client is indistinguishable from a wrong secret.
    assert_error(unknown, 401, "invalid_client")
    assert unknown.json() == wrong.json()


async def test_refresh_rotates_and_detects_reuse(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice = await http.register("alice")
    other_login = await login(http, alice["uuid"], alice["client_secret"])

    rotated = assert_ok(await http.post("/auth/refresh", {"refresh_token": alice["refresh_token"]}))
    assert set(rotated) == TOKEN_KEYS
    assert rotated["uuid"] == alice["uuid"]
    assert_token_pair(rotated, now=time.time())
    assert rotated["access_token"] != alice["access_token"]
    assert rotated["refresh_token"] != alice["refresh_token"]
    await assert_token_works(http, rotated["access_token"])

    # The spent refresh token is reuse: refused, and its whole login dies with it.
    reused = await http.post("/auth/refresh", {"refresh_token": alice["refresh_token"]})
    assert_error(reused, 401, "refresh_reused")
    assert reused.headers.get("www-authenticate") == "Bearer"
    newest = await http.post("/auth/refresh", {"refresh_token": rotated["refresh_token"]})
    assert_error(newest, 401, "token_revoked")

    # Another login of the same client is another family, unaffected.
    assert_ok(await http.post("/auth/refresh", {"refresh_token": other_login["refresh_token"]}))


async def test_an_access_token_is_not_a_refresh_token(relayd: RunningRelayd) -> None:
    alice = await relayd.http.register("alice")
    response = await relayd.http.post("/auth/refresh", {"refresh_token": alice["access_token"]})
    assert_error(response, 401, "token_wrong_type")
    await assert_token_refused(relayd.http, alice["refresh_token"], "token_wrong_type")


async def test_revoking_a_refresh_token_logs_out(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice = await http.register("alice")
    other_login = await login(http, alice["uuid"], alice["client_secret"])
    assert assert_ok(
        await http.post("/auth/revoke", {"refresh_token": alice["refresh_token"]})
    ) == {"revoked": True}
    refused = await http.post("/auth/refresh", {"refresh_token": alice["refresh_token"]})
    assert_error(refused, 401, "token_revoked")
    # Only that login ends.
    assert_ok(await http.post("/auth/refresh", {"refresh_token": other_login["refresh_token"]}))


async def test_revoking_an_access_token_refuses_it(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice = await http.register("alice")
    other = await login(http, alice["uuid"], alice["client_secret"])
    await assert_token_works(http, alice["access_token"])
    assert assert_ok(await http.post("/auth/revoke", {"access_token": alice["access_token"]})) == {
        "revoked": True
    }
    await assert_token_refused(http, alice["access_token"], "token_revoked")
    # Only that token: the client's other access token and its refresh token still work.
    await assert_token_works(http, other["access_token"])
    assert_ok(await http.post("/auth/refresh", {"refresh_token": alice["refresh_token"]}))


async def test_revoke_refuses_garbage_tokens(relayd: RunningRelayd) -> None:
    response = await relayd.http.post("/auth/revoke", {"refresh_token": "not-a-token"})
    assert_error(response, 401, "token_invalid")


# --- the directory ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_token"),
        ({"Authorization": ""}, "missing_token"),
        ({"Authorization": "Bearer"}, "missing_token"),
        ({"Authorization": "Token abc"}, "missing_token"),
        ({"Authorization": "Basic YWxpY2U6c2VjcmV0"}, "missing_token"),
        ({"Authorization": "Bearer not-a-jwt"}, "token_invalid"),
        ({"Authorization": "Bearer a.b.c"}, "token_invalid"),
    ],
)
async def test_clients_requires_a_token(
    relayd: RunningRelayd, headers: dict[str, str], code: str
) -> None:
    await relayd.http.register("alice")
    response = await relayd.http.get("/clients", headers=headers)
    assert_error(response, 401, code)
    assert response.headers.get("www-authenticate") == "Bearer", response


async def test_a_token_signed_with_another_secret_is_invalid(relayd: RunningRelayd) -> None:
    alice = await relayd.http.register("alice")
    header, payload, _ = alice["access_token"].split(".")
    forged = f"{header}.{payload}.{'A' * 43}"
    await assert_token_refused(relayd.http, forged, "token_invalid")


async def test_clients_lists_every_client(relayd: RunningRelayd) -> None:
    alice = await relayd.http.register("alice")
    bob = await relayd.http.register("bob")
    doc = assert_ok(await relayd.http.get("/clients", token=bob["access_token"]))
    assert set(doc) == {"count", "clients", "items"}
    assert doc["count"] == 2
    assert doc["clients"] == {alice["uuid"]: "alice", bob["uuid"]: "bob"}
    assert doc["items"] == [
        {
            "uuid": alice["uuid"],
            "name": "alice",
            "created_at": alice["created_at"],
            "last_seen": None,
            "online": False,
        },
        {
            "uuid": bob["uuid"],
            "name": "bob",
            "created_at": bob["created_at"],
            "last_seen": None,
            "online": False,
        },
    ]


async def test_get_one_client(relayd: RunningRelayd) -> None:
    alice = await relayd.http.register("alice", uuid=SOME_UUID)
    bob = await relayd.http.register("bob")
    for path_uuid in (SOME_UUID, SOME_UUID.upper()):
        doc = assert_ok(await relayd.http.get(f"/clients/{path_uuid}", token=bob["access_token"]))
        assert doc == {
            "uuid": SOME_UUID,
            "name": "alice",
            "created_at": alice["created_at"],
            "last_seen": None,
            "online": False,
        }


@pytest.mark.parametrize("missing", [str(uuid_module.UUID(int=1)), "not-a-uuid"])
async def test_get_an_unknown_client(relayd: RunningRelayd, missing: str) -> None:
    bob = await relayd.http.register("bob")
    response = await relayd.http.get(f"/clients/{missing}", token=bob["access_token"])
    error = assert_error(response, 404, "unknown_client")
    assert missing in error["message"]


async def test_get_one_client_requires_a_token(relayd: RunningRelayd) -> None:
    alice = await relayd.http.register("alice")
    assert_error(await relayd.http.get(f"/clients/{alice['uuid']}"), 401, "missing_token")


async def test_a_client_deletes_itself(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice = await http.register("alice", uuid=SOME_UUID)
    bob = await http.register("bob")
    # Any spelling of its own UUID.
    deleted = assert_ok(
        await http.delete(f"/clients/{SOME_UUID.upper()}", token=alice["access_token"])
    )
    assert deleted == {"deleted": SOME_UUID}

    await assert_token_refused(http, alice["access_token"], "token_revoked")
    refused = await http.post("/auth/refresh", {"refresh_token": alice["refresh_token"]})
    assert_error(refused, 401, "token_revoked")
    no_login = await http.post(
        "/auth/token", {"uuid": SOME_UUID, "client_secret": alice["client_secret"]}
    )
    assert_error(no_login, 401, "invalid_client")

    assert_error(
        await http.get(f"/clients/{SOME_UUID}", token=bob["access_token"]), 404, "unknown_client"
    )
    listed = assert_ok(await http.get("/clients", token=bob["access_token"]))
    assert listed["clients"] == {bob["uuid"]: "bob"}
    assert listed["count"] == 1

    # The UUID stays taken for good.
    again = await http.post("/register", {"name": "alice", "uuid": SOME_UUID})
    assert_error(again, 409, "uuid_taken")


async def test_a_client_may_not_delete_another(relayd: RunningRelayd) -> None:
    alice = await relayd.http.register("alice")
    bob = await relayd.http.register("bob")
    response = await relayd.http.delete(f"/clients/{alice['uuid']}", token=bob["access_token"])
    assert_error(response, 403, "not_yours")
    await assert_token_works(relayd.http, alice["access_token"])
    found = await relayd.http.get(f"/clients/{alice['uuid']}", token=bob["access_token"])
    assert assert_ok(found)["name"] == "alice"


async def test_delete_requires_a_token(relayd: RunningRelayd) -> None:
    alice = await relayd.http.register("alice")
    assert_error(await relayd.http.delete(f"/clients/{alice['uuid']}"), 401, "missing_token")


# --- admin --------------------------------------------------------------------------------------


async def test_admin_revokes_a_client(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice = await http.register("alice")
    bob = await http.register("bob")
    admin = admin_token(relayd)
    response = await http.post(f"/admin/clients/{alice['uuid'].upper()}/revoke", token=admin)
    assert assert_ok(response) == {"revoked": alice["uuid"]}

    await assert_token_refused(http, alice["access_token"], "token_revoked")
    refused = await http.post("/auth/refresh", {"refresh_token": alice["refresh_token"]})
    assert_error(refused, 401, "token_revoked")
    # Other clients are not affected.
    await assert_token_works(http, bob["access_token"])
    # Alice logs in again with her secret, and that works.
    fresh = await login(http, alice["uuid"], alice["client_secret"])
    await assert_token_works(http, fresh["access_token"])
    assert_ok(await http.post("/auth/refresh", {"refresh_token": fresh["refresh_token"]}))


async def test_admin_revoke_of_an_unknown_client(relayd: RunningRelayd) -> None:
    response = await relayd.http.post(
        f"/admin/clients/{SOME_UUID}/revoke", token=admin_token(relayd)
    )
    assert_error(response, 404, "unknown_client")


async def test_admin_routes_need_an_admin_token(relayd: RunningRelayd) -> None:
    alice = await relayd.http.register("alice")
    bob = await relayd.http.register("bob")
    path = f"/admin/clients/{bob['uuid']}/revoke"
    assert_error(await relayd.http.post(path, token=alice["access_token"]), 403, "admin_required")
    # Not even on itself.
    own = f"/admin/clients/{alice['uuid']}/revoke"
    assert_error(await relayd.http.post(own, token=alice["access_token"]), 403, "admin_required")
    assert_error(await relayd.http.post(path), 401, "missing_token")
    services = relayd.daemon.services
    assert services is not None
    operator = services.auth.mint_operator_token("ops", ("client",), 600).token
    assert_error(await relayd.http.post(path, token=operator), 403, "admin_required")
    await assert_token_works(relayd.http, bob["access_token"])


async def test_admin_may_delete_any_client(relayd: RunningRelayd) -> None:
    alice = await relayd.http.register("alice")
    response = await relayd.http.delete(f"/clients/{alice['uuid']}", token=admin_token(relayd))
    assert assert_ok(response) == {"deleted": alice["uuid"]}
    await assert_token_refused(relayd.http, alice["access_token"], "token_revoked")


async def test_a_revoked_operator_token_is_refused(relayd: RunningRelayd) -> None:
    admin = admin_token(relayd)
    await assert_token_works(relayd.http, admin)
    assert_ok(await relayd.http.post("/auth/revoke", {"access_token": admin}))
    await assert_token_refused(relayd.http, admin, "token_revoked")


async def test_closed_registration(nursery: trio.Nursery, tmp_path: Path, engine: Engine) -> None:
    relayd = await start_daemon(nursery, tmp_path, engine, {"auth": {"registration": "closed"}})
    http = relayd.http
    anonymous = await http.post("/register", {"name": "alice"})
    assert assert_error(anonymous, 403, "registration_closed")["details"] == {
        "reason": "missing_token"
    }
    garbage = await http.post("/register", {"name": "alice"}, token="not-a-jwt")
    assert assert_error(garbage, 403, "registration_closed")["details"] == {
        "reason": "token_invalid"
    }

    doc = assert_ok(await http.post("/register", {"name": "alice"}, token=admin_token(relayd)))
    assert set(doc) == REGISTER_KEYS
    await assert_token_works(http, doc["access_token"])
    # A client's own token is not an admin token.
    by_client = await http.post("/register", {"name": "bob"}, token=doc["access_token"])
    assert assert_error(by_client, 403, "registration_closed")["details"] == {
        "reason": "admin_required"
    }


# --- health -------------------------------------------------------------------------------------


async def test_liveness(relayd: RunningRelayd) -> None:
    assert assert_ok(await relayd.http.get("/health/live")) == {"status": "live"}


async def test_readiness(relayd: RunningRelayd) -> None:
    assert assert_ok(await relayd.http.get("/health/ready")) == {"status": "ready"}


@pytest.mark.parametrize("state", [Readiness.STARTING, Readiness.DRAINING])
async def test_readiness_reports_503_unless_ready(relayd: RunningRelayd, state: Readiness) -> None:
    services = relayd.daemon.services
    assert services is not None
    services.readiness = state
    response = await relayd.http.get("/health/ready")
    assert_error(response, 503, state.value, extra_keys=["status"])
    assert response.json()["status"] == state.value
    # Liveness does not depend on readiness.
    assert assert_ok(await relayd.http.get("/health/live")) == {"status": "live"}


# --- protocol errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/nope"),
        ("POST", "/nope"),
        ("GET", "/register/extra"),
        ("GET", "/clients/a/b"),
        ("POST", "/admin/nope"),
        ("GET", "/ws"),
    ],
)
async def test_unknown_route_is_a_json_404(relayd: RunningRelayd, method: str, path: str) -> None:
    assert_error(await relayd.http.request(method, path), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/register"),
        ("PUT", "/register"),
        ("DELETE", "/health/live"),
        ("POST", "/health/ready"),
        ("POST", "/clients"),
        ("GET", "/auth/token"),
        ("GET", f"/admin/clients/{SOME_UUID}/revoke"),
    ],
)
async def test_wrong_method_is_a_json_405(relayd: RunningRelayd, method: str, path: str) -> None:
    assert_error(await relayd.http.request(method, path), 405, "method_not_allowed")


async def test_405_names_the_allowed_methods(relayd: RunningRelayd) -> None:
    """RFC 9110 section 15.5.6: a 405 response MUST carry an ``Allow`` header."""
    response = await relayd.http.get("/register")
    assert_error(response, 405, "method_not_allowed")
    assert "allow" in response.headers, response
    assert "POST" in {m.strip() for m in response.headers["allow"].split(",")}


async def test_body_over_max_body_bytes_is_413(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start_daemon(nursery, tmp_path, engine, {"http": {"max_body_bytes": 1024}})

    def body_of(size: int) -> bytes:
        # Valid JSON a client could send: unknown keys are ignored.
        doc = {"name": "alice", "pad": ""}
        doc["pad"] = "x" * (size - len(json.dumps(doc).encode()))
        raw = json.dumps(doc).encode()
        assert len(raw) == size
        return raw

    headers = {"Content-Type": "application/json"}
    too_big = await relayd.http.post("/register", body=body_of(1025), headers=headers)
    assert_error(too_big, 413, "payload_too_large")
    much_too_big = await relayd.http.post("/register", body=body_of(64 * 1024), headers=headers)
    assert_error(much_too_big, 413, "payload_too_large")
    # The limit itself is allowed.
    assert_ok(await relayd.http.post("/register", body=body_of(1024), headers=headers))


@pytest.mark.parametrize(
    "body",
    [b"{", b"", b"{'name': 'alice'}", b'{"name": "alice",}', b"\xff\xfe{}", b"nul"],
)
async def test_malformed_json_is_400(relayd: RunningRelayd, body: bytes) -> None:
    response = await relayd.http.post(
        "/register", body=body, headers={"Content-Type": "application/json"}
    )
    assert_error(response, 400, "invalid_json")


# Nested past the parser's recursion limit (the daemon's stack adds to the depth), and each
# within the default max_body_bytes.
TOO_DEEP = [
    b"[" * 984 + b"]" * 984,
    b"[" * 30_000 + b"]" * 30_000,
    b'{"name": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
    b'{"a": ' * 5_000 + b"1" + b"}" * 5_000,
]
POST_ROUTES = ["/register", "/auth/token", "/auth/refresh", "/auth/revoke"]


@pytest.mark.parametrize("path", POST_ROUTES)
async def test_deeply_nested_json_is_400(
    relayd: RunningRelayd, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    for body in TOO_DEEP:
        response = await relayd.http.post(
            path, body=body, headers={"Content-Type": "application/json"}
        )
        assert_error(response, 400, "invalid_json")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/register", "name"),
        ("/register", "uuid"),
        ("/auth/token", "uuid"),
        ("/auth/token", "client_secret"),
        ("/auth/refresh", "refresh_token"),
        ("/auth/revoke", "refresh_token"),
        ("/auth/revoke", "access_token"),
    ],
)
async def test_a_lone_surrogate_is_422_naming_the_field(
    relayd: RunningRelayd, path: str, field: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``"\\ud800"`` is valid JSON text but no Unicode string: refused before any service
    (the store, the token codec) would fail to encode it."""
    for value in ('"\\ud800"', '"a\\udfffb"', '"\\udc00\\ud800"', '["\\ud800"]'):
        body = f'{{"{field}": {value}}}'.encode()
        response = await relayd.http.post(
            path, body=body, headers={"Content-Type": "application/json"}
        )
        error = assert_error(response, 422, "validation_error")
        assert error["details"] == {"field": field}, body
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    "body",
    [
        b'{"\\ud800": "alice", "name": "alice"}',  # a key
        b'{"name": "\xed\xa0\x80"}',  # a surrogate encoded in the bytes (CESU-8)
        b'{"name": "alice", "pad": NaN}',
        b'{"name": "alice", "pad": -Infinity}',
    ],
)
async def test_json_that_is_no_unicode_or_no_json_is_400(
    relayd: RunningRelayd, body: bytes
) -> None:
    response = await relayd.http.post(
        "/register", body=body, headers={"Content-Type": "application/json"}
    )
    assert_error(response, 400, "invalid_json")


async def test_escaped_surrogate_pairs_are_text(relayd: RunningRelayd) -> None:
    """The legitimate neighbours of a lone surrogate: a pair escaped, and astral text raw."""
    body = '{"name": "\\ud83d\\ude00 \U0001f600"}'.encode()
    response = await relayd.http.post(
        "/register", body=body, headers={"Content-Type": "application/json"}
    )
    assert assert_ok(response)["name"] == "\U0001f600 \U0001f600"


@pytest.mark.parametrize("doc", [[], [{"name": "alice"}], "alice", 42, None, True])
async def test_a_body_that_is_not_an_object_is_400(relayd: RunningRelayd, doc: Any) -> None:
    response = await relayd.http.post(
        "/register", body=json.dumps(doc).encode(), headers={"Content-Type": "application/json"}
    )
    assert_error(response, 400, "invalid_json")


@pytest.mark.parametrize(
    ("content_type", "reported"),
    [
        ("text/plain", "text/plain"),
        ("application/x-www-form-urlencoded", "application/x-www-form-urlencoded"),
        ("text/json", "text/json"),
        (None, None),
    ],
)
async def test_wrong_content_type_is_415(
    relayd: RunningRelayd, content_type: str | None, reported: str | None
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = await relayd.http.post("/register", body=b'{"name": "alice"}', headers=headers)
    error = assert_error(response, 415, "unsupported_media_type")
    assert error["details"] == {"content_type": reported}


async def test_json_with_a_charset_is_accepted(relayd: RunningRelayd) -> None:
    response = await relayd.http.post(
        "/register",
        body=b'{"name": "alice"}',
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert assert_ok(response)["name"] == "alice"


@pytest.mark.parametrize(
    ("path", "doc", "field"),
    [
        ("/register", {}, "name"),
        ("/register", {"name": 5}, "name"),
        ("/register", {"name": None}, "name"),
        ("/register", {"name": True}, "name"),
        ("/register", {"name": ["alice"]}, "name"),
        ("/register", {"name": ""}, "name"),
        ("/register", {"name": "   "}, "name"),
        ("/register", {"name": "a" * 129}, "name"),
        ("/register", {"name": "al\nice"}, "name"),
        ("/register", {"name": "alice", "uuid": "not-a-uuid"}, "uuid"),
        ("/register", {"name": "alice", "uuid": 5}, "uuid"),
        ("/register", {"name": "alice", "uuid": ""}, "uuid"),
        ("/register", {"name": "alice", "uuid": SOME_UUID + "0"}, "uuid"),
        ("/auth/token", {"client_secret": "s"}, "uuid"),
        ("/auth/token", {"uuid": SOME_UUID}, "client_secret"),
        ("/auth/token", {"uuid": "nope", "client_secret": "s"}, "uuid"),
        ("/auth/token", {"uuid": SOME_UUID, "client_secret": 5}, "client_secret"),
        ("/auth/token", {"uuid": SOME_UUID, "client_secret": ""}, "client_secret"),
        ("/auth/token", {"uuid": SOME_UUID, "client_secret": "s" * 257}, "client_secret"),
        ("/auth/refresh", {}, "refresh_token"),
        ("/auth/refresh", {"refresh_token": 5}, "refresh_token"),
        ("/auth/refresh", {"refresh_token": ""}, "refresh_token"),
        ("/auth/revoke", {}, "refresh_token"),
        ("/auth/revoke", {"refresh_token": "a", "access_token": "b"}, "refresh_token"),
        ("/auth/revoke", {"access_token": 5}, "access_token"),
    ],
)
async def test_invalid_fields_are_422_naming_the_field(
    relayd: RunningRelayd, path: str, doc: dict[str, Any], field: str
) -> None:
    error = assert_error(await relayd.http.post(path, doc), 422, "validation_error")
    assert error["details"] == {"field": field}
    assert error["message"].startswith(f"{field}: ")


async def test_unknown_keys_are_ignored(relayd: RunningRelayd) -> None:
    doc = assert_ok(await relayd.http.post("/register", {"name": "alice", "colour": "blue"}))
    assert doc["name"] == "alice"


# --- rate limits --------------------------------------------------------------------------------


def assert_rate_limited(response: HttpResponse) -> int:
    error = assert_error(response, 429, "rate_limited")
    retry_after = response.headers.get("retry-after")
    assert retry_after is not None, response
    assert retry_after.isdigit(), response
    seconds = int(retry_after)
    assert seconds >= 1
    assert error["details"] == {"retry_after": seconds}
    return seconds


async def test_register_is_rate_limited(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    overrides = {"http": {"register_burst": 2, "register_per_minute": 1}}
    relayd = await start_daemon(nursery, tmp_path, engine, overrides)
    http = relayd.http
    alice = await http.register("alice")
    await http.register("bob")
    seconds = assert_rate_limited(await http.post("/register", {"name": "carol"}))
    # One token a minute: the next one is about a minute away.
    assert 50 <= seconds <= 60
    # Every request to /register counts, whatever its body.
    assert_rate_limited(await http.post("/register", {}))
    # /auth/* has a bucket of its own, still full.
    fresh = await login(http, alice["uuid"], alice["client_secret"])
    assert_ok(await http.post("/auth/refresh", {"refresh_token": fresh["refresh_token"]}))
    # Routes without a limit are not affected.
    await assert_token_works(http, fresh["access_token"])


async def test_auth_is_rate_limited_apart_from_register(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    overrides = {"http": {"auth_burst": 2, "auth_per_minute": 1}}
    relayd = await start_daemon(nursery, tmp_path, engine, overrides)
    http = relayd.http
    alice = await http.register("alice")
    await login(http, alice["uuid"], alice["client_secret"])
    assert_ok(await http.post("/auth/refresh", {"refresh_token": alice["refresh_token"]}))
    # One bucket for every /auth/* route.
    limited = await http.post(
        "/auth/token", {"uuid": alice["uuid"], "client_secret": alice["client_secret"]}
    )
    assert 50 <= assert_rate_limited(limited) <= 60
    assert_rate_limited(await http.post("/auth/revoke", {"refresh_token": "x"}))
    # Registration is still open.
    await http.register("bob")


async def test_authenticated_routes_are_rate_limited_per_client(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    overrides = {"http": {"api_burst": 3, "api_per_minute": 1}}
    relayd = await start_daemon(nursery, tmp_path, engine, overrides)
    http = relayd.http
    alice = await http.register("alice")
    bob = await http.register("bob")
    for _ in range(3):
        await assert_token_works(http, alice["access_token"])
    seconds = assert_rate_limited(await http.get("/clients", token=alice["access_token"]))
    assert 50 <= seconds <= 60
    # One bucket for every route that takes a token, and for every token of the client.
    one = f"/clients/{bob['uuid']}"
    assert_rate_limited(await http.get(one, token=alice["access_token"]))
    fresh = await login(http, alice["uuid"], alice["client_secret"])
    assert_rate_limited(await http.get("/clients", token=fresh["access_token"]))
    # Another client, from the same address, has its own bucket.
    await assert_token_works(http, bob["access_token"])
    assert_ok(await http.get(one, token=bob["access_token"]))


async def test_the_api_limit_holds_for_admin_routes_and_closed_registration(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    overrides = {
        "http": {"api_burst": 2, "api_per_minute": 1},
        "auth": {"registration": "closed"},
    }
    relayd = await start_daemon(nursery, tmp_path, engine, overrides)
    admin = admin_token(relayd)
    assert_ok(await relayd.http.get("/admin/clients", token=admin))
    assert_ok(await relayd.http.post("/register", {"name": "alice"}, token=admin))
    # Over the limit, an admin registering is told to wait, not that registration is closed.
    assert_rate_limited(await relayd.http.post("/register", {"name": "bob"}, token=admin))
    assert_rate_limited(await relayd.http.get("/admin/clients", token=admin))


# --- the iat rounding bug -----------------------------------------------------------------------


async def test_registration_tokens_work_when_issued_in_the_same_millisecond(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    """Registration stores ``tokens_valid_after`` = now, unrounded, then issues tokens whose
    ``iat`` is rounded to the millisecond: within one millisecond that rounds *down*, below
    ``tokens_valid_after``, and the brand-new tokens are refused as revoked."""
    clock = SteppingClock(start=1_800_000_000.0001, step=0.0001)
    relayd = await start_daemon(nursery, tmp_path, engine, clock=clock)
    alice = await relayd.http.register("alice")
    await assert_token_works(relayd.http, alice["access_token"])
    assert_ok(await relayd.http.post("/auth/refresh", {"refresh_token": alice["refresh_token"]}))


async def test_registration_tokens_work_on_the_wall_clock(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    """The same bug, on the daemon's default clock (``time.time``): each registration's own
    token must authenticate at once. Each one fails with a probability of tens of percent."""
    overrides = {"http": {"register_burst": 30}}
    relayd = await start_relayd(nursery, make_config(tmp_path, overrides, engine))
    refused = []
    for i in range(20):
        client = await relayd.http.register(f"client-{i}")
        response = await relayd.http.get(f"/clients/{client['uuid']}", token=client["access_token"])
        if response.status != 200:
            refused.append((client["uuid"], response.error_code))
    assert refused == []


@pytest.mark.parametrize("path", ["/clients/{}", "/clients/{}/keys", "/admin/clients/{}/revoke"])
async def test_a_path_that_is_no_uuid_is_404_quoting_little_of_it(
    relayd: RunningRelayd, path: str
) -> None:
    alice = await relayd.http.register("alice")
    token = admin_token(relayd) if path.startswith("/admin") else alice["access_token"]
    method = relayd.http.post if path.endswith("revoke") else relayd.http.get
    response = await method(path.format("x" * 3000), token=token)
    error = assert_error(response, 404, "unknown_client")
    assert len(error["message"]) < 100
    # Any spelling of a real uuid names the client.
    upper = await relayd.http.get(f"/clients/{alice['uuid'].upper()}", token=alice["access_token"])
    assert assert_ok(upper)["uuid"] == alice["uuid"]
