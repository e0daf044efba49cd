"""Shutdown of the whole daemon, step by step, in virtual time.

The daemon runs under ``autojump_clock`` with its store called inline (on Redis, whose replies
come over a socket, virtual time jumps only once nothing has happened for a while in real time:
``Engine.autojump_threshold``) and its token clock on virtual time; clients are inserted
straight into the store (no KDF thread, during which the fake clock could jump). The test
records when each step of the drain is seen and asserts their order and the virtual time they
take.
"""

from __future__ import annotations

import platform
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from relayd import Addresses, Daemon
from relayd._auth import CLIENT_ROLES
from relayd._daemon import MALLOC_TRIM
from relayd._http import Readiness
from relayd._relay.frames import CloseCode
from relayd._store import ClientRecord, inline_executor

from .hub_support import virtual_clock
from .support import TEST_ENV, Engine, HttpClient, RunningRelayd, make_config
from .ws_support import ws_connect

# The virtual time closing the store takes once the drain is done. On Redis, coredis 6.9,
# cancelled, unsubscribes the cluster's pub/sub on the connection it has just closed and waits
# its unsubscription_timeout (0.1 s) for a reply that cannot come (relayd/_cluster.py, _listen).
STORE_CLOSE = {"sqlite": 0.0, "redis": 0.1}


async def test_drain_order_and_virtual_time(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, engine: Engine
) -> None:
    config = make_config(tmp_path, {"drain_timeout": 10.0}, engine)
    autojump_clock.autojump_threshold = engine.autojump_threshold
    daemon = Daemon(config, environ=TEST_ENV, clock=virtual_clock, store_executor=inline_executor)
    steps: list[tuple[str, float]] = []

    def step(name: str) -> None:
        steps.append((name, trio.current_time()))

    async with trio.open_nursery() as nursery:

        async def run(*, task_status: trio.TaskStatus[Addresses]) -> None:
            await daemon.run(task_status=task_status)
            step("run returned")

        addresses: Addresses = await nursery.start(run)
        relayd = RunningRelayd(daemon, addresses)
        services = daemon.services
        assert services is not None
        auth = services.auth
        now = auth.now
        await auth._store.insert_client(
            ClientRecord(
                "7e57c11e-0000-4000-8000-000000000001", "alice", "", CLIENT_ROLES, now, now
            )
        )
        token = auth.codec.issue(
            sub="7e57c11e-0000-4000-8000-000000000001",
            token_use="access",
            roles=CLIENT_ROLES,
            ttl=900.0,
        ).token

        async with ws_connect(relayd, token) as alice:
            assert (await alice.next())["type"] == "connection"
            assert (await relayd.http.get("/health/ready")).status == 200
            t0 = trio.current_time()
            daemon.stop()
            notice = await alice.next()
            assert notice["type"] == "shutdown"
            if services.readiness is Readiness.DRAINING:
                step("readiness draining")  # already, when the notice arrived
            step("shutdown notice")
            assert await alice.closed() == CloseCode.GOING_AWAY
            step("closed 1001")
            # The listener is gone: no new connection is accepted.
            try:
                await HttpClient(*addresses.http).get("/health/live")
            except OSError:
                step("new connections refused")
    assert [name for name, _ in steps] == [
        "readiness draining",
        "shutdown notice",
        "closed 1001",
        "new connections refused",
        "run returned",
    ]
    # Nothing was in flight and nobody lagged: the drain took no virtual time at all, far
    # inside drain_timeout; closing the engine takes what it takes (see STORE_CLOSE).
    assert [at - t0 for _, at in steps] == [0.0] * 4 + [STORE_CLOSE[engine.name]], steps


async def test_freed_memory_is_given_back_every_interval_until_a_stop(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    calls: list[float] = []

    def trim(pad: int) -> int:
        assert pad == 0
        calls.append(trio.current_time())
        return 1

    daemon = Daemon(make_config(tmp_path), environ=TEST_ENV)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            partial(daemon._return_memory, interval=30.0, trim=trim, executor=inline_executor)
        )
        await trio.sleep(95)
        daemon.stop()
    assert calls == [30.0, 60.0, 90.0]
    assert trio.current_time() == 95


def test_glibc_s_malloc_trim_is_found_and_callable() -> None:
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's; relayd does without it elsewhere")
    assert MALLOC_TRIM is not None
    assert MALLOC_TRIM(0) in (0, 1)
