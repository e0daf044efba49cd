"""The relay core's state: sessions, messages and recipients, and the moves a message may make.

Plain data, no behaviour beyond :func:`move`: the core's parts (``sessions.py``,
``delivery.py``, ``receipts.py``) change it, the hub (``hub.py``) hands references to it back
and forth with the sockets. See the core's module docstring for the rules that hold between
events.
"""

from __future__ import annotations

import enum
import math
from collections import deque

from attrs import define, field, frozen

from .records import Insert, KeyNotice, LoadKeyNotices, LoadQueue, LoadReceipts, Status, size_of


@frozen
class Identity:
    """Who a verified token speaks for, and which token it is."""

    client: str
    name: str
    issued_at: float
    expires_at: float
    token_id: str = ""  # the token's jti
    login: str | None = None  # the token's refresh family, if it was issued for a login
    epoch: int = 0  # cluster mode: the session's claim on its client (see relayd/_cluster.py)


class Phase(enum.Enum):
    PENDING = "pending"
    ACTIVE = "active"
    CLOSING = "closing"


class Where(enum.Enum):
    """Where an accepted message is (rule 2 of the module docstring)."""

    STAGED = "staged"
    STORED = "stored"
    MAILBOX = "mailbox"
    SENT = "sent"
    UNACKED = "unacked"
    BACKOFF = "backoff"
    DONE = "done"


# The moves a message may make, and nothing else (see move). A stored message has left
# memory: it comes back as a new Message when loaded. Staged to staged: put back at the head
# of its recipient's staging, to be stored after all.
MOVES: dict[Where, frozenset[Where]] = {
    Where.STAGED: frozenset({Where.STAGED, Where.MAILBOX, Where.STORED, Where.DONE}),
    Where.MAILBOX: frozenset({Where.SENT, Where.STAGED, Where.STORED, Where.DONE}),
    Where.SENT: frozenset({Where.UNACKED, Where.MAILBOX, Where.STAGED, Where.STORED, Where.DONE}),
    Where.UNACKED: frozenset({Where.BACKOFF, Where.MAILBOX, Where.DONE}),
    Where.BACKOFF: frozenset({Where.MAILBOX, Where.DONE}),
    Where.STORED: frozenset(),
    Where.DONE: frozenset(),
}


class IllegalMove(AssertionError):
    """The core tried to move a message where :data:`MOVES` does not allow: a bug."""


def move(message: Message, to: Where) -> None:
    """The one place a message changes place, checked against :data:`MOVES`.

    Raises:
        IllegalMove: the move is not in the table.
    """
    if to not in MOVES[message.where]:
        raise IllegalMove(f"message {message.seq}: {message.where.name} -> {to.name}")
    message.where = to


@define(eq=False)
class Session:
    sid: int
    remote: str
    opened_at: float
    last_seen: float
    pong_observable: bool
    lean: bool = False  # the lean receipt profile
    phase: Phase = Phase.PENDING
    client: str | None = None
    token_id: str = ""  # the jti of the token the session runs on now
    login: str | None = None  # that token's refresh family
    epoch: int = 0  # cluster mode: its claim on the client, newer claims are higher
    expires_at: float = 0.0
    authenticating: bool = False
    admitted: bool = False  # counted against the connection limits (see open)
    queued: int = 0  # frames handed to the socket, not yet written
    token_timer: float | None = None  # when the pending token timer fires, if one is
    warned_for: float = 0.0  # the expiry the client was last warned about
    last_ping: float = 0.0
    held: list[str | bytes] = field(factory=list)  # frames read while a token was checked
    receipts: LoadReceipts | None = None  # the owed receipts being loaded, if any
    receipt_cursor: int = 0  # highest seq of an owed receipt loaded
    receipts_more: bool = False  # the store may owe more than was loaded
    # Cluster mode: a receipt stored at or above this + 1 was hinted while a load was under
    # way (the load's answer may not have it): look again from here once it is in.
    receipt_rewind: float = math.inf
    notices: LoadKeyNotices | None = None  # the owed key changes being loaded, if any
    notices_out: int = 0  # key_changed frames handed to the socket, not yet written
    notices_more: bool = False  # the store may owe key changes not sent on this session
    # A REST session (GET /messages/pending): no socket; deliveries go out only to a pull,
    # never receipts or key changes (they stay owed for the client's next socket).
    rest: bool = False
    pulling: bool = False  # REST: a pull is waiting for deliveries
    credit: int = 0  # REST: deliveries the waiting pull may still take
    reads: int = 0  # its read frames whose store operation is under way (see RelayCore.readable)
    moved: bool = False  # a newer session of its client on another node replaced it


