#!/usr/bin/env python3
"""Swap: pages swapped out per second by MADV_PAGEOUT, and swapped in per second by reads, the
live kernel against the in-process model.

    .venv/bin/python benchmarks/swap_bench.py [--pages N] [--repeats R] [--json FILE]

Three figures, kernel and model alternating in one run, ``--repeats`` runs each, medians:

- **pageout**: one MADV_PAGEOUT over N written pages (each page a swap entry afterwards, its
  folio written and kept, clean, in the swap cache). Kernel: ``kernel_swap.c`` (built at run
  time) maps N pages, writes a distinct word to each, drains the LRU batches and times the
  madvise; it then waits for the writeback to end (the device is asynchronous: the madvise
  returns with the writes submitted) and checks with /proc/self/pagemap that every page is a
  swap entry. Model: the same on a fresh ``MemoryModel`` (``madvise(..., "pageout")``), checked
  with ``pagemap``.
- **swap-in, swap-cache hits**: right after that pageout, every page read and its value checked;
  each read finds its folio in the swap cache (a minor fault).
- **swap-in, from the device**: the swap cache dropped first, then the reads timed. Model:
  ``reclaim(N)`` until the swap table is empty. Kernel: ``kernel_swap.c`` joins a memory cgroup
  made for the run and, after the pageout's writeback, reclaims it (cgroup v2 ``memory.reclaim``;
  where the memory controller is on cgroup v1 only, ``memory.force_empty``) until mincore(2)
  says none of the pages is resident; the kernel's swap readahead then reads several pages per
  major fault.

The kernel side needs root, an active swap device that is not zram and no zswap
(``.ci/swapfile`` sets one up); it is skipped with the reason otherwise, and the device mode
also when no memory cgroup can be made.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_baseline import _build, _compiler

from mmsim.server.mm.model import MemoryModel
from mmsim.server.tools.conformance.kernel import swap_unavailable

P = 4096
SOURCE = Path(__file__).resolve().with_name("kernel_swap.c")
#: The most reclaim calls the model's device mode makes to empty its swap cache.
MAX_RECLAIM_CALLS = 100
#: How long removing the run's cgroup may keep failing with EBUSY (its last task exiting).
RMDIR_WAIT_S = 5.0
err = Console(stderr=True)


# -- the model
async def _written(m: MemoryModel, n: int) -> tuple[int, int]:
    """A process with n written pages (page i holds i + 1): its pid and the region's start."""
    pid = await m.create_process()
    v = await m.mmap(pid, n * P)
    for i in range(n):
        await m.write(pid, v.start + i * P, i + 1)
    return pid, v.start


async def _read_all(m: MemoryModel, pid: int, start: int, n: int) -> float:
    """Seconds to read every page, each value checked."""
    t0 = time.perf_counter()
    for i in range(n):
        got = await m.read(pid, start + i * P)
        if got != i + 1:
            raise AssertionError(f"model page {i} read {got}, not {i + 1}")
    return time.perf_counter() - t0


def _check(m: MemoryModel, pid: int, start: int, n: int, *, swap: bool, swapcache: bool | None) -> None:
    """Every page a swap entry (swap) or present (not swap); for swap entries, in the swap cache
    or not as ``swapcache`` says (None: either)."""
    for i, e in enumerate(m.pagemap(pid, start, n * P)):
        ok = (e.swap and not e.present) if swap else e.present
        if ok and swap and swapcache is not None:
            ok = e.swapcache == swapcache
        if not ok:
            raise AssertionError(f"model page {i}: {e}")


async def model_pageout_and_hits(n: int) -> tuple[float, float]:
    """Pages per second of one pageout over n written pages, then of reading them back (swap-cache
    hits), on a fresh model."""
    m = MemoryModel()
    pid, start = await _written(m, n)
    t0 = time.perf_counter()
    await m.madvise(pid, start, n * P, "pageout")
    pageout = time.perf_counter() - t0
    _check(m, pid, start, n, swap=True, swapcache=True)
    hits = await _read_all(m, pid, start, n)
    _check(m, pid, start, n, swap=False, swapcache=None)
    problems = m.check_invariants()
    if problems:
        raise AssertionError(f"model invariants: {problems[:3]}")
    return n / pageout, n / hits


