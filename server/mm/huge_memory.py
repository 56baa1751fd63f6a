"""Transparent huge pages (mm/huge_memory.c): the THP policy, PMD-size faults and the huge zero
page, and what meets a huge PMD: COW, fork's copy, zap, mprotect, mremap, and the split of a huge
PMD into PTEs of the same folio (split_huge_pmd).

A huge PMD (mm_types.HugePmd) maps a PMD-size LargeFolio whole; its lock is the PMD lock
(Mm.pmd_lock, ranked with the PTLs). Every path that would cut one (a VMA boundary inside it, a
range that covers part of it) splits it first, as the kernel does (vma_adjust_trans_huge,
__split_huge_pmd); the folio stays large, mapped by PTEs, until split_folio splits it.

The huge PMD is charged with its deposited page table and the PTEs its split would fill
(HUGE_PMD_BYTES), so that a split, which the kernel never lets fail, needs no charge.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .locks import Current, SpinLock
from .memcontrol import MemoryLimitExceeded
from .mm_types import (
    FOLIO_BYTES,
    HPAGE_PMD_NR,
    HPAGE_PMD_ORDER,
    HPAGE_PMD_SIZE,
    HUGE_PMD_BYTES,
    HUGE_ZERO_FOLIO,
    PAGE_SHIFT,
    PMD_MASK,
    PMD_SHIFT,
    PMD_SIZE,
    VM_HUGEPAGE,
    VM_LOCKED,
    VM_NOHUGEPAGE,
    VM_UFFD_WP,
    VM_WRITE,
    ZERO_PAGE,
    Folio,
    HugePmd,
    LargeFolio,
    MigrationEntry,
    Mm,
    MmError,
    PageTable,
    Pte,
    SwapPte,
    Vma,
    folio_bytes,
    folio_maybe_dma_pinned,
    is_migration_entry,
)
from .page_ref import folio_ref_add, folio_ref_freeze, folio_ref_sub
from .rmap import (
    AnonVma,
    PageAnonExclusive,
    __page_check_anon_rmap,
    anon_vma_lock_write,
    anon_vma_prepare,
    anon_vma_unlock_write,
    folio_add_new_anon_rmap,
    folio_get_anon_vma,
    folio_move_anon_rmap,
    folio_remove_rmap_pmd,
    put_anon_vma,
    unpin,
)
from .sched import uninterruptible
from .swap import folio_add_lru, folio_putback_lru, lruvec_del_folio

if TYPE_CHECKING:
    from .kernel import Kernel


def thp_order_policy(k: Kernel, order: int) -> str:
    """The policy of ``order``: its own sysfs setting, or the top-level one where it inherits."""
    policy = k.thp_orders.get(order, "never")
    return k.thp_enabled if policy == "inherit" else policy


def thp_vma_allowable_order(k: Kernel, vma: Vma, order: int) -> bool:
    """May a fault in ``vma`` allocate a folio of ``order`` (__thp_vma_allowable_orders)? Not in
    a VM_NOHUGEPAGE VMA; where the size's policy is always, or madvise and the VMA VM_HUGEPAGE."""
    flags = vma.flags
    if flags & VM_NOHUGEPAGE:
        return False
    policy = thp_order_policy(k, order)
    return policy == "always" or (policy == "madvise" and bool(flags & VM_HUGEPAGE))


def thp_vma_suitable_order(vma: Vma, addr: int, order: int) -> bool:
    """Does the naturally aligned range of ``order`` around ``addr`` lie inside ``vma``, with the
    VMA's page offset aligned as its address is (so a folio index lines up with its PMD)?"""
    nr = 1 << order
    if ((vma.start >> PAGE_SHIFT) - vma.pgoff) & (nr - 1):
        return False
    haddr = addr & ~((nr << PAGE_SHIFT) - 1)
    return vma.start <= haddr and haddr + (nr << PAGE_SHIFT) <= vma.end


async def pmd_lock(k: Kernel, cur: Current, mm: Mm, addr: int, nested: bool = False) -> SpinLock:
    """Take the PMD lock covering ``addr`` (spinning first while a task preempted inside its
    section holds it). Returns it."""
    ptl = mm.pmd_lock(addr)
    await k.spin_lock(cur, ptl, nested=nested)
    return ptl


def pmd_none(mm: Mm, idx: int) -> bool:
    """Neither a PTE table nor a huge PMD at PMD index ``idx``."""
    return idx not in mm.pgtables and idx not in mm.huge_pmds


def _charge_huge(k: Kernel, cur: Current, nbytes: int) -> bool:
    """Charge a THP's allocation, or say it cannot be had (no reclaim: the fault falls back to
    small pages, as THP_FAULT_FALLBACK_CHARGE does)."""
    try:
        k.memcg.charge(cur, nbytes)
    except MemoryLimitExceeded:
        k.stats["thp_fault_fallback"] += 1
        return False
    return True


