"""``kill -9`` mid-traffic loses nothing relayd confirmed as accepted.

The daemon runs as a real process (``python -m relayd serve``) on a file store with the
default ``synchronous = full``. Alice sends while Bob is offline, then while Bob reads without
acknowledging; relayd is killed with SIGKILL and started again on the same state directory.
Every message Alice was told was queued or pending an ack reaches Bob after the restart;
nothing reaches Bob twice unless it is marked as a redelivery.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from .support import TEST_SECRET, HttpClient
from .ws_support import connect_url

# Start-up of a real process, and each phase of the test, are bounded by this.
PROCESS_DEADLINE = 30.0


@asynccontextmanager
async def relayd_process(state: Path) -> AsyncIterator[tuple[trio.Process, HttpClient, str]]:
    """``relayd serve`` in a child process; yields it, an HTTP client and the /ws URL."""
    config = state / "relayd.toml"
    config.write_text(
        f'state_dir = "{state}"\n[http]\nlisten = "127.0.0.1:0"\n'
        '[auth]\nkdf_cost = 1024\n[log]\nformat = "json"\n'
    )
    env = {**os.environ, "RELAYD_SECRET": TEST_SECRET}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "relayd", "serve", "--config", str(config)],
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert process.stderr is not None
        with trio.fail_after(PROCESS_DEADLINE):
            http_url = await _ready_url(process.stderr)
        host, _, port = http_url.removeprefix("http://").rpartition(":")
        yield process, HttpClient(host, int(port)), f"ws://{host}:{port}/ws"
    finally:
        if process.returncode is None:
            process.kill()
        with trio.fail_after(PROCESS_DEADLINE):
            await process.wait()
        if process.stderr is not None:
            await process.stderr.aclose()


async def _ready_url(stderr: trio.abc.ReceiveStream) -> str:
    buffer = b""
    while True:
        chunk = await stderr.receive_some()
        if not chunk:
            raise AssertionError(f"relayd exited before it was ready: {buffer.decode()}")
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            doc = json.loads(line)
            if doc.get("msg") == "relayd ready":
                url: str = doc["http"]
                return url


async def register(http: HttpClient, name: str) -> dict[str, Any]:
    return await http.register(name)


async def test_kill_9_loses_nothing_accepted(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    accepted: set[str] = set()
    before_crash: dict[str, dict[str, Any]] = {}  # msgid -> as Bob got it before the crash
    async with relayd_process(state) as (process, http, ws):
        alice = await register(http, "alice")
        bob = await register(http, "bob")
        async with connect_url(f"{ws}?token={alice['access_token']}") as a:
            assert (await a.next())["type"] == "connection"
            # Bob is offline: both kinds are queued durably.
            for i in range(40):
                await a.send({"to": bob["uuid"], "msgid": f"off-{i}", "acknowledge": i % 2 == 0})
            for _ in range(40):
                receipt = await a.next()
                assert receipt["status"] == "queued_offline", receipt
                accepted.add(receipt["msgid"])
            async with connect_url(f"{ws}?token={bob['access_token']}") as b:
                assert (await b.next())["type"] == "connection"
                # Bob reads, acknowledges the first ten, then stops acknowledging.
                acked: set[str] = set()
                confirmed: set[str] = set()
                while len(before_crash) < 40 or confirmed != acked:
                    got = await b.next()
                    if got["type"] == "ack_received":
                        confirmed.add(got["msgid"])
                        continue
                    before_crash[got["msgid"]] = got
                    if got["acknowledge"] and len(before_crash) <= 10:
                        await b.send({"type": "ack", "msgid": got["msgid"]})
                        acked.add(got["msgid"])
                # Bob online: more traffic, pending his ack.
                for i in range(20):
                    await a.send({"to": bob["uuid"], "msgid": f"on-{i}", "acknowledge": True})
                pending = 0
                while pending < 20:
                    frame = await a.next()
                    if frame.get("status") == "pending_ack":
                        accepted.add(frame["msgid"])
                        pending += 1
                for _ in range(20):
                    got = await b.next_of("message")
                    before_crash[got["msgid"]] = got
                process.send_signal(signal.SIGKILL)
                with trio.fail_after(PROCESS_DEADLINE):
                    await process.wait()
        assert process.returncode == -signal.SIGKILL

    # Final before the crash: acknowledged by Bob, or delivered at most once (acknowledge false).
    done_before = {
        m for i, (m, got) in enumerate(before_crash.items()) if i < 10 or not got["acknowledge"]
    }
    async with (
        relayd_process(state) as (_, http, ws),
        connect_url(f"{ws}?token={bob['access_token']}") as b,
    ):
        # The old access token is still valid: tokens survive the restart.
        assert (await b.next())["type"] == "connection"
        after: dict[str, dict[str, Any]] = {}
        with trio.fail_after(PROCESS_DEADLINE):
            while set(after) != accepted - done_before:
                got = await b.next_of("message")
                assert got["msgid"] not in after, f"delivered twice after restart: {got}"
                assert got["msgid"] not in done_before, f"final before the crash: {got}"
                after[got["msgid"]] = got
                if got["acknowledge"]:
                    await b.send({"type": "ack", "msgid": got["msgid"]})
        # What Bob had seen before the crash comes again only as a marked redelivery.
        for msgid, got in after.items():
            if msgid in before_crash:
                assert got["redelivered"] is True, got
        # Nothing else is delivered.
        with trio.move_on_after(0.5):
            extra = await b.next_of("message")
            raise AssertionError(f"unexpected message after the restart: {extra}")
