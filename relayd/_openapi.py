"""The REST API's OpenAPI 3.1 description, produced from the code by quart-schema.

``GET /openapi.json`` is the description; ``GET /docs`` a page that renders it (Scalar's
viewer, loaded from cdn.jsdelivr.net: the page's own ``Content-Security-Policy`` allows that
and nothing else). Request bodies are the attrs classes the routes parse (``relayd/_api.py``);
the answers are described by the attrs classes below, which exist for the description only
(msgspec, quart-schema's converter, reads attrs classes). Every route names its tag, whether
it needs a Bearer token, and the error answers it can give, all in relayd's one error shape.

``tests/test_openapi.py`` fails when a route is missing from the description, or a route that
reads a body does not describe it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import msgspec
from attrs import frozen
from quart import Quart, Response, request
from quart_schema import (
    QuartSchema,
    document_request,
    document_response,
    security_scheme,
    tag,
)
from quart_schema.openapi import OpenAPIProvider

T = TypeVar("T", bound=Callable[..., Any])

REF_TEMPLATE = "#/components/schemas/{name}"  # quart-schema's
DOCS_PATH = "/docs"
OPENAPI_PATH = "/openapi.json"
VIEWER = "https://cdn.jsdelivr.net"
# The docs page: Scalar's script and styles from the CDN, the description from here.
DOCS_CSP = (
    f"default-src 'none'; script-src {VIEWER}; style-src 'unsafe-inline' {VIEWER}; "
    f"font-src {VIEWER} data:; img-src 'self' data: {VIEWER}; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


# --- answers ------------------------------------------------------------------------------------


@frozen
class ErrorDetail:
    code: str
    message: str
    details: dict[str, Any]


@frozen
class ErrorAnswer:
    """Every error: ``{"error": {"code", "message", "details"}}``."""

    error: ErrorDetail


@frozen
class TokenPair:
    uuid: str
    access_token: str
    refresh_token: str
    token_type: str
    expires_in: int
    expires_at: float
    refresh_expires_in: int
    refresh_expires_at: float


@frozen
class Registered:
    """A registration: ``client_secret`` only when ``created`` (shown once)."""

    uuid: str
    name: str
    created_at: float
    last_seen: float | None
    created: bool
    access_token: str
    refresh_token: str
    token_type: str
    expires_in: int
    expires_at: float
    refresh_expires_in: int
    refresh_expires_at: float
    client_secret: str | None = None


@frozen
class Client:
    """``read_receipts`` only in a client's own record (see ``PUT .../read-receipts``)."""

    uuid: str
    name: str
    created_at: float
    online: bool
    last_seen: float | None = None
    read_receipts: bool | None = None


@frozen
class Directory:
    count: int
    clients: dict[str, str]
    items: list[Client]


@frozen
class AdminClient:
    uuid: str
    name: str
    created_at: float
    online: bool
    roles: list[str]
    queued: int


@frozen
class AdminClients:
    count: int
    items: list[AdminClient]


@frozen
class ClientRoles:
    uuid: str
    name: str
    created_at: float
    online: bool
    roles: list[str]


@frozen
class Secret:
    """A new client secret, shown once (with a new token pair after ``revoke_tokens``)."""

    uuid: str
    client_secret: str
    access_token: str | None = None
    refresh_token: str | None = None


@frozen
class Invite:
    id: str
    created_at: float
    created_by: str
    expires_at: float
    used_at: float | None
    used_by: str | None
    invite: str | None = None  # the code, only when minted


@frozen
class Invites:
    count: int
    items: list[Invite]


@frozen
class StoreKey:
    id: str
    current: bool
    rows: int


@frozen
class StoreKeys:
    current: str
    keys: list[StoreKey]
    plain_rows: int


@frozen
class PublicKey:
    algorithm: str
    key: str
    fingerprint: str
    published_at: float
    superseded_at: float | None = None


@frozen
class PublicKeys:
    uuid: str
    keys: list[PublicKey]
    superseded: list[PublicKey]
    changed: list[str] | None = None  # on PUT: the algorithms whose key is new


@frozen
class MessageStatus:
    """A message's record (with ``from``, its sender). ``final``: its status will not
    change. To its publisher, a topic message's record is its counts (``status``
    ``published``; ``to`` the topic's address, ``#<topic>``)."""

    msgid: str
    to: str
    status: str
    final: bool
    reason: str | None
    attempts: int
    accepted_at: float
    expires_at: float
    finished_at: float | None
    delivered_at: float | None = None
    read_at: float | None = None
    topic_id: str | None = None  # a message its caller published to a topic
    counts: dict[str, int] | None = None  # then: what became of its deliveries


@frozen
class Read:
    """A read recorded (with ``from``, the message's sender): ``status`` ``read`` (now) or
    ``already_read`` (``read_at``: the first time)."""

    msgid: str
    to: str
    status: str
    read_at: float


@frozen
class ReadReceipts:
    """Whether a client's reads are told to their senders."""

    uuid: str
    read_receipts: bool


class OutgoingMessage(msgspec.Struct, kw_only=True):
    """``POST /messages``: the envelope of a WebSocket ``message`` frame, checked the same
    way (only ``to`` is required; ``from``, if given, must be the token's client)."""

    to: str
    from_: str | None = msgspec.field(default=None, name="from")
    type: str | None = None  # absent, or "message"
    msgid: str | None = None
    timestamp: float | None = None
    priority: str = "normal"
    subject: str = ""
    acknowledge: bool = False
    content: str = ""
    action: str = ""
    event: str = ""
    status: str = ""
    conversation_id: str = ""
    msgno: int = 0
    ttl: float | None = None


