"""Presence and typing in the sans-I/O core (rule 12 of relayd/_relay/core.py), through the
fake link of tests/relay_harness.py, in virtual time: presence events reach a topic's other
live sockets coalesced to one frame per session, topic and ``topics.presence_interval``, the
latest per client, bounded by ``topics.max_presence_events``; a replaced socket is not
offline; typing goes to live sockets only, at most once, rate-limited; both across nodes."""

from __future__ import annotations

from typing import Any

from relayd._config import TopicsConfig

from .relay_harness import T0, Bus, Client, CoreHarness
from .test_relay_topics import errors, make_topic, of_type

Frame = dict[str, Any]


def presence(frames: list[Frame]) -> list[tuple[str, list[tuple[str, str]], bool]]:
    return [
        (f["topic"], [(e["client"], e["event"]) for e in f["events"]], f["truncated"])
        for f in of_type(frames, "presence")
    ]


def harness(**topics: Any) -> CoreHarness:
    return CoreHarness(topics=TopicsConfig(**topics))


def test_coming_online_is_told_once_per_interval_to_the_topics_other_sockets() -> None:
    h = harness(presence_interval=2.0)
    alice, bob, carol = h.client("alice"), h.client("bob"), h.client("carol")
    make_topic(h, "room", alice, alice, bob, carol, presence=True)
    a, b = h.connect(alice), h.connect(bob)
    h.advance(2.0)
    h.read(a)
    h.read(b)
    start = h.now
    c = h.connect(carol)
    h.advance(1.999)
    assert presence(h.read(a)) == []
    h.advance(0.001)
    assert h.now == start + 2.0
    assert presence(h.read(a)) == [("room", [(carol.uuid, "online")], False)]
    assert presence(h.read(b)) == [("room", [(carol.uuid, "online")], False)]
    assert presence(h.read(c)) == []  # its own coming online is not told to itself
    h.disconnect(c)
    h.advance(2.0)
    assert presence(h.read(a)) == [("room", [(carol.uuid, "offline")], False)]


def test_events_within_one_interval_collapse_to_the_latest_per_client() -> None:
    h = harness(presence_interval=1.0)
    alice, bob = h.client("alice"), h.client("bob")
    make_topic(h, "room", alice, alice, bob, presence=True)
    a = h.connect(alice)
    h.advance(1.0)
    h.read(a)
    b = h.connect(bob)
    h.disconnect(b)
    h.connect(bob)
    h.advance(1.0)
    assert presence(h.read(a)) == [("room", [(bob.uuid, "online")], False)]


def test_a_reconnect_storm_costs_each_socket_one_bounded_frame_per_interval() -> None:
    h = harness(presence_interval=1.0, max_presence_events=10)
    alice = h.client("alice")
    crowd = [h.client(f"c{i}") for i in range(40)]
    make_topic(h, "room", alice, alice, *crowd, presence=True)
    a = h.connect(alice)
    sids = [h.connect(c) for c in crowd]
    h.advance(1.0)
    for sid in (a, *sids):
        h.read(sid)
    for sid in sids:
        h.disconnect(sid)
    sids = [h.connect(c) for c in crowd]
    h.advance(1.0)
    [(topic, events, truncated)] = presence(h.read(a))
    assert (topic, len(events), truncated) == ("room", 10, True)
    assert {event for _, event in events} == {"online"}
    # Every socket that came back early hears the later ones: one frame, at most ten events;
    # the last one back heard nobody come after it.
    frames = [of_type(h.read(sid), "presence") for sid in sids]
    assert [len(f[0]["events"]) if f else 0 for f in frames] == [10] * 30 + list(range(9, -1, -1))
    assert max(len(f) for f in frames) == 1
    h.advance(5.0)
    assert presence(h.read(a)) == []


def test_a_replaced_socket_is_not_offline() -> None:
    h = harness()
    alice, bob = h.client("alice"), h.client("bob")
    make_topic(h, "room", alice, alice, bob, presence=True)
    a = h.connect(alice)
    h.connect(bob)
    h.advance(1.0)
    h.read(a)
    h.connect(bob)  # a newer socket replaces the first (4009)
    h.advance(1.0)
    assert (bob.uuid, "offline") not in [e for _, events, _ in presence(h.read(a)) for e in events]


def test_no_presence_where_the_topic_keeps_none() -> None:
    h = harness()
    alice, bob = h.client("alice"), h.client("bob")
    make_topic(h, "room", alice, alice, bob)
    a = h.connect(alice)
    h.connect(bob)
    h.advance(5.0)
    assert presence(h.read(a)) == []


def test_joining_and_leaving_are_told_and_the_session_learns_its_topics() -> None:
    h = harness()
    alice, bob = h.client("alice"), h.client("bob")
    make_topic(h, "room", alice, alice, presence=True)
    a, b = h.connect(alice), h.connect(bob)
    h.send(b, {"type": "typing", "topic_id": "room"})
    assert errors(h.read(b)) == ["NOT_SUBSCRIBED_TO_TOPIC"]
    h.core.membership_changed("room", bob.uuid, joined=True, presence=True, now=h.now)
    h.run()
    h.advance(1.0)
    assert presence(h.read(a)) == [("room", [(bob.uuid, "joined")], False)]
    h.send(b, {"type": "typing", "topic_id": "room"})
    assert [(f["from"], f["topic"]) for f in of_type(h.read(a), "typing")] == [(bob.uuid, "room")]
    h.core.membership_changed("room", bob.uuid, joined=False, presence=True, now=h.now)
    h.run()
    h.advance(1.0)
    assert presence(h.read(a)) == [("room", [(bob.uuid, "left")], False)]


