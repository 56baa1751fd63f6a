"""Stall benchmark: how long one heavy request keeps the server from answering anyone else.

For each scenario this starts a fresh ``mmsim serve --listen 127.0.0.1:<free port>`` (its
default limits) as a subprocess, waits for the gRPC health service, builds the scenario's state
(not measured), then runs the scenario's "stall request" while a pinger sends ``Ping`` every
``--interval-ms`` (5 ms) and records every Ping's latency. The pinger is a separate OS process
with its own channel, so the measuring client is never stalled by the requesting client. It is
open-loop by default: a Ping is sent every interval whether or not the previous ones came back
(so a stall of S seconds shows as about S / interval late Pings, not as one: no coordinated
omission); ``--closed-loop`` sends one Ping at a time instead.
The Pings that overlap the request are its figures; the baseline is the same pinger against the
idle server, just started, before the setup.

Scenarios (each reproduces an issue's observation; ``--quick`` uses smaller sizes):

  a  Exit of a process with one huge VMA (mmap 2**46 and 2**45 bytes, one page written)
  b  a Batch of 8 Forks of that process, then a Batch of the 8 children's Exits
  c  Exit of a process with 65,530 one-page VMAs (max_map_count), mapped in Batches
  d  DumpAnonVmaTree of the deepest process of a 3,000-deep fork chain (may be RESOURCE_EXHAUSTED)
  e  a Batch of 2,000 Walks of a page mapped in 5,000 children (plus the server's peak RSS)
  f  CheckInvariants with 2,000,000 resident pages (written by Batches in 4 processes)
  g  200 racing clients for 10 s, spread over 4 OS processes (one channel and one process tree
     each): Remap ping-pong between two uffd regions, Walk (trylock and blocking) of a page
     shared by the whole tree, Fork + Exit of a child, Write; every status code is counted

Goal: Ping p99 < 50 ms during each request. The percentiles are of the answered Pings; a
Ping that fails (gRPC core CANCELs calls it has queued for the server too long, or too many of)
is counted apart and misses the goal.

    python benchmarks/stall_bench.py [--only a,c] [--quick] [--json FILE] [--latencies]
        [--interval-ms 5] [--closed-loop] [--ping-timeout S] [--baseline-seconds S]
        [--request-timeout S] [--setup-timeout S] [--server-cmd CMD] [--server-arg ARG ...]
        [--g-clients N] [--g-procs N] [--g-seconds S] [--g-deadline S] [--g-vma-bytes N]

``--server-cmd`` replaces the ``mmsim`` command (e.g. ``"env PYTHONPATH=/some/tree mmsim"`` to
measure another version); ``--server-arg`` adds a ``serve`` flag (e.g. a lower limit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from mmsim.client import Client, Process, ops
from mmsim.v1 import mmsim_pb2 as pb
from mmsim.v1 import mmsim_pb2_grpc

P = 4096
SERVICE = "mmsim.v1.MemoryManager"
GOAL_P99_MS = 50.0
ROOT = Path(__file__).resolve().parent.parent

#: Sizes of the full run (the issues' figures) and of ``--quick`` (a smoke run).
FULL = {
    "a_vmas": (1 << 46, 1 << 45),
    "b_forks": 8,
    "c_vmas": 65_530,
    "d_depth": 3_000,
    "e_children": 5_000,
    "e_walks": 2_000,
    "f_pages": 2_000_000,
    "f_procs": 4,
    "g_clients": 200,
    "g_procs": 4,
    "g_seconds": 10.0,
}
QUICK = {
    "a_vmas": (1 << 40, 1 << 39),
    "b_forks": 8,
    "c_vmas": 6_553,
    "d_depth": 300,
    "e_children": 500,
    "e_walks": 200,
    "f_pages": 200_000,
    "f_procs": 4,
    "g_clients": 40,
    "g_procs": 2,
    "g_seconds": 3.0,
}
BATCH_MAX = 10_000  # the server's default --max-batch-ops


def fmt_ratio(x: float) -> str:
    return f"{x:.3f}"


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in [0, 100])."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def code_of(exc: BaseException) -> str:
    """The gRPC status code name an SDK exception carries (or the exception's type name)."""
    code = getattr(exc, "code", None)
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    return type(exc).__name__


def short(exc: BaseException, n: int = 160) -> str:
    text = f"{code_of(exc)}: {exc}"
    return text if len(text) <= n else text[: n - 3] + "..."


# -- the server process -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_status_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (kB) of a process, from /proc."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return math.nan


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    target: str
    log: Path
    cmd: list[str]


def start_server(args: argparse.Namespace, log_dir: Path, name: str) -> Server:
    port = free_port()
    prefix = shlex.split(args.server_cmd) if args.server_cmd else [str(Path(sys.executable).parent / "mmsim")]
    cmd = [*prefix, "serve", "--listen", f"127.0.0.1:{port}", *args.server_arg]
    log = log_dir / f"server-{name}.log"
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    return Server(proc, f"127.0.0.1:{port}", log, cmd)


async def wait_serving(server: Server, limit_s: float = 60.0) -> None:
    """Poll the health service until the MemoryManager service reports SERVING."""
    deadline = time.monotonic() + limit_s
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if server.proc.poll() is not None:
                tail = server.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the server exited with {server.proc.returncode} before serving:\n{tail}")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1.0)  # type: ignore[attr-defined]  # the stubs' HealthStub has no methods
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server at {server.target} did not become healthy in {limit_s} s")
            await asyncio.sleep(0.05)


def stop_server(server: Server, limit_s: float = 60.0) -> str:
    """SIGTERM (drain and audit), then SIGKILL after ``limit_s``; returns how it ended."""
    if server.proc.poll() is not None:
        return f"had exited ({server.proc.returncode})"
    server.proc.send_signal(signal.SIGTERM)
    try:
        return f"exit {server.proc.wait(timeout=limit_s)}"
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
        return f"killed after {limit_s:.0f} s"


# -- the pinger (its own OS process) ------------------------------------------------------------


def pinger_main(target: str, conn: Connection, interval: float, timeout: float, closed_loop: bool) -> None:
    asyncio.run(_pinger(target, conn, interval, timeout, closed_loop))


async def _pinger(target: str, conn: Connection, interval: float, timeout: float, closed_loop: bool) -> None:
    """Serve commands from the parent: ("start",), ("stop",) -> samples, ("quit",).

    A sample is (sent, latency, code), ``sent`` from time.monotonic() (system-wide). In the open
    loop a Ping is sent when due whatever the earlier ones are doing, so a stalled server
    cannot hold Pings back (no coordinated omission): latency counts from the send."""
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    loop.add_reader(conn.fileno(), lambda: commands.put_nowait(conn.recv()))
    samples: list[tuple[float, float, str]] = []
    inflight: set[asyncio.Task[None]] = set()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = mmsim_pb2_grpc.MemoryManagerStub(channel)
        empty = pb.Empty()

        async def one() -> None:
            code = "OK"
            sent = time.monotonic()
            try:
                await stub.Ping(empty, timeout=timeout)
            except grpc.aio.AioRpcError as e:
                code = e.code().name
            samples.append((sent, time.monotonic() - sent, code))

        async def ticker() -> None:
            due = time.monotonic()
            while True:
                now = time.monotonic()
                if now < due:
                    await asyncio.sleep(due - now)
                if closed_loop:
                    await one()
                    due = time.monotonic() + interval
                else:
                    t = asyncio.create_task(one())
                    inflight.add(t)
                    t.add_done_callback(inflight.discard)
                    due += interval

        await stub.Ping(empty, timeout=timeout)  # connect before the first measured Ping
        running: asyncio.Task[None] | None = None
        while True:
            cmd = await commands.get()
            if cmd[0] == "start":
                samples.clear()
                running = asyncio.create_task(ticker())
                conn.send(("started",))
            elif cmd[0] == "stop":
                if running is not None:
                    running.cancel()
                    try:
                        await running
                    except asyncio.CancelledError:
                        pass
                    running = None
                if inflight:
                    await asyncio.wait(set(inflight))
                conn.send(("samples", list(samples)))
            elif cmd[0] == "quit":
                return


class Pinger:
    def __init__(self, target: str, args: argparse.Namespace) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=pinger_main,
            args=(target, child, args.interval_ms / 1e3, args.ping_timeout, args.closed_loop),
            daemon=True,
        )
        self.proc.start()
        child.close()

    async def _ask(self, msg: tuple[Any, ...], limit_s: float) -> tuple[Any, ...]:
        self.conn.send(msg)
        ready = await asyncio.to_thread(self.conn.poll, limit_s)
        if not ready:
            raise TimeoutError(f"the pinger did not answer {msg[0]!r} within {limit_s:.0f} s")
        reply: tuple[Any, ...] = self.conn.recv()
        return reply

    async def start(self) -> None:
        await self._ask(("start",), 120)

    async def stop(self, limit_s: float) -> list[tuple[float, float, str]]:
        reply = await self._ask(("stop",), limit_s)
        samples: list[tuple[float, float, str]] = reply[1]
        return samples

    def close(self) -> None:
        try:
            self.conn.send(("quit",))
        except OSError:
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


