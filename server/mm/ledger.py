"""The data ledger: the contents each process's pages are expected to hold.

Kept beside the model and updated at the same atomic points as the pages themselves (a write, a
fill, each step of a move, the pages an unmap or mremap took away or carried), so that the audit
(``invariants.audit_steps``) can prove data is neither lost nor duplicated. Large updates are made
in slices of RESCHED_WORK, letting other tasks run between them.

The entries are kept per PMD (a table of the values written in it, by page offset), as the page
tables are: a move of a whole PMD to a PMD-aligned address (a huge PMD's, UFFDIO_MOVE or mremap)
carries its table over in one step, whatever the number of pages written in it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableMapping, Sequence

from .mm_types import PAGE_SHIFT, PAGE_SIZE, PMD_SHIFT, PMD_SIZE
from .sched import RESCHED_WORK, cond_resched

_SHIFT = PMD_SHIFT - PAGE_SHIFT
_MASK = (1 << _SHIFT) - 1


class PageLedger(MutableMapping[int, int]):
    """Expected contents of one process: virtual page number -> value, for the pages written or
    filled (a page of a large folio that is not here reads 0)."""

    __slots__ = ("_pmds", "_len")

    def __init__(self) -> None:
        self._pmds: dict[int, dict[int, int]] = {}  # PMD index -> {page offset in it: value}
        self._len = 0

    def __getitem__(self, vpn: int) -> int:
        return self._pmds[vpn >> _SHIFT][vpn & _MASK]

    def get(self, vpn: int, default: int | None = None) -> int | None:  # type: ignore[override]
        table = self._pmds.get(vpn >> _SHIFT)
        return default if table is None else table.get(vpn & _MASK, default)

    def __contains__(self, vpn: object) -> bool:
        if not isinstance(vpn, int):
            return False
        table = self._pmds.get(vpn >> _SHIFT)
        return table is not None and (vpn & _MASK) in table

    def __setitem__(self, vpn: int, value: int) -> None:
        table = self._pmds.get(vpn >> _SHIFT)
        if table is None:
            table = self._pmds[vpn >> _SHIFT] = {}
        off = vpn & _MASK
        if off not in table:
            self._len += 1
        table[off] = value

    def __delitem__(self, vpn: int) -> None:
        idx = vpn >> _SHIFT
        table = self._pmds[idx]
        del table[vpn & _MASK]
        self._len -= 1
        if not table:
            del self._pmds[idx]

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[int]:
        for idx, table in self._pmds.items():
            base = idx << _SHIFT
            for off in table:
                yield base | off

    def __repr__(self) -> str:
        return f"PageLedger({dict(self.items())!r})"

    def moved(self, src_addr: int, dst_addr: int, nbytes: int) -> None:
        """UFFDIO_MOVE carried ``nbytes`` from src to dst (holes and zero pages carry nothing): a
        whole PMD to a PMD-aligned address in one step."""
        s, d = src_addr >> PAGE_SHIFT, dst_addr >> PAGE_SHIFT
        if nbytes == PAGE_SIZE:
            value = self.pop(s, None)
            if value is not None:
                self[d] = value
            return
        if nbytes == PMD_SIZE and not (s | d) & _MASK:
            self.move_pmd(s >> _SHIFT, d >> _SHIFT)
            return
        for i in range(nbytes >> PAGE_SHIFT):
            value = self.pop(s + i, None)
            if value is not None:
                self[d + i] = value

    def move_pmd(self, src_idx: int, dst_idx: int) -> None:
        """The pages of PMD ``src_idx`` are now those of PMD ``dst_idx`` (which held none)."""
        table = self._pmds.pop(src_idx, None)
        if table is not None:
            assert dst_idx not in self._pmds, "moving a PMD's contents onto written pages"
            self._pmds[dst_idx] = table

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
            ledger.update(_present(self, vpns[i : i + RESCHED_WORK]))
        return ledger

    async def release(self) -> None:
        """Empty the ledger of an exited process; a big one is let go of in slices too."""
        while len(self) > RESCHED_WORK:
            for _ in range(RESCHED_WORK):
                self.popitem()
            await cond_resched()
        self._pmds.clear()
        self._len = 0


def _present(ledger: PageLedger, vpns: Iterable[int]) -> Iterator[tuple[int, int]]:
    for vpn in vpns:
        value = ledger.get(vpn)
        if value is not None:
            yield vpn, value
