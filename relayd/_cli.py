"""The ``relayd`` command.

Exit codes: 0 after a clean stop, 1 on a runtime failure (another relayd holds the state
directory, the store cannot be opened...) or a forced stop (second signal), 2 on a usage or
configuration error, 141 (128 + SIGPIPE, what a shell reports for a command killed by
SIGPIPE) when stdout's reader leaves before the output is written (``relayd admin clients |
head``).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from . import __version__
from ._api import MAX_INVITE_TTL
from ._atrest import key_file_path
from ._auth import load_signing_secret, normalize_uuid
from ._config import Config, load_config, to_toml
from ._errors import ConfigError, RelaydError
from ._log import configure as configure_logging
from ._log import tag_process
from ._tokens import TokenCodec
from .client._cli import CLIENT_HELP
from .client._cli import add_commands as add_client_commands

if TYPE_CHECKING:
    from ._admin import Admin
    from ._daemon import Daemon

# The server's modules (Quart, hypercorn: ~0.3 s to import) are imported by the commands that
# use them, so that the client commands (relayd send, listen...) start quickly.

log = logging.getLogger("relayd")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_STDOUT_CLOSED = 128 + signal.SIGPIPE

HELP_EPILOG = """\
state directory (state_dir):
  relayd.sqlite3  the store (store.path)
  signing-secret  the signing secret relayd generates if none is configured
  relayd.lock     held (flock) by the running `relayd serve`, which writes its pid, host and
                  start time in it; a second relayd on the same state_dir refuses to start and
                  names the holder. The kernel releases the lock on any exit, kill -9
                  included: a lock file left after a crash is harmless. `relayd admin` works
                  on the store only when it can take the lock (the daemon is stopped).

listen backlog:
  http.backlog (default 4096) connections wait to be accepted on each listener; the kernel
  caps it at net.core.somaxconn.

exit codes: 0 ok, 1 runtime failure or forced stop, 2 usage or configuration error,
141 stdout closed before the output was written (| head).
"""

# CPython's collector defaults (700, 10, 10) are tuned for short scripts. relayd keeps ~200 live
# objects per open socket, and every object that outlives two young collections (a read
# waiting for its next frame does) is promoted and, once enough are, forces a full collection:
# at 6,000 idle sockets, 1.2 million objects scanned several times a minute, 41 s of 80 s of
# CPU. A larger first generation lets short-lived objects die young; full collections become
# rare. Cyclic garbage still goes within 50,000 allocations.
GC_THRESHOLDS = (50_000, 20, 100)


def _leaf(exc: BaseException) -> BaseException:
    """The single error inside nested one-member exception groups, or ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _drain_when_supervisor_goes(daemon: Daemon) -> None:
    """A worker's stdin is a pipe from its supervisor that nothing is written to: its end means
    the supervisor is gone (however it went), and the worker drains."""
    async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
        while await stdin.receive_some():
            pass
    log.warning("the supervisor is gone: draining")
    daemon.stop()


def _stdin_is_a_pipe() -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(sys.stdin.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):  # closed, or no stdin at all
        return False


async def _serve_until_signalled(
    daemon: Daemon, config_path: str | None, *, worker: bool = False
) -> int:
    """Run the daemon; the first SIGINT/SIGTERM drains it, a second one stops it at once;
    SIGHUP re-reads the config and applies what can change without a restart. A ``worker``
    also drains when its supervisor is gone (its stdin closed)."""
    forced = False
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            if worker and _stdin_is_a_pipe():
                nursery.start_soon(_drain_when_supervisor_goes, daemon)

            async def watch() -> None:
                nonlocal forced
                count = 0
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum == signal.SIGHUP:
                        log.info("SIGHUP received: reloading the config")
                        try:
                            daemon.reload(load_config(config_path))
                        except ConfigError as exc:
                            log.error("reload refused, the running config stays: %s", exc)
                        continue
                    count += 1
                    if count == 1:
                        log.info("%s received: draining (send it again to stop at once)", name)
                        daemon.stop()
                    else:
                        log.warning("%s received again: stopping now", name)
                        forced = True
                        nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            await daemon.run()
            nursery.cancel_scope.cancel()
    return EXIT_FAILURE if forced else EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    configure_logging(config.log.level, config.log.format)
    if args.workers > 1:
        from ._workers import serve_workers

        return serve_workers(config, args.config, args.workers)
    from ._daemon import Daemon

    if args.worker is not None:
        tag_process(worker=args.worker)
    gc.set_threshold(*GC_THRESHOLDS)
    daemon = Daemon(config, reuse_port=args.reuse_port, worker=args.worker)
    try:
        return trio.run(
            partial(_serve_until_signalled, worker=args.worker is not None),
            daemon,
            args.config,
        )
    except BaseException as exc:
        leaf = _leaf(exc)
        if isinstance(leaf, ConfigError):
            raise leaf from None
        if isinstance(leaf, RelaydError):
            log.error("%s", leaf)
            return EXIT_FAILURE
        raise


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    _, origin = load_signing_secret(config, os.environ, generate=False)
    keys, may_generate = key_file_path(config, os.environ)
    keys_origin = (
        f"{keys} (generated on first start)" if may_generate and not keys.exists() else keys
    )
    sys.stdout.write(to_toml(config))
    sys.stdout.write(
        f"\n# signing secret: {origin}\n# store: {config.store_path}\n# store keys: {keys_origin}\n"
    )
    return EXIT_OK


