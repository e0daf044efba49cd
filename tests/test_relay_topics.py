"""Publishing to topics in the sans-I/O core (rule 11 of relayd/_relay/core.py), through the
fake link of tests/relay_harness.py: one store operation per publish, ``topic_sent`` to the
publisher, each subscriber's delivery on the direct-message path (online at once, offline when
it connects, acknowledged and redelivered on its own), no receipt per subscriber, and
``topic_update`` counts coalesced to one per ``topics.update_interval``, in virtual time."""

from __future__ import annotations

from typing import Any

import pytest

from relayd._config import RelayConfig, TopicsConfig
from relayd._relay.records import Publish
from relayd._sqlite import transaction
from relayd._store_topics import topic_address

from .relay_harness import T0, Bus, Client, CoreHarness

Frame = dict[str, Any]


def of_type(frames: list[Frame], kind: str) -> list[Frame]:
    return [f for f in frames if f["type"] == kind]


def errors(frames: list[Frame]) -> list[str]:
    return [f["error"]["code"] for f in of_type(frames, "error")]


def make_topic(
    h: CoreHarness,
    topic_id: str,
    owner: Client,
    *members: Client,
    publish: str = "members",
    presence: bool = False,
) -> None:
    """A topic in the harness's store, as the REST routes make one."""
    with transaction(h.db):
        h.db.execute(
            "INSERT INTO topics (id, creator, metadata, access, publish, presence,"
            " history_count, history_age, created_at, subscribers, last_offset)"
            " VALUES (?, ?, '{}', 'open', ?, ?, 100, 86400.0, ?, ?, 0)",
            (topic_id, owner.uuid, publish, int(presence), h.now, len(members)),
        )
        h.db.executemany(
            "INSERT INTO topic_members (topic, client, joined_at) VALUES (?, ?, ?)",
            [(topic_id, m.uuid, h.now) for m in members],
        )


def publish(h: CoreHarness, sid: int, content: str, topic: str = "room", **fields: Any) -> None:
    h.send(sid, {"topic_id": topic, "msgid": content, "content": content, **fields})


@pytest.fixture
def h() -> CoreHarness:
    return CoreHarness(RelayConfig(ack_timeout=10.0, max_attempts=3))


def test_a_publish_reaches_each_online_subscriber_once_and_answers_topic_sent(
    h: CoreHarness,
) -> None:
    alice, bob, carol = h.client("alice"), h.client("bob"), h.client("carol")
    make_topic(h, "room", alice, alice, bob, carol)
    a, b, c = h.connect(alice), h.connect(bob), h.connect(carol)
    publish(h, a, "hello", subject="s1")
    [sent] = h.read(a)
    assert sent["type"] == "topic_sent"
    assert (sent["topic_id"], sent["msgid"], sent["subscribers"], sent["offset"]) == (
        "room",
        "hello",
        2,
        1,
    )
    assert sent["message"] == "Message sent to 2 subscribers"
    for sid in (b, c):
        [got] = h.messages(sid)
        assert (got["topic_id"], got["from"], got["content"], got["subject"]) == (
            "room",
            alice.uuid,
            "hello",
            "s1",
        )
        assert (got["offset"], got["action"], got["acknowledge"]) == (1, "topic_message", False)
    # One store operation for the publish, whatever the number of subscribers.
    assert sum(isinstance(op, Publish) for op in h.executed) == 1
    publish(h, b, "second")
    assert h.read(b)[0]["offset"] == 2
    assert [m["content"] for m in h.messages(a)] == ["second"]
    assert [m["content"] for m in h.messages(c)] == ["second"]


def test_an_offline_subscriber_gets_what_was_published_when_it_connects(h: CoreHarness) -> None:
    alice, bob = h.client("alice"), h.client("bob")
    make_topic(h, "room", alice, bob)
    a = h.connect(alice)
    publish(h, a, "one")
    publish(h, a, "two")
    assert [f["subscribers"] for f in of_type(h.read(a), "topic_sent")] == [1, 1]
    b = h.connect(bob)
    assert [(m["content"], m["offset"]) for m in h.messages(b)] == [("one", 1), ("two", 2)]


