"""The WebSocket wire protocol: inbound frames parsed and checked, outbound frames encoded.

Every frame is one JSON object in a text frame. Inbound, a frame without ``type`` (or with
``"type": "message"``) is a direct message: the seed system's 13-field envelope, read leniently
(only ``to`` is required; the rest default) but type-checked strictly, each problem naming its
field. Outbound, a delivered message always carries all 13 fields. ``docs/protocol.md`` is the
reference for every frame here; keep the two in step.
"""

from __future__ import annotations

import enum
import json
import math
import re
import uuid
from typing import Any, TypeVar

import cattrs
from attrs import field, frozen

from relayd._api import ClientUuid, canonical_uuid, encodable
from relayd._structure import field_error, iter_errors, strict_converter, strict_scalar

T = TypeVar("T")
MAX_MSGID_CHARS = 128
MAX_SHORT_FIELD_CHARS = 256


class CloseCode(enum.IntEnum):
    """WebSocket close codes relayd uses; docs/protocol.md says what a client should do."""

    NORMAL = 1000
    GOING_AWAY = 1001  # relayd is shutting down
    PROTOCOL_ERROR = 1002  # a frame broke RFC 6455 (reserved bits or opcodes, unmasked, ...)
    INVALID_PAYLOAD = 1007  # a text frame (or a close reason) that is not UTF-8
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013  # cluster mode: the node lost contact with Redis; connect again
    AUTH_FAILED = 4001  # missing, bad, expired or revoked token; or not authenticated in time
    HEARTBEAT_TIMEOUT = 4002
    REVOKED = 4003  # the client was revoked or deleted
    SLOW_CONSUMER = 4008  # the socket did not drain within write_timeout
    REPLACED = 4009  # a newer connection for the same client took over
    TRY_LATER = 4029  # connection limits, or persistent abuse


class ProtocolError(Exception):
    """An inbound frame relayd cannot act on: answered with an error frame, socket kept open.

    ``code`` is the error frame's ``error.code``; ``field`` names the offending field, if any.
    ``strike``: the client is at fault, so the refusal counts towards ``max_strikes`` (not
    when relayd is: its store unavailable).
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        field: str | None = None,
        details: dict[str, Any] | None = None,
        strike: bool = True,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.strike = strike
        self.details: dict[str, Any] = dict(details or {})
        if field is not None:
            self.details["field"] = field


# Error codes. The capitalised ones are the seed system's, kept for its clients; the others
# are relayd's and shared with the REST API's vocabulary.
INVALID_MESSAGE_FORMAT = "INVALID_MESSAGE_FORMAT"
MESSAGE_SENDER_MISMATCH = "MESSAGE_SENDER_MISMATCH"
INVALID_ACK = "INVALID_ACK"
UNKNOWN_RECIPIENT = "unknown_recipient"
UNKNOWN_TYPE = "unknown_type"
BINARY_UNSUPPORTED = "binary_unsupported"
RATE_LIMITED = "rate_limited"
QUEUE_FULL = "queue_full"
NOT_PERMITTED = "not_permitted"
NOT_AUTHENTICATED = "not_authenticated"
ALREADY_AUTHENTICATED = "already_authenticated"
REFRESH_IN_PROGRESS = "refresh_in_progress"
TOO_MANY_CONNECTIONS = "too_many_connections"
SHUTTING_DOWN = "shutting_down"
STORE_UNAVAILABLE = "store_unavailable"
CLIENT_CONNECTED = "client_connected"  # a REST pull while the client has a socket
# A read receipt refused (see relayd._relay.records.ReadCode): each an honest race or a stale
# msgid as often as a hostile client, so none counts as a refused frame.
UNKNOWN_MESSAGE = "unknown_message"
NOT_YOURS = "not_yours"
NOT_DELIVERED = "not_delivered"
# POST /messages only (never in a frame, so not in _RECOVERY): too many requests wait for a
# first receipt, or the store lags.
SERVER_BUSY = "server_busy"
# Topics: the seed system's codes, which its clients know.
INVALID_TOPIC_MESSAGE = "INVALID_TOPIC_MESSAGE"
TOPIC_NOT_FOUND = "TOPIC_NOT_FOUND"
NOT_SUBSCRIBED_TO_TOPIC = "NOT_SUBSCRIBED_TO_TOPIC"


class RateLimited(ProtocolError):
    """A frame over the client's message rate (``websocket.messages_per_second``)."""

    def __init__(self, wait: float, *, msgid: str | None = None, to: str | None = None) -> None:
        """``msgid`` and ``to``: a refused message's, so that its sender can tell which."""
        details: dict[str, Any] = {"retry_after": round(wait, 3)}
        if to is not None:
            details["to"] = to
        if msgid is not None:
            details["msgid"] = msgid
        super().__init__(RATE_LIMITED, f"too many messages; retry in {wait:.3f} s", details=details)


