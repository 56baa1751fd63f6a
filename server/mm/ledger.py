"""The data ledger: the contents each process's pages are expected to hold.

Kept beside the model and updated at the same atomic points as the pages themselves (a write, a
fill, each step of a move, the pages an unmap or mremap took away or carried), so that the audit
(``invariants.audit_steps``) can prove data is neither lost nor duplicated. Large updates are made
in slices of RESCHED_WORK, letting other tasks run between them.
"""

from __future__ import annotations

from collections.abc import Sequence

from .mm_types import PAGE_SHIFT, PAGE_SIZE
from .sched import RESCHED_WORK, cond_resched


class PageLedger(dict[int, int]):
    """Expected contents of one process: virtual page number -> value, for pages holding a folio."""

    def moved(self, src_addr: int, dst_addr: int, nbytes: int) -> None:
        """UFFDIO_MOVE carried ``nbytes`` from src to dst (holes and zero pages carry nothing)."""
        s, d = src_addr >> PAGE_SHIFT, dst_addr >> PAGE_SHIFT
        if nbytes == PAGE_SIZE:
            value = self.pop(s, None)
            if value is not None:
                self[d] = value
            return
        for i in range(nbytes >> PAGE_SHIFT):
            value = self.pop(s + i, None)
            if value is not None:
                self[d + i] = value

    async def remapped(self, unmapped: Sequence[int], moved: Sequence[tuple[int, int]] = ()) -> None:
        """Pages were unmapped (their values dropped) and moved ((old, new) page numbers: the
        values follow), in slices of RESCHED_WORK."""
        for i in range(0, len(unmapped), RESCHED_WORK):
            if i:
                await cond_resched()
            for vpn in unmapped[i : i + RESCHED_WORK]:
                self.pop(vpn, None)
        if moved:
            values: list[tuple[int, int | None]] = []
            for i in range(0, len(moved), RESCHED_WORK):
                await cond_resched()
                values.extend((new, self.pop(old, None)) for old, new in moved[i : i + RESCHED_WORK])
            for i in range(0, len(values), RESCHED_WORK):
                await cond_resched()
                self.update((new, v) for new, v in values[i : i + RESCHED_WORK] if v is not None)

    async def copy_pages(self, vpns: Sequence[int]) -> PageLedger:
        """A child's ledger after fork: the values of the pages ``vpns`` that dup_mmap copied."""
        ledger = PageLedger()
        for i in range(0, len(vpns), RESCHED_WORK):
            if i:
                await cond_resched()
            ledger.update((vpn, self[vpn]) for vpn in vpns[i : i + RESCHED_WORK] if vpn in self)
        return ledger

    async def release(self) -> None:
        """Empty the ledger of an exited process; a big one is let go of in slices too."""
        while len(self) > RESCHED_WORK:
            for _ in range(RESCHED_WORK):
                self.popitem()
            await cond_resched()
