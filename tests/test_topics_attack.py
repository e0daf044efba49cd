"""Attacks on topics, presence, typing and broadcast (issue 13): a hostile or careless client,
or an unlucky interleaving of the driver's store reads, against the core's new state
(relayd/_relay/topics.py, relayd/_relay/presence.py) and the topic routes.

Each test states what relayd should do; those marked ``xfail(strict=True)`` show a defect
found by review, named with its cause. The sans-I/O ones use the fake link of
tests/relay_harness.py, holding back a store answer where the hub runs it in a task of its
own (``CountTopics``, ``LoadMemberships``) to model the store answering late; the others run
a real relayd on loopback.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

from relayd._config import RelayConfig, TopicsConfig
from relayd._sqlite import transaction
from relayd._store_topics import forget_topic

from .relay_harness import Client, CoreHarness
from .support import Engine
from .test_relay_presence import presence
from .test_relay_topics import errors, make_topic, of_type, publish
from .test_rest import assert_ok
from .topic_support import (
    PUBLISH_DEADLINE,
    create,
    register,
    start_topics,
    subscribed,
    token_of,
)
from .ws_support import WsClient, welcomed, ws_connect

Frame = dict[str, Any]


class Held:
    """Answers the harness would give the core at once, held back until :meth:`release`."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], None]] = []

    def release(self, h: CoreHarness) -> None:
        calls, self.calls = self.calls, []
        for call in calls:
            call()
        h.run()


def hold_memberships(h: CoreHarness) -> Held:
    """The store reads a socket's memberships when asked (as the hub's task does at once) but
    the answer reaches the core only at :meth:`Held.release`."""
    held = Held()
    real = h.core.memberships_loaded

    def later(sid: int, rows: list[tuple[str, bool]], now: float) -> None:
        held.calls.append(lambda: real(sid, rows, h.now))

    h.core.memberships_loaded = later  # type: ignore[method-assign]
    return held


def hold_counts(h: CoreHarness) -> Held:
    """As :func:`hold_memberships`, for the publisher's counts (``CountTopics``)."""
    held = Held()
    real = h.core.topics_counted

    def later(counts: Any, now: float) -> None:
        held.calls.append(lambda: real(counts, h.now))

    h.core.topics_counted = later  # type: ignore[method-assign]
    return held


def add_member(h: CoreHarness, topic: str, client: Client, *, presence: bool = False) -> None:
    """What ``PUT /topics/{id}/members/{uuid}`` does: the store, then the relay told."""
    with transaction(h.db):
        h.db.execute(
            "INSERT INTO topic_members (topic, client, joined_at) VALUES (?, ?, ?)",
            (topic, client.uuid, h.now),
        )
    h.core.membership_changed(topic, client.uuid, joined=True, presence=presence, now=h.now)
    h.run()


def remove_member(h: CoreHarness, topic: str, client: Client, *, presence: bool = False) -> None:
    """What ``DELETE /topics/{id}/members/{uuid}`` does: the store, then the relay told."""
    with transaction(h.db):
        h.db.execute(
            "DELETE FROM topic_members WHERE topic = ? AND client = ?", (topic, client.uuid)
        )
    h.core.membership_changed(topic, client.uuid, joined=False, presence=presence, now=h.now)
    h.run()


def typing_from(frames: list[Frame]) -> list[tuple[str, str | None]]:
    return [(f["from"], f.get("topic")) for f in of_type(frames, "typing")]


# --- the publisher's counts ---------------------------------------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="relayd/_relay/topics.py:343-344 (Topics.counted): every watch not in the counts "
    "just read is dropped as 'gone from the store', including one taken after the "
    "CountTopics was asked for (its counts were never asked); its publisher never hears "
    "of it again",
)
def test_a_message_published_while_counts_are_read_still_gets_its_topic_updates() -> None:
    h = CoreHarness(RelayConfig(ack_timeout=30.0), topics=TopicsConfig(update_interval=1.0))
    alice, bob = h.client("alice"), h.client("bob")
    make_topic(h, "room", alice, bob)
    a, b = h.connect(alice), h.connect(bob)
    held = hold_counts(h)
    publish(h, a, "m1", acknowledge=True)
    h.advance(1.0)  # the counts of m1 are asked for; the store answers late
    assert len(h.counted) == 1
    publish(h, a, "m2", acknowledge=True)  # watched while the counts of m1 are read
    held.release(h)
    h.read(a)
    for message in h.messages(b):
        h.send(b, {"type": "ack", "msgid": message["msgid"]})
    h.advance(1.0)
    held.release(h)
    updates = {u["msgid"]: u["pending"] for u in of_type(h.read(a), "topic_update")}
    assert updates == {"m1": 0, "m2": 0}


