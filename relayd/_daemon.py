"""The daemon: one root nursery owns the store, the HTTP server and the housekeeping.

Start-up is in order: the signing secret, the store (migrated), the services, then the
listeners; ``task_status.started`` reports the bound addresses only when every listener is up.
Shutdown is the reverse and bounded by ``drain_timeout``: readiness turns 503 and the
listeners stop accepting; the hub tells every session and closes it with 1001 once its
queued frames are written, cutting those that lag as the deadline nears, and flushes the
store; in-flight HTTP requests finish; then what is left is cancelled and the store closes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import ssl
import time
from collections.abc import Callable, Mapping
from functools import partial

import trio
from attrs import frozen
from hypercorn.config import Config as HypercornConfig

from ._asgi import Dispatcher, metrics_app, serve_http
from ._atrest import KeyFileError, load_store_keys
from ._auth import AuthService, load_signing_secret
from ._config import RELOADABLE, Config, TlsConfig, changed_keys, with_keys
from ._engine import Engine, open_cluster, open_engine
from ._errors import ConfigError
from ._http import Readiness, Services, create_app
from ._hypercorn import hypercorn_config, install_hooks, set_write_timeout, writes_bounded
from ._keys import KeyDirectory
from ._lock import StateLock
from ._log import configure as configure_logging
from ._metrics import CONTENT_TYPE, HttpStats, Metrics
from ._relay.hub import Hub
from ._relay.listeners import asgi_websocket_app
from ._relay.wsserver import serve_dedicated
from ._roles import RolePolicy
from ._store import Executor, thread_executor
from ._systemd import Notifier
from ._tokens import TokenCodec

log = logging.getLogger("relayd")

HOUSEKEEPING_INTERVAL = 3600.0
# glibc keeps freed memory for reuse rather than give it back: after a burst (big messages,
# slow consumers), RSS would stay at its peak. Every so often it is asked to give back what it
# can (~a millisecond, in a worker thread).
MEMORY_TRIM_INTERVAL = 30.0


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` on another C library."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


MALLOC_TRIM = _malloc_trim()


@frozen
class Addresses:
    """Where a running daemon listens."""

    http: tuple[str, int]
    websocket: tuple[str, int] | None = None
    metrics: tuple[str, int] | None = None
    tls: bool = False

    @property
    def http_url(self) -> str:
        return _url("https" if self.tls else "http", self.http)

    @property
    def websocket_url(self) -> str:
        """The dedicated WebSocket listener, else ``/ws`` on the HTTP port."""
        scheme = "wss" if self.tls else "ws"
        return _url(scheme, self.websocket or self.http) + "/ws"


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """The server side of TLS, or ``None`` when it is off.

    Raises:
        ConfigError: the certificate or key cannot be loaded.
    """
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"tls: cannot load {tls.cert_file} / {tls.key_file}: {exc.strerror or exc}"
        ) from None
    return context


def _url(scheme: str, address: tuple[str, int]) -> str:
    host, port = address
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


class Daemon:
    """relayd as a whole. ``await nursery.start(daemon.run)``; :meth:`stop` to drain and exit.

    ``clock`` is the wall clock that token times are checked against and ``store_executor``
    runs SQLite calls: tests replace both to run under Trio's fake clock.

    ``reuse_port``: every listener is bound with ``SO_REUSEPORT``, so that other processes
    that do too share its port (the workers of ``relayd serve --workers``, or several nodes
    started by hand). ``worker``: this process is that worker of ``relayd serve --workers``;
    every HTTP response and WebSocket handshake answer says so (``Relayd-Worker``).
    """

    def __init__(
        self,
        config: Config,
        *,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        store_executor: Executor = thread_executor,
        reuse_port: bool = False,
        worker: int | None = None,
    ) -> None:
        self.config = config
        self._reuse_port = reuse_port
        self._worker = worker
        self._environ = os.environ if environ is None else environ
        self._clock = clock
        self._store_executor = store_executor
        self._stop_requested = trio.Event()
        self._notifier = Notifier(self._environ)
        self.services: Services | None = None
        self.hub: Hub | None = None
        self._store: Engine | None = None
        self._http_config: HypercornConfig | None = None

    def stop(self) -> None:
        """Begin a graceful shutdown. Safe to call more than once, or before ``run``."""
        self._stop_requested.set()

    def reload(self, new: Config) -> tuple[list[str], list[str]]:
        """Apply what can change safely from ``new`` (see ``RELOADABLE``) to the running
        daemon; return the keys applied and the changed keys that need a restart."""
        changed = changed_keys(self.config, new)
        applied = [key for key in changed if key in RELOADABLE]
        restart = [key for key in changed if key not in RELOADABLE]
        self._notifier.reloading()
        config = self.config = with_keys(self.config, new, applied)
        configure_logging(config.log.level, config.log.format)
        if self.services is not None:
            self.services.reconfigure(config)
        if self.hub is not None:
            self.hub.core.reconfigure(
                config.relay, config.websocket, config.history.retention, config.topics
            )
        if self._http_config is not None:
            set_write_timeout(self._http_config, config.websocket.write_timeout)
        self._reload_store_keys()
        log.info(
            "config reloaded",
            extra={"fields": {"applied": ",".join(applied), "needs_restart": ",".join(restart)}},
        )
        if restart:
            log.warning("these changes need a restart to apply: %s", ", ".join(restart))
        self._notifier.ready("reloaded")
        return applied, restart

    def _reload_store_keys(self) -> None:
        """Read the store key file again: new keys are added, the first one encrypts from now
        on, keys no longer listed still decrypt until the next start. A file that cannot be
        used changes nothing (logged)."""
        store = self._store
        if store is None or store.keys is None:
            return
        try:
            store.keys = store.keys.merged(
                load_store_keys(self.config, self._environ, generate=False)
            )
        except KeyFileError as exc:
            log.error("store keys not reloaded: %s", exc)
            return
        log.info("store keys reloaded", extra={"fields": {"current": store.keys.current}})

    async def run(
        self, *, task_status: trio.TaskStatus[Addresses] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until :meth:`stop` is called, then drain and return.

        The state directory's lock (``state_dir/relayd.lock``) is held from before anything in
        it is read or written until the store is closed, and released on any exit.

        Raises:
            StateDirLocked: another relayd holds the state directory; the error names it.
            ConfigError: the state directory or the signing secret is unusable.
            StoreError: the store cannot be opened or migrated.
        """
        config = self.config
        try:
            config.state_path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"state_dir: cannot create {config.state_dir}: {exc.strerror}"
            ) from None
        if config.store.engine == "redis":
            # Nodes share the store through Redis, and may share a state directory (its
            # signing secret and store keys): no lock on it.
            await self._run_locked(task_status)
            return
        with StateLock.acquire(config.state_path, command="serve"):
            await self._run_locked(task_status)

    async def _run_locked(self, task_status: trio.TaskStatus[Addresses]) -> None:
        config = self.config
        server_ssl_context(config.tls)  # a bad certificate or key stops relayd here
        secret, origin = load_signing_secret(config, self._environ)
        assert secret is not None
        log.info("signing secret loaded", extra={"fields": {"from": origin}})
        keys = load_store_keys(config, self._environ)
        log.info(
            "store keys loaded",
            extra={"fields": {"from": keys.origin, "current": keys.current}},
        )
        async with (
            open_engine(config, keys=keys, executor=self._store_executor) as store,
            open_cluster(config) as cluster,
        ):
            self._store = store
            codec = TokenCodec(
                secret,
                issuer=config.auth.issuer,
                audience=config.auth.audience,
                leeway=config.auth.leeway,
                clock=self._clock,
            )
            auth = AuthService(store, codec, config.auth, default_roles=(config.roles.default,))
            await auth.load()
            hub = self.hub = await Hub.open(config, store, auth, clock=self._clock, cluster=cluster)
            key_directory = KeyDirectory(store, clock=self._clock)
            key_directory.subscribe(hub.keys_changed)
            http_stats = HttpStats()
            metrics = Metrics(
                hub.core,
                http_stats,
                stored=store.queued_total,
                store_ops=lambda: hub.store_backlog,
                authenticated=auth.authenticated,
            )
            services = self.services = Services(
                config,
                auth,
                relay=hub,
                metrics=None if config.metrics.listen else metrics,
                stats=http_stats,
                store=store,
                policy=RolePolicy.from_config(config.roles),
                keys=key_directory,
            )
            # Hooked into hypercorn here, before serving: the app needs to know whether they hold.
            install_hooks()
            app = Dispatcher(
                create_app(services),
                websocket_app=asgi_websocket_app(
                    hub, bounded_writes=writes_bounded(), admit_own_origin=config.http.serve_app
                ),
                websocket_path=config.websocket.path,
            )
            http_shutdown = trio.Event()
            async with trio.open_nursery() as nursery:
                await nursery.start(hub.run)
                if cluster is not None:
                    await nursery.start(cluster.run, hub)
                    log.info("cluster node up", extra={"fields": {"node": cluster.node}})
                graceful = config.drain_timeout
                self._http_config = hypercorn_config(
                    config,
                    graceful_timeout=graceful,
                    slow_consumer_drops=hub.core.metrics.slow_consumer_drops,
                    reuse_port=self._reuse_port,
                    worker=self._worker,
                )
                http = await nursery.start(
                    partial(serve_http, app, self._http_config, shutdown=http_shutdown)
                )
                metrics_address = None
                if config.metrics.listen:
                    metrics_address = await nursery.start(
                        partial(
                            serve_http,
                            metrics_app(metrics.render, CONTENT_TYPE),
                            hypercorn_config(
                                config,
                                graceful_timeout=graceful,
                                bind=config.metrics.listen,
                                reuse_port=self._reuse_port,
                                worker=self._worker,
                            ),
                            shutdown=http_shutdown,
                        )
                    )
                dedicated = trio.CancelScope()
                websocket = None
                if config.websocket.listen:
                    websocket = await nursery.start(self._serve_dedicated, hub, dedicated)
                addresses = Addresses(
                    http=http, websocket=websocket, metrics=metrics_address, tls=config.tls.enabled
                )
                nursery.start_soon(self._housekeeping, auth)
                nursery.start_soon(self._return_memory)
                nursery.start_soon(self._notifier.watchdog)
                services.readiness = Readiness.READY
                log.info(
                    "relayd ready",
                    extra={"fields": {"http": addresses.http_url, "ws": addresses.websocket_url}},
                )
                self._notifier.ready(f"serving on {addresses.http_url}")
                task_status.started(addresses)

                await self._stop_requested.wait()
                draining_since = trio.current_time()
                deadline = draining_since + config.drain_timeout
                log.info("draining", extra={"fields": {"deadline_s": config.drain_timeout}})
                self._notifier.stopping("draining")
                services.readiness = Readiness.DRAINING
                dedicated.cancel()
                http_shutdown.set()
                await hub.shutdown(deadline)
                with trio.move_on_at(deadline):
                    await app.wait_idle()
                # Every session and request is done, or out of time. What hypercorn still
                # holds is idle: connections closing, and the ping timers of closed
                # websockets, which would keep it waiting up to heartbeat_interval each.
                nursery.cancel_scope.cancel()
            drain_s = round(trio.current_time() - draining_since, 3)
        log.info("relayd stopped", extra={"fields": {"drain_s": drain_s}})

    async def _serve_dedicated(
        self,
        hub: Hub,
        scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with scope:
            await serve_dedicated(
                hub,
                self.config.websocket,
                ssl_context=server_ssl_context(self.config.tls),
                backlog=self.config.http.backlog,
                reuse_port=self._reuse_port,
                worker=self._worker,
                task_status=task_status,
            )

    async def _return_memory(
        self,
        *,
        interval: float = MEMORY_TRIM_INTERVAL,
        trim: Callable[[int], int] | None = MALLOC_TRIM,
        executor: Executor = thread_executor,
    ) -> None:
        """Give freed memory back to the system every ``interval`` seconds (glibc only), off
        the event loop. Returns as soon as a stop is requested."""
        if trim is None:
            return
        while True:
            with trio.move_on_after(interval):
                await self._stop_requested.wait()
            if self._stop_requested.is_set():
                return
            await executor(trim, 0)

    async def _housekeeping(
        self, auth: AuthService, *, interval: float = HOUSEKEEPING_INTERVAL
    ) -> None:
        """Purge what can no longer matter: expired refresh families and revoked jtis.

        Returns as soon as a stop is requested: it has nothing to finish.
        """
        while True:
            with trio.move_on_after(interval):
                await self._stop_requested.wait()
            if self._stop_requested.is_set():
                return
            purged = await auth.purge()
            if purged:
                log.info("purged expired refresh families", extra={"fields": {"count": purged}})