@dataclass
class PingStats:
    """Pings overlapping a window. The percentiles are of the answered (OK) Pings; a failed Ping
    (e.g. CANCELLED by gRPC core) is counted in ``failed``, not in the percentiles, since how fast
    a refusal comes back says nothing about how fast the server answers."""

    count: int
    failed: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    codes: dict[str, int]
    latencies_ms: list[float] = field(repr=False, default_factory=list)
    #: (sent, relative to the request's start, s; latency, ms; code), in send order
    samples: list[tuple[float, float, str]] = field(repr=False, default_factory=list)

    def as_json(self, with_latencies: bool) -> dict[str, Any]:
        d: dict[str, Any] = {
            "count": self.count,
            "failed": self.failed,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
            "codes": self.codes,
        }
        if with_latencies:
            d["samples"] = self.samples
        return d


def ping_stats(samples: list[tuple[float, float, str]], t0: float, t1: float) -> PingStats:
    """The Pings whose lifetime (sent .. answered) overlaps [t0, t1]."""
    chosen = sorted((sent, lat, code) for sent, lat, code in samples if sent <= t1 and sent + lat >= t0)
    lats = sorted(lat * 1e3 for _, lat, code in chosen if code == "OK")
    codes = Counter(code for _, _, code in chosen)
    return PingStats(
        len(chosen),
        len(chosen) - len(lats),
        percentile(lats, 50),
        percentile(lats, 99),
        lats[-1] if lats else math.nan,
        dict(codes),
        lats,
        [(round(sent - t0, 4), round(lat * 1e3, 3), code) for sent, lat, code in chosen],
    )


