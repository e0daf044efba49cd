"""The relay core in cluster mode, sans I/O: several cores (nodes) sharing one store, linked
by the harness's :class:`Bus` as relayd/_cluster.py links them through Redis.

What must hold across nodes (issue 12): a message from a client on one node to a client on
another arrives with the same receipts, acks and redelivery as on one node; one session per
client across nodes, the older one closed 4009 and what it had not had acknowledged
redelivered by the newer; ordering per sender across a move; a lost hint delays, never loses;
deduplication across nodes; the store's failure refuses messages with ``store_unavailable``.
The same behaviours run against real nodes and a real Redis in tests/test_cluster.py.
"""

from __future__ import annotations

import json

import pytest

from relayd._config import RelayConfig, WebsocketConfig
from relayd._relay.frames import CloseCode
from relayd._relay.model import IllegalMove, Message, Where, move
from relayd._relay.records import LoadQueue
from relayd._relay.seqs import SeqPool

from .relay_harness import Bus, CoreHarness


def two_nodes() -> tuple[Bus, CoreHarness, CoreHarness]:
    bus = Bus()
    return bus, CoreHarness(bus=bus), CoreHarness(bus=bus)


def contents(frames: list[dict[str, object]]) -> list[object]:
    return [f["content"] for f in frames]


def test_a_message_to_a_client_on_another_node_is_delivered_acked_and_its_receipt_told() -> None:
    _, node_a, node_b = two_nodes()
    alice, bob = node_a.client("alice"), node_a.client("bob")
    a = node_a.connect(alice)
    b = node_b.connect(bob)
    node_a.send(a, {"to": bob.uuid, "msgid": "m1", "acknowledge": True, "content": "hi"})
    [message] = node_b.messages(b)
    assert (message["content"], message["attempt"], message["redelivered"]) == ("hi", 1, False)
    # Node A does not know bob is on node B: its first receipt says the message is stored.
    assert node_a.receipts(a) == [("delivery_status", "m1", "queued_offline")]
    node_b.send(b, {"type": "ack", "msgid": "m1"})
    assert node_a.receipts(a) == [("delivery_update", "m1", "acknowledged")]
    [row] = node_a.stored()
    assert (row["status"], row["receipt_pending"]) == ("acknowledged", 0)


def test_a_lost_hint_delays_a_delivery_until_the_resync_never_loses_it() -> None:
    bus, node_a, node_b = two_nodes()
    alice, bob = node_a.client("alice"), node_a.client("bob")
    a, b = node_a.connect(alice), node_b.connect(bob)
    bus.hold = True
    node_a.send(a, {"to": bob.uuid, "msgid": "m1", "content": "late"})
    assert node_b.messages(b) == []
    bus.held.clear()  # the hint is lost (Redis dropped the subscriber)
    node_b.core.resync(node_b.now)  # the subscription is back: look in the store
    node_b.run()
    assert contents(node_b.messages(b)) == ["late"]
    assert node_a.receipts(a) == [("delivery_status", "m1", "queued_offline")]
    # Its receipt's hint is lost too: node A finds it when it resyncs.
    bus.hold = True
    node_b.flush()
    bus.held.clear()
    assert node_a.receipts(a) == []
    node_a.core.resync(node_a.now)
    node_a.run()
    assert node_a.receipts(a) == [("delivery_update", "m1", "delivered")]


def test_a_newer_session_on_another_node_closes_the_older_4009_and_redelivers_its_unacked() -> None:
    _, node_a, node_b = two_nodes()
    alice, bob = node_a.client("alice"), node_a.client("bob")
    a, b1 = node_a.connect(alice), node_a.connect(bob)
    for i in range(2):
        node_a.send(a, {"to": bob.uuid, "msgid": f"m{i}", "acknowledge": True, "content": str(i)})
    assert contents(node_a.messages(b1)) == ["0", "1"]
    node_a.send(b1, {"type": "ack", "msgid": "m0"})
    b2 = node_b.connect(bob)
    assert node_a.sessions[b1].closed == (CloseCode.REPLACED, "replaced by a newer connection")
    assert node_a.sessions[b1].gone
    [again] = node_b.messages(b2)
    assert (again["msgid"], again["attempt"], again["redelivered"]) == ("m1", 2, True)
    node_b.send(b2, {"type": "ack", "msgid": "m1"})
    receipts = node_a.receipts(a)
    assert receipts[-1] == ("delivery_update", "m1", "acknowledged")
    assert [r["status"] for r in node_a.stored()] == ["acknowledged", "acknowledged"]


