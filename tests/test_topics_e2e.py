"""Publishing to topics over WebSocket (issue 13), end to end against a real relayd on
loopback, on both engines: ``topic_sent`` for the publisher, one delivery per subscriber with
the direct-message guarantees (at once when online, when it connects when offline, also after
a restart; with ``acknowledge: true`` each subscriber acks and is redelivered to on its own),
coalesced ``topic_update`` counts instead of a receipt per subscriber, and every refusal an
error frame that leaves the socket open.

Redelivery runs on relayd's real timers with a short ``relay.ack_timeout``; every wait is
bounded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from .support import SEED_FIELDS, TRANSPORTS, Engine, RunningRelayd, make_config
from .test_rest import admin_token, assert_ok
from .test_restart import MillisecondClock, running
from .topic_support import (
    PUBLISH_DEADLINE,
    ROOMY,
    TOPIC_UPDATE_KEYS,
    Doc,
    assert_quiet,
    create,
    frames_until,
    history,
    is_final_update,
    publish,
    refused,
    register,
    start_topics,
    subscribed,
    token_of,
    topic,
    unsubscribe,
)
from .ws_support import WsClient, welcomed, ws_connect

# A topic message as a subscriber gets it: the seed's 13 fields with topic_id for "to", its
# offset in the topic, and the delivery's own keys.
DELIVERY_KEYS = [
    "type",
    "topic_id",
    *(f for f in SEED_FIELDS if f != "to"),
    "offset",
    "attempt",
    "redelivered",
]
# Counts are asked for often, so that a test waits little for them.
QUICK_COUNTS = {"topics": {"update_interval": 0.1}}
# An unacknowledged delivery is redelivered this long after it was written, at once.
QUICK_REDELIVERY = {"relay": {"ack_timeout": 1.0, "backoff_initial": 0.0}}


async def start(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine, overrides: dict[str, Any] | None = None
) -> RunningRelayd:
    return await start_topics(nursery, tmp_path, engine, {**QUICK_COUNTS, **(overrides or {})})


async def room(relayd: RunningRelayd, *names: str, **settings: Any) -> list[Doc]:
    """Clients ``names``; the first creates the topic ``room`` with ``settings``, and every one
    subscribes to it."""
    clients = await register(relayd.http, *names)
    await create(relayd.http, token_of(clients[0]), "room", **settings)
    for client in clients:
        await subscribed(relayd.http, token_of(client), "room")
    return clients


async def delivered(socket: WsClient, msgid: str, *, attempt: int = 1) -> Doc:
    """The next frame ``socket`` gets, which must be the delivery of ``msgid``."""
    frame = await socket.next()
    assert frame["type"] == "message", frame
    assert list(frame) == DELIVERY_KEYS, frame
    assert (frame["msgid"], frame["attempt"], frame["redelivered"]) == (
        msgid,
        attempt,
        attempt > 1,
    ), frame
    return frame


async def acked(socket: WsClient, msgid: str) -> None:
    """Acknowledge ``msgid``; relayd's answer must be the next frame."""
    await socket.send({"type": "ack", "msgid": msgid})
    answer = await socket.next()
    assert (answer["type"], answer["msgid"], answer["status"]) == (
        "ack_received",
        msgid,
        "acknowledged",
    ), answer


def counts(frame: Doc) -> tuple[int, ...]:
    """A ``topic_update``'s counts: subscribers, delivered, acknowledged, failed, expired,
    pending."""
    assert frame["type"] == "topic_update", frame
    assert list(frame) == TOPIC_UPDATE_KEYS, frame
    return tuple(frame[k] for k in TOPIC_UPDATE_KEYS[3:-1])