def test_a_restarted_relay_still_delivers_a_topic_message(h: CoreHarness) -> None:
    alice, bob = h.client("alice"), h.client("bob")
    make_topic(h, "room", alice, bob)
    publish(h, h.connect(alice), "kept")
    again = h.restart()
    b = again.connect(bob)
    assert [m["content"] for m in again.messages(b)] == ["kept"]


def test_each_subscriber_acks_on_its_own_and_the_publisher_gets_no_receipt_per_subscriber(
    h: CoreHarness,
) -> None:
    alice, bob, carol = h.client("alice"), h.client("bob"), h.client("carol")
    make_topic(h, "room", alice, bob, carol)
    a, b, c = h.connect(alice), h.connect(bob), h.connect(carol)
    publish(h, a, "m1", acknowledge=True)
    [got_b] = h.messages(b)
    [got_c] = h.messages(c)
    assert got_b["acknowledge"]
    assert got_c["acknowledge"]
    h.send(b, {"type": "ack", "msgid": "m1"})
    # Carol does not ack: she alone gets it again, once the ack timeout (10 s) and the first
    # backoff (1 s) passed.
    h.advance(10.999)
    assert h.messages(c) == []
    h.advance(0.001)
    assert h.messages(b) == []
    [again] = h.messages(c)
    assert (again["msgid"], again["redelivered"], again["attempt"]) == ("m1", True, 2)
    h.send(c, {"type": "ack", "msgid": "m1"})
    frames = h.read(a)
    assert of_type(frames, "delivery_status") == []
    assert of_type(frames, "delivery_update") == []
    rows = h.stored("msgid = ?", "m1")
    assert sorted(r["status"] for r in rows) == ["acknowledged", "acknowledged"]
    assert {r["receipt_pending"] for r in rows} == {0}


def test_topic_updates_are_coalesced_to_one_per_interval_and_stop_when_none_is_pending() -> None:
    h = CoreHarness(RelayConfig(ack_timeout=30.0), topics=TopicsConfig(update_interval=2.0))
    alice = h.client("alice")
    subscribers = [h.client(f"s{i}") for i in range(5)]
    make_topic(h, "room", alice, *subscribers)
    a = h.connect(alice)
    sids = [h.connect(s) for s in subscribers]
    publish(h, a, "m1", acknowledge=True)
    h.read(a)  # topic_sent
    for sid in sids[:3]:
        h.messages(sid)
        h.send(sid, {"type": "ack", "msgid": "m1"})  # three acks within the first interval
    h.advance(1.999)
    assert of_type(h.read(a), "topic_update") == []
    h.advance(0.001)  # T0 + 2: one frame for the three acks
    [update] = of_type(h.read(a), "topic_update")
    assert h.now == T0 + 2.0
    assert update["topic"] == "room"
    assert "topic_id" not in update  # seed clients take a frame with topic_id for a message
    counts = {k: update[k] for k in ("subscribers", "acknowledged", "delivered", "pending")}
    assert counts == {"subscribers": 5, "acknowledged": 3, "delivered": 0, "pending": 2}
    h.advance(2.0)  # nothing changed: no frame
    assert of_type(h.read(a), "topic_update") == []
    for sid in sids[3:]:
        h.messages(sid)
        h.send(sid, {"type": "ack", "msgid": "m1"})
    h.advance(2.0)
    [last] = of_type(h.read(a), "topic_update")
    assert (last["acknowledged"], last["pending"]) == (5, 0)
    asked = len(h.counted)
    h.advance(10.0)  # none pending: the message is no longer watched
    assert len(h.counted) == asked
    assert of_type(h.read(a), "topic_update") == []


