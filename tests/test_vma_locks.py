"""Per-VMA locks (mm/mmap_lock.py): UFFDIO_MOVE and page faults lock just their VMAs for read;
whatever changes a VMA under the mmap_lock write-locks it first (vma_start_write) and so waits for
them; changes to other VMAs of the same process go on meanwhile."""

from __future__ import annotations

import asyncio

import pytest

from mmsim.server.mm.locks import LOCK_ORDER, Current, LockClass, Mutex
from mmsim.server.mm.model import PAGE_SIZE, MemoryModel

P = PAGE_SIZE
SRC, DST, OTHER = 0x10000000, 0x20000000, 0x30000000
PAGES = 4


async def turns(n: int = 50) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def setup(m: MemoryModel) -> int:
    pid = await m.create_process()
    await m.mmap(pid, PAGES * P, addr=SRC)
    for i in range(PAGES):
        await m.write(pid, SRC + i * P, 100 + i)
    await m.mmap(pid, PAGES * P, addr=DST, uffd="missing")
    await m.mmap(pid, P, addr=OTHER)
    await m.write(pid, OTHER, 7)
    return pid


async def test_a_move_and_a_munmap_of_another_vma_run_concurrently() -> None:
    m = MemoryModel()
    pid = await setup(m)
    bp = m.k.sched.pause_at("move:between-pages")
    mover = asyncio.create_task(m.move(pid, DST, SRC, PAGES * P))
    await bp.wait_reached()
    mm = m.processes[pid]
    assert not mm.mmap_lock.is_locked(), "the move holds VMA locks, not the mmap_lock"
    assert mm.vma_lookup(SRC).vm_lock.readers == 1 and mm.vma_lookup(DST).vm_lock.readers == 1
    await m.munmap(pid, OTHER, P)  # completes while the move is parked mid-way
    assert [v.start for v in m.vmas(pid)] == [SRC, DST]
    bp.release()
    assert await mover == PAGES * P
    assert [m.folio(pid, DST + i * P).value for i in range(PAGES)] == [100, 101, 102, 103]
    assert m.check_invariants() == [] and not m.detectors.counts


async def test_a_munmap_of_the_vma_being_moved_waits_for_the_move() -> None:
    m = MemoryModel()
    pid = await setup(m)
    bp = m.k.sched.pause_at("move:between-pages")
    mover = asyncio.create_task(m.move(pid, DST, SRC, PAGES * P))
    await bp.wait_reached()
    mm = m.processes[pid]
    dst_vma = mm.vma_lookup(DST)
    unmap = asyncio.create_task(m.munmap(pid, DST, PAGES * P))
    await turns()
    assert not unmap.done() and dst_vma.vm_lock.waiters, "vma_start_write waits for the move's read lock"
    bp.release()
    assert await mover == PAGES * P
    await unmap
    assert [v.start for v in m.vmas(pid)] == [SRC, OTHER] and m.folio(pid, DST) is None
    assert m.check_invariants() == [] and not m.detectors.counts


async def test_a_fork_waits_for_a_move_on_the_parents_vmas() -> None:
    m = MemoryModel()
    pid = await setup(m)
    bp = m.k.sched.pause_at("move:between-pages")
    mover = asyncio.create_task(m.move(pid, DST, SRC, PAGES * P))
    await bp.wait_reached()
    fork = asyncio.create_task(m.fork(pid))
    await turns()
    assert not fork.done()
    bp.release()
    await mover
    child = await fork
    # The child sees the move's end state: every page at DST, none at SRC.
    assert [m.folio(child, DST + i * P) is not None for i in range(PAGES)] == [True] * PAGES
    assert m.folio(child, SRC) is None
    assert m.check_invariants() == []


async def test_a_fault_takes_the_vma_lock_not_the_mmap_lock() -> None:
    """A fault on a VMA that has an anon_vma goes on while someone holds the mmap_lock for write;
    a first fault (no anon_vma yet) needs the mmap_lock, and waits."""
    m = MemoryModel()
    pid = await setup(m)
    new = await m.mmap(pid, P, addr=0x40000000)
    mm = m.processes[pid]
    holder = Current("holder")
    assert mm.mmap_lock.down_write(holder)
    assert await m.read(pid, SRC) == 100  # under the VMA lock alone
    await m.write(pid, SRC + P, 5)
    first = asyncio.create_task(m.write(pid, new.start, 9))
    await turns()
    assert not first.done() and mm.mmap_lock.waiters
    mm.mmap_lock.up_write(holder)
    await first
    assert m.folio(pid, new.start).value == 9
    assert m.check_invariants() == []


async def test_a_fault_waits_for_a_vma_being_changed() -> None:
    """vma_start_write marks the VMA until the mmap_lock write section ends: a fault then falls
    back to the mmap_lock and waits for the writer."""
    m = MemoryModel()
    pid = await setup(m)
    bp = m.k.sched.pause_at("move:between-pages")
    mover = asyncio.create_task(m.move(pid, DST, SRC, 2 * P))
    await bp.wait_reached()
    mprotect = asyncio.create_task(m.mprotect(pid, SRC, PAGES * P, "r"))  # waits for the move
    await turns()
    assert not mprotect.done()
    reader = asyncio.create_task(m.read(pid, SRC + 3 * P))
    await turns()
    assert not reader.done(), "the fault waits for the mprotect's mmap_lock write section"
    bp.release()
    await mover
    await mprotect
    assert await reader == 103
    assert m.check_invariants() == [] and not m.detectors.counts


def test_lockdep_knows_the_vma_lock() -> None:
    classes = [c for c, _, _ in LOCK_ORDER]
    assert classes.index(LockClass.MMAP_LOCK) < classes.index(LockClass.VMA_LOCK) < classes.index(LockClass.FOLIO_LOCK)


@pytest.mark.violations_expected
async def test_lockdep_reports_a_vma_lock_taken_under_a_folio_lock() -> None:
    m = MemoryModel()
    pid = await setup(m)
    vma = m.processes[pid].vma_lookup(SRC)
    cur = Current("bad")
    folio_lock = Mutex("folio.lock", LockClass.FOLIO_LOCK, m.k.lockdep)
    assert folio_lock.lock(cur)
    assert vma.vm_lock.down_read(cur)  # blocking acquisition against the order
    assert m.detectors.counts["lock-order"] == 1
    vma.vm_lock.up_read(cur)
    folio_lock.unlock(cur)


async def test_a_copy_takes_the_dst_vma_lock_not_the_mmap_lock() -> None:
    """UFFDIO_COPY (uffd_mfill_lock) into a VMA that has an anon_vma goes on while someone holds
    the mmap_lock for write; an munmap of that VMA waits for a copy in progress."""
    m = MemoryModel()
    pid = await setup(m)
    await m.uffd_copy(pid, DST, P, 1)  # the first fill prepares DST's anon_vma (under the mmap_lock)
    mm = m.processes[pid]
    holder = Current("holder")
    assert mm.mmap_lock.down_write(holder)
    assert await m.uffd_copy(pid, DST + P, P, 2) == P  # under the VMA lock alone
    mm.mmap_lock.up_write(holder)
    assert m.folio(pid, DST + P).value == 2
    assert m.check_invariants() == [] and not m.detectors.counts
