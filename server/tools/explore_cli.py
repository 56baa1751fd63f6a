"""What ``mmsim explore`` prints: the search's figures, and a caught schedule as a trace with the
command that replays it."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..cli import find_variant, variant_error, variant_spec
from ..mm.kernel import PROTOCOLS
from ..mm.steps import VariantError, is_file_spec, load_variant
from .cluster import ClusterError
from .explore import RunResult, explore, follow, minimize, run_sync, token, trace_html, untoken
from .litmus import Scenario, ScenarioError, load

#: Exit statuses: nothing caught; a violation the scenario does not declare; bad usage; only what
#: the scenario's ``known:`` lines declare under the protocol explored.
EXIT_CLEAN, EXIT_CAUGHT, EXIT_USAGE, EXIT_KNOWN = 0, 1, 2, 3


def known_kinds(scn: Scenario, protocol: str, mutant: str | None) -> frozenset[str]:
    """The kinds a catch may have and still be a known finding: the scenario's ``known:`` kinds
    under ``protocol``; none under a mutant (the finding is the protocol's, not the mutant's)."""
    return frozenset() if mutant is not None else scn.known.get(protocol, frozenset())


def exit_status(kinds: set[str], known: frozenset[str]) -> int:
    """0 when nothing was caught, 3 when every kind caught is a known finding, else 1."""
    if not kinds:
        return EXIT_CLEAN
    return EXIT_KNOWN if kinds <= known else EXIT_CAUGHT


def trace_table(scn: Scenario, r: RunResult, title: str) -> Table:
    """One column per thread, one row per event (the locks the thread holds after it, dimmed)."""
    t = Table(title=title, show_lines=False, expand=False)
    t.add_column("step", justify="right", style="dim")
    names = [n for n, _ in scn.threads]
    for n in names:
        t.add_column(n, overflow="fold")
    style = {"op": "bold", "result": "green", "lock": "cyan", "state": "magenta", "point": "", "finding": "bold red"}
    for e in r.events:
        cells = [""] * len(names)
        text = f"[{style.get(e.kind, '')}]{_escape(e.text)}[/]" if style.get(e.kind) else _escape(e.text)
        if e.held and e.kind in ("lock", "point"):
            text += f"\n[dim]holds {_escape(', '.join(e.held))}[/]"
        cells[max(e.thread, 0)] = text
        t.add_row(str(e.step), *cells)
    return t


def _escape(s: str) -> str:
    return s.replace("[", "\\[")


def _show(console: Console, scn: Scenario, r: RunResult, title: str, trace_out: str | None) -> None:
    console.print(trace_table(scn, r, title))
    for v in r.violations:
        console.print(f"[bold red]violation[/] {_escape(v)}")
    for p in r.problems:
        console.print(f"[bold red]audit[/] {_escape(p)}")
    for f in r.findings:
        console.print(f"[yellow]finding[/] {_escape(f)}")
    if trace_out:
        Path(trace_out).write_text(trace_html(scn, r, title))
        console.print(f"trace written to {trace_out}")


@dataclass(frozen=True)
class _Choice:
    """What a search runs: the protocol and the mutant as the model takes them (a built-in name, or
    FILE.py:NAME with FILE absolute), and as the output names them."""

    protocol: str
    mutant: str | None
    protocol_label: str
    mutant_label: str | None

    def __str__(self) -> str:
        return self.protocol_label + (f" + {self.mutant_label}" if self.mutant_label else "")


def _choice(args: argparse.Namespace) -> _Choice:
    """The protocol and mutant that ``--protocol``, ``--mutant`` and ``--variant`` name. VariantError
    for a ``--variant`` that cannot be used."""
    protocol = args.protocol or "recheck"
    if not args.variant:
        return _Choice(protocol, args.mutant, protocol, args.mutant)
    v = find_variant(args.variant)
    spec = variant_spec(args.variant)
    label = f"{v.name} ({args.variant})"
    if not v.mutant:
        if args.protocol:
            raise VariantError(f"{v.name!r} is a protocol: give --protocol or --variant, not both")
        return _Choice(spec, args.mutant, label, args.mutant)
    if args.mutant:
        raise VariantError(f"{v.name!r} is a mutant: give --mutant or --variant, not both")
    protocol = args.protocol or v.applies_to[0]
    if protocol not in v.applies_to:
        raise VariantError(f"mutant {v.name!r} applies to {', '.join(v.applies_to)}, not {protocol!r}")
    if protocol not in PROTOCOLS:
        raise VariantError(f"mutant {v.name!r} applies to {', '.join(v.applies_to)}: give one of them that is a "
                           f"built-in protocol ({', '.join(PROTOCOLS)}) with --protocol")
    return _Choice(protocol, spec, protocol, label)


def _named(spec: str) -> str:
    """A protocol or mutant as the output names it: a user's variant by its name and its file."""
    return f"{load_variant(spec).name} ({spec})" if is_file_spec(spec) else spec


#: --generate: random schedules per program after the exhaustive search, unless --schedules says.
GENERATED_SCHEDULES = 300


