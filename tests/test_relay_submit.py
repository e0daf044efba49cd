"""A message submitted without a session (``RelayCore.submit``: ``POST /messages``), in the
sans-I/O core through :class:`CoreHarness`.

What must hold (issue 14): the REST and WebSocket paths share one acceptance, dedupe and
receipt path, so the recipient cannot tell them apart; the first receipt (or the refusal) goes
to the waiting submitter, later ones to the sender's live session (as updates) or owed in the
store; a submission opens no session, so it never replaces the sender's live one; it is
bounded by the sender's message rate and by what of its messages await a first receipt.
"""

from __future__ import annotations

from typing import Any

import pytest

from relayd._config import RelayConfig, WebsocketConfig
from relayd._relay.effects import Answer
from relayd._relay.frames import ProtocolError

from .relay_harness import Bus, CoreHarness

Frame = dict[str, Any]


def answer(h: CoreHarness, ticket: int) -> Answer:
    return h.answers[ticket]


def receipt(h: CoreHarness, ticket: int) -> Frame:
    got = h.answers[ticket]
    assert got.error == "", got
    assert got.receipt is not None, got
    return got.receipt


def refused(h: CoreHarness, client: Any, doc: Frame) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        h.submit(client, doc)
    return caught.value


def test_a_submitted_message_reaches_its_recipient_as_a_sent_one_does() -> None:
    h = CoreHarness()
    alice, bob = h.client("alice"), h.client("bob")
    envelope = {"to": bob.uuid, "acknowledge": True, "content": "hi", "subject": "s", "msgno": 7}
    ticket = h.submit(alice, {**envelope, "msgid": "rest-1"})
    assert receipt(h, ticket.id) == {
        "msgid": "rest-1",
        "to": bob.uuid,
        "status": "queued_offline",
        "timestamp": h.now,
        "message": "recipient offline; stored for delivery",
    }
    a = h.connect(alice)
    h.send(a, {**envelope, "msgid": "ws-1"})
    b = h.connect(bob)
    rest, ws = h.messages(b)
    assert rest.pop("msgid") == "rest-1"
    assert ws.pop("msgid") == "ws-1"
    assert rest == ws


def test_a_submission_opens_no_session_and_later_receipts_go_to_the_live_one() -> None:
    h = CoreHarness()
    alice, bob = h.client("alice"), h.client("bob")
    a, b = h.connect(alice), h.connect(bob)
    ticket = h.submit(alice, {"to": bob.uuid, "msgid": "m1", "acknowledge": True})
    assert receipt(h, ticket.id)["status"] == "pending_ack"
    assert h.sessions[a].closed is None
    assert h.core.session_count == 2
    # The first receipt went to the submitter, not to alice's socket.
    assert h.receipts(a) == []
    [message] = h.messages(b)
    h.send(b, {"type": "ack", "msgid": message["msgid"]})
    assert h.receipts(a) == [("delivery_update", "m1", "acknowledged")]
    [row] = h.stored()
    assert (row["status"], row["receipt_pending"]) == ("acknowledged", 0)


def test_a_final_receipt_for_a_sender_without_a_session_is_owed_until_it_connects() -> None:
    h = CoreHarness()
    alice, bob = h.client("alice"), h.client("bob")
    b = h.connect(bob)
    ticket = h.submit(alice, {"to": bob.uuid, "msgid": "m1", "acknowledge": True})
    assert receipt(h, ticket.id)["status"] == "pending_ack"
    h.send(b, {"type": "ack", "msgid": "m1"})
    [row] = h.stored()
    assert (row["status"], row["receipt_pending"]) == ("acknowledged", 1)
    a = h.connect(alice)
    assert h.receipts(a) == [("delivery_update", "m1", "acknowledged")]
    [row] = h.stored()
    assert row["receipt_pending"] == 0


def test_a_message_delivered_straight_away_is_answered_delivered_and_recorded_as_told() -> None:
    h = CoreHarness()
    alice, bob = h.client("alice"), h.client("bob")
    b = h.connect(bob)
    ticket = h.submit(alice, {"to": bob.uuid, "msgid": "m1", "content": "now"})
    assert receipt(h, ticket.id)["status"] == "delivered"
    assert [m["content"] for m in h.messages(b)] == ["now"]
    [row] = h.stored()
    assert (row["msgid"], row["status"], row["receipt_pending"]) == ("m1", "delivered", 0)
    # Told: nothing is owed to alice when she connects.
    a = h.connect(alice)
    assert h.receipts(a) == []


