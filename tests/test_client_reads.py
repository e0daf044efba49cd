"""The SDK's read receipts against a real relayd (both engines, both async backends):
``Client.read(message)`` sends one, and the sender's ``on_receipt`` gets a ``read`` receipt with
``read_at``; a read receipt of a message still tracked is recorded on its handle, not final."""

from __future__ import annotations

from pathlib import Path

import anyio
import trio

from relayd.client import Client, CredentialFile, Receipt, SendHandle, Status, register
from relayd.client._frames import Receipt as FrameReceipt
from relayd.client._frames import parse
from relayd.client._ledger import Ledger, Phase

from .client_support import run_scenario, scenario_of, url_of
from .support import Engine
from .test_client_e2e import WAIT, backend, relayd_with

__all__ = ["backend"]


def test_a_read_receipt_is_parsed_and_is_not_final() -> None:
    frame = '{"type":"delivery_update","msgid":"m1","to":"b","status":"read","read_at":5.5}'
    receipt = parse(frame)
    assert receipt == FrameReceipt("m1", "read", "b", 0.0, "", False, "delivery_update", 5.5)
    assert isinstance(receipt, FrameReceipt)
    assert not receipt.final
    ledger = Ledger()
    entry = ledger.add("m1", {"to": "b", "msgid": "m1"})
    ledger.written(entry)
    ledger.receipt(FrameReceipt("m1", "pending_ack"))
    assert ledger.receipt(receipt) is entry
    assert (entry.phase, [r.status for r in entry.receipts]) == (
        Phase.ACCEPTED,
        ["pending_ack", "read"],
    )


async def test_read_sends_a_read_receipt_that_the_sender_gets(
    nursery: trio.Nursery, tmp_path: Path, backend: str, engine: Engine
) -> None:
    relayd = await relayd_with(nursery, tmp_path, engine)
    url = url_of(relayd)

    async def scenario() -> None:
        alice_file = CredentialFile(tmp_path / backend / "alice.json")
        bob_file = CredentialFile(tmp_path / backend / "bob.json")
        await register(url, "alice", alice_file)
        bob = await register(url, "bob", bob_file)
        reads: list[Receipt] = []
        read = anyio.Event()

        def on_receipt(receipt: Receipt, handle: SendHandle | None) -> None:
            if receipt.status == Status.READ:
                reads.append(receipt)
                read.set()

        async with (
            Client(alice_file, on_receipt=on_receipt) as alice,
            Client(bob_file) as bob_client,
        ):
            await alice.wait_connected(timeout=WAIT)
            await bob_client.wait_connected(timeout=WAIT)
            handle = await alice.send(bob.uuid, "read me")
            message = await bob_client.receive(timeout=WAIT)
            bob_client.ack(message)
            bob_client.read(message)
            assert (await handle.result(timeout=WAIT)).status == "acknowledged"
            with anyio.fail_after(WAIT):
                await read.wait()
        [receipt] = reads
        assert (receipt.msgid, receipt.to, receipt.kind) == (
            handle.msgid,
            bob.uuid,
            "delivery_update",
        )
        assert receipt.read_at is not None

    await run_scenario(backend, scenario_of(scenario))
