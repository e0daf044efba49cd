"""The SDK's end-to-end helper against a real relayd, under Trio and asyncio: sealed messages
that relayd's store never holds in plain text, pinned fingerprints, ``key_changed`` frames,
and the helper's refusals (no PyNaCl, no key, a key that changed, a tampered box)."""

from __future__ import annotations

import base64
import hashlib
import stat
import sys
from pathlib import Path

import anyio
import pytest
import trio

from relayd.client import (
    Client,
    CredentialFile,
    DecryptError,
    E2EUnavailable,
    EndToEnd,
    KeyChange,
    KeyFile,
    KeyMismatch,
    NoPeerKey,
    is_encrypted,
    register,
)

from .client_support import BACKENDS, registered, run_scenario, scenario_of, url_of
from .support import Engine, RunningRelayd, make_config, start_relayd

WAIT = 15.0
SECRET = "the plans are in the third drawer"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


async def stored_contents(relayd: RunningRelayd, recipient: str) -> list[str]:
    """The fields of every message queued for ``recipient`` as relayd itself reads them from
    its store, on either engine (its encryption at rest undone), on this test's Trio loop."""
    hub = relayd.daemon.hub
    assert hub is not None
    _, messages = await hub.store.undelivered(recipient, 100)
    return [message.fields for message in messages]


async def identities(url: str, directory: Path, *names: str) -> list[CredentialFile]:
    files = [CredentialFile(directory / f"{name}.json") for name in names]
    for name, store in zip(names, files, strict=True):
        await register(url, name, store)
    return files


async def test_an_encrypted_message_is_opaque_to_relayd_and_opens_for_its_recipient(
    nursery: trio.Nursery, tmp_path: Path, backend: str, engine: Engine
) -> None:
    relayd = await start_relayd(nursery, make_config(tmp_path / "relayd", engine=engine))
    url = url_of(relayd)
    alice_file, bob_file = await identities(url, tmp_path / "ids", "alice", "bob")
    bob_uuid = bob_file.load_sync().uuid
    fingerprints: dict[str, str] = {}

    async def publish_and_send() -> None:
        async with Client(bob_file) as bob:
            fingerprints["bob"] = await EndToEnd(bob, KeyFile.beside(bob_file)).publish()
        async with Client(alice_file) as alice:
            e2e = EndToEnd(alice, KeyFile.beside(alice_file))
            key = await e2e.peer_key("bob")  # by name, as a user types it
            fingerprints["seen"] = key.fingerprint
            assert key.newly_pinned
            handle = await e2e.send(bob_uuid, SECRET)
            assert (await handle.accepted(timeout=WAIT)).status == "queued_offline"
            assert await e2e.pinned(bob_uuid) == key.fingerprint

    await run_scenario(backend, scenario_of(publish_and_send))
    # What relayd stores (and would back up) for the queued message: no plain text.
    [fields] = await stored_contents(relayd, bob_uuid)
    assert SECRET not in fields
    assert f'"content":"relayd-e2e.v1:sealedbox:{fingerprints["bob"]}:' in fields
    assert fingerprints["seen"] == fingerprints["bob"]

    async def receive() -> None:
        async with Client(bob_file) as bob:
            e2e = EndToEnd(bob, KeyFile.beside(bob_file))
            message = await bob.receive(timeout=WAIT)
            assert e2e.is_encrypted(message)
            assert await e2e.decrypt(message) == SECRET
            bob.ack(message)

    await run_scenario(backend, scenario_of(receive))
    key_file = tmp_path / "ids" / "bob.e2e.json"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # The published key is the one kept beside bob's identity.
    public = bob_file.path.with_name("bob.e2e.json")
    assert public == KeyFile.beside(bob_file).path


