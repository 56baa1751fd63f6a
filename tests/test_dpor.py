"""``mmsim explore --strategy dpor``: source-DPOR with sleep sets, held against brute force."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from mmsim.server.cli import main
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
                ptes.append((vpn, "swap", swp.slot.offset, swp.exclusive))
        huge = tuple((i, label(hp.folio), hp.write, hp.folio.index) for i, hp in sorted(mm.huge_pmds.items()))
        procs.append((pid, vmas, tuple(ptes), huge))
    anon = tuple(sorted((labels.get(id(a), -1), labels.get(id(a.root), -1), a.refcount)
                        for a in m.k.anon_vma_cache.live))
    return tuple(procs), anon


def _results(r: ex.RunResult) -> tuple[str, ...]:
    """What each thread's operations returned (in no order: two traces of one run differ in it)."""
    return tuple(sorted(f"{e.thread}: {e.text}" for e in r.events if e.kind == "result"))


def _search(scn: Any, protocol: str, full: bool, mutant: str | None = None,
            fine: bool = False, handoffs: bool = True) -> tuple[ex.Search, set[Any], set[str]]:
    states: set[Any] = set()
    caught: set[str] = set()

    def on_run(r: ex.RunResult, m: MemoryModel | None, blocked: bool) -> None:
        assert m is not None
        if not blocked:  # a sleep-set blocked run's end is another trace's: DPOR must not need it
            states.add((final_state(m), _results(r)))
            caught.update(r.violations + r.findings + r.problems)

    async def go() -> ex.Search:
        s = ex.Search("dpor")
        start = await ex.snapshot(scn, protocol, mutant)
        await ex._explore_dpor(s, scn, protocol, mutant, start, 1_000_000, False, full=full, on_run=on_run,
                               fine=fine, handoffs=handoffs)
        return s

    s = asyncio.run(go())
    return s, states, caught


def _sample(scn: Any, seeds: int) -> tuple[set[Any], set[str]]:
    """Seeded random schedules of ``scn`` at the hardware's granularity: the final states and
    results they end in, and what they catch."""
    sampled: set[Any] = set()
    caught: set[str] = set()

    async def sample() -> None:
        start = await ex.snapshot(scn, "recheck", None)
        for seed in range(seeds):
            models: list[MemoryModel] = []
            r = await ex.run_schedule(scn, "recheck", None, ex.random_strategy(seed), start=start, trace=False,
                                      fine=True, on_model=models.append)
            sampled.add((final_state(models[0]), _results(r)))
            caught.update(r.violations + r.findings + r.problems)

    asyncio.run(sample())
    return sampled, caught


#: A write faulting through the VMA cache while a munmap takes the whole VMA away: the write
#: succeeds or fails with EFAULT, as the munmap comes after or before its lookup (the search leaves
#: the cache unwatched and reads the VMA and its tree entry on a hit).
UNMAP_VS_WRITE = """\
name: unmap-vs-write
setup:
  p = process
  mmap p 0x100000 2
  write p 0x100000 1
thread a:
  write p 0x101000 2
thread b:
  munmap p 0x100000 2
"""


#: A walk against a MADV_DONTNEED of its page: the walker's reference (taken and put back) and the
#: zap's put of the mapping's are adds to one count that the last of them takes to zero, so that
#: they do not commute (the walk finds the page, or not, and the last put frees it).
WALK_VS_DONTNEED = """\
name: walk-vs-dontneed
setup:
  p = process
  mmap p 0x100000 1
  write p 0x100000 1
thread a:
  walk p 0x100000 trylock
thread b:
  madvise p 0x100000 1 dontneed
"""

#: Two walkers of one page: their references to the folio (and to nothing else they write) are
#: adds that commute.
TWO_WALKERS = WALK_VS_DONTNEED.replace("madvise p 0x100000 1 dontneed", "walk p 0x100000 trylock")


@pytest.mark.parametrize("text,fine", [(TWO_WRITERS, False), (TWO_WRITERS_APART, False), (MOVE_VS_WALK, False),
                                       (TWO_WRITERS_APART, True), (UNMAP_VS_WRITE, True), (WALK_VS_DONTNEED, True)],
                         ids=["two-writers", "two-writers-apart", "move-vs-walk", "two-writers-apart-every-access",
                              "unmap-vs-write-every-access", "walk-vs-dontneed-every-access"])
