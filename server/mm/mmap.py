"""Private anonymous mappings (mm/mmap.c, mm/vma.c, mm/madvise.c): mmap, munmap, madvise, and
the VMA splitting and merging they do. Every function here expects mmap_lock held for write.

mm->map_count and vm.max_map_count (``Kernel.sysctl_max_map_count``), as 6.18 checks them (the
live kernel agrees at the limit, tests/conformance/187-*): do_mmap refuses when map_count is
above the limit, so a process at the limit still maps one VMA more; split_vma (vma_modify:
mprotect, madvise, userfaultfd registration) refuses each split at the limit, after the merge
that needs no split was tried; munmap only a hole strictly inside one VMA (vms_gather_munmap_vmas),
other munmaps may pass the limit for the moment. All answer ENOMEM, madvise EAGAIN.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING

from .huge_memory import vma_adjust_trans_huge
from .locks import Current
from .memory import free_pgtables, zap_pte_range
from .mm_types import (
    AVC_BYTES,
    MMAP_MIN_ADDR,
    PAGE_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    PROT_FLAGS,
    VM_ACCOUNT,
    VM_DONTCOPY,
    VM_HUGEPAGE,
    VM_IGNORE_MERGE,
    VM_MAYEXEC,
    VM_MAYREAD,
    VM_MAYWRITE,
    VM_NOHUGEPAGE,
    VM_WIPEONFORK,
    VM_WRITE,
    VMA_BYTES,
    Mm,
    MmError,
    Vma,
)
from .mmap_lock import vma_start_write
from .rmap import AnonVma, unlink_anon_vmas
from .sched import RESCHED_WORK, cond_resched

if TYPE_CHECKING:
    from .kernel import Kernel
    from .userfaultfd import UserfaultfdCtx

class TooManyMappings(MmError):
    """ENOMEM: the change would take the process past vm.max_map_count VMAs."""

    def __init__(self, mm: Mm, what: str = "reach") -> None:
        super().__init__(errno.ENOMEM, f"{mm.map_count} mappings {what} vm.max_map_count")


def page_align(n: int) -> int:
    return (n + PAGE_SIZE - 1) & PAGE_MASK


async def get_unmapped_area(mm: Mm, length: int) -> int:
    """Top-down placement: the highest gap below mmap_base that fits ``length``. Lets other tasks
    run every RESCHED_WORK VMAs passed over."""
    high = mm.mmap_base
    mt = mm.mm_mt
    work = 0
    for key in mt.irange(maximum=high, inclusive=(True, False), reverse=True):
        vma = mt[key]
        if high - vma.end >= length:
            return high - length
        high = vma.start
        work += 1
        if work >= RESCHED_WORK:
            work = 0
            await cond_resched()
    if high - MMAP_MIN_ADDR >= length:
        return high - length
    raise MmError(errno.ENOMEM, "no free address range large enough")


def vm_area_alloc(k: Kernel, cur: Current, mm: Mm, start: int, end: int, pgoff: int, flags: int) -> Vma:
    """A new VMA, charged (ENOMEM before anything changes)."""
    k.memcg.charge(cur, VMA_BYTES)
    k.vmas_live += 1
    return Vma(k.next_vma_id(), mm, start, end, pgoff, flags)


def vm_area_free(k: Kernel, vma: Vma) -> None:
    """The VMA is gone: unlinked from its mm and from every anon_vma."""
    k.vmas_live -= 1
    k.memcg.uncharge(VMA_BYTES)


def vma_split_reserve(k: Kernel, cur: Current, mm: Mm, start: int, end: int) -> None:
    """Reserve what splitting the VMAs at ``start`` and ``end`` may make (two VMAs with their
    chains), so that an operation over [start, end) cannot fail half-way. ENOMEM if no room."""
    need = 0
    for addr in (start, end):
        vma = mm.vma_lookup(addr)
        if vma is not None and vma.start < addr:
            need += VMA_BYTES + len(vma.anon_vma_chain) * AVC_BYTES
    if need:
        k.memcg.reserve(cur, need)


def vm_flags_for(prot: str) -> int:
    if prot not in PROT_FLAGS:
        raise MmError(errno.EINVAL, f"prot must be one of {', '.join(PROT_FLAGS)}, not {prot!r}")
    flags = PROT_FLAGS[prot] | VM_MAYREAD | VM_MAYWRITE | VM_MAYEXEC
    if flags & VM_WRITE:
        flags |= VM_ACCOUNT  # a private writable mapping is accounted
    return flags


async def do_mmap(k: Kernel, cur: Current, mm: Mm, addr: int | None, length: int, prot: str) -> int:
    """mmap(MAP_PRIVATE|MAP_ANONYMOUS), with MAP_FIXED_NOREPLACE when ``addr`` is given.
    Returns the address mapped (the VMA holding it may be larger after a merge)."""
    if length <= 0:
        raise MmError(errno.EINVAL, "length must be positive")
    flags = vm_flags_for(prot)
    length = page_align(length)
    if length > mm.task_size:
        raise MmError(errno.ENOMEM, "length exceeds the address space")
    # do_mmap: ">", so that a process at the limit may still map one VMA more; before the
    # address is placed or checked (its EINVAL, EPERM and EEXIST come after).
    if mm.map_count > k.sysctl_max_map_count:
        raise TooManyMappings(mm, "exceed")
    if addr is None:
        addr = await get_unmapped_area(mm, length)
    else:
        if addr & ~PAGE_MASK:
            raise MmError(errno.EINVAL, f"address {addr:#x} is not page-aligned")
        if addr < MMAP_MIN_ADDR:
            raise MmError(errno.EPERM, f"address {addr:#x} is below mmap_min_addr")
        if addr + length > mm.task_size:
            raise MmError(errno.ENOMEM, "range exceeds the address space")
        if mm.vmas_in(addr, addr + length):
            raise MmError(errno.EEXIST, f"[{addr:#x}, {addr + length:#x}) overlaps an existing mapping")
    vma = vm_area_alloc(k, cur, mm, addr, addr + length, addr >> PAGE_SHIFT, flags)
    mm.vma_link(vma)
    mm.map_count += 1
    await vma_merge(k, cur, vma)
    return addr


def _flags_mergeable(a: Vma, b: Vma) -> bool:
    return not ((a.flags ^ b.flags) & ~VM_IGNORE_MERGE) and a.uffd_ctx is b.uffd_ctx


def _had_uncowed_parents(vma: Vma) -> bool:
    return vma.anon_vma is not None and len(vma.anon_vma_chain) != 1


def _anon_vmas_mergeable(tgt: Vma, src: Vma) -> bool:
    """is_mergeable_anon_vma: may ``src`` be folded into ``tgt``?"""
    if tgt.anon_vma is None and src.anon_vma is not None:
        return not _had_uncowed_parents(src)
    if tgt.anon_vma is not None and src.anon_vma is None:
        return not _had_uncowed_parents(tgt)
    return tgt.anon_vma is src.anon_vma


def can_vma_merge(a: Vma, b: Vma) -> bool:
    """Can ``a`` and the VMA ``b`` directly above it become one?"""
    return (
        a.end == b.start
        and _flags_mergeable(a, b)
        and b.pgoff == a.pgoff + a.pages
        and (_anon_vmas_mergeable(a, b) or _anon_vmas_mergeable(b, a))
    )


async def _merge_pair(k: Kernel, cur: Current, a: Vma, b: Vma) -> Vma:
    """Fold ``b`` into ``a`` (a directly below b). dup_anon_vma, then unlink the removed VMA.
    Write-locks both VMAs first (vma_start_write)."""
    await vma_start_write(cur, a)
    await vma_start_write(cur, b)
    mm = a.mm
    if a.anon_vma is None and b.anon_vma is not None:
        a.anon_vma = b.anon_vma
        await k.ops.anon_vma_clone(k, cur, a, b, nofail=True)  # b's links go back just below
    mm.vma_unlink(b)
    mm.map_count -= 1
    a.end = b.end
    await unlink_anon_vmas(k, cur, b)
    vm_area_free(k, b)
    k.stats["vma_merge"] += 1
    return a


async def vma_merge(k: Kernel, cur: Current, vma: Vma) -> Vma:
    """Merge ``vma`` with its neighbours where the kernel would; returns the surviving VMA."""
    prev, nxt = vma.mm.vma_prev_next(vma)
    left = prev is not None and can_vma_merge(prev, vma)
    right = nxt is not None and can_vma_merge(vma, nxt)
    if left and right:
        assert prev is not None and nxt is not None
        # All three become one only if prev's and next's anon_vmas are compatible.
        pa: AnonVma | None = prev.anon_vma
        na: AnonVma | None = nxt.anon_vma
        if pa is not None and na is not None and pa is not na:
            right = False
    if left:
        assert prev is not None
        vma = await _merge_pair(k, cur, prev, vma)
    if right:
        assert nxt is not None
        vma = await _merge_pair(k, cur, vma, nxt)
    return vma


def vma_modify_merges(vma: Vma, start: int, end: int, flags: int, ctx: UserfaultfdCtx | None) -> bool:
    """vma_merge_existing_range: would [start, end) of ``vma``, given ``flags`` and ``ctx``, fold
    into a neighbour, so that vma_modify splits nothing (and checks nothing against
    vm.max_map_count)? Only a range that reaches an edge of ``vma`` merges, with the neighbour at
    that edge; the merge may only shrink the VMA count."""
    prev, nxt = vma.mm.vma_prev_next(vma)

    def fits(other: Vma) -> bool:
        return (
            not ((other.flags ^ flags) & ~VM_IGNORE_MERGE)
            and other.uffd_ctx is ctx
            and (_anon_vmas_mergeable(other, vma) or _anon_vmas_mergeable(vma, other))
        )

    if start == vma.start and prev is not None and prev.end == start and vma.pgoff == prev.pgoff + prev.pages:
        if fits(prev):
            return True
    return end == vma.end and nxt is not None and nxt.start == end and nxt.pgoff == vma.pgoff + vma.pages and fits(nxt)


async def split_vma(k: Kernel, cur: Current, vma: Vma, addr: int) -> Vma:
    """split_vma: __split_vma, refused (ENOMEM, nothing changed) when the process already has
    vm.max_map_count VMAs."""
    mm = vma.mm
    if mm.map_count >= k.sysctl_max_map_count:
        raise TooManyMappings(mm)
    return await __split_vma(k, cur, vma, addr)


async def __split_vma(k: Kernel, cur: Current, vma: Vma, addr: int) -> Vma:
    """Cut ``vma`` at ``addr``, with no vm.max_map_count check; returns the new upper part. Takes
    the root rwsem (anon_vma_clone)."""
    assert vma.start < addr < vma.end
    await vma_start_write(cur, vma)
    await vma_adjust_trans_huge(k, cur, vma, addr)  # a huge PMD across the cut is split first
    mm = vma.mm
    k.memcg.reserve(cur, VMA_BYTES + len(vma.anon_vma_chain) * AVC_BYTES)  # ENOMEM: nothing changed
    new = vm_area_alloc(k, cur, mm, addr, vma.end, vma.pgoff + ((addr - vma.start) >> PAGE_SHIFT), vma.flags)
    new.uffd_ctx = vma.uffd_ctx
    new.anon_vma = vma.anon_vma
    try:
        await k.ops.anon_vma_clone(k, cur, new, vma)
    except BaseException:
        vm_area_free(k, new)
        raise
    vma.end = addr
    mm.vma_link(new)
    mm.map_count += 1
    k.stats["vma_split"] += 1
    return new


async def vmas_isolate_range(k: Kernel, cur: Current, mm: Mm, start: int, end: int) -> list[Vma]:
    """vms_gather_munmap_vmas: split VMAs at ``start`` and ``end``; return those wholly inside
    [start, end). Only a range strictly inside one VMA, which leaves one VMA more, is checked
    against vm.max_map_count (ENOMEM, nothing changed); otherwise the count may pass the limit
    for the moment, the removal that follows brings it back."""
    vmas = mm.vmas_in(start, end)
    if not vmas:
        return []
    first, last = vmas[0], vmas[-1]
    if first.start < start:
        if end < first.end and mm.map_count >= k.sysctl_max_map_count:
            raise TooManyMappings(mm)
        new = await __split_vma(k, cur, first, start)
        if last is first:
            last = new
        vmas[0] = new
    if last.end > end:
        await __split_vma(k, cur, last, end)
    return vmas


async def do_munmap(
    k: Kernel, cur: Current, mm: Mm, start: int, length: int, unmapped: list[int] | None = None
) -> list[Vma]:
    """munmap: split at the edges (its worst case reserved first), zap, free page tables, unlink
    the anon_vmas. ENOMEM, nothing changed, for a hole strictly inside one VMA of a process at
    vm.max_map_count (vmas_isolate_range). Appends the page number of every folio unmapped to ``unmapped``. Lets other
    tasks run every RESCHED_WORK VMAs or PTEs."""
    if start & ~PAGE_MASK:
        raise MmError(errno.EINVAL, f"address {start:#x} is not page-aligned")
    if length <= 0:
        raise MmError(errno.EINVAL, "length must be positive")
    length = page_align(length)
    if start > mm.task_size or length > mm.task_size - start:
        raise MmError(errno.EINVAL, "range exceeds the address space")
    end = start + length
    vma_split_reserve(k, cur, mm, start, end)
    vmas = await vmas_isolate_range(k, cur, mm, start, end)
    work = 0
    for vma in vmas:
        await vma_start_write(cur, vma)  # a move or a fault under the VMA lock finishes first
        work += 1 + await zap_pte_range(k, cur, mm, vma.start, vma.end, unmapped)
        mm.vma_unlink(vma)
        mm.map_count -= 1  # vms_complete_munmap_vmas
        if work >= RESCHED_WORK:
            work = 0
            await cond_resched()
    if vmas:
        await free_pgtables(mm, start, end)
    for vma in vmas:
        work += 1 + len(vma.anon_vma_chain)
        await unlink_anon_vmas(k, cur, vma)
        vm_area_free(k, vma)
        if work >= RESCHED_WORK:
            work = 0
            await cond_resched()
    return vmas


#: The advice that changes VM flags: (flags set, flags cleared).
MADVISE = {
    "dontfork": (VM_DONTCOPY, 0),
    "dofork": (0, VM_DONTCOPY),
    "wipeonfork": (VM_WIPEONFORK, 0),
    "keeponfork": (0, VM_WIPEONFORK),
    "hugepage": (VM_HUGEPAGE, VM_NOHUGEPAGE),  # hugepage_madvise
    "nohugepage": (VM_NOHUGEPAGE, VM_HUGEPAGE),
}


async def do_madvise(k: Kernel, cur: Current, mm: Mm, start: int, length: int, advice: str) -> None:
    """madvise for the fork controls (MADV_DONTFORK/DOFORK/WIPEONFORK/KEEPONFORK) and the THP
    controls (MADV_HUGEPAGE/NOHUGEPAGE, each clearing the other). A split refused
    at vm.max_map_count is EAGAIN (checked on 6.18), a hole in the range ENOMEM."""
    if advice not in MADVISE:
        raise MmError(errno.EINVAL, f"advice must be one of {', '.join(MADVISE)}, not {advice!r}")
    if start & ~PAGE_MASK:
        raise MmError(errno.EINVAL, f"address {start:#x} is not page-aligned")
    if length < 0:
        raise MmError(errno.EINVAL, "length must not be negative")
    length = page_align(length)
    end = start + length
    if end >= 1 << 64:  # 6.18: EINVAL only when the range wraps; past task_size it is a hole (ENOMEM)
        raise MmError(errno.EINVAL, "range wraps around the address space")
    if length == 0:
        return
    set_bits, clear_bits = MADVISE[advice]
    covered = sum(min(v.end, end) - max(v.start, start) for v in mm.vmas_in(start, end))

    def update(vma: Vma) -> tuple[int, UserfaultfdCtx | None] | None:
        new_flags = (vma.flags | set_bits) & ~clear_bits
        return None if new_flags == vma.flags else (new_flags, vma.uffd_ctx)

    try:
        await vma_modify(k, cur, mm, start, end, update)
    except TooManyMappings as e:
        # madvise_vma_behavior: a kernel resource short (ENOMEM) is EAGAIN to madvise's caller.
        raise MmError(errno.EAGAIN, str(e)) from None
    if covered != length:
        raise MmError(errno.ENOMEM, "part of the range is not mapped")


async def vma_modify(
    k: Kernel,
    cur: Current,
    mm: Mm,
    start: int,
    end: int,
    update: Callable[[Vma], tuple[int, UserfaultfdCtx | None] | None],
) -> None:
    """Apply ``update`` (new flags and uffd ctx, or None for no change) to [start, end): split
    each VMA that changes at the range's edges, change it, and merge it where possible. The splits'
    worst case is reserved first, so ENOMEM comes before anything changes. Lets other tasks run
    every RESCHED_WORK VMAs."""
    vma_split_reserve(k, cur, mm, start, end)
    addr = start
    work = 0
    while addr < end:
        work += 1
        if work >= RESCHED_WORK:
            work = 0
            await cond_resched()
        vma = mm.find_vma(addr)
        if vma is None or vma.start >= end:
            return
        change = update(vma)
        if change is not None:
            # The kernel tries the merge first; only when none is possible does it split, each
            # split checked against vm.max_map_count (a failed second split leaves the first).
            merges = vma_modify_merges(vma, max(start, vma.start), min(end, vma.end), *change)
            split = __split_vma if merges else split_vma
            if vma.start < start:
                vma = await split(k, cur, vma, start)
            if vma.end > end:
                await split(k, cur, vma, end)
            await vma_start_write(cur, vma)
            vma.flags, vma.uffd_ctx = change
            vma = await vma_merge(k, cur, vma)
        addr = vma.end
