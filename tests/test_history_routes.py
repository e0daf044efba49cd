"""``GET /messages``: a client's history over REST (issue 14), against a real relayd on
loopback, on both engines: what it sent and received, paged by cursor, never anyone else's,
and every bad query a clear 422."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from .support import Engine, HttpClient, RunningRelayd, make_config, start_relayd
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


async def test_with_a_retention_history_keeps_what_was_said_and_when(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    config = make_config(tmp_path, {"history": {"retention": 3600.0}}, engine=engine)
    relayd = await start_relayd(nursery, config)
    http = relayd.http
    alice, bob = [await http.register(name) for name in ("alice", "bob")]
    async with (
        ws_connect(relayd, alice["access_token"]) as a,
        ws_connect(relayd, bob["access_token"]) as b,
    ):
        await a.next()
        await b.next()
        for msgid, conversation in (("m1", "trip"), ("m2", "work"), ("m3", "trip")):
            await a.send(
                {
                    "to": bob["uuid"],
                    "msgid": msgid,
                    "acknowledge": True,
                    "content": f"c-{msgid}",
                    "conversation_id": conversation,
                }
            )
            message = await b.next_of("message")
            await b.send({"type": "ack", "msgid": message["msgid"]})
            update = await a.next_of("delivery_update")
            assert (update["msgid"], update["status"]) == (msgid, "acknowledged")
    trip = await history(http, bob["access_token"], "?conversation_id=trip&order=oldest")
    assert [(m["msgid"], m["status"], m["message"]["content"]) for m in trip["messages"]] == [
        ("m1", "acknowledged", "c-m1"),
        ("m3", "acknowledged", "c-m3"),
    ]
    entry = trip["messages"][0]
    assert entry["accepted_at"] <= entry["delivered_at"] <= entry["finished_at"]
    assert entry["message"]["from"] == alice["uuid"]


async def test_without_a_retention_a_final_message_keeps_its_record_not_its_content(
    relayd: RunningRelayd,
) -> None:
    http = relayd.http
    alice, bob = [await http.register(name) for name in ("alice", "bob")]
    async with (
        ws_connect(relayd, alice["access_token"]) as a,
        ws_connect(relayd, bob["access_token"]) as b,
    ):
        await a.next()
        await b.next()
        await a.send({"to": bob["uuid"], "msgid": "m1", "acknowledge": True, "content": "x"})
        await b.send({"type": "ack", "msgid": (await b.next_of("message"))["msgid"]})
        assert (await a.next_of("delivery_update"))["status"] == "acknowledged"
    [entry] = (await history(http, alice["access_token"]))["messages"]
    assert (entry["msgid"], entry["status"], entry["message"]) == ("m1", "acknowledged", None)
