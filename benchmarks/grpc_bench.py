"""gRPC service benchmark: the empty Ping RPC, single-page Remap, and batches of remaps.

One client harness process (this one) drives one ``mmsim serve`` started as a separate OS
process on a free loopback port, through the SDK (:class:`mmsim.client.Client`, one channel).
Figures, each in two modes:

- ``ping``: the empty unary RPC ``Ping`` (``Client.ping``), the baseline for the cost of a call;
- ``remap``: ``Process.remap`` of one page, ping-ponged between two 1-page regions registered
  with userfaultfd (``uffd="missing"``);
- ``batch``: ``Client.batch`` of N single-page remaps per call (the same ping-pong);
- ``batch_stream``: the same lists of N remaps sent over one ``BatchStream`` call
  (``Client.batch_stream``), one list in flight per stream.

Modes: ``sequential`` (one task issues the calls one after the other) and ``concurrent`` (C
tasks on the same channel, each with its own process and page). Each figure is run several
times (``--repeats``), each run a fixed number of calls; the median and every run are reported,
in operations per second (a remap inside a batch counts as one operation).

Goals, per mode: unary remaps/s >= 0.8 x pings/s; batched remaps/s >= 5 x unary remaps/s.

    python benchmarks/grpc_bench.py [--repeats N] [--concurrency C] [--batch-ops N] [--json FILE]
                                    [--profile-server FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import pstats
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmsim.client import Client, Process, ops

P = 4096
SRC, DST = 0x100000000, 0x200000000  # the two 1-page regions of every pair (one process each)
SERVICE = "mmsim.v1.MemoryManager"
#: The goals, as ratios within one mode.
REMAP_VS_PING = 0.8
BATCH_VS_REMAP = 5.0
FIGURES = ("ping", "remap", "batch", "batch_stream")
MODES = ("sequential", "concurrent")


# -- the server process -------------------------------------------------------------------------


def progress(message: str) -> None:
    """One line on stderr per step and per run, so a long benchmark shows where it is."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A loopback port nobody listens on right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server_process(port: int, profile: Path | None) -> subprocess.Popen[bytes]:
    """``python -m mmsim.server serve`` on ``port``, optionally under cProfile (stats written to
    ``profile`` when it exits). Its log (warnings and above) goes to our stderr."""
    serve = ["-m", "mmsim.server", "serve", "--listen", f"127.0.0.1:{port}", "--log-level", "warning"]
    prefix = ["-m", "cProfile", "-o", str(profile)] if profile else []
    return subprocess.Popen([sys.executable, *prefix, *serve])


async def wait_serving(target: str, proc: subprocess.Popen[bytes], limit_s: float = 30.0) -> None:
    """Poll the gRPC health service until the MemoryManager service reports SERVING."""
    deadline = time.perf_counter() + limit_s
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode} before serving")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1.0)  # type: ignore[attr-defined]  # the stubs' HealthStub has no methods
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass  # not listening yet
            if time.perf_counter() > deadline:
                raise TimeoutError(f"the server at {target} did not become healthy in {limit_s} s")
            await asyncio.sleep(0.05)


