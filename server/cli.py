"""The ``mmsim`` command."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from rich.console import Console
from rich.table import Table

from .mm.kernel import MUTANTS, PROTOCOLS, THP_POLICIES
from .mm.steps import Variant, VariantError, is_file_spec, load_variant, resolve
from .tools.race import WORKLOADS, run_race

if TYPE_CHECKING:
    from .app import ServerConfig


def variant_spec(spec: str) -> str:
    """``FILE.py:NAME`` with FILE made absolute, so that a shard, a worker process or a replay token
    finds the file from any directory; a built-in name as it is."""
    if not is_file_spec(spec):
        return spec
    path, _, name = spec.rpartition(":")
    return f"{os.path.abspath(os.path.expanduser(path))}:{name}"


def find_variant(spec: str) -> Variant:
    """The variant ``--variant SPEC`` names: FILE.py:NAME, or a built-in protocol or mutant.
    VariantError (one line) if there is none."""
    if is_file_spec(spec):
        return load_variant(spec)
    found = PROTOCOLS.get(spec) or MUTANTS.get(spec)
    if found is None:
        raise VariantError(f"{spec!r} is not FILE.py:NAME, nor a built-in protocol or mutant")
    return found


def variant_error(command: str, spec: str, error: Exception | str) -> int:
    """Say on one stderr line why ``--variant SPEC`` cannot be used; the usage exit status."""
    print(f"mmsim {command}: --variant {spec}: {' '.join(str(error).split())}", file=sys.stderr)
    return 2


def cmd_race(args: argparse.Namespace) -> int:
    """Run the concurrent Remap/Walk/Fork/Exit workload over many seeds, per protocol."""
    protocols = [(p, p) for p in args.protocol or args.env_protocols or list(PROTOCOLS)]  # (spec, name)
    for spec in args.variant or ():
        try:
            v = resolve(find_variant(spec), "protocol")
        except VariantError as e:
            return variant_error("race", spec, e)
        protocols.append((variant_spec(spec), v.name))
    table = Table(
        title=f"{args.workload} race: {args.seeds} seeds per protocol (preempt {args.preempt})",
        caption="caught: seeds with a detector violation; fast/slow: walker mapping-recheck retries",
    )
    table.add_column("protocol", no_wrap=True)
    for col in ("caught", "violations", "fast", "slow", "contended", "walks", "moves", "audit"):
        table.add_column(col, justify="right", no_wrap=True)
    unsafe_missed = known = False
    failures: list[str] = []
    for spec, proto in protocols:
        results = [run_race(spec, seed, args.workload, preempt=args.preempt)
                   for seed in range(args.first_seed, args.first_seed + args.seeds)]
        caught = [r for r in results if r.violations]
        kinds: dict[str, int] = {}
        for r in results:
            for kind, n in r.violations.items():
                kinds[kind] = kinds.get(kind, 0) + n
        problems = sum(len(r.problems) for r in results)
        failed = [r for r in results if r.failure]
        table.add_row(
            proto,
            str(len(caught)),
            str(sum(kinds.values())),
            str(sum(r.fast_retries for r in results)),
            str(sum(r.slow_retries for r in results)),
            str(sum(r.contended for r in results)),
            str(sum(r.walks for r in results)),
            str(sum(r.moves for r in results)),
            ", ".join(([f"{len(failed)} crashed/hung"] if failed else [])
                      + ([f"{problems} problems"] if problems else [] if failed else ["clean"])),
        )
        failures += [f"{proto} seed {r.seed}: {r.failure}" for r in failed[:3]]
        if ((spec in ("recheck", "folio-lock") or spec not in PROTOCOLS) and (caught or problems)) or failed:
            unsafe_missed = True
        elif caught:  # an unsafe protocol's documented window (docs/protocol.md)
            known = True
        if caught and args.verbose:
            Console().print(f"[bold]{proto}[/bold], first caught at seed {caught[0].seed}:", *caught[0].events[:3],
                            sep="\n  ")
    console = Console(width=None if sys.stdout.isatty() else 110)
    console.print(table)
    for line in failures:
        console.print(line, markup=False, highlight=False)
    return 1 if unsafe_missed else 3 if known else 0


EXPLORE_EPILOG = "\n".join((
    "exit status:",
    "  0  the search ended and nothing was caught",
    "  1  a violation: a detector (a deadlock included) or the audit caught a schedule with a kind that the "
    "scenario's known: lines do not declare under the protocol (it is printed, minimised, with its replay command)",
    "  2  bad usage or a bad scenario",
    "  3  only known findings: every kind caught is declared by the scenario's known: lines",
))


def cmd_explore(args: argparse.Namespace) -> int:
    """Explore the schedules of a litmus scenario in process, under a protocol and a mutant."""
    from .tools.explore_cli import explore_command

    return explore_command(args)


MUTATE_EPILOG = "\n".join((
    "exit status:",
    "  0  every mutant that is not argued equivalent was killed (score 100%)",
    "  1  some mutant survived",
    "  2  bad usage or a bad scenario",
))


def cmd_mutate(args: argparse.Namespace) -> int:
    """Run the litmus library against every protocol mutant (and each --variant) and print the mutation score."""
    from pathlib import Path

    from .tools.litmus import ScenarioError
    from .tools.mutate import DEFAULT_LITMUS, SAFE_PROTOCOLS, library, mutation_score

    extra = []
    for spec in args.variant or ():
        try:
            v = resolve(find_variant(spec), "mutant")
        except VariantError as e:
            return variant_error("mutate", spec, e)
        if unknown := [p for p in v.applies_to if p not in PROTOCOLS]:
            return variant_error("mutate", spec, f"mutant {v.name!r} applies to {', '.join(map(repr, unknown))}, "
                                 f"not a built-in protocol ({', '.join(PROTOCOLS)})")
        extra.append(variant_spec(spec))
    if args.generated:
        if args.litmus:
            args.parser.error("--generated scores generated programs alone: no --litmus with it")
        from .tools.generate import programs

        scenarios = programs(args.seed, args.generated)
        against = (f"{len(scenarios)} generated programs (seed {args.seed}, no hand-written scenario; "
                   f"under {' and '.join(SAFE_PROTOCOLS)})")
        only: tuple[str, ...] | None = SAFE_PROTOCOLS
    else:
        try:
            scenarios = library(Path(args.litmus) if args.litmus else DEFAULT_LITMUS)
        except ScenarioError as e:
            print(f"mmsim mutate: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        if not scenarios:
            print(f"mmsim mutate: no .litmus file in {args.litmus or DEFAULT_LITMUS}", file=sys.stderr)
            return 2
        against = f"{len(scenarios)} litmus scenarios"
        only = None
    table = Table(title=f"mutants against {against} "
                        f"(exhaustive up to {args.preemptions} preemptions, then random; "
                        f"{args.schedules} schedules each)")
    for col in ("mutant", "applies to", "killed by", "protocol", "strategy", "schedule", "finding"):
        table.add_column(col, overflow="fold")
    from .tools.cluster import ClusterError

    try:
        kills, score = mutation_score(scenarios, args.preemptions, args.schedules, extra, cluster=args.cluster,
                                      protocols=only)
    except ClusterError as e:
        print(f"mmsim mutate: {e}", file=sys.stderr)
        return 2
    for k in kills:
        applies = ", ".join(k.protocols)
        if k.equivalent:
            table.add_row(k.mutant, applies, "[dim]equivalent (docs/mutants.md)[/]", "", "", "", "")
        elif k.killed:
            table.add_row(k.mutant, applies, k.scenario, k.protocol, k.strategy, str(k.schedule), k.finding)
        else:
            table.add_row(k.mutant, applies, f"[bold red]survived[/] ({k.schedules} schedules)", "", "", "", "")
    scored = [k for k in kills if not k.equivalent]
    console = Console(width=None if sys.stdout.isatty() else 180)
    console.print(table)
    history = Table(title="bugs from history: mutants that bring back a bug the kernel had")
    for col in ("mutant", "fixed by", "killed by", "finding"):
        history.add_column(col, overflow="fold")
    for k in kills:
        if k.fix:
            history.add_row(k.mutant, k.fix, k.scenario or "[bold red]survived[/]", k.finding)
    if history.row_count:
        console.print(history)
    console.print(f"mutation score: {sum(k.killed for k in scored)}/{len(scored)} = {score:.0%}")
    return 0 if score == 1.0 else 1


#: Exit status of ``mmsim conformance`` when the server given with ``--server`` cannot be reached
#: (the others are in tools/conformance/tool.py).
EXIT_UNREACHABLE = 4

_USAGE_STATUS = "  2  bad usage: an unknown flag, or a bad value of a flag or of an MMSIM_* variable"
SERVE_EPILOG = "\n".join((
    "exit status:",
    "  0  stopped on SIGTERM or SIGINT",
    "  1  could not start: cannot listen on the address (in use, not local, unknown host)",
    _USAGE_STATUS,
))
RACE_EPILOG = "\n".join((
    "exit status:",
    "  0  no protocol was caught, every audit was clean and every seed ran to its end",
    "  1  a safe protocol was caught by a detector, an audit found problems, or a seed crashed or hung (deadlock)",
    _USAGE_STATUS,
    "  3  only known findings: only the unsafe protocols (recheck-slow-only, no-recheck) were caught",
))
CONFORMANCE_EPILOG = "\n".join((
    "exit status:",
    "  0  every scenario behaves the same on the kernel and on mmsim",
    "  1  some differ",
    "  2  bad usage or a bad scenario",
    "  3  the kernel oracle is unavailable (not Linux, not root, no UFFD_FEATURE_MOVE, ...)",
    f"  {EXIT_UNREACHABLE}  the mmsim server could not be reached (--server)",
))


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``PROG: error: MESSAGE`` on stderr, no usage) and status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each flag; the epilog's exit statuses kept as written."""


