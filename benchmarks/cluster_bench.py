#!/usr/bin/env python3
"""Schedule exploration on a Dask cluster: schedules per second of one litmus scenario searched here
(one process, the baseline), then with ``--cluster`` on one worker and on two workers, in the same run.

    .venv/bin/python benchmarks/cluster_bench.py [--schedules 6000] [--repeats 3] [--out benchmarks/out/cluster]

The scenario is ``fast-path-race`` under ``recheck``, random schedules, nothing caught (so every
schedule runs to its end, and the search is not cut short by a catch). The script starts its own
``dask scheduler`` and ``dask worker`` processes (one thread each, no nanny) on loopback: one
worker, then a second. A figure is the median of ``--repeats`` searches of ``--schedules``
schedules each (seeds 0..R-1), counted from the call to the result: the connection to the
scheduler, shipping the parts and gathering them are included, as a user of ``mmsim explore
--cluster`` sees them.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from distributed import Client

from mmsim.server.tools.cluster import connect
from mmsim.server.tools.explore import explore
from mmsim.server.tools.litmus import load

LITMUS = Path(__file__).resolve().parent.parent / "tests" / "litmus"
DASK = Path(sys.executable).parent / "dask"


def _wait(what: str, ready: Callable[[], bool], procs: list[subprocess.Popen[bytes]], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if any(p.poll() is not None for p in procs):
            raise SystemExit(f"a dask process exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise SystemExit(f"no {what} within {timeout:g} s")
        time.sleep(0.05)


def _joined(client: Client, n: int) -> bool:
    return len(client.nthreads()) == n


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--schedules", type=int, default=6000, help="schedules of one search (default 6000)")
    ap.add_argument("--repeats", type=int, default=3, help="searches per figure (default 3)")
    ap.add_argument("--out", default="benchmarks/out/cluster", help="where summary.json goes")
    args = ap.parse_args()
    scn = load(LITMUS / "fast-path-race.litmus")

    def rate(cluster: str | None = None) -> float:
        runs = [explore(scn, "recheck", strategy="random", schedules=args.schedules, seed=i, stop_on_catch=False,
                        cluster=cluster) for i in range(args.repeats)]
        assert all(r.first is None and r.schedules == args.schedules for r in runs)
        return statistics.median(args.schedules / r.seconds for r in runs)

    loadavg = [os.getloadavg()[0]]  # how busy the machine was (other work shares it)
    figures: dict[str, float] = {"here, one process": rate()}
    print(f"here, one process: {figures['here, one process']:,.0f} schedules/s", flush=True)
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        sched_file = Path(tmp) / "scheduler.json"

        def start(*argv: str) -> None:
            procs.append(subprocess.Popen([str(DASK), *argv], cwd=tmp, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))

        try:
            start("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file",
                  str(sched_file))
            _wait("scheduler file", lambda: sched_file.exists() and "address" in sched_file.read_text(), procs)
            address = json.loads(sched_file.read_text())["address"]
            worker = ("worker", address, "--nthreads", "1", "--nworkers", "1", "--no-nanny", "--no-dashboard",
                      "--local-directory", tmp)
            start(*worker)
            with connect(address, timeout=60) as client:  # once the first worker is in
                for workers in (1, 2):
                    if workers > 1:
                        start(*worker)
                    _wait(f"{workers} worker(s)", functools.partial(_joined, client, workers), procs)
                    key = f"cluster, {workers} worker{'s' * (workers > 1)}"
                    figures[key] = rate(cluster=address)
                    print(f"{key}: {figures[key]:,.0f} schedules/s", flush=True)
        finally:  # the workers first: a worker whose scheduler is gone waits for it
            for p in reversed(procs):
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    loadavg.append(os.getloadavg()[0])
    base = figures["here, one process"]
    print(f"\n{scn.name} under recheck, random, {args.schedules} schedules a search, medians of {args.repeats} "
          f"({platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; load average "
          f"{loadavg[0]:.1f} at the start, {loadavg[1]:.1f} at the end)")
    print("| where | schedules/s | × here |")
    print("|---|---:|---:|")
    for key, value in figures.items():
        print(f"| {key} | {value:,.0f} | {value / base:.2f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({
        "scenario": scn.name, "schedules": args.schedules, "repeats": args.repeats, "cpus": os.cpu_count(),
        "python": platform.python_version(), "load_average": loadavg, "schedules_per_s": figures,
    }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