@frozen
class SendReceipt:
    """A message's first receipt, as its ``delivery_status`` frame would say: 202 while it is
    on its way (``queued_offline``, ``queued``, ``pending_ack``, or ``accepted`` when no
    receipt came within ``http.send_timeout``), 200 once ``final`` (``delivered``,
    ``acknowledged``, ``failed``, ``expired``). ``duplicate``: the msgid was sent before (over
    either path); the status is the one its sender was last told."""

    msgid: str
    to: str
    status: str
    final: bool
    timestamp: float
    message: str
    reason: str | None
    duplicate: bool


@frozen
class Undelivered:
    """What waits for a client: ``count`` in all, ``messages`` the oldest (each the 13 fields
    as they will be delivered, with ``attempts`` and ``accepted_at``)."""

    count: int
    messages: list[dict[str, Any]]


@frozen
class Pending:
    """What a pull took (``GET /messages/pending``): ``messages``, each a delivered
    ``message`` frame as a socket gets it (the 13 fields, ``attempt``, ``redelivered``)."""

    count: int
    messages: list[dict[str, Any]]


@frozen
class PullAck:
    """A delivery acknowledged over REST: ``{"msgid": ..., "status": "acknowledged"}``."""

    msgid: str
    status: str


@frozen
class History:
    """A page of a client's history, newest first unless ``order=oldest``: each entry is a
    delivery's record (``from``, ``to``, ``status``, ``attempts``, the times it was accepted,
    delivered, read and finished) with ``message``, its 13 fields, while the content is kept
    (``history.retention``), else ``null``. ``next_cursor``: pass it as ``cursor`` for the
    next page (``null``: this page was the last)."""

    count: int
    messages: list[dict[str, Any]]
    next_cursor: str | None


@frozen
class Done:
    """``{"revoked": true}``, ``{"revoked": "<uuid>"}``, ``{"deleted": "<uuid>"}``."""

    revoked: bool | str | None = None
    deleted: str | None = None


@frozen
class Status:
    status: str


@frozen
class Service:
    service: str
    version: str


# --- decorating routes --------------------------------------------------------------------------

BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
# The statuses every route may answer with an error body.
ALWAYS = (400, 413, 415, 422, 429)


# Every class a route is described with: their nested classes' schemas go in components.
_MODELS: set[type[Any]] = set()


class _Provider(OpenAPIProvider):
    """quart-schema's description, with the components its msgspec path leaves out: it keeps
    the top schema of each class and drops those of the classes nested in it, which the
    top schema then refers to (``$ref``) in vain."""

    def schema(self) -> dict[str, Any]:
        doc = super().schema()
        _, components = msgspec.json.schema_components(
            sorted(_MODELS, key=lambda cls: cls.__name__), ref_template=REF_TEMPLATE
        )
        schemas = doc["components"]["schemas"]
        for name, schema in components.items():
            schemas.setdefault(name, schema)
        return doc


def api(
    tags: Iterable[str],
    answer: Any = None,
    *,
    body: Any = None,
    errors: Iterable[int] = (),
    bearer: bool = False,
    success: Iterable[int] = (200,),
) -> Callable[[T], T]:
    """Describe a route: its tags, request ``body`` (an attrs class or a msgspec Struct), its
    ``answer`` with each status of ``success``, the error statuses it answers with (401
    comes with ``bearer``), and its security."""

    _MODELS.update(model for model in (answer, body, ErrorAnswer) if model is not None)

    def decorate(func: T) -> T:
        wrapped: Any = tag(list(tags))(func)
        if body is not None:
            wrapped = document_request(body)(wrapped)
        if answer is not None:
            for status in success:
                wrapped = document_response(answer, status)(wrapped)
        statuses = set(errors) | set(ALWAYS if body is not None else (429,))
        if bearer:
            statuses.add(401)
            wrapped = security_scheme(BEARER)(wrapped)
        for status in sorted(statuses):
            wrapped = document_response(ErrorAnswer, status)(wrapped)
        result: T = wrapped
        return result

    return decorate


def install(app: Quart, version: str) -> None:
    """Serve ``/openapi.json`` and ``/docs`` for ``app`` (call before adding routes)."""
    QuartSchema(
        app,
        openapi_path=OPENAPI_PATH,
        swagger_ui_path=None,
        redoc_ui_path=None,
        scalar_ui_path=DOCS_PATH,
        info={
            "title": "relayd",
            "version": version,
            "description": (
                "A self-hosted message relay. Clients register, authenticate with JWT and "
                "exchange messages over a WebSocket (described in docs/asyncapi.yaml); this is "
                'its REST API. Errors: {"error": {"code", "message", "details"}}.'
            ),
        },
        security_schemes={"bearer": {"type": "http", "scheme": "bearer", "bearer_format": "JWT"}},
        openapi_provider_class=_Provider,
    )

    @app.after_request
    async def docs_page_policy(response: Response) -> Response:
        if request.path == DOCS_PATH:
            response.headers["Content-Security-Policy"] = DOCS_CSP
        return response
