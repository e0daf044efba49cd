"""Where the Redis engine's server is: the URL forms ``store.url`` accepts, and the coredis
client each one makes.

* ``redis://[[user]:password@]host[:port][/db]``: one server over TCP (port 6379, db 0 by
  default).
* ``rediss://...``: the same over TLS. The server's certificate is checked against the system's
  CAs (or ``?ssl_ca_certs=/path/ca.pem``), and its name against the URL's host
  (``ssl_check_hostname=false`` skips the name); ``ssl_certfile`` and ``ssl_keyfile`` give a
  client certificate; ``ssl_cert_reqs=none`` checks nothing (never in production).
* ``unix:///path/to/redis.sock[?db=N]``: a local server over its Unix socket.
* ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]``: the primary
  of ``service`` as Redis Sentinel names it (sentinels on port 26379 by default), found again
  after a failover. The user and password are the Redis server's; ``?sentinel_password=`` (and
  ``sentinel_username``) authenticate to the sentinels. ``rediss+sentinel://`` speaks TLS to
  both, with the same ``ssl_*`` parameters.

A password is never part of what relayd logs or says in an error: :attr:`Endpoint.where` names
the server without it.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import coredis
from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus
from attrs import field, frozen
from coredis.connection import (
    BaseConnection,
    SentinelManagedConnection,
    TCPConnection,
    TCPLocation,
    UnixDomainSocketConnection,
    UnixDomainSocketLocation,
)
from coredis.pool import ConnectionPool, SentinelConnectionPool
from coredis.retry import NoRetryPolicy

from relayd._errors import ConfigError

SENTINEL_PORT = 26379
REDIS_PORT = 6379
_SSL_PARAMETERS = (
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
)
_DIRECT_SCHEMES = ("redis", "rediss", "unix")
_SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")


class RedisUrlError(ConfigError):
    """``store.url`` is not a Redis URL relayd understands; the message says why."""


@frozen
class Endpoint:
    """A parsed ``store.url``: ``where`` describes it without credentials."""

    where: str
    host: str = ""
    port: int = REDIS_PORT
    path: str = ""  # a Unix socket's
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    tls: bool = False
    ssl: tuple[tuple[str, str], ...] = ()


def _hosts(netloc: str) -> tuple[tuple[str, int], ...]:
    hosts = []
    for item in netloc.rpartition("@")[2].split(","):
        if item.startswith("["):  # an IPv6 address
            host, _, rest = item[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            host, _, port = item.partition(":")
        if not host:
            raise RedisUrlError("store.url: a sentinel's address is empty")
        if port and not port.isdigit():
            raise RedisUrlError(f"store.url: {port!r} is not a port")
        hosts.append((host, int(port) if port else SENTINEL_PORT))
    return tuple(hosts)


def _credentials(netloc: str) -> tuple[str | None, str | None]:
    userinfo, at, _ = netloc.rpartition("@")
    if not at:
        return None, None
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if colon else None)


def parse_url(url: str) -> Endpoint:
    """Check ``url`` and say where it points.

    Raises:
        RedisUrlError: an unknown scheme, a sentinel URL without a service, a bad port or db.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    if scheme in _DIRECT_SCHEMES:
        return _direct(url, scheme, parts.netloc, parts.path, query)
    if scheme in _SENTINEL_SCHEMES:
        return _sentinel(scheme, parts.netloc, parts.path, query)
    known = ", ".join(f"{s}://" for s in _DIRECT_SCHEMES + _SENTINEL_SCHEMES)
    raise RedisUrlError(f"store.url: the scheme {parts.scheme!r} is not one of {known}")


def _db(text: str, where: str) -> int:
    try:
        db = int(text) if text else 0
    except ValueError:
        raise RedisUrlError(f"{where}: the database {text!r} is not a number") from None
    if db < 0:
        raise RedisUrlError(f"{where}: the database {db} is negative")
    return db


def _direct(url: str, scheme: str, netloc: str, path: str, query: dict[str, str]) -> Endpoint:
    username, password = _credentials(netloc)
    ssl = tuple((k, query[k]) for k in _SSL_PARAMETERS if k in query)
    if scheme == "unix":
        db = _db(query.get("db", ""), "store.url")
        where = f"unix://{path}?db={db}"
        return Endpoint(where, path=path, db=db, username=username, password=password)
    host = urlsplit(url).hostname or "localhost"
    try:
        port = urlsplit(url).port or REDIS_PORT
    except ValueError:
        raise RedisUrlError("store.url: the port is not a number") from None
    db = _db(query.get("db", path.strip("/")), "store.url")
    return Endpoint(
        f"{scheme}://{host}:{port}/{db}",
        host=host,
        port=port,
        db=db,
        username=username,
        password=password,
        tls=scheme == "rediss",
        ssl=ssl,
    )


def _sentinel(scheme: str, netloc: str, path: str, query: dict[str, str]) -> Endpoint:
    service, _, db_text = path.strip("/").partition("/")
    if not service:
        raise RedisUrlError(
            "store.url: a Sentinel URL names its service: "
            f"{scheme}://host:{SENTINEL_PORT}[,host:port...]/SERVICE[/db]"
        )
    sentinels = _hosts(netloc)
    db = _db(db_text, "store.url")
    username, password = _credentials(netloc)
    addresses = ",".join(f"{host}:{port}" for host, port in sentinels)
    return Endpoint(
        f"{scheme}://{addresses}/{unquote(service)}/{db}",
        sentinels=sentinels,
        service=unquote(service),
        db=db,
        username=username,
        password=password,
        sentinel_username=query.get("sentinel_username"),
        sentinel_password=query.get("sentinel_password"),
        tls=scheme == "rediss+sentinel",
        ssl=tuple((k, query[k]) for k in _SSL_PARAMETERS if k in query),
    )