def stop_server_process(proc: subprocess.Popen[bytes], limit_s: float = 60.0) -> int:
    """SIGTERM (graceful drain), then the exit status."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


# -- the workload -------------------------------------------------------------------------------


@dataclass
class Pair:
    """One process with two 1-page regions and one page that moves between them."""

    proc: Process
    value: int
    at_src: bool = True  # where the page is now: SRC (True) or DST (False)

    def next_move(self) -> tuple[int, int]:
        """(dst, src) of the next move of the ping-pong."""
        return (DST, SRC) if self.at_src else (SRC, DST)


async def make_pair(mm: Client, value: int) -> Pair:
    """mmap the source, write it (faulting a page in), mmap the destination registered with
    uffd "missing", then register the source too, so that the move back is legal as well."""
    p = await mm.create_process()
    await p.mmap(P, "rw", addr=SRC)
    await p.write(SRC, value)
    await p.mmap(P, "rw", uffd="missing", addr=DST)
    await p.uffd_register(SRC, P, "missing")
    return Pair(p, value)


def batch_ops(pair: Pair, n: int) -> dict[bool, list[ops.Op]]:
    """The two batches of ``n`` (even) remaps of ``pair``: one for the page at SRC, one at DST.
    Each batch moves the page back and forth, so it ends where it started."""
    there = [ops.remap(pair.proc, DST, SRC, P), ops.remap(pair.proc, SRC, DST, P)]
    back = [ops.remap(pair.proc, SRC, DST, P), ops.remap(pair.proc, DST, SRC, P)]
    return {True: there * (n // 2), False: back * (n // 2)}


def check_batch(results: list[object]) -> None:
    """Every remap of a batch moved its page (a failed one is an exception instance)."""
    for r in results:
        if r != P:
            raise AssertionError(f"a batched remap did not move one page: {r!r}")


#: A worker runs ``calls`` calls of one figure with its own pair; returns nothing.
Worker = Callable[[int], Awaitable[None]]


def ping_worker(mm: Client) -> Worker:
    async def run(calls: int) -> None:
        ping = mm.ping
        for _ in range(calls):
            await ping()

    return run


def remap_worker(pair: Pair) -> Worker:
    async def run(calls: int) -> None:
        remap = pair.proc.remap
        for _ in range(calls):
            dst, src = pair.next_move()
            moved = await remap(dst, src, P)
            if moved != P:
                raise AssertionError(f"remap moved {moved} bytes")
            pair.at_src = not pair.at_src

    return run


def batch_worker(mm: Client, pair: Pair, n: int) -> Worker:
    prebuilt = batch_ops(pair, n)

    async def run(calls: int) -> None:
        batch = mm.batch
        for _ in range(calls):
            check_batch(await batch(prebuilt[pair.at_src]))

    return run


def stream_worker(mm: Client, pair: Pair, n: int) -> Worker:
    prebuilt = batch_ops(pair, n)

    async def run(calls: int) -> None:
        # One stream per worker per run; opening it costs one call's setup, negligible beside
        # the run's many lists.
        async with mm.batch_stream(via=pair.proc) as stream:
            for _ in range(calls):
                check_batch(await stream.run(prebuilt[pair.at_src]))

    return run


async def timed(workers: list[Worker], calls_each: int) -> float:
    """Seconds for every worker to run ``calls_each`` calls, all started at once."""
    t0 = time.perf_counter()
    await asyncio.gather(*(w(calls_each) for w in workers))
    return time.perf_counter() - t0


# -- the benchmark ------------------------------------------------------------------------------


class FigureStats(TypedDict):
    """One figure of one mode in the report."""

    median_ops_per_s: float
    runs_ops_per_s: list[float]
    calls_per_run: int
    ops_per_call: int
    tasks: int


class Verified(TypedDict):
    """What the check after the runs found."""

    pages: int
    invariant_problems: list[str]
    violations: int


class Goal(TypedDict):
    """One goal of one mode: ``figure`` against ``vs``, the ratio wanted and the one measured."""

    mode: str
    figure: str
    vs: str
    want: float
    ratio: float
    met: bool


class Report(TypedDict, total=False):
    """The report (also the JSON written with --json); ``bench`` fills in its measurements."""

    machine: str
    verified: Verified
    batch_calls: int
    figures: dict[str, dict[str, FigureStats]]
    server_exit: int
    goals: list[Goal]
    config: dict[str, object]


@dataclass
class Figure:
    name: str
    mode: str
    workers: list[Worker]
    calls: int  # per run, all workers together
    ops_per_call: int
    runs: list[float]  # ops/s of each run

    @property
    def median(self) -> float:
        return statistics.median(self.runs)


async def bench(args: argparse.Namespace, target: str) -> Report:
    out: Report = {}
    c, n = args.concurrency, args.batch_ops
    async with Client(target) as mm:
        # Pair 0 serves the sequential mode; pairs 0..C-1 the concurrent one (one task each).
        pairs = [await make_pair(mm, 1000 + i) for i in range(c)]

        # Warm up every path (channel, server code, the interpreter's caches) before timing.
        progress(f"warming up ({c} pairs ready)")
        await timed([ping_worker(mm)] * c, 100)
        await timed([remap_worker(p) for p in pairs], 100)
        await timed([batch_worker(mm, p, n) for p in pairs], 3)
        await timed([stream_worker(mm, p, n) for p in pairs], 3)

        # Size the batch runs: calls per run so that a sequential run lasts about --batch-seconds.
        batch_calls = args.batch_calls
        if batch_calls is None:
            probe = 10
            dt = await timed([batch_worker(mm, pairs[0], n)], probe)
            batch_calls = max(c, round(args.batch_seconds / (dt / probe)))
            progress(f"batch runs sized to {batch_calls} calls")

        figures: list[Figure] = []
        for mode in MODES:
            workers = 1 if mode == "sequential" else c
            chosen = pairs[:workers]
            for name, make, calls, per_call in (
                ("ping", lambda p: ping_worker(mm), args.calls, 1),
                ("remap", remap_worker, args.calls, 1),
                ("batch", lambda p: batch_worker(mm, p, n), batch_calls, n),
                ("batch_stream", lambda p: stream_worker(mm, p, n), batch_calls, n),
            ):
                each = max(1, calls // workers)
                figures.append(Figure(name, mode, [make(p) for p in chosen], each * workers, per_call, []))

        # Interleave the figures run by run, so slow drift of a noisy machine hits all alike.
        for rep in range(args.repeats):
            for k, f in enumerate(figures):
                each = f.calls // len(f.workers)
                dt = await timed(f.workers, each)
                f.runs.append(f.calls * f.ops_per_call / dt)
                progress(
                    f"run {rep + 1}/{args.repeats}, figure {k + 1}/{len(figures)}: {f.name} {f.mode}: "
                    f"{f.runs[-1]:,.0f} ops/s ({dt:.2f} s)"
                )
        progress("verifying pages, invariants and detectors")

        # Correctness: each page is where the ping-pong left it, with its value; nothing is at
        # the other end; the model's audit is clean and no detector fired.
        for pair in pairs:
            here, there = (SRC, DST) if pair.at_src else (DST, SRC)
            info = await pair.proc.folio(here)
            if info is None or info.value != pair.value:
                raise AssertionError(f"{pair.proc}: page at {here:#x} is {info}, expected value {pair.value}")
            if await pair.proc.folio(there) is not None:
                raise AssertionError(f"{pair.proc}: a page is left at {there:#x}")
        problems = await mm.check_invariants()
        stats = await mm.stats()
        if problems or stats.get("violations", 0):
            raise AssertionError(f"audit: {problems}, violations: {stats.get('violations')}")
        out["verified"] = {"pages": len(pairs), "invariant_problems": problems,
                           "violations": stats.get("violations", 0)}

    out["batch_calls"] = batch_calls
    out["figures"] = {
        mode: {
            f.name: {
                "median_ops_per_s": f.median,
                "runs_ops_per_s": f.runs,
                "calls_per_run": f.calls,
                "ops_per_call": f.ops_per_call,
                "tasks": len(f.workers),
            }
            for f in figures
            if f.mode == mode
        }
        for mode in MODES
    }
    return out


def goals(figures: dict[str, dict[str, FigureStats]]) -> list[Goal]:
    """The goals of each mode: (figure, compared with, ratio wanted, ratio measured, met)."""
    rows: list[Goal] = []
    for mode in MODES:
        med = {k: float(v["median_ops_per_s"]) for k, v in figures[mode].items()}
        for fig, base, want in (
            ("remap", "ping", REMAP_VS_PING),
            ("batch", "remap", BATCH_VS_REMAP),
            ("batch_stream", "remap", BATCH_VS_REMAP),
        ):
            ratio = med[fig] / med[base]
            rows.append({"mode": mode, "figure": fig, "vs": base, "want": want, "ratio": ratio, "met": ratio >= want})
    return rows


def print_report(out: Report, args: argparse.Namespace) -> None:
    figures = out["figures"]
    print(f"machine: {out['machine']}; {os.cpu_count()} CPUs; medians of {args.repeats} runs")
    print(
        f"concurrency {args.concurrency} (concurrent mode); {args.batch_ops} remaps per batch; "
        f"{out['batch_calls']} batch calls per sequential run"
    )
    wanted = {(g["mode"], g["figure"]): g for g in out["goals"]}
    print(f"{'figure':14} {'mode':11} {'calls/run':>9} {'ops/s':>12} {'/ Ping':>7}  goal")
    for mode in MODES:
        ping = figures[mode]["ping"]["median_ops_per_s"]
        for name in FIGURES:
            f = figures[mode][name]
            g = wanted.get((mode, name))
            goal = "-"
            if g is not None:
                goal = f">= {g['want']:.3f} x {g['vs']}: {g['ratio']:.3f}, {'met' if g['met'] else 'NOT met'}"
            print(
                f"{name:14} {mode:11} {f['calls_per_run']:>9} {f['median_ops_per_s']:>12,.0f} "
                f"{f['median_ops_per_s'] / ping:>7.3f}  {goal}"
            )
    print("all runs (ops/s):")
    for mode in MODES:
        for name in FIGURES:
            runs = figures[mode][name]["runs_ops_per_s"]
            print(f"  {name:14} {mode:11} " + ", ".join(f"{r:,.0f}" for r in runs))
    v = out["verified"]
    print(
        f"verified: {v['pages']} pages where expected, invariants clean, {v['violations']} violations; "
        f"server exit status {out['server_exit']}"
    )


def print_profile(path: Path, top: int = 30) -> None:
    """The server's hottest functions, by own time and by cumulative time."""
    st = pstats.Stats(str(path))
    st.strip_dirs()
    for key in ("tottime", "cumulative"):
        print(f"\nserver profile ({path}), top {top} by {key}:")
        st.sort_stats(key).print_stats(top)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="runs of each figure (default 5)")
    ap.add_argument("--calls", type=int, default=3000, help="unary calls per run (default 3000)")
    ap.add_argument("--concurrency", type=int, default=16, help="tasks of the concurrent mode (default 16)")
    ap.add_argument("--batch-ops", type=int, default=256, help="remaps per batch, even (default 256)")
    ap.add_argument("--batch-calls", type=int, help="batch calls per run (default: sized by --batch-seconds)")
    ap.add_argument("--batch-seconds", type=float, default=0.75, help="target length of a batch run (default 0.75)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--profile-server", type=Path, metavar="FILE", help="run the server under cProfile; stats to FILE")
    ap.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin the server to the first CPU and this client to the second (pinning is the default "
        "where there are two or more, so the two do not trade places on the same cores mid-run)",
    )
    args = ap.parse_args()
    if args.batch_ops < 2 or args.batch_ops % 2:
        ap.error("--batch-ops must be even (each batch moves the page there and back)")

    port = free_port()
    target = f"127.0.0.1:{port}"
    proc = start_server_process(port, args.profile_server)
    cpus = sorted(os.sched_getaffinity(0))
    pinned = not args.no_pin and len(cpus) >= 2
    if pinned:
        os.sched_setaffinity(proc.pid, {cpus[0]})
        os.sched_setaffinity(0, {cpus[1]})
    try:
        progress(f"starting the server on {target}")
        asyncio.run(wait_serving(target, proc))
        out: Report = {"machine": f"{platform.node()} {platform.machine()} Python {platform.python_version()}"}
        out.update(asyncio.run(bench(args, target)))
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    progress("stopping the server")
    out["server_exit"] = stop_server_process(proc)
    out["goals"] = goals(out["figures"])
    out["config"] = {
        "repeats": args.repeats,
        "calls": args.calls,
        "concurrency": args.concurrency,
        "batch_ops": args.batch_ops,
        "profile_server": str(args.profile_server) if args.profile_server else None,
        "pinned": f"server on CPU {cpus[0]}, client on CPU {cpus[1]}" if pinned else "no",
    }
    print_report(out, args)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    if args.profile_server:
        print_profile(args.profile_server)
    return 0 if out["server_exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
