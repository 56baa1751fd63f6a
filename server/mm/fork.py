"""Process creation and teardown (kernel/fork.c dup_mmap, mm/mmap.c exit_mmap)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .locks import Current
from .memory import copy_page_range, free_pgtables, zap_pte_range
from .mm_types import VM_DONTCOPY, VM_LOCKED, VM_UFFD_FLAGS, VM_WIPEONFORK, Mm, Vma
from .rmap import anon_vma_fork, unlink_anon_vmas

if TYPE_CHECKING:
    from .kernel import Kernel

async def dup_mmap(k: Kernel, cur: Current, mm: Mm, oldmm: Mm) -> None:
    """Copy the parent's VMAs into the new mm. Expects oldmm's mmap_lock and, nested, mm's held for
    write. Per VMA takes the anon_vma root rwsem (anon_vma_fork), then both PTLs (copy_page_range).

    VM_DONTCOPY VMAs are skipped; VM_WIPEONFORK ones come with no anon_vma and no pages; the child
    loses userfaultfd registration (no UFFD_FEATURE_EVENT_FORK) and mlock.
    """
    sched = k.sched
    for mpnt in list(oldmm.vmas):
        if mpnt.flags & VM_DONTCOPY:
            continue
        tmp = Vma(k.next_vma_id(), mm, mpnt.start, mpnt.end, mpnt.pgoff, mpnt.flags & ~(VM_UFFD_FLAGS | VM_LOCKED))
        wipe = bool(mpnt.flags & VM_WIPEONFORK)
        if not wipe:
            await anon_vma_fork(k, cur, tmp, mpnt)
        mm.vma_link(tmp)
        if sched.active and sched.should_preempt("fork:after-anon-vma-fork"):
            await sched.yield_now("fork:after-anon-vma-fork")
        if not wipe and mpnt.anon_vma is not None:  # vma_needs_copy
            copy_page_range(k, cur, tmp, mpnt)
    k.stats["fork"] += 1


async def exit_mmap(k: Kernel, cur: Current, mm: Mm) -> None:
    """Tear down every VMA: zap, unlink from the anon_vmas, free page tables. Expects mmap_lock
    held for write; takes each PTL and anon_vma root in turn."""
    mm.users = 0
    sched = k.sched
    while mm.vmas:
        vma = mm.vmas[-1]
        zap_pte_range(k, cur, mm, vma.start, vma.end)
        mm.vma_unlink(vma)
        free_pgtables(mm, vma.start, vma.end)
        await unlink_anon_vmas(k, cur, vma)
        if sched.active and sched.should_preempt("exit:between-vmas"):
            await sched.yield_now("exit:between-vmas")
    mm.pgtables.clear()
    mm.uffd = None
