"""Read receipts end to end (issue 14), on a real relayd on both engines (``engine``) and on a
two-node cluster: the ``read`` frame and ``POST /messages/{msgid}/read``, what the sender is
told, what the status route and history show, and ``PUT /clients/{uuid}/read-receipts``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from .support import HttpClient, HttpResponse, RunningRelayd
from .test_cluster import cluster
from .test_rest import assert_error, assert_ok
from .ws_support import WsClient, welcomed, ws_connect


async def delivered(alice: WsClient, bob: WsClient, to: str, msgid: str) -> None:
    """``alice`` sends ``msgid`` (acknowledged) to ``to`` on ``bob``, who acks it; alice hears
    ``acknowledged``."""
    await alice.send({"to": to, "msgid": msgid, "acknowledge": True, "content": msgid})
    assert (await bob.next_of("message"))["msgid"] == msgid
    await bob.send({"type": "ack", "msgid": msgid})
    assert (await bob.next_of("ack_received"))["status"] == "acknowledged"
    update = await alice.next_of("delivery_update")
    assert (update["msgid"], update["status"]) == (msgid, "acknowledged")


async def read_over_rest(
    http: HttpClient, msgid: str, token: str, *, query: str = ""
) -> HttpResponse:
    return await http.post(f"/messages/{msgid}/read{query}", token=token)


async def test_a_read_frame_tells_the_sender_and_shows_in_status_and_history(
    relayd: RunningRelayd,
) -> None:
    http = relayd.http
    alice, bob = await http.register("alice"), await http.register("bob")
    async with (
        ws_connect(relayd, alice["access_token"]) as a,
        ws_connect(relayd, bob["access_token"]) as b,
    ):
        await welcomed(a)
        await welcomed(b)
        await delivered(a, b, bob["uuid"], "m1")
        await b.send({"type": "read", "msgid": "m1"})
        answer = await b.next_of("read_received")
        assert (answer["msgid"], answer["from"], answer["status"]) == ("m1", alice["uuid"], "read")
        update = await a.next_of("delivery_update")
        assert (update["msgid"], update["to"], update["status"]) == ("m1", bob["uuid"], "read")
        assert update["read_at"] == answer["read_at"]
        # Again: answered, nobody told twice (the ping's pong comes after anything queued).
        await b.send({"type": "read", "msgid": "m1", "from": alice["uuid"]})
        again = await b.next_of("read_received")
        assert (again["status"], again["read_at"]) == ("already_read", answer["read_at"])
        await a.send({"type": "ping"})
        assert (await a.next())["type"] == "pong"
    for who in (alice, bob):
        status = assert_ok(await http.get("/messages/m1/status", token=who["access_token"]))
        assert status["read_at"] == answer["read_at"]
        assert status["delivered_at"] is not None
        [entry] = assert_ok(await http.get("/messages", token=who["access_token"]))["messages"]
        assert entry["read_at"] == answer["read_at"]


async def test_a_rest_read_tells_an_offline_sender_when_it_connects(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice, bob = await http.register("alice"), await http.register("bob")
    async with ws_connect(relayd, alice["access_token"]) as a:
        await welcomed(a)
        await a.send({"to": bob["uuid"], "msgid": "m1", "content": "hi"})
        assert (await a.next_of("delivery_status"))["status"] == "queued_offline"
    # Not delivered yet: nothing to read.
    refused = await read_over_rest(http, "m1", bob["access_token"])
    assert_error(refused, 409, "not_delivered")
    async with ws_connect(relayd, bob["access_token"]) as b:
        await welcomed(b)
        assert (await b.next_of("message"))["msgid"] == "m1"
    # The seed's ?token= works here too.
    query = f"?from={alice['uuid']}&token={bob['access_token']}"
    doc = assert_ok(await http.post(f"/messages/m1/read{query}"))
    assert (doc["msgid"], doc["from"], doc["to"], doc["status"]) == (
        "m1",
        alice["uuid"],
        bob["uuid"],
        "read",
    )
    again = assert_ok(await read_over_rest(http, "m1", bob["access_token"]))
    assert (again["status"], again["read_at"]) == ("already_read", doc["read_at"])
    async with ws_connect(relayd, alice["access_token"]) as a:
        await welcomed(a)
        delivered_update = await a.next_of("delivery_update")
        read_update = await a.next_of("delivery_update")
        assert [delivered_update["status"], read_update["status"]] == ["delivered", "read"]
        assert read_update["read_at"] == doc["read_at"]
        await a.send({"type": "ping"})
        assert (await a.next())["type"] == "pong"  # told once


async def test_no_one_but_the_recipient_may_mark_a_message_read(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice, bob = await http.register("alice"), await http.register("bob")
    carol = await http.register("carol")
    async with (
        ws_connect(relayd, alice["access_token"]) as a,
        ws_connect(relayd, bob["access_token"]) as b,
        ws_connect(relayd, carol["access_token"]) as c,
    ):
        for socket in (a, b, c):
            await welcomed(socket)
        await delivered(a, b, bob["uuid"], "m1")
        await a.send({"type": "read", "msgid": "m1"})  # its sender
        assert (await a.next_of("error"))["error"]["code"] == "not_yours"
        await c.send({"type": "read", "msgid": "m1"})
        assert (await c.next_of("error"))["error"]["code"] == "not_yours"
        await c.send({"type": "read", "msgid": "nope"})
        assert (await c.next_of("error"))["error"]["code"] == "unknown_message"
        await b.send({"type": "read", "msgid": "m1", "from": carol["uuid"]})
        assert (await b.next_of("error"))["error"]["code"] == "not_yours"
        for bad in (
            {"type": "read"},
            {"type": "read", "msgid": "x" * 129},
            {"type": "read", "msgid": 1},
        ):
            await b.send(bad)
            error = (await b.next_of("error"))["error"]
            assert (error["code"], error["details"]["field"]) == ("INVALID_MESSAGE_FORMAT", "msgid")
        await b.send({"type": "read", "msgid": "m1", "from": "nobody"})
        assert (await b.next_of("error"))["error"]["details"]["field"] == "from"
    assert_error(await read_over_rest(http, "m1", alice["access_token"]), 403, "not_yours")
    assert_error(await read_over_rest(http, "m1", carol["access_token"]), 403, "not_yours")
    assert_error(await read_over_rest(http, "nope", bob["access_token"]), 404, "unknown_message")
    huge = "x" * 300
    assert_error(await read_over_rest(http, huge, bob["access_token"]), 404, "unknown_message")
    bad_from = await read_over_rest(http, "m1", bob["access_token"], query="?from=nobody")
    assert assert_error(bad_from, 422, "validation_error")["details"]["field"] == "from"
    assert_error(await http.post("/messages/m1/read"), 401, "missing_token")
    status = assert_ok(await http.get("/messages/m1/status", token=alice["access_token"]))
    assert status["read_at"] is None


async def test_a_client_with_read_receipts_off_reads_for_itself_alone(
    relayd: RunningRelayd,
) -> None:
    http = relayd.http
    alice, bob = await http.register("alice"), await http.register("bob")
    path = f"/clients/{bob['uuid']}/read-receipts"
    mine = assert_ok(await http.get(f"/clients/{bob['uuid']}", token=bob["access_token"]))
    assert mine["read_receipts"] is True
    theirs = assert_ok(await http.get(f"/clients/{bob['uuid']}", token=alice["access_token"]))
    assert "read_receipts" not in theirs
    assert_error(await http.put(path, {"enabled": False}, token=alice["access_token"]), 403)
    bad = await http.put(path, {"enabled": "no"}, token=bob["access_token"])
    assert assert_error(bad, 422, "validation_error")["details"]["field"] == "enabled"
    off = assert_ok(await http.put(path, {"enabled": False}, token=bob["access_token"]))
    assert off == {"uuid": bob["uuid"], "read_receipts": False}
    mine = assert_ok(await http.get(f"/clients/{bob['uuid']}", token=bob["access_token"]))
    assert mine["read_receipts"] is False
    async with (
        ws_connect(relayd, alice["access_token"]) as a,
        ws_connect(relayd, bob["access_token"]) as b,
    ):
        await welcomed(a)
        await welcomed(b)
        await delivered(a, b, bob["uuid"], "m1")
        await b.send({"type": "read", "msgid": "m1"})
        answer = await b.next_of("read_received")
        assert answer["status"] == "read"
        await a.send({"type": "ping"})
        assert (await a.next())["type"] == "pong"  # no read receipt before it
    own = assert_ok(await http.get("/messages/m1/status", token=bob["access_token"]))
    sender = assert_ok(await http.get("/messages/m1/status", token=alice["access_token"]))
    assert (own["read_at"], sender["read_at"]) == (answer["read_at"], None)
    [entry] = assert_ok(await http.get("/messages", token=alice["access_token"]))["messages"]
    assert entry["read_at"] is None


async def test_a_flood_of_reads_is_rate_limited(
    nursery: trio.Nursery, tmp_path: Path, engine: Any
) -> None:
    from .test_rest import start_daemon

    relayd = await start_daemon(
        nursery, tmp_path, engine, {"websocket": {"messages_per_second": 1, "message_burst": 5}}
    )
    bob = await relayd.http.register("bob")
    async with ws_connect(relayd, bob["access_token"]) as b:
        await welcomed(b)
        for _ in range(6):
            await b.send({"type": "read", "msgid": "nope"})
        codes = [(await b.next_of("error"))["error"]["code"] for _ in range(6)]
    # The refusal is answered at once, the others once the store has: in any order.
    assert sorted(codes) == ["rate_limited"] + ["unknown_message"] * 5


async def test_a_read_on_one_node_reaches_the_sender_on_the_other_online_and_offline(
    nursery: trio.Nursery, tmp_path: Path, redis_url: str
) -> None:
    async with cluster(nursery, tmp_path, redis_url) as (node_a, node_b):
        alice = await node_a.http.register("alice")
        bob = await node_b.http.register("bob")
        async with ws_connect(node_b, alice["access_token"]) as a:  # the sender, on node B
            await welcomed(a)
            async with ws_connect(node_a, bob["access_token"]) as b:  # the reader, on node A
                await welcomed(b)
                await delivered(a, b, bob["uuid"], "m1")
                await b.send({"type": "read", "msgid": "m1"})
                answer = await b.next_of("read_received")
                update = await a.next_of("delivery_update")
                assert (update["msgid"], update["status"], update["read_at"]) == (
                    "m1",
                    "read",
                    answer["read_at"],
                )
                await a.send({"to": bob["uuid"], "msgid": "m2", "acknowledge": True})
                assert (await b.next_of("message"))["msgid"] == "m2"
        # The sender is offline: the read (over REST, on node A) waits in the store.
        doc = assert_ok(await read_over_rest(node_a.http, "m2", bob["access_token"]))
        async with ws_connect(node_b, alice["access_token"]) as a:
            await welcomed(a)
            update = await a.next_of("delivery_update")
            assert (update["msgid"], update["status"], update["read_at"]) == (
                "m2",
                "read",
                doc["read_at"],
            )