def test_a_stored_message_first_answered_with_its_final_status_is_recorded_as_told() -> None:
    h = CoreHarness(RelayConfig(mailbox_size=1), auto_store=False)
    alice, bob = h.client("alice"), h.client("bob")
    b = h.connect(bob)
    h.commit()
    h.submit(alice, {"to": bob.uuid, "msgid": "m1", "acknowledge": True})
    # Behind m1, awaiting its commit, bob's mailbox has no room: m2 is stored first too.
    ticket = h.submit(alice, {"to": bob.uuid, "msgid": "m2"})
    h.commit()
    h.run()
    assert [m["msgid"] for m in h.messages(b)] == ["m1", "m2"]
    h.commit()
    assert receipt(h, ticket.id)["status"] == "delivered"
    [row] = h.stored("msgid = 'm2'")
    assert (row["status"], row["receipt_pending"]) == ("delivered", 0)


def test_dedupe_spans_both_paths() -> None:
    h = CoreHarness()
    alice, bob = h.client("alice"), h.client("bob")
    a = h.connect(alice)
    h.send(a, {"to": bob.uuid, "msgid": "m1", "acknowledge": True})
    assert h.receipts(a) == [("delivery_status", "m1", "queued_offline")]
    again = h.submit(alice, {"to": bob.uuid, "msgid": "m1", "acknowledge": True})
    doc = receipt(h, again.id)
    assert (doc["status"], doc["duplicate"]) == ("queued_offline", True)
    first = h.submit(alice, {"to": bob.uuid, "msgid": "m2", "acknowledge": True})
    assert "duplicate" not in receipt(h, first.id)
    h.send(a, {"to": bob.uuid, "msgid": "m2", "acknowledge": True})
    [frame] = h.read(a)
    assert (frame["type"], frame["status"], frame["duplicate"]) == (
        "delivery_status",
        "queued_offline",
        True,
    )
    b = h.connect(bob)
    assert [m["msgid"] for m in h.messages(b)] == ["m1", "m2"]


def test_a_duplicate_only_the_store_knows_is_answered_as_one() -> None:
    bus = Bus()
    node_a, node_b = CoreHarness(bus=bus), CoreHarness(bus=bus)
    alice, bob = node_a.client("alice"), node_a.client("bob")
    a = node_a.connect(alice)
    node_a.send(a, {"to": bob.uuid, "msgid": "m1", "acknowledge": True})
    # Node B's dedupe memory has not seen m1: the store refuses the insert.
    ticket = node_b.submit(alice, {"to": bob.uuid, "msgid": "m1", "acknowledge": True})
    doc = receipt(node_b, ticket.id)
    # What the socket path answers for it too: the store knows it queued, not who was told.
    assert (doc["status"], doc["duplicate"]) == ("queued", True)
    assert len(node_a.stored()) == 1
    assert node_a.receipts(a) == [("delivery_status", "m1", "queued_offline")]


def test_an_unknown_recipient_is_a_refusal_for_the_submitter() -> None:
    h = CoreHarness()
    alice = h.client("alice")
    a = h.connect(alice)
    nobody = "00000000-0000-4000-8000-000000000000"
    ticket = h.submit(alice, {"to": nobody, "msgid": "m1"})
    got = answer(h, ticket.id)
    assert (got.error, got.details) == ("unknown_recipient", {"msgid": "m1", "to": nobody})
    assert got.receipt is None
    assert h.read(a) == []  # not told on the socket too
    assert h.stored() == []


def test_a_full_queue_is_a_refusal_for_the_submitter() -> None:
    h = CoreHarness(RelayConfig(max_queued_per_recipient=1))
    alice, bob = h.client("alice"), h.client("bob")
    assert receipt(h, h.submit(alice, {"to": bob.uuid}).id)["status"] == "queued_offline"
    assert answer(h, h.submit(alice, {"to": bob.uuid}).id).error == "queue_full"


@pytest.mark.parametrize(
    ("doc", "code", "field"),
    [
        ({"content": "no to"}, "INVALID_MESSAGE_FORMAT", "to"),
        ({"to": "BOB", "msgno": "x"}, "INVALID_MESSAGE_FORMAT", "msgno"),
        (
            {"to": "BOB", "from": "00000000-0000-4000-8000-000000000000"},
            "MESSAGE_SENDER_MISMATCH",
            "from",
        ),
        ({"to": "BOB", "type": "ack", "msgid": "m1"}, "unknown_type", "type"),
    ],
)
def test_a_bad_submission_is_refused_at_once_and_nothing_is_accepted(
    doc: Frame, code: str, field: str
) -> None:
    h = CoreHarness()
    alice, bob = h.client("alice"), h.client("bob")
    doc = {k: bob.uuid if v == "BOB" else v for k, v in doc.items()}
    error = refused(h, alice, doc)
    assert (error.code, error.details.get("field")) == (code, field)
    assert h.stored() == []
    assert h.answers == {}
    assert h.core.receipts.tickets == 0


