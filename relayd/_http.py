"""The REST API: a Quart-Trio app.

Every response is JSON (but ``/metrics`` and the browser client's files under ``/app/``, with
``http.serve_app``). Every error has one shape,
``{"error": {"code": ..., "message": ..., "details": {...}}}``, with the status it implies;
``docs/protocol.md`` lists the routes and codes. The app holds no state of its own: it calls the
services it is built with.
"""

from __future__ import annotations

import enum
import html
import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from importlib import resources
from typing import Any, Protocol

import trio
from attrs import define, evolve, field
from quart import Response, jsonify, request
from quart_cors import cors
from quart_schema import hide
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from . import __version__
from . import _openapi as openapi
from ._api import (
    InviteRequest,
    LoginRequest,
    ReadReceiptsRequest,
    RefreshRequest,
    RegisterRequest,
    RevokeRequest,
    RolesRequest,
    RotateSecretRequest,
    canonical_uuid,
    parse_body,
    parse_json_object,
)
from ._auth import AuthService
from ._browser import APP_CSP
from ._config import Config, RolesConfig
from ._engine import ClientRecord, Engine, HistoryEntry, HistoryQuery, MessageRecord
from ._errors import (
    ApiError,
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    StoreError,
    StoreUnavailable,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
    ValidationError,
)
from ._http_topics import serve_topics
from ._keys import KeyDirectory, PublishKeysRequest, keys_json
from ._metrics import CONTENT_TYPE, HttpStats, Metrics
from ._openapi import (
    AdminClients,
    Client,
    ClientRoles,
    Directory,
    Done,
    History,
    Invite,
    Invites,
    MessageStatus,
    OutgoingMessage,
    Pending,
    PublicKeys,
    PullAck,
    Read,
    ReadReceipts,
    Registered,
    Secret,
    SendReceipt,
    Service,
    Status,
    StoreKeys,
    TokenPair,
    Undelivered,
    api,
)
from ._ratelimit import RateLimiter
from ._relay import frames as F
from ._relay.frames import ProtocolError
from ._relay.reads import refusal
from ._relay.records import ReadCode, ReadOutcome
from ._relay.topics import counts_doc
from ._roles import RolePolicy
from ._tokens import Claims

log = logging.getLogger("relayd.http")


class Relay(Protocol):
    """What the REST API needs from the relay."""

    async def online(self, clients: Sequence[str]) -> set[str]:
        """Which of ``clients`` have a live session (on any node, in cluster mode).

        Raises:
            StoreError: the cluster could not be asked.
        """
        ...

    @property
    def store_available(self) -> bool: ...

    async def queue_depths(self) -> dict[str, int]: ...

    def recent_status(self, sender: str, msgid: str) -> tuple[float, str | None] | None: ...

    async def pull(
        self, token: str, claims: Claims, *, remote: str, wait: float, limit: int
    ) -> list[dict[str, Any]]:
        """What waits for the client, over its REST session (see Hub.pull).

        Raises:
            ApiError: the pull was refused (too many, the client's socket is live, ...).
        """
        ...

    def acknowledge(self, client: str, msgid: str) -> bool:
        """Whether ``client``'s REST session held ``msgid`` unacknowledged (now acknowledged)."""
        ...

    def topic_changed(self, topic: str, presence: bool | None) -> None:
        """A topic's presence setting changed, or it was deleted or created (``None``)."""
        ...

    def membership_changed(self, topic: str, client: str, *, joined: bool, presence: bool) -> None:
        """``client`` subscribed to ``topic`` or left it: its live session learns it, and
        with presence on, the topic's other subscribers are told (relayd/_relay/presence.py)."""
        ...

    async def mark_read(self, reader: str, msgid: str, sender: str | None) -> ReadOutcome:
        """``reader`` read ``msgid`` (from ``sender``): recorded, and the sender told, as for
        a ``read`` frame.

        Raises:
            StoreUnavailable: the store cannot record it now.
        """
        ...

    async def submit(
        self, client: str, doc: dict[str, Any], *, deadline: float, max_waiting: int
    ) -> dict[str, Any]:
        """Send ``doc`` as ``client`` without a session; its first receipt (see
        :meth:`relayd._relay.hub.Hub.submit`).

        Raises:
            ProtocolError: refused, with the code a socket's error frame would carry.
        """
        ...


class Readiness(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"


@define
class Services:
    """What the routes use. The daemon builds it; tests may build it too."""

    config: Config
    auth: AuthService
    relay: Relay | None = None
    metrics: Metrics | None = None  # GET /metrics, when served on this port
    store: Engine | None = None  # GET /admin/store-keys
    policy: RolePolicy = field(factory=lambda: RolePolicy.from_config(RolesConfig()))
    keys: KeyDirectory | None = None  # the key directory's routes, when given
    stats: HttpStats = field(factory=HttpStats)
    readiness: Readiness = Readiness.STARTING
    register_limiter: RateLimiter = field(init=False)
    auth_limiter: RateLimiter = field(init=False)
    api_limiter: RateLimiter = field(init=False)  # keyed by the token's sub

    def __attrs_post_init__(self) -> None:
        http = self.config.http
        self.register_limiter = RateLimiter(
            rate=http.register_per_minute / 60, burst=http.register_burst
        )
        self.auth_limiter = RateLimiter(rate=http.auth_per_minute / 60, burst=http.auth_burst)
        self.api_limiter = RateLimiter(rate=http.api_per_minute / 60, burst=http.api_burst)

    def reconfigure(self, config: Config) -> None:
        """New settings (a reload): the routes read ``config`` from their next request on."""
        self.config = config
        http = config.http
        self.register_limiter.reconfigure(
            rate=http.register_per_minute / 60, burst=http.register_burst
        )
        self.auth_limiter.reconfigure(rate=http.auth_per_minute / 60, burst=http.auth_burst)
        self.api_limiter.reconfigure(rate=http.api_per_minute / 60, burst=http.api_burst)


def _error_response(error: ApiError) -> Response:
    response = jsonify(error.to_json())
    response.status_code = error.status
    response.headers.update(error.headers)
    return response


_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
}