# -- progress -----------------------------------------------------------------------------------


class Progress:
    """A status line on stderr (rich) with the current step and its elapsed time, plus one log
    line per finished step."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.status = console.status("")
        self.key = ""
        self.text = ""
        self.elapsed = ""

    def __enter__(self) -> Progress:
        self.status.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.status.__exit__(None, None, None)

    def _render(self) -> None:
        self.status.update(f"({self.key}) {self.text}" + (f"  {self.elapsed}" if self.elapsed else ""))

    def update(self, text: str) -> None:
        self.text = text
        self._render()

    def tick(self, elapsed: str) -> None:
        self.elapsed = elapsed
        self._render()

    def log(self, text: str) -> None:
        self.console.log(f"({self.key}) {text}", highlight=False)


async def ticking(progress: Progress, label: str, aw: Awaitable[Any]) -> Any:
    """Await ``aw`` while the status line shows the elapsed time."""
    t0 = time.monotonic()
    progress.update(label)
    task = asyncio.ensure_future(aw)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            progress.tick(f"{label} {time.monotonic() - t0:,.1f} s")
    finally:
        progress.tick("")


# -- scenarios ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a stall request came back with: ``OK`` or the status code, plus details."""

    outcome: str
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


#: The stall request of a scenario, ready to run: returns its outcome or raises.
Request = Callable[[], Awaitable[Outcome]]


@dataclass
class Env:
    args: argparse.Namespace
    sizes: dict[str, Any]
    mm: Client
    server: Server
    progress: Progress
    log_dir: Path


def count_failures(results: list[Any]) -> Counter[str]:
    return Counter(code_of(r) for r in results if isinstance(r, BaseException))


async def run_batches(env: Env, label: str, all_ops: list[ops.Op]) -> list[Any]:
    """Run ``all_ops`` in Batches of at most the server's limit; every result, in order."""
    results: list[Any] = []
    for i in range(0, len(all_ops), BATCH_MAX):
        env.progress.update(f"setup: {label} {i:,}/{len(all_ops):,}")
        results.extend(await env.mm.batch(all_ops[i : i + BATCH_MAX]))
    return results


async def huge_vma_process(env: Env) -> Process:
    p = await env.mm.create_process()
    first = None
    for length in env.sizes["a_vmas"]:
        v = await p.mmap(length)
        first = first or v
    assert first is not None
    await p.write(first.start, 1)
    return p


async def setup_a(env: Env) -> Request:
    p = await huge_vma_process(env)
    big, small = env.sizes["a_vmas"]
    env.progress.log(f"setup: one process with VMAs of 2**{big.bit_length() - 1} and 2**{small.bit_length() - 1} "
                     "bytes, one page written")

    async def request() -> Outcome:
        await p.exit(timeout=env.args.request_timeout)
        return Outcome("OK")

    return request


async def setup_b(env: Env) -> Request:
    p = await huge_vma_process(env)
    n = env.sizes["b_forks"]
    env.progress.log(f"setup: the process of (a); request: a Batch of {n} Forks, then a Batch of their {n} Exits")

    async def request() -> Outcome:
        t0 = time.monotonic()
        children = await env.mm.batch([ops.fork(p)] * n, timeout=env.args.request_timeout)
        t1 = time.monotonic()
        forked = [c for c in children if isinstance(c, Process)]
        exits = await env.mm.batch([ops.exit(c) for c in forked], timeout=env.args.request_timeout)
        t2 = time.monotonic()
        failed = count_failures(children) + count_failures(exits)
        extra = {"fork_batch_s": t1 - t0, "exit_batch_s": t2 - t1, "forked": len(forked), "op_failures": dict(failed)}
        detail = f"Forks {t1 - t0:.1f} s + Exits {t2 - t1:.1f} s"
        if failed:
            detail += f"; failed ops {dict(failed)}"
        return Outcome("OK", detail, extra)

    return request


async def setup_c(env: Env) -> Request:
    n = env.sizes["c_vmas"]
    p = await env.mm.create_process()
    base = 1 << 40
    results = await run_batches(env, "one-page VMAs", [ops.mmap(p, P, "rw", addr=base + 2 * i * P) for i in range(n)])
    made = sum(1 for r in results if not isinstance(r, BaseException))
    env.progress.log(f"setup: one process with {made:,} one-page VMAs "
                     f"(failed: {dict(count_failures(results)) or 'none'})")

    async def request() -> Outcome:
        await p.exit(timeout=env.args.request_timeout)
        return Outcome("OK", f"{made:,} VMAs", {"vmas": made})

    return request


