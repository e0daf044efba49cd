"""``relayd register``, ``send``, ``listen`` and ``chat``: the client SDK on the command line.

Pipe-friendly: standard output carries JSON lines only (one object per line, flushed as it is
written); people's messages go to standard error. A client's identity lives in a credentials
file, ``<credentials dir>/<name>.json`` (``--as NAME``), written by ``relayd register``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from typing import Any

import anyio

from ._client import Client, SendHandle
from ._credentials import CredentialFile
from ._e2e import (
    ALGORITHM,
    DecryptError,
    E2EError,
    E2EUnavailable,
    EndToEnd,
    KeyFile,
    KeyMismatch,
    NoPeerKey,
    is_encrypted,
)
from ._errors import (
    AuthenticationError,
    ClientError,
    CredentialsError,
    HttpError,
    InvalidMessage,
    SessionEnded,
)
from ._frames import KeyChange, Message, Receipt
from ._register import register

EXIT_OK = 0
EXIT_FAILURE = 1  # relayd unreachable, or a timeout
EXIT_USAGE = 2
EXIT_CREDENTIALS = 3  # no credentials, or relayd refused them (revoked, deleted, replaced)
EXIT_NOT_DELIVERED = 4  # send: a message was rejected, failed or expired
EXIT_KEY_CHANGED = 5  # a peer's key is not the one pinned: verify it, then `relayd keys trust`
EXIT_INTERRUPTED = 130

CLIENT_HELP = """\
client commands (JSON lines on stdout, one object per line):
  relayd register NAME [--url URL] [--invite CODE]
                                     register a client; keep its identity as NAME
  relayd send --as NAME TO [TEXT]    send TEXT (or each line of stdin) to TO (uuid or name)
  relayd send --as NAME --encrypt TO [TEXT]   the same, sealed to TO's key (relayd[e2e])
  relayd listen --as NAME            print each message received (decrypted), then ack it
  relayd keys publish --as NAME      make (--rotate: replace) and publish an encryption key
  relayd keys show --as NAME PEER    PEER's keys and fingerprints, and the one pinned
  relayd keys trust --as NAME PEER FINGERPRINT   pin PEER's current key after checking it
  relayd chat --as NAME PEER         a conversation in the terminal (pip install 'relayd[chat]')
  Identities live in $XDG_CONFIG_HOME/relayd/clients (or ~/.config/relayd/clients), 0600.
  Client exit codes: 0 ok, 1 relayd unreachable or timeout, 2 usage, 3 credentials missing or
  refused (revoked, deleted, replaced by another session), 4 a message was not delivered
  (rejected, failed, expired), 5 a peer's key is not the pinned one, 130 interrupted.