def _ssl_context(endpoint: Endpoint) -> ssl.SSLContext:
    """The server's certificate and name are checked unless the URL says otherwise
    (coredis's own default checks neither the name nor, without a CA, much else).

    Raises:
        RedisUrlError: a CA, certificate or key file cannot be read.
    """
    options = dict(endpoint.ssl)
    files = ", ".join(options[k] for k in _SSL_PARAMETERS[:3] if k in options)
    try:
        context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
        if "ssl_certfile" in options:
            context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    except (OSError, ssl.SSLError) as exc:
        raise RedisUrlError(f"store.url: cannot load its TLS files ({files}): {exc}") from None
    if options.get("ssl_check_hostname", "true").lower() in ("false", "no", "0"):
        context.check_hostname = False
    if options.get("ssl_cert_reqs", "required").lower() == "none":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _ClosesBuffers(BaseConnection):
    """coredis 6.9 makes a connection's six in-memory buffers in its constructor and closes
    them only once it has connected: a connection that could not connect (Redis away) leaves
    them to the garbage collector, which warns (``ResourceWarning``) and leaks them until it
    runs. This closes them however the connection ends (closing twice is harmless)."""

    _BUFFERS = (
        "_write_buffer_in",
        "_write_buffer_out",
        "_push_message_buffer_in",
        "_push_message_buffer_out",
        "_streamed_message_buffer_in",
        "_streamed_message_buffer_out",
    )

    async def run(self, *, task_status: TaskStatus[None] = TASK_STATUS_IGNORED) -> None:
        try:
            await super().run(task_status=task_status)
        finally:
            for name in self._BUFFERS:
                getattr(self, name).close()


class _TCPConnection(_ClosesBuffers, TCPConnection):
    pass


class _UnixConnection(_ClosesBuffers, UnixDomainSocketConnection):
    pass


class _SentinelConnection(_ClosesBuffers, SentinelManagedConnection):
    pass


class _SentinelPool(SentinelConnectionPool):
    """Connections to the primary that close their buffers (see :class:`_ClosesBuffers`)."""

    async def _construct_connection(self) -> SentinelManagedConnection:
        location = await self.get_primary_location()
        return _SentinelConnection(
            location, self.service_name, self.is_primary, **self.connection_kwargs
        )


@asynccontextmanager
async def _entered(*clients: Any) -> AsyncIterator[None]:
    """``clients`` with their connection pools open. A pool runs its connections in a task
    group, which would wrap whatever the body raises in an ExceptionGroup (one per pool); the
    body's own exception comes out as it was raised (the connections' tasks raise nothing:
    coredis hands their errors to the calls that were waiting)."""
    try:
        async with AsyncExitStack() as stack:
            for client in clients:
                await stack.enter_async_context(client)
            yield
    except BaseExceptionGroup as group:
        lone: BaseException = group
        while isinstance(lone, BaseExceptionGroup) and len(lone.exceptions) == 1:
            lone = lone.exceptions[0]
        if isinstance(lone, BaseExceptionGroup):
            raise
        raise lone from None


@asynccontextmanager
async def connect(
    endpoint: Endpoint, *, connect_timeout: float
) -> AsyncIterator[coredis.Redis[bytes]]:
    """A coredis client for ``endpoint``, its connection pool open (connections are made on
    first use). coredis retries nothing: a failed call is the store's to report."""
    common: dict[str, Any] = {
        "db": endpoint.db,
        "username": endpoint.username,
        "password": endpoint.password,
        "connect_timeout": connect_timeout,
        "stream_timeout": None,  # each call has the store's own deadline
    }
    if endpoint.tls:
        common["ssl_context"] = _ssl_context(endpoint)
    if not endpoint.sentinels:
        pool: ConnectionPool[Any]
        if endpoint.path:
            location = UnixDomainSocketLocation(endpoint.path)
            pool = ConnectionPool(connection_class=_UnixConnection, location=location, **common)
        else:
            tcp = TCPLocation(endpoint.host, endpoint.port)
            pool = ConnectionPool(connection_class=_TCPConnection, location=tcp, **common)
        client: coredis.Redis[bytes] = coredis.Redis(
            connection_pool=pool, retry_policy=NoRetryPolicy()
        )
        async with _entered(client):
            yield client
        return
    sentinel_options = {
        "connect_timeout": connect_timeout,
        "username": endpoint.sentinel_username,
        "password": endpoint.sentinel_password,
        **({"ssl_context": common["ssl_context"]} if endpoint.tls else {}),
    }
    sentinel: coredis.Sentinel[bytes] = coredis.Sentinel(
        [TCPLocation(host, port) for host, port in endpoint.sentinels],
        sentinel_kwargs=sentinel_options,
        retry_policy=NoRetryPolicy(),
    )
    primary = sentinel.primary_for(endpoint.service, connection_pool_class=_SentinelPool, **common)
    async with _entered(sentinel, primary):
        yield primary