async def setup_d(env: Env) -> Request:
    depth = env.sizes["d_depth"]
    root = await env.mm.create_process()
    v = await root.mmap(P)
    await root.write(v.start, 1)
    cur = root
    for i in range(depth):
        if i % 50 == 0:
            env.progress.update(f"setup: fork chain {i:,}/{depth:,}")
        cur = await cur.fork()
    env.progress.log(f"setup: a fork chain {depth:,} deep below a process with one written page")

    async def request() -> Outcome:
        tree = await cur.anon_vma_tree(timeout=env.args.request_timeout)
        return Outcome("OK", f"{len(tree):,} anon_vmas", {"anon_vmas": len(tree)})

    return request


async def setup_e(env: Env) -> Request:
    n, walks = env.sizes["e_children"], env.sizes["e_walks"]
    parent = await env.mm.create_process()
    v = await parent.mmap(P)
    await parent.write(v.start, 7)
    children = await run_batches(env, "Forks", [ops.fork(parent)] * n)
    forked = sum(1 for c in children if isinstance(c, Process))
    rss = read_status_kb(env.server.proc.pid)
    env.progress.log(f"setup: a page mapped in a parent and {forked:,} children; "
                     f"server RSS {rss.get('VmRSS', 0) / 1024:,.0f} MiB")

    async def request() -> Outcome:
        results = await env.mm.batch([ops.walk(parent, v.start)] * walks, timeout=env.args.request_timeout)
        failed = count_failures(results)
        detail = f"{len(results):,} walks" + (f"; failed ops {dict(failed)}" if failed else "")
        return Outcome("OK", detail, {"walks": len(results), "op_failures": dict(failed)})

    return request


