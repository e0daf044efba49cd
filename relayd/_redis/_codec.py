"""What crosses between Python and the store's script: operations packed as compact lists, and
replies (lists of bulk strings) read back into relayd's records.

Times travel as the decimal text of ``repr(float)``, which reads back as the same float; a value
that is absent travels as ``False`` (MessagePack's nil would leave a hole in a Lua list); bytes
travel as MessagePack strings (:func:`raw`). Message content is sealed
(:mod:`relayd._atrest`) before it is packed, and opened when read.
"""

from __future__ import annotations

import struct
from typing import Any, cast

import msgspec

from relayd._atrest import RowId, StoreKeys, UndecryptableRow
from relayd._engine import (
    HistoryEntry,
    PublishPolicy,
    TopicAccess,
    TopicCounts,
    TopicMessage,
    TopicRecord,
)
from relayd._relay.records import (
    ClearKeyNotice,
    ClearReadPending,
    Duplicate,
    FindExpired,
    Finish,
    Insert,
    Inserted,
    KeyNotice,
    LoadKeyNotices,
    LoadQueue,
    LoadReceipts,
    MarkRead,
    Publish,
    Published,
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
from relayd._store import ClientRecord, InviteRecord, KeyRecord, MessageRecord
from relayd._store_topics import topic_address

PURGE_PAGE = 1000
"""Finished deliveries a purge looks at per round trip (about 0.1 ms of Redis each): a
busy relay's sweep, or the first after a long pause, never holds Redis for long."""

WRITES = (
    Insert,
    Finish,
    SetAttempts,
    SetReceiptPending,
    Purge,
    ClearKeyNotice,
    MarkRead,
    ClearReadPending,
    Publish,
)


def raw(data: bytes) -> msgspec.Raw:
    """``data`` as a MessagePack *string* of any bytes: Redis's Lua MessagePack reader
    predates the *bin* types, which is how msgspec packs bytes."""
    size = len(data)
    if size < 32:
        header = bytes([0xA0 | size])
    elif size < 1 << 8:
        header = struct.pack(">BB", 0xD9, size)
    elif size < 1 << 16:
        header = struct.pack(">BH", 0xDA, size)
    else:
        header = struct.pack(">BI", 0xDB, size)
    return msgspec.Raw(header + data)


def when(value: float) -> str:
    """A time as the script keeps it: text that reads back as the same float."""
    return repr(float(value))


def maybe_when(value: float | None) -> str | bool:
    return False if value is None else when(value)


def text(value: bytes) -> str:
    return value.decode("utf-8")


def maybe_text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8")


def maybe_float(value: bytes | None) -> float | None:
    return None if value is None else float(value)


# --- clients, families, invites, keys --------------------------------------------------------


def client_record(row: list[Any] | None) -> ClientRecord | None:
    """``{uuid, name, secret_hash, roles, created_at, tokens_valid_after, deleted_at,
    reads_private, last_seen}``."""
    if row is None:
        return None
    uuid, name, secret_hash, roles, created_at, valid_after, deleted_at, private, seen = row
    return ClientRecord(
        uuid=text(uuid),
        name=text(name),
        secret_hash=text(secret_hash),
        roles=tuple(text(roles).split()),
        created_at=float(created_at),
        tokens_valid_after=float(valid_after),
        deleted_at=maybe_float(deleted_at),
        read_receipts=private != b"1",
        last_seen=maybe_float(seen),
    )


def invite_record(row: list[Any]) -> InviteRecord:
    invite, created_at, created_by, expires_at, used_at, used_by = row
    return InviteRecord(
        text(invite),
        float(created_at),
        text(created_by),
        float(expires_at),
        maybe_float(used_at),
        maybe_text(used_by),
    )


def key_records(rows: list[list[Any]]) -> list[KeyRecord]:
    """``{n, algorithm, key, fingerprint, published_at, superseded_at}`` rows, as SQLite orders
    them: current keys first, then superseded ones, newest first; then by algorithm, and the
    newest record first."""

    def order(row: list[Any]) -> tuple[bool, float, bytes, int]:
        superseded = maybe_float(row[5])
        return superseded is not None, -(superseded or 0.0), row[1], -int(row[0])

    return [
        KeyRecord(text(a), bytes(k), text(f), float(p), maybe_float(s))
        for _, a, k, f, p, s in sorted(rows, key=order)
    ]


def key_notice(row: list[Any]) -> KeyNotice:
    reader, client, algorithm, fingerprint, previous, changed_at = row
    return KeyNotice(
        text(reader),
        text(client),
        text(algorithm),
        text(fingerprint),
        text(previous),
        float(changed_at),
    )


# --- messages --------------------------------------------------------------------------------


def seal(op: Insert, keys: StoreKeys | None) -> tuple[str | bool, str | msgspec.Raw]:
    """The key id (``False``: plain) and the fields to store for ``op``."""
    if keys is None or not op.fields:
        return False, op.fields
    key_id, blob = keys.seal(RowId(op.seq, op.sender, op.recipient, op.msgid), op.fields)
    return key_id, raw(blob)


def encode_publish(op: Publish, message: int, keys: StoreKeys | None) -> list[Any]:
    """``op`` as the script's ``execute`` takes it, stored as message ``message`` (a seq
    reserved for it): its content is sealed for that id and the topic's address, as SQLite
    seals it (relayd/_store_topics.py)."""
    key_id: str | bool = False
    fields: str | msgspec.Raw = op.fields
    if keys is not None and op.fields:
        address = topic_address(op.topic)
        key_id, blob = keys.seal(RowId(message, op.sender, address, op.msgid), op.fields)
        fields = raw(blob)
    return [
        "B",
        message,
        op.topic,
        op.sender,
        op.msgid,
        int(op.high),
        int(op.acknowledge),
        fields,
        key_id,
        when(op.accepted_at),
        when(op.expires_at),
        int(op.admin),
        False if op.conversation_id is None else op.conversation_id,
    ]


def encode(op: StoreOp, keys: StoreKeys | None) -> list[Any]:
    """``op`` as the script's ``execute`` takes it (see store.lua's SIGNATURES); a
    :class:`Publish` needs its message's id (:func:`encode_publish`)."""
    if isinstance(op, Insert):
        key_id, fields = seal(op, keys)
        return [
            "I",
            op.seq,
            op.sender,
            op.recipient,
            op.msgid,
            int(op.high),
            int(op.acknowledge),
            fields,
            key_id,
            when(op.accepted_at),
            when(op.expires_at),
            op.attempts,
            False if op.status is None else op.status.value,
            int(op.receipt_pending),
            op.reason,
            False if op.conversation_id is None else op.conversation_id,
        ]
    if isinstance(op, Finish):
        return [
            "F",
            op.seq,
            op.status.value,
            when(op.finished_at),
            int(op.receipt_pending),
            op.reason,
            int(op.keep_content),
            maybe_when(op.delivered_at),
        ]
    if isinstance(op, SetAttempts):
        return ["A", op.seq, op.attempts, maybe_when(op.at)]
    if isinstance(op, SetReceiptPending):
        return ["P", list(op.seqs), int(op.pending)]
    if isinstance(op, LoadQueue):
        return ["Q", op.recipient, op.after, op.limit, op.max_bytes]
    if isinstance(op, LoadReceipts):
        return ["R", op.sender, op.after, op.limit]
    if isinstance(op, FindExpired):
        return ["X", when(op.now), op.limit]
    if isinstance(op, Purge):
        return [
            "G",
            when(op.finished_before),
            when(op.receipts_before),
            PURGE_PAGE,
            0,
            maybe_when(op.now),
        ]
    if isinstance(op, LoadKeyNotices):
        return ["N", op.reader, op.limit]
    if isinstance(op, ClearKeyNotice):
        n = op.notice
        return ["C", n.reader, n.client, n.algorithm, n.fingerprint, when(n.changed_at)]
    if isinstance(op, MarkRead):
        return ["M", op.reader, op.msgid, False if op.sender is None else op.sender, when(op.at)]
    if isinstance(op, ClearReadPending):
        return ["T", list(op.seqs)]
    raise TypeError(f"not a store operation: {op!r}")


def decode(op: StoreOp, reply: Any, keys: StoreKeys | None) -> Any:
    """The result of ``op`` from its reply, as :meth:`Store.execute` gives it."""
    if isinstance(op, Insert):
        return _outcome(reply)
    if isinstance(op, Publish):
        return _published(reply)
    if isinstance(op, LoadQueue):
        return _queue_page(op, reply, keys)
    if isinstance(op, LoadReceipts):
        return [_receipt(row) for row in reply]
    if isinstance(op, FindExpired):
        return [stored_message(row, keys) for row in reply]
    if isinstance(op, LoadKeyNotices):
        return [key_notice(row) for row in reply]
    if isinstance(op, MarkRead):
        return _read_outcome(reply)
    return None


def _read_outcome(reply: list[Any]) -> ReadOutcome:
    """``{code}``, or ``{code, seq, sender, read_at, owed}``."""
    code = ReadCode(text(reply[0]))
    if len(reply) == 1:
        return ReadOutcome(code)
    _, seq, sender, read_at, owed = reply
    return ReadOutcome(code, int(seq), text(sender), maybe_float(read_at), owed=owed == 1)


def _outcome(reply: list[Any]) -> Inserted | Duplicate | Refused:
    if reply[0] == 1:
        return Inserted(int(reply[1]))
    return _not_stored(reply)


def _not_stored(reply: list[Any]) -> Duplicate | Refused:
    """``{2, id, status}`` (a duplicate of message ``id``) or ``{3, reason}``."""
    if reply[0] == 2:
        status = maybe_text(reply[2])
        return Duplicate(int(reply[1]), None if status is None else Status(status))
    return Refused(text(reply[1]))


def _published(reply: list[Any]) -> Published | Duplicate | Refused:
    """``{1, id, offset, {recipient...}, {seq...}, full}``, or as an Insert's refusal or
    duplicate."""
    if reply[0] != 1:
        return _not_stored(reply)
    _, message, offset, recipients, seqs, full = reply
    deliveries = tuple((text(r), int(seq)) for r, seq in zip(recipients, seqs, strict=True))
    return Published(int(message), int(offset), deliveries, int(full))


def content_id(row: list[Any]) -> RowId:
    """What a content row's fields are bound to: ``{id, sender, address, msgid, fields,
    key_id}``, as the script's ``first_sealed`` and ``plain_rows`` send them."""
    return RowId(int(row[0]), text(row[1]), text(row[2]), text(row[3]))


def open_content(row: list[Any], keys: StoreKeys | None) -> str:
    """A content row's fields in plain text (see :func:`content_id`).

    Raises:
        UndecryptableRow: encrypted, and ``keys`` cannot decrypt them.
    """
    return _open(content_id(row), row[4], row[5], keys)


def open_fields(row: list[Any], keys: StoreKeys | None) -> str:
    """A delivery row's fields in plain text (decrypted if they were stored encrypted).

    The content is bound to its message (id, sender, address, msgid); a direct message's
    delivery goes to the message's address, so a delivery pointed at another recipient
    does not open, as a message pointed at one does not decrypt.

    Raises:
        UndecryptableRow: encrypted, and ``keys`` cannot decrypt them, or the delivery is
            not to the address its message was sealed for.
    """
    return _open_delivery(
        seq=row[0],
        message=row[11],
        sender=row[1],
        recipient=row[2],
        address=row[12],
        msgid=row[3],
        fields=row[6],
        key_id=row[7],
        keys=keys,
    )


def _open_delivery(
    *,
    seq: int,
    message: int,
    sender: bytes,
    recipient: bytes,
    address: bytes,
    msgid: bytes,
    fields: bytes,
    key_id: bytes | None,
    keys: StoreKeys | None,
) -> str:
    """See :func:`open_fields`."""
    # A topic's message is sealed for its topic (relayd/_store_topics.py), not a recipient.
    if key_id is not None and recipient != address and not address.startswith(b"#"):
        raise UndecryptableRow(
            f"delivery {int(seq)} goes to {text(recipient)}, but its message {int(message)}"
            f" was sealed for {text(address)}"
        )
    return _open(
        RowId(int(message), text(sender), text(address), text(msgid)), fields, key_id, keys
    )


def _open(row: RowId, fields: bytes, key_id: bytes | None, keys: StoreKeys | None) -> str:
    if key_id is None:
        return text(fields)
    if keys is None:
        raise UndecryptableRow(f"message {row.seq} is encrypted and no store key was loaded")
    return keys.open(row, text(key_id), fields)


def stored_message(
    row: list[Any], keys: StoreKeys | None, fields: str | None = None
) -> StoredMessage:
    """``{seq, sender, recipient, msgid, high, acknowledge, fields, key_id, accepted_at,
    expires_at, attempts, message id, address, topic, offset}``: a delivery and its message."""
    return StoredMessage(
        seq=int(row[0]),
        sender=text(row[1]),
        recipient=text(row[2]),
        msgid=text(row[3]),
        high=row[4] == b"1",
        acknowledge=row[5] == b"1",
        fields=open_fields(row, keys) if fields is None else fields,
        accepted_at=float(row[8]),
        expires_at=float(row[9]),
        attempts=int(row[10]),
        topic=maybe_text(row[13]),
        offset=None if row[14] is None else int(row[14]),
    )


def _queue_page(op: LoadQueue, reply: list[Any], keys: StoreKeys | None) -> QueuePage:
    """At most ``op.limit`` rows that fit in ``op.max_bytes`` (the first always comes); the
    script sends one row more than the page takes when more wait."""
    rows: list[StoredMessage] = []
    total = 0
    for row in reply:
        if len(rows) == op.limit:
            return QueuePage(rows, more=True)
        fields = open_fields(row, keys)
        size = size_of(fields)
        if rows and total + size > op.max_bytes:
            return QueuePage(rows, more=True)
        rows.append(stored_message(row, keys, fields))
        total += size
    return QueuePage(rows, more=False)


def _receipt(row: list[Any]) -> StoredReceipt:
    """``{seq, msgid, recipient, status, finished_at, reason, final owed, read_at}``
    (``read_at`` absent unless the read receipt is owed)."""
    seq, msgid, recipient, status, finished_at, reason, final, read_at = row
    return StoredReceipt(
        int(seq),
        text(msgid),
        text(recipient),
        None if status is None else Status(text(status)),
        maybe_float(finished_at),
        text(reason),
        final=final == 1,
        read_at=maybe_float(read_at),
    )


def recent_message(row: list[Any]) -> RecentMessage:
    sender, msgid, accepted_at, status = row
    return RecentMessage(
        text(sender),
        text(msgid),
        float(accepted_at),
        None if status is None else Status(text(status)),
    )


def message_record(row: list[Any]) -> MessageRecord:
    (
        seq,
        sender,
        recipient,
        msgid,
        status,
        reason,
        attempts,
        accepted_at,
        expires_at,
        finished,
        delivered_at,
        read_at,
        message,
        topic,
    ) = row
    return MessageRecord(
        int(seq),
        text(sender),
        text(recipient),
        text(msgid),
        maybe_text(status),
        text(reason),
        int(attempts),
        float(accepted_at),
        float(expires_at),
        maybe_float(finished),
        maybe_float(delivered_at),
        maybe_float(read_at),
        int(message),
        maybe_text(topic),
    )


def history_entry(row: list[Any], keys: StoreKeys | None) -> HistoryEntry:
    """``{seq, sender, recipient, msgid, fields, key_id, conversation_id, status, reason,
    attempts, accepted_at, delivered_at, finished_at, message id, address, read_at}``, as the
    script's ``history`` sends it (``read_at`` absent for a sender the reader hid it from);
    ``fields`` opened as a queued delivery's are (:func:`open_fields`), ``""`` once erased.

    Raises:
        UndecryptableRow: as :func:`open_fields`.
    """
    (
        seq,
        sender,
        recipient,
        msgid,
        fields,
        key_id,
        conversation,
        status,
        reason,
        attempts,
        accepted_at,
        delivered_at,
        finished_at,
        message,
        address,
        read_at,
    ) = row
    return HistoryEntry(
        seq=int(seq),
        msgid=text(msgid),
        sender=text(sender),
        recipient=text(recipient),
        fields=_open_delivery(
            seq=seq,
            message=message,
            sender=sender,
            recipient=recipient,
            address=address,
            msgid=msgid,
            fields=fields,
            key_id=key_id,
            keys=keys,
        )
        if fields
        else "",
        conversation_id=maybe_text(conversation),
        status=maybe_text(status),
        reason=text(reason),
        attempts=int(attempts),
        accepted_at=float(accepted_at),
        delivered_at=maybe_float(delivered_at),
        read_at=maybe_float(read_at),
        finished_at=maybe_float(finished_at),
    )


# --- topics ------------------------------------------------------------------------------------


def topic_record(row: list[Any] | None) -> TopicRecord | None:
    """``{id, creator, metadata, access, publish, presence, history_count, history_age,
    created_at, subscribers, last_offset}``."""
    if row is None:
        return None
    id_, creator, metadata, access, publish, presence, count, age, created_at, members, last = row
    return TopicRecord(
        id=text(id_),
        creator=text(creator),
        metadata=text(metadata),
        access=cast(TopicAccess, text(access)),
        publish=cast(PublishPolicy, text(publish)),
        presence=presence == b"1",
        history_count=int(count),
        history_age=float(age),
        created_at=float(created_at),
        subscribers=int(members),
        last_offset=int(last),
    )


def topic_message(row: list[Any], keys: StoreKeys | None) -> TopicMessage:
    """``{offset, msgid, sender, fields, key_id, accepted_at, message id, address}``, its
    content opened.

    Raises:
        UndecryptableRow: encrypted, and ``keys`` cannot decrypt it.
    """
    offset, msgid, sender, fields, key_id, accepted_at, message, address = row
    return TopicMessage(
        offset=int(offset),
        msgid=text(msgid),
        sender=text(sender),
        fields=_open(
            RowId(int(message), text(sender), text(address), text(msgid)), fields, key_id, keys
        ),
        accepted_at=float(accepted_at),
    )


def topic_counts(row: list[Any]) -> tuple[int, TopicCounts]:
    """``{id, deliveries, delivered, acknowledged, failed, expired}``."""
    message, total, delivered, acknowledged, failed, expired = (int(n) for n in row)
    return message, TopicCounts(total, delivered, acknowledged, failed, expired)
