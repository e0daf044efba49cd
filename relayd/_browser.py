"""The headers that tell a browser how to treat what relayd sends.

relayd serves JSON to programs, never pages, so every response may forbid everything a page
would need: sniffing another content type, being framed, loading anything, leaking the URL in a
``Referer``; and no cache, shared or private, may keep an answer (some carry tokens: RFC 6749
section 5.1). With TLS on, ``Strict-Transport-Security`` also tells the browser to use HTTPS only.
They are added by hypercorn to every response of relayd's HTTP listeners (see
``relayd/_hypercorn.py``) and by the dedicated WebSocket listener to its refusals.
"""

from __future__ import annotations

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
)
# One year; no includeSubDomains: relayd cannot speak for the other hosts of its domain.
HSTS = (b"strict-transport-security", b"max-age=31536000")


def security_headers(*, tls: bool) -> list[tuple[bytes, bytes]]:
    """The headers every response carries; HSTS only over TLS (RFC 6797 section 7.2)."""
    return [*SECURITY_HEADERS, HSTS] if tls else list(SECURITY_HEADERS)
