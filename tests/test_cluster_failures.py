"""Cluster mode's failure guarantees (issue 12), with real Redis servers and real relayd nodes.

What a crash, an outage or a lost subscription may do is delay a delivery, never lose an
accepted message; a node cut off from Redis for its lease closes its sessions (1013).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio

from .cluster_support import OwnRedis, Subscriber, node_config, node_process, own_redis
from .redis_support import command
from .support import start_relayd
from .ws_support import WsClient, connect_url, ws_connect

__all__ = ["own_redis"]


async def welcomed(client: WsClient) -> dict[str, Any]:
    frame = await client.next()
    assert frame["type"] == "connection", frame
    return frame


async def test_a_message_whose_node_died_before_its_hint_still_reaches_its_recipient(
    nursery: trio.Nursery, tmp_path: Path, own_redis: OwnRedis
) -> None:
    # Node A may write but not publish: what it stores is never announced, as if it had died
    # between its commit and its publish. Then it does die (SIGKILL).
    server = own_redis.server
    command(server, ("ACL", "SETUSER", "mute", "on", ">mute-pw", "~*", "&*", "+@all", "-publish"))
    node_b = await start_relayd(nursery, node_config(tmp_path, own_redis.url))
    alice = await node_b.http.register("alice")
    bob = await node_b.http.register("bob")
    async with ws_connect(node_b, bob["access_token"]) as b:
        await welcomed(b)
        mute = f"redis://mute:mute-pw@{server.host}:{server.port}/0"
        async with (
            node_process(tmp_path, mute) as node_a,
            connect_url(f"{node_a.ws_url}?token={alice['access_token']}") as a,
        ):
            await welcomed(a)
            await a.send({"to": bob["uuid"], "msgid": "m1", "acknowledge": True, "content": "x"})
            status = await a.next_of("delivery_status")
            assert (status["msgid"], status["status"]) == ("m1", "queued_offline")
            node_a.child.kill()
            await node_a.child.wait()
        # Bob's node hears that A is gone once A's lease has run out, and looks in the store.
        message = await b.next_of("message")
        assert (message["msgid"], message["content"], message["attempt"]) == ("m1", "x", 1)


async def test_a_node_whose_subscription_was_killed_still_delivers_what_was_sent_meanwhile(
    nursery: trio.Nursery, tmp_path: Path, own_redis: OwnRedis
) -> None:
    node_a = await start_relayd(nursery, node_config(tmp_path, own_redis.url))
    node_b = await start_relayd(nursery, node_config(tmp_path, own_redis.url))
    alice = await node_a.http.register("alice")
    bob = await node_a.http.register("bob")
    async with (
        ws_connect(node_a, alice["access_token"]) as a,
        ws_connect(node_b, bob["access_token"]) as b,
    ):
        await welcomed(a)
        await welcomed(b)
        # Both nodes' subscriber connections: coredis reconnects and subscribes again.
        assert command(own_redis.server, ("CLIENT", "KILL", "TYPE", "pubsub")) == [b":2"]
        for msgid in ("m1", "m2"):
            await a.send({"to": bob["uuid"], "msgid": msgid, "acknowledge": True, "content": "x"})
            status = await a.next_of("delivery_status")
            assert (status["msgid"], status["status"]) == (msgid, "queued_offline")
            message = await b.next_of("message")
            assert (message["msgid"], message["attempt"]) == (msgid, 1)
            await b.send({"type": "ack", "msgid": msgid})
            update = await a.next_of("delivery_update")
            assert (update["msgid"], update["status"]) == (msgid, "acknowledged")


async def test_a_hint_published_while_a_node_could_not_subscribe_is_found_by_its_resync(
    nursery: trio.Nursery, tmp_path: Path, own_redis: OwnRedis
) -> None:
    server = own_redis.server
    command(server, ("ACL", "SETUSER", "nodeb", "on", ">nodeb-pw", "~*", "&*", "+@all"))
    node_a = await start_relayd(nursery, node_config(tmp_path, own_redis.url))
    node_b_url = f"redis://nodeb:nodeb-pw@{server.host}:{server.port}/0"
    node_b = await start_relayd(nursery, node_config(tmp_path, node_b_url))
    alice = await node_a.http.register("alice")
    bob = await node_a.http.register("bob")
    async with (
        ws_connect(node_a, alice["access_token"]) as a,
        ws_connect(node_b, bob["access_token"]) as b,
    ):
        await welcomed(a)
        await welcomed(b)
        watcher = Subscriber(server, f"relayd:c:{bob['uuid']}")
        try:
            # Node B's subscriber is dropped, and cannot subscribe again for now.
            command(server, ("ACL", "SETUSER", "nodeb", "resetchannels"))
            await a.send({"to": bob["uuid"], "msgid": "m1", "acknowledge": True, "content": "x"})
            status = await a.next_of("delivery_status")
            assert (status["msgid"], status["status"]) == ("m1", "queued_offline")
            # The wake for m1 went out while node B could not hear it.
            note = json.loads(await watcher.next_message())
            assert (note["k"], note["c"]) == ("wake", bob["uuid"])
        finally:
            watcher.close()
        command(server, ("ACL", "SETUSER", "nodeb", "allchannels"))
        message = await b.next_of("message")
        assert (message["msgid"], message["attempt"]) == ("m1", 1)
