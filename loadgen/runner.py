"""One load-generator run: start the workers, build the workload, run, merge, report.

The worker processes are started (``spawn``) before this process makes any gRPC object: only then
does it open its own channels, build the workload through the SDK and hand each worker its lanes.
The server's counters are read when the warm-up ends and after the last call, and reported as
deltas: from GetStats (every shard's, summed), or from every shard's Prometheus endpoint
(``--stats-from metrics``, scrape.py).

One target is a deployment the client discovers: one server, the shards of ``mmsim serve --shards
N`` (reached directly), or shards behind a proxy; the trees are spread over the shards and every
call goes to its tree's shard. Several targets are separate servers, used as given ("static").

A shard that restarts under the run (its supervisor starts it again when it dies) is no reason to
stop: the workers make the trees it lost again and go on (restart.py), the report counts the calls
it cost (``shard_restarted``), the restarts seen per shard and the trees made again, and the
counters of a restarted shard count from its restart.
"""

from __future__ import annotations

import asyncio
import datetime
import multiprocessing
import os
import platform
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
from hdrh.histogram import HdrHistogram
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mmsim.client import Client, MmsimError

from . import histograms, scrape
from .access import Access
from .profiles import SHARED_PAGES_PROFILES, is_gc, is_swap
from .restart import RESTART_CODES, RESTART_WAIT_S
from .worker import SERIES_DIGITS, WorkerSpec, worker_main
from .workload import Workload, build, gc_lanes_per_tree, gc_trees, teardown

SCHEMA_ID = "mmsim.loadgen.report/1"
#: A worker that used this fraction of a core or more was the bottleneck.
BOTTLENECK_UTILIZATION = 0.9
#: Seconds the workers are given to start together once they have their specs.
START_DELAY = 0.5


@dataclass(frozen=True)
class Options:
    """Every option of ``mmsim loadgen`` (see cli.py for what each means)."""

    targets: tuple[str, ...]
    duration: float | None
    count: int | None
    warmup: float
    workers: int
    concurrency: int
    rate: float | None
    profile: str | None
    mix: tuple[tuple[str, int], ...]
    pages: int
    trees: int | None  # None: max(2, the deployment's shards)
    fork_depth: int
    seed: int
    call_timeout: float
    keep: bool
    json: str | None
    plot: str | None
    quiet: bool
    token_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    stats_from: str = "grpc"  # "grpc" | "metrics"
    metrics_urls: tuple[str, ...] = ()  # explicit Prometheus endpoints; empty: the topology's

    def access(self, routing: str = "auto") -> Access:
        return Access(self.targets, routing, self.token_file, self.tls_ca, self.tls_cert, self.tls_key)


#: Trees when --trees is not given: at least this many, and one per shard.
MIN_TREES = 2


def default_trees(shards: int, workers: int = 1, gc: bool = False) -> int:
    """The trees of a run without --trees: every shard gets at least one, and in a GC mix every
    worker too (it runs the collector of each tree it has)."""
    return max(MIN_TREES, shards, workers if gc else 1)


class RunError(Exception):
    """The run could not be made (a worker failed, the server is unreachable): one line to show."""


def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name, dist in (("mmsim", "mmsim"), ("grpcio", "grpcio"), ("hdrhistogram", "hdrhistogram")):
        try:
            out[name] = version(dist)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def _start_workers(n: int) -> list[tuple[multiprocessing.process.BaseProcess, Connection]]:
    ctx = multiprocessing.get_context("spawn")
    out: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    for _ in range(n):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=worker_main, args=(child,), daemon=True)
        p.start()
        child.close()
        out.append((p, parent))
    return out


def _stop_workers(workers: list[tuple[multiprocessing.process.BaseProcess, Connection]]) -> None:
    for p, conn in workers:
        try:
            conn.close()
        except OSError:
            pass
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()


