"""The store: migrations and file safety (SQLite), and on every engine (the ``target``
fixture, tests/store_support.py): clients, refresh families, revocations, invites, the queue.
"""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import attrs
import pytest
import trio

from relayd._atrest import RowId, StoreKeys
from relayd._errors import SchemaTooNewError, StoreError
from relayd._relay.records import (
    Duplicate,
    Finish,
    Insert,
    Inserted,
    LoadQueue,
    LoadReceipts,
    Purge,
    QueuePage,
    Refused,
    Status,
    size_of,
)
from relayd._schema import MIGRATIONS, SCHEMA_VERSION
from relayd._store import ClientRecord, Store, inline_executor

from .store_support import Target
from .support import IO_DEADLINE

UUID_A = "0b6f3b0e-1c1e-4c39-9a59-3f0f8f0c0a01"
UUID_B = "0b6f3b0e-1c1e-4c39-9a59-3f0f8f0c0a02"


def client(uuid: str = UUID_A, *, at: float = 100.0, name: str = "alice") -> ClientRecord:
    return ClientRecord(
        uuid=uuid,
        name=name,
        secret_hash="scrypt$1024$8$1$c2FsdA$ZGlnZXN0",
        roles=("client",),
        created_at=at,
        tokens_valid_after=at,
    )


def user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        version: int = db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()
    return version


def set_user_version(path: Path, version: int) -> None:
    db = sqlite3.connect(path)
    try:
        db.execute(f"PRAGMA user_version = {version}")
        db.commit()
    finally:
        db.close()


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def tables(path: Path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    finally:
        db.close()
    return {name for (name,) in rows}


# --- opening, migrations, file safety ----------------------------------------------------------


async def test_an_empty_store_opens_at_the_schema_version(target: Target) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            assert await store.schema_version() == target.schema_version
            assert await store.list_clients() == []


async def test_migrations_bring_an_empty_file_to_the_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "relayd.sqlite3"
    with trio.fail_after(IO_DEADLINE):
        async with Store.open(str(path)) as store:
            assert await store.schema_version() == SCHEMA_VERSION
    assert user_version(path) == SCHEMA_VERSION
    assert {"clients", "refresh_families", "revoked_tokens"} <= tables(path)


async def test_migrating_an_empty_file_sets_user_version(tmp_path: Path) -> None:
    path = tmp_path / "empty.sqlite3"
    path.touch()
    assert user_version(path) == 0
    with trio.fail_after(IO_DEADLINE):
        async with Store.open(str(path)) as store:
            assert await store.schema_version() == SCHEMA_VERSION
    assert user_version(path) == SCHEMA_VERSION


async def test_reopening_is_idempotent(persistent_target: Target) -> None:
    target = persistent_target
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            assert await store.insert_client(client()) == "inserted"
        for _ in range(2):
            async with target.open() as store:
                assert await store.schema_version() == target.schema_version
                assert await store.get_client(UUID_A) == client()
                assert [c.uuid for c in await store.list_clients()] == [UUID_A]
    if target.engine == "sqlite":
        assert user_version(Path(target.location)) == SCHEMA_VERSION


async def test_newer_schema_is_refused_with_the_path(tmp_path: Path) -> None:
    path = tmp_path / "from-the-future.sqlite3"
    set_user_version(path, SCHEMA_VERSION + 1)
    with trio.fail_after(IO_DEADLINE), pytest.raises(SchemaTooNewError) as exc_info:
        async with Store.open(str(path)):
            pytest.fail("the store opened")  # pragma: no cover
    message = str(exc_info.value)
    assert str(path) in message
    assert str(SCHEMA_VERSION + 1) in message
    # Nothing was migrated or otherwise written.
    assert user_version(path) == SCHEMA_VERSION + 1
    assert tables(path) == set()


async def test_newer_schema_is_refused_inline_too(tmp_path: Path) -> None:
    path = tmp_path / "newer.sqlite3"
    set_user_version(path, SCHEMA_VERSION + 7)
    with trio.fail_after(IO_DEADLINE), pytest.raises(SchemaTooNewError, match="newer"):
        async with Store.open(str(path), executor=inline_executor):
            pytest.fail("the store opened")  # pragma: no cover


async def test_non_sqlite_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"this is not a SQLite database, just some text.\n" * 100)
    with trio.fail_after(IO_DEADLINE), pytest.raises(StoreError) as exc_info:
        async with Store.open(str(path)):
            pytest.fail("the store opened")  # pragma: no cover
    assert not isinstance(exc_info.value, SchemaTooNewError)
    assert str(path) in str(exc_info.value)


