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
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

import trio

from ._atrest import RowId, StoreKeys, UndecryptableRow
from ._engine import ClientRecord as ClientRecord
from ._engine import FamilyRecord as FamilyRecord
from ._engine import InviteRecord as InviteRecord
from ._engine import KeyRecord as KeyRecord
from ._engine import MessageRecord as MessageRecord
from ._engine import Publication as Publication
from ._engine import RotateOutcome as RotateOutcome
from ._errors import SchemaTooNewError, StoreError, StoreUnavailable
from ._relay.records import (
    ClearKeyNotice,
    Duplicate,
    FindExpired,
    Finish,
    Insert,
    Inserted,
    InsertOutcome,
    KeyNotice,
    LoadKeyNotices,
    LoadQueue,
    LoadReceipts,
    Purge,
    QueuePage,
    RecentMessage,
    Refused,
    SetAttempts,
    SetReceiptPending,
    Status,
    StoredMessage,
    StoredReceipt,
    StoreOp,
    size_of,
)
from ._schema import MIGRATIONS, SCHEMA_VERSION

T = TypeVar("T")
Executor = Callable[..., Awaitable[Any]]


async def inline_executor(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` on the event loop thread. For tests under a fake clock."""
    await trio.lowlevel.checkpoint()
    return fn(*args)


async def thread_executor(fn: Callable[..., T], *args: Any) -> T:
    return await trio.to_thread.run_sync(fn, *args)


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` if the body raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _client(row: sqlite3.Row) -> ClientRecord:
    return ClientRecord(
        uuid=row["uuid"],
        name=row["name"],
        secret_hash=row["secret_hash"],
        roles=tuple(row["roles"].split()),
        created_at=row["created_at"],
        tokens_valid_after=row["tokens_valid_after"],
        deleted_at=row["deleted_at"],
    )


class _InviteInvalid(Exception):
    """Rolls back a registration whose invite cannot be spent."""


def _spend_invite(db: sqlite3.Connection, invite: str, client: ClientRecord) -> bool:
    cursor = db.execute(
        "UPDATE invites SET used_at = ?, used_by = ?"
        " WHERE id = ? AND used_at IS NULL AND expires_at > ?",
        (client.created_at, client.uuid, invite, client.created_at),
    )
    return cursor.rowcount == 1


def _revoke_client_tokens(db: sqlite3.Connection, uuid: str, at: float, reason: str) -> bool:
    cursor = db.execute(
        "UPDATE clients SET tokens_valid_after = max(tokens_valid_after, ?)"
        " WHERE uuid = ? AND deleted_at IS NULL",
        (at, uuid),
    )
    db.execute(
        "UPDATE refresh_families SET revoked_at = ?, revoked_reason = ?"
        " WHERE client_uuid = ? AND revoked_at IS NULL",
        (at, reason, uuid),
    )
    return cursor.rowcount == 1


# What decrypting a row needs: its fields, their key, and what they are bound to.
_SEALED_COLUMNS = "id, sender, address, msgid, fields, key_id"


def _check_keys(db: sqlite3.Connection, keys: StoreKeys) -> int:
    """Every key the rows need is in ``keys`` and decrypts one of its rows; then rows still
    in plain text (written before encryption at rest) are sealed. Returns how many.

    Raises:
        UndecryptableRow: naming the key that is missing or wrong.
    """
    first_of_each_key = db.execute(
        "SELECT min(id) FROM messages WHERE key_id IS NOT NULL GROUP BY key_id"
    ).fetchall()
    for (id_,) in first_of_each_key:
        row = db.execute(f"SELECT {_SEALED_COLUMNS} FROM messages WHERE id = ?", (id_,))
        _fields(row.fetchone(), keys)
    plain = db.execute(
        f"SELECT {_SEALED_COLUMNS} FROM messages WHERE key_id IS NULL AND fields != ''"
    ).fetchall()
    if not plain:
        return 0
    # The plain text must not stay behind in freed space, nor in the WAL's older frames.
    (secure_delete,) = db.execute("PRAGMA secure_delete").fetchone()
    db.execute("PRAGMA secure_delete = ON")
    try:
        with transaction(db):
            db.executemany(
                "UPDATE messages SET key_id = ?, fields = ? WHERE id = ?",
                [(*keys.seal(row_id(row), row["fields"]), row["id"]) for row in plain],
            )
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.execute(f"PRAGMA secure_delete = {int(secure_delete)}")
    return len(plain)


def keys_in_use(db: sqlite3.Connection) -> dict[str | None, int]:
    """Messages per key id (``None``: plain text) among those that hold content."""
    rows = db.execute(
        "SELECT key_id, count(*) FROM messages WHERE fields != '' GROUP BY key_id"
    ).fetchall()
    return {row[0]: row[1] for row in rows}


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


class Store:
    """relayd's durable state. Open it with :meth:`Store.open`."""

    def __init__(
        self,
        db: sqlite3.Connection,
        path: str,
        executor: Executor,
        keys: StoreKeys | None = None,
    ) -> None:
        self._db = db
        self.path = path
        self._executor = executor
        self.keys = keys
        """Encrypt message content with these (``None``: plain text, for tests and tools
        that never read a message's fields)."""
        # One call at a time: the connection has exactly one user, the writer.
        self._limiter = trio.CapacityLimiter(1)
        # The highest seq reserve_seqs gave out: one process uses a SQLite file, so
        # reservations need not outlive it (a seq never stored may be given out again).
        self._reserved = 0

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
        try:
            if keys is not None:
                await executor(_check_keys, db, keys)
        except BaseException:
            await executor(db.close)
            raise
        store = cls(db, path, executor, keys)
        try:
            yield store
        finally:
            with trio.CancelScope(shield=True):
                # Closing waits for a call in flight; the limiter bounds it to that one call.
                with trio.move_on_after(30):
                    async with store._limiter:
                        await executor(db.close)

    async def _run(self, fn: Callable[[sqlite3.Connection], T], *, inline: bool = False) -> T:
        async with self._limiter:
            if inline:
                await trio.lowlevel.checkpoint()  # a checkpoint, as the executor's hand-off is
                return fn(self._db)
            result: T = await self._executor(fn, self._db)
            return result

    async def schema_version(self) -> int:
        return await self._run(lambda db: int(db.execute("PRAGMA user_version").fetchone()[0]))

    # --- clients --------------------------------------------------------------------------------

    async def insert_client(
        self, client: ClientRecord, *, invite: str | None = None
    ) -> Literal["inserted", "uuid_taken", "invite_invalid"]:
        """Insert a new client. ``"uuid_taken"`` if its UUID was ever registered (even if
        deleted). With ``invite`` (an invite's id), the invite is spent in the same transaction:
        ``"invite_invalid"`` if it is unknown, spent or expired, and nothing is inserted."""

        def insert(db: sqlite3.Connection) -> Literal["inserted", "uuid_taken", "invite_invalid"]:
            try:
                with transaction(db):
                    db.execute(
                        "INSERT INTO clients (uuid, name, secret_hash, roles, created_at,"
                        " tokens_valid_after) VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            client.uuid,
                            client.name,
                            client.secret_hash,
                            " ".join(client.roles),
                            client.created_at,
                            client.tokens_valid_after,
                        ),
                    )
                    if invite is not None and not _spend_invite(db, invite, client):
                        raise _InviteInvalid
            except sqlite3.IntegrityError:
                return "uuid_taken"
            except _InviteInvalid:
                return "invite_invalid"
            return "inserted"

        return await self._run(insert)

    async def rename_client(self, uuid: str, name: str) -> None:
        def update(db: sqlite3.Connection) -> None:
            with transaction(db):
                db.execute(
                    "UPDATE clients SET name = ? WHERE uuid = ? AND deleted_at IS NULL",
                    (name, uuid),
                )

        await self._run(update)

    async def set_roles(self, uuid: str, roles: tuple[str, ...]) -> bool:
        """Replace a live client's roles; ``False`` if there is no such live client."""

        def update(db: sqlite3.Connection) -> bool:
            with transaction(db):
                cursor = db.execute(
                    "UPDATE clients SET roles = ? WHERE uuid = ? AND deleted_at IS NULL",
                    (" ".join(roles), uuid),
                )
            return cursor.rowcount == 1

        return await self._run(update)

    async def set_secret(
        self,
        uuid: str,
        secret_hash: str,
        *,
        revoke_at: float | None,
        replacing: str | None = None,
        token_issued_at: float | None = None,
    ) -> bool:
        """Replace a live client's secret hash; with ``revoke_at``, also refuse every token
        issued before it and end its logins (as :meth:`revoke_client_tokens`), in the same
        transaction. The proof must still hold: with ``replacing``, that is still its hash
        (the one a secret was checked against); with ``token_issued_at``, a token issued then
        is not revoked. ``False`` if there is no such live client (or the proof no longer
        holds)."""

        def update(db: sqlite3.Connection) -> bool:
            with transaction(db):
                cursor = db.execute(
                    "UPDATE clients SET secret_hash = ? WHERE uuid = ? AND deleted_at IS NULL"
                    " AND secret_hash = coalesce(?, secret_hash)"
                    " AND tokens_valid_after <= coalesce(?, tokens_valid_after)",
                    (secret_hash, uuid, replacing, token_issued_at),
                )
                if cursor.rowcount == 1 and revoke_at is not None:
                    _revoke_client_tokens(db, uuid, revoke_at, "secret_reset")
            return cursor.rowcount == 1

        return await self._run(update)

    async def get_client(self, uuid: str) -> ClientRecord | None:
        """The client with this UUID, tombstones included (check ``deleted_at``)."""

        def query(db: sqlite3.Connection) -> ClientRecord | None:
            row = db.execute("SELECT * FROM clients WHERE uuid = ?", (uuid,)).fetchone()
            return None if row is None else _client(row)

        return await self._run(query)

    async def token_holder(self, uuid: str, family: str | None) -> tuple[ClientRecord | None, bool]:
        """The client with this UUID (tombstones included), and whether ``family`` is one of its
        logins that is still live (``True`` when ``family`` is ``None``): one read for the
        state an access token depends on."""

        def query(db: sqlite3.Connection) -> tuple[ClientRecord | None, bool]:
            row = db.execute("SELECT * FROM clients WHERE uuid = ?", (uuid,)).fetchone()
            if row is None or family is None:
                return (None if row is None else _client(row)), True
            live = db.execute(
                "SELECT 1 FROM refresh_families"
                " WHERE family = ? AND client_uuid = ? AND revoked_at IS NULL",
                (family, uuid),
            ).fetchone()
            return _client(row), live is not None

        return await self._run(query)

    async def list_clients(self) -> list[ClientRecord]:
        """Every live client, oldest first."""

        def query(db: sqlite3.Connection) -> list[ClientRecord]:
            rows = db.execute(
                "SELECT * FROM clients WHERE deleted_at IS NULL ORDER BY created_at, uuid"
            )
            return [_client(row) for row in rows]

        return await self._run(query)

    async def revoke_client_tokens(self, uuid: str, at: float) -> bool:
        """Refuse every token issued to the client before ``at``; end its refresh families."""

        def update(db: sqlite3.Connection) -> bool:
            with transaction(db):
                return _revoke_client_tokens(db, uuid, at, "client_revoked")

        return await self._run(update)

    async def delete_client(self, uuid: str, at: float) -> bool:
        """Turn the client into a tombstone: no secret, no tokens, no families."""

        def update(db: sqlite3.Connection) -> bool:
            with transaction(db):
                cursor = db.execute(
                    "UPDATE clients SET deleted_at = ?, secret_hash = '', tokens_valid_after = ?"
                    " WHERE uuid = ? AND deleted_at IS NULL",
                    (at, at, uuid),
                )
                db.execute("DELETE FROM refresh_families WHERE client_uuid = ?", (uuid,))
                if cursor.rowcount == 1:
                    _forget_keys(db, uuid)
            return cursor.rowcount == 1

        return await self._run(update)

    # --- refresh families -------------------------------------------------------------------

    async def create_family(
        self,
        family: str,
        client_uuid: str,
        jti: str,
        at: float,
        expires_at: float,
        *,
        secret_hash: str | None = None,
        token_issued_at: float | None = None,
    ) -> bool:
        """Store a new login. With ``secret_hash`` (the hash a login's secret was checked
        against), only while the client is live and still holds it; with
        ``token_issued_at`` (the iat of the token that proved it), only while tokens issued
        then are not revoked. ``False``, and nothing stored, if the proof no longer holds."""

        def insert(db: sqlite3.Connection) -> bool:
            with transaction(db):
                if secret_hash is not None or token_issued_at is not None:
                    holds = db.execute(
                        "SELECT 1 FROM clients WHERE uuid = ? AND deleted_at IS NULL"
                        " AND secret_hash = coalesce(?, secret_hash)"
                        " AND tokens_valid_after <= coalesce(?, tokens_valid_after)",
                        (client_uuid, secret_hash, token_issued_at),
                    ).fetchone()
                    if holds is None:
                        return False
                db.execute(
                    "INSERT INTO refresh_families (family, client_uuid, current_jti, created_at,"
                    " rotated_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (family, client_uuid, jti, at, at, expires_at),
                )
            return True

        return await self._run(insert)

    async def rotate_family(
        self, family: str, presented_jti: str, new_jti: str, at: float, expires_at: float
    ) -> RotateOutcome:
        """Rotate ``family`` from ``presented_jti`` to ``new_jti``, atomically.

        Returns ``"rotated"`` on success. If ``presented_jti`` is not the family's current one,
        the token was already rotated, so it is being *reused*: the family is revoked and
        ``"reused"`` returned. ``"revoked"``: the family was revoked before; ``"unknown"``: no
        such family (its client was deleted).
        """

        def update(db: sqlite3.Connection) -> RotateOutcome:
            with transaction(db):
                row = db.execute(
                    "SELECT current_jti, revoked_at FROM refresh_families WHERE family = ?",
                    (family,),
                ).fetchone()
                if row is None:
                    return "unknown"
                if row["revoked_at"] is not None:
                    return "revoked"
                if row["current_jti"] != presented_jti:
                    db.execute(
                        "UPDATE refresh_families SET revoked_at = ?, revoked_reason = 'reused'"
                        " WHERE family = ?",
                        (at, family),
                    )
                    return "reused"
                db.execute(
                    "UPDATE refresh_families SET current_jti = ?, rotated_at = ?, expires_at = ?"
                    " WHERE family = ?",
                    (new_jti, at, expires_at, family),
                )
                return "rotated"

        return await self._run(update)

    async def revoke_family(self, family: str, at: float, reason: str) -> bool:
        """Revoke one refresh family; ``False`` if it does not exist or was already revoked."""

        def update(db: sqlite3.Connection) -> bool:
            with transaction(db):
                cursor = db.execute(
                    "UPDATE refresh_families SET revoked_at = ?, revoked_reason = ?"
                    " WHERE family = ? AND revoked_at IS NULL",
                    (at, reason, family),
                )
            return cursor.rowcount == 1

        return await self._run(update)

    async def get_family(self, family: str) -> FamilyRecord | None:
        def query(db: sqlite3.Connection) -> FamilyRecord | None:
            row = db.execute(
                "SELECT family, client_uuid, current_jti, expires_at, revoked_at"
                " FROM refresh_families WHERE family = ?",
                (family,),
            ).fetchone()
            return None if row is None else FamilyRecord(*row)

        return await self._run(query)

    # --- revoked access tokens --------------------------------------------------------------

    async def revoke_token(self, jti: str, subject: str, at: float, expires_at: float) -> None:
        def insert(db: sqlite3.Connection) -> None:
            with transaction(db):
                db.execute(
                    "INSERT OR IGNORE INTO revoked_tokens (jti, subject, revoked_at, expires_at)"
                    " VALUES (?, ?, ?, ?)",
                    (jti, subject, at, expires_at),
                )

        await self._run(insert)

    async def revoked_token_ids(self, now: float) -> set[str]:
        """The jtis of revoked tokens that have not expired yet; purges the expired ones."""

        def query(db: sqlite3.Connection) -> set[str]:
            with transaction(db):
                db.execute("DELETE FROM revoked_tokens WHERE expires_at < ?", (now,))
                return {row[0] for row in db.execute("SELECT jti FROM revoked_tokens")}

        return await self._run(query)

    async def purge_expired_families(self, now: float) -> int:
        def delete(db: sqlite3.Connection) -> int:
            with transaction(db):
                return db.execute(
                    "DELETE FROM refresh_families WHERE expires_at < ?", (now,)
                ).rowcount

        return await self._run(delete)

    # --- invites ------------------------------------------------------------------------------

    async def create_invite(
        self, invite: str, *, by: str, at: float, expires_at: float, max_open: int
    ) -> bool:
        """Store an invite (its id); ``False`` if ``max_open`` unspent, unexpired ones exist."""

        def insert(db: sqlite3.Connection) -> bool:
            with transaction(db):
                (open_now,) = db.execute(
                    "SELECT count(*) FROM invites WHERE used_at IS NULL AND expires_at > ?", (at,)
                ).fetchone()
                if open_now >= max_open:
                    return False
                db.execute(
                    "INSERT INTO invites (id, created_at, created_by, expires_at)"
                    " VALUES (?, ?, ?, ?)",
                    (invite, at, by, expires_at),
                )
            return True

        return await self._run(insert)

    async def list_invites(self) -> list[InviteRecord]:
        """Every invite kept, newest first."""

        def query(db: sqlite3.Connection) -> list[InviteRecord]:
            rows = db.execute(
                "SELECT id, created_at, created_by, expires_at, used_at, used_by FROM invites"
                " ORDER BY created_at DESC, id"
            )
            return [InviteRecord(*row) for row in rows]

        return await self._run(query)

    async def purge_invites(self, now: float, keep_spent: float) -> int:
        """Forget expired invites, and spent ones older than ``keep_spent`` seconds."""

        def delete(db: sqlite3.Connection) -> int:
            with transaction(db):
                return db.execute(
                    "DELETE FROM invites WHERE (used_at IS NULL AND expires_at < ?) OR used_at < ?",
                    (now, now - keep_spent),
                ).rowcount

        return await self._run(delete)

    # --- the key directory ------------------------------------------------------------------

    async def publish_keys(
        self,
        client_uuid: str,
        keys: Sequence[KeyRecord],
        at: float,
        *,
        max_superseded: int,
        max_notices: int,
    ) -> Publication | None:
        """Make ``keys`` the client's current keys for their algorithms, atomically.

        A key equal to the current one of its algorithm changes nothing. Otherwise the current
        one is superseded (the newest ``max_superseded`` superseded keys are kept), and every
        reader of the client's keys is owed a :class:`KeyNotice` (the newest ``max_notices`` per
        reader are kept; a newer change of the same key replaces an older one). ``None``: no
        live client ``client_uuid``.
        """

        def update(db: sqlite3.Connection) -> Publication | None:
            with transaction(db):
                if not _live(db, client_uuid):
                    return None
                changed: list[str] = []
                notices: list[KeyNotice] = []
                for key in keys:
                    previous = _current_fingerprint(db, client_uuid, key.algorithm)
                    if previous == key.fingerprint:
                        continue
                    changed.append(key.algorithm)
                    _replace_key(db, client_uuid, key, at, max_superseded)
                    if previous is not None:
                        notices += _owe_notices(db, client_uuid, key, previous, at, max_notices)
                return Publication(tuple(changed), tuple(notices))

        return await self._run(update)

    async def read_keys(
        self, client_uuid: str, reader: str | None, at: float, *, max_readers: int
    ) -> list[KeyRecord] | None:
        """The client's keys, current ones first (by algorithm), then superseded ones, newest
        first; ``None``: no live client ``client_uuid``. ``reader`` (a client, not the owner)
        is recorded as one of its correspondents; the ``max_readers`` most recent are kept."""

        def query(db: sqlite3.Connection) -> list[KeyRecord] | None:
            with transaction(db):
                if not _live(db, client_uuid):
                    return None
                if reader is not None and reader != client_uuid:
                    _record_reader(db, client_uuid, reader, at, max_readers)
                rows = db.execute(
                    "SELECT algorithm, key, fingerprint, published_at, superseded_at"
                    " FROM client_keys WHERE client_uuid = ?"
                    " ORDER BY superseded_at IS NOT NULL, superseded_at DESC, algorithm, id DESC",
                    (client_uuid,),
                )
                return [KeyRecord(r[0], bytes(r[1]), r[2], r[3], r[4]) for r in rows]

        return await self._run(query)

    # --- the message queue ------------------------------------------------------------------

    async def execute(
        self, ops: Sequence[StoreOp], *, max_queued: int, inline: bool = False
    ) -> list[Any]:
        """Run ``ops`` in order, in one transaction (a group commit); return their results.
        ``inline``: on the event loop's thread, sparing the hand-off to a worker thread and
        back (for a small batch on a fast disk; the loop waits for the commit).

        Each operation sees the effects of those before it. Results, aligned with ``ops``:
        an :data:`InsertOutcome` for an ``Insert``, a list of rows for a read, ``None`` for
        other writes. When this returns, the writes are committed.

        Raises:
            StoreError: the transaction failed and was rolled back; nothing was written.
        """

        def run(db: sqlite3.Connection) -> list[Any]:
            try:
                with transaction(db):
                    return [_apply(db, op, max_queued, self.keys) for op in ops]
            except sqlite3.OperationalError as exc:  # disk full, I/O error, locked: may pass
                raise StoreUnavailable(f"{self.path}: writing messages failed: {exc}") from exc
            except (sqlite3.Error, ValueError) as exc:
                raise StoreError(f"{self.path}: writing messages failed: {exc}") from exc

        return await self._run(run, inline=inline)

    async def reserve_seqs(self, count: int) -> int:
        """Reserve ``count`` message seqs, above every seq stored or reserved; return the
        first."""
        if count < 1:
            raise ValueError(f"reserve at least one seq, not {count}")

        def reserve(db: sqlite3.Connection) -> int:
            first = max(self._reserved, last_message_seq(db)) + 1
            self._reserved = first + count - 1
            return first

        return await self._run(reserve)

    async def last_message_seq(self) -> int:
        """The highest message seq ever stored or reserved (0 if none): the relay allocates
        above it."""
        return await self._run(lambda db: max(self._reserved, last_message_seq(db)))

    async def recent_messages(self, since: float, limit: int) -> list[RecentMessage]:
        """Messages accepted at or after ``since``, newest ``limit`` of them, oldest first:
        what deduplication must remember across a restart."""
        return await self._run(partial(recent_messages, since=since, limit=limit))

    async def message_record(self, msgid: str, client: str) -> MessageRecord | None:
        """The newest stored message with ``msgid`` that ``client`` sent or received."""

        def query(db: sqlite3.Connection) -> MessageRecord | None:
            row = db.execute(
                "SELECT d.seq, m.sender, d.recipient, m.msgid, d.status, d.reason, d.attempts,"
                " m.accepted_at, d.expires_at, d.finished_at"
                " FROM messages m JOIN deliveries d ON d.message = m.id"
                " WHERE m.msgid = ? AND (m.sender = ? OR d.recipient = ?)"
                " ORDER BY d.seq DESC LIMIT 1",
                (msgid, client, client),
            ).fetchone()
            return None if row is None else MessageRecord(*row)

        return await self._run(query)

    async def msgid_known(self, msgid: str) -> bool:
        """Whether any stored message has ``msgid`` (whoever sent it)."""
        return await self._run(
            lambda db: (
                db.execute("SELECT 1 FROM messages WHERE msgid = ?", (msgid,)).fetchone()
                is not None
            )
        )

    async def undelivered(self, recipient: str, limit: int) -> tuple[int, list[StoredMessage]]:
        """How many messages wait in the store for ``recipient``, and the oldest ``limit`` of
        them (content decrypted)."""

        def query(db: sqlite3.Connection) -> tuple[int, list[StoredMessage]]:
            count = db.execute(
                "SELECT coalesce(sum(queued), 0) FROM queue_counts WHERE recipient = ?",
                (recipient,),
            ).fetchone()[0]
            rows = db.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM {_DELIVERY_JOIN}"
                " WHERE d.recipient = ? AND d.status IS NULL ORDER BY d.seq LIMIT ?",
                (recipient, limit),
            )
            return int(count), [_stored(row, self.keys) for row in rows]

        return await self._run(query)

    async def keys_in_use(self) -> dict[str | None, int]:
        """Messages holding content, per the key they are encrypted with (``None``: plain)."""
        return await self._run(keys_in_use)

    async def queued_total(self) -> int:
        """Undelivered messages in the store."""
        return await self._run(
            lambda db: int(
                db.execute("SELECT coalesce(sum(queued), 0) FROM queue_counts").fetchone()[0]
            )
        )

    async def queue_depths(self) -> dict[str, int]:
        """Undelivered messages per recipient."""

        def query(db: sqlite3.Connection) -> dict[str, int]:
            rows = db.execute("SELECT recipient, queued FROM queue_counts WHERE queued > 0")
            return {row[0]: row[1] for row in rows}

        return await self._run(query)


