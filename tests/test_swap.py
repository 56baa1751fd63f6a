"""Swap and reclaim in the kernel model: swap-out by MADV_PAGEOUT and by reclaim (the Reclaim call
and memcg reclaim when the budget is full), swap-in, and the paths that meet a swap PTE (fork,
DONTNEED, munmap, exit, mremap, UFFDIO_MOVE, UFFDIO_COPY). What the live kernel does in the same
scenarios is in tests/conformance/3xx-swap-*.json; these check what only the model can show: its
counters, the device's slots, the LRU lists, the audit."""

from __future__ import annotations

import asyncio
import errno

import pytest

from mmsim.server.mm.locks import Current
from mmsim.server.mm.memcontrol import MemoryLimitExceeded
from mmsim.server.mm.mm_types import PAGE_SIZE, MmError, Pte, SwapPte, Vma
from mmsim.server.mm.model import MemoryModel, ResultTooLarge
from mmsim.server.mm.swap import LRU_ACTIVE_ANON, LRU_INACTIVE_ANON
from mmsim.server.mm.swapfile import swp_swapcount

P = PAGE_SIZE
SRC = 0x1000_0000
DST = 0x2000_0000


async def written(m: MemoryModel, pages: int, addr: int = SRC) -> int:
    pid = await m.create_process()
    await m.mmap(pid, pages * P, addr=addr)
    for i in range(pages):
        await m.write(pid, addr + i * P, 1000 + i)
    return pid


def clean(m: MemoryModel) -> None:
    assert m.check_invariants() == []
    assert not m.detectors.counts, m.detectors.events[:4]


def pte(m: MemoryModel, pid: int, addr: int) -> Pte:
    found = m.processes[pid].pte_lookup(addr)
    assert found is not None
    return found


def swp(m: MemoryModel, pid: int, addr: int) -> SwapPte:
    found = m.processes[pid].swap_pte_lookup(addr)
    assert found is not None
    return found


def vma(m: MemoryModel, pid: int, addr: int) -> Vma:
    found = m.processes[pid].vma_lookup(addr)
    assert found is not None
    return found


def swapped(m: MemoryModel, pid: int, addr: int, pages: int) -> list[bool]:
    return [e.swap for e in m.pagemap(pid, addr, pages * P)]


async def test_pageout_swap_in_and_the_slot() -> None:
    m = MemoryModel()
    pid = await written(m, 4)
    await m.madvise(pid, SRC, 2 * P, "pageout")
    assert swapped(m, pid, SRC, 4) == [True, True, False, False]
    si = m.k.swap
    assert si.inuse_pages == 2 and len(si.swap_table) == 2  # written, kept in the swap cache
    assert m.k.folios_live == 4 and m.processes[pid].rss_anon == 2 and m.processes[pid].swap_ents == 2
    assert m.k.stats["swap_out"] == 2
    clean(m)
    assert await m.read(pid, SRC) == 1000  # a swap-cache hit: the slot stays
    e = m.pagemap(pid, SRC, P)[0]
    assert e.present and e.swapcache and e.anon_exclusive and e.mapcount == 1
    assert m.k.stats["swap_cache_hit"] == 1 and si.inuse_pages == 2
    await m.write(pid, SRC + P, 7)  # a write swap-in lets the slot go
    e = m.pagemap(pid, SRC + P, P)[0]
    assert e.present and not e.swapcache and si.inuse_pages == 1
    clean(m)
    await m.exit(pid)
    assert si.inuse_pages == 0 and not si.swap_table and not si.swap_data and m.k.folios_live == 0
    assert len(m.k.lruvec) == 0
    clean(m)


async def test_reclaim_swaps_out_frees_and_reads_back() -> None:
    m = MemoryModel()
    pid = await written(m, 64)
    first = await m.reclaim(64)  # written pages are young: the first pass only marks them referenced
    total = first
    for _ in range(4):
        total += await m.reclaim(64)
    assert total == 64 and m.k.folios_live == 0
    assert all(swapped(m, pid, SRC, 64))
    assert m.k.stats["reclaim_freed"] == 64 and m.k.stats["swap_out"] == 64
    clean(m)
    assert [await m.read(pid, SRC + i * P) for i in range(64)] == [1000 + i for i in range(64)]
    assert m.k.stats["swap_in"] == 64
    clean(m)


