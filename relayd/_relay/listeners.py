"""Where sockets come from: ``/ws`` on the main port (ASGI) and the dedicated listener.

Each checks the handshake's ``Origin`` against ``websocket.allowed_origins`` (a browser page
from another site must not open a socket with the token its user holds: cross-site WebSocket
hijacking), refusing with 403 and a JSON body before accepting; then accepts the handshake —
selecting ``relayd.v1`` if offered, never the token — and hands the socket to
:meth:`Hub.serve`, which authenticates it before reading anything.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Iterable
from functools import partial
from typing import Any

import trio
import trio_websocket

from relayd._browser import security_headers
from relayd._config import WebsocketConfig, parse_address
from relayd._errors import Forbidden, NotFound

from .hub import CLOSE_TIMEOUT, Hub
from .transport import (
    AsgiTransport,
    TrioWebsocketTransport,
    read_handshake,
    remote_host,
    split_target,
)

log = logging.getLogger("relayd.ws")

_NOT_FOUND = json.dumps(NotFound("no WebSocket endpoint here").to_json()).encode()
# An Origin this long is cut in the 403's details: the header's length is the peer's choice.
MAX_ORIGIN_ECHO = 256


def refused_origin(headers: Iterable[tuple[str, str]], allowed: Iterable[str]) -> str | None:
    """The ``Origin`` of a handshake that ``allowed`` does not admit, or ``None`` to go on.

    No ``Origin`` header (a client that is not a browser) is admitted; ``"*"`` admits any.
    """
    admitted = set(allowed)
    for name, value in headers:
        if name.lower() == "origin" and "*" not in admitted and value.lower() not in admitted:
            return value
    return None


def origin_refusal(origin: str) -> bytes:
    """The JSON body of the 403 answering a handshake from ``origin``."""
    error = Forbidden(
        "a web page from this origin may not open a WebSocket here (websocket.allowed_origins)",
        code="origin_not_allowed",
        details={"origin": origin[:MAX_ORIGIN_ECHO]},
    )
    return json.dumps(error.to_json()).encode()


def asgi_websocket_app(hub: Hub) -> Any:
    """The ASGI app for websocket scopes on the main port."""

    async def websocket_app(scope: Any, receive: Any, send: Any) -> None:
        event = await receive()
        if event["type"] != "websocket.connect":
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        origin = refused_origin(headers, hub.core.ws.allowed_origins)
        if origin is not None:
            # A close before accept would be a bare 403 on hypercorn: answer with a body.
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": 403,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "websocket.http.response.body", "body": origin_refusal(origin)})
            return
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
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``config.listen`` with trio-websocket until cancelled.

    Connection handlers run in the hub's nursery, so cancelling this (shutdown) only stops
    accepting: open sessions are drained by the hub like any other.
    """
    host, port = parse_address(config.listen)
    json_headers = [(b"content-type", b"application/json")]
    json_headers += security_headers(tls=ssl_context is not None)

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
            await request.reject(404, extra_headers=json_headers, body=_NOT_FOUND)
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers]
        origin = refused_origin(headers, hub.core.ws.allowed_origins)
        if origin is not None:
            await request.reject(403, extra_headers=json_headers, body=origin_refusal(origin))
            return
        handshake = read_handshake(query, headers, request.proposed_subprotocols)
        connection = await request.accept(subprotocol=handshake.subprotocol)
        transport = TrioWebsocketTransport(
            connection, remote=remote_host(request.remote), token=handshake.token
        )
        await hub.serve(transport)

    async with trio.open_nursery() as nursery:
        server: trio_websocket.WebSocketServer = await nursery.start(
            partial(
                trio_websocket.serve_websocket,
                handler,
                host,
                port,
                ssl_context,
                handler_nursery=hub.nursery,
                max_message_size=config.max_frame_bytes,
                connect_timeout=config.auth_timeout,
                disconnect_timeout=CLOSE_TIMEOUT,
            )
        )
        task_status.started((host, server.port))