def test_dpor_finds_what_brute_force_finds(text: str, fine: bool) -> None:
    scn = parse(text, "t.litmus")
    full, full_states, full_caught = _search(scn, "recheck", full=True, fine=fine)
    dpor, dpor_states, dpor_caught = _search(scn, "recheck", full=False, fine=fine)
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
    """At the named points (every schedule of these is a few hundred runs)."""
    scn = load(f"tests/litmus/{name}.litmus")
    full, full_states, full_caught = _search(scn, "recheck", full=True, fine=False)
    dpor, dpor_states, dpor_caught = _search(scn, "recheck", full=False, fine=False)
    assert full.complete and dpor.complete
    assert (dpor_states, dpor_caught) == (full_states, full_caught)


@pytest.mark.parametrize("name", ["huge-zero-move"])
def test_library_scenario_against_brute_force_at_every_access(name: str) -> None:
    """At the hardware's granularity, where every schedule is still few enough to run them all
    (2,600 runs against 8 traces)."""
    scn = load(f"tests/litmus/{name}.litmus")
    full, full_states, full_caught = _search(scn, "recheck", full=True, fine=True)
    dpor, dpor_states, dpor_caught = _search(scn, "recheck", full=False, fine=True)
    assert full.complete and dpor.complete and dpor.traces < full.traces
    assert (dpor_states, dpor_caught) == (full_states, full_caught)


@pytest.mark.parametrize("name", ["pin-vs-move", "pageout-vs-fork", "fork-vs-walk"])
def test_random_schedules_end_where_dpor_ends_at_every_access(name: str) -> None:
    """Where every schedule is too many to run, a sample: seeded random schedules at the
    hardware's granularity end in final states, results and findings the complete DPOR search
    found too. These scenarios exercise what the search does not watch as plain fields: a small
    folio's pinned test (its refcount against the bias), fork's new processes, ledgers and
    anon_vmas (the typesafe cache's live set), the VMA cache."""
    scn = load(f"tests/litmus/{name}.litmus")
    dpor, dpor_states, dpor_caught = _search(scn, "recheck", full=False, fine=True)
    assert dpor.complete
    sampled, caught = _sample(scn, 150)
    assert caught <= dpor_caught
    assert sampled <= dpor_states


LIBRARY = sorted(p.stem for p in (Path(__file__).parent / "litmus").glob("*.litmus"))
#: Library scenarios whose complete search at the hardware's granularity takes seconds (the
#: others, and their figures, are in BENCHMARKS.md "DPOR").
FINE_QUICK = ["dontneed-vs-move", "double-swapout-vs-move", "exit-vs-blocking-walk", "fast-path-race", "fork-vs-walk",
              "gc-fault-vs-walk", "huge-zero-move", "moved-twice-reuse", "opposite-moves", "pageout-vs-fork",
              "pin-vs-move", "pin-vs-pmd-move", "pmd-move-vs-fork", "pmd-move-vs-walk", "reclaim-vs-move",
              "slow-path-race", "split-vma-walk", "swap-move-then-swapin", "swapin-vs-move",
              "two-movers-fresh-destination", "typesafe-reuse-root-change"]


def _complete_and_clean(name: str, protocol: str, points: str) -> ex.Search:
    scn = load(f"tests/litmus/{name}.litmus")
    s = ex.explore(scn, protocol, None, "dpor", 100_000, stop_on_catch=False, points=points)
    assert s.complete and s.traces > 0 and s.states > 0 and s.fine == (points == "all")
    assert set(s.kinds) <= scn.known.get(protocol, frozenset()), s.kinds
    return s


@pytest.mark.violations_expected
@pytest.mark.parametrize("protocol", ["recheck", "folio-lock"])
@pytest.mark.parametrize("name", LIBRARY)
def test_library_complete_and_clean(name: str, protocol: str) -> None:
    """Every library scenario's DPOR search at the named points ends (complete), and nothing it
    catches is new: a catch is one of the scenario's known findings under the protocol."""
    _complete_and_clean(name, protocol, "named")


