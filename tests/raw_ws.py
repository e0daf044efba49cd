"""A WebSocket client over a raw loopback socket, for tests that must control the bytes.

The handshake and the parsing of what relayd sends are wsproto's (the client side); frames
sent to relayd are built here by hand, so that a test can send what no library would: bad
UTF-8, reserved bits and opcodes, unmasked frames, invalid close codes. The socket's receive
buffer can be made small, and the client can simply stop reading (a stalled consumer).
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    Request,
    TextMessage,
)

from .support import IO_DEADLINE

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, masked: bool = True
) -> bytes:
    """One frame as a client sends it: ``rsv`` is the three reserved bits (0-7)."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mask_bit = 0x80 if masked else 0
    size = len(payload)
    if size < 126:
        head += bytes([mask_bit | size])
    elif size < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", size)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", size)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


class RawWebSocket:
    """One client connection. Every wait is bounded by ``IO_DEADLINE``."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self._events: list[Event] = []

    @classmethod
    async def connect(
        cls, address: tuple[str, int], target: str, *, receive_buffer: int | None = None
    ) -> RawWebSocket:
        """Open a TCP connection (with ``SO_RCVBUF`` set before connecting, if given: the
        window a peer may fill) and complete the opening handshake."""
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        with trio.fail_after(IO_DEADLINE):
            await sock.connect(address)
            client = cls(trio.SocketStream(sock))
            host = f"{address[0]}:{address[1]}"
            await client.stream.send_all(client.ws.send(Request(host=host, target=target)))
            event = await client.next_event()
        assert isinstance(event, AcceptConnection), event
        return client

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def send_raw(self, data: bytes) -> None:
        with trio.fail_after(IO_DEADLINE):
            await self.stream.send_all(data)

    async def send_text(self, text: str) -> None:
        await self.send_raw(frame(OP_TEXT, text.encode()))

    async def next_event(self) -> Event:
        """The next event relayd's bytes make (pings included). Fails on EOF."""
        with trio.fail_after(IO_DEADLINE):
            while not self._events:
                data = await self.stream.receive_some(65536)
                assert data, "the connection closed"
                self.ws.receive_data(data)
                self._events.extend(self.ws.events())
        return self._events.pop(0)

    async def next_json(self) -> dict[str, Any]:
        """The next text message, as JSON (pings skipped)."""
        parts: list[str] = []
        while True:
            event = await self.next_event()
            if isinstance(event, TextMessage):
                parts.append(event.data)  # wsproto hands a large frame over in pieces
                if event.message_finished:
                    doc: dict[str, Any] = json.loads("".join(parts))
                    return doc
            else:
                assert isinstance(event, Ping), event

    async def close_code(self) -> int:
        """Read until relayd's close frame; return its code. Frames before it are skipped."""
        while True:
            event = await self.next_event()
            if isinstance(event, CloseConnection):
                return event.code

    async def close_then_eof(self) -> int:
        """Read until relayd's close frame, then until the TCP connection ends, without
        answering the close; return the close code."""
        code = await self.close_code()
        await self.eof()
        return code

    async def answer_close(self) -> None:
        """Answer relayd's close frame, as a client library would."""
        await self.send_raw(frame(OP_CLOSE, b""))

    async def events_until_eof(self) -> list[Event]:
        """Every event relayd's bytes make from here until the connection ends (a large
        frame comes in pieces; one cut off by the end has no ``message_finished`` piece)."""
        events, self._events = self._events, []
        with trio.fail_after(IO_DEADLINE):
            while data := await self.stream.receive_some(65536):
                self.ws.receive_data(data)
                events.extend(self.ws.events())
        return events

    async def eof(self) -> None:
        """Read (and drop) whatever comes until the connection ends."""
        with trio.fail_after(IO_DEADLINE):
            while await self.stream.receive_some(65536):
                pass
