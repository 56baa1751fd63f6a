"""``mmsim explore``: the litmus library, the three search strategies, minimisation, exact replay,
and the traces."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mmsim.server.cli import main
from mmsim.server.tools.explore import (
    Decision,
    explore,
    follow,
    minimize,
    random_strategy,
    run_schedule,
    run_sync,
    token,
    untoken,
)
from mmsim.server.tools.litmus import ScenarioError, load, parse

LITMUS = Path(__file__).parent / "litmus"
SCENARIOS = sorted(LITMUS.glob("*.litmus"))
pytestmark = pytest.mark.violations_expected  # the unsafe protocols are meant to be caught


def test_the_library_holds_the_scenarios_the_protocol_needs() -> None:
    names = {p.stem for p in SCENARIOS}
    assert {"slow-path-race", "fast-path-race", "fork-vs-walk", "exit-vs-blocking-walk", "split-vma-walk",
            "anon-vma-reuse", "moved-twice-reuse", "reclaim-vs-move", "swapin-vs-move",
            "swap-move-then-swapin"} <= names
    for p in SCENARIOS:
        scn = load(p)
        assert scn.name == p.stem and 2 <= len(scn.threads) <= 4


@pytest.mark.parametrize("strategy", ["random", "pct", "exhaustive"])
@pytest.mark.parametrize(("scenario", "protocol"), [("slow-path-race", "no-recheck"),
                                                     ("fast-path-race", "recheck-slow-only")])
def test_each_strategy_finds_the_race_of_each_unsafe_variant(scenario: str, protocol: str, strategy: str) -> None:
    scn = load(LITMUS / f"{scenario}.litmus")
    s = explore(scn, protocol, strategy=strategy, schedules=2000, seed=1)
    assert s.first is not None, f"{strategy} missed the race in {s.schedules} schedules"
    assert any(v.startswith("wrong-root-walk") for v in s.first.violations), s.first.violations
    assert s.schedules >= 1 and len(s.interleavings) >= 1


@pytest.mark.parametrize(("protocol", "caught"), [("recheck", False), ("folio-lock", False),
                                                   ("recheck-slow-only", True), ("no-recheck", True)])
def test_reclaims_unlocked_walker_races_the_move(protocol: str, caught: bool) -> None:
    """The seed's race in reclaim: shrink_active_list's folio_referenced (trylock mode, no folio
    lock) against UFFDIO_MOVE: caught where the fast path does not recheck the mapping."""
    scn = load(LITMUS / "reclaim-vs-move.litmus")
    s = explore(scn, protocol, strategy="exhaustive", preemptions=2)
    assert s.cut == 0
    assert (s.first is not None) == caught, s.first and s.first.violations
    if caught:
        assert s.first is not None and any(v.startswith("wrong-root-walk: task=reclaim") for v in s.first.violations)


def test_the_fast_path_race_needs_the_fast_path_recheck() -> None:
    """The fast-path scenario is clean where both paths recheck; caught where only the slow one does."""
    scn = load(LITMUS / "fast-path-race.litmus")
    assert explore(scn, "recheck", strategy="exhaustive", preemptions=2).first is None
    assert explore(scn, "recheck-slow-only", strategy="exhaustive", preemptions=2).first is not None


def test_a_caught_schedule_is_minimised_and_replays_identically() -> None:
    scn = load(LITMUS / "slow-path-race.litmus")
    s = explore(scn, "no-recheck", strategy="random", schedules=2000, seed=3)
    assert s.first is not None
    small = minimize(scn, "no-recheck", None, s.first)
    assert small.caught and len(small.preemptions) <= len(s.first.preemptions)
    again, protocol, mutant, pre, _ = untoken(token(scn, "no-recheck", None, small.preemptions))
    assert (again.text, protocol, mutant) == (scn.text, "no-recheck", None)
    replayed = run_sync(again, protocol, mutant, follow(pre))
    assert [(e.step, e.thread, e.kind, e.text) for e in replayed.events] == \
        [(e.step, e.thread, e.kind, e.text) for e in small.events]
    assert replayed.violations == small.violations


@pytest.mark.parametrize("protocol", ["recheck", "folio-lock"])
@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_every_scenario_passes_its_bounded_exhaustive_search_under_the_safe_protocols(
    path: Path, protocol: str
) -> None:
    """Zero violations, or exactly the documented finding the scenario declares (known:), found."""
    scn = load(path)
    known = scn.known.get(protocol, frozenset())
    s = explore(scn, protocol, strategy="exhaustive", preemptions=2, schedules=20_000)
    assert s.cut == 0 and s.schedules >= 1
    if not known:
        assert s.first is None, (s.first.violations, s.first.problems)
    else:
        assert s.first is not None and s.first.kinds <= known, s.first and s.first.violations


def test_the_typesafe_reuse_finding_under_recheck() -> None:
    """The documented finding (docs/protocol.md): the pointer recheck passes on an anon_vma freed and
    reused as a root while the walker holds the root it read before the reuse."""
    scn = load(LITMUS / "typesafe-reuse-root-change.litmus")
    s = explore(scn, "recheck", strategy="exhaustive", preemptions=2)
    assert s.first is not None and {"wrong-root-walk", "unlock-mismatch"} <= s.first.kinds
    assert explore(scn, "folio-lock", strategy="exhaustive", preemptions=2).first is None


def test_the_command_prints_the_trace_and_a_replay_command_that_reproduces_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    html = tmp_path / "trace.html"
    status = main(["explore", str(LITMUS / "slow-path-race.litmus"), "--protocol", "no-recheck",
                   "--trace-out", str(html)])
    out = capsys.readouterr().out
    assert status == 1
    assert "wrong-root-walk" in out and "mover" in out and "walker" in out
    replay = next(line.split("--replay", 1)[1].strip() for line in out.splitlines() if "--replay" in line)
    page = html.read_text()
    assert page.startswith("<!doctype html>") and "<th>walker</th>" in page and "wrong-root-walk" in page
    assert main(["explore", "--replay", replay.strip("'")]) == 1
    out2 = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "│" in line]
    rows2 = [line for line in out2.splitlines() if "│" in line]
    assert rows2[1:] == rows[1:]  # the same events in the same order (the title differs)


def test_a_clean_search_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explore", str(LITMUS / "slow-path-race.litmus"), "--protocol", "recheck"]) == 0
    assert "nothing caught" in capsys.readouterr().out


@pytest.mark.parametrize(("text", "why"), [
    ("setup:\n  p = process\nthread a:\n  walk q 0x1000\nthread b:\n  walk p 0x1000\n", "no process 'q'"),
    ("setup:\n  p = process\nthread a:\n  walk p 0x1000\n", "two to 4 threads"),
    ("setup:\n  p = process\nthread a:\n  jump p\nthread b:\n  walk p 0x1000\n", "unknown operation 'jump'"),
    ("setup:\n  p = process\n  mmap p 0x1234 1\nthread a:\n  walk p 0x1000\nthread b:\n  walk p 0x1000\n",
     "page-aligned"),
])
def test_a_bad_scenario_is_one_line_and_status_2(text: str, why: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ScenarioError, match=why):
        parse(text, "bad.litmus")
    f = tmp_path / "bad.litmus"
    f.write_text(text)
    assert main(["explore", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmsim explore: ") and err.count("\n") == 1 and why in err
    assert main(["explore", "--replay", "not-a-token"]) == 2


@pytest.mark.timeout(900)  # the whole mutation score: about 2.5 min alone, much more beside other tests
def test_every_mutant_that_is_not_equivalent_is_killed_by_a_shipped_scenario() -> None:
    from mmsim.server.mm.kernel import MUTANTS
    from mmsim.server.tools.mutate import library, mutation_score

    kills, score = mutation_score(library(LITMUS))
    survivors = [k.mutant for k in kills if not k.equivalent and not k.killed]
    assert survivors == [] and score == 1.0
    for k in kills:
        if not k.equivalent:  # the scenario that kills it is named, and it is one of the library's
            assert (LITMUS / f"{k.scenario}.litmus").exists() and k.protocol in MUTANTS[k.mutant].protocols
    assert {k.mutant for k in kills} == set(MUTANTS)
    assert any(k.equivalent for k in kills)  # the argued-equivalent ones are listed, not scored


def test_the_detectors_fire_on_the_mover_without_the_root_lock() -> None:
    scn = load(LITMUS / "slow-path-race.litmus")
    assert explore(scn, "recheck", strategy="exhaustive").first is None
    s = explore(scn, "recheck", "mover-no-root-lock", strategy="exhaustive")
    assert s.first is not None and any(v.startswith("wrong-root-walk") for v in s.first.violations)


def test_an_unknown_mutant_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explore", str(LITMUS / "slow-path-race.litmus"), "--mutant", "no-such"]) == 2
    assert "unknown mutant 'no-such'" in capsys.readouterr().err


def test_mutate_scores_a_library_and_says_which_mutants_survive(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "fast-path-race.litmus").write_text((LITMUS / "fast-path-race.litmus").read_text())
    assert main(["mutate", "--litmus", str(tmp_path), "--schedules", "50"]) == 1  # one scenario kills too few
    out = " ".join(capsys.readouterr().out.split())
    assert "no-recheck-fast" in out and "survived" in out and "mutation score:" in out
    # The bugs from history, killed or not: the fast path's recheck is killed by this scenario, the
    # swap-cache fix (it needs a swap scenario) survives it.
    history = out.split("bugs from history", 1)[1]
    assert "no-recheck-fast" in history and "fast-path-race" in history and "wrong-root-walk" in history
    assert "move-swap-keeps-mapping" in history and "c50f8e6053b0" in history and "survived" in history
    assert main(["mutate", "--litmus", str(tmp_path / "none")]) == 2


def test_history_mutants_name_their_fix() -> None:
    from mmsim.server.mm.kernel import MUTANTS

    history = {name for name, m in MUTANTS.items() if m.fix}
    assert {"no-recheck-fast", "move-swap-keeps-mapping"} <= history
    assert all(m.fix.split()[0] in (LITMUS.parent.parent / "docs" / "mutants.md").read_text()
               for m in MUTANTS.values() if m.fix)


def _rows(r) -> list[tuple[int, int, str, str]]:
    return [(e.step, e.thread, e.kind, e.text) for e in r.events]


def test_the_trace_shows_rcu_sections_refcounts_and_the_raced_fields() -> None:
    from mmsim.server.tools.explore import random_strategy

    scn = load(LITMUS / "slow-path-race.litmus")
    # a schedule in which the walker sleeps on the old root and retries after the move (slow path)
    r = next(r for r in (run_sync(scn, "recheck", None, random_strategy(i)) for i in range(200))
             if any(e.kind == "result" and "retries 0/1" in e.text for e in r.events))
    walker = [e.text for e in r.events if e.thread == 1 and e.kind == "state"]
    mover = [e.text for e in r.events if e.thread == 0 and e.kind == "state"]
    assert "rcu_read_lock" in walker and "rcu_read_unlock" in walker
    # the slow path's pin on the anon_vma (anon_vma_get) and its release, with the counts
    pins = [t for t in walker if t.startswith("anon_vma1 refcount")]
    counts = [(int(t.split()[-3]), int(t.split()[-1])) for t in pins]
    assert len(counts) == 2 and counts[0][1] == counts[0][0] + 1 and counts[1][1] == counts[1][0] - 1, pins
    assert any(t.startswith("folio_lock_anon_vma_read: reads folio1->mapping = anon_vma1") for t in walker)
    assert any(t.startswith("folio_lock_anon_vma_read: reads anon_vma1->root = anon_vma1") for t in walker)
    assert any(t.startswith("rmap_walk_anon: reads folio1->index") for t in walker)
    # the move's two stores, the mapping before the index
    stores = [t for t in mover if ("folio1->mapping = " in t and "reads" not in t) or ("folio1->index = " in t
              and "reads" not in t)]
    assert [t.split(": ")[1].split(" = ")[0] for t in stores] == ["folio1->mapping", "folio1->index"], stores
    assert not any(t.startswith("_check") for t in walker + mover)  # the detectors' own reads are not shown


def test_the_trace_shows_the_anon_vma_freed_and_reused() -> None:
    scn = load(LITMUS / "typesafe-reuse-root-change.litmus")
    s = explore(scn, "recheck", strategy="exhaustive", preemptions=2)
    assert s.first is not None
    texts = [e.text for e in s.first.events if e.kind == "state"]
    freed = [t for t in texts if t.startswith("anon_vma_free: ")]
    reused = [t for t in texts if t.startswith("anon_vma_alloc: the cache hands out freed ")]
    assert freed and reused, texts


def test_a_run_from_the_setup_snapshot_is_the_run_from_a_fresh_setup() -> None:
    import asyncio

    from mmsim.server.tools.explore import random_strategy, run_schedule, snapshot

    scn = load(LITMUS / "anon-vma-reuse.litmus")
    start = asyncio.run(snapshot(scn, "recheck", None))
    for seed in range(5):
        fresh = asyncio.run(run_schedule(scn, "recheck", None, random_strategy(seed)))
        restored = asyncio.run(run_schedule(scn, "recheck", None, random_strategy(seed), start=start))
        assert _rows(restored) == _rows(fresh)


@pytest.mark.parametrize("strategy", ["random", "pct"])
def test_a_search_over_worker_processes_finds_the_same_schedule(strategy: str) -> None:
    scn = load(LITMUS / "fast-path-race.litmus")
    one = explore(scn, "recheck-slow-only", strategy=strategy, schedules=500, seed=2)
    two = explore(scn, "recheck-slow-only", strategy=strategy, schedules=500, seed=2, jobs=2)
    assert one.first is not None and two.first is not None
    assert two.at == one.at and _rows(two.first) == _rows(one.first)
    clean = explore(scn, "recheck", strategy=strategy, schedules=200, seed=2, jobs=2, stop_on_catch=False)
    assert clean.first is None and clean.schedules == 200 and clean.interleavings


def test_a_thread_that_crashes_is_caught(tmp_path: Path) -> None:
    (tmp_path / "crash.py").write_text(
        "from mmsim.server.mm.steps import Variant\n\n"
        "async def folio_referenced(k, cur, folio, try_lock):\n"
        "    raise RuntimeError('boom')\n\n"
        "CRASH = Variant('crash', 'a walker that raises', {'folio_referenced': folio_referenced})\n"
    )
    scn = load(LITMUS / "slow-path-race.litmus")
    r = run_sync(scn, f"{tmp_path / 'crash.py'}:CRASH", None, follow({0: 1}))  # the walker first
    assert r.caught and any(p.startswith("crash: thread walker raised RuntimeError: boom") for p in r.problems)


def test_the_slow_path_race_is_a_sleep_on_the_old_root() -> None:
    """Under no-recheck the first catch of slow-path-race is the fast-path shape (no-recheck lacks
    both rechecks); the slow path's own race is one preemption away: the walker, picked while
    the mover holds the old root between its PTLs, fails its trylock, pins the anon_vma and sleeps
    on the old root, wakes after the move and walks the old tree. Under recheck the same schedule
    retries once on the slow path."""
    scn = load(LITMUS / "slow-path-race.litmus")
    bad = run_sync(scn, "no-recheck", None, follow({3: 1}))
    walker = [(e.kind, e.text) for e in bad.events if e.thread == 1]
    assert ("point", "sleeps") in walker and ("point", "walk:slow-after-lock") in walker
    assert any(v.startswith("wrong-root-walk") for v in bad.violations), bad.violations
    good = run_sync(scn, "recheck", None, follow({3: 1}))
    assert not good.caught and ("point", "sleeps") in [(e.kind, e.text) for e in good.events if e.thread == 1]
    assert any(e.kind == "result" and "retries 0/1" in e.text for e in good.events)


def test_a_fault_handler_races_a_walk() -> None:
    """gc-fault-vs-walk: the mutator's read faults and sleeps until the collector's UFFDIO_MOVE
    fills the page and wakes it; a walker on the from-space side races the move. Clean under the
    safe protocols (their exhaustive search is in the test above); caught without the recheck."""
    scn = load(LITMUS / "gc-fault-vs-walk.litmus")
    r = run_sync(scn, "recheck", None, follow({}))
    mutator = [(e.kind, e.text) for e in r.events if e.thread == 0]
    assert ("point", "sleeps") in mutator and ("point", "uffd:woken") in mutator
    assert ("result", "read → 7") in mutator and not r.caught
    s = explore(scn, "no-recheck", strategy="exhaustive", preemptions=2)
    assert s.first is not None and any(v.startswith("wrong-root-walk") for v in s.first.violations)


@pytest.mark.parametrize("text, why", [
    ("name: t\nsetup:\n  p = process\nthread a:\n  copy p 0x1000 1\nthread b:\n  walk p 0x1000\n", "copy takes 4"),
    ("name: t\nsetup:\n  p = process\nthread a:\n  mprotect p 0x1000 1 rwx\nthread b:\n  walk p 0x1000\n",
     "not one of"),
])
def test_the_handler_operations_parse_strictly(text: str, why: str) -> None:
    with pytest.raises(ScenarioError, match=why):
        parse(text)


#: A walker that returns holding its folio's anon_vma root rwsem for read: a writer of that root
#: (exit's unlink_anon_vmas, in an uninterruptible step; fork's anon_vma_fork) then sleeps forever.
LEAK = (
    "from mmsim.server.mm.rmap import folio_referenced as default\n"
    "from mmsim.server.mm.steps import Variant\n\n"
    "async def folio_referenced(k, cur, folio, try_lock):\n"
    "    rwc = await default(k, cur, folio, try_lock)\n"
    "    if folio.mapping is not None and not folio.mapping.root.rwsem.down_read(cur):\n"
    "        await folio.mapping.root.rwsem.wait(cur)\n"
    "    return rwc\n\n"
    "LEAK = Variant('leak-root', 'a walker that returns holding the root rwsem', "
    "{'folio_referenced': folio_referenced})\n"
)


@pytest.mark.timeout(60)
async def test_a_schedule_where_every_thread_sleeps_is_a_deadlock_not_a_hang(tmp_path: Path) -> None:
    (tmp_path / "leak.py").write_text(LEAK)
    scn = load(LITMUS / "exit-vs-blocking-walk.litmus")
    # Both walkers return holding the root; the exiter then sleeps on it inside its teardown.
    r = await asyncio.wait_for(run_schedule(scn, f"{tmp_path / 'leak.py'}:LEAK", None, random_strategy(0)), 20)
    assert r.kinds == {"deadlock"}, (r.violations, r.problems)
    assert r.violations == ["deadlock: asleep=exiter sleeps on anon_vma1.rwsem held by walker (ended holding it), "
                            "parent_walker (ended holding it)"]
    assert any(e.kind == "finding" and e.text.startswith("deadlock:") for e in r.events)
    assert asyncio.all_tasks() == {asyncio.current_task()}  # every thread, and its teardown's task, ended


@pytest.mark.timeout(120)
def test_all_collects_every_kind_over_the_search_and_a_deadlock_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "leak.py").write_text(LEAK)
    variant = f"{tmp_path / 'leak.py'}:LEAK"
    scn = load(LITMUS / "exit-vs-blocking-walk.litmus")
    s = explore(scn, variant, strategy="random", schedules=200, stop_on_catch=False)
    assert s.first is not None and s.first.kinds == {"deadlock"}
    assert set(s.kinds) == {"deadlock", "invariant"} and sum(s.kinds.values()) == s.schedules
    status = main(["explore", str(LITMUS / "exit-vs-blocking-walk.litmus"), "--variant", variant,
                   "--strategy", "random", "--schedules", "200", "--all"])
    out = " ".join(capsys.readouterr().out.split())  # the console may wrap long lines
    assert status == 1
    assert (f"caught over the whole search (2 kinds): deadlock in {s.kinds['deadlock']} schedules, "
            f"invariant in {s.kinds['invariant']} schedules") in out
    assert "violation deadlock: asleep=exiter sleeps on anon_vma1.rwsem held by walker" in out


@pytest.mark.parametrize(("scenario", "protocol", "status"), [
    ("typesafe-reuse-root-change", "recheck", 3),  # its known: line under recheck
    ("fast-path-race", "recheck-slow-only", 1),
    ("fast-path-race", "recheck", 0),
])
def test_the_exit_status_tells_a_known_finding_from_a_violation(
    scenario: str, protocol: str, status: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["explore", str(LITMUS / f"{scenario}.litmus"), "--protocol", protocol]) == status
    out = capsys.readouterr().out
    if status:
        replay = next(line.split("--replay", 1)[1].strip() for line in out.splitlines() if "--replay" in line)
        assert main(["explore", "--replay", replay.strip("'")]) == status
    assert ("a known finding of this scenario" in out) == (status == 3)


def test_a_set_up_that_maps_the_zero_pages_keeps_them_through_the_snapshot() -> None:
    """The explorer pickles the set-up once and starts every schedule from it: the zero page and the
    huge zero folio must come back as the singletons, or every schedule's audit would find a
    stranger mapped read-only."""
    scn = parse("\n".join([
        "name: zero-pages", "setup:", "  p = process", "  mmap p 0x100000 2", "  read p 0x100000",
        "  mmap p 0x200000 512", "  madvise p 0x200000 512 hugepage", "  read p 0x200000",
        "  mmap p 0x600000 2 rw missing", "thread a:", "  remap p 0x600000 0x100000 1",
        "thread b:", "  read p 0x201000", "",
    ]), "zero-pages.litmus")
    s = explore(scn, "recheck", strategy="exhaustive", schedules=200)
    assert s.schedules > 1 and s.first is None


@pytest.mark.parametrize("fine", [False, True])
def test_a_strategy_that_fails_mid_run_is_an_error_not_a_hang(fine: bool) -> None:
    """A pick that raises (a search's own bug) ends the run with that error, the threads let run
    out, instead of leaving every thread parked with nobody to decide."""
    scn = load(LITMUS / "slow-path-race.litmus")

    def choose(d: Decision) -> int:
        if d.step == 5:
            raise KeyError("the strategy's bug")
        return d.default

    with pytest.raises(RuntimeError, match="strategy failed at step 5") as info:
        run_sync(scn, "recheck", None, choose, fine)
    assert isinstance(info.value.__cause__, KeyError)


@pytest.mark.parametrize("fine", [False, True])
def test_a_run_past_the_step_limit_runs_out_unsupervised(fine: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_STEPS the controller stops deciding: the thread that parked at the limit goes on
    at once, the others are let go, and the run ends cut, audited, with every operation's result."""
    import mmsim.server.tools.explore as ex

    monkeypatch.setattr(ex, "MAX_STEPS", 5)
    scn = load(LITMUS / "slow-path-race.litmus")
    r = run_sync(scn, "recheck", None, random_strategy(1), fine)
    assert r.cut and not r.problems
    assert sum(e.kind == "result" for e in r.events) == sum(len(ops) for _, ops in scn.threads)