@pytest.mark.violations_expected
@pytest.mark.parametrize("protocol", ["recheck", "folio-lock"])
@pytest.mark.parametrize("name", FINE_QUICK)
def test_library_complete_and_clean_at_every_access(name: str, protocol: str) -> None:
    """The same at the hardware's granularity, where it runs more traces than at the named points."""
    fine = _complete_and_clean(name, protocol, "all")
    named = ex.explore(load(f"tests/litmus/{name}.litmus"), protocol, None, "dpor", 100_000, stop_on_catch=False,
                       points="named")
    assert fine.traces >= named.traces


def test_watch_leaves_the_classes_as_they_were() -> None:
    from sortedcontainers import SortedDict

    from mmsim.server.mm.ledger import PageLedger
    from mmsim.server.mm.locks import RwSem
    from mmsim.server.mm.mm_types import Folio, KeyedBytes, KeyedDict, Mm
    from mmsim.server.mm.rcu import Rcu

    def classes() -> tuple[Any, ...]:
        return (Folio.__dict__["mapping"], Mm.__dict__.get("__getattribute__"), dict(SortedDict.__dict__),
                Rcu.__dict__["read_lock"], PageLedger.__dict__["__setitem__"], RwSem.__dict__["is_locked"],
                dict(KeyedDict.__dict__), dict(KeyedBytes.__dict__))

    before = classes()
    scn = parse(TWO_WRITERS, "t.litmus")
    ex.explore(scn, "recheck", None, "dpor", 100_000)
    assert classes() == before


@pytest.mark.violations_expected
def test_known_finding_is_found_and_the_cli_says_complete(capsys: pytest.CaptureFixture[str]) -> None:
    """typesafe-reuse-root-change's known finding under recheck: DPOR finds it (exit 3) and, with
    --all, reports the search complete."""
    rc = main(["explore", "tests/litmus/typesafe-reuse-root-change.litmus", "--strategy", "dpor", "--all",
               "--points", "named"])
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
    """Each non-equivalent mutant is caught by DPOR on its scenario, at the hardware's granularity,
    where DPOR proves the scenario clean without the mutant at the named points
    (test_library_complete_and_clean) and, for the quick ones, at every access too. The slowest
    to catch (BENCHMARKS.md "DPOR"): move-large-folio-lock-sleeps, 134 runs of
    large-folio-two-movers; walker-root-read-outside-rcu, 698 runs of moved-twice-reuse."""
    assert mutant in MUTANT_SCENARIOS, f"no scenario listed for the mutant {mutant}"
    name, protocol = MUTANT_SCENARIOS[mutant]
    s = ex.explore(load(f"tests/litmus/{name}.litmus"), protocol, mutant, "dpor", 20_000, points="all")
    assert s.first is not None and s.first.caught, f"{mutant} survived {s.schedules} runs of {name}"


@pytest.mark.violations_expected
@pytest.mark.parametrize("mutant,name", [("no-recheck-fast", "fast-path-race"),
                                         ("move-rmap-before-pin-check", "pin-vs-move"),
                                         ("fork-no-root-lock", "fork-vs-walk")])
def test_mutant_findings_against_brute_force(mutant: str, name: str) -> None:
    """Under a mutant, DPOR's runs report exactly the violations every schedule reports."""
    scn = load(f"tests/litmus/{name}.litmus")
    full, full_states, full_caught = _search(scn, "recheck", full=True, mutant=mutant, fine=False)
    dpor, dpor_states, dpor_caught = _search(scn, "recheck", full=False, mutant=mutant, fine=False)
    assert full.complete and dpor.complete and full_caught
    assert (dpor_states, dpor_caught) == (full_states, full_caught)
    assert dpor.traces < full.traces


