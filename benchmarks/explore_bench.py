#!/usr/bin/env python3
"""Schedule exploration: how fast ``mmsim explore`` runs schedules, and how long each strategy takes
to find each known race (the two unsafe recheck variants) and each killable protocol mutant.

    .venv/bin/python benchmarks/explore_bench.py [--repeats 9] [--out benchmarks/out/explore]

- **schedules/s**: 2,000 random schedules of each seed scenario (slow-path-race, fast-path-race)
  under ``recheck``, where nothing is caught, so every schedule runs to its end; in one process,
  then 2,000 per worker spread over ``--jobs`` worker processes (``mmsim explore --jobs``).
- **time to find**: for each target (scenario, protocol, mutant), each strategy is run ``--repeats``
  times (random and PCT with seeds 0..R-1; the exhaustive search is deterministic, so its repeats
  only measure time), each until its first catch; the medians of the schedules run and of the
  seconds, and how many repeats found it at all within ``--budget`` schedules.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mmsim.server.tools.explore import explore
from mmsim.server.tools.litmus import load

LITMUS = Path(__file__).resolve().parent.parent / "tests" / "litmus"
#: (scenario, protocol, mutant): the known races.
RACES = [("slow-path-race", "no-recheck", None), ("fast-path-race", "recheck-slow-only", None)]


def mutant_targets() -> list[tuple[str, str, str | None]]:
    """Each killable mutant with the scenario and protocol that kill it (``mmsim mutate``'s table)."""
    try:
        from mmsim.server.tools.mutate import killers
    except ImportError:
        return []
    return [(scn, proto, mutant) for mutant, (scn, proto) in killers().items()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=9, help="runs of each (target, strategy) (default 9)")
    ap.add_argument("--budget", type=int, default=20_000, help="most schedules of one search (default 20000)")
    ap.add_argument("--out", default="benchmarks/out/explore", help="where summary.json goes")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="worker processes for the second schedules/s figure (default: the CPU count)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console(width=160)
    rates: dict[str, dict[str, float]] = {}
    for name in ("slow-path-race", "fast-path-race"):
        scn = load(LITMUS / f"{name}.litmus")
        rates[name] = {}
        for jobs in sorted({1, args.jobs}):
            # one process, then the search spread over --jobs worker processes (start-up included)
            runs = [explore(scn, "recheck", strategy="random", schedules=2000 * jobs, seed=i, stop_on_catch=False,
                            jobs=jobs) for i in range(3)]
            assert all(r.first is None for r in runs)
            rates[name][f"jobs={jobs}"] = statistics.median(r.schedules / r.seconds for r in runs)
            console.log(f"{name}, {jobs} process(es): {rates[name][f'jobs={jobs}']:,.0f} schedules/s "
                        "(random, recheck, nothing caught)")
    table = Table(title=f"time to find, medians of {args.repeats} "
                        f"({platform.node()}, Python {platform.python_version()})")
    for col in ("scenario", "protocol", "mutant", "strategy", "found", "schedules", "ms"):
        table.add_column(col, justify="right" if col in ("found", "schedules", "ms") else "left")
    rows: list[dict[str, Any]] = []
    targets = mutant_targets()
    console.log(f"{len(targets)} killed mutants, with their killing scenarios")
    for scn_name, proto, mutant in RACES + targets:
        scn = load(LITMUS / f"{scn_name}.litmus")
        for strategy in ("random", "pct", "exhaustive"):
            found, scheds, secs = 0, [], []
            for i in range(args.repeats):
                t0 = time.perf_counter()
                s = explore(scn, proto, mutant, strategy=strategy, schedules=args.budget, seed=i)
                secs.append(time.perf_counter() - t0)
                if s.first is not None:
                    found += 1
                    scheds.append(s.at)
            row = {"scenario": scn_name, "protocol": proto, "mutant": mutant, "strategy": strategy,
                   "found": found, "repeats": args.repeats,
                   "schedules_median": statistics.median(scheds) if scheds else None,
                   "seconds_median": statistics.median(secs)}
            rows.append(row)
            console.log(f"{scn_name} {proto} {mutant or '-'} {strategy}: found {found}/{args.repeats}, "
                        f"median {row['schedules_median']} schedules, {row['seconds_median'] * 1e3:.1f} ms")
            table.add_row(scn_name, proto, mutant or "—", strategy, f"{found}/{args.repeats}",
                          f"{row['schedules_median']:g}" if scheds else "—", f"{row['seconds_median'] * 1e3:.1f}")
    console.print(table)
    (out / "summary.json").write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.node(),
                                                  "schedules_per_s": rates, "time_to_find": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