def _live(db: sqlite3.Connection, uuid: str) -> bool:
    row = db.execute("SELECT 1 FROM clients WHERE uuid = ? AND deleted_at IS NULL", (uuid,))
    return row.fetchone() is not None


def _current_fingerprint(db: sqlite3.Connection, client: str, algorithm: str) -> str | None:
    row = db.execute(
        "SELECT fingerprint FROM client_keys"
        " WHERE client_uuid = ? AND algorithm = ? AND superseded_at IS NULL",
        (client, algorithm),
    ).fetchone()
    return None if row is None else str(row[0])


def _replace_key(
    db: sqlite3.Connection, client: str, key: KeyRecord, at: float, max_superseded: int
) -> None:
    """Supersede the client's current key of ``key.algorithm`` (if any) by ``key``; keep the
    newest ``max_superseded`` superseded keys of the client."""
    db.execute(
        "UPDATE client_keys SET superseded_at = ?"
        " WHERE client_uuid = ? AND algorithm = ? AND superseded_at IS NULL",
        (at, client, key.algorithm),
    )
    db.execute(
        "INSERT INTO client_keys (client_uuid, algorithm, key, fingerprint, published_at)"
        " VALUES (?, ?, ?, ?, ?)",
        (client, key.algorithm, key.key, key.fingerprint, at),
    )
    db.execute(
        "DELETE FROM client_keys WHERE id IN (SELECT id FROM client_keys"
        " WHERE client_uuid = ? AND superseded_at IS NOT NULL"
        " ORDER BY superseded_at DESC, id DESC LIMIT -1 OFFSET ?)",
        (client, max_superseded),
    )