@define(eq=False)
class Message:
    sender: str
    recipient: str
    msgid: str
    high: bool
    acknowledge: bool
    fields: str  # the 13 fields as delivered, JSON: encoded once, stored and sent as is
    accepted_at: float
    expires_at: float
    durable: bool
    seq: int  # allocated at acceptance: the order of first deliveries
    conversation_id: str | None = None  # stored in plain text: history filters by it
    topic: str | None = None  # a topic's delivery: no receipt is told (see topics.py)
    offset: int | None = None  # its offset in the topic
    attempts: int = 0
    # The attempts its store row counts (or will, once ``recording`` is done). A row counts a
    # first attempt before the message can reach its recipient's socket, so a crash never
    # hides a delivery: loaded after a restart, the message is a redelivery exactly when its
    # row counts one. A message stored while its recipient is online is inserted counting
    # one; any other waits in its mailbox for that write (see Delivery.pump). A row that counts an
    # attempt never made is corrected when the message leaves memory unsent; only a crash
    # leaves it so.
    recorded_attempts: int = 0
    recording: bool = False  # its first attempt is being written: it may not go out yet
    where: Where = Where.STAGED
    status: Status | None = None  # the last status its sender was told
    committed: bool = False
    holder: Recipient | None = None  # whose memory counts it (see Recipient.held_bytes)
    sid: int | None = None  # the session it was last sent on
    written_at: float = 0.0  # when it was last written to the recipient's socket
    # When it was first written to its recipient while in memory: its row learns it with the
    # next write about it (its Finish, its attempts, or a read of it: see Delivery.record_written).
    delivered_at: float | None = None
    gen: int = 0  # bumped on every move, so stale timers are ignored
    # Submitted without a session (RelayCore.submit): the ticket its first answer goes to
    # while the submitter waits for it; None once answered, abandoned, or for a socket's.
    ticket: int | None = None
    # Its submitter was answered without a receipt (it stopped waiting): every receipt that
    # follows is an update, not the first.
    answered: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.sender, self.msgid)

    @property
    def size(self) -> int:
        return size_of(self.fields)


@frozen
class ReceiptRef:
    """A final receipt handed to the sender's socket.

    A stored message's row says the receipt is owed (``receipt_pending``) until the frame is
    written. A message never stored (delivered straight from memory) gets its row only now:
    ``owed``, inserted as told once the frame is written, as owed if it is not.
    """

    seq: int
    owed: Insert | None = None


@frozen
class ReadRef:
    """A read receipt handed to the sender's socket: the delivery's row says it is owed
    (``read_pending``) until the frame is written."""

    seq: int


Ref = Message | ReceiptRef | ReadRef | KeyNotice


@define(eq=False)
class Recipient:
    """Delivery state of a connected client."""

    client: str
    session: Session
    high: deque[Message] = field(factory=deque)
    normal: deque[Message] = field(factory=deque)
    unacked: dict[str, Message] = field(factory=dict)  # by msgid
    backlog: bool = True  # the store may hold queued messages not in memory
    cursor: int = 0  # highest seq brought into memory
    loading: LoadQueue | None = None
    stored_since: int = 0  # messages sent to the store while loading: keeps `backlog` honest
    load_mark: int = 0
    # Cluster mode: the next load starts no higher than this (a message parked by another
    # node can sort below the cursor; see RelayCore.wake).
    rewind: float = math.inf
    paused: bool = False  # a replaced session has not reported its unsent frames yet
    # Bytes of the messages held in memory for it: in its mailbox, sent or unacked. Bounded by
    # relay.mailbox_bytes (plus one message); a sent message's frame is a copy of its text.
    held_bytes: int = 0

    def mailbox_len(self) -> int:
        return len(self.high) + len(self.normal)


# Frames a client may send behind its token while relayd checks it; more closes 4001.