def map_anon_folio_pmd(k: Kernel, vma: Vma, haddr: int, folio: LargeFolio, deposit: PageTable) -> HugePmd:
    """Map a new PMD-size folio at ``haddr`` by a huge PMD, writable if the VMA is, young and
    dirty (map_anon_folio_pmd), with the page table ``deposit``. Expects the PMD lock held."""
    mm = vma.mm
    folio.refcount = 1
    folio_add_new_anon_rmap(folio, vma, haddr, pmd=True)
    folio_add_lru(k.lruvec, folio)
    hp = HugePmd(folio, bool(vma.flags & VM_WRITE), True, True, deposit)
    mm.huge_pmds[haddr >> PMD_SHIFT] = hp
    mm.rss_anon += HPAGE_PMD_NR
    return hp


async def do_huge_pmd_anonymous_page(
    k: Kernel, cur: Current, vma: Vma, addr: int, write: bool, value: int | None
) -> bool | None:
    """A fault on a none PMD in a VMA that may have a PMD-size THP: a read maps the huge zero
    page (if use_zero_page), a write a new THP holding ``value`` at ``addr``'s page and zeros
    elsewhere. Returns None to fall back to small pages (the range does not fit the VMA, or the
    THP cannot be charged), False if the PMD changed under us (retry), True when done. Expects
    mmap_lock (or the VMA lock) held for read; takes the anon_vma root (anon_vma_prepare), then
    the PMD lock."""
    if not thp_vma_suitable_order(vma, addr, HPAGE_PMD_ORDER):
        return None
    mm = vma.mm
    haddr = addr & PMD_MASK
    idx = haddr >> PMD_SHIFT
    if vma.anon_vma is None:
        await anon_vma_prepare(k, cur, vma)
    if not write and k.thp_use_zero_page:
        if not _charge_huge(k, cur, HUGE_PMD_BYTES):
            return None
        ptl = await pmd_lock(k, cur, mm, haddr)
        done = pmd_none(mm, idx)
        if done:  # set_huge_zero_folio
            mm.huge_pmds[idx] = HugePmd(HUGE_ZERO_FOLIO, False, True, False, mm.new_pgtable(idx))
        ptl.spin_unlock(cur)
        if not done:
            k.memcg.uncharge(HUGE_PMD_BYTES)
        else:
            k.stats["thp_zero_page_fault"] += 1
        return done
    nbytes = HUGE_PMD_BYTES + folio_bytes(HPAGE_PMD_ORDER)
    if not _charge_huge(k, cur, nbytes):
        return None
    ptl = await pmd_lock(k, cur, mm, haddr)
    if not pmd_none(mm, idx):
        ptl.spin_unlock(cur)
        k.memcg.uncharge(nbytes)
        return False
    folio = k.folio_alloc_large(HPAGE_PMD_ORDER)
    if write and value is not None:
        folio.set_page_value((addr - haddr) >> PAGE_SHIFT, value)
    map_anon_folio_pmd(k, vma, haddr, folio, mm.new_pgtable(idx))
    ptl.spin_unlock(cur)
    k.stats["thp_fault_alloc"] += 1
    return True


async def do_huge_pmd_wp_page(
    k: Kernel, cur: Current, vma: Vma, addr: int, value: int | None, orig: HugePmd
) -> bool:
    """A write fault on a write-protected huge PMD: a uffd-wp PMD in a VM_UFFD_WP VMA is a
    write-protect userfault; the huge zero page is replaced by a new THP (do_huge_zero_wp_pmd);
    a folio whose head is PageAnonExclusive, or that no one else holds (taken from the swap
    cache, moved to this VMA's anon_vma), is reused whole. Otherwise the PMD is split and the
    fault retried on the PTE (which copies one page). Returns True when the write was done,
    False to retry. Expects mmap_lock (or the VMA lock) held for read; takes the PMD lock, and
    the folio lock (sleeping with the PMD lock dropped if need be)."""
    mm = vma.mm
    haddr = addr & PMD_MASK
    idx = haddr >> PMD_SHIFT
    i = (addr - haddr) >> PAGE_SHIFT
    ptl = await pmd_lock(k, cur, mm, haddr)
    if mm.huge_pmds.get(idx) is not orig or orig.write:  # !pmd_same
        ptl.spin_unlock(cur)
        return False
    if orig.uffd_wp and vma.flags & VM_UFFD_WP:  # userfaultfd_huge_pmd_wp
        ptl.spin_unlock(cur)
        from .userfaultfd import handle_userfault  # (userfaultfd -> mmap -> memory -> huge_memory)

        raise handle_userfault(k, cur, vma, addr, True, wp=True)
    folio = orig.folio
    if folio is HUGE_ZERO_FOLIO:
        ptl.spin_unlock(cur)
        return await do_huge_zero_wp_pmd(k, cur, vma, addr, value, orig)
    if not folio.page_anon_exclusive(0):
        lock = folio.lock
        assert lock is not None
        if not lock.trylock(cur):
            folio_ref_add(k, folio, 1)  # folio_get: the PMD lock is dropped while we sleep
            cur.pins.append(folio)
            ptl.spin_unlock(cur)
            if not lock.lock(cur): await lock.wait(cur)
            ptl = await pmd_lock(k, cur, mm, haddr)
            from .memory import folio_put

            folio_put(k, folio, cur)
            if mm.huge_pmds.get(idx) is not orig:
                ptl.spin_unlock(cur)
                lock.unlock(cur)
                return False
        reuse = folio.page_anon_exclusive(0)
        if not reuse and folio.refcount <= 1 + (folio.nr_pages if folio.swapcache else 0):
            if folio.swapcache:
                from .memory import folio_free_swap

                folio_free_swap(k, folio)
            if folio.refcount == 1:
                folio_move_anon_rmap(k, folio, vma)
                folio.set_page_anon_exclusive(0, True)
                reuse = True
        lock.unlock(cur)
        if not reuse:
            ptl.spin_unlock(cur)
            await __split_huge_pmd(k, cur, vma, haddr)
            k.stats["thp_cow_split"] += 1
            return False
        k.stats["thp_wp_reuse"] += 1
    if value is not None:
        folio.set_page_value(i, value)
    orig.young = orig.dirty = True
    orig.write = True  # maybe_pmd_mkwrite: the VMA is writable (the fault checked)
    ptl.spin_unlock(cur)
    return True