class _Given(argparse.Action):
    """Stores the flag's value, and that it was given on the command line (``DEST_given``)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


class _EnvError:
    """The default of a flag whose environment variable has a bad value: an error only if the flag
    is not given on the command line (see ``main``)."""

    def __init__(self, env: str, why: str) -> None:
        self.message = f"environment variable {env}: {why}"

    def __str__(self) -> str:
        return f"invalid ({self.message})"


def _int(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {raw!r}") from None


def _float(raw: str) -> float:
    try:
        v = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {raw!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {raw!r}")
    return v


def _bool(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {raw!r}")


def _probability(raw: str) -> float:
    v = _float(raw)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError("must be within [0, 1]")
    return v


def _share(raw: str) -> float:
    v = _float(raw)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError("must be within (0, 1]")
    return v


def _seconds(raw: str) -> float:
    v = _float(raw)
    if v < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return v


def _listen(raw: str) -> str:
    """HOST:PORT (an IPv6 address in brackets), as it is."""
    from mmsim.v1.wire import split_hostport  # imports grpc: only for commands given an address

    try:
        split_hostport(raw)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return raw


def _positive(raw: str) -> int:
    v = _int(raw)
    if v <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return v


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _bytes(raw: str) -> int:
    """A positive size in bytes: a number, optionally with K, M, G or T (binary: 4G is 4 GiB)."""
    m = re.fullmatch(r"\s*([0-9]+)\s*([kmgtKMGT]?)(i?[bB])?\s*", raw)
    if m is None:
        raise argparse.ArgumentTypeError("expected a size such as 4294967296, 512M or 4G")
    v = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if v <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return v


def _swap_bytes(raw: str) -> int:
    """The swap device's size: a size as ``_bytes`` reads it, or 0 for no swap; at most MAX_SWAP_BYTES."""
    from .mm.swapfile import MAX_SWAP_BYTES

    if re.fullmatch(r"\s*0+\s*([kmgtKMGT]?)(i?[bB])?\s*", raw):
        return 0
    v = _bytes(raw)
    if v > MAX_SWAP_BYTES:
        raise argparse.ArgumentTypeError(f"at most {MAX_SWAP_BYTES} ({MAX_SWAP_BYTES >> 30}G)")
    return v