async def setup_f(env: Env) -> Request:
    total, nproc = env.sizes["f_pages"], env.sizes["f_procs"]
    each = -(-total // nproc)
    written = 0
    failed: Counter[str] = Counter()
    left = total
    for _ in range(nproc):
        pages = min(each, left)
        left -= pages
        p = await env.mm.create_process()
        v = await p.mmap(pages * P)
        for i in range(0, pages, BATCH_MAX):
            env.progress.update(f"setup: pages written {written:,}/{total:,}")
            batch = [ops.write(p, v.start + j * P, j + 1) for j in range(i, min(i + BATCH_MAX, pages))]
            results = await env.mm.batch(batch)
            bad = count_failures(results)
            failed += bad
            written += len(results) - sum(bad.values())
    env.progress.log(f"setup: {written:,} resident pages in {nproc} processes "
                     f"(failed writes: {dict(failed) or 'none'})")

    async def request() -> Outcome:
        problems = await env.mm.check_invariants(timeout=env.args.request_timeout)
        return Outcome("OK", f"{written:,} pages, {len(problems)} problems",
                       {"pages": written, "problems": len(problems)})

    return request


# -- scenario g: racing clients in several OS processes -----------------------------------------

G_SHARED, G_SRC, G_DST, G_BIG = 0x10000000, 0x20000000, 0x30000000, 1 << 44
G_OPS = ("remap", "walk_trylock", "walk_blocking", "fork", "exit", "write")


def g_worker_main(target: str, index: int, tasks: int, deadline: float, big: int, conn: Connection) -> None:
    try:
        asyncio.run(_g_worker(target, index, tasks, deadline, big, conn))
    except BaseException as e:  # report, so the parent does not wait for nothing
        conn.send(("error", f"{type(e).__name__}: {e}"))
        raise


async def _g_worker(target: str, index: int, tasks: int, deadline: float, big: int, conn: Connection) -> None:
    """One OS process, one channel, one process tree: a root with a page every client walks, and
    one child per client task that ping-pongs its own page between two uffd-registered pages.
    With ``big``, the root also maps a VMA of that many bytes (one page written) before the
    forks, so every client process, and every Fork and Exit of its children, carries it."""
    async with Client(target, timeout=deadline) as mm:
        root = await mm.create_process()
        await root.mmap(P, addr=G_SHARED)
        await root.write(G_SHARED, 1)
        # Both regions get an anon_vma before the forks, so every child's pages hang off the
        # tree's root anon_vma: moves, forks, exits and walks all take the same root rwsem.
        for base in (G_SRC, G_DST):
            await root.mmap((tasks + 1) * P, addr=base)
            await root.write(base + tasks * P, 2)
        if big:
            await root.mmap(big, addr=G_BIG)
            await root.write(G_BIG, 3)
        clients = []
        for i in range(tasks):
            c = await root.fork()
            await c.write(G_SRC + i * P, 1000 * index + i)
            await c.uffd_register(G_SRC + i * P, P, "missing")
            await c.uffd_register(G_DST + i * P, P, "missing")
            clients.append(c)
        conn.send(("ready",))
        msg = await asyncio.to_thread(conn.recv)
        t_end = msg[1]

        codes: dict[str, Counter[str]] = {op: Counter() for op in G_OPS}
        lat: dict[str, list[float]] = {op: [] for op in G_OPS}

        async def call(op: str, aw: Awaitable[Any]) -> tuple[bool, Any]:
            t0 = time.monotonic()
            try:
                r = await aw
                codes[op]["OK"] += 1
                return True, r
            except Exception as e:  # noqa: BLE001 - every failure is a status to count
                codes[op][code_of(e)] += 1
                return False, e
            finally:
                lat[op].append(time.monotonic() - t0)

        async def client(i: int, c: Process) -> None:
            src, dst = G_SRC + i * P, G_DST + i * P
            at_src = True
            while time.monotonic() < t_end:
                here, there = (src, dst) if at_src else (dst, src)
                ok, _ = await call("remap", c.remap(there, here, P))
                if ok:
                    at_src = not at_src
                else:  # where is the page now? (a timed-out move may have happened)
                    try:
                        await c.read(here)
                    except OSError:
                        at_src = not at_src
                    except Exception:  # noqa: BLE001
                        pass
                if time.monotonic() >= t_end:
                    break
                await call("walk_trylock", c.walk(G_SHARED, blocking=False))
                await call("walk_blocking", c.walk(G_SHARED, blocking=True))
                if time.monotonic() >= t_end:
                    break
                ok, child = await call("fork", c.fork())
                if ok:
                    await call("exit", child.exit())
                # The fork made the page shared; writing it makes it exclusive again, movable.
                await call("write", c.write(src if at_src else dst, 1000 * index + i))

        await asyncio.gather(*(client(i, c) for i, c in enumerate(clients)))
        conn.send(
            (
                "done",
                {op: dict(codes[op]) for op in G_OPS},
                {op: lat[op] for op in G_OPS},
            )
        )


async def setup_g(env: Env) -> Request:
    n, nproc, seconds = env.sizes["g_clients"], env.sizes["g_procs"], env.sizes["g_seconds"]
    deadline = env.args.g_deadline
    ctx = multiprocessing.get_context("spawn")
    workers: list[tuple[multiprocessing.context.SpawnProcess, Connection]] = []
    per = [n // nproc + (1 if i < n % nproc else 0) for i in range(nproc)]
    for i, tasks in enumerate(per):
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=g_worker_main, args=(env.server.target, i, tasks, deadline, env.args.g_vma_bytes, child), daemon=True
        )
        proc.start()
        child.close()
        workers.append((proc, parent))

    async def recv(conn: Connection, limit: float) -> tuple[Any, ...]:
        if not await asyncio.to_thread(conn.poll, limit):
            raise TimeoutError("a racing-client process did not answer")
        msg: tuple[Any, ...] = conn.recv()
        if msg[0] == "error":
            raise RuntimeError(f"a racing-client process failed: {msg[1]}")
        return msg

    try:
        for k, (_, conn) in enumerate(workers):
            env.progress.update(f"setup: racing-client processes ready {k}/{nproc}")
            await recv(conn, env.args.setup_timeout)
    except BaseException:
        for proc, _ in workers:
            proc.kill()
        raise
    env.progress.log(
        f"setup: {n} clients in {nproc} OS processes (one channel and one process tree each), "
        f"{seconds:g} s, per-call deadline {deadline:g} s"
        + (f"; every process also maps a VMA of {env.args.g_vma_bytes:,} bytes" if env.args.g_vma_bytes else "")
    )

    async def request() -> Outcome:
        t_end = time.monotonic() + seconds
        for _, conn in workers:
            conn.send(("go", t_end))
        codes: dict[str, Counter[str]] = {op: Counter() for op in G_OPS}
        lats: dict[str, list[float]] = {op: [] for op in G_OPS}
        try:
            for _, conn in workers:
                msg = await recv(conn, seconds + deadline * 3 + 60)
                for op in G_OPS:
                    codes[op].update(msg[1][op])
                    lats[op].extend(msg[2][op])
        finally:
            for proc, _ in workers:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
        stats: dict[str, int] | dict[str, str]
        try:
            stats = await env.mm.stats(timeout=60)
        except Exception as e:  # noqa: BLE001 - the counters are a bonus
            stats = {"error": short(e)}
        total: Counter[str] = Counter()
        for op in G_OPS:
            total.update(codes[op])
        calls = sum(total.values())
        per_op = {}
        for op in G_OPS:
            s = sorted(x * 1e3 for x in lats[op])
            per_op[op] = {
                "codes": dict(codes[op]),
                "calls": len(s),
                "p50_ms": percentile(s, 50),
                "p99_ms": percentile(s, 99),
                "max_ms": s[-1] if s else math.nan,
            }
        bad = {k: v for k, v in total.items() if k != "OK"}
        detail = f"{calls:,} calls; codes " + ", ".join(f"{k} {v:,}" for k, v in total.most_common())
        remap_cancelled = codes["remap"].get("CANCELLED", 0)
        outcome = "OK" if not bad else "errors"
        extra = {
            "calls": calls,
            "codes": dict(total),
            "cancelled": total.get("CANCELLED", 0),
            "deadline_exceeded": total.get("DEADLINE_EXCEEDED", 0),
            "remap_cancelled": remap_cancelled,
            "per_op": per_op,
            "clients": n,
            "processes": nproc,
            "seconds": seconds,
            "deadline_s": deadline,
            "server_stats": stats,
            "vma_bytes": env.args.g_vma_bytes,
        }
        return Outcome(outcome, detail, extra)

    return request


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str  # formatted with the sizes
    observed: str
    setup: Callable[[Env], Awaitable[Request]]


SCENARIOS = {
    s.key: s
    for s in (
        Scenario("a", "Exit, VMAs of 2**{a_log[0]} + 2**{a_log[1]} B", "Ping wait 3.5-6.5 s", setup_a),
        Scenario("b", "Batch {b_forks} Fork, Batch {b_forks} Exit (a's process)", "14.4 s", setup_b),
        Scenario("c", "Exit, {c_vmas:,} VMAs", "28.5 s", setup_c),
        Scenario("d", "DumpAnonVmaTree, {d_depth:,}-deep fork chain", "13.8 s", setup_d),
        Scenario("e", "Batch {e_walks:,} Walks, {e_children:,} children", "21.5 s, 1.4 GB", setup_e),
        Scenario("f", "CheckInvariants, {f_pages:,} pages", "5.4 s", setup_f),
        Scenario("g", "{g_clients} racing clients, {g_seconds:g} s", "Ping p99 4.3 s; 3-234 Remaps CANCELLED", setup_g),
    )
}


def title(sc: Scenario, sizes: dict[str, Any]) -> str:
    return sc.title.format(a_log=[n.bit_length() - 1 for n in sizes["a_vmas"]], **sizes)


# -- running one scenario -----------------------------------------------------------------------


@dataclass
class Result:
    key: str
    title: str
    observed: str
    request_s: float = math.nan
    outcome: str = "-"
    detail: str = ""
    pings: PingStats | None = None
    idle: PingStats | None = None
    setup_s: float = math.nan
    server_cpu_s: float = math.nan
    rss_before_mib: float = math.nan
    rss_peak_mib: float = math.nan
    hwm_mib: float = math.nan
    server_end: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def ratio(self) -> float:
        return self.pings.p99_ms / GOAL_P99_MS if self.pings and self.pings.count else math.nan

    @property
    def met(self) -> bool | None:
        """p99 under the goal and no Ping failed; None when no Ping overlapped the request."""
        if self.pings is None or not self.pings.count:
            return None
        return bool(self.ratio < 1.0) and not self.pings.failed


async def sample_rss(pid: int, peak: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        kb = read_status_kb(pid).get("VmRSS")
        if kb is not None:
            peak[0] = max(peak[0], kb / 1024)
        try:
            await asyncio.wait_for(stop.wait(), 0.05)
        except TimeoutError:
            pass


async def run_scenario(
    sc: Scenario, args: argparse.Namespace, sizes: dict[str, Any], progress: Progress, log_dir: Path
) -> Result:
    res = Result(sc.key, title(sc, sizes), sc.observed)
    progress.key = sc.key
    progress.update("starting the server")
    server = start_server(args, log_dir, sc.key)
    pinger: Pinger | None = None
    try:
        await wait_serving(server)
        pinger = Pinger(server.target, args)
        # Baseline: the idle server, just started.
        progress.update("idle baseline")
        await pinger.start()
        t0 = time.monotonic()
        await asyncio.sleep(args.baseline_seconds)
        t1 = time.monotonic()
        res.idle = ping_stats(await pinger.stop(args.ping_timeout + 30), t0, t1)
        progress.log(
            f"idle Ping p50 {res.idle.p50_ms:.2f} ms, p99 {res.idle.p99_ms:.2f} ms "
            f"({res.idle.count} Pings, {res.idle.failed} failed)"
        )

        async with Client(server.target, timeout=args.setup_timeout) as mm:
            env = Env(args, sizes, mm, server, progress, log_dir)
            ts = time.monotonic()
            request = await ticking(progress, "setup", sc.setup(env))
            res.setup_s = time.monotonic() - ts

            pid = server.proc.pid
            res.rss_before_mib = read_status_kb(pid).get("VmRSS", 0) / 1024
            await pinger.start()
            await asyncio.sleep(0.2)  # the pinger is in its stride before the request starts
            peak = [res.rss_before_mib]
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample_rss(pid, peak, stop))
            cpu0 = cpu_seconds(pid)
            t0 = time.monotonic()
            try:
                out = await ticking(progress, "stall request running", request())
            except Exception as e:  # noqa: BLE001 - a failed request is an outcome
                out = Outcome(code_of(e), short(e))
            t1 = time.monotonic()
            res.server_cpu_s = cpu_seconds(pid) - cpu0
            stop.set()
            await sampler
            res.request_s = t1 - t0
            res.outcome, res.detail, res.extra = out.outcome, out.detail, out.extra
            if out.outcome == "DEADLINE_EXCEEDED":
                res.detail = f"client deadline {args.request_timeout:g} s passed; " + res.detail
            await asyncio.sleep(0.1)
            progress.update("waiting for the last Pings")
            samples = await pinger.stop(args.ping_timeout + 30)
            res.pings = ping_stats(samples, t0, t1)
            status = read_status_kb(pid)
            res.rss_peak_mib = peak[0]
            res.hwm_mib = status.get("VmHWM", 0) / 1024
        met = res.met
        progress.log(
            f"{res.title}: {res.request_s:,.2f} s, {res.outcome} {res.detail}; Ping p50 {res.pings.p50_ms:,.1f} ms, "
            f"p99 {res.pings.p99_ms:,.1f} ms, max {res.pings.max_ms:,.1f} ms ({res.pings.count} Pings); "
            f"{res.pings.failed} failed; p99/goal {fmt_ratio(res.ratio)}, "
            f"{'met' if met else 'NOT met' if met is not None else 'n/a'}"
        )
    except Exception as e:  # noqa: BLE001 - report the scenario as failed, go on with the next
        res.error = f"{type(e).__name__}: {e}"
        progress.log(f"FAILED: {res.error} (server log: {server.log})")
    finally:
        if pinger is not None:
            pinger.close()
        progress.update("stopping the server")
        res.server_end = stop_server(server)
    return res


# -- report -------------------------------------------------------------------------------------


def ms(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{x:,.1f}" if x >= 10 else f"{x:,.2f}"


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs ({model}), Linux {platform.release()}, "
        f"Python {platform.python_version()}, grpcio {grpc.__version__}"
    )


def git_state() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "server", "client"], capture_output=True, text=True
        ).stdout.strip()
        return f"{head}{' (server/ or client/ modified)' if dirty else ''}"
    except OSError:
        return "?"