async def test_store_file_is_created_0600_in_a_0700_directory(tmp_path: Path) -> None:
    path = tmp_path / "state" / "nested" / "relayd.sqlite3"
    with trio.fail_after(IO_DEADLINE):
        async with Store.open(str(path)) as store:
            assert await store.insert_client(client()) == "inserted"
            # The WAL file exists while the store is open; it must not be wider either.
            assert file_mode(Path(f"{path}-wal")) == 0o600
    assert file_mode(path) == 0o600
    assert file_mode(path.parent) == 0o700


async def test_file_store_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "relayd.sqlite3"
    with trio.fail_after(IO_DEADLINE):
        async with Store.open(str(path)):
            pass
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


# --- clients -------------------------------------------------------------------------------


async def test_insert_and_get_client(target: Target) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            assert await store.get_client(UUID_A) is None
            record = attrs.evolve(client(), roles=("client", "admin"))
            assert await store.insert_client(record) == "inserted"
            assert await store.get_client(UUID_A) == record


async def test_duplicate_uuid_is_refused(target: Target) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            assert await store.insert_client(client(name="alice")) == "inserted"
            assert await store.insert_client(client(name="mallory", at=200.0)) == "uuid_taken"
            found = await store.get_client(UUID_A)
            assert found is not None
            assert found.name == "alice"


async def test_deleted_uuid_stays_taken(target: Target) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            assert await store.insert_client(client()) == "inserted"
            assert await store.delete_client(UUID_A, 150.0)
            assert await store.insert_client(client(name="mallory", at=200.0)) == "uuid_taken"
            tombstone = await store.get_client(UUID_A)
            assert tombstone is not None
            assert tombstone.deleted_at == 150.0
            assert tombstone.secret_hash == ""
            assert tombstone.tokens_valid_after == 150.0
            assert tombstone.name == "alice"
            assert await store.list_clients() == []
            # Deleting twice, or deleting nobody, changes nothing.
            assert not await store.delete_client(UUID_A, 160.0)
            assert not await store.delete_client(UUID_B, 160.0)


async def test_last_seen_only_moves_forward(target: Target) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            assert await store.insert_client(client()) == "inserted"
            await store.set_last_seen({UUID_A: 300.0})
            # Another node, late (kept the newer); and nobody (nothing happens).
            await store.set_last_seen({UUID_A: 250.0, UUID_B: 300.0})
            found = await store.get_client(UUID_A)
            assert found is not None
            assert found.last_seen == 300.0
            assert await store.get_client(UUID_B) is None


async def test_list_clients_oldest_first(target: Target) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            assert await store.insert_client(client(UUID_B, at=1.0, name="bob")) == "inserted"
            assert await store.insert_client(client(UUID_A, at=2.0, name="alice")) == "inserted"
            assert [c.name for c in await store.list_clients()] == ["bob", "alice"]


# --- refresh families ------------------------------------------------------------------------


async def test_rotate_family_outcomes(target: Target) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            assert await store.insert_client(client()) == "inserted"
            await store.create_family("fam", UUID_A, "jti-1", 100.0, 1000.0)

            assert await store.rotate_family("fam", "jti-1", "jti-2", 110.0, 1110.0) == "rotated"
            family = await store.get_family("fam")
            assert family is not None
            assert (family.current_jti, family.expires_at, family.revoked_at) == (
                "jti-2",
                1110.0,
                None,
            )

            assert await store.rotate_family("fam", "jti-2", "jti-3", 120.0, 1120.0) == "rotated"
            assert await store.rotate_family("nope", "jti-3", "jti-4", 120.0, 1120.0) == "unknown"