async def test_lru_second_chance_and_activation() -> None:
    """A young page is spared once (PG_referenced), activated when found young again; the active
    list is aged by the unlocked walker, which deactivates it."""
    m = MemoryModel()
    pid = await written(m, 1)
    f = pte(m, pid, SRC).folio
    assert f.lru == LRU_INACTIVE_ANON
    assert await m.reclaim(1) == 0
    assert f.referenced and f.lru == LRU_INACTIVE_ANON and not pte(m, pid, SRC).young
    await m.read(pid, SRC)  # young again
    await m.reclaim(1)
    assert m.k.stats["reclaim_activated"] >= 1
    assert f.lru in (LRU_ACTIVE_ANON, LRU_INACTIVE_ANON)
    while not m.pagemap(pid, SRC, P)[0].swap:
        await m.reclaim(1)
    assert m.k.stats["reclaim_deactivated"] >= 1
    assert await m.read(pid, SRC) == 1000
    clean(m)


async def test_budget_full_reclaims_instead_of_enomem() -> None:
    limit = 400_000
    with_swap = MemoryModel(max_memory=limit, swap_bytes=16 << 20)
    without = MemoryModel(max_memory=limit, swap_bytes=0)
    pages = 2000
    pid = await written(with_swap, pages)
    stats = with_swap.k.stats
    assert stats["reclaim_kswapd"] > 0 and with_swap.k.memcg.usage <= limit
    assert [await with_swap.read(pid, SRC + i * P) for i in range(0, pages, 37)] == list(range(1000, 1000 + pages, 37))
    clean(with_swap)
    with pytest.raises(MemoryLimitExceeded):
        await written(without, pages)
    assert without.k.stats["reclaim_freed"] == 0


async def test_swap_full_enomem_and_pageout_keeps_the_page() -> None:
    m = MemoryModel(swap_bytes=2 * P)  # one usable slot: slot 0 is the header
    pid = await written(m, 2)
    await m.madvise(pid, SRC, 2 * P, "pageout")
    assert swapped(m, pid, SRC, 2) == [True, False]
    f = pte(m, pid, SRC + P).folio
    assert f.lru == LRU_ACTIVE_ANON  # no slot: activated, as with no swap
    clean(m)
    small = MemoryModel(max_memory=200_000, swap_bytes=8 * P)
    with pytest.raises(MemoryLimitExceeded):
        await written(small, 1000)
    assert small.k.swap.nr_swap_pages == 0
    clean(small)


async def test_fork_shares_swap_entries_and_exit_frees_them() -> None:
    m = MemoryModel()
    pid = await written(m, 2)
    await m.madvise(pid, SRC, 2 * P, "pageout")
    child = await m.fork(pid)
    si = m.k.swap
    for proc in (pid, child):
        swp = m.processes[proc].swap_pte_lookup(SRC)
        assert swp is not None and not swp.exclusive and swp_swapcount(si, swp.slot) == 2
    assert m.processes[child].swap_ents == 2
    clean(m)
    assert await m.read(child, SRC) == 1000
    e = m.pagemap(child, SRC, P)[0]
    assert e.present and not e.anon_exclusive  # shared entry: mapped shared
    await m.write(pid, SRC + P, 5)  # COW away from the shared swap-cache folio
    assert await m.read(child, SRC + P) == 1001
    clean(m)
    await m.exit(child)
    await m.exit(pid)
    assert si.inuse_pages == 0 and m.k.folios_live == 0
    clean(m)


