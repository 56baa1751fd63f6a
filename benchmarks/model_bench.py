"""In-process model benchmark: moves, bulk moves, walks over 64 mappings, and a 10,000-page fork.

Each figure is the median of several runs, measured in one process with the default
configuration (protocol "recheck", detectors on, no preemption). The baselines run in the same
invocation: the live kernel's UFFDIO_MOVE (a small C loop over the ioctl, see kernel_baseline.py)
and a bare synchronous Python loop doing only the dictionary and attribute updates of a move.

    python benchmarks/model_bench.py [--repeats N] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_baseline import kernel_oracle_unavailable, run_kernel_move

from mmsim.server.mm.model import MemoryModel

P = 4096
GOALS = {
    "single_moves_per_s": 200_000,
    "bulk64_pages_per_s": 1_000_000,
    "walks64_per_s": 25_000,
    "fork10k_ms": 20.0,
}


async def _two_regions(m: MemoryModel, pages: int) -> tuple[int, int, int]:
    pid = await m.create_process()
    a = await m.mmap(pid, pages * P, addr=0x100000000)
    b = await m.mmap(pid, pages * P, addr=0x200000000)
    for i in range(pages):
        await m.write(pid, a.start + i * P, i + 1)
    await m.uffd_register(pid, a.start, pages * P, "missing")
    await m.uffd_register(pid, b.start, pages * P, "missing")
    return pid, a.start, b.start


async def bench_moves(n: int, pages: int) -> float:
    """Ping-pong ``pages``-page moves between two registered regions; returns moves per second."""
    m = MemoryModel()
    pid, a, b = await _two_regions(m, pages)
    length = pages * P
    move = m.move
    t0 = time.perf_counter()
    for _ in range(n // 2):
        await move(pid, b, a, length)
        await move(pid, a, b, length)
    dt = time.perf_counter() - t0
    assert m.check_invariants() == [] and not m.detectors.counts
    return (n // 2 * 2) / dt


async def bench_walks(n: int, mappings: int = 64) -> float:
    """Walks per second of a folio mapped in ``mappings`` processes (after forks)."""
    m = MemoryModel()
    pid = await m.create_process()
    v = await m.mmap(pid, P, addr=0x100000000)
    await m.write(pid, v.start, 7)
    for _ in range(mappings - 1):
        await m.fork(pid)
    info = m.folio(pid, v.start)
    assert info is not None and info.mapcount == mappings
    walk = m.walk
    t0 = time.perf_counter()
    for _ in range(n):
        w = await walk(pid, v.start)
    dt = time.perf_counter() - t0
    assert len(w.mappings) == mappings
    return n / dt


async def bench_fork(pages: int = 10_000) -> float:
    """Milliseconds to fork a process with ``pages`` resident pages."""
    m = MemoryModel()
    pid = await m.create_process()
    v = await m.mmap(pid, pages * P)
    for i in range(pages):
        await m.write(pid, v.start + i * P, i)
    t0 = time.perf_counter()
    child = await m.fork(pid)
    dt = time.perf_counter() - t0
    await m.exit(child)
    return dt * 1000


def bare_python_moves(n: int) -> float:
    """A bare synchronous loop doing only a move's dictionary and attribute updates: find both
    VMAs, find both PTE tables, check dst is empty, take the src PTE, repoint the folio's mapping
    and index, install a new dst PTE. No locks, no validation, no detectors, no asyncio."""

    class Vma:
        __slots__ = ("start", "end", "pgoff", "anon_vma")

        def __init__(self, start: int, pages: int) -> None:
            self.start, self.end, self.pgoff, self.anon_vma = start, start + pages * P, start >> 12, object()

    class Folio:
        __slots__ = ("mapping", "index")
        mapping: object
        index: int

    class Pte:
        __slots__ = ("folio", "write", "young", "dirty")

        def __init__(self, folio: Folio) -> None:
            self.folio, self.write, self.young, self.dirty = folio, True, True, True

    a, b = Vma(0x100000000, 1), Vma(0x200000000, 1)
    vmas, starts = [a, b], [a.start, b.start]
    tables: dict[int, dict[int, Pte]] = {a.start >> 21: {a.start >> 12: Pte(Folio())}, b.start >> 21: {}}
    t0 = time.perf_counter()
    for i in range(n):
        src, dst = (a.start, b.start) if i % 2 == 0 else (b.start, a.start)
        dvma = vmas[bisect.bisect_right(starts, dst) - 1]
        vmas[bisect.bisect_right(starts, src) - 1]
        dpt, spt = tables[dst >> 21], tables[src >> 21]
        if dst >> 12 in dpt:
            raise AssertionError
        pte = spt.pop(src >> 12)
        folio = pte.folio
        folio.mapping = dvma.anon_vma
        folio.index = ((dst - dvma.start) >> 12) + dvma.pgoff
        dpt[dst >> 12] = Pte(folio)
    return n / (time.perf_counter() - t0)


def progress(message: str) -> None:
    """One line on stderr per run, so a long benchmark shows where it is."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median_of(repeats: int, fn, label: str = "", unit: str = "/s") -> tuple[float, list[float]]:
    runs = []
    for i in range(repeats):
        runs.append(fn())
        progress(f"{label}: run {i + 1}/{repeats}: {runs[-1]:,.1f}{unit}")
    return statistics.median(runs), runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    r = args.repeats
    out: dict[str, object] = {"machine": f"{platform.node()} {platform.machine()} Python {platform.python_version()}"}

    out["single_moves_per_s"], out["single_runs"] = median_of(
        r, lambda: asyncio.run(bench_moves(20_000, 1)), "single-page moves", " moves/s"
    )
    bulk, out["bulk64_runs"] = median_of(r, lambda: asyncio.run(bench_moves(2_000, 64)), "64-page moves", " moves/s")
    out["bulk64_pages_per_s"] = bulk * 64
    out["walks64_per_s"], out["walk_runs"] = median_of(
        r, lambda: asyncio.run(bench_walks(5_000)), "walks over 64 mappings", " walks/s"
    )
    out["fork10k_ms"], out["fork_runs"] = median_of(
        max(r, 5), lambda: asyncio.run(bench_fork()), "fork of 10,000 pages", " ms"
    )
    out["bare_python_moves_per_s"], _ = median_of(
        r, lambda: bare_python_moves(500_000), "bare Python move loop", " moves/s"
    )

    why = kernel_oracle_unavailable()
    if why is None:
        progress(f"kernel baseline: single-page moves ({r} runs)")
        out["kernel_single_moves_per_s"] = run_kernel_move("single", 200_000, r)["median_ops_per_s"]
        progress(f"kernel baseline: 64-page moves ({r} runs)")
        out["kernel_bulk64_pages_per_s"] = run_kernel_move("bulk64", 20_000, r)["median_pages_per_s"]
    else:
        out["kernel_unavailable"] = why
        progress(f"kernel baseline unavailable: {why}")

    rows = [
        ("single-page moves/s", "single_moves_per_s", "kernel_single_moves_per_s", False),
        ("pages/s in 64-page moves", "bulk64_pages_per_s", "kernel_bulk64_pages_per_s", False),
        ("walks/s over 64 mappings", "walks64_per_s", None, False),
        ("fork of 10,000 pages (ms)", "fork10k_ms", None, True),
    ]
    print(f"machine: {out['machine']}; medians of {r} runs")
    print(f"{'figure':28} {'model':>12} {'goal':>10} {'met':>4} {'kernel':>12} {'model/kernel':>13}")
    for label, key, kkey, lower_is_better in rows:
        val = float(out[key])  # type: ignore[arg-type]
        goal = GOALS[key]
        met = val <= goal if lower_is_better else val >= goal
        kval = out.get(kkey) if kkey else None
        ratio = f"{val / float(kval):.3f}" if kval else "-"  # type: ignore[arg-type]
        kstr = f"{float(kval):,.0f}" if kval else "-"  # type: ignore[arg-type]
        print(f"{label:28} {val:>12,.1f} {goal:>10,} {'yes' if met else 'no':>4} {kstr:>12} {ratio:>13}")
    bare = float(out["bare_python_moves_per_s"])  # type: ignore[arg-type]
    single = float(out["single_moves_per_s"])  # type: ignore[arg-type]
    print(f"bare Python move loop: {bare:,.0f}/s; model single-page moves are {single / bare:.3f} of it")
    if "kernel_unavailable" in out:
        print(f"kernel baseline unavailable: {out['kernel_unavailable']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