def _codec(config: Config) -> TokenCodec:
    secret, _ = load_signing_secret(config, os.environ)
    assert secret is not None
    return TokenCodec(
        secret,
        issuer=config.auth.issuer,
        audience=config.auth.audience,
        leeway=config.auth.leeway,
        clock=time.time,
    )


def _cmd_token_mint(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    configure_logging("warning", config.log.format)
    roles = tuple(dict.fromkeys(args.role or ["admin"]))
    issued = _codec(config).issue(
        sub=f"operator:{args.name}", token_use="access", roles=roles, ttl=args.ttl
    )
    print(issued.token)
    expires = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(issued.claims.exp))
    print(
        f"relayd: token for operator:{args.name}, roles {','.join(roles)}, expires {expires}",
        file=sys.stderr,
    )
    return EXIT_OK


def _admin(args: argparse.Namespace) -> Admin:
    """An admin session for ``relayd admin`` and ``relayd store-key`` (a context manager)."""
    from ._admin import Admin

    config = load_config(args.config)
    configure_logging("warning", config.log.format)
    return Admin(config, _codec(config), args.url)


def _cmd_admin(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        if args.admin_command == "clients":
            from ._admin import print_clients

            print_clients(admin.clients(), admin.offline)
        elif args.admin_command == "queues":
            queues = admin.queues()
            for client, depth in sorted(queues.items(), key=lambda item: -item[1]):
                print(f"{client}  {depth}")
            if not queues:
                print("no messages waiting", file=sys.stderr)
        elif args.admin_command == "revoke":
            admin.revoke(args.uuid)
            print(f"revoked every token of {args.uuid}", file=sys.stderr)
        elif args.admin_command == "delete":
            admin.delete(args.uuid)
            print(f"deleted {args.uuid}", file=sys.stderr)
        elif args.admin_command == "roles":
            held = admin.set_roles(args.uuid, list(dict.fromkeys(args.role)))
            print(f"{args.uuid} holds {' '.join(held)}", file=sys.stderr)
        elif args.admin_command == "reset-secret":
            print(admin.reset_secret(args.uuid))
            print(
                f"new secret of {args.uuid} (shown once); its tokens are revoked",
                file=sys.stderr,
            )
        elif args.admin_command == "invite":
            invite = admin.invite(args.ttl)
            print(invite["invite"])
            expires = invite["expires_at"]
            print(f"one-time invite {invite['id']}, expires at {expires:.0f}", file=sys.stderr)
        elif args.admin_command == "invites":
            for item in admin.invites():
                print(json.dumps(item))
    return EXIT_OK


def _cmd_store_key(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        if args.key_command == "list":
            status = admin.store_keys()
            for key in status["keys"]:
                mark = "current" if key["current"] else "-"
                print(f"{key['id']}  {mark:7}  {key['rows']}")
            if status["plain_rows"]:
                print(f"plain text rows: {status['plain_rows']}", file=sys.stderr)
        elif args.key_command == "rotate":
            kid = admin.rotate_store_key()
            print(kid)
            print(
                f"added key {kid}; relayd encrypts with it once it reloads"
                " (systemctl reload relayd, or SIGHUP)",
                file=sys.stderr,
            )
        elif args.key_command == "retire":
            admin.retire_store_key(args.key_id)
            print(f"retired key {args.key_id}", file=sys.stderr)
    return EXIT_OK


def _cmd_backup(args: argparse.Namespace) -> int:
    from ._admin import backup

    config = load_config(args.config)
    counts = backup(config, Path(args.path))
    print(
        f"relayd: backed up {config.store_path} to {args.path}: {counts['clients']} clients, "
        f"{counts['queued_messages']} queued messages. Keep the signing secret with it.",
        file=sys.stderr,
    )
    return EXIT_OK


def _uuid(text: str) -> str:
    try:
        return normalize_uuid(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a UUID") from None


MAX_OPERATOR_TOKEN_TTL = 366 * 86_400.0


# More workers than this is a typing mistake: each one is a whole process.
MAX_WORKERS = 1024


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_WORKERS}")
    return value


def _invite_ttl(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 60 <= value <= MAX_INVITE_TTL:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds from 60 to {MAX_INVITE_TTL:.0f} (90 days)"
        )
    return value


def _token_ttl(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= MAX_OPERATOR_TOKEN_TTL:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds above 0 and at most {MAX_OPERATOR_TOKEN_TTL:.0f}"
            " (366 days)"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relayd",
        description="A self-hosted message relay over WebSockets.",
        epilog=HELP_EPILOG + "\n" + CLIENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"relayd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument(
            "--config",
            metavar="PATH",
            help="config file (default: $RELAYD_CONFIG, else ./relayd.toml if present)",
        )
        return sub

    serve = with_config(
        commands.add_parser(
            "serve",
            help="run the daemon",
            description="Run the daemon. It holds STATE_DIR/relayd.lock while it runs: a second"
            " relayd on the same state_dir refuses to start, naming this one (on the sqlite"
            " engine; nodes of the redis engine may share a state_dir).",
        )
    )
    processes = serve.add_mutually_exclusive_group()
    processes.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="run N relayd processes sharing the listen ports (SO_REUSEPORT), so that one"
        ' machine uses N cores; needs store.engine = "redis". This process supervises them:'
        " it forwards SIGTERM, SIGINT and SIGHUP, restarts a worker that dies, and alone"
        " speaks to systemd (default 1: one process, no supervisor)",
    )
    serve.add_argument(
        "--reuse-port",
        action="store_true",
        help="bind every listener with SO_REUSEPORT, so that other relayd processes that do"
        " too share its ports (set for the workers of --workers)",
    )
    processes.add_argument(
        "--worker",
        type=_workers,
        metavar="K",
        help="run as worker K of a --workers supervisor (set by it): log lines carry worker=K,"
        " responses a Relayd-Worker: K header, and the end of stdin (a pipe from the"
        " supervisor) drains it",
    )
    serve.set_defaults(func=_cmd_serve)

    check = with_config(
        commands.add_parser("check-config", help="validate and print the effective config")
    )
    check.set_defaults(func=_cmd_check_config)

    token = commands.add_parser("token", help="operator tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    mint = with_config(token_commands.add_parser("mint", help="print a new operator token"))
    mint.add_argument("--role", action="append", choices=["admin"], help="role (default admin)")
    mint.add_argument("--name", default="admin", help="operator name, for the audit log")
    mint.add_argument(
        "--ttl", type=_token_ttl, default=3600.0, help="lifetime in seconds (default 3600)"
    )
    mint.set_defaults(func=_cmd_token_mint)

    admin = commands.add_parser(
        "admin", help="clients and queues, through the running daemon or its store"
    )
    admin_commands = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    for name, text in [
        ("clients", "list clients with their online state and queued messages"),
        ("queues", "queued messages per client"),
        ("revoke", "revoke every token of a client (closes its session, 4003)"),
        ("delete", "delete a client (its uuid stays taken)"),
        ("roles", "set a client's roles (they apply at once, to its live session too)"),
        ("reset-secret", "a new secret for a client that lost its own (revokes its tokens)"),
        ("invite", 'mint a one-time invite code (auth.registration = "invite")'),
        ("invites", "list invites (JSON lines): open, spent, by whom"),
    ]:
        action = with_config(admin_commands.add_parser(name, help=text))
        action.add_argument(
            "--url", help="the daemon's HTTP address (default: from http.listen in the config)"
        )
        if name in ("revoke", "delete", "reset-secret", "roles"):
            action.add_argument("uuid", type=_uuid, help="the client's uuid")
        if name == "roles":
            action.add_argument("role", nargs="+", help="the roles it holds from now on")
        if name == "invite":
            action.add_argument(
                "--ttl", type=_invite_ttl, help="lifetime in seconds (default auth.invite_ttl)"
            )
        action.set_defaults(func=_cmd_admin)

    store_key = commands.add_parser(
        "store-key", help="the keys that encrypt message content at rest: list, rotate, retire"
    )
    key_commands = store_key.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    for name, text in [
        ("list", "keys with the number of stored messages each one encrypts"),
        ("rotate", "add a new key that encrypts from the daemon's next reload on"),
        ("retire", "remove a key that no stored message needs any more"),
    ]:
        action = with_config(key_commands.add_parser(name, help=text))
        action.add_argument(
            "--url", help="the daemon's HTTP address (default: from http.listen in the config)"
        )
        if name == "retire":
            action.add_argument("key_id", help="the key's id (see relayd store-key list)")
        action.set_defaults(func=_cmd_store_key)

    backup_parser = with_config(
        commands.add_parser("backup", help="copy the store to PATH (safe while running)")
    )
    backup_parser.add_argument("path", metavar="PATH", help="the file to write (must not exist)")
    backup_parser.set_defaults(func=_cmd_backup)
    add_client_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            # What is still buffered is written here, where a closed stdout can be caught,
            # rather than at exit, where Python could only print a traceback.
            sys.stdout.flush()
    except BrokenPipeError:
        return _stdout_closed()


def _stdout_closed() -> int:
    """stdout's reader has left (``relayd admin clients | head``): drop the rest quietly, as a
    command killed by SIGPIPE would. stdout now points at /dev/null, so that the flush at
    exit cannot fail again (the recipe of Python's ``signal`` documentation)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_STDOUT_CLOSED


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"relayd: configuration error:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except RelaydError as exc:
        print(f"relayd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return code