def test_an_older_claim_does_not_close_a_newer_session() -> None:
    _, node_a, node_b = two_nodes()
    bob = node_a.client("bob")
    b = node_b.connect(bob)
    [(_, epoch)] = [(n, e) for n, e in [node_b.bus.claims[bob.uuid]]]  # type: ignore[union-attr]
    node_b.core.replaced_elsewhere(bob.uuid, epoch - 1, node_b.now)
    node_b.run()
    assert node_b.sessions[b].closed is None


def test_a_sender_that_moves_between_nodes_keeps_its_order() -> None:
    """Each node hands out seqs from its own block; a client arriving on a node raises that
    node's floor to the store's counter, so what it sends there sorts after what it sent
    before, elsewhere."""
    _, node_a, node_b = two_nodes()
    alice, bob = node_a.client("alice"), node_a.client("bob")
    order = []
    for i, node in enumerate([node_a, node_b, node_a, node_b, node_a]):
        sid = node.connect(alice)
        node.send(sid, {"to": bob.uuid, "msgid": f"m{i}", "content": str(i)})
        order.append(str(i))
        node.disconnect(sid)
    b = node_b.connect(bob)
    assert contents(node_b.messages(b)) == order


def test_a_message_parked_below_the_recipient_s_cursor_still_arrives() -> None:
    """A session closed on one node parks its in-memory messages in the store with their
    old seqs, possibly below what the recipient's new node has loaded already."""
    bus, node_a, node_b = two_nodes()
    alice, bob, carol = node_a.client("alice"), node_a.client("bob"), node_a.client("carol")
    a, b1 = node_a.connect(alice), node_a.connect(bob)
    node_a.auto_flush = False  # bob's socket on node A writes nothing from here
    node_a.send(a, {"to": bob.uuid, "msgid": "early", "content": "early"})  # in memory only
    c = node_b.connect(carol)
    node_b.send(c, {"to": bob.uuid, "msgid": "later", "acknowledge": True, "content": "later"})
    [early, later] = [ref for _, ref in node_a.sessions[b1].outbox[-2:]]
    assert isinstance(early, Message)
    assert isinstance(later, Message)
    assert (early.msgid, later.msgid) == ("early", "later")
    assert early.seq < later.seq
    bus.hold = True  # the kick comes after node B has loaded bob's queue
    b2 = node_b.connect(bob)
    assert contents(node_b.messages(b2)) == ["later"]
    bus.release()  # node A parks "early" in the store, below node B's cursor
    assert node_a.sessions[b1].closed == (CloseCode.REPLACED, "replaced by a newer connection")
    assert contents(node_b.messages(b2)) == ["early"]


def test_a_retry_on_another_node_is_a_duplicate() -> None:
    _, node_a, node_b = two_nodes()
    alice, bob = node_a.client("alice"), node_a.client("bob")
    a = node_a.connect(alice)
    node_a.send(a, {"to": bob.uuid, "msgid": "once", "content": "x"})
    node_a.disconnect(a)
    a2 = node_b.connect(alice)
    node_b.send(a2, {"to": bob.uuid, "msgid": "once", "content": "x"})
    [status] = [f for f in node_b.read(a2) if f["type"] == "delivery_status"]
    assert (status["status"], status["duplicate"]) == ("queued", True)
    assert len(node_a.stored()) == 1


