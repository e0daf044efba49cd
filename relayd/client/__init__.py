"""relayd's Python client: register, connect, send and receive, under asyncio or Trio.

A client is one identity (a uuid and its secret) kept in a credentials file::

    import anyio
    from relayd.client import Client, CredentialFile, register

    async def main() -> None:
        alice = CredentialFile("alice.json")
        if not alice.exists():
            await register("http://127.0.0.1:8000", "alice", alice)
        async with Client(alice) as client:
            handle = await client.send("8cb0dec9-9342-4eba-89f7-28f97513c0c5", "hello")
            print((await handle.result()).status)  # acknowledged
            async for message in client.messages():
                print(message.sender, message.content)

    anyio.run(main)                      # asyncio; anyio.run(main, backend="trio") for Trio

The client reconnects by itself (see :mod:`relayd.client._policy` for what each close code
does), renews its tokens in band, sends again what a lost connection left unanswered (same
msgid: relayd deduplicates), and acknowledges each message once the application has handled
it. With the ``e2e`` extra, :class:`EndToEnd` seals messages to a peer's key from relayd's key
directory (see its module, ``relayd.client._e2e``). Everything else in this package is
private.
"""

from __future__ import annotations

from ._client import Client, ClientOptions, MessageStream, SendHandle, State
from ._credentials import (
    CredentialFile,
    Credentials,
    CredentialStore,
    MemoryCredentials,
    TokenPair,
)
from ._e2e import (
    DecryptError,
    E2EError,
    E2EUnavailable,
    EndToEnd,
    KeyFile,
    KeyMismatch,
    NoPeerKey,
    PeerKey,
    is_encrypted,
)
from ._errors import (
    AuthenticationError,
    ClientError,
    ConnectTimeout,
    CredentialsError,
    CredentialsInUse,
    HttpError,
    InvalidMessage,
    ReceiptTimeout,
    ServerUnreachable,
    SessionEnded,
)
from ._frames import KeyChange, Message, Receipt, Status
from ._policy import Action, Decision, ReconnectPolicy
from ._register import register
from ._rest import DirectoryEntry, PeerKeys, PublicKey, RestClient

__all__ = [
    "Action",
    "AuthenticationError",
    "Client",
    "ClientError",
    "ClientOptions",
    "ConnectTimeout",
    "CredentialFile",
    "CredentialStore",
    "Credentials",
    "CredentialsError",
    "CredentialsInUse",
    "Decision",
    "DecryptError",
    "DirectoryEntry",
    "E2EError",
    "E2EUnavailable",
    "EndToEnd",
    "HttpError",
    "InvalidMessage",
    "KeyChange",
    "KeyFile",
    "KeyMismatch",
    "MemoryCredentials",
    "Message",
    "MessageStream",
    "NoPeerKey",
    "PeerKey",
    "PeerKeys",
    "PublicKey",
    "Receipt",
    "ReceiptTimeout",
    "ReconnectPolicy",
    "RestClient",
    "SendHandle",
    "ServerUnreachable",
    "SessionEnded",
    "State",
    "Status",
    "TokenPair",
    "is_encrypted",
    "register",
]
