"""Changing the protection of private anonymous mappings (mm/mprotect.c), as in 6.18.

Every function here expects mmap_lock held for write.

What the live 6.18 kernel does (checked with mprotect(2) on these machines, /proc/self/maps and
/proc/self/smaps):
- a start that is not page-aligned: EINVAL, even with length 0; length 0: 0 (nothing checked
  further, not even the protection); a length that is not a page multiple is rounded up;
- start + length past the end of the 64-bit space: ENOMEM; the protection is validated only after
  that (bad prot with a wrapping length: ENOMEM; with length 0: 0; otherwise EINVAL);
- a hole at the start of the range: ENOMEM, nothing changed; a hole later: the VMAs from the start
  up to the hole are changed, then ENOMEM; no separate check against the address-space size (a
  range running past it just ends in a hole: ENOMEM after changing what is mapped);
- the range is split off its VMA(s) and merged back with neighbours whose flags then match
  (mprotect of the middle of a VMA gives three VMAs; restoring the protection gives one again);
- VM_ACCOUNT: made writable, a VMA without it gains it; made read-only or PROT_NONE, a VMA that
  has no anon_vma yet (never faulted) loses it, a faulted one keeps it (a faulted VMA that was
  made read-only does not merge with a neighbour mapped read-only, an unfaulted one does);
- PTEs: write-protected when VM_WRITE goes; made writable again when it comes back if they map an
  exclusive anonymous page (no write fault follows); the zero page and shared pages stay
  read-only. A PROT_NONE page keeps its folio (still present in pagemap).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from .huge_memory import change_huge_pmds
from .locks import Current
from .mm_types import (
    PAGE_MASK,
    PAGE_SHIFT,
    PROT_FLAGS,
    VM_ACCESS_FLAGS,
    VM_ACCOUNT,
    VM_UFFD_WP,
    VM_WRITE,
    ZERO_PAGE,
    Mm,
    MmError,
    Vma,
    is_migration_entry,
)
from .mmap import __split_vma, page_align, split_vma, vma_merge, vma_modify_merges, vma_split_reserve
from .mmap_lock import vma_start_write
from .sched import RESCHED_WORK, cond_resched

if TYPE_CHECKING:
    from .kernel import Kernel

#: One past the largest address a 64-bit range may reach.
ADDR_LIMIT = 1 << 64


def mprotect_newflags(vma: Vma, prot_bits: int) -> int:
    """The VMA's flags with its access bits replaced, VM_ACCOUNT adjusted as mprotect_fixup does."""
    old = vma.flags
    new = (old & ~VM_ACCESS_FLAGS) | prot_bits
    if new & VM_WRITE:
        if not old & (VM_ACCOUNT | VM_WRITE):
            new |= VM_ACCOUNT  # a private mapping made writable is charged to the commit
    elif old & VM_ACCOUNT and vma.anon_vma is None:
        new &= ~VM_ACCOUNT  # nothing was ever faulted in: the commit can be given back
    return new


async def change_protection(k: Kernel, cur: Current, mm: Mm, start: int, end: int, writable: bool) -> int:
    """change_pte_range over [start, end) of one VMA whose flags just changed. Expects mmap_lock
    held for write; takes each PTE table's PTL in turn. Without VM_WRITE every PTE is
    write-protected; with it, PTEs of exclusive anonymous folios become writable again. A
    migration entry is made readable either way (it keeps its exclusive bit). Lets other
    tasks run between tables every RESCHED_WORK PTEs. Returns the PTEs visited."""
    lo, hi = start >> PAGE_SHIFT, end >> PAGE_SHIFT
    vma = mm.vma_lookup(start)
    # A uffd-wp PTE of a VMA registered for write-protect stays read-only (checked on 6.18: a
    # write after mprotect(rw) still faults to the handler).
    keep_wp = vma is not None and bool(vma.flags & VM_UFFD_WP)
    visited = 0
    work = 0
    if mm.huge_pmds and vma is not None:
        await change_huge_pmds(k, cur, vma, start, end, writable, keep_wp)
    for idx in mm.pgtables_in(start, end):
        pt = mm.pgtables.get(idx)
        if pt is None or not (pt.ptes or pt.swap):
            continue
        await k.spin_lock(cur, pt.ptl)  # the table may be shared with a VMA a preempted mover holds
        n = 0
        for vpn, swp in pt.swap.items():
            entry = swp.entry
            if lo <= vpn < hi and is_migration_entry(entry):
                entry.write = False  # a writable migration entry made readable(-exclusive)
        for vpn, pte in pt.ptes.items():
            if not lo <= vpn < hi:
                continue
            n += 1
            if not writable:
                pte.write = False
            elif (not pte.write and pte.folio is not ZERO_PAGE and pte.folio.page_anon_exclusive(pte.page)
                  and not (keep_wp and pte.uffd_wp)):
                pte.write = True  # can_change_private_pte_writable
        pt.ptl.spin_unlock(cur)
        visited += n
        work += n + 1
        if work >= RESCHED_WORK:
            work = 0
            await cond_resched()
    return visited


