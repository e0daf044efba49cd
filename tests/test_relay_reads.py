"""Read receipts in the sans-I/O core (rule 8 of relayd/_relay/core.py), through the fake
link of tests/relay_harness.py: a ``read`` frame marks a delivery read in the store; its sender
is told once, now or when it connects, on this node or another; only the recipient may mark it,
only once it was written to it; a client with read receipts off keeps its reads to itself."""

from __future__ import annotations

from typing import Any

from attrs import define

from relayd._config import RelayConfig, WebsocketConfig
from relayd._relay.records import MarkRead, ReadCode, ReadOutcome

from .relay_harness import T0, Bus, CoreHarness

Frame = dict[str, Any]


def of_type(frames: list[Frame], kind: str) -> list[Frame]:
    return [f for f in frames if f["type"] == kind]


def reads(frames: list[Frame]) -> list[tuple[str, str, float]]:
    """``(msgid, to, read_at)`` of the read receipts among ``frames``."""
    return [
        (f["msgid"], f["to"], f["read_at"])
        for f in frames
        if f["type"] == "delivery_update" and f["status"] == "read"
    ]


def finals(frames: list[Frame]) -> list[tuple[str, str]]:
    return [
        (f["msgid"], f["status"])
        for f in frames
        if f["type"] in ("delivery_status", "delivery_update") and f["status"] != "read"
    ]


def errors(frames: list[Frame]) -> list[tuple[str, dict[str, Any]]]:
    return [(f["error"]["code"], f["error"]["details"]) for f in of_type(frames, "error")]


def owed(h: CoreHarness, seq: int) -> tuple[int, int, float | None]:
    """``(receipt_pending, read_pending, read_at)`` of a delivery's row."""
    [row] = h.stored("seq = ?", seq)
    return row["receipt_pending"], row["read_pending"], row["read_at"]


def delivered(h: CoreHarness, sender: int, recipient: int, to: str, msgid: str) -> None:
    """``sender`` sends ``msgid`` (acknowledged) to ``to``, connected on ``recipient``, which
    receives and acks it."""
    h.send(sender, {"to": to, "msgid": msgid, "acknowledge": True, "content": msgid})
    [message] = h.messages(recipient)
    assert message["msgid"] == msgid
    h.send(recipient, {"type": "ack", "msgid": msgid})
    h.read(recipient)


def test_a_read_is_told_once_to_an_online_sender_and_answered_to_the_reader() -> None:
    h = CoreHarness()
    alice, bob = h.client("alice"), h.client("bob")
    a, b = h.connect(alice), h.connect(bob)
    delivered(h, a, b, bob.uuid, "m1")
    assert finals(h.read(a)) == [("m1", "pending_ack"), ("m1", "acknowledged")]
    h.now = T0 + 5
    h.send(b, {"type": "read", "msgid": "m1"})
    [answer] = h.read(b)
    assert answer == {
        "type": "read_received",
        "msgid": "m1",
        "from": alice.uuid,
        "status": "read",
        "read_at": T0 + 5,
        "timestamp": T0 + 5,
    }
    assert reads(h.read(a)) == [("m1", bob.uuid, T0 + 5)]
    assert owed(h, 1) == (0, 0, T0 + 5)
    # Again (a replay, or a second device): answered, the first time kept, nobody told again.
    h.now = T0 + 9
    h.send(b, {"type": "read", "msgid": "m1", "from": alice.uuid})
    [again] = h.read(b)
    assert (again["status"], again["read_at"]) == ("already_read", T0 + 5)
    assert h.read(a) == []
    # Nor when the sender comes back.
    h.disconnect(a)
    a = h.connect(alice)
    assert h.read(a) == []


def test_a_message_awaiting_its_ack_can_be_read_before_it_is_acknowledged() -> None:
    h = CoreHarness()
    alice, bob = h.client("alice"), h.client("bob")
    a, b = h.connect(alice), h.connect(bob)
    h.send(a, {"to": bob.uuid, "msgid": "m1", "acknowledge": True})
    h.messages(b)
    h.send(b, {"type": "read", "msgid": "m1"})
    h.send(b, {"type": "ack", "msgid": "m1"})
    frames = h.read(a)
    assert [(f["msgid"], f["status"]) for f in frames] == [
        ("m1", "pending_ack"),
        ("m1", "read"),
        ("m1", "acknowledged"),
    ]


