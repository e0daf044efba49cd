"""Cluster mode's failure guarantees (issue 12), with real Redis servers and real relayd nodes.

What a crash, an outage or a lost subscription may do is delay a delivery, never lose an
accepted message; a node cut off from Redis for its lease closes its sessions (1013).
"""

from __future__ import annotations

import json
from pathlib import Path

import trio

from relayd._relay.frames import CloseCode

from .cluster_support import OwnRedis, Subscriber, node_config, node_process, own_redis
from .redis_support import command
from .support import IO_DEADLINE, start_relayd
from .ws_support import connect_url, welcomed, ws_connect

__all__ = ["own_redis"]


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


async def test_a_node_cut_off_from_redis_for_its_lease_closes_its_sessions_1013_then_recovers(
    nursery: trio.Nursery, tmp_path: Path, own_redis: OwnRedis
) -> None:
    grant = ("ACL", "SETUSER", "nodeb", "on", ">nodeb-pw", "~*", "+@all")
    command(own_redis.server, (*grant, "&*"))
    url = f"redis://nodeb:nodeb-pw@{own_redis.server.host}:{own_redis.server.port}/0"
    node = await start_relayd(nursery, node_config(tmp_path, url))
    hub = node.daemon.hub
    assert hub is not None
    assert hub.cluster is not None
    alice = await node.http.register("alice")
    bob = await node.http.register("bob")
    async with ws_connect(node, alice["access_token"]) as a:
        await welcomed(a)
        await a.send({"to": bob["uuid"], "msgid": "m1", "acknowledge": True, "content": "x"})
        status = await a.next_of("delivery_status")
        assert (status["msgid"], status["status"]) == ("m1", "queued_offline")
        own_redis.kill()
        # Two thirds of store.lease (3 s) without an answer: the node may have lost Alice's
        # claim.
        error = await a.next_of("error")
        assert error["error"]["code"] == "store_unavailable"
        assert await a.closed() == CloseCode.TRY_AGAIN_LATER
    assert not hub.store_available
    ready = await node.http.get("/health/ready")
    assert (ready.status, ready.json()["error"]["code"]) == (503, "store_unavailable")

    own_redis.restart()  # its AOF holds m1 (ACL users are not kept: the node cannot log in)
    server = own_redis.server
    command(server, ("CONFIG", "SET", "notify-keyspace-events", "K$"))
    lease = Subscriber(server, f"__keyspace@0__:relayd:node:{hub.cluster.node}")
    try:
        # The node's user comes back without its channels: it renews its lease, but its
        # subscription cannot come back, and a session it took could not watch its channel.
        command(server, grant)
        for _ in range(2):  # two renewals: the node has had the answer to the first
            assert await lease.next_message() == b"set"
        assert not hub.store_available
    finally:
        lease.close()
    command(server, ("ACL", "SETUSER", "nodeb", "allchannels"))
    with trio.fail_after(IO_DEADLINE):  # it hears the cluster again
        await hub.until(lambda: hub.store_available)
    async with ws_connect(node, bob["access_token"]) as b:
        await welcomed(b)
        message = await b.next_of("message")
        assert (message["msgid"], message["content"]) == ("m1", "x")
        await b.send({"type": "ack", "msgid": "m1"})
        assert (await b.next_of("ack_received"))["status"] == "acknowledged"
    async with ws_connect(node, alice["access_token"]) as a:
        await welcomed(a)
        update = await a.next_of("delivery_update")
        assert (update["msgid"], update["status"]) == ("m1", "acknowledged")


async def test_while_redis_is_down_logins_are_refused_clearly_and_the_node_stays_up(
    nursery: trio.Nursery, tmp_path: Path, own_redis: OwnRedis
) -> None:
    """A store that cannot answer an authentication (or a REST call) is a refusal to try again
    later: an error frame and 4001 on the socket, 503 over REST; never the node's end."""
    node = await start_relayd(nursery, node_config(tmp_path, own_redis.url, lease=30.0))
    hub = node.daemon.hub
    assert hub is not None
    alice = await node.http.register("alice")
    resyncs = hub.revocations_reloaded
    own_redis.kill()
    async with ws_connect(node, alice["access_token"]) as a:
        error = await a.next_of("error")
        assert error["error"]["code"] == "store_unavailable"
        assert await a.closed() == CloseCode.AUTH_FAILED
    refused = await node.http.post("/register", {"name": "bob"})
    assert (refused.status, refused.json()["error"]["code"]) == (503, "store_unavailable")
    assert refused.headers.get("retry-after") is not None
    assert (await node.http.get("/health/live")).status == 200
    own_redis.restart()
    with trio.fail_after(IO_DEADLINE):  # subscribed again, it resyncs: it hears the cluster
        await hub.until(lambda: hub.revocations_reloaded > resyncs)
    async with ws_connect(node, alice["access_token"]) as a:
        await welcomed(a)
