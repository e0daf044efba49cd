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

import trio
import trio_websocket

from relayd._config import RelayConfig, TopicsConfig, WebsocketConfig
from relayd._sqlite import transaction
from relayd._store_topics import forget_topic

from .relay_harness import Client, CoreHarness
from .support import Engine, RunningRelayd
from .test_relay_presence import presence
from .test_relay_topics import errors, make_topic, of_type, publish
from .test_rest import assert_ok
from .topic_support import (
    PUBLISH_DEADLINE,
    assert_topic_not_found,
    create,
    refused,
    register,
    start_topics,
    subscribed,
    token_of,
    unsubscribe,
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


def test_a_deleted_topic_s_members_are_not_members_of_a_new_topic_with_its_id() -> None:
    h = CoreHarness(topics=TopicsConfig())
    alice, bob, carol = h.client("alice"), h.client("bob"), h.client("carol")
    make_topic(h, "room", alice, alice, bob)
    b = h.connect(bob)
    with transaction(h.db):  # DELETE /topics/room by its owner: the store, then the relay
        forget_topic(h.db, "room")
    h.core.topic_changed("room", None)
    make_topic(h, "room", carol, carol)  # carol's own room, with carol alone in it
    with transaction(h.db):
        h.db.execute("UPDATE topics SET access = 'private' WHERE id = 'room'")
    h.core.topic_changed("room", None)  # as POST /topics/create tells it
    c = h.connect(carol)
    h.send(c, {"type": "typing", "topic_id": "room"})
    assert typing_from(h.read(b)) == []
    h.send(b, {"type": "typing", "topic_id": "room"})
    assert errors(h.read(b)) == ["NOT_SUBSCRIBED_TO_TOPIC"]
    assert typing_from(h.read(c)) == []


def test_presence_turned_off_stops_presence_frames_to_connected_subscribers() -> None:
    h = CoreHarness(topics=TopicsConfig(presence_interval=1.0))
    alice, bob = h.client("alice"), h.client("bob")
    make_topic(h, "room", alice, alice, bob, presence=True)
    a, b = h.connect(alice), h.connect(bob)
    h.advance(1.0)
    h.read(a)
    with transaction(h.db):  # PATCH /topics/room {"presence": false}: the store, the relay
        h.db.execute("UPDATE topics SET presence = 0 WHERE id = 'room'")
    h.core.topic_changed("room", False)
    h.disconnect(b)
    h.advance(1.0)
    assert presence(h.read(a)) == []


# --- typing ---------------------------------------------------------------------------------


def test_typing_to_many_clients_keeps_the_typing_table_bounded() -> None:
    h = CoreHarness(topics=TopicsConfig(typing_interval=1.0))
    mallory = h.client("mallory")
    m = h.connect(mallory)
    for n in range(10_100):
        target = f"00000000-0000-4000-8000-{n:012d}"
        h.core.receive(m, json.dumps({"type": "typing", "to": target}), h.now)
    h.run()
    assert len(h.core.presence._last_typing) <= 10_000


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
    # A quarter of the socket's buffer (256 frames) per interval: all 300 in two.
    h.advance(1.0)
    first = presence(h.read(v))
    assert len(first) == 64
    for _ in range(4):
        h.advance(1.0)
    assert h.sessions[v].closed is None
    frames = first + presence(h.read(v))
    assert sorted(topic for topic, _, _ in frames) == sorted(rooms)


# --- end to end ---------------------------------------------------------------------------------


async def next_presence(socket: WsClient) -> list[tuple[str, str]]:
    frame = await socket.next_of("presence")
    return [(e["client"], e["event"]) for e in frame["events"]]


async def assert_next_is_pong(socket: WsClient) -> None:
    """Whatever relayd queued for ``socket`` before now comes before the pong."""
    await socket.send({"type": "ping"})
    frame = await socket.next()
    assert frame["type"] == "pong", frame


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


# --- guards the mutation check found untested ---------------------------------------------------


async def test_a_stranger_cannot_read_who_is_online_in_a_private_topic(
    relayd: RunningRelayd,
) -> None:
    http = relayd.http
    owner, stranger = await register(http, "owner", "stranger")
    await create(http, token_of(owner), "club", access="private", presence=True)
    response = await http.get("/topics/club/presence", token=token_of(stranger))
    assert_topic_not_found(response, "club")


async def test_joining_and_leaving_over_rest_reach_the_live_socket(relayd: RunningRelayd) -> None:
    http = relayd.http
    alice, bob = await register(http, "alice", "bob")
    await create(http, token_of(alice), "room")
    await subscribed(http, token_of(alice), "room")
    async with (
        ws_connect(relayd, token_of(alice)) as a,
        ws_connect(relayd, token_of(bob)) as b,
    ):
        await welcomed(a)
        await welcomed(b)
        await subscribed(http, token_of(bob), "room")  # while bob's socket is live
        await b.send({"type": "typing", "topic_id": "room"})
        assert (await a.next_of("typing"))["from"] == bob["uuid"]
        assert_ok(await unsubscribe(http, token_of(bob), "room"))
        error = await refused(b, {"type": "typing", "topic_id": "room"})
        assert error["code"] == "NOT_SUBSCRIBED_TO_TOPIC"


def test_typing_to_a_client_follows_the_role_rules() -> None:
    h = CoreHarness()
    h.core.presence._may_message = lambda sender, recipient: False
    alice, bob = h.client("alice"), h.client("bob")
    a, b = h.connect(alice), h.connect(bob)
    h.send(a, {"type": "typing", "to": bob.uuid})
    assert errors(h.read(a)) == ["not_permitted"]
    assert typing_from(h.read(b)) == []


def test_a_publish_is_refused_while_the_store_is_down_and_counts_against_the_rate() -> None:
    h = CoreHarness(websocket=WebsocketConfig(messages_per_second=1.0, message_burst=1))
    alice, bob = h.client("alice"), h.client("bob")
    make_topic(h, "room", alice, alice, bob)
    a = h.connect(alice)
    h.core.store_failed()
    h.send(a, {"topic_id": "room", "msgid": "m1", "content": "x"})
    assert errors(h.read(a)) == ["store_unavailable"]
    h.core.store_recovered()
    h.advance(1.0)
    h.send(a, {"topic_id": "room", "msgid": "m2", "content": "x"})
    h.send(a, {"topic_id": "room", "msgid": "m3", "content": "x"})  # over 1 a second
    frames = h.read(a)
    assert [f["msgid"] for f in of_type(frames, "topic_sent")] == ["m2"]
    assert errors(frames) == ["rate_limited"]
