"""mremap(2) for private anonymous mappings (mm/mremap.c), as in 6.18.

Every function here expects mmap_lock held for write.

What the live 6.18 kernel does (checked with mremap(2) on these machines, /proc/self/maps,
/proc/self/smaps and /proc/self/pagemap):
- flags other than MAYMOVE|FIXED|DONTUNMAP, an address that is not page-aligned, new_len 0 or
  above TASK_SIZE: EINVAL. Lengths are rounded up to whole pages;
- with FIXED or DONTUNMAP: a new address whose range ends past TASK_SIZE or that is not aligned,
  no MAYMOVE, DONTUNMAP with old_len != new_len, the new range overlapping the old one: EINVAL.
  DONTUNMAP without FIXED compares the old range with [0, new_len) (the new address is 0 then):
  a mapping at 0x10000 of 0x20000 bytes moved that way gets EINVAL;
- no VMA at the address: EFAULT; a grow (or any FIXED/DONTUNMAP move) whose old range runs past
  the end of its VMA: EFAULT; old_len 0 of a private mapping when growing or moving: EINVAL;
- same size without FIXED: nothing is checked past the first VMA, the address is returned
  (even with MAYMOVE, even if the old range spans several VMAs or holes);
- shrink without a new address: [addr + new_len, addr + old_len) is unmapped whatever is there
  (several VMAs or holes included), the address is returned;
- grow in place when the old range ends at its VMA's end and nothing is mapped up to the new
  end; the VMA then merges with the next one if they fit. Otherwise ENOMEM without MAYMOVE (also
  when the old range does not reach the VMA's end), a move with it (the new address top-down);
- a move keeps the pages (same PFNs, values) at the new address; the new tail is not populated;
- FIXED unmaps what is at the new range first (the pages there are gone), then moves;
- FIXED with old_len == new_len (a pure move, 6.17+) may span several VMAs and the holes between
  them: each VMA part moves to the same offset from the new address (gaps kept, the gaps at the
  destination are not unmapped). A hole at the start of the range: EFAULT, nothing moved; no
  VMA at all: EFAULT. A userfaultfd-registered VMA may not be part of such a move: EFAULT when
  it is not the first VMA (the VMAs before it have already moved) or when it is the first and
  the range goes on past it (nothing moved; a trailing hole counts);
- DONTUNMAP: the old VMA stays, with its flags, and is empty (reads give the zero page);
- userfaultfd without UFFD_FEATURE_EVENT_REMAP (what this model's userfaultfd has): the VMA
  holding the new range is unregistered (VmFlags without "um"), whatever the move (grow, FIXED,
  DONTUNMAP). If the new VMA merged into a registered neighbour, the whole merged VMA is
  unregistered, the neighbour's part included. With DONTUNMAP the old range stays registered.
  Growing or shrinking in place keeps the registration.

vm.max_map_count (mm/mremap.c of 6.18; past the limit the live kernel answers the same,
tests/conformance/187-*): with
FIXED or DONTUNMAP, ENOMEM before anything unless map_count + 2 < vm.max_map_count - 3
(check_mremap_params); any move, ENOMEM unless map_count < vm.max_map_count - 3 when it starts
(move_vma), after what FIXED and a shrink unmapped; shrinking and growing in place add no VMA
and are not checked beyond munmap's own check.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from .huge_memory import __split_huge_pmd, move_huge_pmd, pmd_none
from .locks import Current
from .mm_types import (
    AVC_BYTES,
    HPAGE_PMD_NR,
    MMAP_MIN_ADDR,
    PAGE_MASK,
    PAGE_SHIFT,
    PGTABLE_BYTES,
    PMD_MASK,
    PMD_SHIFT,
    PMD_SIZE,
    VM_LOCKED,
    VM_UFFD_FLAGS,
    VM_UFFD_WP,
    VMA_BYTES,
    ZERO_PAGE,
    Mm,
    MmError,
    Vma,
)
from .mmap import (
    TooManyMappings,
    _merge_pair,
    can_vma_merge,
    do_munmap,
    get_unmapped_area,
    page_align,
    vm_area_alloc,
    vm_area_free,
    vma_merge,
)
from .mmap_lock import vma_start_write
from .rmap import AnonVma, anon_vma_lock_write, anon_vma_unlock_write, unlink_anon_vmas
from .sched import RESCHED_WORK, cond_resched
from .userfaultfd import double_pt_unlock, uffd_wp_clear

if TYPE_CHECKING:
    from .kernel import Kernel

MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
MREMAP_DONTUNMAP = 4
MREMAP_FLAGS = MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP


class RemapLog:
    """What a remap did to pages holding folios, for the caller's ledger: page numbers unmapped,
    and (old, new) page numbers moved."""

    __slots__ = ("unmapped", "moved")

    def __init__(self) -> None:
        self.unmapped: list[int] = []
        self.moved: list[tuple[int, int]] = []


def _overlaps(a: int, alen: int, b: int, blen: int) -> bool:
    return a < b + blen and b < a + alen


def check_mremap_params(
    k: Kernel, mm: Mm, addr: int, old_len: int, new_len: int, flags: int, new_addr: int
) -> None:
    """The checks made before mmap_lock is taken (lengths already page-aligned). A move to a given
    address must leave room below vm.max_map_count for the worst case of its unmaps (the
    destination's and the source's each splitting a VMA in three) and more: ENOMEM unless
    map_count + 2 < vm.max_map_count - 3."""
    if flags & ~MREMAP_FLAGS:
        raise MmError(errno.EINVAL, f"unknown flags {flags & ~MREMAP_FLAGS:#x}")
    if addr & ~PAGE_MASK:
        raise MmError(errno.EINVAL, f"address {addr:#x} is not page-aligned")
    if not new_len:
        raise MmError(errno.EINVAL, "new length must be positive")
    if new_len > mm.task_size:
        raise MmError(errno.EINVAL, "new length exceeds the address space")
    if not flags & (MREMAP_FIXED | MREMAP_DONTUNMAP):
        return
    if new_addr > mm.task_size - new_len:
        raise MmError(errno.EINVAL, "new range exceeds the address space")
    if new_addr & ~PAGE_MASK:
        raise MmError(errno.EINVAL, f"new address {new_addr:#x} is not page-aligned")
    if not flags & MREMAP_MAYMOVE:
        raise MmError(errno.EINVAL, "MREMAP_FIXED and MREMAP_DONTUNMAP need MREMAP_MAYMOVE")
    if flags & MREMAP_DONTUNMAP and old_len != new_len:
        raise MmError(errno.EINVAL, "MREMAP_DONTUNMAP cannot resize")
    if _overlaps(addr, old_len, new_addr, new_len):
        raise MmError(errno.EINVAL, "the new range overlaps the old one")
    if mm.map_count + 2 >= k.sysctl_max_map_count - 3:
        raise TooManyMappings(mm, "leave too little room below")


def check_prep_vma(vma: Vma | None, addr: int, old_len: int, new_len: int, flags: int) -> Vma:
    """The checks on the VMA at ``addr`` (mmap_lock held)."""
    if vma is None:
        raise MmError(errno.EFAULT, f"no mapping at {addr:#x}")
    if new_len <= old_len and not flags & (MREMAP_FIXED | MREMAP_DONTUNMAP):
        return vma  # no new mapping: shrink or no-op, which may span anything
    if not old_len:
        raise MmError(errno.EINVAL, "old length 0 duplicates only shared mappings")
    if min(old_len, new_len) > vma.end - addr:
        raise MmError(errno.EFAULT, "the old range runs past the end of its mapping")
    return vma


def _dst_pgtables(mm: Mm, old_addr: int, length: int, new_addr: int, fixed: bool) -> tuple[int, int]:
    """(PTE tables a move of [old_addr, +length) to new_addr may allocate, work done). With
    ``fixed`` the tables there now are not counted on (the unmap before the move may free them)."""
    delta = (new_addr - old_addr) >> PAGE_SHIFT
    lo, hi = old_addr >> PAGE_SHIFT, (old_addr + length) >> PAGE_SHIFT
    need: set[int] = set()
    work = 0
    shift = PMD_SHIFT - PAGE_SHIFT
    for idx in mm.pgtables_in(old_addr, old_addr + length):
        pt = mm.pgtables[idx]
        work += 1 + len(pt.ptes) + len(pt.swap)
        for vpn in (*pt.ptes, *pt.swap):
            if lo <= vpn < hi:
                need.add((vpn + delta) >> shift)
    for idx in mm.huge_pmds_in(old_addr, old_addr + length):
        if not _moves_whole(idx, old_addr, length, new_addr):  # split: its PTEs need tables there
            first, last = max(idx << shift, lo), min((idx + 1) << shift, hi) - 1
            need.update(((first + delta) >> shift, (last + delta) >> shift))
        work += 1
    if not fixed:
        need = {i for i in need if i not in mm.pgtables}
    return len(need), work


def _moves_whole(idx: int, old_addr: int, length: int, new_addr: int) -> bool:
    """Does a move of [old_addr, +length) to new_addr take the huge PMD at ``idx`` whole (both
    ends PMD-aligned, the PMD inside the range)?"""
    haddr = idx << PMD_SHIFT
    return old_addr <= haddr and haddr + PMD_SIZE <= old_addr + length and not (new_addr - old_addr) & ~PMD_MASK


def _chain_len(vma: Vma | None) -> int:
    return len(vma.anon_vma_chain) if vma is not None else 0


async def mremap_move_reserve(
    k: Kernel, cur: Current, mm: Mm, pieces: list[tuple[int, int, int, int]], flags: int
) -> None:
    """Reserve the worst case of moving each (old_addr, old_len, new_addr, new_len) piece: the
    splits of the unmaps (the destination's with FIXED, the tail's of a shrink, the source's),
    the new VMA and its chain, the PTE tables at the destination. ENOMEM before anything changes.
    Merges need nothing reserved: each frees more than it takes. Lets other tasks run every
    RESCHED_WORK PTEs looked at."""
    fixed = bool(flags & MREMAP_FIXED)
    # Every split splits a source VMA, a VMA at a destination's edges, or a VMA merged from them:
    # its chain is at most the longest of theirs.
    maxc = 0
    for old_addr, _, new_addr, new_len in pieces:
        maxc = max(
            maxc,
            _chain_len(mm.vma_lookup(old_addr)),
            _chain_len(mm.vma_lookup(new_addr - 1) if new_addr else None),
            _chain_len(mm.vma_lookup(new_addr)),
            _chain_len(mm.vma_lookup(new_addr + new_len - 1)),
            _chain_len(mm.vma_lookup(new_addr + new_len)),
        )
    split = VMA_BYTES + maxc * AVC_BYTES
    total = 0
    work = len(pieces) * 5
    for old_addr, old_len, new_addr, new_len in pieces:
        src = mm.vma_lookup(old_addr)
        if fixed:
            total += 2 * split
        if new_len < old_len:
            total += 2 * split
        total += VMA_BYTES + _chain_len(src) * AVC_BYTES
        tables, w = _dst_pgtables(mm, old_addr, min(old_len, new_len), new_addr, fixed)
        total += tables * PGTABLE_BYTES
        if not flags & MREMAP_DONTUNMAP:
            total += 2 * split
        work += w + 1
        if work >= RESCHED_WORK:
            work = 0
            await cond_resched()
    if total:
        k.memcg.reserve(cur, total)


async def copy_vma(k: Kernel, cur: Current, vma: Vma, addr: int, length: int, pgoff: int) -> Vma:
    """A VMA like ``vma`` at [addr, addr + length), sharing its anon_vma (its chain cloned), merged
    with its new neighbours where they fit; returns the VMA that holds the new range. A VMA
    never faulted (no anon_vma) takes the pgoff of its new address. Expects mmap_lock held for
    write and the VMA and chain charged or reserved; takes the anon_vma root (anon_vma_clone)."""
    if vma.anon_vma is None:
        pgoff = addr >> PAGE_SHIFT
    mm = vma.mm
    new = vm_area_alloc(k, cur, mm, addr, addr + length, pgoff, vma.flags)
    new.uffd_ctx = vma.uffd_ctx
    new.anon_vma = vma.anon_vma
    try:
        await k.ops.anon_vma_clone(k, cur, new, vma)
    except BaseException:
        vm_area_free(k, new)
        raise
    mm.vma_link(new)
    mm.map_count += 1
    return await vma_merge(k, cur, new)


async def move_page_tables(
    k: Kernel, cur: Current, mm: Mm, root: AnonVma | None, old_addr: int, new_addr: int, length: int,
    moved: list[tuple[int, int]],
) -> int:
    """Move the PTEs of [old_addr, old_addr + length) to new_addr: the folios keep their index,
    anon_vma, mapcount and exclusivity (the new VMA shares the anon_vma and the pgoff), so rmap
    finds them at the new address. Expects mmap_lock held for write and the destination's PTE
    tables reserved; per source PTE table takes the anon_vma ``root`` for write (so that no rmap
    walk sees a page in neither VMA), then both PTLs in address order. Appends (old, new) page
    numbers of every folio moved to ``moved``. Lets other tasks run between source tables every
    RESCHED_WORK PTEs. Returns the PTEs moved."""
    delta = (new_addr - old_addr) >> PAGE_SHIFT
    lo, hi = old_addr >> PAGE_SHIFT, (old_addr + length) >> PAGE_SHIFT
    shift = PMD_SHIFT - PAGE_SHIFT
    count = 0
    work = 0
    for idx in mm.huge_pmds_in(old_addr, old_addr + length):
        old_vma, new_vma = mm.vma_lookup(idx << PMD_SHIFT), mm.vma_lookup((idx << PMD_SHIFT) + (delta << PAGE_SHIFT))
        assert old_vma is not None
        new_idx = idx + (delta >> shift)
        if _moves_whole(idx, old_addr, length, new_addr) and new_vma is not None and pmd_none(mm, new_idx):
            if root is not None:
                await anon_vma_lock_write(cur, root)
            try:
                await move_huge_pmd(k, cur, old_vma, new_vma, idx, new_idx)
            finally:
                if root is not None:
                    anon_vma_unlock_write(cur, root)
            vpn0 = idx << shift
            moved.extend((v, v + delta) for v in range(vpn0, vpn0 + HPAGE_PMD_NR))
            count += 1
        else:
            await __split_huge_pmd(k, cur, old_vma, idx << PMD_SHIFT)
    for idx in mm.pgtables_in(old_addr, old_addr + length):
        src_pt = mm.pgtables.get(idx)
        if src_pt is None or not (src_pt.ptes or src_pt.swap):
            continue
        vpns = [v for v in src_pt.ptes if lo <= v < hi]
        swap_vpns = [v for v in src_pt.swap if lo <= v < hi]
        if not vpns and not swap_vpns:
            continue
        groups: dict[int, list[int]] = {}
        for v in vpns:
            groups.setdefault((v + delta) >> shift, []).append(v)
        swap_groups: dict[int, list[int]] = {}
        for v in swap_vpns:  # swap PTEs move as they are (move_ptes: move_pte of a non-present PTE)
            swap_groups.setdefault((v + delta) >> shift, []).append(v)
            groups.setdefault((v + delta) >> shift, [])
        if root is not None:
            await anon_vma_lock_write(cur, root)
        try:
            for dst_idx, group in groups.items():
                dst_pt = mm.pte_alloc(cur, dst_idx << PMD_SHIFT)
                # either table may be shared with a VMA a mover (preempted in its PTL section) holds
                while (src_pt.ptl.owner or dst_pt.ptl.owner) is not None:
                    await k.spin_on(cur, src_pt.ptl if src_pt.ptl.owner is not None else dst_pt.ptl)
                src_pt.ptl.spin_lock(cur)  # move_ptes: the old PTL, then the new one nested
                if dst_pt.ptl is not src_pt.ptl:
                    dst_pt.ptl.spin_lock(cur, nested=True)
                src, dst = src_pt.ptes, dst_pt.ptes
                for v in group:
                    pte = src.pop(v)
                    assert dst_pt.pte_none(v + delta), "moving onto a PTE"
                    dst[v + delta] = pte
                    if pte.folio is not ZERO_PAGE:
                        moved.append((v, v + delta))
                for v in swap_groups.get(dst_idx, ()):
                    assert dst_pt.pte_none(v + delta), "moving onto a PTE"
                    dst_pt.swap[v + delta] = src_pt.swap.pop(v)
                    moved.append((v, v + delta))
                double_pt_unlock(cur, dst_pt.ptl, src_pt.ptl)
        finally:
            if root is not None:
                anon_vma_unlock_write(cur, root)
        count += len(vpns) + len(swap_vpns)
        work += len(vpns) + len(swap_vpns) + 1
        if work >= RESCHED_WORK:
            work = 0
            await cond_resched()
    return count


async def mremap_userfaultfd_prep(cur: Current, vma: Vma) -> None:
    """The userfaultfd has no UFFD_FEATURE_EVENT_REMAP: the VMA holding the new range (all of it,
    if it merged with a neighbour) drops its registration, and its PTEs their uffd-wp bits
    (checked on 6.18: a write there after a new WP registration does not fault). No merge
    follows. Expects mmap_lock held for write and the VMA write-locked; takes the PTLs."""
    if vma.uffd_ctx is not None:
        if vma.flags & VM_UFFD_WP:
            await uffd_wp_clear(cur, vma.mm, vma.start, vma.end)
        vma.flags &= ~VM_UFFD_FLAGS
        vma.uffd_ctx = None


async def dontunmap_complete(k: Kernel, cur: Current, mm: Mm, old_addr: int, old_len: int, new_vma: Vma) -> None:
    """MREMAP_DONTUNMAP: the old VMA stays, unlocked; if all of it moved (and it did not become
    the new VMA), its anon_vma links are no longer needed. Takes the anon_vma root."""
    vma = mm.vma_lookup(old_addr)
    assert vma is not None
    vma.flags &= ~VM_LOCKED
    if vma is not new_vma and vma.start == old_addr and vma.end == old_addr + old_len:
        await unlink_anon_vmas(k, cur, vma)


async def move_vma(
    k: Kernel, cur: Current, mm: Mm, old_addr: int, old_len: int, new_addr: int, new_len: int, flags: int,
    log: RemapLog,
) -> int:
    """Copy the VMA part to new_addr, move its PTEs, drop the new VMA's userfaultfd registration,
    then unmap the old range (or, with DONTUNMAP, keep it empty). Expects mmap_lock held for write
    and everything it allocates reserved (mremap_move_reserve); takes the anon_vma root and the
    PTLs. Returns new_addr."""
    if mm.map_count >= k.sysctl_max_map_count - 3:  # prep_move_vma: before anything is copied
        raise TooManyMappings(mm, "leave too little room below")
    vma = mm.vma_lookup(old_addr)
    assert vma is not None
    await vma_start_write(cur, vma)  # a move or fault under the VMA lock finishes first
    root = vma.anon_vma_chain[0].anon_vma.root if vma.anon_vma_chain else None
    new_pgoff = vma.pgoff + ((old_addr - vma.start) >> PAGE_SHIFT)
    new_vma = await copy_vma(k, cur, vma, new_addr, new_len, new_pgoff)
    await move_page_tables(k, cur, mm, root, old_addr, new_addr, old_len, log.moved)
    await vma_start_write(cur, new_vma)
    await mremap_userfaultfd_prep(cur, new_vma)
    if flags & MREMAP_DONTUNMAP:
        await dontunmap_complete(k, cur, mm, old_addr, old_len, new_vma)
    else:
        await do_munmap(k, cur, mm, old_addr, old_len, log.unmapped)
    return new_addr


async def mremap_to(
    k: Kernel, cur: Current, mm: Mm, addr: int, old_len: int, new_addr: int, new_len: int, flags: int,
    log: RemapLog, reserved: bool = False,
) -> int:
    """A move to a given address (FIXED) or, for DONTUNMAP alone, to a free one: reserve (unless
    the caller ``reserved``), unmap the destination (FIXED), shrink the source (FIXED with a
    smaller new_len), move. Expects mmap_lock held for write."""
    fixed = bool(flags & MREMAP_FIXED)
    if not fixed:
        new_addr = await get_unmapped_area(mm, new_len)
    if not reserved:
        await mremap_move_reserve(k, cur, mm, [(addr, old_len, new_addr, new_len)], flags)
    if fixed:
        await do_munmap(k, cur, mm, new_addr, new_len, log.unmapped)
    if new_len < old_len:
        await do_munmap(k, cur, mm, addr + new_len, old_len - new_len, log.unmapped)
        old_len = new_len
    if fixed and new_addr < MMAP_MIN_ADDR:
        # get_unmapped_area(MAP_FIXED) checks mmap_min_addr after the destination was unmapped.
        raise MmError(errno.EPERM, f"address {new_addr:#x} is below mmap_min_addr")
    return await move_vma(k, cur, mm, addr, old_len, new_addr, new_len, flags, log)


def vma_expandable(mm: Mm, vma: Vma, delta: int) -> bool:
    end = vma.end + delta
    if end > mm.task_size:
        return False
    nxt = mm.find_vma(vma.end)
    return nxt is None or nxt.start >= end


async def expand_vma(
    k: Kernel, cur: Current, mm: Mm, vma: Vma, addr: int, old_len: int, new_len: int, flags: int, log: RemapLog
) -> int:
    """Grow: in place when the old range ends at the VMA's end and the space after it is free
    (merging with the next VMA where they fit), else move with MAYMOVE (ENOMEM without)."""
    delta = new_len - old_len
    if addr + old_len == vma.end and vma_expandable(mm, vma, delta):
        await vma_start_write(cur, vma)
        vma.end += delta
        nxt = mm.vma_prev_next(vma)[1]
        if nxt is not None and can_vma_merge(vma, nxt):
            await _merge_pair(k, cur, vma, nxt)
        return addr
    if not flags & MREMAP_MAYMOVE:
        raise MmError(errno.ENOMEM, "cannot grow in place and MREMAP_MAYMOVE not given")
    new_addr = await get_unmapped_area(mm, new_len)
    await mremap_move_reserve(k, cur, mm, [(addr, old_len, new_addr, new_len)], flags)
    return await move_vma(k, cur, mm, addr, old_len, new_addr, new_len, flags, log)


async def remap_move(
    k: Kernel, cur: Current, mm: Mm, addr: int, length: int, new_addr: int, flags: int, log: RemapLog
) -> int:
    """FIXED with old_len == new_len: move every VMA part of [addr, addr + length) to the same
    offset from new_addr, gaps kept. The parts that will move are found first and their worst
    case reserved together (a budget ENOMEM changes nothing); an EFAULT found at a later part
    comes after the parts before it moved, as in the kernel. Lets other tasks run every
    RESCHED_WORK VMAs."""
    start, end = addr, addr + length
    pieces: list[tuple[int, int, int, int]] = []
    fail: MmError | None = None
    target = new_addr
    last_end = 0
    work = 0
    vma = mm.find_vma(start)
    while vma is not None and vma.start < end:
        a = max(vma.start, start)
        n = min(end, vma.end) - a
        if not pieces and start < vma.start:
            fail = MmError(errno.EFAULT, f"no mapping at {start:#x}")
            break
        offset = vma.start - last_end if pieces else 0
        last_end = vma.end
        if vma.flags & VM_UFFD_FLAGS and (pieces or vma.end < end):
            fail = MmError(errno.EFAULT, "a userfaultfd-registered mapping moves only on its own")
            break
        pieces.append((a, n, target + offset, n))
        target += offset + n
        work += 1
        if work >= RESCHED_WORK:
            work = 0
            await cond_resched()
        vma = mm.find_vma(vma.end)
    if not pieces:
        raise fail or MmError(errno.EFAULT, f"no mapping in [{start:#x}, {end:#x})")
    await mremap_move_reserve(k, cur, mm, pieces, flags)
    for a, n, to, _ in pieces:
        await mremap_to(k, cur, mm, a, n, to, n, flags, log, reserved=True)
    if fail is not None:
        raise fail
    return new_addr


async def do_mremap(
    k: Kernel, cur: Current, mm: Mm, addr: int, old_len: int, new_len: int, flags: int, new_addr: int,
    log: RemapLog,
) -> int:
    """mremap(2) of private anonymous memory. Expects mmap_lock held for write. Returns the new
    address. What it unmapped and moved goes to ``log`` (also when it then fails)."""
    if old_len < 0 or new_len < 0:
        raise MmError(errno.EINVAL, "lengths must not be negative")
    old_len, new_len = page_align(old_len), page_align(new_len)
    check_mremap_params(k, mm, addr, old_len, new_len, flags, new_addr)
    if flags & MREMAP_FIXED and old_len == new_len:
        return await remap_move(k, cur, mm, addr, old_len, new_addr, flags, log)
    vma = check_prep_vma(mm.vma_lookup(addr), addr, old_len, new_len, flags)
    if flags & (MREMAP_FIXED | MREMAP_DONTUNMAP):
        return await mremap_to(k, cur, mm, addr, old_len, new_addr, new_len, flags, log)
    if new_len == old_len:
        return addr
    if new_len < old_len:
        await do_munmap(k, cur, mm, addr + new_len, old_len - new_len, log.unmapped)
        return addr
    return await expand_vma(k, cur, mm, vma, addr, old_len, new_len, flags, log)
