"""Seed compatibility: relayd driven exactly as the seed system's (swifty-server's) clients
drive it, per ``/work/shared/reference/seed-protocol.md``.

Seed clients are not Trio programs, so neither is the client here: :class:`SeedClient` is a
blocking ``websockets`` connection (``websockets.sync.client``), each call run in a worker
thread and bounded twice (the library's own timeout, and ``IO_DEADLINE``), plus the seed
client's one piece of protocol logic, :func:`seed_would_ack`, its auto-ack rule. REST calls go
over plain HTTP/1.1 (the h11 client of ``tests/support.py``), checking what a seed client
checks: status 200 exactly.

Each test runs its own relayd on a loopback port, the WebSocket at ``/ws`` on the REST port,
where seed clients look for it (one test compares the dedicated listener).
"""

from __future__ import annotations

import json
import time
import uuid as uuid_module
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs
import pytest
import trio
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect
from wsproto import ConnectionType, WSConnection
from wsproto.events import CloseConnection, Ping, Request

from relayd._relay import frames as F
from relayd._relay.frames import CloseCode

from .relay_harness import CoreHarness
from .support import IO_DEADLINE, SEED_FIELDS, Engine, RunningRelayd, make_config, start_relayd

# Every blocking call of the client gives up by itself after this long; the test stops
# waiting for it after IO_DEADLINE in any case.
CLIENT_TIMEOUT = 5.0
T = TypeVar("T")

# What a seed client never acks (seed-protocol.md, "A client auto-acks ...").
SEED_NO_ACK_TYPES = ("ack", "ack_received", "delivery_update")
THIRTEEN_FIELDS = SEED_FIELDS


def seed_would_ack(frame: dict[str, Any]) -> bool:
    """The seed client's auto-ack rule: any object whose ``acknowledge`` is true, that has a
    ``msgid``, and whose ``type`` is not one of ack, ack_received, delivery_update. (Truthiness,
    as a seed client tests it.)"""
    return bool(
        frame.get("acknowledge")
        and frame.get("msgid")
        and frame.get("type") not in SEED_NO_ACK_TYPES
    )


def seed_message(sender: str, recipient: str, **fields: Any) -> dict[str, Any]:
    """A direct message as a seed client builds it: 13 fields, no ``type``."""
    message: dict[str, Any] = {
        "to": recipient,
        "from": sender,
        "timestamp": time.time(),
        "priority": "high",
        "subject": "kitchen",
        "msgid": str(uuid_module.uuid4()),
        "acknowledge": True,
        "content": "the oven is on \u2014 \U0001f525",
        "action": "notify",
        "event": "appliance_state",
        "status": "unread",
        "conversation_id": "conv-42",
        "msgno": 7,
    }
    message.update(fields)
    assert tuple(message) == THIRTEEN_FIELDS
    return message


@attrs.frozen
class Refusal:
    """How a connection ended: the frames read before the close, and the close itself."""

    frames: list[dict[str, Any]]
    code: int | None
    reason: str


