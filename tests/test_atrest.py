"""Message content encrypted at rest (issue 15): the key file, the cipher, the store's checks at
start, and end to end: no content in the database, its WAL or a backup; a missing or wrong key
stops relayd; keys rotate and retire while relayd runs."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import trio

from relayd._atrest import (
    KeyFileError,
    RowId,
    StoreKeys,
    UndecryptableRow,
    load_store_keys,
    parse_key_file,
    render_key_file,
    write_key_file,
)
from relayd._engine import HistoryQuery
from relayd._relay.records import Insert, LoadQueue, QueuePage

from .store_support import (
    AnyStore,
    Target,
    at_rest_holding,
    files_holding,
    point_message_at,
    stored_messages,
)
from .support import IO_DEADLINE, Engine, RunningRelayd, make_config, start_relayd
from .test_admin import cli, config_file, file_config, queue_for
from .test_store import UUID_A, UUID_B, client
from .ws_support import ws_connect

KEY_1 = bytes(range(32))
KEY_2 = bytes(range(32, 64))
SECRET_TEXT = "the-launch-code-is-0000"


def keys(*pairs: tuple[str, bytes]) -> StoreKeys:
    return StoreKeys.from_bytes(list(pairs), "<test keys>")


# --- the key file -------------------------------------------------------------------------------


def test_a_key_file_round_trips() -> None:
    pairs = [("k2", KEY_2), ("k1", KEY_1)]
    text = render_key_file(pairs)
    assert parse_key_file(text, "f") == pairs
    assert parse_key_file("# only a comment\n\nk1 " + base64.b64encode(KEY_1).decode(), "f") == [
        ("k1", KEY_1)
    ]


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "holds no key"),
        ("# nothing\n", "holds no key"),
        ("k1\n", "line 1: expected"),
        ("k/1 " + base64.b64encode(KEY_1).decode(), "line 1: expected"),
        ("k1 not*base64", "line 1: the key is not base64"),
        ("k1 " + base64.b64encode(KEY_1[:16]).decode(), "the key is 16 bytes"),
        (
            "k1 {0}\nk1 {0}".format(base64.b64encode(KEY_1).decode()),
            "line 2: key id 'k1' appears twice",
        ),
    ],
)
def test_a_malformed_key_file_is_refused_naming_the_line(text: str, complaint: str) -> None:
    with pytest.raises(KeyFileError, match=complaint):
        parse_key_file(text, "f")


def test_the_default_key_file_is_generated_0600_once(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    first = load_store_keys(config, {})
    path = config.state_path / "store-keys"
    assert path.stat().st_mode & 0o777 == 0o600
    again = load_store_keys(config, {})
    assert again.raw == first.raw
    assert len(first.raw[first.current]) == 32


def test_a_configured_key_file_that_is_missing_is_an_error(tmp_path: Path) -> None:
    config = make_config(tmp_path, {"store": {"key_file": str(tmp_path / "nope")}})
    with pytest.raises(KeyFileError, match="no store key file"):
        load_store_keys(config, {})
    assert not (tmp_path / "nope").exists()


def test_a_systemd_credential_is_used_and_never_generated(tmp_path: Path) -> None:
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "relayd-store-keys").write_text(render_key_file([("cred", KEY_1)]))
    config = make_config(tmp_path)
    found = load_store_keys(config, {"CREDENTIALS_DIRECTORY": str(credentials)})
    assert found.current == "cred"
    assert not (config.state_path / "store-keys").exists()


# --- the cipher ---------------------------------------------------------------------------------


ROW = RowId(7, "alice", "bob", "m-7")


@pytest.mark.parametrize(
    "moved",
    [
        RowId(8, "alice", "bob", "m-7"),  # to another seq
        RowId(7, "alice", "mallory", "m-7"),  # to another recipient
        RowId(7, "mallory", "bob", "m-7"),  # from another sender
        RowId(7, "alice", "bob", "m-8"),  # another msgid
        RowId(7, "alicebo", "b", "m-7"),  # the same bytes, split otherwise
    ],
)
def test_a_row_opens_only_with_its_key_and_where_it_was_sealed(moved: RowId) -> None:
    k = keys(("k1", KEY_1))
    kid, blob = k.seal(ROW, SECRET_TEXT)
    assert kid == "k1"
    assert SECRET_TEXT.encode() not in blob
    assert k.open(ROW, "k1", blob) == SECRET_TEXT
    with pytest.raises(UndecryptableRow, match=f"message {moved.seq} does not decrypt"):
        k.open(moved, "k1", blob)
    with pytest.raises(UndecryptableRow, match="does not decrypt"):
        keys(("k1", KEY_2)).open(ROW, "k1", blob)  # a wrong key under the right id
    with pytest.raises(UndecryptableRow, match="which <test keys> lacks"):
        keys(("k2", KEY_2)).open(ROW, "k1", blob)
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(UndecryptableRow):
        k.open(ROW, "k1", tampered)


def test_a_reload_adds_keys_and_never_loses_or_changes_one() -> None:
    old = keys(("k1", KEY_1))
    fresh = keys(("k2", KEY_2))
    merged = old.merged(fresh)
    assert merged.current == "k2"
    _, blob = old.seal(ROW, "x")
    assert merged.open(ROW, "k1", blob) == "x"
    with pytest.raises(KeyFileError, match="key 'k1' changed"):
        old.merged(keys(("k1", KEY_2)))


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_rotating_keeps_the_key_file_s_owner(tmp_path: Path) -> None:
    """``relayd store-key rotate`` run as root (sudo) on the key file of a relayd that runs as
    its own user must leave the file that user's: else the daemon cannot read it, its reload
    fails and its next start stops on an unreadable key file."""
    path = tmp_path / "store-keys"
    path.write_text(render_key_file([("k1", KEY_1)]))
    path.chmod(0o600)
    os.chown(path, 4242, 4243)
    write_key_file(path, [("k2", KEY_2), ("k1", KEY_1)])
    kept = path.stat()
    assert (kept.st_uid, kept.st_gid, stat.S_IMODE(kept.st_mode)) == (4242, 4243, 0o600)


# --- the store ----------------------------------------------------------------------------------


def queued(seq: int, fields: str) -> Insert:
    return Insert(None, seq, UUID_A, UUID_B, f"m{seq}", False, True, fields, 1.0, 1e9)


async def load(store: AnyStore) -> list[str]:
    [page] = await store.execute([LoadQueue(UUID_B, 0, 100, 1 << 20)], max_queued=1)
    assert isinstance(page, QueuePage)
    return [row.fields for row in page.rows]


async def test_the_store_keeps_only_ciphertext_and_loads_plain_text(engine_target: Target) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with engine_target.open(keys=keys(("k1", KEY_1))) as store:
            await store.insert_client(client(UUID_A))
            await store.insert_client(client(UUID_B, name="bob"))
            await store.execute([queued(1, f'{{"content": "{SECRET_TEXT}"}}')], max_queued=9)
            assert await load(store) == [f'{{"content": "{SECRET_TEXT}"}}']
            assert await store.keys_in_use() == {"k1": 1}
        [(seq, key_id, fields)] = await stored_messages(engine_target)
        assert (seq, key_id) == (1, "k1")
        assert SECRET_TEXT.encode() not in fields
        assert await at_rest_holding(engine_target, SECRET_TEXT.encode()) == []


async def test_opening_seals_rows_stored_in_plain_text_before(engine_target: Target) -> None:
    target = engine_target
    with trio.fail_after(IO_DEADLINE):
        async with target.open(keys=None) as store:  # as relayd before encryption at rest
            await store.insert_client(client(UUID_A))
            await store.insert_client(client(UUID_B, name="bob"))
            await store.execute([queued(1, SECRET_TEXT), queued(2, "two")], max_queued=9)
            assert await store.keys_in_use() == {None: 2}
        assert (await stored_messages(target))[0][1:] == (None, SECRET_TEXT.encode())
        assert await at_rest_holding(target, SECRET_TEXT.encode()) != []  # the check finds it
        async with target.open(keys=keys(("k1", KEY_1))) as store:
            # Nowhere at rest once the store is open: for SQLite, before any close
            # checkpoints the WAL: not in the database's freed space, not in older WAL frames.
            assert await at_rest_holding(target, SECRET_TEXT.encode()) == []
            assert await load(store) == [SECRET_TEXT, "two"]
            assert await store.keys_in_use() == {"k1": 2}
        rows = await stored_messages(target)
        assert [row[1] for row in rows] == ["k1", "k1"]
        assert all(SECRET_TEXT.encode() not in row[2] for row in rows)


async def test_a_row_pointed_at_another_recipient_does_not_decrypt(engine_target: Target) -> None:
    """Whoever can write the store but has no key (a restored or tampered backup, a shared
    volume, a Redis server's other users) must not turn that into reading content: pointing a
    queued row at their own client must not deliver it to them in plain text. The docs promise
    a ciphertext copied to another row does not decrypt; the same must hold for the row's
    routing."""
    with trio.fail_after(IO_DEADLINE):
        async with engine_target.open(keys=keys(("k1", KEY_1))) as store:
            await store.insert_client(client(UUID_A))
            await store.insert_client(client(UUID_B, name="bob"))
            await store.execute([queued(1, SECRET_TEXT)], max_queued=9)  # A to B
        await point_message_at(engine_target, 1, UUID_A)
        with pytest.raises(UndecryptableRow):
            async with engine_target.open(keys=keys(("k1", KEY_1))) as store:
                await store.execute([LoadQueue(UUID_A, 0, 100, 1 << 20)], max_queued=1)
        # Nor in history.
        with pytest.raises(UndecryptableRow):
            async with engine_target.open(keys=keys(("k1", KEY_1))) as store:
                await store.history(HistoryQuery(UUID_A))


async def test_a_missing_or_wrong_key_stops_the_store_at_open(engine_target: Target) -> None:
    target = engine_target
    with trio.fail_after(IO_DEADLINE):
        async with target.open(keys=keys(("k1", KEY_1))) as store:
            await store.insert_client(client(UUID_A))
            await store.insert_client(client(UUID_B, name="bob"))
            await store.execute([queued(1, SECRET_TEXT)], max_queued=9)
        with pytest.raises(UndecryptableRow, match="'k1', which <test keys> lacks"):
            async with target.open(keys=keys(("k2", KEY_2))):
                pass
        with pytest.raises(UndecryptableRow, match="does not decrypt with key 'k1'"):
            async with target.open(keys=keys(("k1", KEY_2))):
                pass
        # A store opened without keys (the admin tools) cannot read content, and says so.
        async with target.open(keys=None) as store:
            with pytest.raises(UndecryptableRow, match="no store key was loaded"):
                await load(store)


# --- end to end ---------------------------------------------------------------------------------


async def test_no_content_in_the_database_the_wal_or_a_backup(tmp_path: Path) -> None:
    state = tmp_path / "state"
    backup = tmp_path / "backup.sqlite3"
    async with trio.open_nursery() as nursery:
        relayd = await start_relayd(nursery, file_config(state))
        alice = await relayd.http.register("alice")
        bob = await relayd.http.register("bob")
        async with ws_connect(relayd, alice["access_token"]) as socket:
            await socket.next()
            for i in range(3):
                message = {"to": bob["uuid"], "msgid": f"m{i}", "content": f"{SECRET_TEXT}-{i}"}
                await socket.send({**message, "acknowledge": True})
                assert (await socket.next())["status"] == "queued_offline"
        config = config_file(tmp_path, state, "127.0.0.1:0")
        done = await cli("backup", str(backup), "--config", str(config))
        assert done.returncode == 0, done.stderr
        assert {p.name for p in state.iterdir()} >= {"relayd.sqlite3", "relayd.sqlite3-wal"}
        leaks = await trio.to_thread.run_sync(files_holding, tmp_path, SECRET_TEXT.encode())
        assert leaks == []
        # The content is all there for its recipient.
        async with ws_connect(relayd, bob["access_token"]) as socket:
            await socket.next()
            got = [await socket.next() for _ in range(3)]
            assert [m["content"] for m in got] == [f"{SECRET_TEXT}-{i}" for i in range(3)]
        relayd.daemon.stop()


async def start_fails(config: Any) -> BaseException:
    with pytest.raises(BaseException) as caught:  # noqa: PT011 - the leaf is checked below
        async with trio.open_nursery() as nursery:
            await start_relayd(nursery, config)
    leaf: BaseException = caught.value
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


async def test_relayd_will_not_start_without_the_key_its_messages_need(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with trio.open_nursery() as nursery:
        relayd = await start_relayd(nursery, file_config(state))
        alice = await relayd.http.register("alice")
        bob = await relayd.http.register("bob")
        await queue_for(relayd, alice, bob["uuid"], 1)
        relayd.daemon.stop()
    keyfile = state / "store-keys"
    saved = keyfile.read_text()
    # Lost: relayd makes a new key file, and refuses the rows the old key encrypted.
    keyfile.unlink()
    leaf = await start_fails(file_config(state))
    assert isinstance(leaf, UndecryptableRow)
    assert "lacks" in str(leaf)
    # Wrong: the same id, other bytes.
    kid = parse_key_file(saved, "saved")[0][0]
    keyfile.write_text(render_key_file([(kid, KEY_2)]))
    leaf = await start_fails(file_config(state))
    assert isinstance(leaf, UndecryptableRow)
    assert "does not decrypt" in str(leaf)
    # Configured but absent: a configuration error, nothing generated.
    elsewhere = tmp_path / "keys" / "store-keys"
    leaf = await start_fails(file_config(state, store={"key_file": str(elsewhere)}))
    assert isinstance(leaf, KeyFileError)
    # The right key again: everything is there.
    keyfile.write_text(saved)
    async with trio.open_nursery() as nursery:
        relayd = await start_relayd(nursery, file_config(state))
        login = await relayd.http.post(
            "/auth/token", {"uuid": bob["uuid"], "client_secret": bob["client_secret"]}
        )
        async with ws_connect(relayd, login.json()["access_token"]) as socket:
            await socket.next()
            assert (await socket.next())["msgid"] == "m0"
        relayd.daemon.stop()


async def key_status(relayd: RunningRelayd, config: Path) -> dict[str, int]:
    listed = await cli("store-key", "list", "--config", str(config))
    assert listed.returncode == 0, listed.stderr
    return {line.split()[0]: int(line.split()[2]) for line in listed.stdout.decode().splitlines()}


async def test_keys_rotate_and_retire_while_relayd_runs(tmp_path: Path, engine: Engine) -> None:
    state = tmp_path / "state"
    async with trio.open_nursery() as nursery:
        relayd = await start_relayd(nursery, file_config(state, engine))
        host, port = relayd.addresses.http
        config = config_file(tmp_path, state, f"{host}:{port}", engine)
        alice = await relayd.http.register("alice")
        bob = await relayd.http.register("bob")
        await queue_for(relayd, alice, bob["uuid"], 2)
        (old,) = await key_status(relayd, config)

        rotated = await cli("store-key", "rotate", "--config", str(config))
        assert rotated.returncode == 0, rotated.stderr
        new = rotated.stdout.decode().strip()
        # Not reloaded yet: the daemon still encrypts with the old key, which cannot go.
        refused = await cli("store-key", "retire", old, "--config", str(config))
        assert (refused.returncode, b"still encrypts with" in refused.stderr) == (1, True)
        relayd.daemon.reload(relayd.daemon.config)
        assert await key_status(relayd, config) == {new: 0, old: 2}
        # Two messages still need the old key.
        refused = await cli("store-key", "retire", old, "--config", str(config))
        assert (refused.returncode, b"2 stored messages" in refused.stderr) == (1, True)
        current = await cli("store-key", "retire", new, "--config", str(config))
        assert (current.returncode, b"is the current key" in current.stderr) == (1, True)

        async with ws_connect(relayd, alice["access_token"]) as sender:
            await sender.next()
            later = {"to": bob["uuid"], "msgid": "later", "acknowledge": True, "content": "new"}
            await sender.send(later)
            assert (await sender.next())["status"] == "queued_offline"
            assert await key_status(relayd, config) == {new: 1, old: 2}
            async with ws_connect(relayd, bob["access_token"]) as recipient:
                await recipient.next()
                for _ in range(3):
                    message = await recipient.next()
                    await recipient.send({"type": "ack", "msgid": message["msgid"]})
                acknowledged: set[str] = set()
                while len(acknowledged) < 3:
                    receipt = await sender.next()
                    assert receipt["msgid"] in {"m0", "m1", "later"}, receipt
                    if receipt["status"] == "acknowledged":
                        acknowledged.add(receipt["msgid"])
            # An acknowledgement's write may wait for the next urgent commit: this insert's,
            # whose receipt comes once it (and what waited for it) is committed.
            await sender.send({"to": bob["uuid"], "msgid": "last", "content": "new key"})
            assert (await sender.next())["status"] == "queued_offline"
        assert await key_status(relayd, config) == {new: 1, old: 0}
        retired = await cli("store-key", "retire", old, "--config", str(config))
        assert retired.returncode == 0, retired.stderr
        # Out of the file; the daemon keeps it in memory until it restarts.
        assert [kid for kid, _ in parse_key_file((state / "store-keys").read_text(), "f")] == [new]
        relayd.daemon.stop()

    # relayd starts without the retired key, and lists only the new one.
    async with trio.open_nursery() as nursery:
        relayd = await start_relayd(nursery, file_config(state, engine))
        host, port = relayd.addresses.http
        config = config_file(tmp_path, state, f"{host}:{port}", engine)
        assert await key_status(relayd, config) == {new: 1}
        relayd.daemon.stop()


async def test_a_reload_with_a_changed_key_keeps_the_running_keys(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    async with trio.open_nursery() as nursery:
        relayd = await start_relayd(nursery, file_config(state))
        store = relayd.daemon.services.store if relayd.daemon.services else None
        assert store is not None
        assert store.keys is not None
        before = store.keys
        keyfile = state / "store-keys"
        keyfile.write_text(render_key_file([(before.current, KEY_2)]))
        relayd.daemon.reload(relayd.daemon.config)
        assert store.keys is before
        assert "store keys not reloaded" in capfd.readouterr().err
        relayd.daemon.stop()