def test_no_topic_update_without_acknowledge_nor_once_the_publisher_left(h: CoreHarness) -> None:
    alice, bob = h.client("alice"), h.client("bob")
    make_topic(h, "room", alice, bob)
    a = h.connect(alice)
    publish(h, a, "quiet")  # no acknowledge: topic_sent only (the seed's clients never ask)
    h.advance(5.0)
    assert [f["type"] for f in h.read(a)] == ["topic_sent"]
    assert h.counted == []
    publish(h, a, "asked", acknowledge=True)
    h.disconnect(a)
    h.advance(5.0)
    assert h.counted == []  # its publisher is gone: nobody waits for its counts


def test_a_connection_watches_at_most_max_watched_messages() -> None:
    h = CoreHarness(topics=TopicsConfig(max_watched=2))
    alice, bob = h.client("alice"), h.client("bob")
    make_topic(h, "room", alice, bob)
    a = h.connect(alice)
    for n in range(4):
        publish(h, a, f"m{n}", acknowledge=True)
    h.advance(1.0)
    [asked] = h.counted
    assert len(asked) == 2  # the two newest
    updates = of_type(h.read(a), "topic_update")
    assert [u["msgid"] for u in updates] == ["m2", "m3"]


def test_refusals_are_error_frames_and_the_socket_stays_open(h: CoreHarness) -> None:
    alice, bob, carol = h.client("alice"), h.client("bob"), h.client("carol")
    make_topic(h, "room", alice, bob)
    make_topic(h, "news", alice, bob, publish="owner")
    b, c = h.connect(bob), h.connect(carol)
    publish(h, b, "x1", topic="nowhere")
    publish(h, c, "x2")  # carol is not subscribed
    publish(h, b, "x3", topic="news")  # only its owner publishes there
    h.send(b, {"topic_id": "bad/id", "content": "x"})
    h.send(b, {"topic_id": "room", "content": 5})
    h.send(b, {"topic_id": "room", "from": carol.uuid, "content": "x"})
    assert errors(h.read(b)) == [
        "TOPIC_NOT_FOUND",
        "not_permitted",
        "INVALID_TOPIC_MESSAGE",
        "INVALID_TOPIC_MESSAGE",
        "MESSAGE_SENDER_MISMATCH",
    ]
    assert errors(h.read(c)) == ["NOT_SUBSCRIBED_TO_TOPIC"]
    assert h.sessions[b].closed is None
    assert h.sessions[c].closed is None
    publish(h, b, "fine")
    assert of_type(h.read(b), "topic_sent")[0]["subscribers"] == 0  # bob is alone but alice


def test_a_malformed_publish_names_its_field(h: CoreHarness) -> None:
    alice = h.client("alice")
    a = h.connect(alice)
    h.send(a, {"topic_id": "room", "content": "x", "msgno": "seven"})
    [error] = of_type(h.read(a), "error")
    assert error["error"]["code"] == "INVALID_TOPIC_MESSAGE"
    assert error["error"]["details"]["field"] == "msgno"


def test_a_duplicate_publish_is_answered_and_delivered_once(h: CoreHarness) -> None:
    alice, bob = h.client("alice"), h.client("bob")
    make_topic(h, "room", alice, bob)
    a, b = h.connect(alice), h.connect(bob)
    publish(h, a, "once")
    publish(h, a, "once")
    first, again = of_type(h.read(a), "topic_sent")
    assert not first.get("duplicate")
    assert again["duplicate"] is True
    assert [m["content"] for m in h.messages(b)] == ["once"]


def test_a_client_whose_roles_do_not_grant_publish_is_refused() -> None:
    h = CoreHarness(permits=lambda client, permission: permission != "publish")
    alice, bob = h.client("alice"), h.client("bob")
    make_topic(h, "room", alice, alice, bob)
    a = h.connect(alice)
    publish(h, a, "nope")
    [error] = of_type(h.read(a), "error")
    assert error["error"]["code"] == "not_permitted"
    assert error["error"]["details"] == {"permission": "publish", "topic_id": "room"}
    assert not any(isinstance(op, Publish) for op in h.executed)


