#!/usr/bin/env python3
"""The load generator's figures, side by side in one invocation, each run against a fresh server:
the empty RPC (Ping) as the baseline, each unary operation, the batch and stream paths, the race
profile under each of the four protocols, and an open-loop run at half of the peak remap rate.

    .venv/bin/python benchmarks/loadgen_bench.py [--duration 5] [--out DIR]

Every run is ``mmsim loadgen`` as a user runs it (its own OS process, closed loop unless said,
``--workers 1 --concurrency 16``) against ``mmsim serve --access-log-sample 0`` (a fresh server
each time, so that no run inherits another's model). The reports go to DIR (default
``benchmarks/out/loadgen``), with a plot of each race run. Goals on a 2-core machine: unary remap
at 0.8 × Ping or more; the batch path at 20 × unary remap or more in operations per second; the
open-loop run's p99 at most 10 × its p50; and the generator says when it was the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mmsim.client.testing import serve_subprocess

UNARY = ["ping", "remap", "remap64", "walk", "walk_blocking", "fork", "write", "read", "mmap"]
BATCHED = ["batch", "stream"]
PROTOCOLS = ["recheck", "recheck-slow-only", "no-recheck", "folio-lock"]
err = Console(stderr=True)


def log(msg: str) -> None:
    err.log(msg)


def loadgen(addr: str, out: Path, *args: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "mmsim.server", "loadgen", "--target", addr, "--quiet", "--workers", "1",
           "--concurrency", "16", "--trees", "2", "--json", str(out), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode not in (0, 1):
        raise SystemExit(f"loadgen failed ({r.returncode}): {r.stderr.strip()}")
    return json.loads(out.read_text())


def one(name: str, out: Path, server_args: list[str], *args: str) -> dict[str, Any]:
    with serve_subprocess(*server_args) as server:  # a fresh server each time; it must exit 0
        report = loadgen(server.addr, out / f"{name}.json", *args)
    f = report["overall"]
    log(f"{name}: {f['ops_per_s']:,.0f} ops/s, p50 {f['latency_ms']['p50']:.3f} ms, "
        f"p99 {f['latency_ms']['p99']:.3f} ms, bottleneck {report['bottleneck']}")
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds of each run (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up of each run (default 1)")
    ap.add_argument("--out", default="benchmarks/out/loadgen", help="where the reports and plots go")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--duration", str(args.duration), "--warmup", str(args.warmup)]
    reports: dict[str, dict[str, Any]] = {}
    for op in UNARY + BATCHED:
        reports[op] = one(op, out, [], "--mix", f"{op}=1", *common)
    for proto in PROTOCOLS:
        reports[f"race/{proto}"] = one(
            f"race-{proto}", out, ["--protocol", proto, "--preempt", "0.05"], "--profile", "race", *common,
            "--plot", str(out / f"race-{proto}.png"),
        )
    half = reports["remap"]["overall"]["throughput"] / 2
    reports["open"] = one("open-remap", out, [], "--mix", "remap=1", "--rate", f"{half:.0f}", *common)

    ping = reports["ping"]["overall"]["ops_per_s"]
    remap = reports["remap"]["overall"]["ops_per_s"]
    t = Table(title=f"mmsim loadgen, {platform.node()} ({platform.machine()}, Python {platform.python_version()}), "
                    f"{args.duration:g} s each, 1 worker × 16 in flight")
    for col in ("run", "ops/s", "/ ping", "p50 ms", "p99 ms", "p99.9 ms", "bottleneck", "errnos", "server: retries",
                "violations"):
        t.add_column(col, justify="left" if col in ("run", "errnos", "bottleneck") else "right")
    for name, r in reports.items():
        f = r["overall"]
        d = r["server_deltas"]
        t.add_row(
            name, f"{f['ops_per_s']:,.0f}", f"{f['ops_per_s'] / ping:.3f}", f"{f['latency_ms']['p50']:.3f}",
            f"{f['latency_ms']['p99']:.3f}", f"{f['latency_ms']['p99.9']:.3f}", r["bottleneck"],
            ", ".join(f"{k} {v}" for k, v in r["errnos"].items()) or "—",
            f"{d.get('walk_fast_retries', 0)}/{d.get('walk_slow_retries', 0)}", str(d.get("violations", 0)),
        )
    console = Console(width=160)
    console.print(t)
    batch = max(reports["batch"]["overall"]["ops_per_s"], reports["stream"]["overall"]["ops_per_s"])
    open_lat = reports["open"]["overall"]["latency_ms"]
    goals = [
        ("unary remap >= 0.800 x ping", remap / ping, remap / ping >= 0.8),
        ("batch path >= 20.000 x unary remap", batch / remap, batch / remap >= 20),
        (f"open loop at {half:,.0f}/s: p99 <= 10.000 x p50", open_lat["p99"] / open_lat["p50"],
         open_lat["p99"] <= 10 * open_lat["p50"]),
        ("no violation under recheck and folio-lock",
         sum(reports[f"race/{p}"]["server_deltas"].get("violations", 0) for p in ("recheck", "folio-lock")), None),
    ]
    for what, value, met in goals:
        if met is None:
            met = value == 0
        console.print(f"{what}: {value:.3f}, {'met' if met else 'NOT met'}")
    summary = {"when": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.node(),
               "runs": {k: {"ops_per_s": r["overall"]["ops_per_s"], "latency_ms": r["overall"]["latency_ms"],
                            "bottleneck": r["bottleneck"], "server_deltas": r["server_deltas"]}
                        for k, r in reports.items()},
               "goals": [{"goal": g, "value": v, "met": bool(m if m is not None else v == 0)} for g, v, m in goals]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