def _owe_notices(
    db: sqlite3.Connection,
    client: str,
    key: KeyRecord,
    previous: str,
    at: float,
    max_notices: int,
) -> list[KeyNotice]:
    """Owe every reader of ``client``'s keys the change of its ``key.algorithm`` key from
    ``previous`` to ``key``. A reader still owed an older change of that key keeps its
    ``previous`` (the fingerprint it was last told of): one notice spans both changes."""
    rows = db.execute(
        "INSERT INTO key_notices"
        " (reader_uuid, client_uuid, algorithm, fingerprint, previous, changed_at)"
        " SELECT reader_uuid, client_uuid, ?, ?, ?, ? FROM key_readers WHERE client_uuid = ?"
        " ON CONFLICT (reader_uuid, client_uuid, algorithm) DO UPDATE"
        " SET fingerprint = excluded.fingerprint, changed_at = excluded.changed_at"
        " RETURNING reader_uuid, previous",
        (key.algorithm, key.fingerprint, previous, at, client),
    ).fetchall()
    notices = [KeyNotice(r[0], client, key.algorithm, key.fingerprint, r[1], at) for r in rows]
    for notice in notices:
        db.execute(
            "DELETE FROM key_notices WHERE reader_uuid = ? AND (client_uuid, algorithm) IN"
            " (SELECT client_uuid, algorithm FROM key_notices WHERE reader_uuid = ?"
            " ORDER BY changed_at DESC, client_uuid, algorithm LIMIT -1 OFFSET ?)",
            (notice.reader, notice.reader, max_notices),
        )
    return notices