class Live:
    """The live line: rate, calls in flight, errors, rolling p99 (the last 2 s of every worker)."""

    def __init__(self, console: Console, quiet: bool) -> None:
        self.console = console
        self.quiet = quiet
        self.last: dict[int, dict[str, Any]] = {}
        self.recent: list[tuple[float, HdrHistogram]] = []
        self.t0 = time.monotonic()
        self.calls_then = (self.t0, 0)
        self.status = console.status("starting", spinner="dots") if not quiet else None

    def __enter__(self) -> Live:
        if self.status is not None:
            self.status.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.status is not None:
            self.status.__exit__(None, None, None)

    def progress(self, msg: dict[str, Any]) -> None:
        self.last[msg["worker"]] = msg
        now = time.monotonic()
        self.recent.append((now, histograms.decode(msg["interval"])))
        self.recent = [(t, h) for t, h in self.recent if now - t <= 2.0]
        if self.status is None:
            return
        calls = sum(m["calls"] for m in self.last.values())
        t_then, calls_then = self.calls_then
        rate = (calls - calls_then) / (now - t_then) if now > t_then else 0.0
        if now - t_then >= 1.0:
            self.calls_then = (now, calls)
        merged = HdrHistogram(1, histograms.HIGHEST, SERIES_DIGITS)
        for _, h in self.recent:
            if h.get_total_count():
                merged.add(h)
        p99 = merged.get_value_at_percentile(99) / 1000 if merged.get_total_count() else 0.0
        problems = sum(m["problems"] for m in self.last.values())
        inflight = sum(m["inflight"] for m in self.last.values())
        self.status.update(
            f"{now - self.t0:5.1f} s  {rate:9,.0f} calls/s  in flight {inflight:4d}  "
            f"errors {problems:,}  p99 (2 s) {p99:8.2f} ms"
        )


async def _collect(workers: list[tuple[Any, Connection]], live: Live) -> list[dict[str, Any]]:
    """Wait for every worker's result, feeding the live line with their progress."""
    loop = asyncio.get_running_loop()
    results: dict[int, dict[str, Any]] = {}
    failed: list[str] = []
    done = asyncio.Event()

    def on_readable(i: int, conn: Connection) -> None:
        try:
            while conn.poll():
                kind, body = conn.recv()
                if kind == "progress":
                    live.progress(body)
                elif kind == "result":
                    results[i] = body
                    loop.remove_reader(conn.fileno())
                else:
                    failed.append(str(body))
                    loop.remove_reader(conn.fileno())
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            if i not in results:
                failed.append(f"worker {i} exited without a result")
        if len(results) + len(failed) == len(workers):
            done.set()

    for i, (_, conn) in enumerate(workers):
        loop.add_reader(conn.fileno(), on_readable, i, conn)
    try:
        await done.wait()
    finally:
        for _, conn in workers:
            try:
                loop.remove_reader(conn.fileno())
            except (ValueError, OSError):
                pass
    if failed:
        raise RunError(f"a worker failed: {failed[0].strip().splitlines()[-1]}")
    return [results[i] for i in sorted(results)]


def merge(results: list[dict[str, Any]], opts: Options, duration: float) -> dict[str, Any]:
    """The figures of the run: every worker's histograms and counts, merged exactly."""
    names = sorted({name for r in results for name in r["ops"]})
    operations: dict[str, Any] = {}
    all_hists = []
    total_ok = total_ops = 0
    all_errors: Counter[str] = Counter()
    all_failures: Counter[str] = Counter()
    for name in names:
        parts = [r["ops"][name] for r in results if name in r["ops"]]
        h = histograms.merge(histograms.decode(p["hist"]) for p in parts)
        ok = sum(p["ok"] for p in parts)
        nops = sum(p["ops"] for p in parts)
        errors = sum((Counter(p["errors"]) for p in parts), Counter())
        failures = sum((Counter(p["failures"]) for p in parts), Counter())
        operations[name] = histograms.figures(h, ok, errors, failures, duration, nops)
        all_hists.append(h)
        total_ok += ok
        total_ops += nops
        all_errors += errors
        all_failures += failures
    overall = histograms.figures(histograms.merge(all_hists), total_ok, all_errors, all_failures, duration, total_ops)
    seconds = max((len(r["series"]) for r in results), default=0)
    series = []
    for t in range(seconds):
        slots = [r["series"][t] for r in results if t < len(r["series"])]
        h = HdrHistogram(1, histograms.HIGHEST, SERIES_DIGITS)
        for _, _, enc in slots:
            part = histograms.decode(enc)
            if part.get_total_count():
                h.add(part)
        n = h.get_total_count()
        series.append({
            "t": t,
            "ops": sum(s[0] for s in slots),
            "errors": sum(s[1] for s in slots),
            "p50_ms": h.get_value_at_percentile(50) / 1000 if n else None,
            "p99_ms": h.get_value_at_percentile(99) / 1000 if n else None,
        })
    return {
        "operations": operations,
        "overall": overall,
        "statuses": dict(sum((Counter(r["statuses"]) for r in results), Counter())),
        "errnos": dict(sum((Counter(r["errnos"]) for r in results), Counter())),
        "late_sends": sum(r["late"] for r in results),
        "timeseries": series,
    }


