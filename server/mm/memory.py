"""Page faults, zapping and fork's PTE copy (mm/memory.c)."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from .locks import Current
from .mm_types import (
    FOLIO_BYTES,
    PAGE_SHIFT,
    PMD_SHIFT,
    PMD_SIZE,
    PTE_BYTES,
    VM_READ,
    VM_UFFD_MISSING,
    VM_UFFD_WP,
    VM_WRITE,
    ZERO_PAGE,
    Folio,
    Mm,
    MmError,
    PageTable,
    Pte,
    Vma,
)
from .rmap import anon_vma_prepare, folio_add_new_anon_rmap, folio_move_anon_rmap, unpin
from .sched import RESCHED_WORK, cond_resched
from .trace import trace_refcount

if TYPE_CHECKING:
    from .kernel import Kernel


def folio_get(k: Kernel, cur: Current, folio: Folio) -> None:
    """A reference on a mapped folio held by ``cur`` for a while (the mover's): a pin that
    folio_put(k, folio, cur) drops, or Kernel.give_back if the call fails."""
    folio.refcount += 1
    if k.trace: trace_refcount(k, folio, 1)
    cur.pins.append(folio)


def folio_put(k: Kernel, folio: Folio, cur: Current | None = None) -> None:
    """Drop a reference (``cur``'s pin, with ``cur``); the last frees the folio."""
    if cur is not None:
        unpin(cur, folio)
    folio.refcount -= 1
    if k.trace: trace_refcount(k, folio, -1)
    if folio.refcount == 0:
        k.folio_free(folio)


async def handle_mm_fault(k: Kernel, cur: Current, vma: Vma, addr: int, write: bool, value: int = 0) -> int:
    """A user access at ``addr``: returns the value read (or written). Expects mmap_lock held (read).
    A missing page in a VM_UFFD_MISSING VMA raises userfaultfd.VmFaultRetry (handle_userfault),
    and so does a write to a uffd-wp PTE in a VM_UFFD_WP VMA (do_wp_page).

    Faults take the anon_vma root rwsem (write, in anon_vma_prepare) and then the PTL (spinning
    first while a task preempted inside its PTL section holds it: Kernel.spin_on).
    """
    if not vma.flags & VM_READ or (write and not vma.flags & VM_WRITE):
        raise MmError(errno.EFAULT, f"{'write' if write else 'read'} access to {addr:#x} not permitted (SIGSEGV)")
    mm = vma.mm
    vpn = addr >> PAGE_SHIFT
    while True:
        pt = mm.pgtables.get(addr >> PMD_SHIFT)
        pte = pt.ptes.get(vpn) if pt is not None else None
        if pte is None:
            if vma.flags & VM_UFFD_MISSING:
                # handle_userfault: the event is queued; the caller drops mmap_lock, sleeps until
                # the page is resolved or woken (userfault_wait) and retries from the top.
                from .userfaultfd import handle_userfault  # (userfaultfd -> mmap -> memory)

                raise handle_userfault(k, cur, vma, addr, write)
            done = await do_anonymous_page(k, cur, vma, addr, write, value)
        elif not write:
            pte.young = True
            return pte.folio.value
        elif pte.write:
            pte.folio.value = value
            pte.young = pte.dirty = True
            return value
        else:
            done = await do_wp_page(k, cur, vma, addr, value)
        if done:
            return value if write else 0


async def do_anonymous_page(k: Kernel, cur: Current, vma: Vma, addr: int, write: bool, value: int) -> bool:
    """Fault on a none PTE: the zero page for a read, a new exclusive folio for a write.

    Returns False if the PTE changed under us and the fault must be retried.
    """
    mm = vma.mm
    vpn = addr >> PAGE_SHIFT
    memcg = k.memcg
    if not write:
        pt = mm.pte_alloc(cur, addr)
        if pt.ptl.owner is not None:  # a mover preempted inside its PTL section
            await k.spin_on(cur, pt.ptl)
        memcg.charge(cur, PTE_BYTES)
        pt.ptl.spin_lock(cur)
        raced = vpn in pt.ptes
        if not raced:
            pt.ptes[vpn] = Pte(ZERO_PAGE, False, True, False)
        pt.ptl.spin_unlock(cur)
        if raced:
            memcg.uncharge(PTE_BYTES)
        return not raced
    if vma.anon_vma is None:  # anon_vma_prepare's inline test
        await anon_vma_prepare(k, cur, vma)
    sched = k.sched
    if sched.active: await sched.point("fault:before-pte-lock")
    pt = mm.pte_alloc(cur, addr)
    if pt.ptl.owner is not None:  # a mover preempted inside its PTL section
        await k.spin_on(cur, pt.ptl)
    memcg.charge(cur, PTE_BYTES + FOLIO_BYTES)
    pt.ptl.spin_lock(cur)
    if vpn in pt.ptes:
        pt.ptl.spin_unlock(cur)
        memcg.uncharge(PTE_BYTES + FOLIO_BYTES)
        return False
    folio = k.folio_alloc()
    folio.value = value
    folio.refcount = 1
    folio_add_new_anon_rmap(folio, vma, addr)
    pt.ptes[vpn] = Pte(folio, True, True, True)
    mm.rss_anon += 1
    pt.ptl.spin_unlock(cur)
    k.stats["fault_new_folio"] += 1
    return True


async def do_wp_page(k: Kernel, cur: Current, vma: Vma, addr: int, value: int) -> bool:
    """Write fault on a present, write-protected PTE: a uffd-wp PTE in a VM_UFFD_WP VMA is a
    write-protect userfault (raises VmFaultRetry: the PTL is dropped first, the page stays as it
    is); otherwise reuse the folio if this is its only user (re-establishing exclusivity through
    folio_move_anon_rmap), else copy it (wp_page_copy). Expects mmap_lock held (read); takes the
    PTL."""
    mm = vma.mm
    vpn = addr >> PAGE_SHIFT
    pt = mm.pgtables[addr >> PMD_SHIFT]
    if pt.ptl.owner is not None:  # a mover preempted inside its PTL section
        await k.spin_on(cur, pt.ptl)
    pt.ptl.spin_lock(cur)
    pte = pt.ptes.get(vpn)
    if pte is None or pte.write:
        pt.ptl.spin_unlock(cur)
        return False
    if pte.uffd_wp and vma.flags & VM_UFFD_WP:  # userfaultfd_pte_wp
        pt.ptl.spin_unlock(cur)
        from .userfaultfd import handle_userfault  # (userfaultfd -> mmap -> memory)

        raise handle_userfault(k, cur, vma, addr, True, wp=True)
    folio = pte.folio
    if folio is not ZERO_PAGE and (folio.exclusive or wp_can_reuse_anon_folio(k, cur, folio, vma)):
        folio.exclusive = True  # SetPageAnonExclusive
        folio.value = value
        pte.write = pte.young = pte.dirty = True
        pt.ptl.spin_unlock(cur)
        k.stats["fault_wp_reuse"] += 1
        return True
    pt.ptl.spin_unlock(cur)
    return await wp_page_copy(k, cur, vma, addr, pte, value)


def wp_can_reuse_anon_folio(k: Kernel, cur: Current, folio: Folio, vma: Vma) -> bool:
    """Expects the PTL held. The folio may be reused when no one else holds a reference; the
    folio lock is only tried, never waited for. On success the folio moves to ``vma``'s own
    anon_vma (same root, so the root lock of any walker still covers it)."""
    if folio.refcount > 1:
        return False
    lock = folio.lock
    assert lock is not None
    if not lock.trylock(cur):
        return False
    if folio.refcount > 1:
        lock.unlock(cur)
        return False
    folio_move_anon_rmap(k, folio, vma)
    lock.unlock(cur)
    return True


async def wp_page_copy(k: Kernel, cur: Current, vma: Vma, addr: int, orig: Pte, value: int) -> bool:
    """Break COW: map a new exclusive folio holding the written value. Takes the anon_vma root
    (anon_vma_prepare), then the PTL."""
    if vma.anon_vma is None:
        await anon_vma_prepare(k, cur, vma)
    mm = vma.mm
    vpn = addr >> PAGE_SHIFT
    pt = mm.pgtables[addr >> PMD_SHIFT]
    if pt.ptl.owner is not None:  # a mover preempted inside its PTL section
        await k.spin_on(cur, pt.ptl)
    memcg = k.memcg
    memcg.charge(cur, FOLIO_BYTES)
    pt.ptl.spin_lock(cur)
    if pt.ptes.get(vpn) is not orig or orig.write:
        pt.ptl.spin_unlock(cur)
        memcg.uncharge(FOLIO_BYTES)
        return False
    old = orig.folio
    new = k.folio_alloc()
    new.value = value
    new.refcount = 1
    folio_add_new_anon_rmap(new, vma, addr)
    pt.ptes[vpn] = Pte(new, True, True, True)
    if old is ZERO_PAGE:
        mm.rss_anon += 1
    else:
        old.mapcount -= 1
        folio_put(k, old)
    pt.ptl.spin_unlock(cur)
    k.stats["fault_cow"] += 1
    return True


def _table_within(idx: int, lo: int, hi: int) -> bool:
    """Does the PTE table at PMD index ``idx`` lie wholly within page numbers [lo, hi)?"""
    return lo <= idx << (PMD_SHIFT - PAGE_SHIFT) and (idx + 1) << (PMD_SHIFT - PAGE_SHIFT) <= hi


async def zap_pte_range(
    k: Kernel, cur: Current, mm: Mm, start: int, end: int, unmapped: list[int] | None = None
) -> int:
    """Unmap every PTE in [start, end), dropping mapcounts and references. Expects mmap_lock held
    for write; takes each PTL in turn. Visits only the PTE tables that exist and lets other tasks
    run between tables every RESCHED_WORK PTEs (no PTL held then). Appends the virtual page number
    of every folio unmapped to ``unmapped``. Returns the number of PTEs zapped."""
    zapped = 0
    work = 0
    lo, hi = start >> PAGE_SHIFT, end >> PAGE_SHIFT
    memcg = k.memcg
    for idx in mm.pgtables_in(start, end):
        pt = mm.pgtables.get(idx)
        if pt is None or not pt.ptes:
            continue
        pt.ptl.spin_lock(cur)
        ptes = pt.ptes
        if _table_within(idx, lo, hi):
            vpns = list(ptes)
        else:
            vpns = [v for v in ptes if lo <= v < hi]
        for vpn in vpns:
            folio = ptes.pop(vpn).folio
            if folio is not ZERO_PAGE:
                folio.mapcount -= 1
                mm.rss_anon -= 1
                folio_put(k, folio)
                if unmapped is not None:
                    unmapped.append(vpn)
        pt.ptl.spin_unlock(cur)
        memcg.uncharge(len(vpns) * PTE_BYTES)
        zapped += len(vpns)
        work += len(vpns) + 1
        if work >= RESCHED_WORK:
            work = 0
            await cond_resched()
    return zapped


async def free_pgtables(mm: Mm, start: int, end: int) -> None:
    """Free the PTE tables of [start, end) that no VMA overlaps any more. Expects mmap_lock held
    for write; lets other tasks run every RESCHED_WORK tables."""
    work = 0
    for idx in mm.pgtables_in(start, end):
        lo = idx << PMD_SHIFT
        if not mm.vmas_in(lo, lo + PMD_SIZE):
            mm.pte_free(idx)
        work += 1
        if work >= RESCHED_WORK:
            work = 0
            await cond_resched()


async def copy_page_range(
    k: Kernel, cur: Current, dst_vma: Vma, src_vma: Vma, folio_vpns: list[int] | None = None
) -> int:
    """Fork's PTE copy for one VMA. Expects both mmap_locks held (write). Per PTE table of the
    parent that exists: charges the child's table and PTEs (ENOMEM before anything of that table
    is copied), takes the child's PTL, then the parent's nested. Present anon pages lose
    exclusivity and gain a mapping; both PTEs are write-protected; the child's PTE is made old.
    Lets other tasks run between tables every RESCHED_WORK PTEs. Appends the page number of every
    folio mapped into the child to ``folio_vpns``. Returns the PTEs copied."""
    src_mm, dst_mm = src_vma.mm, dst_vma.mm
    lo, hi = src_vma.start >> PAGE_SHIFT, src_vma.end >> PAGE_SHIFT
    memcg = k.memcg
    copied = 0
    work = 0
    for idx in src_mm.pgtables_in(src_vma.start, src_vma.end):
        src_pt = src_mm.pgtables.get(idx)
        if src_pt is None or not src_pt.ptes:
            continue
        whole = _table_within(idx, lo, hi)
        n = len(src_pt.ptes) if whole else sum(1 for v in src_pt.ptes if lo <= v < hi)
        if not n:
            continue
        memcg.charge(cur, n * PTE_BYTES)
        try:
            dst_pt: PageTable = dst_mm.pte_alloc(cur, idx << PMD_SHIFT)
        except BaseException:
            memcg.uncharge(n * PTE_BYTES)
            raise
        dst_pt.ptl.spin_lock(cur)
        src_pt.ptl.spin_lock(cur, nested=True)
        dst_ptes = dst_pt.ptes
        rss = 0
        for vpn, pte in src_pt.ptes.items():
            if not whole and (vpn < lo or vpn >= hi):
                continue
            folio = pte.folio
            if folio is not ZERO_PAGE:
                folio.refcount += 1
                folio.mapcount += 1
                folio.exclusive = False
                pte.write = False
                rss += 1
                if folio_vpns is not None:
                    folio_vpns.append(vpn)
            dst_ptes[vpn] = Pte(folio, False, False, pte.dirty)
        dst_mm.rss_anon += rss
        src_pt.ptl.spin_unlock(cur)
        dst_pt.ptl.spin_unlock(cur)
        copied += n
        work += n + 1
        if work >= RESCHED_WORK:
            work = 0
            await cond_resched()
    return copied
