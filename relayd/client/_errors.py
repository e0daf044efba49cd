"""The SDK's exceptions, under relayd's one root :class:`relayd.RelaydError`.

Each says what the application can do about it: :class:`HttpError` carries relayd's stable
``code`` (``docs/protocol.md``); :class:`SessionEnded` carries the close code after which the
client stopped for good (4003 revoked, 4009 replaced, ...); :class:`ServerUnreachable` says
whether the request may have reached relayd (which matters for a refresh: see
:mod:`relayd.client._tokens`).
"""

from __future__ import annotations

from typing import Any

from relayd._errors import RelaydError


class ClientError(RelaydError):
    """Root of the errors the client SDK raises."""


class InvalidMessage(ClientError, ValueError):
    """A message the SDK refuses to send: relayd would refuse it too (the text names the
    field), or it is larger than the client's ``max_frame_bytes``."""


class HttpError(ClientError):
    """relayd answered a REST call with an error: ``status`` and its stable ``code``."""

    def __init__(
        self, status: int, code: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    @property
    def retry_after(self) -> float | None:
        """Seconds to wait before trying again, for a 429 (``details.retry_after``)."""
        value = self.details.get("retry_after")
        return float(value) if isinstance(value, int | float) else None


class ServerUnreachable(ClientError):
    """No answer from relayd. ``maybe_delivered`` is true when the request may have reached
    it (the connection broke or timed out after it was sent), false when it certainly did not
    (the connection could not be opened)."""

    def __init__(self, message: str, *, maybe_delivered: bool) -> None:
        super().__init__(message)
        self.maybe_delivered = maybe_delivered


class AuthenticationError(ClientError):
    """relayd refused the client's secret (``invalid_client``), or kept refusing fresh
    tokens: the client cannot log in until its credentials are fixed (registered again)."""


class CredentialsError(ClientError):
    """The credentials file is missing, unreadable, malformed, or readable by others."""


class CredentialsInUse(CredentialsError):
    """Another client (this process or another) holds the credentials file. One identity has
    one session at a time (a second would replace the first with close 4009), so a file is
    used by one client at a time."""


class SessionEnded(ClientError):
    """The client stopped for good: relayd closed the session with a code after which it
    must not reconnect (``code``: 4003 revoked, 4009 replaced, 1002/1007/1009 a frame relayd
    refused), or the client was closed (``code`` None). ``reason`` is relayd's error code or
    close reason, when it gave one."""

    def __init__(self, message: str, *, code: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class ReceiptTimeout(ClientError, TimeoutError):
    """The awaited receipt did not come in time. The message may still be delivered: its
    handle keeps tracking it."""


class ConnectTimeout(ClientError, TimeoutError):
    """No session came up in time (relayd unreachable, or still backing off)."""
