"""The SQLite store's client tables: clients, logins (refresh families), revoked tokens,
invites and the public-key directory (the :class:`relayd._engine.ClientStore` protocol)."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from typing import Literal

from ._engine import ClientRecord, FamilyRecord, InviteRecord, KeyRecord, Publication, RotateOutcome
from ._relay.records import KeyNotice, LoadKeyNotices
from ._sqlite import SqliteConnection, transaction
from ._store_topics import forget_client_topics


def _client(row: sqlite3.Row) -> ClientRecord:
    return ClientRecord(
        uuid=row["uuid"],
        name=row["name"],
        secret_hash=row["secret_hash"],
        roles=tuple(row["roles"].split()),
        created_at=row["created_at"],
        tokens_valid_after=row["tokens_valid_after"],
        deleted_at=row["deleted_at"],
        read_receipts=bool(row["read_receipts"]),
        last_seen=row["last_seen"],
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


class SqliteClientStore(SqliteConnection):
    """Clients, logins, revocations, invites and public keys, in SQLite."""

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

    async def set_read_receipts(self, uuid: str, enabled: bool) -> bool:
        """Whether a live client's reads are told to their senders from now on; ``False``
        if there is no such live client. Reads recorded before keep what they were."""

        def update(db: sqlite3.Connection) -> bool:
            with transaction(db):
                cursor = db.execute(
                    "UPDATE clients SET read_receipts = ? WHERE uuid = ? AND deleted_at IS NULL",
                    (int(enabled), uuid),
                )
                return cursor.rowcount == 1

        return await self._run(update)

    async def set_last_seen(self, seen: Mapping[str, float]) -> None:
        """When each client (uuid: time) last had a live socket (never earlier than it was:
        two nodes may record it out of order); an unknown or deleted client is skipped."""

        def update(db: sqlite3.Connection) -> None:
            with transaction(db):
                db.executemany(
                    "UPDATE clients SET last_seen = max(coalesce(last_seen, 0), ?)"
                    " WHERE uuid = ? AND deleted_at IS NULL",
                    [(at, uuid) for uuid, at in seen.items()],
                )

        await self._run(update)

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
        """Turn the client into a tombstone: no secret, no tokens, no families, no keys, no
        history (what it sent and received whose status is final; receipts owed to others
        about messages to it stay until told)."""

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
                    _forget_history(db, uuid)
                    forget_client_topics(db, uuid)
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
                if not live(db, client_uuid):
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
                if not live(db, client_uuid):
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


def live(db: sqlite3.Connection, uuid: str) -> bool:
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


def _forget_history(db: sqlite3.Connection, uuid: str) -> None:
    """A deleted client's history: the finished deliveries it sent or received, and the
    messages left with none. (It reaches the message tables so that deleting a client and
    its history is one transaction.) Messages waiting for it stay until they expire, as do
    those it sent that wait for others; a receipt (final or read) another sender is owed stays
    until told."""
    gone = db.execute(
        "DELETE FROM deliveries WHERE status IS NOT NULL"
        " AND (sender = ?1 OR (recipient = ?1 AND receipt_pending = 0 AND read_pending = 0))"
        " RETURNING message",
        (uuid,),
    ).fetchall()
    forget_orphans(db, {row[0] for row in gone})


def forget_orphans(db: sqlite3.Connection, messages: set[int]) -> None:
    """Of ``messages`` (ids whose deliveries were just deleted), those left with no delivery
    go too."""
    db.executemany(
        "DELETE FROM messages WHERE id = ?1 AND in_history = 0 AND NOT EXISTS"
        " (SELECT 1 FROM deliveries WHERE message = ?1)",
        [(message,) for message in messages],
    )


def _forget_keys(db: sqlite3.Connection, uuid: str) -> None:
    """A deleted client: its keys, who read them, what it read, and what it was owed go."""
    db.execute("DELETE FROM client_keys WHERE client_uuid = ?", (uuid,))
    db.execute("DELETE FROM key_readers WHERE client_uuid = ? OR reader_uuid = ?", (uuid, uuid))
    db.execute("DELETE FROM key_notices WHERE client_uuid = ? OR reader_uuid = ?", (uuid, uuid))


def load_key_notices(db: sqlite3.Connection, op: LoadKeyNotices) -> list[KeyNotice]:
    rows = db.execute(
        "SELECT reader_uuid, client_uuid, algorithm, fingerprint, previous, changed_at"
        " FROM key_notices WHERE reader_uuid = ? ORDER BY changed_at, client_uuid, algorithm"
        " LIMIT ?",
        (op.reader, op.limit),
    )
    return [KeyNotice(*row) for row in rows]