async def test_reuse_revokes_the_family(target: Target) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            assert await store.insert_client(client()) == "inserted"
            await store.create_family("fam", UUID_A, "jti-1", 100.0, 1000.0)
            assert await store.rotate_family("fam", "jti-1", "jti-2", 110.0, 1110.0) == "rotated"

            # jti-1 was already rotated: presenting it again is reuse.
            assert await store.rotate_family("fam", "jti-1", "jti-x", 120.0, 1120.0) == "reused"
            family = await store.get_family("fam")
            assert family is not None
            assert family.revoked_at == 120.0
            assert family.current_jti == "jti-2"
            # The current token of the family is dead too.
            assert await store.rotate_family("fam", "jti-2", "jti-y", 130.0, 1130.0) == "revoked"
            assert await store.rotate_family("fam", "jti-1", "jti-z", 130.0, 1130.0) == "revoked"


async def test_revoke_family(target: Target) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            assert await store.insert_client(client()) == "inserted"
            await store.create_family("fam", UUID_A, "jti-1", 100.0, 1000.0)
            assert await store.revoke_family("fam", 105.0, "logout")
            assert not await store.revoke_family("fam", 106.0, "logout")
            assert not await store.revoke_family("nope", 106.0, "logout")
            family = await store.get_family("fam")
            assert family is not None
            assert family.revoked_at == 105.0
            assert await store.rotate_family("fam", "jti-1", "jti-2", 110.0, 1110.0) == "revoked"


async def test_deleting_a_client_removes_its_families(target: Target) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            assert await store.insert_client(client()) == "inserted"
            await store.create_family("fam", UUID_A, "jti-1", 100.0, 1000.0)
            assert await store.delete_client(UUID_A, 150.0)
            assert await store.get_family("fam") is None
            assert await store.rotate_family("fam", "jti-1", "jti-2", 160.0, 1160.0) == "unknown"


async def test_family_needs_an_existing_client(target: Target) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            # SQLite's foreign key says so in its own words; the Redis engine's script too.
            refusal = sqlite3.IntegrityError if target.engine == "sqlite" else StoreError
            with pytest.raises(refusal):
                await store.create_family("fam", UUID_A, "jti-1", 100.0, 1000.0)
            assert await store.get_family("fam") is None


async def test_revoke_client_tokens(target: Target) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            assert await store.insert_client(client(UUID_A, at=100.0)) == "inserted"
            assert await store.insert_client(client(UUID_B, at=100.0)) == "inserted"
            await store.create_family("fa1", UUID_A, "a1", 100.0, 1000.0)
            await store.create_family("fa2", UUID_A, "a2", 100.0, 1000.0)
            await store.create_family("fb1", UUID_B, "b1", 100.0, 1000.0)

            assert await store.revoke_client_tokens(UUID_A, 150.0)
            found = await store.get_client(UUID_A)
            assert found is not None
            assert found.tokens_valid_after == 150.0
            for name in ("fa1", "fa2"):
                family = await store.get_family(name)
                assert family is not None
                assert family.revoked_at == 150.0
            assert await store.rotate_family("fa1", "a1", "a1'", 160.0, 1160.0) == "revoked"
            # The other client is untouched.
            other = await store.get_client(UUID_B)
            assert other is not None
            assert other.tokens_valid_after == 100.0
            assert await store.rotate_family("fb1", "b1", "b1'", 160.0, 1160.0) == "rotated"


async def test_set_secret_with_and_without_revoking(target: Target) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            assert await store.insert_client(client(at=100.0)) == "inserted"
            await store.create_family("fa1", UUID_A, "a1", 100.0, 1000.0)
            assert await store.set_secret(UUID_A, "scrypt$new", revoke_at=None)
            found = await store.get_client(UUID_A)
            assert found is not None
            assert (found.secret_hash, found.tokens_valid_after) == ("scrypt$new", 100.0)
            assert await store.rotate_family("fa1", "a1", "a2", 110.0, 1110.0) == "rotated"
            assert await store.set_secret(UUID_A, "scrypt$newer", revoke_at=150.0)
            found = await store.get_client(UUID_A)
            assert found is not None
            assert (found.secret_hash, found.tokens_valid_after) == ("scrypt$newer", 150.0)
            assert await store.rotate_family("fa1", "a2", "a3", 160.0, 1160.0) == "revoked"
            assert await store.delete_client(UUID_A, 170.0)
            assert not await store.set_secret(UUID_A, "scrypt$ghost", revoke_at=None)
            assert not await store.set_secret(UUID_B, "scrypt$ghost", revoke_at=None)
            tombstone = await store.get_client(UUID_A)
            assert tombstone is not None
            assert tombstone.secret_hash == ""