async def test_dontneed_munmap_and_mremap_of_swap_entries() -> None:
    m = MemoryModel()
    pid = await written(m, 4)
    await m.madvise(pid, SRC, 4 * P, "pageout")
    si = m.k.swap
    await m.madvise(pid, SRC, P, "dontneed")
    assert si.inuse_pages == 3 and m.pagemap(pid, SRC, P)[0] == m.pagemap(pid, SRC + 16 * P, P)[0]
    await m.munmap(pid, SRC + P, P)
    assert si.inuse_pages == 2
    info = await m.mremap(pid, SRC + 2 * P, 2 * P, 2 * P, maymove=True, fixed=DST)
    assert info.start == DST and swapped(m, pid, DST, 2) == [True, True]
    assert [await m.read(pid, DST + i * P) for i in range(2)] == [1002, 1003]
    assert await m.read(pid, SRC) == 0  # DONTNEED: the zero page
    clean(m)


async def test_move_of_swap_entries() -> None:
    """An exclusive swap PTE moves as it is, its swap-cache folio to dst's anon_vma and index; a
    shared one is EBUSY; a swap PTE at dst is EEXIST, for UFFDIO_MOVE and UFFDIO_COPY alike."""
    m = MemoryModel()
    pid = await written(m, 2)
    await m.mmap(pid, 2 * P, addr=DST)
    await m.uffd_register(pid, DST, 2 * P, "missing")
    await m.madvise(pid, SRC, 2 * P, "pageout")
    mm = m.processes[pid]
    f = m.k.swap.swap_table[swp(m, pid, SRC).slot.offset]
    assert await m.move(pid, DST, SRC, P) == P
    dst_vma = vma(m, pid, DST)
    assert f.mapping is dst_vma.anon_vma and f.index == dst_vma.linear_page_index(DST)
    assert swp(m, pid, DST).soft_dirty and mm.swap_pte_lookup(SRC) is None
    with pytest.raises(MmError) as e:
        await m.move(pid, DST, SRC + P, P)  # dst holds a swap PTE
    assert e.value.errno == errno.EEXIST
    with pytest.raises(MmError) as e:
        await m.uffd_copy(pid, DST, P, 9)
    assert e.value.errno == errno.EEXIST
    assert await m.read(pid, DST) == 1000
    clean(m)
    child = await m.fork(pid)
    with pytest.raises(MmError) as e:
        await m.move(pid, DST + P, SRC + P, P)  # shared after fork
    assert e.value.errno == errno.EBUSY
    await m.exit(child)
    clean(m)


async def test_reclaim_runs_to_its_end_when_cancelled() -> None:
    m = MemoryModel(preempt=0.5, seed=3)
    pid = await written(m, 32)
    for _ in range(3):
        task = asyncio.create_task(m.reclaim(32))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        clean(m)
    assert m.k.stats["reclaim_runs"] == 3
    assert [await m.read(pid, SRC + i * P) for i in range(32)] == [1000 + i for i in range(32)]
    clean(m)


async def test_pagemap_and_reclaim_bad_input() -> None:
    m = MemoryModel()
    pid = await written(m, 1)
    with pytest.raises(MmError) as e:
        m.pagemap(pid, SRC + 8, P)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(ResultTooLarge):
        m.pagemap(pid, SRC, 100 * P, max_pages=99)
    assert len(m.pagemap(pid, SRC, 99 * P + 1, max_pages=100)) == 100
    with pytest.raises(MmError) as e:
        m.pagemap(pid, (1 << 64) - P, 2 * P)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(MmError):
        await m.reclaim(-1)
    with pytest.raises(MmError) as e:
        await m.madvise(pid, SRC, P, "hot")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(ValueError):
        MemoryModel(swap_bytes=-1)
    assert await MemoryModel(swap_bytes=0).reclaim(10) == 0
    zero = m.pagemap(pid, SRC + P, P)[0]
    assert not zero.present and not zero.swap