def test_every_submission_counts_against_the_senders_message_rate() -> None:
    h = CoreHarness(websocket=WebsocketConfig(messages_per_second=1.0, message_burst=2))
    alice, bob = h.client("alice"), h.client("bob")
    refused(h, alice, {"content": "invalid"})  # counted too
    h.submit(alice, {"to": bob.uuid})
    error = refused(h, alice, {"to": bob.uuid})
    assert (error.code, error.details["retry_after"]) == ("rate_limited", 1.0)
    # The socket shares the rate: alice's socket is refused as well.
    a = h.connect(alice)
    h.send(a, {"to": bob.uuid})
    [frame] = h.read(a)
    assert frame["error"]["code"] == "rate_limited"
    h.advance(1.0)
    h.submit(alice, {"to": bob.uuid})


def test_what_awaits_a_first_receipt_is_bounded_per_sender() -> None:
    h = CoreHarness(websocket=WebsocketConfig(outbound_buffer=8), auto_store=False)
    alice, bob = h.client("alice"), h.client("bob")
    tickets = [h.submit(alice, {"to": bob.uuid}) for _ in range(2)]  # a quarter of 8
    error = refused(h, alice, {"to": bob.uuid})
    assert (error.code, error.details) == ("rate_limited", {"retry_after": 1.0})
    carol = h.client("carol")
    h.submit(carol, {"to": bob.uuid})  # another sender is not held back
    h.commit()
    assert [receipt(h, t.id)["status"] for t in tickets] == ["queued_offline"] * 2
    h.submit(alice, {"to": bob.uuid})


def test_an_abandoned_submission_goes_on_and_its_receipts_go_to_the_socket_as_updates() -> None:
    h = CoreHarness(auto_store=False)
    alice, bob = h.client("alice"), h.client("bob")
    a = h.connect(alice)
    h.commit()
    ticket = h.submit(alice, {"to": bob.uuid, "msgid": "m1", "acknowledge": True})
    h.core.abandon(ticket.id)
    h.commit()
    h.run()
    assert h.answers == {}
    assert h.receipts(a) == [("delivery_update", "m1", "queued_offline")]
    assert h.core.receipts.tickets == 0


def test_an_abandoned_submission_of_an_offline_sender_owes_only_its_final_receipt() -> None:
    h = CoreHarness(auto_store=False)
    alice, bob = h.client("alice"), h.client("bob")
    b = h.connect(bob)
    h.commit()
    ticket = h.submit(alice, {"to": bob.uuid, "msgid": "m1", "acknowledge": True})
    h.core.abandon(ticket.id)
    h.commit()
    h.run()
    assert h.answers == {}
    h.send(b, {"type": "ack", "msgid": h.messages(b)[0]["msgid"]})
    h.commit()
    [row] = h.stored()
    assert (row["status"], row["receipt_pending"]) == ("acknowledged", 1)
    a = h.connect(alice)
    h.commit()
    h.run()
    assert h.receipts(a) == [("delivery_update", "m1", "acknowledged")]


def test_a_draining_relay_refuses_submissions() -> None:
    h = CoreHarness()
    alice, bob = h.client("alice"), h.client("bob")
    h.core.drain(h.now)
    assert refused(h, alice, {"to": bob.uuid}).code == "shutting_down"


def test_the_store_down_refuses_submissions() -> None:
    h = CoreHarness()
    alice, bob = h.client("alice"), h.client("bob")
    h.core.store_failed()
    error = refused(h, alice, {"to": bob.uuid, "msgid": "m1"})
    assert (error.code, error.details["msgid"]) == ("store_unavailable", "m1")
    assert h.core.receipts.tickets == 0


def test_a_submission_on_one_node_reaches_a_recipient_on_another() -> None:
    bus = Bus()
    node_a, node_b = CoreHarness(bus=bus), CoreHarness(bus=bus)
    alice, bob = node_a.client("alice"), node_a.client("bob")
    b = node_b.connect(bob)
    a = node_b.connect(alice)  # alice's live session is on node B too
    ticket = node_a.submit(alice, {"to": bob.uuid, "msgid": "m1", "acknowledge": True})
    assert receipt(node_a, ticket.id)["status"] == "queued_offline"
    [message] = node_b.messages(b)
    assert message["msgid"] == "m1"
    node_b.send(b, {"type": "ack", "msgid": "m1"})
    assert node_b.receipts(a) == [("delivery_update", "m1", "acknowledged")]
    assert node_b.sessions[a].closed is None