async def test_an_invite_is_spent_once_with_the_client_it_made(target: Target) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            made = await store.create_invite("i1", by="op", at=100.0, expires_at=200.0, max_open=5)
            assert made
            assert await store.insert_client(client(at=150.0), invite="nope") == "invite_invalid"
            assert await store.get_client(UUID_A) is None  # rolled back with the invite
            assert await store.insert_client(client(at=150.0), invite="i1") == "inserted"
            again = client(UUID_B, at=160.0, name="bob")
            assert await store.insert_client(again, invite="i1") == "invite_invalid"
            assert await store.get_client(UUID_B) is None
            (invite,) = await store.list_invites()
            assert (invite.used_at, invite.used_by) == (150.0, UUID_A)


async def test_an_invite_expires_and_a_taken_uuid_does_not_spend_it(target: Target) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            assert await store.insert_client(client(at=100.0)) == "inserted"
            await store.create_invite("i1", by="op", at=100.0, expires_at=200.0, max_open=5)
            taken = client(at=150.0, name="mallory")
            assert await store.insert_client(taken, invite="i1") == "uuid_taken"
            (invite,) = await store.list_invites()
            assert invite.used_at is None
            late = client(UUID_B, at=200.0, name="bob")
            assert await store.insert_client(late, invite="i1") == "invite_invalid"


async def test_open_invites_are_bounded_and_purged(target: Target) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            for i in range(2):
                assert await store.create_invite(
                    f"i{i}", by="op", at=100.0, expires_at=200.0, max_open=2
                )
            assert not await store.create_invite(
                "i2", by="op", at=100.0, expires_at=200.0, max_open=2
            )
            assert await store.insert_client(client(at=150.0), invite="i0") == "inserted"
            # A spent invite is no longer open; an expired one neither.
            assert await store.create_invite("i2", by="op", at=150.0, expires_at=300.0, max_open=2)
            assert await store.create_invite("i3", by="op", at=250.0, expires_at=400.0, max_open=2)
            assert await store.purge_invites(250.0, keep_spent=1000.0) == 1  # i1 expired
            assert {i.id for i in await store.list_invites()} == {"i0", "i2", "i3"}
            assert await store.purge_invites(1200.0, keep_spent=1000.0) == 3
            assert await store.list_invites() == []


async def test_revoke_client_tokens_never_moves_backwards(target: Target) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            assert await store.insert_client(client(at=100.0)) == "inserted"
            assert await store.revoke_client_tokens(UUID_A, 150.0)
            assert await store.revoke_client_tokens(UUID_A, 120.0)
            found = await store.get_client(UUID_A)
            assert found is not None
            assert found.tokens_valid_after == 150.0


async def test_revoke_client_tokens_of_unknown_or_deleted_client(target: Target) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            assert not await store.revoke_client_tokens(UUID_A, 150.0)
            assert await store.insert_client(client()) == "inserted"
            assert await store.delete_client(UUID_A, 160.0)
            assert not await store.revoke_client_tokens(UUID_A, 170.0)
            found = await store.get_client(UUID_A)
            assert found is not None
            assert found.tokens_valid_after == 160.0


async def test_purge_expired_families(target: Target) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            assert await store.insert_client(client()) == "inserted"
            await store.create_family("old", UUID_A, "j1", 0.0, 100.0)
            await store.create_family("edge", UUID_A, "j2", 0.0, 150.0)
            await store.create_family("new", UUID_A, "j3", 0.0, 200.0)
            assert await store.purge_expired_families(150.0) == 1
            assert await store.get_family("old") is None
            assert await store.get_family("edge") is not None
            assert await store.get_family("new") is not None
            assert await store.purge_expired_families(150.0) == 0
            assert await store.purge_expired_families(1000.0) == 2
            assert await store.get_family("new") is None


