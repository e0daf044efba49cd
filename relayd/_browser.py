"""The headers that tell a browser how to treat what relayd sends, and the origin of its page.

relayd serves JSON to programs, so every response may forbid everything a page would need:
sniffing another content type, being framed, loading anything, leaking the URL in a
``Referer``; and no cache, shared or private, may keep an answer (some carry tokens: RFC 6749
section 5.1). With TLS on, ``Strict-Transport-Security`` also tells the browser to use HTTPS only.
They are added by hypercorn to every response of relayd's HTTP listeners (see
``relayd/_hypercorn.py``) and by the dedicated WebSocket listener to its refusals.

The one exception is the browser client relayd serves under ``/app/`` (``http.serve_app``): a
page must run its own script and style and open its own WebSocket, so its responses name their
own ``Content-Security-Policy`` (:data:`APP_CSP`: the page's own origin and nothing else). The
``Content-Security-Policy`` is therefore chosen per response: a response that names one keeps
it, every other gets :data:`API_CSP`, which allows nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

CSP = b"content-security-policy"
# What relayd's JSON answers allow a browser to do with them: nothing.
API_CSP = b"default-src 'none'; frame-ancestors 'none'"
# The page under /app/: its own scripts, styles and images, fetch and WebSocket to its own
# origin ('self' covers ws:// and wss:// to the same host and port); no inline code, no
# <base>, no form posts, no framing.
APP_CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_COMMON_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
)
# One year; no includeSubDomains: relayd cannot speak for the other hosts of its domain.
HSTS = (b"strict-transport-security", b"max-age=31536000")


def security_headers(*, tls: bool, csp: bool = True) -> list[tuple[bytes, bytes]]:
    """The headers every response carries; HSTS only over TLS (RFC 6797 section 7.2).

    ``csp=False`` leaves out the ``Content-Security-Policy``, for a writer that adds it per
    response with :func:`with_default_csp`.
    """
    headers = list(_COMMON_HEADERS)
    if csp:
        headers.append((CSP, API_CSP))
    if tls:
        headers.append(HSTS)
    return headers


def with_default_csp(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers``, with :data:`API_CSP` added unless they name a policy of their own."""
    result = list(headers)
    if not any(name.lower() == CSP for name, _ in result):
        result.append((CSP, API_CSP))
    return result


def own_origins(scheme: str, server: tuple[str, int] | None) -> tuple[str, ...]:
    """The origins of a page that relayd served from the socket address ``server`` (the local
    end of the connection, never a header the peer chose), in the form browsers send them.

    ``scheme`` is the connection's (``http``/``ws`` or ``https``/``wss``). A loopback address is
    also reachable as ``localhost``. Behind a proxy the browser's origin is the proxy's, which
    this cannot know: the operator lists it in ``websocket.allowed_origins``.
    """
    if server is None:
        return ()
    secure = scheme in ("https", "wss")
    web_scheme = "https" if secure else "http"
    host, port = server
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return ()  # a Unix socket or a name: no origin a browser would send
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack socket's IPv4 peer sees the IPv4 address
    default_port = 443 if secure else 80
    suffix = "" if port == default_port else f":{port}"
    hosts = [f"[{address.compressed}]" if address.version == 6 else address.compressed]
    if address.is_loopback:
        hosts.append("localhost")
    return tuple(f"{web_scheme}://{name}{suffix}" for name in hosts)
