"""What the relay core asks its driver to do: the actions :meth:`RelayCore.take_actions` hands
out (store operations, defined in ``records.py``, among them)."""

from __future__ import annotations

from typing import Any

from attrs import frozen

from .model import Message, Ref
from .records import Insert, StoreOp


@frozen
class Send:
    """Queue ``text`` on session ``sid``'s socket; report ``ref`` back through ``written``."""

    sid: int
    text: str
    ref: Ref | None = None


@frozen
class Close:
    """Close session ``sid``: after the frames queued before it, or at once if ``abort``."""

    sid: int
    code: int
    reason: str
    abort: bool = False


@frozen
class Authenticate:
    """Verify ``token`` for session ``sid``; answer ``authenticated`` or ``auth_failed``."""

    sid: int
    token: str
    refresh: bool


@frozen
class Ping:
    """Send session ``sid`` a heartbeat ping (its transport decides how)."""

    sid: int


@frozen
class ReserveSeqs:
    """Reserve ``count`` message seqs in the store; answer :meth:`RelayCore.seqs_reserved`."""

    count: int


@frozen
class Announce:
    """Cluster mode: tell the node that holds ``client``'s session (if any) that the store
    has something new for it: ``wake`` (a message queued for it at ``seq``) or ``receipts``
    (a receipt owed to it at ``seq``). Runs after every store operation decided before it is
    committed: it is a hint, and the store is the truth."""

    kind: str
    client: str
    seq: int


@frozen
class Answer:
    """The first answer to a message submitted without a session (:meth:`RelayCore.submit`),
    for the request waiting on ``ticket``: a receipt (``receipt``, the fields of a
    ``delivery_status`` frame, see :func:`relayd._relay.frames.receipt_doc`), or a refusal
    (``error``, the code of the error frame a socket would have got, with ``details``)."""

    ticket: int
    receipt: dict[str, Any] | None = None
    error: str = ""
    message: str = ""
    details: dict[str, Any] | None = None


@frozen
class CountTopics:
    """Read the counts of these published messages' deliveries
    (``TopicStore.topic_counts``); answer :meth:`RelayCore.topics_counted`, or
    :meth:`RelayCore.topics_not_counted` if the store could not answer."""

    messages: tuple[int, ...]


@frozen
class LoadMemberships:
    """Load ``client``'s topics (``TopicStore.memberships``) for its live session ``sid``;
    answer :meth:`RelayCore.memberships_loaded`."""

    sid: int
    client: str


@frozen
class PresenceNote:
    """A presence ``event`` (online, offline, joined, left) of ``client`` in ``topic``:
    apply it here (:meth:`RelayCore.presence_event`) and, in cluster mode, on every node."""

    topic: str
    client: str
    event: str


@frozen
class TypingNote:
    """``sender`` is typing (``state``) to the client ``to`` or in ``topic``: pass it on here
    (:meth:`RelayCore.typed`) and, in cluster mode, to the nodes that may hold its readers.
    Never stored: lost with a node, as a typing indicator may be."""

    sender: str
    state: str
    to: str | None = None
    topic: str | None = None


@frozen
class Seen:
    """``client`` had a live socket ``at`` (it connected, or its socket closed): the
    directory's ``last_seen`` (``ClientStore.set_last_seen``). Best effort."""

    client: str
    at: float


@frozen
class BroadcastNote:
    """A broadcast's frame for every live socket (but its sender's): here
    (:meth:`RelayCore.broadcast_heard`) and, in cluster mode, on every node. Never stored."""

    sender: str
    frame: str


Action = (
    Send
    | Close
    | Authenticate
    | Ping
    | ReserveSeqs
    | StoreOp
    | Announce
    | Answer
    | CountTopics
    | LoadMemberships
    | PresenceNote
    | TypingNote
    | BroadcastNote
    | Seen
)


def insert_op(message: Message, *, keep_content: bool = False, **final: Any) -> Insert:
    """Store ``message``: queued, or with ``final`` (status, reason...) only its receipt, and
    its content only if history keeps it (``keep_content``)."""
    return Insert(
        ref=None if final else message,
        seq=message.seq,
        sender=message.sender,
        recipient=message.recipient,
        msgid=message.msgid,
        high=message.high,
        acknowledge=message.acknowledge,
        fields="" if final and not keep_content else message.fields,
        accepted_at=message.accepted_at,
        expires_at=message.expires_at,
        attempts=message.recorded_attempts,
        conversation_id=message.conversation_id,
        **final,
    )
