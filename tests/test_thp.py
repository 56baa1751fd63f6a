"""Large folios in the model, beyond the kernel-recorded scenarios (tests/conformance/4*-thp-*):
the calls that look a folio up by address find a PMD-mapped THP, the deferred split queue and its
shrinker, the max_pages limit, and cancellation inside a split."""

from __future__ import annotations

import asyncio

import pytest

from mmsim.server.mm.model import PAGE_SIZE, MemoryModel, MmError

P = PAGE_SIZE
BASE = 0x4000_0000  # 2 MiB-aligned
HPAGE = 512


async def thp(m: MemoryModel, *values: int) -> int:
    """A process with one PMD-mapped THP at BASE, pages 0.. written with ``values``."""
    pid = await m.create_process()
    await m.mmap(pid, HPAGE * P, addr=BASE)
    await m.madvise(pid, BASE, HPAGE * P, "hugepage")
    for i, v in enumerate(values):
        await m.write(pid, BASE + i * P, v)
    info = m.folio(pid, BASE)
    assert info is not None and info.pmd and info.order == 9
    return pid


async def test_walk_and_anon_vma_tree_find_a_pmd_mapped_thp() -> None:
    m = MemoryModel()
    pid = await thp(m, 1)
    w = await m.walk(pid, BASE + 7 * P)
    assert w.mappings == ((pid, BASE),) and w.referenced == 1
    info = m.folio(pid, BASE)
    assert info is not None and [r["id"] for r in m.anon_vma_tree(pid, BASE)] == [info.anon_vma]
    await m.read(pid, BASE + HPAGE * P - P)  # still the THP's page: no new folio
    pid2 = await m.create_process()
    await m.mmap(pid2, HPAGE * P, addr=BASE)
    await m.madvise(pid2, BASE, HPAGE * P, "hugepage")
    assert await m.read(pid2, BASE) == 0  # the huge zero page
    with pytest.raises(MmError, match="zero page"):
        await m.walk(pid2, BASE)
    with pytest.raises(MmError, match="no anonymous folio"):
        m.anon_vma_tree(pid2, BASE)
    assert m.check_invariants() == []


async def test_a_write_to_a_writable_thp_needs_no_new_folio_under_max_pages() -> None:
    m = MemoryModel(max_pages=HPAGE)
    pid = await thp(m, 1)
    await m.write(pid, BASE + P, 2)  # in place: the THP's own page
    info = m.folio(pid, BASE + P)
    assert info is not None and info.value == 2 and info.pmd
    await m.mmap(pid, P, addr=BASE + HPAGE * P)
    with pytest.raises(Exception, match="max_pages"):
        await m.write(pid, BASE + HPAGE * P, 3)  # a new folio: over the limit


async def test_partly_unmapped_thp_is_queued_then_split_by_reclaim() -> None:
    m = MemoryModel(swap_bytes=0)
    pid = await thp(m, 1, 2)
    k = m.k
    await m.madvise(pid, BASE + 256 * P, 256 * P, "dontneed")  # the second half: split_huge_pmd, zap
    info = m.folio(pid, BASE)
    assert info is not None and info.order == 9 and not info.pmd
    assert len(k.deferred_split_queue) == 1 and k.folio_pages_live == HPAGE
    assert k.stats["thp_split_pmd"] == 1 and m.check_invariants() == []
    freed = await m.reclaim(32)  # no swap: only the deferred split shrinker frees anything
    assert not k.deferred_split_queue and k.stats["thp_split_page"] == 1
    # Pages 0 and 1 keep their own folios; the other 254 mapped pages read zeros and are now the
    # zero page; the 256 unmapped ones are freed.
    assert k.folio_pages_live == 2 and freed == HPAGE - 2
    for i, v in ((0, 1), (1, 2), (2, 0), (255, 0)):
        info = m.folio(pid, BASE + i * P)
        assert info is not None and info.order == 0 and info.value == v and info.zero_page == (v == 0)
    assert m.folio(pid, BASE + 256 * P) is None
    assert m.check_invariants() == []


async def test_a_move_cancelled_in_the_split_leaves_the_model_consistent() -> None:
    """A move of one page out of a PTE-mapped THP stops at the split's anon_vma lock (a walker
    holds it for read) and is cancelled there: the folio stays whole, locked by no one, and a
    second move then splits it and moves the page."""
    m = MemoryModel()
    pid = await thp(m, 5, 6)
    await m.madvise(pid, BASE + (HPAGE - 1) * P, P, "dontneed")  # PTE-mapped now
    await m.mmap(pid, P, addr=0x6000_0000)
    await m.uffd_register(pid, 0x6000_0000, P, "missing")
    bp = m.k.sched.pause_at("walk:after-index-read")  # a walker holding the root for read
    walker = asyncio.create_task(m.walk(pid, BASE))
    await bp.wait_reached()
    mover = asyncio.create_task(m.move(pid, 0x6000_0000, BASE + P, P))
    for _ in range(200):
        await asyncio.sleep(0)
    assert not mover.done()  # asleep on the anon_vma rwsem, inside split_folio
    mover.cancel()
    with pytest.raises(asyncio.CancelledError):
        await mover
    bp.release()
    await walker
    info = m.folio(pid, BASE + P)
    assert info is not None and info.order == 9 and m.check_invariants() == []
    assert await m.move(pid, 0x6000_0000, BASE + P, P) == P
    assert await m.read(pid, 0x6000_0000) == 6 and m.folio(pid, BASE)
    assert m.check_invariants() == []


async def test_pageout_of_part_leaves_the_huge_zero_page_and_a_shared_thp_alone() -> None:
    """MADV_PAGEOUT over part of a huge PMD splits an exclusive THP's folio (its pages are then
    paged out), but leaves the huge zero page and a THP shared with a fork child mapped whole."""
    m = MemoryModel()
    pid = await thp(m, 1)
    await m.mmap(pid, HPAGE * P, addr=BASE + HPAGE * P)
    await m.madvise(pid, BASE + HPAGE * P, HPAGE * P, "hugepage")
    assert await m.read(pid, BASE + HPAGE * P) == 0  # the huge zero page
    child = await m.fork(pid)
    await m.madvise(pid, BASE + 100 * P, HPAGE * P, "pageout")  # part of each PMD
    for at in (BASE, BASE + HPAGE * P):
        info = m.folio(pid, at)
        assert info is not None and info.pmd, hex(at)
    await m.exit(child)
    await m.madvise(pid, BASE + 100 * P, 8 * P, "pageout")  # exclusive again: split, paged out
    info = m.folio(pid, BASE)
    assert info is not None and not info.pmd and info.order == 0 and info.value == 1
    [entry] = m.pagemap(pid, BASE + 100 * P, P)
    assert entry.zero_page  # it read zeros: the split mapped the zero page there
    assert m.k.stats["thp_split_page"] == 1 and m.check_invariants() == []