#: A walker's fast path that makes its mapping recheck before the trylock instead of after it: a
#: check-then-act window with no named point inside (the check's READ_ONCE, then the trylock). A
#: mover that runs in that window moves the page and lets the old root go before the trylock
#: takes it. The named points never open the window; the hardware's granularity does.
EARLY_RECHECK = '''
from mmsim.server.mm.rmap import folio_lock_anon_vma_read as kernels
from mmsim.server.mm.steps import Variant
from mmsim.server.mm.trace import READ_ONCE


async def early_recheck(k, cur, folio, rwc):
    sched, rcu = k.sched, k.rcu
    while True:
        rcu.read_lock(cur)
        anon_vma = READ_ONCE(k, "early_recheck", folio, "mapping")
        if anon_vma is None or not folio.mapcount:
            rcu.read_unlock(cur)
            return None
        if sched.active: await sched.point("walk:after-mapping-read")
        root = READ_ONCE(k, "early_recheck", anon_vma, "root")
        if sched.active: await sched.point("walk:after-root-read")
        if READ_ONCE(k, "early_recheck", folio, "mapping") is not anon_vma:  # the recheck, too early
            rcu.read_unlock(cur)
            continue
        if root.rwsem.down_read_trylock(cur):
            if sched.active: await sched.point("walk:after-trylock")
            rwc.locked = root
            rcu.read_unlock(cur)
            return anon_vma
        rcu.read_unlock(cur)
        if rwc.try_lock:
            rwc.contended = True
            return None
        return await kernels(k, cur, folio, rwc)  # contended, and it may sleep: the kernel's path


EARLY = Variant("early-recheck", "the fast path's recheck before its trylock",
                {"folio_lock_anon_vma_read": early_recheck})
'''


@pytest.mark.violations_expected
def test_a_window_inside_a_step_is_found_at_the_hardware_granularity(tmp_path: Path) -> None:
    """Every marked access and lock operation is a point under dpor: the early recheck's window is
    found there, and the replay token runs the same schedule again; the bounded search over the
    named points alone never opens it, at any preemption bound it finishes."""
    (tmp_path / "early.py").write_text(EARLY_RECHECK)
    protocol = f"{tmp_path / 'early.py'}:EARLY"
    scn = load("tests/litmus/fast-path-race.litmus")
    named = ex.explore(scn, protocol, None, "exhaustive", 100_000, preemptions=4, stop_on_catch=False)
    assert named.first is None and named.schedules > 10
    s = ex.explore(scn, protocol, None, "dpor", 100_000)
    assert s.first is not None and s.first.fine and s.first.kinds == {"wrong-root-walk"}
    # The mover stored the new mapping between the walker's recheck and its trylock.
    ev = [(e.thread, e.text) for e in s.first.events]
    check = max(i for i, (t, x) in enumerate(ev) if t == 1 and x.startswith("early_recheck: reads folio1->mapping"))
    trylock = next(i for i, (t, x) in enumerate(ev) if i > check and t == 1 and x.startswith("down_read_trylock"))
    assert any(t == 0 and x.startswith("folio_move_anon_rmap: folio1->mapping = ") for t, x in ev[check:trylock])
    small = ex.minimize(scn, protocol, None, s.first)
    again, p, mutant, pre, fine = ex.untoken(ex.token(scn, protocol, None, small.preemptions, small.fine))
    assert fine and ex.run_sync(again, p, mutant, ex.follow(pre), fine).kinds == small.kinds
    assert not ex.run_sync(again, p, mutant, ex.follow(pre), False).caught or small.preemptions == []


@pytest.mark.violations_expected
def test_points_all_with_the_other_strategies() -> None:
    """--points all: more decisions in the same run; the bounded search finds the fast-path race
    there too, and its catch replays at that granularity; a random search runs in one process only."""
    scn = load("tests/litmus/fast-path-race.litmus")
    named = ex.run_sync(scn, "recheck", None, ex.follow({}))
    fine = ex.run_sync(scn, "recheck", None, ex.follow({}), True)
    assert fine.fine and not named.fine and len(fine.decisions) > len(named.decisions)
    s = ex.explore(scn, "recheck-slow-only", None, "exhaustive", 2000, preemptions=2, points="all")
    assert s.fine and s.first is not None and s.first.fine
    again = ex.run_sync(scn, "recheck-slow-only", None, ex.follow(dict(s.first.preemptions)), True)
    assert again.kinds == s.first.kinds
    with pytest.raises(ValueError, match="one process"):
        ex.explore(scn, "recheck", None, "random", 10, jobs=2, points="all")
    with pytest.raises(ValueError, match="points must be"):
        ex.explore(scn, "recheck", None, "dpor", 10, points="some")


