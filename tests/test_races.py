"""Concurrent Remap/Walk/Fork/Exit/write workloads under the seeded scheduler, per protocol.

The safe protocols must show zero violations over 200 seeds, with the retry counters proving the
recheck path ran; the unsafe ones must be caught by the detectors within the same seeds.
"""

import functools
from pathlib import Path

import pytest

from mmsim.server.cli import main
from mmsim.server.tools.race import run_race

SEEDS = range(200)


def sweep(protocol: str) -> list:
    return [run_race(protocol, seed) for seed in SEEDS]


@pytest.mark.parametrize("protocol", ["recheck", "folio-lock"])
def test_safe_protocols_have_no_violations(protocol: str) -> None:
    results = sweep(protocol)
    for r in results:
        assert not r.violations, (r.seed, r.events)
        assert r.problems == [], (r.seed, r.problems)
    assert sum(r.walks for r in results) > 1000
    assert sum(r.moves for r in results) > 1000
    fast = sum(r.fast_retries for r in results)
    slow = sum(r.slow_retries for r in results)
    if protocol == "recheck":
        # The seed's recheck actually fired, in both paths.
        assert fast > 0 and slow > 0
    else:
        # Walkers hold the folio lock: the mover cannot move under them, nothing to retry.
        assert fast == 0 and slow == 0


@pytest.mark.violations_expected
@pytest.mark.parametrize("protocol", ["no-recheck", "recheck-slow-only"])
def test_unsafe_protocols_are_caught(protocol: str) -> None:
    results = sweep(protocol)
    caught = [r for r in results if r.violations]
    assert caught, f"{protocol}: the detectors saw nothing in {len(results)} seeds"
    # What they catch is the seed's race: a walk under a root the folio no longer belongs to.
    assert all(set(r.violations) <= {"wrong-root-walk", "mapping-changed-during-walk"} for r in caught)
    assert any("wrong-root-walk" in r.violations for r in caught)
    # The race corrupts walk results, not the model: the audit stays clean.
    assert all(r.problems == [] for r in results)
    if protocol == "recheck-slow-only":
        # The slow path's recheck still works; the fast path is the hole.
        assert sum(r.slow_retries for r in results) > 0
        assert sum(r.fast_retries for r in results) == 0


@pytest.mark.parametrize("protocol", ["recheck", pytest.param("no-recheck", marks=pytest.mark.violations_expected)])
def test_same_seed_same_interleaving(protocol: str) -> None:
    for seed in (3, 17, 101):
        a, b = run_race(protocol, seed), run_race(protocol, seed)
        assert a.signature == b.signature
        assert a.violations == b.violations
        assert (a.fast_retries, a.slow_retries) == (b.fast_retries, b.slow_retries)
    signatures = {run_race(protocol, seed).signature for seed in range(8)}
    assert len(signatures) > 1


@pytest.mark.violations_expected
def test_mover_without_root_lock_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mover-no-root-lock mutant (kernel.MUTANTS): the folio moves under walkers that hold the
    old root. The walk detectors check what the walker locked against the roots at every visit
    after a preemption point, so the seeded workload catches it too."""
    from mmsim.server.mm.model import MemoryModel
    from mmsim.server.tools import race

    monkeypatch.setattr(race, "MemoryModel", functools.partial(MemoryModel, mutant="mover-no-root-lock"))
    results = [run_race("recheck", seed) for seed in range(50)]
    caught = [r for r in results if r.violations]
    assert caught, "the detectors saw nothing"
    assert all(set(r.violations) <= {"wrong-root-walk", "mapping-changed-during-walk"} for r in caught)
    assert any("mapping-changed-during-walk" in r.violations for r in caught)
    assert all(r.problems == [] for r in results)


@pytest.mark.parametrize("protocol", ["recheck", "folio-lock"])
def test_gc_workload_is_clean_under_the_safe_protocols(protocol: str) -> None:
    """The compacting-GC workload: every mutator read returns its page's value (asserted inside),
    every page comes back by a move each cycle, and nothing fires."""
    results = [run_race(protocol, seed, "gc") for seed in range(20)]
    for r in results:
        assert r.violations == {} and r.problems == [], (r.seed, r.events)
        assert r.moves == 8 * 3, (r.seed, r.moves)  # every page moved back in each of 3 cycles
    assert sum(r.walks for r in results) > 0
    if protocol == "recheck":  # the walkers did meet folios whose mapping changed under them
        assert sum(r.fast_retries + r.slow_retries for r in results) > 0


@pytest.mark.violations_expected
def test_gc_workload_catches_the_unsafe_protocols() -> None:
    caught = [r for r in (run_race("no-recheck", seed, "gc") for seed in range(20)) if r.violations]
    assert caught and all(set(r.violations) <= {"wrong-root-walk", "mapping-changed-during-walk",
                                                 "tree-changed-during-walk", "unlock-mismatch"} for r in caught)


def test_gc_workload_is_deterministic() -> None:
    assert run_race("recheck", 5, "gc").signature == run_race("recheck", 5, "gc").signature


VARIANTS = (
    "from mmsim.server.mm.rmap import folio_referenced as default\n"
    "from mmsim.server.mm.steps import Variant\n\n"
    "async def leaks(k, cur, folio, try_lock):\n"
    "    rwc = await default(k, cur, folio, try_lock)\n"
    "    if not folio.lock.lock(cur):\n"
    "        await folio.lock.wait(cur)\n"
    "    return rwc\n\n"
    "async def raises(k, cur, folio, try_lock):\n"
    "    raise RuntimeError('boom')\n\n"
    "LEAK = Variant('leak-folio', 'a walker that returns holding the folio lock', {'folio_referenced': leaks})\n"
    "CRASH = Variant('crash', 'a walker that raises', {'folio_referenced': raises})\n"
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workload", ["seed", "gc"])
def test_a_seed_where_every_task_sleeps_is_a_deadlock_not_a_hang(tmp_path: Path, workload: str) -> None:
    (tmp_path / "v.py").write_text(VARIANTS)
    r = run_race(f"{tmp_path / 'v.py'}:LEAK", 1, workload)
    assert r.failure.startswith("deadlock: no progress in "), r.failure
    assert "walker 1 sleeps in wait on folio" in r.failure and ".lock held by " in r.failure


@pytest.mark.timeout(120)
@pytest.mark.violations_expected  # the no-recheck rows
def test_a_crash_or_a_hang_keeps_the_table_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "v.py").write_text(VARIANTS)
    status = main(["race", "--seeds", "3", "--protocol", "no-recheck", "--variant", f"{tmp_path / 'v.py'}:CRASH",
                   "--variant", f"{tmp_path / 'v.py'}:LEAK"])
    out = capsys.readouterr().out
    assert status == 1
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 5}
    assert set(rows) == {"no-recheck", "crash", "leak-folio"}
    assert "3 crashed/hung" in rows["crash"] and "3 crashed/hung" in rows["leak-folio"]
    assert "crash seed 0: crash: walker 1 raised RuntimeError: boom" in out
    assert "leak-folio seed 0: deadlock: no progress" in out
    assert main(["race", "--seeds", "3", "--protocol", "recheck"]) == 0
