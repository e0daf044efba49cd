"""relayd's benchmark harness: ``python -m contrib.bench SCENARIO [options]``.

Each scenario prints one JSON line and appends it to contrib/bench/results/results.jsonl.
See contrib/bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from dataclasses import fields
from pathlib import Path
from typing import Any

from . import _scenarios as S
from ._proc import RESULTS, record


def _add_dataclass_args(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    defaults = cls()
    for f in fields(cls):
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            choices = {
                "store": ["file", "memory", "redis"],
                "transport": ["main", "dedicated"],
                "server": ["asgi", "trio"],
                "against": ["relayd", "seed-v1"],
            }.get(f.name)
            parser.add_argument(
                flag,
                type=type(default),
                default=default,
                choices=choices,
                help=f"default: {default}",
            )


def _build(cls: type[Any], args: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


Runner = Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]]

SCENARIOS: dict[str, tuple[type[Any], dict[str, Any], Runner, str]] = {
    "direct": (
        S.RelayParams,
        {},
        lambda a: S.direct(_build(S.RelayParams, a)),
        "1. direct relay: N pairs, W outstanding per sender",
    ),
    "latency": (
        S.RelayParams,
        {"pairs": 5, "window": 1},
        lambda a: S.direct(_build(S.RelayParams, a), name="latency"),
        "2. light-load latency: 5 pairs, W = 1",
    ),
    "ceiling": (
        S.CeilingParams,
        {},
        lambda a: S.ceiling(_build(S.CeilingParams, a)),
        "3. the stack's ceiling: a bare echo server (asgi: main port, trio: dedicated)",
    ),
    "idle": (
        S.IdleParams,
        {},
        lambda a: S.idle(_build(S.IdleParams, a)),
        "4. idle connections: RSS per connection, connect rate, heartbeats",
    ),
    "slow": (
        S.SlowParams,
        {},
        lambda a: S.slow(_build(S.SlowParams, a)),
        "5. slow consumer: one recipient stops reading while the others run",
    ),
    "drain": (
        S.DrainParams,
        {},
        lambda a: S.drain(_build(S.DrainParams, a)),
        "6. drain: SIGTERM under load, restart, zero loss",
    ),
    "openloop": (
        S.OpenLoopParams,
        {},
        lambda a: S.openloop(_build(S.OpenLoopParams, a)),
        "8. open-loop latency: a fixed offered rate, latency from when each message was due",
    ),
    "hoard": (
        S.HoardParams,
        {},
        lambda a: S.hoard(_build(S.HoardParams, a)),
        "7. hoarders: clients sending big messages to themselves, never reading",
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m contrib.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, overrides, _, help_text) in SCENARIOS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_dataclass_args(p, cls)
        p.set_defaults(**overrides)
        p.add_argument("--tag", default="", help="free text stored with the row (sweeps)")
        p.add_argument("--results", type=Path, default=RESULTS, help="where rows are appended")
    sweep = sub.add_parser("sweep", help="every scenario, interleaved, several rounds")
    sweep.add_argument("--rounds", type=int, default=3)
    sweep.add_argument("--only", default="", help="comma-separated labels' prefixes to run")
    sweep.add_argument("--results", type=Path, default=RESULTS)
    summary = sub.add_parser("summary", help="medians per scenario of a sweep, as Markdown")
    summary.add_argument(
        "--sweep", default="", help="sweep id, or several comma-separated (default: the latest)"
    )
    summary.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    if args.command == "sweep":
        from ._sweep import run_sweep

        return run_sweep(args.rounds, args.only, args.results)
    if args.command == "summary":
        from ._sweep import summarize

        print(summarize(args.results, args.sweep))
        return 0
    runner = SCENARIOS[args.command][2]
    row = asyncio.run(runner(args))
    if args.tag:
        row["tag"] = args.tag
    record(row, args.results)
    return 0 if row.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