@attrs.define
class SeedClient:
    """One seed client: its uuid, its blocking WebSocket, and the acks it sent by itself."""

    uuid: str
    conn: ClientConnection
    acks_sent: list[str] = attrs.Factory(list)

    @classmethod
    async def connect(cls, url: str, token: str, uuid: str) -> SeedClient:
        open_ = partial(
            connect,
            f"{url}?token={token}",
            legacy=True,  # a plain connection, as older clients get
            proxy=None,
            open_timeout=CLIENT_TIMEOUT,
            close_timeout=CLIENT_TIMEOUT,
        )
        return cls(uuid, await blocking(open_))

    async def send(self, frame: dict[str, Any]) -> None:
        await blocking(partial(self.conn.send, json.dumps(frame)))

    async def recv(self, wait: float = CLIENT_TIMEOUT) -> dict[str, Any]:
        """The next frame within ``wait`` seconds (else ``TimeoutError``); acked at once if a
        seed client would ack it."""
        text = await blocking(partial(self.conn.recv, timeout=wait))
        assert isinstance(text, str), text
        frame = json.loads(text)
        assert isinstance(frame, dict), frame
        if seed_would_ack(frame):
            ack = {
                "type": "ack",
                "msgid": frame["msgid"],
                "from": self.uuid,
                "timestamp": time.time(),
                "status": "delivered",
            }
            await self.send(ack)
            self.acks_sent.append(frame["msgid"])
        return frame

    async def recv_until(self, done: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Frames up to and including the first for which ``done`` is true (at most 20)."""
        frames: list[dict[str, Any]] = []
        while len(frames) < 20:
            frames.append(await self.recv())
            if done(frames[-1]):
                return frames
        raise AssertionError(f"not found in {frames}")

    async def refusal(self) -> Refusal:
        """Read until the server closes; what was said before, and the close."""
        frames: list[dict[str, Any]] = []
        while len(frames) < 20:
            try:
                frames.append(await self.recv())
            except ConnectionClosed as exc:
                closed = exc
                break
        else:
            raise AssertionError(f"never closed: {frames}")
        rcvd = closed.rcvd
        return Refusal(frames, rcvd.code if rcvd else None, rcvd.reason if rcvd else "")

    async def close(self) -> None:
        await blocking(self.conn.close)


async def blocking(fn: Callable[[], T]) -> T:
    """Run one blocking client call in a worker thread, waiting at most ``IO_DEADLINE``.

    On timeout the thread is abandoned; it ends by itself within ``CLIENT_TIMEOUT``.
    """
    with trio.fail_after(IO_DEADLINE):
        return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


def is_receipt(msgid: str, kind: str) -> Callable[[dict[str, Any]], bool]:
    return lambda frame: frame.get("type") == kind and frame.get("msgid") == msgid


@attrs.frozen
class Registered:
    uuid: str
    name: str
    access_token: str
    refresh_token: str


@attrs.define
class Seed:
    """A running relayd and what a seed client needs of it."""

    relayd: RunningRelayd
    clients: list[SeedClient] = attrs.Factory(list)

    @property
    def ws_url(self) -> str:
        return self.relayd.addresses.websocket_url

    async def register(self, name: str) -> Registered:
        """``POST /register`` with a name and a uuid of the client's own, as seed clients do."""
        uuid = str(uuid_module.uuid4())
        response = await self.relayd.http.post("/register", {"name": name, "uuid": uuid})
        assert response.status == 200, response
        body = response.json()
        assert body["uuid"] == uuid
        assert isinstance(body["access_token"], str)
        assert isinstance(body["refresh_token"], str)
        assert body["token_type"] == "bearer"
        return Registered(uuid, name, body["access_token"], body["refresh_token"])

    async def connect(self, who: Registered, token: str | None = None) -> SeedClient:
        """Open ``/ws?token=...`` (closed at the end of the test)."""
        client = await SeedClient.connect(self.ws_url, token or who.access_token, who.uuid)
        self.clients.append(client)
        return client

    async def online(self, who: Registered) -> SeedClient:
        """Connect and read the welcome frame."""
        client = await self.connect(who)
        welcome = await client.recv()
        assert welcome["type"] == "connection", welcome
        assert welcome["message"] == "Connected successfully"
        assert welcome["uuid"] == who.uuid
        assert welcome["name"] == who.name
        assert isinstance(welcome["timestamp"], int | float)
        return client


def seed_config(websocket: dict[str, Any] | None = None) -> dict[str, Any]:
    # drain_timeout is short: after a WebSocket on the HTTP port closes, hypercorn's pinger
    # keeps its connection open until the next ping, and a graceful stop waits for it.
    return {"websocket": websocket or {}, "drain_timeout": 0.2}


@asynccontextmanager
async def seed_relayd(
    tmp_path: Path, engine: Engine, websocket: dict[str, Any] | None = None
) -> AsyncIterator[Seed]:
    """relayd on ``engine`` on a loopback port, in a nursery of the test's own (a crash fails
    the test)."""
    async with trio.open_nursery() as nursery:
        config = make_config(tmp_path, seed_config(websocket), engine)
        relayd = await start_relayd(nursery, config)
        seed = Seed(relayd)
        try:
            yield seed
        finally:
            for client in seed.clients:
                await client.close()
            relayd.daemon.stop()


# --- the conversation ---------------------------------------------------------------------------


@pytest.mark.parametrize("typed", [False, True], ids=["no_type", "type_message"])
async def test_seed_clients_converse(tmp_path: Path, typed: bool, engine: Engine) -> None:
    """Register, connect, send a 13-field message with ``acknowledge: true``; the recipient
    gets the 13 fields with the sender's values and auto-acks; the sender learns
    ``delivery_status`` then ``delivery_update`` acknowledged. Neither client auto-acks
    anything but the delivered message."""
    async with seed_relayd(tmp_path, engine) as seed:
        alice_id = await seed.register("alice-phone")
        bob_id = await seed.register("bob-sensor")
        bob = await seed.online(bob_id)
        alice = await seed.online(alice_id)

        sent = seed_message(alice_id.uuid, bob_id.uuid)
        await alice.send({"type": "message", **sent} if typed else sent)

        [delivered] = await bob.recv_until(lambda f: f.get("msgid") == sent["msgid"])
        assert {name: delivered[name] for name in THIRTEEN_FIELDS} == sent
        assert bob.acks_sent == [sent["msgid"]]  # the seed client acked it by itself
        ack_answer = await bob.recv()
        assert ack_answer["type"] == "ack_received", ack_answer
        assert ack_answer["msgid"] == sent["msgid"]

        status, update = await alice.recv_until(is_receipt(sent["msgid"], "delivery_update"))
        assert status["type"] == "delivery_status", status
        assert status["msgid"] == sent["msgid"]
        assert status["status"] in ("delivered", "pending_ack")
        assert isinstance(status["message"], str)
        assert update["status"] == "acknowledged", update
        assert alice.acks_sent == []
        assert bob.acks_sent == [sent["msgid"]]


async def test_seed_message_to_an_offline_client_arrives_after_its_welcome(
    tmp_path: Path,
    engine: Engine,
) -> None:
    """``queued_offline`` to the sender; on connecting, the recipient reads its welcome frame
    first, then the message (the seed delivered queued messages before the welcome)."""
    async with seed_relayd(tmp_path, engine) as seed:
        alice_id = await seed.register("alice")
        bob_id = await seed.register("bob")
        alice = await seed.online(alice_id)
        sent = seed_message(alice_id.uuid, bob_id.uuid)
        await alice.send(sent)
        [status] = await alice.recv_until(is_receipt(sent["msgid"], "delivery_status"))
        assert status["status"] == "queued_offline", status

        bob = await seed.connect(bob_id)
        welcome = await bob.recv()
        assert welcome["type"] == "connection", welcome
        delivered = await bob.recv()
        assert {name: delivered.get(name) for name in THIRTEEN_FIELDS} == sent
        assert bob.acks_sent == [sent["msgid"]]
        [update] = await alice.recv_until(is_receipt(sent["msgid"], "delivery_update"))
        assert update["status"] == "acknowledged", update


@pytest.mark.parametrize("acknowledge", [False, True])
async def test_seed_retransmission_is_delivered_once(
    tmp_path: Path, acknowledge: bool, engine: Engine
) -> None:
    """A seed client that sends the same msgid again (a retry) does not get it delivered twice
    (the seed had no duplicate detection): the retry's receipt says ``duplicate``."""
    async with seed_relayd(tmp_path, engine) as seed:
        alice_id = await seed.register("alice")
        bob_id = await seed.register("bob")
        bob = await seed.online(bob_id)
        alice = await seed.online(alice_id)
        sent = seed_message(alice_id.uuid, bob_id.uuid, acknowledge=acknowledge)
        await alice.send(sent)
        await alice.send(sent)
        statuses: list[dict[str, Any]] = []

        def both_told(frame: dict[str, Any]) -> bool:
            if is_receipt(sent["msgid"], "delivery_status")(frame):
                statuses.append(frame)
            return len(statuses) == 2

        await alice.recv_until(both_told)
        # The retry's receipt may come first: the original's waits for its delivery.
        assert sorted(bool(f.get("duplicate")) for f in statuses) == [False, True], statuses
        # One delivery, then the proof that nothing else came: a later message is next.
        later = seed_message(alice_id.uuid, bob_id.uuid, acknowledge=acknowledge)
        await alice.send(later)
        frames = await bob.recv_until(lambda f: f.get("msgid") == later["msgid"])
        delivered = [f["msgid"] for f in frames if f["type"] == "message"]
        assert delivered == [sent["msgid"], later["msgid"]], frames
        assert bob.acks_sent == (delivered if acknowledge else [])


# --- tokens -------------------------------------------------------------------------------------


async def test_seed_refresh_rotates_the_tokens(tmp_path: Path, engine: Engine) -> None:
    """``POST /auth/refresh`` answers 200 with a new pair; the new access token opens a
    session; the old refresh token stops working."""
    async with seed_relayd(tmp_path, engine) as seed:
        alice_id = await seed.register("alice")
        response = await seed.relayd.http.post(
            "/auth/refresh", {"refresh_token": alice_id.refresh_token}
        )
        assert response.status == 200, response
        body = response.json()
        assert isinstance(body["access_token"], str)
        assert isinstance(body["refresh_token"], str)
        assert body["refresh_token"] != alice_id.refresh_token
        assert body["access_token"] != alice_id.access_token

        renewed = attrs.evolve(
            alice_id, access_token=body["access_token"], refresh_token=body["refresh_token"]
        )
        await seed.online(renewed)

        again = await seed.relayd.http.post(
            "/auth/refresh", {"refresh_token": alice_id.refresh_token}
        )
        assert again.status == 401, again
        assert again.error_code == "refresh_reused"


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("garbage", "token_invalid"),
        ("refresh_token", "token_wrong_type"),
        ("tampered", "token_invalid"),
    ],
)
async def test_seed_client_with_a_bad_token_learns_it_was_refused_and_why(
    tmp_path: Path, bad: str, why: str, engine: Engine
) -> None:
    """A bad token: an error frame that says why (``error.code``), then a close with 4001 (the
    seed used 1008); nothing else. The client must learn why from one or the other.

    (Not from both, always: the ``websockets`` client drops the frames it read together with
    the close when its reply to the close fails, which it does when the server has already
    closed the TCP connection; see ``test_server_waits_for_the_clients_close_frame``.)
    """
    async with seed_relayd(tmp_path, engine) as seed:
        alice_id = await seed.register("alice")
        token = {
            "garbage": "not-a-token",
            "refresh_token": alice_id.refresh_token,  # the wrong kind of token
            "tampered": alice_id.access_token[:-6] + "AAAAAA",  # a bad signature
        }[bad]
        client = await seed.connect(alice_id, token)
        refusal = await client.refusal()
        assert refusal.code in (CloseCode.AUTH_FAILED, 1008), refusal
        assert len(refusal.frames) <= 1, refusal
        for error in refusal.frames:
            assert error["type"] == "error", refusal
            assert error["error"]["message"], error
            assert isinstance(error["recovery"], str), error
        learned = [e["error"]["code"] for e in refusal.frames]
        learned += [refusal.reason] if refusal.reason else []
        assert learned, refusal  # told why, by the frame or by the close
        assert set(learned) == {why}, refusal
        assert client.acks_sent == []


