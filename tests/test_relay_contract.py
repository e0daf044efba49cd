"""The fake link and the real driver agree: one scenario through CoreHarness and through the hub.

:class:`~tests.relay_harness.CoreHarness` re-implements the hub's part (carrying out the core's
actions, feeding back store results, writes and closes) so that the core can be tested without
Trio. A test of the core through it proves something about relayd only as long as the two
dispatch alike. This test runs one scripted scenario through both, the harness and the real
:class:`~relayd._relay.hub.Hub` on fake sockets (:mod:`tests.hub_support`, under
``autojump_clock``, the store called inline), with the same settings, at the same instants,
and compares what each peer sees: every frame each client's sockets received, in order, and
the store's final rows. Client uuids become names and times become offsets from the start, so
that the two runs compare exactly.

The scenario: two clients authenticate (token in the handshake); a message without ack; one
with ack, acknowledged; one with ack left unacknowledged, redelivered after ack_timeout and its
backoff, then acknowledged; the recipient drops, two messages wait for it in the store; the
sender drops too; the recipient comes back and gets them (acknowledging one); the sender comes
back and gets the receipts owed to it; the expiry sweep passes.

Both run on SQLite: the harness is SQLite's (its store calls run in one transaction on the
connection it holds), the rows compared are SQLite's, and the hub runs under ``autojump_clock``
with its store called inline (see test_relay_hub.py).

Neither side's sockets can ping (``pong_observable`` false): the harness counts the core's pings
but, unlike the hub, never answers them.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import trio
import trio.testing

from relayd._store import Store, inline_executor

from .hub_support import HubEnv, Peer, hub_config, running_hub, virtual_clock
from .relay_harness import DELIVERY_ROWS, T0, Client, CoreHarness

MockClock = trio.testing.MockClock

SETTINGS: dict[str, Any] = {
    "relay": {"ack_timeout": 10.0, "backoff_initial": 1.0, "sweep_interval": 30.0},
}
# Keys whose values are instants: compared as offsets from the start of the run.
INSTANTS = frozenset(
    {"timestamp", "token_expires_at", "expires_at", "accepted_at", "finished_at", "delivered_at"}
)


class World(Protocol):
    """A relay the scenario drives: the harness, or the hub."""

    async def connect(self, name: str) -> None: ...
    async def say(self, name: str, frame: Mapping[str, Any]) -> None: ...
    async def leave(self, name: str) -> None: ...
    async def wait(self, seconds: float) -> None: ...


def message(to: str, msgid: str, *, acknowledge: bool) -> dict[str, Any]:
    return {"to": to, "msgid": msgid, "content": f"content of {msgid}", "acknowledge": acknowledge}


async def scenario(world: World, uuids: Mapping[str, str]) -> None:
    bob = uuids["bob"]
    await world.connect("alice")
    await world.connect("bob")
    await world.say("alice", message(bob, "m1", acknowledge=False))
    await world.say("alice", message(bob, "m2", acknowledge=True))
    await world.say("bob", {"type": "ack", "msgid": "m2"})
    await world.say("alice", message(bob, "m3", acknowledge=True))
    await world.wait(11.0)  # ack_timeout, then the first backoff: m3 again
    await world.say("bob", {"type": "ack", "msgid": "m3"})
    await world.leave("bob")
    await world.say("alice", message(bob, "m4", acknowledge=False))
    await world.say("alice", message(bob, "m5", acknowledge=True))
    await world.leave("alice")
    await world.wait(2.0)
    await world.connect("bob")  # m4 and m5 come after the welcome
    await world.say("bob", {"type": "ack", "msgid": "m5"})
    await world.wait(2.0)
    await world.connect("alice")  # the receipts owed to her come after the welcome
    await world.wait(30.0)  # the sweep passes: nothing left to expire


class HarnessWorld:
    def __init__(self) -> None:
        config = hub_config(SETTINGS)
        self.h = CoreHarness(config.relay, config.websocket)
        self.clients: dict[str, Client] = {name: self.h.client(name) for name in ("alice", "bob")}
        self.sessions: dict[str, list[int]] = {name: [] for name in self.clients}

    async def connect(self, name: str) -> None:
        self.sessions[name].append(self.h.open(token=self.clients[name].token, pong=False))

    async def say(self, name: str, frame: Mapping[str, Any]) -> None:
        self.h.send(self.sessions[name][-1], dict(frame))

    async def leave(self, name: str) -> None:
        self.h.disconnect(self.sessions[name][-1])

    async def wait(self, seconds: float) -> None:
        self.h.advance(seconds)

    def seen(self) -> dict[str, list[list[dict[str, Any]]]]:
        return {name: [self.h.log[sid] for sid in sids] for name, sids in self.sessions.items()}


class HubWorld:
    def __init__(self, env: HubEnv, tokens: Mapping[str, str]) -> None:
        self.env = env
        self.tokens = tokens
        self.peers: dict[str, list[Peer]] = {name: [] for name in tokens}

    async def connect(self, name: str) -> None:
        self.peers[name].append(self.env.open(self.tokens[name], pong=False))
        await trio.testing.wait_all_tasks_blocked()

    async def say(self, name: str, frame: Mapping[str, Any]) -> None:
        await self.peers[name][-1].say(frame)
        await trio.testing.wait_all_tasks_blocked()

    async def leave(self, name: str) -> None:
        peer = self.peers[name][-1]
        peer.vanish()
        await peer.wait_served()
        await trio.testing.wait_all_tasks_blocked()

    async def wait(self, seconds: float) -> None:
        await trio.sleep(seconds)
        await trio.testing.wait_all_tasks_blocked()

    def seen(self) -> dict[str, list[list[dict[str, Any]]]]:
        return {name: [peer.frames for peer in peers] for name, peers in self.peers.items()}


def normalised(value: Any, names: Mapping[str, str], start: float, key: str = "") -> Any:
    """``value`` with client uuids replaced by names, and instants by offsets from ``start``."""
    if isinstance(value, dict):
        return {k: normalised(v, names, start, k) for k, v in value.items()}
    if isinstance(value, list):
        return [normalised(v, names, start) for v in value]
    if isinstance(value, str):
        if key == "fields" and value:
            return normalised(json.loads(value), names, start)
        return names.get(value, value)
    if key in INSTANTS and isinstance(value, int | float) and not isinstance(value, bool):
        return value - start
    return value


def rows(db: sqlite3.Connection) -> list[dict[str, Any]]:
    db.row_factory = sqlite3.Row
    return [dict(row) for row in db.execute(f"{DELIVERY_ROWS} ORDER BY seq")]


async def test_the_harness_and_the_hub_show_every_peer_the_same(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    # Through the harness.
    harness = HarnessWorld()
    names = {client.uuid: name for name, client in harness.clients.items()}
    await scenario(harness, {name: c.uuid for name, c in harness.clients.items()})
    expected_seen = normalised(harness.seen(), names, T0)
    expected_rows = normalised(rows(harness.h.db), names, T0)

    # Through the hub, on a store in a file, so that its rows can be read once it is closed.
    path = str(tmp_path / "relayd.sqlite3")
    async with (
        Store.open(path, executor=inline_executor) as store,
        running_hub(SETTINGS, store=store) as env,
    ):
        start = virtual_clock()
        alice, bob = await env.client("alice"), await env.client("bob")
        hub = HubWorld(env, {"alice": alice.token, "bob": bob.token})
        await scenario(hub, {"alice": alice.uuid, "bob": bob.uuid})
        seen = normalised(hub.seen(), {alice.uuid: "alice", bob.uuid: "bob"}, start)
    with sqlite3.connect(path) as db:
        stored = normalised(rows(db), {alice.uuid: "alice", bob.uuid: "bob"}, start)

    # What the scenario is meant to show happened (in the harness's run).
    [bob_before, bob_after] = expected_seen["bob"]
    got = [(f["msgid"], f["attempt"]) for f in bob_before if f["type"] == "message"]
    assert got == [("m1", 1), ("m2", 1), ("m3", 1), ("m3", 2)]
    assert [f["type"] for f in bob_after[:3]] == ["connection", "message", "message"]
    [_, alice_after] = expected_seen["alice"]
    assert [(f["type"], f.get("msgid"), f.get("status")) for f in alice_after] == [
        ("connection", None, None),
        ("delivery_update", "m4", "delivered"),
        ("delivery_update", "m5", "acknowledged"),
    ]
    assert [(r["msgid"], r["status"], r["receipt_pending"]) for r in expected_rows] == [
        ("m1", "delivered", 0),
        ("m2", "acknowledged", 0),
        ("m3", "acknowledged", 0),
        ("m4", "delivered", 0),
        ("m5", "acknowledged", 0),
    ]

    # The contract: the hub showed every peer the same, and left the same store.

    assert seen == expected_seen
    assert stored == expected_rows