async def model_device(n: int) -> float:
    """Pages per second of reading n paged-out pages whose folios reclaim has freed (swap-ins
    from the slots), on a fresh model."""
    m = MemoryModel()
    pid, start = await _written(m, n)
    await m.madvise(pid, start, n * P, "pageout")
    for _ in range(MAX_RECLAIM_CALLS):
        if not m.k.swap.swap_table:
            break
        if await m.reclaim(n) == 0:
            raise AssertionError(f"model reclaim freed nothing; {len(m.k.swap.swap_table)} folios in the swap cache")
    else:
        left = len(m.k.swap.swap_table)
        raise AssertionError(f"{left} folios still in the swap cache after {MAX_RECLAIM_CALLS} reclaims")
    _check(m, pid, start, n, swap=True, swapcache=False)
    seconds = await _read_all(m, pid, start, n)
    _check(m, pid, start, n, swap=False, swapcache=None)
    problems = m.check_invariants()
    if problems:
        raise AssertionError(f"model invariants: {problems[:3]}")
    return n / seconds


# -- the kernel
def kernel_unavailable() -> str | None:
    """Why the kernel side cannot run here (see swap_unavailable; no C compiler), or None."""
    why = swap_unavailable()
    if why is not None:
        return why
    if _compiler() is None:
        return "no C compiler (cc) on PATH"
    return None


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, file system type, super options) of every mount, from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields, tail = pre.split(), post.split()
            if len(fields) >= 5 and len(tail) >= 3:
                out.append((fields[4], tail[0], set(tail[2].split(","))))
    return out


def reclaim_parent() -> tuple[str, str] | str:
    """Where to make the run's memory cgroup: ``(parent directory, "v2" or "v1")``, or why none
    can be made. cgroup v2 (``memory.reclaim``) where its root delegates the memory controller;
    else the cgroup v1 memory hierarchy below this process's own cgroup (``memory.force_empty``)."""
    if os.geteuid() != 0:
        return "not root (a memory cgroup is needed to drop the swap cache)"
    mounts = _mounts()
    why_v2 = "no cgroup v2 mount"
    for point, fstype, _ in mounts:
        if fstype != "cgroup2":
            continue
        try:
            delegated = Path(point, "cgroup.subtree_control").read_text().split()
        except OSError as e:
            why_v2 = f"{point}/cgroup.subtree_control unreadable: {e.strerror}"
            continue
        if "memory" in delegated:
            return point, "v2"
        why_v2 = f"the cgroup v2 hierarchy at {point} does not have the memory controller enabled for its children"
    for point, fstype, opts in mounts:
        if fstype != "cgroup" or "memory" not in opts:
            continue
        own = "/"
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if "memory" in controllers.split(","):
                    own = path
        parent = os.path.join(point, own.lstrip("/"))
        if os.path.exists(os.path.join(parent, "memory.force_empty")):
            return parent, "v1"
    return f"{why_v2}, and no cgroup v1 memory hierarchy with memory.force_empty"


@contextmanager
def reclaim_cgroup(parent: str) -> Iterator[str]:
    """A fresh memory cgroup below ``parent``, removed afterwards (retried while its last task is
    still leaving)."""
    path = os.path.join(parent, f"mmsim-bench-{os.getpid()}-{secrets.token_hex(3)}")
    os.mkdir(path)
    try:
        yield path
    finally:
        deadline = time.monotonic() + RMDIR_WAIT_S
        while True:
            try:
                os.rmdir(path)
                break
            except OSError as e:
                if time.monotonic() >= deadline:
                    err.print(f"[yellow]could not remove {path}: {e.strerror}[/]")
                    break
                time.sleep(0.01)


def run_kernel_swap(binary: Path, n: int, cgroup: str | None = None) -> dict[str, Any]:
    """One run of kernel_swap: its JSON figures."""
    args = [str(binary), str(n)] + ([cgroup] if cgroup else [])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return dict(json.loads(proc.stdout))


