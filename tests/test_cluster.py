"""Cluster mode end to end: two real relayd nodes on one real Redis server (issue 12).

Each node is a whole daemon (REST and WebSocket on its own loopback port), both on
``store.engine = "redis"`` with one prefix, one signing secret and one state directory (its
store keys). Clients reach whichever node they like; what must hold is what holds on one node.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from relayd._relay.frames import CloseCode

from .cluster_support import node_config
from .redis_support import RedisServer, command, require_redis, start_redis, stop_redis
from .support import IO_DEADLINE, RunningRelayd, start_relayd
from .test_keys import publish, read, sha256
from .test_rest import admin_token, assert_ok
from .test_roles import SCHOOL, outcome
from .ws_support import welcomed, ws_connect


@asynccontextmanager
async def cluster(
    nursery: trio.Nursery, tmp_path: Path, url: str, count: int = 2, **sections: Any
) -> AsyncIterator[list[RunningRelayd]]:
    """``count`` nodes on ``url``, started one after the other (the first writes the store
    keys into the shared state directory); ``sections``: more config, e.g. ``roles``."""
    config = node_config(tmp_path, url, sections=sections)
    nodes = [await start_relayd(nursery, config) for _ in range(count)]
    try:
        yield nodes
    finally:
        for node in nodes:
            node.daemon.stop()


async def test_a_message_crosses_nodes_with_its_ack_and_receipts(
    nursery: trio.Nursery, tmp_path: Path, redis_url: str
) -> None:
    async with cluster(nursery, tmp_path, redis_url) as (node_a, node_b):
        alice = await node_a.http.register("alice")
        bob = await node_b.http.register("bob")
        async with (
            ws_connect(node_a, alice["access_token"]) as a,
            ws_connect(node_b, bob["access_token"]) as b,
        ):
            await welcomed(a)
            await welcomed(b)
            await a.send({"to": bob["uuid"], "msgid": "m1", "acknowledge": True, "content": "hi"})
            status = await a.next_of("delivery_status")
            assert (status["msgid"], status["status"]) == ("m1", "queued_offline")
            message = await b.next_of("message")
            assert (message["content"], message["from"], message["attempt"]) == (
                "hi",
                alice["uuid"],
                1,
            )
            await b.send({"type": "ack", "msgid": "m1"})
            update = await a.next_of("delivery_update")
            assert (update["msgid"], update["status"]) == ("m1", "acknowledged")


async def test_the_directory_shows_a_client_online_on_another_node(
    nursery: trio.Nursery, tmp_path: Path, redis_url: str
) -> None:
    async with cluster(nursery, tmp_path, redis_url) as (node_a, node_b):
        alice = await node_a.http.register("alice")
        bob = await node_a.http.register("bob")

        async def bob_online() -> bool:
            response = await node_a.http.get(f"/clients/{bob['uuid']}", token=alice["access_token"])
            assert response.status == 200, response
            online: bool = response.json()["online"]
            return online

        assert not await bob_online()
        async with ws_connect(node_b, bob["access_token"]) as b:
            await welcomed(b)
            assert await bob_online()
        hub = node_b.daemon.hub
        assert hub is not None
        with trio.fail_after(5):  # node B sees the socket close and releases the claim
            await hub.until(lambda: hub.core.session_count == 0 and hub.releasing == 0)
        assert not await bob_online()


async def test_a_newer_session_on_another_node_closes_the_older_4009_and_gets_the_unacked(
    nursery: trio.Nursery, tmp_path: Path, redis_url: str
) -> None:
    async with cluster(nursery, tmp_path, redis_url) as (node_a, node_b):
        alice = await node_a.http.register("alice")
        bob = await node_a.http.register("bob")
        async with (
            ws_connect(node_a, alice["access_token"]) as a,
            ws_connect(node_a, bob["access_token"]) as b1,
        ):
            await welcomed(a)
            await welcomed(b1)
            await a.send({"to": bob["uuid"], "msgid": "m1", "acknowledge": True, "content": "x"})
            first = await b1.next_of("message")
            assert (first["msgid"], first["attempt"]) == ("m1", 1)
            async with ws_connect(node_b, bob["access_token"]) as b2:
                await welcomed(b2)
                assert await b1.closed() == CloseCode.REPLACED
                again = await b2.next_of("message")
                assert (again["msgid"], again["redelivered"]) == ("m1", True)
                await b2.send({"type": "ack", "msgid": "m1"})
                update = await a.next_of("delivery_update")
                assert (update["msgid"], update["status"]) == ("m1", "acknowledged")


async def test_revoking_on_one_node_closes_the_session_on_another(
    nursery: trio.Nursery, tmp_path: Path, redis_url: str
) -> None:
    async with cluster(nursery, tmp_path, redis_url) as (node_a, node_b):
        bob = await node_a.http.register("bob")
        async with ws_connect(node_b, bob["access_token"]) as b:
            await welcomed(b)
            response = await node_a.http.post(
                "/auth/revoke", {"access_token": bob["access_token"]}, token=bob["access_token"]
            )
            assert response.status == 200, response
            frame = await b.next_of("error")
            assert frame["error"]["code"] == "token_revoked"
            assert await b.closed() == CloseCode.REVOKED
        # The revoked token is refused by every node.
        for node in (node_a, node_b):
            refused = await node.http.get("/clients", token=bob["access_token"])
            assert (refused.status, refused.error_code) == (401, "token_revoked")


async def test_a_revocation_whose_hint_was_lost_is_refused_after_the_next_resync(
    nursery: trio.Nursery, tmp_path: Path, redis_url: str
) -> None:
    async with cluster(nursery, tmp_path, redis_url) as (node_a, node_b):
        hub_a, hub_b = node_a.daemon.hub, node_b.daemon.hub
        assert hub_a is not None
        assert hub_b is not None
        bob = await node_a.http.register("bob")
        token, path = bob["access_token"], f"/clients/{bob['uuid']}"
        # Node A stores the revocation and publishes no hint: node B never hears of it.
        claims = hub_a.auth.codec.verify(token, use="access")
        await hub_a.store.revoke_token(claims.jti, claims.sub, hub_a.auth.now, claims.exp)
        accepted = await node_b.http.get(path, token=token)
        assert accepted.status == 200, accepted
        async with ws_connect(node_b, token) as b:  # a session on node B runs on that token
            await welcomed(b)
            reloaded = hub_b.revocations_reloaded
            hub_b.resync()  # as when its subscription comes back
            with trio.fail_after(IO_DEADLINE):
                await hub_b.until(lambda: hub_b.revocations_reloaded > reloaded)
            refused = await node_b.http.get(path, token=token)
            assert (refused.status, refused.error_code) == (401, "token_revoked")
            frame = await b.next_of("error")
            assert frame["error"]["code"] == "token_revoked"
            assert await b.closed() == CloseCode.REVOKED


@pytest.fixture
def own_redis(tmp_path: Path) -> Any:
    """A Redis server of this test's own (it will be stopped and started again)."""
    binary = require_redis()
    data = tmp_path / "redis"
    data.mkdir()
    server = start_redis(binary, data, "--appendonly", "yes", "--appendfsync", "always")
    try:
        yield server
    finally:
        if server.process.poll() is None:
            stop_redis(server)


