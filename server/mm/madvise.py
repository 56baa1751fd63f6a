"""madvise(2) (mm/madvise.c): the entry point, MADV_DONTNEED, MADV_COLD and MADV_PAGEOUT, as in
6.18. The fork controls (MADV_DONTFORK/DOFORK/WIPEONFORK/KEEPONFORK) change VMA flags and live in
mmap.py.

Every function here expects mmap_lock held for write (the kernel takes it for read for
MADV_DONTNEED; holding it for write here only serialises more).

What the live 6.18 kernel does with MADV_DONTNEED (checked with madvise(2) on these machines,
/proc/self/pagemap and /proc/self/maps):
- unknown advice: EINVAL first; a start that is not page-aligned: EINVAL, even with length 0;
  length 0: 0, even over a hole; a length that is not a page multiple is rounded up;
- start + length reaching the end of the 64-bit space: EINVAL; past the address-space size but not
  wrapping: ENOMEM (a hole), no EINVAL;
- any sub-range of a VMA: the PTEs are zapped, the VMA is not split (/proc/self/maps unchanged);
- a hole anywhere in the range (at the start, in the middle, at the end): every mapped part of the
  range is still zapped, then ENOMEM; a range that is all hole: ENOMEM;
- an mlock()ed VMA: EINVAL when the walk reaches it; the VMAs before it were already zapped, the
  ones after it are not;
- a PROT_NONE VMA is zapped like any other; so is a range registered with userfaultfd (MISSING)
  when the userfaultfd did not ask for UFFD_FEATURE_EVENT_REMOVE (no event);
- afterwards a read maps the zero page (the same PFN on every page), a write a new page.

MADV_COLD and MADV_PAGEOUT walk the range the same way (a hole: the mapped parts are still done,
then ENOMEM; an mlocked VMA: EINVAL), a PROT_NONE VMA included, and look at each present PTE
(madvise_cold_or_pageout_pte_range): the zero page, a folio off the LRU and a folio mapped more
than once (by another process after fork) are left alone; swap PTEs are skipped. COLD clears the
PTE's young bit and the folio's PG_referenced and moves it to the inactive list; PAGEOUT clears
PG_referenced, isolates the folios and reclaims them at once, references ignored (reclaim_pages:
vmscan.py): each gets a slot and a swap PTE, is written and stays in the swap cache, clean; one
already in the swap cache and clean (swapped in by a read) is freed at once.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .huge_memory import split_folio
from .locks import Current
from .memory import folio_get, folio_put, zap_pte_range
from .mm_types import (
    HUGE_ZERO_FOLIO,
    PAGE_MASK,
    PAGE_SHIFT,
    PMD_SHIFT,
    PMD_SIZE,
    VM_LOCKED,
    ZERO_PAGE,
    Folio,
    LargeFolio,
    Mm,
    MmError,
    PageTable,
    Pte,
)
from .mmap import MADVISE, page_align
from .mmap import do_madvise as madvise_vma_flags
from .sched import RESCHED_WORK, cond_resched
from .swap import folio_deactivate
from .vmscan import folio_isolate_lru, reclaim_pages

if TYPE_CHECKING:
    from .kernel import Kernel

#: One past the largest address a 64-bit range may reach.
ADDR_LIMIT = 1 << 64

#: The advice values that zap pages.
MADVISE_ZAP = ("dontneed",)
#: The advice values that age or reclaim pages.
MADVISE_LRU = ("cold", "pageout")


async def madvise_walk_vmas(
    mm: Mm, start: int, end: int, visit: Callable[[int, int], Awaitable[int]]
) -> None:
    """Run ``visit(addr, end)`` on the part of each VMA in [start, end), in address order
    (madvise_walk_vmas); ``visit`` returns the work it did (PTEs). A hole anywhere: every mapped
    part is still visited, then ENOMEM; an mlocked VMA: EINVAL there (can_madv_lru_vma), the VMAs
    before it done. Expects mmap_lock held. Lets other tasks run every RESCHED_WORK VMAs or PTEs."""
    addr = start
    hole = False
    work = 0
    while addr < end:
        vma = mm.find_vma(addr)
        if vma is None or vma.start >= end:
            hole = True
            break
        if vma.start > addr:
            hole = True
            addr = vma.start
        if vma.flags & VM_LOCKED:  # can_madv_lru_vma
            raise MmError(errno.EINVAL, f"the mapping at {vma.start:#x} is locked")
        tmp = min(vma.end, end)
        work += 1 + await visit(addr, tmp)
        addr = tmp
        if work >= RESCHED_WORK:
            work = 0
            await cond_resched()
    if hole:
        raise MmError(errno.ENOMEM, "part of the range is not mapped")


async def madvise_dontneed(k: Kernel, cur: Current, mm: Mm, start: int, end: int, unmapped: list[int]) -> None:
    """MADV_DONTNEED over [start, end) (madvise_walk_vmas with madvise_dontneed_single_vma):
    zap_page_range_single on the part of each VMA in the range; the folios whose last mapping goes
    are freed, the anon_vmas and VMAs stay. Expects mmap_lock held; takes each PTL in turn. Appends
    the page number of every folio unmapped to ``unmapped``. A hole anywhere: everything mapped is
    still zapped, then ENOMEM; an mlocked VMA: EINVAL there. Allocates nothing."""
    await madvise_walk_vmas(mm, start, end, lambda addr, tmp: zap_pte_range(k, cur, mm, addr, tmp, unmapped))


def _folio_pte_batch(pt: PageTable, vpn: int, top: int, pte: Pte) -> int:
    """How many PTEs from ``vpn`` (below ``top``) map the following pages of ``pte``'s folio
    (folio_pte_batch)."""
    folio, page = pte.folio, pte.page
    n = 1
    while vpn + n < top:
        nxt = pt.ptes.get(vpn + n)
        if nxt is None or nxt.folio is not folio or nxt.page != page + n:
            break
        n += 1
    return n


async def madvise_cold_or_pageout_pte_range(
    k: Kernel, cur: Current, mm: Mm, start: int, end: int, pageout: bool
) -> int:
    """MADV_COLD or MADV_PAGEOUT over [start, end) of one VMA: see the module's docstring. Takes
    each PTL in turn to gather the folios; PAGEOUT then reclaims them (the folio locks, the rmap
    walks' locks). Returns the PTEs visited."""
    lo, hi = start >> PAGE_SHIFT, end >> PAGE_SHIFT
    lruvec = k.lruvec
    folio_list: list[Folio] = []
    visited = 0
    skip: set[int] = set()  # PMDs whose folio could not be split: left alone
    for idx in mm.huge_pmds_in(start, end):  # madvise_cold_or_pageout_pte_range's huge PMD part
        haddr = idx << PMD_SHIFT
        hp = mm.huge_pmds.get(idx)
        if hp is None:
            continue
        folio: Folio = hp.folio
        if folio is HUGE_ZERO_FOLIO or not isinstance(folio, LargeFolio) or folio.maybe_mapped_shared():
            continue  # the huge zero page, or other mappings' folio: not interfered with
        visited += 1
        if not (start <= haddr and haddr + PMD_SIZE <= end):
            # Part of it in the range: split the folio (the PMD with it), then do its pages.
            lock = folio.lock
            assert lock is not None
            folio_get(k, cur, folio)
            head: Folio = folio
            if not lock.lock(cur): await lock.wait(cur)
            try:
                head = await split_folio(k, cur, folio)
            except MmError:
                skip.add(idx)
            head_lock = head.lock
            assert head_lock is not None
            head_lock.unlock(cur)
            folio_put(k, head, cur)
            continue
        if not pageout:
            hp.young = False
        folio.referenced = False
        if pageout:
            if folio_isolate_lru(k, folio):
                folio_list.append(folio)
        else:
            folio_deactivate(lruvec, folio)
    for idx in mm.pgtables_in(start, end):
        pt = mm.pgtables.get(idx)
        if pt is None or not pt.ptes or idx in skip:
            continue
        await k.spin_lock(cur, pt.ptl)
        vpn = max(lo, idx << (PMD_SHIFT - PAGE_SHIFT))
        top = min(hi, (idx + 1) << (PMD_SHIFT - PAGE_SHIFT))
        while vpn < top:
            pte = pt.ptes.get(vpn)
            if pte is None:
                vpn += 1
                continue
            folio = pte.folio
            nr = 1
            if isinstance(folio, LargeFolio):
                nr = _folio_pte_batch(pt, vpn, top, pte)
                if nr < folio.nr_pages:  # part of it in the range: split it, then look again
                    lock = folio.lock
                    assert lock is not None
                    if folio.maybe_mapped_shared() or not lock.trylock(cur):
                        vpn += nr
                        visited += nr
                        continue
                    folio_get(k, cur, folio)
                    pt.ptl.spin_unlock(cur)
                    try:
                        head = await split_folio(k, cur, folio)
                    except MmError:
                        head = folio
                        vpn += nr
                        visited += nr
                    head_lock = head.lock
                    assert head_lock is not None
                    head_lock.unlock(cur)
                    folio_put(k, head, cur)
                    await k.spin_lock(cur, pt.ptl)
                    continue
            visited += nr
            vpn += nr
            if folio is ZERO_PAGE or not folio.lru or folio.mapcount != folio.nr_pages:
                continue  # another mapping's page, or off the LRU
            if not pageout:
                for v in range(vpn - nr, vpn):
                    pt.ptes[v].young = False  # clear_young_dirty_ptes(CYDP_CLEAR_YOUNG)
            folio.referenced = False  # folio_clear_referenced
            if pageout:
                if folio_isolate_lru(k, folio):
                    folio_list.append(folio)
            else:
                folio_deactivate(lruvec, folio)
        pt.ptl.spin_unlock(cur)
    if folio_list:
        await reclaim_pages(k, cur, folio_list)
    return visited


async def madvise_cold_or_pageout(k: Kernel, cur: Current, mm: Mm, start: int, end: int, pageout: bool) -> None:
    """MADV_COLD or MADV_PAGEOUT over [start, end), VMA by VMA (madvise_walk_vmas): a hole
    anywhere: everything mapped is still done, then ENOMEM; an mlocked VMA: EINVAL there. Expects
    mmap_lock held."""
    await madvise_walk_vmas(
        mm, start, end, lambda addr, tmp: madvise_cold_or_pageout_pte_range(k, cur, mm, addr, tmp, pageout)
    )


async def do_madvise(
    k: Kernel, cur: Current, mm: Mm, start: int, length: int, advice: str, unmapped: list[int] | None = None
) -> None:
    """madvise(2): the argument checks in 6.18's order, then the advice. Expects mmap_lock held for
    write. For MADV_DONTNEED, appends the page number of every folio unmapped to ``unmapped`` (also
    when it then fails: the zapping is not undone)."""
    if advice not in MADVISE and advice not in MADVISE_ZAP and advice not in MADVISE_LRU:
        raise MmError(
            errno.EINVAL,
            f"advice must be one of {', '.join((*MADVISE, *MADVISE_ZAP, *MADVISE_LRU))}, not {advice!r}",
        )
    if start & ~PAGE_MASK:
        raise MmError(errno.EINVAL, f"address {start:#x} is not page-aligned")
    if length < 0:
        raise MmError(errno.EINVAL, "length must not be negative")
    end = start + page_align(length)
    if end >= ADDR_LIMIT:
        raise MmError(errno.EINVAL, "range wraps around the address space")
    if end == start:
        return
    if advice in MADVISE_ZAP:
        await madvise_dontneed(k, cur, mm, start, end, unmapped if unmapped is not None else [])
        return
    if advice in MADVISE_LRU:
        await madvise_cold_or_pageout(k, cur, mm, start, end, advice == "pageout")
        return
    await madvise_vma_flags(k, cur, mm, start, length, advice)
