"""``relayd register``, ``send`` and ``listen`` as real subprocesses against a real relayd.

relayd runs in-process on the test's Trio loop; the commands run as ``python -m relayd`` with
their identities in ``tmp_path``. Every wait is for a process's exit, under a deadline.
"""

from __future__ import annotations

import functools
import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from .client_support import url_of
from .support import RunningRelayd

DEADLINE = 30.0


def command(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "relayd", *args, "--credentials-dir", str(tmp_path / "ids")]


async def run(tmp_path: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    # trio.run_process kills the command if the deadline passes: none outlives its test.
    with trio.fail_after(DEADLINE):
        return await trio.run_process(
            command(tmp_path, *args),
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


def json_lines(output: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.decode().splitlines()]


async def register(relayd: RunningRelayd, tmp_path: Path, name: str) -> str:
    done = await run(tmp_path, "register", name, "--url", url_of(relayd))
    assert done.returncode == 0, done.stderr
    [doc] = json_lines(done.stdout)
    assert doc["name"] == name
    uuid: str = doc["uuid"]
    return uuid


async def test_register_keeps_the_identity_readable_by_its_owner_only(
    relayd: RunningRelayd, tmp_path: Path
) -> None:
    uuid = await register(relayd, tmp_path, "alice")
    path = tmp_path / "ids" / "alice.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert json.loads(path.read_text())["uuid"] == uuid
    again = await run(tmp_path, "register", "alice", "--url", url_of(relayd))
    assert again.returncode == 2
    assert b"registered already" in again.stderr
    assert again.stdout == b""


async def test_send_and_listen_talk_through_relayd_in_json_lines(
    relayd: RunningRelayd, tmp_path: Path
) -> None:
    alice = await register(relayd, tmp_path, "alice")
    await register(relayd, tmp_path, "bob")
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            # Started in a nursery, the listener is killed if the deadline passes.
            listen = functools.partial(
                trio.run_process,
                command(tmp_path, "listen", "--as", "bob", "--count", "2"),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                check=False,
            )
            listener: trio.Process = await nursery.start(listen)
            # To bob by name; each stdin line a message; waits until each is acknowledged,
            # the last one by a listener that exits right after acknowledging it.
            sent = await run(
                tmp_path, "send", "--as", "alice", "bob", "--wait", "final", stdin=b"one\ntwo\n"
            )
            assert listener.stdout is not None
            output = b""
            async for chunk in listener.stdout:
                output += chunk
            assert await listener.wait() == 0
    assert sent.returncode == 0, sent.stderr
    receipts = json_lines(sent.stdout)
    assert [(r["type"], r["status"], r["final"]) for r in receipts] == [
        ("receipt", "acknowledged", True)
    ] * 2
    messages = json_lines(output)
    assert [(m["type"], m["from"], m["content"]) for m in messages] == [
        ("message", alice, "one"),
        ("message", alice, "two"),
    ]
    assert [m["msgid"] for m in messages] == [r["msgid"] for r in receipts]


async def test_send_to_no_such_client_exits_4_with_the_rejection(
    relayd: RunningRelayd, tmp_path: Path
) -> None:
    await register(relayd, tmp_path, "alice")
    nobody = "00000000-0000-4000-8000-000000000000"
    sent = await run(tmp_path, "send", "--as", "alice", nobody, "hello?")
    assert sent.returncode == 4
    [receipt] = json_lines(sent.stdout)
    assert (receipt["status"], receipt["reason"], receipt["to"]) == (
        "rejected",
        "unknown_recipient",
        nobody,
    )


async def test_exit_codes_for_identities_names_and_timeouts(
    relayd: RunningRelayd, tmp_path: Path
) -> None:
    missing = await run(tmp_path, "listen", "--as", "nobody", "--count", "1")
    assert missing.returncode == 3
    assert b"register the client first" in missing.stderr
    outside = await run(tmp_path, "listen", "--as", "../alice")
    assert outside.returncode == 2
    assert b"not a usable identity name" in outside.stderr
    await register(relayd, tmp_path, "alice")
    unknown = await run(tmp_path, "send", "--as", "alice", "carol", "hi")
    assert unknown.returncode == 2
    assert b"no client named 'carol'" in unknown.stderr
    quiet = await run(tmp_path, "listen", "--as", "alice", "--timeout", "0.5")
    assert quiet.returncode == 1
    assert quiet.stderr == b"relayd: --timeout: 0.5 s passed (0 messages)\n"
