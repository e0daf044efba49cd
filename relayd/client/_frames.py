"""Frames on the wire, as data: what relayd sends, parsed; what the client sends, built.

Pure functions, no I/O. ``docs/protocol.md`` (section WebSocket) is the reference; a frame
type this module does not know parses as :class:`Unknown`, so that a newer relayd's frames
(topics, presence, ...) pass through an older client without breaking it.
"""

from __future__ import annotations

import enum
import json
import math
import uuid
from typing import Any

from attrs import field, frozen

from ._errors import InvalidMessage

MAX_MSGID_CHARS = 128
MAX_SHORT_FIELD_CHARS = 256
MAX_PRIORITY_CHARS = 32
_MSGNO_RANGE = (-(2**63), 2**63 - 1)


class Status(enum.StrEnum):
    """A message's status, as receipts report it (``docs/protocol.md``, Receipts)."""

    QUEUED_OFFLINE = "queued_offline"
    QUEUED = "queued"
    PENDING_ACK = "pending_ack"
    ACCEPTED = "accepted"  # a re-sent duplicate whose original relayd had not answered yet
    DELIVERED = "delivered"
    ACKNOWLEDGED = "acknowledged"
    FAILED = "failed"
    EXPIRED = "expired"
    READ = "read"  # a read receipt: the recipient read it (``Receipt.read_at``); not final
    # The SDK's own: relayd refused the message (unknown_recipient, queue_full); ``reason``
    # holds relayd's error code.
    REJECTED = "rejected"


FINAL_STATUSES = frozenset(
    {Status.DELIVERED, Status.ACKNOWLEDGED, Status.FAILED, Status.EXPIRED, Status.REJECTED}
)


@frozen
class Receipt:
    """What became of a sent message. ``final`` receipts end its tracking.

    ``kind`` is the frame's ``type`` (``delivery_status``, ``delivery_update``), or
    ``"error"`` for a :attr:`Status.REJECTED` the SDK made from relayd's error frame.
    """

    msgid: str
    status: str
    to: str = ""
    timestamp: float = 0.0
    reason: str = ""
    duplicate: bool = False
    kind: str = "delivery_status"
    read_at: float | None = None  # with status ``read``: when the recipient read it

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def ok(self) -> bool:
        """Final and successful: delivered or acknowledged."""
        return self.status in (Status.DELIVERED, Status.ACKNOWLEDGED)


@frozen
class Message:
    """A message delivered to this client. Field names follow the wire (``sender`` is
    ``from``); ``raw`` is the frame as received, with any field a newer relayd adds."""

    msgid: str
    sender: str
    to: str
    content: str
    acknowledge: bool
    redelivered: bool
    attempt: int
    timestamp: float
    subject: str = ""
    priority: str = "normal"
    conversation_id: str = ""
    action: str = ""
    event: str = ""
    status: str = ""
    msgno: int = 0
    raw: dict[str, Any] = field(factory=dict, eq=False, repr=False)


@frozen
class Welcome:
    uuid: str
    name: str
    token_expires_at: float
    heartbeat_interval: float


@frozen
class AckReceived:
    msgid: str
    status: str


@frozen
class ReadReceived:
    """relayd's answer to :meth:`Client.read`: ``read`` (recorded now) or ``already_read``."""

    msgid: str
    sender: str
    status: str
    read_at: float


@frozen
class TokenExpiring:
    expires_at: float


@frozen
class TokenRefreshed:
    expires_at: float


@frozen
class Shutdown:
    message: str


@frozen
class Pong:
    pass


@frozen
class ErrorFrame:
    code: str
    message: str
    details: dict[str, Any]

    @property
    def msgid(self) -> str | None:
        value = self.details.get("msgid")
        return value if isinstance(value, str) else None


@frozen
class KeyChange:
    """``key_changed``: ``client``, whose keys this client read from the directory, replaced
    its ``algorithm`` key: ``previous_fingerprint`` is now ``fingerprint`` (SHA-256, hex)."""

    client: str
    algorithm: str
    fingerprint: str
    previous_fingerprint: str
    changed_at: float


@frozen
class Unknown:
    """A frame this SDK does not know (a newer relayd's), or not a JSON object."""

    raw: Any


Event = (
    Welcome
    | Message
    | Receipt
    | AckReceived
    | ReadReceived
    | TokenExpiring
    | TokenRefreshed
    | Shutdown
    | Pong
    | ErrorFrame
    | KeyChange
    | Unknown
)


def _str(doc: dict[str, Any], key: str, default: str = "") -> str:
    value = doc.get(key, default)
    return value if isinstance(value, str) else default


def _num(doc: dict[str, Any], key: str, default: float = 0.0) -> float:
    value = doc.get(key, default)
    return float(value) if isinstance(value, int | float) else default


