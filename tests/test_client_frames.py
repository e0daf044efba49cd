"""The SDK's frames (``relayd.client._frames``) against relayd's own (``relayd._relay.frames``):
what relayd writes, the SDK reads; what the SDK sends, relayd takes, and the SDK refuses
exactly what relayd would refuse."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd._relay import frames as relayd_frames
from relayd.client import InvalidMessage, Message, Receipt
from relayd.client._frames import (
    ErrorFrame,
    TokenExpiring,
    Unknown,
    Welcome,
    encode,
    message_frame,
    parse,
)

ALICE = "8cb0dec9-9342-4eba-89f7-28f97513c0c5"
BOB = "5f38e6fd-aab7-461c-8eb4-0ac0e6908fe8"


def test_a_message_relayd_delivers_is_read_with_every_field() -> None:
    envelope = relayd_frames.parse_envelope(
        {
            "to": BOB,
            "content": "hello",
            "acknowledge": True,
            "subject": "s",
            "priority": "high",
            "conversation_id": "c",
            "action": "a",
            "event": "e",
            "status": "st",
            "msgno": 7,
        }
    )
    fields = relayd_frames.encode(envelope.fields(ALICE, "m-1", 1700000000.5))
    text = relayd_frames.delivery_frame(fields, attempt=2, redelivered=True)
    message = parse(text)
    assert message == Message(
        msgid="m-1",
        sender=ALICE,
        to=BOB,
        content="hello",
        acknowledge=True,
        redelivered=True,
        attempt=2,
        timestamp=1700000000.5,
        subject="s",
        priority="high",
        conversation_id="c",
        action="a",
        event="e",
        status="st",
        msgno=7,
    )
    assert isinstance(message, Message)
    assert message.raw == json.loads(text)


def test_an_error_frame_naming_a_message_is_read_with_its_msgid() -> None:
    text = relayd_frames.error_frame(
        relayd_frames.UNKNOWN_RECIPIENT, "no such client", 1.0, details={"msgid": "m-1", "to": BOB}
    )
    error = parse(text)
    assert error == ErrorFrame("unknown_recipient", "no such client", {"msgid": "m-1", "to": BOB})
    assert isinstance(error, ErrorFrame)
    assert error.msgid == "m-1"


@pytest.mark.parametrize(
    ("doc", "event"),
    [
        (
            {"type": "delivery_status", "msgid": "m", "to": BOB, "status": "pending_ack"},
            Receipt(msgid="m", status="pending_ack", to=BOB),
        ),
        (
            {"type": "delivery_update", "msgid": "m", "status": "acknowledged", "duplicate": True},
            Receipt(msgid="m", status="acknowledged", duplicate=True, kind="delivery_update"),
        ),
        (
            {"type": "connection", "uuid": ALICE, "name": "alice", "token_expires_at": 5.0},
            Welcome(uuid=ALICE, name="alice", token_expires_at=5.0, heartbeat_interval=20.0),
        ),
        ({"type": "token_expiring", "expires_at": 9.0}, TokenExpiring(9.0)),
        (
            {"type": "topic_message", "topic": "news"},
            Unknown({"type": "topic_message", "topic": "news"}),
        ),
        (
            {"type": "error", "error": "not an object"},
            Unknown({"type": "error", "error": "not an object"}),
        ),
    ],
)
def test_frames_relayd_sends_are_read_and_unknown_ones_pass_through(
    doc: dict[str, Any], event: object
) -> None:
    assert parse(json.dumps(doc)) == event


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '"a string"', "{"])
def test_what_is_not_a_json_object_is_unknown(text: str) -> None:
    assert isinstance(parse(text), Unknown)


def test_a_receipt_is_final_and_ok_by_its_status() -> None:
    assert [Receipt(msgid="m", status=s).final for s in ("queued", "pending_ack")] == [False] * 2
    assert Receipt(msgid="m", status="acknowledged").ok
    failed = Receipt(msgid="m", status="failed")
    assert (failed.final, failed.ok) == (True, False)


# --- the SDK refuses exactly what relayd refuses ----------------------------------------------


def text(limit: int) -> st.SearchStrategy[str]:
    """Strings around ``limit`` characters long, sometimes with a lone surrogate."""
    return st.one_of(
        st.integers(min_value=max(0, limit - 2), max_value=limit + 2).map(lambda n: "x" * n),
        st.text(max_size=8),
        st.just("a\ud800b"),
    )


MESSAGE_FIELDS = st.fixed_dictionaries(
    {
        "to": st.sampled_from([BOB, BOB.upper(), "not-a-uuid", ""]),
        "content": text(4),
        "msgid": text(128),
        "subject": text(256),
        "priority": text(32),
        "conversation_id": text(256),
        "action": text(256),
        "event": text(256),
        "status": text(256),
        "msgno": st.sampled_from([0, -(2**63), 2**63 - 1, 2**63, -(2**63) - 1]),
        "ttl": st.sampled_from([None, 0.0, -1.0, 0.5, 1e9, float("inf"), float("nan")]),
    }
)


def relayd_takes(doc: dict[str, Any]) -> bool:
    try:
        # json.dumps writes a lone surrogate as a \ud800 escape, as a client's encoder would.
        relayd_frames.parse_envelope(relayd_frames.decode(json.dumps(doc)))
    except relayd_frames.ProtocolError:
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(MESSAGE_FIELDS)
def test_the_sdk_refuses_a_message_exactly_when_relayd_would(fields: dict[str, Any]) -> None:
    to, content = fields.pop("to"), fields.pop("content")
    raw = {"type": "message", "to": to, "content": content, "acknowledge": True, **fields}
    try:
        frame = message_frame(to, content, acknowledge=True, **fields)
    except InvalidMessage:
        assert not relayd_takes(raw)
        return
    assert relayd_takes(raw)
    # And the frame the SDK writes is one relayd takes, with the same content.
    envelope = relayd_frames.parse_envelope(relayd_frames.decode(encode(frame)))
    assert (envelope.to, envelope.content, envelope.msgid) == (BOB, content, fields["msgid"])
