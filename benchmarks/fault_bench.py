#!/usr/bin/env python3
"""Userfault round trips per second: a fault on a MISSING-registered page, its event, the
handler's UFFDIO_COPY, the wake-up and the faulting access's return.

    .venv/bin/python benchmarks/fault_bench.py [--faults N] [--repeats R] [--concurrency C] [--json FILE]

Figures, all in one run:

- **kernel**: the live kernel's loop (``kernel_fault.c``: a thread reads every page of a fresh
  MISSING-registered region, a handler thread polls the userfaultfd, reads each message and
  resolves it with a one-page UFFDIO_COPY);
- **model**: the same loop on one in-process :class:`MemoryModel`: a task reads every page, a
  handler task takes each event from ``uffd_events`` and calls ``uffd_copy``;
- **grpc**: the same loop through the SDK against ``mmsim serve`` started as a separate process:
  ``Process.read`` calls, ``Process.userfaults()``, and each UFFDIO_COPY sent on a ``BatchStream``
  (``ops.uffd_copy``); C processes at once, each with its own faulting task and handler;
- **remap**: unary single-page ``Process.remap`` calls on the same server with the same
  concurrency, the baseline the gRPC loop is held to.

Goals: model >= 0.1 x kernel; grpc >= 0.5 x remap. Medians of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grpc_bench import free_port, start_server_process, stop_server_process, wait_serving
from kernel_baseline import kernel_oracle_unavailable, run_kernel_fault

from mmsim.client import Client, Process, ops
from mmsim.server.mm.model import MemoryModel

P = 4096
BASE = 0x100000000
MODEL_GOAL = 0.1
GRPC_GOAL = 0.5


async def model_loop(n: int) -> float:
    """Faults resolved per second on one in-process model."""
    m = MemoryModel()
    pid = await m.create_process()
    v = await m.mmap(pid, n * P, addr=BASE, uffd="missing")

    async def handler() -> None:
        done = 0
        async for ev in m.uffd_events(pid):
            await m.uffd_copy(pid, ev.addr, P, 1000 + (ev.addr - v.start) // P)
            done += 1
            if done == n:
                return

    h = asyncio.create_task(handler())
    t0 = time.perf_counter()
    for i in range(n):
        got = await m.read(pid, v.start + i * P)
        assert got == 1000 + i, (i, got)
    seconds = time.perf_counter() - t0
    await h
    assert m.check_invariants() == []
    return n / seconds


async def grpc_fault_loop(mm: Client, n: int, concurrency: int) -> float:
    """Faults resolved per second through the SDK: ``concurrency`` processes, each faulting its
    own n / concurrency pages with a handler of its own."""
    per = max(1, n // concurrency)
    procs = [await mm.create_process() for _ in range(concurrency)]
    for p in procs:
        await p.mmap(per * P, "rw", uffd="missing", addr=BASE)
    ready = [asyncio.Event() for _ in procs]

    async def handler(p: Process, started: asyncio.Event) -> None:
        """The events from Userfaults; each copy sent on a BatchStream (a message on an open
        stream costs less than a unary call)."""
        done = 0
        events = p.userfaults()
        async with mm.batch_stream(via=p) as stream:
            started.set()
            async for ev in events:
                (copied,) = await stream.run([ops.uffd_copy(p, ev.addr, P, 1000 + (ev.addr - BASE) // P)])
                assert copied == P, copied
                done += 1
                if done == per:
                    await events.aclose()
                    return

    async def faulter(p: Process) -> None:
        for i in range(per):
            got = await p.read(BASE + i * P)
            assert got == 1000 + i, (i, got)

    handlers = [asyncio.create_task(handler(p, e)) for p, e in zip(procs, ready, strict=True)]
    for e in ready:
        await e.wait()
    t0 = time.perf_counter()
    await asyncio.gather(*(faulter(p) for p in procs))
    seconds = time.perf_counter() - t0
    await asyncio.gather(*handlers)
    for p in procs:
        await p.exit()
    return per * concurrency / seconds


async def grpc_remap_loop(mm: Client, n: int, concurrency: int) -> float:
    """Unary single-page remaps per second, ping-ponged between two pages, ``concurrency`` at once."""
    per = max(1, n // concurrency)
    procs = []
    for _ in range(concurrency):
        p = await mm.create_process()
        await p.mmap(P, "rw", addr=BASE)
        await p.write(BASE, 7)
        await p.mmap(P, "rw", uffd="missing", addr=BASE + 2 * P)
        await p.uffd_register(BASE, P, "missing")
        procs.append(p)

    async def mover(p: Process) -> None:
        src, dst = BASE, BASE + 2 * P
        for _ in range(per):
            await p.remap(dst, src, P)
            src, dst = dst, src

    t0 = time.perf_counter()
    await asyncio.gather(*(mover(p) for p in procs))
    seconds = time.perf_counter() - t0
    for p in procs:
        await p.exit()
    return per * concurrency / seconds


async def grpc_figures(n: int, repeats: int, concurrency: int) -> tuple[list[float], list[float]]:
    port = free_port()
    proc = start_server_process(port, None)
    target = f"127.0.0.1:{port}"
    try:
        await wait_serving(target, proc)
        faults, remaps = [], []
        async with Client(target) as mm:
            for r in range(repeats):  # interleaved, so that drift hits both alike
                remaps.append(await grpc_remap_loop(mm, n, concurrency))
                faults.append(await grpc_fault_loop(mm, n, concurrency))
                print(f"  grpc run {r + 1}: {faults[-1]:,.0f} faults/s, {remaps[-1]:,.0f} remaps/s", file=sys.stderr)
        return faults, remaps
    finally:
        stop_server_process(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faults", type=int, default=20_000, help="faults per kernel and model run (default 20000)")
    ap.add_argument("--grpc-faults", type=int, default=4_000, help="faults per gRPC run (default 4000)")
    ap.add_argument("--repeats", type=int, default=5, help="runs of each figure (default 5)")
    ap.add_argument("--concurrency", type=int, default=1, help="processes faulting at once over gRPC (default 1)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    why = kernel_oracle_unavailable()
    kernel = None
    if why is None:
        kernel = run_kernel_fault(args.faults, args.repeats)["median_ops_per_s"]
    else:
        print(f"kernel loop unavailable: {why}", file=sys.stderr)
    model_runs = [asyncio.run(model_loop(args.faults)) for _ in range(args.repeats)]
    model = statistics.median(model_runs)
    faults, remaps = asyncio.run(grpc_figures(args.grpc_faults, args.repeats, args.concurrency))
    grpc_rate, remap_rate = statistics.median(faults), statistics.median(remaps)
    out = {
        "when": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.node(), "python": platform.python_version(),
        "concurrency": args.concurrency, "kernel_faults_per_s": kernel, "model_faults_per_s": model,
        "model_runs": model_runs, "grpc_faults_per_s": grpc_rate, "grpc_fault_runs": faults,
        "grpc_remaps_per_s": remap_rate, "grpc_remap_runs": remaps,
        "model_vs_kernel": model / kernel if kernel else None, "grpc_vs_remap": grpc_rate / remap_rate,
    }
    print(f"kernel: {kernel:,.0f} faults/s" if kernel else "kernel: unavailable")
    print(f"model:  {model:,.0f} faults/s"
          + (f"  ({model / kernel:.2f} x kernel, goal >= {MODEL_GOAL})" if kernel else ""))
    print(f"grpc:   {grpc_rate:,.0f} faults/s, unary remap {remap_rate:,.0f}/s  "
          f"({grpc_rate / remap_rate:.2f} x remap, goal >= {GRPC_GOAL}; concurrency {args.concurrency})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
