"""The SQLite store's topics: each topic (``topics``), its subscribers (``topic_members``), and
its history, which is the published messages themselves (``messages.topic``, with the topic's
offset; ``in_history`` while the topic keeps them). Publishing (:func:`publish`) runs as a
store operation of the relay's batches (``relayd/_store_messages.py``): one message stored
once, one delivery per subscriber.

A published message stays in its topic's history while it is among the topic's last
``history_count`` and younger than ``history_age``; then it leaves the history (trimmed at the
next publish, or by the periodic purge), and its content and record go as a direct message's
do: once no delivery of it waits, and its deliveries were purged.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from ._atrest import RowId, StoreKeys
from ._engine import (
    CreateTopicOutcome,
    PublishPolicy,
    SubscribeOutcome,
    TopicAccess,
    TopicCounts,
    TopicMessage,
    TopicRecord,
    UnsubscribeOutcome,
)
from ._relay.records import (
    BROADCAST,
    Duplicate,
    Publish,
    Published,
    PublishOutcome,
    Refused,
    Status,
)
from ._sqlite import SqliteConnection, transaction

_TOPIC_COLUMNS = (
    "id, creator, metadata, access, publish, presence, history_count, history_age, created_at,"
    " subscribers, last_offset"
)


def topic_address(topic: str) -> str:
    """What a topic message's content is sealed for (a client's address is its uuid)."""
    return "#" + topic


def _topic(row: sqlite3.Row) -> TopicRecord:
    return TopicRecord(
        id=row["id"],
        creator=row["creator"],
        metadata=row["metadata"],
        access=row["access"],
        publish=row["publish"],
        presence=bool(row["presence"]),
        history_count=row["history_count"],
        history_age=row["history_age"],
        created_at=row["created_at"],
        subscribers=row["subscribers"],
        last_offset=row["last_offset"],
    )


class SqliteTopicStore(SqliteConnection):
    """Topics and their subscribers, in SQLite (see the module docstring)."""

    async def create_topic(self, topic: TopicRecord, *, max_owned: int) -> CreateTopicOutcome:
        """Create ``topic`` (its ``subscribers`` and ``last_offset`` start at 0): ``exists``
        if its id is taken, ``too_many`` if its creator owns ``max_owned`` topics already."""

        def insert(db: sqlite3.Connection) -> CreateTopicOutcome:
            with transaction(db):
                if db.execute("SELECT 1 FROM topics WHERE id = ?", (topic.id,)).fetchone():
                    return "exists"
                owned = db.execute(
                    "SELECT count(*) FROM topics WHERE creator = ?", (topic.creator,)
                ).fetchone()[0]
                if owned >= max_owned:
                    return "too_many"
                db.execute(
                    f"INSERT INTO topics ({_TOPIC_COLUMNS})"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0)",
                    (
                        topic.id,
                        topic.creator,
                        topic.metadata,
                        topic.access,
                        topic.publish,
                        int(topic.presence),
                        topic.history_count,
                        topic.history_age,
                        topic.created_at,
                    ),
                )
                return "created"

        return await self._run(insert)

    async def get_topic(self, topic_id: str) -> TopicRecord | None:
        def query(db: sqlite3.Connection) -> TopicRecord | None:
            row = db.execute(
                f"SELECT {_TOPIC_COLUMNS} FROM topics WHERE id = ?", (topic_id,)
            ).fetchone()
            return None if row is None else _topic(row)

        return await self._read(query)

    async def list_topics(
        self, viewer: str | None, *, everything: bool, after: str | None, limit: int
    ) -> list[TopicRecord]:
        """Topics in id order after ``after``, at most ``limit``: every one if
        ``everything``, else the open ones and the private ones ``viewer`` subscribes to or
        owns."""

        def query(db: sqlite3.Connection) -> list[TopicRecord]:
            rows = db.execute(
                f"SELECT {_TOPIC_COLUMNS} FROM topics t WHERE id > :after AND (:all OR"
                " access = 'open' OR creator = :viewer OR EXISTS (SELECT 1 FROM topic_members m"
                " WHERE m.topic = t.id AND m.client = :viewer)) ORDER BY id LIMIT :limit",
                {"after": after or "", "all": int(everything), "viewer": viewer, "limit": limit},
            )
            return [_topic(row) for row in rows]

        return await self._read(query)

    async def update_topic(
        self,
        topic_id: str,
        *,
        metadata: str | None = None,
        access: TopicAccess | None = None,
        publish: PublishPolicy | None = None,
        presence: bool | None = None,
        history_count: int | None = None,
        history_age: float | None = None,
    ) -> TopicRecord | None:
        """Change the settings given (``None``: keep); the topic as it is now, ``None`` if
        there is no such topic. A smaller history trims it at once."""
        changes: dict[str, Any] = {
            "metadata": metadata,
            "access": access,
            "publish": publish,
            "presence": None if presence is None else int(presence),
            "history_count": history_count,
            "history_age": history_age,
        }
        given = {name: value for name, value in changes.items() if value is not None}

        def update(db: sqlite3.Connection) -> TopicRecord | None:
            with transaction(db):
                if given:
                    sets = ", ".join(f"{name} = :{name}" for name in given)
                    db.execute(
                        f"UPDATE topics SET {sets} WHERE id = :id", {**given, "id": topic_id}
                    )
                row = db.execute(
                    f"SELECT {_TOPIC_COLUMNS} FROM topics WHERE id = ?", (topic_id,)
                ).fetchone()
                if row is None:
                    return None
                _trim(db, topic_id, row["last_offset"] - row["history_count"])
                return _topic(row)

        return await self._run(update)

    async def delete_topic(self, topic_id: str) -> bool:
        """Delete the topic, its subscriptions and its history. Deliveries of its messages
        that wait still go out (they were accepted)."""

        def delete(db: sqlite3.Connection) -> bool:
            with transaction(db):
                return forget_topic(db, topic_id)

        return await self._run(delete)

    async def subscribe(
        self,
        topic_id: str,
        client: str,
        at: float,
        *,
        max_subscribers: int,
        max_subscriptions: int,
        invited: bool = False,
    ) -> SubscribeOutcome:
        """Subscribe ``client`` to the topic (``invited``: added by its owner or an admin,
        which a private topic needs). Refused as ``topic_not_found``, ``unknown_client`` (no
        live client has that uuid), ``private``, ``topic_full`` (``max_subscribers``) or
        ``too_many`` (the client has ``max_subscriptions``); ``already`` changes nothing."""

        def insert(db: sqlite3.Connection) -> SubscribeOutcome:
            with transaction(db):
                topic = db.execute(
                    "SELECT access, subscribers FROM topics WHERE id = ?", (topic_id,)
                ).fetchone()
                if topic is None:
                    return "topic_not_found"
                if not db.execute(
                    "SELECT 1 FROM clients WHERE uuid = ? AND deleted_at IS NULL", (client,)
                ).fetchone():
                    return "unknown_client"
                if db.execute(
                    "SELECT 1 FROM topic_members WHERE topic = ? AND client = ?", (topic_id, client)
                ).fetchone():
                    return "already"
                if topic["access"] == "private" and not invited:
                    return "private"
                if topic["subscribers"] >= max_subscribers:
                    return "topic_full"
                held = db.execute(
                    "SELECT count(*) FROM topic_members WHERE client = ?", (client,)
                ).fetchone()[0]
                if held >= max_subscriptions:
                    return "too_many"
                db.execute(
                    "INSERT INTO topic_members (topic, client, joined_at) VALUES (?, ?, ?)",
                    (topic_id, client, at),
                )
                db.execute(
                    "UPDATE topics SET subscribers = subscribers + 1 WHERE id = ?", (topic_id,)
                )
                return "subscribed"

        return await self._run(insert)

    async def unsubscribe(self, topic_id: str, client: str) -> UnsubscribeOutcome:
        def delete(db: sqlite3.Connection) -> UnsubscribeOutcome:
            with transaction(db):
                if not db.execute("SELECT 1 FROM topics WHERE id = ?", (topic_id,)).fetchone():
                    return "topic_not_found"
                gone = db.execute(
                    "DELETE FROM topic_members WHERE topic = ? AND client = ?", (topic_id, client)
                ).rowcount
                if not gone:
                    return "not_subscribed"
                db.execute(
                    "UPDATE topics SET subscribers = subscribers - 1 WHERE id = ?", (topic_id,)
                )
                return "unsubscribed"

        return await self._run(delete)

    async def is_subscribed(self, topic_id: str, client: str) -> bool:
        def query(db: sqlite3.Connection) -> bool:
            return bool(
                db.execute(
                    "SELECT 1 FROM topic_members WHERE topic = ? AND client = ?", (topic_id, client)
                ).fetchone()
            )

        return await self._read(query)

    async def topic_subscribers(self, topic_id: str, *, after: str | None, limit: int) -> list[str]:
        """The topic's subscribers in uuid order after ``after``, at most ``limit``."""

        def query(db: sqlite3.Connection) -> list[str]:
            rows = db.execute(
                "SELECT client FROM topic_members WHERE topic = ? AND client > ?"
                " ORDER BY client LIMIT ?",
                (topic_id, after or "", limit),
            )
            return [row[0] for row in rows]

        return await self._read(query)

    async def client_topics(self, client: str) -> list[str]:
        """The topics ``client`` subscribes to, in id order."""

        def query(db: sqlite3.Connection) -> list[str]:
            rows = db.execute(
                "SELECT topic FROM topic_members WHERE client = ? ORDER BY topic", (client,)
            )
            return [row[0] for row in rows]

        return await self._read(query)

    async def memberships(self, client: str) -> list[tuple[str, bool]]:
        """The topics ``client`` subscribes to, in id order, each with its presence setting."""

        def query(db: sqlite3.Connection) -> list[tuple[str, bool]]:
            rows = db.execute(
                "SELECT t.id, t.presence FROM topic_members m JOIN topics t ON t.id = m.topic"
                " WHERE m.client = ? ORDER BY t.id",
                (client,),
            )
            return [(row[0], bool(row[1])) for row in rows]

        return await self._read(query)

    async def topic_messages(
        self, topic_id: str, *, since: int, limit: int, now: float
    ) -> list[TopicMessage]:
        """The topic's history after offset ``since``, oldest first, at most ``limit``;
        none older than its ``history_age`` at ``now`` (whether or not purged yet)."""
        keys = self.keys

        def query(db: sqlite3.Connection) -> list[TopicMessage]:
            rows = db.execute(
                "SELECT m.id, m.sender, m.address, m.msgid, m.fields, m.key_id, m.accepted_at,"
                " m.topic_offset FROM messages m JOIN topics t ON t.id = m.topic"
                " WHERE m.topic = ? AND m.in_history = 1 AND m.topic_offset > ?"
                " AND m.accepted_at >= ? - t.history_age ORDER BY m.topic_offset LIMIT ?",
                (topic_id, since, now, limit),
            )
            return [
                TopicMessage(
                    offset=row["topic_offset"],
                    msgid=row["msgid"],
                    sender=row["sender"],
                    fields=_open(row, keys),
                    accepted_at=row["accepted_at"],
                )
                for row in rows
            ]

        return await self._read(query)

    async def topic_counts(self, message_ids: Sequence[int]) -> dict[int, TopicCounts]:
        """The counts of each published message's deliveries, by final status (a message
        not found is left out)."""
        return await self._read(partial(topic_counts, message_ids=message_ids))


