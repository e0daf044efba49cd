"""An echo bot on the relayd client SDK: answers every message with its own text.

    python contrib/examples/echo.py --as echo          # after: relayd register echo

It runs under Trio here; ``anyio.run(main, backend="asyncio")`` runs it under asyncio.
"""

from __future__ import annotations

import argparse
import contextlib

import anyio

from relayd.client import Client, CredentialFile, Message


async def main(name: str) -> None:
    # Where `relayd register echo` keeps it (~/.config/relayd/clients/echo.json).
    async with Client(CredentialFile.named(name)) as client:
        print(f"# {client.name} ({client.uuid}) echoes", flush=True)

        async def echo(message: Message) -> None:
            # Acknowledged once this returns: a crash before then means relayd redelivers.
            await client.send(message.sender, message.content, conversation_id=message.msgid)

        await client.serve(echo)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--as", dest="name", required=True)
    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(main, parser.parse_args().name, backend="trio")