# --- impersonation ------------------------------------------------------------------------------


async def test_seed_impersonation_is_refused_and_the_socket_stays_open(
    tmp_path: Path, engine: Engine
) -> None:
    """``from`` naming another client: an error frame MESSAGE_SENDER_MISMATCH in the seed's
    shape, nothing delivered, and the same socket then sends a real message."""
    async with seed_relayd(tmp_path, engine) as seed:
        alice_id = await seed.register("alice")
        bob_id = await seed.register("bob")
        carol_id = await seed.register("carol")
        bob = await seed.online(bob_id)
        alice = await seed.online(alice_id)

        forged = seed_message(carol_id.uuid, bob_id.uuid)
        await alice.send(forged)
        error = await alice.recv()
        assert error["type"] == "error", error
        assert error["error"]["code"] == F.MESSAGE_SENDER_MISMATCH, error
        assert isinstance(error["error"]["message"], str)
        assert isinstance(error["error"]["details"], dict)
        assert isinstance(error["recovery"], str)
        assert error["recovery"]
        assert isinstance(error["timestamp"], int | float)

        real = seed_message(alice_id.uuid, bob_id.uuid)
        await alice.send(real)
        await alice.recv_until(is_receipt(real["msgid"], "delivery_status"))
        delivered = await bob.recv()  # the first and only message bob gets
        assert delivered["msgid"] == real["msgid"], delivered
        assert delivered["from"] == alice_id.uuid


