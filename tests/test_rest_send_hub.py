"""``Hub.submit`` (``POST /messages``) under Trio's fake clock: every wait has its deadline, and
what waits is bounded (issue 14). The store is a :class:`GatedStore`, so a commit can be held
back as long as a test needs; times are exact virtual instants."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from relayd._relay.frames import ProtocolError

from .hub_support import gated_store, running_hub

TIMEOUT = 10.0


async def test_without_a_first_receipt_by_the_deadline_the_answer_is_accepted(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with gated_store() as store, running_hub(store=store) as env:
        alice, bob = await env.client("alice"), await env.client("bob")
        store.gate = trio.Event()  # commits wait
        start = trio.current_time()
        receipt = await env.hub.submit(
            alice.uuid,
            {"to": bob.uuid, "msgid": "m1"},
            deadline=start + TIMEOUT,
            max_waiting=8,
        )
        assert trio.current_time() == start + TIMEOUT
        assert (receipt["msgid"], receipt["to"], receipt["status"]) == ("m1", bob.uuid, "accepted")
        assert env.hub.core.receipts.tickets == 0  # abandoned: nothing waits for it
        store.gate.set()
        await env.hub.until(lambda: env.hub.core.pending_commit == 0)
        count, rows = await env.store.undelivered(bob.uuid, 10)
        assert (count, [r.msgid for r in rows]) == (1, ["m1"])


async def test_past_max_waiting_a_submission_is_refused_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with gated_store() as store, running_hub(store=store) as env:
        alice, bob = await env.client("alice"), await env.client("bob")
        store.gate = trio.Event()
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: env.hub.submit(
                    alice.uuid, {"to": bob.uuid}, deadline=start + TIMEOUT, max_waiting=1
                )
            )
            await trio.testing.wait_all_tasks_blocked()
            assert store.waiting == 1  # the first waits for its commit
            with pytest.raises(ProtocolError) as refused:
                await env.hub.submit(
                    bob.uuid, {"to": alice.uuid}, deadline=start + TIMEOUT, max_waiting=1
                )
            assert trio.current_time() == start
            assert (refused.value.code, refused.value.details) == (
                "server_busy",
                {"retry_after": 1.0},
            )
            store.gate.set()
        assert trio.current_time() == start


async def test_while_the_store_lags_a_submission_waits_to_be_read_until_its_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with (
        gated_store() as store,
        running_hub({"relay": {"max_pending_commit": 1}}, store=store) as env,
    ):
        alice, bob = await env.client("alice"), await env.client("bob")
        store.gate = trio.Event()
        start = trio.current_time()
        first = await env.hub.submit(
            alice.uuid, {"to": bob.uuid, "msgid": "m1"}, deadline=start + 1.0, max_waiting=8
        )
        assert first["status"] == "accepted"  # its commit is held: one awaits a commit
        with pytest.raises(ProtocolError) as refused:
            await env.hub.submit(
                alice.uuid, {"to": bob.uuid, "msgid": "m2"}, deadline=start + 5.0, max_waiting=8
            )
        assert trio.current_time() == start + 5.0
        assert refused.value.code == "server_busy"
        # Once the store catches up, the next is read and answered.
        store.gate.set()
        receipt = await env.hub.submit(
            alice.uuid, {"to": bob.uuid, "msgid": "m3"}, deadline=start + 10.0, max_waiting=8
        )
        assert receipt["status"] == "queued_offline"
        count, rows = await env.store.undelivered(bob.uuid, 10)
        assert (count, [r.msgid for r in rows]) == (2, ["m1", "m3"])


async def test_a_request_that_goes_away_leaves_its_message_accepted(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with gated_store() as store, running_hub(store=store) as env:
        alice, bob = await env.client("alice"), await env.client("bob")
        store.gate = trio.Event()
        start = trio.current_time()
        with trio.move_on_after(1.0):  # the client hung up
            await env.hub.submit(
                alice.uuid, {"to": bob.uuid, "msgid": "m1"}, deadline=start + TIMEOUT, max_waiting=8
            )
        assert trio.current_time() == start + 1.0
        assert env.hub.core.receipts.tickets == 0
        store.gate.set()
        await env.hub.until(lambda: env.hub.core.pending_commit == 0)
        count, rows = await env.store.undelivered(bob.uuid, 10)
        assert (count, [r.msgid for r in rows]) == (1, ["m1"])
