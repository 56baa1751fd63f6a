"""Page faults, swap-in, zapping and fork's PTE copy (mm/memory.c)."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from .gup import folio_needs_cow_for_dma
from .huge_memory import (
    copy_huge_pmd,
    do_huge_pmd_anonymous_page,
    do_huge_pmd_wp_page,
    thp_vma_allowable_order,
    thp_vma_suitable_order,
    zap_huge_pmds,
)
from .locks import Current
from .memcontrol import MemoryLimitExceeded
from .migrate import migration_entry_wait
from .mm_types import (
    FOLIO_BYTES,
    HPAGE_PMD_NR,
    HPAGE_PMD_ORDER,
    PAGE_SHIFT,
    PMD_SHIFT,
    PMD_SIZE,
    PTE_BYTES,
    VM_READ,
    VM_UFFD_FLAGS,
    VM_UFFD_MISSING,
    VM_UFFD_WP,
    VM_WRITE,
    ZERO_PAGE,
    Folio,
    LargeFolio,
    MigrationEntry,
    Mm,
    MmError,
    PageTable,
    Pte,
    SwapPte,
    Vma,
    folio_bytes,
    is_migration_entry,
)
from .page_ref import folio_put_testzero, folio_ref_add
from .rmap import (
    __page_check_anon_rmap,
    anon_vma_prepare,
    folio_add_new_anon_rmap,
    folio_dup_anon_rmap_pte,
    folio_move_anon_rmap,
    folio_remove_rmap_pte,
    unpin,
)
from .sched import RESCHED_WORK, cond_resched
from .swap import folio_add_lru
from .swap_state import folio_matches_swap_entry, swap_cache_add_folio, swap_cache_del_folio, swap_cache_get_folio
from .swapfile import (
    SWAP_HAS_CACHE,
    SwapInfo,
    SwpEntry,
    swap_duplicate,
    swap_entries_put_map,
    swap_free,
    swapcache_prepare,
    swp_swapcount,
)

if TYPE_CHECKING:
    from .kernel import Kernel


def folio_get(k: Kernel, cur: Current, folio: Folio) -> None:
    """A reference on a mapped folio held by ``cur`` for a while (the mover's): a pin that
    folio_put(k, folio, cur) drops, or Kernel.give_back if the call fails."""
    folio_ref_add(k, folio, 1)
    cur.pins.append(folio)


def folio_put(k: Kernel, folio: Folio, cur: Current | None = None) -> None:
    """Drop a reference (``cur``'s pin, with ``cur``); the last frees the folio."""
    if cur is not None:
        unpin(cur, folio)
    if folio_put_testzero(k, folio):
        k.folio_free(folio)


async def handle_mm_fault(
    k: Kernel, cur: Current, vma: Vma, addr: int, write: bool, value: int | None = 0
) -> int:
    """A user access at ``addr``: returns the value read (or written). Expects mmap_lock held (read).
    A write with ``value`` None is a write fault that stores nothing (GUP's FOLL_WRITE: the page is
    made present, writable and exclusive, its contents kept; a new page is zeros).
    A missing page in a VM_UFFD_MISSING VMA raises userfaultfd.VmFaultRetry (handle_userfault),
    and so does a write to a uffd-wp PTE in a VM_UFFD_WP VMA (do_wp_page). A swap PTE is faulted
    in (do_swap_page), registered or not.

    Faults take the anon_vma root rwsem (write, in anon_vma_prepare) and then the PTL (spinning
    first while a task preempted inside its PTL section holds it: Kernel.spin_on).
    """
    if not vma.flags & VM_READ or (write and not vma.flags & VM_WRITE):
        raise MmError(errno.EFAULT, f"{'write' if write else 'read'} access to {addr:#x} not permitted (SIGSEGV)")
    mm = vma.mm
    vpn = addr >> PAGE_SHIFT
    idx = addr >> PMD_SHIFT
    while True:
        if mm.huge_pmds and (hp := mm.huge_pmds.get(idx)) is not None:  # pmd_trans_huge
            folio = hp.folio
            i = vpn & (HPAGE_PMD_NR - 1)
            if not write:
                hp.young = True
                return folio.page_value(i)
            if hp.write:
                if value is not None:
                    folio.set_page_value(i, value)
                hp.young = hp.dirty = True
                return value or 0
            if await do_huge_pmd_wp_page(k, cur, vma, addr, value, hp):
                return value or 0
            continue
        pt = mm.pgtables.get(idx)
        if pt is None and not vma.flags & VM_UFFD_MISSING and thp_vma_allowable_order(k, vma, HPAGE_PMD_ORDER):
            done = await do_huge_pmd_anonymous_page(k, cur, vma, addr, write, value)
            if done is None:  # VM_FAULT_FALLBACK
                done = await do_anonymous_page(k, cur, vma, addr, write, value)
            if done:
                return (value or 0) if write else 0
            continue
        pte = pt.ptes.get(vpn) if pt is not None else None
        if pte is None:
            swp = pt.swap.get(vpn) if pt is not None else None
            if swp is not None:
                done = await do_swap_page(k, cur, vma, addr, write, value, swp)
            elif vma.flags & VM_UFFD_MISSING:
                # handle_userfault: the event is queued; the caller drops mmap_lock, sleeps until
                # the page is resolved or woken (userfault_wait) and retries from the top.
                from .userfaultfd import handle_userfault  # (userfaultfd -> mmap -> memory)

                raise handle_userfault(k, cur, vma, addr, write)
            else:
                done = await do_anonymous_page(k, cur, vma, addr, write, value)
        elif not write:
            pte.young = True
            return pte.folio.page_value(pte.page)
        elif pte.write:
            if value is not None:
                pte.folio.set_page_value(pte.page, value)
            pte.young = pte.dirty = True
            return value or 0
        else:
            done = await do_wp_page(k, cur, vma, addr, value)
        if done:
            return (value or 0) if write else 0


async def charge_pte(k: Kernel, cur: Current, pt: PageTable, nbytes: int) -> None:
    """Charge what a fault or a fill is about to map under ``pt``'s PTL, reclaiming first if the
    budget is full (vmscan.mem_cgroup_charge: ENOMEM once reclaim frees nothing), and wait while
    a task preempted inside its PTL section holds that PTL (Kernel.spin_on; the charge is given
    back if that fails). Expects no PTL held."""
    if pt.ptl.owner is not None:  # a mover preempted inside its PTL section
        await k.spin_on(cur, pt.ptl)
    try:
        k.memcg.charge(cur, nbytes)
        return
    except MemoryLimitExceeded:
        from .vmscan import mem_cgroup_charge  # (vmscan -> memory)

        await mem_cgroup_charge(k, cur, nbytes)
    if pt.ptl.owner is not None:  # again: reclaim let others run
        try:
            await k.spin_on(cur, pt.ptl)
        except BaseException:
            k.memcg.uncharge(nbytes)
            raise


async def do_anonymous_page(
    k: Kernel, cur: Current, vma: Vma, addr: int, write: bool, value: int | None
) -> bool:
    """Fault on a none PTE: the zero page for a read, a new exclusive folio for a write.

    Returns False if the PTE changed under us and the fault must be retried.
    """
    mm = vma.mm
    vpn = addr >> PAGE_SHIFT
    memcg = k.memcg
    if not write:
        pt = mm.pte_alloc(cur, addr)
        await charge_pte(k, cur, pt, PTE_BYTES)
        pt.ptl.spin_lock(cur)
        raced = vpn in pt.ptes or vpn in pt.swap
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
    if k.thp_orders.keys() - {HPAGE_PMD_ORDER} and not vma.flags & VM_UFFD_FLAGS:  # !userfaultfd_armed
        done = await alloc_anon_folio(k, cur, vma, addr, value)
        if done is not None:
            return done
    pt = mm.pte_alloc(cur, addr)
    if pt.ptl.owner is not None:  # a mover preempted inside its PTL section
        await k.spin_on(cur, pt.ptl)
    try:  # charge_pte, inline on the fault path
        memcg.charge(cur, PTE_BYTES + FOLIO_BYTES)
    except MemoryLimitExceeded:
        await charge_pte(k, cur, pt, PTE_BYTES + FOLIO_BYTES)  # reclaim, then charge
    pt.ptl.spin_lock(cur)
    if vpn in pt.ptes or vpn in pt.swap:
        pt.ptl.spin_unlock(cur)
        memcg.uncharge(PTE_BYTES + FOLIO_BYTES)
        return False
    folio = k.folio_alloc()
    folio.value = value or 0
    folio.refcount = 1
    folio_add_new_anon_rmap(folio, vma, addr)
    folio_add_lru(k.lruvec, folio)
    pt.ptes[vpn] = Pte(folio, True, True, True)
    mm.rss_anon += 1
    pt.ptl.spin_unlock(cur)
    k.stats["fault_new_folio"] += 1
    return True


async def alloc_anon_folio(k: Kernel, cur: Current, vma: Vma, addr: int, value: int | None) -> bool | None:
    """A write fault's mTHP (alloc_anon_folio, then the rest of do_anonymous_page): the largest
    order below the PMD's that the policy allows for ``vma``, whose naturally aligned range around
    ``addr`` fits the VMA and has every PTE none, and that can be charged (each failure tries the
    next order down). The folio is zeros but for ``value`` at ``addr``'s page, every page mapped
    by a writable, dirty, young PTE. Returns None to fall back to a small folio, False when a PTE
    appeared meanwhile (retry), True when done. Expects mmap_lock (or the VMA lock) held for read
    and the VMA's anon_vma; takes the PTL."""
    mm = vma.mm
    pt = mm.pgtables.get(addr >> PMD_SHIFT)
    for order in sorted(k.thp_orders, reverse=True):
        if order >= HPAGE_PMD_ORDER or not thp_vma_allowable_order(k, vma, order):
            continue
        if not thp_vma_suitable_order(vma, addr, order):
            continue
        nr = 1 << order
        vpn0 = (addr >> PAGE_SHIFT) & ~(nr - 1)
        if pt is not None and any(not pt.pte_none(v) for v in range(vpn0, vpn0 + nr)):  # pte_range_none
            continue
        nbytes = folio_bytes(order) + nr * PTE_BYTES
        try:
            k.memcg.charge(cur, nbytes)
        except MemoryLimitExceeded:
            k.stats["mthp_fault_fallback"] += 1
            continue
        try:
            pt = mm.pte_alloc(cur, addr)
        except BaseException:
            k.memcg.uncharge(nbytes)
            raise
        if pt.ptl.owner is not None:  # a mover preempted inside its PTL section
            try:
                await k.spin_on(cur, pt.ptl)
            except BaseException:
                k.memcg.uncharge(nbytes)
                raise
        pt.ptl.spin_lock(cur)
        if any(not pt.pte_none(v) for v in range(vpn0, vpn0 + nr)):
            pt.ptl.spin_unlock(cur)
            k.memcg.uncharge(nbytes)
            return False
        folio = k.folio_alloc_large(order)
        if value is not None:
            folio.set_page_value((addr >> PAGE_SHIFT) - vpn0, value)
        folio.refcount = nr
        folio_add_new_anon_rmap(folio, vma, vpn0 << PAGE_SHIFT)
        folio_add_lru(k.lruvec, folio)
        ptes = pt.ptes
        for i in range(nr):
            ptes[vpn0 + i] = Pte(folio, True, True, True, page=i)
        mm.rss_anon += nr
        pt.ptl.spin_unlock(cur)
        k.stats["mthp_fault_alloc"] += 1
        return True
    return None


def vm_swap_full(si: SwapInfo) -> bool:
    """Over half the swap device is in use: swap-in lets go of the slots it can."""
    return si.nr_swap_pages * 2 < si.pages


def folio_free_swap(k: Kernel, folio: Folio) -> bool:
    """Take a locked folio in the swap cache out of it, if no swap PTE names its slot any more:
    the slot is freed and the folio, the only copy now, is dirty. Returns True if it was."""
    si = k.swap
    assert folio.swap is not None
    if swp_swapcount(si, folio.swap):  # folio_swapped
        return False
    swap_cache_del_folio(k, si, folio)
    folio.dirty = True  # folio_set_dirty
    return True


async def swapin_folio(k: Kernel, cur: Current, vma: Vma, entry: SwpEntry) -> Folio | None:
    """The folio for ``entry``, with a reference for the caller: the one in the swap cache (a hit),
    or a new one read from the slot and added to the swap cache (read_swap_cache_async; the model
    reads one slot, no readahead). None when another task is adding one (swapcache_prepare's
    EEXIST: the fault is retried) or the slot is free again (the PTE changed). Charges a new
    folio (ENOMEM)."""
    si = k.swap
    folio = swap_cache_get_folio(k, si, entry)
    if folio is not None:
        k.stats["swap_cache_hit"] += 1
        return folio
    try:
        k.memcg.charge(cur, FOLIO_BYTES)
    except MemoryLimitExceeded:
        from .vmscan import mem_cgroup_charge  # (vmscan -> memory)

        await mem_cgroup_charge(k, cur, FOLIO_BYTES)
        k.memcg.uncharge(FOLIO_BYTES)
        return None  # reclaim ran (it may have freed or added this very folio): fault again
    if swapcache_prepare(si, entry):
        k.memcg.uncharge(FOLIO_BYTES)
        return None
    folio = k.folio_alloc()
    folio.refcount = 1
    lock = folio.lock
    assert lock is not None
    lock.trylock(cur)  # a new folio: no one else can hold it
    swap_cache_add_folio(k, si, folio, entry)
    folio.value = si.swap_data[entry.offset]  # swap_read_folio
    folio_add_lru(k.lruvec, folio)
    lock.unlock(cur)
    k.stats["swap_in"] += 1
    return folio


async def do_swap_page(
    k: Kernel, cur: Current, vma: Vma, addr: int, write: bool, value: int | None, orig: SwapPte
) -> bool:
    """Fault on a swap PTE: find or read its folio (swapin_folio), lock it, and map it in place of
    the swap PTE, the slot's count put (swap_free). The page is mapped exclusive (RMAP_EXCLUSIVE)
    and writable if the VMA is when the swap PTE was exclusive or no one else holds the folio;
    else read-only and shared. A folio new to the rmap gets ``vma``'s anon_vma; one that already
    has an anon_vma keeps it (an ancestor's, reference I8) and must sit where ``vma`` would put
    it (the kernel's __page_check_anon_rmap BUG_ON: the ``anon-rmap-mismatch`` detector). A write
    fault lets go of the slot if nothing else needs it, as does a fault while swap is over half
    full. The uffd-wp and soft-dirty bits carry over to the PTE; a write to a uffd-wp page then
    faults to its handler (do_wp_page). Expects mmap_lock (or the VMA's lock) held for read;
    takes the folio lock (sleeping if need be), then the PTL. Returns True when a write was done;
    False to retry the fault (a read then finds the page present)."""
    mm = vma.mm
    vpn = addr >> PAGE_SHIFT
    si = k.swap
    entry = orig.entry
    if is_migration_entry(entry):  # is_migration_entry: a split has the page unmapped
        await migration_entry_wait(k, cur, mm, addr, orig)
        return False
    folio = await swapin_folio(k, cur, vma, entry)
    if folio is None:
        return False
    cur.pins.append(folio)  # Kernel.give_back puts it if the fault fails
    sched = k.sched
    if sched.active: await sched.point("swapin:after-lookup")
    lock = folio.lock
    assert lock is not None
    if not lock.trylock(cur):  # folio_lock_or_retry
        if not lock.lock(cur): await lock.wait(cur)
    pt = mm.pgtables.get(addr >> PMD_SHIFT)
    if pt is not None and pt.ptl.owner is not None:  # a mover preempted inside its PTL section
        await k.spin_on(cur, pt.ptl)
    if pt is None or not folio_matches_swap_entry(folio, entry) or pt.swap.get(vpn) is not orig:
        lock.unlock(cur)
        folio_put(k, folio, cur)  # the PTE or the swap cache changed: retry
        return False
    pt.ptl.spin_lock(cur)
    unpin(cur, folio)  # the reference becomes the mapping's
    exclusive = orig.exclusive
    del pt.swap[vpn]
    swap_free(si, entry)
    if write or vm_swap_full(si):  # should_try_to_free_swap
        if folio.refcount == 2:
            folio_free_swap(k, folio)
    writable = dirty = False
    rmap_exclusive = exclusive or folio.refcount == 1
    if rmap_exclusive and vma.flags & VM_WRITE and not (orig.uffd_wp and vma.flags & VM_UFFD_WP):
        writable = True
        dirty = write
    if folio.mapping is None:  # !folio_test_anon: read in for this fault
        assert vma.anon_vma is not None
        folio_add_new_anon_rmap(folio, vma, addr)
        if not rmap_exclusive:  # shared: the oldest anon_vma there is, the root (__folio_set_anon)
            folio.mapping = vma.anon_vma.root
            folio.exclusive = False
    else:  # folio_add_anon_rmap_pte
        if k.detect: __page_check_anon_rmap(k, cur, folio, 0, vma, addr)
        folio.mapcount += 1
        if rmap_exclusive:
            folio.exclusive = True
    if dirty and value is not None:
        folio.value = value
    pt.ptes[vpn] = Pte(folio, writable, True, dirty, orig.uffd_wp, orig.soft_dirty)
    mm.rss_anon += 1
    mm.swap_ents -= 1
    pt.ptl.spin_unlock(cur)
    lock.unlock(cur)
    k.stats["fault_swap_in"] += 1
    return dirty


def free_swap_cache(k: Kernel, cur: Current, folio: Folio) -> None:
    """A folio in the swap cache lost its last mapping to a zap: take it out of the swap cache if
    no swap PTE needs its slot and its lock can be had at once (free_pages_and_swap_cache)."""
    lock = folio.lock
    assert lock is not None
    if lock.trylock(cur):
        folio_free_swap(k, folio)
        lock.unlock(cur)


def free_swap_and_cache(k: Kernel, cur: Current, entry: SwpEntry) -> None:
    """A swap PTE is zapped: put its count; if only the swap cache holds the slot then and its
    folio is mapped nowhere, take the folio out of the swap cache (freeing it, and the slot) if
    its lock can be had at once (__try_to_reclaim_swap). Expects the PTL held."""
    si = k.swap
    if not swap_entries_put_map(si, entry):
        return
    folio = swap_cache_get_folio(k, si, entry)
    if folio is None:
        return
    lock = folio.lock
    assert lock is not None
    if lock.trylock(cur):
        if not folio.mapcount and si.swap_map[entry.offset] == SWAP_HAS_CACHE:
            swap_cache_del_folio(k, si, folio)
            folio.dirty = True
        lock.unlock(cur)
    folio_put(k, folio)


async def do_wp_page(k: Kernel, cur: Current, vma: Vma, addr: int, value: int | None) -> bool:
    """Write fault on a present, write-protected PTE: a uffd-wp PTE in a VM_UFFD_WP VMA is a
    write-protect userfault (raises VmFaultRetry: the PTL is dropped first, the page stays as it
    is); otherwise reuse the folio if this is its only user (re-establishing exclusivity through
    folio_move_anon_rmap), else copy it (wp_page_copy). Expects mmap_lock held (read); takes the
    PTL."""
    mm = vma.mm
    vpn = addr >> PAGE_SHIFT
    pt = mm.pgtables[addr >> PMD_SHIFT]
    await k.spin_lock(cur, pt.ptl)  # a mover preempted inside its PTL section
    pte = pt.ptes.get(vpn)
    if pte is None or pte.write:
        pt.ptl.spin_unlock(cur)
        return False
    if pte.uffd_wp and vma.flags & VM_UFFD_WP:  # userfaultfd_pte_wp
        pt.ptl.spin_unlock(cur)
        from .userfaultfd import handle_userfault  # (userfaultfd -> mmap -> memory)

        raise handle_userfault(k, cur, vma, addr, True, wp=True)
    folio = pte.folio
    page = pte.page
    if folio is not ZERO_PAGE and (folio.page_anon_exclusive(page) or wp_can_reuse_anon_folio(k, cur, folio, vma)):
        folio.set_page_anon_exclusive(page, True)  # SetPageAnonExclusive
        if value is not None:
            folio.set_page_value(page, value)
        pte.write = pte.young = pte.dirty = True
        pt.ptl.spin_unlock(cur)
        k.stats["fault_wp_reuse"] += 1
        return True
    pt.ptl.spin_unlock(cur)
    return await wp_page_copy(k, cur, vma, addr, pte, value)


def wp_can_reuse_anon_folio(k: Kernel, cur: Current, folio: Folio, vma: Vma) -> bool:
    """Expects the PTL held. The folio may be reused when no one else holds a reference (the
    swap cache's aside: a folio in the swap cache leaves it, if no swap PTE still names its slot,
    folio_free_swap); the folio lock is only tried, never waited for. On success the folio moves
    to ``vma``'s own anon_vma (same root, so the root lock of any walker still covers it)."""
    if isinstance(folio, LargeFolio):
        return wp_can_reuse_large_anon_folio(k, cur, folio)
    if folio.refcount > 1 + folio.swapcache:
        return False
    lock = folio.lock
    assert lock is not None
    if not lock.trylock(cur):
        return False
    if folio.swapcache:
        folio_free_swap(k, folio)
    if folio.refcount > 1:
        lock.unlock(cur)
        return False
    folio_move_anon_rmap(k, folio, vma)
    lock.unlock(cur)
    return True


def wp_can_reuse_large_anon_folio(k: Kernel, cur: Current, folio: LargeFolio) -> bool:
    """__wp_can_reuse_large_anon_folio: a large folio's page may be reused in place when more
    than one of its pages is mapped, only by this mm, and every reference is a mapping's (the
    swap cache let go of first, if its lock can be had at once). Expects the PTL held."""
    if folio.mapcount <= 1 or folio.maybe_mapped_shared():
        return False
    if folio.swapcache:
        lock = folio.lock
        assert lock is not None
        if not lock.trylock(cur):
            return False
        folio_free_swap(k, folio)
        lock.unlock(cur)
    return folio.mapcount == folio.refcount


async def wp_page_copy(k: Kernel, cur: Current, vma: Vma, addr: int, orig: Pte, value: int | None) -> bool:
    """Break COW: map a new exclusive folio holding the written value. Takes the anon_vma root
    (anon_vma_prepare), then the PTL."""
    if vma.anon_vma is None:
        await anon_vma_prepare(k, cur, vma)
    mm = vma.mm
    vpn = addr >> PAGE_SHIFT
    pt = mm.pgtables[addr >> PMD_SHIFT]
    memcg = k.memcg
    await charge_pte(k, cur, pt, FOLIO_BYTES)
    await k.spin_lock(cur, pt.ptl)
    if pt.ptes.get(vpn) is not orig or orig.write:
        pt.ptl.spin_unlock(cur)
        memcg.uncharge(FOLIO_BYTES)
        return False
    old = orig.folio
    new = k.folio_alloc()
    new.value = orig.value if value is None else value  # None: the copy keeps the old contents
    new.refcount = 1
    folio_add_new_anon_rmap(new, vma, addr)
    folio_add_lru(k.lruvec, new)
    pt.ptes[vpn] = Pte(new, True, True, True, soft_dirty=orig.soft_dirty)
    if old is ZERO_PAGE:
        mm.rss_anon += 1
    else:
        folio_remove_rmap_pte(k, old, orig.page, mm)
        folio_put(k, old)
    pt.ptl.spin_unlock(cur)
    k.stats["fault_cow"] += 1
    return True


async def _fork_charge(k: Kernel, cur: Current, nbytes: int) -> None:
    """Charge what fork copies of one PTE table, reclaiming first if the budget is full (as memcg
    does for page tables)."""
    try:
        k.memcg.charge(cur, nbytes)
    except MemoryLimitExceeded:
        from .vmscan import mem_cgroup_charge  # (vmscan -> memory)

        # Reclaim may turn some of these PTEs into swap PTEs (one for one: the count holds).
        await mem_cgroup_charge(k, cur, nbytes)


def _count_cow_for_dma(mm: Mm, pt: PageTable, lo: int, hi: int, whole: bool) -> int:
    """The present pages of ``pt`` in [lo, hi) that fork must copy at once (folio_needs_cow_for_dma
    on an exclusive page)."""
    if not mm.has_pinned:
        return 0
    return sum(
        1 for vpn, pte in pt.ptes.items()
        if (whole or lo <= vpn < hi) and pte.folio is not ZERO_PAGE and pte.folio.page_anon_exclusive(pte.page)
        and folio_needs_cow_for_dma(mm, pte.folio)
    )


def copy_present_page(k: Kernel, dst_vma: Vma, addr: int, pte: Pte) -> Pte:
    """copy_present_page: the child's own copy of a page the parent may have pinned: a new
    exclusive folio holding the page's contents, mapped dirty and (in a writable VMA) writable;
    the parent's PTE stays as it is. The caller has charged FOLIO_BYTES and holds both PTLs."""
    new = k.folio_alloc()
    new.value = pte.value
    new.refcount = 1
    folio_add_new_anon_rmap(new, dst_vma, addr)
    folio_add_lru(k.lruvec, new)
    return Pte(new, bool(dst_vma.flags & VM_WRITE), True, True, soft_dirty=pte.soft_dirty)


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
    zapped = await zap_huge_pmds(k, cur, mm, start, end, unmapped) if mm.huge_pmds else 0
    work = 0
    lo, hi = start >> PAGE_SHIFT, end >> PAGE_SHIFT
    memcg = k.memcg
    for idx in mm.pgtables_in(start, end):
        pt = mm.pgtables.get(idx)
        if pt is None or not (pt.ptes or pt.swap):
            continue
        await k.spin_lock(cur, pt.ptl)  # MADV_DONTNEED runs beside a mover preempted in its PTL section
        ptes = pt.ptes
        whole = _table_within(idx, lo, hi)
        vpns = list(ptes) if whole else [v for v in ptes if lo <= v < hi]
        for vpn in vpns:
            pte = ptes.pop(vpn)
            folio = pte.folio
            if folio is not ZERO_PAGE:
                if folio.large:
                    folio_remove_rmap_pte(k, folio, pte.page, mm)
                else:
                    folio.mapcount -= 1
                mm.rss_anon -= 1
                if folio.swapcache and not folio.mapcount:
                    free_swap_cache(k, cur, folio)
                folio_put(k, folio)
                if unmapped is not None:
                    unmapped.append(vpn)
        n = len(vpns)
        if pt.swap:  # zap_nonpresent_ptes
            swap = pt.swap
            vpns = list(swap) if whole else [v for v in swap if lo <= v < hi]
            for vpn in vpns:
                entry = swap.pop(vpn).entry
                if is_migration_entry(entry):  # the split maps nothing here now
                    mm.rss_anon -= 1
                    continue
                free_swap_and_cache(k, cur, entry)
                mm.swap_ents -= 1
                if unmapped is not None:
                    unmapped.append(vpn)
            n += len(vpns)
        pt.ptl.spin_unlock(cur)
        memcg.uncharge(n * PTE_BYTES)
        zapped += n
        work += n + 1
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


def copy_nonpresent_ptes(
    k: Kernel, dst_mm: Mm, src_pt: PageTable, dst_pt: PageTable, lo: int, hi: int, whole: bool,
    folio_vpns: list[int] | None,
) -> int:
    """Fork's copy of the swap PTEs of [lo, hi) (copy_nonpresent_pte): each slot's count raised
    (swap_duplicate), an exclusive parent's swap PTE made shared, the child's without the uffd-wp
    bit (it is not registered). A migration entry is copied made readable in both (the page is
    shared once the split maps it), and counts in the child's MM_ANONPAGES. Expects both PTLs
    held. Returns the swap PTEs copied (migration entries not counted)."""
    si = k.swap
    dst = dst_pt.swap
    n = len(dst)
    for vpn, swp in src_pt.swap.items():
        if not whole and not lo <= vpn < hi:
            continue
        entry = swp.entry
        if is_migration_entry(entry):
            entry.write = entry.exclusive = False  # make_readable_migration_entry
            dst[vpn] = SwapPte(
                MigrationEntry(entry.folio, entry.page, False, False, entry.young, entry.dirty), False, False,
                swp.soft_dirty,
            )
            dst_mm.rss_anon += 1
            n += 1
            if folio_vpns is not None:
                folio_vpns.append(vpn)
            continue
        err = swap_duplicate(si, entry)
        assert err == 0, f"copy_nonpresent_pte: swap_duplicate {entry.trace_name}: {err}"
        swp.exclusive = False  # pte_swp_clear_exclusive in the parent
        dst[vpn] = SwapPte(entry, False, False, swp.soft_dirty)
        if folio_vpns is not None:
            folio_vpns.append(vpn)
    return len(dst) - n


async def copy_page_range(
    k: Kernel, cur: Current, dst_vma: Vma, src_vma: Vma, folio_vpns: list[int] | None = None
) -> int:
    """Fork's PTE copy for one VMA. Expects both mmap_locks held (write). Per PTE table of the
    parent that exists: charges the child's table and PTEs (ENOMEM before anything of that table
    is copied), takes the child's PTL, then the parent's nested. Present anon pages lose
    exclusivity and gain a mapping; both PTEs are write-protected; the child's PTE is made old.
    Lets other tasks run between tables every RESCHED_WORK PTEs. Appends the page number of every
    folio mapped into the child to ``folio_vpns``. Returns the PTEs copied. A charge that finds the
    budget full reclaims first (vmscan.mem_cgroup_charge), as memcg does for page tables."""
    src_mm, dst_mm = src_vma.mm, dst_vma.mm
    lo, hi = src_vma.start >> PAGE_SHIFT, src_vma.end >> PAGE_SHIFT
    memcg = k.memcg
    copied = 0
    work = 0
    for idx in src_mm.huge_pmds_in(src_vma.start, src_vma.end):
        if await copy_huge_pmd(k, cur, dst_vma, src_vma, idx, folio_vpns):
            copied += 1  # else split: its PTE table is copied below
    for idx in src_mm.pgtables_in(src_vma.start, src_vma.end):
        src_pt = src_mm.pgtables.get(idx)
        if src_pt is None:
            continue
        whole = _table_within(idx, lo, hi)
        n = len(src_pt.ptes) if whole else sum(1 for v in src_pt.ptes if lo <= v < hi)
        n += len(src_pt.swap) if whole else sum(1 for v in src_pt.swap if lo <= v < hi)
        if not n:
            dst_mm.pte_alloc(cur, idx << PMD_SHIFT)  # copy_pte_range allocates the child's table all the same
            continue
        # The pages the child gets a copy of at once, each a new folio charged here (the
        # kernel's prealloc); counted again under the PTLs, as GUP-fast may pin meanwhile.
        ncopy = _count_cow_for_dma(src_mm, src_pt, lo, hi, whole)
        charged = n * PTE_BYTES + ncopy * FOLIO_BYTES
        await _fork_charge(k, cur, charged)
        try:
            dst_pt: PageTable = dst_mm.pte_alloc(cur, idx << PMD_SHIFT)
        except BaseException:
            memcg.uncharge(charged)
            raise
        while True:
            # the parent's table may be shared with a VMA a mover (preempted in its PTL section) holds
            if src_pt.ptl.owner is not None:
                await k.spin_on(cur, src_pt.ptl)
            dst_pt.ptl.spin_lock(cur)
            src_pt.ptl.spin_lock(cur, nested=True)
            more = _count_cow_for_dma(src_mm, src_pt, lo, hi, whole) - ncopy
            if more <= 0:
                break
            src_pt.ptl.spin_unlock(cur)
            dst_pt.ptl.spin_unlock(cur)
            await _fork_charge(k, cur, more * FOLIO_BYTES)  # copy_pte_range's -EAGAIN: prealloc
            ncopy += more
            charged += more * FOLIO_BYTES
        dst_ptes = dst_pt.ptes
        rss = 0
        copies = 0
        for vpn, pte in src_pt.ptes.items():
            if not whole and (vpn < lo or vpn >= hi):
                continue
            folio = pte.folio
            if folio is not ZERO_PAGE:
                if folio.page_anon_exclusive(pte.page) and folio_needs_cow_for_dma(src_mm, folio):
                    # folio_try_dup_anon_rmap_pte fails (maybe pinned): copy_present_page
                    dst_ptes[vpn] = copy_present_page(k, dst_vma, vpn << PAGE_SHIFT, pte)
                    copies += 1
                    rss += 1
                    if folio_vpns is not None:
                        folio_vpns.append(vpn)
                    continue
                folio_dup_anon_rmap_pte(k, folio, pte.page, dst_mm)
                if k.detect: __page_check_anon_rmap(k, cur, folio, pte.page, dst_vma, vpn << PAGE_SHIFT)
                pte.write = False
                rss += 1
                if folio_vpns is not None:
                    folio_vpns.append(vpn)
            dst_ptes[vpn] = Pte(folio, False, False, pte.dirty, soft_dirty=pte.soft_dirty, page=pte.page)
        dst_mm.rss_anon += rss
        if src_pt.swap:
            dst_mm.swap_ents += copy_nonpresent_ptes(k, dst_mm, src_pt, dst_pt, lo, hi, whole, folio_vpns)
        src_pt.ptl.spin_unlock(cur)
        dst_pt.ptl.spin_unlock(cur)
        if copies < ncopy:
            memcg.uncharge((ncopy - copies) * FOLIO_BYTES)  # a pinned page unpinned meanwhile
        if copies:
            k.stats["fork_cow_for_dma"] += copies
        copied += n
        work += n + 1
        if work >= RESCHED_WORK:
            work = 0
            await cond_resched()
    return copied
