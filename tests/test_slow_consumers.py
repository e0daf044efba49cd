"""Slow consumers on both listeners, end to end: a real client stops reading its socket.

Bob's client has a tiny receive buffer and stops reading after its welcome, while Alice
sends him large messages. relayd must drop him after ``websocket.write_timeout`` (and the
grace a write under way gets to end), log it once under his connection's id and count it in
``relayd_slow_consumer_drops_total``, hold up nobody else, and never report as delivered a
message that did not reach him whole. A client that reads again within the grace gets the
frames, then a 4008 close frame.

These run real sockets against hypercorn's and relayd's real timers: a short write_timeout,
every wait bounded.
"""

from __future__ import annotations

import json
import logging
import types
from collections import Counter
from pathlib import Path
from typing import Any, cast

import attrs
import pytest
import trio
import trio.testing
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import WSStream
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import CloseConnection, Ping, TextMessage

from relayd._hypercorn import _SLOW_CONSUMER_CLOSE, RelaydH11Protocol, RelaydTCPServer
from relayd._log import conn_id
from relayd._relay.frames import CloseCode
from relayd._relay.hub import CLOSE_TIMEOUT
from relayd._relay.listeners import asgi_websocket_app

from .hub_support import running_hub
from .raw_ws import RawWebSocket
from .support import Engine, RunningRelayd, make_config, start_relayd
from .test_metrics import scrape, value
from .ws_support import WsClient, ws_connect

TRANSPORTS = ["main", "dedicated"]
WRITE_TIMEOUT = 0.5  # real time: a loaded machine may deschedule a reader for a tenth of a second
DETECTED_BY = {"main": "rest_port_write", "dedicated": "write_timeout"}
MESSAGES = 48
BIG = "x" * 60_000  # 48 of them: far more than a 4 KiB receive window and the send buffer
MARGIN = 3.0


async def start(
    nursery: trio.Nursery, tmp_path: Path, transport: str, engine: Engine
) -> RunningRelayd:
    # Read-ahead room for all of Alice's flood, so that relayd reads it all (see flood).
    websocket: dict[str, Any] = {
        "write_timeout": WRITE_TIMEOUT,
        "read_ahead_bytes": 2 * MESSAGES * len(BIG),
    }
    if transport == "dedicated":
        websocket["listen"] = "127.0.0.1:0"
    return await start_relayd(nursery, make_config(tmp_path, {"websocket": websocket}, engine))


async def stalled(relayd: RunningRelayd, token: str) -> RawWebSocket:
    """A client with a 4 KiB receive buffer that has read its welcome, and reads no more."""
    address = relayd.addresses.websocket or relayd.addresses.http
    client = await RawWebSocket.connect(address, f"/ws?token={token}", receive_buffer=4096)
    assert (await client.next_json())["type"] == "connection"
    return client


async def flood(a: WsClient, to: str) -> None:
    """Alice sends Bob the big messages, then waits for the pong to a ping sent after them:
    by then relayd has read them all, and queued them for Bob."""
    for i in range(MESSAGES):
        await a.send({"to": to, "msgid": f"m{i}", "content": BIG})
    await a.send({"type": "ping"})
    await a.next_of("pong")


def received(events: list[Any]) -> list[str]:
    """The msgids of the messages that arrived whole (the last may be cut off)."""
    msgids = []
    parts: list[str] = []
    for event in events:
        assert isinstance(event, TextMessage | Ping), event
        if isinstance(event, TextMessage):
            parts.append(event.data)
            if event.message_finished:
                msgids.append(json.loads("".join(parts))["msgid"])
                parts = []
    return msgids


async def statuses(a: WsClient) -> dict[str, str]:
    """The last status Alice was told of each message, up to the pong to a ping."""
    await a.send({"type": "ping"})
    told: dict[str, str] = {}
    while (frame := await a.next())["type"] != "pong":
        if frame["type"] in ("delivery_status", "delivery_update"):
            told[frame["msgid"]] = frame["status"]
    return told


def slow_consumer_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str | None, Any]]:
    return [
        (getattr(r, "relayd_conn", None), getattr(r, "fields", {}).get("detected_by"))
        for r in caplog.records
        if r.getMessage() == "slow consumer: closing"
    ]


