"""Messages as the store keeps them, and the store operations the relay core asks for.

The core never touches the store: it emits these operations as data, the hub runs them in
order (consecutive ones in one transaction: a group commit), and the results come back to the
core in the same order. An operation sees the effect of every operation before it.
"""

from __future__ import annotations

import enum
import sys
from typing import Any

from attrs import frozen


class Status(enum.StrEnum):
    """A message's status as its sender is told it (``delivery_status`` and ``delivery_update``)."""

    QUEUED_OFFLINE = "queued_offline"  # stored durably; the recipient is offline
    QUEUED = "queued"  # stored durably; the recipient is online but has a backlog
    PENDING_ACK = "pending_ack"  # stored durably; being delivered, awaiting the recipient's ack
    DELIVERED = "delivered"  # written to the recipient's socket (acknowledge: false)
    ACKNOWLEDGED = "acknowledged"  # the recipient acknowledged it
    FAILED = "failed"  # not acknowledged after max_attempts deliveries, or lost in delivery
    EXPIRED = "expired"  # its ttl passed before it could be delivered or acknowledged


FINAL = frozenset({Status.DELIVERED, Status.ACKNOWLEDGED, Status.FAILED, Status.EXPIRED})


@frozen
class StoredMessage:
    """A queued message as loaded from the store."""

    seq: int
    sender: str
    recipient: str
    msgid: str
    high: bool
    acknowledge: bool
    fields: str  # the 13 fields, JSON
    accepted_at: float
    expires_at: float
    attempts: int
    topic: str | None = None  # published to this topic (see Publish), at ``offset`` in it
    offset: int | None = None


@frozen
class StoredReceipt:
    """What a delivery's sender has not been told yet: its final status (``final``), its read
    receipt (``read_at`` not ``None``), or both. Kept apart, each told and marked told on its
    own, so that neither can clear the other: a read may land while the final status is being
    told, or the reverse."""

    seq: int
    msgid: str
    recipient: str
    status: Status | None  # None: not final yet (a read receipt of a pending_ack delivery)
    finished_at: float | None
    reason: str
    final: bool = True  # the final status is owed
    read_at: float | None = None  # the read receipt is owed: when the recipient read it


@frozen
class RecentMessage:
    """A message deduplication remembers: its key, when it was accepted, its status."""

    sender: str
    msgid: str
    accepted_at: float
    status: Status | None  # None: still queued


# --- write operations ---------------------------------------------------------------------------


@frozen
class Insert:
    """Store a message: queued, or (``status`` final) only its receipt for an offline sender.

    Refused as a duplicate if ``(sender, msgid)`` is already stored, as ``unknown_recipient``
    if no live client has the recipient's uuid, and as ``queue_full`` past ``max_queued``.
    """

    ref: Any  # the core's object, handed back with the outcome
    seq: int  # allocated by the core at acceptance: the order of first deliveries
    sender: str
    recipient: str
    msgid: str
    high: bool
    acknowledge: bool
    fields: str
    accepted_at: float
    expires_at: float
    attempts: int = 0
    status: Status | None = None  # None: queued
    receipt_pending: bool = False
    reason: str = ""
    conversation_id: str | None = None  # kept in plain text, for history's filter


# Publish's topic for a broadcast to every live client (no topic has this id: see
# frames.TOPIC_ID): admins only, no history, no offset.
BROADCAST = "*"


@frozen(eq=False)
class Publish:
    """Store a message published to ``topic`` once, with one queued delivery of it to every
    subscriber of the topic but its sender, each with its own seq (allocated by the store,
    above every seq handed out: see ``MessageStore.reserve_seqs``), and give it the topic's
    next offset. Every delivery is told to nobody: a topic message's receipts are its counts
    (``MessageStore.topic_counts``), never a frame per subscriber.

    Refused (:class:`Refused`) as ``topic_not_found``; as ``not_permitted`` if the topic is
    owner-only (``publish`` ``"owner"``) and the sender neither its owner nor ``admin``; as
    ``not_subscribed`` if the sender is neither its owner, nor a subscriber, nor ``admin``.
    To :data:`BROADCAST`: a delivery to every live client but the sender (refused as
    ``not_permitted`` but for ``admin``), kept in no history (``offset`` 0).
    A subscriber whose queue holds ``max_queued`` gets its delivery failed at once
    (reason ``queue_full``). A duplicate ``(sender, msgid)`` is :class:`Duplicate` (seq: the
    message's id).

    Compared by identity: the core matches a result to the request it made.
    """

    ref: Any
    topic: str
    sender: str
    msgid: str
    high: bool
    acknowledge: bool
    fields: str
    accepted_at: float
    expires_at: float
    admin: bool = False
    conversation_id: str | None = None


@frozen
class Published:
    """What a :class:`Publish` stored: the message's id and topic ``offset``, the queued
    deliveries as ``(recipient, seq)``, and how many subscribers' queues were full."""

    message: int
    offset: int
    deliveries: tuple[tuple[str, int], ...]
    full: int = 0

    @property
    def subscribers(self) -> int:
        return len(self.deliveries) + self.full


@frozen
class Finish:
    """Give a queued message its final status; ``receipt_pending`` if the sender is offline.
    Its content is erased once none of its deliveries is queued, unless ``keep_content``
    (history keeps it: ``history.retention``)."""

    seq: int
    status: Status
    finished_at: float
    receipt_pending: bool
    reason: str = ""
    keep_content: bool = False
    delivered_at: float | None = None  # when it was first written, if the row may not know


