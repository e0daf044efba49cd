"""Receiving over REST (issue 14): ``GET /messages/pending`` on a client's REST session and
``POST /messages/{msgid}/ack``, against a real relayd on loopback, on both engines (and two
nodes on one Redis)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from relayd._relay.hub import Hub

from .support import (
    IO_DEADLINE,
    SEED_FIELDS,
    Engine,
    HttpClient,
    HttpResponse,
    RunningRelayd,
    make_config,
    start_relayd,
)
from .test_cluster import cluster
from .test_rest import admin_token, assert_error, assert_ok
from .ws_support import WsClient, welcomed, ws_connect

PENDING = "/messages/pending"


async def pull(
    http: HttpClient, token: str, *, wait: float = 0, limit: int | None = None
) -> list[dict[str, Any]]:
    query = f"?wait={wait}" + ("" if limit is None else f"&limit={limit}")
    doc = assert_ok(await http.get(PENDING + query, token=token))
    assert doc["count"] == len(doc["messages"])
    messages: list[dict[str, Any]] = doc["messages"]
    return messages


async def ack(http: HttpClient, token: str, msgid: str) -> HttpResponse:
    return await http.post(f"/messages/{msgid}/ack", token=token)


async def send(socket: WsClient, to: str, msgid: str) -> None:
    await socket.send({"to": to, "msgid": msgid, "acknowledge": True, "content": f"c-{msgid}"})
    await socket.next_of("delivery_status")


def hub_of(relayd: RunningRelayd) -> Hub:
    hub = relayd.daemon.hub
    assert hub is not None
    return hub


async def start(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine, **relay: Any
) -> RunningRelayd:
    return await start_relayd(nursery, make_config(tmp_path, {"relay": relay}, engine))


async def test_a_pull_takes_what_waits_and_an_ack_tells_the_sender(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice, bob = await http.register("alice"), await http.register("bob")
    token = bob["access_token"]
    assert await pull(http, token) == []  # nothing waits (the first load is part of opening)
    async with ws_connect(relayd, alice["access_token"]) as a:
        await welcomed(a)
        await send(a, bob["uuid"], "m1")
        # No ack asked, to a recipient online here with room: its only receipt is delivered.
        await a.send({"to": bob["uuid"], "msgid": "m2", "acknowledge": False, "content": "c-m2"})
        got = await pull(http, token, wait=5)
        assert [(m["msgid"], m["attempt"], m["redelivered"]) for m in got] == [
            ("m1", 1, False),
            ("m2", 1, False),
        ]
        assert got[0]["type"] == "message"
        assert set(SEED_FIELDS) <= set(got[0])
        assert (got[0]["from"], got[0]["content"]) == (alice["uuid"], "c-m1")
        # Handing m2 to the pull delivered it.
        update = await a.next_of("delivery_status")
        assert (update["msgid"], update["status"]) == ("m2", "delivered")
        assert assert_ok(await ack(http, token, "m1")) == {"msgid": "m1", "status": "acknowledged"}
        update = await a.next_of("delivery_update")
        assert (update["msgid"], update["status"]) == ("m1", "acknowledged")
    assert_error(await ack(http, token, "m1"), 404, "not_held")  # once
    assert await pull(http, token) == []


async def test_a_long_poll_is_woken_by_a_message_sent_meanwhile(relayd: RunningRelayd) -> None:
    http = relayd.http
    hub = hub_of(relayd)
    alice, bob = await http.register("alice"), await http.register("bob")
    got: list[dict[str, Any]] = []

    async def poll() -> None:
        got.extend(await pull(http, bob["access_token"], wait=8))

    async with ws_connect(relayd, alice["access_token"]) as a:
        await welcomed(a)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll)
            with trio.fail_after(IO_DEADLINE):
                await hub.until(lambda: hub.waiting_pulls == 1)
            started = trio.current_time()
            await send(a, bob["uuid"], "m1")
        assert trio.current_time() - started < 4  # woken, not timed out (wait=8)
    assert [m["msgid"] for m in got] == ["m1"]


async def test_an_unacked_pull_is_redelivered_then_fails_after_max_attempts(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start(
        nursery, tmp_path, engine, ack_timeout=0.5, backoff_initial=0.0, max_attempts=2
    )
    http = relayd.http
    alice, bob = await http.register("alice"), await http.register("bob")
    token = bob["access_token"]
    async with ws_connect(relayd, alice["access_token"]) as a:
        await welcomed(a)
        await send(a, bob["uuid"], "m1")
        [first] = await pull(http, token, wait=5)
        assert first["attempt"] == 1
        [again] = await pull(http, token, wait=5)  # after the ack timeout, not acked
        assert (again["msgid"], again["attempt"], again["redelivered"]) == ("m1", 2, True)
        update = await a.next_of("delivery_update")
        assert (update["msgid"], update["status"], update["reason"]) == (
            "m1",
            "failed",
            "not_acknowledged",
        )
    assert_error(await ack(http, token, "m1"), 404, "not_held")


async def test_a_socket_takes_over_the_rest_session_and_gets_its_unacked(
    relayd: RunningRelayd,
) -> None:
    http = relayd.http
    alice, bob = await http.register("alice"), await http.register("bob")
    async with ws_connect(relayd, alice["access_token"]) as a:
        await welcomed(a)
        await send(a, bob["uuid"], "m1")
        [m1] = await pull(http, bob["access_token"], wait=5)
        assert m1["attempt"] == 1
        async with ws_connect(relayd, bob["access_token"]) as b:
            await welcomed(b)
            again = await b.next_of("message")
            assert (again["msgid"], again["attempt"], again["redelivered"]) == ("m1", 2, True)
            # The REST session is gone: its ack is refused, and so is a pull while b lives.
            assert_error(await ack(http, bob["access_token"], "m1"), 404, "not_held")
            refused = await http.get(PENDING, token=bob["access_token"])
            assert_error(refused, 409, "client_connected")
            await b.send({"type": "ack", "msgid": "m1"})
            assert (await a.next_of("delivery_update"))["status"] == "acknowledged"
            # The refused pull did not kick the socket.
            await send(a, bob["uuid"], "m2")
            assert (await b.next_of("message"))["msgid"] == "m2"


async def test_hostile_pulls_and_acks(nursery: trio.Nursery, tmp_path: Path) -> None:
    relayd = await start(nursery, tmp_path, Engine("sqlite"), pull_max_limit=2, pull_max_wait=1.0)
    http = relayd.http
    alice, bob, eve = [await http.register(n) for n in ("alice", "bob", "eve")]
    # No token, a bad one, an operator's.
    assert_error(await http.get(PENDING), 401)
    assert_error(await http.get(PENDING, token="nope"), 401)
    assert_error(await http.post("/messages/m1/ack"), 401)
    assert_error(await http.get(PENDING, token=admin_token(relayd)), 403, "not_a_client")
    # Malformed wait and limit: 422; huge ones are cut to the maximum.
    for query in ("wait=-1", "wait=nan", "wait=inf", "wait=x", "limit=0", "limit=-3", "limit=x"):
        error = assert_error(await http.get(f"{PENDING}?{query}", token=bob["access_token"]), 422)
        assert error["details"]["field"] == query.split("=")[0]
    async with ws_connect(relayd, alice["access_token"]) as a:
        await welcomed(a)
        for msgid in ("m1", "m2", "m3"):
            await send(a, bob["uuid"], msgid)
        got = await pull(http, bob["access_token"], wait=10**12, limit=10**18)
        assert [m["msgid"] for m in got] == ["m1", "m2"]  # limit cut to pull_max_limit
        # Eve may not ack bob's deliveries, nor can a msgid of any length reach the core.
        assert_error(await ack(http, eve["access_token"], "m1"), 404, "not_held")
        assert_error(await ack(http, bob["access_token"], "x" * 300), 404, "not_held")
        assert_error(await ack(http, bob["access_token"], "m3"), 404, "not_held")  # not handed
        began = trio.current_time()
        assert await pull(http, eve["access_token"], wait=10**12) == []
        assert trio.current_time() - began < 3  # waited pull_max_wait (1 s), not 10**12
        assert_ok(await ack(http, bob["access_token"], "m1"))


async def test_a_flood_of_long_polls_is_bounded(nursery: trio.Nursery, tmp_path: Path) -> None:
    relayd = await start(nursery, tmp_path, Engine("sqlite"), max_pulls_waiting=2)
    http = relayd.http
    hub = hub_of(relayd)
    clients = [await http.register(f"c{i}") for i in range(3)]

    async def long_poll(token: str) -> None:
        await pull(http, token, wait=5)

    async with trio.open_nursery() as polls:
        for client in clients[:2]:
            polls.start_soon(long_poll, client["access_token"])
        with trio.fail_after(IO_DEADLINE):
            await hub.until(lambda: hub.waiting_pulls == 2)
        refused = await http.get(f"{PENDING}?wait=5", token=clients[2]["access_token"])
        assert_error(refused, 503, "too_many_pulls")
        assert refused.headers["retry-after"] == "1"
        polls.cancel_scope.cancel()
    # A newer pull of the same client makes the waiting one return at once, empty. (A client
    # whose pulls above were not cut short: theirs may still wait on the server.)
    bob = clients[2]
    results: list[list[dict[str, Any]]] = []

    async def poll() -> None:
        results.append(await pull(http, bob["access_token"], wait=8))

    async with trio.open_nursery() as polls:
        polls.start_soon(poll)
        with trio.fail_after(IO_DEADLINE):
            await hub.until(lambda: hub.pulling(bob["uuid"]))
        began = trio.current_time()
        assert await pull(http, bob["access_token"]) == []
    assert results == [[]]
    assert trio.current_time() - began < 4


async def test_the_rest_session_ends_when_idle(nursery: trio.Nursery, tmp_path: Path) -> None:
    relayd = await start(
        nursery, tmp_path, Engine("sqlite"), pull_idle_timeout=0.2, ack_timeout=60.0
    )
    http = relayd.http
    hub = hub_of(relayd)
    alice, bob = await http.register("alice"), await http.register("bob")
    async with ws_connect(relayd, alice["access_token"]) as a:
        await welcomed(a)
        await send(a, bob["uuid"], "m1")
        [m1] = await pull(http, bob["access_token"], wait=5)
        with trio.fail_after(IO_DEADLINE):
            await hub.until(lambda: not hub.core.online(bob["uuid"]))
        assert_error(await ack(http, bob["access_token"], "m1"), 404, "not_held")
        [again] = await pull(http, bob["access_token"], wait=5)
        assert (again["msgid"], again["attempt"], m1["attempt"]) == ("m1", 2, 1)


async def test_two_nodes_rest_on_one_socket_on_the_other(
    nursery: trio.Nursery, tmp_path: Path, redis_url: str
) -> None:
    async with cluster(nursery, tmp_path, redis_url) as (node_a, node_b):
        alice = await node_a.http.register("alice")
        bob = await node_a.http.register("bob")
        token = bob["access_token"]
        async with ws_connect(node_b, alice["access_token"]) as a:
            await welcomed(a)
            await send(a, bob["uuid"], "m1")
            [m1] = await pull(node_a.http, token, wait=5)
            assert m1["attempt"] == 1
            async with ws_connect(node_b, token) as b:
                await welcomed(b)
                again = await b.next_of("message")
                assert (again["msgid"], again["attempt"]) == ("m1", 2)
                # A pull on either node is refused while b lives; b is not kicked.
                for node in (node_a, node_b):
                    refused = await node.http.get(PENDING, token=token)
                    assert_error(refused, 409, "client_connected")
                await b.send({"type": "ack", "msgid": "m1"})
                assert (await a.next_of("delivery_update"))["status"] == "acknowledged"
                await send(a, bob["uuid"], "m2")
                assert (await b.next_of("message"))["msgid"] == "m2"
            hub_b = hub_of(node_b)
            with trio.fail_after(IO_DEADLINE):
                await hub_b.until(lambda: not hub_b.core.online(bob["uuid"]))
                await hub_b.until(lambda: hub_b.releasing == 0)
            # The socket gone, a pull on the other node takes what it left unacknowledged.
            [m2] = await pull(node_a.http, token, wait=5)
            assert (m2["msgid"], m2["attempt"], m2["redelivered"]) == ("m2", 2, True)