def _generated(console: Console, args: argparse.Namespace, run: _Choice) -> int:
    """``--generate N``: programs 0 .. N-1 of ``--seed``, each searched exhaustively up to
    ``--preemptions`` and then with random schedules; each caught one shrunk and written to
    ``--save`` (default: the current directory) as ``gen-SEED-I.litmus``. Exit 1 if any was caught."""
    from .generate import explore_generated

    schedules = args.schedules or GENERATED_SCHEDULES

    def told(name: str, kinds: frozenset[str]) -> None:
        console.print(f"{name}: " + (f"[bold red]caught[/] ({', '.join(sorted(kinds))})" if kinds else "clean"))

    catches = explore_generated(args.seed, args.generate, run.protocol, run.mutant, args.preemptions, schedules,
                                on_program=told)
    out = Path(args.save or ".")
    out.mkdir(parents=True, exist_ok=True)
    for c in catches:
        path = out / f"{c.name}.litmus"
        head = (f"# drawn by mmsim explore --generate (seed {args.seed}), caught by {', '.join(sorted(c.kinds))} "
                f"under {run}, shrunk from {len(c.text.splitlines())} lines\n")
        path.write_text(head + c.small)
        console.print(f"wrote {path}")
    console.print(f"{args.generate} generated programs under {run}: {len(catches)} caught")
    return 1 if catches else EXIT_CLEAN


def explore_command(args: argparse.Namespace) -> int:
    # 160 columns when the output is not a terminal, unless COLUMNS says otherwise
    console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160, highlight=False)
    try:
        run = _choice(args)
    except VariantError as e:
        return variant_error("explore", args.variant, e)
    if args.generate:
        if args.scenario or args.replay:
            args.parser.error("--generate draws its programs: no scenario file or --replay with it")
        if args.time_limit:
            args.parser.error("--time-limit bounds one scenario's search, not --generate's")
        return _generated(console, args, run)
    try:
        if args.replay:
            scn, protocol, mutant, pre, fine = untoken(args.replay)
            r = run_sync(scn, protocol, mutant, follow(pre), fine)
            what = (f"replay of {scn.name} under {_named(protocol)}"
                    + (f" with mutant {_named(mutant)}" if mutant else ""))
            _show(console, scn, r, what, args.trace_out)
            return exit_status(r.kinds, known_kinds(scn, protocol, mutant))
        if not args.scenario:
            args.parser.error("give a scenario file, or --replay TOKEN")
        scn = load(args.scenario)
        args.schedules = args.schedules or 10_000
        s = explore(scn, run.protocol, run.mutant, args.strategy, args.schedules, args.preemptions, args.depth,
                    args.seed, stop_on_catch=not args.all, jobs=args.jobs, cluster=args.cluster, points=args.points,
                    time_limit=args.time_limit)
    except (ScenarioError, ClusterError) as e:
        print(f"mmsim explore: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as e:  # an unknown mutant, one that does not apply, a replay token's variant file gone
        print(f"mmsim explore: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    rate = s.schedules / s.seconds if s.seconds else 0.0
    console.print(
        f"{scn.name}: {run}"
        + f", {args.strategy} at {'every access' if s.fine else 'the named points'}: {s.schedules} schedules, "
        + f"{len(s.interleavings)} distinct interleavings"
        + (f", {s.pruned} states pruned" if args.strategy == "exhaustive" else "")
        + f", {s.seconds:.3f} s ({rate:,.0f} schedules/s"
        + (f" on the cluster at {args.cluster})" if args.cluster
           else f" over {args.jobs} processes)" if args.jobs > 1 and args.strategy != "exhaustive" else ")")
        + (f", {s.cut} cut at the step limit" if s.cut else "")
    )
    if args.strategy == "dpor":
        console.print(f"complete: {s.traces} traces, {s.states} states, {s.seconds:.1f} s" if s.complete else
                      f"stopped: {s.traces} traces, {s.states} states, {s.seconds:.1f} s ("
                      + ("a catch" if s.first is not None and not args.all else
                         f"{s.cut} runs cut at the step limit" if s.cut else
                         f"--time-limit {args.time_limit}" if s.timed_out else f"--schedules {args.schedules}") + ")")
    for f in sorted(s.findings):
        console.print(f"[yellow]finding[/] (documented, not a violation) {_escape(f)}")
    known = known_kinds(scn, run.protocol, run.mutant)
    if args.all and s.kinds:
        console.print(f"caught over the whole search ({len(s.kinds)} kinds): "
                      + ", ".join(f"{k} in {n} schedule{'s' * (n != 1)}" + (" (known)" if k in known else "")
                                  for k, n in sorted(s.kinds.items())))
    if s.first is None:
        console.print("nothing caught")
        return EXIT_CLEAN
    small = minimize(scn, run.protocol, run.mutant, s.first)
    if small.kinds <= known:
        console.print(f"[yellow]a known finding of this scenario under {run.protocol}[/] "
                      f"({', '.join(sorted(known))}; docs/protocol.md)")
    tok = token(scn, run.protocol, run.mutant, small.preemptions, small.fine)
    title = (f"{scn.name} under {run}"
             + f": caught at schedule {s.at} (seed {args.seed}, {args.strategy}); "
             + f"minimised to {len(small.preemptions)} preemption(s) at steps "
             + ", ".join(f"{st}→{scn.threads[t][0]}" for st, t in small.preemptions))
    _show(console, scn, small, title, args.trace_out)
    console.print("replay it exactly with:")
    console.print(f"  mmsim explore --replay {shlex.quote(tok)}", soft_wrap=True)
    return exit_status(set(s.kinds), known)