def _record_reader(
    db: sqlite3.Connection, client: str, reader: str, at: float, max_readers: int
) -> None:
    db.execute(
        "INSERT INTO key_readers (client_uuid, reader_uuid, read_at) VALUES (?, ?, ?)"
        " ON CONFLICT (client_uuid, reader_uuid) DO UPDATE SET read_at = excluded.read_at",
        (client, reader, at),
    )
    db.execute(
        "DELETE FROM key_readers WHERE client_uuid = ? AND reader_uuid IN"
        " (SELECT reader_uuid FROM key_readers WHERE client_uuid = ?"
        " ORDER BY read_at DESC, reader_uuid LIMIT -1 OFFSET ?)",
        (client, client, max_readers),
    )


def _forget_keys(db: sqlite3.Connection, uuid: str) -> None:
    """A deleted client: its keys, who read them, what it read, and what it was owed go."""
    db.execute("DELETE FROM client_keys WHERE client_uuid = ?", (uuid,))
    db.execute("DELETE FROM key_readers WHERE client_uuid = ? OR reader_uuid = ?", (uuid, uuid))
    db.execute("DELETE FROM key_notices WHERE client_uuid = ? OR reader_uuid = ?", (uuid, uuid))


def _load_key_notices(db: sqlite3.Connection, op: LoadKeyNotices) -> list[KeyNotice]:
    rows = db.execute(
        "SELECT reader_uuid, client_uuid, algorithm, fingerprint, previous, changed_at"
        " FROM key_notices WHERE reader_uuid = ? ORDER BY changed_at, client_uuid, algorithm"
        " LIMIT ?",
        (op.reader, op.limit),
    )
    return [KeyNotice(*row) for row in rows]