def test_an_admin_publishes_in_an_owner_only_topic() -> None:
    admins: set[str] = set()
    h = CoreHarness(permits=lambda client, permission: client in admins)
    alice, bob, root = h.client("alice"), h.client("bob"), h.client("root")
    admins.add(root.uuid)
    make_topic(h, "news", alice, bob, publish="owner")
    r, b = h.connect(root), h.connect(bob)
    publish(h, r, "notice", topic="news")
    assert of_type(h.read(r), "topic_sent")[0]["subscribers"] == 1
    assert [m["content"] for m in h.messages(b)] == ["notice"]


def test_the_message_is_sealed_for_its_topic_and_stored_once(h: CoreHarness) -> None:
    alice = h.client("alice")
    subscribers = [h.client(f"s{i}") for i in range(3)]
    make_topic(h, "room", alice, *subscribers)
    publish(h, h.connect(alice), "m")
    [row] = h.db.execute("SELECT address, topic, topic_offset FROM messages").fetchall()
    assert tuple(row) == (topic_address("room"), "room", 1)
    assert h.db.execute("SELECT count(*) FROM deliveries").fetchone()[0] == 3


def test_a_subscriber_on_another_node_is_woken() -> None:
    bus = Bus()
    one, two = CoreHarness(bus=bus), CoreHarness(bus=bus)
    alice, bob = one.client("alice"), one.client("bob")
    make_topic(one, "room", alice, bob)
    b = two.connect(bob)
    publish(one, one.connect(alice), "across")
    assert [m["content"] for m in two.messages(b)] == ["across"]


# --- broadcast ------------------------------------------------------------------------------


def admins_harness(**topics: Any) -> tuple[CoreHarness, set[str]]:
    admins: set[str] = set()
    h = CoreHarness(
        topics=TopicsConfig(**topics), permits=lambda client, permission: client in admins
    )
    return h, admins


def test_only_an_admin_broadcasts() -> None:
    h, _ = admins_harness()
    alice = h.client("alice")
    a = h.connect(alice)
    h.send(a, {"type": "broadcast", "content": "hi all"})
    assert errors(h.read(a)) == ["not_permitted"]
    assert h.sessions[a].closed is None


def test_a_broadcast_reaches_every_live_socket_once_and_is_not_stored() -> None:
    h, admins = admins_harness()
    root, bob, carol, dave = (h.client(n) for n in ("root", "bob", "carol", "dave"))
    admins.add(root.uuid)
    r, b, c = h.connect(root), h.connect(bob), h.connect(carol)
    h.send(r, {"type": "broadcast", "msgid": "b1", "content": "maintenance at noon"})
    [sent] = of_type(h.read(r), "broadcast_sent")
    assert (sent["msgid"], sent["durable"], sent["recipients"]) == ("b1", False, None)
    for sid in (b, c):
        [got] = of_type(h.read(sid), "broadcast")
        assert (got["from"], got["to"], got["content"]) == (root.uuid, "*", "maintenance at noon")
    assert of_type(h.read(r), "broadcast") == []
    d = h.connect(dave)  # offline when it was sent: it never gets it
    assert of_type(h.read(d), "broadcast") == []
    assert h.db.execute("SELECT count(*) FROM messages").fetchone()[0] == 0