"""


class UsageError(ClientError):
    """The command line asks for something impossible (exit 2)."""


def credential_file(args: argparse.Namespace, name: str) -> CredentialFile:
    try:
        return CredentialFile.named(name, args.credentials_dir)
    except CredentialsError as exc:
        raise UsageError(f"--as: {exc}") from None


def emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def say(text: str) -> None:
    print(f"relayd: {text}", file=sys.stderr, flush=True)


def receipt_json(receipt: Receipt) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "type": "receipt",
        "msgid": receipt.msgid,
        "to": receipt.to,
        "status": str(receipt.status),
        "final": receipt.final,
    }
    if receipt.reason:
        doc["reason"] = receipt.reason
    if receipt.duplicate:
        doc["duplicate"] = True
    return doc


def message_json(message: Message) -> dict[str, Any]:
    return dict(message.raw)


def key_change_json(change: KeyChange) -> dict[str, Any]:
    return {
        "type": "key_changed",
        "client": change.client,
        "algorithm": change.algorithm,
        "fingerprint": change.fingerprint,
        "previous_fingerprint": change.previous_fingerprint,
        "changed_at": change.changed_at,
    }


async def opened_json(e2e: EndToEnd, message: Message) -> dict[str, Any]:
    """``message`` as a JSON line; encrypted content replaced by its plain text (marked
    ``"encrypted": true``), or kept with a ``decrypt_error`` when it does not open."""
    doc = message_json(message)
    if not is_encrypted(message.content):
        return doc
    doc["encrypted"] = True
    try:
        doc["content"] = await e2e.decrypt(message)
    except E2EError as exc:
        doc["decrypt_error"] = str(exc)
    return doc


# --- commands -----------------------------------------------------------------------------------


async def _register(args: argparse.Namespace) -> int:
    store = credential_file(args, args.as_name or args.name)
    if store.exists():
        say(f"{store.path} exists: {args.as_name or args.name} is registered already")
        return EXIT_USAGE
    credentials = await register(args.url, args.name, store, uuid=args.uuid, invite=args.invite)
    emit({"uuid": credentials.uuid, "name": credentials.name, "credentials": str(store.path)})
    return EXIT_OK


async def _send(args: argparse.Namespace) -> int:
    store = credential_file(args, args.as_name)
    texts: list[str] = [args.text] if args.text is not None else []
    async with Client(store) as client:
        to = await client.resolve(args.to)
        handles: list[SendHandle] = []
        e2e = EndToEnd(client, KeyFile.beside(store)) if args.encrypt else None

        async def send(text: str) -> None:
            content = text if e2e is None else await e2e.encrypt(to, text)
            handles.append(
                await client.send(to, content, acknowledge=not args.no_ack, timeout=args.timeout)
            )

        if args.text is not None:
            await send(texts[0])
        else:
            # stdin is read in a thread: lines may come slowly from a pipe.
            while line := await anyio.to_thread.run_sync(sys.stdin.readline):
                if line.strip():
                    await send(line.rstrip("\n"))
        worst = EXIT_OK
        for handle in handles:
            if args.wait == "final":
                receipt = await handle.result(timeout=args.timeout)
            else:
                receipt = await handle.accepted(timeout=args.timeout)
            emit(receipt_json(receipt))
            if receipt.final and not receipt.ok:
                worst = EXIT_NOT_DELIVERED
    return worst


async def _listen(args: argparse.Namespace) -> int:
    store = credential_file(args, args.as_name)

    def on_receipt(receipt: Receipt, handle: SendHandle | None) -> None:
        if args.receipts:
            emit(receipt_json(receipt))

    def on_key_changed(change: KeyChange) -> None:
        emit(key_change_json(change))

    count = 0
    async with Client(store, on_receipt=on_receipt, on_key_changed=on_key_changed) as client:
        e2e = EndToEnd(client, KeyFile.beside(store))
        with anyio.move_on_after(args.timeout or math.inf) as deadline:
            async for message in client.messages():
                # Acknowledged once printed (next iteration), opened or not: it was delivered.
                emit(await opened_json(e2e, message))
                count += 1
                if args.count and count >= args.count:
                    client.ack(message)
                    break
    if deadline.cancelled_caught:
        say(f"--timeout: {args.timeout:g} s passed ({count} messages)")
        return EXIT_FAILURE
    return EXIT_OK


async def _keys_publish(args: argparse.Namespace) -> int:
    store = credential_file(args, args.as_name)
    async with Client(store) as client:
        fingerprint = await EndToEnd(client, KeyFile.beside(store)).publish(rotate=args.rotate)
        emit({"uuid": client.uuid, "algorithm": ALGORITHM, "fingerprint": fingerprint})
    return EXIT_OK


async def _keys_show(args: argparse.Namespace) -> int:
    store = credential_file(args, args.as_name)
    async with Client(store) as client:
        uuid = await client.resolve(args.peer)
        keys = await client.peer_keys(uuid)
        pinned = await EndToEnd(client, KeyFile.beside(store)).pinned(uuid)
    current = keys.get(ALGORITHM)
    matches = pinned is None or (current is not None and current.fingerprint == pinned)

    def listed(key: Any) -> dict[str, Any]:
        doc = {
            "algorithm": key.algorithm,
            "fingerprint": key.fingerprint,
            "published_at": key.published_at,
        }
        if key.superseded_at is not None:
            doc["superseded_at"] = key.superseded_at
        return doc

    emit(
        {
            "uuid": uuid,
            "keys": [listed(k) for k in keys.current],
            "superseded": [listed(k) for k in keys.superseded],
            "pinned": pinned,
            "pin_matches": matches,
        }
    )
    if not matches:
        say(f"{args.peer}'s key is not the one pinned: verify it, then `relayd keys trust`")
        return EXIT_KEY_CHANGED
    return EXIT_OK


async def _keys_trust(args: argparse.Namespace) -> int:
    store = credential_file(args, args.as_name)
    async with Client(store) as client:
        uuid = await client.resolve(args.peer)
        await EndToEnd(client, KeyFile.beside(store)).trust(uuid, args.fingerprint)
    emit({"uuid": uuid, "pinned": args.fingerprint.lower()})
    return EXIT_OK


def _chat(args: argparse.Namespace) -> int:
    try:
        from .chat import run_chat
    except ImportError:
        say("relayd chat needs Textual: pip install 'relayd[chat]'")
        return EXIT_USAGE
    try:
        store = credential_file(args, args.as_name)
    except UsageError as exc:
        say(str(exc))
        return EXIT_USAGE
    return run_chat(store, args.peer)


def run(command: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Run an async client command; map the SDK's errors to exit codes."""
    try:
        code: int = anyio.run(command, args, backend="trio")
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BaseExceptionGroup as group:
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        if isinstance(leaf, Exception):
            return _failure(leaf)
        raise
    except Exception as exc:
        return _failure(exc)
    return code