async def do_huge_zero_wp_pmd(
    k: Kernel, cur: Current, vma: Vma, addr: int, value: int | None, orig: HugePmd
) -> bool:
    """A write to the huge zero page: a new THP, zeros but for ``value``, replaces it (6.13);
    if none can be had, the PMD is split and the write retried on the small zero page's PTE.
    Expects mmap_lock (or the VMA lock) held for read and no PMD lock; takes the PMD lock."""
    mm = vma.mm
    haddr = addr & PMD_MASK
    idx = haddr >> PMD_SHIFT
    nbytes = folio_bytes(HPAGE_PMD_ORDER)
    if not _charge_huge(k, cur, nbytes):
        await __split_huge_pmd(k, cur, vma, haddr)
        return False
    ptl = await pmd_lock(k, cur, mm, haddr)
    if mm.huge_pmds.get(idx) is not orig:
        ptl.spin_unlock(cur)
        k.memcg.uncharge(nbytes)
        return False
    folio = k.folio_alloc_large(HPAGE_PMD_ORDER)
    if value is not None:
        folio.set_page_value((addr - haddr) >> PAGE_SHIFT, value)
    del mm.huge_pmds[idx]  # pmdp_huge_clear_flush; the deposited table stays for the new PMD
    map_anon_folio_pmd(k, vma, haddr, folio, orig.deposit)
    ptl.spin_unlock(cur)
    k.stats["thp_fault_alloc"] += 1
    return True


def split_huge_pmd_locked(k: Kernel, vma: Vma, idx: int, hp: HugePmd) -> None:
    """__split_huge_pmd_locked: replace the huge PMD at ``idx`` by its deposited page table,
    filled with a PTE for each page of the same folio (the huge zero page: the small zero page's)
    carrying the PMD's bits. The folio's PMD mapping becomes 512 PTE mappings, each with its
    reference; a head that was PageAnonExclusive makes every page so. Expects the PMD lock held;
    the new table's PTL is not taken: no one can see the table before it is installed."""
    mm = vma.mm
    del mm.huge_pmds[idx]
    pt = hp.deposit
    mm.pgtables[idx] = pt
    ptes = pt.ptes
    vpn0 = idx << (PMD_SHIFT - PAGE_SHIFT)
    folio = hp.folio
    write, young, dirty, uffd_wp, soft_dirty = hp.write, hp.young, hp.dirty, hp.uffd_wp, hp.soft_dirty
    if folio is HUGE_ZERO_FOLIO:  # __split_huge_zero_page_pmd
        for i in range(HPAGE_PMD_NR):
            ptes[vpn0 + i] = Pte(ZERO_PAGE, False, young, False, uffd_wp, soft_dirty)
        k.stats["thp_split_pmd"] += 1
        return
    anon_exclusive = folio.page_anon_exclusive(0)
    folio_ref_add(k, folio, HPAGE_PMD_NR - 1)
    # folio_add_anon_rmap_ptes(RMAP_EXCLUSIVE if the head was), then folio_remove_rmap_pmd
    for i in range(HPAGE_PMD_NR):
        folio.pages_mapcount[i] += 1
        if anon_exclusive:
            folio.anon_exclusive[i] = True
        ptes[vpn0 + i] = Pte(folio, write, young, dirty, uffd_wp, soft_dirty, i)
    folio.mapcount += HPAGE_PMD_NR - 1
    folio.entire_mapcount -= 1
    folio.mm_map(mm.id, HPAGE_PMD_NR - 1)
    if k.detect: __page_check_anon_rmap(k, None, folio, 0, vma, idx << PMD_SHIFT)
    k.stats["thp_split_pmd"] += 1