def test_while_the_store_fails_messages_are_refused_with_store_unavailable() -> None:
    h = CoreHarness()
    alice, bob = h.client("alice"), h.client("bob")
    a = h.connect(alice)
    h.core.store_failed()
    assert h.core.accepting  # read on, and refuse
    h.send(a, {"to": bob.uuid, "msgid": "m1", "content": "x"})
    [error] = [f for f in h.read(a) if f["type"] == "error"]
    assert error["error"]["code"] == "store_unavailable"
    assert error["error"]["details"] == {"msgid": "m1", "to": bob.uuid, "retry_after": 1.0}
    assert h.sessions[a].closed is None
    assert h.stored() == []
    h.core.store_recovered()
    h.send(a, {"to": bob.uuid, "msgid": "m1", "content": "x"})
    assert h.receipts(a) == [("delivery_status", "m1", "queued_offline")]


def test_a_node_that_lost_its_lease_closes_every_session_1013() -> None:
    _, node_a, _ = two_nodes()
    alice = node_a.client("alice")
    a = node_a.connect(alice)
    pending = node_a.open()
    node_a.core.fence(node_a.now)
    node_a.run()
    for sid in (a, pending):
        assert node_a.sessions[sid].closed == (
            CloseCode.TRY_AGAIN_LATER,
            "lost contact with the store",
        )
        [error] = [f for f in node_a.log[sid] if f["type"] == "error"]
        assert error["error"]["code"] == "store_unavailable"


def test_the_seq_pool_reserves_at_half_and_a_raised_floor_empties_it() -> None:
    pool = SeqPool.reserved(10)
    low = []
    assert pool.take() is None
    low.append(pool.low)
    pool.add(21, 10)
    assert [pool.take() for _ in range(5)] == [21, 22, 23, 24, 25]
    low.append(pool.low)
    assert pool.take() == 26
    low.append(pool.low)
    assert low == [True, False, True]
    assert not pool.raise_floor(20)
    assert pool.raise_floor(40)
    assert pool.take() is None
    pool.add(41, 10)
    assert pool.take() == 41
    assert SeqPool.endless(7).take() == 8


def test_an_empty_seq_pool_refuses_a_message_and_asks_for_more() -> None:
    bus = Bus()
    node = CoreHarness(bus=bus, seq_block=2)
    alice, bob = node.client("alice"), node.client("bob")
    a = node.connect(alice)
    # Hold back reservations: the node's pool runs dry.
    node.core._seqs.reserving = True
    node.core._seqs.next = node.core._seqs.end  # type: ignore[assignment]
    node.send(a, {"to": bob.uuid, "msgid": "m1", "content": "x"})
    [error] = [f for f in node.read(a) if f["type"] == "error"]
    assert error["error"]["code"] == "store_unavailable"
    accepting = [node.core.accepting]
    node.core.seqs_reserved(bus.reserve(2), 2)
    accepting.append(node.core.accepting)
    assert accepting == [False, True]
    node.send(a, {"to": bob.uuid, "msgid": "m1", "content": "x"})
    assert json.loads(json.dumps(node.receipts(a))) == [["delivery_status", "m1", "queued_offline"]]


def test_messages_parked_below_the_cursor_arrive_even_past_one_page() -> None:
    """The load that goes back for them stops at a page: the next one goes on from there,
    not from the cursor."""
    bus = Bus()
    relay = RelayConfig(mailbox_size=2)
    node_a, node_b = CoreHarness(relay, bus=bus), CoreHarness(relay, bus=bus)
    alice, bob, carol = node_a.client("alice"), node_a.client("bob"), node_a.client("carol")
    a, b1 = node_a.connect(alice), node_a.connect(bob)
    node_a.auto_flush = False
    for i in range(3):
        node_a.send(a, {"to": bob.uuid, "msgid": f"e{i}", "content": f"e{i}"})
    c = node_b.connect(carol)
    node_b.send(c, {"to": bob.uuid, "msgid": "later", "acknowledge": True, "content": "later"})
    bus.hold = True
    b2 = node_b.connect(bob)
    assert contents(node_b.messages(b2)) == ["later"]
    # A load of bob's queue is under way on node B when the hints for all three come.
    node_b.auto_store = False
    node_b.core.wake(bob.uuid, 10**6, node_b.now)
    node_b.run()
    assert any(isinstance(op, LoadQueue) for op in node_b.pending_store)
    bus.release()
    assert node_a.sessions[b1].gone
    node_b.auto_store = True
    node_b.run()
    assert contents(node_b.messages(b2)) == ["e0", "e1", "e2"]