# --- fan-out ------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_each_online_subscriber_gets_a_publish_once_and_its_publisher_does_not(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine, transport: str
) -> None:
    dedicated = {"websocket": {"listen": "127.0.0.1:0"}} if transport == "dedicated" else {}
    relayd = await start(nursery, tmp_path, engine, dedicated)
    alice, bob, carol = await room(relayd, "alice", "bob", "carol")
    async with (
        ws_connect(relayd, token_of(alice)) as a,
        ws_connect(relayd, token_of(bob)) as b,
        ws_connect(relayd, token_of(carol)) as c,
    ):
        for socket in (a, b, c):
            await welcomed(socket)
        fields: Doc = {
            "timestamp": 1795443805.5,
            "priority": "high",
            "subject": "s",
            "content": "héllo",
            "action": "a",
            "event": "e",
            "status": "st",
            "conversation_id": "c-1",
            "msgno": 42,
            "ttl": 600,
        }
        sent = await publish(a, "room", "m1", **fields)
        timestamp = sent.pop("timestamp")
        assert isinstance(timestamp, float)
        assert sent == {
            "type": "topic_sent",
            "message": "Message sent to 2 subscribers",
            "topic_id": "room",
            "msgid": "m1",
            "subscribers": 2,
            "offset": 1,
        }
        for socket in (b, c):
            frame = await delivered(socket, "m1")
            assert frame == {
                "type": "message",
                "topic_id": "room",
                "from": alice["uuid"],
                **{k: v for k, v in fields.items() if k != "ttl"},
                "msgid": "m1",
                "acknowledge": False,
                "offset": 1,
                "attempt": 1,
                "redelivered": False,
            }
        # The seed's defaults; the explicit form ("type": "publish"); the next offset.
        await a.send({"type": "publish", "topic_id": "room", "msgid": "m2", "content": "x"})
        second = await a.next()
        assert (second["type"], second["msgid"], second["offset"]) == ("topic_sent", "m2", 2)
        for socket in (b, c):
            frame = await delivered(socket, "m2")
            assert (frame["action"], frame["priority"], frame["subject"], frame["msgno"]) == (
                "topic_message",
                "normal",
                "",
                0,
            )
            assert frame["offset"] == 2
        # Nobody got anything else: no copy, no echo to the publisher, no counts (nobody
        # asked for acknowledgements).
        for socket in (a, b, c):
            await assert_quiet(socket)