@frozen
class SetAttempts:
    """Record how often a queued message was delivered (kept when it leaves memory). With
    ``ref`` (the core's message), the core waits for this write before the message's frame
    goes out, and is told when it is done."""

    seq: int
    attempts: int
    ref: Any = None
    at: float | None = None  # when: the first one is the delivery's delivered_at


@frozen
class SetReceiptPending:
    """Mark receipts as told (``pending=False``) or as still owed (``pending=True``)."""

    seqs: tuple[int, ...]
    pending: bool


@frozen(eq=False)
class MarkRead:
    """The recipient ``reader`` read its delivery of ``msgid``: the one ``sender`` sent, or
    (``sender`` ``None``) the newest delivery of that msgid to it. Records ``at`` as its
    ``read_at`` unless it has one; the read receipt is owed to the sender then, unless the
    reader keeps its reads to itself (``read_receipts`` off: then the sender is never shown
    it). Only a delivery written to its recipient (``delivered_at`` set) can be read. The
    answer is a :class:`ReadOutcome`.

    ``ref``: who asked (the core's session id, or the REST route's waiter), handed back.
    Compared by identity: the core matches a result to the request it made.
    """

    ref: Any
    reader: str
    msgid: str
    sender: str | None
    at: float


@frozen
class ClearReadPending:
    """Read receipts were written to their senders' sockets: owed no more."""

    seqs: tuple[int, ...]


# --- read operations ----------------------------------------------------------------------------


@frozen(eq=False)
class LoadQueue:
    """Queued messages for ``recipient`` with ``seq > after``, oldest first: at most ``limit``
    of them, and no more than fit in ``max_bytes`` (by :func:`size_of` their fields; the first
    one always comes). The answer is a :class:`QueuePage`.

    Compared by identity: the core matches a result to the request it made.
    """

    recipient: str
    after: int
    limit: int
    max_bytes: int


@frozen
class QueuePage:
    """What a :class:`LoadQueue` found: ``more`` if it stopped at a limit before the end."""

    rows: list[StoredMessage]
    more: bool


def size_of(text: str) -> int:
    """The memory a message's text takes, in bytes: what relayd's byte limits count."""
    return sys.getsizeof(text)


@frozen(eq=False)
class LoadReceipts:
    """Receipts owed to ``sender`` with ``seq > after``, oldest first, at most ``limit``.

    Compared by identity: the core matches a result to the request it made.
    """

    sender: str
    after: int
    limit: int


@frozen
class FindExpired:
    """Queued messages whose ``expires_at`` is at or before ``now``, at most ``limit``."""

    now: float
    limit: int


@frozen
class Purge:
    """Forget finished messages older than ``finished_before`` whose receipts were told,
    and receipts older than ``receipts_before`` that nobody came for."""

    finished_before: float
    receipts_before: float
    # Topic messages older than their topic's history_age at ``now`` leave its history
    # (``None``: not this time).
    now: float | None = None


@frozen
class KeyNotice:
    """A key change a correspondent (``reader``) of ``client`` is owed: ``client``'s
    ``algorithm`` key is now ``fingerprint``, it was ``previous`` (see relayd/_keys.py)."""

    reader: str
    client: str
    algorithm: str
    fingerprint: str
    previous: str
    changed_at: float


@frozen(eq=False)
class LoadKeyNotices:
    """Key changes owed to ``reader``, oldest first, at most ``limit`` (a list of
    :class:`KeyNotice`).

    Compared by identity: the core matches a result to the request it made.
    """

    reader: str
    limit: int


@frozen
class ClearKeyNotice:
    """``notice`` was written to its reader's socket: forget it, unless a newer change of the
    same key replaced it since (then that one is still owed)."""

    notice: KeyNotice


StoreOp = (
    Insert
    | Finish
    | SetAttempts
    | SetReceiptPending
    | LoadQueue
    | LoadReceipts
    | FindExpired
    | Purge
    | LoadKeyNotices
    | ClearKeyNotice
    | MarkRead
    | ClearReadPending
    | Publish
)


@frozen
class Inserted:
    seq: int


@frozen
class Duplicate:
    seq: int
    status: Status | None  # None: still queued


@frozen
class Refused:
    code: str  # unknown_recipient or queue_full


InsertOutcome = Inserted | Duplicate | Refused
PublishOutcome = Published | Duplicate | Refused


class ReadCode(enum.StrEnum):
    """What a :class:`MarkRead` found (the REST and WebSocket error codes, but ``read`` and
    ``already_read``)."""

    READ = "read"  # marked read now
    ALREADY_READ = "already_read"  # it was read before: nothing changed, nobody is told again
    NOT_DELIVERED = "not_delivered"  # not written to the reader yet
    NOT_YOURS = "not_yours"  # the msgid exists, but no delivery of it is to the reader
    UNKNOWN_MESSAGE = "unknown_message"  # no stored message has that msgid


@frozen
class ReadOutcome:
    """The answer to a :class:`MarkRead`: ``seq``, ``sender`` and ``read_at`` of the delivery
    found (``0``, ``""``, ``None`` when none was); ``owed``: its sender is owed a read receipt
    now (marked read now, and the reader shares its reads)."""

    code: ReadCode
    seq: int = 0
    sender: str = ""
    read_at: float | None = None
    owed: bool = False
