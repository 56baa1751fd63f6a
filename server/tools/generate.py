"""Litmus programs nobody wrote: small random scenarios for ``mmsim explore --generate`` and
``mmsim mutate --generated``.

A program's set-up is drawn from what the protocol's races need: a process with a few written
pages (some swapped out by ``pageout``, some left as the zero page), maybe a THP mapped by a huge
PMD, a fork tree one or two deep (a child that writes has its own anon_vma and folio, the rest of
its pages shared), maybe a VMA split by ``mprotect`` so that a tree has several VMAs, and a
MISSING-registered destination for moves. Its two or three threads each do one or two operations
drawn from walk, move, fork, exit, munmap, mremap, fault (read or write), pageout, reclaim, split
(a one-page ``dontneed`` or move inside the THP) and pin, most of them on one "hot" page; in most
programs the first two threads open with a move of that page and a walk of it (the rmap's own
race), a move of its neighbour, a pin or a fault. Some move the THP's huge PMD whole (a THP's
or the huge zero page's), against a pin of it or a fault at its destination; some page the hot
page out first, so that the opening fault is a swap-in against the move of its swap PTE.
Program ``i`` of seed ``s`` is the same text everywhere.

``shrink`` takes a program a search catches and drops operations (thread ones, then set-up ones)
while the same kind of check still catches it, leaving a minimal litmus file to keep.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from ..mm.mm_types import PAGE_SIZE
from .litmus import Scenario, ScenarioError, parse

#: Where a program maps things: a 4-page source region, a THP's 2 MiB, the move destination, and
#: where mremap puts a page.
SRC = 0x100000
SRC_PAGES = 4
THP = 0x200000
DST = 0x600000
DST_PAGES = 4
REMAP_TO = 0x800000
#: A whole PMD's destination (2 MiB-aligned, registered): a move of the THP's huge PMD whole.
PMD_DST = 0xA00000


@dataclass
class _Draw:
    rng: random.Random
    procs: list[str]
    children: list[str]
    thp: bool
    hot: int  # the page most operations act on: races need two threads on one folio
    forks: int = 0
    exited: bool = False

    def page(self) -> int:
        if self.rng.random() < 0.6:
            return self.hot
        if self.thp and self.rng.random() < 0.25:
            return THP + self.rng.randrange(4) * PAGE_SIZE
        return SRC + self.rng.randrange(SRC_PAGES) * PAGE_SIZE

    def proc(self) -> str:
        return self.rng.choice(self.procs)


def program(seed: int, i: int) -> str:
    """Program ``i`` of ``seed``: a litmus text named ``gen-SEED-I``."""
    rng = random.Random((seed * 1_000_003 + i) & 0xFFFFFFFF)
    thp = rng.random() < 0.3
    huge_zero = pte_mapped = False
    setup = ["p = process", f"mmap p {SRC:#x} {SRC_PAGES}"]
    for k in range(SRC_PAGES):
        if rng.random() < 0.8:
            setup.append(f"write p {SRC + k * PAGE_SIZE:#x} {k + 1}")
    if thp:
        setup += [f"mmap p {THP:#x} 512", f"madvise p {THP:#x} 512 hugepage"]
        if rng.random() < 0.25:  # a read fault: the huge zero page
            setup.append(f"read p {THP:#x}")
            huge_zero = True
        else:
            setup.append(f"write p {THP:#x} 9")
            if rng.random() < 0.5:  # mapped by PTEs: a later move splits the folio itself
                setup.append(f"madvise p {THP + 511 * PAGE_SIZE:#x} 1 dontneed")
                pte_mapped = True
    split_vma = rng.random() < 0.2
    hot = SRC + rng.randrange(SRC_PAGES) * PAGE_SIZE
    if thp and rng.random() < 0.4:
        hot = THP + rng.randrange(4) * PAGE_SIZE
    d = _Draw(rng, ["p"], [], thp, hot)
    depth = rng.choice((0, 1, 1, 2))
    parent = "p"
    for n in range(depth):
        child = f"c{n}"
        setup.append(f"{child} = fork {parent}")
        d.procs.append(child)
        d.children.append(child)
        if rng.random() < 0.5:  # a COW: the child's own anon_vma and folio
            setup.append(f"write {child} {SRC + rng.randrange(SRC_PAGES) * PAGE_SIZE:#x} {0x70 + n}")
        parent = child
    if d.children and rng.random() < 0.6:  # the parent breaks COW on the hot page: exclusive, movable
        setup.append(f"write p {hot:#x} {0x60}")
    if rng.random() < 0.3:
        setup.append(f"madvise p {SRC + rng.randrange(SRC_PAGES) * PAGE_SIZE:#x} 1 pageout")
    if split_vma:  # two VMAs in one anon_vma tree
        setup.append(f"mprotect p {SRC + 3 * PAGE_SIZE:#x} 1 r")
    setup.append(f"mmap p {DST:#x} {DST_PAGES} rw missing")
    threads = []
    for t in range(rng.choice((2, 2, 3))):
        ops = [_operation(d) for _ in range(rng.choice((1, 1, 2)))]
        threads.append((f"t{t}", ops))
    # Most programs open with two threads meeting on the hot page: a mover and a walker (the rmap's
    # own race), another mover, a pinner, or a fault (a swap-in where the page was paged out).
    opened = rng.random() < 0.7
    if opened:
        k = rng.randrange(DST_PAGES)
        neighbour = hot - PAGE_SIZE if hot == SRC + (SRC_PAGES - 1) * PAGE_SIZE else hot + PAGE_SIZE
        threads[0][1][0] = rng.choices([
            f"walk {d.proc()} {hot:#x} {rng.choice(('trylock', 'blocking'))}",
            f"remap p {DST + (k + 1) % DST_PAGES * PAGE_SIZE:#x} {neighbour:#x} 1",
            f"pin p {hot:#x} 1",
            f"read p {hot:#x}",
        ], weights=(6, 2, 1, 1))[0]
        threads[1][1][0] = f"remap p {DST + k * PAGE_SIZE:#x} {hot:#x} 1"
    _last_draws(rng, d, setup, threads, opened, huge_zero, pte_mapped)
    lines = [f"name: gen-{seed}-{i}", "setup:", *(f"  {s}" for s in setup)]
    for name, ops in threads:
        lines.append(f"thread {name}:")
        lines.extend(f"  {op}" for op in ops)
    return "\n".join(lines) + "\n"


def _last_draws(
    rng: random.Random, d: _Draw, setup: list[str], threads: list[tuple[str, list[str]]], opened: bool,
    huge_zero: bool, pte_mapped: bool,
) -> None:
    """The draws made after the rest (so that they add to a program and change none of its other
    lines): a move of the THP's huge PMD whole, maybe against a pin of one of its pages (or a
    fault on the huge zero page's destination); and a hot page paged out that the first thread
    faults in (and maybe pages out again) while the second moves it and maybe reads it at its
    destination (a swap-in against a move of its swap PTE)."""
    if d.thp and not pte_mapped and rng.random() < (0.8 if huge_zero else 0.4):
        setup.append(f"mmap p {PMD_DST:#x} 512 rw missing")
        mover = threads[-1][1]
        mover.append(f"remap p {PMD_DST:#x} {THP:#x} 512")
        if rng.random() < 0.5:
            threads[0][1].insert(0, f"read p {PMD_DST:#x}" if huge_zero else f"pin p {THP:#x} 1")
    if opened and d.hot < THP and rng.random() < 0.25:
        setup.append(f"madvise p {d.hot:#x} 1 pageout")
        if rng.random() < 0.7:  # its folio reclaimed too: the swap cache holds nothing
            setup.append("reclaim 1")
        threads[0][1][0] = f"read p {d.hot:#x}" if rng.random() < 0.5 else f"write p {d.hot:#x} {0x50}"
        if rng.random() < 0.7:  # paged out again once faulted in: the same slot, a new folio
            threads[0][1].insert(1, f"madvise p {d.hot:#x} 1 pageout")
        if rng.random() < 0.7:  # the mover reads what it moved
            threads[1][1].insert(1, f"read p {threads[1][1][0].split()[2]}")


def _operation(d: _Draw) -> str:
    rng = d.rng
    kinds = ["walk", "walk", "remap", "remap", "fault", "pageout", "reclaim", "fork", "munmap", "mremap", "pin"]
    if d.thp:
        kinds.append("split")
    if d.children and not d.exited:
        kinds.append("exit")
    kind = rng.choice(kinds)
    if kind == "walk":
        return f"walk {d.proc()} {d.page():#x} {rng.choice(('trylock', 'blocking'))}"
    if kind == "remap":
        return f"remap p {DST + rng.randrange(DST_PAGES) * PAGE_SIZE:#x} {d.page():#x} 1"
    if kind == "fault":
        if rng.random() < 0.5:
            return f"read {d.proc()} {d.page():#x}"
        return f"write {d.proc()} {d.page():#x} {rng.randrange(0x100, 0x200)}"
    if kind == "pageout":
        return f"madvise {d.proc()} {d.page():#x} 1 pageout"
    if kind == "reclaim":
        return f"reclaim {rng.choice((2, 4))}"
    if kind == "fork":
        d.forks += 1
        return f"f{d.forks} = fork {d.proc()}"
    if kind == "munmap":
        return f"munmap {d.proc()} {d.page():#x} 1"
    if kind == "mremap":
        return f"mremap p {d.page():#x} 1 {REMAP_TO + rng.randrange(4) * PAGE_SIZE:#x}"
    if kind == "pin":
        return f"pin {d.proc()} {d.page():#x} 1"
    if kind == "split":
        if rng.random() < 0.5:
            return f"madvise p {THP + rng.randrange(1, 4) * PAGE_SIZE:#x} 1 dontneed"
        return f"remap p {DST + rng.randrange(DST_PAGES) * PAGE_SIZE:#x} {THP + rng.randrange(4) * PAGE_SIZE:#x} 1"
    d.exited = True
    return f"exit {rng.choice(d.children)}"


def programs(seed: int, n: int) -> list[Scenario]:
    """Programs 0 .. n-1 of ``seed``, parsed."""
    return [parse(program(seed, i), f"gen-{seed}-{i}.litmus") for i in range(n)]


def shrink(text: str, caught: Callable[[str], bool]) -> str:
    """A smallest variant of ``text``: lines dropped one at a time, thread operations first (a
    thread left with none goes too, while two threads remain), then set-up ones, while ``caught``
    holds for what is left and it still parses. ``caught`` is what the search found, as a
    predicate."""
    lines = text.splitlines()

    def op_lines() -> list[int]:
        thread_ops: list[int] = []
        setup_ops: list[int] = []
        section = ""
        for n, line in enumerate(lines):
            if not line.startswith(" "):
                section = line.split(":", 1)[0]
                continue
            (setup_ops if section == "setup" else thread_ops).append(n)
        return [*reversed(thread_ops), *reversed(setup_ops)]

    def without(n: int) -> list[str]:
        """The lines but ``n``, and but its thread's header when it was the thread's only operation."""
        out = lines[:n] + lines[n + 1:]
        above, below = lines[n - 1], lines[n + 1] if n + 1 < len(lines) else ""
        if above.startswith("thread ") and not below.startswith(" "):
            del out[n - 1]
        return out

    changed = True
    while changed:
        changed = False
        for n in op_lines():
            candidate = without(n)
            text2 = "\n".join(candidate) + "\n"
            try:
                scn = parse(text2, "shrink.litmus")
            except ScenarioError:
                continue
            if any(not ops for _, ops in scn.threads) or len(scn.threads) < 2:
                continue
            if caught(text2):
                lines = candidate
                changed = True
                break
    return "\n".join(lines) + "\n"


@dataclass
class Catch:
    """A generated program a search caught: the program as drawn, the kinds of check that caught
    it, the schedule, and the shrunk program (still caught by one of those kinds)."""

    name: str
    text: str
    kinds: frozenset[str]
    schedule: int
    small: str


def caught_kinds(
    text: str, protocol: str, mutant: str | None, preemptions: int, schedules: int, random_too: bool = True
) -> tuple[frozenset[str], int]:
    """The kinds of check that catch program ``text`` under ``protocol`` (and ``mutant``), and the
    schedule: exhaustively up to ``preemptions`` (at most ``schedules``), then (``random_too``)
    ``schedules`` random ones; empty if clean."""
    from .explore import explore

    scn = parse(text, "generated.litmus")
    for strategy in ("exhaustive", "random") if random_too else ("exhaustive",):
        try:
            s = explore(scn, protocol, mutant, strategy=strategy, schedules=schedules, preemptions=preemptions)
        except ScenarioError:  # a shrunk program whose set-up no longer holds together
            return frozenset(), 0
        if s.first is not None:
            return frozenset(s.first.kinds), s.at
    return frozenset(), 0


def explore_generated(
    seed: int, n: int, protocol: str, mutant: str | None = None, preemptions: int = 2, schedules: int = 300,
    on_program: Callable[[str, frozenset[str]], None] | None = None,
) -> list[Catch]:
    """Draw programs 0 .. n-1 of ``seed`` and search each under ``protocol`` (and ``mutant``); every
    program caught is shrunk to a minimal one that the same search still catches by one of the
    same kinds. ``on_program(name, kinds)`` is told of each program as it is done."""
    catches = []
    for i in range(n):
        text = program(seed, i)
        name = f"gen-{seed}-{i}"
        kinds, at = caught_kinds(text, protocol, mutant, preemptions, schedules)
        if on_program is not None:
            on_program(name, kinds)
        if not kinds:
            continue

        def still(t: str, kinds: frozenset[str] = kinds) -> bool:
            return bool(caught_kinds(t, protocol, mutant, preemptions, schedules)[0] & kinds)

        catches.append(Catch(name, text, kinds, at, shrink(text, still)))
    return catches
