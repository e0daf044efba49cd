"""The ``relayd`` command.

Exit codes: 0 after a clean stop, 1 on a runtime failure or a forced stop (second signal),
2 on a usage or configuration error.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

import trio

from . import __version__
from ._auth import load_signing_secret
from ._config import Config, load_config, to_toml
from ._daemon import Daemon
from ._errors import ConfigError, RelaydError
from ._log import configure as configure_logging
from ._tokens import TokenCodec

log = logging.getLogger("relayd")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _leaf(exc: BaseException) -> BaseException:
    """The single error inside nested one-member exception groups, or ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _serve_until_signalled(daemon: Daemon, config_path: str | None) -> int:
    """Run the daemon; the first SIGINT/SIGTERM drains it, a second one stops it at once;
    SIGHUP re-reads the config and applies what can change without a restart."""
    forced = False
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

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
    try:
        return trio.run(_serve_until_signalled, Daemon(config), args.config)
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
    sys.stdout.write(to_toml(config))
    sys.stdout.write(f"\n# signing secret: {origin}\n# store: {config.store_path}\n")
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


MAX_OPERATOR_TOKEN_TTL = 366 * 86_400.0


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
        prog="relayd", description="A self-hosted message relay over WebSockets."
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

    serve = with_config(commands.add_parser("serve", help="run the daemon"))
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