# --- memberships loaded while they change -------------------------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="relayd/_relay/presence.py:130-136 (membership_changed) drops a change for a "
    "session whose memberships are still loading (mine is None), and loaded() then applies "
    "the rows read before the change: the socket never learns the topic it joined",
)
def test_a_topic_joined_while_the_socket_loads_its_topics_is_learned() -> None:
    h = CoreHarness(topics=TopicsConfig())
    alice, bob = h.client("alice"), h.client("bob")
    make_topic(h, "room", alice, alice)
    a = h.connect(alice)
    held = hold_memberships(h)
    b = h.connect(bob)  # its topics are read now (none), and answered late
    add_member(h, "room", bob)
    held.release(h)
    h.send(b, {"type": "typing", "topic_id": "room"})
    assert errors(h.read(b)) == []
    assert typing_from(h.read(a)) == [(bob.uuid, "room")]


@pytest.mark.xfail(
    strict=True,
    reason="relayd/_relay/presence.py:130-136 and :87-91: a removal while the socket's "
    "memberships load is dropped, and the stale rows make the removed client a member of "
    "the (private) topic for the socket's life: it still types into it and hears its "
    "members type",
)
def test_a_member_removed_while_its_socket_loads_its_topics_is_out() -> None:
    h = CoreHarness(topics=TopicsConfig())
    alice, bob = h.client("alice"), h.client("bob")
    make_topic(h, "room", alice, alice, bob)
    a = h.connect(alice)
    held = hold_memberships(h)
    b = h.connect(bob)  # its topics are read now (room), and answered late
    remove_member(h, "room", bob)  # its owner removes it
    held.release(h)
    h.send(a, {"type": "typing", "topic_id": "room"})
    assert typing_from(h.read(b)) == []
    h.send(b, {"type": "typing", "topic_id": "room"})
    assert errors(h.read(b)) == ["NOT_SUBSCRIBED_TO_TOPIC"]
    assert typing_from(h.read(a)) == []


@pytest.mark.xfail(
    strict=True,
    reason="relayd/_relay/presence.py:112-114 (Presence.disconnected) returns before the "
    "'offline' event when the closing socket's memberships had not loaded yet; the socket it "
    "replaced was told 'online' and was not offline (it was replaced), so the client stays "
    "online to its topics for good",
)
def test_a_client_whose_last_socket_closes_before_its_topics_load_goes_offline() -> None:
    h = CoreHarness(topics=TopicsConfig(presence_interval=1.0))
    alice, bob = h.client("alice"), h.client("bob")
    make_topic(h, "room", alice, alice, bob, presence=True)
    a = h.connect(alice)
    h.connect(bob)
    h.advance(1.0)
    assert presence(h.read(a)) == [("room", [(bob.uuid, "online")], False)]
    held = hold_memberships(h)
    second = h.connect(bob)  # replaces the first: not offline
    h.disconnect(second)  # its last socket closes before its topics loaded
    held.release(h)
    h.advance(1.0)
    assert presence(h.read(a)) == [("room", [(bob.uuid, "offline")], False)]
    assert not h.core.online(bob.uuid)


# --- topics changed under live sockets ----------------------------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="relayd/_http_topics.py:404-412 (DELETE /topics/{id}) never tells the relay, so "
    "live sockets keep the deleted topic in Presence.of/members (presence.py:64-65); when "
    "its id is taken again by a private topic, a former member types into it and hears "
    "its members type",
)
def test_a_deleted_topic_s_members_are_not_members_of_a_new_topic_with_its_id() -> None:
    h = CoreHarness(topics=TopicsConfig())
    alice, bob, carol = h.client("alice"), h.client("bob"), h.client("carol")
    make_topic(h, "room", alice, alice, bob)
    b = h.connect(bob)
    with transaction(h.db):  # DELETE /topics/room by its owner: the store only
        forget_topic(h.db, "room")
    make_topic(h, "room", carol, carol)  # carol's own room, with carol alone in it
    with transaction(h.db):
        h.db.execute("UPDATE topics SET access = 'private' WHERE id = 'room'")
    c = h.connect(carol)
    h.send(c, {"type": "typing", "topic_id": "room"})
    assert typing_from(h.read(b)) == []
    h.send(b, {"type": "typing", "topic_id": "room"})
    assert errors(h.read(b)) == ["NOT_SUBSCRIBED_TO_TOPIC"]
    assert typing_from(h.read(c)) == []


