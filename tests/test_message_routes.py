"""The seed system's message routes (issue 14, its seed-compatible part): ``GET
/messages/{msgid}/status`` for a message's sender or recipient, and ``GET
/clients/{uuid}/undelivered`` for the client itself, both taking the token as the seed's
clients send it (``?token=``) or as a Bearer header. Against a real relayd on loopback."""

from __future__ import annotations

from typing import Any

import pytest

from .support import HttpClient, HttpResponse, RunningRelayd
from .test_rest import admin_token, assert_error, assert_ok
from .ws_support import WsClient, ws_connect


async def get(http: HttpClient, path: str, token: str, *, query: bool = False) -> HttpResponse:
    if query:  # the seed's way
        joiner = "&" if "?" in path else "?"
        return await http.get(f"{path}{joiner}token={token}")
    return await http.get(path, token=token)


async def send(socket: WsClient, to: str, msgid: str, *, ack: bool = True) -> dict[str, Any]:
    await socket.send({"to": to, "msgid": msgid, "acknowledge": ack, "content": f"c-{msgid}"})
    frame = await socket.next()
    while frame.get("type") != "delivery_status":
        frame = await socket.next()
    return frame


@pytest.mark.parametrize("query", [False, True], ids=["bearer", "query"])
async def test_undelivered_lists_what_waits_for_the_client_itself(
    relayd: RunningRelayd, query: bool
) -> None:
    http = relayd.http
    alice = await http.register("alice")
    bob = await http.register("bob")
    async with ws_connect(relayd, alice["access_token"]) as socket:
        await socket.next()
        for i in range(3):
            assert (await send(socket, bob["uuid"], f"m{i}"))["status"] == "queued_offline"
    path = f"/clients/{bob['uuid']}/undelivered"
    doc = assert_ok(await get(http, path, bob["access_token"], query=query))
    assert doc["count"] == 3
    assert [(m["msgid"], m["from"], m["content"]) for m in doc["messages"]] == [
        (f"m{i}", alice["uuid"], f"c-m{i}") for i in range(3)
    ]
    assert all(m["attempts"] == 0 for m in doc["messages"])
    page = assert_ok(await get(http, f"{path}?limit=2", bob["access_token"], query=query))
    assert (page["count"], [m["msgid"] for m in page["messages"]]) == (3, ["m0", "m1"])
    # Only bob (or an admin) may ask.
    refused = await get(http, path, alice["access_token"], query=query)
    assert_error(refused, 403, "not_yours")
    assert assert_ok(await http.get(path, token=admin_token(relayd)))["count"] == 3
    # Delivered and acknowledged: nothing waits any more.
    async with ws_connect(relayd, bob["access_token"]) as socket:
        await socket.next()
        for _ in range(3):
            await socket.send({"type": "ack", "msgid": (await socket.next_of("message"))["msgid"]})
        for _ in range(3):
            assert (await socket.next_of("ack_received"))["status"] == "acknowledged"
    # An acknowledgement's write may wait for the next urgent commit (at most 50 ms): a new
    # message's, whose receipt comes once it, and what waited for it, is committed.
    async with ws_connect(relayd, alice["access_token"]) as socket:
        await socket.next()
        assert (await send(socket, bob["uuid"], "m3"))["status"] == "queued_offline"
    doc = assert_ok(await http.get(path, token=bob["access_token"]))
    assert (doc["count"], [m["msgid"] for m in doc["messages"]]) == (1, ["m3"])


@pytest.mark.parametrize("limit", ["0", "1001", "x", "-1", "1.5"])
async def test_a_bad_limit_is_422(relayd: RunningRelayd, limit: str) -> None:
    bob = await relayd.http.register("bob")
    path = f"/clients/{bob['uuid']}/undelivered?limit={limit}"
    error = assert_error(await relayd.http.get(path, token=bob["access_token"]), 422)
    assert error["details"]["field"] == "limit"