def test_an_offline_sender_is_told_its_final_status_then_the_read_when_it_connects() -> None:
    h = CoreHarness()
    alice, bob = h.client("alice"), h.client("bob")
    a, b = h.connect(alice), h.connect(bob)
    h.send(a, {"to": bob.uuid, "msgid": "m1", "acknowledge": True})
    h.read(a)
    h.disconnect(a)
    h.messages(b)
    h.send(b, {"type": "ack", "msgid": "m1"})
    h.send(b, {"type": "read", "msgid": "m1"})
    assert owed(h, 1) == (1, 1, T0)
    a = h.connect(alice)
    frames = h.read(a)
    assert [(f["msgid"], f["status"]) for f in frames] == [("m1", "acknowledged"), ("m1", "read")]
    assert owed(h, 1) == (0, 0, T0)
    # A crash after that: nothing is owed again.
    h = h.restart()
    a = h.connect(alice)
    assert h.read(a) == []


def test_a_read_landing_while_the_final_receipt_is_on_its_way_loses_neither() -> None:
    """The final status is loaded and handed to the sender's socket; the read arrives before
    that frame is written: each is told once, and each marked told on its own."""
    h = CoreHarness()
    alice, bob = h.client("alice"), h.client("bob")
    a, b = h.connect(alice), h.connect(bob)
    h.send(a, {"to": bob.uuid, "msgid": "m1", "acknowledge": True})
    h.disconnect(a)
    h.messages(b)
    h.send(b, {"type": "ack", "msgid": "m1"})
    h.auto_flush = False
    a = h.open(token=alice.token)  # loads the owed acknowledged receipt: not written yet
    h.flush(b)
    h.send(b, {"type": "read", "msgid": "m1"})
    h.flush(b)
    h.flush(a)
    h.run()
    frames = h.read(a)
    assert [(f["type"], f["status"]) for f in frames if f["type"] != "connection"] == [
        ("delivery_update", "acknowledged"),
        ("delivery_update", "read"),
    ]
    assert owed(h, 1) == (0, 0, T0)


def test_a_read_committed_with_the_senders_load_of_owed_receipts_is_told_once() -> None:
    h = CoreHarness()
    alice, bob = h.client("alice"), h.client("bob")
    a, b = h.connect(alice), h.connect(bob)
    h.send(a, {"to": bob.uuid, "msgid": "m1", "acknowledge": True})
    h.disconnect(a)
    h.messages(b)
    h.send(b, {"type": "ack", "msgid": "m1"})
    h.auto_store = False
    h.send(b, {"type": "read", "msgid": "m1"})  # MarkRead waits for the commit...
    a = h.open(token=alice.token)  # ...and so does the sender's load, behind it
    h.commit()
    h.auto_store = True
    h.run()
    frames = h.read(a)
    assert [f["status"] for f in frames if f["type"] == "delivery_update"] == [
        "acknowledged",
        "read",
    ]
    h.disconnect(a)
    a = h.connect(alice)
    assert h.read(a) == []


def test_a_message_delivered_from_memory_can_be_read_before_its_receipt_is_written() -> None:
    """``acknowledge: false`` to an online recipient is stored only once its sender's
    ``delivered`` is written: a read before that stores it first."""
    h = CoreHarness()
    alice, bob = h.client("alice"), h.client("bob")
    a, b = h.connect(alice), h.connect(bob)
    h.auto_flush = False
    h.send(a, {"to": bob.uuid, "msgid": "m1", "content": "hi"})
    h.flush(b)
    [message] = h.messages(b)
    assert message["msgid"] == "m1"
    assert h.stored() == []  # the sender's receipt is not written: no row yet
    h.send(b, {"type": "read", "msgid": "m1"})
    h.flush(b)
    assert [f["status"] for f in h.read(b)] == ["read"]
    h.flush(a)
    h.run()
    frames = h.read(a)
    assert [(f["msgid"], f["status"]) for f in frames] == [("m1", "delivered"), ("m1", "read")]
    assert owed(h, 1) == (0, 0, T0)
    h.auto_flush = True
    h.disconnect(a)
    a = h.connect(alice)
    assert h.read(a) == []