async def test_a_key_change_is_flagged_by_the_frame_and_by_the_pin(
    nursery: trio.Nursery, tmp_path: Path, backend: str, engine: Engine
) -> None:
    relayd = await start_relayd(nursery, make_config(tmp_path / "relayd", engine=engine))
    url = url_of(relayd)
    alice_file, bob_file = await identities(url, tmp_path / "ids", "alice", "bob")
    bob_uuid = bob_file.load_sync().uuid

    async def scenario() -> None:
        changes: list[KeyChange] = []
        changed = anyio.Event()

        def on_key_changed(change: KeyChange) -> None:
            changes.append(change)
            changed.set()

        async with (
            Client(alice_file, on_key_changed=on_key_changed) as alice,
            Client(bob_file) as bob,
        ):
            bob_e2e = EndToEnd(bob, KeyFile.beside(bob_file))
            first = await bob_e2e.publish()
            alice_e2e = EndToEnd(alice, KeyFile.beside(alice_file))
            await alice.wait_connected(timeout=WAIT)
            in_flight = await alice_e2e.encrypt(bob_uuid, "sealed to the first key")
            second = await bob_e2e.publish(rotate=True)
            with anyio.fail_after(WAIT):
                await changed.wait()
            [change] = changes
            assert (change.client, change.algorithm) == (bob_uuid, "x25519")
            assert (change.previous_fingerprint, change.fingerprint) == (first, second)
            assert alice_e2e.key_changes == [change]
            # The pin holds: nothing is sealed to the new key until alice trusts it.
            with pytest.raises(KeyMismatch) as mismatch:
                await alice_e2e.send(bob_uuid, "to whom?")
            assert (mismatch.value.pinned, mismatch.value.current) == (first, second)
            with pytest.raises(KeyMismatch):
                await alice_e2e.trust(bob_uuid, first)
            await alice_e2e.trust(bob_uuid, second)
            await alice_e2e.send(bob_uuid, "to the second key")
            message = await bob.receive(timeout=WAIT)
            assert await bob_e2e.decrypt(message) == "to the second key"
            bob.ack(message)
            # A message sealed to the key before the rotation still opens.
            assert await bob_e2e.decrypt(in_flight) == "sealed to the first key"

    await run_scenario(backend, scenario_of(scenario))


async def test_refusals_no_key_tampered_boxes_and_foreign_keys(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine
) -> None:
    relayd = await start_relayd(nursery, make_config(tmp_path / "relayd", engine=engine))
    url = url_of(relayd)
    alice_file, bob_file, carol_file = await identities(
        url, tmp_path / "ids", "alice", "bob", "carol"
    )
    bob_uuid = bob_file.load_sync().uuid
    with trio.fail_after(WAIT):
        async with (
            Client(alice_file) as alice,
            Client(bob_file) as bob,
            Client(carol_file) as carol,
        ):
            alice_e2e = EndToEnd(alice, KeyFile.beside(alice_file))
            with pytest.raises(NoPeerKey):
                await alice_e2e.encrypt(bob_uuid, "bob has no key yet")
            bob_e2e = EndToEnd(bob, KeyFile.beside(bob_file))
            await bob_e2e.publish()
            await EndToEnd(carol, KeyFile.beside(carol_file)).publish()
            sealed = await alice_e2e.encrypt(bob_uuid, "for bob")
            carol_e2e = EndToEnd(carol, KeyFile.beside(carol_file))
            with pytest.raises(DecryptError, match="does not hold"):
                await carol_e2e.decrypt(sealed)
            head, _, body = sealed.rpartition(":")
            box = bytearray(base64.b64decode(body))
            box[-1] ^= 1
            tampered = f"{head}:{base64.b64encode(bytes(box)).decode()}"
            with pytest.raises(DecryptError, match="does not open"):
                await bob_e2e.decrypt(tampered)
            with pytest.raises(DecryptError, match=r"not a relayd-e2e\.v1"):
                await bob_e2e.decrypt("relayd-e2e.v1:other:x:y")
            assert await bob_e2e.decrypt(sealed) == "for bob"
            assert not is_encrypted("plain text")


async def test_without_pynacl_the_helper_names_the_extra(
    relayd: RunningRelayd, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    store = await registered(url_of(relayd), "alice")
    # An import of a module set to None in sys.modules raises ImportError, as if absent.
    monkeypatch.setitem(sys.modules, "nacl.public", None)
    key_file = KeyFile(tmp_path / "alice.e2e.json")
    with trio.fail_after(WAIT):
        async with Client(store) as client:
            e2e = EndToEnd(client, key_file)
            with pytest.raises(E2EUnavailable, match=r"pip install 'relayd\[e2e\]'"):
                await e2e.publish()
            fingerprint = hashlib.sha256(b"k").hexdigest()
            with pytest.raises(E2EUnavailable, match=r"relayd\[e2e\]"):
                await e2e.decrypt(f"relayd-e2e.v1:sealedbox:{fingerprint}:AAAA")
    assert not key_file.path.exists()