def last_message_seq(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'deliveries'").fetchone()
    return 0 if row is None else int(row[0])


def recent_messages(db: sqlite3.Connection, *, since: float, limit: int) -> list[RecentMessage]:
    rows = db.execute(
        "SELECT m.sender, m.msgid, m.accepted_at, d.status"
        " FROM messages m JOIN deliveries d ON d.seq = m.id WHERE m.accepted_at >= ?"
        " ORDER BY m.id DESC LIMIT ?",
        (since, limit),
    ).fetchall()
    return [
        RecentMessage(r[0], r[1], r[2], None if r[3] is None else Status(r[3]))
        for r in reversed(rows)
    ]


# A delivery with its message: what a StoredMessage is made of (and row_id needs).
_MESSAGE_COLUMNS = (
    "d.seq, m.id, m.sender, m.address, d.recipient, m.msgid, m.high, m.acknowledge, m.fields,"
    " m.key_id, m.accepted_at, d.expires_at, d.attempts"
)
_DELIVERY_JOIN = "deliveries d JOIN messages m ON m.id = d.message"


def _fields(row: sqlite3.Row, keys: StoreKeys | None) -> str:
    """A row's fields in plain text (decrypted if they were stored encrypted).

    Raises:
        UndecryptableRow: encrypted, and ``keys`` cannot decrypt them.
    """
    key_id = row["key_id"]
    if key_id is None:
        fields: str = row["fields"]
        return fields
    if keys is None:
        raise UndecryptableRow(f"message {row['id']} is encrypted and no store key was loaded")
    return keys.open(row_id(row), key_id, row["fields"])


def _delivered_fields(row: sqlite3.Row, keys: StoreKeys | None) -> str:
    """A delivery's message fields in plain text, for its recipient.

    Raises:
        UndecryptableRow: as :func:`_fields`; or the content is sealed for another address
            than the delivery's recipient (a delivery pointed elsewhere by someone who can
            write the store but holds no key: the seal binds the message's address, and the
            delivery must match it).
    """
    if row["key_id"] is not None and row["recipient"] != row["address"]:
        raise UndecryptableRow(
            f"delivery {row['seq']} is not to the address message {row['id']} was sealed for"
        )
    return _fields(row, keys)


def row_id(row: sqlite3.Row) -> RowId:
    """What a message's sealed fields are bound to (see :class:`RowId`)."""
    return RowId(row["id"], row["sender"], row["address"], row["msgid"])


def _stored(row: sqlite3.Row, keys: StoreKeys | None, fields: str | None = None) -> StoredMessage:
    return StoredMessage(
        seq=row["seq"],
        sender=row["sender"],
        recipient=row["recipient"],
        msgid=row["msgid"],
        high=bool(row["high"]),
        acknowledge=bool(row["acknowledge"]),
        fields=_delivered_fields(row, keys) if fields is None else fields,
        accepted_at=row["accepted_at"],
        expires_at=row["expires_at"],
        attempts=row["attempts"],
    )


def _insert(db: sqlite3.Connection, op: Insert, max_queued: int, keys: StoreKeys | None) -> Any:
    """Store ``op``'s message and its one delivery (the message's id is the delivery's seq)."""
    if op.status is None and not _has_room(db, op.recipient, max_queued):
        return _refusal_or_duplicate(db, op)
    key_id: str | None = None
    fields: str | bytes = op.fields
    if keys is not None and op.fields:
        key_id, fields = keys.seal(RowId(op.seq, op.sender, op.recipient, op.msgid), op.fields)
    row = db.execute(
        "INSERT INTO messages (id, sender, msgid, address, high, acknowledge, fields, key_id,"
        " accepted_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (sender, msgid) DO NOTHING RETURNING id",
        (
            op.seq,
            op.sender,
            op.msgid,
            op.recipient,
            int(op.high),
            int(op.acknowledge),
            fields if op.status is None else "",
            key_id if op.status is None else None,
            op.accepted_at,
            op.expires_at,
        ),
    ).fetchone()
    if row is None:
        return _refusal_or_duplicate(db, op)
    db.execute(
        "INSERT INTO deliveries (seq, message, sender, recipient, expires_at, attempts, status,"
        " reason, finished_at, receipt_pending) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            op.seq,
            op.seq,
            op.sender,
            op.recipient,
            op.expires_at,
            op.attempts,
            None if op.status is None else op.status.value,
            op.reason,
            None if op.status is None else op.accepted_at,
            int(op.receipt_pending),
        ),
    )
    return Inserted(op.seq)