def test_only_the_recipient_of_a_delivered_message_may_mark_it_read() -> None:
    h = CoreHarness(RelayConfig(inflight_window=1))
    alice, bob, carol = h.client("alice"), h.client("bob"), h.client("carol")
    a, b, c = h.connect(alice), h.connect(bob), h.connect(carol)
    h.send(a, {"to": bob.uuid, "msgid": "m1", "acknowledge": True})
    h.send(a, {"to": bob.uuid, "msgid": "m2", "acknowledge": True})
    assert [m["msgid"] for m in h.messages(b)] == ["m1"]  # m2 waits behind the window
    h.read(a)
    h.send(a, {"type": "read", "msgid": "m1"})  # its sender
    h.send(c, {"type": "read", "msgid": "m1"})  # someone else
    h.send(c, {"type": "read", "msgid": "m1", "from": alice.uuid})
    h.send(b, {"type": "read", "msgid": "m2"})  # not delivered yet
    h.send(b, {"type": "read", "msgid": "nothing"})
    h.send(b, {"type": "read", "msgid": "m1", "from": carol.uuid})  # not from carol
    assert errors(h.read(a)) == [("not_yours", {"field": "msgid", "msgid": "m1"})]
    assert errors(h.read(c)) == [
        ("not_yours", {"field": "msgid", "msgid": "m1"}),
        ("not_yours", {"field": "msgid", "msgid": "m1", "from": alice.uuid}),
    ]
    assert errors(h.read(b)) == [
        ("not_delivered", {"field": "msgid", "msgid": "m2"}),
        ("unknown_message", {"field": "msgid", "msgid": "nothing"}),
        ("not_yours", {"field": "msgid", "msgid": "m1", "from": carol.uuid}),
    ]
    assert [row["read_at"] for row in h.stored()] == [None, None]
    assert reads(h.read(a)) == []


def test_honest_refusals_are_no_strikes_but_malformed_reads_are() -> None:
    h = CoreHarness(websocket=WebsocketConfig(max_strikes=3))
    alice = h.client("alice")
    a = h.connect(alice)
    for _ in range(10):
        h.send(a, {"type": "read", "msgid": "nothing"})
    assert [code for code, _ in errors(h.read(a))] == ["unknown_message"] * 10
    assert h.sessions[a].closed is None
    bad: list[Frame] = [
        {"type": "read"},
        {"type": "read", "msgid": 7},
        {"type": "read", "msgid": ""},
        {"type": "read", "msgid": "x" * 129},
        {"type": "read", "msgid": "m1", "from": "not-a-uuid"},
        {"type": "read", "msgid": "m1", "from": ["x"]},
    ]
    fields = []
    for frame in bad[:3]:
        h.send(a, frame)
        fields += [(code, details["field"]) for code, details in errors(h.read(a))]
    assert fields == [("INVALID_MESSAGE_FORMAT", "msgid")] * 3
    h.send(a, bad[3])  # the fourth strike within a second: closed
    assert h.sessions[a].closed is not None
    a = h.connect(alice)
    h.now += 10  # strikes forgiven
    for frame in bad[3:]:
        h.send(a, frame)
    assert [details["field"] for _, details in errors(h.read(a))] == ["msgid", "from", "from"]