async def __split_huge_pmd(k: Kernel, cur: Current, vma: Vma, addr: int) -> None:
    """Split the huge PMD covering ``addr``, if there still is one. Expects mmap_lock (or the
    VMA lock) held; takes the PMD lock."""
    mm = vma.mm
    idx = addr >> PMD_SHIFT
    if idx not in mm.huge_pmds:
        return
    ptl = await pmd_lock(k, cur, mm, addr)
    hp = mm.huge_pmds.get(idx)
    if hp is not None:
        split_huge_pmd_locked(k, vma, idx, hp)
    ptl.spin_unlock(cur)


async def vma_adjust_trans_huge(k: Kernel, cur: Current, vma: Vma, addr: int) -> None:
    """``vma`` is about to be cut at ``addr``: a huge PMD that the cut would cross is split
    first. Expects mmap_lock held for write."""
    if addr & ~PMD_MASK and vma.start <= addr & PMD_MASK and (addr & PMD_MASK) + PMD_SIZE <= vma.end:
        await __split_huge_pmd(k, cur, vma, addr)


def zap_huge_pmd(k: Kernel, mm: Mm, idx: int, unmapped: list[int] | None) -> int:
    """Clear the huge PMD at ``idx`` (zap_huge_pmd): the folio loses its PMD mapping and that
    reference (a folio still mapped in part by PTEs goes on the deferred split queue), the
    deposited table is freed. Expects the PMD lock held. Returns the pages unmapped."""
    hp = mm.huge_pmds.pop(idx)
    k.memcg.uncharge(HUGE_PMD_BYTES)
    folio = hp.folio
    if folio is HUGE_ZERO_FOLIO:
        return 0
    from .memory import folio_put

    folio_remove_rmap_pmd(k, folio, mm)
    mm.rss_anon -= HPAGE_PMD_NR
    folio_put(k, folio)
    if unmapped is not None:
        vpn0 = idx << (PMD_SHIFT - PAGE_SHIFT)
        unmapped.extend(range(vpn0, vpn0 + HPAGE_PMD_NR))
    return HPAGE_PMD_NR


async def zap_huge_pmds(k: Kernel, cur: Current, mm: Mm, start: int, end: int, unmapped: list[int] | None) -> int:
    """zap_pmd_range's huge PMDs in [start, end): one wholly inside is zapped, one the range
    covers in part is split (its PTEs are then zapped with the others). Expects mmap_lock held;
    takes each PMD lock. Returns the pages unmapped."""
    n = 0
    for idx in mm.huge_pmds_in(start, end):
        haddr = idx << PMD_SHIFT
        if start <= haddr and haddr + PMD_SIZE <= end:
            ptl = await pmd_lock(k, cur, mm, haddr)
            if idx in mm.huge_pmds:
                n += zap_huge_pmd(k, mm, idx, unmapped)
            ptl.spin_unlock(cur)
        else:
            vma = mm.vma_lookup(haddr)
            assert vma is not None, f"huge PMD at {haddr:#x} outside every VMA"
            await __split_huge_pmd(k, cur, vma, haddr)
    return n


async def copy_huge_pmd(
    k: Kernel, cur: Current, dst_vma: Vma, src_vma: Vma, idx: int, folio_vpns: list[int] | None
) -> bool:
    """Fork's copy of the huge PMD at ``idx``: the child maps the same folio by a huge PMD (one
    more entire mapping and reference; the head no longer PageAnonExclusive), both PMDs
    write-protected, the child's old and without uffd-wp. Charges the child's PMD (ENOMEM before
    anything changes). An exclusive folio that may be pinned is not shared: the parent's PMD is
    split and False returned (the PTE copy then copies each exclusive page for the child).
    Expects both mmap_locks held for write; takes the child's PMD lock, then the parent's
    nested."""
    from .gup import folio_needs_cow_for_dma  # (gup -> huge_memory)

    src_mm, dst_mm = src_vma.mm, dst_vma.mm
    haddr = idx << PMD_SHIFT
    k.memcg.charge(cur, HUGE_PMD_BYTES)  # pte_alloc_one: the deposit
    dst_ptl = await pmd_lock(k, cur, dst_mm, haddr)
    src_ptl = await pmd_lock(k, cur, src_mm, haddr, nested=True)
    hp = src_mm.huge_pmds.get(idx)
    assert hp is not None and idx not in dst_mm.huge_pmds
    folio = hp.folio
    if folio is not HUGE_ZERO_FOLIO and folio.page_anon_exclusive(0) and folio_needs_cow_for_dma(src_mm, folio):
        # folio_try_dup_anon_rmap_pmd failed: split, and retry on the PTEs
        src_ptl.spin_unlock(cur)
        dst_ptl.spin_unlock(cur)
        k.memcg.uncharge(HUGE_PMD_BYTES)
        await __split_huge_pmd(k, cur, src_vma, haddr)
        return False
    if folio is not HUGE_ZERO_FOLIO:
        folio_ref_add(k, folio, 1)  # folio_get
        # folio_try_dup_anon_rmap_pmd
        folio.entire_mapcount += 1
        folio.mapcount += 1
        folio.mm_map(dst_mm.id, 1)
        folio.set_page_anon_exclusive(0, False)
        if k.detect: __page_check_anon_rmap(k, cur, folio, 0, dst_vma, haddr)
        dst_mm.rss_anon += HPAGE_PMD_NR
        if folio_vpns is not None:
            vpn0 = idx << (PMD_SHIFT - PAGE_SHIFT)
            folio_vpns.extend(range(vpn0, vpn0 + HPAGE_PMD_NR))
    hp.write = False  # pmdp_set_wrprotect
    dst_mm.huge_pmds[idx] = HugePmd(
        folio, False, False, hp.dirty, dst_mm.new_pgtable(idx), soft_dirty=hp.soft_dirty,
    )
    src_ptl.spin_unlock(cur)
    dst_ptl.spin_unlock(cur)
    k.stats["thp_fork_copy"] += 1
    return True


