"""The supervisor of ``relayd serve --workers``, without real workers: its notify relay (what
systemd hears) and restart policy as pure state, then the supervisor itself driving fake
workers under ``autojump_clock``, with exact virtual times.

A fake worker is a small real implementation of what the supervisor needs of a process: a
pid, ``wait``, ``send_signal``, and systemd's notify protocol spoken with relayd's own
``Notifier`` to the socket the supervisor gave it.
"""

from __future__ import annotations

import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from relayd._systemd import Notifier
from relayd._workers import Actions, NotifyRelay, RestartPolicy, Supervisor

SERVING = "serving on http://127.0.0.1:8000 with 2 workers"


# --- the notify relay ---------------------------------------------------------------------------


def test_ready_goes_to_systemd_once_every_worker_is_ready() -> None:
    relay = NotifyRelay(2, status=SERVING)
    assert relay.heard(2, ["READY=1", "STATUS=serving on x"]) == Actions()
    assert relay.heard(1, ["READY=1", "STATUS=serving on x"]) == Actions(
        notify=(("READY=1", f"STATUS={SERVING}"),), announced="ready"
    )
    # A worker that exits and comes back: STATUS says so, READY=1 is not repeated.
    assert relay.exited(1, -9) == Actions(notify=(("STATUS=worker 1 exited (-9); restarting it",),))
    assert relay.heard(1, ["READY=1"]) == Actions(notify=((f"STATUS={SERVING}",),))


def test_a_worker_that_exits_before_it_is_ready_holds_ready_back_until_it_is() -> None:
    relay = NotifyRelay(2, status=SERVING)
    assert relay.heard(1, ["READY=1"]) == Actions()
    assert relay.exited(1, 1) == Actions()  # before READY=1: systemd hears nothing
    assert relay.heard(2, ["READY=1"]) == Actions()
    assert relay.heard(1, ["READY=1"]).notify == (("READY=1", f"STATUS={SERVING}"),)


def test_watchdog_goes_when_every_ready_worker_has_pinged_since_the_last_one() -> None:
    relay = NotifyRelay(2, status=SERVING)
    assert relay.heard(1, ["WATCHDOG=1"]) == Actions()  # not ready: not waited for, not counted
    relay.heard(1, ["READY=1"])
    # Worker 2 still starting: worker 1's pings are enough.
    assert relay.heard(1, ["WATCHDOG=1"]) == Actions(notify=(("WATCHDOG=1",),))
    relay.heard(2, ["READY=1"])
    assert relay.heard(1, ["WATCHDOG=1"]) == Actions()
    assert relay.heard(1, ["WATCHDOG=1"]) == Actions()  # worker 2 stalls: no ping goes out
    assert relay.heard(2, ["WATCHDOG=1"]) == Actions(notify=(("WATCHDOG=1",),))
    # A worker that exits is no longer waited for: the round is complete without it.
    assert relay.heard(1, ["WATCHDOG=1"]) == Actions()
    assert relay.exited(2, -9).notify == (
        ("STATUS=worker 2 exited (-9); restarting it",),
        ("WATCHDOG=1",),
    )


def test_a_reload_waits_for_every_worker_told_including_those_still_starting() -> None:
    relay = NotifyRelay(3, status=SERVING)
    for worker in (1, 2, 3):
        relay.heard(worker, ["READY=1"])
    relay.exited(3, -9)  # being restarted when the reload comes
    reload = relay.reload(123)
    assert reload == Actions(notify=(("RELOADING=1", "MONOTONIC_USEC=123"),), reload=(1, 2))
    assert relay.is_reloading(1)
    assert not relay.is_reloading(3)
    assert relay.heard(1, ["RELOADING=1", "MONOTONIC_USEC=124"]) == Actions()
    assert relay.heard(1, ["READY=1", "STATUS=reloaded"]) == Actions()
    # Worker 3 is ready again (its old config, maybe): now it is told, and waited for.
    assert relay.heard(3, ["READY=1"]) == Actions(reload=(3,))
    assert relay.heard(2, ["READY=1", "STATUS=reloaded"]) == Actions()
    assert relay.heard(3, ["READY=1", "STATUS=reloaded"]) == Actions(
        notify=(("READY=1", "STATUS=reloaded"),), announced="reloaded"
    )