def _failure(exc: Exception) -> int:
    """The exit code for ``exc``, said on stderr; anything else (a bug, a closed stdout) is
    raised again for ``relayd``'s own handling."""
    code = _exit_code(exc)
    if code is None:
        raise exc
    say(str(exc) or type(exc).__name__)
    return code


def _exit_code(exc: Exception) -> int | None:
    if isinstance(exc, KeyMismatch):
        return EXIT_KEY_CHANGED
    if isinstance(exc, NoPeerKey | E2EUnavailable):
        return EXIT_USAGE
    if isinstance(exc, DecryptError):
        return EXIT_FAILURE
    if isinstance(exc, CredentialsError | AuthenticationError | SessionEnded):
        return EXIT_CREDENTIALS
    if isinstance(exc, InvalidMessage | UsageError):
        return EXIT_USAGE
    if isinstance(exc, HttpError) and exc.status in (401, 403):
        return EXIT_CREDENTIALS
    if isinstance(exc, ClientError | TimeoutError):
        return EXIT_FAILURE
    return None


def add_commands(commands: Any) -> None:
    """Add the client commands to ``relayd``'s sub-command parser."""

    def common(sub: argparse.ArgumentParser, *, needs_name: bool = True) -> None:
        if needs_name:
            sub.add_argument(
                "--as", dest="as_name", required=True, metavar="NAME", help="the identity to use"
            )
        sub.add_argument(
            "--credentials-dir",
            metavar="DIR",
            help="where identities are kept (default: ~/.config/relayd/clients)",
        )

    register_parser = commands.add_parser(
        "register", help="register a client and keep its identity (0600)"
    )
    register_parser.add_argument("name", help="the client's name in relayd's directory")
    register_parser.add_argument(
        "--url", default="http://127.0.0.1:8000", help="relayd's HTTP address"
    )
    register_parser.add_argument("--uuid", help="your own uuid for it (default: relayd's)")
    register_parser.add_argument(
        "--invite", help="a one-time invite code, where registration is invite-only"
    )
    register_parser.add_argument(
        "--as", dest="as_name", metavar="NAME", help="identity name to keep it as (default NAME)"
    )
    common(register_parser, needs_name=False)
    register_parser.set_defaults(func=lambda args: run(_register, args))

    send = commands.add_parser(
        "send", help="send a message (or each line of stdin); print its receipt as JSON"
    )
    common(send)
    send.add_argument("to", help="recipient: a uuid, or the name of one registered client")
    send.add_argument("text", nargs="?", help="the message (default: one per line of stdin)")
    send.add_argument(
        "--no-ack", action="store_true", help="at most once: do not ask for an acknowledgement"
    )
    send.add_argument(
        "--wait",
        choices=["accepted", "final"],
        default="accepted",
        help="accepted (default): until relayd has stored each message; final: until each is"
        " acknowledged (or delivered, failed, expired)",
    )
    send.add_argument(
        "--encrypt",
        action="store_true",
        help="seal each message to the recipient's key from the directory (pip install"
        " 'relayd[e2e]'); exit 5 if it is not the key pinned for it",
    )
    send.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    send.set_defaults(func=lambda args: run(_send, args))

    listen = commands.add_parser(
        "listen", help="print each message received as JSON, then acknowledge it"
    )
    common(listen)
    listen.add_argument("--count", type=int, default=0, help="exit after N messages")
    listen.add_argument("--timeout", type=float, default=0.0, help="exit 1 after S seconds")
    listen.add_argument(
        "--receipts", action="store_true", help="print receipts for earlier sends too"
    )
    listen.set_defaults(func=lambda args: run(_listen, args))

    keys = commands.add_parser(
        "keys", help="end-to-end encryption keys: publish yours, show and pin a peer's"
    )
    key_commands = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    publish = key_commands.add_parser(
        "publish", help="make an X25519 key pair if none (kept 0600 beside the identity), publish"
    )
    common(publish)
    publish.add_argument("--rotate", action="store_true", help="replace the key with a new one")
    publish.set_defaults(func=lambda args: run(_keys_publish, args))
    show = key_commands.add_parser(
        "show", help="a peer's keys with their fingerprints, and the one pinned (exit 5 if not)"
    )
    common(show)
    show.add_argument("peer", help="a uuid, or the name of one registered client")
    show.set_defaults(func=lambda args: run(_keys_show, args))
    trust = key_commands.add_parser(
        "trust", help="pin a peer's current key, once its fingerprint is checked with the peer"
    )
    common(trust)
    trust.add_argument("peer", help="a uuid, or the name of one registered client")
    trust.add_argument("fingerprint", help="the fingerprint checked with the peer (hex)")
    trust.set_defaults(func=lambda args: run(_keys_trust, args))

    chat = commands.add_parser("chat", help="chat with another client in the terminal")
    common(chat)
    chat.add_argument("peer", help="a uuid, or the name of one registered client")
    chat.set_defaults(func=_chat)
