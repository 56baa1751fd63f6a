"""``mmsim explore --strategy dpor``: source-DPOR with sleep sets, held against brute force."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from mmsim.server.mm.model import MemoryModel
from mmsim.server.tools import explore as ex
from mmsim.server.tools.litmus import load, parse

#: Two faults on different pages of one mm.
TWO_WRITERS = """\
name: two-writers
setup:
  p = process
  mmap p 0x100000 4
thread a:
  write p 0x100000 1
thread b:
  write p 0x102000 2
"""

#: Two faults on pages of different page tables whose VMA, anon_vma and tables exist already:
#: nothing they touch is shared but bookkeeping (ids, counters, the LRU), and the mmap_lock and
#: VMA lock they hold for read at once. One Mazurkiewicz trace.
TWO_WRITERS_APART = """\
name: two-writers-apart
setup:
  p = process
  mmap p 0x100000 512
  write p 0x100000 1
  write p 0x200000 2
thread a:
  write p 0x101000 3
thread b:
  write p 0x201000 4
"""

#: A move racing a walk of the page it moves (the fast path's window, without uffd).
MOVE_VS_WALK = """\
name: move-vs-walk
setup:
  p = process
  mmap p 0x100000 1
  madvise p 0x100000 1 dontfork
  write p 0x100000 7
  mmap p 0x300000 1
thread mover:
  remap p 0x300000 0x100000 1
thread walker:
  walk p 0x100000 trylock
"""


def final_state(m: MemoryModel) -> tuple[Any, ...]:
    """A canonical dump of the model once the threads ended: each process's VMAs, PTEs, huge PMDs
    and swap PTEs; each mapped folio's mapping, index, mapcount and refcount; each anon_vma's root
    and refcount. Folios and anon_vmas are numbered in the order the dump meets them, not by id:
    which of two made at once gets the lower id is no difference (the DPOR search takes it as
    none)."""
    labels: dict[int, int] = {}

    def label(obj: Any) -> int:
        if obj is None:
            return 0
        return labels.setdefault(id(obj), len(labels) + 1)

    procs = []
    for pid, mm in sorted(m.processes.items()):
        vmas = tuple((v.start, v.end, label(v.anon_vma)) for v in mm.mm_mt.values())
        ptes: list[tuple[Any, ...]] = []
        for pt in mm.pgtables.values():
            for vpn, pte in sorted(pt.ptes.items()):
                f = pte.folio
                mapping = getattr(f, "mapping", None)
                ptes.append((vpn, label(f), pte.page, pte.write, label(mapping),
                             label(mapping.root) if mapping else 0, f.index, f.mapcount, f.refcount))
            for vpn, swp in sorted(pt.swap.items()):
                ptes.append((vpn, "swap", swp.entry.offset, swp.exclusive))
        huge = tuple((i, label(hp.folio), hp.write, hp.folio.index) for i, hp in sorted(mm.huge_pmds.items()))
        procs.append((pid, vmas, tuple(ptes), huge))
    anon = tuple(sorted((labels.get(id(a), -1), labels.get(id(a.root), -1), a.refcount)
                        for a in m.k.anon_vma_cache.live))
    return tuple(procs), anon


def _search(scn: Any, protocol: str, full: bool, mutant: str | None = None) -> tuple[ex.Search, set[Any], set[str]]:
    states: set[Any] = set()
    caught: set[str] = set()

    def on_run(r: ex.RunResult, m: MemoryModel | None, blocked: bool) -> None:
        assert m is not None
        if not blocked:  # a sleep-set blocked run's end is another trace's: DPOR must not need it
            states.add(final_state(m))
            caught.update(r.violations + r.findings + r.problems)

    async def go() -> ex.Search:
        s = ex.Search("dpor")
        start = await ex.snapshot(scn, protocol, mutant)
        await ex._explore_dpor(s, scn, protocol, mutant, start, 1_000_000, False, full=full, on_run=on_run)
        return s

    s = asyncio.run(go())
    return s, states, caught


@pytest.mark.parametrize("text", [TWO_WRITERS, TWO_WRITERS_APART, MOVE_VS_WALK],
                         ids=["two-writers", "two-writers-apart", "move-vs-walk"])
def test_dpor_finds_what_brute_force_finds(text: str) -> None:
    scn = parse(text, "t.litmus")
    full, full_states, full_caught = _search(scn, "recheck", full=True)
    dpor, dpor_states, dpor_caught = _search(scn, "recheck", full=False)
    assert full.complete and dpor.complete
    assert dpor_states == full_states
    assert dpor_caught == full_caught
    assert dpor.traces <= full.traces


def test_independent_steps_are_one_trace() -> None:
    """Two writers that share only bookkeeping and read-held locks: one trace, where every
    schedule (brute force) is several, and the same final state."""
    scn = parse(TWO_WRITERS_APART, "t.litmus")
    full, full_states, _ = _search(scn, "recheck", full=True)
    dpor, dpor_states, _ = _search(scn, "recheck", full=False)
    assert dpor.complete and dpor.traces == 1 and dpor.blocked == 0
    assert full.traces > 1
    assert dpor_states == full_states and len(full_states) == 1


def test_same_page_table_writers_are_few_traces() -> None:
    """Two writers of different pages of one page table: their PTL sections commute (taken and let
    go within a step), the table's PTEs are one variable: a few traces, not every schedule."""
    scn = parse(TWO_WRITERS_APART.replace("0x201000", "0x102000"), "t.litmus")
    full, _, _ = _search(scn, "recheck", full=True)
    dpor, _, _ = _search(scn, "recheck", full=False)
    assert dpor.complete and dpor.traces < full.traces and dpor.traces <= 4


