"""The relay end to end: a real daemon on a loopback port, trio-websocket clients.

Every test runs on both transports: ``/ws`` on the main HTTP port (relayd's ASGI handler under
hypercorn) and the dedicated trio-websocket listener. A session must not know which one
carried it, so both pass the same suite; and on both engines (``engine``, tests/conftest.py).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from relayd._relay.frames import CloseCode

from .raw_ws import OP_TEXT, RawWebSocket, frame
from .support import IO_DEADLINE, SEED_FIELDS, Engine, RunningRelayd, make_config, start_relayd
from .ws_support import WsClient, ws_connect

TRANSPORTS = ["main", "dedicated"]


async def start(
    nursery: trio.Nursery, tmp_path: Path, transport: str, engine: Engine, **sections: Any
) -> RunningRelayd:
    overrides: dict[str, Any] = dict(sections)
    if transport == "dedicated":
        overrides.setdefault("websocket", {})["listen"] = "127.0.0.1:0"
    relayd = await start_relayd(nursery, make_config(tmp_path, overrides, engine))
    assert (relayd.addresses.websocket is None) == (transport == "main")
    return relayd


@pytest.fixture(params=TRANSPORTS)
async def relayd(
    request: pytest.FixtureRequest, nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> Any:
    return await start(nursery, tmp_path, request.param, engine)


async def welcome(client: WsClient, uuid: str) -> dict[str, Any]:
    frame = await client.next()
    assert frame["type"] == "connection", frame
    assert frame["uuid"] == uuid
    return frame


async def test_two_clients_exchange_acknowledged_messages(relayd: RunningRelayd) -> None:
    alice = await relayd.http.register("alice")
    bob = await relayd.http.register("bob")
    async with (
        ws_connect(relayd, alice["access_token"]) as a,
        ws_connect(relayd, bob["access_token"]) as b,
    ):
        await welcome(a, alice["uuid"])
        await welcome(b, bob["uuid"])
        sent = {
            "to": bob["uuid"],
            "from": alice["uuid"],
            "timestamp": 1795000000.5,
            "priority": "normal",
            "subject": "greeting",
            "msgid": "c0ffee00-0000-4000-8000-000000000001",
            "acknowledge": True,
            "content": "hello bob",
            "action": "say",
            "event": "chat",
            "status": "sent",
            "conversation_id": "conv-1",
            "msgno": 1,
        }
        await a.send(sent)
        got = await b.next()
        assert got["type"] == "message"
        assert {k: got[k] for k in SEED_FIELDS} == sent
        assert (got["attempt"], got["redelivered"]) == (1, False)
        status = await a.next()
        assert (status["type"], status["msgid"], status["status"]) == (
            "delivery_status",
            sent["msgid"],
            "pending_ack",
        )
        await b.send({"type": "ack", "msgid": sent["msgid"], "from": bob["uuid"]})
        assert (await b.next())["type"] == "ack_received"
        update = await a.next()
        assert (update["type"], update["status"]) == ("delivery_update", "acknowledged")

        # And the other way, fire-and-forget, msgid chosen by relayd.
        await b.send({"to": alice["uuid"], "content": "hi alice"})
        got = await a.next()
        assert (got["from"], got["content"], got["acknowledge"]) == (bob["uuid"], "hi alice", False)
        status = await b.next()
        assert (status["status"], status["msgid"]) == ("delivered", got["msgid"])


async def test_offline_recipient_gets_its_queue_after_the_welcome(relayd: RunningRelayd) -> None:
    alice = await relayd.http.register("alice")
    bob = await relayd.http.register("bob")
    async with ws_connect(relayd, alice["access_token"]) as a:
        await welcome(a, alice["uuid"])
        for i in range(5):
            await a.send({"to": bob["uuid"], "msgid": f"m{i}", "acknowledge": i % 2 == 0})
            assert (await a.next())["status"] == "queued_offline"
        async with ws_connect(relayd, bob["access_token"]) as b:
            await welcome(b, bob["uuid"])  # first, before anything queued
            got = [await b.next() for _ in range(5)]
            assert [m["msgid"] for m in got] == [f"m{i}" for i in range(5)]
            for m in got:
                if m["acknowledge"]:
                    await b.send({"type": "ack", "msgid": m["msgid"]})
            updates: dict[str, str] = {}
            while len(updates) < 5:
                frame = await a.next()
                updates[frame["msgid"]] = frame["status"]
            assert updates == {
                "m0": "acknowledged",
                "m1": "delivered",
                "m2": "acknowledged",
                "m3": "delivered",
                "m4": "acknowledged",
            }


@pytest.mark.parametrize("how", ["query", "header", "subprotocol", "frame"])
async def test_every_way_of_presenting_the_token(relayd: RunningRelayd, how: str) -> None:
    alice = await relayd.http.register("alice")
    async with ws_connect(relayd, alice["access_token"], how=how) as a:
        await welcome(a, alice["uuid"])
        # The token is never echoed back as the selected subprotocol.
        assert a.subprotocol == ("relayd.v1" if how == "subprotocol" else None)


@pytest.mark.parametrize("how", ["query", "frame"])
async def test_bad_token_gets_an_error_frame_then_4001(relayd: RunningRelayd, how: str) -> None:
    alice = await relayd.http.register("alice")
    async with ws_connect(relayd, alice["access_token"] + "x", how=how) as a:
        error = await a.next()
        assert (error["type"], error["error"]["code"]) == ("error", "token_invalid")
        assert await a.closed() == CloseCode.AUTH_FAILED


async def test_messages_before_authentication_are_refused_4001(relayd: RunningRelayd) -> None:
    alice = await relayd.http.register("alice")
    bob = await relayd.http.register("bob")
    async with ws_connect(relayd) as anonymous:
        await anonymous.send({"to": bob["uuid"], "content": "sneaky", "from": alice["uuid"]})
        error = await anonymous.next()
        assert error["error"]["code"] == "not_authenticated"
        assert await anonymous.closed() == CloseCode.AUTH_FAILED
    async with ws_connect(relayd, bob["access_token"]) as b:
        await welcome(b, bob["uuid"])
        with trio.move_on_after(0.2):
            frame = await b.next()
            raise AssertionError(f"nothing should have been delivered: {frame}")


async def test_a_new_connection_replaces_the_old_one(relayd: RunningRelayd) -> None:
    alice = await relayd.http.register("alice")
    bob = await relayd.http.register("bob")
    async with ws_connect(relayd, alice["access_token"]) as a:
        await welcome(a, alice["uuid"])
        async with ws_connect(relayd, bob["access_token"]) as old:
            await welcome(old, bob["uuid"])
            async with ws_connect(relayd, bob["access_token"]) as new:
                await welcome(new, bob["uuid"])
                assert await old.closed() == CloseCode.REPLACED
                # The old socket is gone; the new one is still the one that is reachable.
                await a.send({"to": bob["uuid"], "msgid": "after", "acknowledge": True})
                got = await new.next()
                assert got["msgid"] == "after"
                listed = await relayd.http.get(
                    f"/clients/{bob['uuid']}", token=alice["access_token"]
                )
                assert listed.json()["online"] is True


async def test_error_frames_keep_the_socket_open(relayd: RunningRelayd) -> None:
    alice = await relayd.http.register("alice")
    bob = await relayd.http.register("bob")
    async with ws_connect(relayd, alice["access_token"]) as a:
        await welcome(a, alice["uuid"])
        await a.send({"to": bob["uuid"], "from": bob["uuid"], "content": "impersonation"})
        assert (await a.next())["error"]["code"] == "MESSAGE_SENDER_MISMATCH"
        await a.send({"to": "not-a-uuid"})
        error = await a.next()
        assert (error["error"]["code"], error["error"]["details"]["field"]) == (
            "INVALID_MESSAGE_FORMAT",
            "to",
        )
        await a.send({"to": "00000000-0000-4000-8000-000000000000", "acknowledge": True})
        assert (await a.next())["error"]["code"] == "unknown_recipient"
        await a.send("not json")
        assert (await a.next())["error"]["code"] == "INVALID_MESSAGE_FORMAT"
        await a.send({"to": bob["uuid"], "msgid": "still-open"})
        assert (await a.next())["status"] == "queued_offline"


async def test_revoked_client_is_closed_4003(relayd: RunningRelayd) -> None:
    alice = await relayd.http.register("alice")
    admin = relayd.daemon.services
    assert admin is not None
    token = admin.auth.mint_operator_token("test", ("admin",), ttl=60.0).token
    async with ws_connect(relayd, alice["access_token"]) as a:
        await welcome(a, alice["uuid"])
        response = await relayd.http.post(f"/admin/clients/{alice['uuid']}/revoke", token=token)
        assert response.status == 200
        assert (await a.next())["error"]["code"] == "token_revoked"
        assert await a.closed() == CloseCode.REVOKED


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_too_many_connections_from_one_address_get_4029(
    nursery: trio.Nursery, tmp_path: Path, transport: str, engine: Engine
) -> None:
    relayd = await start(
        nursery, tmp_path, transport, engine, websocket={"max_connections_per_ip": 2}
    )
    alice, bob, carol = [await relayd.http.register(name) for name in ("alice", "bob", "carol")]
    async with (
        ws_connect(relayd, alice["access_token"]) as first,
        ws_connect(relayd, bob["access_token"]) as second,
    ):
        await welcome(first, alice["uuid"])
        await welcome(second, bob["uuid"])
        async with ws_connect(relayd, carol["access_token"]) as third:
            error = await third.next()
            assert error["error"]["code"] == "too_many_connections"
            assert await third.closed() == CloseCode.TRY_LATER


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_thousand_silent_sockets_do_not_lock_out_a_client_with_a_token(
    nursery: trio.Nursery, tmp_path: Path, transport: str, engine: Engine
) -> None:
    """Sockets that never authenticate only ever push each other out: the oldest of an
    address's waiting sockets is closed (4029) when it has too many, and a client that offers a
    token is never refused because of them."""
    relayd = await start(nursery, tmp_path, transport, engine)
    alice, bob = [await relayd.http.register(name) for name in ("alice", "bob")]
    host, port = relayd.addresses.websocket or relayd.addresses.http
    per_ip = relayd.daemon.config.websocket.max_pending_auth_per_ip
    silent: list[RawWebSocket] = []
    try:
        for _ in range(1000):
            silent.append(await RawWebSocket.connect((host, port), "/ws"))
        # The socket opened per_ip after one is what pushed it out: once it has its 4029,
        # relayd has seen all 1000.
        pushed_out_last = silent[-per_ip - 1]
        assert (await pushed_out_last.next_json())["error"]["code"] == "too_many_connections"
        assert await pushed_out_last.close_code() == CloseCode.TRY_LATER
        async with (
            ws_connect(relayd, alice["access_token"]) as a,
            ws_connect(relayd, bob["access_token"]) as b,
        ):
            await welcome(a, alice["uuid"])
            await welcome(b, bob["uuid"])
            await a.send({"to": bob["uuid"], "content": "still here"})
            assert (await b.next_of("message"))["content"] == "still here"
        assert await silent[0].close_code() == CloseCode.TRY_LATER
    finally:
        for raw in silent:
            await raw.aclose()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_shutdown_tells_sessions_and_closes_them_1001(
    nursery: trio.Nursery, tmp_path: Path, transport: str, engine: Engine
) -> None:
    relayd = await start(nursery, tmp_path, transport, engine)
    alice = await relayd.http.register("alice")
    async with ws_connect(relayd, alice["access_token"]) as a:
        await welcome(a, alice["uuid"])
        relayd.daemon.stop()
        notice = await a.next()
        assert notice["type"] == "shutdown"
        assert await a.closed() == CloseCode.GOING_AWAY


async def test_oversized_frame_closes_1009(relayd: RunningRelayd) -> None:
    alice = await relayd.http.register("alice")
    async with ws_connect(relayd, alice["access_token"]) as a:
        await welcome(a, alice["uuid"])
        big = {"to": alice["uuid"], "content": "x" * 70_000}
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            await a.send(big)
        assert await a.closed() == CloseCode.MESSAGE_TOO_BIG


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_recipient_that_stops_reading_is_dropped_and_shutdown_is_not_held(
    nursery: trio.Nursery, tmp_path: Path, transport: str, engine: Engine
) -> None:
    """Bob's client stops reading its socket (but stays connected): once nothing can be
    written to it for write_timeout, relayd drops it, on either transport (on the main port
    hypercorn's own writes must be bounded too), and Alice is never held up."""
    relayd = await start(
        nursery, tmp_path, transport, engine, websocket={"write_timeout": 1.0}, drain_timeout=5.0
    )
    alice = await relayd.http.register("alice")
    bob = await relayd.http.register("bob")
    async with (
        ws_connect(relayd, alice["access_token"]) as a,
        ws_connect(relayd, bob["access_token"], message_queue_size=0) as b,
    ):
        await welcome(a, alice["uuid"])
        await welcome(b, bob["uuid"])
        big = "x" * 60_000
        for i in range(200):  # 12 MB: more than the loopback buffers hold
            await a.send({"to": bob["uuid"], "msgid": f"m{i}", "content": big})
        hub = relayd.daemon.hub
        assert hub is not None
        with trio.fail_after(10):  # the hub signals every session's end
            await hub._until(lambda: not hub.core.online(bob["uuid"]))
        with trio.fail_after(6):  # drain_timeout, and a margin
            relayd.daemon.stop()
            await a.closed()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_peers_that_vanish_during_the_handshake_do_not_take_relayd_down(
    nursery: trio.Nursery, tmp_path: Path, transport: str, engine: Engine
) -> None:
    """Handshakes cut off by a TCP reset (on the right path and a wrong one) end those
    connections only."""
    relayd = await start(nursery, tmp_path, transport, engine)
    host, port = relayd.addresses.websocket or relayd.addresses.http
    for path in ("/ws", "/nope") * 10:
        sock = trio.socket.socket()
        with sock, trio.fail_after(IO_DEADLINE):
            await sock.connect((host, port))
            key = base64.b64encode(os.urandom(16)).decode()
            await sock.send(
                f"GET {path} HTTP/1.1\r\nHost: relayd\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            # Close with a reset, not a FIN: SO_LINGER with a zero timeout.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    alice = await relayd.http.register("alice")
    async with ws_connect(relayd, alice["access_token"]) as a:
        await welcome(a, alice["uuid"])


async def test_a_client_that_offers_the_lean_profile_gets_it(relayd: RunningRelayd) -> None:
    alice = await relayd.http.register("alice")
    bob = await relayd.http.register("bob")
    lean = ["relayd.v1", "relayd.v1.lean"]
    async with (
        ws_connect(relayd, alice["access_token"], how="header", subprotocols=lean) as a,
        ws_connect(relayd, bob["access_token"], how="header", subprotocols=lean) as b,
    ):
        assert a.subprotocol == "relayd.v1.lean"
        assert (await welcome(a, alice["uuid"]))["protocol"] == "relayd.v1.lean"
        await welcome(b, bob["uuid"])
        await a.send({"to": bob["uuid"], "msgid": "m1", "content": "hi", "acknowledge": True})
        assert (await b.next())["type"] == "message"
        await b.send({"type": "ack", "msgid": "m1"})
        update = await a.next()  # no pending_ack before it
        assert (update["type"], update["status"]) == ("delivery_update", "acknowledged")
        # And no ack_received for bob: the next frame he gets is the pong.
        await b.send({"type": "ping"})
        assert (await b.next())["type"] == "pong"


async def test_frames_sent_with_the_upgrade_request_are_read(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    """A client that does not wait for the 101 (RFC 6455 says it should) and sends its auth
    frame in the same packet as the upgrade request: the dedicated listener hands the session
    a protocol of its own after the handshake, and must carry those bytes over to it."""
    relayd = await start(nursery, tmp_path, "dedicated", engine)
    alice = await relayd.http.register("alice")
    assert relayd.addresses.websocket is not None
    host, port = relayd.addresses.websocket
    ws = WSConnection(ConnectionType.CLIENT)
    auth = json.dumps({"type": "auth", "token": alice["access_token"]}).encode()
    with trio.fail_after(IO_DEADLINE):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            request = ws.send(Request(host=f"{host}:{port}", target="/ws"))
            await stream.send_all(request + frame(OP_TEXT, auth))
            events: list[Any] = []
            while not any(isinstance(e, TextMessage) for e in events):
                data = await stream.receive_some(65536)
                assert data, f"the connection closed after {events}"
                ws.receive_data(data)
                events.extend(ws.events())
    assert isinstance(events[0], AcceptConnection), events
    welcome_frame = next(e for e in events if isinstance(e, TextMessage))
    doc = json.loads(welcome_frame.data)
    assert (doc["type"], doc["uuid"]) == ("connection", alice["uuid"])
