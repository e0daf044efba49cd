"""Where sockets come from on the main port: ``/ws``, served by hypercorn (ASGI). The dedicated
listener is ``wsserver.py``; both check a handshake's origin the same way (here).

A handshake's ``Origin`` is checked against ``websocket.allowed_origins`` (a browser page from
another site must not open a socket with the token its user holds: cross-site WebSocket
hijacking), refusing with 403 and a JSON body before accepting; then the handshake is accepted
— selecting ``relayd.v1.lean`` or ``relayd.v1`` if offered, never the token — and the socket
handed to :meth:`Hub.serve`, which authenticates it before reading anything.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from relayd._browser import own_origins
from relayd._errors import Forbidden
from relayd._log import conn_id

from .hub import Hub
from .transport import AsgiTransport, read_handshake

log = logging.getLogger("relayd.ws")

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


def origin_refusal_error(origin: str) -> Forbidden:
    """The error answering a handshake from ``origin`` (with 403)."""
    return Forbidden(
        "a web page from this origin may not open a WebSocket here (websocket.allowed_origins)",
        code="origin_not_allowed",
        details={"origin": origin[:MAX_ORIGIN_ECHO]},
    )


def origin_refusal(origin: str) -> bytes:
    """The JSON body of the 403 answering a handshake from ``origin``."""
    return json.dumps(origin_refusal_error(origin).to_json()).encode()


def asgi_websocket_app(
    hub: Hub, *, bounded_writes: bool = False, admit_own_origin: bool = False
) -> Any:
    """The ASGI app for websocket scopes on the main port. ``bounded_writes``: hypercorn's
    writes are bounded by write_timeout, and its slow consumers handled, by relayd's hooks.
    ``admit_own_origin``: pages from this port's own address (the browser client relayd
    serves, ``http.serve_app``) are admitted as if listed in ``websocket.allowed_origins``."""

    async def websocket_app(scope: Any, receive: Any, send: Any) -> None:
        sid = hub.new_sid()
        # Before the accept: the pinger hypercorn starts with it logs under this id too.
        token = conn_id.set(f"ws{sid}")
        try:
            transport = await handshake(scope, receive, send)
            # The handshake's decoded headers die with its frame (kept in this one for the
            # whole session, as they were, they cost every idle socket about a kilobyte).
            if transport is not None:
                await hub.serve(transport, sid=sid)
        finally:
            conn_id.reset(token)

    async def handshake(scope: Any, receive: Any, send: Any) -> AsgiTransport | None:
        """Accept the socket: its transport; ``None`` once it is refused (or was never a
        connect)."""
        event = await receive()
        if event["type"] != "websocket.connect":
            return None
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
            return None
        offered = read_handshake(
            scope["query_string"].decode("latin-1"), headers, scope.get("subprotocols") or []
        )
        await send({"type": "websocket.accept", "subprotocol": offered.subprotocol})
        return AsgiTransport(
            receive,
            send,
            remote=(scope.get("client") or ("-", 0))[0],
            token=offered.token,
            lean=offered.lean,
            bounded_writes=bounded_writes,
        )

    return websocket_app