async def test_while_redis_is_down_messages_are_refused_and_ready_is_503_then_it_recovers(
    nursery: trio.Nursery, tmp_path: Path, own_redis: RedisServer
) -> None:
    binary = require_redis()
    async with cluster(nursery, tmp_path, own_redis.url, count=1) as (node,):
        alice = await node.http.register("alice")
        bob = await node.http.register("bob")
        async with ws_connect(node, alice["access_token"]) as a:
            await welcomed(a)
            stop_redis(own_redis)
            await a.send({"to": bob["uuid"], "msgid": "m1", "content": "x"})
            hub = node.daemon.hub
            assert hub is not None
            with trio.fail_after(10):  # the batch with m1 fails; it is kept and retried
                await hub.until(lambda: not hub.store_available)
            ready = await node.http.get("/health/ready")
            assert (ready.status, ready.json()["error"]["code"]) == (503, "store_unavailable")
            await a.send({"to": bob["uuid"], "msgid": "m2", "content": "y"})
            error = await a.next_of("error")
            assert error["error"]["code"] == "store_unavailable"
            assert error["error"]["details"]["msgid"] == "m2"
            # Redis comes back on the same port with its AOF: m1, kept in memory, is stored.
            again = start_redis(
                binary,
                own_redis.data_dir,
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                port=own_redis.port,
            )
            try:
                status = await a.next_of("delivery_status")
                assert (status["msgid"], status["status"]) == ("m1", "queued_offline")
                ready = await node.http.get("/health/ready")
                assert ready.status == 200
                await a.send({"to": bob["uuid"], "msgid": "m2", "content": "y"})
                status = await a.next_of("delivery_status")
                assert (status["msgid"], status["status"]) == ("m2", "queued_offline")
            finally:
                stop_redis(again)


