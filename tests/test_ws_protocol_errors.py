"""Frames that break RFC 6455 get the close frame the RFC asks for, on both listeners.

Each test opens a real socket to a real daemon, completes the handshake, authenticates, and
sends one hand-built frame that violates the protocol. relayd must answer with a close frame
carrying 1002 (protocol error) or 1007 (invalid payload data), then close the TCP
connection, and log nothing at error level: a client's mistake is not relayd's.
"""

from __future__ import annotations

import logging
import types
from pathlib import Path

import pytest
import trio

from relayd._hypercorn import _install
from relayd._relay.frames import CloseCode

from .raw_ws import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_TEXT,
    RawWebSocket,
    close_payload,
    frame,
)
from .support import Engine, RunningRelayd, start_on

TRANSPORTS = ["main", "dedicated"]
PROTOCOL_ERROR = CloseCode.PROTOCOL_ERROR
INVALID_PAYLOAD = CloseCode.INVALID_PAYLOAD

VIOLATIONS: dict[str, tuple[bytes, int]] = {
    "invalid UTF-8 in a text frame": (
        frame(OP_TEXT, b'{"type": "ping", "x": "\xff\xfe"}'),
        INVALID_PAYLOAD,
    ),
    "invalid UTF-8 across fragments": (
        frame(OP_TEXT, b'{"x": "\xe2\x82', fin=False) + frame(OP_CONTINUATION, b'\xff"}'),
        INVALID_PAYLOAD,
    ),
    "RSV1 without an extension": (frame(OP_TEXT, b'{"type": "ping"}', rsv=4), PROTOCOL_ERROR),
    "RSV2": (frame(OP_TEXT, b'{"type": "ping"}', rsv=2), PROTOCOL_ERROR),
    "RSV3": (frame(OP_BINARY, b"x", rsv=1), PROTOCOL_ERROR),
    "reserved data opcode 0x3": (frame(0x3, b"x"), PROTOCOL_ERROR),
    "reserved control opcode 0xB": (frame(0xB, b""), PROTOCOL_ERROR),
    "unmasked client frame": (frame(OP_TEXT, b'{"type": "ping"}', masked=False), PROTOCOL_ERROR),
    "continuation without a start": (frame(OP_CONTINUATION, b"x"), PROTOCOL_ERROR),
    "fragmented control frame": (frame(OP_PING, b"x", fin=False), PROTOCOL_ERROR),
    "control frame over 125 bytes": (frame(OP_PING, b"x" * 126), PROTOCOL_ERROR),
    "close code 1005 (local only)": (frame(OP_CLOSE, close_payload(1005)), PROTOCOL_ERROR),
    "close code 1006 (local only)": (frame(OP_CLOSE, close_payload(1006)), PROTOCOL_ERROR),
    "close code 999": (frame(OP_CLOSE, close_payload(999)), PROTOCOL_ERROR),
    "close code 1016 (reserved)": (frame(OP_CLOSE, close_payload(1016)), PROTOCOL_ERROR),
    "close payload of 1 byte": (frame(OP_CLOSE, b"\x03"), PROTOCOL_ERROR),
    "close reason not UTF-8": (
        frame(OP_CLOSE, close_payload(1000, b"\xff")),
        INVALID_PAYLOAD,
    ),
}


async def start(
    nursery: trio.Nursery, tmp_path: Path, transport: str, engine: Engine
) -> RunningRelayd:
    return await start_on(nursery, tmp_path, transport, engine)


async def authenticated(relayd: RunningRelayd) -> RawWebSocket:
    alice = await relayd.http.register("alice")
    address = relayd.addresses.websocket or relayd.addresses.http
    client = await RawWebSocket.connect(address, f"/ws?token={alice['access_token']}")
    welcome = await client.next_json()
    assert welcome["type"] == "connection", welcome
    return client


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("violation", VIOLATIONS)
async def test_protocol_violation_gets_its_close_code_then_the_connection_closes(
    nursery: trio.Nursery,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    transport: str,
    violation: str,
    engine: Engine,
) -> None:
    data, code = VIOLATIONS[violation]
    relayd = await start(nursery, tmp_path, transport, engine)
    client = await authenticated(relayd)
    async with client.stream:
        await client.send_raw(data)
        assert await client.close_then_eof() == code
    # The session ended (its socket is gone), and relayd kept serving others.
    hub = relayd.daemon.hub
    assert hub is not None
    with trio.fail_after(5):
        await hub._until(lambda: not hub._handles)
    again = await authenticated(relayd)
    async with again.stream:
        await again.send_text('{"type": "ping"}')
        assert (await again.next_json())["type"] == "pong"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


# --- the hooks degrade with a warning on a dependency whose internals moved --------------------


def test_a_hypercorn_class_is_replaced_only_where_it_is_used_and_its_internals_are_there() -> None:
    class Original:
        def internal(self) -> None: ...

    class Replacement(Original): ...

    elsewhere = types.SimpleNamespace(Original=object)
    assert not _install([elsewhere], Original, Replacement, ("internal",))
    assert elsewhere.Original is object
    using = types.SimpleNamespace(Original=Original)
    assert not _install([using], Original, Replacement, ("internal", "moved"))
    assert using.Original is Original
    assert _install([using], Original, Replacement, ("internal",))
    assert using.Original is Replacement
    assert _install([using], Original, Replacement, ("internal",))  # again: a no-op
