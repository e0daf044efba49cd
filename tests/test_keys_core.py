"""``key_changed`` in the sans-I/O core (rule 7): pushed to an online correspondent at once,
owed in the store until its frame is written, loaded on connect and as a crowded socket drains,
told once when written."""

from __future__ import annotations

from typing import Any

from relayd._config import WebsocketConfig
from relayd._relay.records import KeyNotice

from .relay_harness import Client, CoreHarness


def owe(h: CoreHarness, reader: str, client: str, n: int) -> KeyNotice:
    """Store a key change owed to ``reader`` (as a publication does) and return it."""
    notice = KeyNotice(reader, client, "x25519", f"{n:064x}", f"{n - 1:064x}", h.now + n)
    h.db.execute(
        "INSERT INTO key_notices"
        " (reader_uuid, client_uuid, algorithm, fingerprint, previous, changed_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (
            notice.reader,
            notice.client,
            notice.algorithm,
            notice.fingerprint,
            notice.previous,
            notice.changed_at,
        ),
    )
    return notice


def owed(h: CoreHarness, reader: str) -> list[str]:
    rows = h.db.execute(
        "SELECT fingerprint FROM key_notices WHERE reader_uuid = ? ORDER BY changed_at", (reader,)
    )
    return [r[0] for r in rows]


def connect(h: CoreHarness, client: Client) -> int:
    """A session for ``client`` past its welcome, on a harness that writes only when told."""
    sid = h.open(token=client.token)
    h.flush(sid)
    welcome, *rest = h.read(sid)
    assert welcome["type"] == "connection"
    h.sessions[sid].written[:0] = rest
    return sid


def key_frames(frames: list[dict[str, Any]]) -> list[str]:
    return [f["fingerprint"] for f in frames if f["type"] == "key_changed"]


def test_an_online_correspondent_is_sent_the_change_at_once_and_it_is_cleared_once_written() -> (
    None
):
    h = CoreHarness(auto_flush=False)
    alice, bob = h.client("alice"), h.client("bob")
    b = connect(h, bob)
    notice = owe(h, bob.uuid, alice.uuid, 1)
    h.core.key_changed([notice], h.now)
    h.run()
    [(_, ref)] = h.sessions[b].outbox
    assert ref == notice
    assert owed(h, bob.uuid) == [notice.fingerprint]  # owed until written
    h.flush(b)
    [frame] = h.read(b)
    assert frame == {
        "type": "key_changed",
        "client": alice.uuid,
        "algorithm": "x25519",
        "fingerprint": notice.fingerprint,
        "previous_fingerprint": notice.previous,
        "changed_at": notice.changed_at,
        "timestamp": h.now,
    }
    h.commit()  # the clear rides with the next commit
    assert owed(h, bob.uuid) == []


def test_an_offline_correspondent_is_told_on_connect_once() -> None:
    h = CoreHarness()
    alice, bob = h.client("alice"), h.client("bob")
    notice = owe(h, bob.uuid, alice.uuid, 1)
    h.core.key_changed([notice], h.now)  # bob is offline: nothing to send
    h.run()
    b = h.connect(bob)
    assert key_frames(h.read(b)) == [notice.fingerprint]
    h.commit()
    h.disconnect(b)
    b = h.connect(bob)
    assert key_frames(h.read(b)) == []


def test_a_change_never_written_stays_owed_for_the_next_session() -> None:
    h = CoreHarness(auto_flush=False)
    alice, bob = h.client("alice"), h.client("bob")
    b = connect(h, bob)
    notice = owe(h, bob.uuid, alice.uuid, 1)
    h.core.key_changed([notice], h.now)
    h.run()
    h.disconnect(b, interrupted=1)  # cut mid-write: it may not have arrived
    assert owed(h, bob.uuid) == [notice.fingerprint]
    b = connect(h, bob)
    h.flush(b)
    assert key_frames(h.read(b)) == [notice.fingerprint]
    h.commit()
    assert owed(h, bob.uuid) == []


def test_a_burst_of_changes_waits_in_the_store_and_is_loaded_as_the_socket_drains() -> None:
    # Room for 6 frames (3/4 of 8) before the rest stay owed; pages of 2.
    h = CoreHarness(websocket=WebsocketConfig(outbound_buffer=8), auto_flush=False)
    bob = h.client("bob")
    b = connect(h, bob)
    clients = [h.client(f"c{i}") for i in range(10)]
    notices = [owe(h, bob.uuid, c.uuid, i + 1) for i, c in enumerate(clients)]
    h.core.key_changed(notices, h.now)
    h.run()
    assert len(h.sessions[b].outbox) == 6  # never more than the socket's room
    told: list[str] = []
    while h.sessions[b].outbox:
        h.flush(b)
        h.commit()
        told += key_frames(h.read(b))
    assert told == [n.fingerprint for n in notices]
    assert owed(h, bob.uuid) == []
    assert h.sessions[b].closed is None
