"""The daemon: one root nursery owns the store, the HTTP server and the housekeeping.

Start-up is in order: the signing secret, the store (migrated), the services, then the
listeners; ``task_status.started`` reports the bound addresses only when every listener is up.
Shutdown is the reverse and bounded: readiness turns 503, the listeners stop accepting and
give open connections ``drain_timeout`` seconds, then the store closes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from functools import partial

import trio
from attrs import frozen

from ._asgi import Dispatcher, hypercorn_config, serve_http
from ._auth import AuthService, load_signing_secret
from ._config import Config
from ._errors import ConfigError
from ._http import Readiness, Services, create_app
from ._store import Executor, Store, thread_executor
from ._tokens import TokenCodec

log = logging.getLogger("relayd")

HOUSEKEEPING_INTERVAL = 3600.0


@frozen
class Addresses:
    """Where a running daemon listens."""

    http: tuple[str, int]

    @property
    def http_url(self) -> str:
        host, port = self.http
        return f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"


class Daemon:
    """relayd as a whole. ``await nursery.start(daemon.run)``; :meth:`stop` to drain and exit.

    ``clock`` is the wall clock that token times are checked against and ``store_executor``
    runs SQLite calls: tests replace both to run under Trio's fake clock.
    """

    def __init__(
        self,
        config: Config,
        *,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        store_executor: Executor = thread_executor,
    ) -> None:
        self.config = config
        self._environ = os.environ if environ is None else environ
        self._clock = clock
        self._store_executor = store_executor
        self._stop_requested = trio.Event()
        self.services: Services | None = None

    def stop(self) -> None:
        """Begin a graceful shutdown. Safe to call more than once, or before ``run``."""
        self._stop_requested.set()

    async def run(
        self, *, task_status: trio.TaskStatus[Addresses] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until :meth:`stop` is called, then drain and return.

        Raises:
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
        secret, origin = load_signing_secret(config, self._environ)
        assert secret is not None
        log.info("signing secret loaded", extra={"fields": {"from": origin}})
        async with Store.open(
            config.store_path, synchronous=config.store.synchronous, executor=self._store_executor
        ) as store:
            codec = TokenCodec(
                secret,
                issuer=config.auth.issuer,
                audience=config.auth.audience,
                leeway=config.auth.leeway,
                clock=self._clock,
            )
            auth = AuthService(store, codec, config.auth)
            await auth.load()
            services = self.services = Services(config, auth)
            app = Dispatcher(create_app(services))
            http_shutdown = trio.Event()
            async with trio.open_nursery() as nursery:
                http = await nursery.start(
                    partial(
                        serve_http,
                        app,
                        hypercorn_config(config.http, graceful_timeout=config.drain_timeout),
                        shutdown=http_shutdown,
                    )
                )
                addresses = Addresses(http=http)
                nursery.start_soon(self._housekeeping, auth)
                services.readiness = Readiness.READY
                log.info("relayd ready", extra={"fields": {"http": addresses.http_url}})
                task_status.started(addresses)

                await self._stop_requested.wait()
                log.info("draining", extra={"fields": {"deadline_s": config.drain_timeout}})
                services.readiness = Readiness.DRAINING
                http_shutdown.set()
                # The HTTP server gives connections drain_timeout, then cancels them; this
                # deadline only backs that up should a connection ignore cancellation.
                nursery.cancel_scope.deadline = trio.current_time() + config.drain_timeout + 5
        log.info("relayd stopped")

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
