"""relayd's HTTP/1.1 on hypercorn: what hypercorn itself answers, and how it ends connections.

Three defects of hypercorn's own behaviour are mended here, in subclasses: an ``H11Protocol``
that relayd's ``TCPServer`` (installed by ``relayd/_asgi.py``) swaps in for hypercorn's, and a
mixin for that ``TCPServer``. :func:`missing_hooks` checks at start that hypercorn still
calls them, and the daemon logs a warning naming what it lost if not.

* **Framing errors get JSON.** When h11 cannot parse a request (a bad chunk size, conflicting
  ``Content-Length`` headers, a head over ``h11_max_incomplete_size``, a ``Transfer-Encoding``
  other than ``chunked``), hypercorn answers the status h11 suggests with an empty body.
  :class:`RelaydH11Protocol` sends relayd's error shape instead, and closes the connection as
  hypercorn does. It can do so only while no response has started on the connection; an error
  in a request body that arrives after the app began its answer just closes the connection.
* **Early answers say ``Connection: close``.** A response that starts before the request's body
  has been read to its end (a 401, 415 or 429 answered from the head alone, or a GET with an
  unread body) ends with hypercorn closing the connection, since the rest of the body would be
  read as the next request. hypercorn does not say so, so a keep-alive client's next request
  met EOF. :class:`RelaydH11Protocol` adds ``Connection: close`` to such responses.
* **Closing waits for the write in progress.** hypercorn closes a connection (``send_eof``, then
  ``aclose``) without its send lock. A client that closes while its request body is still
  expected makes hypercorn close at once, while the app may be writing its response: trio's
  conflict detector then raises ``BusyResourceError`` in the app's write, logged as "Error in
  ASGI Framework". :class:`ProtocolHooks` takes the send lock to close.

:class:`RelaydConfig` also adds relayd's security headers (``relayd/_browser.py``) to every
response hypercorn writes for relayd: the app's, the WebSocket refusals, and the error
responses above.
"""

from __future__ import annotations

import dataclasses
import json
from itertools import chain
from typing import Any

import h11
import hypercorn.trio.run
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.events import Response
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import TCPServer

from ._browser import security_headers

# What hypercorn's framing errors mean, by the status h11 suggests (h11's error_status_hint).
FRAMING_ERRORS = {
    400: ("bad_request", "the request is not valid HTTP/1.1; the connection is closed"),
    431: ("headers_too_large", "the request's head is too large; the connection is closed"),
    501: (
        "unsupported_transfer_encoding",
        "only Transfer-Encoding: chunked is supported; the connection is closed",
    ),
}


def framing_error_body(status: int) -> bytes:
    code, message = FRAMING_ERRORS.get(
        status, ("http_error", "the request cannot be served; the connection is closed")
    )
    return json.dumps({"error": {"code": code, "message": message, "details": {}}}).encode()


class RelaydConfig(HypercornConfig):
    """hypercorn's settings, with relayd's security headers on every response."""

    def response_headers(self, protocol: str) -> list[tuple[bytes, bytes]]:
        headers: list[tuple[bytes, bytes]] = super().response_headers(protocol)
        return headers + security_headers(tls=self.ssl_enabled)


def _says_close(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(
        name.lower() == b"connection" and b"close" in value.lower() for name, value in headers
    )


class RelaydH11Protocol(H11Protocol):
    """hypercorn's HTTP/1.1 protocol, with JSON framing errors and honest early answers."""

    async def stream_send(self, event: StreamEvent) -> None:
        if (
            isinstance(event, Response)
            and event.status_code >= 200
            and self.connection.their_state is not h11.DONE
            and not _says_close(event.headers)
        ):
            # The request's body is not all in: hypercorn will close after this response.
            headers = [*event.headers, (b"connection", b"close")]
            event = dataclasses.replace(event, headers=headers)
        await super().stream_send(event)

    async def _send_error_response(self, status_code: int) -> None:
        body = framing_error_body(status_code)
        head = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await self._send_h11_event(
            h11.Response(
                status_code=status_code,
                headers=list(chain(head, self.config.response_headers("h11"))),
            )
        )
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())


class ProtocolHooks:
    """Mixed into relayd's ``TCPServer``: its connections speak :class:`RelaydH11Protocol`, and
    closing a connection waits for the write in progress (see the module docstring)."""

    _relayd_protocol: ProtocolWrapper
    send_lock: Any

    @property
    def protocol(self) -> ProtocolWrapper:
        return self._relayd_protocol

    @protocol.setter
    def protocol(self, wrapper: ProtocolWrapper) -> None:
        # hypercorn's TCPServer.run builds the wrapper and assigns it before using it: the
        # HTTP/1.1 protocol it made has seen nothing yet and is swapped for relayd's.
        if type(wrapper.protocol) is H11Protocol:
            wrapper.protocol = RelaydH11Protocol(
                wrapper.app,
                wrapper.config,
                wrapper.context,
                wrapper.task_group,
                wrapper.state,
                wrapper.ssl,
                wrapper.client,
                wrapper.server,
                wrapper.send,
            )
        self._relayd_protocol = wrapper

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, Closed):
            async with self.send_lock:
                await self._close()  # type: ignore[attr-defined]
            await self.protocol.handle(Closed())
        else:
            await super().protocol_send(event)  # type: ignore[misc]


def missing_hooks() -> list[str]:
    """What of the above hypercorn no longer lets relayd do (empty: all of it)."""
    missing = []
    server = getattr(hypercorn.trio.run, "TCPServer", object)
    if not issubclass(server, ProtocolHooks):
        missing.append("hypercorn.trio.run.TCPServer is not relayd's")
    elif "protocol" not in TCPServer.run.__code__.co_names:
        missing.append("TCPServer.run no longer sets self.protocol")
    for name in ("stream_send", "_send_error_response", "_send_h11_event"):
        if not callable(getattr(H11Protocol, name, None)):
            missing.append(f"H11Protocol.{name}")
    for name in ("app", "config", "context", "task_group", "state", "send"):
        if name not in ProtocolWrapper.__init__.__code__.co_names:
            missing.append(f"ProtocolWrapper.{name}")
    if not callable(getattr(HypercornConfig, "response_headers", None)):
        missing.append("Config.response_headers")
    return missing
