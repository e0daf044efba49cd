"""Topics across two real relayd nodes on one real Redis server (issue 13): a publish on one
node reaches subscribers on both, each acking on its own, with the publisher's counts; presence
and typing cross nodes, and a subscriber whose socket moves to the other node is not told
offline; an ephemeral broadcast reaches every node; ``GET /topics/{id}/presence`` on either
node sees sockets on both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from .support import RunningRelayd
from .test_cluster import cluster
from .test_rest import assert_ok
from .ws_support import WsClient, welcomed, ws_connect


async def subscribe(node: RunningRelayd, token: str, topic: str) -> None:
    assert_ok(
        await node.http.request(
            "POST", "/topics/subscribe", json_body={"topic_id": topic}, token=token
        )
    )


async def room(node: RunningRelayd, owner: dict[str, Any], *members: dict[str, Any]) -> None:
    assert_ok(
        await node.http.request(
            "POST",
            "/topics/create",
            json_body={"topic_id": "room", "presence": True},
            token=owner["access_token"],
        )
    )
    for member in (owner, *members):
        await subscribe(node, member["access_token"], "room")


async def presence_events(socket: WsClient) -> list[tuple[str, str]]:
    frame = await socket.next_of("presence")
    return [(e["client"], e["event"]) for e in frame["events"]]


async def test_a_publish_on_one_node_reaches_subscribers_on_both_with_counts(
    nursery: trio.Nursery, tmp_path: Path, redis_url: str
) -> None:
    async with cluster(nursery, tmp_path, redis_url) as (node_a, node_b):
        alice = await node_a.http.register("alice")
        bob = await node_a.http.register("bob")
        carol = await node_b.http.register("carol")
        await room(node_a, alice, bob, carol)
        async with (
            ws_connect(node_a, alice["access_token"]) as a,
            ws_connect(node_a, bob["access_token"]) as b,
            ws_connect(node_b, carol["access_token"]) as c,
        ):
            for socket in (a, b, c):
                await welcomed(socket)
            await a.send(
                {"topic_id": "room", "msgid": "m1", "content": "hello", "acknowledge": True}
            )
            sent = await a.next_of("topic_sent")
            assert (sent["subscribers"], sent["offset"]) == (2, 1)
            for socket in (b, c):
                got = await socket.next_of("message")
                assert (got["topic_id"], got["content"], got["offset"]) == ("room", "hello", 1)
                await socket.send({"type": "ack", "msgid": "m1"})
            while True:
                update = await a.next_of("topic_update")
                if update["pending"] == 0:
                    break
            assert (update["acknowledged"], update["subscribers"]) == (2, 2)
            # The history is the same on either node.
            for node in (node_a, node_b):
                page = assert_ok(
                    await node.http.get("/topics/room/messages", token=carol["access_token"])
                )
                assert [m["msgid"] for m in page["messages"]] == ["m1"]


async def test_presence_typing_and_broadcast_cross_nodes(
    nursery: trio.Nursery, tmp_path: Path, redis_url: str
) -> None:
    async with cluster(nursery, tmp_path, redis_url) as (node_a, node_b):
        alice = await node_a.http.register("alice")
        bob = await node_a.http.register("bob")
        await room(node_a, alice, bob)
        async with ws_connect(node_a, alice["access_token"]) as a:
            await welcomed(a)
            async with ws_connect(node_b, bob["access_token"]) as b:
                await welcomed(b)
                assert (bob["uuid"], "online") in await presence_events(a)
                # Either node sees both sockets.
                for node in (node_a, node_b):
                    seen = assert_ok(
                        await node.http.get("/topics/room/presence", token=bob["access_token"])
                    )
                    assert sorted(seen["online"]) == sorted([alice["uuid"], bob["uuid"]])
                await b.send({"type": "typing", "topic_id": "room"})
                typing = await a.next_of("typing")
                assert (typing["from"], typing["topic"]) == (bob["uuid"], "room")
                await a.send({"type": "typing", "to": bob["uuid"]})
                assert (await b.next_of("typing"))["from"] == alice["uuid"]
                # Bob's socket moves to node A: a replacement, not a departure.
                async with ws_connect(node_a, bob["access_token"]) as b2:
                    await welcomed(b2)
                    events = await presence_events(a)
                    assert (bob["uuid"], "offline") not in events
            # Bob's last socket closed: now he is offline, told across nodes.
            with trio.fail_after(10):
                while (bob["uuid"], "offline") not in await presence_events(a):
                    pass


async def test_an_ephemeral_broadcast_reaches_every_node(
    nursery: trio.Nursery, tmp_path: Path, redis_url: str
) -> None:
    async with cluster(nursery, tmp_path, redis_url) as (node_a, node_b):
        root = await node_a.http.register("root")
        bob = await node_b.http.register("bob")
        from .test_rest import admin_token

        made_admin = await node_a.http.request(
            "PUT",
            f"/admin/clients/{root['uuid']}/roles",
            json_body={"roles": ["admin"]},
            token=admin_token(node_a),
        )
        assert_ok(made_admin)
        async with (
            ws_connect(node_a, root["access_token"]) as r,
            ws_connect(node_b, bob["access_token"]) as b,
        ):
            await welcomed(r)
            await welcomed(b)
            await r.send({"type": "broadcast", "msgid": "b1", "content": "to all"})
            assert (await r.next_of("broadcast_sent"))["durable"] is False
            got = await b.next_of("broadcast")
            assert (got["from"], got["content"]) == (root["uuid"], "to all")
