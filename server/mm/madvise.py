"""madvise(2) (mm/madvise.c): the entry point, and MADV_DONTNEED, as in 6.18. The fork controls
(MADV_DONTFORK/DOFORK/WIPEONFORK/KEEPONFORK) change VMA flags and live in mmap.py.

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
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from .locks import Current
from .memory import zap_pte_range
from .mm_types import PAGE_MASK, VM_LOCKED, Mm, MmError
from .mmap import MADVISE, page_align
from .mmap import do_madvise as madvise_vma_flags
from .sched import RESCHED_WORK, cond_resched

if TYPE_CHECKING:
    from .kernel import Kernel

#: One past the largest address a 64-bit range may reach.
ADDR_LIMIT = 1 << 64

#: The advice values that zap pages.
MADVISE_ZAP = ("dontneed",)


async def madvise_dontneed(k: Kernel, cur: Current, mm: Mm, start: int, end: int, unmapped: list[int]) -> None:
    """MADV_DONTNEED over [start, end) (madvise_walk_vmas with madvise_dontneed_single_vma):
    zap_page_range_single on the part of each VMA in the range; the folios whose last mapping goes
    are freed, the anon_vmas and VMAs stay. Expects mmap_lock held; takes each PTL in turn. Appends
    the page number of every folio unmapped to ``unmapped``. A hole anywhere: everything mapped is
    still zapped, then ENOMEM; an mlocked VMA: EINVAL there. Lets other tasks run every
    RESCHED_WORK VMAs or PTEs. Allocates nothing."""
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
        work += 1 + await zap_pte_range(k, cur, mm, addr, tmp, unmapped)
        addr = tmp
        if work >= RESCHED_WORK:
            work = 0
            await cond_resched()
    if hole:
        raise MmError(errno.ENOMEM, "part of the range is not mapped")


async def do_madvise(
    k: Kernel, cur: Current, mm: Mm, start: int, length: int, advice: str, unmapped: list[int] | None = None
) -> None:
    """madvise(2): the argument checks in 6.18's order, then the advice. Expects mmap_lock held for
    write. For MADV_DONTNEED, appends the page number of every folio unmapped to ``unmapped`` (also
    when it then fails: the zapping is not undone)."""
    if advice not in MADVISE and advice not in MADVISE_ZAP:
        raise MmError(
            errno.EINVAL, f"advice must be one of {', '.join((*MADVISE, *MADVISE_ZAP))}, not {advice!r}"
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
    await madvise_vma_flags(k, cur, mm, start, length, advice)