@pytest.mark.parametrize("name", ["pin-vs-pmd-move", "pmd-move-vs-fork", "swap-move-then-swapin", "fast-path-race",
                                  "fork-vs-walk", "dontneed-vs-move", "swapin-vs-move"])
def test_library_scenario_against_brute_force(name: str) -> None:
    scn = load(f"tests/litmus/{name}.litmus")
    full, full_states, full_caught = _search(scn, "recheck", full=True)
    dpor, dpor_states, dpor_caught = _search(scn, "recheck", full=False)
    assert full.complete and dpor.complete
    assert (dpor_states, dpor_caught) == (full_states, full_caught)


#: Library scenarios whose complete search takes long on two cores (BENCHMARKS.md "DPOR" has them).
SLOW = {("anon-vma-reuse", "recheck"), ("large-folio-two-movers", "folio-lock")}
LIBRARY = sorted(p.stem for p in (Path(__file__).parent / "litmus").glob("*.litmus"))


@pytest.mark.violations_expected
@pytest.mark.parametrize("protocol", ["recheck", "folio-lock"])
@pytest.mark.parametrize("name", LIBRARY)
def test_library_complete_and_clean(name: str, protocol: str) -> None:
    """Every library scenario's DPOR search ends (complete), and nothing it catches is new: a
    catch is one of the scenario's known findings under the protocol."""
    if (name, protocol) in SLOW:
        pytest.skip("a long search: BENCHMARKS.md")
    scn = load(f"tests/litmus/{name}.litmus")
    s = ex.explore(scn, protocol, None, "dpor", 100_000, stop_on_catch=False)
    assert s.complete and s.traces > 0 and s.states > 0
    assert set(s.kinds) <= scn.known.get(protocol, frozenset()), s.kinds


def test_watch_leaves_the_classes_as_they_were() -> None:
    from sortedcontainers import SortedDict

    from mmsim.server.mm.ledger import PageLedger
    from mmsim.server.mm.locks import RwSem
    from mmsim.server.mm.mm_types import Folio, Mm
    from mmsim.server.mm.rcu import Rcu

    def classes() -> tuple[Any, ...]:
        return (Folio.__dict__["mapping"], Mm.__dict__.get("__getattribute__"), dict(SortedDict.__dict__),
                Rcu.__dict__["read_lock"], PageLedger.__dict__["__setitem__"], RwSem.__dict__["is_locked"])

    before = classes()
    scn = parse(TWO_WRITERS, "t.litmus")
    ex.explore(scn, "recheck", None, "dpor", 100_000)
    assert classes() == before


