"""``mmsim explore --strategy dpor``: source-DPOR with sleep sets, held against brute force."""

from __future__ import annotations

import asyncio
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
    and refcount."""
    procs = []
    for pid, mm in sorted(m.processes.items()):
        vmas = tuple((v.start, v.end, v.anon_vma.id if v.anon_vma else 0) for v in mm.mm_mt.values())
        ptes: list[tuple[Any, ...]] = []
        for pt in mm.pgtables.values():
            for vpn, pte in sorted(pt.ptes.items()):
                f = pte.folio
                mapping = getattr(f, "mapping", None)
                ptes.append((vpn, f.id, pte.page, pte.write, mapping.id if mapping else 0,
                             mapping.root.id if mapping else 0, f.index, f.mapcount, f.refcount))
            for vpn, swp in sorted(pt.swap.items()):
                ptes.append((vpn, "swap", swp.entry.offset, swp.exclusive))
        huge = tuple((i, hp.folio.id, hp.write, hp.folio.index) for i, hp in sorted(mm.huge_pmds.items()))
        procs.append((pid, vmas, tuple(ptes), huge))
    anon = tuple(sorted((a.id, a.root.id, a.refcount) for a in m.k.anon_vma_cache.live))
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


@pytest.mark.parametrize("text", [TWO_WRITERS, MOVE_VS_WALK], ids=["two-writers", "move-vs-walk"])
def test_dpor_finds_what_brute_force_finds(text: str) -> None:
    scn = parse(text, "t.litmus")
    full, full_states, full_caught = _search(scn, "recheck", full=True)
    dpor, dpor_states, dpor_caught = _search(scn, "recheck", full=False)
    assert full.complete and dpor.complete
    assert dpor_states == full_states
    assert dpor_caught == full_caught
    assert dpor.traces <= full.traces


@pytest.mark.parametrize("name", ["pin-vs-pmd-move", "pmd-move-vs-fork", "swap-move-then-swapin"])
def test_library_scenario_against_brute_force(name: str) -> None:
    scn = load(f"tests/litmus/{name}.litmus")
    full, full_states, full_caught = _search(scn, "recheck", full=True)
    dpor, dpor_states, dpor_caught = _search(scn, "recheck", full=False)
    assert full.complete and dpor.complete
    assert (dpor_states, dpor_caught) == (full_states, full_caught)


@pytest.mark.parametrize("name", ["fast-path-race", "pin-vs-pmd-move", "pmd-move-vs-fork", "swap-move-then-swapin"])
def test_library_scenario_complete_and_clean(name: str) -> None:
    scn = load(f"tests/litmus/{name}.litmus")
    s = ex.explore(scn, "recheck", None, "dpor", 100_000)
    assert s.complete and s.first is None and s.traces > 0 and s.states > 0


def test_watch_leaves_the_classes_as_they_were() -> None:
    from mmsim.server.mm.mm_types import Folio, Mm

    before = (Folio.__dict__["mapping"], Mm.__dict__.get("__getattribute__"))
    scn = parse(TWO_WRITERS, "t.litmus")
    ex.explore(scn, "recheck", None, "dpor", 100_000)
    assert (Folio.__dict__["mapping"], Mm.__dict__.get("__getattribute__")) == before


@pytest.mark.violations_expected
def test_known_finding_is_found_and_the_cli_says_complete(capsys: pytest.CaptureFixture[str]) -> None:
    """typesafe-reuse-root-change's known finding under recheck: DPOR finds it (exit 3) and, with
    --all, reports the search complete."""
    from mmsim.server.cli import main

    rc = main(["explore", "tests/litmus/typesafe-reuse-root-change.litmus", "--strategy", "dpor", "--all"])
    out = capsys.readouterr().out
    assert rc == 3
    assert "complete: " in out and " traces, " in out
