"""REST sessions in the sans-I/O core (rule 8 of relayd/_relay/core.py): a session without a
socket, opened by a pull, handed deliveries only while a pull waits, acknowledged over REST,
ended when idle or when a socket takes over. Driven through :class:`CoreHarness`, with exact
virtual times (see tests/test_relay_core.py for EPS)."""

from __future__ import annotations

from typing import Any

from relayd._config import RelayConfig
from relayd._relay.frames import CloseCode

from .relay_harness import T0, Bus, CoreHarness
from .support import SEED_FIELDS

EPS = 2.0**-10

Frame = dict[str, Any]


def advance_to(h: CoreHarness, t: float) -> None:
    assert t >= h.now, (t, h.now)
    h.advance(t - h.now)
    assert h.now == t


def of_type(frames: list[Frame], kind: str) -> list[Frame]:
    return [f for f in frames if f.get("type") == kind]


def rest_session(h: CoreHarness, token: str) -> int:
    """Open a REST session as a first pull does; its welcome frame is checked and dropped."""
    sid = h.open(token=token, rest=True)
    [welcome] = h.read(sid)
    assert welcome["type"] == "connection"
    return sid


def closed_code(h: CoreHarness, sid: int) -> int | None:
    closed = h.sessions[sid].closed
    return None if closed is None else closed[0]


def send(h: CoreHarness, sid: int, to: str, msgid: str, *, ack: bool = True) -> None:
    h.send(sid, {"to": to, "msgid": msgid, "acknowledge": ack, "content": msgid})


def test_a_rest_session_is_handed_deliveries_only_while_a_pull_waits_and_only_what_it_takes() -> (
    None
):
    h = CoreHarness()
    alice, bob = h.client("alice"), h.client("bob")
    a = h.connect(alice)
    r = rest_session(h, bob.token)
    for msgid in ("m1", "m2", "m3"):
        send(h, a, bob.uuid, msgid)
    assert h.messages(r) == []  # no pull waits: everything stays in the mailbox
    first = h.pull(r, limit=2)
    assert [m["msgid"] for m in first] == ["m1", "m2"]
    assert all(m["attempt"] == 1 and not m["redelivered"] for m in first)
    assert set(SEED_FIELDS) <= set(first[0])
    assert h.messages(r) == []  # the pull returned: m3 waits for the next
    [third] = h.pull(r, limit=2)
    assert third["msgid"] == "m3"
    # A pull that waits is handed what arrives meanwhile, up to its limit.
    h.core.pull(r, 1, h.now)
    h.run()
    send(h, a, bob.uuid, "m4")
    send(h, a, bob.uuid, "m5")
    assert [m["msgid"] for m in h.messages(r)] == ["m4"]
    h.core.pull_done(r, h.now)
    h.run()
    assert [m["msgid"] for m in h.pull(r)] == ["m5"]


def test_an_ack_over_rest_finishes_the_delivery_and_tells_the_sender_only_for_what_it_holds() -> (
    None
):
    h = CoreHarness()
    alice, bob, carol = h.client("alice"), h.client("bob"), h.client("carol")
    a = h.connect(alice)
    r = rest_session(h, bob.token)
    c = rest_session(h, carol.token)
    send(h, a, bob.uuid, "m1")
    send(h, a, carol.uuid, "m2")
    h.read(a)
    assert [m["msgid"] for m in h.pull(r)] == ["m1"]
    assert [m["msgid"] for m in h.pull(c)] == ["m2"]
    assert h.core.acknowledge(r, "m2", h.now) is False  # carol's delivery, not bob's
    assert h.core.acknowledge(r, "nope", h.now) is False
    assert h.receipts(a) == []
    assert h.core.acknowledge(r, "m1", h.now) is True
    h.run()
    assert h.receipts(a) == [("delivery_update", "m1", "acknowledged")]
    assert h.read(r) == []  # no ack_received frame: the HTTP answer says it
    assert h.core.acknowledge(r, "m1", h.now) is False  # once
    [row] = h.stored("msgid = 'm1'")
    assert row["status"] == "acknowledged"


def test_an_unacked_pull_is_redelivered_to_the_next_pull_after_the_ack_timeout_then_fails() -> None:
    relay = RelayConfig(ack_timeout=10.0, backoff_initial=1.0, max_attempts=2)
    h = CoreHarness(relay)
    alice, bob = h.client("alice"), h.client("bob")
    a = h.connect(alice)
    r = rest_session(h, bob.token)
    send(h, a, bob.uuid, "m1")
    h.read(a)
    [first] = h.pull(r)
    assert first["attempt"] == 1
    advance_to(h, T0 + 11.0 - EPS)  # ack timeout, then a backoff of 1
    assert h.pull(r) == []
    advance_to(h, T0 + 11.0)
    [again] = h.pull(r)
    assert (again["msgid"], again["attempt"], again["redelivered"]) == ("m1", 2, True)
    advance_to(h, T0 + 21.0 - EPS)
    assert h.receipts(a) == []
    advance_to(h, T0 + 21.0)
    [update] = of_type(h.read(a), "delivery_update")
    assert (update["status"], update["reason"]) == ("failed", "not_acknowledged")
    assert h.core.acknowledge(r, "m1", h.now) is False