def test_typing_to_a_client_goes_once_and_too_frequent_ones_are_dropped() -> None:
    h = harness(typing_interval=2.0)
    alice, bob = h.client("alice"), h.client("bob")
    a, b = h.connect(alice), h.connect(bob)
    h.send(a, {"type": "typing", "to": bob.uuid})
    h.send(a, {"type": "typing", "to": bob.uuid, "state": "stopped"})  # within 2 s: dropped
    assert [(f["from"], f["state"]) for f in of_type(h.read(b), "typing")] == [
        (alice.uuid, "typing")
    ]
    h.advance(2.0)
    h.send(a, {"type": "typing", "to": bob.uuid, "state": "stopped"})
    [frame] = of_type(h.read(b), "typing")
    assert frame["state"] == "stopped"
    assert "topic" not in frame
    assert h.now == T0 + 2.0
    assert h.core.metrics.events["typing_dropped"] == 1
    # Never stored: an offline reader gets nothing, now or later.
    carol = h.client("carol")
    h.send(a, {"type": "typing", "to": carol.uuid})
    c = h.connect(carol)
    assert of_type(h.read(c), "typing") == []
    assert h.db.execute("SELECT count(*) FROM deliveries").fetchone()[0] == 0


def test_typing_in_a_topic_reaches_its_other_live_members_only() -> None:
    h = harness()
    alice, bob, carol = h.client("alice"), h.client("bob"), h.client("carol")
    make_topic(h, "room", alice, alice, bob)
    a, b, c = h.connect(alice), h.connect(bob), h.connect(carol)
    h.send(a, {"type": "typing", "topic_id": "room"})
    assert [f["topic"] for f in of_type(h.read(b), "typing")] == ["room"]
    assert of_type(h.read(a), "typing") == []
    assert of_type(h.read(c), "typing") == []


def test_malformed_typing_frames_are_refused_and_the_socket_stays_open() -> None:
    h = harness()
    alice, bob = h.client("alice"), h.client("bob")
    a = h.connect(alice)
    h.send(a, {"type": "typing"})
    h.send(a, {"type": "typing", "to": bob.uuid, "topic_id": "room"})
    h.send(a, {"type": "typing", "to": "not-a-uuid"})
    h.send(a, {"type": "typing", "to": 5})
    h.send(a, {"type": "typing", "to": bob.uuid, "state": "dancing"})
    h.send(a, {"type": "typing", "topic_id": "bad/id"})
    assert errors(h.read(a)) == ["INVALID_MESSAGE_FORMAT"] * 6
    assert h.sessions[a].closed is None


def test_presence_and_typing_cross_nodes() -> None:
    bus = Bus()
    one, two = CoreHarness(bus=bus), CoreHarness(bus=bus)
    alice, bob = one.client("alice"), one.client("bob")
    make_topic(one, "room", alice, alice, bob, presence=True)
    a = one.connect(alice)
    one.advance(1.0)
    one.read(a)
    b = two.connect(bob)
    one.advance(1.0)
    assert presence(one.read(a)) == [("room", [(bob.uuid, "online")], False)]
    two.send(b, {"type": "typing", "topic_id": "room"})
    assert [f["from"] for f in of_type(one.read(a), "typing")] == [bob.uuid]


def test_a_client_here_is_not_offline_when_its_session_moved_to_another_node() -> None:
    bus = Bus()
    one, two = CoreHarness(bus=bus), CoreHarness(bus=bus)
    alice, bob = one.client("alice"), one.client("bob")
    make_topic(one, "room", alice, alice, bob, presence=True)
    a = one.connect(alice)
    one.connect(bob)
    one.advance(1.0)
    one.read(a)
    two.connect(bob)  # bob's claim moves to node two: node one closes its socket (4009)
    one.advance(1.0)
    events = [e for _, found, _ in presence(one.read(a)) for e in found]
    assert (bob.uuid, "offline") not in events
    assert (bob.uuid, "online") in events


def test_a_client_with_no_topics_costs_nothing(monkeypatch: Any) -> None:
    h = harness()
    alone: Client = h.client("alone")
    s = h.connect(alone)
    h.advance(5.0)
    assert presence(h.read(s)) == []
    assert h.core.presence.members == {}


def test_last_seen_is_recorded_when_a_socket_connects_and_when_the_last_one_closes() -> None:
    h = harness()
    alice = h.client("alice")
    first = h.connect(alice)
    h.advance(5.0)
    h.connect(alice)  # replaces the first: not a disconnection
    h.advance(5.0)
    h.disconnect(first)
    assert h.seen == [(alice.uuid, T0), (alice.uuid, T0 + 5.0)]
    h.advance(5.0)
    h.disconnect(h.core.sessions.active[alice.uuid].sid)
    assert h.seen[-1] == (alice.uuid, T0 + 15.0)