def _mthp_sizes(raw: str) -> str:
    """Large folio sizes and their policies, ``SIZE`` or ``SIZE:POLICY`` comma-separated (thp.py),
    written back in the one way that gives them; empty for none."""
    from .thp import format_mthp_sizes, parse_mthp_sizes

    try:
        return format_mthp_sizes(parse_mthp_sizes(raw))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _listen_or_off(raw: str) -> str:
    """HOST:PORT, or empty for off."""
    return "" if raw.strip() == "" else _listen(raw)


def _addresses(raw: str) -> tuple[str, ...]:
    """A comma-separated list of HOST:PORT."""
    return tuple(_listen(a.strip()) for a in raw.split(",") if a.strip())


def _shards(raw: str) -> int:
    from .topology import MAX_SHARDS

    v = _positive(raw)
    if v > MAX_SHARDS:
        raise argparse.ArgumentTypeError(f"at most {MAX_SHARDS}")
    return v


def _shard_index(raw: str) -> int:
    from .topology import MAX_SHARDS

    v = _non_negative(raw)
    if v >= MAX_SHARDS:
        raise argparse.ArgumentTypeError(f"must be below {MAX_SHARDS}")
    return v


def _file(raw: str) -> str:
    """The path of a readable file, or empty for none."""
    if raw and not os.path.isfile(raw):
        raise argparse.ArgumentTypeError(f"no such file: {raw!r}")
    if raw and not os.access(raw, os.R_OK):
        raise argparse.ArgumentTypeError(f"cannot read {raw!r}")
    return raw


def _non_negative(raw: str) -> int:
    v = _int(raw)
    if v < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return v


def _env(env: str, default: object, conv: Callable[[str], object], choices: Sequence[object] | None = None) -> object:
    """The value of ``env`` converted as its flag's value, ``default`` when unset or empty, or an
    :class:`_EnvError` when it is bad."""
    raw = os.environ.get(env)
    if raw is None or raw == "":
        return default
    try:
        value = conv(raw)
    except (argparse.ArgumentTypeError, ValueError) as e:
        return _EnvError(env, str(e))
    if choices is not None and value not in choices:
        return _EnvError(env, f"invalid choice: {raw!r} (choose from {', '.join(map(str, choices))})")
    return value


