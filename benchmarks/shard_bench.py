#!/usr/bin/env python3
"""Scaling with shards: throughput and efficiency of ``mmsim serve --shards N`` for N in 1, 2, 4, 8,
on the unary remap path and on the batch path, beside the empty RPC (Ping) at the same shard
counts, all in one invocation.

    .venv/bin/python benchmarks/shard_bench.py [--shards 1,2,4,8] [--duration 5] [--repeats 3]

Every run is ``mmsim loadgen`` as a user runs it (its own OS processes: ``--workers`` = N ×
``--workers-per-shard``, ``--concurrency 16`` each, ``--trees`` = 2N so every shard holds two trees)
against a fresh ``mmsim serve --shards N --access-log-sample 0``, one address (the SDK discovers
the shards and calls each directly). Each (N, path) is run ``--repeats`` times, the shard counts
interleaved so that a noisy stretch of the machine does not land on one of them; the figures are
medians. Efficiency at N is throughput(N) / (N × throughput(1)) of the same path; "/ ping" is the
path's operations per second over Ping's at the same N. The reports go to ``--out`` (default
``benchmarks/out/shards``) with ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mmsim.client.testing import serve_subprocess

#: The paths measured: name -> the loadgen's mix.
PATHS = {"ping": "ping=1", "remap": "remap=1", "batch": "batch=1"}
err = Console(stderr=True)


def loadgen(addr: str, out: Path, shards: int, args: argparse.Namespace, mix: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "mmsim.server", "loadgen", "--target", addr, "--quiet",
           "--workers", str(shards * args.workers_per_shard), "--concurrency", str(args.concurrency),
           "--trees", str(2 * shards), "--duration", str(args.duration), "--warmup", str(args.warmup),
           "--mix", mix, "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if r.returncode not in (0, 1):
        raise SystemExit(f"loadgen failed ({r.returncode}): {r.stderr.strip()}")
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", default="1,2,4,8", help="shard counts, comma-separated (default 1,2,4,8)")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"paths to run (default {','.join(PATHS)})")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds of each run (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up of each run (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each (N, path); medians (default 3)")
    ap.add_argument("--workers-per-shard", type=int, default=1, help="loadgen worker processes per shard (default 1)")
    ap.add_argument("--concurrency", type=int, default=16, help="calls in flight per worker (default 16)")
    ap.add_argument("--out", default="benchmarks/out/shards", help="where the reports go")
    args = ap.parse_args()
    counts = [int(n) for n in args.shards.split(",")]
    paths = [p for p in args.paths.split(",") if p]
    if 1 not in counts:
        counts.insert(0, 1)  # the base of every efficiency
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[tuple[int, str], list[float]] = {}
    for rep in range(args.repeats):
        order = counts if rep % 2 == 0 else list(reversed(counts))
        for n in order:
            with serve_subprocess("--shards", str(n)) as server:
                for path in paths:
                    report = loadgen(server.addr, out / f"n{n}-{path}-{rep}.json", n, args, PATHS[path])
                    ops = report["overall"]["ops_per_s"]
                    figures.setdefault((n, path), []).append(ops)
                    err.log(f"shards {n}, {path}, run {rep + 1}: {ops:,.0f} ops/s, bottleneck {report['bottleneck']}")
    med = {k: statistics.median(v) for k, v in figures.items()}
    cpus = os.cpu_count()
    t = Table(title=f"mmsim serve --shards N, {platform.node()} ({cpus} CPUs, Python {platform.python_version()}), "
                    f"{args.duration:g} s × {args.repeats}, medians; workers = {args.workers_per_shard} × N, "
                    f"{args.concurrency} in flight each")
    t.add_column("shards", justify="right")
    for path in paths:
        t.add_column(f"{path} ops/s", justify="right")
        t.add_column(f"{path} eff.", justify="right")
        if path != "ping" and "ping" in paths:
            t.add_column(f"{path} / ping", justify="right")
    for n in counts:
        row = [str(n)]
        for path in paths:
            v = med[(n, path)]
            row += [f"{v:,.0f}", f"{v / (n * med[(1, path)]):.2f}"]
            if path != "ping" and "ping" in paths:
                row.append(f"{v / med[(n, 'ping')]:.2f}")
        t.add_row(*row)
    Console(width=200).print(t)
    summary = {
        "when": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.node(), "cpus": cpus,
        "python": platform.python_version(), "args": vars(args),
        "runs": {f"{n}/{p}": {"ops_per_s": v, "median": med[(n, p)], "efficiency": med[(n, p)] / (n * med[(1, p)]),
                              **({"over_ping": med[(n, p)] / med[(n, "ping")]} if "ping" in paths else {})}
                 for (n, p), v in figures.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
