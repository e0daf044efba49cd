"""The SDK's WebSocket (relayd.client._ws): how a broken connection reaches its caller."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
import trio

from relayd.client._ws import Closed, connect

from .support import IO_DEADLINE, RunningRelayd, make_config, start_relayd


async def resetting_proxy(
    nursery: trio.Nursery, target: tuple[str, int], reset: trio.Event, done: trio.Event
) -> int:
    """A TCP proxy to ``target`` that resets its client's connection (RST, SO_LINGER 0)
    once ``reset`` is set, then sets ``done``; its port."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def pipe(source: trio.SocketStream, sink: trio.SocketStream) -> None:
        async for chunk in source:
            await sink.send_all(chunk)

    async def handle(client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream(*target)
        async with trio.open_nursery() as inner:
            inner.start_soon(pipe, client, upstream)
            inner.start_soon(pipe, upstream, client)
            await reset.wait()
            inner.cancel_scope.cancel()
        client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await client.aclose()
        await upstream.aclose()
        done.set()

    await nursery.start(trio.serve_listeners, handle, listeners)
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def test_a_write_on_a_reset_connection_raises_closed(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relayd: RunningRelayd = await start_relayd(nursery, make_config(tmp_path))
    alice = await relayd.http.register("alice")
    reset, done = trio.Event(), trio.Event()
    port = await resetting_proxy(nursery, relayd.addresses.http, reset, done)
    with trio.fail_after(IO_DEADLINE):
        ws = await connect(
            f"ws://127.0.0.1:{port}/ws",
            headers=[("Authorization", f"Bearer {alice['access_token']}")],
        )
        assert '"connection"' in await ws.receive()
        reset.set()
        await done.wait()  # on loopback, the RST has reached the client's socket by now
        with pytest.raises(Closed) as info:
            await ws.send('{"type": "ping"}')
        assert info.value.code == 1006