#: (flag, env var, ServerConfig field, type, help)
SERVE_FLAGS: tuple[tuple[str, str, str, Callable[[str], object], str], ...] = (
    ("--listen", "MMSIM_LISTEN", "listen", _listen,
     "address to listen on, HOST:PORT; every address HOST resolves to is bound"),
    ("--protocol", "MMSIM_PROTOCOL", "protocol", str,
     f"rmap/move protocol variant: {' | '.join(PROTOCOLS)}; or a user's, with --variant"),
    ("--preempt", "MMSIM_PREEMPT", "preempt", _probability, "probability that a preemption point yields"),
    ("--seed", "MMSIM_SEED", "seed", _int, "seed of the preemption scheduler"),
    ("--detectors", "MMSIM_DETECTORS", "detectors", _bool, "run lockdep, the walk detectors and the RCU checks"),
    ("--max-concurrent-rpcs", "MMSIM_MAX_CONCURRENT_RPCS", "max_concurrent_rpcs", _positive,
     "calls running at once (a call asleep on a userfault or waiting for userfault events does not "
     "count); more get RESOURCE_EXHAUSTED"),
    ("--reserved-rpcs", "MMSIM_RESERVED_RPCS", "reserved_rpcs", _non_negative,
     "more slots kept for health checks, Ping, GetTopology, GetStats, ListUserfaults, UffdCopy, UffdZeropage, "
     "Remap, UffdWake, Exit and Munmap, so that they are admitted when other calls fill --max-concurrent-rpcs"),
    ("--max-pending-faults", "MMSIM_MAX_PENDING_FAULTS", "max_pending_faults", _positive,
     "accesses asleep on a userfault at once, in all; more get RESOURCE_EXHAUSTED"),
    ("--max-pending-faults-per-process", "MMSIM_MAX_PENDING_FAULTS_PER_PROCESS", "max_pending_faults_per_process",
     _positive, "accesses asleep on a userfault at once in one process; more get RESOURCE_EXHAUSTED"),
    ("--max-userfault-streams", "MMSIM_MAX_USERFAULT_STREAMS", "max_userfault_streams", _positive,
     "Userfaults streams open at once on one process; more get RESOURCE_EXHAUSTED"),
    ("--max-request-bytes", "MMSIM_MAX_REQUEST_BYTES", "max_request_bytes", _bytes,
     "most bytes a request may hold decoded (its wire bytes and 8 per repeated value), checked before "
     "its values are unpacked; K, M, G suffixes"),
    ("--audit-share", "MMSIM_AUDIT_SHARE", "audit_share", _share,
     "most of the time CheckInvariants audits may take (they hold every model call while they run): "
     "the next audit waits until the last one's time is this share of the time since it began"),
    ("--max-message-bytes", "MMSIM_MAX_MESSAGE_BYTES", "max_message_bytes", _positive,
     "largest request or response message"),
    ("--max-remap-bytes", "MMSIM_MAX_REMAP_BYTES", "max_remap_bytes", _positive,
     "largest length of one Remap; longer ones get RESOURCE_EXHAUSTED"),
    ("--max-munmap-bytes", "MMSIM_MAX_MUNMAP_BYTES", "max_munmap_bytes", _positive,
     "largest length of one Munmap; longer ones get RESOURCE_EXHAUSTED"),
    ("--max-batch-ops", "MMSIM_MAX_BATCH_OPS", "max_batch_ops", _positive,
     "operations in one Batch request; more get RESOURCE_EXHAUSTED"),
    ("--max-processes", "MMSIM_MAX_PROCESSES", "max_processes", _positive,
     "simulated processes per server; more get RESOURCE_EXHAUSTED"),
    ("--max-pages", "MMSIM_MAX_PAGES", "max_pages", _positive,
     "resident simulated pages per server; more get RESOURCE_EXHAUSTED"),
    ("--max-memory", "MMSIM_MAX_MEMORY", "max_memory", _bytes,
     "bytes of model objects (PTEs, page tables, VMAs, anon_vmas, chains, folios, processes); beyond it "
     "RESOURCE_EXHAUSTED (ENOMEM); K, M, G suffixes"),
    ("--swap-bytes", "MMSIM_SWAP_BYTES", "swap_bytes", _swap_bytes,
     "size of the model's swap device, where reclaim (Reclaim, madvise pageout, an access past "
     "--max-memory) swaps pages out; its slots are not charged to --max-memory (as memcg charges them to "
     "memory.swap), and each one in use holds 256 bytes of the server's. 0: no swap; K, M, G suffixes"),
    ("--thp", "MMSIM_THP", "thp", str,
     "transparent hugepages, as /sys/kernel/mm/transparent_hugepage/enabled: always (large folios wherever "
     "one fits, but in ranges given madvise nohugepage), madvise (only in ranges given madvise hugepage) or "
     "never"),
    ("--mthp-sizes", "MMSIM_MTHP_SIZES", "mthp_sizes", _mthp_sizes,
     "the large folio sizes a fault may allocate, comma-separated, each SIZE or SIZE:POLICY (16K to 2M, a "
     "power of two; POLICY always, inherit, madvise or never, as hugepages-<size>/enabled): a bare SIZE is "
     "inherit (follows --thp), a size not listed is never; e.g. 2M,64K:always"),
    ("--thp-zero-page", "MMSIM_THP_ZERO_PAGE", "thp_zero_page", _bool,
     "on: a read fault of a range that may have a huge page maps the huge zero page "
     "(transparent_hugepage/use_zero_page); off: it allocates"),
    ("--grace", "MMSIM_GRACE", "grace", _seconds, "seconds to drain calls on SIGTERM/SIGINT before cancelling them"),
    ("--max-connections", "MMSIM_MAX_CONNECTIONS", "max_connections", _non_negative,
     "connections open at once (beyond it a new one is closed at once); with --max-message-bytes it bounds "
     "what requests still being received can hold. 0: no limit"),
    ("--max-connection-idle", "MMSIM_MAX_CONNECTION_IDLE", "max_connection_idle", _seconds,
     "seconds a connection may go without a call (from its start, or its last call's end) before the server "
     "sends GOAWAY and closes it; a client reconnects on its next call. Also closes connections that "
     "never make a call. 0: never"),
    ("--max-connection-age", "MMSIM_MAX_CONNECTION_AGE", "max_connection_age", _seconds,
     "seconds a connection may live before GOAWAY (clients then reconnect, and spread over "
     "the server's addresses again); 0: no limit"),
    ("--max-connection-age-grace", "MMSIM_MAX_CONNECTION_AGE_GRACE", "max_connection_age_grace", _seconds,
     "seconds the calls still running on a connection past --max-connection-age (a Userfaults "
     "stream) may take before it is closed under them"),
    ("--keepalive-time", "MMSIM_KEEPALIVE_TIME", "keepalive_time", _seconds,
     "seconds of quiet on a connection before the server pings the client to see that it is "
     "still there (gRPC's default, 2 h); 0: no pings"),
    ("--keepalive-timeout", "MMSIM_KEEPALIVE_TIMEOUT", "keepalive_timeout", _seconds,
     "seconds the client has to answer a ping (the server's keepalive, or any other) before the "
     "connection is closed; 0: no limit"),
    ("--min-ping-interval", "MMSIM_MIN_PING_INTERVAL", "min_ping_interval", _seconds,
     "the shortest time between a client's pings that the server accepts on a connection not "
     "sending data, with or without calls (gRPC's default, 5 min); the third ping sooner "
     "gets GOAWAY too_many_pings. Clients' keepalive times must be at least this; 0: any"),
    ("--handshake-timeout", "MMSIM_HANDSHAKE_TIMEOUT", "handshake_timeout", _seconds,
     "seconds a new connection has to complete its TLS and HTTP/2 handshakes (the client's "
     "preface and SETTINGS, and its acknowledgement of the server's) before it is closed; 0: no "
     "limit"),
    ("--log-format", "MMSIM_LOG_FORMAT", "log_format", str, "auto (JSON unless on a terminal) | json | console"),
    ("--log-level", "MMSIM_LOG_LEVEL", "log_level", str, "debug | info | warning | error"),
    ("--access-log-sample", "MMSIM_ACCESS_LOG_SAMPLE", "access_log_sample", _probability,
     "fraction of successful calls written to the access log (0: none); failed calls are always written"),
    ("--shards", "MMSIM_SHARDS", "shards", _shards,
     "shard processes, each its own event loop, gRPC server and model; above 1 this process supervises "
     "them, shard i listening on PORT+i, and restarts a shard that dies under a new generation"),
    ("--shard-index", "MMSIM_SHARD_INDEX", "shard_index", _shard_index,
     "this shard's index, for shards started one by one (docker-compose); handles carry it"),
    ("--peers", "MMSIM_PEERS", "peers", _addresses,
     "the gRPC addresses of every shard of the deployment in index order, comma-separated, for "
     "GetTopology (empty: this shard alone)"),
    ("--peer-probe-interval", "MMSIM_PEER_PROBE_INTERVAL", "peer_probe_interval", _seconds,
     "seconds between health checks of each peer (a --peers address, or a shard of the same "
     "supervisor), each with this deadline; a peer that fails --peer-probe-failures in a row "
     "(stopped, hung, gone or draining) is reported down in GetTopology and the health service "
     "mmsim.shard.I until it answers again. Over TLS, peers' certificates are checked against "
     "--tls-cert's chain and --tls-client-ca. 0: no checks (only what the supervisor tells)"),
    ("--peer-probe-failures", "MMSIM_PEER_PROBE_FAILURES", "peer_probe_failures", _positive,
     "health checks a peer fails in a row before it is reported down"),
    ("--generation", "MMSIM_GENERATION", "generation", _non_negative,
     "this start's generation, carried by handles; 0: the start time in milliseconds"),
    ("--metrics-listen", "MMSIM_METRICS_LISTEN", "metrics_listen", _listen_or_off,
     "serve Prometheus metrics at http://HOST:PORT/metrics (with --shards, shard i on PORT+i); empty: off"),
    ("--token-file", "MMSIM_TOKEN_FILE", "token_file", _file,
     "require 'authorization: Bearer TOKEN' on every call but health checks, TOKEN being this file's "
     "content; a missing or wrong one is UNAUTHENTICATED"),
    ("--tls-cert", "MMSIM_TLS_CERT", "tls_cert", _file, "serve TLS with this PEM certificate chain"),
    ("--tls-key", "MMSIM_TLS_KEY", "tls_key", _file, "the PEM private key of --tls-cert"),
    ("--tls-client-ca", "MMSIM_TLS_CLIENT_CA", "tls_client_ca", _file,
     "mutual TLS: require client certificates signed by these PEM CA certificates"),
    ("--insecure", "MMSIM_INSECURE", "insecure", _bool,
     "allow listening on a non-loopback address without TLS or a token"),
)