_RECOVERY = {
    INVALID_MESSAGE_FORMAT: "fix the named field and send the message again",
    MESSAGE_SENDER_MISMATCH: "omit 'from' or set it to your own client uuid",
    INVALID_ACK: "send {'type': 'ack', 'msgid': <the msgid you received>}",
    UNKNOWN_RECIPIENT: "check the recipient's uuid in GET /clients",
    UNKNOWN_TYPE: "see docs/protocol.md for the frame types",
    BINARY_UNSUPPORTED: "send JSON in text frames",
    RATE_LIMITED: "wait details.retry_after seconds, then send the message again",
    NOT_PERMITTED: "your roles do not allow it; an admin can change them",
    QUEUE_FULL: "the recipient has too many undelivered messages; retry later",
    NOT_AUTHENTICATED: "authenticate first",
    ALREADY_AUTHENTICATED: "to change tokens, send {'type': 'refresh', 'token': ...}",
    REFRESH_IN_PROGRESS: "wait for token_refreshed (or an error) before refreshing again",
    TOO_MANY_CONNECTIONS: "reconnect later, with backoff",
    SHUTTING_DOWN: "reconnect later, with backoff",
    STORE_UNAVAILABLE: "nothing was stored: send it again after details.retry_after seconds",
    UNKNOWN_MESSAGE: "no message with that msgid was sent to you (or it is no longer kept)",
    NOT_YOURS: "only a message's recipient may mark it read",
    NOT_DELIVERED: "mark a message read once you received it",
    INVALID_TOPIC_MESSAGE: "fix the named field and publish again",
    TOPIC_NOT_FOUND: "check the topic's id in GET /topics",
    NOT_SUBSCRIBED_TO_TOPIC: "subscribe first: POST /topics/subscribe",
}


def _short(limit: int) -> Any:
    def check(_: object, attribute: Any, value: str) -> None:
        if len(value) > limit:
            raise field_error(attribute, f"must be at most {limit} characters")

    return check


def new_msgid() -> str:
    return str(uuid.uuid4())


def _check_msgid(_: object, attribute: Any, value: str | None) -> None:
    if value is not None and (not value or len(value) > MAX_MSGID_CHARS):
        raise field_error(attribute, f"must be 1 to {MAX_MSGID_CHARS} characters")


def _check_ttl(_: object, attribute: Any, value: float | None) -> None:
    if value is not None and not 0 < value < math.inf:
        raise field_error(attribute, "must be a positive number of seconds")


def _check_finite(_: object, attribute: Any, value: float | None) -> None:
    # 1e400 parses as infinity, which JSON cannot carry on to the recipient.
    if value is not None and not math.isfinite(value):
        raise field_error(attribute, "must be a finite number")