class _CorsOrigins:
    """``http.cors_origins`` as quart-cors reads it: afresh on every request, so that a reload
    applies at once."""

    def __init__(self, services: Services) -> None:
        self._services = services

    def __iter__(self) -> Iterator[str]:
        return iter(self._services.config.http.cors_origins)


def _enable_cors(app: QuartTrio, services: Services) -> None:
    """Answer preflights and add ``Access-Control-*`` headers for ``http.cors_origins``.

    Tokens travel in ``Authorization``, never in cookies: credentials stay off, so a page
    reads only what it asked for with a token it was given.
    """
    app.config["QUART_CORS_ALLOW_ORIGIN"] = _CorsOrigins(services)
    cors(
        app,
        allow_credentials=False,
        allow_headers=["Authorization", "Content-Type"],
        allow_methods=["GET", "HEAD", "POST", "PUT", "DELETE"],
        expose_headers=["Retry-After", "WWW-Authenticate"],
        max_age=600,
    )


def _source() -> str | None:
    return request.remote_addr


async def _json_body() -> dict[str, Any]:
    if request.mimetype != "application/json":
        raise UnsupportedMediaType(
            "send the body as JSON with Content-Type: application/json",
            details={"content_type": request.mimetype or None},
        )
    raw = await request.get_data(cache=False, as_text=False, parse_form_data=False)
    return parse_json_object(raw)


