"""``GET /messages``: a client's history over REST (issue 14), against a real relayd on
loopback, on both engines: what it sent and received, paged by cursor, never anyone else's,
and every bad query a clear 422."""

from __future__ import annotations

from typing import Any

import pytest

from .support import HttpClient, RunningRelayd
from .test_message_routes import send
from .test_rest import admin_token, assert_error, assert_ok
from .ws_support import ws_connect


async def history(http: HttpClient, token: str, query: str = "") -> dict[str, Any]:
    return assert_ok(await http.get(f"/messages{query}", token=token))


async def test_a_client_reads_what_it_sent_and_received_a_page_at_a_time(
    relayd: RunningRelayd,
) -> None:
    http = relayd.http
    alice, bob, carol = [await http.register(name) for name in ("alice", "bob", "carol")]
    async with ws_connect(relayd, alice["access_token"]) as socket:
        await socket.next()
        for i in range(5):
            assert (await send(socket, bob["uuid"], f"m{i}"))["status"] == "queued_offline"
    sent = await history(http, alice["access_token"], "?box=sent&limit=2")
    assert [m["msgid"] for m in sent["messages"]] == ["m4", "m3"]
    first = sent["messages"][0]
    assert (first["from"], first["to"], first["status"], first["final"]) == (
        alice["uuid"],
        bob["uuid"],
        "queued",
        False,
    )
    assert first["message"]["content"] == "c-m4"  # waiting: its content is there
    following = await history(
        http, alice["access_token"], f"?box=sent&limit=2&cursor={sent['next_cursor']}"
    )
    assert [m["msgid"] for m in following["messages"]] == ["m2", "m1"]
    last = await history(
        http, alice["access_token"], f"?box=sent&limit=2&cursor={following['next_cursor']}"
    )
    assert ([m["msgid"] for m in last["messages"]], last["next_cursor"]) == (["m0"], None)
    oldest = await history(http, bob["access_token"], "?order=oldest&box=inbox")
    assert [m["msgid"] for m in oldest["messages"]] == [f"m{i}" for i in range(5)]
    # Nobody else's: carol has no history, and the peer filter finds nothing between her and
    # alice.
    assert (await history(http, carol["access_token"]))["messages"] == []
    assert (await history(http, alice["access_token"], f"?peer={carol['uuid']}"))["count"] == 0
    assert (await history(http, alice["access_token"], f"?peer={bob['uuid']}"))["count"] == 5


async def test_only_an_admin_reads_another_clients_history(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice, bob = [await http.register(name) for name in ("alice", "bob")]
    async with ws_connect(relayd, alice["access_token"]) as socket:
        await socket.next()
        await send(socket, bob["uuid"], "m0")
    refused = await http.get(f"/messages?client={alice['uuid']}", token=bob["access_token"])
    assert_error(refused, 403, "not_yours")
    seen = await history(http, admin_token(relayd), f"?client={alice['uuid']}")
    assert [m["msgid"] for m in seen["messages"]] == ["m0"]
    # The seed's way of passing the token works here too.
    query = assert_ok(await http.get(f"/messages?token={alice['access_token']}"))
    assert query["count"] == 1
    assert_error(await http.get("/messages"), 401)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("?box=outbox", "box"),
        ("?order=sideways", "order"),
        ("?limit=0", "limit"),
        ("?limit=201", "limit"),
        ("?limit=ten", "limit"),
        ("?cursor=-1", "cursor"),
        ("?cursor=12345678901234567890", "cursor"),
        ("?cursor=abc", "cursor"),
        ("?peer=not-a-uuid", "peer"),
        ("?client=not-a-uuid", "client"),
        ("?conversation_id=" + "x" * 257, "conversation_id"),
        ("?conversation_id=", "conversation_id"),
        ("?since=0", "since"),
    ],
)
async def test_a_bad_query_is_a_422_naming_what_is_wrong(
    relayd: RunningRelayd, query: str, field: str
) -> None:
    http = relayd.http
    token = admin_token(relayd) if "client" in query else (await http.register("a"))["access_token"]
    error = assert_error(await http.get(f"/messages{query}", token=token), 422, "validation_error")
    assert field in str(error)