async def mprotect_fixup(k: Kernel, cur: Current, vma: Vma, start: int, end: int, prot_bits: int) -> Vma:
    """Give [start, end) of ``vma`` the access bits ``prot_bits``: split it off (its splits must be
    reserved by the caller), change the flags and the PTEs, merge with the neighbours. Expects
    mmap_lock held for write; takes the anon_vma root (split, merge) and the PTLs. Returns the VMA
    that now holds ``start``. As vma_modify: a range that merges into a neighbour splits nothing
    in the kernel; otherwise each split is checked against vm.max_map_count (ENOMEM; a failed
    second split leaves the first)."""
    newflags = mprotect_newflags(vma, prot_bits)
    if newflags == vma.flags:
        return vma
    split = __split_vma if vma_modify_merges(vma, start, end, newflags, vma.uffd_ctx) else split_vma
    if vma.start < start:
        vma = await split(k, cur, vma, start)
    if vma.end > end:
        await split(k, cur, vma, end)
    await vma_start_write(cur, vma)
    vma.flags = newflags
    await change_protection(k, cur, vma.mm, start, end, bool(newflags & VM_WRITE))
    return await vma_merge(k, cur, vma)


async def do_mprotect(k: Kernel, cur: Current, mm: Mm, start: int, length: int, prot: str) -> None:
    """mprotect(2) with PROT_NONE, PROT_READ or PROT_READ|PROT_WRITE. Expects mmap_lock held for
    write. The worst case of the two edge splits is reserved before anything changes (ENOMEM from
    the budget changes nothing). Lets other tasks run every RESCHED_WORK VMAs."""
    if start & ~PAGE_MASK:
        raise MmError(errno.EINVAL, f"address {start:#x} is not page-aligned")
    if length < 0:
        raise MmError(errno.EINVAL, "length must not be negative")
    if length == 0:
        return
    length = page_align(length)
    end = start + length
    if end >= ADDR_LIMIT:
        raise MmError(errno.ENOMEM, "range wraps around the address space")
    if prot not in PROT_FLAGS:
        raise MmError(errno.EINVAL, f"prot must be one of {', '.join(PROT_FLAGS)}, not {prot!r}")
    prot_bits = PROT_FLAGS[prot]
    vma = mm.find_vma(start)
    if vma is None or vma.start > start:
        raise MmError(errno.ENOMEM, f"{start:#x} is not mapped")
    vma_split_reserve(k, cur, mm, start, end)
    addr = start
    work = 0
    while True:
        tmp = min(vma.end, end)
        vma = await mprotect_fixup(k, cur, vma, addr, tmp, prot_bits)
        addr = tmp
        if addr >= end:
            return
        work += 1
        if work >= RESCHED_WORK:
            work = 0
            await cond_resched()
        nxt = mm.find_vma(addr)
        if nxt is None or nxt.start > addr:
            # The VMAs up to the hole keep their new protection, as the kernel leaves them.
            raise MmError(errno.ENOMEM, f"{addr:#x} is not mapped")
        vma = nxt
