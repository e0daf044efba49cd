"""``relayd register``, ``send`` and ``listen`` as real subprocesses against a real relayd.

relayd runs in-process on the test's Trio loop; the commands run as ``python -m relayd`` with
their identities in ``tmp_path``. Every wait is for a process's exit, under a deadline.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from .client_support import url_of
from .support import Engine, RunningRelayd, make_config, start_relayd

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


# --- end-to-end encryption ----------------------------------------------------------------------


async def keys(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return await run(tmp_path, "keys", *args)


async def test_encrypted_send_and_listen_with_published_and_pinned_keys(
    relayd: RunningRelayd, tmp_path: Path
) -> None:
    alice = await register(relayd, tmp_path, "alice")
    bob = await register(relayd, tmp_path, "bob")
    published = await keys(tmp_path, "publish", "--as", "bob")
    assert published.returncode == 0, published.stderr
    [key] = json_lines(published.stdout)
    assert (key["uuid"], key["algorithm"]) == (bob, "x25519")
    key_file = tmp_path / "ids" / "bob.e2e.json"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    public = base64.b64decode(json.loads(key_file.read_text())["keys"][0]["public"])
    assert key["fingerprint"] == hashlib.sha256(public).hexdigest()

    shown = await keys(tmp_path, "show", "--as", "alice", "bob")
    assert shown.returncode == 0, shown.stderr
    [listing] = json_lines(shown.stdout)
    assert [(k["algorithm"], k["fingerprint"]) for k in listing["keys"]] == [
        ("x25519", key["fingerprint"])
    ]
    assert (listing["pinned"], listing["pin_matches"]) == (None, True)

    sent = await run(tmp_path, "send", "--as", "alice", "--encrypt", "bob", "top secret")
    assert sent.returncode == 0, sent.stderr
    assert [r["status"] for r in json_lines(sent.stdout)] == ["queued_offline"]
    hub = relayd.daemon.hub
    assert hub is not None
    # As relayd itself reads it from its store, on either engine (its encryption at rest
    # undone): still sealed end to end.
    _, queued = await hub.store.undelivered(bob, 100)
    assert ["top secret" in message.fields for message in queued] == [False]

    listened = await run(tmp_path, "listen", "--as", "bob", "--count", "1")
    assert listened.returncode == 0, listened.stderr
    [message] = json_lines(listened.stdout)
    assert (message["from"], message["content"], message["encrypted"]) == (
        alice,
        "top secret",
        True,
    )

    # bob rotates: alice's pin no longer matches; she must trust the new key to send.
    rotated = await keys(tmp_path, "publish", "--as", "bob", "--rotate")
    [new] = json_lines(rotated.stdout)
    assert new["fingerprint"] != key["fingerprint"]
    stale = await keys(tmp_path, "show", "--as", "alice", "bob")
    assert stale.returncode == 5
    [listing] = json_lines(stale.stdout)
    assert (listing["pinned"], listing["pin_matches"]) == (key["fingerprint"], False)
    assert [k["fingerprint"] for k in listing["superseded"]] == [key["fingerprint"]]
    refused = await run(tmp_path, "send", "--as", "alice", "--encrypt", "bob", "again")
    assert refused.returncode == 5
    assert b"verify it with the peer" in refused.stderr
    assert refused.stdout == b""
    trusted = await keys(tmp_path, "trust", "--as", "alice", "bob", new["fingerprint"])
    assert trusted.returncode == 0, trusted.stderr
    again = await run(tmp_path, "send", "--as", "alice", "--encrypt", "bob", "again")
    assert again.returncode == 0, again.stderr


async def test_listen_prints_key_changes_of_correspondents(
    relayd: RunningRelayd, tmp_path: Path
) -> None:
    bob = await register(relayd, tmp_path, "bob")
    await register(relayd, tmp_path, "alice")
    [first] = json_lines((await keys(tmp_path, "publish", "--as", "bob")).stdout)
    assert (await keys(tmp_path, "show", "--as", "alice", "bob")).returncode == 0
    [second] = json_lines((await keys(tmp_path, "publish", "--as", "bob", "--rotate")).stdout)
    # alice was offline: the change waits for her, then a plain message ends the listen.
    await run(tmp_path, "send", "--as", "bob", "alice", "plain")
    listened = await run(tmp_path, "listen", "--as", "alice", "--count", "1")
    assert listened.returncode == 0, listened.stderr
    change, message = json_lines(listened.stdout)
    assert change == {
        "type": "key_changed",
        "client": bob,
        "algorithm": "x25519",
        "fingerprint": second["fingerprint"],
        "previous_fingerprint": first["fingerprint"],
        "changed_at": change["changed_at"],
    }
    assert (message["content"], "encrypted" in message) == ("plain", False)


async def test_encrypting_to_a_peer_without_a_key_exits_2(
    relayd: RunningRelayd, tmp_path: Path
) -> None:
    await register(relayd, tmp_path, "alice")
    bob = await register(relayd, tmp_path, "bob")
    sent = await run(tmp_path, "send", "--as", "alice", "--encrypt", "bob", "hi")
    assert sent.returncode == 2
    assert f"{bob} has published no x25519 key".encode() in sent.stderr
    assert sent.stdout == b""


async def test_register_with_an_invite_where_registration_is_invite_only(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start_relayd(
        nursery, make_config(tmp_path, {"auth": {"registration": "invite"}}, engine)
    )
    refused = await run(tmp_path, "register", "alice", "--url", url_of(relayd))
    assert refused.returncode != 0
    assert b"invite_required" in refused.stderr
    assert not (tmp_path / "ids" / "alice.json").exists()
    services = relayd.daemon.services
    assert services is not None
    code, _ = await services.auth.mint_invite(by="operator:test", ttl=None)
    done = await run(tmp_path, "register", "alice", "--url", url_of(relayd), "--invite", code)
    assert done.returncode == 0, done.stderr
    assert json_lines(done.stdout)[0]["name"] == "alice"
    spent = await run(tmp_path, "register", "bob", "--url", url_of(relayd), "--invite", code)
    assert b"invite_invalid" in spent.stderr
