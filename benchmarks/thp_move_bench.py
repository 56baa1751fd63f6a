#!/usr/bin/env python3
"""Whole-PMD UFFDIO_MOVE: 2 MiB moves of PMD-mapped THPs per second, the live kernel against the
in-process model.

    .venv/bin/python benchmarks/thp_move_bench.py [--pmds N] [--moves M] [--small-moves S]
                                                  [--repeats R] [--quick] [--json FILE]

Two 2 MiB-aligned regions A and B of N PMDs each; every 4 KiB page of A written with a distinct
value; both registered with a userfaultfd (MISSING); then moves of 2 MiB each, PMD i = m % N going
A->B on even passes (m // N) and B->A on odd ones, so that every destination is empty. Two
figures, kernel and model alternating in one run, ``--repeats`` runs each, medians:

- **huge PMD**: both regions advised MADV_HUGEPAGE, so A's writes fault in PMD-size THPs and each
  move is one huge PMD (the kernel's and the model's ``move_pages_huge_pmd``). Kernel:
  ``kernel_thp_move.c`` (built at run time) checks with PAGEMAP_SCAN (PAGE_IS_HUGE) that every PMD
  of A is PMD-mapped before the moves and every destination after them. Model: a fresh
  ``MemoryModel`` (``madvise(..., "hugepage")``), checked with ``folio(...).pmd`` and
  ``stats["thp_move_pmd"]``, which must count every move.
- **512 small pages**: the same 2 MiB moves of a region without hugepage advice (the kernel's
  MADV_NOHUGEPAGE; the model's default "madvise" THP policy), each a batch of 512 PTEs: the
  baseline that shows the huge-PMD path costs per PMD, not per page.

After the moves both sides check every page's value at the place its PMD's number of moves says,
and that nothing is left at the other place. The kernel side needs UFFDIO_MOVE (see
``kernel_baseline.kernel_oracle_unavailable``) and THP "madvise" or "always" in
/sys/kernel/mm/transparent_hugepage/enabled, and is skipped with the reason otherwise; a run whose
A did not get its THPs (fragmentation, or THPs disabled for the process) is reported and its
kernel figure skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_baseline import _build, kernel_oracle_unavailable

from mmsim.server.mm.ledger import PageLedger
from mmsim.server.mm.mm_types import HPAGE_PMD_NR, HPAGE_PMD_ORDER, HPAGE_PMD_SIZE, PAGE_SHIFT, PAGE_SIZE
from mmsim.server.mm.model import MemoryModel

SOURCE = Path(__file__).resolve().with_name("kernel_thp_move.c")
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
THP_PMD_SIZE = Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
#: kernel_thp_move's exit status when A is not THP-backed after its writes.
EXIT_NO_THP = 3
#: Where the model's regions start: A, one unmapped PMD, then B.
MODEL_BASE = 0x4000_0000
MIB_PER_MOVE = HPAGE_PMD_SIZE / (1 << 20)
MODES = ("huge", "small")
err = Console(stderr=True)


def stamp(i: int) -> int:
    """The value written to page i of A (as kernel_thp_move.c's stamp)."""
    return (0x6D6D73696D000000 ^ (i * 0x9E3779B97F4A7C15)) & ((1 << 64) - 1)


@dataclass(frozen=True)
class ModelRun:
    """One model run: its rates, the PMDs PMD-mapped at their destinations afterwards and the
    moves ``stats["thp_move_pmd"]`` counted."""

    seconds: float
    moves_per_s: float
    mib_per_s: float
    pmd_mapped_after: int
    thp_move_pmd: int


def _where(n: int, moves: int, i: int) -> bool:
    """Whether PMD i of n is in B after ``moves`` ping-pong moves (an odd number of its own)."""
    return bool((moves // n + (i < moves % n)) & 1)


async def model_moves(n: int, moves: int, huge: bool) -> ModelRun:
    """``moves`` 2 MiB UFFDIO_MOVEs between two n-PMD regions of a fresh model (THPs if ``huge``,
    else small pages), verified afterwards: every page's value at its destination, nothing at its
    source, each destination PMD-mapped (huge) or not, and every move a whole-PMD move in
    ``thp_move_pmd`` (huge) or none of them."""
    m = MemoryModel()
    pid = await m.create_process()
    length = n * HPAGE_PMD_SIZE
    a, b = MODEL_BASE, MODEL_BASE + length + HPAGE_PMD_SIZE
    for start in (a, b):
        await m.mmap(pid, length, addr=start)
        if huge:
            await m.madvise(pid, start, length, "hugepage")
    for i in range(n * HPAGE_PMD_NR):
        await m.write(pid, a + i * PAGE_SIZE, stamp(i))
    for i in range(n):
        f = m.folio(pid, a + i * HPAGE_PMD_SIZE)
        if f is None or f.pmd != huge or f.order != (HPAGE_PMD_ORDER if huge else 0):
            raise AssertionError(f"model PMD {i} of A before the moves: {f}")
    for start in (a, b):
        await m.uffd_register(pid, start, length, "missing")
    before = m.k.stats["thp_move_pmd"]

    t0 = time.perf_counter()
    for k in range(moves):
        off = (k % n) * HPAGE_PMD_SIZE
        if (k // n) & 1:
            await m.move(pid, a + off, b + off, HPAGE_PMD_SIZE)
        else:
            await m.move(pid, b + off, a + off, HPAGE_PMD_SIZE)
    seconds = time.perf_counter() - t0

    counted = m.k.stats["thp_move_pmd"] - before
    pmd_mapped = 0
    for i in range(n):
        in_b = _where(n, moves, i)
        at = (b if in_b else a) + i * HPAGE_PMD_SIZE
        other = (a if in_b else b) + i * HPAGE_PMD_SIZE
        f = m.folio(pid, at)
        if f is not None and f.pmd and f.order == HPAGE_PMD_ORDER:
            pmd_mapped += 1
        elif huge:
            raise AssertionError(f"model PMD {i} is no longer PMD-mapped after the moves: {f}")
        if any(e.present or e.swap for e in m.pagemap(pid, other, HPAGE_PMD_SIZE)):
            raise AssertionError(f"model PMD {i}: a page is left at its source")
    for start in (a, b):
        await m.uffd_unregister(pid, start, length)
    for i in range(n):
        at = (b if _where(n, moves, i) else a) + i * HPAGE_PMD_SIZE
        for j in range(HPAGE_PMD_NR):
            got = await m.read(pid, at + j * PAGE_SIZE)
            if got != stamp(i * HPAGE_PMD_NR + j):
                raise AssertionError(f"model page {j} of PMD {i} read {got:#x}")
    problems = m.check_invariants()
    if problems:
        raise AssertionError(f"model invariants: {problems[:3]}")
    return ModelRun(seconds, moves / seconds, moves * MIB_PER_MOVE / seconds, pmd_mapped, counted)


def ledger_seconds_per_move(moves: int) -> float:
    """Seconds the model's data ledger alone (``PageLedger.moved``, which every model move calls)
    takes to follow one 2 MiB move of 512 written pages, ping-ponged ``moves`` times."""
    a, b = MODEL_BASE, MODEL_BASE + 2 * HPAGE_PMD_SIZE
    ledger = PageLedger()
    ledger.update({(a >> PAGE_SHIFT) + i: stamp(i) for i in range(HPAGE_PMD_NR)})
    t0 = time.perf_counter()
    for k in range(moves):
        if k & 1:
            ledger.moved(b, a, HPAGE_PMD_SIZE)
        else:
            ledger.moved(a, b, HPAGE_PMD_SIZE)
    seconds = time.perf_counter() - t0
    if len(ledger) != HPAGE_PMD_NR:
        raise AssertionError(f"the ledger holds {len(ledger)} pages, not {HPAGE_PMD_NR}")
    return seconds / moves


# -- the kernel
def thp_unavailable() -> str | None:
    """Why the kernel cannot fault in PMD-size THPs for a MADV_HUGEPAGE region here, or None."""
    try:
        words = THP_ENABLED.read_text().split()
    except OSError as e:
        return f"{THP_ENABLED} unreadable: {e.strerror}"
    mode = next((w.strip("[]") for w in words if w.startswith("[")), None)
    if mode not in ("always", "madvise"):
        return f"transparent hugepages are {mode!r} ({THP_ENABLED}), not 'madvise' or 'always'"
    try:
        size = int(THP_PMD_SIZE.read_text())
    except (OSError, ValueError):
        return None  # before Linux 4.18 the file does not exist; the program checks the PMDs itself
    if size != HPAGE_PMD_SIZE:
        return f"the PMD THP size is {size} bytes ({THP_PMD_SIZE}), not {HPAGE_PMD_SIZE}"
    return None


def kernel_unavailable() -> str | None:
    """Why the kernel side cannot run here (no UFFDIO_MOVE, no C compiler, no THPs), or None."""
    return kernel_oracle_unavailable() or thp_unavailable()


def run_kernel(binary: Path, mode: str, n: int, moves: int) -> dict[str, Any] | str:
    """One run of kernel_thp_move: its JSON figures, or why A did not get its THPs."""
    args = [str(binary), mode, str(n), str(moves)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if proc.returncode == EXIT_NO_THP:
        return proc.stderr.strip()
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pmds", type=int, default=16, help="PMDs in each region (default 16)")
    ap.add_argument("--moves", type=int, default=20_000, help="huge-PMD moves per run (default 20000)")
    ap.add_argument("--small-moves", type=int, default=1_000,
                    help="2 MiB moves of small pages per run (default 1000)")
    ap.add_argument("--repeats", type=int, default=5, help="runs of each figure (default 5)")
    ap.add_argument("--quick", action="store_true", help="a smoke test: 2 PMDs, 64 and 8 moves, one run")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.quick:
        args.pmds, args.moves, args.small_moves, args.repeats = 2, 64, 8, 1
    if min(args.pmds, args.moves, args.small_moves, args.repeats) <= 0:
        ap.error("--pmds, --moves, --small-moves and --repeats must be positive")
    n = args.pmds
    moves = {"huge": args.moves, "small": args.small_moves}

    why_kernel = kernel_unavailable()
    binary = None
    if why_kernel is None:
        binary = _build(SOURCE)
    else:
        err.print(f"[yellow]kernel side skipped: {why_kernel}[/]")

    kernel: dict[str, list[dict[str, Any]]] = {f: [] for f in MODES}
    model: dict[str, list[ModelRun]] = {f: [] for f in MODES}
    no_thp: list[str] = []
    ledger: list[float] = []
    for r in range(args.repeats):  # alternating, so that drift hits both alike
        line = []
        for f in MODES:
            k = None
            if binary is not None:
                run = run_kernel(binary, f, n, moves[f])
                if isinstance(run, str):
                    no_thp.append(run)
                    err.print(f"[yellow]kernel run {r + 1} skipped: {run}[/]")
                else:
                    kernel[f].append(run)
                    k = run["moves_per_s"]
            model[f].append(asyncio.run(model_moves(n, moves[f], f == "huge")))
            line.append(f"{f} kernel {_fmt(k)} model {_fmt(model[f][-1].moves_per_s)}")
        ledger.append(ledger_seconds_per_move(moves["huge"]))
        err.print(f"  run {r + 1}, 2 MiB moves/s: " + ", ".join(line))

    names = {"huge": "one huge PMD (THP)", "small": "512 small pages"}
    t = Table(title=f"thp_move_bench: 2 MiB UFFDIO_MOVEs, {n} PMDs a region, {args.moves:,} huge / "
                    f"{args.small_moves:,} small moves a run, medians of {args.repeats} ({platform.node()}, "
                    f"{os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()})")
    for col in ("2 MiB moved as", "kernel moves/s", "kernel MiB/s", "model moves/s", "model MiB/s", "model / kernel"):
        t.add_column(col, justify="left" if col.startswith("2 MiB") else "right")
    out: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.node(), "kernel": platform.release(),
        "python": platform.python_version(), "pmds": n, "moves": moves, "repeats": args.repeats,
        "kernel_skipped": why_kernel, "kernel_no_thp": no_thp,
    }
    for f in MODES:
        k = _med([x["moves_per_s"] for x in kernel[f]])
        k_mib = _med([x["mib_per_s"] for x in kernel[f]])
        mo = _med([x.moves_per_s for x in model[f]])
        mo_mib = _med([x.mib_per_s for x in model[f]])
        ratio = _ratio(mo, k)
        t.add_row(names[f], _fmt(k), _fmt(k_mib), _fmt(mo), _fmt(mo_mib), "—" if ratio is None else f"{ratio:.3f}")
        out[f] = {"kernel_moves_per_s": k, "kernel_mib_per_s": k_mib, "model_moves_per_s": mo,
                  "model_mib_per_s": mo_mib, "model_vs_kernel": ratio,
                  "kernel_runs": kernel[f], "model_runs": [asdict(x) for x in model[f]]}
    Console().print(t)
    for f in MODES:
        print(f"{f} runs, moves/s: kernel {', '.join(_fmt(x['moves_per_s']) for x in kernel[f]) or '—'}; "
              f"model {', '.join(_fmt(x.moves_per_s) for x in model[f])}")
    for side, runs in (("kernel", {f: [x["moves_per_s"] for x in kernel[f]] for f in MODES}),
                       ("model", {f: [x.moves_per_s for x in model[f]] for f in MODES})):
        ratio = _ratio(_med(runs["huge"]), _med(runs["small"]))
        out[f"{side}_huge_vs_small"] = ratio
        if ratio is not None:
            print(f"{side}: a huge-PMD move is {ratio:,.1f}× as fast as the same 2 MiB as 512 small pages")
    huge_s = _med([x.seconds / moves["huge"] for x in model["huge"]])
    ledger_s = _med(ledger)
    assert huge_s is not None and ledger_s is not None
    out["model_huge_us_per_move"] = huge_s * 1e6
    out["ledger_us_per_move"] = ledger_s * 1e6
    print(f"model: {huge_s * 1e6:.1f} µs per huge-PMD move, of which its data ledger alone (PageLedger.moved, "
          f"per PMD) takes {ledger_s * 1e6:.1f} µs")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
