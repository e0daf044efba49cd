"""The terminal chat, driven headlessly with Textual's pilot against a real relayd.

Textual runs on asyncio: the app runs on an asyncio loop in a worker thread (see
``client_support.run_scenario``) while relayd runs in-process on the test's Trio loop. Bob is
an SDK client on the same asyncio loop. Each step waits for the screen to show what it expects
(``ChatApp.wait_for``, woken by every screen update), under a deadline.
"""

from __future__ import annotations

from pathlib import Path

import trio

from relayd.client import Client
from relayd.client.chat import ChatApp

from .client_support import registered, run_scenario, scenario_of, url_of
from .support import Engine, make_config, start_relayd

WAIT = 15.0


async def test_a_chat_shows_receipts_as_they_arrive_and_the_peers_messages(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start_relayd(nursery, make_config(tmp_path, engine=engine))
    url = url_of(relayd)

    async def scenario() -> None:
        alice = await registered(url, "alice")
        bob = await registered(url, "bob")
        app = ChatApp(alice, "bob")  # the peer by name, resolved through the directory
        async with app.run_test() as pilot, Client(bob) as bob_client:
            await app.wait_for(lambda: app.peer != "" and app.status() == "connected", WAIT)
            assert app.peer == bob.credentials.uuid
            await pilot.press(*"hello bob", "enter")
            got = await bob_client.receive(timeout=WAIT)
            assert (got.content, got.sender) == ("hello bob", alice.credentials.uuid)
            [line] = app.sent.values()
            # Bob has it and has not acknowledged it yet: "sent", not yet acknowledged.
            await app.wait_for(lambda: "[sent]" in str(line.content), WAIT)
            bob_client.ack(got)
            await app.wait_for(lambda: "acknowledged ✓✓" in str(line.content), WAIT)
            assert str(line.content) == "you: hello bob   [acknowledged ✓✓]"
            await bob_client.send(alice.credentials.uuid, "hi alice")
            await app.wait_for(lambda: "bob: hi alice" in app.lines, WAIT)
            handle = await bob_client.send(alice.credentials.uuid, "are you there?")
            await app.wait_for(lambda: "bob: are you there?" in app.lines, WAIT)
            # The first was acknowledged once the chat showed it and moved on to the next.
            assert handle.msgid != got.msgid
            await pilot.press("ctrl+c")

    await run_scenario("asyncio", scenario_of(scenario))