def test_a_flood_of_reads_is_rate_limited_and_never_outruns_the_socket() -> None:
    h = CoreHarness(websocket=WebsocketConfig(messages_per_second=1, message_burst=3))
    alice = h.client("alice")
    a = h.connect(alice)
    for _ in range(4):
        h.send(a, {"type": "read", "msgid": "nothing"})
    codes = [code for code, _ in errors(h.read(a))]
    assert codes == ["unknown_message"] * 3 + ["rate_limited"]
    # Reads whose answers are on their way pause reading past a quarter of the buffer.
    h = CoreHarness(websocket=WebsocketConfig(outbound_buffer=8))
    alice = h.client("alice")
    a = h.connect(alice)
    h.auto_store = False
    readable = []
    for _ in range(3):
        readable.append(h.core.readable(a))
        h.send(a, {"type": "read", "msgid": "nothing"})
    assert readable == [True, True, False]
    h.commit()
    assert h.core.readable(a)


def test_a_reader_with_read_receipts_off_is_answered_and_its_sender_never_told() -> None:
    h = CoreHarness()
    alice, bob = h.client("alice"), h.client("bob")
    h.db.execute("UPDATE clients SET read_receipts = 0 WHERE uuid = ?", (bob.uuid,))
    a, b = h.connect(alice), h.connect(bob)
    delivered(h, a, b, bob.uuid, "m1")
    h.read(a)
    h.send(b, {"type": "read", "msgid": "m1"})
    assert [f["status"] for f in h.read(b)] == ["read"]
    assert h.read(a) == []
    [row] = h.stored()
    assert (row["read_at"], row["read_pending"], row["read_hidden"]) == (T0, 0, 1)
    h.disconnect(a)
    a = h.connect(alice)
    assert h.read(a) == []


@define(eq=False)
class RestRead:
    """What the hub hands the core for a REST read (any object but a session id)."""


def test_a_rest_read_tells_the_sender_as_a_frame_would_and_answers_through_the_store() -> None:
    h = CoreHarness()
    alice, bob = h.client("alice"), h.client("bob")
    a, b = h.connect(alice), h.connect(bob)
    delivered(h, a, b, bob.uuid, "m1")
    h.read(a)
    h.auto_store = False
    ref = RestRead()
    h.core.read(ref, bob.uuid, "m1", alice.uuid, h.now)
    h.run()
    [op] = h.pending_store
    [outcome] = h.commit()
    assert isinstance(op, MarkRead)
    assert op.ref is ref
    assert outcome == ReadOutcome(ReadCode.READ, 1, alice.uuid, T0, owed=True)
    h.auto_store = True
    h.run()
    assert h.read(b) == []  # nothing on the reader's socket: REST answers it
    assert reads(h.read(a)) == [("m1", bob.uuid, T0)]


def two_nodes() -> tuple[Bus, CoreHarness, CoreHarness]:
    bus = Bus()
    return bus, CoreHarness(bus=bus), CoreHarness(bus=bus)


def test_a_read_on_one_node_is_told_to_the_sender_on_another_online_or_when_it_connects() -> None:
    _, node_a, node_b = two_nodes()
    alice, bob = node_a.client("alice"), node_a.client("bob")
    a = node_a.connect(alice)  # the sender, on node A
    b = node_b.connect(bob)  # the reader, on node B
    node_a.send(a, {"to": bob.uuid, "msgid": "m1", "acknowledge": True})
    [message] = node_b.messages(b)
    node_b.send(b, {"type": "ack", "msgid": "m1"})
    node_b.send(b, {"type": "read", "msgid": "m1"})
    assert [f["status"] for f in of_type(node_b.read(b), "read_received")] == ["read"]
    frames = node_a.read(a)
    assert [f["status"] for f in frames] == ["queued_offline", "acknowledged", "read"]
    assert reads(frames) == [("m1", bob.uuid, T0)]
    # Offline: owed, told when it connects, on either node.
    node_a.send(a, {"to": bob.uuid, "msgid": "m2", "acknowledge": True})
    node_a.disconnect(a)
    node_b.messages(b)
    node_b.send(b, {"type": "ack", "msgid": "m2"})
    node_b.send(b, {"type": "read", "msgid": "m2"})
    a = node_b.connect(alice)
    frames = node_b.read(a)
    assert [(f["msgid"], f["status"]) for f in frames] == [("m2", "acknowledged"), ("m2", "read")]
    assert message["msgid"] == "m1"