def test_a_worker_that_exits_while_reloading_is_not_waited_for() -> None:
    relay = NotifyRelay(2, status=SERVING)
    relay.heard(1, ["READY=1"])
    relay.heard(2, ["READY=1"])
    relay.reload(5)
    relay.heard(1, ["READY=1"])
    assert relay.exited(2, 1) == Actions(
        notify=(("STATUS=worker 2 exited (1); restarting it",), ("READY=1", "STATUS=reloaded")),
        announced="reloaded",
    )


def test_a_reload_before_systemd_heard_ready_is_forwarded_but_not_announced() -> None:
    relay = NotifyRelay(2, status=SERVING)
    relay.heard(1, ["READY=1"])
    assert relay.reload(7) == Actions(reload=(1,))
    assert relay.heard(2, ["READY=1"]) == Actions(
        notify=(("READY=1", f"STATUS={SERVING}"),), reload=(2,), announced="ready"
    )


def test_stopping_goes_once_then_only_the_watchdog() -> None:
    relay = NotifyRelay(2, status=SERVING)
    relay.heard(1, ["READY=1"])
    relay.heard(2, ["READY=1"])
    assert relay.stop() == Actions(notify=(("STOPPING=1", "STATUS=draining"),))
    assert relay.stop() == Actions()
    assert relay.reload(9) == Actions()
    assert relay.heard(1, ["STOPPING=1", "STATUS=draining"]) == Actions()
    assert relay.heard(1, ["WATCHDOG=1"]) == Actions()
    assert relay.heard(2, ["WATCHDOG=1"]) == Actions(notify=(("WATCHDOG=1",),))
    assert relay.exited(1, 0) == Actions()


# --- the restart policy ---------------------------------------------------------------------------


def test_restarts_back_off_per_worker_and_stop_past_the_limit_within_the_window() -> None:
    policy = RestartPolicy(limit=5, window=60.0, backoff=0.5, backoff_max=4.0)
    assert [policy.delay(1, t) for t in (0.0, 1.0, 2.0)] == [0.5, 1.0, 2.0]
    assert policy.delay(2, 3.0) == 0.5  # another worker's restarts do not slow this one's
    assert policy.delay(1, 4.0) == 4.0  # 0.5 * 2**3, at most backoff_max
    assert policy.delay(2, 59.0) is None  # the sixth exit within 60 s
    # At 60.0 the restart of 0.0 is out of the window: room for one more.
    assert policy.delay(1, 60.0) == 4.0
    assert policy.delay(1, 60.5) is None


# --- the supervisor, with fake workers ------------------------------------------------------------


class FakeWorker:
    """A worker process played by the test (see the module docstring). ``drains``: it exits
    0 on its first SIGTERM or SIGINT; otherwise it exits 1 on the second."""

    def __init__(self, index: int, environ: Mapping[str, str], pid: int, *, drains: bool) -> None:
        self.index = index
        self.pid = pid
        self.stdin: trio.abc.SendStream | None = None
        self.environ = dict(environ)
        self.notifier = Notifier(environ)
        self.drains = drains
        self.signals: list[int] = []
        self.code: int | None = None
        self._exited = trio.Event()
        # Sent as the supervisor learns that it exited: still unread in the socket then.
        self.last_words: tuple[str, ...] = ()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.code is not None
        if self.last_words:
            self.notifier.notify(*self.last_words)
        return self.code

    def send_signal(self, sig: int) -> None:
        assert self.code is None, "signalled after it exited"
        self.signals.append(sig)
        stops = [s for s in self.signals if s in (signal.SIGTERM, signal.SIGINT)]
        if stops and (self.drains or len(stops) > 1):
            self.exit(0 if self.drains else 1)
        elif sig == signal.SIGHUP:
            self.notifier.notify("RELOADING=1")
            self.notifier.ready("reloaded")

    def exit(self, code: int) -> None:
        self.code = code
        self._exited.set()