@pytest.mark.xfail(
    strict=True,
    reason="relayd/_http_topics.py:393-402 (PATCH /topics/{id}) never tells the relay, and "
    "Presence.event (presence.py:153) reads the presence setting each live socket loaded "
    "when it connected: an owner who turns presence off still has its members' comings "
    "and goings told to the connected ones",
)
def test_presence_turned_off_stops_presence_frames_to_connected_subscribers() -> None:
    h = CoreHarness(topics=TopicsConfig(presence_interval=1.0))
    alice, bob = h.client("alice"), h.client("bob")
    make_topic(h, "room", alice, alice, bob, presence=True)
    a, b = h.connect(alice), h.connect(bob)
    h.advance(1.0)
    h.read(a)
    with transaction(h.db):  # PATCH /topics/room {"presence": false} by its owner
        h.db.execute("UPDATE topics SET presence = 0 WHERE id = 'room'")
    h.disconnect(b)
    h.advance(1.0)
    assert presence(h.read(a)) == []


# --- typing ---------------------------------------------------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="relayd/_relay/presence.py:240-245 (_remember_typing): past 10,000 entries it "
    "keeps every entry younger than typing_interval, so one client typing to many clients "
    "within an interval grows the table without bound (and rebuilds it on every frame); "
    "typing counts against no per-sender rate",
)
def test_typing_to_many_clients_keeps_the_typing_table_bounded() -> None:
    h = CoreHarness(topics=TopicsConfig(typing_interval=1.0))
    mallory = h.client("mallory")
    m = h.connect(mallory)
    for n in range(10_100):
        target = f"00000000-0000-4000-8000-{n:012d}"
        h.core.receive(m, json.dumps({"type": "typing", "to": target}), h.now)
    h.run()
    assert len(h.core.presence._last_typing) <= 10_000


@pytest.mark.xfail(
    strict=True,
    reason="relayd/_relay/presence.py:224-229 raises NOT_SUBSCRIBED_TO_TOPIC for typing with "
    "the default strike=True, so each counts towards websocket.max_strikes and the socket is "
    "closed 4029, where docs/protocol.md (Error frames) says 'open (no strike)'",
)
def test_typing_in_a_topic_one_is_not_in_is_refused_without_a_strike() -> None:
    h = CoreHarness(topics=TopicsConfig(typing_interval=0.0))
    alice, bob = h.client("alice"), h.client("bob")
    make_topic(h, "room", alice, alice)
    b = h.connect(bob)
    for _ in range(h.ws.max_strikes + 5):
        h.send(b, {"type": "typing", "topic_id": "room"})
    assert set(errors(h.read(b))) == {"NOT_SUBSCRIBED_TO_TOPIC"}
    assert h.sessions[b].closed is None


# --- floods -------------------------------------------------------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="relayd/_relay/presence.py:172-179 (Presence.flush) queues one frame per topic "
    "for a session in one synchronous loop, with no regard for its outbound buffer: a "
    "client in more presence topics than websocket.outbound_buffer (256; a client may be "
    "in topics.max_subscriptions = 1000) is closed 4008 by sessions.py:79-83 the first "
    "time one co-member comes online, though it reads everything",
)
def test_one_client_coming_online_does_not_close_a_reader_in_many_of_its_topics() -> None:
    h = CoreHarness(topics=TopicsConfig(presence_interval=1.0))
    victim, mallory = h.client("victim"), h.client("mallory")
    rooms = [f"room-{n}" for n in range(300)]
    for room in rooms:
        make_topic(h, room, mallory, victim, mallory, presence=True)
    v = h.connect(victim)
    h.advance(1.0)
    h.read(v)
    h.connect(mallory)  # one socket authenticating, once
    h.advance(1.0)
    assert h.sessions[v].closed is None
    frames = presence(h.read(v))
    assert len(frames) == len(rooms)


# --- end to end ---------------------------------------------------------------------------------


async def next_presence(socket: WsClient) -> list[tuple[str, str]]:
    frame = await socket.next_of("presence")
    return [(e["client"], e["event"]) for e in frame["events"]]


async def assert_next_is_pong(socket: WsClient) -> None:
    """Whatever relayd queued for ``socket`` before now comes before the pong."""
    await socket.send({"type": "ping"})
    frame = await socket.next()
    assert frame["type"] == "pong", frame


