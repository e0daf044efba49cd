"""``relayd serve --workers N``: N relayd processes on one machine, sharing its listen ports.

Each worker is a whole relayd node (``relayd serve --worker K --reuse-port``) of one cluster:
they share the store and the sessions through Redis (``store.engine = "redis"``), so any
worker serves any client. The process that was started is their supervisor; it serves nothing.

Theory of operation:

1. **Before any worker starts**, the supervisor makes sure the generated secrets exist (the
   signing secret and the store key file in ``state_dir``): workers only read them, never race
   to create them. It *reserves* every listen address (``http.listen``, ``websocket.listen``,
   ``metrics.listen``): a socket bound with ``SO_REUSEPORT`` that never listens. A port of 0
   becomes that socket's port, the same for every worker; the reservation keeps the port, from
   any other program, while the supervisor runs and its workers come and go.
2. **Workers** get the same config, the resolved addresses as ``RELAYD_*`` overrides, and each
   binds every listener with ``SO_REUSEPORT``: the kernel spreads new connections over the
   sockets that listen (a reservation does not, so it gets none). Each worker's stdin is a pipe
   from the supervisor that nothing is written to: it closes when the supervisor dies, however
   it dies, and the worker then drains and exits. Workers run in a process group of their own:
   a Ctrl-C in a terminal reaches the supervisor alone, which forwards it.
3. **Signals.** SIGTERM or SIGINT is forwarded to every worker, which drains; no worker is
   restarted from then on. A second one is forwarded again: the workers stop at once. SIGHUP
   is forwarded (each worker reloads its config).
4. **A worker that exits** while the supervisor is not stopping is logged with its exit code
   and started again after a backoff (:class:`RestartPolicy`). Past ``RESTART_LIMIT`` restarts
   in ``RESTART_WINDOW`` seconds something is wrong that restarting will not mend: the
   supervisor stops every worker and exits 1. It exits when every worker has exited: 0 after
   a drain in which every worker exited 0.
5. **systemd.** Workers never speak to systemd (the unit says ``NotifyAccess=main``): each one's
   ``NOTIFY_SOCKET`` is a datagram socket of the supervisor's, and :class:`NotifyRelay` decides
   what systemd hears from the supervisor (its rules are there).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Protocol

import trio
from attrs import define, field, frozen

from ._atrest import load_store_keys
from ._auth import load_signing_secret
from ._config import Config, parse_address
from ._errors import ConfigError, RelaydError
from ._systemd import Notifier

log = logging.getLogger("relayd.workers")

# Restarts of workers allowed within RESTART_WINDOW seconds; one more and the supervisor stops.
RESTART_LIMIT = 5
RESTART_WINDOW = 60.0
# The wait before a worker is started again: RESTART_BACKOFF, doubled for each restart of that
# worker within the window, at most RESTART_BACKOFF_MAX.
RESTART_BACKOFF = 0.5
RESTART_BACKOFF_MAX = 8.0
# A notify message is a few short lines (READY=1, STATUS=...); a longer one is cut.
NOTIFY_BYTES = 4096

EXIT_OK = 0
EXIT_FAILURE = 1


class ListenError(RelaydError):
    """A listen address cannot be reserved for the workers (in use, or not this host's)."""


# --- what systemd hears ----------------------------------------------------------------------


@define
class _Worker:
    ready: bool = False  # said READY=1 since it was started
    pinged: bool = False  # said WATCHDOG=1 since the supervisor last did
    reloading: bool = False  # told to reload; its READY=1 not heard yet
    reload_due: bool = False  # to be told to reload once it is ready


@frozen
class Actions:
    """What the supervisor does after an event: tell systemd ``notify`` (one message per
    tuple of fields), and send SIGHUP to the workers in ``reload``."""

    notify: tuple[tuple[str, ...], ...] = ()
    reload: tuple[int, ...] = ()
    # What the supervisor logs about it: "ready" (systemd was told READY=1), "reloaded".
    announced: str | None = None


class NotifyRelay:
    """The supervisor's side of systemd's notify protocol: what each worker says comes in,
    what the supervisor must tell systemd comes out. No I/O.

    Rules:

    1. ``READY=1`` goes to systemd once, when every worker has said ``READY=1`` since it was
       started. A restarted worker's ``READY=1`` brings ``STATUS`` back to serving once every
       worker is ready again.
    2. A reload (SIGHUP) says ``RELOADING=1`` at once (once systemd was told ``READY=1``). The
       ready workers are told to reload now, those still starting once they are ready; when
       every worker told has said ``READY=1`` again (or exited), systemd hears ``READY=1``.
    3. ``STOPPING=1`` goes once, when the drain begins; from then on only the watchdog rule.
    4. ``WATCHDOG=1`` goes each time every ready worker has said ``WATCHDOG=1`` since the last
       one: a worker whose event loop stalls stops the pings, and systemd's watchdog fires as it
       would for one process. Workers still starting are not waited for (they ping once ready).
    """

    def __init__(self, count: int, *, status: str) -> None:
        self._workers = {index: _Worker() for index in range(1, count + 1)}
        self._status = status
        self.announced = False
        self.reloading = False
        self.stopping = False

    def heard(self, worker: int, fields: Sequence[str]) -> Actions:
        """``worker`` sent ``fields`` (one datagram's lines)."""
        state = self._workers[worker]
        if "WATCHDOG=1" in fields and state.ready:
            state.pinged = True
        if "READY=1" not in fields:
            return self._watchdog()
        state.ready = True
        state.reloading = False
        notify: list[tuple[str, ...]] = []
        reload: list[int] = []
        announced = None
        if state.reload_due and not self.stopping:
            state.reload_due = False
            state.reloading = True
            reload.append(worker)
        if self.stopping:
            pass
        elif not self.announced:
            if self._all_ready():
                self.announced = True
                notify.append(("READY=1", f"STATUS={self._status}"))
                announced = "ready"
        elif self.reloading:
            if not state.reloading:  # not a worker that was only now told to reload
                done = self._reload_done()
                notify += done.notify
                announced = done.announced
        elif self._all_ready():
            notify.append((f"STATUS={self._status}",))
        watchdog = self._watchdog()
        return Actions(tuple(notify) + watchdog.notify, tuple(reload), announced)

    def exited(self, worker: int, code: int) -> Actions:
        """``worker`` exited with ``code`` (to be restarted unless stopping)."""
        # Its next process reads the config as it is then: no reload is due to it.
        self._workers[worker] = _Worker()
        notify: list[tuple[str, ...]] = []
        announced = None
        if self.announced and not self.stopping:
            notify.append((f"STATUS=worker {worker} exited ({code}); restarting it",))
            if self.reloading:
                done = self._reload_done()
                notify += done.notify
                announced = done.announced
        watchdog = self._watchdog()
        return Actions(tuple(notify) + watchdog.notify, (), announced)

    def reload(self, monotonic_usec: int) -> Actions:
        """A reload was asked for (SIGHUP); ``monotonic_usec`` is now on CLOCK_MONOTONIC."""
        if self.stopping:
            return Actions()
        reload = []
        for index, state in self._workers.items():
            if state.ready:
                state.reloading = True
                reload.append(index)
            else:
                state.reload_due = True
        if not self.announced:
            return Actions(reload=tuple(reload))
        self.reloading = True
        notify = (("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}"),)
        if not reload:
            done = self._reload_done()
            return Actions(notify + done.notify, (), done.announced)
        return Actions(notify, tuple(reload))

    def stop(self) -> Actions:
        """The drain begins."""
        if self.stopping:
            return Actions()
        self.stopping = True
        self.reloading = False
        return Actions((("STOPPING=1", "STATUS=draining"),))

    def is_reloading(self, worker: int) -> bool:
        """Whether ``worker`` was told to reload and has not said ``READY=1`` since."""
        return self._workers[worker].reloading

    def _all_ready(self) -> bool:
        return all(state.ready for state in self._workers.values())

    def _reload_done(self) -> Actions:
        if any(state.reloading or state.reload_due for state in self._workers.values()):
            return Actions()
        self.reloading = False
        return Actions((("READY=1", "STATUS=reloaded"),), announced="reloaded")

    def _watchdog(self) -> Actions:
        ready = [state for state in self._workers.values() if state.ready]
        if not ready or not all(state.pinged for state in ready):
            return Actions()
        for state in ready:
            state.pinged = False
        return Actions((("WATCHDOG=1",),))


# --- restarts --------------------------------------------------------------------------------


@define
class RestartPolicy:
    """When a worker that exited is started again, and when to give up."""

    limit: int = RESTART_LIMIT
    window: float = RESTART_WINDOW
    backoff: float = RESTART_BACKOFF
    backoff_max: float = RESTART_BACKOFF_MAX
    _restarts: deque[tuple[float, int]] = field(factory=deque, init=False)

    def delay(self, worker: int, now: float) -> float | None:
        """Seconds to wait before starting ``worker`` again, which exited at ``now``; ``None``:
        ``limit`` workers were restarted within the last ``window`` seconds, give up."""
        while self._restarts and self._restarts[0][0] <= now - self.window:
            self._restarts.popleft()
        if len(self._restarts) >= self.limit:
            return None
        own = sum(1 for _, index in self._restarts if index == worker)
        self._restarts.append((now, worker))
        return float(min(self.backoff_max, self.backoff * 2**own))


# --- listen addresses ------------------------------------------------------------------------

# The listeners a worker binds, and the environment override that names each one's address.
LISTENERS = (
    ("http.listen", "RELAYD_HTTP__LISTEN"),
    ("websocket.listen", "RELAYD_WEBSOCKET__LISTEN"),
    ("metrics.listen", "RELAYD_METRICS__LISTEN"),
)


def _listen_value(config: Config, key: str) -> str:
    section, _, name = key.partition(".")
    value: str = getattr(getattr(config, section), name)
    return value


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def reserve(host: str, port: int, *, key: str) -> list[socket.socket]:
    """Sockets bound to every address of ``host`` at ``port`` (a port of 0: one the system
    picks, the same for all) with ``SO_REUSEPORT``, not listening.

    Raises:
        ListenError: the address is in use by a program that does not share it, or cannot be
            bound here; the message names ``key``.
    """
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise ListenError(f"{key}: cannot resolve {host!r}: {exc.strerror or exc}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in addresses:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((address[0], port, *address[2:]))
            port = sock.getsockname()[1]
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ListenError(
            f"{key}: cannot listen on {_address(host, port)}: {exc.strerror or exc}"
        ) from None
    return sockets


@frozen
class Listeners:
    """The reserved listen addresses: the overrides that give workers the resolved ones."""

    overrides: dict[str, str]
    http: tuple[str, int]
    websocket: tuple[str, int] | None


@contextmanager
def reserved_listeners(config: Config) -> Iterator[Listeners]:
    """Reserve every listen address of ``config`` (theory, rule 1) while in the block.

    Raises:
        ListenError: see :func:`reserve`.
    """
    overrides: dict[str, str] = {}
    resolved: dict[str, tuple[str, int]] = {}
    with ExitStack() as stack:
        for key, variable in LISTENERS:
            value = _listen_value(config, key)
            if not value:
                continue
            host, port = parse_address(value)
            sockets = reserve(host, port, key=key)
            for sock in sockets:
                stack.enter_context(sock)
            resolved[key] = (host, sockets[0].getsockname()[1])
            overrides[variable] = _address(*resolved[key])
        yield Listeners(overrides, resolved["http.listen"], resolved.get("websocket.listen"))


def _url(scheme: str, address: tuple[str, int]) -> str:
    return f"{scheme}://{_address(*address)}"


# --- the supervisor --------------------------------------------------------------------------


class WorkerProcess(Protocol):
    """What the supervisor needs of a worker's process (``trio.Process`` has it)."""

    @property
    def pid(self) -> int: ...

    @property
    def stdin(self) -> trio.abc.SendStream | None: ...

    async def wait(self) -> int: ...

    def send_signal(self, sig: int) -> None: ...


# Start worker ``index`` with ``environ``.
Spawn = Callable[[int, Mapping[str, str]], Awaitable[WorkerProcess]]


async def spawn_process(
    argv: Sequence[str], index: int, environ: Mapping[str, str]
) -> trio.Process:
    """``argv`` with ``--worker index``, in a process group of its own, its stdin a pipe that
    nothing is written to (theory, rule 2); its stdout and stderr are the supervisor's."""
    return await trio.lowlevel.open_process(
        [*argv, "--worker", str(index)],
        stdin=subprocess.PIPE,
        env=dict(environ),
        process_group=0,
    )


def _exit_fields(code: int) -> dict[str, object]:
    if code < 0:
        try:
            return {"code": code, "signal": signal.Signals(-code).name}
        except ValueError:
            pass
    return {"code": code}


class Supervisor:
    """Runs ``count`` workers until :meth:`stop` (see the module docstring).

    ``environ`` is the supervisor's own environment: what it tells systemd goes to its
    ``NOTIFY_SOCKET``, and the workers get it with their own notify socket (and the watchdog's
    interval, if systemd set one for the supervisor). ``notify_dir`` is a private directory
    (mode 0700) for the workers' notify sockets.
    """

    def __init__(
        self,
        count: int,
        spawn: Spawn,
        *,
        environ: Mapping[str, str],
        notify_dir: Path,
        status: str = "serving",
        urls: Mapping[str, str] | None = None,
        policy: RestartPolicy | None = None,
    ) -> None:
        self.count = count
        self._spawn = spawn
        self._environ = environ
        self._notify_dir = notify_dir
        self._notifier = Notifier(environ)
        self._relay = NotifyRelay(count, status=status)
        self._urls = dict(urls or {})
        self._policy = policy or RestartPolicy()
        self.processes: dict[int, WorkerProcess] = {}
        self._sockets: dict[int, socket.socket] = {}
        self._stops = 0
        self._stopping = trio.Event()
        self._failed = False
        self._clean = True  # every worker that exited during the drain exited 0

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # --- what signals ask for -----------------------------------------------------------------

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Drain every worker (forward ``signum``); called again, forward it again: the workers
        stop at once. No worker is restarted once this was called."""
        self._stops += 1
        if self._stops == 1:
            log.info("draining", extra={"fields": {"workers": len(self.processes)}})
            self._apply(self._relay.stop())
            self._stopping.set()
        for process in list(self.processes.values()):
            process.send_signal(signum)

    def reload(self) -> None:
        """Have every worker reload its config (forward SIGHUP; see :class:`NotifyRelay`)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._apply(self._relay.reload(usec))

    # --- running ------------------------------------------------------------------------------

    async def run(self) -> int:
        """Start the workers, keep them running until :meth:`stop`, and return the exit code
        once every worker has exited: 0 after a clean drain, 1 otherwise. Cancelled, it leaves
        the workers running (their stdin closes: they drain and exit on their own)."""
        with ExitStack() as stack:
            for index in range(1, self.count + 1):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                stack.enter_context(sock)
                sock.bind(str(self._notify_dir / f"worker-{index}.sock"))
                sock.setblocking(False)
                self._sockets[index] = sock
            async with trio.open_nursery() as nursery:
                for index in self._sockets:
                    nursery.start_soon(self._listen, index)
                async with trio.open_nursery() as workers:
                    for index in self._sockets:
                        workers.start_soon(self._keep_running, index)
                nursery.cancel_scope.cancel()
        forced = self._stops > 1
        code = EXIT_FAILURE if self._failed or forced or not self._clean else EXIT_OK
        log.info("relayd stopped", extra={"fields": {"workers": self.count, "exit_code": code}})
        return code

    def _worker_environ(self, index: int) -> dict[str, str]:
        environ = {
            k: v
            for k, v in self._environ.items()
            if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
        }
        environ["NOTIFY_SOCKET"] = str(self._notify_dir / f"worker-{index}.sock")
        if self._notifier.watchdog_interval is not None:
            # The same watchdog as the supervisor's; the worker pings the supervisor.
            environ["WATCHDOG_USEC"] = self._environ["WATCHDOG_USEC"]
        return environ

    async def _keep_running(self, index: int) -> None:
        """Run worker ``index``, again each time it exits, until stopping (or giving up)."""
        while not self._stopping.is_set():
            try:
                process = await self._spawn(index, self._worker_environ(index))
            except OSError as exc:
                log.error("cannot start worker: %s", exc, extra={"fields": {"worker": index}})
            else:
                await self._supervise(index, process)
            if self._stopping.is_set():
                return
            delay = self._policy.delay(index, trio.current_time())
            if delay is None:
                log.error(
                    "workers keep exiting: stopping them all",
                    extra={
                        "fields": {
                            "restarts": self._policy.limit,
                            "within_s": self._policy.window,
                        }
                    },
                )
                self._failed = True
                self.stop()
                return
            log.info("restarting worker", extra={"fields": {"worker": index, "delay_s": delay}})
            with trio.move_on_after(delay):
                await self._stopping.wait()

    async def _supervise(self, index: int, process: WorkerProcess) -> int:
        """Wait for ``process``, worker ``index``, to exit; return its exit code."""
        self.processes[index] = process
        log.info("worker started", extra={"fields": {"worker": index, "pid": process.pid}})
        for _ in range(min(self._stops, 2)):  # a stop came while it was being started
            process.send_signal(signal.SIGTERM)
        try:
            code = await process.wait()
        finally:
            del self.processes[index]
            if process.stdin is not None:
                await process.stdin.aclose()  # closes, even when cancelled
        # What it said before it exited is in the socket: heard before its exit is.
        self._read_notices(index)
        fields = {"worker": index, "pid": process.pid, **_exit_fields(code)}
        if self._stopping.is_set():
            self._clean = self._clean and code == 0
            log.info("worker exited", extra={"fields": fields})
        else:
            log.warning("worker exited unexpectedly", extra={"fields": fields})
        self._apply(self._relay.exited(index, code))
        return code

    async def _listen(self, index: int) -> None:
        sock = self._sockets[index]
        while True:
            await trio.lowlevel.wait_readable(sock)
            self._read_notices(index)

    def _read_notices(self, index: int) -> None:
        sock = self._sockets[index]
        while True:
            try:
                data = sock.recv(NOTIFY_BYTES)
            except BlockingIOError:
                return
            fields = data.decode("utf-8", "replace").split("\n")
            if "READY=1" in fields:
                # Logged before what it leads to (systemd's READY=1, "relayd ready").
                log.info(
                    "worker reloaded" if self._relay.is_reloading(index) else "worker ready",
                    extra={"fields": {"worker": index}},
                )
            self._apply(self._relay.heard(index, fields))

    def _apply(self, actions: Actions) -> None:
        for fields in actions.notify:
            self._notifier.notify(*fields)
        if actions.announced == "ready":
            log.info("relayd ready", extra={"fields": {**self._urls, "workers": self.count}})
        elif actions.announced == "reloaded":
            log.info("relayd reloaded", extra={"fields": {"workers": self.count}})
        for index in actions.reload:
            process = self.processes.get(index)
            if process is not None:
                process.send_signal(signal.SIGHUP)


# --- the command -----------------------------------------------------------------------------


def prepare_state(config: Config, environ: Mapping[str, str]) -> None:
    """Create ``state_dir`` and the secrets relayd generates there if none is configured, so
    that workers find them (theory, rule 1).

    Raises:
        ConfigError: the state directory, the signing secret or the store key file is unusable.
    """
    try:
        config.state_path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"state_dir: cannot create {config.state_dir}: {exc.strerror}") from None
    _, origin = load_signing_secret(config, environ)
    keys = load_store_keys(config, environ)
    log.info(
        "secrets ready for the workers",
        extra={"fields": {"signing_secret": origin, "store_keys": keys.origin}},
    )


def check_workers(config: Config, count: int) -> None:
    """Raises ConfigError: ``count`` workers cannot share ``config``'s store."""
    if count > 1 and config.store.engine != "redis":
        raise ConfigError(
            f'serve --workers {count} needs store.engine = "redis": one process owns a SQLite'
            ' store (docs/operations.md, "Several workers on one machine")'
        )


def worker_argv(config_path: str | None) -> list[str]:
    """The command that starts a worker (without its ``--worker``)."""
    argv = [sys.executable, "-m", "relayd", "serve", "--reuse-port"]
    return argv if config_path is None else [*argv, "--config", config_path]


@contextmanager
def _notify_directory() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="relayd-workers-"))  # mode 0700: ours alone
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def serve_workers(config: Config, config_path: str | None, count: int) -> int:
    """``relayd serve --workers count``: supervise ``count`` workers until signalled; the exit
    code.

    Raises:
        ConfigError: the store is not Redis, or the state directory or a secret is unusable.
        ListenError: a listen address cannot be used.
    """
    check_workers(config, count)
    environ = dict(os.environ)
    prepare_state(config, environ)
    scheme = "https" if config.tls.enabled else "http"
    with reserved_listeners(config) as listeners, _notify_directory() as notify_dir:
        environ.update(listeners.overrides)
        http_url = _url(scheme, listeners.http)
        ws_scheme = "wss" if config.tls.enabled else "ws"
        ws_url = _url(ws_scheme, listeners.websocket or listeners.http) + config.websocket.path
        supervisor = Supervisor(
            count,
            partial(spawn_process, worker_argv(config_path)),
            environ=environ,
            notify_dir=notify_dir,
            status=f"serving on {http_url} with {count} workers",
            urls={"http": http_url, "ws": ws_url},
        )
        log.info("starting workers", extra={"fields": {"workers": count, "http": http_url}})
        return trio.run(_supervise_until_signalled, supervisor)


async def _supervise_until_signalled(supervisor: Supervisor) -> int:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum == signal.SIGHUP:
                        log.info("SIGHUP received: the workers reload their config")
                        supervisor.reload()
                        continue
                    if supervisor.stopping:
                        log.warning("%s received again: the workers stop now", name)
                    else:
                        log.info("%s received: draining (send it again to stop at once)", name)
                    supervisor.stop(signum)

            nursery.start_soon(watch)
            code = await supervisor.run()
            nursery.cancel_scope.cancel()
    return code
