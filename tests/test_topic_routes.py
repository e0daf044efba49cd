"""The topics' REST routes (issue 13) against a real relayd on loopback, on both engines:
the seed system's (create, list, get, subscribe, unsubscribe; ``?token=`` as well as Bearer)
and relayd's own (settings, deletion, members, subscribers, history), who may do what
(``relayd/_http_topics.py``: an invisible topic is unknown, never forbidden), the ``[topics]``
limits, and hostile input: every refusal is relayd's one JSON error shape, and the daemon
keeps serving everyone else.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from .support import Engine, HttpClient, RunningRelayd
from .test_rest import admin_token, assert_error, assert_ok
from .topic_support import (
    TOPIC_KEYS,
    Doc,
    assert_topic_not_found,
    create,
    create_response,
    history,
    listed,
    patch,
    publish,
    register,
    start_topics,
    subscribe,
    subscribed,
    token_of,
    topic,
    unsubscribe,
)
from .ws_support import welcomed, ws_connect

SOME_UUID = "6b2b6c3e-6f5c-4a5b-9d1a-1f6e3c2a9b10"
# Server-wide history limits a topic's settings may not exceed.
JSON = {"Content-Type": "application/json"}
LIMITED = {"topics": {"max_history_count": 100, "max_history_age": 3600.0, "history_age": 600.0}}


@pytest.fixture
async def relayd(nursery: trio.Nursery, tmp_path: Path, engine: Engine) -> RunningRelayd:
    """Overrides conftest's: the same daemon, with rate limits out of the way."""
    return await start_topics(nursery, tmp_path, engine)


async def make_admin(relayd: RunningRelayd, client: Doc) -> None:
    """Give a registered client the ``admin`` role (its tokens carry it from now on)."""
    path = f"/admin/clients/{client['uuid']}/roles"
    body = {"roles": ["admin"]}
    changed = await relayd.http.request("PUT", path, json_body=body, token=admin_token(relayd))
    assert assert_ok(changed)["roles"] == ["admin"]


# --- create -------------------------------------------------------------------------------------