@pytest.mark.xfail(
    strict=True,
    reason="relayd/_http_topics.py:404-412 (DELETE /topics/{id}) never tells the relay: a "
    "member's live socket keeps the deleted topic (presence.py:64-65), so when the id is "
    "taken again by a private topic it hears that topic's presence and typing",
)
async def test_a_deleted_topic_s_live_members_hear_nothing_of_a_private_topic_with_its_id(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start_topics(nursery, tmp_path, engine, {"topics": {"presence_interval": 0.05}})
    http = relayd.http
    alice, bob, carol, dave = await register(http, "alice", "bob", "carol", "dave")
    await create(http, token_of(alice), "room", presence=True)
    for client in (alice, bob):
        await subscribed(http, token_of(client), "room")
    async with ws_connect(relayd, token_of(alice)) as a, ws_connect(relayd, token_of(bob)) as b:
        await welcomed(a)
        await welcomed(b)
        with trio.fail_after(PUBLISH_DEADLINE):
            while (bob["uuid"], "online") not in await next_presence(a):
                pass  # both sockets hold their topics now
        assert_ok(await http.request("DELETE", "/topics/room", token=token_of(alice)))
        # Carol's own private room, with the same id; dave is its other member.
        await create(http, token_of(carol), "room", access="private", presence=True)
        await subscribed(http, token_of(carol), "room")
        added = await http.request(
            "PUT", f"/topics/room/members/{dave['uuid']}", token=token_of(carol)
        )
        assert_ok(added)
        async with ws_connect(relayd, token_of(dave)) as d:
            await welcomed(d)
            async with ws_connect(relayd, token_of(carol)) as c:
                await welcomed(c)
                with trio.fail_after(PUBLISH_DEADLINE):
                    while (carol["uuid"], "online") not in await next_presence(d):
                        pass
                await assert_next_is_pong(b)  # bob was not told carol came online
                await c.send({"type": "typing", "topic_id": "room"})
                assert (await d.next_of("typing"))["from"] == carol["uuid"]
                await assert_next_is_pong(b)  # nor that she types


@pytest.mark.xfail(
    strict=True,
    reason="relayd/_relay/presence.py:172-179 (Presence.flush) queues a reader's frames of "
    "every topic at once, past websocket.outbound_buffer, and sessions.py:79-83 closes it "
    "4008: a client that shares more presence topics than its buffer's frames with another "
    "is cut off whenever that one comes online",
)
async def test_a_reader_in_more_presence_topics_than_its_buffer_survives_a_co_member_arriving(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    rooms = [f"room-{n}" for n in range(20)]
    relayd = await start_topics(
        nursery,
        tmp_path,
        engine,
        {"topics": {"presence_interval": 0.05}, "websocket": {"outbound_buffer": 16}},
    )
    http = relayd.http
    reader, helper, mallory = await register(http, "reader", "helper", "mallory")
    await create(http, token_of(helper), "sentinel", presence=True)
    for client in (reader, helper):
        await subscribed(http, token_of(client), "sentinel")
    for room in rooms:
        await create(http, token_of(mallory), room, presence=True)
        for client in (reader, mallory):
            await subscribed(http, token_of(client), room)
    async with ws_connect(relayd, token_of(reader)) as r:
        await welcomed(r)
        async with ws_connect(relayd, token_of(helper)) as h:
            await welcomed(h)
            with trio.fail_after(PUBLISH_DEADLINE):
                while (helper["uuid"], "online") not in await next_presence(r):
                    pass  # the reader's socket holds its topics now
            async with ws_connect(relayd, token_of(mallory)) as m:
                await welcomed(m)
                told, cut = await presence_topics_or_close(r, len(rooms))
    assert cut is None
    assert told == set(rooms)


async def presence_topics_or_close(socket: WsClient, count: int) -> tuple[set[str], int | None]:
    """The topics of the ``presence`` frames ``socket`` gets until it has ``count`` of them,
    and ``None``; or those it got before relayd closed it, and the close code."""
    told: set[str] = set()
    with trio.fail_after(PUBLISH_DEADLINE):
        try:
            while len(told) < count:
                frame = await socket.next()
                if frame["type"] == "presence":
                    told.add(frame["topic"])
        except trio_websocket.ConnectionClosed as exc:
            return told, None if exc.reason is None else exc.reason.code
    return told, None
