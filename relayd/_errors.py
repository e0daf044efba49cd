"""relayd's exceptions: one root, and each error carries what it implies for the peer.

Every error relayd raises on purpose derives from :class:`RelaydError`. Errors a client can
cause carry the answer they imply: an :class:`ApiError` knows its HTTP status and its stable
``code`` (the ``error.code`` of the JSON body and of WebSocket error frames); a
:class:`TokenError` additionally maps to WebSocket close code 4001. Anything else that escapes
is a bug and is logged as one.
"""

from __future__ import annotations

from typing import Any


class RelaydError(Exception):
    """Root of every error relayd raises on purpose."""


class ConfigError(RelaydError):
    """The configuration is invalid. The message names the file and the key."""


class StoreError(RelaydError):
    """The store cannot be opened or used."""


class SchemaTooNewError(StoreError):
    """The store was written by a newer relayd than this one."""


class StoreUnavailable(StoreError):
    """The store's server cannot be reached, did not answer in time, or cannot take the
    operation now (loading, read-only, out of memory, too few replicas): a later attempt may
    succeed. Any other :class:`StoreError` is about the data or the request: it would not."""


class ClusterUnavailable(StoreError):
    """Cluster mode: Redis did not answer a cluster call (a claim, a hint...) in time, or
    refused it."""


class ApiError(RelaydError):
    """An error that a client caused, answered with ``status`` and a JSON body.

    ``code`` is stable and documented in ``docs/protocol.md``; ``message`` is for humans;
    ``details`` holds machine-readable specifics (the offending ``field``, a ``retry_after``).
    """

    status: int = 400
    code: str = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details: dict[str, Any] = details or {}
        self.headers: dict[str, str] = headers or {}

    def to_json(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class BadRequest(ApiError):
    status = 400
    code = "bad_request"


class ValidationError(ApiError):
    """A field has the wrong type or value; ``details["field"]`` names it."""

    status = 422
    code = "validation_error"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", details={"field": field})
        self.field = field


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class TokenError(Unauthorized):
    """A token was refused. ``code`` says why (``token_expired``, ``token_revoked``...)."""

    code = "token_invalid"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ApiError):
    status = 415
    code = "unsupported_media_type"


class RateLimited(ApiError):
    """Too many requests; the client may retry after ``retry_after`` seconds."""

    status = 429
    code = "rate_limited"

    def __init__(self, retry_after: float) -> None:
        seconds = max(1, int(retry_after + 0.999))
        super().__init__(
            f"too many requests; retry in {seconds} s",
            details={"retry_after": seconds},
            headers={"Retry-After": str(seconds)},
        )
        self.retry_after = retry_after


class Unavailable(ApiError):
    status = 503
    code = "unavailable"
