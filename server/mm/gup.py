"""mm/gup.c: FOLL_PIN pins of user pages, as pin_user_pages_fast(FOLL_WRITE | FOLL_LONGTERM) takes
them for an io_uring buffer registration.

A pin first tries the lockless walk (GUP-fast: no mmap_lock, no PTL; in the kernel with interrupts
off, so that page tables cannot be freed meanwhile): read the PTE, raise the folio's pin count,
then read the PTE again and give the pin back if it changed. What GUP-fast cannot take (a page not
present, not writable, the zero page, or a PTE that changed under it) the slow path takes under
the mmap_lock: the PTE (or huge PMD) looked at under its lock, and a write fault (one that stores
nothing) where the page is missing, read-only or shared, before looking again.

A pin of a small folio adds GUP_PIN_COUNTING_BIAS to its refcount; of a large one, one reference
and one _pincount per page. folio_maybe_dma_pinned reads them: a move fails with EBUSY on a
pinned folio (and checks again after clearing the PTE, for a GUP-fast pin that came in between),
fork copies a pinned exclusive page for the child at once, reclaim keeps it, and a split fails.

Locks: GUP-fast takes none; the slow path expects the mmap_lock held for read and takes the PTL
(or the PMD lock) per page, and what handle_mm_fault takes.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from .locks import Current
from .mm_types import (
    GUP_PIN_COUNTING_BIAS,
    HPAGE_PMD_NR,
    HUGE_ZERO_FOLIO,
    PAGE_SHIFT,
    PMD_SHIFT,
    VM_WRITE,
    ZERO_PAGE,
    Folio,
    GupPin,
    Mm,
    MmError,
    folio_maybe_dma_pinned,
)
from .page_ref import folio_ref_add, folio_ref_sub_and_test, folio_try_get

if TYPE_CHECKING:
    from .kernel import Kernel


def try_grab_folio(k: Kernel, folio: Folio, refs: int, pin: GupPin, taken: int = 0) -> None:
    """Take ``refs`` FOLL_PIN references of ``folio`` for ``pin`` (one per page), ``taken`` of
    the references they count already held."""
    folio_ref_add(k, folio, (refs if folio.large else refs * GUP_PIN_COUNTING_BIAS) - taken)
    folio.pincount += refs
    pin.pages.extend([folio] * refs)


def try_grab_folio_fast(k: Kernel, folio: Folio, refs: int, pin: GupPin) -> bool:
    """GUP-fast's grab (try_grab_folio_fast): the first reference speculative (folio_try_get,
    which fails on a count that is zero: the folio freed, or frozen by a split), the rest added
    once it is held. False: nothing taken."""
    if not folio_try_get(k, folio):
        return False
    try_grab_folio(k, folio, refs, pin, taken=1)
    return True


def gup_put_folio(k: Kernel, folio: Folio, refs: int) -> None:
    """unpin_user_page: drop ``refs`` FOLL_PIN references; the last reference frees the folio."""
    folio.pincount -= refs
    if folio_ref_sub_and_test(k, folio, refs if folio.large else refs * GUP_PIN_COUNTING_BIAS):
        k.folio_free(folio)


def unpin_user_pages(k: Kernel, pin: GupPin) -> None:
    """Give back every page ``pin`` holds."""
    pages = pin.pages
    i = 0
    while i < len(pages):  # runs of the same folio go back at once
        folio = pages[i]
        j = i + 1
        while j < len(pages) and pages[j] is folio:
            j += 1
        gup_put_folio(k, folio, j - i)
        i = j
    pages.clear()


async def gup_fast(k: Kernel, cur: Current, mm: Mm, addr: int, nr_pages: int, pin: GupPin) -> int:
    """gup_fast: pin what can be pinned without a lock from ``addr`` on, stopping at the first
    page that cannot (not present, not writable, the zero page, or an entry that changed while it
    was being pinned). Returns the pages pinned. Takes no lock: between reading an entry and
    checking it again, anyone may run (``gup:pte-read``, ``gup:grabbed``)."""
    k.gup_fast_tasks += 1
    try:
        return await _gup_fast(k, mm, addr, nr_pages, pin)
    finally:
        k.gup_fast_tasks -= 1


async def _gup_fast(k: Kernel, mm: Mm, addr: int, nr_pages: int, pin: GupPin) -> int:
    sched = k.sched
    done = 0
    while done < nr_pages:
        a = addr + (done << PAGE_SHIFT)
        idx = a >> PMD_SHIFT
        hp = mm.huge_pmds.get(idx) if mm.huge_pmds else None
        if hp is not None:  # gup_fast_pmd_leaf
            if not hp.write or hp.folio is HUGE_ZERO_FOLIO:
                break
            refs = min(nr_pages - done, HPAGE_PMD_NR - ((a >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)))
            if sched.active: await sched.point("gup:pte-read")
            head = hp.folio
            if not try_grab_folio_fast(k, head, refs, pin):
                break
            if sched.active: await sched.point("gup:grabbed")
            if mm.huge_pmds.get(idx) is not hp:  # the PMD changed: put the pin back
                del pin.pages[-refs:]
                gup_put_folio(k, head, refs)
                break
            done += refs
            continue
        pt = mm.pgtables.get(idx)
        vpn = a >> PAGE_SHIFT
        pte = pt.ptes.get(vpn) if pt is not None else None  # ptep_get_lockless
        if pte is None or not pte.write or pte.folio is ZERO_PAGE:
            break
        if sched.active: await sched.point("gup:pte-read")
        folio = pte.folio
        if not try_grab_folio_fast(k, folio, 1, pin):  # freed, or frozen by a split
            break
        if sched.active: await sched.point("gup:grabbed")
        if pt is None or pt.ptes.get(vpn) is not pte:  # the PTE changed: put the pin back
            pin.pages.pop()
            gup_put_folio(k, folio, 1)
            break
        done += 1
    return done


async def follow_page(k: Kernel, cur: Current, mm: Mm, addr: int, nr_pages: int, pin: GupPin) -> int:
    """follow_page_mask for FOLL_WRITE | FOLL_PIN: under the PTE's (or huge PMD's) lock, pin the
    page at ``addr`` if it is present and writable (a huge PMD: its pages up to ``nr_pages``, in
    one step). Returns the pages pinned, 0 when a write fault must make the page writable first.
    Expects the mmap_lock held for read; takes the PTL or the PMD lock."""
    from .huge_memory import pmd_lock  # (huge_memory -> memory -> gup would loop)

    idx = addr >> PMD_SHIFT
    if mm.huge_pmds and idx in mm.huge_pmds:
        ptl = await pmd_lock(k, cur, mm, addr)
        try:
            hp = mm.huge_pmds.get(idx)
            if hp is None or not hp.write or hp.folio is HUGE_ZERO_FOLIO:  # can_follow_write_pmd
                return 0
            refs = min(nr_pages, HPAGE_PMD_NR - ((addr >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)))
            try_grab_folio(k, hp.folio, refs, pin)
            return refs
        finally:
            ptl.spin_unlock(cur)
    pt = mm.pgtables.get(idx)
    if pt is None:
        return 0
    await k.spin_lock(cur, pt.ptl)  # a mover preempted inside its PTL section
    try:
        pte = pt.ptes.get(addr >> PAGE_SHIFT)
        if pte is None or not pte.write or pte.folio is ZERO_PAGE:  # can_follow_write_pte
            return 0
        try_grab_folio(k, pte.folio, 1, pin)
        return 1
    finally:
        pt.ptl.spin_unlock(cur)


async def __get_user_pages(k: Kernel, cur: Current, mm: Mm, addr: int, nr_pages: int, pin: GupPin) -> int:
    """GUP's slow path from ``addr``: per page, its VMA checked (EFAULT for none and for one not
    writable), the page pinned where it is writable (follow_page), else a write fault that stores
    nothing (it may raise VmFaultRetry: a userfault, after which the caller waits and calls again
    for the rest). Returns the pages pinned. Expects the mmap_lock held for read."""
    from .memory import handle_mm_fault  # (memory -> gup: fork reads folio_needs_cow_for_dma)

    done = 0
    vma = None
    while done < nr_pages:
        a = addr + (done << PAGE_SHIFT)
        if vma is None or not vma.start <= a < vma.end:
            vma = mm.vma_lookup(a)
            if vma is None:
                raise MmError(errno.EFAULT, f"no mapping at {a:#x}", moved=done << PAGE_SHIFT)
            if not vma.flags & VM_WRITE:  # check_vma_flags: FOLL_WRITE on a VMA not writable
                raise MmError(errno.EFAULT, f"mapping at {a:#x} is not writable", moved=done << PAGE_SHIFT)
        got = await follow_page(k, cur, mm, a, nr_pages - done, pin)
        if got:
            done += got
            continue
        await handle_mm_fault(k, cur, vma, a, True, None)  # faultin_page(FOLL_WRITE)
    return done


def folio_needs_cow_for_dma(mm: Mm, folio: Folio) -> bool:
    """folio_needs_cow_for_dma: fork must copy the page now rather than share it, when the parent
    has ever pinned pages (MMF_HAS_PINNED) and the folio may be pinned."""
    return mm.has_pinned and folio_maybe_dma_pinned(folio)

