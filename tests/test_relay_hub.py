"""The relay's timers, end to end through the Trio hub, at exact instants of virtual time.

Every test runs the real hub (relayd/_relay/hub.py) and core on a real in-memory store, with
sockets replaced by :class:`~tests.hub_support.Peer` and Trio's fake clock jumping from one
deadline to the next: ``trio.current_time()`` when a frame arrives is the instant relayd sent
it.

The store is SQLite's, called inline: a store across a socket (Redis) would let the fake clock
jump while it answers, and every instant here would be off. What the hub does on Redis is
tested end to end on both engines (the ``engine`` fixture) and, where only a node of a cluster
can show it, by the tests at the end, on a real Redis in real time.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
import trio.testing

from relayd._auth import Revocation
from relayd._cluster import Claim, RedisCluster
from relayd._engine import open_cluster
from relayd._errors import StoreUnavailable, TokenError
from relayd._redis import RedisStore
from relayd._relay import hub as hub_module
from relayd._relay.frames import CloseCode
from relayd._relay.hub import CLOSE_TIMEOUT, DEFER_COMMIT, INLINE_OPS
from relayd._store import Store, inline_executor

from .hub_support import (
    EPOCH,
    GatedRedisStore,
    RecordingStore,
    gated_store,
    hub_config,
    running_hub,
)
from .support import IO_DEADLINE

MockClock = trio.testing.MockClock


def message(to: str, msgid: str, **fields: Any) -> dict[str, Any]:
    return {"to": to, "msgid": msgid, "content": f"content of {msgid}", **fields}


# --- acknowledgements and redelivery -------------------------------------------------------------


async def test_unacked_message_is_redelivered_with_backoff_then_failed(
    autojump_clock: MockClock,
) -> None:
    relay = {"ack_timeout": 10.0, "backoff_initial": 1.0, "max_attempts": 3}
    async with running_hub({"relay": relay}) as env:
        alice, bob = await env.client("alice"), await env.client("bob")
        a, b = await env.connect(alice), await env.connect(bob)
        t0 = trio.current_time()
        await a.say(message(bob.uuid, "m1", acknowledge=True))

        first = await b.next_of("message")
        assert (first["attempt"], first["redelivered"]) == (1, False)
        assert trio.current_time() == t0
        assert (await a.next())["status"] == "pending_ack"

        # Attempt 2: after the ack timeout (10 s) and the first backoff (1 s).
        second = await b.next_of("message")
        assert (second["attempt"], second["redelivered"]) == (2, True)
        assert trio.current_time() == t0 + 11.0
        # Attempt 3: another ack timeout, and the backoff doubled (2 s).
        third = await b.next_of("message")
        assert (third["attempt"], third["redelivered"]) == (3, True)
        assert trio.current_time() == t0 + 23.0
        # No ack after max_attempts deliveries: the sender is told it failed.
        update = await a.next()
        assert (update["type"], update["status"], update["msgid"]) == (
            "delivery_update",
            "failed",
            "m1",
        )
        assert trio.current_time() == t0 + 33.0
        assert b.frames == []


async def test_ack_stops_redelivery(autojump_clock: MockClock) -> None:
    async with running_hub({"relay": {"ack_timeout": 10.0}}) as env:
        alice, bob = await env.client("alice"), await env.client("bob")
        a, b = await env.connect(alice), await env.connect(bob)
        await a.say(message(bob.uuid, "m1", acknowledge=True))
        assert (await b.next_of("message"))["attempt"] == 1
        assert (await a.next())["status"] == "pending_ack"
        await trio.sleep(9.5)
        t = trio.current_time()
        await b.say({"type": "ack", "msgid": "m1"})
        assert (await b.next()) == {
            "type": "ack_received",
            "msgid": "m1",
            "status": "acknowledged",
            "timestamp": EPOCH + t,
        }
        update = await a.next()
        assert (update["status"], trio.current_time()) == ("acknowledged", t)
        await trio.sleep(600)
        assert b.frames == []


async def test_message_expires_while_waiting_for_its_ack(autojump_clock: MockClock) -> None:
    relay = {"ack_timeout": 10.0, "backoff_initial": 1.0, "max_attempts": 5}
    async with running_hub({"relay": relay}) as env:
        alice, bob = await env.client("alice"), await env.client("bob")
        a, b = await env.connect(alice), await env.connect(bob)
        t0 = trio.current_time()
        await a.say(message(bob.uuid, "m1", acknowledge=True, ttl=15.0))
        await b.next_of("message")
        assert (await b.next_of("message"))["attempt"] == 2  # at t0 + 11
        # The second ack timeout (t0 + 21) falls after the ttl (t0 + 15): expired, not retried.
        assert (await a.next())["status"] == "pending_ack"
        update = await a.next()
        assert (update["status"], trio.current_time()) == ("expired", t0 + 21.0)


async def test_queued_message_expires_at_the_first_sweep_after_its_ttl(
    autojump_clock: MockClock,
) -> None:
    async with running_hub({"relay": {"sweep_interval": 30.0}}) as env:
        alice, bob = await env.client("alice"), await env.client("bob")
        a = await env.connect(alice)
        t0 = trio.current_time()
        assert t0 < 30.0
        await a.say(message(bob.uuid, "m1", ttl=5.0))
        assert (await a.next())["status"] == "queued_offline"
        update = await a.next()
        # The store is swept every 30 s from the hub's start (t = 0).
        assert (update["type"], update["status"]) == ("delivery_update", "expired")
        assert trio.current_time() == 30.0
        b = await env.connect(bob)
        await trio.sleep(60)
        assert b.frames == []


# --- authentication and tokens -------------------------------------------------------------------


async def test_socket_without_a_token_is_closed_at_the_auth_timeout(
    autojump_clock: MockClock,
) -> None:
    async with running_hub({"websocket": {"auth_timeout": 10.0}}) as env:
        t0 = trio.current_time()
        peer = env.open()
        assert await peer.wait_closed() == CloseCode.AUTH_FAILED
        assert trio.current_time() == t0 + 10.0
        error = await peer.next() if peer.frames else None
        assert error is not None
        assert error["error"]["code"] == "not_authenticated"


async def test_auth_frame_authenticates(autojump_clock: MockClock) -> None:
    async with running_hub() as env:
        alice = await env.client("alice")
        peer = env.open()
        await trio.sleep(3)
        await peer.say({"type": "auth", "token": alice.token})
        welcome = await peer.next()
        assert (welcome["type"], welcome["uuid"]) == ("connection", alice.uuid)
        await trio.sleep(60)
        assert not peer.closed.is_set()


async def test_token_expiry_warns_then_closes(autojump_clock: MockClock) -> None:
    async with running_hub({"websocket": {"token_warning": 60.0}}) as env:
        alice = await env.client("alice")
        t0 = trio.current_time()
        peer = env.open(env.token(alice.uuid, ttl=300.0))
        welcome = await peer.next()
        assert welcome["token_expires_at"] == EPOCH + t0 + 300.0
        warning = await peer.next()
        assert warning["type"] == "token_expiring"
        assert trio.current_time() == t0 + 240.0
        assert warning["expires_at"] == EPOCH + t0 + 300.0
        error = await peer.next()
        assert error["error"]["code"] == "token_expired"
        assert await peer.wait_closed() == CloseCode.AUTH_FAILED
        assert trio.current_time() == t0 + 300.0


async def test_refresh_on_the_socket_moves_the_expiry(autojump_clock: MockClock) -> None:
    async with running_hub({"websocket": {"token_warning": 60.0}}) as env:
        alice = await env.client("alice")
        t0 = trio.current_time()
        peer = env.open(env.token(alice.uuid, ttl=300.0))
        await peer.next()
        assert (await peer.next())["type"] == "token_expiring"
        fresh = env.token(alice.uuid, ttl=300.0)  # at t0 + 240: valid until t0 + 540
        await peer.say({"type": "refresh", "token": fresh})
        confirmed = await peer.next()
        assert confirmed["type"] == "token_refreshed"
        assert confirmed["expires_at"] == EPOCH + t0 + 540.0
        assert (await peer.next())["type"] == "token_expiring"
        assert trio.current_time() == t0 + 480.0
        assert await peer.wait_closed() == CloseCode.AUTH_FAILED
        assert trio.current_time() == t0 + 540.0


async def test_refresh_with_another_clients_token_closes_4001(autojump_clock: MockClock) -> None:
    async with running_hub() as env:
        alice, bob = await env.client("alice"), await env.client("bob")
        peer = await env.connect(alice)
        await peer.say({"type": "refresh", "token": bob.token})
        assert (await peer.next())["error"]["code"] == "token_invalid"
        assert await peer.wait_closed() == CloseCode.AUTH_FAILED


async def test_revoking_a_client_closes_its_session_4003_at_once(
    autojump_clock: MockClock,
) -> None:
    async with running_hub() as env:
        alice = await env.client("alice")
        peer = await env.connect(alice)
        await trio.sleep(1)  # a revocation refuses tokens issued before it
        t = trio.current_time()
        await env.auth.revoke_client(alice.uuid, actor="operator:test", source=None)
        assert (await peer.next())["error"]["code"] == "token_revoked"
        assert await peer.wait_closed() == CloseCode.REVOKED
        assert trio.current_time() == t
        # The revoked token cannot open a new session.
        again = env.open(alice.token)
        assert (await again.next())["error"]["code"] == "token_revoked"
        assert await again.wait_closed() == CloseCode.AUTH_FAILED


async def test_refresh_reuse_closes_the_login_s_session_4003_at_once(
    autojump_clock: MockClock,
) -> None:
    async with running_hub() as env:
        carol, spent = await env.register("carol")
        peer = await env.connect(carol)
        await trio.sleep(1)
        await env.auth.refresh(spent, source=None)
        t = trio.current_time()
        with pytest.raises(TokenError, match="already used"):
            await env.auth.refresh(spent, source=None)
        assert (await peer.next())["error"]["details"] == {"reason": "refresh_reused"}
        assert await peer.wait_closed() == CloseCode.REVOKED
        assert trio.current_time() == t


# --- heartbeats ---------------------------------------------------------------------------------


async def test_silent_peer_is_closed_4002_at_the_heartbeat_timeout(
    autojump_clock: MockClock,
) -> None:
    ws = {"heartbeat_interval": 20.0, "heartbeat_timeout": 60.0}
    async with running_hub({"websocket": ws}) as env:
        alice = await env.client("alice")
        peer = env.open(alice.token, pong=True)
        peer.answer_pings = False
        t0 = trio.current_time()
        await peer.next()
        assert await peer.wait_closed() == CloseCode.HEARTBEAT_TIMEOUT
        assert trio.current_time() == t0 + 60.0
        assert peer.pings == 1  # the ping at t0 + 20 was never answered


async def test_peer_answering_pings_stays_connected(autojump_clock: MockClock) -> None:
    ws = {"heartbeat_interval": 20.0, "heartbeat_timeout": 60.0}
    async with running_hub({"websocket": ws}) as env:
        alice = await env.client("alice")
        peer = await env.connect(alice, pong=True)
        await trio.sleep(210.0)
        assert not peer.closed.is_set()
        assert peer.pings == 10


async def test_any_frame_counts_as_a_sign_of_life(autojump_clock: MockClock) -> None:
    ws = {"heartbeat_interval": 20.0, "heartbeat_timeout": 60.0}
    async with running_hub({"websocket": ws}) as env:
        alice = await env.client("alice")
        peer = env.open(alice.token, pong=True)
        peer.answer_pings = False
        await peer.next()
        await trio.sleep(50.0)
        t = trio.current_time()
        await peer.say({"type": "ping"})
        assert (await peer.next())["type"] == "pong"
        assert await peer.wait_closed() == CloseCode.HEARTBEAT_TIMEOUT
        assert trio.current_time() == t + 60.0


# --- slow consumers -----------------------------------------------------------------------------


def slow_consumer_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str | None, Any]]:
    """``(connection id, detected_by)`` of each "slow consumer" line logged (at info)."""
    return [
        (getattr(r, "relayd_conn", None), getattr(r, "fields", {}).get("detected_by"))
        for r in caplog.records
        if r.getMessage() == "slow consumer: closing"
    ]


async def test_socket_that_stops_draining_is_closed_4008_after_write_timeout_and_the_grace(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The write under way at write_timeout gets CLOSE_TIMEOUT more to end (so that the close
    frame can follow whole frames); one that does not is cut off. Logged and counted once."""
    caplog.set_level(logging.INFO, logger="relayd.relay")
    async with running_hub({"websocket": {"write_timeout": 10.0}}) as env:
        alice, bob = await env.client("alice"), await env.client("bob")
        a, b = await env.connect(alice), await env.connect(bob)  # sockets ws1, ws2
        b.reading = trio.Event()  # bob's socket stops draining
        t0 = trio.current_time()
        await a.say(message(bob.uuid, "m1", acknowledge=True))
        assert await b.wait_closed() == CloseCode.SLOW_CONSUMER
        assert trio.current_time() == t0 + 10.0 + CLOSE_TIMEOUT
        assert env.hub.core.metrics.slow_consumer_drops == {"write_timeout": 1}
        assert slow_consumer_lines(caplog) == [("ws2", "write_timeout")]
        # Alice was never held up: her receipt came at once.
        assert (await a.next())["status"] == "pending_ack"
        # Bob gets the message when he comes back. Its write was cut off midway, so it may
        # have arrived: it counts as an attempt and comes back marked as a redelivery.
        b2 = await env.connect(bob)
        again = await b2.next_of("message")
        assert (again["msgid"], again["attempt"], again["redelivered"]) == ("m1", 2, True)