class FakeSpawner:
    """Starts fake workers; ``crashing`` workers exit with 3 as soon as they are started."""

    def __init__(self, *, crashing: frozenset[int] = frozenset(), drains: bool = True) -> None:
        self.crashing = crashing
        self.drains = drains
        self.started: list[tuple[float, FakeWorker]] = []
        self._changed = trio.Event()

    async def __call__(self, index: int, environ: Mapping[str, str]) -> FakeWorker:
        worker = FakeWorker(index, environ, 1000 + len(self.started), drains=self.drains)
        self.started.append((trio.current_time(), worker))
        if index in self.crashing:
            worker.exit(3)
        self._changed.set()
        self._changed = trio.Event()
        return worker

    async def started_count(self, count: int) -> list[FakeWorker]:
        while len(self.started) < count:
            await self._changed.wait()
        return [worker for _, worker in self.started]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a unix socket's path is at most 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="rw-") as path:
        yield Path(path)


def systemd_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    return sock


def heard(sock: socket.socket) -> list[list[str]]:
    """What systemd has been told so far (every datagram waiting in its socket)."""
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode().split("\n"))
        except BlockingIOError:
            return messages


# Each test's bound, in virtual seconds (the longest runs for 15.5).
DEADLINE = 60.0


@asynccontextmanager
async def running(boss: Supervisor) -> AsyncIterator[list[int]]:
    """``boss.run()`` in the background for the block, bounded by ``DEADLINE``; the block
    ends once it returned, its exit code in the list yielded."""
    codes: list[int] = []

    async def run() -> None:
        codes.append(await boss.run())

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            yield codes


def supervisor(spawn: FakeSpawner, short_dir: Path, count: int = 2, **environ: str) -> Supervisor:
    notify_dir = short_dir / "n"
    notify_dir.mkdir(mode=0o700)
    return Supervisor(
        count,
        spawn,
        environ={"NOTIFY_SOCKET": str(short_dir / "systemd.sock"), **environ},
        notify_dir=notify_dir,
        status=SERVING,
    )


async def test_a_worker_that_keeps_exiting_is_restarted_with_backoff_then_all_stop_with_1(
    autojump_clock: trio.testing.MockClock, short_dir: Path
) -> None:
    spawn = FakeSpawner(crashing=frozenset({1}))
    boss = supervisor(spawn, short_dir)
    t0 = trio.current_time()
    with trio.fail_after(DEADLINE):
        code = await boss.run()
    assert code == 1
    firsts = [at - t0 for at, worker in spawn.started if worker.index == 1]
    # Started, then restarted after 0.5, 1, 2, 4 and 8 s; the sixth exit within 60 s stops it.
    assert firsts == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5]
    (second,) = [worker for _, worker in spawn.started if worker.index == 2]
    assert second.signals == [signal.SIGTERM]
    assert second.code == 0


async def test_a_stop_during_a_backoff_restarts_nothing_and_a_clean_drain_exits_0(
    autojump_clock: trio.testing.MockClock, short_dir: Path
) -> None:
    spawn = FakeSpawner(crashing=frozenset({1}))
    boss = supervisor(spawn, short_dir)
    async with running(boss) as codes:
        await spawn.started_count(2)
        await trio.testing.wait_all_tasks_blocked()  # worker 1 exited: its backoff is on
        boss.stop()
    assert codes == [0]
    assert sorted(worker.index for _, worker in spawn.started) == [1, 2]


async def test_a_second_stop_is_forwarded_again_and_the_exit_code_says_forced(
    autojump_clock: trio.testing.MockClock, short_dir: Path
) -> None:
    spawn = FakeSpawner(drains=False)
    boss = supervisor(spawn, short_dir)
    async with running(boss) as codes:
        workers = await spawn.started_count(2)
        boss.stop(signal.SIGINT)
        await trio.testing.wait_all_tasks_blocked()
        assert [w.code for w in workers] == [None, None]  # still draining
        boss.stop(signal.SIGINT)
    assert codes == [1]
    assert [w.signals for w in workers] == [[signal.SIGINT, signal.SIGINT]] * 2