# -- the report
def _med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=20_000, help="pages per run (default 20000)")
    ap.add_argument("--repeats", type=int, default=5, help="runs of each figure (default 5)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if args.pages <= 0 or args.repeats <= 0:
        ap.error("--pages and --repeats must be positive")
    n = args.pages

    why_kernel = kernel_unavailable()
    binary = None
    if why_kernel is None:
        binary = _build(SOURCE)
    else:
        err.print(f"[yellow]kernel side skipped: {why_kernel}[/]")
    where = reclaim_parent()
    why_device = None
    if binary is not None and isinstance(where, str):
        why_device = where
        err.print(f"[yellow]kernel swap-in from the device skipped: {where}[/]")
    cgroup_kind = where[1] if isinstance(where, tuple) else None

    figures = ("pageout", "swapin_cache", "swapin_device")
    kernel: dict[str, list[float]] = {f: [] for f in figures}
    model: dict[str, list[float]] = {f: [] for f in figures}
    kernel_runs: list[dict[str, Any]] = []
    for r in range(args.repeats):  # alternating, so that drift hits both alike
        if binary is not None:
            run = run_kernel_swap(binary, n)
            kernel_runs.append(run)
            kernel["pageout"].append(run["pageout_per_s"])
            kernel["swapin_cache"].append(run["swapin_per_s"])
            if run["swapcache_after_pageout"] != n:
                err.print(f"[yellow]kernel: {run['swapcache_after_pageout']} of {n} pages in the swap cache "
                          f"after the pageout[/]")
        pageout, hits = asyncio.run(model_pageout_and_hits(n))
        model["pageout"].append(pageout)
        model["swapin_cache"].append(hits)
        if binary is not None and isinstance(where, tuple):
            with reclaim_cgroup(where[0]) as cg:
                run = run_kernel_swap(binary, n, cg)
            kernel_runs.append(run)
            kernel["swapin_device"].append(run["swapin_per_s"])
        model["swapin_device"].append(asyncio.run(model_device(n)))
        err.print(f"  run {r + 1}: " + ", ".join(
            f"{f} kernel {_fmt(kernel[f][-1] if kernel[f] else None)} model {_fmt(model[f][-1])}" for f in figures))

    names = {
        "pageout": "pageout (MADV_PAGEOUT), pages/s",
        "swapin_cache": "swap-in, swap-cache hits, pages/s",
        "swapin_device": "swap-in from the device, pages/s",
    }
    t = Table(title=f"swap_bench: {n:,} pages, medians of {args.repeats} ({platform.node()}, "
                    f"{os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()})")
    for col in ("figure", "kernel", "model", "model / kernel"):
        t.add_column(col, justify="left" if col == "figure" else "right")
    out: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.node(), "kernel": platform.release(),
        "python": platform.python_version(), "pages": n, "repeats": args.repeats,
        "kernel_skipped": why_kernel, "device_skipped": why_device, "cgroup": cgroup_kind,
        "kernel_runs": kernel_runs,
    }
    for f in figures:
        k, mo = _med(kernel[f]), _med(model[f])
        ratio = _ratio(mo, k)
        t.add_row(names[f], _fmt(k), _fmt(mo), "—" if ratio is None else f"{ratio:.2f}")
        out[f] = {"kernel_per_s": k, "model_per_s": mo, "model_vs_kernel": ratio,
                  "kernel_runs": kernel[f], "model_runs": model[f]}
    Console().print(t)
    for f in figures:
        print(f"{f} runs: kernel {', '.join(_fmt(x) for x in kernel[f]) or '—'}; "
              f"model {', '.join(_fmt(x) for x in model[f])}")
    cache_runs = [r for r in kernel_runs if r["mode"] == "cache"]
    device_runs = [r for r in kernel_runs if r["mode"] == "device"]
    if cache_runs:
        print("kernel writeback after the madvise, ms: "
              + ", ".join(f"{r['writeback_seconds'] * 1e3:.1f}" for r in cache_runs))
    if device_runs:
        print(f"kernel device reads (cgroup {cgroup_kind}): major faults "
              + ", ".join(str(r["majflt"]) for r in device_runs)
              + "; pages read from swap " + ", ".join(str(r["pswpin"]) for r in device_runs))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
