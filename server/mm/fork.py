"""Process creation and teardown (kernel/fork.c dup_mmap, mm/mmap.c exit_mmap)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .locks import Current
from .memory import copy_page_range, zap_pte_range
from .mm_types import PGTABLE_BYTES, VM_DONTCOPY, VM_LOCKED, VM_UFFD_FLAGS, VM_WIPEONFORK, Mm
from .mmap import vm_area_alloc, vm_area_free
from .mmap_lock import vma_start_write
from .rmap import unlink_anon_vmas
from .sched import RESCHED_WORK, cond_resched
from .userfaultfd import userfaultfd_release

if TYPE_CHECKING:
    from .kernel import Kernel


async def dup_mmap(k: Kernel, cur: Current, mm: Mm, oldmm: Mm, copied: list[int] | None = None) -> None:
    """Copy the parent's VMAs into the new mm. Expects oldmm's mmap_lock and, nested, mm's held for
    write. Per VMA takes the anon_vma root rwsem (anon_vma_fork), then both PTLs (copy_page_range).

    VM_DONTCOPY VMAs are skipped; VM_WIPEONFORK ones come with no anon_vma and no pages; the child
    loses userfaultfd registration (no UFFD_FEATURE_EVENT_FORK) and mlock. Every object is charged
    as it is made; ENOMEM (or cancellation) leaves a half-built child that the caller tears down
    with exit_mmap. Appends the page number of every folio mapped into the child to ``copied``.
    Lets other tasks run every RESCHED_WORK VMAs or PTEs.
    """
    sched = k.sched
    work = 0
    # The parent's VMAs cannot change under its mmap_lock; iterate the tree itself.
    for mpnt in oldmm.vmas:
        work += 1
        if work >= RESCHED_WORK:
            work = 0
            await cond_resched()
        await vma_start_write(cur, mpnt)  # no fault or move on the parent's VMA while it is copied
        if mpnt.flags & VM_DONTCOPY:
            continue
        tmp = vm_area_alloc(k, cur, mm, mpnt.start, mpnt.end, mpnt.pgoff, mpnt.flags & ~(VM_UFFD_FLAGS | VM_LOCKED))
        wipe = bool(mpnt.flags & VM_WIPEONFORK)
        if not wipe:
            try:
                await k.ops.anon_vma_fork(k, cur, tmp, mpnt)
            except BaseException:
                vm_area_free(k, tmp)
                raise
        mm.vma_link(tmp)
        mm.map_count += 1  # the child counts what it copied; fork checks no vm.max_map_count
        if sched.active: await sched.point("fork:after-anon-vma-fork")
        if not wipe and mpnt.anon_vma is not None:  # vma_needs_copy
            work += await copy_page_range(k, cur, tmp, mpnt, copied)
    k.stats["fork"] += 1


async def exit_mmap(k: Kernel, cur: Current, mm: Mm) -> None:
    """Tear down every VMA: zap, unlink from the anon_vmas, free page tables. Expects mmap_lock
    held for write; takes each PTL and anon_vma root in turn. Lets other tasks run every
    RESCHED_WORK VMAs or PTEs."""
    mm.users = 0
    if mm.uffd is not None:
        # Faults asleep in handle_userfault wake and find the mm gone (ESRCH); readers end.
        userfaultfd_release(k, mm.uffd)
    sched = k.sched
    work = 0
    while mm.mm_mt:
        vma = mm.mm_mt.peekitem(-1)[1]
        await vma_start_write(cur, vma)  # a move or a fault under the VMA lock finishes first
        work += 1 + len(vma.anon_vma_chain) + await zap_pte_range(k, cur, mm, vma.start, vma.end)
        mm.vma_unlink(vma)
        mm.map_count -= 1
        await unlink_anon_vmas(k, cur, vma)
        vm_area_free(k, vma)
        if sched.active: await sched.point("exit:between-vmas")
        if work >= RESCHED_WORK:
            work = 0
            await cond_resched()
    # free_pgtables of the whole address space: every table is empty now.
    pgtables = mm.pgtables
    while pgtables:
        n = min(len(pgtables), RESCHED_WORK)
        for _ in range(n):
            pgtables.popitem()
        k.memcg.uncharge(n * PGTABLE_BYTES)
        if pgtables:
            await cond_resched()
    mm.uffd = None
