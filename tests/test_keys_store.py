"""The key directory's storage, on every engine: who counts as a correspondent, the bounds on
readers, notices and history, deduplication of notices, deletion; and the SQLite migration that
adds it."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from relayd._relay.records import ClearKeyNotice, KeyNotice, LoadKeyNotices
from relayd._schema import MIGRATIONS, SCHEMA_VERSION
from relayd._store import KeyRecord, Publication, Store

from .store_support import AnyStore, Target, holds, redis_dump
from .support import IO_DEADLINE
from .test_store import client

OWNER = "0b6f3b0e-1c1e-4c39-9a59-3f0f8f0c0a01"
READERS = [f"0b6f3b0e-1c1e-4c39-9a59-3f0f8f0c0b{i:02d}" for i in range(4)]
UNBOUNDED = 1000


def key(seed: int, algorithm: str = "x25519") -> KeyRecord:
    raw = bytes([seed]) * 32
    return KeyRecord(algorithm, raw, hashlib.sha256(raw).hexdigest(), 0.0)


@pytest.fixture
async def store(target: Target) -> AsyncIterator[AnyStore]:
    with trio.fail_after(IO_DEADLINE):
        async with target.open() as store:
            for uuid in [OWNER, *READERS]:
                assert await store.insert_client(client(uuid))
            yield store


async def publish(
    store: AnyStore, *keys: KeyRecord, at: float, owner: str = OWNER, max_notices: int = UNBOUNDED
) -> Publication:
    publication = await store.publish_keys(
        owner, keys, at, max_superseded=UNBOUNDED, max_notices=max_notices
    )
    assert publication is not None
    return publication


async def read(
    store: AnyStore, reader: str, *, at: float, owner: str = OWNER, bound: int = 10
) -> None:
    assert await store.read_keys(owner, reader, at, max_readers=bound) is not None


async def owed(store: AnyStore, reader: str) -> list[KeyNotice]:
    [notices] = await store.execute([LoadKeyNotices(reader, 100)], max_queued=10)
    result: list[KeyNotice] = notices
    return result


async def test_readers_of_a_key_are_owed_its_change_and_the_owner_is_not(store: AnyStore) -> None:
    await publish(store, key(1), key(2, "ed25519"), at=1.0)
    await read(store, READERS[0], at=2.0)
    await read(store, OWNER, at=2.5)  # reading one's own keys makes no correspondent
    publication = await publish(store, key(3), key(2, "ed25519"), at=3.0)
    notice = KeyNotice(READERS[0], OWNER, "x25519", key(3).fingerprint, key(1).fingerprint, 3.0)
    assert publication == Publication(("x25519",), (notice,))
    assert await owed(store, READERS[0]) == [notice]
    assert await owed(store, OWNER) == []
    assert await owed(store, READERS[1]) == []


async def test_a_first_key_is_not_a_change(store: AnyStore) -> None:
    await read(store, READERS[0], at=1.0)
    publication = await publish(store, key(1), at=2.0)
    assert publication == Publication(("x25519",), ())
    assert await owed(store, READERS[0]) == []


async def test_readers_are_bounded_per_client_the_least_recent_forgotten(store: AnyStore) -> None:
    await publish(store, key(1), at=1.0)
    for i, reader in enumerate(READERS[:3]):
        await read(store, reader, at=2.0 + i, bound=2)
    await read(store, READERS[0], at=9.0, bound=2)  # read again: the most recent now
    publication = await publish(store, key(2), at=10.0)
    assert sorted(n.reader for n in publication.notices) == sorted([READERS[0], READERS[2]])
    assert await owed(store, READERS[1]) == []


async def test_notices_are_deduplicated_keeping_what_the_reader_was_last_told(
    store: AnyStore,
) -> None:
    await publish(store, key(1), at=1.0)
    await read(store, READERS[0], at=2.0)
    await publish(store, key(2), at=3.0)
    publication = await publish(store, key(3), at=4.0)
    latest = KeyNotice(READERS[0], OWNER, "x25519", key(3).fingerprint, key(1).fingerprint, 4.0)
    assert publication.notices == (latest,)
    assert await owed(store, READERS[0]) == [latest]


async def test_notices_are_bounded_per_reader_the_oldest_dropped(store: AnyStore) -> None:
    owners = READERS[1:4]
    for i, owner in enumerate(owners):
        await publish(store, key(1), at=1.0 + i, owner=owner)
        await read(store, READERS[0], at=5.0, owner=owner)
    for i, owner in enumerate(owners):
        await publish(store, key(2), at=10.0 + i, owner=owner, max_notices=2)
    assert [n.client for n in await owed(store, READERS[0])] == owners[1:]


async def test_a_notice_written_is_cleared_unless_a_newer_change_replaced_it(
    store: AnyStore,
) -> None:
    await publish(store, key(1), at=1.0)
    await read(store, READERS[0], at=2.0)
    [first] = (await publish(store, key(2), at=3.0)).notices
    [second] = (await publish(store, key(3), at=4.0)).notices
    await store.execute([ClearKeyNotice(first)], max_queued=10)
    assert await owed(store, READERS[0]) == [second]
    await store.execute([ClearKeyNotice(second)], max_queued=10)
    assert await owed(store, READERS[0]) == []


async def test_deleting_a_client_forgets_its_keys_its_readers_and_what_it_read(
    store: AnyStore, target: Target
) -> None:
    await publish(store, key(1), at=1.0)
    await publish(store, key(5), at=1.0, owner=READERS[1])
    await read(store, READERS[0], at=2.0)  # a reader of the owner
    await read(store, OWNER, at=2.0, owner=READERS[1])  # the owner reads another
    await publish(store, key(2), at=3.0)
    await publish(store, key(6), at=3.0, owner=READERS[1])
    assert await owed(store, OWNER) != []
    assert await store.delete_client(OWNER, 4.0)
    assert await store.read_keys(OWNER, READERS[0], 5.0, max_readers=10) is None
    assert await owed(store, READERS[0]) == []
    assert await owed(store, OWNER) == []

    if isinstance(store, Store):

        def rows(db: sqlite3.Connection) -> list[tuple[str, ...]]:
            query = (
                "SELECT 'key', client_uuid FROM client_keys UNION ALL"
                " SELECT 'reader', client_uuid || ' ' || reader_uuid FROM key_readers UNION ALL"
                " SELECT 'notice', client_uuid || ' ' || reader_uuid FROM key_notices"
            )
            return [tuple(r) for r in db.execute(query)]

        remaining = await store._run(rows)
        assert all(OWNER not in text for _, text in remaining), remaining
        assert ("key", READERS[1]) in remaining  # another client's keys are untouched
    else:
        dump = await redis_dump(target.location)
        mentions = {
            k for k, v in dump.items() if holds(k, OWNER.encode()) or holds(v, OWNER.encode())
        }
        assert mentions == {f"relayd:c:{OWNER}".encode()}  # its tombstone only
        assert f"relayd:keys:{READERS[1]}".encode() in dump  # another client's keys stay


async def test_unknown_clients_have_no_keys(store: AnyStore) -> None:
    unknown = "0b6f3b0e-1c1e-4c39-9a59-3f0f8f0c0aff"
    assert await store.read_keys(unknown, READERS[0], 1.0, max_readers=10) is None
    assert await store.publish_keys(unknown, [key(1)], 1.0, max_superseded=1, max_notices=1) is None


async def test_a_store_from_before_the_key_directory_migrates_to_it(tmp_path: Path) -> None:
    # The migration that adds the directory, found by what it creates: its number depends on
    # the migrations before it.
    [index] = [i for i, m in enumerate(MIGRATIONS) if "CREATE TABLE client_keys" in m]
    path = tmp_path / "relayd.sqlite3"
    db = sqlite3.connect(path)
    try:
        for version, migration in enumerate(MIGRATIONS[:index], 1):
            db.executescript(f"BEGIN; {migration}; PRAGMA user_version = {version}; COMMIT;")
        db.execute(
            "INSERT INTO clients (uuid, name, secret_hash, roles, created_at, tokens_valid_after)"
            " VALUES (?, 'alice', 'x', 'client', 1.0, 1.0)",
            (OWNER,),
        )
        db.commit()
    finally:
        db.close()
    with trio.fail_after(IO_DEADLINE):
        async with Store.open(str(path)) as store:
            assert await store.schema_version() == SCHEMA_VERSION
            await publish(store, key(1), at=2.0)
            [current] = await store.read_keys(OWNER, None, 3.0, max_readers=1) or []
            assert current.fingerprint == key(1).fingerprint
