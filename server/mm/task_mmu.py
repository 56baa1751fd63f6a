"""What /proc/PID/pagemap says of pages (fs/proc/task_mmu.c pagemap_pte_range), with what
/proc/kpageflags, /proc/kpagecount and mincore(2) add about the same page.

One ``PagemapEntry`` per page, read without faulting: the page-table entry (present, swap, the
PM_MMAP_EXCLUSIVE, uffd-wp and soft-dirty bits), and the folio behind it (in the swap cache, the
zero page, PG_anon_exclusive, its mapcount). A page of a large folio is ``thp``, ``head`` or
``tail``, and ``pmd`` while a huge PMD maps it (pagemap_pmd_range, and PAGEMAP_SCAN's
PAGE_IS_HUGE); the model has no KSM, so ``ksm`` is false.

Soft-dirty: the model keeps the bit in the PTE and the swap PTE as x86_64 does (set with the dirty
bit, by a move since 6.15, carried through swap-out and swap-in). Its VMAs never carry
VM_SOFTDIRTY (there is no clear_refs to have cleared it), so a page reads soft-dirty when its own
entry is.
"""

from __future__ import annotations

from dataclasses import dataclass

from .mm_types import (
    HPAGE_PMD_NR,
    HUGE_ZERO_FOLIO,
    PAGE_SHIFT,
    PMD_SHIFT,
    VM_SOFTDIRTY,
    ZERO_PAGE,
    HugePmd,
    Mm,
    is_migration_entry,
)
from .swapfile import SwapInfo


@dataclass(frozen=True)
class PagemapEntry:
    """One page, as pagemap (``present``, ``swap``, ``exclusive``: PM_MMAP_EXCLUSIVE, a present page
    mapped once; ``uffd_wp``, ``soft_dirty``), mincore (``swapcache`` for a swap entry) and
    kpageflags / kpagecount (for a present page: ``swapcache``, ``pmd``, ``thp``, ``head``,
    ``tail``, ``zero_page``, ``ksm``, ``anon_exclusive``: PG_anon_exclusive, and ``mapcount``,
    0 for the zero page) report it."""

    present: bool = False
    swap: bool = False
    exclusive: bool = False
    uffd_wp: bool = False
    soft_dirty: bool = False
    swapcache: bool = False
    pmd: bool = False
    thp: bool = False
    head: bool = False
    tail: bool = False
    zero_page: bool = False
    ksm: bool = False
    anon_exclusive: bool = False
    mapcount: int = 0


#: A page with no entry (pte_none) or outside every VMA.
PM_NONE = PagemapEntry()


def pagemap_read(mm: Mm, si: SwapInfo, start: int, pages: int) -> list[PagemapEntry]:
    """The entries of ``pages`` pages from the page-aligned ``start``. Reads the page tables
    without their PTLs (no call runs inside this function)."""
    out: list[PagemapEntry] = []
    vpn0 = start >> PAGE_SHIFT
    pgtables = mm.pgtables
    huge = mm.huge_pmds
    for vpn in range(vpn0, vpn0 + pages):
        idx = vpn >> (PMD_SHIFT - PAGE_SHIFT)
        if huge and (hp := huge.get(idx)) is not None:  # pagemap_pmd_range
            out.append(_pmd_entry(mm, hp, vpn))
            continue
        pt = pgtables.get(idx)
        if pt is None:
            out.append(PM_NONE)
            continue
        pte = pt.ptes.get(vpn)
        if pte is not None:
            vma = mm.vma_lookup(vpn << PAGE_SHIFT)
            soft_dirty = pte.dirty or pte.soft_dirty or bool(vma is not None and vma.flags & VM_SOFTDIRTY)
            folio = pte.folio
            if folio is ZERO_PAGE:
                out.append(PagemapEntry(present=True, uffd_wp=pte.uffd_wp, soft_dirty=soft_dirty, zero_page=True))
            else:
                i = pte.page
                mapcount = folio.page_mapcount(i)
                out.append(PagemapEntry(
                    present=True, exclusive=mapcount == 1, uffd_wp=pte.uffd_wp, soft_dirty=soft_dirty,
                    swapcache=folio.swapcache, thp=folio.large, head=folio.large and not i, tail=i > 0,
                    anon_exclusive=folio.page_anon_exclusive(i), mapcount=mapcount,
                ))
            continue
        swp = pt.swap.get(vpn)
        if swp is not None:
            entry = swp.entry
            if is_migration_entry(entry):  # a page a split has unmapped: PM_SWAP; resident to mincore
                out.append(PagemapEntry(swap=True, uffd_wp=swp.uffd_wp, soft_dirty=swp.soft_dirty, swapcache=True))
                continue
            out.append(PagemapEntry(
                swap=True, uffd_wp=swp.uffd_wp, soft_dirty=swp.soft_dirty,
                swapcache=entry.type == si.type and entry.offset in si.swap_table,
            ))
            continue
        out.append(PM_NONE)
    return out


def _pmd_entry(mm: Mm, hp: HugePmd, vpn: int) -> PagemapEntry:
    """A page mapped by a huge PMD: PM_MMAP_EXCLUSIVE and PG_anon_exclusive are the head page's
    (pagemap_pmd_range reads them once for the whole PMD), the mapcount each page's own."""
    vma = mm.vma_lookup(vpn << PAGE_SHIFT)
    soft_dirty = hp.dirty or hp.soft_dirty or bool(vma is not None and vma.flags & VM_SOFTDIRTY)
    i = vpn & (HPAGE_PMD_NR - 1)
    folio = hp.folio
    if folio is HUGE_ZERO_FOLIO:
        return PagemapEntry(
            present=True, uffd_wp=hp.uffd_wp, soft_dirty=soft_dirty, pmd=True, thp=True, head=not i, tail=i > 0,
            zero_page=True,
        )
    return PagemapEntry(
        present=True, exclusive=folio.page_mapcount(0) == 1, uffd_wp=hp.uffd_wp, soft_dirty=soft_dirty,
        swapcache=folio.swapcache, pmd=True, thp=True, head=not i, tail=i > 0,
        anon_exclusive=folio.page_anon_exclusive(0), mapcount=folio.page_mapcount(i),
    )