async def change_huge_pmds(
    k: Kernel, cur: Current, vma: Vma, start: int, end: int, writable: bool, keep_wp: bool
) -> None:
    """mprotect's huge PMDs in [start, end) of ``vma`` (change_huge_pmd): a PMD the range covers
    whole keeps its mapping, write-protected, or made writable again where its head is
    PageAnonExclusive and no uffd-wp keeps it read-only; one covered in part is split (its PTEs
    are changed with the others). Expects mmap_lock held for write; takes each PMD lock."""
    mm = vma.mm
    for idx in mm.huge_pmds_in(start, end):
        haddr = idx << PMD_SHIFT
        if not (start <= haddr and haddr + PMD_SIZE <= end):
            await __split_huge_pmd(k, cur, vma, haddr)
            continue
        ptl = await pmd_lock(k, cur, mm, haddr)
        hp = mm.huge_pmds.get(idx)
        if hp is not None:
            if not writable:
                hp.write = False
            elif (not hp.write and hp.folio is not HUGE_ZERO_FOLIO and hp.folio.page_anon_exclusive(0)
                  and not (keep_wp and hp.uffd_wp)):
                hp.write = True  # can_change_pmd_writable
        ptl.spin_unlock(cur)


async def move_huge_pmd(
    k: Kernel, cur: Current, old_vma: Vma, new_vma: Vma, old_idx: int, new_idx: int
) -> None:
    """mremap's move of a whole huge PMD with its deposited table (move_huge_pmd). Expects
    mmap_lock held for write and the new PMD none; takes the old PMD lock, then the new one
    nested. The folio's index is left as it was: the new VMA's page offset keeps the pages'."""
    old_mm, new_mm = old_vma.mm, new_vma.mm
    old_ptl = await pmd_lock(k, cur, old_mm, old_idx << PMD_SHIFT)
    new_ptl = new_mm.pmd_lock(new_idx << PMD_SHIFT)
    if new_ptl is not old_ptl:
        await k.spin_lock(cur, new_ptl, nested=True)
    hp = old_mm.huge_pmds.pop(old_idx)
    assert pmd_none(new_mm, new_idx), "move_huge_pmd onto a PMD that is not none"
    new_mm.huge_pmds[new_idx] = hp
    if new_ptl is not old_ptl:
        new_ptl.spin_unlock(cur)
    old_ptl.spin_unlock(cur)
    k.stats["thp_mremap_move"] += 1


def deferred_split_folio(k: Kernel, folio: LargeFolio) -> None:
    """Queue a large folio that is now mapped in part (deferred_split_folio)."""
    if not folio.deferred_split:
        folio.deferred_split = True
        k.deferred_split_queue[folio] = None
        k.stats["thp_deferred_split_page"] += 1


async def split_folio(
    k: Kernel, cur: Current, folio: LargeFolio, to_list: list[Folio] | None = None, pinned: bool = True
) -> Folio:
    """Split a large folio into small ones (split_folio, __folio_split). Every mapping found
    through its anon_vma tree is replaced by a migration entry (unmap_folio: a huge PMD mapping
    it is split first); the count is frozen (folio_ref_freeze), and each migration entry becomes
    a mapping of its page's own folio (remap_page), or of the shared zero page for a page that
    reads all zeros (RMP_USE_SHARED_ZEROPAGE, but not in an mlocked VMA). Each new folio keeps
    the page's contents, PG_anon_exclusive (the migration entry's), the folio's anon_vma and its
    own index, and goes on the LRU; the large folio is retired. Raises MmError: EBUSY when the
    folio has no anon_vma, EAGAIN when someone else holds a reference (can_split_folio, and the
    freeze, which a reference taken since the check makes fail: the folio is mapped back whole).

    Expects the folio locked by ``cur`` with a reference of the caller's (``pinned``: ``cur``'s
    pin); returns the head, now a small folio, locked by ``cur`` and carrying that reference (the
    kernel's caller keeps its lock and reference on the head). An isolated folio (off the LRU:
    reclaim's) splits into isolated folios: the head stays off the LRU and the others, each with
    a reference, are appended to ``to_list`` (split_folio_to_list). Takes the anon_vma root rwsem
    for write (the walkers are kept out while the mappings change), then each PMD lock and PTL
    in turn; once it holds the rwsem it runs to its end, cancelled or not (a migration entry left
    behind would make every fault on it wait for ever)."""
    anon_vma = await folio_get_anon_vma(k, cur, folio)
    if anon_vma is None:
        raise MmError(errno.EBUSY, f"folio {folio.id} has no anon_vma")
    try:
        await anon_vma_lock_write(cur, anon_vma)
        return await uninterruptible(lambda: __folio_split(k, cur, folio, anon_vma, to_list, pinned))
    finally:
        await put_anon_vma(k, cur, anon_vma)


