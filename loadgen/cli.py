"""``mmsim loadgen``: the command line of the load generator.

The ``mmsim`` command hands ``mmsim loadgen ...`` to ``main`` here, importing this package only then,
so that the server never imports the load generator.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import NoReturn

from rich.console import Console

from mmsim.v1.wire import split_hostport

from .profiles import CALLS, DEFAULT_PROFILE, OPERATIONS, PROFILES, is_gc, is_swap, parse_mix
from .workload import BLOCK, RACE_PAGES, REGION_PAGES_MAX, gc_lanes_per_tree, lanes_per_tree, remap_pages

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 4
EPILOG = """\
exit status:
  0  the run completed, with no failed call and, under a safe protocol (recheck, folio-lock), no
     detector violation; a shard that restarted under the run (mmsim serve --shards N starts a
     shard that dies again) does not change it: the report counts the restarts per shard
     (shard_restarts) and the calls they cost (the shard_restarted outcome), and the lost trees are
     made again on the restarted shard, so the load goes on until the run ends
  1  some calls failed (a status other than OK or an expected errno; a shard that does not serve
     again within 10 s, or --call-timeout if shorter, fails the calls on it), a detector fired
     under a safe protocol, or a worker failed
  2  bad usage
  4  a target could not be reached

targets: one --target is a deployment, discovered: one server, the shards of mmsim serve --shards N
(each reached directly), or shards behind a proxy (routed by the x-mmsim-shard header); the trees are
spread over the shards and each call goes to its tree's shard. Several --target are separate servers.

operations (the RPCs one call makes): """ + textwrap.fill(  # "\0": no line break inside an entry
    ", ".join(f"{name}\0({'+'.join(op.rpc for op in CALLS[name])})" for name in OPERATIONS), 100,
    initial_indent=" " * 37, subsequent_indent="  ").lstrip().replace("\0", " ") + """
profiles: """ + "; ".join(
    f"{name}: {', '.join(f'{op}={w}' for op, w in mix.items())}" for name, mix in PROFILES.items()
) + """

gc (any mix with gc_read): per tree, a heap of --pages pages registered with userfaultfd MISSING; its
collector (a task of the worker that has every lane of the tree) moves the heap aside each cycle with
mremap(MAYMOVE|DONTUNMAP), resolves each mutator's fault on the emptied heap with UFFDIO_MOVE, and
unmaps the from-space once every page is back; gc_read is one faulting read, walks walk the GC pages
wherever they are. Needs --trees >= --workers (the default gives that).

