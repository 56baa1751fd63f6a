"""No call may stall the event loop: every loop whose length a client controls lets other tasks
run at bounded work (sched.RESCHED_WORK), and walks over page tables visit only the tables that
exist. These tests count how often a concurrent task got to run; the figures for a concurrent
Ping's latency are in benchmarks/stall_bench.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest

from mmsim.server.mm import mm_types
from mmsim.server.mm.model import MemoryModel, ResultTooLarge
from mmsim.server.mm.sched import RESCHED_WORK

P = 4096
T = TypeVar("T")


async def ticks_during(call: Awaitable[T]) -> tuple[int, T]:
    """How many times a task that only yields ran while ``call`` was awaited."""
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    start = ticks
    try:
        result = await call
    finally:
        done = True
        await task
    return ticks - start, result


async def many_vmas(m: MemoryModel, n: int) -> int:
    """A process with ``n`` one-page VMAs that cannot merge, each with a page written."""
    pid = await m.create_process()
    for i in range(n):
        await m.mmap(pid, P, addr=0x10000000 + 2 * i * P)
        await m.write(pid, 0x10000000 + 2 * i * P, i)
    return pid


async def test_exit_fork_and_munmap_of_many_vmas_let_others_run() -> None:
    m = MemoryModel()
    n = 6 * RESCHED_WORK
    pid = await many_vmas(m, n)
    ticks, child = await ticks_during(m.fork(pid))
    assert ticks >= n // RESCHED_WORK
    ticks, _ = await ticks_during(m.munmap(child, 0x10000000, 2 * n * P))
    assert ticks >= n // RESCHED_WORK and m.vmas(child) == []
    ticks, _ = await ticks_during(m.exit(pid))
    assert ticks >= n // RESCHED_WORK
    assert m.check_invariants() == []


async def test_top_down_placement_over_many_vmas_lets_others_run() -> None:
    m = MemoryModel()
    pid = await m.create_process()
    # A dense run of VMAs right below mmap_base, each filling the gap above the next.
    base = m.processes[pid].mmap_base
    n = 3 * RESCHED_WORK
    for i in range(n):
        prot = "r" if i % 2 else "rw"  # alternate so that they do not merge
        await m.mmap(pid, P, prot=prot, addr=base - (i + 1) * P)
    ticks, v = await ticks_during(m.mmap(pid, P))
    assert v.end == base - n * P  # below the whole run
    assert ticks >= n // RESCHED_WORK


async def test_sparse_huge_vmas_visit_only_populated_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """mmap 2^46 and 2^45 bytes, write a page in each, fork 8 times and exit everything: the page
    tables walked are the few that exist, not the 2^25 slots the ranges span."""
    visited: list[int] = []
    original = mm_types.Mm.pgtables_in

    def spy(self: mm_types.Mm, start: int, end: int) -> list[int]:
        found = original(self, start, end)
        visited.append(len(found))
        return found

    monkeypatch.setattr(mm_types.Mm, "pgtables_in", spy)
    m = MemoryModel()
    pid = await m.create_process()
    a = await m.mmap(pid, 1 << 46)
    b = await m.mmap(pid, 1 << 45)
    await m.write(pid, a.start + (1 << 40), 1)
    await m.write(pid, b.start, 2)
    children = [await m.fork(pid) for _ in range(8)]
    for c in [*children, pid]:
        await m.exit(c)
    assert visited and max(visited) <= 2 and sum(visited) <= 2 * 9 * 2
    assert m.check_invariants() == [] and m.k.memcg.usage == 0


async def test_a_walk_over_thousands_of_mappings_lets_others_run() -> None:
    m = MemoryModel()
    pid = await m.create_process()
    v = await m.mmap(pid, P)
    await m.write(pid, v.start, 1)
    n = 3 * RESCHED_WORK
    for _ in range(n):
        await m.fork(pid)
    ticks, w = await ticks_during(m.walk(pid, v.start))
    assert len(w.mappings) == n + 1
    assert ticks >= n // RESCHED_WORK


async def test_the_audit_and_the_inspections_let_others_run() -> None:
    m = MemoryModel()
    n = 4 * RESCHED_WORK
    pid = await many_vmas(m, n)
    ticks, problems = await ticks_during(m.audit())
    assert problems == [] and ticks >= n // RESCHED_WORK

    async def listing() -> list[Any]:
        return [v async for v in m.vmas_iter(pid)]

    ticks, vmas = await ticks_during(listing())
    assert len(vmas) == n and vmas == m.vmas(pid) and ticks >= n // RESCHED_WORK - 1


async def test_the_audit_waits_for_calls_in_progress_and_holds_new_ones() -> None:
    """The audit runs at a quiescent point: a call in progress finishes first, a new call waits
    for the audit to end."""
    m = MemoryModel()
    pid = await m.create_process()
    v = await m.mmap(pid, P)
    await m.write(pid, v.start, 1)
    await m.fork(pid)  # two mappings: the walk pauses between them
    bp = m.k.sched.pause_at("walk:per-vma")
    walk = asyncio.create_task(m.walk(pid, v.start))
    await asyncio.wait_for(bp.wait_reached(), 10)
    audit = asyncio.create_task(m.audit())
    await asyncio.sleep(0)
    write = asyncio.create_task(m.write(pid, v.start, 2))
    for _ in range(10):
        await asyncio.sleep(0)
    assert not audit.done() and not write.done()  # the audit waits for the walk; the write for the audit
    bp.release()
    assert await audit == []
    await walk
    await write
    assert m.folio(pid, v.start).value == 2  # type: ignore[union-attr]
    assert m.check_invariants() == []


async def test_a_tree_dump_stops_once_it_is_known_too_large() -> None:
    m = MemoryModel()
    pid = await m.create_process()
    v = await m.mmap(pid, P)
    await m.write(pid, v.start, 1)
    cur = pid
    for _ in range(60):  # 61 VMAs chained to 1..61 anon_vmas: 1,891 AVCs
        cur = await m.fork(cur)
    assert sum(len(r["vmas"]) for r in m.anon_vma_tree(cur)) == 61 * 62 // 2
    with pytest.raises(ResultTooLarge):
        async for _ in m.anon_vma_tree_iter(cur, max_mappings=1000):
            pytest.fail("a record came before the size was known")
    records = [r async for r in m.anon_vma_tree_iter(cur, max_mappings=61 * 62 // 2)]
    assert records == m.anon_vma_tree(cur)