def _has_room(db: sqlite3.Connection, recipient: str, max_queued: int) -> bool:
    """``recipient`` is a live client whose queue holds fewer than ``max_queued``."""
    row = db.execute(
        "SELECT coalesce((SELECT queued FROM queue_counts WHERE recipient = ?), 0) < ?"
        " FROM clients WHERE uuid = ? AND deleted_at IS NULL",
        (recipient, max_queued, recipient),
    ).fetchone()
    return row is not None and bool(row[0])


def _refusal_or_duplicate(db: sqlite3.Connection, op: Insert) -> InsertOutcome:
    """Why ``op`` was not stored: its ``(sender, msgid)`` is (a duplicate, or this very Insert
    run again), or its recipient is unknown or has a full queue."""
    existing = db.execute(
        "SELECT d.seq, d.status FROM messages m JOIN deliveries d ON d.seq = m.id"
        " WHERE m.sender = ? AND m.msgid = ?",
        (op.sender, op.msgid),
    ).fetchone()
    if existing is not None and existing["seq"] == op.seq:
        return Inserted(op.seq)  # this Insert, run again (see the Redis engine's retry)
    if existing is not None:
        status = existing["status"]
        return Duplicate(existing["seq"], None if status is None else Status(status))
    return Refused("queue_full" if _live(db, op.recipient) else "unknown_recipient")