async def test_status_for_the_sender_and_the_recipient(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice = await http.register("alice")
    bob = await http.register("bob")
    carol = await http.register("carol")
    async with ws_connect(relayd, alice["access_token"]) as socket:
        await socket.next()
        await send(socket, bob["uuid"], "m1")
    path = "/messages/m1/status"
    for who, query in ((alice, False), (alice, True), (bob, False)):
        doc = assert_ok(await get(http, path, who["access_token"], query=query))
        assert (doc["msgid"], doc["from"], doc["to"]) == ("m1", alice["uuid"], bob["uuid"])
        assert (doc["status"], doc["final"], doc["attempts"]) == ("queued_offline", False, 0)
        assert doc["finished_at"] is None
    assert_error(await http.get(path, token=carol["access_token"]), 403, "not_yours")
    assert_error(await http.get("/messages/nope/status", token=alice["access_token"]), 404)
    long = "/messages/" + "x" * 300 + "/status"
    assert_error(await http.get(long, token=alice["access_token"]), 404, "unknown_message")
    assert_error(await http.get(path), 401, "missing_token")

    async with ws_connect(relayd, bob["access_token"]) as socket:
        await socket.next()
        await socket.send({"type": "ack", "msgid": (await socket.next_of("message"))["msgid"]})
        assert (await socket.next_of("ack_received"))["status"] == "acknowledged"
    doc = assert_ok(await http.get(path, token=alice["access_token"]))
    assert (doc["status"], doc["final"], doc["attempts"]) == ("acknowledged", True, 1)


async def test_the_status_of_a_message_on_its_way_is_what_its_sender_was_told(
    relayd: RunningRelayd,
) -> None:
    http = relayd.http
    alice = await http.register("alice")
    bob = await http.register("bob")
    async with (
        ws_connect(relayd, alice["access_token"]) as a,
        ws_connect(relayd, bob["access_token"]) as b,
    ):
        await a.next()
        await b.next()
        assert (await send(a, bob["uuid"], "held"))["status"] == "pending_ack"
        assert (await b.next_of("message"))["msgid"] == "held"  # bob holds it, unacked
        doc = assert_ok(await http.get("/messages/held/status", token=bob["access_token"]))
        assert (doc["status"], doc["final"], doc["to"]) == ("pending_ack", False, bob["uuid"])


async def test_a_query_token_is_taken_on_these_routes_only(
    relayd: RunningRelayd, capfd: pytest.CaptureFixture[str]
) -> None:
    bob = await relayd.http.register("bob")
    token = bob["access_token"]
    assert_error(await relayd.http.get(f"/clients?token={token}"), 401, "missing_token")
    assert_ok(await relayd.http.get(f"/clients/{bob['uuid']}/undelivered?token={token}"))
    # A header wins over the query (a garbage header is refused, whatever the query says).
    mixed = await relayd.http.get(
        f"/clients/{bob['uuid']}/undelivered?token={token}", token="garbage"
    )
    assert_error(mixed, 401, "token_invalid")
    assert token not in capfd.readouterr().err  # never logged, not even from a URL


@pytest.mark.parametrize(
    "path",
    [
        "/messages/%ED%A0%80/status",  # an encoded lone surrogate
        "/messages/%FF/status",  # not UTF-8
        "/messages/a%00b/status",
        "/messages/" + "%C3%A9" * 300 + "/status",
        "/clients/%ED%A0%80/undelivered",
        "/clients/" + "x" * 3000 + "/undelivered",
    ],
)
async def test_hostile_paths_are_404_in_the_error_shape(relayd: RunningRelayd, path: str) -> None:
    alice = await relayd.http.register("alice")
    response = await relayd.http.get(path, token=alice["access_token"])
    error = assert_error(response, 404)
    assert error["code"] in ("unknown_message", "unknown_client")
    assert len(error["message"]) < 100