def test_a_move_the_table_does_not_allow_is_refused() -> None:
    h = CoreHarness()
    alice, bob = h.client("alice"), h.client("bob")
    a = h.connect(alice)
    h.connect(bob)
    h.auto_flush = False
    h.send(a, {"to": bob.uuid, "msgid": "m1", "content": "x"})
    [(_, message)] = [e for e in h.sessions[2].outbox if isinstance(e[1], Message)]
    assert isinstance(message, Message)
    assert message.where is Where.SENT
    with pytest.raises(IllegalMove, match="SENT -> BACKOFF"):
        move(message, Where.BACKOFF)
    assert message.where is Where.SENT


def test_refusals_while_the_store_fails_are_not_the_client_s_strikes() -> None:
    """``store_unavailable`` is relayd's fault: however many messages a client sends during an
    outage, it is not closed for persistent refused frames (4029)."""
    h = CoreHarness(websocket=WebsocketConfig(max_strikes=2))
    alice, bob = h.client("alice"), h.client("bob")
    a = h.connect(alice)
    h.core.store_failed()
    for i in range(10):
        h.send(a, {"to": bob.uuid, "msgid": f"m{i}", "content": "x"})
    codes = [f["error"]["code"] for f in h.read(a) if f["type"] == "error"]
    assert codes == ["store_unavailable"] * 10
    assert h.sessions[a].closed is None


def test_what_a_kicked_session_leaves_in_the_store_is_announced_to_the_new_node() -> None:
    """A message committed after bob's new node loaded his queue, and routed to his old
    session (the kick had not come yet), is left in the store when that session closes: the
    new node hears of it then, not at its next resync."""
    bus, node_a, node_b = two_nodes()
    alice, bob = node_a.client("alice"), node_a.client("bob")
    a, b1 = node_a.connect(alice), node_a.connect(bob)
    node_a.auto_flush = False  # bob's old socket writes nothing more
    bus.hold = True
    b2 = node_b.connect(bob)  # claims bob and loads his (empty) queue; the kick waits
    node_a.send(a, {"to": bob.uuid, "msgid": "m1", "acknowledge": True, "content": "late"})
    assert node_a.sessions[b1].outbox  # node A still routes to bob's old session
    assert node_b.messages(b2) == []
    bus.release()  # the kick: node A closes the old session and parks m1
    assert node_a.sessions[b1].gone
    assert contents(node_b.messages(b2)) == ["late"]


def test_a_receipt_hinted_while_receipts_are_being_loaded_is_not_skipped() -> None:
    """Alice connects on node A (her owed receipts are being loaded) while bob acks on node B:
    the hint comes during the load, whose answer may not have the receipt."""
    _, node_a, node_b = two_nodes()
    alice, bob = node_a.client("alice"), node_a.client("bob")
    b = node_b.connect(bob)
    a = node_a.connect(alice)
    node_a.send(a, {"to": bob.uuid, "msgid": "m1", "acknowledge": True, "content": "x"})
    [message] = node_b.messages(b)
    node_a.disconnect(a)
    node_a.auto_store = False
    a2 = node_a.open(token=alice.token)  # her owed receipts are to be loaded
    node_a.flush(a2)
    ops, node_a.pending_store = node_a.pending_store, []
    results = node_a.execute(ops)  # the loads run now: nothing is owed yet
    node_b.send(b, {"type": "ack", "msgid": message["msgid"]})  # the receipt, and its hint
    node_a.core.store_done(ops, results, node_a.now)  # their answers come after the hint
    node_a.auto_store = True
    node_a.run()
    assert node_a.receipts(a2) == [("delivery_update", "m1", "acknowledged")]