def _load_queue(db: sqlite3.Connection, op: LoadQueue, keys: StoreKeys | None) -> QueuePage:
    cursor = db.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM {_DELIVERY_JOIN}"
        " WHERE d.recipient = ? AND d.status IS NULL AND d.seq > ? ORDER BY d.seq LIMIT ?",
        (op.recipient, op.after, op.limit + 1),
    )
    rows: list[StoredMessage] = []
    total = 0
    more = False
    for row in cursor:
        if len(rows) == op.limit:
            more = True
            break
        fields = _delivered_fields(row, keys)
        size = size_of(fields)
        if rows and total + size > op.max_bytes:
            more = True
            break
        rows.append(_stored(row, keys, fields))
        total += size
    return QueuePage(rows, more=more)


def _apply(db: sqlite3.Connection, op: StoreOp, max_queued: int, keys: StoreKeys | None) -> Any:
    if isinstance(op, Insert):
        return _insert(db, op, max_queued, keys)
    if isinstance(op, Finish):
        _finish(db, op)
        return None
    if isinstance(op, SetAttempts):
        db.execute(
            "UPDATE deliveries SET attempts = ? WHERE seq = ? AND status IS NULL",
            (op.attempts, op.seq),
        )
        return None
    if isinstance(op, SetReceiptPending):
        db.executemany(
            "UPDATE deliveries SET receipt_pending = ? WHERE seq = ? AND status IS NOT NULL",
            [(int(op.pending), seq) for seq in op.seqs],
        )
        return None
    if isinstance(op, LoadQueue):
        return _load_queue(db, op, keys)
    if isinstance(op, LoadReceipts):
        rows = db.execute(
            "SELECT d.seq, m.msgid, d.recipient, d.status, d.finished_at, d.reason"
            f" FROM {_DELIVERY_JOIN}"
            " WHERE d.sender = ? AND d.receipt_pending = 1 AND d.seq > ? ORDER BY d.seq LIMIT ?",
            (op.sender, op.after, op.limit),
        )
        return [
            StoredReceipt(
                row["seq"],
                row["msgid"],
                row["recipient"],
                Status(row["status"]),
                row["finished_at"],
                row["reason"],
            )
            for row in rows
        ]
    if isinstance(op, FindExpired):
        rows = db.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM {_DELIVERY_JOIN}"
            " WHERE d.status IS NULL AND d.expires_at <= ? ORDER BY d.expires_at LIMIT ?",
            (op.now, op.limit),
        )
        return [_stored(row, keys) for row in rows]
    if isinstance(op, LoadKeyNotices):
        return _load_key_notices(db, op)
    if isinstance(op, ClearKeyNotice):
        notice = op.notice
        db.execute(
            "DELETE FROM key_notices WHERE reader_uuid = ? AND client_uuid = ? AND algorithm = ?"
            " AND fingerprint = ? AND changed_at = ?",
            (notice.reader, notice.client, notice.algorithm, notice.fingerprint, notice.changed_at),
        )
        return None
    if isinstance(op, Purge):
        _purge(db, op)
        return None
    raise TypeError(f"not a store operation: {op!r}")