# --- revoked access tokens ---------------------------------------------------------------------


async def test_revoked_token_ids_purges_expired(target: Target) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            await store.revoke_token("j-old", "operator:ops", 10.0, 100.0)
            await store.revoke_token("j-edge", UUID_A, 10.0, 150.0)
            await store.revoke_token("j-new", UUID_A, 10.0, 200.0)
            # Revoking twice is harmless.
            await store.revoke_token("j-new", UUID_A, 20.0, 200.0)

            assert await store.revoked_token_ids(50.0) == {"j-old", "j-edge", "j-new"}
            assert await store.revoked_token_ids(150.0) == {"j-edge", "j-new"}
            # "j-old" is gone for good: asking about an earlier instant does not bring it back.
            assert await store.revoked_token_ids(0.0) == {"j-edge", "j-new"}
            assert await store.revoked_token_ids(1000.0) == set()


async def test_revoked_tokens_survive_reopening(persistent_target: Target) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with persistent_target.open() as store:
            await store.revoke_token("j1", UUID_A, 10.0, 100.0)
        async with persistent_target.open() as store:
            assert await store.revoked_token_ids(50.0) == {"j1"}


async def test_a_store_of_one_row_per_message_migrates_to_messages_and_deliveries(
    tmp_path: Path,
) -> None:
    """Schema 5 kept one row per message and recipient; 6 keeps the message once and a
    delivery per recipient. What waited, what was owed, what deduplication knew, the seq
    high-water mark and content sealed at rest all come through."""
    [index] = [i for i, m in enumerate(MIGRATIONS) if "CREATE TABLE deliveries" in m]
    path = tmp_path / "relayd.sqlite3"
    sealed = StoreKeys.from_bytes([("k1", bytes(range(32)))], "<test keys>")
    key_id, blob = sealed.seal(RowId(2, UUID_A, UUID_B, "m2"), '{"content": "secret"}')
    db = sqlite3.connect(path)
    try:
        for version, migration in enumerate(MIGRATIONS[:index], 1):
            db.executescript(f"BEGIN; {migration}; PRAGMA user_version = {version}; COMMIT;")
        for uuid, name in ((UUID_A, "alice"), (UUID_B, "bob")):
            db.execute(
                "INSERT INTO clients (uuid, name, secret_hash, roles, created_at,"
                " tokens_valid_after) VALUES (?, ?, 'x', 'client', 1.0, 1.0)",
                (uuid, name),
            )
        insert = (
            "INSERT INTO messages (seq, sender, msgid, recipient, high, acknowledge, fields,"
            " key_id, accepted_at, expires_at, attempts, status, reason, finished_at,"
            " receipt_pending) VALUES (?, ?, ?, ?, 0, 1, ?, ?, ?, 1e9, ?, ?, '', ?, ?)"
        )
        rows = [
            (1, UUID_A, "m1", UUID_B, '{"content": "plain"}', None, 10.0, 1, None, None, 0),
            (2, UUID_A, "m2", UUID_B, blob, key_id, 11.0, 0, None, None, 0),
            (3, UUID_B, "m3", UUID_A, "", None, 12.0, 1, "acknowledged", 13.0, 1),
            (7, UUID_B, "m7", UUID_A, "", None, 14.0, 1, "delivered", 15.0, 0),
        ]
        db.executemany(insert, rows)
        db.execute("DELETE FROM messages WHERE seq = 7")  # purged: 7 stays the high-water mark
        db.commit()
    finally:
        db.close()
    with trio.fail_after(IO_DEADLINE):
        async with Store.open(str(path), keys=sealed, executor=inline_executor) as store:
            assert await store.schema_version() == SCHEMA_VERSION
            assert await store.last_message_seq() == 7
            assert await store.queue_depths() == {UUID_B: 2}
            [page, receipts, duplicate] = await store.execute(
                [
                    LoadQueue(UUID_B, 0, 10, 1 << 20),
                    LoadReceipts(UUID_B, 0, 10),
                    attrs.evolve(queued(8), msgid="m1"),
                ],
                max_queued=10,
            )
            assert [(m.seq, m.msgid, m.fields, m.attempts) for m in page.rows] == [
                (1, "m1", '{"content": "plain"}', 1),
                (2, "m2", '{"content": "secret"}', 0),
            ]
            assert [(r.seq, r.msgid, r.status) for r in receipts] == [
                (3, "m3", Status.ACKNOWLEDGED)
            ]
            assert duplicate == Duplicate(1, None)
            # A new message continues above the high-water mark.
            assert await store.execute([queued(8)], max_queued=10) == [Inserted(8)]
            record = await store.message_record("m3", UUID_A)
            assert record is not None
            assert (record.seq, record.status) == (3, "acknowledged")
    assert "deliveries" in tables(path)


