"""The ``mmsim`` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from .kernel import PROTOCOLS
from .workload import run_race


def cmd_race(args: argparse.Namespace) -> int:
    """Run the concurrent Remap/Walk/Fork/Exit workload over many seeds, per protocol."""
    protocols = args.protocol or list(PROTOCOLS)
    table = Table(
        title=f"seed race: {args.seeds} seeds per protocol (preempt {args.preempt})",
        caption="caught: seeds with a detector violation; fast/slow: walker mapping-recheck retries",
    )
    table.add_column("protocol", no_wrap=True)
    for col in ("caught", "violations", "fast", "slow", "contended", "walks", "moves", "audit"):
        table.add_column(col, justify="right", no_wrap=True)
    unsafe_missed = False
    for proto in protocols:
        results = [run_race(proto, seed, preempt=args.preempt) for seed in range(args.first_seed, args.first_seed + args.seeds)]
        caught = [r for r in results if r.violations]
        kinds: dict[str, int] = {}
        for r in results:
            for kind, n in r.violations.items():
                kinds[kind] = kinds.get(kind, 0) + n
        problems = sum(len(r.problems) for r in results)
        table.add_row(
            proto,
            str(len(caught)),
            str(sum(kinds.values())),
            str(sum(r.fast_retries for r in results)),
            str(sum(r.slow_retries for r in results)),
            str(sum(r.contended for r in results)),
            str(sum(r.walks for r in results)),
            str(sum(r.moves for r in results)),
            "clean" if not problems else f"{problems} problems",
        )
        if proto in ("recheck", "folio-lock") and (caught or problems):
            unsafe_missed = True
        if caught and args.verbose:
            Console().print(f"[bold]{proto}[/bold], first caught at seed {caught[0].seed}:", *caught[0].events[:3], sep="\n  ")
    Console(width=None if sys.stdout.isatty() else 110).print(table)
    return 1 if unsafe_missed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmsim", description="Simulator of the Linux anonymous reverse map.")
    sub = p.add_subparsers(dest="command", required=True)
    race = sub.add_parser("race", help=cmd_race.__doc__, description=cmd_race.__doc__)
    race.add_argument(
        "--protocol",
        action="append",
        choices=list(PROTOCOLS),
        default=[p for p in os.environ.get("MMSIM_PROTOCOL", "").split(",") if p] or None,
        help="protocol variant (repeatable; default all) [MMSIM_PROTOCOL]",
    )
    race.add_argument("--seeds", type=int, default=200, help="number of seeds (default 200)")
    race.add_argument("--first-seed", type=int, default=0, help="first seed (default 0)")
    race.add_argument("--preempt", type=float, default=0.35, help="preemption probability per point (default 0.35)")
    race.add_argument("-v", "--verbose", action="store_true", help="print the first violations caught")
    race.set_defaults(func=cmd_race)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