def topic_counts(db: sqlite3.Connection, message_ids: Sequence[int]) -> dict[int, TopicCounts]:
    """See :meth:`SqliteTopicStore.topic_counts`."""
    found: dict[int, TopicCounts] = {}
    for message in message_ids:
        if not db.execute(
            "SELECT 1 FROM messages WHERE id = ? AND topic IS NOT NULL", (message,)
        ).fetchone():
            continue
        counts: dict[str, int] = dict(
            db.execute(
                "SELECT coalesce(status, ''), count(*) FROM deliveries WHERE message = ?"
                " GROUP BY status",
                (message,),
            ).fetchall()
        )
        found[message] = TopicCounts(
            total=sum(counts.values()),
            delivered=counts.get(Status.DELIVERED.value, 0),
            acknowledged=counts.get(Status.ACKNOWLEDGED.value, 0),
            failed=counts.get(Status.FAILED.value, 0),
            expired=counts.get(Status.EXPIRED.value, 0),
        )
    return found


def _open(row: sqlite3.Row, keys: StoreKeys | None) -> str:
    from ._store_messages import fields_of  # the message tables' decoder

    return fields_of(row, keys)


# --- within the relay's batches (relayd/_store_messages.py) ------------------------------------


def publish(
    db: sqlite3.Connection,
    op: Publish,
    max_queued: int,
    keys: StoreKeys | None,
    reserve: Callable[[sqlite3.Connection, int], int],
) -> PublishOutcome:
    """Run a :class:`~relayd._relay.records.Publish` (see there). ``reserve(db, n)``: the
    first of ``n`` fresh seqs."""
    broadcast = op.topic == BROADCAST
    topic = None
    if not broadcast:
        topic = db.execute(
            "SELECT creator, publish, history_count, last_offset FROM topics WHERE id = ?",
            (op.topic,),
        ).fetchone()
        if topic is None:
            return Refused("topic_not_found")
    existing = db.execute(
        "SELECT id FROM messages WHERE sender = ? AND msgid = ?", (op.sender, op.msgid)
    ).fetchone()
    if existing is not None:
        return Duplicate(existing[0], None)
    if topic is None:
        if not op.admin:
            return Refused("not_permitted")
        offset = None
        # Every live client but the sender, and whether its queue has room.
        members = db.execute(
            "SELECT c.uuid, coalesce(q.queued, 0) < ? FROM clients c"
            " LEFT JOIN queue_counts q ON q.recipient = c.uuid"
            " WHERE c.deleted_at IS NULL AND c.uuid != ? ORDER BY c.uuid",
            (max_queued, op.sender),
        ).fetchall()
    else:
        if not op.admin and op.sender != topic["creator"]:
            if topic["publish"] == "owner":
                return Refused("not_permitted")
            if not db.execute(
                "SELECT 1 FROM topic_members WHERE topic = ? AND client = ?",
                (op.topic, op.sender),
            ).fetchone():
                return Refused("not_subscribed")
        offset = topic["last_offset"] + 1
        db.execute("UPDATE topics SET last_offset = ? WHERE id = ?", (offset, op.topic))
        # Every subscriber but the sender, live, and whether its queue has room.
        members = db.execute(
            "SELECT m.client, coalesce(q.queued, 0) < ? FROM topic_members m"
            " JOIN clients c ON c.uuid = m.client AND c.deleted_at IS NULL"
            " LEFT JOIN queue_counts q ON q.recipient = m.client"
            " WHERE m.topic = ? AND m.client != ? ORDER BY m.client",
            (max_queued, op.topic, op.sender),
        ).fetchall()
    first = reserve(db, len(members) + 1)
    address = topic_address(op.topic)
    key_id: str | None = None
    fields: str | bytes = op.fields
    if keys is not None and op.fields:
        key_id, fields = keys.seal(RowId(first, op.sender, address, op.msgid), op.fields)
    db.execute(
        "INSERT INTO messages (id, sender, msgid, address, high, acknowledge, fields, key_id,"
        " accepted_at, expires_at, conversation_id, topic, topic_offset, in_history)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            first,
            op.sender,
            op.msgid,
            address,
            int(op.high),
            int(op.acknowledge),
            fields,
            key_id,
            op.accepted_at,
            op.expires_at,
            op.conversation_id,
            op.topic,
            offset,
            int(not broadcast),
        ),
    )
    queued: list[tuple[str, int]] = []
    full = 0
    rows = []
    for index, (client, room) in enumerate(members, start=1):
        seq = first + index
        if room:
            queued.append((client, seq))
        else:
            full += 1
        rows.append(
            (
                seq,
                first,
                op.sender,
                client,
                op.expires_at,
                None if room else Status.FAILED.value,
                "" if room else "queue_full",
                None if room else op.accepted_at,
                op.conversation_id,
            )
        )
    db.executemany(
        "INSERT INTO deliveries (seq, message, sender, recipient, expires_at, status, reason,"
        " finished_at, conversation_id, fanout) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
        rows,
    )
    if topic is None or offset is None:
        return Published(first, 0, tuple(queued), full)
    _trim(db, op.topic, offset - topic["history_count"])
    return Published(first, offset, tuple(queued), full)


