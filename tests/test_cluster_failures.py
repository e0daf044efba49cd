"""Cluster mode's failure guarantees (issue 12), with real Redis servers and real relayd nodes.

What a crash, an outage or a lost subscription may do is delay a delivery, never lose an
accepted message; a node cut off from Redis for its lease closes its sessions (1013).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from .cluster_support import OwnRedis, node_config, node_process, own_redis
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
