"""Bare WebSocket echo servers: the ceiling of relayd's two transports, with no relay logic.

    python -m contrib.bench.echo asgi    # an ASGI app on hypercorn's Trio worker (the main port)
    python -m contrib.bench.echo trio    # websockets' sans-I/O protocol on Trio (dedicated)

Each listens on 127.0.0.1 on a free port, prints ``{"port": N}`` on stdout, and echoes every
frame back on the socket it came from until it is killed (SIGTERM). Both are configured as
relayd configures its own listeners (no pings from the server during a run, 64 KiB frames).
"""

from __future__ import annotations

import json
import logging
import sys
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol

MAX_FRAME = 65_536


async def asgi_echo(scope: Any, receive: Any, send: Any) -> None:
    """Echo every text or binary frame; nothing else."""
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while True:
            event = await receive()
            if event["type"] != "websocket.receive":
                return
            await send(
                {"type": "websocket.send", "text": event.get("text"), "bytes": event.get("bytes")}
            )
    elif scope["type"] == "lifespan":
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    else:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def serve_asgi() -> None:
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.websocket_ping_interval = None
    config.websocket_max_message_size = MAX_FRAME
    config.accesslog = None
    config.errorlog = logging.getLogger("echo.hypercorn")
    config.include_server_header = False
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(partial(serve, asgi_echo, config))
        _announce(int(binds[0].rpartition(":")[2]))


async def websockets_echo(stream: trio.SocketStream) -> None:
    """One connection: websockets' sans-I/O protocol over a Trio stream, as relayd's dedicated
    listener drives it (relayd/_relay/wsserver.py), echoing every data frame."""
    protocol = ServerProtocol(max_size=MAX_FRAME)
    async with stream:
        handshake_done = False
        while True:
            data = await stream.receive_some(65_536)
            if not data:
                return
            protocol.receive_data(data)
            if not handshake_done:
                request = next(
                    (e for e in protocol.events_received() if isinstance(e, Request)), None
                )
                if request is None:
                    continue
                protocol.send_response(protocol.accept(request))
                handshake_done = True
            else:
                for frame in protocol.events_received():
                    if isinstance(frame, Frame) and frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                        if frame.opcode is Opcode.TEXT:
                            protocol.send_text(frame.data)
                        else:
                            protocol.send_binary(frame.data)
            outgoing = protocol.data_to_send()
            if outgoing:
                await stream.send_all(b"".join(outgoing))
            if protocol.close_expected():
                return


async def serve_trio() -> None:
    async with trio.open_nursery() as nursery:
        listeners: list[trio.SocketListener] = await nursery.start(
            partial(trio.serve_tcp, websockets_echo, 0, host="127.0.0.1")
        )
        _announce(listeners[0].socket.getsockname()[1])


def _announce(port: int) -> None:
    sys.stdout.write(json.dumps({"port": port}) + "\n")
    sys.stdout.flush()


def main() -> None:
    kind = sys.argv[1] if len(sys.argv) > 1 else ""
    if kind == "asgi":
        trio.run(serve_asgi)
    elif kind == "trio":
        trio.run(serve_trio)
    else:
        sys.exit("usage: python -m contrib.bench.echo asgi|trio")


if __name__ == "__main__":
    main()