def _trim(db: sqlite3.Connection, topic: str, up_to: int) -> None:
    """Messages of ``topic`` at offsets up to ``up_to`` leave its history."""
    gone = db.execute(
        "UPDATE messages SET in_history = 0 WHERE topic = ? AND in_history = 1"
        " AND topic_offset <= ? RETURNING id",
        (topic, up_to),
    ).fetchall()
    _left_history(db, [row[0] for row in gone])


def _left_history(db: sqlite3.Connection, messages: Sequence[int]) -> None:
    """``messages`` left their topic's history: the content of each goes unless a delivery
    of it waits, and the record too if no delivery of it is left."""
    db.executemany(
        "UPDATE messages SET fields = '', key_id = NULL WHERE id = ?1 AND NOT EXISTS"
        " (SELECT 1 FROM deliveries WHERE message = ?1 AND status IS NULL)",
        [(message,) for message in messages],
    )
    db.executemany(
        "DELETE FROM messages WHERE id = ?1 AND NOT EXISTS"
        " (SELECT 1 FROM deliveries WHERE message = ?1)",
        [(message,) for message in messages],
    )


def trim_by_age(db: sqlite3.Connection, now: float, limit: int) -> None:
    """Messages older than their topic's ``history_age`` at ``now`` leave its history (at
    most ``limit`` per call: the purge runs again soon)."""
    gone = db.execute(
        "UPDATE messages SET in_history = 0 WHERE id IN (SELECT m.id FROM messages m"
        " JOIN topics t ON t.id = m.topic WHERE m.in_history = 1"
        " AND m.accepted_at < ? - t.history_age LIMIT ?) RETURNING id",
        (now, limit),
    ).fetchall()
    _left_history(db, [row[0] for row in gone])


