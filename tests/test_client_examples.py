"""The SDK's examples (``contrib/examples``) run as a user runs them, against a real relayd."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from relayd.client import Client, CredentialFile, register

from .client_support import BACKENDS, registered, url_of
from .support import RunningRelayd

EXAMPLES = Path(__file__).resolve().parents[1] / "contrib" / "examples"
DEADLINE = 30.0
UUID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


@pytest.mark.parametrize("backend", BACKENDS)
async def test_two_clients_talk_and_the_sender_sees_the_acknowledgement(
    relayd: RunningRelayd, backend: str
) -> None:
    with trio.fail_after(DEADLINE):
        done = await trio.run_process(
            [
                sys.executable,
                str(EXAMPLES / "two_clients.py"),
                "--url",
                url_of(relayd),
                "--backend",
                backend,
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()
    got, receipts = done.stdout.decode().splitlines()
    assert re.fullmatch(f"bob got 'hello bob' from {UUID}", got)
    # Bob may have been offline (queued_offline) or online (pending_ack) when it arrived.
    assert re.fullmatch(
        r"alice's receipts: \['[a-z_]+', 'acknowledged'\] -> acknowledged", receipts
    )


async def test_the_echo_bot_answers_and_acknowledges(relayd: RunningRelayd, tmp_path: Path) -> None:
    url = url_of(relayd)
    # Registered where `relayd register echo` would keep it, under this XDG_CONFIG_HOME.
    config_home = tmp_path / "config"
    echo = await register(url, "echo", CredentialFile.named("echo", config_home / "relayd/clients"))
    alice_store = await registered(url, "alice")
    env = {**os.environ, "XDG_CONFIG_HOME": str(config_home)}
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            start = functools.partial(
                trio.run_process,
                [sys.executable, str(EXAMPLES / "echo.py"), "--as", "echo"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                env=env,
                check=False,
            )
            bot: trio.Process = await nursery.start(start)
            assert bot.stdout is not None
            banner = b""
            while not banner.endswith(b"\n"):
                chunk = await bot.stdout.receive_some()
                assert chunk, "the bot exited before its banner"
                banner += chunk
            assert banner.decode() == f"# echo ({echo.uuid}) echoes\n"
            async with Client(alice_store) as alice:
                handle = await alice.send(echo.uuid, "ping")
                answer = await alice.receive(timeout=DEADLINE)
                alice.ack(answer)
                final = await handle.result(timeout=DEADLINE)
            nursery.cancel_scope.cancel()  # the bot runs until stopped: stop it
    assert (answer.sender, answer.content, answer.conversation_id) == (
        echo.uuid,
        "ping",
        handle.msgid,
    )
    assert final.status == "acknowledged"
