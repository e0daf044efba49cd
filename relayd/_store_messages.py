"""The SQLite store's message tables: each accepted message once (``messages``), and each
recipient's delivery of it (``deliveries``), with its queue counts (the
:class:`relayd._engine.MessageStore` protocol). The relay core's store operations
(``relayd/_relay/records.py``) run here, a batch per transaction (:meth:`execute`)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from ._atrest import RowId, StoreKeys, UndecryptableRow
from ._engine import HistoryEntry, HistoryQuery, MessageRecord
from ._errors import StoreError, StoreUnavailable
from ._relay.records import (
    ClearKeyNotice,
    ClearReadPending,
    Duplicate,
    FindExpired,
    Finish,
    Insert,
    Inserted,
    InsertOutcome,
    LoadKeyNotices,
    LoadQueue,
    LoadReceipts,
    MarkRead,
    Publish,
    Purge,
    QueuePage,
    ReadCode,
    ReadOutcome,
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
from ._sqlite import SqliteConnection, transaction
from ._store_clients import forget_orphans, live, load_key_notices
from ._store_topics import publish, trim_by_age

# At most this many topic messages leave their history per purge (it runs every sweep).
PURGE_TOPIC_PAGE = 1000


class SqliteMessageStore(SqliteConnection):
    """The message queue, in SQLite."""

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
                    return [_apply(db, op, max_queued, self.keys, self._reserve) for op in ops]
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

        return await self._run(lambda db: self._reserve(db, count))

    def _reserve(self, db: sqlite3.Connection, count: int) -> int:
        first = max(self._reserved, last_message_seq(db)) + 1
        self._reserved = first + count - 1
        return first

    async def last_message_seq(self) -> int:
        """The highest message seq ever stored or reserved (0 if none): the relay allocates
        above it."""
        return await self._run(lambda db: max(self._reserved, last_message_seq(db)))

    async def recent_messages(self, since: float, limit: int) -> list[RecentMessage]:
        """Messages accepted at or after ``since``, newest ``limit`` of them, oldest first:
        what deduplication must remember across a restart."""
        return await self._run(partial(recent_messages, since=since, limit=limit))

    async def message_record(self, msgid: str, client: str) -> MessageRecord | None:
        """The newest stored message with ``msgid`` that ``client`` sent or received. Its
        ``read_at`` is ``None`` for its sender when its recipient read it with read receipts
        off."""

        def query(db: sqlite3.Connection) -> MessageRecord | None:
            row = db.execute(
                "SELECT d.seq, m.sender, d.recipient, m.msgid, d.status, d.reason, d.attempts,"
                " m.accepted_at, d.expires_at, d.finished_at, d.delivered_at,"
                " CASE WHEN d.read_hidden AND d.recipient != ?3 THEN NULL ELSE d.read_at END,"
                " m.id, m.topic"
                " FROM messages m JOIN deliveries d ON d.message = m.id"
                " WHERE m.msgid = ?1 AND (m.sender = ?2 OR d.recipient = ?2)"
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

    async def history(self, query: HistoryQuery) -> list[HistoryEntry]:
        """A page of ``query.client``'s history (see :class:`HistoryQuery`), content decrypted.

        Raises:
            UndecryptableRow: a message's content cannot be decrypted with the store's keys.
        """
        return await self._read(partial(_history, query=query, keys=self.keys))


# What decrypting a row needs: its fields, their key, and what they are bound to.
_SEALED_COLUMNS = "id, sender, address, msgid, fields, key_id"


def check_keys(db: sqlite3.Connection, keys: StoreKeys) -> int:
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
        fields_of(row.fetchone(), keys)
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
    " m.key_id, m.accepted_at, d.expires_at, d.attempts, m.topic, m.topic_offset"
)
_DELIVERY_JOIN = "deliveries d JOIN messages m ON m.id = d.message"


def fields_of(row: sqlite3.Row, keys: StoreKeys | None) -> str:
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
    # A topic message is sealed for its topic (see relayd/_store_topics.py).
    address: str = row["address"]
    if row["key_id"] is not None and row["recipient"] != address and address[:1] != "#":
        raise UndecryptableRow(
            f"delivery {row['seq']} is not to the address message {row['id']} was sealed for"
        )
    return fields_of(row, keys)


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
        topic=row["topic"],
        offset=row["topic_offset"],
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
        " accepted_at, expires_at, conversation_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (sender, msgid) DO NOTHING RETURNING id",
        (
            op.seq,
            op.sender,
            op.msgid,
            op.recipient,
            int(op.high),
            int(op.acknowledge),
            fields,
            key_id,
            op.accepted_at,
            op.expires_at,
            op.conversation_id,
        ),
    ).fetchone()
    if row is None:
        return _refusal_or_duplicate(db, op)
    db.execute(
        "INSERT INTO deliveries (seq, message, sender, recipient, expires_at, attempts, status,"
        " reason, finished_at, receipt_pending, delivered_at, conversation_id)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
            op.accepted_at if op.status is Status.DELIVERED else None,
            op.conversation_id,
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
        # A published message has no delivery at its id: it is a duplicate all the same.
        "SELECT m.id AS seq, d.status FROM messages m LEFT JOIN deliveries d ON d.seq = m.id"
        " WHERE m.sender = ? AND m.msgid = ?",
        (op.sender, op.msgid),
    ).fetchone()
    if existing is not None and existing["seq"] == op.seq:
        return Inserted(op.seq)  # this Insert, run again (see the Redis engine's retry)
    if existing is not None:
        status = existing["status"]
        return Duplicate(existing["seq"], None if status is None else Status(status))
    return Refused("queue_full" if live(db, op.recipient) else "unknown_recipient")


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


def _apply(
    db: sqlite3.Connection,
    op: StoreOp,
    max_queued: int,
    keys: StoreKeys | None,
    reserve: Callable[[sqlite3.Connection, int], int],
) -> Any:
    if isinstance(op, Publish):
        return publish(db, op, max_queued, keys, reserve)
    if isinstance(op, Insert):
        return _insert(db, op, max_queued, keys)
    if isinstance(op, Finish):
        _finish(db, op)
        return None
    if isinstance(op, SetAttempts):
        # The first attempt's time is when it was delivered; back to none (one counted but
        # never made), it was not.
        db.execute(
            "UPDATE deliveries SET attempts = :n, delivered_at = CASE WHEN :n = 0 THEN NULL"
            " ELSE coalesce(delivered_at, :at) END WHERE seq = :seq AND status IS NULL",
            {"n": op.attempts, "at": op.at, "seq": op.seq},
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
            "SELECT d.seq, m.msgid, d.recipient, d.status, d.finished_at, d.reason,"
            " d.receipt_pending, d.read_pending, d.read_at"
            f" FROM {_DELIVERY_JOIN}"
            " WHERE d.sender = ? AND (d.receipt_pending = 1 OR d.read_pending = 1) AND d.seq > ?"
            " ORDER BY d.seq LIMIT ?",
            (op.sender, op.after, op.limit),
        )
        return [
            StoredReceipt(
                row["seq"],
                row["msgid"],
                row["recipient"],
                None if row["status"] is None else Status(row["status"]),
                row["finished_at"],
                row["reason"],
                final=bool(row["receipt_pending"]),
                read_at=row["read_at"] if row["read_pending"] else None,
            )
            for row in rows
        ]
    if isinstance(op, MarkRead):
        return _mark_read(db, op)
    if isinstance(op, ClearReadPending):
        db.executemany(
            "UPDATE deliveries SET read_pending = 0 WHERE seq = ?", [(seq,) for seq in op.seqs]
        )
        return None
    if isinstance(op, FindExpired):
        rows = db.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM {_DELIVERY_JOIN}"
            " WHERE d.status IS NULL AND d.expires_at <= ? ORDER BY d.expires_at LIMIT ?",
            (op.now, op.limit),
        )
        return [_stored(row, keys) for row in rows]
    if isinstance(op, LoadKeyNotices):
        return load_key_notices(db, op)
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


def _mark_read(db: sqlite3.Connection, op: MarkRead) -> ReadOutcome:
    """See :class:`MarkRead`."""
    sender = "" if op.sender is None else " AND m.sender = ?"
    row = db.execute(
        "SELECT d.seq, m.sender, d.delivered_at, d.read_at, m.topic FROM deliveries d"
        " JOIN messages m ON m.id = d.message"
        f" WHERE d.recipient = ? AND m.msgid = ?{sender} ORDER BY d.seq DESC LIMIT 1",
        (op.reader, op.msgid) if op.sender is None else (op.reader, op.msgid, op.sender),
    ).fetchone()
    if row is None:
        known = db.execute("SELECT 1 FROM messages WHERE msgid = ?", (op.msgid,)).fetchone()
        return ReadOutcome(ReadCode.NOT_YOURS if known else ReadCode.UNKNOWN_MESSAGE)
    seq, sender_uuid = row["seq"], row["sender"]
    if row["read_at"] is not None:
        return ReadOutcome(ReadCode.ALREADY_READ, seq, sender_uuid, row["read_at"])
    if row["delivered_at"] is None:
        return ReadOutcome(ReadCode.NOT_DELIVERED, seq, sender_uuid)
    shares = db.execute("SELECT read_receipts FROM clients WHERE uuid = ?", (op.reader,)).fetchone()
    # A topic message's publisher is never told each subscriber's read (one frame each).
    owed = shares is not None and bool(shares[0]) and row["topic"] is None
    db.execute(
        "UPDATE deliveries SET read_at = ?, read_pending = ?, read_hidden = ? WHERE seq = ?",
        (op.at, int(owed), int(not owed), seq),
    )
    return ReadOutcome(ReadCode.READ, seq, sender_uuid, op.at, owed=owed)


_HISTORY_COLUMNS = (
    "d.seq, m.id, m.msgid, m.sender, m.address, d.recipient, m.fields, m.key_id,"
    " m.conversation_id, d.status, d.reason, d.attempts, m.accepted_at, d.delivered_at,"
    " d.read_at, d.read_hidden, d.finished_at"
)


def _history(
    db: sqlite3.Connection, *, query: HistoryQuery, keys: StoreKeys | None
) -> list[HistoryEntry]:
    """Each side of the history (what the client received, what it sent) is read on its own
    index, newest (or oldest) first and at most a page of it, then the two are merged: a
    page costs its size, not the size of the history."""
    order = "DESC" if query.newest_first else "ASC"
    past = "<" if query.newest_first else ">"
    sides: list[tuple[str, list[Any]]] = []
    where: str
    args: list[Any]
    if query.box in ("all", "inbox"):
        where, args = "recipient = ?", [query.client]
        if query.peer is not None:
            where, args = "recipient = ? AND sender = ?", [query.client, query.peer]
        sides.append((where, args))
    if query.box in ("all", "sent"):
        # A publish is one entry of its topic's history, not one per subscriber here.
        where, args = "sender = ? AND fanout = 0", [query.client]
        if query.peer is not None:
            where, args = "recipient = ? AND sender = ?", [query.peer, query.client]
        sides.append((where, args))
    conversation = ""
    if query.conversation_id is not None:  # on the sides' conversation indexes
        conversation = " AND conversation_id = ?"
    seqs: list[str] = []
    params: list[Any] = []
    for where, side_args in sides:
        cursor = "" if query.cursor is None else f" AND seq {past} ?"
        seqs.append(
            f"SELECT seq FROM (SELECT seq FROM deliveries WHERE {where}{cursor}{conversation}"
            f" ORDER BY seq {order} LIMIT ?)"
        )
        params += side_args
        if query.cursor is not None:
            params.append(query.cursor)
        if query.conversation_id is not None:
            params.append(query.conversation_id)
        params.append(query.limit)
    rows = db.execute(
        f"SELECT {_HISTORY_COLUMNS} FROM {_DELIVERY_JOIN}"
        f" WHERE d.seq IN ({' UNION '.join(seqs)}) ORDER BY d.seq {order} LIMIT ?",
        [*params, query.limit],
    )
    return [
        HistoryEntry(
            seq=row["seq"],
            msgid=row["msgid"],
            sender=row["sender"],
            recipient=row["recipient"],
            fields=_delivered_fields(row, keys) if row["fields"] else "",
            conversation_id=row["conversation_id"],
            status=row["status"],
            reason=row["reason"],
            attempts=row["attempts"],
            accepted_at=row["accepted_at"],
            delivered_at=row["delivered_at"],
            read_at=None
            if row["read_hidden"] and row["recipient"] != query.client
            else row["read_at"],
            finished_at=row["finished_at"],
        )
        for row in rows
    ]


def _finish(db: sqlite3.Connection, op: Finish) -> None:
    """Give a delivery its final status; its message's content goes once no delivery of it
    is still queued."""
    row = db.execute(
        "UPDATE deliveries SET status = :status, finished_at = :at, receipt_pending = :owed,"
        " reason = :reason, delivered_at = CASE WHEN :status = 'delivered'"
        " THEN coalesce(delivered_at, :at) ELSE coalesce(delivered_at, :delivered) END"
        " WHERE seq = :seq AND status IS NULL RETURNING message",
        {
            "status": op.status.value,
            "at": op.finished_at,
            "owed": int(op.receipt_pending),
            "reason": op.reason,
            "seq": op.seq,
            "delivered": op.delivered_at,
        },
    ).fetchone()
    if row is not None and not op.keep_content:
        db.execute(
            "UPDATE messages SET fields = '', key_id = NULL WHERE id = ?1 AND in_history = 0"
            " AND NOT EXISTS (SELECT 1 FROM deliveries WHERE message = ?1 AND status IS NULL)",
            (row[0],),
        )


def _purge(db: sqlite3.Connection, op: Purge) -> None:
    """Forget finished deliveries whose receipts (final and read) were told (or nobody came
    for), then the messages left with no delivery."""
    # The range bound lets the finished index find the candidates: without it, the OR made
    # every purge scan every finished delivery (all the history kept).
    gone = db.execute(
        "DELETE FROM deliveries WHERE status IS NOT NULL AND finished_at < max(:fb, :rb) AND"
        " ((receipt_pending = 0 AND read_pending = 0 AND finished_at < :fb) OR finished_at < :rb)"
        " RETURNING message",
        {"fb": op.finished_before, "rb": op.receipts_before},
    ).fetchall()
    forget_orphans(db, {row[0] for row in gone})
    if op.now is not None:
        trim_by_age(db, op.now, PURGE_TOPIC_PAGE)