def forget_topic(db: sqlite3.Connection, topic_id: str) -> bool:
    """Delete a topic, its subscriptions and its history (within a transaction)."""
    if not db.execute("DELETE FROM topics WHERE id = ?", (topic_id,)).rowcount:
        return False
    db.execute("DELETE FROM topic_members WHERE topic = ?", (topic_id,))
    gone = db.execute(
        "UPDATE messages SET in_history = 0 WHERE topic = ? AND in_history = 1 RETURNING id",
        (topic_id,),
    ).fetchall()
    _left_history(db, [row[0] for row in gone])
    return True


def forget_client_topics(db: sqlite3.Connection, client: str) -> None:
    """A deleted client: its subscriptions end, the topics it owns are deleted, and what it
    published leaves the history of the others."""
    gone = db.execute(
        "UPDATE messages SET in_history = 0 WHERE sender = ? AND in_history = 1 RETURNING id",
        (client,),
    ).fetchall()
    _left_history(db, [row[0] for row in gone])
    for (topic,) in db.execute("SELECT id FROM topics WHERE creator = ?", (client,)).fetchall():
        forget_topic(db, topic)
    db.execute(
        "UPDATE topics SET subscribers = subscribers - 1 WHERE id IN"
        " (SELECT topic FROM topic_members WHERE client = ?)",
        (client,),
    )
    db.execute("DELETE FROM topic_members WHERE client = ?", (client,))
