"""Migration entries (mm/migrate.c): what meets a page that a split has unmapped.

A split (huge_memory.split_folio) replaces each mapping of the large folio by a migration entry
(mm_types.MigrationEntry) while the folio's count is frozen, and maps the pages again when the
new folios are made. A fault, GUP or UFFDIO_MOVE that finds one waits until the splitter lets
the folio's lock go, and retries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .locks import Current
from .mm_types import PAGE_SHIFT, PMD_SHIFT, Mm, SwapPte, is_migration_entry

if TYPE_CHECKING:
    from .kernel import Kernel


async def migration_entry_wait(k: Kernel, cur: Current, mm: Mm, addr: int, orig: SwapPte) -> None:
    """migration_entry_wait: if the PTE at ``addr`` still holds the migration entry ``orig``
    (looked at under its PTL), sleep until the folio's lock is let go: the split that holds it
    has mapped the page again by then. Sleeps on the lock bit without taking it
    (migration_entry_wait_on_locked: folio_wait_bit). Expects no PTL held (the mmap_lock or the
    VMA's lock for read may be); takes the PTL, queues on the folio lock's bit under it (a release
    after the PTL goes still wakes it), lets the PTL go, then sleeps."""
    pt = mm.pgtables.get(addr >> PMD_SHIFT)
    if pt is None:
        return
    await k.spin_lock(cur, pt.ptl)
    entry = orig.entry
    if pt.swap.get(addr >> PAGE_SHIFT) is not orig:
        pt.ptl.spin_unlock(cur)
        return
    assert is_migration_entry(entry)
    k.stats["migration_entry_wait"] += 1
    lock = entry.folio.lock
    assert lock is not None
    free = lock.wait_bit(cur)
    pt.ptl.spin_unlock(cur)
    if not free: await lock.wait(cur)
