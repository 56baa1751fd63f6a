"""The ``mmsim`` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from rich.console import Console
from rich.table import Table

from .mm.kernel import PROTOCOLS
from .tools.race import run_race


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


def _env(name: str, default: object, conv: Callable[[str], object] = str) -> object:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return conv(raw)
    except ValueError as e:
        raise SystemExit(f"mmsim: bad value for {name}: {raw!r} ({e})") from None


def _bool(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _probability(raw: str) -> float:
    v = float(raw)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError("must be within [0, 1]")
    return v


def _listen(raw: str) -> str:
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError("expected HOST:PORT")
    return raw


def _positive(raw: str) -> int:
    v = int(raw)
    if v <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return v


#: (flag, env var, ServerConfig field, type, help)
SERVE_FLAGS: tuple[tuple[str, str, str, Callable[[str], object], str], ...] = (
    ("--listen", "MMSIM_LISTEN", "listen", _listen, "address to listen on, HOST:PORT"),
    ("--protocol", "MMSIM_PROTOCOL", "protocol", str, f"rmap/move protocol variant: {' | '.join(PROTOCOLS)}"),
    ("--preempt", "MMSIM_PREEMPT", "preempt", _probability, "probability that a preemption point yields"),
    ("--seed", "MMSIM_SEED", "seed", int, "seed of the preemption scheduler"),
    ("--detectors", "MMSIM_DETECTORS", "detectors", _bool, "run lockdep, the walk detectors and the RCU checks"),
    ("--max-concurrent-rpcs", "MMSIM_MAX_CONCURRENT_RPCS", "max_concurrent_rpcs", _positive,
     "calls in progress at once; more get RESOURCE_EXHAUSTED"),
    ("--max-message-bytes", "MMSIM_MAX_MESSAGE_BYTES", "max_message_bytes", _positive,
     "largest request or response message"),
    ("--max-remap-bytes", "MMSIM_MAX_REMAP_BYTES", "max_remap_bytes", _positive,
     "largest length of one Remap; longer ones get INVALID_ARGUMENT"),
    ("--max-munmap-bytes", "MMSIM_MAX_MUNMAP_BYTES", "max_munmap_bytes", _positive,
     "largest length of one Munmap; longer ones get INVALID_ARGUMENT"),
    ("--max-batch-ops", "MMSIM_MAX_BATCH_OPS", "max_batch_ops", _positive, "operations in one Batch request"),
    ("--max-processes", "MMSIM_MAX_PROCESSES", "max_processes", _positive,
     "simulated processes per server; more get RESOURCE_EXHAUSTED"),
    ("--max-pages", "MMSIM_MAX_PAGES", "max_pages", _positive,
     "resident simulated pages per server; more get RESOURCE_EXHAUSTED"),
    ("--grace", "MMSIM_GRACE", "grace", float, "seconds to drain calls on SIGTERM/SIGINT before cancelling them"),
    ("--log-format", "MMSIM_LOG_FORMAT", "log_format", str, "auto (JSON unless on a terminal) | json | console"),
    ("--log-level", "MMSIM_LOG_LEVEL", "log_level", str, "debug | info | warning | error"),
)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the gRPC server in the foreground until SIGTERM or SIGINT."""
    import asyncio

    from .app import ServerConfig, configure_logging, serve

    config = ServerConfig(**{f[2]: getattr(args, f[2]) for f in SERVE_FLAGS})
    configure_logging(config.log_format, config.log_level)
    try:
        return asyncio.run(serve(config))
    except OSError as e:
        print(f"mmsim serve: {e}", file=sys.stderr)
        return 2


def cmd_conformance(args: argparse.Namespace) -> int:
    """Run scenarios on the live Linux kernel and on mmsim, and show every step that differs."""
    import asyncio

    from .tools.conformance.scenario import ScenarioError
    from .tools.conformance.tool import EXIT_USAGE, conformance

    if not args.scenarios and not args.random:
        print("mmsim conformance: give scenario files or directories, or --random N", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(
            conformance(
                args.scenarios,
                server=args.server,
                random_count=args.random,
                seed=args.seed,
                step_timeout=args.step_timeout,
                save=args.save,
                console=Console(width=None if sys.stdout.isatty() else 140),
            )
        )
    except (ScenarioError, OSError) as e:
        print(f"mmsim conformance: {e}", file=sys.stderr)
        return EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    from .app import ServerConfig

    p = argparse.ArgumentParser(prog="mmsim", description="Simulator of the Linux anonymous reverse map.")
    sub = p.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser(
        "serve",
        help=cmd_serve.__doc__,
        description=cmd_serve.__doc__ + " Every flag can also be set by the environment variable shown.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = ServerConfig()
    choices = {"protocol": list(PROTOCOLS), "log_format": ["auto", "json", "console"],
               "log_level": ["debug", "info", "warning", "error"]}
    for flag, env, dest, conv, text in SERVE_FLAGS:
        serve_p.add_argument(
            flag,
            dest=dest,
            type=conv,
            choices=choices.get(dest),
            default=_env(env, getattr(defaults, dest), conv),
            help=f"{text} [{env}]",
        )
    serve_p.set_defaults(func=cmd_serve)
    conf = sub.add_parser(
        "conformance",
        help=cmd_conformance.__doc__,
        description=cmd_conformance.__doc__
        + " Exit status: 0 all the same, 1 some differ, 2 bad usage or scenario, 3 kernel oracle unavailable.",
    )
    conf.add_argument("scenarios", nargs="*", help="scenario JSON files, or directories of them")
    conf.add_argument("--server", help="an mmsim server HOST:PORT (default: one started in this process)")
    conf.add_argument("--random", type=int, default=0, metavar="N", help="also run N random scenarios")
    conf.add_argument("--seed", type=int, default=0, help="seed of the random scenarios")
    conf.add_argument("--step-timeout", type=float, default=5.0, help="seconds before a kernel step counts as blocked")
    conf.add_argument("--save", metavar="DIR", help="write the shrunk reproducer of each random failure here")
    conf.set_defaults(func=cmd_conformance)
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