def test_a_rest_session_ends_its_idle_timeout_after_its_last_pull_and_its_unacked_wait() -> None:
    relay = RelayConfig(pull_idle_timeout=60.0, ack_timeout=1000.0)
    h = CoreHarness(relay)
    alice, bob = h.client("alice"), h.client("bob")
    a = h.connect(alice)
    r = rest_session(h, bob.token)
    advance_to(h, T0 + 5.0)
    send(h, a, bob.uuid, "m1")
    [m1] = h.pull(r)
    assert m1["attempt"] == 1
    advance_to(h, T0 + 65.0 - EPS)
    assert closed_code(h, r) is None
    advance_to(h, T0 + 65.0)
    assert h.sessions[r].closed == (CloseCode.NORMAL, "idle")
    assert h.sessions[r].gone
    assert not h.core.online(bob.uuid)
    # What it had not had acknowledged waits in the store, a redelivery for the next session.
    [row] = h.stored("msgid = 'm1'")
    assert (row["status"], row["attempts"]) == (None, 1)  # queued, one attempt made
    b = h.connect(bob)
    [again] = h.messages(b)
    assert (again["msgid"], again["attempt"], again["redelivered"]) == ("m1", 2, True)


def test_a_pull_that_waits_keeps_its_session_alive_and_the_idle_time_counts_from_its_end() -> None:
    h = CoreHarness(RelayConfig(pull_idle_timeout=60.0))
    bob = h.client("bob")
    r = rest_session(h, bob.token)
    h.core.pull(r, 10, h.now)
    advance_to(h, T0 + 100.0)
    assert closed_code(h, r) is None
    h.core.pull_done(r, h.now)
    advance_to(h, T0 + 160.0 - EPS)
    assert closed_code(h, r) is None
    advance_to(h, T0 + 160.0)
    assert closed_code(h, r) == CloseCode.NORMAL


def test_a_socket_takes_over_a_rest_session_and_gets_what_it_held_as_a_4009_replacement_does() -> (
    None
):
    h = CoreHarness()
    alice, bob = h.client("alice"), h.client("bob")
    a = h.connect(alice)
    r = rest_session(h, bob.token)
    send(h, a, bob.uuid, "m1")
    send(h, a, bob.uuid, "m2")
    [m1] = h.pull(r, limit=1)
    assert m1["msgid"] == "m1"
    b = h.connect(bob)
    assert closed_code(h, r) == CloseCode.REPLACED
    got = h.messages(b)
    assert [(m["msgid"], m["attempt"], m["redelivered"]) for m in got] == [
        ("m1", 2, True),
        ("m2", 1, False),
    ]
    assert h.core.acknowledge(r, "m1", h.now) is False  # the REST session holds nothing now
    h.send(b, {"type": "ack", "msgid": "m1"})
    assert ("delivery_update", "m1", "acknowledged") in h.receipts(a)


def test_a_rest_session_never_replaces_a_live_socket() -> None:
    h = CoreHarness()
    alice, bob = h.client("alice"), h.client("bob")
    a = h.connect(alice)
    b = h.connect(bob)
    r = h.open(token=bob.token, rest=True)
    [error] = of_type(h.read(r), "error")
    assert error["error"]["code"] == "client_connected"
    assert h.sessions[r].closed == (CloseCode.REPLACED, "client_connected")
    assert closed_code(h, b) is None
    send(h, a, bob.uuid, "m1")
    assert [m["msgid"] for m in h.messages(b)] == ["m1"]


def test_a_rest_session_is_told_no_receipts_nor_key_changes_they_stay_owed_for_its_socket() -> None:
    h = CoreHarness()
    alice, bob = h.client("alice"), h.client("bob")
    b = h.connect(bob)
    send(h, b, alice.uuid, "m1")  # alice offline: queued
    send(h, b, alice.uuid, "m2")
    assert h.receipts(b) == [
        ("delivery_status", "m1", "queued_offline"),
        ("delivery_status", "m2", "queued_offline"),
    ]
    h.disconnect(b)
    a = h.connect(alice)
    m1, m2 = h.messages(a)
    h.send(a, {"type": "ack", "msgid": m1["msgid"]})  # owed before bob's REST session opens
    r = rest_session(h, bob.token)
    h.send(a, {"type": "ack", "msgid": m2["msgid"]})  # and while it holds bob
    assert h.read(r) == []  # neither receipt is the REST session's
    rows = h.stored()
    assert [(x["msgid"], x["status"], x["receipt_pending"]) for x in rows] == [
        ("m1", "acknowledged", 1),
        ("m2", "acknowledged", 1),
    ]
    b2 = h.connect(bob)
    assert closed_code(h, r) == CloseCode.REPLACED
    assert h.receipts(b2) == [
        ("delivery_update", "m1", "acknowledged"),
        ("delivery_update", "m2", "acknowledged"),
    ]


def test_cluster_a_socket_on_another_node_takes_over_a_rest_session_and_gets_its_redelivery() -> (
    None
):
    bus = Bus()
    node_a, node_b = CoreHarness(bus=bus), CoreHarness(bus=bus)
    alice, bob = node_a.client("alice"), node_a.client("bob")
    a = node_a.connect(alice)
    r = rest_session(node_a, bob.token)
    send(node_a, a, bob.uuid, "m1")
    [m1] = node_a.pull(r)
    assert m1["attempt"] == 1
    b = node_b.connect(bob)
    assert closed_code(node_a, r) == CloseCode.REPLACED
    [again] = node_b.messages(b)
    assert (again["msgid"], again["attempt"], again["redelivered"]) == ("m1", 2, True)