def test_a_durable_broadcast_is_stored_for_everyone_and_delivered_when_they_connect() -> None:
    h, admins = admins_harness(broadcast_durable=True)
    root, bob, carol = h.client("root"), h.client("bob"), h.client("carol")
    admins.add(root.uuid)
    r, b = h.connect(root), h.connect(bob)
    h.send(r, {"type": "broadcast", "msgid": "b1", "content": "kept", "acknowledge": True})
    [sent] = of_type(h.read(r), "broadcast_sent")
    assert (sent["durable"], sent["recipients"]) == (True, 2)
    [got] = h.messages(b)
    assert (got["to"], got["content"], got["acknowledge"]) == ("*", "kept", True)
    assert "offset" not in got  # a broadcast is in no topic's history
    c = h.connect(carol)
    assert [m["content"] for m in h.messages(c)] == ["kept"]
    h.send(b, {"type": "ack", "msgid": "b1"})
    h.send(c, {"type": "ack", "msgid": "b1"})
    h.advance(1.0)
    [update] = of_type(h.read(r), "topic_update")
    assert (update["topic"], update["acknowledged"], update["pending"]) == ("*", 2, 0)
    h.send(r, {"type": "broadcast", "msgid": "b1", "content": "kept"})
    [again] = of_type(h.read(r), "broadcast_sent")
    assert again["duplicate"] is True


def test_a_broadcast_crosses_nodes() -> None:
    bus = Bus()
    admins: set[str] = set()
    one = CoreHarness(bus=bus, permits=lambda client, permission: client in admins)
    two = CoreHarness(bus=bus)
    root, bob = one.client("root"), one.client("bob")
    admins.add(root.uuid)
    b = two.connect(bob)
    one.send(one.connect(root), {"type": "broadcast", "content": "everywhere"})
    assert [f["content"] for f in of_type(two.read(b), "broadcast")] == ["everywhere"]


def test_a_message_published_while_its_counts_are_read_is_still_told() -> None:
    h = CoreHarness(RelayConfig(ack_timeout=30.0))
    alice, bob = h.client("alice"), h.client("bob")
    make_topic(h, "room", alice, bob)
    a, b = h.connect(alice), h.connect(bob)
    h.hold_counts = True
    publish(h, a, "m1", acknowledge=True)
    h.advance(1.0)  # m1's counts are asked for...
    publish(h, a, "m2", acknowledge=True)  # ...and m2 is published before they come
    for message in h.messages(b):
        h.send(b, {"type": "ack", "msgid": message["msgid"]})
    h.answer_counts()
    h.advance(1.0)
    h.answer_counts()
    updates = of_type(h.read(a), "topic_update")
    assert {(u["msgid"], u["pending"]) for u in updates if u["pending"] == 0} == {
        ("m1", 0),
        ("m2", 0),
    }


def test_the_subscribers_here_share_one_copy_of_a_topic_messages_content() -> None:
    h = CoreHarness(RelayConfig(ack_timeout=30.0))
    alice = h.client("alice")
    subscribers = [h.client(f"s{i}") for i in range(3)]
    make_topic(h, "room", alice, *subscribers)
    sids = [h.connect(s) for s in subscribers]
    big = {"topic_id": "room", "msgid": "big", "acknowledge": True, "content": "x" * 10_000}
    h.send(h.connect(alice), big)
    for sid in sids:
        assert [m["content"] for m in h.messages(sid)] == ["x" * 10_000]
    held = [h.core.delivery.recipients[s.uuid].unacked["big"] for s in subscribers]
    assert held[0].fields is held[1].fields
    assert held[1].fields is held[2].fields


def test_the_subscribers_here_are_handed_one_frame_of_a_first_delivery() -> None:
    h = CoreHarness()
    alice = h.client("alice")
    subscribers = [h.client(f"s{i}") for i in range(3)]
    make_topic(h, "room", alice, *subscribers)
    sids = [h.connect(s) for s in subscribers]
    a = h.connect(alice)
    h.auto_flush = False  # the frames stay in the sockets' queues
    h.send(a, {"topic_id": "room", "msgid": "big", "content": "x" * 10_000})
    frames = [h.sessions[sid].outbox[-1][0] for sid in sids]
    assert '"content":"' + "x" * 10_000 in frames[0]
    assert frames[0] is frames[1]
    assert frames[1] is frames[2]
