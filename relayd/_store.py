"""The embedded SQLite store.

Theory of operation:

* One ``sqlite3`` connection, in WAL mode, opened in autocommit mode so that every transaction
  is explicit (``BEGIN IMMEDIATE`` ... ``COMMIT``).
* Every statement runs off the event loop through :meth:`Store._run`, which hands a plain
  function to the store's *executor*, one call at a time (a capacity limiter of one): there is
  exactly one writer, and no two threads ever use the connection at once. The default executor
  is ``trio.to_thread.run_sync``; tests that assert virtual time pass :func:`inline_executor` so
  the fake clock cannot jump while SQLite works. The SQL is the same either way.
* A call that has started is not abandoned when its caller is cancelled: it runs to its
  ``COMMIT`` or ``ROLLBACK``, so a cancelled request never leaves half a transaction behind.
* An ``await`` on a write returns only after the write is committed; with
  ``synchronous = full`` that commit is on disk.

The store is three sets of tables over that one connection: the clients'
(``relayd/_store_clients.py``), the messages' (``relayd/_store_messages.py``) and the topics'
(``relayd/_store_topics.py``); the schema
and its migrations are in ``relayd/_schema.py``.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from ._atrest import StoreKeys
from ._engine import ClientRecord as ClientRecord
from ._engine import FamilyRecord as FamilyRecord
from ._engine import InviteRecord as InviteRecord
from ._engine import KeyRecord as KeyRecord
from ._engine import MessageRecord as MessageRecord
from ._engine import Publication as Publication
from ._engine import RotateOutcome as RotateOutcome
from ._errors import SchemaTooNewError, StoreError
from ._schema import MIGRATIONS, SCHEMA_VERSION
from ._sqlite import Executor as Executor
from ._sqlite import inline_executor as inline_executor
from ._sqlite import thread_executor as thread_executor
from ._sqlite import transaction as transaction
from ._store_clients import SqliteClientStore
from ._store_messages import SqliteMessageStore, check_keys
from ._store_topics import SqliteTopicStore


def _migrate(db: sqlite3.Connection, path: str) -> int:
    version: int = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise SchemaTooNewError(
            f"{path}: schema version {version} is newer than this relayd understands "
            f"({SCHEMA_VERSION}); run a newer relayd, or restore the backup taken before the "
            "upgrade"
        )
    for target in range(version + 1, SCHEMA_VERSION + 1):
        try:
            db.executescript(
                f"BEGIN IMMEDIATE;\n{MIGRATIONS[target - 1]};\nPRAGMA user_version = {target};\n"
                "COMMIT;"
            )
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise StoreError(f"{path}: migration to schema version {target} failed: {exc}") from exc
    return version


def _connect(path: str, synchronous: str) -> sqlite3.Connection:
    if path != ":memory:":
        Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Created 0600 before SQLite touches it: it holds secret hashes and messages.
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot open the store: {exc}") from exc
    try:
        db.row_factory = sqlite3.Row
        if path != ":memory:":
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"{path}: cannot switch the store to WAL mode (got {mode})")
        db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        db.execute("PRAGMA foreign_keys = ON")
        # The admin CLI and `relayd backup` may hold the database briefly.
        db.execute("PRAGMA busy_timeout = 5000")
        _migrate(db, path)
    except sqlite3.DatabaseError as exc:
        db.close()
        raise StoreError(f"{path}: not a usable SQLite database: {exc}") from exc
    except BaseException:
        db.close()
        raise
    return db


def _connect_reader(path: str) -> sqlite3.Connection:
    """A read-only connection to the store's (migrated) file, for reads beside the writer."""
    try:
        uri = Path(path).absolute().as_uri() + "?mode=ro"  # quoted: any file name will do
        reader = sqlite3.connect(uri, uri=True, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot open the store for reading: {exc}") from exc
    reader.row_factory = sqlite3.Row
    reader.execute("PRAGMA busy_timeout = 5000")
    return reader


class Store(SqliteClientStore, SqliteMessageStore, SqliteTopicStore):
    """relayd's durable state in one SQLite file. Open it with :meth:`Store.open`."""

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        path: str,
        *,
        synchronous: str = "full",
        executor: Executor = thread_executor,
        keys: StoreKeys | None = None,
    ) -> AsyncIterator[Store]:
        """Open (creating and migrating as needed) and close the store. With ``keys``,
        message content is encrypted: the keys are checked against the rows (every key a row
        needs is there, and decrypts it) and rows stored in plain text before are sealed.

        Raises:
            SchemaTooNewError: the database was written by a newer relayd.
            StoreError: the file cannot be opened, is not SQLite, or a migration failed.
            UndecryptableRow: ``keys`` lack a key that rows need, or hold a wrong one.
        """
        db = await executor(_connect, path, synchronous)
        reader: sqlite3.Connection | None = None
        try:
            if keys is not None:
                await executor(check_keys, db, keys)
            if path != ":memory:":
                reader = await executor(_connect_reader, path)
        except BaseException:
            await executor(db.close)
            raise
        store = cls(db, path, executor, keys, reader)
        try:
            yield store
        finally:
            with trio.CancelScope(shield=True):
                # Closing waits for a call in flight; the limiter bounds it to that one call.
                with trio.move_on_after(30):
                    async with store._limiter:
                        await executor(db.close)
                    if reader is not None:
                        async with store._read_limiter:
                            await executor(reader.close)

    async def schema_version(self) -> int:
        return await self._run(lambda db: int(db.execute("PRAGMA user_version").fetchone()[0]))