def _int(doc: dict[str, Any], key: str, default: int = 0) -> int:
    value = doc.get(key, default)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def parse(text: str) -> Event:
    """One frame relayd sent, as an event. Never raises: what it cannot read is
    :class:`Unknown`."""
    try:
        doc = json.loads(text)
    except ValueError:
        return Unknown(text)
    if not isinstance(doc, dict):
        return Unknown(doc)
    kind = doc.get("type")
    if kind == "message":
        return _message(doc)
    if kind in ("delivery_status", "delivery_update"):
        return Receipt(
            msgid=_str(doc, "msgid"),
            status=_str(doc, "status"),
            to=_str(doc, "to"),
            timestamp=_num(doc, "timestamp"),
            reason=_str(doc, "reason"),
            duplicate=doc.get("duplicate") is True,
            kind=kind,
            read_at=_num(doc, "read_at") if "read_at" in doc else None,
        )
    if kind == "connection":
        return Welcome(
            uuid=_str(doc, "uuid"),
            name=_str(doc, "name"),
            token_expires_at=_num(doc, "token_expires_at"),
            heartbeat_interval=_num(doc, "heartbeat_interval", 20.0),
        )
    if kind == "ack_received":
        return AckReceived(_str(doc, "msgid"), _str(doc, "status"))
    if kind == "read_received":
        return ReadReceived(
            _str(doc, "msgid"), _str(doc, "from"), _str(doc, "status"), _num(doc, "read_at")
        )
    if kind == "token_expiring":
        return TokenExpiring(_num(doc, "expires_at"))
    if kind == "token_refreshed":
        return TokenRefreshed(_num(doc, "expires_at"))
    if kind == "shutdown":
        return Shutdown(_str(doc, "message"))
    if kind == "pong":
        return Pong()
    if kind == "key_changed":
        return KeyChange(
            client=_str(doc, "client"),
            algorithm=_str(doc, "algorithm"),
            fingerprint=_str(doc, "fingerprint"),
            previous_fingerprint=_str(doc, "previous_fingerprint"),
            changed_at=_num(doc, "changed_at"),
        )
    if kind == "error" and isinstance(doc.get("error"), dict):
        error = doc["error"]
        details = error.get("details")
        return ErrorFrame(
            _str(error, "code"),
            _str(error, "message"),
            details if isinstance(details, dict) else {},
        )
    return Unknown(doc)


def _message(doc: dict[str, Any]) -> Message:
    return Message(
        msgid=_str(doc, "msgid"),
        sender=_str(doc, "from"),
        to=_str(doc, "to"),
        content=_str(doc, "content"),
        acknowledge=doc.get("acknowledge") is True,
        redelivered=doc.get("redelivered") is True,
        attempt=_int(doc, "attempt", 1),
        timestamp=_num(doc, "timestamp"),
        subject=_str(doc, "subject"),
        priority=_str(doc, "priority", "normal"),
        conversation_id=_str(doc, "conversation_id"),
        action=_str(doc, "action"),
        event=_str(doc, "event"),
        status=_str(doc, "status"),
        msgno=_int(doc, "msgno"),
        raw=doc,
    )


# --- frames the client sends --------------------------------------------------------------------


def new_msgid() -> str:
    return str(uuid.uuid4())


def canonical_uuid(text: str) -> str:
    """``text`` as relayd writes uuids (lowercase, hyphenated); :class:`InvalidMessage` if it
    is not one."""
    try:
        return str(uuid.UUID(text))
    except (ValueError, TypeError, AttributeError):
        raise InvalidMessage(f"to: {text!r} is not a client uuid") from None


def message_frame(
    to: str,
    content: str,
    *,
    msgid: str,
    acknowledge: bool,
    subject: str = "",
    priority: str = "normal",
    conversation_id: str = "",
    action: str = "",
    event: str = "",
    status: str = "",
    msgno: int = 0,
    ttl: float | None = None,
) -> dict[str, Any]:
    """A direct message, checked as relayd checks it (``docs/protocol.md``, Sending a
    message), so that relayd never refuses it for its form.

    Raises:
        InvalidMessage: naming the field that relayd would refuse.
    """
    if not isinstance(content, str):
        raise InvalidMessage("content: must be a string")
    shorts = {
        "subject": subject,
        "conversation_id": conversation_id,
        "action": action,
        "event": event,
        "status": status,
    }
    texts = {"to": to, "content": content, "msgid": msgid, "priority": priority, **shorts}
    for name, value in texts.items():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate: no UTF-8 text can carry it (the socket's encoder would fail
            # on it), and relayd refuses it.
            raise InvalidMessage(f"{name}: holds a lone surrogate") from None
    if not 1 <= len(msgid) <= MAX_MSGID_CHARS:
        raise InvalidMessage(f"msgid: must be 1 to {MAX_MSGID_CHARS} characters")
    if len(priority) > MAX_PRIORITY_CHARS:
        raise InvalidMessage(f"priority: must be at most {MAX_PRIORITY_CHARS} characters")
    for name, value in shorts.items():
        if len(value) > MAX_SHORT_FIELD_CHARS:
            raise InvalidMessage(f"{name}: must be at most {MAX_SHORT_FIELD_CHARS} characters")
    if isinstance(msgno, bool) or not _MSGNO_RANGE[0] <= msgno <= _MSGNO_RANGE[1]:
        raise InvalidMessage("msgno: must be a 64-bit integer")
    frame: dict[str, Any] = {
        "type": "message",
        "to": canonical_uuid(to),
        "msgid": msgid,
        "acknowledge": acknowledge,
        "content": content,
        "priority": priority,
        "msgno": msgno,
        **{name: value for name, value in shorts.items() if value},
    }
    if ttl is not None:
        if not 0 < ttl < math.inf:
            raise InvalidMessage("ttl: must be a positive number of seconds")
        frame["ttl"] = ttl
    return frame


def ack_frame(msgid: str) -> dict[str, Any]:
    return {"type": "ack", "msgid": msgid}


def read_frame(msgid: str, sender: str) -> dict[str, Any]:
    return {"type": "read", "msgid": msgid, "from": sender}


def refresh_frame(token: str) -> dict[str, Any]:
    return {"type": "refresh", "token": token}


def encode(frame: dict[str, Any]) -> str:
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))
