"""Two clients talking through relayd, in one program: register both, send, await receipts.

python contrib/examples/two_clients.py [--url http://127.0.0.1:8000] [--backend asyncio]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import anyio

from relayd.client import Client, CredentialFile, register


async def main(url: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        alice_file = CredentialFile(Path(directory) / "alice.json")
        bob_file = CredentialFile(Path(directory) / "bob.json")
        await register(url, "alice", alice_file)
        bob = await register(url, "bob", bob_file)
        async with Client(alice_file) as alice, Client(bob_file) as bob_client:
            handle = await alice.send(bob.uuid, "hello bob")
            message = await bob_client.receive(timeout=10)
            print(f"bob got {message.content!r} from {message.sender}")
            bob_client.ack(message)
            receipt = await handle.result(timeout=10)
            print("alice's receipts:", [r.status for r in handle.receipts], "->", receipt.status)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--backend", choices=["trio", "asyncio"], default="trio")
    args = parser.parse_args()
    anyio.run(main, args.url, backend=args.backend)