def _finish(db: sqlite3.Connection, op: Finish) -> None:
    """Give a delivery its final status; its message's content goes once no delivery of it
    is still queued."""
    row = db.execute(
        "UPDATE deliveries SET status = ?, finished_at = ?, receipt_pending = ?, reason = ?"
        " WHERE seq = ? AND status IS NULL RETURNING message",
        (op.status.value, op.finished_at, int(op.receipt_pending), op.reason, op.seq),
    ).fetchone()
    if row is not None:
        db.execute(
            "UPDATE messages SET fields = '', key_id = NULL WHERE id = ?1 AND NOT EXISTS"
            " (SELECT 1 FROM deliveries WHERE message = ?1 AND status IS NULL)",
            (row[0],),
        )


def _purge(db: sqlite3.Connection, op: Purge) -> None:
    """Forget finished deliveries whose receipts were told (or nobody came for), then the
    messages left with no delivery."""
    gone = db.execute(
        "DELETE FROM deliveries WHERE status IS NOT NULL AND"
        " ((receipt_pending = 0 AND finished_at < ?) OR finished_at < ?) RETURNING message",
        (op.finished_before, op.receipts_before),
    ).fetchall()
    db.executemany(
        "DELETE FROM messages WHERE id = ?1 AND NOT EXISTS"
        " (SELECT 1 FROM deliveries WHERE message = ?1)",
        [(message,) for message in {row[0] for row in gone}],
    )