def test_time_limit_stops_the_search_not_complete(capsys: pytest.CaptureFixture[str]) -> None:
    """``--time-limit``: a search that would run for minutes stops starting runs and says why; it
    is not complete. With --jobs it is refused (one process only)."""
    scn = load("tests/litmus/split-vma-walk.litmus")
    s = ex.explore(scn, "recheck", None, "dpor", 1_000_000, stop_on_catch=False, time_limit=1)
    assert s.timed_out and not s.complete and 0 < s.traces < 1_000_000
    assert main(["explore", "tests/litmus/split-vma-walk.litmus", "--strategy", "dpor", "--time-limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "stopped:" in out and "(--time-limit 1)" in out and "complete:" not in out
    assert main(["explore", "tests/litmus/split-vma-walk.litmus", "--strategy", "random", "--jobs", "2",
                 "--time-limit", "1"]) == 2


def _adder(thread: int, *deltas: int, before: int, raw: bool = False) -> ex._Step:
    """A step of ``thread`` that adds ``deltas`` to the counter C, found at ``before`` (or that
    reads it plainly, with ``raw``)."""
    st = ex._Step(thread)
    st.reads.add("C")
    if raw:
        return st
    total, lo, hi = 0, 0, 0
    for d in deltas:
        total += d
        lo, hi = min(lo, total), max(hi, total)
    st.adds["C"] = [before, total, lo, hi]
    if total:
        st.writes.add("C")
    return st


def _free(*steps: ex._Step) -> list[bool]:
    ex._commuting_adds(list(steps))
    return ["C" in st.free for st in steps]


def test_adds_commute_only_where_no_order_reaches_zero_or_the_bias() -> None:
    """Two threads' atomic adds to one counter commute while every order that keeps each thread's
    own order stays above zero and on one side of GUP_PIN_COUNTING_BIAS; a plain read of the
    count ends a segment (every add depends on it)."""
    bias = ex.GUP_PIN_COUNTING_BIAS
    # A walker's get and put against a fork's get, from 1: the put never finds zero.
    get, put, dup = _adder(0, 1, before=1), _adder(0, -1, before=3), _adder(1, 1, before=2)
    assert _free(get, dup, put) == [True, True, True]
    assert not ex._dependent(get, dup, adds=True) and ex._dependent(get, dup)
    # The same against a zap's put: the zap first and the walker's put would free it.
    get, zap, put = _adder(0, 1, before=1), _adder(1, -1, before=2), _adder(0, -1, before=1)
    assert _free(get, zap, put) == [False, False, False]
    assert ex._dependent(get, zap, adds=True)
    # A get and put within one step, against another: its count never goes below where it was.
    both, other = _adder(0, 1, -1, before=1), _adder(1, 1, -1, before=1)
    assert _free(both, other) == [True, True]
    # A pin across the bias against a get: the pinned test would read the order.
    pin, get = _adder(0, bias, before=1), _adder(1, 1, before=bias + 1)
    assert _free(pin, get) == [False, False]
    # Adds above the bias commute (the count stays pinned).
    a, b = _adder(0, 1, before=bias + 1), _adder(1, -1, before=bias + 2)
    assert _free(a, b) == [True, True]
    # A plain read between them: two segments of one add each, ordered through the read.
    a, read, b = _adder(0, 1, before=1), _adder(2, before=2, raw=True), _adder(1, 1, before=2)
    assert _free(a, read, b) == [False, False, False]
    assert ex._dependent(a, read, adds=True) and ex._dependent(read, b, adds=True)


def test_walkers_references_commute(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two walkers of one page at every access: their gets and puts of the folio commute, so dpor
    runs fewer traces than with every add a dependency, ends in the same states, and seeded random
    schedules end in none it did not find (every schedule is too many to run)."""
    scn = parse(TWO_WALKERS, "t.litmus")
    dpor, states, caught = _search(scn, "recheck", full=False, fine=True)
    monkeypatch.setattr(ex, "_commuting_adds", lambda steps: None)
    strict, strict_states, strict_caught = _search(scn, "recheck", full=False, fine=True)
    monkeypatch.undo()
    assert dpor.complete and strict.complete and dpor.traces < strict.traces
    assert (states, caught) == (strict_states, strict_caught)
    sampled, sampled_caught = _sample(scn, 100)
    assert sampled <= states and sampled_caught <= caught


class _Field:
    """An object whose one field a spin iteration changes and restores."""

    def __init__(self) -> None:
        self.x = 0


def _spin_step(thread: int, obj: _Field, new: int, reads: set[object], writes: set[object]) -> ex._Step:
    """A step of ``thread`` that stored ``new`` in ``obj.x`` (found as it is now)."""
    st = ex._Step(thread)
    st.olds[("o", "x")] = (obj, "x", obj.x)
    obj.x = new
    st.reads, st.writes = set(reads), set(writes)
    return st


def test_a_spin_iteration_of_several_steps_is_futile_when_it_leaves_all_as_it_was() -> None:
    """A retry that takes a reference in one step and puts it back in another (two decisions at
    every access) comes back to its spin point having changed nothing: futile, unless a step of
    another thread that ran in between depended on it. Another thread's futile spin does not
    count: it changed nothing."""
    x = ("o", "x")
    obj = _Field()
    it = ex._Spin("spin:move-retry")
    it.add(_spin_step(0, obj, 1, {x}, {x}), [], False)
    it.add(_spin_step(0, obj, 0, {x}, {x}), [], False)
    assert it.clean and it.unchanged() and it.reads == {x}
    # Left changed: not futile.
    it = ex._Spin("spin:move-retry")
    it.add(_spin_step(0, obj, 1, {x}, {x}), [], False)
    assert not it.unchanged()
    obj.x = 0
    # A reader of the intermediate value in between: not clean.
    it = ex._Spin("spin:move-retry")
    it.add(_spin_step(0, obj, 1, {x}, {x}), [], False)
    reader = ex._Step(1)
    reader.reads.add(x)
    it.other(reader)
    it.add(_spin_step(0, obj, 0, {x}, {x}), [], False)
    assert it.unchanged() and not it.clean
    # A writer of something the iteration reads later: not clean either.
    it = ex._Spin("spin:move-retry")
    it.add(_spin_step(0, obj, 1, {x}, {x}), [], False)
    writer = ex._Step(1)
    writer.writes.add(("o", "y"))
    it.other(writer)
    it.add(_spin_step(0, obj, 0, {x, ("o", "y")}, {x}), [], False)
    assert not it.clean
    # Adds that sum to zero leave the count as it was; a raw store mixed with adds is not judged.
    it = ex._Spin("spin:move-retry")
    get, put = _adder(0, 1, before=1), _adder(0, -1, before=2)
    it.add(get, [], False)
    it.add(put, [], False)
    assert it.clean and it.unchanged()
    it.add(_adder(0, 1, before=1), [], True)
    assert not it.clean


def test_a_container_touched_once_is_not_read_by_every_later_step() -> None:
    """A mover that moves a page, unmaps its source (its anon_vma freed into the type-stable
    cache), maps and faults again (the cache hands the object out), against a blocking walker.
    Both take the cache's free list and locks' waiter queues in passing; a thread parked in
    synchronous code reads them again only while something refers to them. Taken to read every
    container it ever reached, each later step of the mover raced with the walker's put of the
    anon_vma and the search ran 880 traces; now far fewer, and the random schedules end where it
    ends."""
    text = load("tests/litmus/anon-vma-reuse.litmus").text
    scn = parse("\n".join(line for line in text.splitlines() if "trywalker" not in line and "trylock" not in line),
                "t.litmus")
    dpor, dpor_states, dpor_caught = _search(scn, "recheck", full=False, fine=True)
    assert dpor.complete and dpor.traces <= 200
    sampled, caught = _sample(scn, 150)
    assert caught <= dpor_caught
    assert sampled <= dpor_states


class _Holder:
    __slots__ = ("items", "table", "pair")
    items: list[int]
    table: dict[str, list[int]]
    pair: tuple[list[int]]


def test_a_container_a_parked_thread_refers_to_is_read_by_its_next_step() -> None:
    """A thread parked inside synchronous code (a marked access) is on no coroutine's stack that
    the garbage collector shows: _Watch._referred tells by reference counts which containers it
    reached something still refers to (a local, a value on its stack, an iterator, an inner
    container, one a field let go of), so that its next step reads them, and which only the
    model holds, so that it does not."""
    import greenlet

    from mmsim.server.mm import trace as mm_trace

    if not ex._REFCOUNTS:
        pytest.skip("this interpreter's reference counts do not count a frame's stack")
    owner = _Holder()
    owner.items = [1, 2]
    owner.table = {"k": [3]}
    owner.pair = ([4],)
    threads = [ex.Thread(0, "a", []), ex.Thread(1, "b", [])]
    ctl = ex.Controller(threads, lambda d: 0)
    ctl.current = threads[0]  # the running thread, whose steps field() records
    w = ex._Watch(ctl, [owner, owner.items, owner.table, owner.table["k"]], lambda st: None)
    items, table, boxed = id(owner.items), id(owner.table), id(owner.pair[0])

    def held() -> set[int]:
        return w._referred(w.reached[0])

    def iterates() -> None:
        for _ in owner.items:
            caller.switch()

    def on_its_stack() -> None:
        owner.items.append(caller.switch())

    def in_a_local() -> None:
        inner = owner.table["k"]
        caller.switch()
        inner.append(5)

    def lets_go() -> None:
        old = owner.items
        owner.items = []
        w.field(owner, "items", True, old, owner.items)  # what the watched slot reports
        caller.switch()
        old.append(6)

    async def go() -> None:  # field() asks for the running task
        for c in (owner.items, owner.table, *owner.pair):
            w._reach(0, c)
        w.loose.add(boxed)
        assert held() == {boxed}  # only the model and the run's records: not held (a tuple's: always)
        for body, want in ((iterates, items), (on_its_stack, items), (in_a_local, table)):
            g = greenlet.greenlet(body)
            g.switch()
            assert held() == {want, boxed}, body.__name__
            while not g.dead:
                g.switch()
            assert held() == {boxed}, body.__name__
        w._reach(1, owner.items)  # another thread's reached entry is the run's own too
        assert held() == {boxed}
        g = greenlet.greenlet(lets_go)
        g.switch()
        assert items in held()  # only the thread refers to it now
        g.switch()
        assert g.dead

    caller = greenlet.getcurrent()
    try:
        asyncio.run(go())
    finally:
        mm_trace.set_field_hook(None)


#: Two moves of different pages between the same two page tables: each takes both PTLs, with
#: marked accesses inside its sections, so that each hands the PTLs on to the other.
TWO_MOVERS = """\
name: two-movers
setup:
  p = process
  mmap p 0x100000 2
  write p 0x100000 1
  write p 0x101000 2
  mmap p 0x300000 2 rw missing
thread a:
  remap p 0x300000 0x100000 1
thread b:
  remap p 0x301000 0x101000 1
"""


def _run(*spec: tuple[int, tuple[Any, ...], tuple[str, ...], tuple[tuple[str, bool], ...]]) -> tuple[
        list[ex._Step | None], list[int]]:
    """A run made by hand: each step's thread, the variables it reads (a tuple: as it is) and
    writes, and its lock operations in order ((lock, True) takes it), recorded as _Watch records
    them: a lock taken and let go within the step is only read, and its owner is written
    otherwise."""
    steps: list[ex._Step | None] = []
    threads = []
    for th, reads, writes, locks in spec:
        st = ex._Step(th)
        st.reads.update(v if isinstance(v, tuple) else (v, "x") for v in reads)
        st.writes.update((v, "x") for v in writes)
        for lock, take in locks:
            key = (lock, "owner")
            st.locks.append((key, take))
            if take:
                st.acq.add(key)
                st.hold.add(key)
            elif key in st.hold:
                st.hold.discard(key)
            else:
                st.rel.add(key)
        for owner in st.acq | st.rel:
            (st.writes if owner in st.hold or owner in st.rel else st.reads).add(owner)
        steps.append(st)
        threads.append(th)
    return steps, threads


def _free_handoffs(*spec: tuple[int, tuple[Any, ...], tuple[str, ...], tuple[tuple[str, bool], ...]],
                   spin: bool = True) -> dict[tuple[str, int], bool]:
    """Each hand-off of the run (its lock and the taking step) -> whether it is free. Its locks
    are spinlocks, or (not ``spin``) mutexes."""
    steps, threads = _run(*spec)
    spinlocks: set[object] = {(lock, "owner") for lock in "ABL"} if spin else set()
    found, _, _ = ex._lock_aware(steps, threads, spinlocks=spinlocks)
    return {(h.key[0], h.taker): h.free for h in found}  # type: ignore[index]


def test_a_spinlock_handed_on_between_sections_that_do_not_conflict_orders_nothing() -> None:
    """Two sections of one spinlock, each with a step inside: free, and the second thread's steps
    do not come after the first's. With a conflict inside the sections, or one that reaches the
    taker through a third thread, or with the taker holding a lock that the first section takes
    (the order of an ABBA deadlock), the hand-off orders."""
    take, drop = (("L", True),), (("L", False),)
    apart = [(0, (), (), take), (0, (), ("x",), ()), (0, (), (), drop),
             (1, (), (), take), (1, (), ("y",), ()), (1, (), (), drop)]
    assert _free_handoffs(*apart) == {("L", 3): True}
    steps, threads = _run(*apart)
    _, pred, _ = ex._lock_aware(steps, threads, spinlocks={("L", "owner")})
    assert pred[5] & 0b111 == 0
    _, classic, _ = ex._lock_aware(steps, threads, handoffs=False)
    assert classic[5] & 0b111 == 0b111
    inside = [*apart[:4], (1, ("x",), (), ()), apart[5]]
    assert _free_handoffs(*inside) == {("L", 3): False}
    third = [*apart[:3], (2, ("x",), ("z",), ()), (1, (), (), take), (1, ("z",), (), ()), (1, (), (), drop)]
    assert _free_handoffs(*third) == {("L", 4): False}
    a, b = ("A", True), ("B", True)
    nested = [(0, (), (), (a,)), (0, (), (), (b,)), (0, (), (), (("B", False), ("A", False))),
              (1, (), (), (a,)), (1, (), (), (b,)), (1, (), (), (("B", False), ("A", False)))]
    assert _free_handoffs(*nested) == {("A", 3): True, ("B", 4): True}
    abba = [*nested[:3], (1, (), (), (b,)), (1, (), (), (a,)), (1, (), (), (("A", False), ("B", False)))]
    assert _free_handoffs(*abba) == {("B", 3): False, ("A", 4): False}


def test_a_failed_trylock_inside_the_section_orders_the_hand_off() -> None:
    """A mutex's sections hand it on freely too, unless the taker's thread read its owner plainly
    while the first section held it (a failed trylock: it went another way there)."""
    take, drop = (("L", True),), (("L", False),)
    apart = [(0, (), (), take), (0, (), ("x",), ()), (0, (), (), drop),
             (1, (), (), take), (1, (), ("y",), ()), (1, (), (), drop)]
    assert _free_handoffs(*apart, spin=False) == {("L", 3): True}
    tried = [*apart[:2], (1, (("L", "owner"),), (), ()), *apart[2:]]
    assert _free_handoffs(*tried, spin=False) == {("L", 4): False}


@pytest.mark.parametrize("name,text", [("two-movers", TWO_MOVERS), ("fast-path-race", None),
                                       ("opposite-moves", None), ("exit-vs-blocking-walk", None),
                                       ("pageout-vs-fork", None)])
def test_lock_aware_dpor_finds_what_every_hand_off_finds(name: str, text: str | None) -> None:
    """At the hardware's granularity, the search with spinlocks handed on freely not ordering
    (_Handoff) ends in exactly the final states, results and findings that the search that
    reverses every hand-off ends in (itself held against brute force above), in fewer traces."""
    scn = parse(text, "t.litmus") if text else load(f"tests/litmus/{name}.litmus")
    every, every_states, every_caught = _search(scn, "recheck", full=False, fine=True, handoffs=False)
    aware, aware_states, aware_caught = _search(scn, "recheck", full=False, fine=True)
    assert every.complete and aware.complete
    assert (aware_states, aware_caught) == (every_states, every_caught)
    assert aware.traces <= every.traces
    if name == "two-movers":  # each hands the other both PTLs and the anon_vma lock: far fewer
        assert aware.traces * 4 < every.traces
