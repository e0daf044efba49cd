"""Request bodies of the REST API, as attrs classes structured by a strict cattrs converter.

Unknown keys are ignored (clients written for the seed system may send more than relayd
reads), but every key relayd reads is type-checked without coercion, and the first problem is
reported as a :class:`~relayd._errors.ValidationError` naming the field.
"""

from __future__ import annotations

import uuid as uuid_module
from typing import Any, NewType, TypeVar

import attrs
import cattrs
from attrs import field, frozen

from ._errors import ValidationError
from ._structure import FieldError, field_error, iter_errors, strict_converter, strict_scalar

T = TypeVar("T")

MAX_NAME_CHARS = 128
MAX_TOKEN_CHARS = 8192


# A client UUID, canonicalised (lowercase, hyphenated) when structured.
ClientUuid = NewType("ClientUuid", str)


def _check_name(_: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not value.strip():
        raise field_error(attribute, "must not be empty")
    if len(value) > MAX_NAME_CHARS:
        raise field_error(attribute, f"must be at most {MAX_NAME_CHARS} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise field_error(attribute, "must not contain control characters")


def _bounded(limit: int) -> Any:
    def check(_: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
        if value is None:
            return
        if not value:
            raise field_error(attribute, "must not be empty")
        if len(value) > limit:
            raise field_error(attribute, f"must be at most {limit} characters")

    return check


def canonical_uuid(value: str) -> ClientUuid:
    """The canonical form of a UUID string, or ``ValueError``."""
    try:
        return ClientUuid(str(uuid_module.UUID(value)))
    except ValueError:
        raise ValueError(f"{value[:64]!r} is not a UUID") from None


@frozen(kw_only=True)
class RegisterRequest:
    name: str = field(validator=_check_name)
    uuid: ClientUuid | None = None


@frozen(kw_only=True)
class LoginRequest:
    uuid: ClientUuid
    client_secret: str = field(validator=_bounded(256))


@frozen(kw_only=True)
class RefreshRequest:
    refresh_token: str = field(validator=_bounded(MAX_TOKEN_CHARS))


@frozen(kw_only=True)
class RevokeRequest:
    """``POST /auth/revoke``: a refresh token (log out) or an access token (revoke it)."""

    refresh_token: str | None = field(default=None, validator=_bounded(MAX_TOKEN_CHARS))
    access_token: str | None = field(default=None, validator=_bounded(MAX_TOKEN_CHARS))

    def __attrs_post_init__(self) -> None:
        if (self.refresh_token is None) == (self.access_token is None):
            raise FieldError("refresh_token", "give exactly one of refresh_token and access_token")


converter = strict_converter(forbid_extra_keys=False)
converter.register_structure_hook(
    ClientUuid, lambda value, _: canonical_uuid(strict_scalar(value, str))
)


def _problem(path: str, exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, KeyError):
        return path, "is required"
    return path or "body", str(exc)


def parse_body(doc: dict[str, Any], cls: type[T]) -> T:
    """Structure a JSON object into ``cls``.

    Raises:
        ValidationError: naming the first field that is missing, mistyped or invalid.
    """
    try:
        return converter.structure(doc, cls)
    except cattrs.BaseValidationError as exc:
        path, leaf = next(iter_errors(exc))
        raise ValidationError(*_problem(path, leaf)) from None