async def test_a_publisher_that_is_not_subscribed_reaches_every_subscriber(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start(nursery, tmp_path, engine)
    alice, bob = await register(relayd.http, "alice", "bob")
    await create(relayd.http, token_of(alice), "room")  # alice owns it, and may publish
    await subscribed(relayd.http, token_of(bob), "room")
    async with ws_connect(relayd, token_of(alice)) as a, ws_connect(relayd, token_of(bob)) as b:
        await welcomed(a)
        await welcomed(b)
        assert (await publish(a, "room", "m1"))["subscribers"] == 1
        assert (await delivered(b, "m1"))["from"] == alice["uuid"]
        await assert_quiet(a)


async def test_an_offline_subscriber_gets_what_was_published_when_it_connects(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start(nursery, tmp_path, engine)
    alice, bob, carol, dave = await room(relayd, "alice", "bob", "carol", "dave")
    http = relayd.http
    # carol leaves before anything is published, dave after: what waits for him stays his.
    assert_ok(await unsubscribe(http, token_of(carol), "room"))
    async with ws_connect(relayd, token_of(alice)) as a:
        await welcomed(a)
        for i in range(1, 4):
            sent = await publish(a, "room", f"m{i}")
            assert (sent["subscribers"], sent["offset"]) == (2, i)
    assert_ok(await unsubscribe(http, token_of(dave), "room"))
    # eve subscribes after: she gets nothing published before.
    (eve,) = await register(http, "eve")
    await subscribed(http, token_of(eve), "room")
    for client in (bob, dave):
        async with ws_connect(relayd, token_of(client)) as socket:
            await welcomed(socket)
            for i in range(1, 4):
                assert (await delivered(socket, f"m{i}"))["offset"] == i
            await assert_quiet(socket)
    for client in (carol, eve):
        async with ws_connect(relayd, token_of(client)) as socket:
            await welcomed(socket)
            await assert_quiet(socket)
    # Delivered once: connecting again brings nothing.
    async with ws_connect(relayd, token_of(bob)) as socket:
        await welcomed(socket)
        await assert_quiet(socket)


async def test_what_waits_for_a_subscriber_survives_a_restart(
    tmp_path: Path, engine: Engine
) -> None:
    overrides = {**ROOMY, **QUICK_COUNTS, "store": {"path": "relayd.sqlite3"}}
    config = make_config(tmp_path, overrides, engine)
    clock = MillisecondClock()
    async with running(config, clock) as relayd:
        alice, bob = await room(relayd, "alice", "bob")
        async with ws_connect(relayd, token_of(alice)) as a:
            await welcomed(a)
            await publish(a, "room", "m1", acknowledge=True)
            await publish(a, "room", "m2")
    async with running(config, clock) as relayd:
        http = relayd.http
        # The topic, its subscribers and its history are as they were...
        shown = await topic(http, token_of(bob), "room")
        assert (shown["subscribers"], shown["last_offset"]) == (
            sorted([alice["uuid"], bob["uuid"]]),
            2,
        )
        kept = await history(http, token_of(bob), "room")
        assert [(m["offset"], m["msgid"]) for m in kept["messages"]] == [(1, "m1"), (2, "m2")]
        # ...what waited for bob reaches him...
        async with ws_connect(relayd, token_of(bob)) as b, ws_connect(relayd, token_of(alice)) as a:
            await welcomed(b)
            await welcomed(a)
            first = await delivered(b, "m1")
            assert (first["offset"], first["acknowledge"]) == (1, True)
            assert (await delivered(b, "m2"))["offset"] == 2
            await acked(b, "m1")
            # ...and offsets go on where they were, the new message reaching bob at once.
            assert (await publish(a, "room", "m3"))["offset"] == 3
            assert (await delivered(b, "m3"))["offset"] == 3
            await assert_quiet(b)


# --- acknowledgements and counts ----------------------------------------------------------------


async def test_each_subscriber_acks_on_its_own_and_the_publisher_gets_counts_only(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start(nursery, tmp_path, engine, QUICK_REDELIVERY)
    alice, bob, carol = await room(relayd, "alice", "bob", "carol")
    async with (
        ws_connect(relayd, token_of(alice)) as a,
        ws_connect(relayd, token_of(bob)) as b,
        ws_connect(relayd, token_of(carol)) as c,
    ):
        for socket in (a, b, c):
            await welcomed(socket)
        sent = await publish(a, "room", "m1", acknowledge=True)
        assert sent["subscribers"] == 2
        assert (await delivered(b, "m1"))["acknowledge"] is True
        await acked(b, "m1")
        # carol does not ack: after relay.ack_timeout it comes to her again, to her alone.
        await delivered(c, "m1")
        again = await delivered(c, "m1", attempt=2)
        assert again["offset"] == 1
        # alice is told one of two acknowledged...
        half = await frames_until(a, lambda f: f["type"] == "topic_update" and f["pending"] == 1)
        assert counts(half[-1]) == (2, 0, 1, 0, 0, 1)
        await acked(c, "m1")
        # ...then both, in counts: never a receipt per subscriber.
        rest = await frames_until(a, is_final_update("m1"))
        assert counts(rest[-1]) == (2, 0, 2, 0, 0, 0)
        updates = half + rest
        assert {f["type"] for f in updates} == {"topic_update"}
        assert {(f["topic"], f["msgid"]) for f in updates} == {("room", "m1")}
        # Coalesced: one frame per change of the counts at most.
        seen = [counts(f) for f in updates]
        assert len(seen) == len(set(seen)) <= 3
        for socket in (a, b, c):
            await assert_quiet(socket)


async def test_counts_are_only_for_a_publish_that_asked_for_acknowledgements(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start(nursery, tmp_path, engine)
    alice, bob = await room(relayd, "alice", "bob")
    async with ws_connect(relayd, token_of(alice)) as a, ws_connect(relayd, token_of(bob)) as b:
        await welcomed(a)
        await welcomed(b)
        # The seed's clients never ask, and take any frame with a topic_id for a message.
        await publish(a, "room", "m1")
        await delivered(b, "m1")
        await publish(a, "room", "m2", acknowledge=True)
        await acked(b, (await delivered(b, "m2"))["msgid"])
        # Every frame alice gets until m2's last count is about m2 (m1's would have come in
        # the same tick, or before).
        frames = await frames_until(a, is_final_update("m2"))
        assert {(f["type"], f["msgid"]) for f in frames} == {("topic_update", "m2")}
        assert counts(frames[-1]) == (1, 0, 1, 0, 0, 0)
        await assert_quiet(a)


async def test_a_subscriber_that_never_acks_fails_alone(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    overrides = {"relay": {"ack_timeout": 0.5, "max_attempts": 2, "backoff_initial": 0.0}}
    relayd = await start(nursery, tmp_path, engine, overrides)
    alice, bob, carol = await room(relayd, "alice", "bob", "carol")
    async with (
        ws_connect(relayd, token_of(alice)) as a,
        ws_connect(relayd, token_of(bob)) as b,
        ws_connect(relayd, token_of(carol)) as c,
    ):
        for socket in (a, b, c):
            await welcomed(socket)
        await publish(a, "room", "m1", acknowledge=True)
        await acked(b, (await delivered(b, "m1"))["msgid"])
        await delivered(c, "m1")
        await delivered(c, "m1", attempt=2)
        frames = await frames_until(a, is_final_update("m1"))
        assert counts(frames[-1]) == (2, 0, 1, 1, 0, 0)
        assert {f["type"] for f in frames} == {"topic_update"}
        for socket in (a, b, c):
            await assert_quiet(socket)


async def test_a_full_queue_fails_that_subscribers_delivery_only(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start(nursery, tmp_path, engine, {"relay": {"max_queued_per_recipient": 1}})
    alice, bob, carol = await room(relayd, "alice", "bob", "carol")
    async with ws_connect(relayd, token_of(alice)) as a, ws_connect(relayd, token_of(bob)) as b:
        await welcomed(a)
        await welcomed(b)
        # carol is offline: m1 fills her queue.
        await publish(a, "room", "m1", acknowledge=True)
        await acked(b, (await delivered(b, "m1"))["msgid"])
        # Once bob's ack is stored, his queue has room again.
        await frames_until(a, lambda f: f["msgid"] == "m1" and f["acknowledged"] == 1)
        sent = await publish(a, "room", "m2", acknowledge=True)
        assert sent["subscribers"] == 2  # counted, though one of them could not take it
        await acked(b, (await delivered(b, "m2"))["msgid"])
        frames = await frames_until(a, is_final_update("m2"))
        assert counts(frames[-1]) == (2, 0, 1, 1, 0, 0)
        assert {f["type"] for f in frames} == {"topic_update"}
        await assert_quiet(b)
    async with ws_connect(relayd, token_of(carol)) as c:
        await welcomed(c)
        assert (await delivered(c, "m1"))["offset"] == 1
        await assert_quiet(c)  # never m2


# --- duplicates, membership, deletion -----------------------------------------------------------


async def test_a_duplicate_msgid_is_answered_and_delivered_once(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start(nursery, tmp_path, engine)
    alice, bob = await room(relayd, "alice", "bob")
    async with ws_connect(relayd, token_of(alice)) as a, ws_connect(relayd, token_of(bob)) as b:
        await welcomed(a)
        await welcomed(b)
        assert (await publish(a, "room", "m1"))["offset"] == 1
        assert (await delivered(b, "m1"))["content"] == "c-m1"
        again = await publish(a, "room", "m1", duplicate=True, content="other")
        again.pop("timestamp")
        assert again == {
            "type": "topic_sent",
            "message": "Message already sent (duplicate msgid)",
            "topic_id": "room",
            "msgid": "m1",
            "subscribers": 0,
            "offset": None,
            "duplicate": True,
        }
        await assert_quiet(b)
    # From a new socket too; bob's own m1 is his, not a duplicate of alice's.
    async with ws_connect(relayd, token_of(alice)) as a, ws_connect(relayd, token_of(bob)) as b:
        await welcomed(a)
        await welcomed(b)
        assert (await publish(a, "room", "m1", duplicate=True))["duplicate"] is True
        assert (await publish(b, "room", "m1"))["offset"] == 2
        assert (await delivered(a, "m1"))["from"] == bob["uuid"]
        await assert_quiet(b)
    kept = await history(relayd.http, token_of(bob), "room")
    assert [(m["offset"], m["sender"]) for m in kept["messages"]] == [
        (1, alice["uuid"]),
        (2, bob["uuid"]),
    ]


async def test_an_unsubscribed_client_gets_nothing_more(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start(nursery, tmp_path, engine)
    alice, bob, carol = await room(relayd, "alice", "bob", "carol")
    async with ws_connect(relayd, token_of(alice)) as a, ws_connect(relayd, token_of(bob)) as b:
        await welcomed(a)
        await welcomed(b)
        assert_ok(await unsubscribe(relayd.http, token_of(bob), "room"))
        assert (await publish(a, "room", "m1"))["subscribers"] == 1  # carol alone
        await assert_quiet(b)
        # Nor may it publish there any more.
        error = await refused(b, {"topic_id": "room", "msgid": "b1"})
        assert error["code"] == "NOT_SUBSCRIBED_TO_TOPIC"
    async with ws_connect(relayd, token_of(carol)) as c:
        await welcomed(c)
        await delivered(c, "m1")
        await assert_quiet(c)


async def test_a_deleted_topics_waiting_deliveries_still_go_out(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start(nursery, tmp_path, engine)
    alice, bob = await room(relayd, "alice", "bob")
    async with ws_connect(relayd, token_of(alice)) as a:
        await welcomed(a)
        await publish(a, "room", "m1")
        assert_ok(await relayd.http.delete("/topics/room", token=token_of(alice)))
        error = await refused(a, {"topic_id": "room", "msgid": "m2"})
        assert (error["code"], error["details"]) == (
            "TOPIC_NOT_FOUND",
            {"topic_id": "room", "msgid": "m2"},
        )
    async with ws_connect(relayd, token_of(bob)) as b:
        await welcomed(b)
        assert (await delivered(b, "m1"))["topic_id"] == "room"
        await assert_quiet(b)


# --- refusals -----------------------------------------------------------------------------------


async def test_each_refused_publish_is_an_error_frame_and_the_socket_stays_open(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start(nursery, tmp_path, engine)
    http = relayd.http
    alice, bob = await room(relayd, "alice", "bob")
    (carol,) = await register(http, "carol")
    await create(http, token_of(alice), "news", publish="owner")
    await subscribed(http, token_of(bob), "news")
    async with (
        ws_connect(relayd, token_of(alice)) as a,
        ws_connect(relayd, token_of(bob)) as b,
        ws_connect(relayd, token_of(carol)) as c,
    ):
        for socket in (a, b, c):
            await welcomed(socket)
        error = await refused(a, {"topic_id": "nowhere", "msgid": "e1"})
        assert (error["code"], error["details"]) == (
            "TOPIC_NOT_FOUND",
            {"topic_id": "nowhere", "msgid": "e1"},
        )
        error = await refused(c, {"topic_id": "room", "msgid": "e2"})
        assert (error["code"], error["details"]) == (
            "NOT_SUBSCRIBED_TO_TOPIC",
            {"topic_id": "room", "msgid": "e2"},
        )
        # An announcement channel: its subscribers read, its owner publishes.
        error = await refused(b, {"topic_id": "news", "msgid": "e3"})
        assert (error["code"], error["details"]) == (
            "not_permitted",
            {"topic_id": "news", "msgid": "e3"},
        )
        error = await refused(b, {"topic_id": "room", "from": alice["uuid"], "msgid": "e4"})
        assert (error["code"], error["details"]) == ("MESSAGE_SENDER_MISMATCH", {"field": "from"})
        for socket in (a, b, c):
            await assert_quiet(socket)
        # Nothing refused was stored, and each socket still publishes.
        assert (await publish(a, "news", "n1"))["offset"] == 1
        assert (await delivered(b, "n1"))["topic_id"] == "news"
        assert (await publish(b, "room", "r1", **{"from": bob["uuid"]}))["offset"] == 1
        assert (await delivered(a, "r1"))["from"] == bob["uuid"]
        await assert_quiet(c)


MALFORMED: list[tuple[Doc, str]] = [
    ({"type": "publish"}, "topic_id"),
    ({"type": "publish", "topic_id": None}, "topic_id"),
    ({"topic_id": 7}, "topic_id"),
    ({"topic_id": "bad id"}, "topic_id"),
    ({"topic_id": "r" * 101}, "topic_id"),
    ({"topic_id": "a/b"}, "topic_id"),
    ({"topic_id": "room", "acknowledge": "yes"}, "acknowledge"),
    ({"topic_id": "room", "msgno": "1"}, "msgno"),
    ({"topic_id": "room", "msgno": 2**63}, "msgno"),
    ({"topic_id": "room", "priority": "p" * 33}, "priority"),
    ({"topic_id": "room", "content": 5}, "content"),
    ({"topic_id": "room", "subject": ["s"]}, "subject"),
    ({"topic_id": "room", "timestamp": "now"}, "timestamp"),
    ({"topic_id": "room", "ttl": -1}, "ttl"),
    ({"topic_id": "room", "msgid": ""}, "msgid"),
    ({"topic_id": "room", "msgid": "m" * 129}, "msgid"),
    ({"topic_id": "room", "from": "not-a-uuid"}, "from"),
]


async def test_a_malformed_publish_is_invalid_topic_message_naming_the_field(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start(nursery, tmp_path, engine, {"websocket": {"max_strikes": 100}})
    alice, bob = await room(relayd, "alice", "bob")
    async with ws_connect(relayd, token_of(alice)) as a, ws_connect(relayd, token_of(bob)) as b:
        await welcomed(a)
        await welcomed(b)
        for frame, field in MALFORMED:
            error = await refused(a, frame)
            assert error["code"] == "INVALID_TOPIC_MESSAGE", (frame, error)
            assert error["details"] == {"field": field}, (frame, error)
            assert error["message"].startswith(f"{field}: "), (frame, error)
        # Not JSON, or not an object, is the frame's fault, not the publication's.
        for raw in ("{topic_id", '["room"]'):
            assert (await refused(a, raw))["code"] == "INVALID_MESSAGE_FORMAT"
        await assert_quiet(b)  # nothing was published
        assert (await publish(a, "room", "ok"))["offset"] == 1
        await delivered(b, "ok")
        await assert_quiet(b)


async def test_an_admin_publishes_in_any_topic(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start(nursery, tmp_path, engine)
    http = relayd.http
    alice, bob, boss = await register(http, "alice", "bob", "boss")
    path = f"/admin/clients/{boss['uuid']}/roles"
    body = {"roles": ["admin"]}
    assert_ok(await http.request("PUT", path, json_body=body, token=admin_token(relayd)))
    await create(http, token_of(alice), "news", publish="owner", access="private")
    assert_ok(await http.put(f"/topics/news/members/{bob['uuid']}", token=token_of(alice)))
    async with ws_connect(relayd, token_of(boss)) as s, ws_connect(relayd, token_of(bob)) as b:
        await welcomed(s)
        await welcomed(b)
        assert (await publish(s, "news", "n1"))["subscribers"] == 1
        assert (await delivered(b, "n1"))["from"] == boss["uuid"]


async def test_a_burst_of_publishes_reaches_every_subscriber_in_order(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start(nursery, tmp_path, engine)
    clients = await room(relayd, "alice", "bob", "carol", "dave")
    count = 50
    async with ws_connect(relayd, token_of(clients[0])) as a:
        await welcomed(a)
        subscribers = [ws_connect(relayd, token_of(c)) for c in clients[1:]]
        async with subscribers[0] as b, subscribers[1] as c, subscribers[2] as d:
            for socket in (b, c, d):
                await welcomed(socket)
            with trio.fail_after(PUBLISH_DEADLINE):
                for i in range(count):
                    await a.send({"topic_id": "room", "msgid": f"m{i}", "content": str(i)})
                answers = [await a.next() for _ in range(count)]
                assert [(f["type"], f["offset"]) for f in answers] == [
                    ("topic_sent", i + 1) for i in range(count)
                ]
                for socket in (b, c, d):
                    got = [await socket.next() for _ in range(count)]
                    assert [(f["msgid"], f["offset"]) for f in got] == [
                        (f"m{i}", i + 1) for i in range(count)
                    ]
            for socket in (a, b, c, d):
                await assert_quiet(socket)


# --- the direct-message routes, for a topic's deliveries ----------------------------------------


async def test_the_same_msgid_from_two_publishers_is_acked_unambiguously(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start(nursery, tmp_path, engine)
    alice, bob, carol = await room(relayd, "alice", "bob", "carol")
    async with (
        ws_connect(relayd, token_of(alice)) as a,
        ws_connect(relayd, token_of(bob)) as b,
        ws_connect(relayd, token_of(carol)) as c,
    ):
        for socket in (a, b, c):
            await welcomed(socket)
        await publish(a, "room", "m1", acknowledge=True)
        assert (await delivered(c, "m1"))["from"] == alice["uuid"]
        await publish(c, "room", "m1", acknowledge=True)
        # bob holds alice's m1 unacked: carol's waits until he acks it, so that his ack names
        # one delivery.
        first = await delivered(b, "m1")
        await assert_quiet(b)
        await acked(b, "m1")
        second = await delivered(b, "m1")
        assert (first["from"], first["offset"], second["from"], second["offset"]) == (
            alice["uuid"],
            1,
            carol["uuid"],
            2,
        )
        await acked(b, "m1")
        # Each publisher acks the other's m1 (carol holds alice's already), and hears its own
        # acknowledged by both others.
        before = await frames_until(a, lambda f: f["type"] == "message")
        assert {f["type"] for f in before[:-1]} <= {"topic_update"}
        assert (before[-1]["msgid"], before[-1]["from"]) == ("m1", carol["uuid"])
        for publisher in (a, c):
            await publisher.send({"type": "ack", "msgid": "m1"})
        for publisher in (a, c):
            after = await frames_until(publisher, is_final_update("m1"))
            assert {f["type"] for f in after} <= {"topic_update", "ack_received"}
            assert counts(after[-1]) == (2, 0, 2, 0, 0, 0)
        await assert_quiet(b)


async def test_a_subscriber_without_a_socket_pulls_its_deliveries_over_rest(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start(nursery, tmp_path, engine)
    alice, bob = await room(relayd, "alice", "bob")
    http = relayd.http
    async with ws_connect(relayd, token_of(alice)) as a:
        await welcomed(a)
        await publish(a, "room", "m1", acknowledge=True)
        pulled = assert_ok(await http.get("/messages/pending?wait=5", token=token_of(bob)))
        assert pulled["count"] == 1
        message = pulled["messages"][0]
        assert list(message) == DELIVERY_KEYS
        assert (message["msgid"], message["topic_id"], message["offset"]) == ("m1", "room", 1)
        acked_over_rest = assert_ok(await http.post("/messages/m1/ack", {}, token=token_of(bob)))
        assert acked_over_rest == {"msgid": "m1", "status": "acknowledged"}
        final = (await frames_until(a, is_final_update("m1")))[-1]
        assert counts(final) == (1, 0, 1, 0, 0, 0)


async def test_a_subscriber_reads_the_status_of_its_own_delivery(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start(nursery, tmp_path, engine)
    alice, bob, carol = await room(relayd, "alice", "bob", "carol")
    async with ws_connect(relayd, token_of(alice)) as a, ws_connect(relayd, token_of(bob)) as b:
        await welcomed(a)
        await welcomed(b)
        await publish(a, "room", "m1", acknowledge=True)
        await acked(b, (await delivered(b, "m1"))["msgid"])
        await frames_until(a, lambda f: f["type"] == "topic_update" and f["acknowledged"] == 1)
    for who, status in ((bob, "acknowledged"), (carol, "queued")):
        doc = assert_ok(await relayd.http.get("/messages/m1/status", token=token_of(who)))
        assert (doc["from"], doc["to"], doc["status"]) == (alice["uuid"], who["uuid"], status)


async def test_a_publisher_reads_the_counts_of_its_message_over_rest(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start(nursery, tmp_path, engine)
    alice, bob, _ = await room(relayd, "alice", "bob", "carol")
    async with ws_connect(relayd, token_of(alice)) as a, ws_connect(relayd, token_of(bob)) as b:
        await welcomed(a)
        await welcomed(b)
        await publish(a, "room", "m1", acknowledge=True)
        await acked(b, (await delivered(b, "m1"))["msgid"])
        await frames_until(a, lambda f: f["type"] == "topic_update" and f["acknowledged"] == 1)
    doc = assert_ok(await relayd.http.get("/messages/m1/status", token=token_of(alice)))
    assert (doc["status"], doc["topic_id"], doc["to"], doc["final"]) == (
        "published",
        "room",
        "#room",
        False,
    ), doc
    assert doc["counts"] == {
        "subscribers": 2,
        "delivered": 0,
        "acknowledged": 1,
        "failed": 0,
        "expired": 0,
        "pending": 1,
    }, doc
    # A subscriber asking reads its own delivery, as for a direct message.
    mine = assert_ok(await relayd.http.get("/messages/m1/status", token=token_of(bob)))
    assert (mine["to"], mine["status"]) == (bob["uuid"], "acknowledged"), mine
