"""The end-to-end key directory against a real relayd: ``PUT``/``GET /clients/{uuid}/keys``,
fingerprints, supersession, errors, and ``key_changed`` frames to correspondents (online at
once, offline on connect, across a restart)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import coredis
import pytest
import trio

from relayd._keys import MAX_SUPERSEDED_KEYS
from relayd._store import Store

from .support import (
    TRANSPORTS,
    Engine,
    HttpClient,
    HttpResponse,
    RunningRelayd,
    start_on,
)
from .test_rest import assert_error
from .test_restart import MillisecondClock, file_config, running
from .ws_support import WsClient, welcomed, ws_connect

# Where the Redis engine keeps who read a client's keys (a sorted set per owner).
REDIS_READERS = "relayd:rd:"


@pytest.fixture(params=TRANSPORTS)
async def relayd(
    request: pytest.FixtureRequest, nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> RunningRelayd:
    return await start_on(nursery, tmp_path, request.param, engine)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


async def publish(http: HttpClient, client: dict[str, Any], **keys: bytes) -> dict[str, Any]:
    body = {"keys": [{"algorithm": alg, "key": b64(raw)} for alg, raw in keys.items()]}
    response = await http.put(f"/clients/{client['uuid']}/keys", body, token=client["access_token"])
    assert response.status == 200, response
    doc: dict[str, Any] = response.json()
    return doc


async def read(http: HttpClient, reader: dict[str, Any], owner: dict[str, Any]) -> dict[str, Any]:
    response = await http.get(f"/clients/{owner['uuid']}/keys", token=reader["access_token"])
    assert response.status == 200, response
    doc: dict[str, Any] = response.json()
    return doc


async def frames_until_receipt(client: WsClient, to: str) -> list[dict[str, Any]]:
    """Send a durable message to ``to`` and return the frames before its first receipt.

    The message's commit is queued behind the store reads the session's start asked for, so
    a key change owed at connect comes before this receipt, or not at all."""
    await client.send({"to": to, "msgid": "probe", "content": "probe", "acknowledge": True})
    seen: list[dict[str, Any]] = []
    while True:
        frame = await client.next()
        if frame["type"] == "delivery_status":
            return seen
        seen.append(frame)


# --- publishing and reading ---------------------------------------------------------------------


async def test_published_keys_are_read_with_their_sha256_fingerprints(
    relayd: RunningRelayd,
) -> None:
    http = relayd.http
    alice, bob = await http.register("alice"), await http.register("bob")
    x, ed = os.urandom(32), os.urandom(32)
    published = await publish(http, alice, x25519=x, ed25519=ed)
    assert published["changed"] == ["x25519", "ed25519"]
    doc = await read(http, bob, alice)
    assert doc["uuid"] == alice["uuid"]
    assert doc["superseded"] == []
    by_alg = {k["algorithm"]: k for k in doc["keys"]}
    assert set(by_alg) == {"x25519", "ed25519"}
    assert by_alg["x25519"]["key"] == b64(x)
    assert by_alg["x25519"]["fingerprint"] == hashlib.sha256(x).hexdigest()
    assert by_alg["ed25519"]["fingerprint"] == hashlib.sha256(ed).hexdigest()
    for key in doc["keys"]:
        assert set(key) == {"algorithm", "key", "fingerprint", "published_at"}
        assert isinstance(key["published_at"], float)
    # The owner reads its own keys the same way; a client without keys has none.
    assert (await read(http, alice, alice))["keys"] == doc["keys"]
    assert await read(http, alice, bob) == {"uuid": bob["uuid"], "keys": [], "superseded": []}


async def test_a_new_key_supersedes_the_current_one_which_stays_listed(
    relayd: RunningRelayd,
) -> None:
    http = relayd.http
    alice, bob = await http.register("alice"), await http.register("bob")
    first, second, ed = os.urandom(32), os.urandom(32), os.urandom(32)
    await publish(http, alice, x25519=first, ed25519=ed)
    published = await publish(http, alice, x25519=second)
    assert published["changed"] == ["x25519"]
    doc = await read(http, bob, alice)
    assert [(k["algorithm"], k["fingerprint"]) for k in doc["keys"]] == [
        ("ed25519", sha256(ed)),
        ("x25519", sha256(second)),
    ]
    [old] = doc["superseded"]
    assert old["fingerprint"] == sha256(first)
    assert old["key"] == b64(first)
    assert old["published_at"] < old["superseded_at"]
    current = next(k for k in doc["keys"] if k["algorithm"] == "x25519")
    assert current["published_at"] == old["superseded_at"]


async def test_superseded_history_is_bounded_oldest_dropped(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice = await http.register("alice")
    keys = [os.urandom(32) for _ in range(MAX_SUPERSEDED_KEYS + 3)]
    for key in keys:
        await publish(http, alice, x25519=key)
    doc = await read(http, alice, alice)
    assert [k["fingerprint"] for k in doc["keys"]] == [sha256(keys[-1])]
    # Newest superseded first; the two oldest are gone.
    expected = [sha256(k) for k in reversed(keys[2:-1])]
    assert [k["fingerprint"] for k in doc["superseded"]] == expected


async def test_publishing_the_current_key_again_changes_nothing(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice, bob = await http.register("alice"), await http.register("bob")
    key, later = os.urandom(32), os.urandom(32)
    await publish(http, alice, x25519=key)
    before = await read(http, bob, alice)
    async with ws_connect(relayd, bob["access_token"]) as session:
        await welcomed(session)
        again = await publish(http, alice, x25519=key)
        assert again["changed"] == []
        assert await read(http, bob, alice) == before
        # No frame for the republication: the next key_changed is the real change.
        await publish(http, alice, x25519=later)
        frame = await session.next()
        assert frame["type"] == "key_changed", frame
        assert frame["fingerprint"] == sha256(later)


# --- refusals -----------------------------------------------------------------------------------


async def test_only_the_client_itself_publishes_its_keys(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice, bob = await http.register("alice"), await http.register("bob")
    body = {"keys": [{"algorithm": "x25519", "key": b64(os.urandom(32))}]}
    response = await http.put(f"/clients/{alice['uuid']}/keys", body, token=bob["access_token"])
    assert_error(response, 403, "not_yours")
    admin = relayd.daemon.services
    assert admin is not None
    operator = admin.auth.mint_operator_token("ops", ("admin",), 60).token
    response = await http.put(f"/clients/{alice['uuid']}/keys", body, token=operator)
    assert_error(response, 403, "not_yours")
    assert (await read(http, bob, alice))["keys"] == []


async def test_an_admin_reads_keys_without_becoming_a_correspondent(
    relayd: RunningRelayd, engine: Engine
) -> None:
    http = relayd.http
    alice, bob = await http.register("alice"), await http.register("bob")
    key = os.urandom(32)
    await publish(http, alice, x25519=key)
    services = relayd.daemon.services
    assert services is not None
    operator = services.auth.mint_operator_token("ops", ("admin",), 60).token
    response = await http.get(f"/clients/{alice['uuid']}/keys", token=operator)
    assert response.status == 200, response
    assert [k["fingerprint"] for k in response.json()["keys"]] == [sha256(key)]
    await read(http, bob, alice)
    assert await key_readers(relayd, engine) == [(alice["uuid"], bob["uuid"])]


async def key_readers(relayd: RunningRelayd, engine: Engine) -> list[tuple[str, str]]:
    """``(owner, reader)`` of every read the store remembers, as the engine keeps them."""
    if engine.name == "redis":
        async with coredis.Redis.from_url(engine.url, decode_responses=True) as redis:
            pairs = [
                (key.removeprefix(REDIS_READERS), reader)
                async for key in redis.scan_iter(match=f"{REDIS_READERS}*")
                for reader in await redis.zrange(key, 0, -1)
            ]
            return sorted(pairs)
    hub = relayd.daemon.hub
    assert hub is not None
    assert isinstance(hub.store, Store)
    rows = await hub.store._run(
        lambda db: db.execute("SELECT client_uuid, reader_uuid FROM key_readers").fetchall()
    )
    return sorted((owner, reader) for owner, reader in rows)


async def test_the_directory_needs_a_token(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice = await http.register("alice")
    body = {"keys": [{"algorithm": "x25519", "key": b64(os.urandom(32))}]}
    path = f"/clients/{alice['uuid']}/keys"
    assert_error(await http.put(path, body), 401, "missing_token")
    assert_error(await http.get(path), 401, "missing_token")
    assert_error(await http.get(path, token="not.a.token"), 401)


async def test_keys_of_an_unknown_or_deleted_client_are_not_found(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice, bob = await http.register("alice"), await http.register("bob")
    unknown = "6b2b6c3e-6f5c-4a5b-9d1a-1f6e3c2a9b10"
    assert_error(
        await http.get(f"/clients/{unknown}/keys", token=alice["access_token"]),
        404,
        "unknown_client",
    )
    await publish(http, bob, x25519=os.urandom(32))
    deleted = await http.delete(f"/clients/{bob['uuid']}", token=bob["access_token"])
    assert deleted.status == 200
    assert_error(
        await http.get(f"/clients/{bob['uuid']}/keys", token=alice["access_token"]),
        404,
        "unknown_client",
    )


INVALID = [
    ({"keys": [{"algorithm": "rsa", "key": b64(bytes(32))}]}, "keys.0.algorithm"),
    ({"keys": [{"algorithm": "x25519", "key": "not base64!"}]}, "keys.0.key"),
    ({"keys": [{"algorithm": "x25519", "key": b64(bytes(31))}]}, "keys.0.key"),
    ({"keys": [{"algorithm": "ed25519", "key": b64(bytes(33))}]}, "keys.0.key"),
    ({"keys": [{"algorithm": "x25519", "key": "A" * 10_000}]}, "keys.0.key"),
    ({"keys": [{"algorithm": "x25519", "key": 12}]}, "keys.0.key"),
    ({"keys": [{"algorithm": "x25519"}]}, "keys.0.key"),
    ({"keys": []}, "keys"),
    ({"keys": {"algorithm": "x25519", "key": b64(bytes(32))}}, "keys"),
    ({}, "keys"),
    (
        {
            "keys": [
                {"algorithm": "x25519", "key": b64(bytes(32))},
                {"algorithm": "x25519", "key": b64(bytes([1]) * 32)},
            ]
        },
        "keys",
    ),
    (
        {
            "keys": [
                {"algorithm": "x25519", "key": b64(bytes(32))},
                {"algorithm": "ed25519", "key": b64(bytes(32))},
                {"algorithm": "x25519", "key": b64(bytes([1]) * 32)},
            ]
        },
        "keys",
    ),
]


@pytest.mark.parametrize(("body", "field"), INVALID)
async def test_a_bad_key_is_refused_naming_its_field(
    relayd: RunningRelayd, body: dict[str, Any], field: str
) -> None:
    http = relayd.http
    alice = await http.register("alice")
    response = await http.put(f"/clients/{alice['uuid']}/keys", body, token=alice["access_token"])
    error = assert_error(response, 422, "validation_error")
    assert error["details"]["field"] == field
    assert (await read(http, alice, alice))["keys"] == []


async def test_hostile_bodies_get_a_4xx(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice = await http.register("alice")
    path = f"/clients/{alice['uuid']}/keys"
    token = alice["access_token"]
    json_type = {"Content-Type": "application/json"}

    async def put_raw(body: bytes, headers: dict[str, str] = json_type) -> HttpResponse:
        return await http.request("PUT", path, body=body, headers=headers, token=token)

    assert_error(await put_raw(b"x" * 1_000_000), 413)
    assert_error(await put_raw(b"[" * 30_000 + b"]" * 30_000), 400, "invalid_json")
    surrogate = b'{"keys": [{"algorithm": "x25519", "key": "\\ud800"}]}'
    assert_error(await put_raw(surrogate), 422, "validation_error")
    assert_error(await put_raw(b'{"keys": NaN}'), 400, "invalid_json")
    assert_error(await put_raw(b"\xff\xfe"), 400, "invalid_json")
    assert_error(await put_raw(b"{}", {"Content-Type": "text/plain"}), 415)
    deep = json.dumps({"keys": [{"algorithm": {"a": [[[[1]]]]}, "key": [[]]}]}).encode()
    assert_error(await put_raw(deep), 422, "validation_error")
    assert (await read(http, alice, alice))["keys"] == []


# --- key_changed --------------------------------------------------------------------------------


async def test_a_key_change_reaches_an_online_reader_at_once(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice, bob, carol = [await http.register(n) for n in ("alice", "bob", "carol")]
    old, new = os.urandom(32), os.urandom(32)
    await publish(http, alice, x25519=old)
    await read(http, bob, alice)  # bob is a correspondent of alice; carol is not
    async with (
        ws_connect(relayd, bob["access_token"]) as b,
        ws_connect(relayd, carol["access_token"]) as c,
    ):
        await welcomed(b)
        await welcomed(c)
        await publish(http, alice, x25519=new)
        frame = await b.next()
        assert frame == {
            "type": "key_changed",
            "client": alice["uuid"],
            "algorithm": "x25519",
            "fingerprint": sha256(new),
            "previous_fingerprint": sha256(old),
            "changed_at": frame["changed_at"],
            "timestamp": frame["timestamp"],
        }
        superseded = (await read(http, bob, alice))["superseded"]
        assert frame["changed_at"] == superseded[0]["superseded_at"]
        # carol never read alice's keys: nothing for her before her own receipt.
        assert await frames_until_receipt(c, alice["uuid"]) == []


async def test_an_offline_reader_is_told_on_connect_once(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice, bob = await http.register("alice"), await http.register("bob")
    first, second, third = os.urandom(32), os.urandom(32), os.urandom(32)
    await publish(http, alice, x25519=first)
    await read(http, bob, alice)
    await publish(http, alice, x25519=second)
    await publish(http, alice, x25519=third)
    async with ws_connect(relayd, bob["access_token"]) as b:
        await welcomed(b)
        frames = await frames_until_receipt(b, alice["uuid"])
    # Two changes while offline, one notice: from what bob read to what is current.
    assert [(f["type"], f["previous_fingerprint"], f["fingerprint"]) for f in frames] == [
        ("key_changed", sha256(first), sha256(third))
    ]
    async with ws_connect(relayd, bob["access_token"]) as b:
        await welcomed(b)
        assert await frames_until_receipt(b, alice["uuid"]) == []


async def test_a_key_change_owed_survives_a_restart(tmp_path: Path, engine: Engine) -> None:
    config = file_config(tmp_path, engine)
    clock = MillisecondClock()
    old, new = os.urandom(32), os.urandom(32)
    async with running(config, clock) as relayd:
        http = relayd.http
        alice, bob = await http.register("alice"), await http.register("bob")
        await publish(http, alice, x25519=old)
        await read(http, bob, alice)
        await publish(http, alice, x25519=new)
    async with running(config, clock) as relayd:
        async with ws_connect(relayd, bob["access_token"]) as b:
            await welcomed(b)
            frames = await frames_until_receipt(b, alice["uuid"])
        assert [(f["type"], f["fingerprint"]) for f in frames] == [("key_changed", sha256(new))]
        doc = await read(relayd.http, bob, alice)
        assert [k["fingerprint"] for k in doc["superseded"]] == [sha256(old)]
