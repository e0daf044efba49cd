"""Strict, typed configuration: ``relayd.toml``, then ``RELAYD_*`` environment overrides.

Theory of operation:

* Each section is a frozen attrs class whose fields carry their defaults and a docstring; the
  defaults are the *embedded defaults* a fresh checkout runs on, and ``relayd.toml`` at the
  repository root repeats them with a comment per key (a test keeps the two equal).
* A dedicated cattrs converter structures the parsed TOML. It forbids unknown keys and does no
  type coercion: ``listen = 8000`` or ``access_ttl = "15m"`` are errors, and every error names
  the file and the dotted key.
* ``RELAYD_<SECTION>__<KEY>`` (or ``RELAYD_<KEY>`` for top-level keys) overrides one key. The
  string is parsed according to the key's declared type; an override that names no key is an
  error, not a silent no-op.
* Secrets never live in the TOML: see :func:`relayd._auth.load_signing_secret`.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import attrs
import cattrs
from attrs import field, frozen
from cattrs.errors import ForbiddenExtraKeysError

from ._errors import ConfigError
from ._structure import (
    FieldError,
    field_error,
    iter_errors,
    strict_converter,
    strict_scalar,
    strict_strings,
)

ENV_PREFIX = "RELAYD_"
# Environment variables with the prefix that are not config keys.
ENV_RESERVED = frozenset({"RELAYD_CONFIG", "RELAYD_SECRET", "RELAYD_VENV"})

RegistrationPolicy = Literal["open", "closed", "invite"]
Synchronous = Literal["full", "normal"]
EngineName = Literal["sqlite", "redis"]
TopicCreators = Literal["clients", "admins"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
# Browser origins (``https://app.example.com``), or ``"*"`` for any.
Origins = tuple[str, ...]
# Role name -> what it grants (see RolesConfig).
RoleGrants = dict[str, tuple[str, ...]]
ROLE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
PERMISSIONS = ("directory", "admin", "create_topics", "publish", "presence", "broadcast")


def parse_address(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) and check both parts."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r} has no valid port (0-65535)")
    return host, int(port_text)


def _address(_: object, attribute: attrs.Attribute[Any], value: str) -> None:
    try:
        parse_address(value)
    except ValueError as exc:
        raise field_error(attribute, str(exc)) from None


def _optional_address(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value:
        _address(instance, attribute, value)


REDIS_SCHEMES = (
    "redis://",
    "rediss://",
    "redis+sentinel://",
    "rediss+sentinel://",
    "unix://",
)


def _check_redis_url(url: str) -> None:
    # The URL may hold a password: the error names its scheme only.
    if url and not url.startswith(REDIS_SCHEMES):
        scheme = url.partition("://")[0] if "://" in url else "(none)"
        raise ValueError(
            f"url: scheme {scheme!r} is not a Redis URL's: use one of {', '.join(REDIS_SCHEMES)}"
        )


def _positive(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0 or math.isinf(value):
        raise field_error(attribute, f"must be a positive finite number, not {value!r}")


def _non_negative(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0 or math.isinf(value):
        raise field_error(attribute, f"must be zero or a positive finite number, not {value!r}")


def _backlog(_: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 1 <= value <= 65_535:
        raise field_error(attribute, f"must be from 1 to 65535, not {value!r}")


def _origins(_: object, attribute: attrs.Attribute[Any], value: Origins) -> None:
    for origin in value:
        if origin == "*":
            continue
        problem = _origin_problem(origin)
        if problem:
            raise field_error(attribute, f"{origin!r} {problem}")


def _origin_problem(origin: str) -> str | None:
    """Why ``origin`` can never equal an ``Origin`` header a browser sends, or ``None``."""
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return 'is not an origin (scheme://host[:port], or "*")'
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return 'is not an origin (http(s)://host[:port], or "*")'
    if parts.path or parts.query or parts.fragment or "@" in parts.netloc or origin.endswith("/"):
        return "is not an origin: no path, query, user or trailing slash"
    if origin != origin.lower():
        return "must be lowercase, as browsers send it"
    if port == {"http": 80, "https": 443}[parts.scheme]:
        return "names the default port, which browsers leave out"
    return None


def _power_of_two(_: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < 2 or value & (value - 1):
        raise field_error(attribute, f"must be a power of two, not {value!r}")


@frozen(kw_only=True)
class HttpConfig:
    """The HTTP listener: the REST API and the ``/ws`` endpoint share it."""

    listen: str = field(default="127.0.0.1:8000", validator=_address)
    """``host:port`` to listen on; port 0 picks a free port."""
    max_body_bytes: int = field(default=65_536, validator=_positive)
    """Largest request body accepted; larger bodies are answered 413."""
    keep_alive_timeout: float = field(default=5.0, validator=_positive)
    """Seconds an idle keep-alive connection is kept before relayd closes it."""
    request_timeout: float = field(default=30.0, validator=_positive)
    """Seconds a client may take to send a request before the connection is dropped (HTTP
    requests only: a WebSocket on this port is held to ``websocket.heartbeat_timeout``)."""
    register_per_minute: float = field(default=10.0, validator=_positive)
    """Sustained ``POST /register`` rate allowed per source IP."""
    register_burst: int = field(default=10, validator=_positive)
    """``POST /register`` requests a source IP may make at once before the rate applies."""
    auth_per_minute: float = field(default=60.0, validator=_positive)
    """Sustained ``/auth/*`` request rate allowed per source IP."""
    auth_burst: int = field(default=20, validator=_positive)
    """``/auth/*`` requests a source IP may make at once before the rate applies."""
    backlog: int = field(default=4_096, validator=_backlog)
    """Connections each listener (this port, ``metrics.listen``, ``websocket.listen``) holds
    waiting to be accepted; beyond it, a connecting client's SYN is dropped and it retries a
    second or more later. The kernel caps it at ``net.core.somaxconn`` (4096 by default on
    Linux 5.4 and later)."""
    api_per_minute: float = field(default=300.0, validator=_positive)
    """Sustained rate of requests with an access token (``/clients``, ``/admin/*``...) allowed
    per client (the token's ``sub``)."""
    api_burst: int = field(default=60, validator=_positive)
    """Requests with an access token a client may make at once before the rate applies."""
    cors_origins: Origins = field(default=(), validator=_origins)
    """Browser origins whose pages may read REST responses (CORS); ``"*"``: any; empty: none."""
    serve_app: bool = True
    """Serve the browser client under ``/app/`` and admit WebSocket handshakes from the origin
    it was served from (this listener's own address); behind a proxy, list the public origin in
    ``websocket.allowed_origins``. False: no page, and only the listed origins."""
    send_timeout: float = field(default=10.0, validator=_positive)
    """``POST /messages``: seconds a request waits for its message's first receipt; past it,
    the answer is 202 ``accepted`` and the message goes on."""
    max_pending_sends: int = field(default=1_024, validator=_positive)
    """``POST /messages`` requests waiting for their first receipt at once, over all clients;
    beyond it, 503 ``server_busy``."""


@frozen(kw_only=True)
class AuthConfig:
    """Tokens, client secrets and who may register."""

    issuer: str = "relayd"
    """``iss`` claim of issued tokens, checked on every token."""
    audience: str = "relayd"
    """``aud`` claim of issued tokens, checked on every token."""
    access_ttl: float = field(default=900.0, validator=_positive)
    """Lifetime of an access token, in seconds."""
    refresh_ttl: float = field(default=2_592_000.0, validator=_positive)
    """Lifetime of a refresh token (and its rotation family), in seconds."""
    leeway: float = field(default=5.0, validator=_non_negative)
    """Clock skew tolerated when checking ``exp`` and ``nbf``, in seconds."""
    registration: RegistrationPolicy = "open"
    """``open``: anyone may register a client; ``closed``: only an admin token may;
    ``invite``: a one-time invite code an admin minted (or an admin token) is needed."""
    invite_ttl: float = field(default=604_800.0, validator=_positive)
    """Default lifetime of an invite code, in seconds (an admin may ask for less or more)."""
    max_open_invites: int = field(default=1_000, validator=_positive)
    """Invites minted but neither spent nor expired, at most; minting more is refused (409)."""
    secret_file: str = ""
    """File holding the signing secret (``RELAYD_SECRET`` wins; empty: generated in state_dir)."""
    kdf_cost: int = field(default=16_384, validator=_power_of_two)
    """scrypt cost ``n`` for hashing client secrets (a power of two)."""


@frozen(kw_only=True)
class WebsocketConfig:
    """WebSocket sessions: limits, timers and the optional dedicated listener."""

    path: str = "/ws"
    """Path of the WebSocket endpoint on the main HTTP port."""
    listen: str = field(default="", validator=_optional_address)
    """``host:port`` of a dedicated WebSocket listener (faster than the main port); empty: off."""
    allowed_origins: Origins = field(default=(), validator=_origins)
    """Browser origins whose pages may open a WebSocket (others get 403); ``"*"``: any. A
    handshake without an ``Origin`` header (not from a browser) is always allowed."""
    max_frame_bytes: int = field(default=65_536, validator=_positive)
    """Largest inbound frame; a larger one closes the socket with 1009."""
    auth_timeout: float = field(default=10.0, validator=_positive)
    """Seconds a new socket has to authenticate before it is closed with 4001."""
    heartbeat_interval: float = field(default=20.0, validator=_positive)
    """Seconds between pings relayd sends to each client."""
    heartbeat_timeout: float = field(default=60.0, validator=_positive)
    """A client silent (no frame, no pong) this long is closed with 4002 (dropped, on the REST
    port)."""
    write_timeout: float = field(default=10.0, validator=_positive)
    """A client whose socket accepts no data this long is dropped as a slow consumer (with a
    4008 close frame if it reads again within 2 s)."""
    token_warning: float = field(default=60.0, validator=_non_negative)
    """Seconds before its access token expires that a client is told to refresh it."""
    max_connections: int = field(default=10_000, validator=_positive)
    """WebSocket connections that offered a token allowed in total; more are closed (4029)."""
    max_connections_per_ip: int = field(default=1_000, validator=_positive)
    """WebSocket connections that offered a token allowed per source IP; more are closed
    (4029)."""
    max_pending_auth: int = field(default=1_000, validator=_positive)
    """Connections with no token yet (waiting for an ``auth`` frame) allowed at once; past it,
    the oldest of them is closed (4029) to make room."""
    max_pending_auth_per_ip: int = field(default=16, validator=_positive)
    """Connections with no token yet allowed per source IP; past it, the oldest of that
    address's is closed (4029) to make room."""
    outbound_buffer: int = field(default=256, validator=_positive)
    """Frames queued to one client's socket at most; beyond, deliveries wait in its mailbox."""
    read_ahead_bytes: int = field(default=1_048_576, validator=_positive)
    """Bytes of a client's messages held in memory until their first receipt (mostly: until
    they are stored); while more, relayd stops reading the client's socket."""
    messages_per_second: float = field(default=500.0, validator=_positive)
    """Sustained messages a client may send per second."""
    message_burst: int = field(default=1_000, validator=_positive)
    """Messages a client may send at once before messages_per_second applies."""
    max_strikes: int = field(default=20, validator=_positive)
    """Refused frames (rate-limited or invalid) a client may send in a row, one forgiven per
    second, before it is closed with 4029."""


@frozen(kw_only=True)
class RelayConfig:
    """Delivery: acknowledgements, redelivery, queues, expiry, deduplication."""

    ack_timeout: float = field(default=10.0, validator=_positive)
    """Seconds a recipient has to acknowledge an ``acknowledge: true`` message."""
    max_attempts: int = field(default=5, validator=_positive)
    """Deliveries of an unacknowledged message before the sender is told it failed."""
    backoff_initial: float = field(default=1.0, validator=_non_negative)
    """Delay before the first redelivery; it doubles with each attempt."""
    backoff_max: float = field(default=60.0, validator=_non_negative)
    """Longest delay between redeliveries."""
    mailbox_size: int = field(default=128, validator=_positive)
    """Messages held in memory per online recipient; more wait in the store."""
    mailbox_bytes: int = field(default=1_048_576, validator=_positive)
    """Bytes of messages held in memory per online recipient (its mailbox, and its deliveries
    not yet written or acknowledged); more wait in the store."""
    inflight_window: int = field(default=64, validator=_positive)
    """Unacknowledged deliveries per recipient at once; more wait in its mailbox."""
    default_ttl: float = field(default=86_400.0, validator=_positive)
    """Lifetime of a message that gives no ``ttl``; when it passes, the message expires."""
    max_ttl: float = field(default=604_800.0, validator=_positive)
    """Longest ``ttl`` a message may ask for; longer ones are cut to this."""
    max_queued_per_recipient: int = field(default=10_000, validator=_positive)
    """Undelivered messages the store holds per recipient; more are refused (queue_full)."""
    dedupe_window: float = field(default=600.0, validator=_non_negative)
    """Seconds during which a re-sent (from, msgid) is recognised and not delivered twice."""
    dedupe_max_entries: int = field(default=100_000, validator=_positive)
    """Messages remembered in memory for deduplication at most."""
    max_pending_commit: int = field(default=4_096, validator=_positive)
    """Messages accepted but not yet committed; while more, relayd stops reading senders."""
    commit_max_batch: int = field(default=512, validator=_positive)
    """Most operations written in one group commit."""
    sweep_interval: float = field(default=30.0, validator=_positive)
    """Seconds between sweeps for expired messages in the store."""
    pull_idle_timeout: float = field(default=60.0, validator=_positive)
    """Seconds a REST session (``GET /messages/pending``) lives after its last pull ends;
    then it ends, and what it was handed and had not had acknowledged is redelivered."""
    pull_max_wait: float = field(default=30.0, validator=_non_negative)
    """Longest long-poll (``wait``) a pull may ask for; longer ones are cut to this."""
    pull_max_limit: int = field(default=100, validator=_positive)
    """Most messages one pull returns (``limit``); larger ones are cut to this."""
    max_pulls_waiting: int = field(default=1_000, validator=_positive)
    """Pulls in progress at once on this node; more are refused (503 ``too_many_pulls``)."""


@frozen(kw_only=True)
class TlsConfig:
    """TLS on relayd's own listeners (or terminate it in a proxy: contrib/nginx)."""

    cert_file: str = ""
    """PEM certificate chain for the HTTP port, the dedicated WebSocket listener and the metrics
    listener; empty: plain HTTP and WebSocket."""
    key_file: str = ""
    """PEM private key for ``cert_file``."""

    def __attrs_post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise FieldError("key_file" if self.cert_file else "cert_file", "give both or neither")

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


@frozen(kw_only=True)
class MetricsConfig:
    """The Prometheus endpoint."""

    listen: str = field(default="", validator=_optional_address)
    """``host:port`` serving ``GET /metrics`` alone, so it need not face clients; empty:
    ``/metrics`` is served on the HTTP port."""


@frozen(kw_only=True)
class StoreConfig:
    """Where relayd keeps its state: the embedded SQLite store, or Redis/Valkey (cluster
    mode)."""

    engine: EngineName = "sqlite"
    """``sqlite``: one node, its state in a file under ``state_dir``. ``redis``: any number
    of nodes sharing one Redis 7+ or Valkey 8+ server at ``url`` (docs/operations.md)."""
    url: str = field(default="", validator=lambda _, __, v: _check_redis_url(v))
    """With ``engine = "redis"``: ``redis://[user:password@]host:port/db``, ``rediss://``
    (TLS), or ``redis+sentinel://host:port[,host:port...]/service[/db]`` (docs/operations.md).
    Empty: ``redis://127.0.0.1:6379/0``."""
    prefix: str = "relayd:"
    """With ``engine = "redis"``: every key relayd keeps starts with this (several relayd
    clusters can share one server)."""
    timeout: float = field(default=2.0, validator=_positive)
    """With ``engine = "redis"``: seconds a call to Redis may take before it fails."""
    lease: float = field(default=10.0, validator=_positive)
    """With ``engine = "redis"``: a node that could not reach Redis for this long closes
    every session (1013), since other nodes may have taken its clients. The other nodes
    notice a node that died within this long and a third: they then look in the store for
    what it may not have announced to them."""
    wait_replicas: int = field(default=0, validator=_non_negative)
    """With ``engine = "redis"``: after each write, wait until this many replicas have it
    (``WAIT``) before any receipt or answer reports it; 0: the primary's word is enough."""
    wait_timeout: float = field(default=1.0, validator=_positive)
    """With ``wait_replicas``: seconds to wait for them, after which the write counts as
    failed (``store_unavailable``; it stays on the primary)."""
    path: str = "relayd.sqlite3"
    """Database file, relative to ``state_dir``; ``:memory:`` keeps everything in memory."""
    synchronous: Synchronous = "full"
    """``full`` survives power loss; ``normal`` survives a process crash but may lose the
    last commits on power loss (see docs/operations.md)."""
    key_file: str = ""
    """File holding the keys that encrypt message content at rest. Empty: the systemd
    credential ``relayd-store-keys`` if there is one, else ``state_dir/store-keys``, generated
    on first start."""

    def __attrs_post_init__(self) -> None:
        # A node fences itself two thirds of a lease after its last renewal; renewals every
        # third of it must be able to fail in time for that.
        if self.lease < 3 * self.timeout:
            raise FieldError("lease", f"must be at least 3 times timeout ({3 * self.timeout} s)")


def _check_roles(instance: RolesConfig, _: attrs.Attribute[Any], define: RoleGrants) -> None:
    for role, grants in define.items():
        if not ROLE_NAME.fullmatch(role):
            raise ValueError(f"define: {role!r}: a role name is 1-32 of a-z, 0-9, _ and -")
        for grant in grants:
            kind, sep, target = grant.partition(":")
            if not sep and grant in PERMISSIONS:
                continue
            if kind == "message" and (target == "*" or target in define):
                continue
            if kind == "inherit" and target in define and target != role:
                continue
            raise ValueError(
                f"define.{role}: {grant!r} is not a grant: use one of {', '.join(PERMISSIONS)},"
                " message:<role> or message:*, inherit:<role> (roles defined here)"
            )
    seen: set[str] = set()

    def visit(role: str, path: tuple[str, ...]) -> None:
        if role in path:
            raise ValueError(f"define: roles inherit in a circle: {' > '.join((*path, role))}")
        if role in seen:
            return
        for grant in define[role]:
            if grant.startswith("inherit:"):
                visit(grant.removeprefix("inherit:"), (*path, role))
        seen.add(role)

    for role in define:
        visit(role, ())
    if instance.default not in define:
        raise ValueError(f"default: {instance.default!r} is not a role defined in define")


@frozen(kw_only=True)
class RolesConfig:
    """Roles and what they permit. ``define`` maps each role to its grants: ``directory``
    (read the client directory), ``admin`` (the admin API, and every other grant),
    ``create_topics``, ``publish`` (in topics), ``presence`` (read a topic's presence),
    ``broadcast`` (to every client), ``message:<role>`` (message clients that hold that role;
    ``message:*``: anyone), ``inherit:<role>`` (everything that role grants)."""

    default: str = "client"
    """The role a client gets when it registers."""
    define: RoleGrants = field(
        factory=lambda: {
            "client": ("message:*", "directory", "create_topics", "publish", "presence"),
            "admin": ("inherit:client", "admin"),
        },
        validator=_check_roles,
    )
    """Each role and its grants (a TOML inline table)."""


@frozen(kw_only=True)
class LogConfig:
    """Logging to stderr (journald picks it up under systemd)."""

    level: LogLevel = "info"
    """Lowest level logged: debug, info, warning or error."""
    format: LogFormat = "text"
    """``text`` for people, ``json`` for log pipelines."""


@frozen(kw_only=True)
class HistoryConfig:
    """What relayd keeps of messages once their status is final (``GET /messages``)."""

    retention: float = field(default=0.0, validator=_non_negative)
    """Seconds a message keeps its content after its last delivery's final status; then it
    is erased, and the message leaves history. 0 (the default) keeps no content past the
    final status (history then shows what still waits, and the records of messages no older
    than ``relay.dedupe_window``). When not 0, at least ``relay.dedupe_window``."""


@frozen(kw_only=True)
class TopicsConfig:
    """Topics (rooms): who may create them, their limits, their history, their receipts."""

    create: TopicCreators = "clients"
    """Who may create topics: any client (``clients``) or admins only (``admins``)."""
    max_owned: int = field(default=100, validator=_positive)
    """Topics one client may own."""
    max_subscriptions: int = field(default=1000, validator=_positive)
    """Topics one client may subscribe to."""
    max_subscribers: int = field(default=10_000, validator=_positive)
    """Subscribers one topic may have."""
    history_count: int = field(default=100, validator=_non_negative)
    """Messages a new topic keeps in its history, unless its creator asks for another count."""
    history_age: float = field(default=86_400.0, validator=_positive)
    """Seconds a new topic keeps a message in its history, unless its creator asks otherwise."""
    max_history_count: int = field(default=10_000, validator=_non_negative)
    """The most messages any topic may keep (a creator may ask for up to this)."""
    max_history_age: float = field(default=2_592_000.0, validator=_positive)
    """The longest any topic may keep a message (30 days by default)."""
    update_interval: float = field(default=1.0, validator=_positive)
    """Seconds between two ``topic_update`` frames about one published message, at least."""
    max_watched: int = field(default=100, validator=_non_negative)
    """Published messages one connection is sent ``topic_update`` frames about at once (the
    oldest stops first; 0: none)."""
    presence_interval: float = field(default=1.0, validator=_positive)
    """Seconds between two ``presence`` frames about one topic to one connection, at least."""
    max_presence_events: int = field(default=100, validator=_positive)
    """Events one ``presence`` frame carries at most (beyond: ``truncated``)."""
    typing_interval: float = field(default=1.0, validator=_non_negative)
    """A client's ``typing`` frames to one client or topic closer than this are dropped."""
    broadcast_durable: bool = False
    """A broadcast (admins only) is also stored for every client offline when it is sent, and
    delivered when it connects (false: it goes to the live sockets only, at most once)."""
    anonymous_read: bool = True
    """``GET /topics`` and ``GET /topics/{topic_id}`` answer without a token, as the seed
    system's did, showing open topics only and no subscriber ids (false: a token is needed)."""

    def __attrs_post_init__(self) -> None:
        if self.history_count > self.max_history_count:
            raise ValueError("topics.history_count: must be at most topics.max_history_count")
        if self.history_age > self.max_history_age:
            raise ValueError("topics.history_age: must be at most topics.max_history_age")


@frozen(kw_only=True)
class Config:
    """relayd's whole configuration."""

    state_dir: str = "./var"
    """Directory for the store and the generated signing secret; created if missing."""
    drain_timeout: float = field(default=10.0, validator=_positive)
    """On SIGTERM/SIGINT, seconds given to open connections to finish before they are cut."""
    http: HttpConfig = field(factory=HttpConfig)
    websocket: WebsocketConfig = field(factory=WebsocketConfig)
    relay: RelayConfig = field(factory=RelayConfig)
    auth: AuthConfig = field(factory=AuthConfig)
    store: StoreConfig = field(factory=StoreConfig)
    metrics: MetricsConfig = field(factory=MetricsConfig)
    tls: TlsConfig = field(factory=TlsConfig)
    log: LogConfig = field(factory=LogConfig)
    roles: RolesConfig = field(factory=RolesConfig)
    history: HistoryConfig = field(factory=HistoryConfig)
    topics: TopicsConfig = field(factory=TopicsConfig)

    def __attrs_post_init__(self) -> None:
        # A message's record outlives its content by relay.dedupe_window at least (it is
        # deduplication's memory); content kept for less would need a sweep of its own.
        retention, window = self.history.retention, self.relay.dedupe_window
        if 0 < retention < window:
            raise ValueError(
                f"history.retention: must be 0 or at least relay.dedupe_window ({window:g} s)"
            )

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def store_path(self) -> str:
        """The database path SQLite opens: ``:memory:`` or a file under ``state_dir``."""
        if self.store.path == ":memory:":
            return ":memory:"
        return str(self.state_path / self.store.path)


# --- structuring --------------------------------------------------------------------------------


_converter = strict_converter(forbid_extra_keys=True)


def _structure_origins(value: Any, _: Any) -> Origins:
    return strict_strings(value)


_converter.register_structure_hook_func(lambda kind: kind == Origins, _structure_origins)


def _structure_grants(value: Any, _: Any) -> RoleGrants:
    if not isinstance(value, dict):
        raise TypeError(f"must be a table of roles, not {type(value).__name__}")
    grants: RoleGrants = {}
    for role, items in value.items():
        try:
            grants[strict_scalar(role, str)] = strict_strings(items, "grants")
        except TypeError as exc:
            raise TypeError(f"{role}: {exc}") from None
    return grants


_converter.register_structure_hook_func(lambda kind: kind == RoleGrants, _structure_grants)


def _describe(path: str, exc: BaseException) -> list[str]:
    if isinstance(exc, ForbiddenExtraKeysError):
        known = [a.name for a in attrs.fields(exc.cl)]
        lines = []
        for extra in sorted(exc.extra_fields):
            hint = difflib.get_close_matches(extra, known, n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            lines.append(f"{path + '.' if path else ''}{extra}: unknown key{suggestion}")
        return lines
    if isinstance(exc, KeyError):
        return [f"{path}: required"]
    return [f"{path or '(top level)'}: {exc}"]


def structure(data: Mapping[str, Any], source: str) -> Config:
    """Build a :class:`Config` from parsed TOML, naming ``source`` and the key in any error."""
    for section in attrs.fields(Config):
        if attrs.has(_field_type(Config, section.name)) and not isinstance(
            data.get(section.name, {}), dict
        ):
            raise ConfigError(f"{source}: {section.name}: must be a table ([{section.name}])")
    try:
        return _converter.structure(dict(data), Config)
    except cattrs.BaseValidationError as exc:
        messages = [m for path, leaf in iter_errors(exc) for m in _describe(path, leaf)]
    except (ValueError, TypeError) as exc:
        messages = [str(exc)]
    raise ConfigError("\n".join(f"{source}: {m}" for m in messages))


# --- environment overrides ----------------------------------------------------------------------


def _field_type(cls: type[Any], name: str) -> Any:
    hints = typing.get_type_hints(cls)
    return hints.get(name)


def _parse_env_value(raw: str, kind: Any, var: str) -> Any:
    origin = typing.get_origin(kind)
    if origin is Literal:
        return raw
    if kind is str:
        return raw
    if kind == Origins:
        return _parse_env_list(raw, var)
    if kind == RoleGrants:
        return _parse_env_json(raw, var, dict, "a JSON object")
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{var}: expected a boolean (true/false), got {raw!r}")
    try:
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError:
        raise ConfigError(f"{var}: expected {kind.__name__}, got {raw!r}") from None
    raise ConfigError(f"{var}: this key cannot be set from the environment")


def _parse_env_list(raw: str, var: str) -> list[Any]:
    """A JSON array (``["https://a.example"]``) or a comma-separated list (``a,b``)."""
    if raw.lstrip().startswith("["):
        value: list[Any] = _parse_env_json(raw, var, list, "a JSON array")
        return value
    return [item.strip() for item in raw.split(",") if item.strip()]


def _parse_env_json(raw: str, var: str, kind: type[Any], what: str) -> Any:
    try:
        value = json.loads(raw)
    except ValueError:
        raise ConfigError(f"{var}: expected {what}, got {raw!r}") from None
    if not isinstance(value, kind):
        raise ConfigError(f"{var}: expected {what}, got {raw!r}")
    return value


def apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Return ``data`` with every ``RELAYD_*`` override applied (``data`` is not modified)."""
    merged: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    sections = {a.name for a in attrs.fields(Config) if attrs.has(_field_type(Config, a.name))}
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or var in ENV_RESERVED:
            continue
        raw = environ[var]
        name = var.removeprefix(ENV_PREFIX).lower()
        section, sep, key = name.partition("__")
        if sep:
            section_cls = _field_type(Config, section) if section in sections else None
            kind = _field_type(section_cls, key) if section_cls is not None else None
            if kind is None:
                raise ConfigError(f"{var}: no config key {section}.{key}")
            target = merged.setdefault(section, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{var}: {section} is not a table in the config file")
            target[key] = _parse_env_value(raw, kind, var)
        else:
            kind = _field_type(Config, section)
            if kind is None or section in sections:
                raise ConfigError(f"{var}: no top-level config key {section}")
            merged[section] = _parse_env_value(raw, kind, var)
    return merged


# --- loading ------------------------------------------------------------------------------------

DEFAULT_CONFIG_FILE = "relayd.toml"


def resolve_config_path(explicit: str | None, environ: Mapping[str, str]) -> Path | None:
    """``--config``, else ``$RELAYD_CONFIG``, else ``./relayd.toml`` if present, else none."""
    if explicit:
        return Path(explicit)
    if environ.get("RELAYD_CONFIG"):
        return Path(environ["RELAYD_CONFIG"])
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.exists() else None


def load_config(
    path: str | os.PathLike[str] | None = None, *, environ: Mapping[str, str] | None = None
) -> Config:
    """Read the config file (if any), apply environment overrides and validate everything.

    Raises:
        ConfigError: the file is missing or unreadable, is not valid TOML, or a key is unknown,
            of the wrong type or out of range. The message names the file and the key.
    """
    env = os.environ if environ is None else environ
    config_path = resolve_config_path(None if path is None else os.fspath(path), env)
    data: dict[str, Any] = {}
    source = "<defaults>"
    if config_path is not None:
        source = str(config_path)
        try:
            with open(config_path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{source}: no such file") from None
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    overridden = apply_env(data, env)
    if overridden != data:
        source += " (with RELAYD_* overrides)"
    return structure(overridden, source)


# Keys a reload (SIGHUP) applies to the running daemon; a change to any other key is logged
# as needing a restart.
RELOADABLE = frozenset(
    {
        "log.level",
        "log.format",
        "auth.registration",
        "http.register_per_minute",
        "http.register_burst",
        "http.auth_per_minute",
        "http.auth_burst",
        "http.api_per_minute",
        "http.api_burst",
        "http.cors_origins",
        "websocket.allowed_origins",
        "websocket.max_connections",
        "websocket.max_connections_per_ip",
        "websocket.max_pending_auth",
        "websocket.max_pending_auth_per_ip",
        "websocket.messages_per_second",
        "websocket.message_burst",
        "websocket.max_strikes",
        "websocket.auth_timeout",
        "websocket.write_timeout",
        "websocket.token_warning",
        "topics.create",
        "topics.max_owned",
        "topics.max_subscriptions",
        "topics.max_subscribers",
        "topics.history_count",
        "topics.history_age",
        "topics.max_history_count",
        "topics.max_history_age",
        "topics.anonymous_read",
        "topics.presence_interval",
        "topics.max_presence_events",
        "topics.typing_interval",
        "topics.broadcast_durable",
        "relay.ack_timeout",
        "relay.max_attempts",
        "relay.backoff_initial",
        "relay.backoff_max",
        "relay.default_ttl",
        "relay.max_ttl",
        "relay.max_queued_per_recipient",
        "history.retention",
    }
)


def changed_keys(old: Config, new: Config) -> list[str]:
    """The dotted keys whose values differ between two configs."""
    before, after = unstructure(old), unstructure(new)
    keys = []
    for name, value in after.items():
        if isinstance(value, dict):
            keys += [f"{name}.{k}" for k, v in value.items() if before[name][k] != v]
        elif before[name] != value:
            keys.append(name)
    return keys


def with_keys(base: Config, source: Config, keys: list[str]) -> Config:
    """``base`` with the values of ``keys`` taken from ``source``."""
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key in keys:
        section, _, name = key.partition(".")
        if name:
            sections.setdefault(section, {})[name] = getattr(getattr(source, section), name)
        else:
            top[section] = getattr(source, section)
    for section, values in sections.items():
        top[section] = attrs.evolve(getattr(base, section), **values)
    return attrs.evolve(base, **top)


def unstructure(config: Config) -> dict[str, Any]:
    result: dict[str, Any] = _converter.unstructure(config)
    return result


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # A JSON string is a TOML basic string, but for DEL, which TOML wants escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):  # role names are bare keys (ROLE_NAME)
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def to_toml(config: Config) -> str:
    """Render the effective config as TOML, the way ``relayd check-config`` prints it."""
    data = unstructure(config)
    top = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    lines = [*top]
    for section, values in data.items():
        if isinstance(values, dict):
            lines.append(f"\n[{section}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
    return "\n".join(lines) + "\n"
