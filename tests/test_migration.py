"""A large folio's split through migration entries (huge_memory.split_folio: unmap_folio,
folio_ref_freeze, remap_page): what meets a page while it is unmapped, and a reference taken
after the split's check, which makes the freeze fail and maps the folio back whole."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from mmsim.server.mm.memory import folio_put
from mmsim.server.mm.mm_types import LargeFolio, is_migration_entry
from mmsim.server.mm.model import PAGE_SIZE, MemoryModel, MmError
from mmsim.server.mm.page_ref import folio_try_get
from mmsim.server.tools import explore as ex
from mmsim.server.tools.litmus import parse

P = PAGE_SIZE
BASE = 0x4000_0000  # 2 MiB-aligned
HPAGE = 512
DST = 0x6000_0000


async def pte_mapped_thp(m: MemoryModel, *values: int) -> tuple[int, LargeFolio]:
    """A process with a THP at BASE mapped by PTEs (its last page zapped), pages 0.. written with
    ``values``, and one page at DST registered for missing faults (a move's destination)."""
    pid = await m.create_process()
    await m.mmap(pid, HPAGE * P, addr=BASE)
    await m.madvise(pid, BASE, HPAGE * P, "hugepage")
    for i, v in enumerate(values):
        await m.write(pid, BASE + i * P, v)
    await m.madvise(pid, BASE + (HPAGE - 1) * P, P, "dontneed")
    await m.mmap(pid, P, addr=DST)
    await m.uffd_register(pid, DST, P, "missing")
    pte = m.processes[pid].pte_lookup(BASE)
    assert pte is not None and isinstance(pte.folio, LargeFolio)
    return pid, pte.folio


async def until(cond: Callable[[], Any], turns: int = 100) -> None:
    """Let the other tasks run until ``cond()`` holds (each turn a pass of the event loop)."""
    for _ in range(turns):
        if cond():
            return
        await asyncio.sleep(0)
    assert cond()


def migration_entries(m: MemoryModel) -> int:
    return sum(is_migration_entry(swp.entry) for mm in m.processes.values()
               for pt in mm.pgtables.values() for swp in pt.swap.values())


async def test_a_fault_on_a_page_being_split_waits_and_a_cancelled_split_still_ends() -> None:
    """A move of one page out of a PTE-mapped THP splits it; while every mapping is a migration
    entry (pagemap: PM_SWAP), a write to another of its pages sleeps on the folio lock's bit. The move
    is cancelled there: the split runs to its end all the same, the write then finds the page's
    new folio, and nothing is left unmapped."""
    m = MemoryModel()
    pid, folio = await pte_mapped_thp(m, 5, 6)
    bp = m.k.sched.pause_at("split:unmapped")
    mover = asyncio.create_task(m.move(pid, DST, BASE + P, P))
    await bp.wait_reached()
    assert migration_entries(m) == HPAGE - 1 and folio.mapcount == 0
    [entry] = m.pagemap(pid, BASE + 2 * P, P)
    assert entry.swap and not entry.present
    writer = asyncio.create_task(m.write(pid, BASE + 2 * P, 9))
    lock = folio.lock
    assert lock is not None
    await until(lambda: lock.waiters)  # the write fault waits in migration_entry_wait
    # on the lock's bit, to take nothing (migration_entry_wait_on_locked)
    assert [w.write for w in lock.waiters or ()] == [None]
    mover.cancel()
    bp.release()
    await writer
    with pytest.raises(asyncio.CancelledError):
        await mover
    assert m.k.stats["migration_entry_wait"] == 1 and m.k.stats["thp_split_page"] == 1
    assert migration_entries(m) == 0 and folio.freed
    for i, v in ((0, 5), (1, 6), (2, 9)):
        info = m.folio(pid, BASE + i * P)
        assert info is not None and info.order == 0 and info.value == v, i
    assert m.folio(pid, DST) is None  # cancelled before the page moved
    assert m.check_invariants() == []
    assert await m.move(pid, DST, BASE + P, P) == P
    assert await m.read(pid, DST) == 6 and m.check_invariants() == []


async def test_a_reference_taken_after_the_check_makes_the_freeze_fail() -> None:
    """A speculative reference taken while the folio is unmapped (GUP-fast, or a PFN walker,
    that read the PTE before the split replaced it) is one the split's check did not see: the
    freeze fails, every migration entry becomes a mapping of the folio again, and the move
    fails with EBUSY (one attempt, as 6.18). With the reference put back, the next move splits."""
    m = MemoryModel()
    pid, folio = await pte_mapped_thp(m, 5, 6)
    mapcount, refcount = folio.mapcount, folio.refcount
    bp = m.k.sched.pause_at("split:unmapped")
    mover = asyncio.create_task(m.move(pid, DST, BASE + P, P))
    await bp.wait_reached()
    assert folio_try_get(m.k, folio)  # not frozen yet
    bp.release()
    with pytest.raises(MmError) as e:
        await mover
    assert e.value.errno == 16  # EBUSY
    assert m.k.stats["thp_split_page_failed"] == 1 and m.k.stats["thp_split_page"] == 0
    assert migration_entries(m) == 0 and not folio.freed
    assert folio.mapcount == mapcount and folio.refcount == refcount + 1
    for i, v in ((0, 5), (1, 6), (2, 0)):
        info = m.folio(pid, BASE + i * P)
        assert info is not None and info.order == 9 and info.value == v and not info.pmd, i
    assert m.pagemap(pid, BASE + P, P)[0].anon_exclusive  # PG_anon_exclusive given back
    folio_put(m.k, folio)
    assert m.check_invariants() == []
    assert await m.move(pid, DST, BASE + P, P) == P
    assert await m.read(pid, DST) == 6 and m.check_invariants() == []


async def test_fork_copies_migration_entries_and_the_split_maps_both() -> None:
    """A fork that linked its chains before the split took the anon_vma lock copies the page
    table while the pages are migration entries: the child's are copies made readable, and so
    are the parent's. The split then maps each page in both, shared and write-protected."""
    m = MemoryModel(swap_bytes=0)
    pid = await m.create_process()
    await m.mmap(pid, HPAGE * P, addr=BASE)
    await m.madvise(pid, BASE, HPAGE * P, "hugepage")
    await m.write(pid, BASE, 1)
    await m.write(pid, BASE + P, 2)
    await m.madvise(pid, BASE + 256 * P, 256 * P, "dontneed")  # queued for the deferred split
    bpf = m.k.sched.pause_at("fork:after-anon-vma-fork")
    forker = asyncio.create_task(m.fork(pid))
    await bpf.wait_reached()
    bps = m.k.sched.pause_at("split:unmapped")
    reclaimer = asyncio.create_task(m.reclaim(32))  # the deferred split shrinker
    await bps.wait_reached()
    bpf.release()
    child = await forker
    assert migration_entries(m) == 2 * 256
    [entry] = m.pagemap(child, BASE, P)
    assert entry.swap
    bps.release()
    await reclaimer
    assert migration_entries(m) == 0 and m.k.stats["thp_split_page"] == 1
    for proc in (pid, child):
        for i, v in ((0, 1), (1, 2)):
            info = m.folio(proc, BASE + i * P)
            assert info is not None and info.order == 0 and info.value == v and info.mapcount == 2
            assert not info.writable and not info.exclusive
    assert m.check_invariants() == []
    await m.write(pid, BASE, 3)  # copy on write
    assert await m.read(child, BASE) == 1 and await m.read(pid, BASE) == 3
    assert m.check_invariants() == []


async def test_dontneed_and_mprotect_meet_migration_entries() -> None:
    """While a reclaim split has the pages unmapped, MADV_DONTNEED zaps one entry (the split
    then has nothing to map there) and an mprotect of the whole VMA makes the others read-only
    (the split maps them so)."""
    m = MemoryModel(swap_bytes=0)
    pid = await m.create_process()
    await m.mmap(pid, HPAGE * P, addr=BASE)
    await m.madvise(pid, BASE, HPAGE * P, "hugepage")
    await m.write(pid, BASE, 1)
    await m.write(pid, BASE + 2 * P, 2)
    await m.madvise(pid, BASE + 256 * P, 256 * P, "dontneed")
    bps = m.k.sched.pause_at("split:unmapped")
    reclaimer = asyncio.create_task(m.reclaim(32))
    await bps.wait_reached()
    await m.madvise(pid, BASE + P, P, "dontneed")
    await m.mprotect(pid, BASE, HPAGE * P, "r")
    assert migration_entries(m) == 255
    bps.release()
    await reclaimer
    for i, v in ((0, 1), (2, 2)):
        info = m.folio(pid, BASE + i * P)
        assert info is not None and info.order == 0 and info.value == v and not info.writable
    assert m.folio(pid, BASE + P) is None
    assert m.processes[pid].rss_anon == 2 and m.check_invariants() == []  # the rest: the zero page


#: A move that splits a PTE-mapped THP against another task on one of its pages.
SPLIT_VS = """\
name: split-vs-{name}
setup:
  p = process
  mmap p 0x200000 512
  madvise p 0x200000 512 hugepage
  write p 0x200000 1
  write p 0x201000 2
  madvise p 0x3ff000 1 dontneed
  mmap p 0x600000 1 rw missing
thread mover:
  remap p 0x600000 0x200000 1
thread other:
  {op}
"""


def _dpor(name: str, op: str) -> tuple[ex.Search, set[str], int, set[str]]:
    """The search at every access: what the threads returned, in how many runs a task waited on a
    migration entry, and what was caught."""
    scn = parse(SPLIT_VS.format(name=name, op=op), "t.litmus")
    results: set[str] = set()
    caught: set[str] = set()
    waited = 0

    def on_run(r: ex.RunResult, m: MemoryModel | None, blocked: bool) -> None:
        nonlocal waited
        assert m is not None
        if not blocked:
            results.update(e.text for e in r.events if e.kind == "result")
            caught.update(r.violations + r.problems)
            waited += m.k.stats["migration_entry_wait"] > 0

    async def go() -> ex.Search:
        s = ex.Search("dpor")
        start = await ex.snapshot(scn, "recheck", None)
        await ex._explore_dpor(s, scn, "recheck", None, start, 1_000_000, False, full=False, on_run=on_run,
                               fine=True)
        return s

    return asyncio.run(go()), results, waited, caught


def test_a_walk_against_a_split_at_every_access() -> None:
    """The walker's speculative reference against the split, at every access (before, the split
    could end with a reference it never saw and crash): complete and clean, and the search meets
    both a freeze that fails (the move's EBUSY) and a walker that finds the count frozen."""
    s, results, _, caught = _dpor("walk", "walk p 0x200000 blocking")
    assert s.complete and not caught
    assert "remap → EBUSY" in results and "walk → EAGAIN" in results
    assert "remap → moved 4096" in results


def test_a_read_fault_against_a_split_at_every_access() -> None:
    """A read of another page of the THP waits out the migration entry in some traces and reads
    the page's contents in every one."""
    s, results, waited, caught = _dpor("read", "read p 0x201000")
    assert s.complete and not caught and waited
    assert results == {"remap → moved 4096", "read → 2"}