swap (any mix with pageout or reclaim, the reclaim profile): every lane gets --pages pages of its own,
which its writes, reads (each value checked), walks and pageouts pick at random; pageout is
MADV_PAGEOUT of 4 of them (or of the lane's remap page), reclaim asks the tree's shard to reclaim 32
folios. Run the server with --max-memory below the working set, about L × P × 700 + T × P × (544 +
160 × (D + 1)) bytes for L lanes (--workers × --concurrency), T trees, P --pages and D --fork-depth
(a resident page is its folio, 544 bytes, and its PTE, 160, which stays charged while the page is
swapped out), and --swap-bytes above (L + T) × P × 4096, so that it reclaims and swaps by itself too.
A walk that finds its page swapped out is the swapped_out outcome, not an error."""


# The modules of the `loadgen` extra (pip install 'mmsim[loadgen]') and their distributions; a plain
# `pip install mmsim` has the server and the SDK only.
EXTRA_MODULES = {"hdrh": "hdrhistogram", "jsonschema": "jsonschema", "matplotlib": "matplotlib"}


def missing_extra() -> list[str]:
    """The distributions of the ``loadgen`` extra that are not installed (found without importing them)."""
    return [dist for module, dist in EXTRA_MODULES.items() if importlib.util.find_spec(module) is None]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {' '.join(message.split())}\n")


def _positive_float(raw: str) -> float:
    try:
        v = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError("must be a positive number")
    return v


def _non_negative_float(raw: str) -> float:
    try:
        v = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return v


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    def conv(raw: str) -> int:
        try:
            v = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {raw!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be within [{lo:,}, {hi:,}]")
        return v

    return conv


def _target(raw: str) -> str:
    try:
        _, port = split_hostport(raw)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if port == 0:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {raw!r} (port 0)")
    return raw


def _readable(raw: str) -> str:
    try:
        with open(raw, "rb"):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {raw!r}: {e.strerror}") from None
    return raw


def _metrics_url(raw: str) -> str:
    if "://" in raw:
        if not raw.startswith(("http://", "https://")):
            raise argparse.ArgumentTypeError(f"expected an http(s) URL or HOST:PORT, not {raw!r}")
        return raw
    return _target(raw)


def _mix(raw: str) -> dict[str, int]:
    try:
        return parse_mix(raw)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    from .runner import cpu_count

    p = _Parser(
        prog="mmsim loadgen",
        description="Hammer mmsim servers with a multi-process, closed- or open-loop workload; report HDR-exact "
        "latencies, throughput, outcomes and the servers' own counters over the run.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--target", action="append", type=_target, metavar="HOST:PORT",
                   help="a server, a shard or a proxy: the deployment is discovered and the trees spread over its "
                   "shards (repeatable: separate servers, used as given; default 127.0.0.1:7077)")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--duration", type=_positive_float, metavar="S", help="measured seconds (default 10)")
    stop.add_argument("--count", type=_int_in(1, 10**9), metavar="N", help="measured calls, instead of a duration")
    p.add_argument("--warmup", type=_non_negative_float, default=1.0, metavar="S",
                   help="seconds run first and left out of every figure (default 1)")
    p.add_argument("--workers", type=_int_in(1, 256), default=max(1, cpu_count() // 2), metavar="W",
                   help="worker OS processes (default: half the cores, at least 1)")
    p.add_argument("--concurrency", type=_int_in(1, 4096), default=16, metavar="C",
                   help="calls in flight per worker; in an open loop, the most (default 16)")
    p.add_argument("--rate", type=_positive_float, metavar="OPS_PER_S",
                   help="open loop: this many calls per second in all, on a fixed schedule (default: closed loop)")
    mix = p.add_mutually_exclusive_group()
    mix.add_argument("--profile", choices=list(PROFILES), help=f"a named mix (default {DEFAULT_PROFILE})")
    mix.add_argument("--mix", type=_mix, metavar="OP=W,...",
                     help="a mix of operations with weights, e.g. remap=3,walk=1")
    p.add_argument("--pages", type=_int_in(1, REGION_PAGES_MAX), default=256, metavar="N",
                   help="resident pages per tree in the region shared along the fork chain, and in a swap mix "
                   "(pageout, reclaim) of each lane's own (default 256)")
    p.add_argument("--trees", type=_int_in(1, 1024), metavar="N",
                   help="process trees, spread round-robin over the shards (default: 2, or one per shard if more)")
    p.add_argument("--fork-depth", type=_int_in(0, 64), default=2, metavar="D",
                   help="descendants of each tree's root, a chain (default 2)")
    p.add_argument("--seed", type=_int_in(0, 2**31), default=0, help="seed of the operation choices (default 0)")
    p.add_argument("--call-timeout", type=_positive_float, default=30.0, metavar="S",
                   help="deadline of each call (default 30)")
    p.add_argument("--token-file", type=_readable, metavar="FILE",
                   help="send the bearer token in FILE on every call (mmsim serve --token-file)")
    p.add_argument("--tls-ca", type=_readable, metavar="FILE",
                   help="TLS: trust the PEM CA certificates in FILE (with --tls-cert alone: the system's)")
    p.add_argument("--tls-cert", type=_readable, metavar="FILE", help="TLS: present this PEM client certificate")
    p.add_argument("--tls-key", type=_readable, metavar="FILE", help="the PEM private key of --tls-cert")
    p.add_argument("--stats-from", choices=("grpc", "metrics"),
                   help="where the servers' counters come from: GetStats (grpc, the default), or every shard's "
                   "Prometheus endpoint (metrics)")
    p.add_argument("--metrics-url", action="append", type=_metrics_url, metavar="URL",
                   help="a shard's Prometheus endpoint (repeatable, one per shard; HOST:PORT means "
                   "http://HOST:PORT/metrics); default: the addresses the topology gives; implies --stats-from metrics")
    p.add_argument("--keep", action="store_true", help="leave the workload on the server at the end")
    p.add_argument("--json", metavar="REPORT.json", help="write the report here (schema: loadgen/report.schema.json)")
    p.add_argument("--plot", metavar="FILE.png", help="plot latency percentiles and throughput and p99 over time")
    p.add_argument("--quiet", action="store_true", help="no progress, no live line")
    p.add_argument("--compare", nargs="+", metavar="REPORT.json",
                   help="instead of a run: compare reports side by side (ratios to the first)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    missing = missing_extra()
    if missing:  # before build_parser, which imports the runner
        print(f"mmsim loadgen: error: {', '.join(missing)} not installed: the load generator needs "
              "pip install 'mmsim[loadgen]'", file=sys.stderr)
        return EXIT_USAGE
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 150)
    if args.compare:
        from .compare import print_compare

        if len(args.compare) < 2:
            parser.error("--compare needs at least two reports")
        try:
            print_compare(args.compare, console)
        except (OSError, ValueError) as e:
            parser.error(str(e))
        return EXIT_OK

    from mmsim.client import read_token

    from .runner import MIN_TREES, Options, RunError, run

    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.token_file:
        try:
            read_token(args.token_file)
        except (OSError, ValueError) as e:
            parser.error(f"argument --token-file: {e}")
    if args.metrics_url and args.stats_from == "grpc":
        parser.error("--metrics-url is for --stats-from metrics")
    stats_from = args.stats_from or ("metrics" if args.metrics_url else "grpc")
    profile = None if args.mix else (args.profile or DEFAULT_PROFILE)
    mix = args.mix or PROFILES[profile or DEFAULT_PROFILE]
    lanes = args.workers * args.concurrency
    if is_gc(mix):
        if args.trees is not None and args.trees < args.workers:
            parser.error("a GC mix needs --trees >= --workers (each worker runs the collectors of its trees)")
        trees = args.trees or max(MIN_TREES, args.workers)
        per_tree = gc_lanes_per_tree(args.workers, args.concurrency, trees)
        too_large = RACE_PAGES + per_tree * (1 + BLOCK) > REGION_PAGES_MAX
    else:
        too_large = remap_pages(lanes, args.trees or MIN_TREES) > REGION_PAGES_MAX
        per_tree = lanes_per_tree(lanes, args.trees or MIN_TREES)
    if too_large:
        parser.error("--workers × --concurrency is too large for --trees: give more trees")
    if is_swap(mix) and per_tree * args.pages > REGION_PAGES_MAX:
        parser.error("--pages × the lanes of a tree (--workers × --concurrency / --trees) is too large for a "
                     f"swap mix (at most {REGION_PAGES_MAX:,}): give more trees or fewer pages")
    opts = Options(
        targets=tuple(args.target or ["127.0.0.1:7077"]),
        duration=None if args.count else (args.duration or 10.0),
        count=args.count,
        warmup=args.warmup,
        workers=args.workers,
        concurrency=args.concurrency,
        rate=args.rate,
        profile=profile,
        mix=tuple(mix.items()),
        pages=args.pages,
        trees=args.trees,
        fork_depth=args.fork_depth,
        seed=args.seed,
        call_timeout=args.call_timeout,
        keep=args.keep,
        json=args.json,
        plot=args.plot,
        quiet=args.quiet,
        token_file=args.token_file,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        stats_from=stats_from,
        metrics_urls=tuple(args.metrics_url or ()),
    )
    try:
        report = asyncio.run(run(opts, console))
    except RunError as e:
        print(f"mmsim loadgen: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE if str(e).startswith("cannot reach") else EXIT_FAILED
    except KeyboardInterrupt:
        print("mmsim loadgen: interrupted", file=sys.stderr)
        return EXIT_FAILED

    from .report import SAFE_PROTOCOLS, print_summary, validate

    validate(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    if args.plot:
        from .plot import plot_report

        plot_report(report, args.plot)
    print_summary(report, console)
    failed = report["overall"]["failures"]
    unsafe = report["server_deltas"].get("violations", 0) and report["server"]["protocol"] in SAFE_PROTOCOLS
    return EXIT_FAILED if failed or unsafe else EXIT_OK