async def run(opts: Options, console: Console) -> dict[str, Any]:
    """Make the run described by ``opts``; the report (see report.schema.json)."""
    workers = _start_workers(opts.workers)  # before any gRPC object exists in this process
    try:
        return await _run(opts, console, workers)
    finally:
        _stop_workers(workers)


async def _run(opts: Options, console: Console, workers: list[tuple[Any, Connection]]) -> dict[str, Any]:
    try:
        mm = opts.access().client(timeout=max(opts.call_timeout, 60.0), retries=3)
    except (OSError, ValueError) as e:  # a credential file that cannot be read
        raise RunError(f"the credentials: {e}") from None
    try:
        try:
            protocol = await mm.protocol()  # the first call: the discovery
        except MmsimError as e:  # say where it could not go, or that it was refused
            where = ", ".join(opts.targets)
            if e.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                raise RunError(f"{where} refused the calls: {e}") from None
            raise RunError(f"cannot reach {where}: {e}") from None
        except Exception as e:  # noqa: BLE001 - any other failure to connect is one error
            raise RunError(f"cannot reach {', '.join(opts.targets)}: {e}") from None
        shards = len(await mm.routes())
        gc = is_gc(opts.mix)
        if opts.trees is None:
            opts = replace(opts, trees=default_trees(shards, opts.workers, gc))
        assert opts.trees is not None
        if gc and opts.trees < opts.workers:
            raise RunError(f"a GC mix needs at least as many trees as workers ({opts.workers}): each worker runs "
                           "the collectors of its trees")
        counters = await _counters(opts, mm)
        race = opts.profile in SHARED_PAGES_PROFILES
        lanes_total = opts.workers * opts.concurrency
        w = Workload()
        try:
            with Progress(
                TextColumn("setup"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=console, transient=True, disable=opts.quiet,
            ) as bar:
                task = bar.add_task("setup", total=None)
                try:
                    await build(
                        w, mm, opts.trees, opts.pages, opts.fork_depth, lanes_total,
                        progress=lambda done, total: bar.update(task, completed=done, total=total),
                        per_tree=gc_lanes_per_tree(opts.workers, opts.concurrency, opts.trees) if gc else None,
                        gc=gc, swap=is_swap(opts.mix),
                    )
                except (OSError, MmsimError) as e:
                    raise RunError(f"the workload could not be built: {e}") from None
            report = await _measure(opts, console, workers, mm, counters, w, race)
        finally:
            if not opts.keep:
                _, problems = await teardown(mm, w)
                _warn_left(problems)
        report["server"] = {"protocol": protocol, "shards": shards, "routing": mm.routing}
        return report
    finally:
        await mm.close()


def _warn_left(problems: list[str]) -> None:
    """Say on standard error that processes of the run are left on the server, and why."""
    if problems:
        print(f"mmsim loadgen: warning: {len(problems)} process(es) of the run could not be exited: {problems[0]}",
              file=sys.stderr)


#: What one reading of the counters gives per shard (per endpoint, per server): its generation
#: where known (None: not), and its counters.
Reading = dict[str, tuple[int | None, dict[str, int]]]
Counters = Callable[[], Awaitable[Reading]]


async def _counters(opts: Options, mm: Client) -> Counters:
    """What reads the servers' counters, shard by shard: GetStats of every shard, or a scrape of
    every shard's Prometheus endpoint (checked once now, so that a run never starts without them).
    A shard that is restarting is waited for, up to RESTART_WAIT_S."""
    if opts.stats_from != "metrics":
        async def stats() -> Reading:
            if mm.routing == "static":
                return {t: (None, await mm.stats(target=t)) for t in mm.targets}
            generations = {s.index: s.generation or None for s in await mm.shards()}
            return {str(i): (generations.get(i), await mm.stats(shard=i)) for i in range(len(await mm.routes()))}

        async def read_stats() -> Reading:
            deadline = time.monotonic() + RESTART_WAIT_S
            while True:
                try:
                    return await stats()
                except MmsimError as e:
                    if e.code not in RESTART_CODES or time.monotonic() >= deadline:
                        raise RunError(f"cannot read the servers' counters: {e}") from None
                await asyncio.sleep(0.05)

        return read_stats
    urls = list(opts.metrics_urls)
    if not urls:
        try:
            urls = await scrape.endpoints(mm, opts.access)
        except ValueError as e:
            raise RunError(str(e)) from None

    async def read() -> Reading:
        deadline = time.monotonic() + RESTART_WAIT_S
        while True:
            try:
                return {url: found for url, found in zip(urls, await scrape.scrape_each(urls), strict=True)}
            except OSError as e:
                if time.monotonic() >= deadline:
                    raise RunError(f"cannot scrape the metrics ({', '.join(urls)}): {e}") from None
            except ValueError as e:
                raise RunError(f"cannot scrape the metrics ({', '.join(urls)}): {e}") from None
            await asyncio.sleep(0.05)

    await read()
    return read


def counter_deltas(before: Reading, after: Reading) -> dict[str, int]:
    """The counters' change over the run, summed over the shards: after minus before, or for a
    shard that restarted in between (its generation changed) its counters after, those since its
    restart (what it counted before went with it)."""
    total: Counter[str] = Counter()
    for where, (generation, counters) in after.items():
        was_generation, was = before.get(where, (None, {}))
        if generation is not None and was_generation is not None and generation != was_generation:
            was = {}
        for k in set(counters) | set(was):
            total[k] += counters.get(k, 0) - was.get(k, 0)
    return {k: v for k, v in sorted(total.items()) if v}


async def _generations(mm: Client) -> dict[int, int]:
    """Each shard's generation now (none with several targets), the shards being waited for while
    one restarts (up to RESTART_WAIT_S); empty if they do not say."""
    if mm.routing == "static":
        return {}
    deadline = time.monotonic() + RESTART_WAIT_S
    while True:
        try:
            return {s.index: s.generation for s in await mm.shards() if s.generation}
        except MmsimError as e:
            if e.code not in RESTART_CODES or time.monotonic() >= deadline:
                return {}
        await asyncio.sleep(0.05)


def shard_restarts(results: list[dict[str, Any]], start: dict[int, int], end: dict[int, int]) -> dict[str, int]:
    """Restarts seen per shard: the generations the workers found their trees' shards restarted
    under, and a shard whose generation changed over the run (one no tree of which noticed)."""
    seen: dict[str, set[str]] = {}
    for r in results:
        for shard, generations in r.get("restarts", {}).get("generations", {}).items():
            seen.setdefault(shard, set()).update(generations)
    for index, generation in end.items():
        if index in start and start[index] != generation:
            seen.setdefault(str(index), set()).add(str(generation))
    return {shard: len(g - {""}) or 1 for shard, g in sorted(seen.items())}


async def _measure(
    opts: Options, console: Console, workers: list[tuple[Any, Connection]], mm: Client, counters: Counters,
    w: Workload, race: bool,
) -> dict[str, Any]:
    gc = is_gc(opts.mix)
    if gc:
        lanes = w.gc_lanes(opts.workers, opts.concurrency)
    else:
        lanes = w.lanes(opts.workers * opts.concurrency, race)
    generations = await _generations(mm)
    start_at = time.time() + START_DELAY
    per_rate = opts.rate / opts.workers if opts.rate is not None else None
    for i, (_, conn) in enumerate(workers):
        count = None
        if opts.count is not None:
            count = opts.count // opts.workers + (1 if i < opts.count % opts.workers else 0)
        spec = WorkerSpec(
            index=i,
            access=opts.access(mm.routing),
            trees=tuple(w.trees),
            lanes=tuple(lanes[i * opts.concurrency : (i + 1) * opts.concurrency]),
            mix=opts.mix,
            mode="open" if opts.rate is not None else "closed",
            rate=per_rate,
            duration=opts.duration,
            count=count,
            warmup=opts.warmup,
            start_at=start_at,
            seed=opts.seed * 1000 + i,
            call_timeout=opts.call_timeout,
            gc_trees=gc_trees(i, opts.workers, len(w.trees)) if gc else (),
            keep=opts.keep,
        )
        conn.send(("go", spec))
    live = Live(console, opts.quiet)
    loop = asyncio.get_running_loop()

    def interrupt() -> None:  # Ctrl-C: stop the workers; what they measured is reported
        for _, conn in workers:
            try:
                conn.send(("stop",))
            except OSError:
                pass

    loop.add_signal_handler(signal.SIGINT, interrupt)
    with live:
        collect = asyncio.ensure_future(_collect(workers, live))
        await asyncio.sleep(max(0.0, start_at + opts.warmup - time.time()))
        before = await counters()
        results = await collect
    loop.remove_signal_handler(signal.SIGINT)
    after = await counters()
    _warn_left([p for r in results for p in r.get("problems", ())])
    duration = max((r["wall_s"] for r in results), default=0.0)
    report: dict[str, Any] = {
        "schema": SCHEMA_ID,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": _versions(),
        "git_revision": _git_revision(),
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()},
        "targets": list(opts.targets),
        "mode": "open" if opts.rate is not None else "closed",
        "target_rate": opts.rate,
        "warmup_s": opts.warmup,
        "duration_s": duration,
        "end_reason": next((r["end_reason"] for r in results if r["end_reason"] == "interrupted"),
                           results[0]["end_reason"] if results else "duration"),
    }
    report["options"]["mix"] = dict(opts.mix)
    report.update(merge(results, opts, duration))
    if gc:  # what the collectors did, over the whole run (the warm-up included)
        report["gc"] = dict(sorted(sum((Counter(r.get("gc", {})) for r in results), Counter()).items()))
    report["server_deltas"] = counter_deltas(before, after)
    report["swap"] = swap_figures(report["server_deltas"], duration)
    report["shard_restarts"] = shard_restarts(results, generations, await _generations(mm))
    report["trees_recreated"] = sum(r.get("restarts", {}).get("recreated", 0) for r in results)
    cpu = [
        {"worker": r["worker"], "cpu_s": r["cpu_s"], "wall_s": r["wall_s"],
         "utilization": r["cpu_s"] / r["wall_s"] if r["wall_s"] > 0 else 0.0}
        for r in results
    ]
    report["client"] = {"workers": opts.workers, "concurrency": opts.concurrency, "cpu": cpu}
    report["bottleneck"] = bottleneck(cpu)
    return report