# --- the message queue --------------------------------------------------------------------------


def queued(seq: int, recipient: str = UUID_B, sender: str = UUID_A) -> Insert:
    return Insert(None, seq, sender, recipient, f"m{seq}", False, True, "{}", 1.0, 1e9)


async def test_queue_counts_follow_inserts_finishes_and_purges(target: Target) -> None:
    async with target.open() as store:
        await store.insert_client(client(UUID_A))
        await store.insert_client(client(UUID_B, name="bob"))
        outcomes = await store.execute([queued(s) for s in range(1, 5)], max_queued=3)
        assert [type(o) for o in outcomes] == [Inserted, Inserted, Inserted, Refused]
        assert outcomes[3] == Refused("queue_full")
        assert await store.queue_depths() == {UUID_B: 3}
        assert await store.queued_total() == 3
        await store.execute([Finish(1, Status.ACKNOWLEDGED, 2.0, False)], max_queued=3)
        assert await store.queue_depths() == {UUID_B: 2}
        # Room again: the fourth goes in, and a duplicate (m2 again, accepted anew) is not
        # counted twice.
        again = attrs.evolve(queued(5), msgid="m2")
        outcomes = await store.execute([queued(4), again], max_queued=3)
        assert [type(o) for o in outcomes] == [Inserted, Duplicate]
        assert await store.queued_total() == 3
        await store.execute([Purge(finished_before=3.0, receipts_before=3.0)], max_queued=3)
        assert await store.queue_depths() == {UUID_B: 3}
        # A message to nobody is refused as such, whatever the counts.
        assert await store.execute([queued(9, recipient="nobody")], max_queued=3) == [
            Refused("unknown_recipient")
        ]


async def test_a_queue_page_stops_at_its_limit_or_its_bytes_and_says_whether_more_wait(
    target: Target,
) -> None:
    fields = ['{"content": "%s"}' % ("x" * n) for n in (100, 100, 5000, 100)]
    sizes = [size_of(f) for f in fields]
    async with target.open() as store:
        await store.insert_client(client(UUID_A))
        await store.insert_client(client(UUID_B, name="bob"))
        inserts = [attrs.evolve(queued(seq), fields=f) for seq, f in enumerate(fields, 1)]
        await store.execute(inserts, max_queued=100)

        async def page(limit: int, max_bytes: int, after: int = 0) -> tuple[list[int], bool]:
            [result] = await store.execute(
                [LoadQueue(UUID_B, after, limit, max_bytes)], max_queued=1
            )
            assert isinstance(result, QueuePage)
            return [row.seq for row in result.rows], result.more

        everything = sum(sizes)
        assert await page(4, everything) == ([1, 2, 3, 4], False)
        assert await page(3, everything) == ([1, 2, 3], True)
        assert await page(2, everything, after=2) == ([3, 4], False)
        # Bytes: the rows that fit, and never fewer than one.
        assert await page(4, sizes[0] + sizes[1]) == ([1, 2], True)
        assert await page(4, sizes[0] + sizes[1] + sizes[2] - 1) == ([1, 2], True)
        assert await page(4, 1, after=2) == ([3], True)
        assert await page(4, 1, after=3) == ([4], False)