async def __folio_split(
    k: Kernel, cur: Current, folio: LargeFolio, anon_vma: AnonVma, to_list: list[Folio] | None, pinned: bool
) -> Folio:
    """split_folio's work under the anon_vma root rwsem, which it lets go."""
    try:
        # can_split_folio: the caller's reference, the swap cache's, one per mapping
        extra = 1 + (folio.nr_pages if folio.swapcache else 0)
        if folio.refcount != folio.mapcount + extra:
            k.stats["thp_split_page_failed"] += 1
            raise MmError(errno.EAGAIN, f"folio {folio.id} has references besides its mappings")
        await unmap_folio(k, cur, folio, anon_vma)
        if k.sched.active: await k.sched.point("split:unmapped")
        if not folio_ref_freeze(k, folio, extra):  # a reference taken since (GUP-fast, a walker)
            await remap_page(k, cur, folio, anon_vma, None, False)
            k.stats["thp_split_page_failed"] += 1
            raise MmError(errno.EAGAIN, f"folio {folio.id} took a reference while it was being split")
        isolated = not folio.lru
        small: list[Folio | None] = [None] * folio.nr_pages
        await remap_page(k, cur, folio, anon_vma, small, isolated)
    finally:
        anon_vma_unlock_write(cur, anon_vma)
    head = small[0]
    if head is None:  # the head was mapped nowhere, or became the zero page: the caller's alone
        head = small[0] = __split_page(k, cur, folio, 0, isolated)
    # The caller's reference and lock move to the head (locked since it was made); the other new
    # folios are let go. The new folios' counts are set by plain stores: nobody can reach them
    # before their lock is let go, and the large folio's stays frozen at zero.
    lock = folio.lock
    assert lock is not None
    head.refcount += 1
    if pinned:
        unpin(cur, folio)
        cur.pins.append(head)
    lock.unlock(cur)
    for f in small[1:]:
        if f is None:
            continue
        f.lock.unlock(cur)  # type: ignore[union-attr]
        if isolated:
            f.refcount += 1  # the isolation's reference
            if to_list is not None:
                to_list.append(f)
            else:
                folio_putback_lru(k.lruvec, f)
                f.refcount -= 1
    assert not folio.mapcount and not folio.refcount, f"split_folio: {folio!r} still referenced"
    # The large folio is retired; its charge (a small folio's a page) goes to the new folios.
    if folio.lru:
        lruvec_del_folio(k.lruvec, folio)
    k.deferred_split_queue.pop(folio, None)
    folio.deferred_split = False
    folio.freed = True
    made = sum(1 for f in small if f is not None)
    k.folios_live -= 1
    k.folio_pages_live -= folio.nr_pages
    k.memcg.uncharge((folio.nr_pages - made) * FOLIO_BYTES)
    k.stats["thp_split_page"] += 1
    return head


def __split_page(k: Kernel, cur: Current, folio: LargeFolio, i: int, isolated: bool) -> Folio:
    """Page ``i`` of ``folio`` as a small folio of its own (charged with the large folio), on the
    LRU unless the large folio was isolated, and locked by ``cur`` (the kernel's new folios keep
    the head's PG_locked until the split lets them go: nobody locks one half-made)."""
    f = k.folio_alloc()
    assert f.lock is not None
    f.lock.trylock(cur)
    f.mapping = folio.mapping
    f.index = folio.index + i
    f.value = folio.values[i]
    f.exclusive = folio.anon_exclusive[i]
    f.dirty = folio.dirty
    if not isolated:
        folio_add_lru(k.lruvec, f)
    return f


def _folio_ranges(folio: LargeFolio, anon_vma: AnonVma) -> Iterator[tuple[Vma, int, int]]:
    """The ranges [start, end) of the VMAs of ``anon_vma``'s tree where ``folio``'s pages would
    be mapped (anon_vma_interval_tree_foreach over its page offsets)."""
    first, nr = folio.index, folio.nr_pages
    for avc in list(anon_vma.rb_root):
        vma = avc.vma
        lo, hi = max(first, vma.pgoff), min(first + nr, vma.pgoff + vma.pages)
        if lo < hi:
            start = vma.start + ((lo - vma.pgoff) << PAGE_SHIFT)
            yield vma, start, start + ((hi - lo) << PAGE_SHIFT)


