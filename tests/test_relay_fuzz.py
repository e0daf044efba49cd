"""Hypothesis over inbound frames: the relay core and a live relayd take anything a peer sends.

Most tests drive the sans-I/O core through :class:`~tests.relay_harness.CoreHarness` (no
sockets, a real in-memory SQLite store), so hundreds of frame sequences run in seconds. Every
frame is checked against these properties:

1. Nothing raises: not the core, not the store it drives.
2. Every frame relayd writes is one *strict* JSON object (no ``NaN``/``Infinity``), encodable
   as UTF-8 (a WebSocket text frame must be), with a known ``type``; error frames have the
   seed's shape: ``error.code``, ``error.message``, ``error.details``, ``recovery``,
   ``timestamp``.
3. Only delivered messages carry ``"acknowledge": true``: seed clients auto-ack any frame that
   does, unless its type is ``ack``, ``ack_received`` or ``delivery_update``.
4. Each frame gets its documented answer; a refused frame gets an error frame and the socket
   stays open, unless a rule closes it: too many refused frames (4029, after
   ``websocket.max_strikes`` of them, one forgiven per second), the authentication rules (4001),
   a newer session of the same client (4009).
5. While a session is pending authentication nothing but error frames (and then the welcome)
   reaches it.
6. Once every session is gone, the core holds nothing: no session, mailbox entry, unacked or
   staged message, nor commit in flight.

Generated values include the two kinds that once crashed or corrupted relayd (each also
pinned by a test of its own below): JSON escapes of lone surrogates (``"\\ud800"``, refused
as no Unicode string) and number literals that overflow to infinity (``1e400``).

The live tests at the end check the same things where only a socket can: the frame-size limit
(1009), binary and invalid frames on a real connection, on both transports (``/ws`` on the HTTP
port, and the dedicated trio-websocket listener).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import pytest
import trio
import trio_websocket
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from relayd._config import RelayConfig, WebsocketConfig
from relayd._relay import frames as F
from relayd._relay.frames import CloseCode

from .relay_harness import Client, CoreHarness
from .support import IO_DEADLINE, SEED_FIELDS, Engine, RunningRelayd, make_config, start_relayd

# Bounded so that the whole file runs in about ten seconds (drawing the examples costs more
# than running them).
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ_ONE_FRAME = settings(FUZZ, max_examples=100)

# Every frame type relayd may write, and the 13 fields of the seed's direct message.
OUTBOUND_TYPES = frozenset(
    {
        "connection",
        "error",
        "message",
        "delivery_status",
        "delivery_update",
        "ack_received",
        "pong",
        "token_refreshed",
        "token_expiring",
        "shutdown",
    }
)
ENVELOPE_FIELDS = SEED_FIELDS
SHORT_TEXT_FIELDS = ("subject", "action", "event", "status", "conversation_id")
# Refused frames that count as strikes (the store's unknown_recipient/queue_full do not).
STRIKE_CODES = frozenset(
    {
        F.BINARY_UNSUPPORTED,
        F.INVALID_MESSAGE_FORMAT,
        F.MESSAGE_SENDER_MISMATCH,
        F.INVALID_ACK,
        F.UNKNOWN_TYPE,
        F.ALREADY_AUTHENTICATED,
        F.RATE_LIMITED,
    }
)
# Short timers, so that redelivery, failure and the expiry sweep happen within a fuzz run.
FUZZ_RELAY = RelayConfig(ack_timeout=2.0, backoff_initial=0.5, backoff_max=2.0, max_attempts=3)
# Time a run may advance in total: below heartbeat_timeout and the tokens' lifetime, so the
# only closes are the ones the frames themselves cause.
MAX_ADVANCE = 50.0


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(text: str) -> Any:
    """Parse ``text`` as strict JSON (RFC 8259): no NaN, no Infinity, no overflow to inf."""
    value = json.loads(text, parse_constant=_reject_constant)
    assert_finite(value)
    return value


def assert_finite(value: Any) -> None:
    if isinstance(value, float):
        assert math.isfinite(value), f"non-finite number {value!r} in an outbound frame"
    elif isinstance(value, dict):
        for item in value.values():
            assert_finite(item)
    elif isinstance(value, list):
        for item in value:
            assert_finite(item)


def check_outbound(text: str) -> dict[str, Any]:
    """Properties 2 and 3 for one frame relayd wrote; returns it parsed."""
    text.encode("utf-8")  # a text frame must be valid UTF-8: this raises on lone surrogates
    frame = strict_json(text)
    assert isinstance(frame, dict), text
    kind = frame.get("type")
    assert kind in OUTBOUND_TYPES, frame
    if kind == "error":
        error = frame["error"]
        assert isinstance(error["code"], str), frame
        assert error["code"], frame
        assert isinstance(error["message"], str), frame
        assert isinstance(error["details"], dict), frame
        assert isinstance(frame["recovery"], str), frame
        assert isinstance(frame["timestamp"], int | float), frame
    if kind == "message":
        missing = [name for name in ENVELOPE_FIELDS if name not in frame]
        assert not missing, (missing, frame)
    else:
        assert not frame.get("acknowledge"), f"a seed client would ack this: {frame}"
    return frame


class RecordingHarness(CoreHarness):
    """:class:`CoreHarness` that checks the raw text of every frame as it is written."""

    def flush(self, sid: int | None = None) -> None:
        logs = [self.sessions[sid]] if sid is not None else list(self.sessions.values())
        for log in logs:
            if not log.gone:
                for text, _ in log.outbox:
                    check_outbound(text)
        super().flush(sid)


# Generated frames reach a few hundred KiB of UTF-8; the frame limit has tests of its own.
FUZZ_MAX_FRAME = 4 * 2**20


def fuzz_websocket(**overrides: Any) -> WebsocketConfig:
    return WebsocketConfig(max_frame_bytes=FUZZ_MAX_FRAME, **overrides)


def make_harness(*, max_strikes: int = 20) -> RecordingHarness:
    return RecordingHarness(FUZZ_RELAY, fuzz_websocket(max_strikes=max_strikes))


def assert_nothing_leaked(h: CoreHarness) -> None:
    """Property 6: disconnect whatever is left, then the core must hold nothing."""
    for sid, log in list(h.sessions.items()):
        if not log.gone:
            h.disconnect(sid)
    stats = h.core.stats()
    leaked = {
        key: stats[key]
        for key in (
            "sessions",
            "sessions_pending",
            "sessions_active",
            "mailbox",
            "unacked",
            "staged",
            "pending_commit",
        )
        if stats[key]
    }
    assert leaked == {}, stats
    assert h.core.session_count == 0


# --- strategies ---------------------------------------------------------------------------------
#
# Strategies are built once, at import: frames name clients through placeholders (`Who`,
# `TokenOf`), resolved against each run's harness. (Building strategies per example would cost
# more than running the examples.)

Frame = str | bytes


@attrs.frozen
class Peers:
    """Who the fuzzed session may name: its own client, an online peer, and a stranger."""

    me: Client
    peer: Client
    stranger: str = "6f1c2a5e-0d4b-4e57-9a3c-2b8d7e6f5a41"  # well-formed; nobody registered

    def uuid(self, role: str) -> str:
        return {"me": self.me.uuid, "peer": self.peer.uuid, "stranger": self.stranger}[role]

    def token(self, role: str) -> str:
        return {"me": self.me.token, "peer": self.peer.token}[role]


# Spellings of a UUID that uuid.UUID accepts, then spellings it refuses.
SPELLINGS: tuple[Callable[[str], str], ...] = (
    lambda u: u,
    str.upper,
    lambda u: "{" + u + "}",
    lambda u: "urn:uuid:" + u,
    lambda u: u.replace("-", ""),
)
MISSPELLINGS: tuple[Callable[[str], str], ...] = (
    lambda u: u + "0",
    lambda u: u[:-1],
    lambda u: u.replace("-", "_"),
    lambda u: u[:8],
)


@attrs.frozen
class Who:
    """The UUID of ``role`` (me, peer, stranger), spelt the ``spelling``-th way."""

    role: str
    spelling: int = 0
    valid: bool = True

    def resolve(self, peers: Peers) -> str:
        spellings = SPELLINGS if self.valid else MISSPELLINGS
        return spellings[self.spelling % len(spellings)](peers.uuid(self.role))


@attrs.frozen
class TokenOf:
    role: str


@attrs.frozen
class Doc:
    """A JSON document with placeholders, and how to encode it (ASCII-escaped or raw UTF-8,
    spaced or compact)."""

    value: Any
    style: int = 0

    def text(self, peers: Peers) -> str:
        value = resolve(self.value, peers)
        return to_json(value, ascii_only=self.style == 0, compact=self.style == 2)


def to_json(value: Any, *, ascii_only: bool = True, compact: bool = False) -> str:
    """``value`` as JSON text a peer can send, as ``json.dumps`` writes it, except that

    * an infinite float is written as ``1e400`` (``-1e400``): JSON has no literal for
      infinity (``json.dumps``'s ``Infinity`` makes the whole frame invalid), but its grammar
      allows numbers of any size, and a parser reads one too big for a double as infinity;
    * a lone surrogate is always written as its ``\\ud800`` escape: a text frame is UTF-8,
      which cannot carry one raw.
    """
    if isinstance(value, float) and math.isinf(value):
        return "1e400" if value > 0 else "-1e400"
    comma, colon = (",", ":") if compact else (", ", ": ")
    if isinstance(value, dict):
        items = (
            _json_string(key, ascii_only)
            + colon
            + to_json(item, ascii_only=ascii_only, compact=compact)
            for key, item in value.items()
        )
        return "{" + comma.join(items) + "}"
    if isinstance(value, list):
        elements = (to_json(item, ascii_only=ascii_only, compact=compact) for item in value)
        return "[" + comma.join(elements) + "]"
    if isinstance(value, str):
        return _json_string(value, ascii_only)
    return json.dumps(value)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _json_string(text: str, ascii_only: bool) -> str:
    encoded = json.dumps(text, ensure_ascii=ascii_only)
    return _SURROGATE.sub(lambda found: f"\\u{ord(found.group()):04x}", encoded)


def resolve(value: Any, peers: Peers) -> Any:
    if isinstance(value, Who):
        return value.resolve(peers)
    if isinstance(value, TokenOf):
        return peers.token(value.role)
    if isinstance(value, dict):
        return {key: resolve(item, peers) for key, item in value.items()}
    if isinstance(value, list):
        return [resolve(item, peers) for item in value]
    return value


def wire(frame: Frame | Doc, peers: Peers) -> Frame:
    return frame.text(peers) if isinstance(frame, Doc) else frame


_surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=())


def any_text(max_size: int) -> st.SearchStrategy[str]:
    """Text as a peer can write it in JSON: sometimes with lone surrogates, which only an
    escape can carry (see :func:`to_json`) and which relayd must refuse."""
    return st.one_of(
        st.text(max_size=max_size),
        st.text(max_size=max_size),
        st.text(st.characters() | _surrogates, min_size=1, max_size=max_size),
    )


json_scalars: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**63 + 2),
    st.sampled_from([10**400, -(10**400), -(2**63) - 1, 2**64]),
    st.floats(allow_nan=False),  # infinities are written 1e400 (see to_json)
    any_text(20),
)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(any_text(10), children, max_size=4)
    ),
    max_leaves=12,
)
styles = st.integers(min_value=0, max_value=2)

# Text that is not a JSON object, or not JSON at all.
SPECIAL_TEXTS = (
    "",
    " ",
    "null",
    "true",
    "0",
    "-0",
    "1e400",
    '"a string"',
    "NaN",
    "Infinity",
    "-Infinity",
    '{"type": NaN}',
    '{"to": Infinity}',
    '{"msgno": -Infinity}',
    "[NaN]",
    "{",
    "}",
    '{"a": 1,}',
    "{'single': 'quotes'}",
    '{"a" 1}',
    "\x00",
    "\ufeff{}",
    '{"type": "ping"} {"type": "ping"}',
    '{"type": "ping"}\x00',
    "9" * 5000,  # more digits than Python converts by default
    '{"msgno": ' + "9" * 5000 + "}",
)

# Nesting far below and far beyond the parser's recursion limit (near it, whether the parser
# gives up depends on the depth of the caller's stack).
deep_texts = st.sampled_from([1, 2, 50, 400, 5000, 50_000]).flatmap(
    lambda n: st.sampled_from(
        ["[" * n + "]" * n, '{"a":' * n + "1" + "}" * n, "[" * n, '{"to":' + "[" * n]
    )
)


def who(roles: tuple[str, ...], *, valid: bool = True) -> st.SearchStrategy[Who]:
    count = len(SPELLINGS if valid else MISSPELLINGS)
    return st.builds(
        Who, st.sampled_from(roles), st.integers(min_value=0, max_value=count - 1), st.just(valid)
    )


_not_text = st.one_of(
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.lists(st.text(max_size=5), max_size=2),
)
_not_uuid = st.one_of(
    _not_text,
    st.sampled_from(["", "not-a-uuid", "1234", "x" * 10_000]),
    who(("peer", "me"), valid=False),
)
_over = st.integers(min_value=1, max_value=3)

# Values of each envelope field that relayd must refuse, naming the field.
BAD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "to": _not_uuid | st.none(),
    "from": _not_uuid,  # null is "not given"
    "timestamp": st.one_of(
        st.booleans(),
        st.text(max_size=5),
        st.lists(st.integers(), max_size=2),
        st.sampled_from([10**400, -(10**400), {}]),
    ),
    "priority": _not_text | st.none() | _over.map(lambda n: "h" * (32 + n)),
    **{
        name: _not_text | st.none() | _over.map(lambda n: "s" * (F.MAX_SHORT_FIELD_CHARS + n))
        for name in SHORT_TEXT_FIELDS
    },
    "msgid": st.one_of(
        st.booleans(),
        st.integers(),
        st.lists(st.text(max_size=5), max_size=2),
        st.just(""),
        _over.map(lambda n: "m" * (F.MAX_MSGID_CHARS + n)),
    ),
    "acknowledge": st.one_of(
        st.none(), st.integers(), st.text(max_size=5), st.sampled_from(["true", [], {}])
    ),
    "content": _not_text | st.none() | st.dictionaries(st.text(max_size=3), st.integers()),
    "msgno": st.one_of(
        st.none(),
        st.booleans(),
        st.floats(allow_nan=False),
        st.text(max_size=5),
        st.sampled_from([2**63, -(2**63) - 1, 10**400, -(10**400)]),
    ),
    "ttl": st.one_of(
        st.booleans(),
        st.text(max_size=5),
        st.floats(max_value=0.0, allow_nan=False, allow_infinity=False),
        st.integers(max_value=0),
        st.sampled_from([10**400, [], {}]),
    ),
}


# A lone surrogate makes any field's value bad: relayd refuses the frame naming the field.
_with_surrogate = st.builds(
    lambda before, surrogate, after: before + surrogate + after,
    st.text(max_size=3),
    _surrogates,
    st.text(max_size=3),
)
BAD_VALUES = {name: bad | _with_surrogate for name, bad in BAD_VALUES.items()}


def _short_text(limit: int) -> st.SearchStrategy[str]:
    """Short text, or text of exactly ``limit`` characters (drawing long text is slow)."""
    return st.text(max_size=16) | st.text(min_size=1, max_size=3).map(lambda t: (t * limit)[:limit])


# Values of each envelope field that relayd accepts.
GOOD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "to": who(("peer", "me", "stranger")),
    "from": st.none() | who(("me",)),
    "timestamp": st.one_of(
        st.none(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.integers(min_value=-(2**53), max_value=2**53),
    ),
    "priority": st.sampled_from(["high", "normal", "low", "", "urgent", "p" * 32]),
    **{name: _short_text(F.MAX_SHORT_FIELD_CHARS) for name in SHORT_TEXT_FIELDS},
    "msgid": st.one_of(
        st.none(),
        st.uuids().map(str),
        st.sampled_from(["m1", "m2"]),
        _short_text(F.MAX_MSGID_CHARS).filter(bool),
    ),
    "acknowledge": st.booleans(),
    "content": st.text(max_size=40) | st.just("\U0001f600" * 5000),
    "msgno": st.integers(min_value=-(2**63), max_value=2**63 - 1),
    "ttl": st.one_of(
        st.none(),
        st.floats(min_value=1e-9, max_value=1e12),
        st.integers(min_value=1, max_value=2**40),
    ),
}

FRAME_TYPES = (
    "message",
    "ack",
    "refresh",
    "refresh_token",
    "auth",
    "ping",
    "pong",
    "unknown",
    "",
    "MESSAGE",
    "error",
    "connection",
    "delivery_status",
)
tokens = st.one_of(
    st.sampled_from([TokenOf("me"), TokenOf("peer"), "garbage", ""]),
    json_scalars,
)
_presence = st.sampled_from(["absent", "good", "good", "bad", "any"])


@st.composite
def vocabulary_docs(draw: st.DrawFn) -> dict[str, Any]:
    """JSON objects built from the real frame vocabulary, with right and wrong values."""
    doc: dict[str, Any] = {}
    kind = draw(st.one_of(st.just(None), st.sampled_from(FRAME_TYPES), json_scalars))
    if kind is not None or draw(st.booleans()):
        doc["type"] = kind  # else no "type" key: a seed message
    for name in (*ENVELOPE_FIELDS, "ttl"):
        presence = draw(_presence)
        if presence == "good":
            doc[name] = draw(GOOD_VALUES[name])
        elif presence == "bad":
            doc[name] = draw(BAD_VALUES[name])
        elif presence == "any":
            doc[name] = draw(json_values)
    if draw(st.booleans()):
        doc["token"] = draw(tokens)
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        doc[draw(any_text(8))] = draw(json_values)  # an extra key
    return doc


# Messages with every field right (some to a stranger, some duplicates: msgids repeat).
message_docs = st.fixed_dictionaries(
    {"to": GOOD_VALUES["to"]},
    optional={
        "type": st.sampled_from(["message", None]),
        **{name: GOOD_VALUES[name] for name in (*ENVELOPE_FIELDS[1:], "ttl")},
    },
)
# Frames of the other types, well-formed or nearly.
_some_token = st.sampled_from([TokenOf("me"), TokenOf("peer"), "garbage"]) | tokens
control_docs = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("ack"), "msgid": st.sampled_from(["m1", "m2"]) | GOOD_VALUES["msgid"]},
        optional={"status": st.just("delivered"), "from": who(("me", "peer"))},
    ),
    st.fixed_dictionaries({"type": st.just("ack")}, optional={"msgid": BAD_VALUES["msgid"]}),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["refresh", "refresh_token"]), "token": _some_token}
    ),
    st.fixed_dictionaries({"type": st.sampled_from(["refresh", "refresh_token"])}),
    st.sampled_from([{"type": "ping"}, {"type": "pong"}]),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["auth", "unknown", "MESSAGE", "", "error", "connection"])},
        optional={"token": _some_token},
    ),
)

# Anything a peer can put in a WebSocket frame.
frames: st.SearchStrategy[Frame | Doc] = st.one_of(
    st.binary(max_size=64),
    st.text(),
    st.sampled_from(SPECIAL_TEXTS),
    deep_texts,
    st.builds(Doc, json_values, styles),
    st.builds(Doc, vocabulary_docs(), styles),
    st.builds(Doc, vocabulary_docs(), styles),
    st.builds(Doc, message_docs, styles),
    st.builds(Doc, message_docs.map(lambda doc: doc | {"acknowledge": True}), styles),
    st.builds(Doc, control_docs, styles),
    st.builds(Doc, control_docs, styles),
    st.builds(Doc, control_docs, styles),
    st.just(Doc({"to": Who("peer"), "content": "x" * 200_000})),
    st.just(Doc({"to": Who("peer"), "x" * 100_000: 1})),
)
# Frames that are not a JSON object at all.
undecodable = st.one_of(
    st.binary(max_size=16), st.text(max_size=8), st.sampled_from(SPECIAL_TEXTS), deep_texts
)
auth_frames = st.builds(
    Doc,
    st.fixed_dictionaries(
        {"type": st.just("auth"), "token": st.sampled_from([TokenOf("me"), TokenOf("peer")])}
    )
    | st.fixed_dictionaries({"type": st.just("auth")}, optional={"token": tokens}),
    styles,
)


# --- the model: what each frame must get --------------------------------------------------------


@attrs.define
class StrikeBucket:
    """The documented strike policy: ``burst`` refused frames in a row, one forgiven a second."""

    burst: int
    tokens: float = 0.0
    updated: float = 0.0

    def __attrs_post_init__(self) -> None:
        self.tokens = float(self.burst)

    def take(self, now: float) -> bool:
        self.tokens = min(float(self.burst), self.tokens + (now - self.updated))
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def decode_like_a_peer(data: Frame) -> dict[str, Any] | None:
    """The frame as a JSON object (as relayd reads JSON: NaN and Infinity refused), or None if
    it is binary, not JSON, not an object, or holds a lone surrogate (no Unicode string)."""
    if isinstance(data, bytes):
        return None
    try:
        doc = json.loads(data, parse_constant=_reject_constant)
        json.dumps(doc, ensure_ascii=False).encode()
    except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        return None
    return doc if isinstance(doc, dict) else None


def codes(replies: list[dict[str, Any]]) -> list[str]:
    return [f["error"]["code"] for f in replies if f["type"] == "error"]


def of_type(replies: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [f for f in replies if f["type"] == kind]


@attrs.define
class Session:
    """One fuzzed client session and what the model expects of it."""

    h: RecordingHarness
    sid: int
    me: Client | None  # None while pending
    peers: tuple[Client, Client]
    bucket: StrikeBucket

    @property
    def log_closed(self) -> int | None:
        closed = self.h.sessions[self.sid].closed
        return None if closed is None else closed[0]

    def is_open(self) -> bool:
        log = self.h.sessions[self.sid]
        return log.closed is None and not log.gone

    def feed(self, data: Frame) -> None:
        """Send one frame and check the answer (properties 4 and 5)."""
        h = self.h
        stray = h.read(self.sid)  # receipts and deliveries caused by earlier steps
        if self.me is None:
            assert stray == [], stray
        was_open = self.is_open()
        h.send(self.sid, data)
        replies = h.read(self.sid)
        if not was_open:
            assert replies == [], replies
            return
        pending = self.me is None
        expected_close = self._pending(data, replies) if pending else self._active(data, replies)
        assert self.log_closed == expected_close, (data, replies, h.sessions[self.sid])
        answer = ",".join(sorted({f.get("type", "?") for f in replies})) or "nothing"
        event(f"{'pending' if pending else 'active'}: {answer} -> close {expected_close}")
        if expected_close is None:
            assert self.is_open()

    def _strike(self, replies: list[dict[str, Any]]) -> int | None:
        """A refused frame: the close the strike rule calls for, if any."""
        if self.bucket.take(self.h.now):
            return None
        assert codes(replies)[-1] == F.RATE_LIMITED, replies
        return CloseCode.TRY_LATER

    def _pending(self, data: Frame, replies: list[dict[str, Any]]) -> int | None:
        """Frames before authentication: only an ``auth`` frame with a good token is read;
        anything else, decodable or not, is told ``not_authenticated`` and closed 4001."""
        doc = decode_like_a_peer(data)
        if doc is None or doc.get("type") != "auth":
            assert [f["type"] for f in replies] == ["error"], (data, replies)
            assert codes(replies) == [F.NOT_AUTHENTICATED], (data, replies)
            return CloseCode.AUTH_FAILED
        token = doc.get("token")
        owner = next((c for c in self.peers if c.token == token), None)
        if owner is None:
            assert [f["type"] for f in replies] == ["error"], replies
            return CloseCode.AUTH_FAILED
        welcome = replies[0]
        assert welcome["type"] == "connection", replies
        assert welcome["uuid"] == owner.uuid, welcome
        assert not codes(replies), replies
        self.me = owner
        return None

    def _active(self, data: Frame, replies: list[dict[str, Any]]) -> int | None:
        """Frames on an authenticated session: the documented answer to each."""
        assert self.me is not None
        doc = decode_like_a_peer(data)
        if doc is None:
            first = F.BINARY_UNSUPPORTED if isinstance(data, bytes) else F.INVALID_MESSAGE_FORMAT
            assert codes(replies)[:1] == [first], (data, replies)
            return self._strike(replies)
        kind = doc.get("type")
        errors = codes(replies)
        if kind is None or kind == "message":
            if errors and errors[0] in STRIKE_CODES:
                assert errors[0] in (
                    F.INVALID_MESSAGE_FORMAT,
                    F.MESSAGE_SENDER_MISMATCH,
                    F.RATE_LIMITED,
                ), replies
                if errors[0] == F.INVALID_MESSAGE_FORMAT:
                    error = of_type(replies, "error")[0]["error"]
                    assert error["details"]["field"] in (*ENVELOPE_FIELDS, "ttl"), error
                return self._strike(replies)
            # Accepted: its receipt, or the store's refusal (not a strike).
            receipts = of_type(replies, "delivery_status")
            assert receipts or errors[:1] in (
                [F.UNKNOWN_RECIPIENT],
                [F.QUEUE_FULL],
            ), (data, replies)
            msgid = doc.get("msgid")
            if receipts and isinstance(msgid, str) and msgid:
                assert receipts[0]["msgid"] == msgid, (doc, receipts)
            return None
        if kind == "ack":
            msgid = doc.get("msgid")
            if isinstance(msgid, str) and msgid:
                assert [f["msgid"] for f in of_type(replies, "ack_received")] == [msgid], replies
                return None
            assert errors[:1] == [F.INVALID_ACK], replies
            return self._strike(replies)
        if kind in ("refresh", "refresh_token"):
            token = doc.get("token")
            if not isinstance(token, str) or not token:
                assert errors[:1] == [F.INVALID_MESSAGE_FORMAT], replies
                return self._strike(replies)
            if token == self.me.token:
                assert [f["type"] for f in replies] == ["token_refreshed"], replies
                return None
            assert errors[0].startswith("token_"), replies
            if token in {c.token for c in self.peers}:
                # Another client's valid token: an auth rule closes the session.
                assert len(errors) == 1, replies
                return CloseCode.AUTH_FAILED
            # A refused token is a refused frame like any other.
            return self._strike(replies)
        if kind == "ping":
            assert of_type(replies, "pong"), replies
            return None
        if kind == "pong":
            assert not errors, replies
            return None
        expected = F.ALREADY_AUTHENTICATED if kind == "auth" else F.UNKNOWN_TYPE
        assert errors[:1] == [expected], (data, replies)
        return self._strike(replies)


def peer_acks_like_a_seed_client(h: CoreHarness, sid: int) -> None:
    """The peer acks every frame a seed client would, and checks the answer."""
    for frame in h.read(sid):
        wants_ack = (
            frame.get("acknowledge") is True
            and frame.get("msgid")
            and frame.get("type") not in ("ack", "ack_received", "delivery_update")
        )
        if wants_ack:
            assert frame["type"] == "message", frame
            h.send(sid, {"type": "ack", "msgid": frame["msgid"], "status": "delivered"})
            answers = of_type(h.read(sid), "ack_received")
            assert [a["msgid"] for a in answers] == [frame["msgid"]], answers


Op = tuple[str, Any]

_steps = st.one_of(
    st.sampled_from([0.5, 1.0, 2.0, 5.0]).map(lambda s: ("advance", s)),
    st.just(("peer_cycle", None)),
    st.just(("replace_me", None)),
)
_frame_ops = frames.map(lambda f: ("frame", f))
ACTIVE_OPS = st.lists(st.one_of(_frame_ops, _frame_ops, _frame_ops, _steps), max_size=10)
# A pending session reads nothing but an auth frame: any other frame closes it (4001), so
# half the runs send none before their auth frame.
PENDING_OPS = st.builds(
    lambda before, auth, after: [*before, *auth, *after],
    st.just([]) | st.lists(st.one_of(undecodable, frames).map(lambda f: ("frame", f)), max_size=1),
    st.lists(auth_frames.map(lambda f: ("frame", f)), max_size=1),
    st.lists(st.one_of(_frame_ops, _frame_ops, _frame_ops, _steps), max_size=7),
)


def run_session(max_strikes: int, steps: list[Op], *, pending: bool, peer_acks: bool) -> None:
    """One fuzzed session (pending authentication, or authenticated) next to an online peer
    (which acks like a seed client, or never acks), through frames, time, the peer leaving and
    coming back, and the session being replaced by a newer one of the same client."""
    h = make_harness(max_strikes=max_strikes)
    me = h.client("me")
    peer = h.client("peer")
    peers = Peers(me, peer)
    peer_sid: int | None = h.connect(peer)

    def new_session(sid: int, who: Client | None) -> Session:
        return Session(h, sid, who, (me, peer), StrikeBucket(max_strikes, updated=h.now))

    session = new_session(h.open(), None) if pending else new_session(h.connect(me), me)
    opened_at = h.now
    advanced = 0.0
    for kind, arg in steps:
        if kind == "frame":
            session.feed(wire(arg, peers))
        elif kind == "advance":
            if advanced + arg > MAX_ADVANCE:
                continue
            advanced += arg
            was_open = session.is_open()
            h.advance(arg)
            if was_open and session.me is None and h.now >= opened_at + h.ws.auth_timeout:
                # Still pending at the auth deadline: told, and closed with 4001.
                assert codes(h.read(session.sid)) == [F.NOT_AUTHENTICATED]
                assert session.log_closed == CloseCode.AUTH_FAILED
            else:
                # No other timer closes a session within MAX_ADVANCE.
                assert session.is_open() == was_open, h.sessions[session.sid]
        elif kind == "peer_cycle":
            if peer_sid is not None:
                h.disconnect(peer_sid)
                peer_sid = None
            else:
                peer_sid = h.connect(peer)  # checks that the welcome comes first
        elif kind == "replace_me" and session.me is not None and session.is_open():
            old = session.sid
            session = new_session(h.connect(session.me), session.me)
            assert h.sessions[old].closed == (CloseCode.REPLACED, "replaced by a newer connection")
            assert h.sessions[old].gone
        if peer_sid is not None and h.sessions[peer_sid].gone:
            peer_sid = None  # replaced: the fuzzed session authenticated as the peer
        if peer_sid is not None and peer_acks:
            peer_acks_like_a_seed_client(h, peer_sid)
    assert_nothing_leaked(h)
    h.db.close()


@FUZZ
@given(max_strikes=st.sampled_from([20, 3, 1]), steps=ACTIVE_OPS, peer_acks=st.booleans())
def test_authenticated_session_takes_any_frame(
    max_strikes: int, steps: list[Op], peer_acks: bool
) -> None:
    run_session(max_strikes, steps, pending=False, peer_acks=peer_acks)


@FUZZ
@given(max_strikes=st.sampled_from([20, 3, 1]), steps=PENDING_OPS, peer_acks=st.booleans())
def test_pending_session_takes_any_frame(
    max_strikes: int, steps: list[Op], peer_acks: bool
) -> None:
    run_session(max_strikes, steps, pending=True, peer_acks=peer_acks)


# --- precise answers to envelopes ---------------------------------------------------------------


def two_clients() -> tuple[RecordingHarness, Peers, int, int]:
    h = make_harness()
    peers = Peers(h.client("me"), h.client("peer"))
    return h, peers, h.connect(peers.me), h.connect(peers.peer)


# A seed message to the peer with all 13 fields (no ttl), each a value relayd accepts.
VALID_ENVELOPE = st.fixed_dictionaries(
    {name: GOOD_VALUES[name] for name in ENVELOPE_FIELDS} | {"to": who(("peer",))}
)
ONE_BAD_FIELD = st.sampled_from([*ENVELOPE_FIELDS, "ttl"]).flatmap(
    lambda name: st.tuples(st.just(name), BAD_VALUES[name])
)


@FUZZ_ONE_FRAME
@given(
    envelope=VALID_ENVELOPE,
    msgid=st.uuids().map(str),
    bad_field=ONE_BAD_FIELD,
    as_message=st.booleans(),
    style=styles,
)
def test_one_wrong_field_is_refused_by_name(
    envelope: dict[str, Any],
    msgid: str,
    bad_field: tuple[str, Any],
    as_message: bool,
    style: int,
) -> None:
    """A seed message with exactly one bad field: an error frame naming that field, nothing
    delivered, the socket open; then the same message with the field fixed goes through."""
    h, peers, a, b = two_clients()
    name, value = bad_field
    envelope = envelope | {"msgid": msgid}
    if as_message:
        envelope["type"] = "message"
    h.send(a, Doc(envelope | {name: value}, style).text(peers))
    [error] = h.read(a)
    assert error["type"] == "error", error
    assert error["error"]["code"] == F.INVALID_MESSAGE_FORMAT, error
    assert error["error"]["details"]["field"] == name, error
    assert error["recovery"], error
    assert h.read(b) == []
    assert h.sessions[a].closed is None
    h.send(a, Doc(envelope, style).text(peers))
    [receipt] = of_type(h.read(a), "delivery_status")
    assert receipt["msgid"] == msgid
    assert len(h.messages(b)) == 1
    assert_nothing_leaked(h)
    h.db.close()


@FUZZ_ONE_FRAME
@given(envelope=VALID_ENVELOPE, sender=who(("peer", "stranger")))
def test_another_senders_uuid_is_refused(envelope: dict[str, Any], sender: Who) -> None:
    """``from`` naming another client (in any spelling): MESSAGE_SENDER_MISMATCH, socket open."""
    h, peers, a, b = two_clients()
    h.send(a, Doc(envelope | {"from": sender}).text(peers))
    [error] = h.read(a)
    assert error["error"]["code"] == F.MESSAGE_SENDER_MISMATCH, error
    assert error["error"]["details"] == {"field": "from"}, error
    assert h.read(b) == []
    h.send(a, {"type": "ping"})
    assert [f["type"] for f in h.read(a)] == ["pong"]
    assert_nothing_leaked(h)
    h.db.close()


@FUZZ_ONE_FRAME
@given(envelope=VALID_ENVELOPE, as_message=st.booleans(), style=styles)
def test_valid_envelope_arrives_with_the_senders_values(
    envelope: dict[str, Any], as_message: bool, style: int
) -> None:
    """Read leniently, delivered exactly: the 13 fields as sent, ``to`` and ``from`` canonical."""
    h, peers, a, b = two_clients()
    if as_message:
        envelope = envelope | {"type": "message"}
    h.send(a, Doc(envelope, style).text(peers))
    [delivered] = h.messages(b)
    [receipt] = of_type(h.read(a), "delivery_status")
    expected = {name: envelope[name] for name in ENVELOPE_FIELDS}
    expected |= {"to": peers.peer.uuid, "from": peers.me.uuid, "msgid": receipt["msgid"]}
    if envelope["timestamp"] is None:
        expected["timestamp"] = h.now
    if envelope["msgid"] is not None:
        assert receipt["msgid"] == envelope["msgid"]
    assert {name: delivered[name] for name in ENVELOPE_FIELDS} == expected
    assert receipt["status"] == ("pending_ack" if envelope["acknowledge"] else "delivered")
    assert_nothing_leaked(h)
    h.db.close()


# --- strikes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_strikes", [1, 5, 20])
def test_strikes_close_only_after_max_strikes_refused_frames(max_strikes: int) -> None:
    h = RecordingHarness(websocket=fuzz_websocket(max_strikes=max_strikes))
    me = h.client("me")
    a = h.connect(me)
    for _ in range(max_strikes):
        h.send(a, "not json")
        assert codes(h.read(a)) == [F.INVALID_MESSAGE_FORMAT]
        assert h.sessions[a].closed is None
    h.advance(1.0)  # one strike forgiven
    h.send(a, b"\x00")
    assert codes(h.read(a)) == [F.BINARY_UNSUPPORTED]
    assert h.sessions[a].closed is None
    h.send(a, {"type": "nope"})
    assert codes(h.read(a)) == [F.UNKNOWN_TYPE, F.RATE_LIMITED]
    assert h.sessions[a].closed == (CloseCode.TRY_LATER, "too many refused frames")
    assert_nothing_leaked(h)


def test_good_frames_between_refused_ones_do_not_forgive_strikes() -> None:
    """Strikes are forgiven by time only: pings in between change nothing."""
    h = RecordingHarness(websocket=fuzz_websocket(max_strikes=2))
    a = h.connect(h.client("me"))
    for frame in ("x", {"type": "ping"}, "x", {"type": "ping"}):
        h.send(a, frame)
    assert h.sessions[a].closed is None
    h.send(a, "x")
    assert h.sessions[a].closed == (CloseCode.TRY_LATER, "too many refused frames")


# --- bugs found by fuzzing ----------------------------------------------------------------------

LONE_SURROGATES = ("\\ud800", "\\udfff", "a\\udbffb", "\\udc00\\ud800")


@pytest.mark.parametrize("field", ["content", "msgid", "subject", "conversation_id"])
@pytest.mark.parametrize("acknowledge", [True, False])
def test_lone_surrogate_escape_is_refused_not_crashing(field: str, acknowledge: bool) -> None:
    """``"\\ud800"`` is valid JSON text but no Unicode string: relayd must refuse the frame
    (INVALID_MESSAGE_FORMAT naming the field), never pass it on to SQLite or a socket, where
    UTF-8 encoding raises."""
    h, peers, a, b = two_clients()
    peer = peers.peer
    for value in LONE_SURROGATES:
        text = (
            f'{{"to": "{peer.uuid}", "acknowledge": {json.dumps(acknowledge)}, '
            f'"{field}": "{value}"}}'
        )
        h.send(a, text)  # raises UnicodeEncodeError from the store or check_outbound
        [error] = h.read(a)
        assert error["error"]["code"] == F.INVALID_MESSAGE_FORMAT, error
        assert error["error"]["details"]["field"] == field, error
        assert h.read(b) == []
    assert_nothing_leaked(h)


@pytest.mark.parametrize("literal", ["1e400", "-1e400", "1E+999"])
def test_overflowing_timestamp_never_reaches_the_wire_as_infinity(literal: str) -> None:
    """``"timestamp": 1e400`` parses to ``inf``, which JSON cannot carry on (``Infinity`` is
    not JSON; ``JSON.parse`` throws): relayd refuses it, naming the field, and delivers
    nothing."""
    h, peers, a, b = two_clients()
    peer = peers.peer
    h.send(a, f'{{"to": "{peer.uuid}", "timestamp": {literal}, "content": "hi"}}')
    # RecordingHarness.flush checks every written frame as strict JSON.
    [error] = h.read(a)
    assert error["error"]["code"] == F.INVALID_MESSAGE_FORMAT, error
    assert error["error"]["details"] == {"field": "timestamp"}, error
    assert h.read(b) == []
    assert h.sessions[a].closed is None
    assert_nothing_leaked(h)


def test_surrogate_pairs_and_astral_text_pass_through() -> None:
    """The legitimate neighbours of the surrogate bug: escaped pairs and raw astral text."""
    h, peers, a, b = two_clients()
    peer = peers.peer
    h.send(a, f'{{"to": "{peer.uuid}", "content": "\\ud83d\\ude00 \U0001f600 \u00e9"}}')
    [delivered] = h.messages(b)
    assert delivered["content"] == "\U0001f600 \U0001f600 \u00e9"
    h.send(a, {"to": peer.uuid, "content": "\U0001f600", "acknowledge": True})
    [delivered] = h.messages(b)
    assert delivered["content"] == "\U0001f600"
    assert_nothing_leaked(h)


# --- live: a real daemon, real sockets ----------------------------------------------------------

MAX_FRAME = 4096
TRANSPORTS = ["http_port", "dedicated"]


def live_config(transport: str) -> dict[str, Any]:
    websocket: dict[str, Any] = {"max_frame_bytes": MAX_FRAME}
    if transport == "dedicated":
        websocket["listen"] = "127.0.0.1:0"
    # Short: after a WebSocket on the HTTP port closes, hypercorn's pinger task keeps its
    # connection alive until the next ping (heartbeat_interval), so a graceful stop waits for
    # drain_timeout.
    return {"websocket": websocket, "drain_timeout": 0.2}


@asynccontextmanager
async def running(tmp_path: Path, transport: str, engine: Engine) -> AsyncIterator[RunningRelayd]:
    """relayd on ``engine`` for one test, in a nursery of the test's own (a crash fails the
    test itself)."""
    async with trio.open_nursery() as nursery:
        config = make_config(tmp_path, live_config(transport), engine)
        relayd = await start_relayd(nursery, config)
        try:
            yield relayd
        finally:
            relayd.daemon.stop()


@asynccontextmanager
async def ws_session(
    relayd: RunningRelayd, token: str
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """An authenticated trio-websocket client, its welcome frame already read; all bounded.

    The test owns the TCP stream and closes it on the way out: ``open_websocket_url`` leaks
    its socket when the server closes first (a ResourceWarning at garbage collection, which
    may come after the test, past any ``filterwarnings`` mark).
    """
    url = urlsplit(relayd.addresses.websocket_url)
    assert url.hostname is not None
    assert url.port is not None
    with trio.fail_after(IO_DEADLINE):
        stream = await trio.open_tcp_stream(url.hostname, url.port)
        async with stream, trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(
                nursery, stream, url.netloc, f"{url.path}?token={token}"
            )
            try:
                welcome = json.loads(await ws.get_message())
                assert welcome["type"] == "connection", welcome
                yield ws
            finally:
                await ws.aclose()


async def receive(ws: trio_websocket.WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(IO_DEADLINE):
        message = await ws.get_message()
    assert isinstance(message, str), message
    return check_outbound(message)


async def frame_or_close(ws: trio_websocket.WebSocketConnection) -> dict[str, Any] | int:
    """The next frame, or the close code if the server closes instead."""
    try:
        return await receive(ws)
    except trio_websocket.ConnectionClosed as exc:
        reason = exc.reason
    assert reason is not None
    code: int = reason.code
    return code


async def assert_usable(ws: trio_websocket.WebSocketConnection) -> None:
    await ws.send_message(json.dumps({"type": "ping"}))
    assert (await receive(ws))["type"] == "pong"


def frame_of(size: int, char: str) -> str:
    """A ping frame of exactly ``size`` bytes of UTF-8, padded with ``char``."""
    base = json.dumps({"type": "ping", "pad": ""})
    filler = char * ((size - len(base)) // len(char.encode()))
    text = json.dumps({"type": "ping", "pad": filler}, ensure_ascii=False)
    text += " " * (size - len(text.encode()))
    assert len(text.encode()) == size
    return text


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_live_frame_over_max_frame_bytes_closes_1009(
    tmp_path: Path, transport: str, engine: Engine
) -> None:
    """A frame of exactly max_frame_bytes is read and answered; one byte more closes the
    socket with 1009; the daemon carries on."""
    async with running(tmp_path, transport, engine) as relayd:
        me = await relayd.http.register("me")
        async with ws_session(relayd, me["access_token"]) as ws:
            await ws.send_message(frame_of(MAX_FRAME, "x"))
            assert (await receive(ws))["type"] == "pong"
            await ws.send_message(frame_of(MAX_FRAME + 1, "x"))
            assert await frame_or_close(ws) == CloseCode.MESSAGE_TOO_BIG
        async with ws_session(relayd, me["access_token"]) as ws:
            await assert_usable(ws)


@pytest.mark.parametrize("char", ["\u20ac", "\U0001f600"])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_live_multibyte_frame_over_max_frame_bytes_closes_1009(
    tmp_path: Path, transport: str, char: str, engine: Engine
) -> None:
    """The limit is in bytes ("max_frame_bytes", "Largest inbound frame"): a frame of
    max_frame_bytes + 1 bytes of UTF-8, but fewer characters, must close with 1009 too."""
    async with running(tmp_path, transport, engine) as relayd:
        me = await relayd.http.register("me")
        async with ws_session(relayd, me["access_token"]) as ws:
            over = char * (MAX_FRAME // len(char.encode()) + 1)
            assert len(over) < MAX_FRAME < len(over.encode())
            await ws.send_message(over)
            assert await frame_or_close(ws) == CloseCode.MESSAGE_TOO_BIG


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_live_binary_frame_gets_an_error_and_the_socket_stays_usable(
    tmp_path: Path, transport: str, engine: Engine
) -> None:
    async with running(tmp_path, transport, engine) as relayd:
        me = await relayd.http.register("me")
        async with ws_session(relayd, me["access_token"]) as ws:
            for payload in (b"", b"\x00\xff", b'{"type": "ping"}'):
                await ws.send_message(payload)
                error = await receive(ws)
                assert error["type"] == "error", error
                assert error["error"]["code"] == F.BINARY_UNSUPPORTED
                assert error["recovery"]
                await assert_usable(ws)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_live_invalid_json_gets_an_error_and_the_socket_stays_usable(
    tmp_path: Path, transport: str, engine: Engine
) -> None:
    async with running(tmp_path, transport, engine) as relayd:
        me = await relayd.http.register("me")
        peer = await relayd.http.register("peer")
        async with ws_session(relayd, me["access_token"]) as ws:
            for text in ("not json", "", "[1, 2]", "NaN", "{", "[" * 3000, '{"to": 1}'):
                await ws.send_message(text)
                error = await receive(ws)
                assert error["type"] == "error", (text, error)
                assert error["error"]["code"] == F.INVALID_MESSAGE_FORMAT
                await assert_usable(ws)
            # And a real message still goes through.
            await ws.send_message(json.dumps({"to": peer["uuid"], "content": "hi"}))
            receipt = await receive(ws)
            assert receipt["type"] == "delivery_status", receipt
            assert receipt["status"] == "queued_offline"


@pytest.mark.parametrize("acknowledge", [True, False])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_live_lone_surrogate_escape_does_not_take_relayd_down(
    tmp_path: Path, transport: str, acknowledge: bool, engine: Engine
) -> None:
    """One frame from one client, ``{"content": "\\ud800"}``: relayd must answer it with an
    error frame (or deliver something valid) and carry on serving everyone."""
    async with running(tmp_path, transport, engine) as relayd:
        me = await relayd.http.register("me")
        peer = await relayd.http.register("peer")
        async with (
            ws_session(relayd, peer["access_token"]) as peer_ws,
            ws_session(relayd, me["access_token"]) as ws,
        ):
            text = (
                f'{{"to": "{peer["uuid"]}", "content": "\\ud800", '
                f'"acknowledge": {json.dumps(acknowledge)}}}'
            )
            await ws.send_message(text)
            answer = await receive(ws)
            assert answer["type"] == "error", answer
            assert answer["error"]["code"] == F.INVALID_MESSAGE_FORMAT
            assert answer["error"]["details"] == {"field": "content"}
            await assert_usable(ws)
            await assert_usable(peer_ws)
            response = await relayd.http.get("/health/ready")
            assert response.status == 200
