"""Silent WebSocket clients are dropped after ``websocket.heartbeat_timeout`` on both
listeners, and clients that answer the pings stay, however long HTTP requests may take.

These run a real daemon with real sockets and hypercorn's real timers, so they wait in real
time: about a second, with short configured timeouts, and every wait bounded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from relayd._relay.frames import CloseCode

from .raw_ws import RawWebSocket
from .support import Engine, make_config, start_relayd
from .ws_support import ws_connect

HEARTBEAT_TIMEOUT = 1.0
# Slack for a loaded machine: the drop must come well before request_timeout (30 s).
MARGIN = 2.0


@pytest.mark.parametrize("transport", ["main", "dedicated"])
async def test_a_silent_client_is_dropped_after_heartbeat_timeout_and_one_answering_pings_stays(
    nursery: trio.Nursery, tmp_path: Path, transport: str, engine: Engine
) -> None:
    websocket: dict[str, Any] = {
        "heartbeat_interval": 0.25,
        "heartbeat_timeout": HEARTBEAT_TIMEOUT,
    }
    if transport == "dedicated":
        websocket["listen"] = "127.0.0.1:0"
    config = make_config(
        tmp_path, {"http": {"request_timeout": 30.0}, "websocket": websocket}, engine
    )
    relayd = await start_relayd(nursery, config)
    alice = await relayd.http.register("alice")
    bob = await relayd.http.register("bob")
    address = relayd.addresses.websocket or relayd.addresses.http
    # Bob's client answers pings (trio-websocket does it on its own) and sends nothing else.
    async with ws_connect(relayd, bob["access_token"]) as b:
        assert (await b.next())["type"] == "connection"
        # Alice's authenticates, then never sends a byte again: not even a pong.
        before = trio.current_time()
        silent = await RawWebSocket.connect(address, f"/ws?token={alice['access_token']}")
        async with silent.stream:
            assert (await silent.next_json())["type"] == "connection"
            with trio.fail_after(HEARTBEAT_TIMEOUT + MARGIN):
                if transport == "main":
                    # hypercorn's read timeout: the connection just ends (the client sees 1006).
                    await silent.eof()
                else:
                    assert await silent.close_code() == CloseCode.HEARTBEAT_TIMEOUT
            assert trio.current_time() - before >= HEARTBEAT_TIMEOUT
            if transport == "dedicated":
                await silent.answer_close()
                await silent.eof()
        # Bob has been connected longer than that, silent but for his pongs: still served.
        await b.send({"type": "ping"})
        assert (await b.next())["type"] == "pong"