async def test_a_session_whose_claim_was_taken_while_its_kick_was_lost_is_closed_at_resync(
    nursery: trio.Nursery, tmp_path: Path, redis_server: RedisServer, redis_url: str
) -> None:
    """Another node claimed bob while this node's subscription was down: the kick never came.
    When the subscription is back, the node checks its claims and closes what it lost."""
    db = redis_url.rpartition("/")[2]
    async with cluster(nursery, tmp_path, redis_url, count=1) as (node,):
        bob = await node.http.register("bob")
        async with ws_connect(node, bob["access_token"]) as b:
            await welcomed(b)
            command(
                redis_server,
                ("SELECT", db),
                ("SET", f"relayd:claim:{bob['uuid']}", "elsewhere|999999"),
                ("CLIENT", "KILL", "TYPE", "pubsub"),
            )
            assert await b.closed() == CloseCode.REPLACED


async def test_a_role_change_on_one_node_applies_at_once_to_a_session_on_another(
    nursery: trio.Nursery, tmp_path: Path, redis_url: str
) -> None:
    async with cluster(nursery, tmp_path, redis_url, roles=SCHOOL) as (node_a, node_b):
        pupil = await node_a.http.register("pupil")
        other = await node_a.http.register("other")
        async with ws_connect(node_b, pupil["access_token"]) as socket:
            await welcomed(socket)
            assert await outcome(socket, other["uuid"], "m1") == "not_permitted"
            promoted = await node_a.http.request(
                "PUT",
                f"/admin/clients/{pupil['uuid']}/roles",
                json_body={"roles": ["teacher"]},
                token=admin_token(node_a),
            )
            assert assert_ok(promoted)["roles"] == ["teacher"]
            hub = node_b.daemon.hub
            assert hub is not None
            may_message = hub.core._may_message
            assert may_message is not None
            with trio.fail_after(5):  # node B hears the change on the bus
                await hub.until(lambda: may_message(pupil["uuid"], other["uuid"]))
            assert await outcome(socket, other["uuid"], "m2") == "accepted"


async def test_a_key_change_on_one_node_reaches_a_reader_on_another_at_once(
    nursery: trio.Nursery, tmp_path: Path, redis_url: str
) -> None:
    async with cluster(nursery, tmp_path, redis_url) as (node_a, node_b):
        alice = await node_a.http.register("alice")
        bob = await node_a.http.register("bob")
        old, new = os.urandom(32), os.urandom(32)
        await publish(node_a.http, alice, x25519=old)
        await read(node_a.http, bob, alice)
        async with ws_connect(node_b, bob["access_token"]) as b:
            await welcomed(b)
            await publish(node_a.http, alice, x25519=new)
            frame = await b.next_of("key_changed")
            assert (frame["client"], frame["fingerprint"]) == (alice["uuid"], sha256(new))