#: The report's ``swap`` counts: name -> the server counter (a delta over the run) it is.
SWAP_COUNTS = {
    "swap_outs": "swap_out", "swap_ins": "swap_in", "swap_cache_hits": "swap_cache_hit",
    "fault_swap_ins": "fault_swap_in", "reclaim_runs": "reclaim_runs", "reclaim_memcg_runs": "reclaim_memcg",
    "reclaim_kswapd_runs": "reclaim_kswapd", "reclaim_scanned": "reclaim_scanned", "reclaim_freed": "reclaim_freed",
}
#: The counts the report's ``swap`` also gives per second of the measured time.
SWAP_RATES = ("swap_outs", "swap_ins", "swap_cache_hits", "reclaim_runs")


def swap_figures(deltas: dict[str, int], duration: float) -> dict[str, int | float]:
    """Swap and reclaim over the run, from the servers' counter deltas (0 where nothing swapped, or
    where a server restarted unseen): the counts of SWAP_COUNTS, and those of SWAP_RATES per second
    of ``duration``."""
    out: dict[str, int | float] = {name: max(0, deltas.get(key, 0)) for name, key in SWAP_COUNTS.items()}
    for name in SWAP_RATES:
        out[f"{name}_per_s"] = out[name] / duration if duration > 0 else 0.0
    return out


def bottleneck(cpu: list[dict[str, Any]]) -> str:
    """"client" when a worker used BOTTLENECK_UTILIZATION of a core or more: the figures are then
    the generator's, not the server's."""
    return "client" if any(c["utilization"] >= BOTTLENECK_UTILIZATION for c in cpu) else "server"


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


__all__ = ["Options", "RunError", "bottleneck", "counter_deltas", "cpu_count", "default_trees", "merge", "run",
           "shard_restarts", "swap_figures"]