async def test_a_consumer_that_reads_again_within_the_grace_gets_the_frame_then_4008(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relayd.relay")
    async with running_hub({"websocket": {"write_timeout": 10.0}}) as env:
        alice, bob = await env.client("alice"), await env.client("bob")
        a, b = await env.connect(alice), await env.connect(bob)
        b.reading = trio.Event()
        t0 = trio.current_time()
        await a.say(message(bob.uuid, "m1", acknowledge=True))
        await trio.sleep_until(t0 + 11.0)  # past write_timeout, within the grace
        b.reading.set()
        got = await b.next()
        assert (got["type"], got["msgid"]) == ("message", "m1")
        assert await b.wait_closed() == CloseCode.SLOW_CONSUMER
        assert trio.current_time() == t0 + 11.0
        assert env.hub.core.metrics.slow_consumer_drops == {"write_timeout": 1}
        assert slow_consumer_lines(caplog) == [("ws2", "write_timeout")]


async def test_a_transport_that_bounds_its_own_writes_is_left_to_catch_its_slow_consumer(
    autojump_clock: MockClock,
) -> None:
    """The REST port's writes are bounded (and their slow consumers logged, counted and
    closed) below the hub: its own timer stays off, so that one drop counts once."""
    async with running_hub({"websocket": {"write_timeout": 10.0}}) as env:
        alice, bob = await env.client("alice"), await env.client("bob")
        a, b = await env.connect(alice), await env.connect(bob)
        b.bounded_writes = True
        b.reading = trio.Event()
        await a.say(message(bob.uuid, "m1"))
        with trio.move_on_after(1000.0):
            await b.closed.wait()
        assert not b.closed.is_set()
        assert not env.hub.core.metrics.slow_consumer_drops
        b.vanish()  # as the transport does once it drops the connection


async def test_an_outbound_buffer_that_overflows_is_a_slow_consumer_logged_and_counted(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """With one frame of outbound buffer and a delivery stuck in it, the error frame of a
    revocation does not fit: the core closes the socket (4008) and the hub logs and counts
    it, under the revoked session's id although the revocation came from elsewhere."""
    caplog.set_level(logging.INFO, logger="relayd.relay")
    config = {"websocket": {"outbound_buffer": 1, "write_timeout": 600.0}}
    async with running_hub(config) as env:
        alice, bob = await env.client("alice"), await env.client("bob")
        a, b = await env.connect(alice), await env.connect(bob)
        b.reading = trio.Event()
        await a.say(message(bob.uuid, "m1"))
        # Once m1 waits in it, bob's one-frame buffer is full (and his socket not read).
        with trio.fail_after(60):
            await env.hub._until(lambda: not env.hub.core.readable(2))
        env.hub.revoked(Revocation(bob.uuid, "revoked"))
        assert await b.wait_closed() == CloseCode.SLOW_CONSUMER
        assert env.hub.core.metrics.slow_consumer_drops == {"outbound_buffer": 1}
        assert slow_consumer_lines(caplog) == [("ws2", "outbound_buffer")]


async def test_a_slow_recipient_does_not_hold_up_other_pairs(autojump_clock: MockClock) -> None:
    async with running_hub({"websocket": {"write_timeout": 10.0}}) as env:
        alice, bob = await env.client("alice"), await env.client("bob")
        carol, dave = await env.client("carol"), await env.client("dave")
        a, b = await env.connect(alice), await env.connect(bob)
        c, d = await env.connect(carol), await env.connect(dave)
        b.reading = trio.Event()
        t0 = trio.current_time()
        for i in range(20):
            await a.say(message(bob.uuid, f"to-bob-{i}", acknowledge=True))
        for i in range(20):
            await c.say(message(dave.uuid, f"to-dave-{i}", acknowledge=True))
            got = await d.next_of("message")
            assert got["msgid"] == f"to-dave-{i}"
            await d.say({"type": "ack", "msgid": got["msgid"]})
        assert trio.current_time() == t0
        assert not d.closed.is_set()


# --- shutdown -----------------------------------------------------------------------------------


async def test_shutdown_notifies_closes_1001_and_cuts_stragglers_by_the_deadline(
    autojump_clock: MockClock,
) -> None:
    async with running_hub() as env:
        alice, bob = await env.client("alice"), await env.client("bob")
        a, b = await env.connect(alice), await env.connect(bob)
        await a.say(message(bob.uuid, "m1", acknowledge=True))
        assert (await b.next_of("message"))["msgid"] == "m1"
        assert (await a.next())["status"] == "pending_ack"
        b.reading = trio.Event()  # bob stops draining: his shutdown notice cannot be written
        t0 = trio.current_time()
        await env.hub.shutdown(t0 + 10.0)
        # Alice read everything: notice, then 1001, at once.
        assert (await a.next())["type"] == "shutdown"
        assert a.close_code == CloseCode.GOING_AWAY
        # Bob was cut when the grace period ran out: the deadline less its last quarter
        # (at most 2 s), kept for cutting and flushing.
        assert b.close_code == CloseCode.GOING_AWAY
        assert trio.current_time() == t0 + 8.0
        # m1 was never acknowledged: it is still queued in the store for the next start.
        queued = await env.store.queue_depths()
        assert queued == {bob.uuid: 1}


async def test_shutdown_deadline_ends_close_handshakes_still_waiting_for_a_reply(
    autojump_clock: MockClock,
) -> None:
    async with running_hub() as env:
        alice = await env.client("alice")
        a = await env.connect(alice)
        a.close_hangs = True  # relayd's 1001 is written; the client's reply never comes
        t0 = trio.current_time()
        await env.hub.shutdown(t0 + 1.0)  # sooner than a close handshake's own 2 s bound
        assert a.close_code == CloseCode.GOING_AWAY
        assert trio.current_time() == t0 + 1.0
        await a.wait_served()
        assert trio.current_time() == t0 + 1.0


async def test_transport_without_pings_is_left_to_the_server_beneath(
    autojump_clock: MockClock,
) -> None:
    ws = {"heartbeat_interval": 20.0, "heartbeat_timeout": 60.0}
    async with running_hub({"websocket": ws}) as env:
        alice = await env.client("alice")
        peer = await env.connect(alice, pong=False)
        await trio.sleep(600.0)
        assert not peer.closed.is_set()
        assert (peer.pings, peer.frames) == (0, [])


# --- guards that a one-line break once slipped past -----------------------------------------------


async def test_readers_stop_while_store_operations_pile_up(autojump_clock: MockClock) -> None:
    """Senders are held back by every operation waiting for the store, not only by messages
    awaiting their commit: here, the traces of messages delivered straight from memory."""
    relay = {"max_pending_commit": 4, "sweep_interval": 3600.0}
    async with gated_store() as store, running_hub({"relay": relay}, store=store) as env:
        alice, bob = await env.client("alice"), await env.client("bob")
        a, b = await env.connect(alice), await env.connect(bob)
        await trio.testing.wait_all_tasks_blocked()  # bob's queue is loaded
        store.gate = trio.Event()  # the store lags from here
        for i in range(12):
            await a.say(message(bob.uuid, f"m{i}"))
            await trio.testing.wait_all_tasks_blocked()
        # Each frame read leaves one operation for the store (its trace, once its receipt is
        # written: at once, the socket having room); m0's is held at the gate. A reader checks
        # the backlog before it reads its next frame: it stops with max_pending_commit waiting.
        assert store.waiting == 1
        assert env.hub.store_backlog == 4
        delivered = [f["msgid"] for f in b.frames if f["type"] == "message"]
        assert delivered == [f"m{i}" for i in range(5)]  # m5 to m11 stay unread
        b.frames.clear()
        store.gate.set()
        for i in range(5, 12):
            assert (await b.next_of("message"))["msgid"] == f"m{i}"


async def test_frames_still_queued_for_a_socket_that_drops_are_not_lost(
    autojump_clock: MockClock,
) -> None:
    """A socket drops with one frame in its writer's hands and more queued behind it: the
    one being written may have arrived (at most once: failed), the queued ones did not, and
    come on the next connection."""
    async with running_hub() as env:
        alice, bob = await env.client("alice"), await env.client("bob")
        a, b1 = await env.connect(alice), await env.connect(bob)
        b1.reading = trio.Event()  # bob's writes block
        await a.say(message(bob.uuid, "m0"))
        await trio.testing.wait_all_tasks_blocked()  # the writer holds m0
        await a.say(message(bob.uuid, "m1"))
        await a.say(message(bob.uuid, "m2"))
        await trio.testing.wait_all_tasks_blocked()  # m1 and m2 wait in the socket's channel
        b1.vanish()
        await b1.wait_served()
        b2 = await env.connect(bob)
        assert (await b2.next_of("message"))["msgid"] == "m1"
        assert (await b2.next_of("message"))["msgid"] == "m2"
        receipts = [await a.next() for _ in range(5)]
        assert [(r["type"], r["msgid"], r["status"]) for r in receipts] == [
            ("delivery_status", "m0", "failed"),
            ("delivery_status", "m1", "queued_offline"),
            ("delivery_status", "m2", "queued_offline"),
            ("delivery_update", "m1", "delivered"),
            ("delivery_update", "m2", "delivered"),
        ]
        assert receipts[0]["reason"] == "connection_lost"


async def test_a_slow_socket_that_keeps_draining_is_not_cut(autojump_clock: MockClock) -> None:
    """write_timeout bounds a write that makes no progress, not a batch: a socket that takes
    4 s per frame keeps up with a 10 s write_timeout, however many frames a batch holds."""
    async with running_hub({"websocket": {"write_timeout": 10.0}}) as env:
        alice, bob = await env.client("alice"), await env.client("bob")
        a, b = await env.connect(alice), await env.connect(bob)
        b.reading = trio.Event()
        await a.say(message(bob.uuid, "m0"))
        await trio.testing.wait_all_tasks_blocked()  # the writer holds m0
        for i in range(1, 6):
            await a.say(message(bob.uuid, f"m{i}"))
        await trio.testing.wait_all_tasks_blocked()  # the next batch gathers behind it
        b.write_delay = 4.0
        t0 = trio.current_time()
        b.reading.set()
        for i in range(6):
            assert (await b.next_of("message"))["msgid"] == f"m{i}"
            assert trio.current_time() == t0 + 4.0 * (i + 1)
        assert not b.closed.is_set()


async def test_what_nobody_waits_for_rides_with_the_next_commit_or_goes_after_the_delay(
    autojump_clock: MockClock,
) -> None:
    """An ack's Finish and the receipt's SetReceiptPending wait: for the next message's
    Insert (one commit for all), or DEFER_COMMIT when nothing comes; shutdown does not wait."""
    async with (
        RecordingStore.open(":memory:", executor=inline_executor) as store,
        running_hub(store=store) as env,
    ):
        assert isinstance(store, RecordingStore)
        alice, bob = await env.client("alice"), await env.client("bob")
        a, b = await env.connect(alice), await env.connect(bob)
        await trio.sleep(1)
        store.commits.clear()
        t0 = trio.current_time()
        await a.say(message(bob.uuid, "m1", acknowledge=True))
        await b.next_of("message")
        await b.say({"type": "ack", "msgid": "m1"})
        assert (await a.next_of("delivery_update"))["status"] == "acknowledged"
        await trio.sleep(0.01)
        await a.say(message(bob.uuid, "m2", acknowledge=True))
        await b.next_of("message")
        assert store.commits == [
            (t0, ["Insert"]),
            (t0 + 0.01, ["Finish", "SetReceiptPending", "Insert"]),
        ]
        t1 = trio.current_time()
        await b.say({"type": "ack", "msgid": "m2"})
        await a.next_of("delivery_update")
        await trio.sleep(1)
        assert store.commits[2:] == [(t1 + DEFER_COMMIT, ["Finish", "SetReceiptPending"])]


async def test_small_group_commits_run_on_the_loop_and_big_ones_in_a_thread(
    autojump_clock: MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The last commit's real duration decides too: a slow machine must not make this flaky.
    monkeypatch.setattr(hub_module, "INLINE_SECONDS", 60.0)
    # No timer may add store operations (a sweep's) while the batch is counted.
    quiet = {"relay": {"sweep_interval": 3600.0}, "websocket": {"heartbeat_interval": 3600.0}}
    async with (
        RecordingStore.open(":memory:", executor=inline_executor) as store,
        running_hub(quiet, store=store) as env,
    ):
        assert isinstance(store, RecordingStore)
        alice, bob = await env.client("alice"), await env.client("bob")
        a = await env.connect(alice)
        await trio.sleep(1)
        store.inline.clear()
        await a.say(message(bob.uuid, "m0", acknowledge=True))
        await a.next_of("delivery_status")
        assert store.inline == [True]
        store.gate = trio.Event()  # the store lags: a batch grows behind the one held
        burst = INLINE_OPS + 5
        for i in range(1, burst + 1):
            await a.say(message(bob.uuid, f"m{i}", acknowledge=True))
        await trio.testing.wait_all_tasks_blocked()  # the hub has read all it can
        store.gate.set()
        for _ in range(burst):
            await a.next_of("delivery_status")
        held, behind = (len(kinds) for _, kinds in store.commits[-2:])
        assert held <= INLINE_OPS < behind
        assert held + behind == burst
        assert store.inline == [True, True, False]


# --- cluster mode: a real Redis, in real time ---------------------------------------------------


async def test_a_frame_read_as_the_seqs_run_out_waits_for_the_next_block(redis_url: str) -> None:
    """On Redis a client's claim raises the node's seq floor to the shared counter, which
    empties the node's pool of seqs (unless its block is the newest) until the next block is
    reserved. A frame that another
    session was already waiting to read must wait for that block, not be refused with
    ``store_unavailable``: the store is fine, and its sender would have to send it again."""
    overrides = {"store": {"engine": "redis", "url": redis_url}}
    async with (
        GatedRedisStore.open(redis_url) as store,
        open_cluster(hub_config(overrides)) as cluster,
        running_hub(overrides, store=store, cluster=cluster) as env,
    ):
        assert isinstance(store, GatedRedisStore)
        with trio.fail_after(IO_DEADLINE):
            alice, bob = await env.client("alice"), await env.client("bob")
            a = await env.connect(alice)  # her reader now waits for her next frame
            await store.reserve_seqs(1000)  # another node's block: this node's is not the newest
            store.gate = trio.Event()
            env.open(bob.token)
            await store.held.wait()  # bob's claim emptied the pool; its next block is held
            await a.say(message(bob.uuid, "m1"))
            await trio.testing.wait_all_tasks_blocked()  # the hub has read alice's frame
            assert a.frames == []
            store.gate.set()
            status = await a.next()
        assert (status["type"], status["msgid"]) == ("delivery_status", "m1"), status


class FlakyReservations(Store):
    """A store whose first ``failures`` seq reservations fail; ``attempts`` says when each
    came."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failures = 0
        self.attempts: list[float] = []

    async def reserve_seqs(self, count: int) -> int:
        self.attempts.append(trio.current_time())
        if len(self.attempts) <= self.failures:
            raise StoreUnavailable("redis: reservation refused (test)")
        return await super().reserve_seqs(count)


async def test_a_failed_seq_reservation_is_tried_again_after_a_growing_pause(
    autojump_clock: MockClock,
) -> None:
    async with (
        FlakyReservations.open(":memory:", executor=inline_executor) as store,
        running_hub({}, store=store) as env,
    ):
        assert isinstance(store, FlakyReservations)
        store.attempts.clear()  # the hub's first block, reserved when it opened
        store.failures = 4
        start = trio.current_time()
        await env.hub._reserve_seqs(10)
        assert [t - start for t in store.attempts] == pytest.approx([0.0, 0.1, 0.3, 0.7, 1.5])


async def test_a_kick_heard_while_a_claim_is_made_closes_the_session_once_it_is_active(
    redis_url: str,
) -> None:
    """Another node claims bob while this node's claim of him waits for seqs (the session is
    not active yet, so the kick finds nothing to close): once it is active it is closed 4009,
    as the kick would have closed it."""
    overrides = {"store": {"engine": "redis", "url": redis_url}}
    config = hub_config(overrides)
    async with (
        GatedRedisStore.open(redis_url) as store,
        open_cluster(config) as cluster,
        open_cluster(config) as elsewhere,
        running_hub(overrides, store=store, cluster=cluster) as env,
    ):
        assert isinstance(store, GatedRedisStore)
        assert elsewhere is not None
        hub = env.hub
        with trio.fail_after(IO_DEADLINE):
            bob = await env.client("bob")
            await store.reserve_seqs(1000)  # another node's block: this node's is not the newest
            store.gate = trio.Event()
            b = env.open(bob.token)
            await store.held.wait()  # claimed; the node waits for its next block of seqs
            await elsewhere.claim(bob.uuid)
            await hub.until(lambda: hub._claiming.get(bob.uuid, (0, 0))[1] > 0)
            store.gate.set()
            assert (await b.next())["type"] == "connection"
            assert await b.wait_closed() == CloseCode.REPLACED


class GatedClaims(RedisCluster):
    """A cluster whose claims wait while ``gate`` is unset; ``held`` is set once one waits."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = trio.Event()
        self.held = trio.Event()

    async def claim(self, client: str, *, rest: bool = False) -> Claim | None:
        self.held.set()
        await self.gate.wait()
        return await super().claim(client, rest=rest)


async def test_a_claim_made_for_a_session_that_ended_meanwhile_is_given_back(
    redis_url: str,
) -> None:
    overrides = {"store": {"engine": "redis", "url": redis_url}}
    async with (
        RedisStore.open(redis_url) as store,
        GatedClaims.open(
            redis_url, prefix="relayd:", lease=10.0, call_timeout=2.0, seq_key="relayd:seq"
        ) as cluster,
        running_hub(overrides, store=store, cluster=cluster) as env,
    ):
        assert isinstance(cluster, GatedClaims)
        hub = env.hub
        with trio.fail_after(IO_DEADLINE):
            bob = await env.client("bob")
            b = env.open(bob.token)
            await cluster.held.wait()
            b.vanish()  # the socket goes while its claim is being made
            await b.wait_served()
            cluster.gate.set()
            await hub.until(lambda: not hub._claiming and hub.releasing == 0)
            assert await cluster.online([bob.uuid]) == set()


async def test_a_writer_asked_for_while_the_sessions_nursery_closes_is_not_started(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A store batch applied while a socket's session ends (its nursery closing, e.g. cut as
    a slow consumer) may ask for a writer for it: none starts, the session takes nothing
    more, and the hub goes on (it crashed with "Nursery is closed to new arrivals")."""
    async with running_hub({}) as env:
        async with trio.open_nursery() as closed:
            pass
        handle = hub_module._Handle(99, transport=None)  # type: ignore[arg-type]
        handle.nursery = closed
        env.hub._start_writer(handle, [], None)
        state: tuple[object, bool] = (handle.nursery, handle.writing)
        assert state == (None, False)