async def unmap_folio(k: Kernel, cur: Current, folio: LargeFolio, anon_vma: AnonVma) -> None:
    """try_to_migrate over ``folio``'s mappings (TTU_SPLIT_HUGE_PMD): a huge PMD mapping it is
    split into PTEs, and each PTE mapping one of its pages becomes a migration entry carrying
    the PTE's bits; its mapcount and its reference are dropped. Expects the folio lock and the
    anon_vma root rwsem (write) held; takes each PMD lock and PTL in turn."""
    for vma, start, end in _folio_ranges(folio, anon_vma):
        mm = vma.mm
        for idx in mm.huge_pmds_in(start, end):
            hp = mm.huge_pmds.get(idx)
            if hp is not None and hp.folio is folio:
                ptl = await pmd_lock(k, cur, mm, idx << PMD_SHIFT)
                hp = mm.huge_pmds.get(idx)
                if hp is not None and hp.folio is folio:
                    split_huge_pmd_locked(k, vma, idx, hp)
                ptl.spin_unlock(cur)
        for pt, vpn_lo, vpn_hi in _tables_in(mm, start, end):
            await k.spin_lock(cur, pt.ptl)
            ptes = pt.ptes
            n = 0
            for vpn in range(vpn_lo, vpn_hi):
                pte = ptes.get(vpn)
                if pte is None or pte.folio is not folio:
                    continue
                i = pte.page
                del ptes[vpn]
                entry = MigrationEntry(folio, i, pte.write, folio.anon_exclusive[i], pte.young, pte.dirty)
                pt.swap[vpn] = SwapPte(entry, False, pte.uffd_wp, pte.soft_dirty)
                folio.anon_exclusive[i] = False  # folio_try_share_anon_rmap_pte: the entry keeps it
                folio.pages_mapcount[i] -= 1  # folio_remove_rmap_pte
                folio.mapcount -= 1
                folio.mm_map(mm.id, -1)
                n += 1
            if n:  # folio_put_refs, once for the table: the caller's reference keeps it above zero
                folio_ref_sub(k, folio, n)
            pt.ptl.spin_unlock(cur)


async def remap_page(
    k: Kernel, cur: Current, folio: LargeFolio, anon_vma: AnonVma, small: list[Folio | None] | None,
    isolated: bool,
) -> None:
    """remove_migration_ptes over ``folio``'s migration entries, found again through the anon_vma
    tree (a fork may have copied one meanwhile, a zap removed one, an mremap moved one). With
    ``small`` (the split done: RMP_USE_SHARED_ZEROPAGE), page i is mapped by its new folio
    ``small[i]`` (made on its first mapping) or by the zero page; without it (the freeze failed),
    by ``folio`` again. The PTE gets the entry's bits, the uffd-wp and soft-dirty bits of the
    swap PTE. Expects the folio lock and the anon_vma root rwsem (write) held; takes each PTL."""
    for vma, start, end in _folio_ranges(folio, anon_vma):
        mm = vma.mm
        zero_ok = small is not None and not vma.flags & VM_LOCKED
        for pt, vpn_lo, vpn_hi in _tables_in(mm, start, end):
            if not pt.swap:
                continue
            await k.spin_lock(cur, pt.ptl)
            swap = pt.swap
            back = 0
            for vpn in range(vpn_lo, vpn_hi):
                swp = swap.get(vpn)
                if swp is None:
                    continue
                entry = swp.entry
                if not is_migration_entry(entry) or entry.folio is not folio:
                    continue
                del swap[vpn]
                i = page = entry.page
                f: Folio = folio
                if small is None:  # back to the folio itself
                    back += 1
                    if entry.exclusive:
                        folio.anon_exclusive[i] = True
                    folio.pages_mapcount[i] += 1
                    folio.mapcount += 1
                    folio.mm_map(mm.id, 1)
                elif zero_ok and not folio.values[i]:  # try_to_map_unused_to_zeropage
                    pt.ptes[vpn] = Pte(ZERO_PAGE, False, entry.young, False, swp.uffd_wp, swp.soft_dirty or entry.dirty)
                    mm.rss_anon -= 1
                    continue
                else:
                    g = small[i]
                    if g is None:
                        g = small[i] = __split_page(k, cur, folio, i, isolated)
                    g.exclusive = entry.exclusive
                    g.mapcount += 1
                    g.refcount += 1
                    f, page = g, 0
                if k.detect: __page_check_anon_rmap(k, cur, f, page, vma, vpn << PAGE_SHIFT)
                pt.ptes[vpn] = Pte(f, entry.write, entry.young, entry.dirty, swp.uffd_wp, swp.soft_dirty, page=page)
            if back:  # the mappings' references, once for the table
                folio_ref_add(k, folio, back)
            pt.ptl.spin_unlock(cur)


def _tables_in(mm: Mm, start: int, end: int) -> Iterator[tuple[PageTable, int, int]]:
    """The PTE tables of ``mm`` that exist in [start, end), each with the page numbers it covers
    there."""
    for idx in mm.pgtables_in(start, end):
        pt = mm.pgtables.get(idx)
        if pt is not None:
            yield (pt, max(start >> PAGE_SHIFT, idx << (PMD_SHIFT - PAGE_SHIFT)),
                   min(end >> PAGE_SHIFT, (idx + 1) << (PMD_SHIFT - PAGE_SHIFT)))