async def test_swap_in_cancelled_part_way_gives_back_its_folio() -> None:
    """A read cancelled after its swap-cache lookup (the folio referenced, then asleep on the folio
    lock another task holds) changes nothing: the folio is unpinned and unlocked."""
    m = MemoryModel()
    pid = await written(m, 1)
    await m.madvise(pid, SRC, P, "pageout")
    f = m.k.swap.swap_table[swp(m, pid, SRC).slot.offset]
    lock = f.lock
    assert lock is not None
    bp = m.k.sched.pause_at("swapin:after-lookup")
    reader = asyncio.create_task(m.read(pid, SRC))
    await bp.wait_reached()
    assert f.refcount == 2  # the cache's and the reader's
    reader.cancel()
    bp.release()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert f.refcount == 1 and not lock.is_locked()
    clean(m)
    holder = Current("holder")
    assert lock.trylock(holder)  # the next reader sleeps on the folio lock
    reader = asyncio.create_task(m.read(pid, SRC))
    for _ in range(50):
        if lock.waiters:
            break
        await asyncio.sleep(0)
    assert lock.waiters
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    lock.unlock(holder)
    clean(m)
    assert await m.read(pid, SRC) == 1000
    clean(m)


async def test_memcg_reclaim_finishes_when_its_fault_is_cancelled() -> None:
    """A write that reclaims (above the high watermark), cancelled while reclaim holds a folio it
    isolated and locked:
    reclaim runs to its end (every isolated folio back on a list or freed), the write changes
    nothing, and every page keeps its value."""
    m = MemoryModel(max_memory=300_000, swap_bytes=16 << 20)
    pid = await m.create_process()
    await m.mmap(pid, 1000 * P, addr=SRC)
    bp = m.k.sched.pause_at("reclaim:folio-locked")
    parked = asyncio.create_task(bp.wait_reached())
    i = 0
    while True:  # write page after page until a write's charge reclaims and parks there
        writer = asyncio.create_task(m.write(pid, SRC + i * P, i))
        await asyncio.wait([writer, parked], return_when=asyncio.FIRST_COMPLETED)
        if parked.done():
            break
        await writer
        i += 1
    writer.cancel()
    bp.release()
    with pytest.raises(asyncio.CancelledError):
        await writer
    assert m.k.stats["reclaim_kswapd"] + m.k.stats["reclaim_memcg"] == 1
    clean(m)
    assert [await m.read(pid, SRC + j * P) for j in range(0, i, 17)] == list(range(0, i, 17))
    clean(m)


async def test_fork_past_the_budget_reclaims_while_swap_has_room() -> None:
    """A fork of a process that filled the budget with folios succeeds while swap has room: the
    call that finds the budget above its high watermark reclaims to the low one first (kswapd's
    balancing), and a charge of fork's PTE copies that still fails reclaims (memcg reclaim)."""
    limit = 600_000

    async def fill_and_fork(m: MemoryModel) -> int:
        pid = await m.create_process()
        await m.mmap(pid, 2000 * P, addr=SRC)
        i = 0
        while m.k.memcg.usage < limit - 40_000:
            await m.write(pid, SRC + i * P, i)
            i += 1
        return await m.fork(pid)

    m = MemoryModel(max_memory=limit, swap_bytes=16 << 20)
    child = await fill_and_fork(m)
    assert m.k.stats["reclaim_kswapd"] + m.k.stats["reclaim_memcg"] > 0 and m.k.memcg.usage <= limit
    assert await m.read(child, SRC) == 0 and await m.read(child, SRC + 5 * P) == 5
    clean(m)
    with pytest.raises(MemoryLimitExceeded):
        await fill_and_fork(MemoryModel(max_memory=limit, swap_bytes=0))


async def test_reclaim_frees_no_more_than_asked() -> None:
    m = MemoryModel()
    pid = await written(m, 40)
    await m.madvise(pid, SRC, 40 * P, "pageout")  # 40 clean folios in the swap cache
    assert [await m.reclaim(n) for n in (1, 3, 7)] == [1, 3, 7]
    assert len(m.k.swap.swap_table) == 40 - 11
    assert await m.reclaim(1000) == 29
    clean(m)
