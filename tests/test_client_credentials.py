"""The credentials file (``relayd.client._credentials``): readable by its owner only, written
atomically, used by one client at a time, secrets never in a repr."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from relayd.client import (
    CredentialFile,
    Credentials,
    CredentialsError,
    CredentialsInUse,
    MemoryCredentials,
    TokenPair,
)

PAIR = TokenPair(
    access_token="access-SECRET",
    refresh_token="refresh-SECRET",
    access_expires_at=1900.0,
    access_issued_at=1000.0,
    refresh_expires_at=90_000.0,
)
ALICE = Credentials(
    url="http://127.0.0.1:8000",
    uuid="8cb0dec9-9342-4eba-89f7-28f97513c0c5",
    name="alice",
    client_secret="client-SECRET",
    tokens=PAIR,
)


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(
    "credentials",
    [ALICE, attrs.evolve(ALICE, refresh_in_flight=True), ALICE.with_tokens(None)],
    ids=["tokens", "refresh-in-flight", "no-tokens"],
)
def test_saved_credentials_load_back_equal(tmp_path: Path, credentials: Credentials) -> None:
    store = CredentialFile(tmp_path / "alice.json")
    store.save_sync(credentials)
    assert store.load_sync() == credentials


@pytest.mark.usefixtures("umask_022")
def test_the_file_and_a_new_directory_are_the_owners_only(tmp_path: Path) -> None:
    store = CredentialFile(tmp_path / "clients" / "alice.json")
    store.save_sync(ALICE)
    assert mode(store.path) == 0o600
    assert mode(store.path.parent) == 0o700
    store.save_sync(ALICE)  # and again, replacing it
    assert mode(store.path) == 0o600


@pytest.mark.parametrize("others", [0o640, 0o604, 0o620, 0o610, 0o644])
def test_a_file_others_can_use_is_refused(tmp_path: Path, others: int) -> None:
    store = CredentialFile(tmp_path / "alice.json")
    store.save_sync(ALICE)
    store.path.chmod(others)
    with pytest.raises(CredentialsError, match=f"readable by others \\(mode {others:04o}\\)"):
        store.load_sync()


def test_a_write_replaces_the_file_and_never_writes_it_in_place(tmp_path: Path) -> None:
    store = CredentialFile(tmp_path / "alice.json")
    store.save_sync(ALICE)
    before = os.stat(store.path).st_ino
    # An open reader of the old file keeps reading the old, whole document.
    with store.path.open("rb") as reader:
        store.save_sync(ALICE.with_tokens(None))
        assert json.loads(reader.read())["tokens"]["refresh_token"] == "refresh-SECRET"
    assert os.stat(store.path).st_ino != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alice.json"]


def test_a_write_that_fails_leaves_the_old_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CredentialFile(tmp_path / "alice.json")
    store.save_sync(ALICE)

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        store.save_sync(ALICE.with_tokens(None))
    monkeypatch.undo()
    assert store.load_sync() == ALICE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alice.json"]


def test_missing_and_malformed_files_say_what_is_wrong(tmp_path: Path) -> None:
    store = CredentialFile(tmp_path / "alice.json")
    with pytest.raises(CredentialsError, match="register the client first"):
        store.load_sync()
    fd = os.open(store.path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"{not json")
    os.close(fd)
    with pytest.raises(CredentialsError, match="not JSON"):
        store.load_sync()
    doc = ALICE.to_json()
    del doc["client_secret"]
    store.path.write_text(json.dumps(doc))
    with pytest.raises(CredentialsError, match="client_secret"):
        store.load_sync()
    store.path.write_text(json.dumps({**ALICE.to_json(), "uuid": ""}))
    with pytest.raises(CredentialsError, match="uuid must be a non-empty string"):
        store.load_sync()


def test_one_client_at_a_time_in_this_process(tmp_path: Path) -> None:
    first = CredentialFile(tmp_path / "alice.json")
    second = CredentialFile(tmp_path / "alice.json")
    first.acquire_sync()
    with pytest.raises(CredentialsInUse, match="already in use by this client"):
        first.acquire_sync()
    with pytest.raises(CredentialsInUse, match="in use by another client"):
        second.acquire_sync()
    first.release_sync()
    second.acquire_sync()
    second.release_sync()
    assert mode(first.lock_path) == 0o600


def test_one_client_at_a_time_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "alice.json"
    holder = (
        "import sys\n"
        "from relayd.client import CredentialFile\n"
        "CredentialFile(sys.argv[1]).acquire_sync()\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", holder, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        assert process.stdin is not None
        assert process.stdout.readline() == "held\n"
        with pytest.raises(CredentialsInUse, match="in use by another client"):
            CredentialFile(path).acquire_sync()
        process.stdin.close()  # the holder exits, and its lock goes with it
        assert process.wait(timeout=30) == 0
    store = CredentialFile(path)
    store.acquire_sync()
    store.release_sync()


async def test_memory_credentials_are_used_by_one_client_at_a_time() -> None:
    store = MemoryCredentials(ALICE)
    await store.acquire()
    with pytest.raises(CredentialsInUse):
        await store.acquire()
    await store.release()
    await store.acquire()


def test_no_secret_in_a_repr() -> None:
    text = repr(ALICE) + repr(PAIR) + repr(ALICE.with_tokens(PAIR))
    assert "SECRET" not in text
    assert "alice" in text


def test_an_identity_by_name_lives_under_xdg_config_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert CredentialFile.named("alice").path == tmp_path / "relayd" / "clients" / "alice.json"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".config" / "relayd" / "clients" / "alice.json"
    assert CredentialFile.named("alice").path == expected


@pytest.mark.parametrize("name", ["", "../alice", "a/b", ".hidden", "nul\0"])
def test_an_identity_name_that_is_not_a_plain_file_name_is_refused(name: str) -> None:
    with pytest.raises(CredentialsError, match="not a usable identity name"):
        CredentialFile.named(name)