async def move_pages_huge_pmd(
    k: Kernel, cur: Current, dst_vma: Vma, src_vma: Vma, dst_addr: int, src_addr: int
) -> int:
    """UFFDIO_MOVE of a whole huge PMD (move_pages_huge_pmd): the folio keeps its size and its
    huge PMD, moved to ``dst_addr`` with its deposited table, pointed at the dst VMA's anon_vma
    at the dst index, mapped writable, dirty and young; the huge zero page moves with no folio
    and no lock (as a special PMD, 6.18 with the 2026 fix), its uffd-wp bit cleared. Returns
    HPAGE_PMD_SIZE, or a negative errno: EBUSY for a folio whose head is not PageAnonExclusive,
    EAGAIN when either PMD changed or the folio lost its anon_vma, ENOENT when the src PMD is
    no longer huge. Expects both VMAs read-locked and the dst PMD none; takes the folio lock,
    the anon_vma root rwsem for write, then both PMD locks (double_pt_lock)."""
    from .memory import folio_put  # (memory -> huge_memory)
    from .userfaultfd import (  # (userfaultfd -> memory -> huge_memory)
        double_pt_lock,
        double_pt_unlock,
        move_anon_rmap_and_index,
    )

    mm = src_vma.mm
    src_idx, dst_idx = src_addr >> PMD_SHIFT, dst_addr >> PMD_SHIFT
    src_ptl = await pmd_lock(k, cur, mm, src_addr)  # pmd_trans_huge_lock
    src_pmdval = mm.huge_pmds.get(src_idx)
    if src_pmdval is None:
        src_ptl.spin_unlock(cur)
        return -errno.ENOENT
    src_folio: LargeFolio | None = None
    if src_pmdval.folio is not HUGE_ZERO_FOLIO:
        if not PageAnonExclusive(k, src_pmdval.folio, 0):
            src_ptl.spin_unlock(cur)
            return -errno.EBUSY
        src_folio = src_pmdval.folio
        folio_ref_add(k, src_folio, 1)  # folio_get
        cur.pins.append(src_folio)
    src_ptl.spin_unlock(cur)
    src_anon_vma: AnonVma | None = None
    err = 0
    if src_folio is not None:
        lock = src_folio.lock
        assert lock is not None
        if not lock.lock(cur): await lock.wait(cur)
    dst_ptl = mm.pmd_lock(dst_addr)
    try:
        await double_pt_lock(k, cur, src_ptl, dst_ptl)
        if mm.huge_pmds.get(src_idx) is not src_pmdval or not pmd_none(mm, dst_idx):
            err = -errno.EAGAIN
        elif src_folio is not None:
            if not PageAnonExclusive(k, src_folio, 0):
                err = -errno.EBUSY
            else:
                src_anon_vma = await folio_get_anon_vma(k, cur, src_folio)
                if src_anon_vma is None:
                    err = -errno.EAGAIN
                else:
                    double_pt_unlock(cur, src_ptl, dst_ptl)
                    await anon_vma_lock_write(cur, src_anon_vma)
                    await double_pt_lock(k, cur, src_ptl, dst_ptl)
                    if mm.huge_pmds.get(src_idx) is not src_pmdval or not pmd_none(mm, dst_idx):
                        err = -errno.EAGAIN
        if not err and src_folio is not None and folio_maybe_dma_pinned(src_folio):
            err = -errno.EBUSY
        if not err:
            hp = mm.huge_pmds.pop(src_idx)  # pmdp_huge_clear_flush
            # GUP-fast takes no PMD lock: a pin may come in between the checks and the clear
            if k.sched.active and k.gup_fast_tasks: await k.sched.point_unkillable("move:pmd-cleared")
            if src_folio is not None and folio_maybe_dma_pinned(src_folio):
                mm.huge_pmds[src_idx] = hp  # got pinned from under us: put it back, fail
                err = -errno.EBUSY
        if not err:
            if src_folio is not None:
                index = dst_vma.linear_page_index(dst_addr)
                await move_anon_rmap_and_index(k, src_folio, dst_vma, index, "move_pages_huge_pmd")
                hp.write = hp.dirty = hp.young = True  # pmd_mkwrite(pmd_mkdirty(folio_mk_pmd()))
                hp.uffd_wp = False
                hp.soft_dirty = True
            else:
                hp.uffd_wp = False  # clear_uffd_wp_pmd(move_soft_dirty_pmd())
                hp.soft_dirty = True
            mm.huge_pmds[dst_idx] = hp  # set_pmd_at, and the deposit withdrawn and deposited
        double_pt_unlock(cur, src_ptl, dst_ptl)
    finally:
        if src_anon_vma is not None:
            anon_vma_unlock_write(cur, src_anon_vma)
            await put_anon_vma(k, cur, src_anon_vma)
        if src_folio is not None:
            assert src_folio.lock is not None
            if src_folio.lock.owner is cur:
                src_folio.lock.unlock(cur)
            folio_put(k, src_folio, cur)
    if err:
        return err
    k.stats["thp_move_pmd"] += 1
    return HPAGE_PMD_SIZE
