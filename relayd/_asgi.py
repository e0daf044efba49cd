"""The ASGI application hypercorn serves on the main port, and serving it.

WebSocket scopes on the relay's path go straight to relayd's own ASGI handler (Quart's
websocket machinery costs a task and a channel hop per message for nothing relayd uses);
everything else goes to the Quart-Trio app.

The HTTP half also mends a trap of quart-trio on hypercorn's Trio worker: quart-trio runs a
request in a nursery that it cancels as soon as the response is sent, and hypercorn does the
work that follows the last body chunk — closing the socket after ``Connection: close``, or
arming the keep-alive idle timer — inside that very ``send``. Cancelled there, that work never
happens: connections stay open until the client leaves and shutdown waits on them. So the send
that completes a response runs shielded, bounded by a deadline.

hypercorn's own traps are mended in ``relayd/_hypercorn.py``; :func:`serve_http` installs
those repairs before it serves.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from ._config import parse_address
from ._hypercorn import install_hooks
from ._log import conn_id

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
# Loosely typed: Quart's __call__ is typed with its own, narrower scope types.
ASGIApp = Callable[..., Awaitable[None]]

log = logging.getLogger("relayd.http")

# The completing send writes at most one buffer to a socket hypercorn already owns.
FINISH_TIMEOUT = 10.0


def _finishing(send: Send, timeout: float) -> Send:
    async def send_finishing_shielded(message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            with trio.CancelScope(shield=True), trio.move_on_after(timeout):
                await send(message)
        else:
            await send(message)

    return send_finishing_shielded


async def _not_found(send: Send) -> None:
    body = (
        b'{"error": {"code": "not_found", "message": "no WebSocket endpoint here", "details": {}}}'
    )
    await send(
        {
            "type": "websocket.http.response.start",
            "status": 404,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "websocket.http.response.body", "body": body})


class Dispatcher:
    """Route ASGI scopes: the relay's WebSocket path to ``websocket_app``, the rest to Quart."""

    def __init__(
        self,
        http_app: ASGIApp,
        *,
        websocket_app: ASGIApp | None = None,
        websocket_path: str = "/ws",
        finish_timeout: float = FINISH_TIMEOUT,
    ) -> None:
        self.http_app = http_app
        self.websocket_app = websocket_app
        self.websocket_path = websocket_path
        self.finish_timeout = finish_timeout
        self._requests = 0  # HTTP requests being answered
        self._ids = itertools.count(1)
        self._idle = trio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no HTTP request is being answered."""
        await self._idle.wait()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if self._requests == 0:
                self._idle = trio.Event()
            self._requests += 1
            # Every line logged while answering carries the request's id.
            token = conn_id.set(f"http{next(self._ids)}")
            try:
                await self.http_app(scope, receive, _finishing(send, self.finish_timeout))
            finally:
                conn_id.reset(token)
                self._requests -= 1
                if self._requests == 0:
                    self._idle.set()
        elif kind == "websocket":
            if self.websocket_app is not None and scope["path"] == self.websocket_path:
                await self.websocket_app(scope, receive, send)
            else:
                await _not_found(send)
        else:
            await self.http_app(scope, receive, send)


def metrics_app(render: Callable[[], Awaitable[bytes]], content_type: str) -> ASGIApp:
    """An ASGI app answering ``GET /metrics`` and nothing else (the metrics listener)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                kind = event["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            return
        if scope["path"] == "/metrics" and scope["method"] in ("GET", "HEAD"):
            status, headers, body = 200, [(b"content-type", content_type.encode())], await render()
        else:
            status = 404
            headers = [(b"content-type", b"application/json")]
            body = (
                b'{"error": {"code": "not_found", "message": "only /metrics here", "details": {}}}'
            )
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


async def serve_http(
    app: ASGIApp,
    config: HypercornConfig,
    *,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until ``shutdown`` is set, then drain for ``config.graceful_timeout``.

    Reports the bound ``(host, port)`` through ``task_status`` once listening.
    """
    install_hooks()
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            partial(serve, app, config, shutdown_trigger=shutdown.wait)
        )
        task_status.started(parse_address(binds[0].partition("://")[2]))