def print_report(console: Console, results: list[Result], args: argparse.Namespace, header: dict[str, Any]) -> None:
    console.print(f"machine: {header['machine']}")
    console.print(f"this checkout: {header['git']}; server: {' '.join(header['server_cmd'])}")
    console.print(
        f"pinger: its own OS process and channel, a Ping every {args.interval_ms:g} ms, "
        f"{'closed' if args.closed_loop else 'open'} loop (a Ping sent every interval, whatever the earlier ones do); "
        f"idle baseline {args.baseline_seconds:g} s on each fresh server"
    )
    table = Table(title=f"Ping latency during each stall request ({'quick' if args.quick else 'full'} sizes)")
    for col, just in (
        ("scenario", "left"),
        ("request s", "right"),
        ("outcome", "left"),
        ("Pings", "right"),
        ("failed", "right"),
        ("p50 ms", "right"),
        ("p99 ms", "right"),
        ("max ms", "right"),
        ("p99 / 50 ms", "right"),
        ("goal", "center"),
        ("idle p50 / p99 ms", "right"),
        ("observed (issue)", "left"),
    ):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in results:
        if r.error:
            table.add_row(f"{r.key}. {r.title}", "-", f"failed: {r.error[:60]}", *["-"] * 7, "", r.observed)
            continue
        assert r.pings is not None and r.idle is not None
        met = r.met
        table.add_row(
            f"{r.key}. {r.title}",
            f"{r.request_s:,.2f}",
            r.outcome,
            f"{r.pings.count:,}",
            f"{r.pings.failed:,}",
            ms(r.pings.p50_ms),
            ms(r.pings.p99_ms),
            ms(r.pings.max_ms),
            fmt_ratio(r.ratio) if not math.isnan(r.ratio) else "-",
            "met" if met else ("NOT met" if met is not None else "n/a"),
            f"{ms(r.idle.p50_ms)} / {ms(r.idle.p99_ms)}",
            r.observed,
        )
    console.print(table)
    for r in results:
        if r.error:
            continue
        assert r.pings is not None
        notes = [f"setup {r.setup_s:,.1f} s", f"server CPU during the request {r.server_cpu_s:,.2f} s"]
        notes.append(f"server RSS {r.rss_before_mib:,.0f} MiB before, peak {r.rss_peak_mib:,.0f} MiB sampled, "
                     f"VmHWM {r.hwm_mib:,.0f} MiB")
        bad_pings = {k: v for k, v in r.pings.codes.items() if k != "OK"}
        if bad_pings:
            notes.append(f"Pings that failed: {bad_pings}")
        notes.append(f"server stop: {r.server_end}")
        console.print(f"{r.key}. {r.detail}" if r.detail else f"{r.key}.", highlight=False)
        console.print("   " + "; ".join(notes), highlight=False)
        if r.key == "g" and "per_op" in r.extra:
            for op, d in r.extra["per_op"].items():
                codes = ", ".join(f"{k} {v:,}" for k, v in sorted(d["codes"].items(), key=lambda kv: -kv[1]))
                console.print(
                    f"   {op:14} {d['calls']:>7,} calls  p50 {ms(d['p50_ms']):>8} ms  p99 {ms(d['p99_ms']):>9} ms  "
                    f"max {ms(d['max_ms']):>9} ms  {codes}",
                    highlight=False,
                )
            st = r.extra.get("server_stats", {})
            keys = [k for k in sorted(st) if any(w in k for w in ("retry", "contended", "move", "fork", "walk"))]
            if keys:
                console.print("   server counters: " + ", ".join(f"{k} {st[k]:,}" for k in keys), highlight=False)
            console.print(
                f"   CANCELLED {r.extra['cancelled']:,} (Remap {r.extra['remap_cancelled']:,}); "
                f"DEADLINE_EXCEEDED {r.extra['deadline_exceeded']:,}; no client cancels a call",
                highlight=False,
            )
    done = [r for r in results if not r.error and r.met is not None]
    n_met = sum(1 for r in done if r.met)
    console.print(
        f"Goal: Ping p99 < {GOAL_P99_MS:g} ms during each request (percentiles of the answered Pings; "
        f"a failed Ping misses the goal): met in {n_met} of {len(done)} scenarios."
    )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", default="abcdefg", help="scenarios to run, e.g. a,c (default: all, a to g)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--interval-ms", type=float, default=5.0, help="one Ping per interval (default 5 ms)")
    ap.add_argument("--closed-loop", action="store_true", help="one Ping at a time, the interval between them")
    ap.add_argument("--ping-timeout", type=float, default=120.0, help="deadline of each Ping, s (default 120)")
    ap.add_argument("--baseline-seconds", type=float, default=2.0, help="idle baseline length (default 2 s)")
    ap.add_argument("--request-timeout", type=float, default=300.0, help="deadline of a stall request, s (default 300)")
    ap.add_argument("--setup-timeout", type=float, default=600.0, help="deadline of each setup call, s (default 600)")
    ap.add_argument("--server-cmd", help="command that runs mmsim (default: the mmsim beside this Python)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra argument to `mmsim serve` (repeatable)")
    ap.add_argument("--g-clients", type=int, help="racing clients of g (default 200; quick 40)")
    ap.add_argument("--g-procs", type=int, help="OS processes they are spread over (default 4; quick 2)")
    ap.add_argument("--g-seconds", type=float, help="length of the race (default 10 s; quick 3 s)")
    ap.add_argument("--g-deadline", type=float, default=60.0,
                    help="per-call deadline of the racing clients (default 60 s)")
    ap.add_argument(
        "--g-vma-bytes",
        type=lambda v: int(eval(v, {"__builtins__": {}})),  # accepts 2**40
        default=0,
        help="g: each tree's root also maps a VMA this large (one page written) before forking its clients, "
        "so each Fork and Exit of a child carries it (default 0: none)",
    )
    ap.add_argument("--latencies", action="store_true", help="put every Ping (send time, latency, code) in the JSON")
    args = ap.parse_args()
    keys = [k for k in args.only.replace(",", "") if not k.isspace()]
    unknown = [k for k in keys if k not in SCENARIOS]
    if unknown or not keys:
        ap.error(f"--only takes scenario letters from {', '.join(SCENARIOS)}")
    sizes: dict[str, Any] = dict(QUICK if args.quick else FULL)
    for name in ("g_clients", "g_procs", "g_seconds"):
        if getattr(args, name) is not None:
            sizes[name] = getattr(args, name)
    sizes["g_procs"] = max(1, min(sizes["g_procs"], sizes["g_clients"]))

    console = Console(stderr=True)
    out_console = Console() if sys.stdout.isatty() else Console(width=200)
    header = {
        "machine": machine(),
        "git": git_state(),
        "server_cmd": start_cmd_preview(args),
        "quick": args.quick,
        "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()},
        "goal_p99_ms": GOAL_P99_MS,
    }
    results: list[Result] = []
    log_dir = Path(tempfile.mkdtemp(prefix="stall-bench-"))
    with Progress(console) as progress:
        for k in keys:
            results.append(asyncio.run(run_scenario(SCENARIOS[k], args, sizes, progress, log_dir)))
    print_report(out_console, results, args, header)
    if any(r.error for r in results):
        console.print(f"server logs kept in {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    if args.json:
        doc = {
            **header,
            "config": {k: v for k, v in vars(args).items() if k != "json"},
            "results": [
                {
                    "scenario": r.key,
                    "title": r.title,
                    "observed": r.observed,
                    "request_s": r.request_s,
                    "outcome": r.outcome,
                    "detail": r.detail,
                    "error": r.error,
                    "pings": r.pings.as_json(args.latencies) if r.pings else None,
                    "idle_pings": r.idle.as_json(False) if r.idle else None,
                    "p99_over_goal": None if math.isnan(r.ratio) else round(r.ratio, 3),
                    "goal_met": r.met,
                    "setup_s": r.setup_s,
                    "server_cpu_s": r.server_cpu_s,
                    "rss_before_mib": r.rss_before_mib,
                    "rss_peak_sampled_mib": r.rss_peak_mib,
                    "vm_hwm_mib": r.hwm_mib,
                    "server_end": r.server_end,
                    "extra": r.extra,
                }
                for r in results
            ],
        }
        args.json.write_text(json.dumps(doc, indent=2, default=str))
    return 1 if any(r.error for r in results) else 0


def start_cmd_preview(args: argparse.Namespace) -> list[str]:
    prefix = shlex.split(args.server_cmd) if args.server_cmd else [str(Path(sys.executable).parent / "mmsim")]
    return [*prefix, "serve", "--listen", "127.0.0.1:<free port>", *args.server_arg]


if __name__ == "__main__":
    sys.exit(main())
