"""relayd's HTTP on hypercorn: what hypercorn itself adds to every response.

:class:`RelaydConfig` adds relayd's security headers (``relayd/_browser.py``) to every
response hypercorn writes for relayd: the app's, the WebSocket refusals, and hypercorn's own
error responses. :func:`missing_hooks` checks at start that hypercorn still calls it, and the
daemon logs a warning if not.
"""

from __future__ import annotations

from hypercorn.config import Config as HypercornConfig

from ._browser import security_headers


class RelaydConfig(HypercornConfig):
    """hypercorn's settings, with relayd's security headers on every response."""

    def response_headers(self, protocol: str) -> list[tuple[bytes, bytes]]:
        headers: list[tuple[bytes, bytes]] = super().response_headers(protocol)
        return headers + security_headers(tls=self.ssl_enabled)


def missing_hooks() -> list[str]:
    """What of the above hypercorn no longer lets relayd do (empty: all of it)."""
    missing = []
    if not callable(getattr(HypercornConfig, "response_headers", None)):
        missing.append("Config.response_headers")
    return missing