@frozen(kw_only=True)
class _Fields:
    """The seed system's message fields but the address: what a direct message, a publish
    and a broadcast share. Read leniently (each defaults), type-checked strictly."""

    sender: ClientUuid | None = None  # "from" on the wire
    timestamp: float | None = field(default=None, validator=_check_finite)
    priority: str = field(default="normal", validator=_short(32))
    subject: str = field(default="", validator=_short(MAX_SHORT_FIELD_CHARS))
    msgid: str | None = field(default=None, validator=_check_msgid)  # None: relayd makes one
    acknowledge: bool = False
    content: str = ""
    action: str = field(default="", validator=_short(MAX_SHORT_FIELD_CHARS))
    event: str = field(default="", validator=_short(MAX_SHORT_FIELD_CHARS))
    status: str = field(default="", validator=_short(MAX_SHORT_FIELD_CHARS))
    conversation_id: str = field(default="", validator=_short(MAX_SHORT_FIELD_CHARS))
    msgno: int = 0
    ttl: float | None = field(default=None, validator=_check_ttl)

    def _fields(
        self, address: dict[str, str], sender: str, msgid: str, now: float
    ) -> dict[str, Any]:
        """The fields as delivered, ``address`` first: ``from`` is the authenticated sender."""
        return {
            **address,
            "from": sender,
            "timestamp": now if self.timestamp is None else self.timestamp,
            "priority": self.priority,
            "subject": self.subject,
            "msgid": msgid,
            "acknowledge": self.acknowledge,
            "content": self.content,
            "action": self.action,
            "event": self.event,
            "status": self.status,
            "conversation_id": self.conversation_id,
            "msgno": self.msgno,
        }


@frozen(kw_only=True)
class Envelope(_Fields):
    """A direct message as a client sends it. Field names follow the seed system."""

    to: ClientUuid

    def fields(self, sender: str, msgid: str, now: float) -> dict[str, Any]:
        """The 13 fields as delivered."""
        return self._fields({"to": self.to}, sender, msgid, now)


# A topic's id: what fits a URL path segment as is (docs/protocol.md, "Topics").
TOPIC_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@~-]{0,99}")


def valid_topic_id(value: object) -> bool:
    return isinstance(value, str) and TOPIC_ID.fullmatch(value) is not None


def _check_topic_id(_: object, attribute: Any, value: str) -> None:
    if not valid_topic_id(value):
        raise field_error(
            attribute,
            "must be 1 to 100 letters, digits and . _ : @ ~ -, starting with a letter or digit",
        )


@frozen(kw_only=True)
class Publication(_Fields):
    """A message published to a topic: the seed system's fields, ``topic_id`` in place of
    ``to`` (and relayd's ``acknowledge``, ``conversation_id`` and ``ttl``)."""

    topic_id: str = field(validator=_check_topic_id)
    action: str = field(default="topic_message", validator=_short(MAX_SHORT_FIELD_CHARS))

    def fields(self, sender: str, msgid: str, now: float) -> dict[str, Any]:
        """As subscribers get it."""
        return self._fields({"topic_id": self.topic_id}, sender, msgid, now)


@frozen(kw_only=True)
class Announcement(_Fields):
    """A broadcast to every client (``"type": "broadcast"``, admins only): a message's fields
    without ``to``."""

    action: str = field(default="broadcast", validator=_short(MAX_SHORT_FIELD_CHARS))

    def fields(self, sender: str, msgid: str, now: float) -> dict[str, Any]:
        """The 13 fields as every client gets them: ``to`` is ``"*"``."""
        return self._fields({"to": "*"}, sender, msgid, now)


_converter = strict_converter(forbid_extra_keys=False)
_converter.register_structure_hook(
    ClientUuid, lambda value, _: canonical_uuid(strict_scalar(value, str))
)


def _reject_huge_int(value: Any, _: type[Any]) -> int:
    number: int = strict_scalar(value, int)
    if not -(2**63) <= number < 2**63:
        raise ValueError("must fit in 64 bits")
    return number