async def assert_counted(relayd: RunningRelayd, transport: str) -> None:
    samples = await scrape(relayd.http)
    name = "relayd_slow_consumer_drops_total"
    counts = {
        where: value(samples, name, where=where)
        for where in ("write_timeout", "outbound_buffer", "rest_port_write")
    }
    assert counts == {where: 1.0 if where == DETECTED_BY[transport] else 0.0 for where in counts}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_client_that_stops_reading_is_dropped_logged_and_counted_and_others_go_on(
    nursery: trio.Nursery,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    transport: str,
    engine: Engine,
) -> None:
    caplog.set_level(logging.INFO)
    relayd = await start(nursery, tmp_path, transport, engine)
    hub = relayd.daemon.hub
    assert hub is not None
    alice, bob, carol, dave = [
        await relayd.http.register(name) for name in ("alice", "bob", "carol", "dave")
    ]
    b = await stalled(relayd, bob["access_token"])  # the first socket: ws1
    async with (
        b.stream,
        ws_connect(relayd, alice["access_token"]) as a,
        ws_connect(relayd, carol["access_token"]) as c,
        ws_connect(relayd, dave["access_token"]) as d,
    ):
        for client in (a, c, d):
            assert (await client.next())["type"] == "connection"
        with trio.fail_after(WRITE_TIMEOUT + CLOSE_TIMEOUT + MARGIN):
            await flood(a, bob["uuid"])
            # While Bob stalls, Carol and Dave go on.
            await c.send({"to": dave["uuid"], "msgid": "c1", "content": "hello"})
            assert (await d.next_of("message"))["msgid"] == "c1"
            await hub._until(lambda: not hub.core.online(bob["uuid"]))
        # Logged once, under Bob's connection's id, and counted where it was found.
        assert slow_consumer_lines(caplog) == [("ws1", DETECTED_BY[transport])]
        assert bob["access_token"] not in caplog.text
        await assert_counted(relayd, transport)
        # Nothing is reported delivered that did not reach Bob whole; he sees no close frame
        # (his client reports 1006): the write in progress was cut off midway.
        told = await statuses(a)
        events = await b.events_until_eof()
        assert not [e for e in events if isinstance(e, CloseConnection)]
        got = received(events)
        delivered = {msgid for msgid, status in told.items() if status == "delivered"}
        assert delivered <= set(got), sorted(delivered - set(got))
        # And the others still exchange messages.
        await d.send({"to": carol["uuid"], "msgid": "d1"})
        assert (await c.next_of("message"))["msgid"] == "d1"
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_client_that_reads_again_within_the_grace_gets_whole_frames_then_4008(
    nursery: trio.Nursery,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    transport: str,
    engine: Engine,
) -> None:
    caplog.set_level(logging.INFO)
    relayd = await start(nursery, tmp_path, transport, engine)
    alice, bob = [await relayd.http.register(name) for name in ("alice", "bob")]
    b = await stalled(relayd, bob["access_token"])
    async with b.stream, ws_connect(relayd, alice["access_token"]) as a:
        assert (await a.next())["type"] == "connection"
        with trio.fail_after(MARGIN):
            await flood(a, bob["uuid"])
        # Bob's client pauses for about a second: past write_timeout (0.5 s) since the
        # write to him stalled, well within the grace (2 s) the write then gets.
        await trio.sleep(1.0)
        with trio.fail_after(CLOSE_TIMEOUT + MARGIN):
            code = await b.close_code()
        assert code == CloseCode.SLOW_CONSUMER
        if transport == "dedicated":  # trio-websocket waits for the client's close frame
            await b.answer_close()
        await b.eof()
    assert slow_consumer_lines(caplog) == [("ws1", DETECTED_BY[transport])]
    await assert_counted(relayd, transport)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_reloaded_write_timeout_bounds_the_rest_ports_writes_at_once(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    config = make_config(tmp_path, {"websocket": {"write_timeout": 600.0}}, engine)
    relayd = await start_relayd(nursery, config)
    websocket = attrs.evolve(config.websocket, write_timeout=WRITE_TIMEOUT)
    assert relayd.daemon.reload(attrs.evolve(config, websocket=websocket))[0] == [
        "websocket.write_timeout"
    ]
    hub = relayd.daemon.hub
    assert hub is not None
    alice, bob = [await relayd.http.register(name) for name in ("alice", "bob")]
    b = await stalled(relayd, bob["access_token"])
    async with b.stream, ws_connect(relayd, alice["access_token"]) as a:
        assert (await a.next())["type"] == "connection"
        with trio.fail_after(WRITE_TIMEOUT + CLOSE_TIMEOUT + MARGIN):
            await flood(a, bob["uuid"])
            await hub._until(lambda: not hub.core.online(bob["uuid"]))
    await assert_counted(relayd, "main")


async def test_the_rest_ports_pinger_starts_under_its_connections_id(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """hypercorn starts a WebSocket's pinger when the accept is sent, in a copy of the
    sender's context: a slow consumer caught writing a ping logs under the connection's id
    only if the accept went out with it set."""
    async with running_hub() as env:
        app = asgi_websocket_app(env.hub)
        incoming: list[dict[str, Any]] = [
            {"type": "websocket.connect"},
            {"type": "websocket.disconnect", "code": 1006},
        ]
        sent: list[tuple[str, str | None]] = []

        async def receive() -> dict[str, Any]:
            await trio.lowlevel.checkpoint()
            return incoming.pop(0)

        async def send(message: dict[str, Any]) -> None:
            sent.append((message["type"], conn_id.get()))

        scope = {"headers": [], "query_string": b"", "subprotocols": [], "client": ("10.0.0.1", 5)}
        await app(scope, receive, send)
        assert sent == [("websocket.accept", "ws1")]
        assert conn_id.get() is None


class SlowStream:
    """A socket whose peer reads again ``stall`` seconds after a write begins."""

    def __init__(self, *, stall: float) -> None:
        self.stall = stall
        self.written: list[bytes] = []
        self.closed = False

    async def send_all(self, data: bytes) -> None:
        await trio.sleep(self.stall)
        self.stall = 0.0
        self.written.append(bytes(data))

    async def aclose(self) -> None:
        self.closed = True


def websocket(*, accepted: bool = True) -> WSStream:
    stream = object.__new__(WSStream)
    if accepted:
        stream.connection = Connection(ConnectionType.SERVER)
    return stream


def h11_carrying(stream: WSStream) -> H11Protocol:
    protocol = object.__new__(RelaydH11Protocol)  # what relayd's TCPServer speaks
    protocol.stream = stream
    return protocol


def h2_carrying(stream: WSStream) -> H2Protocol:
    protocol = object.__new__(H2Protocol)
    protocol.streams = {1: stream}
    return protocol


def closing(stream: WSStream) -> WSStream:
    stream.connection.send(CloseConnection(1001))
    return stream


@pytest.mark.parametrize(
    ("protocol", "close_frame"),
    [
        pytest.param(lambda: h11_carrying(websocket()), True, id="HTTP/1.1 WebSocket"),
        pytest.param(lambda: h11_carrying(websocket(accepted=False)), False, id="handshake"),
        pytest.param(lambda: h11_carrying(closing(websocket())), False, id="closing"),
        pytest.param(lambda: h2_carrying(websocket()), False, id="h2 WebSocket"),
    ],
)
async def test_the_rest_ports_writer_adds_a_raw_4008_only_to_an_open_http11_websocket(
    autojump_clock: trio.testing.MockClock, protocol: Any, close_frame: bool
) -> None:
    """A write that ends past write_timeout, within the grace, is a slow consumer: counted,
    and the connection closed. The 4008 frame is raw bytes: right behind a whole frame of a
    WebSocket upgraded from HTTP/1.1, garbage inside an h2 connection (RFC 8441), before the
    accept, or after a close frame already sent."""
    server = object.__new__(RelaydTCPServer)
    drops: Counter[str] = Counter()
    server.config = cast(Any, types.SimpleNamespace(relayd_slow_consumer_drops=drops))
    stream = SlowStream(stall=1.5)
    server.stream = cast(Any, stream)
    server.protocol = cast(Any, types.SimpleNamespace(protocol=protocol()))
    assert await server._send_bounded(b"frame", seconds=1.0)
    assert stream.written == ([b"frame", _SLOW_CONSUMER_CLOSE] if close_frame else [b"frame"])
    assert stream.closed
    assert drops == {"rest_port_write": 1}
    assert trio.current_time() == 1.5
