"""Per-VMA locks (include/linux/mmap_lock.h, mm/mmap_lock.c, 6.18), and the VMA lookup under them.

A reader (UFFDIO_MOVE through ``uffd_move_lock``, a page fault) locks just the VMAs it works on, for
read, without the mmap_lock. A writer holds the mmap_lock for write and write-locks every VMA it is
about to change (``vma_start_write``): it waits for the VMA's readers to leave, then marks the VMA
with the mm's sequence number, so that no reader gets in again until the writer's mmap_lock write
section ends (``vma_end_write_all``, which moves the sequence on and so unlocks them all at once).
A reader that finds a VMA write-locked, or cannot get its lock at once, falls back to the mmap_lock.

Lock order: mmap_lock -> VMA lock -> folio lock -> anon_vma root -> PTL (locks.LOCK_ORDER).
"""

from __future__ import annotations

from .locks import Current
from .mm_types import VM_SHARED, Mm, Vma


async def vma_start_write(cur: Current, vma: Vma) -> None:
    """Write-lock ``vma`` until the mmap_lock write section ends. Expects mmap_lock held for write;
    takes the VMA lock for write (waiting for its readers) and gives it back at once, leaving the
    VMA marked."""
    mm = vma.mm
    if vma.vm_lock_seq == mm.mm_lock_seq:
        return  # already write-locked in this section
    lock = vma.vm_lock
    if not lock.down_write(cur): await lock.wait(cur)
    vma.vm_lock_seq = mm.mm_lock_seq
    lock.up_write(cur)


def vma_end_write_all(mm: Mm) -> None:
    """Release every VMA write-locked in the current mmap_lock write section. Expects mmap_lock
    held for write, just before it is released."""
    mm.mm_lock_seq += 1


async def vma_start_read_locked(cur: Current, vma: Vma, nested: bool = False) -> None:
    """Read-lock ``vma`` under the mmap_lock (held for read: no writer can have it marked).
    Takes the VMA lock for read (``nested``: a second VMA lock, down_read_nested)."""
    lock = vma.vm_lock
    if not lock.down_read(cur, nested=nested):
        await lock.wait(cur)


def vma_end_read(cur: Current, vma: Vma) -> None:
    vma.vm_lock.up_read(cur)


def lock_vma_under_rcu(cur: Current, mm: Mm, addr: int) -> Vma | None:
    """The VMA at ``addr``, read-locked, or None (none there, write-locked, or with no anon_vma
    yet: preparing one needs the neighbours, which only the mmap_lock keeps still). The lookup and
    the trylock happen with nothing in between, as under RCU. Takes the VMA lock for read."""
    vma = mm.vma_lookup(addr)
    if vma is None or vma.vm_lock_seq == mm.mm_lock_seq:
        return None
    if vma.anon_vma is None and not vma.flags & VM_SHARED:
        return None
    # vma_start_read: the lookup, the tests and the trylock run with nothing in between (one
    # task at a time), so the sequence cannot change before the lock is taken.
    if not vma.vm_lock.down_read_trylock(cur):
        return None
    return vma