async def test_create_takes_the_seed_body_with_the_token_in_the_query(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    overrides = {"topics": {"history_count": 7, "history_age": 3600.0}}
    relayd = await start_topics(nursery, tmp_path, engine, overrides)
    http = relayd.http
    (alice,) = await register(http, "alice")
    body = {"topic_id": "demo-room", "metadata": {"description": "Demo room for testing"}}
    response = await create_response(http, token_of(alice), body, query=True)
    doc = assert_ok(response)
    assert list(doc) == ["message", "topic_id", "creator", "topic"]
    assert (doc["message"], doc["topic_id"], doc["creator"]) == (
        "Topic created successfully",
        "demo-room",
        alice["uuid"],
    )
    made = doc["topic"]
    assert list(made) == TOPIC_KEYS
    created_at = made.pop("created_at")
    assert isinstance(created_at, float)
    # What the body did not set comes from [topics] (the history) or relayd's defaults.
    assert made == {
        "id": "demo-room",
        "topic_id": "demo-room",
        "creator": alice["uuid"],
        "metadata": {"description": "Demo room for testing"},
        "access": "open",
        "publish": "members",
        "presence": False,
        "history_count": 7,
        "history_age": 3600.0,
        "subscriber_count": 0,
        "last_offset": 0,
    }
    # The topic is what the create answered.
    shown = await topic(http, token_of(alice), "demo-room")
    assert {k: shown[k] for k in TOPIC_KEYS} == {**made, "created_at": created_at}
    # The creator owns it; it is not subscribed by creating it.
    assert (shown["subscribed"], shown["subscribers"]) == (False, [])


async def test_create_takes_a_bearer_token_and_every_setting(relayd: RunningRelayd) -> None:
    http = relayd.http
    (alice,) = await register(http, "alice")
    settings: Doc = {
        "metadata": {"k": [1, "two", None]},
        "access": "private",
        "publish": "owner",
        "presence": True,
        "history_count": 0,
        "history_age": 60,
    }
    made = await create(http, token_of(alice), "news.2024:q1@x~y_z-", **settings)
    assert {k: made[k] for k in settings} == {**settings, "history_age": 60.0}
    assert made["creator"] == alice["uuid"]


async def test_a_taken_topic_id_is_the_seeds_400_and_the_topic_is_untouched(
    relayd: RunningRelayd,
) -> None:
    http = relayd.http
    alice, bob = await register(http, "alice", "bob")
    await create(http, token_of(alice), "room", metadata={"by": "alice"})
    for who in (alice, bob):
        again = await create_response(
            http, token_of(who), {"topic_id": "room", "access": "private"}
        )
        error = assert_error(again, 400, "TOPIC_ALREADY_EXISTS")
        assert error["details"] == {"topic_id": "room"}
    shown = await topic(http, token_of(bob), "room")
    assert (shown["creator"], shown["metadata"], shown["access"]) == (
        alice["uuid"],
        {"by": "alice"},
        "open",
    )


BAD_CREATES = [
    pytest.param({}, "topic_id", id="no-topic_id"),
    pytest.param({"topic_id": ""}, "topic_id", id="empty"),
    pytest.param({"topic_id": "-room"}, "topic_id", id="leading-dash"),
    pytest.param({"topic_id": ".room"}, "topic_id", id="leading-dot"),
    pytest.param({"topic_id": "a" * 101}, "topic_id", id="101-chars"),
    pytest.param({"topic_id": "a b"}, "topic_id", id="space"),
    pytest.param({"topic_id": "a/b"}, "topic_id", id="slash"),
    pytest.param({"topic_id": "a%2Fb"}, "topic_id", id="percent"),
    pytest.param({"topic_id": "caf\u00e9"}, "topic_id", id="non-ascii"),
    pytest.param({"topic_id": 5}, "topic_id", id="int"),
    pytest.param({"topic_id": None}, "topic_id", id="null"),
    pytest.param({"topic_id": ["room"]}, "topic_id", id="list"),
    pytest.param({"topic_id": "room", "metadata": [1]}, "metadata", id="metadata-list"),
    pytest.param({"topic_id": "room", "metadata": "x"}, "metadata", id="metadata-string"),
    pytest.param({"topic_id": "room", "metadata": {"x": "y" * 4096}}, "metadata", id="big"),
    pytest.param({"topic_id": "room", "access": "secret"}, "access", id="access"),
    pytest.param({"topic_id": "room", "publish": "anyone"}, "publish", id="publish"),
    pytest.param({"topic_id": "room", "presence": "yes"}, "presence", id="presence"),
    pytest.param({"topic_id": "room", "presence": 1}, "presence", id="presence-int"),
    pytest.param({"topic_id": "room", "history_count": -1}, "history_count", id="count-neg"),
    pytest.param({"topic_id": "room", "history_count": "5"}, "history_count", id="count-str"),
    pytest.param({"topic_id": "room", "history_count": 1.5}, "history_count", id="count-float"),
    pytest.param({"topic_id": "room", "history_count": True}, "history_count", id="count-bool"),
    pytest.param({"topic_id": "room", "history_count": 101}, "history_count", id="count-max"),
    pytest.param({"topic_id": "room", "history_age": 0}, "history_age", id="age-zero"),
    pytest.param({"topic_id": "room", "history_age": -5}, "history_age", id="age-neg"),
    pytest.param({"topic_id": "room", "history_age": "60"}, "history_age", id="age-str"),
    pytest.param(b'{"topic_id": "room", "history_age": 1e999}', "history_age", id="age-inf"),
    pytest.param({"topic_id": "room", "history_age": 3601}, "history_age", id="age-max"),
]


async def bad_create(relayd: RunningRelayd, token: str, body: Doc | bytes) -> Doc:
    """Create with ``body`` (bytes: sent as they are); the 422's error, once the test checked
    that nothing was created."""
    if isinstance(body, bytes):  # JSON that Python's json.dumps would not write
        response = await relayd.http.post("/topics/create", body=body, headers=JSON, token=token)
    else:
        response = await create_response(relayd.http, token, body)
    error = assert_error(response, 422, "validation_error")
    assert await listed(relayd.http, token) == []
    return error


@pytest.mark.parametrize(("body", "field"), BAD_CREATES)
async def test_a_bad_create_is_a_422_naming_the_field_and_creates_nothing(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine, body: Doc | bytes, field: str
) -> None:
    relayd = await start_topics(nursery, tmp_path, engine, LIMITED)
    (alice,) = await register(relayd.http, "alice")
    error = await bad_create(relayd, token_of(alice), body)
    assert error["details"] == {"field": field}, error
    assert error["message"].startswith(f"{field}: "), error


async def test_a_create_at_the_server_maximum_history_is_taken(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start_topics(nursery, tmp_path, engine, LIMITED)
    (alice,) = await register(relayd.http, "alice")
    made = await create(relayd.http, token_of(alice), "room", history_count=100, history_age=3600.0)
    assert (made["history_count"], made["history_age"]) == (100, 3600.0)


async def test_where_admins_create_topics_a_client_is_refused_and_an_admin_is_not(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start_topics(nursery, tmp_path, engine, {"topics": {"create": "admins"}})
    http = relayd.http
    alice, boss = await register(http, "alice", "boss")
    for query in (False, True):
        response = await create_response(http, token_of(alice), {"topic_id": "room"}, query=query)
        assert_error(response, 403, "admin_required")
    assert await listed(http, token_of(alice)) == []
    # An admin client, and an operator's admin token.
    await make_admin(relayd, boss)
    made = await create(http, token_of(boss), "by-boss")
    assert made["creator"] == boss["uuid"]
    made = await create(http, admin_token(relayd), "by-ops")
    assert made["creator"] == "operator:ops"
    assert await listed(http, token_of(alice)) == ["by-boss", "by-ops"]


async def test_a_client_owns_at_most_max_owned_topics(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start_topics(nursery, tmp_path, engine, {"topics": {"max_owned": 2}})
    http = relayd.http
    alice, bob = await register(http, "alice", "bob")
    await create(http, token_of(alice), "a1")
    await create(http, token_of(alice), "a2")
    error = assert_error(
        await create_response(http, token_of(alice), {"topic_id": "a3"}), 409, "too_many_topics"
    )
    assert error["details"] == {"max_owned": 2}
    # Others are not held to alice's count; a deletion makes room.
    await create(http, token_of(bob), "b1")
    assert_ok(await http.delete("/topics/a1", token=token_of(alice)))
    await create(http, token_of(alice), "a3")
    assert await listed(http, token_of(bob)) == ["a2", "a3", "b1"]


# --- list ---------------------------------------------------------------------------------------


async def test_anyone_lists_the_open_topics_without_a_token(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice, bob = await register(http, "alice", "bob")
    await create(http, token_of(alice), "open-1", metadata={"d": 1})
    await create(http, token_of(alice), "secret", access="private")
    await create(http, token_of(alice), "open-2")
    await subscribed(http, token_of(bob), "open-1")
    doc = assert_ok(await http.get("/topics"))
    assert doc["count"] == 2
    assert [t["id"] for t in doc["topics"]] == ["open-1", "open-2"]
    first = doc["topics"][0]
    assert list(first) == TOPIC_KEYS  # counts, never subscribers' ids
    assert (first["subscriber_count"], first["metadata"]) == (1, {"d": 1})


async def test_without_anonymous_read_every_read_takes_a_token(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start_topics(nursery, tmp_path, engine, {"topics": {"anonymous_read": False}})
    http = relayd.http
    (alice,) = await register(http, "alice")
    await create(http, token_of(alice), "room")
    for path in ("/topics", "/topics/room", "/topics/nothing"):
        response = await http.get(path)
        assert_error(response, 401, "missing_token")
        assert response.headers.get("www-authenticate") == "Bearer", response
    assert await listed(http, token_of(alice)) == ["room"]
    assert (await topic(http, token_of(alice), "room"))["id"] == "room"
    # The seed's way of passing the token, too.
    assert assert_ok(await http.get(f"/topics?token={token_of(alice)}"))["count"] == 1


async def test_a_private_topic_is_listed_to_its_members_and_admins_only(
    relayd: RunningRelayd,
) -> None:
    http = relayd.http
    alice, bob, carol, boss = await register(http, "alice", "bob", "carol", "boss")
    await make_admin(relayd, boss)
    await create(http, token_of(alice), "club", access="private")
    await create(http, token_of(alice), "lobby")
    assert_ok(await http.put(f"/topics/club/members/{bob['uuid']}", token=token_of(alice)))
    assert await listed(http, token_of(bob)) == ["club", "lobby"]
    assert await listed(http, token_of(carol)) == ["lobby"]
    assert await listed(http, None) == ["lobby"]
    assert await listed(http, token_of(boss)) == ["club", "lobby"]
    assert await listed(http, admin_token(relayd)) == ["club", "lobby"]


async def test_a_private_topic_is_listed_to_its_owner(relayd: RunningRelayd) -> None:
    http = relayd.http
    (alice,) = await register(http, "alice")
    await create(http, token_of(alice), "club", access="private")
    assert (await topic(http, token_of(alice), "club"))["id"] == "club"  # visible...
    assert await listed(http, token_of(alice)) == ["club"]  # ...so listed


async def test_the_list_pages_by_id(relayd: RunningRelayd) -> None:
    http = relayd.http
    (alice,) = await register(http, "alice")
    for name in ("t4", "t2", "t5", "t1", "t3"):
        await create(http, token_of(alice), name)
    token = token_of(alice)
    assert await listed(http, token, "?limit=2") == ["t1", "t2"]
    assert await listed(http, token, "?after=t2&limit=2") == ["t3", "t4"]
    assert await listed(http, token, "?after=t4&limit=2") == ["t5"]
    assert await listed(http, token, "?after=t5") == []
    assert await listed(http, token, "?after=t20") == ["t3", "t4", "t5"]  # by id, not by name
    assert await listed(http, None, "?limit=1000") == ["t1", "t2", "t3", "t4", "t5"]


@pytest.mark.parametrize("limit", ["0", "-1", "1001", "ten", "1.5", ""])
async def test_a_bad_list_limit_is_a_422(relayd: RunningRelayd, limit: str) -> None:
    (alice,) = await register(relayd.http, "alice")
    for token in (token_of(alice), None):
        response = await relayd.http.get(f"/topics?limit={limit}", token=token)
        error = assert_error(response, 422, "validation_error")
        assert error["details"] == {"field": "limit"}


# --- get ----------------------------------------------------------------------------------------


async def test_a_topic_shows_its_subscribers_to_a_token_and_not_to_anyone(
    relayd: RunningRelayd,
) -> None:
    http = relayd.http
    alice, bob, carol = await register(http, "alice", "bob", "carol")
    await create(http, token_of(alice), "room", metadata={"d": "x"})
    await subscribed(http, token_of(bob), "room")
    await subscribed(http, token_of(carol), "room")
    anonymous = await topic(http, None, "room")
    assert list(anonymous) == TOPIC_KEYS
    assert anonymous["subscriber_count"] == 2
    seen = await topic(http, token_of(bob), "room")
    assert list(seen) == [*TOPIC_KEYS, "subscribed", "subscribers"]
    assert seen["subscribers"] == sorted([bob["uuid"], carol["uuid"]])
    assert (seen["subscribed"], seen["subscriber_count"]) == (True, 2)
    assert (await topic(http, token_of(alice), "room"))["subscribed"] is False
    # The seed's ?token= is a token like the header.
    by_query = assert_ok(await http.get(f"/topics/room?token={token_of(carol)}"))
    assert (by_query["subscribed"], by_query["subscribers"]) == (True, seen["subscribers"])


async def test_a_private_topic_is_unknown_to_a_stranger_never_forbidden(
    relayd: RunningRelayd,
) -> None:
    http = relayd.http
    alice, bob, carol, boss = await register(http, "alice", "bob", "carol", "boss")
    await make_admin(relayd, boss)
    await create(http, token_of(alice), "club", access="private")
    assert_ok(await http.put(f"/topics/club/members/{bob['uuid']}", token=token_of(alice)))
    for token in (token_of(carol), None):
        assert_topic_not_found(await http.get("/topics/club", token=token), "club")
        # Exactly as for a topic that does not exist.
        assert_topic_not_found(await http.get("/topics/clubs", token=token), "clubs")
    for who in (token_of(alice), token_of(bob), token_of(boss), admin_token(relayd)):
        assert (await topic(http, who, "club"))["subscribers"] == [bob["uuid"]]


# --- subscribe and unsubscribe ------------------------------------------------------------------


async def test_subscribing_and_unsubscribing_are_idempotent(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice, bob = await register(http, "alice", "bob")
    await create(http, token_of(alice), "room")
    first = assert_ok(await subscribe(http, token_of(bob), "room"))
    assert first == {
        "message": "Subscribed to topic room",
        "topic_id": "room",
        "client_uuid": bob["uuid"],
        "subscribed": True,
    }
    again = assert_ok(await subscribe(http, token_of(bob), "room"))
    assert (again["message"], again["subscribed"]) == ("Already subscribed", True)
    assert (await topic(http, None, "room"))["subscriber_count"] == 1
    left = assert_ok(await unsubscribe(http, token_of(bob), "room"))
    assert left == {
        "message": "Unsubscribed from topic room",
        "topic_id": "room",
        "client_uuid": bob["uuid"],
        "subscribed": False,
    }
    again = assert_ok(await unsubscribe(http, token_of(bob), "room"))
    assert (again["message"], again["subscribed"]) == ("Not subscribed", False)
    assert (await topic(http, None, "room"))["subscriber_count"] == 0
    # The seed's ?token= on both.
    response = await http.post(f"/topics/subscribe?token={token_of(bob)}", {"topic_id": "room"})
    assert assert_ok(response)["message"] == "Subscribed to topic room"
    response = await http.post(f"/topics/unsubscribe?token={token_of(bob)}", {"topic_id": "room"})
    assert assert_ok(response)["message"] == "Unsubscribed from topic room"


async def test_subscribing_to_an_unknown_or_private_topic_is_a_404(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice, bob = await register(http, "alice", "bob")
    await create(http, token_of(alice), "club", access="private")
    for call in (subscribe, unsubscribe):
        assert_topic_not_found(await call(http, token_of(bob), "nothing"), "nothing")
        # A stranger does not see a private topic: unknown, not topic_private.
        assert_topic_not_found(await call(http, token_of(bob), "club"), "club")
    assert (await topic(http, token_of(alice), "club"))["subscribers"] == []
    # Its owner may subscribe itself.
    await subscribed(http, token_of(alice), "club")


async def test_a_topic_takes_at_most_max_subscribers(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start_topics(nursery, tmp_path, engine, {"topics": {"max_subscribers": 2}})
    http = relayd.http
    alice, bob, carol = await register(http, "alice", "bob", "carol")
    await create(http, token_of(alice), "room")
    await subscribed(http, token_of(alice), "room")
    await subscribed(http, token_of(bob), "room")
    error = assert_error(await subscribe(http, token_of(carol), "room"), 409, "topic_full")
    assert error["details"] == {"topic_id": "room", "max_subscribers": 2}
    # A member added by the owner counts the same.
    added = await http.put(f"/topics/room/members/{carol['uuid']}", token=token_of(alice))
    assert assert_error(added, 409, "topic_full")["details"]["max_subscribers"] == 2
    # A subscriber subscribing again is no newcomer.
    again = assert_ok(await subscribe(http, token_of(bob), "room"))
    assert again["message"] == "Already subscribed"
    assert_ok(await unsubscribe(http, token_of(bob), "room"))
    await subscribed(http, token_of(carol), "room")
    assert (await topic(http, None, "room"))["subscriber_count"] == 2


async def test_a_client_subscribes_to_at_most_max_subscriptions(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start_topics(nursery, tmp_path, engine, {"topics": {"max_subscriptions": 2}})
    http = relayd.http
    alice, bob = await register(http, "alice", "bob")
    for name in ("t1", "t2", "t3"):
        await create(http, token_of(alice), name)
    await subscribed(http, token_of(bob), "t1")
    await subscribed(http, token_of(bob), "t2")
    response = await subscribe(http, token_of(bob), "t3")
    error = assert_error(response, 409, "too_many_subscriptions")
    assert error["details"] == {"topic_id": "t3", "max_subscriptions": 2}
    # Others are not held to bob's count.
    await subscribed(http, token_of(alice), "t3")
    assert_ok(await unsubscribe(http, token_of(bob), "t1"))
    await subscribed(http, token_of(bob), "t3")


# --- settings and deletion ----------------------------------------------------------------------


async def test_only_the_owner_or_an_admin_changes_a_topics_settings(
    relayd: RunningRelayd,
) -> None:
    http = relayd.http
    alice, bob, boss = await register(http, "alice", "bob", "boss")
    await make_admin(relayd, boss)
    made = await create(http, token_of(alice), "room", metadata={"v": 1})
    await subscribed(http, token_of(bob), "room")
    refused = await patch(http, token_of(bob), "room", {"metadata": {"v": "bob's"}})
    assert assert_error(refused, 403, "not_owner")["details"] == {"topic_id": "room"}
    assert (await topic(http, None, "room"))["metadata"] == {"v": 1}
    changed = assert_ok(await patch(http, token_of(alice), "room", {"metadata": {"v": 2}}))
    assert list(changed) == TOPIC_KEYS
    assert changed == {**made, "metadata": {"v": 2}, "subscriber_count": 1}
    body = {"publish": "owner", "presence": True, "history_count": 3, "history_age": 10}
    changed = assert_ok(await patch(http, token_of(boss), "room", body))
    assert {k: changed[k] for k in body} == {**body, "history_age": 10.0}
    changed = assert_ok(await patch(http, admin_token(relayd), "room", {}))  # nothing to change
    assert changed == await topic(http, None, "room")
    assert (changed["metadata"], changed["creator"]) == ({"v": 2}, alice["uuid"])


async def test_a_topic_made_private_is_hidden_from_strangers_at_once(
    relayd: RunningRelayd,
) -> None:
    http = relayd.http
    alice, bob, carol = await register(http, "alice", "bob", "carol")
    await create(http, token_of(alice), "room")
    await subscribed(http, token_of(bob), "room")
    assert_ok(await patch(http, token_of(alice), "room", {"access": "private"}))
    assert_topic_not_found(await http.get("/topics/room", token=token_of(carol)), "room")
    assert_topic_not_found(await subscribe(http, token_of(carol), "room"), "room")
    assert await listed(http, token_of(carol)) == []
    assert await listed(http, token_of(bob)) == ["room"]  # its subscribers stay in it
    # A stranger patching it is told it does not exist.
    assert_topic_not_found(await patch(http, token_of(carol), "room", {"access": "open"}), "room")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param({"access": "public"}, "access", id="access"),
        pytest.param({"publish": 1}, "publish", id="publish"),
        pytest.param({"presence": "on"}, "presence", id="presence"),
        pytest.param({"metadata": [1, 2]}, "metadata", id="metadata"),
        pytest.param({"history_count": 101}, "history_count", id="count-max"),
        pytest.param({"history_age": 3601}, "history_age", id="age-max"),
        pytest.param({"history_age": "1h"}, "history_age", id="age-str"),
        pytest.param({"history_count": -1}, "history_count", id="count-neg"),
    ],
)
async def test_a_bad_patch_is_a_422_and_changes_nothing(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine, body: Doc, field: str
) -> None:
    relayd = await start_topics(nursery, tmp_path, engine, LIMITED)
    http = relayd.http
    (alice,) = await register(http, "alice")
    made = await create(http, token_of(alice), "room")
    error = assert_error(await patch(http, token_of(alice), "room", body), 422, "validation_error")
    assert error["details"] == {"field": field}, error
    assert await topic(http, None, "room") == made


async def test_only_the_owner_or_an_admin_deletes_a_topic(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice, bob, boss = await register(http, "alice", "bob", "boss")
    await make_admin(relayd, boss)
    for name in ("a1", "a2", "a3"):
        await create(http, token_of(alice), name)
    await subscribed(http, token_of(bob), "a1")
    refused = await http.delete("/topics/a1", token=token_of(bob))
    assert assert_error(refused, 403, "not_owner")["details"] == {"topic_id": "a1"}
    assert (await topic(http, None, "a1"))["subscriber_count"] == 1
    for name, who in (("a1", token_of(alice)), ("a2", token_of(boss)), ("a3", admin_token(relayd))):
        deleted = assert_ok(await http.delete(f"/topics/{name}", token=who))
        assert deleted == {"message": "Topic deleted", "topic_id": name}
        assert_topic_not_found(await http.get(f"/topics/{name}"), name)
        assert_topic_not_found(await http.delete(f"/topics/{name}", token=who), name)
    assert await listed(http, None) == []
    # Its id is free again, and the new topic starts empty.
    made = await create(http, token_of(bob), "a1")
    assert (made["creator"], made["subscriber_count"], made["last_offset"]) == (bob["uuid"], 0, 0)


# --- members ------------------------------------------------------------------------------------


async def test_the_owner_adds_and_removes_members_of_a_private_topic(
    relayd: RunningRelayd,
) -> None:
    http = relayd.http
    alice, bob, carol = await register(http, "alice", "bob", "carol")
    await create(http, token_of(alice), "club", access="private")
    path = f"/topics/club/members/{bob['uuid']}"
    added = assert_ok(await http.put(path, token=token_of(alice)))
    assert added == {
        "message": "Member added",
        "topic_id": "club",
        "client_uuid": bob["uuid"],
        "subscribed": True,
    }
    upper = f"/topics/club/members/{bob['uuid'].upper()}"
    again = assert_ok(await http.put(upper, token=token_of(alice)))
    assert (again["message"], again["client_uuid"]) == ("Already a member", bob["uuid"])
    assert (await topic(http, token_of(bob), "club"))["subscribed"] is True
    # A stranger can neither add itself nor remove bob: it does not see the topic.
    carol_path = f"/topics/club/members/{carol['uuid']}"
    assert_topic_not_found(await http.put(carol_path, token=token_of(carol)), "club")
    assert_topic_not_found(await http.delete(path, token=token_of(carol)), "club")
    # A member may not add another, nor remove another.
    refused = await http.put(carol_path, token=token_of(bob))
    assert assert_error(refused, 403, "not_owner")["details"] == {"topic_id": "club"}
    assert_ok(await http.put(carol_path, token=token_of(alice)))
    own = f"/topics/club/members/{alice['uuid']}"
    assert_ok(await http.put(own, token=token_of(alice)))  # the owner is a member if it likes
    assert_error(await http.delete(carol_path, token=token_of(bob)), 403, "not_owner")
    removed = assert_ok(await http.delete(carol_path, token=token_of(alice)))
    assert removed == {
        "message": "Member removed",
        "topic_id": "club",
        "client_uuid": carol["uuid"],
        "subscribed": False,
    }
    assert_topic_not_found(await http.get("/topics/club", token=token_of(carol)), "club")
    # Removing one who is not a member.
    missing = assert_error(await http.delete(carol_path, token=token_of(alice)), 404)
    assert missing["code"] == "not_subscribed"
    assert missing["details"] == {"topic_id": "club", "uuid": carol["uuid"]}
    assert (await topic(http, token_of(alice), "club"))["subscribers"] == sorted(
        [alice["uuid"], bob["uuid"]]
    )


async def test_a_member_removes_itself(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice, bob = await register(http, "alice", "bob")
    await create(http, token_of(alice), "club", access="private")
    path = f"/topics/club/members/{bob['uuid']}"
    assert_ok(await http.put(path, token=token_of(alice)))
    assert assert_ok(await http.delete(path, token=token_of(bob)))["message"] == "Member removed"
    # Out of a private topic, it sees it no more.
    assert_topic_not_found(await http.delete(path, token=token_of(bob)), "club")
    # In an open one, leaving twice is a 404 not_subscribed the second time.
    await create(http, token_of(alice), "lobby")
    await subscribed(http, token_of(bob), "lobby")
    lobby = f"/topics/lobby/members/{bob['uuid']}"
    assert_ok(await http.delete(lobby, token=token_of(bob)))
    assert_error(await http.delete(lobby, token=token_of(bob)), 404, "not_subscribed")


async def test_an_admin_manages_members_of_any_topic(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice, bob, boss = await register(http, "alice", "bob", "boss")
    await make_admin(relayd, boss)
    await create(http, token_of(alice), "club", access="private")
    path = f"/topics/club/members/{bob['uuid']}"
    assert_ok(await http.put(path, token=token_of(boss)))
    assert_ok(await http.delete(path, token=admin_token(relayd)))
    assert_ok(await http.put(path, token=admin_token(relayd)))
    assert (await topic(http, token_of(bob), "club"))["subscribers"] == [bob["uuid"]]


@pytest.mark.parametrize("who", [SOME_UUID, "not-a-uuid", "x" * 5000])
async def test_adding_an_unknown_client_is_a_404(relayd: RunningRelayd, who: str) -> None:
    http = relayd.http
    (alice,) = await register(http, "alice")
    await create(http, token_of(alice), "club", access="private")
    error = assert_error(
        await http.put(f"/topics/club/members/{who}", token=token_of(alice)), 404, "unknown_client"
    )
    assert len(error["details"]["uuid"]) <= 64
    assert (await topic(http, token_of(alice), "club"))["subscriber_count"] == 0


# --- subscribers --------------------------------------------------------------------------------


async def test_the_subscribers_page_by_uuid(relayd: RunningRelayd) -> None:
    http = relayd.http
    clients = await register(http, *(f"c{i}" for i in range(5)))
    owner = token_of(clients[0])
    await create(http, owner, "room")
    for client in clients:
        await subscribed(http, token_of(client), "room")
    every = sorted(c["uuid"] for c in clients)

    async def page(query: str, token: str | None = owner) -> list[str]:
        doc = assert_ok(await http.get(f"/topics/room/subscribers{query}", token=token))
        assert list(doc) == ["topic_id", "subscribers"]
        assert doc["topic_id"] == "room"
        found: list[str] = doc["subscribers"]
        return found

    assert await page("") == every
    assert await page("?limit=2") == every[:2]
    assert await page(f"?after={every[1]}&limit=2") == every[2:4]
    assert await page(f"?after={every[3]}&limit=2") == every[4:]
    assert await page(f"?after={every[4]}") == []
    assert await page(f"?token={token_of(clients[3])}&limit=1", token=None) == every[:1]
    for limit in ("0", "1001", "many"):
        response = await http.get(f"/topics/room/subscribers?limit={limit}", token=owner)
        assert assert_error(response, 422, "validation_error")["details"] == {"field": "limit"}
    assert_error(await http.get("/topics/room/subscribers"), 401, "missing_token")


async def test_a_private_topics_subscribers_are_for_its_members(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice, bob, carol = await register(http, "alice", "bob", "carol")
    await create(http, token_of(alice), "club", access="private")
    assert_ok(await http.put(f"/topics/club/members/{bob['uuid']}", token=token_of(alice)))
    response = await http.get("/topics/club/subscribers", token=token_of(carol))
    assert_topic_not_found(response, "club")
    doc = assert_ok(await http.get("/topics/club/subscribers", token=token_of(bob)))
    assert doc["subscribers"] == [bob["uuid"]]


# --- history ------------------------------------------------------------------------------------


async def published(relayd: RunningRelayd, publisher: Doc, topic_id: str, count: int) -> None:
    """``count`` messages published to ``topic_id`` by ``publisher``, msgids m1, m2..."""
    async with ws_connect(relayd, token_of(publisher)) as socket:
        await welcomed(socket)
        for i in range(1, count + 1):
            await publish(socket, topic_id, f"m{i}", subject=f"s{i}")


async def test_the_history_pages_by_offset(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice, bob = await register(http, "alice", "bob")
    await create(http, token_of(alice), "room")
    await subscribed(http, token_of(bob), "room")
    await published(relayd, alice, "room", 5)
    token = token_of(bob)
    first = await history(http, token, "room", "?limit=2")
    assert list(first) == ["topic_id", "messages", "next", "last_offset"]
    assert (first["topic_id"], first["next"], first["last_offset"]) == ("room", 2, 5)
    entry = first["messages"][0]
    assert list(entry) == ["offset", "msgid", "sender", "accepted_at", "message"]
    assert (entry["offset"], entry["msgid"], entry["sender"]) == (1, "m1", alice["uuid"])
    message = entry["message"]
    assert (message["topic_id"], message["from"], message["content"], message["subject"]) == (
        "room",
        alice["uuid"],
        "c-m1",
        "s1",
    )
    assert [m["offset"] for m in first["messages"]] == [1, 2]
    second = await history(http, token, "room", f"?since={first['next']}&limit=2")
    assert [(m["offset"], m["msgid"]) for m in second["messages"]] == [(3, "m3"), (4, "m4")]
    third = await history(http, token, "room", f"?since={second['next']}&limit=2")
    assert ([m["msgid"] for m in third["messages"]], third["next"]) == (["m5"], 5)
    done = await history(http, token, "room", f"?since={third['next']}")
    assert (done["messages"], done["next"], done["last_offset"]) == ([], 5, 5)
    # Without since: from the oldest kept; the seed's ?token= too.
    every = await history(http, None, "room", f"?token={token_of(alice)}")
    assert [m["offset"] for m in every["messages"]] == [1, 2, 3, 4, 5]
    # Past the end: nothing, and next stays where it was asked.
    beyond = await history(http, token, "room", "?since=99")
    assert (beyond["messages"], beyond["next"]) == ([], 99)


async def test_the_history_keeps_the_topics_last_history_count(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice, bob = await register(http, "alice", "bob")
    await create(http, token_of(alice), "room", history_count=2)
    await subscribed(http, token_of(bob), "room")
    await published(relayd, alice, "room", 5)
    kept = await history(http, token_of(bob), "room")
    assert [m["offset"] for m in kept["messages"]] == [4, 5]
    assert kept["last_offset"] == 5
    # A smaller count trims it at once.
    assert_ok(await patch(http, token_of(alice), "room", {"history_count": 1}))
    kept = await history(http, token_of(bob), "room")
    assert [m["offset"] for m in kept["messages"]] == [5]


async def test_a_private_topics_history_is_for_its_members(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice, bob, carol = await register(http, "alice", "bob", "carol")
    await create(http, token_of(alice), "club", access="private")
    assert_ok(await http.put(f"/topics/club/members/{bob['uuid']}", token=token_of(alice)))
    await published(relayd, alice, "club", 2)
    assert_topic_not_found(await http.get("/topics/club/messages", token=token_of(carol)), "club")
    assert [m["msgid"] for m in (await history(http, token_of(bob), "club"))["messages"]] == [
        "m1",
        "m2",
    ]
    assert (await history(http, admin_token(relayd), "club"))["last_offset"] == 2
    # The history of an open topic is for anyone with a token, never without one.
    await create(http, token_of(alice), "lobby")
    assert (await history(http, token_of(carol), "lobby"))["messages"] == []
    assert_error(await http.get("/topics/lobby/messages"), 401, "missing_token")
    assert_topic_not_found(
        await http.get("/topics/nothing/messages", token=token_of(bob)), "nothing"
    )


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("?since=-1", "since"),
        ("?since=x", "since"),
        ("?since=", "since"),
        (f"?since={2**62 + 1}", "since"),
        ("?since=1e3", "since"),
        ("?limit=0", "limit"),
        ("?limit=1001", "limit"),
        ("?limit=all", "limit"),
    ],
)
async def test_a_bad_history_query_is_a_422(relayd: RunningRelayd, query: str, field: str) -> None:
    http = relayd.http
    (alice,) = await register(http, "alice")
    await create(http, token_of(alice), "room")
    response = await http.get(f"/topics/room/messages{query}", token=token_of(alice))
    assert assert_error(response, 422, "validation_error")["details"] == {"field": field}


# --- hostile input ------------------------------------------------------------------------------

# Every topic route, as (method, path, body): the topic is "room", owned by alice.
ROUTES = [
    ("POST", "/topics/create", {"topic_id": "other"}),
    ("GET", "/topics", None),
    ("GET", "/topics/room", None),
    ("PATCH", "/topics/room", {"metadata": {"x": 1}}),
    ("DELETE", "/topics/room", None),
    ("POST", "/topics/subscribe", {"topic_id": "room"}),
    ("POST", "/topics/unsubscribe", {"topic_id": "room"}),
    ("GET", "/topics/room/subscribers", None),
    ("PUT", "/topics/room/members/{bob}", None),
    ("DELETE", "/topics/room/members/{bob}", None),
    ("GET", "/topics/room/messages", None),
]
ROUTE_IDS = [f"{method} {path}" for method, path, _ in ROUTES]


async def still_serving(relayd: RunningRelayd, alice: Doc) -> None:
    """The daemon answers others as before: the topic, untouched, and a new one."""
    http = relayd.http
    shown = await topic(http, token_of(alice), "room")
    assert (shown["creator"], shown["metadata"], shown["subscribers"]) == (alice["uuid"], {}, [])
    await create(http, token_of(alice), "afterwards")
    assert "afterwards" in await listed(http, None)


async def room_of_alice(relayd: RunningRelayd) -> tuple[Doc, Doc]:
    alice, bob = await register(relayd.http, "alice", "bob")
    await create(relayd.http, token_of(alice), "room")
    return alice, bob


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=ROUTE_IDS)
async def test_a_refresh_token_is_refused_on_every_route(
    relayd: RunningRelayd, method: str, path: str, body: Doc | None
) -> None:
    alice, bob = await room_of_alice(relayd)
    path = path.format(bob=bob["uuid"])
    refresh = alice["refresh_token"]
    response = await relayd.http.request(method, path, json_body=body, token=refresh)
    assert_error(response, 401, "token_wrong_type")
    joiner = "&" if "?" in path else "?"
    response = await relayd.http.request(method, f"{path}{joiner}token={refresh}", json_body=body)
    assert_error(response, 401, "token_wrong_type")
    await still_serving(relayd, alice)


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=ROUTE_IDS)
async def test_a_revoked_client_is_refused_on_every_route(
    relayd: RunningRelayd, method: str, path: str, body: Doc | None
) -> None:
    alice, bob = await room_of_alice(relayd)
    path = path.format(bob=bob["uuid"])
    revoke = f"/admin/clients/{alice['uuid']}/revoke"
    assert_ok(await relayd.http.post(revoke, token=admin_token(relayd)))
    for how in ("header", "query"):
        if how == "header":
            response = await relayd.http.request(
                method, path, json_body=body, token=token_of(alice)
            )
        else:
            response = await relayd.http.request(
                method, f"{path}?token={token_of(alice)}", json_body=body
            )
        assert_error(response, 401, "token_revoked")
    fresh = assert_ok(
        await relayd.http.post(
            "/auth/token", {"uuid": alice["uuid"], "client_secret": alice["client_secret"]}
        )
    )
    await still_serving(relayd, fresh)


@pytest.mark.parametrize(
    ("headers", "query", "code"),
    [
        ({"Authorization": "Bearer not-a-jwt"}, "", "token_invalid"),
        ({"Authorization": "Basic YWxpY2U6c2VjcmV0"}, "", "missing_token"),
        ({"Authorization": ""}, "", "missing_token"),
        ({}, "?token=not-a-jwt", "token_invalid"),
        ({}, "?token=", "token_invalid"),
    ],
)
async def test_a_bad_token_on_an_anonymous_read_is_refused_not_ignored(
    relayd: RunningRelayd, headers: dict[str, str], query: str, code: str
) -> None:
    alice, _ = await room_of_alice(relayd)
    for path in ("/topics", "/topics/room"):
        response = await relayd.http.get(f"{path}{query}", headers=headers)
        assert_error(response, 401, code)
    await still_serving(relayd, alice)


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [
        ("GET", "", None),
        ("PATCH", "", {"metadata": {}}),
        ("DELETE", "", None),
        ("GET", "/subscribers", None),
        ("GET", "/messages", None),
        ("PUT", "/members/{bob}", None),
        ("DELETE", "/members/{bob}", None),
    ],
)
async def test_a_huge_topic_id_in_the_path_is_unknown_quoting_little_of_it(
    relayd: RunningRelayd, method: str, suffix: str, body: Doc | None
) -> None:
    alice, bob = await room_of_alice(relayd)
    huge = "r" * 8000
    path = f"/topics/{huge}{suffix.format(bob=bob['uuid'])}"
    response = await relayd.http.request(method, path, json_body=body, token=token_of(alice))
    error = assert_error(response, 404, "TOPIC_NOT_FOUND")
    assert error["details"] == {"topic_id": "r" * 100}
    assert len(response.body) < 1000
    await still_serving(relayd, alice)


@pytest.mark.parametrize("route", ["/topics/create", "/topics/subscribe", "/topics/unsubscribe"])
async def test_a_huge_topic_id_in_a_body_is_a_422(relayd: RunningRelayd, route: str) -> None:
    alice, _ = await room_of_alice(relayd)
    response = await relayd.http.post(route, {"topic_id": "r" * 60_000}, token=token_of(alice))
    assert_error(response, 422, "validation_error")
    assert len(response.body) < 1000
    await still_serving(relayd, alice)


@pytest.mark.parametrize(
    "path",
    [
        "/topics/room/x",
        "/topics/ro/om",
        "/topics/room%2Fx",
        "/topics/room%2F",
        "/topics/%2F",
        "/topics/a%2Fb%2Fc",
        "/topics/room/messages/x",
        "/topics/room/members/",
        "/topics/room/members/%2F",
    ],
)
async def test_a_topic_id_with_a_slash_in_the_path_is_a_json_404(
    relayd: RunningRelayd, path: str
) -> None:
    alice, _ = await room_of_alice(relayd)
    for method in ("GET", "PATCH", "DELETE", "PUT", "POST"):
        body = None if method in ("GET", "DELETE") else {"access": "private"}
        response = await relayd.http.request(method, path, json_body=body, token=token_of(alice))
        assert_error(response, 404, "not_found")
    await still_serving(relayd, alice)


async def test_an_encoded_slash_is_a_slash_and_dot_segments_are_ids(relayd: RunningRelayd) -> None:
    """The path is matched percent-decoded (as ASGI hands it over): ``%2F`` separates segments
    like ``/``, which no topic id holds, so it names no other topic. ``..`` is no valid id."""
    alice, bob = await room_of_alice(relayd)
    await subscribed(relayd.http, token_of(bob), "room")
    http, token = relayd.http, token_of(alice)
    doc = assert_ok(await http.get("/topics/room%2Fsubscribers", token=token))
    assert doc == {"topic_id": "room", "subscribers": [bob["uuid"]]}
    assert_error(await http.delete("/topics/room%2Fsubscribers", token=token), 405)
    for path in ("/topics/..", "/topics/%2e%2e", "/topics/.", "/topics/~"):
        for method in ("GET", "PATCH", "DELETE"):
            body = {"access": "private"} if method == "PATCH" else None
            response = await http.request(method, path, json_body=body, token=token)
            assert_error(response, 404, "TOPIC_NOT_FOUND")
    await unsubscribe(http, token_of(bob), "room")
    await still_serving(relayd, alice)


BODY_ROUTES = [
    ("POST", "/topics/create"),
    ("POST", "/topics/subscribe"),
    ("POST", "/topics/unsubscribe"),
    ("PATCH", "/topics/room"),
]
BODY_IDS = [f"{method} {path}" for method, path in BODY_ROUTES]


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES, ids=BODY_IDS)
@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        pytest.param(b"{not json", 400, "invalid_json", id="not-json"),
        pytest.param(b"", 400, "invalid_json", id="empty"),
        pytest.param(b"\xff\xfe", 400, "invalid_json", id="not-utf8"),
        pytest.param(b'["room"]', 400, "invalid_json", id="array"),
        pytest.param(b'"room"', 400, "invalid_json", id="string"),
        pytest.param(b"null", 400, "invalid_json", id="null"),
        pytest.param(b'{"topic_id": NaN}', 400, "invalid_json", id="nan"),
        pytest.param(b"[" * 60_000, 400, "invalid_json", id="deep"),
        pytest.param(b'{"topic_id": "\\ud800"}', 422, "validation_error", id="surrogate"),
    ],
)
async def test_a_body_that_is_no_json_object_is_a_clear_error(
    relayd: RunningRelayd, method: str, path: str, raw: bytes, status: int, code: str
) -> None:
    alice, _ = await room_of_alice(relayd)
    headers = {"Content-Type": "application/json"}
    response = await relayd.http.request(
        method, path, body=raw, headers=headers, token=token_of(alice)
    )
    assert_error(response, status, code)
    await still_serving(relayd, alice)


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES, ids=BODY_IDS)
async def test_a_body_that_is_not_json_typed_is_a_415(
    relayd: RunningRelayd, method: str, path: str
) -> None:
    alice, _ = await room_of_alice(relayd)
    headers = {"Content-Type": "text/plain"}
    body = b'{"topic_id": "room"}'
    response = await relayd.http.request(
        method, path, body=body, headers=headers, token=token_of(alice)
    )
    assert_error(response, 415, "unsupported_media_type")
    await still_serving(relayd, alice)


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("/topics/subscribe", {}, "topic_id"),
        ("/topics/subscribe", {"topic_id": 7}, "topic_id"),
        ("/topics/subscribe", {"topic_id": {"id": "room"}}, "topic_id"),
        ("/topics/unsubscribe", {"topic_id": None}, "topic_id"),
        ("/topics/unsubscribe", {"topic": "room"}, "topic_id"),
    ],
)
async def test_a_mistyped_field_is_a_422_naming_it(
    relayd: RunningRelayd, route: str, body: Doc, field: str
) -> None:
    alice, _ = await room_of_alice(relayd)
    response = await relayd.http.post(route, body, token=token_of(alice))
    error = assert_error(response, 422, "validation_error")
    assert error["details"] == {"field": field}
    await still_serving(relayd, alice)


async def test_unknown_fields_are_ignored_as_on_every_route(relayd: RunningRelayd) -> None:
    """relayd's bodies are lenient about keys they do not know (test_rest.py: "unknown keys are
    ignored"), so that a seed client's extra fields do not break it."""
    http = relayd.http
    alice, bob = await register(http, "alice", "bob")
    made = await create(http, token_of(alice), "room", owner=bob["uuid"], creator=bob["uuid"])
    assert made["creator"] == alice["uuid"]
    assert "owner" not in made
    response = await http.post(
        "/topics/subscribe", {"topic_id": "room", "client_uuid": alice["uuid"]}, token=token_of(bob)
    )
    assert assert_ok(response)["client_uuid"] == bob["uuid"]  # itself, never the one named
    changed = assert_ok(await patch(http, token_of(alice), "room", {"creator": bob["uuid"]}))
    assert changed["creator"] == alice["uuid"]


async def test_a_route_that_does_not_exist_is_a_json_404_or_405(relayd: RunningRelayd) -> None:
    alice, _ = await room_of_alice(relayd)
    http = relayd.http
    assert_error(await http.get("/topics/create", token=token_of(alice)), 404, "TOPIC_NOT_FOUND")
    assert_error(await http.put("/topics/room", {}, token=token_of(alice)), 405)
    assert_error(await http.post("/topics/room/messages", {}, token=token_of(alice)), 405)
    await still_serving(relayd, alice)


async def test_hostile_calls_in_parallel_leave_the_daemon_serving(relayd: RunningRelayd) -> None:
    """A burst of refused calls from one client, alongside a well-behaved one: every answer is
    a JSON error or a success, and the well-behaved client's calls all succeed."""
    http = relayd.http
    alice, mallory = await register(http, "alice", "mallory")
    await create(http, token_of(alice), "room")
    statuses: list[int] = []

    async def hostile(i: int) -> None:
        client, token = HttpClient(*relayd.addresses.http), token_of(mallory)
        calls = [
            lambda: client.request("POST", "/topics/create", body=b"[", headers=JSON, token=token),
            lambda: client.delete("/topics/room", token=token),
            lambda: client.post("/topics/create", {"topic_id": "-" * i}, token=token),
            lambda: client.get(f"/topics/{'x' * (5000 + i)}", token=token),
            lambda: client.get("/topics/room/messages?since=-1", token=token),
        ]
        response = await calls[i % len(calls)]()
        assert_error(response, response.status)
        statuses.append(response.status)

    async def friendly() -> None:
        for i in range(10):
            await create(http, token_of(alice), f"ok-{i}")

    async with trio.open_nursery() as group:
        for i in range(25):
            group.start_soon(hostile, i)
        group.start_soon(friendly)
    assert sorted(set(statuses)) == [400, 403, 404, 422]
    assert await listed(http, None) == [*(f"ok-{i}" for i in range(10)), "room"]


# --- clients that go ----------------------------------------------------------------------------


async def test_a_deleted_client_leaves_its_topics_and_its_own_are_deleted(
    relayd: RunningRelayd,
) -> None:
    http = relayd.http
    alice, bob, carol = await register(http, "alice", "bob", "carol")
    await create(http, token_of(alice), "alices")
    await create(http, token_of(carol), "carols")
    for name in ("alices", "carols"):
        await subscribed(http, token_of(bob), name)
    await subscribed(http, token_of(alice), "carols")
    assert assert_ok(await http.delete(f"/clients/{alice['uuid']}", token=token_of(alice))) == {
        "deleted": alice["uuid"]
    }
    assert_topic_not_found(await http.get("/topics/alices", token=token_of(bob)), "alices")
    shown = await topic(http, token_of(bob), "carols")
    assert (shown["subscriber_count"], shown["subscribers"]) == (1, [bob["uuid"]])
    assert await listed(http, token_of(bob)) == ["carols"]
    # Its id is free for another owner.
    assert (await create(http, token_of(carol), "alices"))["creator"] == carol["uuid"]
    # A deleted client cannot be added back.
    added = await http.put(f"/topics/carols/members/{alice['uuid']}", token=token_of(carol))
    assert_error(added, 404, "unknown_client")