def serve_config(args: argparse.Namespace) -> ServerConfig:
    """The configuration that parsed ``mmsim serve`` arguments give. ``--variant`` (or MMSIM_VARIANT
    where no ``--protocol`` is given) is the protocol, its file made absolute."""
    from .app import ServerConfig

    config = ServerConfig(**{f[2]: getattr(args, f[2]) for f in SERVE_FLAGS}, supervised=args.supervised)
    if args.variant and (args.variant_given or not args.protocol_given):
        config.protocol = variant_spec(args.variant)
    return config


def _flag_value(value: object) -> str:
    """``value`` written as its flag's converter reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)  # a float's str is its shortest exact form


def serve_argv(config: ServerConfig) -> list[str]:
    """The ``mmsim serve`` arguments that give ``config`` where none of SERVE_FLAGS' environment
    variables is set: ``--flag=VALUE`` for each setting that differs from its default (the ``=`` keeps
    an empty value, or one that begins with ``-``, the flag's), and ``--supervised``."""
    from .app import ServerConfig

    defaults = ServerConfig()
    argv = [f"{_argv_flag(flag, config)}={_flag_value(getattr(config, dest))}" for flag, _, dest, _, _ in SERVE_FLAGS
            if getattr(config, dest) != getattr(defaults, dest)]
    return [*argv, "--supervised"] if config.supervised else argv


def _argv_flag(flag: str, config: ServerConfig) -> str:
    """The flag that gives a setting: a user's protocol (FILE.py:NAME) is ``--variant``'s."""
    return "--variant" if flag == "--protocol" and is_file_spec(config.protocol) else flag


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the gRPC server in the foreground until SIGTERM or SIGINT."""
    import asyncio

    from .app import configure_logging, serve

    if args.variant_given and args.protocol_given:
        args.parser.error("give --protocol or --variant, not both")
    config = serve_config(args)
    if config.protocol != args.protocol:  # a --variant (or MMSIM_VARIANT): loaded before anything starts
        try:
            resolve(find_variant(args.variant), "protocol")
        except VariantError as e:
            return variant_error("serve", args.variant + ("" if args.variant_given else " (MMSIM_VARIANT)"), e)
    if config.shards > 1 and (config.shard_index or config.peers):
        args.parser.error("--shard-index and --peers are for shards started one by one; "
                          "with --shards the supervisor numbers its shards")
    if config.peers and config.shard_index >= len(config.peers):
        args.parser.error(f"--shard-index {config.shard_index} is not among the {len(config.peers)} --peers")
    if bool(config.tls_cert) != bool(config.tls_key):
        args.parser.error("--tls-cert and --tls-key go together")
    if config.tls_client_ca and not config.tls_cert:
        args.parser.error("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    configure_logging(config.log_format, config.log_level)
    if config.shards > 1:
        from .supervisor import supervise

        return supervise(config)
    try:
        return asyncio.run(serve(config))
    except OSError as e:  # app.ListenError above all: the address is in use, not local, or unknown
        print(f"mmsim serve: {' '.join(str(e).split())}", file=sys.stderr)
        return 1


async def _reach(server: str) -> str | None:
    """None if an mmsim server answers a Ping at ``server``, else why not."""
    from mmsim.client import Client
    from mmsim.client.errors import MmsimError

    try:
        async with Client(server, timeout=5.0, retries=0) as c:
            await c.ping()
    except MmsimError as e:
        return f"{e.code.name}: {e.details}"
    return None


def cmd_conformance(args: argparse.Namespace) -> int:
    """Run scenarios on the live Linux kernel and on mmsim, and show every step that differs."""
    import asyncio

    from mmsim.client.errors import ServerUnavailableError

    from .tools.conformance.scenario import ScenarioError
    from .tools.conformance.tool import EXIT_USAGE, conformance

    if not args.scenarios and not args.random:
        print("mmsim conformance: give scenario files or directories, or --random N", file=sys.stderr)
        return EXIT_USAGE
    if args.record:
        from .tools.conformance.tool import record

        if args.random or args.server is not None or args.cluster is not None:
            print("mmsim conformance: --record takes scenario files only (no --random, no --server, no --cluster)",
                  file=sys.stderr)
            return EXIT_USAGE
        try:
            return record(args.scenarios, step_timeout=args.step_timeout, console=Console())
        except (ScenarioError, OSError) as e:
            print(f"mmsim conformance: {' '.join(str(e).split())}", file=sys.stderr)
            return EXIT_USAGE

    if args.cluster is not None and (not args.random or args.server is not None):
        print("mmsim conformance: --cluster runs the --random scenarios, each worker on its own kernel and its own "
              "mmsim (no --server)", file=sys.stderr)
        return EXIT_USAGE

    async def run() -> int:
        if args.server is not None and (why := await _reach(args.server)) is not None:
            raise ServerUnavailableError(why)
        return await conformance(
            args.scenarios,
            server=args.server,
            random_count=args.random,
            seed=args.seed,
            step_timeout=args.step_timeout,
            save=args.save,
            console=Console(width=None if sys.stdout.isatty() else 140),
            swap=args.swap,
            thp=args.thp,
            pin=args.pin,
            cluster=args.cluster,
        )

    from .tools.cluster import ClusterError

    try:
        return asyncio.run(run())
    except ServerUnavailableError as e:
        if args.server is None:  # the server in this process: not a reachability problem
            raise
        print(f"mmsim conformance: cannot reach the mmsim server at {args.server}: {' '.join(str(e).split())}",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    except (ScenarioError, OSError, ClusterError) as e:
        print(f"mmsim conformance: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    from .app import ServerConfig

    p = _Parser(
        prog="mmsim",
        description="Simulator of the Linux anonymous reverse map.",
        epilog="Each command's --help lists its exit statuses; 2 is bad usage (1 for health-probe, as "
               "grpc_health_probe has it).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser(
        "serve",
        help=cmd_serve.__doc__,
        description=(cmd_serve.__doc__ or "") + "\nEvery flag can also be set by the environment variable shown.",
        epilog=SERVE_EPILOG,
        formatter_class=_Help,
    )
    defaults = ServerConfig()
    choices = {"protocol": list(PROTOCOLS), "log_format": ["auto", "json", "console"],
               "log_level": ["debug", "info", "warning", "error"], "thp": list(THP_POLICIES)}
    metavars = {"listen": "HOST:PORT", "grace": "SECONDS", "access_log_sample": "FRACTION", "shards": "N",
                "shard_index": "I", "peers": "HOST:PORT,...", "generation": "G", "metrics_listen": "HOST:PORT",
                "token_file": "FILE", "max_request_bytes": "BYTES", "audit_share": "FRACTION", "tls_cert": "FILE",
                "tls_key": "FILE", "tls_client_ca": "FILE",
                "insecure": "BOOL", "peer_probe_interval": "SECONDS", "peer_probe_failures": "N",
                "mthp_sizes": "SIZE[:POLICY],...", "thp_zero_page": "on|off",
                **{d: "SECONDS" for d in ("max_connection_idle", "max_connection_age", "max_connection_age_grace",
                                          "keepalive_time", "keepalive_timeout", "min_ping_interval",
                                          "handshake_timeout")}}
    for flag, env, dest, conv, text in SERVE_FLAGS:
        optional: dict[str, Any] = {"nargs": "?", "const": True} if dest == "insecure" else {}
        if dest == "protocol":
            optional["action"] = _Given
        serve_p.add_argument(
            flag,
            dest=dest,
            type=conv,
            choices=choices.get(dest),
            metavar=metavars.get(dest),
            default=_env(env, getattr(defaults, dest), conv, choices.get(dest)),
            help=f"{text} [{env}]",
            **optional,
        )
    serve_p.add_argument("--variant", action=_Given, metavar="FILE.py:NAME",
                         default=os.environ.get("MMSIM_VARIANT") or None,
                         help="serve a user's protocol, the Variant NAME of FILE.py, instead of --protocol "
                         "(docs/variants.md); GetStats reports its name [MMSIM_VARIANT]")
    # Given by the supervisor to its shards: topology on stdin, a "ready" line on stdout.
    serve_p.add_argument("--supervised", action="store_true", help=argparse.SUPPRESS)
    serve_p.set_defaults(func=cmd_serve, parser=serve_p, protocol_given=False, variant_given=False)
    conf = sub.add_parser(
        "conformance",
        help=cmd_conformance.__doc__,
        description=cmd_conformance.__doc__,
        epilog=CONFORMANCE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    conf.add_argument("scenarios", nargs="*", help="scenario JSON files, or directories of them")
    conf.add_argument("--server", help="an mmsim server HOST:PORT; a scenario whose THP settings it does not "
                      "have is skipped (default: servers started in this process, one per distinct THP settings)")
    conf.add_argument("--random", type=_non_negative, default=0, metavar="N", help="also run N random scenarios")
    conf.add_argument("--seed", type=_int, default=0, help="seed of the random scenarios")
    conf.add_argument("--swap", action="store_true",
                      help="the random scenarios also page out, deactivate and observe PTEs (madvise pageout and "
                      "cold, pte); those that page out are skipped where the kernel has no usable swap")
    conf.add_argument("--thp", action="store_true",
                      help="the random scenarios also map 2 MiB-aligned regions, ask for huge pages (madvise "
                      "hugepage, nohugepage) and move whole PMDs, observed with pte; they are skipped where the "
                      "kernel has no transparent hugepages")
    conf.add_argument("--pin", action="store_true",
                      help="the random scenarios also pin and unpin pages (FOLL_PIN, by io_uring buffer registration "
                      "on the kernel); they are skipped where the kernel cannot pin")
    conf.add_argument("--step-timeout", type=_seconds, default=5.0, metavar="SECONDS",
                      help="seconds before a kernel step counts as blocked")
    conf.add_argument("--save", metavar="DIR", help="write the shrunk reproducer of each random failure here")
    conf.add_argument("--cluster", metavar="tcp://HOST:PORT",
                      help="run the --random scenarios on the workers of this Dask scheduler (the cluster extra), one "
                      "task each: each worker runs it on its own kernel and its own mmsim, shrinks a difference "
                      "there, and its kernel release is shown beside it (scenario files still run here)")
    conf.add_argument("--record", action="store_true",
                      help="run the scenario files on the kernel only and write its answers into their expect fields")
    conf.set_defaults(func=cmd_conformance, parser=conf)
    race = sub.add_parser(
        "race",
        help=cmd_race.__doc__,
        description=cmd_race.__doc__,
        epilog=RACE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    race.add_argument(
        "--protocol",
        action="append",
        choices=list(PROTOCOLS),
        help="protocol variant (repeatable; default all, or the comma-separated list in MMSIM_PROTOCOL)",
    )
    race.add_argument("--variant", action="append", metavar="FILE.py:NAME",
                      help="also race a user's protocol, the Variant NAME of FILE.py (repeatable; docs/variants.md)")
    race.add_argument("--workload", choices=list(WORKLOADS), default="seed",
                      help="seed: the seed patch's movers, walkers, forker and writer; gc: a compacting GC "
                      "(mremap DONTUNMAP, MISSING faults resolved by UFFDIO_MOVE) racing rmap walks (default seed)")
    race.add_argument("--seeds", type=_positive, default=200, help="number of seeds (default 200)")
    race.add_argument("--first-seed", type=_int, default=0, help="first seed (default 0)")
    race.add_argument("--preempt", type=_probability, default=0.35,
                      help="preemption probability per point, within [0, 1] (default 0.35)")
    race.add_argument("-v", "--verbose", action="store_true", help="print the first violations caught")
    race.set_defaults(func=cmd_race, parser=race, env_protocols=_env_protocols())
    ex = sub.add_parser(
        "explore",
        help=cmd_explore.__doc__,
        description=(cmd_explore.__doc__ or "") + " Every preemption point, lock sleep and wake-up of the model is a "
        "place where the explorer picks the thread that goes on.",
        epilog=EXPLORE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ex.add_argument("scenario", nargs="?", help="a litmus file (tests/litmus/*.litmus)")
    ex.add_argument("--protocol", choices=list(PROTOCOLS),
                    help="protocol variant (default recheck; with a --variant mutant, its first protocol)")
    ex.add_argument("--mutant", help="a protocol mutant (docs/mutants.md)")
    ex.add_argument("--variant", metavar="FILE.py:NAME",
                    help="a user's variant, the Variant NAME of FILE.py: a protocol explored instead of --protocol, "
                    "or a mutant applied to it (docs/variants.md)")
    ex.add_argument("--strategy", choices=["random", "pct", "exhaustive", "dpor"], default="exhaustive",
                    help="random picks, PCT priorities, every schedule up to --preemptions (default), or dpor: one "
                    "schedule per Mazurkiewicz trace, no bound (a complete search prints 'complete: N traces')")
    ex.add_argument("--points", choices=["named", "all"],
                    help="where threads may interleave: the named preemption points, lock sleeps and wake-ups, or "
                    "also every marked access (READ_ONCE, WRITE_ONCE, a refcount) and lock operation, the hardware's "
                    "granularity (default: all for dpor, named for the others)")
    ex.add_argument("--schedules", type=_positive,
                    help="most schedules to run (default 10000; with --generate, random ones per program, default 300)")
    ex.add_argument("--time-limit", type=_positive, metavar="SECONDS",
                    help="start no schedule after SECONDS (the search is then not complete; in one process)")
    ex.add_argument("--generate", type=_positive, metavar="N",
                    help="explore N generated litmus programs (seeded by --seed): each caught one is shrunk to a "
                    "minimal program and written to --save DIR (default .)")
    ex.add_argument("--save", metavar="DIR", help="--generate: where the shrunk programs go")
    ex.add_argument("--preemptions", type=_non_negative, default=2,
                    help="exhaustive: preemptions per schedule (default 2)")
    ex.add_argument("--depth", type=_positive, default=3, help="pct: the bug depth d (default 3)")
    ex.add_argument("--seed", type=_int, default=0, help="seed of the random and pct strategies (default 0)")
    ex.add_argument("--trace-out", metavar="FILE.html", help="write the caught schedule as an HTML sequence diagram")
    ex.add_argument("--replay", metavar="TOKEN", help="run the schedule a replay token names, exactly")
    ex.add_argument("--all", action="store_true", help="go on after a catch and report the whole search")
    ex.add_argument("--jobs", type=_positive, default=1,
                    help="random and pct: worker processes sharing the search (with --cluster: parts, default one "
                    "per worker thread); the result is the same for any number (default 1)")
    ex.add_argument("--cluster", metavar="tcp://HOST:PORT",
                    help="random and pct: run the search's parts on the workers of this Dask scheduler (the cluster "
                    "extra); the result is the same as here")
    ex.set_defaults(func=cmd_explore, parser=ex)
    mu = sub.add_parser("mutate", help=cmd_mutate.__doc__, description=cmd_mutate.__doc__, epilog=MUTATE_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    mu.add_argument("--litmus", metavar="DIR", help="the scenarios (default: the library in tests/litmus)")
    mu.add_argument("--generated", type=_positive, metavar="N",
                    help="score N generated litmus programs (seeded by --seed) instead of a library: what the "
                    "detectors and the search find in programs nobody wrote")
    mu.add_argument("--seed", type=_int, default=0, help="--generated: the programs' seed (default 0)")
    mu.add_argument("--preemptions", type=_non_negative, default=2, help="exhaustive bound (default 2)")
    mu.add_argument("--schedules", type=_positive, default=2000, help="most schedules per search (default 2000)")
    mu.add_argument("--variant", action="append", metavar="FILE.py:NAME",
                    help="also score a user's mutant, the Variant NAME of FILE.py (repeatable; docs/variants.md)")
    mu.add_argument("--cluster", metavar="tcp://HOST:PORT",
                    help="run each mutant and protocol against each scenario as a task of this Dask scheduler's "
                    "workers (the cluster extra; a --variant file must be at the same path on every worker); the "
                    "score is the same as here")
    mu.set_defaults(func=cmd_mutate, parser=mu)
    from .deploy import add_commands  # nginx-config, health-probe

    add_commands(sub)
    # Listed here; main() hands its arguments to mmsim.loadgen, imported only then.
    sub.add_parser("loadgen", help="load generator: mmsim loadgen --help", add_help=False)
    return p


def _env_protocols() -> list[str] | _EnvError | None:
    """The race's protocols from MMSIM_PROTOCOL (comma-separated), if set."""
    raw = os.environ.get("MMSIM_PROTOCOL", "")
    names = [n.strip() for n in raw.split(",") if n.strip()]
    bad = [n for n in names if n not in PROTOCOLS]
    if bad:
        return _EnvError("MMSIM_PROTOCOL", f"invalid choice: {bad[0]!r} (choose from {', '.join(PROTOCOLS)})")
    return names or None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["loadgen"]:
        from mmsim.loadgen.cli import main as loadgen_main  # the server never imports the load generator

        return loadgen_main(argv[1:])
    args = build_parser().parse_args(argv)
    # A bad environment variable is an error only where its flag did not override it.
    bad = next((v for v in vars(args).values() if isinstance(v, _EnvError)), None)
    if bad is not None and not (args.command == "race" and args.protocol):
        args.parser.error(bad.message)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
