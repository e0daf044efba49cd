"""No token or secret ever reaches a log line; the audit log records who did what, from where.

A whole client life (register, login, refresh, revoke, refresh-token reuse) runs against an
in-process relayd while every log record is captured at DEBUG, then formatted both ways.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from relayd._log import AUDIT_LOGGER, JsonFormatter, TextFormatter, quiet_libraries

from .support import TEST_SECRET, RunningRelayd
from .ws_support import ws_connect


@pytest.fixture(autouse=True)
def _debug_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Capture everything from DEBUG up, starting before the ``relayd`` fixture starts it.

    Autouse fixtures are set up first, so the daemon's start-up is captured as well.
    """
    caplog.set_level(logging.DEBUG)
    quiet_libraries()  # as relayd's logging set-up does


def all_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [*caplog.get_records("setup"), *caplog.records]


def formatted(records: list[logging.LogRecord]) -> str:
    text, json_ = TextFormatter(), JsonFormatter()
    return "\n".join(f"{text.format(r)}\n{json_.format(r)}" for r in records)


def secrets_of(doc: dict[str, Any]) -> list[str]:
    """The tokens and client secret a response carries, and each token's signature alone."""
    found: list[str] = []
    for key in ("access_token", "refresh_token", "client_secret"):
        if key in doc:
            value = doc[key]
            assert isinstance(value, str)
            assert value
            found.append(value)
            if key.endswith("_token"):
                found.append(value.rsplit(".", 1)[1])
    return found


async def test_logs_hold_no_tokens_or_secrets(
    relayd: RunningRelayd, caplog: pytest.LogCaptureFixture
) -> None:
    http = relayd.http
    secrets: list[str] = [TEST_SECRET]

    registered = await http.register("alice")
    secrets += secrets_of(registered)
    client = registered["uuid"]

    login = await http.post(
        "/auth/token", {"uuid": client, "client_secret": registered["client_secret"]}
    )
    assert login.status == 200, login
    secrets += secrets_of(login.json())

    refreshed = await http.post("/auth/refresh", {"refresh_token": login.json()["refresh_token"]})
    assert refreshed.status == 200, refreshed
    secrets += secrets_of(refreshed.json())

    # Log out of the registration's login (its refresh family).
    revoked = await http.post("/auth/revoke", {"refresh_token": registered["refresh_token"]})
    assert revoked.status == 200, revoked
    assert revoked.json() == {"revoked": True}

    # The login's first refresh token again: it was rotated, so this is reuse.
    reused = await http.post("/auth/refresh", {"refresh_token": login.json()["refresh_token"]})
    assert reused.status == 401, reused
    assert reused.error_code == "refresh_reused"

    # A failed login must not log the secret it was given either.
    wrong_secret = "not-the-client-secret-" + "x" * 20
    failed = await http.post("/auth/token", {"uuid": client, "client_secret": wrong_secret})
    assert failed.status == 401, failed
    secrets.append(wrong_secret)

    records = all_records(caplog)
    messages = [r.getMessage() for r in records]
    # The capture saw the start-up (where the signing secret is loaded) and the requests.
    assert "signing secret loaded" in messages
    assert "relayd ready" in messages
    output = formatted(records)
    # Also what a formatter could not show, should a record carry it: raw args and fields.
    raw = "\n".join(
        f"{r.msg!r} {r.args!r} {json.dumps(getattr(r, 'fields', None), default=str)}"
        for r in records
    )
    assert client in output  # the capture sees the audit trail...
    for secret in secrets:  # ...and none of the secrets
        assert secret not in output
        assert secret not in raw


async def test_audit_log_records_the_client_life(
    relayd: RunningRelayd, caplog: pytest.LogCaptureFixture
) -> None:
    http = relayd.http
    registered = await http.register("bob")
    client = registered["uuid"]
    login = await http.post(
        "/auth/token", {"uuid": client, "client_secret": registered["client_secret"]}
    )
    assert login.status == 200, login
    first_refresh = login.json()["refresh_token"]
    assert (await http.post("/auth/refresh", {"refresh_token": first_refresh})).status == 200
    revoke = await http.post("/auth/revoke", {"refresh_token": registered["refresh_token"]})
    assert revoke.status == 200, revoke
    reused = await http.post("/auth/refresh", {"refresh_token": first_refresh})
    assert reused.error_code == "refresh_reused"

    audit = [r for r in all_records(caplog) if r.name == AUDIT_LOGGER]
    events = [r.getMessage() for r in audit]
    assert events == [
        "register",
        "token_issued",
        "token_refreshed",
        "refresh_revoked",
        "refresh_reuse_detected",
    ]
    for record in audit:
        fields: dict[str, Any] = getattr(record, "fields", {})
        assert record.levelno == logging.INFO
        assert fields.get("client") == client, (record.getMessage(), fields)
        assert fields.get("source") == "127.0.0.1", (record.getMessage(), fields)
        text = TextFormatter().format(record)
        assert f"client={client}" in text
        assert "source=127.0.0.1" in text
        doc = json.loads(JsonFormatter().format(record))
        assert doc["logger"] == AUDIT_LOGGER
        assert doc["msg"] == record.getMessage()
        assert doc["client"] == client
        assert doc["source"] == "127.0.0.1"


async def test_websocket_logs_hold_no_tokens_and_audit_refusals(
    relayd: RunningRelayd, caplog: pytest.LogCaptureFixture
) -> None:
    registered = await relayd.http.register("alice")
    secrets = [TEST_SECRET, *secrets_of(registered)]
    async with ws_connect(relayd, registered["access_token"]) as socket:
        assert (await socket.next())["type"] == "connection"
    bad = registered["access_token"][:-4] + "AAAA"
    async with ws_connect(relayd, bad) as socket:
        assert (await socket.next())["error"]["code"] == "token_invalid"
    records = all_records(caplog)
    text = formatted(records)
    for secret in [*secrets, bad, bad.rsplit(".", 1)[1]]:
        assert secret not in text
    refused = [r for r in records if r.name == AUDIT_LOGGER and r.getMessage() == "ws_auth_failed"]
    assert len(refused) == 1
    fields = getattr(refused[0], "fields", {})
    assert (fields["source"], fields["reason"]) == ("127.0.0.1", "token_invalid")
    # Lines logged while serving a socket or a request carry its id.
    assert "conn=ws1" in text
    assert "conn=http1" in text