def _bearer_token() -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(
            "send an access token as Authorization: Bearer <token>",
            code="missing_token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return token.strip()


def _path_uuid(value: str) -> str:
    """A client uuid from a path, canonical; 404 ``unknown_client`` if it is not a uuid (the
    answer quotes at most 64 characters of it)."""
    try:
        return canonical_uuid(value)
    except ValueError:
        raise NotFound(f"no client {value[:64]!r}", code="unknown_client") from None


MAX_MSGID_CHARS = 256
STORE_RETRY_AFTER = 1  # seconds a client waits before it tries again when the store is down
FINAL_STATUSES = frozenset({"delivered", "acknowledged", "failed", "expired"})
# A read refused, as REST answers it (relayd/_relay/reads.py).
_READ_ERRORS: dict[ReadCode, type[ApiError]] = {
    ReadCode.UNKNOWN_MESSAGE: NotFound,
    ReadCode.NOT_YOURS: Forbidden,
    ReadCode.NOT_DELIVERED: Conflict,
}
MAX_PAGE = 1000
# POST /messages: the HTTP status of each refusal, by the code a socket's error frame carries.
SEND_REFUSALS = {
    F.INVALID_MESSAGE_FORMAT: 422,
    F.UNKNOWN_TYPE: 422,
    F.MESSAGE_SENDER_MISMATCH: 403,
    F.NOT_PERMITTED: 403,
    F.UNKNOWN_RECIPIENT: 404,
    F.RATE_LIMITED: 429,
    F.QUEUE_FULL: 429,
    F.STORE_UNAVAILABLE: 503,
    F.SHUTTING_DOWN: 503,
    F.SERVER_BUSY: 503,
}


def _send_refused(exc: ProtocolError) -> ApiError:
    """A refused ``POST /messages``: the socket's code and details, with its HTTP status; a
    429 or 503 says when to retry (``Retry-After``, whole seconds, and ``details``)."""
    error = ApiError(exc.message, code=exc.code, details=dict(exc.details))
    error.status = SEND_REFUSALS.get(exc.code, 400)
    if error.status in (429, 503):
        seconds = max(1, math.ceil(float(exc.details.get("retry_after", 1))))
        error.details["retry_after"] = seconds
        error.headers["Retry-After"] = str(seconds)
    return error


async def _message_body(limit: int) -> dict[str, Any]:
    """``POST /messages``' body: JSON, at most ``limit`` bytes (a WebSocket frame's bound).

    Raises:
        UnsupportedMediaType: not ``application/json``.
        PayloadTooLarge: over ``limit``.
        BadRequest: not a JSON object (see :func:`parse_json_object`).
    """
    if request.mimetype != "application/json":
        raise UnsupportedMediaType(
            "send the message as JSON with Content-Type: application/json",
            details={"content_type": request.mimetype or None},
        )
    too_big = PayloadTooLarge(
        f"a message is at most {limit} bytes (websocket.max_frame_bytes)",
        details={"limit": limit},
    )
    if (request.content_length or 0) > limit:
        raise too_big
    raw = await request.get_data(cache=False, as_text=False, parse_form_data=False)
    if len(raw) > limit:  # sent without a Content-Length (chunked)
        raise too_big
    return parse_json_object(raw)


def _limit(text: str | None) -> int:
    """``?limit=``: 1 to ``MAX_PAGE``, 100 when absent."""
    if text is None:
        return 100
    if not text.isdigit() or not 1 <= int(text) <= MAX_PAGE:
        raise ValidationError("limit", f"must be a whole number from 1 to {MAX_PAGE}")
    return int(text)


def _pull_args(args: Mapping[str, str], *, max_wait: float, max_limit: int) -> tuple[float, int]:
    """``GET /messages/pending``'s ``wait`` (seconds, 0 when absent, cut to ``max_wait``)
    and ``limit`` (from 1, ``max_limit`` when absent, cut to it): 422 for anything else."""
    wait = 0.0
    text = args.get("wait")
    if text is not None:
        try:
            wait = float(text)
        except ValueError:
            wait = math.nan
        if not (math.isfinite(wait) and wait >= 0) or len(text) > 32:
            raise ValidationError("wait", "must be a number of seconds, 0 or more")
    limit = max_limit
    text = args.get("limit")
    if text is not None:
        if not (text.isdigit() and len(text) <= 19 and int(text) >= 1):
            raise ValidationError("limit", "must be a whole number, 1 or more")
        limit = int(text)
    return min(wait, max_wait), min(limit, max_limit)


HISTORY_PAGE = 50
MAX_HISTORY_PAGE = 200
HISTORY_ARGS = frozenset(
    {"token", "box", "peer", "conversation_id", "order", "cursor", "limit", "client"}
)


def _history_query(args: Mapping[str, str], sub: str, *, admin: bool) -> HistoryQuery:
    """``GET /messages``'s query string, checked: 422 ``validation_error`` naming what is
    wrong; 403 ``not_yours`` for ``client`` from anyone but an admin."""
    unknown = sorted(set(args) - HISTORY_ARGS)
    if unknown:
        raise ValidationError(unknown[0][:64], "not a parameter of GET /messages")
    client = sub
    if "client" in args:
        if not admin:
            raise Forbidden("only an admin may read another client's history", code="not_yours")
        client = _query_uuid(args["client"], "client")
    box = args.get("box", "all")
    if box not in ("all", "inbox", "sent"):
        raise ValidationError("box", "must be all, inbox or sent")
    order = args.get("order", "newest")
    if order not in ("newest", "oldest"):
        raise ValidationError("order", "must be newest or oldest")
    peer = _query_uuid(args["peer"], "peer") if "peer" in args else None
    conversation = args.get("conversation_id")
    if conversation is not None and not 1 <= len(conversation) <= MAX_MSGID_CHARS:
        raise ValidationError("conversation_id", f"must be 1 to {MAX_MSGID_CHARS} characters")
    cursor_text = args.get("cursor")
    if cursor_text is not None and not (cursor_text.isdigit() and len(cursor_text) <= 19):
        raise ValidationError("cursor", "must be a next_cursor this route returned")
    limit_text = args.get("limit", str(HISTORY_PAGE))
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_HISTORY_PAGE:
        raise ValidationError("limit", f"must be a whole number from 1 to {MAX_HISTORY_PAGE}")
    return HistoryQuery(
        client,
        box=box,  # type: ignore[arg-type]  # checked above
        peer=peer,
        conversation_id=conversation,
        newest_first=order == "newest",
        cursor=None if cursor_text is None else int(cursor_text),
        limit=int(limit_text),
    )


def _query_uuid(value: str, name: str) -> str:
    try:
        return canonical_uuid(value)
    except ValueError:
        raise ValidationError(name, "must be a client uuid") from None


def _as_told(entry: HistoryEntry, relay: Relay | None, *, keeps: bool) -> HistoryEntry:
    """``entry`` with the final status its sender was told, if the store has not recorded it
    yet (the core's view is ahead of the store by at most one deferred commit): what the
    status route answers too."""
    if entry.status is not None or relay is None:
        return entry
    told = relay.recent_status(entry.sender, entry.msgid)
    if told is None or told[1] not in FINAL_STATUSES:
        return entry
    return evolve(entry, status=told[1], fields=entry.fields if keeps else "")


def _history_json(entry: HistoryEntry) -> dict[str, Any]:
    """A history entry: the delivery's record, and ``message`` (its 13 fields) while the
    content is kept, else ``null``."""
    return {
        "msgid": entry.msgid,
        "from": entry.sender,
        "to": entry.recipient,
        "conversation_id": entry.conversation_id,
        "status": entry.status or "queued",
        "final": entry.status in FINAL_STATUSES,
        "reason": entry.reason or None,
        "attempts": entry.attempts,
        "accepted_at": entry.accepted_at,
        "delivered_at": entry.delivered_at,
        "read_at": entry.read_at,
        "finished_at": entry.finished_at,
        "message": json.loads(entry.fields) if entry.fields else None,
    }


async def _published_status(store: Engine, record: MessageRecord) -> dict[str, Any]:
    """A topic message's record for its publisher: the counts of its deliveries (one per
    subscriber), as ``topic_update`` frames tell them."""
    found = (await store.topic_counts([record.message])).get(record.message)
    counts = counts_doc(found) if found is not None else None
    return {
        "msgid": record.msgid,
        "from": record.sender,
        "to": "#" + str(record.topic),
        "topic_id": record.topic,
        "status": "published",
        "final": counts is not None and counts["pending"] == 0,
        "reason": None,
        "attempts": 0,
        "accepted_at": record.accepted_at,
        "expires_at": record.expires_at,
        "finished_at": None,
        "counts": counts,
    }


def _client_json(client: ClientRecord, online: set[str] | None = None) -> dict[str, Any]:
    """A client as the directory shows it; ``online``: who is online, if the relay runs."""
    doc: dict[str, Any] = {
        "uuid": client.uuid,
        "name": client.name,
        "created_at": client.created_at,
        "last_seen": client.last_seen,
    }
    if online is not None:
        doc["online"] = client.uuid in online
    return doc


async def _online(relay: Relay | None, clients: Sequence[ClientRecord]) -> set[str] | None:
    """Who of ``clients`` is online (``None`` without a relay).

    Raises:
        Unavailable: the cluster could not be asked (503 ``store_unavailable``).
    """
    if relay is None:
        return None
    try:
        return await relay.online([c.uuid for c in clients])
    except StoreError:
        raise Unavailable(
            "the store cannot be reached now; try again later", code="store_unavailable"
        ) from None


# The browser client's files (relayd/web, package data), by their name under /app/.
_APP_FILES = {
    "": ("index.html", "text/html; charset=utf-8"),
    "relayd.js": ("relayd.js", "text/javascript; charset=utf-8"),
    "app.js": ("app.js", "text/javascript; charset=utf-8"),
    "app.css": ("app.css", "text/css; charset=utf-8"),
    "icon.svg": ("icon.svg", "image/svg+xml"),
}


def app_files(websocket_path: str) -> dict[str, tuple[bytes, str]]:
    """The browser client's files, read once: body and content type by name under ``/app/``.
    The page learns the WebSocket path (``websocket.path``) from a ``<meta>`` in ``index.html``.
    """
    package = resources.files("relayd.web")
    files = {}
    for name, (filename, content_type) in _APP_FILES.items():
        text = package.joinpath(filename).read_text(encoding="utf-8")
        if filename == "index.html":
            text = text.replace("{{websocket_path}}", html.escape(websocket_path, quote=True))
        files[name] = (text.encode(), content_type)
    return files


def _serve_app(app: QuartTrio, websocket_path: str) -> None:
    """``GET /app/`` and its files: the browser client, under a policy that lets it run its own
    script and style and talk to its own origin (``APP_CSP``); every other response keeps the
    API's policy (``relayd/_browser.py``)."""
    files = app_files(websocket_path)

    @app.get("/app")
    @hide
    async def app_slash() -> Response:
        # The page's files are named relative to /app/.
        return Response(b"", status=308, headers={"Location": "/app/"})

    @app.get("/app/")
    @app.get("/app/<name>")
    @hide
    async def app_file(name: str = "") -> Response:
        if name not in files:
            raise NotFound("no such file in the browser client")
        body, content_type = files[name]
        response = Response(body, content_type=content_type)
        response.headers["Content-Security-Policy"] = APP_CSP.decode()
        return response


def _serve_keys(
    app: QuartTrio,
    directory: KeyDirectory,
    authenticated: Callable[[], Awaitable[Claims]],
    may_read: Callable[[Claims, str], Awaitable[None]],
) -> None:
    """``PUT`` and ``GET /clients/{uuid}/keys``: the end-to-end key directory
    (relayd/_keys.py). ``may_read`` refuses a reader its roles do not let message the
    client."""

    @app.put("/clients/<client_uuid>/keys")
    @api(["keys"], PublicKeys, body=PublishKeysRequest, errors=(403,), bearer=True)
    async def publish_keys(client_uuid: str) -> dict[str, Any]:
        """Publish the client's own public keys (one per algorithm)."""
        claims = await authenticated()
        client_uuid = _path_uuid(client_uuid)
        if claims.sub != client_uuid:
            raise Forbidden("a client may publish only its own keys", code="not_yours")
        body = parse_body(await _json_body(), PublishKeysRequest)
        changed = await directory.publish(client_uuid, body.keys)
        keys = await directory.read(client_uuid, None)
        return {**keys_json(client_uuid, keys), "changed": list(changed)}

    @app.get("/clients/<client_uuid>/keys")
    @api(["keys"], PublicKeys, errors=(403, 404), bearer=True)
    async def read_keys(client_uuid: str) -> dict[str, Any]:
        """A client's public keys with their fingerprints, current and superseded."""
        claims = await authenticated()
        client_uuid = _path_uuid(client_uuid)
        await may_read(claims, client_uuid)
        reader = None if claims.is_operator else claims.sub
        return keys_json(client_uuid, await directory.read(client_uuid, reader))


def create_app(services: Services) -> QuartTrio:
    """Build the Quart-Trio app serving relayd's REST API with ``services``."""
    app = QuartTrio("relayd", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = services.config.http.max_body_bytes
    app.config["BODY_TIMEOUT"] = services.config.http.request_timeout
    openapi.install(app, __version__)  # sets app.json: configure it after
    app.json.sort_keys = False  # type: ignore[attr-defined]
    _enable_cors(app, services)
    auth = services.auth

    async def authenticated(*, query_token: bool = False) -> Claims:
        """The request's token, checked, and one request taken from its client's allowance.
        ``query_token``: a ``?token=`` is accepted too when there is no Authorization header
        (the seed system's clients send it so on the routes they share with relayd).

        Raises:
            Unauthorized: no token, or a token refused.
            RateLimited: the client (``sub``) is over ``http.api_per_minute``.
        """
        token = request.args.get("token") if query_token else None
        if token is None or "Authorization" in request.headers:
            token = _bearer_token()
        claims = await auth.authenticate(token)
        wait = services.api_limiter.acquire(claims.sub, trio.current_time())
        if wait > 0:
            raise RateLimited(wait)
        return claims

    def may(claims: Claims, permission: str) -> bool:
        """Operators hold every permission their ``admin`` role gives; clients, what their
        roles grant now (see relayd/_roles.py)."""
        if claims.is_operator:
            return claims.is_admin
        return services.policy.allows(claims.roles, permission)

    async def admin() -> Claims:
        claims = await authenticated()
        if not may(claims, "admin"):
            raise Forbidden("this needs an admin token", code="admin_required")
        return claims

    async def may_read_keys(claims: Claims, client_uuid: str) -> None:
        """A client's keys are for those its roles let message it (issue 15)."""
        if claims.is_operator or services.policy.messaging_is_open:
            return
        owner = await auth.get_client(client_uuid)  # NotFound for an unknown client
        if owner.uuid != claims.sub and not services.policy.may_message(claims.roles, owner.roles):
            raise Forbidden(
                "your roles do not allow messaging this client, nor reading its keys",
                code="not_permitted",
                details={"permission": f"message:{' '.join(owner.roles)}"},
            )

    async def permitted(permission: str) -> Claims:
        claims = await authenticated()
        if not may(claims, permission):
            raise Forbidden(
                f"your roles do not grant {permission!r}",
                code="not_permitted",
                details={"permission": permission, "roles": list(claims.roles)},
            )
        return claims

    @app.errorhandler(ApiError)
    async def api_error(error: ApiError) -> Response:
        if error.status == 401:
            services.stats.auth_failures[error.code] += 1
        return _error_response(error)

    @app.after_request
    async def preflight_has_no_content(response: Response) -> Response:
        # Quart answers OPTIONS with an empty text/html 200; every body relayd sends is JSON,
        # so an answer without one says 204 and names no type (nor, RFC 9110, a length).
        if request.method == "OPTIONS" and response.status_code == 200:
            response.status_code = 204
            del response.headers["Content-Type"]
            del response.headers["Content-Length"]
        return response

    @app.after_request
    async def count(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        services.stats.requests[(route, request.method, response.status_code)] += 1
        return response

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = _HTTP_CODES.get(status, "http_error")
        message = error.description or error.name
        api = ApiError(message, code=code)
        api.status = status
        response = _error_response(api)
        for name, value in error.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value  # e.g. Allow on 405
        return response

    @app.errorhandler(StoreUnavailable)
    async def store_unavailable(error: StoreUnavailable) -> Response:
        # Redis unreachable or refusing for now: the caller's to retry, not a fault to trace.
        log.warning(
            "store unavailable serving %s %s",
            request.method,
            request.path,
            extra={"fields": {"error": str(error)}},
        )
        api = Unavailable(
            "the store cannot be reached now; try again later",
            code="store_unavailable",
            details={"retry_after": STORE_RETRY_AFTER},
            headers={"Retry-After": str(STORE_RETRY_AFTER)},
        )
        return _error_response(api)

    @app.errorhandler(Exception)
    async def unexpected(error: Exception) -> Response:
        log.error("unhandled error serving %s %s", request.method, request.path, exc_info=error)
        api = ApiError("internal error; see the server log", code="internal_error")
        api.status = 500
        return _error_response(api)

    @app.before_request
    async def rate_limit() -> None:
        if request.method == "OPTIONS":
            return  # a preflight: no credentials, no work
        if request.path == "/register":
            limiter = services.register_limiter
        elif request.path.startswith("/auth/") or request.path.endswith("/secret"):
            # Both may check a client secret: scrypt, so the per-address login allowance.
            limiter = services.auth_limiter
        else:
            return
        wait = limiter.acquire(_source() or "-", trio.current_time())
        if wait > 0:
            raise RateLimited(wait)

    @app.get("/")
    @api(["health"], Service)
    async def index() -> dict[str, Any]:
        """The service's name and version."""
        return {"service": "relayd", "version": __version__}

    if services.metrics is not None:
        metrics = services.metrics

        @app.get("/metrics")
        @api(["health"])
        async def prometheus() -> Response:
            """Prometheus metrics (text exposition format)."""
            return Response(await metrics.render(), content_type=CONTENT_TYPE)

    if services.config.http.serve_app:
        _serve_app(app, services.config.websocket.path)

    @app.get("/health/live")
    @api(["health"], Status)
    async def live() -> dict[str, Any]:
        """Liveness: the process is up."""
        return {"status": "live"}

    @app.get("/health/ready")
    @api(["health"], Status, errors=(503,))
    async def ready() -> Response:
        """Readiness: 200 when serving, 503 while starting or draining."""
        state = services.readiness
        relay = services.relay
        if state is Readiness.READY and relay is not None and not relay.store_available:
            body = {"status": "unavailable"}
            body.update(ApiError("the store cannot be reached", code="store_unavailable").to_json())
            response = jsonify(body)
            response.status_code = 503
            return response
        if state is Readiness.READY:
            return jsonify({"status": state.value})
        body = {"status": state.value}
        body.update(ApiError(f"relayd is {state.value}", code=state.value).to_json())
        response = jsonify(body)
        response.status_code = 503
        return response

    async def bearer_claims() -> Claims | None:
        """The request's access token checked, or ``None`` when it carries none."""
        if "Authorization" not in request.headers:
            return None
        return await auth.authenticate(_bearer_token())

    async def may_register(body: RegisterRequest) -> None:
        """Whether ``auth.registration`` lets this request create a client.

        Raises:
            Forbidden: closed (``registration_closed``) or invite-only without a code
                (``invite_required``) and no admin token.
        """
        policy = services.config.auth.registration
        if policy == "open" or (policy == "invite" and body.invite is not None):
            return
        try:
            await admin()
        except RateLimited:
            raise
        except ApiError as exc:
            if policy == "closed":
                raise Forbidden(
                    "registration is closed: only an admin token may register clients",
                    code="registration_closed",
                    details={"reason": exc.code},
                ) from None
            raise Forbidden(
                'registration needs an invite code ("invite") or an admin token',
                code="invite_required",
                details={"reason": exc.code},
            ) from None

    @app.post("/register")
    @api(["auth"], Registered, body=RegisterRequest, errors=(401, 403, 409))
    async def register() -> dict[str, Any]:
        """Register a client, or register an existing uuid again with proof of owning it."""
        body = parse_body(await _json_body(), RegisterRequest)
        name = body.name.strip()
        if body.uuid is not None:
            claims = None if body.client_secret is not None else await bearer_claims()
            if body.client_secret is not None or claims is not None:
                again = await auth.reregister(
                    name,
                    body.uuid,
                    client_secret=body.client_secret,
                    claims=claims,
                    source=_source(),
                )
                if again is not None:
                    client, tokens = again
                    return {**_client_json(client), "created": False, **tokens.to_json(auth.now)}
        await may_register(body)
        invite = body.invite if services.config.auth.registration == "invite" else None
        result = await auth.register(name, body.uuid, invite=invite, source=_source())
        return {
            **_client_json(result.client),
            "created": True,
            "client_secret": result.client_secret,
            **result.tokens.to_json(auth.now),
        }

    @app.post("/auth/token")
    @api(["auth"], TokenPair, body=LoginRequest, errors=(401,))
    async def token() -> dict[str, Any]:
        """Log in with the client secret: a new token pair."""
        body = parse_body(await _json_body(), LoginRequest)
        pair = await auth.login(body.uuid, body.client_secret, source=_source())
        return {"uuid": body.uuid, **pair.to_json(auth.now)}

    @app.post("/auth/refresh")
    @api(["auth"], TokenPair, body=RefreshRequest, errors=(401,))
    async def refresh() -> dict[str, Any]:
        """Rotate a refresh token: a new token pair (a spent one revokes its login)."""
        body = parse_body(await _json_body(), RefreshRequest)
        pair = await auth.refresh(body.refresh_token, source=_source())
        return {"uuid": pair.access.claims.sub, **pair.to_json(auth.now)}

    @app.post("/auth/revoke")
    @api(["auth"], Done, body=RevokeRequest, errors=(401,))
    async def revoke() -> dict[str, Any]:
        """Log out (a refresh token) or revoke one access token."""
        body = parse_body(await _json_body(), RevokeRequest)
        if body.refresh_token is not None:
            await auth.logout(body.refresh_token, source=_source())
        else:
            assert body.access_token is not None
            claims = auth.codec.verify(body.access_token, use="access")
            await auth.revoke_token(claims, actor=claims.sub, source=_source())
        return {"revoked": True}

    @app.get("/clients")
    @api(["clients"], Directory, errors=(403,), bearer=True)
    async def list_clients() -> dict[str, Any]:
        """The client directory (needs the 'directory' grant)."""
        await permitted("directory")
        clients = await auth.list_clients()
        online = await _online(services.relay, clients)
        return {
            "count": len(clients),
            "clients": {c.uuid: c.name for c in clients},
            "items": [_client_json(c, online) for c in clients],
        }

    @app.get("/clients/<client_uuid>")
    @api(["clients"], Client, errors=(403, 404), bearer=True)
    async def get_client(client_uuid: str) -> dict[str, Any]:
        """One client of the directory (needs the 'directory' grant); its own record says
        whether it sends read receipts."""
        claims = await permitted("directory")
        client = await auth.get_client(_path_uuid(client_uuid))
        doc = _client_json(client, await _online(services.relay, [client]))
        if claims.sub == client.uuid:
            doc["read_receipts"] = client.read_receipts
        return doc

    @app.put("/clients/<client_uuid>/read-receipts")
    @api(["clients"], ReadReceipts, body=ReadReceiptsRequest, errors=(403, 404), bearer=True)
    async def set_read_receipts(client_uuid: str) -> dict[str, Any]:
        """Whether a client's reads are told to their senders (the client itself only): off,
        its reads are recorded for itself alone."""
        claims = await authenticated()
        client_uuid = _path_uuid(client_uuid)
        if claims.sub != client_uuid:
            raise Forbidden("a client may set only its own read receipts", code="not_yours")
        body = parse_body(await _json_body(), ReadReceiptsRequest)
        store = services.store
        if store is None or not await store.set_read_receipts(client_uuid, body.enabled):
            raise NotFound(f"no client {client_uuid}", code="unknown_client")
        return {"uuid": client_uuid, "read_receipts": body.enabled}

    @app.delete("/clients/<client_uuid>")
    @api(["clients"], Done, errors=(403, 404), bearer=True)
    async def delete_client(client_uuid: str) -> dict[str, Any]:
        """Delete a client (itself, or any as an admin); its uuid stays taken."""
        claims = await authenticated()
        client_uuid = _path_uuid(client_uuid)
        if claims.sub != client_uuid and not may(claims, "admin"):
            raise Forbidden("a client may delete only itself", code="not_yours")
        await auth.delete_client(client_uuid, actor=claims.sub, source=_source())
        return {"deleted": client_uuid}

    if services.keys is not None:
        _serve_keys(app, services.keys, authenticated, may_read_keys)
    if services.store is not None:
        serve_topics(
            app,
            services.store,
            lambda: services.config.topics,
            authenticated,
            lambda claims: may(claims, "admin"),
            may,
            lambda: auth.now,
            _json_body,
            lambda: services.relay,
            may_read_keys,
        )

    @app.post("/admin/clients/<client_uuid>/revoke")
    @api(["admin"], Done, errors=(403, 404), bearer=True)
    async def revoke_client(client_uuid: str) -> dict[str, Any]:
        """Revoke every token a client holds; its live session is closed (4003)."""
        claims = await admin()
        client_uuid = _path_uuid(client_uuid)
        await auth.revoke_client(client_uuid, actor=claims.sub, source=_source())
        return {"revoked": client_uuid}

    @app.post("/clients/<client_uuid>/secret")
    @api(["auth"], Secret, body=RotateSecretRequest, errors=(401, 403, 404))
    async def rotate_secret(client_uuid: str) -> dict[str, Any]:
        """Rotate a client's secret, proven by the current one or its own token."""
        body = parse_body(await _json_body(), RotateSecretRequest)
        client_uuid = _path_uuid(client_uuid)
        proof = claims = None
        if body.client_secret is not None:
            proof = await auth.prove(client_uuid, body.client_secret, source=_source())
            actor = client_uuid
        else:
            claims = await authenticated()
            if claims.sub != client_uuid:
                raise Forbidden(
                    "a client may rotate only its own secret (an admin resets one:"
                    " POST /admin/clients/{uuid}/reset-secret)",
                    code="not_yours",
                )
            actor = claims.sub
        secret, tokens = await auth.rotate_secret(
            client_uuid,
            revoke_tokens=body.revoke_tokens,
            actor=actor,
            source=_source(),
            proof=proof,
            token=claims,
        )
        answer: dict[str, Any] = {"uuid": client_uuid, "client_secret": secret}
        if tokens is not None:
            answer.update(tokens.to_json(auth.now))
        return answer

    @app.post("/admin/clients/<client_uuid>/reset-secret")
    @api(["admin"], Secret, errors=(403, 404), bearer=True)
    async def reset_secret(client_uuid: str) -> dict[str, Any]:
        """A new secret for a client that lost its own; its tokens are revoked."""
        claims = await admin()
        client_uuid = _path_uuid(client_uuid)
        secret = await auth.reset_secret(client_uuid, actor=claims.sub, source=_source())
        return {"uuid": client_uuid, "client_secret": secret}

    @app.post("/admin/invites")
    @api(["admin"], Invite, body=InviteRequest, errors=(403, 409), bearer=True)
    async def mint_invite() -> dict[str, Any]:
        """Mint a one-time invite code (shown once)."""
        claims = await admin()
        body = parse_body(await _json_body(), InviteRequest)
        code, record = await auth.mint_invite(by=claims.sub, ttl=body.ttl)
        return {"invite": code, **record.to_json()}

    @app.get("/admin/invites")
    @api(["admin"], Invites, errors=(403,), bearer=True)
    async def list_invites() -> dict[str, Any]:
        """Invites: open, spent and by whom."""
        await admin()
        invites = await auth.list_invites()
        return {"count": len(invites), "items": [i.to_json() for i in invites]}

    @app.get("/admin/store-keys")
    @api(["admin"], StoreKeys, errors=(403, 404), bearer=True)
    async def store_keys() -> dict[str, Any]:
        """The ids of the keys encrypting message content at rest, rows per key."""
        await admin()
        store = services.store
        if store is None or store.keys is None:
            raise NotFound("this relayd runs without store keys", code="no_store_keys")
        rows = await store.keys_in_use()
        keys = store.keys
        return {
            "current": keys.current,
            "from": keys.origin,
            "keys": [
                {"id": kid, "current": kid == keys.current, "rows": rows.get(kid, 0)}
                for kid in keys.raw
            ],
            "plain_rows": rows.get(None, 0),
        }

    @app.put("/admin/clients/<client_uuid>/roles")
    @api(["admin"], ClientRoles, body=RolesRequest, errors=(403, 404), bearer=True)
    async def set_roles(client_uuid: str) -> dict[str, Any]:
        """Set a client's roles; they apply at once."""
        claims = await admin()
        body = parse_body(await _json_body(), RolesRequest)
        unknown = [role for role in body.roles if not services.policy.known(role)]
        if unknown:
            raise ValidationError(
                "roles", f"{', '.join(unknown)}: not a role of this relayd ([roles] define)"
            )
        client = await auth.set_roles(
            _path_uuid(client_uuid), body.roles, actor=claims.sub, source=_source()
        )
        online = await _online(services.relay, [client])
        return {**_client_json(client, online), "roles": list(client.roles)}

    @app.get("/messages/<msgid>/status")
    @api(["messages"], MessageStatus, errors=(403, 404), bearer=True)
    async def message_status(msgid: str) -> dict[str, Any]:
        """What became of a message, for its sender or its recipient (seed-compatible)."""
        claims = await authenticated(query_token=True)
        store = services.store
        if store is None or len(msgid) > MAX_MSGID_CHARS:
            raise NotFound("no such message", code="unknown_message")
        record = await store.message_record(msgid, claims.sub)
        relay = services.relay
        if record is not None and record.topic is not None and record.sender == claims.sub:
            return await _published_status(store, record)
        if record is not None:
            told = relay.recent_status(record.sender, msgid) if relay is not None else None
            # The store's final status, else what its sender was last told (the core's view is
            # ahead of the store by at most one deferred commit), else queued.
            status = record.status or (told[1] if told is not None else None) or "queued"
            return {
                "msgid": record.msgid,
                "from": record.sender,
                "to": record.recipient,
                "status": status,
                "final": status in FINAL_STATUSES,
                "reason": record.reason or None,
                "attempts": record.attempts,
                "accepted_at": record.accepted_at,
                "expires_at": record.expires_at,
                "finished_at": record.finished_at,
                "delivered_at": record.delivered_at,
                "read_at": record.read_at,
            }
        if await store.msgid_known(msgid):
            raise Forbidden("only its sender or its recipient may ask", code="not_yours")
        raise NotFound("no such message (or it is older than it is kept)", code="unknown_message")

    @app.post("/messages/<msgid>/read")
    @api(["messages"], Read, errors=(403, 404, 409, 422, 503), bearer=True)
    async def mark_read(msgid: str) -> dict[str, Any]:
        """Mark a message read, as its recipient (a ``read`` frame's twin): its sender gets a
        read receipt unless the caller's read receipts are off. ``?from=`` names the sender
        when two used the same msgid. Seed-style ``?token=`` accepted."""
        claims = await authenticated(query_token=True)
        sender = request.args.get("from")
        if sender is not None:
            sender = _query_uuid(sender, "from")
        relay = services.relay
        if relay is None or len(msgid) > MAX_MSGID_CHARS:
            raise NotFound(refusal(ReadCode.UNKNOWN_MESSAGE), code="unknown_message")
        outcome = await relay.mark_read(claims.sub, msgid, sender)
        if outcome.read_at is None:
            error = _READ_ERRORS[outcome.code]
            raise error(refusal(outcome.code), code=outcome.code.value, details={"msgid": msgid})
        return {
            "msgid": msgid,
            "from": outcome.sender,
            "to": claims.sub,
            "status": outcome.code.value,
            "read_at": outcome.read_at,
        }

    @app.post("/messages")
    @api(
        ["messages"],
        SendReceipt,
        body=OutgoingMessage,
        errors=(403, 404, 503),
        bearer=True,
        success=(200, 202),
    )
    async def send_message() -> Response:
        """Send a message without a socket: the envelope of a WebSocket ``message`` frame, the
        same checks, dedupe and delivery; the answer is its first receipt (202 on its way, 200
        final). It counts against the client's message rate, not ``http.api_per_minute``."""
        claims = await auth.authenticate(_bearer_token())
        if claims.is_operator:
            raise Forbidden("operator tokens cannot send messages", code="not_a_client")
        config = services.config
        doc = await _message_body(min(config.http.max_body_bytes, config.websocket.max_frame_bytes))
        relay = services.relay
        if relay is None:
            raise Unavailable("this relayd relays no messages", code="unavailable")
        deadline = trio.current_time() + config.http.send_timeout
        try:
            receipt = await relay.submit(
                claims.sub, doc, deadline=deadline, max_waiting=config.http.max_pending_sends
            )
        except ProtocolError as exc:
            raise _send_refused(exc) from None
        final = receipt["status"] in FINAL_STATUSES
        response = jsonify(
            {
                "msgid": receipt["msgid"],
                "to": receipt["to"],
                "status": receipt["status"],
                "final": final,
                "timestamp": receipt["timestamp"],
                "message": receipt["message"],
                "reason": receipt.get("reason") or None,
                "duplicate": receipt.get("duplicate", False),
            }
        )
        response.status_code = 200 if final else 202
        return response

    @app.get("/clients/<client_uuid>/undelivered")
    @api(["messages"], Undelivered, errors=(403, 404), bearer=True)
    async def undelivered(client_uuid: str) -> dict[str, Any]:
        """What waits in the store for a client, oldest first; only the client itself (or an
        admin) may ask (seed-compatible)."""
        claims = await authenticated(query_token=True)
        client_uuid = _path_uuid(client_uuid)
        if claims.sub != client_uuid and not may(claims, "admin"):
            raise Forbidden("a client may list only what waits for itself", code="not_yours")
        limit = _limit(request.args.get("limit"))
        store = services.store
        if store is None:
            return {"count": 0, "messages": []}
        count, rows = await store.undelivered(client_uuid, limit)
        messages = [
            {**json.loads(row.fields), "attempts": row.attempts, "accepted_at": row.accepted_at}
            for row in rows
        ]
        return {"count": count, "messages": messages}

    @app.get("/messages/pending")
    @api(["messages"], Pending, errors=(403, 409, 422, 503), bearer=True)
    async def pending() -> dict[str, Any]:
        """Receive over REST: what waits for the client, waiting up to ``wait`` seconds for
        the first (a long poll), at most ``limit``. Each is handed out as on a socket: one
        with ``acknowledge: true`` awaits ``POST /messages/{msgid}/ack`` and is redelivered
        after ``relay.ack_timeout``. Refused (409) while the client's WebSocket is live."""
        claims = await authenticated()
        if claims.is_operator:
            raise Forbidden("an operator token receives no messages", code="not_a_client")
        relay_config = services.config.relay
        wait, limit = _pull_args(
            request.args,
            max_wait=relay_config.pull_max_wait,
            max_limit=relay_config.pull_max_limit,
        )
        relay = services.relay
        if relay is None:
            raise Unavailable("relayd is not relaying", code="unavailable")
        messages = await relay.pull(
            _bearer_token(), claims, remote=_source() or "-", wait=wait, limit=limit
        )
        return {"count": len(messages), "messages": messages}

    @app.post("/messages/<msgid>/ack")
    @api(["messages"], PullAck, errors=(404,), bearer=True)
    async def acknowledge(msgid: str) -> dict[str, Any]:
        """Acknowledge a message a pull handed out (as the ``ack`` frame does on a socket):
        its sender is told ``acknowledged``. 404 ``not_held`` when the client's REST session
        does not hold it unacknowledged."""
        claims = await authenticated()
        relay = services.relay
        if (
            len(msgid) > MAX_MSGID_CHARS
            or relay is None
            or not relay.acknowledge(claims.sub, msgid)
        ):
            raise NotFound(
                "your REST session holds no unacknowledged delivery of this msgid",
                code="not_held",
            )
        return {"msgid": msgid, "status": "acknowledged"}

    @app.get("/messages")
    @api(["messages"], History, errors=(403, 422), bearer=True)
    async def history() -> dict[str, Any]:
        """What a client sent and received, a page at a time (``history.retention`` says for
        how long after its final status a message keeps its content; see docs/protocol.md).
        Query: ``box`` (all, inbox, sent), ``peer``, ``conversation_id``, ``order`` (newest,
        oldest), ``cursor`` (``next_cursor`` of the page before), ``limit``; an admin may
        read another client's with ``client``."""
        claims = await authenticated(query_token=True)
        query = _history_query(request.args, claims.sub, admin=may(claims, "admin"))
        store = services.store
        entries = await store.history(query) if store is not None else []
        full = len(entries) == query.limit
        keeps = services.config.history.retention > 0
        return {
            "count": len(entries),
            "messages": [
                _history_json(_as_told(entry, services.relay, keeps=keeps)) for entry in entries
            ],
            "next_cursor": str(entries[-1].seq) if full else None,
        }

    @app.get("/admin/clients")
    @api(["admin"], AdminClients, errors=(403,), bearer=True)
    async def admin_clients() -> dict[str, Any]:
        """Every client with its roles, online state and queued messages."""
        await admin()
        clients = await auth.list_clients()
        queued = await services.relay.queue_depths() if services.relay is not None else {}
        online = await _online(services.relay, clients)
        return {
            "count": len(clients),
            "items": [
                {
                    **_client_json(c, online),
                    "roles": list(c.roles),
                    "queued": queued.get(c.uuid, 0),
                }
                for c in clients
            ],
        }

    return app