# --- sending before the welcome ----------------------------------------------------------------


async def test_seed_client_may_send_before_reading_the_welcome(
    tmp_path: Path, engine: Engine
) -> None:
    """The seed authenticated during the handshake, so a seed client may send as soon as it is
    connected, without waiting for the welcome frame. Five clients in a row do."""
    async with seed_relayd(tmp_path, engine) as seed:
        bob_id = await seed.register("bob")
        for i in range(5):
            alice_id = await seed.register(f"alice-{i}")
            alice = await seed.connect(alice_id)
            sent = seed_message(alice_id.uuid, bob_id.uuid)
            await alice.send(sent)  # before reading anything
            welcome = await alice.recv()
            assert welcome["type"] == "connection", welcome
            [status] = await alice.recv_until(is_receipt(sent["msgid"], "delivery_status"))
            assert status["status"] == "queued_offline", status


def test_core_reads_a_frame_sent_while_the_token_is_being_verified() -> None:
    """The same, deterministic, in the core: the frame comes in before the token check does."""
    h = CoreHarness()
    alice = h.client("alice")
    bob = h.client("bob")
    h.auto_auth = False
    sid = h.open(token=alice.token)
    h.send(sid, {"to": bob.uuid, "from": alice.uuid, "msgid": "m1", "content": "hi"})
    h.resolve_auth()
    h.run()
    frames = h.read(sid)
    assert h.sessions[sid].closed is None, (frames, h.sessions[sid])
    assert [f["type"] for f in frames] == ["connection", "delivery_status"], frames
    assert frames[1]["status"] == "queued_offline"


