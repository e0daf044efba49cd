"""Request bodies of the REST API, as attrs classes structured by a strict cattrs converter.

A body is read in two steps, the same for every route. :func:`parse_json_object` turns the
bytes into a JSON object, or refuses them with a 400 (``invalid_json``): not UTF-8, not JSON
(``NaN`` and ``Infinity`` included), nested too deeply for the parser, or not an object; and
with a 422 naming the field when a string holds a lone surrogate (``"\\ud800"`` is valid JSON
text but no Unicode string: no UTF-8 encoder, the store's or a socket's, accepts it).
:func:`parse_body` then structures the object: unknown keys are ignored (clients written for
the seed system may send more than relayd reads), but every key relayd reads is type-checked
without coercion, and the first problem is reported as a
:class:`~relayd._errors.ValidationError` naming the field.
"""

from __future__ import annotations

import json
import re
import uuid as uuid_module
from typing import Any, NewType, TypeVar

import attrs
import cattrs
from attrs import field, frozen

from ._errors import BadRequest, ValidationError
from ._structure import (
    FieldError,
    field_error,
    iter_errors,
    strict_converter,
    strict_scalar,
    strict_strings,
)

T = TypeVar("T")

MAX_NAME_CHARS = 128
MAX_TOKEN_CHARS = 8192
MAX_INVITE_TTL = 90 * 86_400.0
MAX_ROLES = 8


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


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def canonical_uuid(value: str) -> ClientUuid:
    """The canonical form of a UUID string, or ``ValueError``."""
    if _CANONICAL_UUID.fullmatch(value):  # the usual spelling: no need to parse it
        return ClientUuid(value)
    try:
        return ClientUuid(str(uuid_module.UUID(value)))
    except ValueError:
        raise ValueError(f"{value[:64]!r} is not a UUID") from None


@frozen(kw_only=True)
class RegisterRequest:
    """``POST /register``. ``client_secret`` proves ownership of an existing ``uuid``;
    ``invite`` is a one-time code (``auth.registration = "invite"``)."""

    name: str = field(validator=_check_name)
    uuid: ClientUuid | None = None
    client_secret: str | None = field(default=None, validator=_bounded(256))
    invite: str | None = field(default=None, validator=_bounded(256))


@frozen(kw_only=True)
class RotateSecretRequest:
    """``POST /clients/{uuid}/secret``: the current secret (or a Bearer token) proves it."""

    client_secret: str | None = field(default=None, validator=_bounded(256))
    revoke_tokens: bool = False


@frozen(kw_only=True)
class ReadReceiptsRequest:
    """``PUT /clients/{uuid}/read-receipts``: whether the client's reads are told to their
    senders from now on."""

    enabled: bool


@frozen(kw_only=True)
class RolesRequest:
    """``PUT /admin/clients/{uuid}/roles``: the roles the client holds from now on."""

    roles: tuple[str, ...]

    def __attrs_post_init__(self) -> None:
        if not 1 <= len(self.roles) <= MAX_ROLES:
            raise FieldError("roles", f"must list 1 to {MAX_ROLES} roles")
        if len(set(self.roles)) != len(self.roles):
            raise FieldError("roles", "must not repeat a role")


@frozen(kw_only=True)
class InviteRequest:
    """``POST /admin/invites``: the invite's lifetime (default ``auth.invite_ttl``)."""

    ttl: float | None = field(default=None)

    def __attrs_post_init__(self) -> None:
        if self.ttl is not None and not 60 <= self.ttl <= MAX_INVITE_TTL:
            raise FieldError("ttl", f"must be between 60 and {MAX_INVITE_TTL:.0f} seconds")


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


converter.register_structure_hook_func(
    lambda kind: kind == tuple[str, ...], lambda value, _: strict_strings(value)
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


def encodable(value: Any) -> bool:
    """Whether every string in a parsed JSON value (keys included) encodes as UTF-8.

    Iterative, so that a deeply nested value is walked as surely as a flat one.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object.

    Raises:
        BadRequest: ``invalid_json``: not UTF-8, not JSON, nested too deeply, not an object,
            or a key holding a lone surrogate.
        ValidationError: a field's value holds a lone surrogate.
    """
    try:
        # RFC 8259 section 8.1: UTF-8. Decoded here, strictly: json.loads on bytes would
        # decode with "surrogatepass" and let an encoded surrogate through.
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the body is not UTF-8", code="invalid_json") from None
    try:
        doc = json.loads(text, parse_constant=_no_constants)
    except ValueError:
        raise BadRequest("the body is not valid JSON", code="invalid_json") from None
    except RecursionError:
        raise BadRequest("the body is nested too deeply", code="invalid_json") from None
    if not isinstance(doc, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_json")
    # From strictly decoded UTF-8, only a \u escape can make a lone surrogate.
    if "\\u" in text:
        for key, value in doc.items():
            if not encodable(key):
                raise BadRequest(
                    "a key holds a lone surrogate (a \\ud800-\\udfff escape)", code="invalid_json"
                )
            if not encodable(value):
                raise ValidationError(
                    key, "must not hold a lone surrogate (a \\ud800-\\udfff escape)"
                )
    return doc