@pytest.mark.violations_expected
def test_known_finding_is_found_and_the_cli_says_complete(capsys: pytest.CaptureFixture[str]) -> None:
    """typesafe-reuse-root-change's known finding under recheck: DPOR finds it (exit 3) and, with
    --all, reports the search complete."""
    from mmsim.server.cli import main

    rc = main(["explore", "tests/litmus/typesafe-reuse-root-change.litmus", "--strategy", "dpor", "--all"])
    out = capsys.readouterr().out
    assert rc == 3
    assert "complete: " in out and " traces, " in out


#: A scenario (and protocol) in which DPOR catches each mutant: the one ``mmsim mutate``'s
#: killers() names, except for the two lifetime mutants of the walker's slow path, which
#: moved-twice-reuse (two threads: the anon_vma freed and reused under a sleeping walker) shows in
#: fewer traces than the three threads of anon-vma-reuse.
MUTANT_SCENARIOS: dict[str, tuple[str, str]] = {
    "no-recheck-fast": ("anon-vma-reuse", "recheck"),
    "no-recheck-slow": ("anon-vma-reuse", "recheck"),
    "mover-no-root-lock": ("anon-vma-reuse", "recheck"),
    "mover-no-folio-lock": ("anon-vma-reuse", "folio-lock"),
    "walker-no-anon-vma-get": ("moved-twice-reuse", "recheck"),
    "walker-root-read-outside-rcu": ("moved-twice-reuse", "recheck"),
    "fork-no-root-lock": ("fork-vs-walk", "recheck"),
    "ptl-no-address-order": ("opposite-moves", "recheck"),
    "move-swap-keeps-mapping": ("double-swapout-vs-move", "recheck"),
    "move-swap-no-has-cache-check": ("double-swapout-vs-move", "recheck"),
    "move-large-folio-lock-sleeps": ("large-folio-two-movers", "recheck"),
    "split-under-rcu": ("large-folio-two-movers", "recheck"),
    "move-rmap-before-pin-check": ("pin-vs-move", "recheck"),
    "move-pmd-rmap-before-pin-check": ("pin-vs-pmd-move", "recheck"),
    "move-huge-zero-as-folio": ("huge-zero-move", "recheck"),
    "move-huge-zero-pmd-from-null": ("huge-zero-move", "recheck"),
    "folio-lock-walker-skips-lock": ("anon-vma-reuse", "folio-lock"),
}


def _scored_mutants() -> list[str]:
    from mmsim.server.mm.kernel import MUTANTS
    from mmsim.server.mm.steps import resolve

    return [name for name in MUTANTS if not resolve(name, "mutant").equivalent]


@pytest.mark.violations_expected
@pytest.mark.parametrize("mutant", _scored_mutants())
def test_dpor_catches_every_mutant(mutant: str) -> None:
    """Each non-equivalent mutant is caught by DPOR on its scenario, which DPOR proves clean
    without the mutant (test_library_complete_and_clean)."""
    assert mutant in MUTANT_SCENARIOS, f"no scenario listed for the mutant {mutant}"
    name, protocol = MUTANT_SCENARIOS[mutant]
    s = ex.explore(load(f"tests/litmus/{name}.litmus"), protocol, mutant, "dpor", 20_000)
    assert s.first is not None and s.first.caught, f"{mutant} survived {s.schedules} runs of {name}"


@pytest.mark.violations_expected
@pytest.mark.parametrize("mutant,name", [("no-recheck-fast", "fast-path-race"),
                                         ("move-rmap-before-pin-check", "pin-vs-move"),
                                         ("fork-no-root-lock", "fork-vs-walk")])
def test_mutant_findings_against_brute_force(mutant: str, name: str) -> None:
    """Under a mutant, DPOR's runs report exactly the violations every schedule reports."""
    scn = load(f"tests/litmus/{name}.litmus")
    full, full_states, full_caught = _search(scn, "recheck", full=True, mutant=mutant)
    dpor, dpor_states, dpor_caught = _search(scn, "recheck", full=False, mutant=mutant)
    assert full.complete and dpor.complete and full_caught
    assert (dpor_states, dpor_caught) == (full_states, full_caught)
    assert dpor.traces < full.traces
