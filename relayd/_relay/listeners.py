"""Where sockets come from: ``/ws`` on the main port (ASGI) and the dedicated listener.

Each accepts the WebSocket handshake — selecting ``relayd.v1`` if offered, never the token —
and hands the socket to :meth:`Hub.serve`, which authenticates it before reading anything.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

import trio
import trio_websocket

from relayd._config import WebsocketConfig, parse_address

from .hub import CLOSE_TIMEOUT, Hub
from .transport import (
    AsgiTransport,
    TrioWebsocketTransport,
    read_handshake,
    remote_host,
    split_target,
)

log = logging.getLogger("relayd.ws")


def asgi_websocket_app(hub: Hub) -> Any:
    """The ASGI app for websocket scopes on the main port."""

    async def websocket_app(scope: Any, receive: Any, send: Any) -> None:
        event = await receive()
        if event["type"] != "websocket.connect":
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        handshake = read_handshake(
            scope["query_string"].decode("latin-1"), headers, scope.get("subprotocols") or []
        )
        await send({"type": "websocket.accept", "subprotocol": handshake.subprotocol})
        remote = (scope.get("client") or ("-", 0))[0]
        await hub.serve(AsgiTransport(receive, send, remote=remote, token=handshake.token))

    return websocket_app


async def serve_dedicated(
    hub: Hub,
    config: WebsocketConfig,
    *,
    ssl_context: ssl.SSLContext | None = None,
    backlog: int,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``config.listen`` with trio-websocket until cancelled, ``backlog`` connections
    waiting to be accepted at most.

    Connection handlers run in the hub's nursery, so cancelling this (shutdown) only stops
    accepting: open sessions are drained by the hub like any other.
    """
    host, port = parse_address(config.listen)

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        # Handlers run in the hub's nursery: nothing a peer does may escape from here.
        try:
            await handshake_then_serve(request)
        except (
            trio_websocket.ConnectionClosed,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ):
            pass  # the peer left during the handshake
        except Exception:
            log.exception("dedicated listener: handshake failed")

    async def handshake_then_serve(request: trio_websocket.WebSocketRequest) -> None:
        path, query = split_target(request.path)
        if path != config.path:
            await request.reject(404, body=b'{"error": {"code": "not_found"}}')
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers]
        handshake = read_handshake(query, headers, request.proposed_subprotocols)
        connection = await request.accept(subprotocol=handshake.subprotocol)
        transport = TrioWebsocketTransport(
            connection, remote=remote_host(request.remote), token=handshake.token
        )
        await hub.serve(transport)

    # trio_websocket.serve_websocket opens its listeners with Trio's default backlog; these
    # are the same listeners, with relayd's.
    listeners: list[trio.SocketListener] | list[trio.SSLListener[trio.SocketStream]]
    if ssl_context is None:
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=backlog)
    else:
        listeners = await trio.open_ssl_over_tcp_listeners(
            port, ssl_context, host=host, https_compatible=True, backlog=backlog
        )
    server = trio_websocket.WebSocketServer(
        handler,
        listeners,
        handler_nursery=hub.nursery,
        max_message_size=config.max_frame_bytes,
        connect_timeout=config.auth_timeout,
        disconnect_timeout=CLOSE_TIMEOUT,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        task_status.started((host, server.port))
