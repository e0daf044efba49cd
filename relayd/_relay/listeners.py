"""Where sockets come from: ``/ws`` on the main port (ASGI) and the dedicated listener.

Each checks the handshake's ``Origin`` against ``websocket.allowed_origins`` (a browser page
from another site must not open a socket with the token its user holds: cross-site WebSocket
hijacking), refusing with 403 and a JSON body before accepting; then accepts the handshake —
selecting ``relayd.v1`` if offered, never the token — and hands the socket to
:meth:`Hub.serve`, which authenticates it before reading anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
from collections.abc import Iterable
from typing import Any

import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection

from relayd._browser import own_origins, security_headers
from relayd._config import WebsocketConfig, parse_address
from relayd._errors import Forbidden, NotFound
from relayd._log import conn_id

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


def asgi_websocket_app(
    hub: Hub, *, bounded_writes: bool = False, admit_own_origin: bool = False
) -> Any:
    """The ASGI app for websocket scopes on the main port. ``bounded_writes``: hypercorn's
    writes are bounded by write_timeout, and its slow consumers handled, by relayd's hooks.
    ``admit_own_origin``: pages from this port's own address (the browser client relayd
    serves, ``http.serve_app``) are admitted as if listed in ``websocket.allowed_origins``."""

    async def websocket_app(scope: Any, receive: Any, send: Any) -> None:
        event = await receive()
        if event["type"] != "websocket.connect":
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        allowed: tuple[str, ...] = hub.core.ws.allowed_origins
        if admit_own_origin:
            allowed += own_origins(scope.get("scheme", "ws"), scope.get("server"))
        origin = refused_origin(headers, allowed)
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
        sid = hub.new_sid()
        # Before the accept: the pinger hypercorn starts with it logs under this id too.
        token = conn_id.set(f"ws{sid}")
        try:
            await send({"type": "websocket.accept", "subprotocol": handshake.subprotocol})
            remote = (scope.get("client") or ("-", 0))[0]
            transport = AsgiTransport(
                receive,
                send,
                remote=remote,
                token=handshake.token,
                bounded_writes=bounded_writes,
            )
            await hub.serve(transport, sid=sid)
        finally:
            conn_id.reset(token)

    return websocket_app


class _AnsweringConnection(trio_websocket.WebSocketConnection):
    """trio-websocket's connection, answering a frame that breaks RFC 6455 with the close frame
    the RFC asks for (1002, or 1007 for text that is not UTF-8) before the TCP close.

    wsproto reports such a frame as a ``CloseConnection`` event with its code while the
    connection is still OPEN (a close frame from the peer moves it to REMOTE_CLOSING first);
    trio-websocket only answers the latter, and drops the former without a word.
    """

    async def _handle_close_connection_event(self, event: CloseConnection) -> None:
        if self._wsproto.state is ConnectionState.OPEN:
            with (
                trio.move_on_after(CLOSE_TIMEOUT),
                contextlib.suppress(trio_websocket.ConnectionClosed),
            ):
                await self._send(CloseConnection(event.code, event.reason))
        await super()._handle_close_connection_event(event)


class _AnsweringServer(trio_websocket.WebSocketServer):
    """trio-websocket's server, serving each socket with an :class:`_AnsweringConnection`."""

    async def _handle_connection(self, stream: trio.abc.Stream) -> None:
        # trio-websocket 0.12's, but for the connection's class.
        async with trio.open_nursery() as nursery:
            connection = _AnsweringConnection(
                stream,
                WSConnection(ConnectionType.SERVER),
                message_queue_size=self._message_queue_size,
                max_message_size=self._max_message_size,
                receive_buffer_size=self._receive_buffer_size,
            )
            nursery.start_soon(connection._reader_task)
            with trio.move_on_after(self._connect_timeout) as connect_scope:
                request = await connection._get_request()
            if connect_scope.cancelled_caught:
                nursery.cancel_scope.cancel()
                await stream.aclose()
                return
            try:
                await self._handler(request)
            finally:
                with trio.move_on_after(self._disconnect_timeout):
                    await connection.aclose()


# What the two classes above need of trio-websocket's internals, checked at start.
_SERVER_INTERNALS = (
    "_handle_connection",
    "_handler",
    "_message_queue_size",
    "_max_message_size",
    "_receive_buffer_size",
    "_connect_timeout",
    "_disconnect_timeout",
)
_CONNECTION_INTERNALS = ("_handle_close_connection_event", "_reader_task", "_get_request", "_send")


def _server_class(probe: trio_websocket.WebSocketServer) -> type[trio_websocket.WebSocketServer]:
    """:class:`_AnsweringServer` if this trio-websocket has what it builds on (``probe`` is a
    server of trio-websocket's own class), else trio-websocket's, with a warning."""
    if all(hasattr(probe, name) for name in _SERVER_INTERNALS) and all(
        hasattr(trio_websocket.WebSocketConnection, name) for name in _CONNECTION_INTERNALS
    ):
        return _AnsweringServer
    log.warning(
        "cannot hook trio-websocket's server: on the dedicated listener, frames that break "
        "the WebSocket protocol get no close frame"
    )
    return trio_websocket.WebSocketServer


async def _open_listeners(
    host: str, port: int, ssl_context: ssl.SSLContext | None, backlog: int
) -> list[trio.SocketListener] | list[trio.SSLListener[trio.SocketStream]]:
    """The listening sockets, as ``trio_websocket.serve_websocket`` opens them, but with
    relayd's backlog rather than Trio's default."""
    if ssl_context is None:
        return await trio.open_tcp_listeners(port, host=host, backlog=backlog)
    return await trio.open_ssl_over_tcp_listeners(
        port, ssl_context, host=host, https_compatible=True, backlog=backlog
    )


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

    listeners = await _open_listeners(host, port, ssl_context, backlog)
    settings: dict[str, Any] = {
        "handler_nursery": hub.nursery,
        "max_message_size": config.max_frame_bytes,
        "connect_timeout": config.auth_timeout,
        "disconnect_timeout": CLOSE_TIMEOUT,
    }
    server_class = _server_class(trio_websocket.WebSocketServer(handler, listeners, **settings))
    server = server_class(handler, listeners, **settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        task_status.started((host, server.port))