# --- bugs ---------------------------------------------------------------------------------------


async def test_seed_client_stays_connected_across_heartbeats(
    tmp_path: Path, engine: Engine
) -> None:
    """A seed client that sits idle (it answers WebSocket pings, as every client library
    does) stays connected through several heartbeat intervals, and can then send."""
    interval = 0.2
    websocket = {"heartbeat_interval": interval, "heartbeat_timeout": 30 * interval}
    async with seed_relayd(tmp_path, engine, websocket) as seed:
        alice_id = await seed.register("alice")
        bob_id = await seed.register("bob")
        alice = await seed.online(alice_id)
        idle_until = trio.current_time() + 5 * interval
        while (left := idle_until - trio.current_time()) > 0:
            try:
                frame = await alice.recv(wait=left)
            except TimeoutError:
                break
            # Heartbeats are WebSocket pings: nothing a seed client would have to parse.
            raise AssertionError(f"unexpected frame while idle: {frame}")
        sent = seed_message(alice_id.uuid, bob_id.uuid)
        await alice.send(sent)
        *others, status = await alice.recv_until(is_receipt(sent["msgid"], "delivery_status"))
        assert status["status"] == "queued_offline"
        assert others == []


def test_seed_auto_ack_rule() -> None:
    """The emulated rule itself, on the frames the seed protocol names."""
    assert seed_would_ack({"type": "message", "msgid": "m", "acknowledge": True})
    assert seed_would_ack({"msgid": "m", "acknowledge": True})  # a seed-relayed message
    assert not seed_would_ack({"type": "message", "msgid": "m", "acknowledge": False})
    assert not seed_would_ack({"type": "message", "acknowledge": True})
    for kind in SEED_NO_ACK_TYPES:
        assert not seed_would_ack({"type": kind, "msgid": "m", "acknowledge": True})


@pytest.mark.parametrize("transport", ["http_port", "dedicated"])
async def test_server_waits_for_the_clients_close_frame(
    tmp_path: Path, transport: str, engine: Engine
) -> None:
    """The closing handshake (RFC 6455 section 7): after relayd sends its close frame (here,
    refusing a bad token) it keeps the TCP connection until the client's close frame comes.

    Closing first makes the client's reply fail; the ``websockets`` client then loses the
    frames that came with the close (here the error frame that says why), about one time in
    five on this machine."""
    websocket = {"listen": "127.0.0.1:0"} if transport == "dedicated" else {}
    async with seed_relayd(tmp_path, engine, websocket) as seed:
        url = urlsplit(seed.ws_url)
        assert url.hostname is not None
        assert url.port is not None
        with trio.fail_after(IO_DEADLINE):
            stream = await trio.open_tcp_stream(url.hostname, url.port)
            async with stream:
                ws = WSConnection(ConnectionType.CLIENT)
                await stream.send_all(ws.send(Request(host=url.netloc, target="/ws?token=bad")))
                seen: list[str] = []
                close: CloseConnection | None = None
                while close is None:
                    data = await stream.receive_some()
                    assert data, f"the server left without a close frame after {seen}"
                    ws.receive_data(data)
                    for event in ws.events():
                        seen.append(type(event).__name__)
                        if isinstance(event, Ping):
                            await stream.send_all(ws.send(event.response()))
                        elif isinstance(event, CloseConnection):
                            close = event
                # Pings may come anywhere (hypercorn's pinger sends its first one at the accept).
                data_frames = [name for name in seen if name != "Ping"]
                assert data_frames[-2:] == ["TextMessage", "CloseConnection"], seen
                assert close.code == CloseCode.AUTH_FAILED
                # A client takes a moment to answer; the server must still be there.
                with trio.move_on_after(0.2):
                    early = await stream.receive_some()
                    raise AssertionError(f"the server closed first (read {early!r})")
                await stream.send_all(ws.send(close.response()))
                assert await stream.receive_some() == b""  # now the server closes