_converter.register_structure_hook(int, _reject_huge_int)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Made once: json.loads and json.dumps build a new decoder or encoder on every call that
# passes an option (2-3% of the daemon's CPU per message, measured with py-spy).
_DECODER = json.JSONDecoder(parse_constant=_no_constants)
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def decode(data: str) -> dict[str, Any]:
    """Parse one inbound text frame into a JSON object (``NaN`` and ``Infinity`` refused).

    Raises:
        ProtocolError: ``INVALID_MESSAGE_FORMAT`` if it is not a JSON object.
    """
    try:
        doc = _DECODER.decode(data)
    except (ValueError, RecursionError):
        raise ProtocolError(INVALID_MESSAGE_FORMAT, "the frame is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ProtocolError(INVALID_MESSAGE_FORMAT, "the frame must be a JSON object")
    # A \ud800-style escape decodes to a lone surrogate, which no UTF-8 encoder (the
    # store's, the sockets') accepts: refuse it at the door. Only a frame with an escape can
    # hold one.
    if "\\u" in data:
        for key, value in doc.items():
            if not encodable(key) or not encodable(value):
                raise ProtocolError(
                    INVALID_MESSAGE_FORMAT,
                    f"{key[:64]!r}: holds a lone surrogate (a \\ud800-\\udfff escape)",
                    field=key if encodable(key) else None,
                )
    return doc


def parse_envelope(doc: dict[str, Any]) -> Envelope:
    """Read a direct message leniently: only ``to`` is required.

    Raises:
        ProtocolError: ``INVALID_MESSAGE_FORMAT`` naming the first bad field.
    """
    return _structure_lenient(doc, Envelope, INVALID_MESSAGE_FORMAT)


def parse_publication(doc: dict[str, Any]) -> Publication:
    """Read a message published to a topic, as leniently as a direct one.

    Raises:
        ProtocolError: ``INVALID_TOPIC_MESSAGE`` naming the first bad field.
    """
    return _structure_lenient(doc, Publication, INVALID_TOPIC_MESSAGE)


def parse_announcement(doc: dict[str, Any]) -> Announcement:
    """Read a broadcast, as leniently as a direct message.

    Raises:
        ProtocolError: ``INVALID_MESSAGE_FORMAT`` naming the first bad field.
    """
    return _structure_lenient(doc, Announcement, INVALID_MESSAGE_FORMAT)


def _structure_lenient(doc: dict[str, Any], cls: type[T], code: str) -> T:
    """``doc`` as ``cls``: ``from`` read as ``sender``, a null optional as absent, ``type``
    and unknown keys ignored; a problem is ``code`` naming its field."""
    data = {key: value for key, value in doc.items() if key != "type"}
    if "from" in data:
        data["sender"] = data.pop("from")
    for optional in ("timestamp", "ttl", "msgid"):
        if data.get(optional) is None:
            data.pop(optional, None)
    try:
        return _converter.structure(data, cls)
    except cattrs.BaseValidationError as exc:
        path, leaf = next(iter_errors(exc))
        name = {"sender": "from"}.get(path, path) or "message"
        reason = "is required" if isinstance(leaf, KeyError) else str(leaf)
        raise ProtocolError(code, f"{name}: {reason}", field=name) from None


def parse_read(doc: dict[str, Any]) -> tuple[str, str | None]:
    """A ``read`` frame's ``msgid`` and ``from`` (the sender, to tell apart two senders' same
    msgid; ``None``: the newest delivery of that msgid to the reader).

    Raises:
        ProtocolError: ``INVALID_MESSAGE_FORMAT`` naming the bad field.
    """
    msgid = doc.get("msgid")
    if not isinstance(msgid, str) or not 0 < len(msgid) <= MAX_MSGID_CHARS:
        raise ProtocolError(
            INVALID_MESSAGE_FORMAT,
            f"msgid: must be the msgid of a received message, 1 to {MAX_MSGID_CHARS} characters",
            field="msgid",
        )
    sender = doc.get("from")
    if sender is None:
        return msgid, None
    try:
        return msgid, canonical_uuid(strict_scalar(sender, str))
    except (TypeError, ValueError):
        raise ProtocolError(
            INVALID_MESSAGE_FORMAT, "from: must be the sender's client uuid", field="from"
        ) from None


def encode(frame: dict[str, Any]) -> str:
    return _ENCODER.encode(frame)


def error_frame(
    code: str, message: str, now: float, *, details: dict[str, Any] | None = None
) -> str:
    return encode(
        {
            "type": "error",
            "error": {"code": code, "message": message, "details": details or {}},
            "recovery": _RECOVERY.get(code, ""),
            "timestamp": now,
        }
    )


def key_changed_frame(
    client: str,
    algorithm: str,
    fingerprint: str,
    previous: str,
    *,
    changed_at: float,
    now: float,
) -> str:
    """A correspondent's notice that ``client``'s ``algorithm`` key changed (relayd/_keys.py)."""
    return encode(
        {
            "type": "key_changed",
            "client": client,
            "algorithm": algorithm,
            "fingerprint": fingerprint,
            "previous_fingerprint": previous,
            "changed_at": changed_at,
            "timestamp": now,
        }
    )


def connection_frame(
    client: str,
    name: str,
    now: float,
    *,
    lean: bool,
    token_expires_at: float,
    heartbeat_interval: float,
) -> str:
    """The welcome: the session is authenticated as ``client``."""
    return encode(
        {
            "type": "connection",
            "message": "Connected successfully",
            "uuid": client,
            "name": name,
            "timestamp": now,
            "protocol": "relayd.v1.lean" if lean else "relayd.v1",
            "token_expires_at": token_expires_at,
            "heartbeat_interval": heartbeat_interval,
        }
    )


def token_refreshed_frame(expires_at: float, now: float) -> str:
    return encode({"type": "token_refreshed", "expires_at": expires_at, "timestamp": now})


def token_expiring_frame(expires_at: float, now: float) -> str:
    return encode(
        {
            "type": "token_expiring",
            "expires_at": expires_at,
            "expires_in": expires_at - now,
            "timestamp": now,
        }
    )


def shutdown_frame(now: float) -> str:
    return encode({"type": "shutdown", "message": "relayd is shutting down", "timestamp": now})


def pong_frame(now: float) -> str:
    """The answer to a JSON ``ping``."""
    return encode({"type": "pong", "timestamp": now})


def ack_received_frame(msgid: str, status: str, now: float) -> str:
    """The answer to an ``ack``: ``acknowledged``, or ``unknown`` (nothing awaits that ack)."""
    return encode({"type": "ack_received", "msgid": msgid, "status": status, "timestamp": now})


_STATUS_TEXT = {
    "queued_offline": "recipient offline; stored for delivery",
    "queued": "stored; the recipient has a backlog",
    "pending_ack": "accepted; awaiting the recipient's acknowledgement",
    "delivered": "delivered to the recipient",
    "acknowledged": "acknowledged by the recipient",
    "failed": "not delivered",
    "expired": "expired before delivery",
    "accepted": "accepted",
    "read": "read by the recipient",
}


def receipt_frame(
    msgid: str,
    to: str,
    status: str,
    now: float,
    *,
    first: bool,
    reason: str = "",
    duplicate: bool = False,
) -> str:
    """A receipt to a message's sender: ``delivery_status`` (its ``first``) or
    ``delivery_update``; ``status`` a :class:`relayd._relay.records.Status` value, or
    ``accepted``."""
    kind = "delivery_status" if first else "delivery_update"
    return encode(receipt_doc(kind, msgid, to, status, now, reason=reason, duplicate=duplicate))


def receipt_doc(
    kind: str,
    msgid: str,
    to: str,
    status: str,
    now: float,
    *,
    reason: str = "",
    duplicate: bool = False,
) -> dict[str, Any]:
    """A receipt's fields: a frame's (``kind`` its type), or, with ``kind`` empty, the answer
    to ``POST /messages`` (the first receipt of a message sent over REST)."""
    frame: dict[str, Any] = {"type": kind} if kind else {}
    frame.update(
        {
            "msgid": msgid,
            "to": to,
            "status": status,
            "timestamp": now,
            "message": _STATUS_TEXT.get(status, status),
        }
    )
    if reason:
        frame["reason"] = reason
    if duplicate:
        frame["duplicate"] = True
    return frame


def read_frame(msgid: str, to: str, read_at: float, now: float) -> str:
    """A read receipt to a message's sender: its recipient ``to`` read it at ``read_at``."""
    return encode(
        {
            "type": "delivery_update",
            "msgid": msgid,
            "to": to,
            "status": "read",
            "read_at": read_at,
            "timestamp": now,
            "message": _STATUS_TEXT["read"],
        }
    )


def read_received_frame(msgid: str, sender: str, status: str, read_at: float, now: float) -> str:
    """The answer to a ``read``: ``read`` (marked now) or ``already_read`` (``read_at`` is the
    first time)."""
    return encode(
        {
            "type": "read_received",
            "msgid": msgid,
            "from": sender,
            "status": status,
            "read_at": read_at,
            "timestamp": now,
        }
    )


_REVOKED_TEXT = {
    "revoked": "this client's tokens were revoked",
    "deleted": "this client was deleted",
    "logged_out": "this session's login was logged out",
    "refresh_reused": "a spent refresh token of this login was presented again: every token of "
    "the login is revoked",
    "token_revoked": "this session's access token was revoked",
    "secret_rotated": "this client's secret was rotated and its earlier tokens revoked",
    "secret_reset": "an admin reset this client's secret: its earlier tokens are revoked",
}


def revoked_text(reason: str) -> str:
    """The ``token_revoked`` error's message for a revocation's ``reason``."""
    return _REVOKED_TEXT.get(reason, "the session's token was revoked")


def delivery_frame(
    fields: str, *, attempt: int, redelivered: bool, offset: int | None = None
) -> str:
    """A delivered message: its fields (a JSON object, as encoded at acceptance) spliced in
    between the frame's own keys, with no decoding and re-encoding per delivery; a topic
    message's ``offset`` in its topic too."""
    flag = "true" if redelivered else "false"
    at = "" if offset is None else f',"offset":{offset}'
    return f'{{"type":"message",{fields[1:-1]}{at},"attempt":{attempt},"redelivered":{flag}}}'


def topic_sent_frame(
    topic: str, msgid: str, subscribers: int, now: float, *, offset: int | None, duplicate: bool
) -> str:
    """The answer to a publish (the seed system's ``topic_sent``): how many subscribers it
    went to, and its ``offset`` in the topic; ``duplicate``: published before, stored once."""
    if duplicate:
        text = "Message already sent (duplicate msgid)"
    else:
        text = f"Message sent to {subscribers} subscribers"
    frame: dict[str, Any] = {
        "type": "topic_sent",
        "message": text,
        "topic_id": topic,
        "msgid": msgid,
        "subscribers": subscribers,
        "offset": offset,
        "timestamp": now,
    }
    if duplicate:
        frame["duplicate"] = True
    return encode(frame)


def presence_frame(topic: str, events: dict[str, str], now: float, *, truncated: bool) -> str:
    """Presence events in a topic since the last frame, the latest per client."""
    return encode(
        {
            "type": "presence",
            "topic": topic,  # not topic_id: see topic_update_frame
            "events": [{"client": c, "event": e} for c, e in events.items()],
            "truncated": truncated,
            "timestamp": now,
        }
    )


def typing_frame(sender: str, state: str, now: float, *, topic: str | None) -> str:
    """``sender`` is typing (or stopped), to the reader or in ``topic``."""
    frame: dict[str, Any] = {"type": "typing", "from": sender, "state": state}
    if topic is not None:
        frame["topic"] = topic
    frame["timestamp"] = now
    return encode(frame)


def broadcast_frame(fields: str) -> str:
    """A broadcast to every live socket: its fields, as encoded once."""
    return f'{{"type":"broadcast",{fields[1:-1]}}}'


def broadcast_sent_frame(
    msgid: str, now: float, *, durable: bool, recipients: int | None, duplicate: bool = False
) -> str:
    """The answer to a broadcast: stored for ``recipients`` clients (``durable``), or passed
    to the live sockets (``recipients`` ``None``: not counted across nodes)."""
    frame: dict[str, Any] = {
        "type": "broadcast_sent",
        "msgid": msgid,
        "durable": durable,
        "recipients": recipients,
        "timestamp": now,
    }
    if duplicate:
        frame["duplicate"] = True
    return encode(frame)


def topic_update_frame(topic: str, msgid: str, counts: dict[str, int], now: float) -> str:
    """What became of a published message's deliveries so far (coalesced: see
    relayd/_relay/topics.py)."""
    # "topic", not "topic_id": the seed system's clients take any frame with a topic_id for
    # a topic message.
    return encode(
        {"type": "topic_update", "topic": topic, "msgid": msgid, **counts, "timestamp": now}
    )
