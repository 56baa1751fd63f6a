#!/usr/bin/env python3
"""Schedules per second of ``mmsim explore``, before and after a change, paired in one run.

    .venv/bin/python benchmarks/explore_pair_bench.py --before COMMIT [--after COMMIT] [--pairs 6]

The two trees (``--after`` defaults to the working tree) run alternately, one process per
invocation, ``--pairs`` invocations each: an invocation explores 3 × 2,000 random schedules of the
scenario under ``recheck`` (nothing is caught, so every schedule runs to its end) and reports its
best rate. The medians of the invocations and their ratio are printed per scenario; on a shared
machine the alternation spreads the noise over both trees.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from callgrind_bench import PYTHON, checkouts, shim

DRIVER = """
import sys
from pathlib import Path
from mmsim.server.tools.explore import explore
from mmsim.server.tools.litmus import load
scn = load(Path(sys.argv[2]) / "tests" / "litmus" / (sys.argv[1] + ".litmus"))
explore(scn, "recheck", strategy="random", schedules=200, seed=99, stop_on_catch=False)  # warm up
rates = []
for i in range(3):
    s = explore(scn, "recheck", strategy="random", schedules=2000, seed=i, stop_on_catch=False)
    rates.append(s.schedules / s.seconds)
print(max(rates))
"""


def rate(tree: Path, shim_dir: Path, scenario: str) -> float:
    out = subprocess.run([str(PYTHON), "-c", DRIVER, scenario, str(tree)], check=True, capture_output=True,
                         text=True, env={"PYTHONPATH": str(shim_dir), "PATH": "/usr/bin:/bin"})
    return float(out.stdout.split()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="the baseline commit")
    ap.add_argument("--after", help="the candidate commit (default: the working tree)")
    ap.add_argument("--pairs", type=int, default=6, help="invocations of each tree per scenario (default 6)")
    ap.add_argument("--scenarios", nargs="*", default=["fast-path-race", "slow-path-race"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="explore-pair-") as tmp:
        work = Path(tmp)
        with checkouts(work, args.before, args.after) as trees:
            shims = {label: shim(tree, work / f"shim-{label}") for label, tree in trees.items()}
            for scenario in args.scenarios:
                got: dict[str, list[float]] = {"before": [], "after": []}
                for _ in range(args.pairs):
                    for label in ("before", "after"):
                        got[label].append(rate(trees[label], shims[label], scenario))
                b, a = statistics.median(got["before"]), statistics.median(got["after"])
                print(f"{scenario:16} before {b:>7,.0f}  after {a:>7,.0f} schedules/s (medians of {args.pairs})  "
                      f"after/before {a / b:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