async def test_systemd_hears_ready_after_both_then_reloading_ready_and_stopping(
    autojump_clock: trio.testing.MockClock, short_dir: Path
) -> None:
    systemd = systemd_socket(short_dir / "systemd.sock")
    spawn = FakeSpawner()
    boss = supervisor(spawn, short_dir)
    with systemd:
        async with running(boss) as codes:
            one, two = await spawn.started_count(2)
            # Each worker speaks to a socket of the supervisor's, not to systemd.
            assert one.environ["NOTIFY_SOCKET"] != two.environ["NOTIFY_SOCKET"]
            assert "WATCHDOG_USEC" not in one.environ  # systemd set no watchdog
            one.notifier.ready("serving")
            await trio.testing.wait_all_tasks_blocked()
            assert heard(systemd) == []
            two.notifier.ready("serving")
            await trio.testing.wait_all_tasks_blocked()
            assert heard(systemd) == [["READY=1", f"STATUS={SERVING}"]]
            # A reload: both are told; systemd hears READY=1 again once both reloaded.
            boss.reload()
            await trio.testing.wait_all_tasks_blocked()
            reloading, ready = heard(systemd)
            assert reloading[0] == "RELOADING=1"
            assert reloading[1].startswith("MONOTONIC_USEC=")
            assert ready == ["READY=1", "STATUS=reloaded"]
            assert [one.signals, two.signals] == [[signal.SIGHUP]] * 2
            boss.stop()
        assert heard(systemd) == [["STOPPING=1", "STATUS=draining"]]
    assert codes == [0]


async def test_the_watchdog_passes_to_workers_and_pings_only_when_every_worker_pinged(
    autojump_clock: trio.testing.MockClock, short_dir: Path
) -> None:
    systemd = systemd_socket(short_dir / "systemd.sock")
    spawn = FakeSpawner()
    # systemd's watchdog is the supervisor's (WATCHDOG_PID is its pid, or absent).
    boss = supervisor(spawn, short_dir, WATCHDOG_USEC="4000000")
    with systemd:
        async with running(boss):
            one, two = await spawn.started_count(2)
            assert one.environ["WATCHDOG_USEC"] == "4000000"
            for worker in (one, two):
                worker.notifier.ready("serving")
            await trio.testing.wait_all_tasks_blocked()
            assert heard(systemd) == [["READY=1", f"STATUS={SERVING}"]]
            one.notifier.notify("WATCHDOG=1")
            one.notifier.notify("WATCHDOG=1")
            await trio.testing.wait_all_tasks_blocked()
            assert heard(systemd) == []  # worker 2 has not pinged
            two.notifier.notify("WATCHDOG=1")
            await trio.testing.wait_all_tasks_blocked()
            assert heard(systemd) == [["WATCHDOG=1"]]
            boss.stop()


async def test_what_a_worker_said_before_it_exited_is_heard_before_its_exit(
    autojump_clock: trio.testing.MockClock, short_dir: Path
) -> None:
    """A worker that says READY=1 and dies at once is not ready: systemd hears READY=1 only
    when its next process is."""
    systemd = systemd_socket(short_dir / "systemd.sock")
    spawn = FakeSpawner()
    boss = supervisor(spawn, short_dir)
    with systemd:
        async with running(boss):
            one, two = sorted(await spawn.started_count(2), key=lambda w: w.index)
            one.last_words = ("READY=1", "STATUS=serving")
            one.exit(3)
            again = (await spawn.started_count(3))[2]
            assert again.index == 1
            two.notifier.ready("serving")
            await trio.testing.wait_all_tasks_blocked()
            assert heard(systemd) == []
            again.notifier.ready("serving")
            await trio.testing.wait_all_tasks_blocked()
            assert heard(systemd) == [["READY=1", f"STATUS={SERVING}"]]
            boss.stop()
