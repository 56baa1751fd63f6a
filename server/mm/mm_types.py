"""The objects of the model (include/linux/mm_types.h): mm, VMA, folio, PTE and page tables.

Addresses and lengths are in bytes; a page is 4096 bytes. Page tables are two-level here: a PTE
table covers one PMD (2 MiB) and carries its own split PTL, as with USE_SPLIT_PTE_PTLOCKS.
"""

from __future__ import annotations

import bisect
import errno as _errno
from typing import TYPE_CHECKING

from .locks import LockClass, LockdepState, Mutex, RwSem, SpinLock

if TYPE_CHECKING:
    from .rmap import AnonVma, AnonVmaChain
    from .userfaultfd import UserfaultfdCtx

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)
PMD_SHIFT = 21
PMD_SIZE = 1 << PMD_SHIFT
PTRS_PER_PTE = 1 << (PMD_SHIFT - PAGE_SHIFT)
#: x86_64 with 4-level page tables.
TASK_SIZE = (1 << 47) - PAGE_SIZE
#: Where top-down placement starts, below the stack gap.
MMAP_BASE = 0x7F0000000000
#: The lowest address an mmap may use (vm.mmap_min_addr).
MMAP_MIN_ADDR = 0x10000

# vm_flags bits (include/linux/mm.h values)
VM_READ = 0x00000001
VM_WRITE = 0x00000002
VM_EXEC = 0x00000004
VM_SHARED = 0x00000008
VM_MAYREAD = 0x00000010
VM_MAYWRITE = 0x00000020
VM_MAYEXEC = 0x00000040
VM_UFFD_MISSING = 0x00000200
VM_UFFD_WP = 0x00001000
VM_LOCKED = 0x00002000
VM_DONTCOPY = 0x00020000
VM_ACCOUNT = 0x00100000
VM_WIPEONFORK = 0x02000000
VM_SOFTDIRTY = 0x08000000
VM_ACCESS_FLAGS = VM_READ | VM_WRITE | VM_EXEC
VM_UFFD_FLAGS = VM_UFFD_MISSING | VM_UFFD_WP
#: Bits that may differ between VMAs that still merge.
VM_IGNORE_MERGE = VM_SOFTDIRTY

PROT_FLAGS = {"r": VM_READ, "rw": VM_READ | VM_WRITE}


class MmError(OSError):
    """A memory-semantics error: the kernel's errno, and the bytes moved before it (UFFDIO_MOVE)."""

    def __init__(self, err: int, message: str = "", moved: int = 0) -> None:
        super().__init__(err, message or _errno.errorcode.get(err, str(err)))
        self.moved = moved


class Folio:
    """A small (order-0) anonymous folio. ``value`` stands in for the page's contents."""

    __slots__ = ("id", "mapping", "index", "value", "mapcount", "refcount", "exclusive", "lock", "freed")

    def __init__(self, fid: int, lock: Mutex | None) -> None:
        self.id = fid
        self.mapping: AnonVma | None = None  # folio->mapping without the PAGE_MAPPING_ANON bit
        self.index = 0
        self.value = 0
        self.mapcount = 0  # _mapcount + 1
        self.refcount = 0
        self.exclusive = False  # PageAnonExclusive
        self.lock = lock
        self.freed = False

    def __repr__(self) -> str:
        return f"<Folio {self.id} idx={self.index:#x} map={self.mapcount} ref={self.refcount}>"


#: The shared zero page: mapped read-only, no rmap, never freed.
ZERO_PAGE = Folio(0, None)


class Pte:
    """A present PTE. The zero page is mapped by a PTE whose folio is ZERO_PAGE."""

    __slots__ = ("folio", "write", "young", "dirty")

    def __init__(self, folio: Folio, write: bool, young: bool, dirty: bool) -> None:
        self.folio = folio
        self.write = write
        self.young = young
        self.dirty = dirty


class PageTable:
    """One PTE table: the entries of one PMD and its split PTL."""

    __slots__ = ("ptes", "ptl")

    def __init__(self, ptl: SpinLock) -> None:
        self.ptes: dict[int, Pte] = {}  # virtual page number -> PTE
        self.ptl = ptl


class Vma:
    """vm_area_struct for a private anonymous mapping."""

    __slots__ = ("id", "mm", "start", "end", "pgoff", "flags", "anon_vma", "anon_vma_chain", "uffd_ctx")

    def __init__(self, vid: int, mm: Mm, start: int, end: int, pgoff: int, flags: int) -> None:
        self.id = vid
        self.mm = mm
        self.start = start
        self.end = end
        self.pgoff = pgoff
        self.flags = flags
        self.anon_vma: AnonVma | None = None
        # Oldest first; the kernel's list_add puts the newest at the head, i.e. our tail.
        self.anon_vma_chain: list[AnonVmaChain] = []
        self.uffd_ctx: UserfaultfdCtx | None = None

    @property
    def pages(self) -> int:
        return (self.end - self.start) >> PAGE_SHIFT

    def linear_page_index(self, addr: int) -> int:
        return ((addr - self.start) >> PAGE_SHIFT) + self.pgoff

    @property
    def prot(self) -> str:
        return "rw" if self.flags & VM_WRITE else "r"

    def __repr__(self) -> str:
        return f"<Vma {self.id} {self.start:#x}-{self.end:#x} pgoff={self.pgoff:#x} flags={self.flags:#x}>"


class Mm:
    """mm_struct: its VMAs in address order, its page tables and its mmap_lock."""

    def __init__(self, mid: int, lockdep: LockdepState) -> None:
        self.id = mid
        self.lockdep = lockdep
        self.mmap_lock = RwSem(f"mm{mid}.mmap_lock", LockClass.MMAP_LOCK, lockdep)
        # mm->page_table_lock: taken by anon_vma_prepare; ranks with the PTLs.
        self.page_table_lock = SpinLock(f"mm{mid}.page_table_lock", LockClass.PTL, lockdep)
        self.vmas: list[Vma] = []
        self._starts: list[int] = []
        self.pgtables: dict[int, PageTable] = {}  # PMD index -> PTE table
        self.users = 1  # mm_users
        self.rss_anon = 0  # MM_ANONPAGES
        self.uffd: UserfaultfdCtx | None = None
        self.mmap_base = MMAP_BASE
        self.task_size = TASK_SIZE

    # -- the VMA tree
    def find_vma(self, addr: int) -> Vma | None:
        """The first VMA whose end lies above ``addr`` (find_vma)."""
        i = bisect.bisect_right(self._starts, addr)
        if i and self.vmas[i - 1].end > addr:
            return self.vmas[i - 1]
        return self.vmas[i] if i < len(self.vmas) else None

    def vma_lookup(self, addr: int) -> Vma | None:
        """The VMA containing ``addr``, or None."""
        i = bisect.bisect_right(self._starts, addr)
        if i:
            v = self.vmas[i - 1]
            if v.end > addr:
                return v
        return None

    def vmas_in(self, start: int, end: int) -> list[Vma]:
        """VMAs overlapping [start, end), in address order."""
        i = bisect.bisect_right(self._starts, start)
        if i and self.vmas[i - 1].end > start:
            i -= 1
        out = []
        while i < len(self.vmas) and self.vmas[i].start < end:
            out.append(self.vmas[i])
            i += 1
        return out

    def vma_prev_next(self, vma: Vma) -> tuple[Vma | None, Vma | None]:
        i = self.vmas.index(vma)
        return (self.vmas[i - 1] if i else None, self.vmas[i + 1] if i + 1 < len(self.vmas) else None)

    def vma_link(self, vma: Vma) -> None:
        i = bisect.bisect_left(self._starts, vma.start)
        self.vmas.insert(i, vma)
        self._starts.insert(i, vma.start)

    def vma_unlink(self, vma: Vma) -> None:
        i = self.vmas.index(vma)
        del self.vmas[i]
        del self._starts[i]

    @property
    def map_count(self) -> int:
        return len(self.vmas)

    # -- page tables
    def pte_lookup(self, addr: int) -> Pte | None:
        pt = self.pgtables.get(addr >> PMD_SHIFT)
        return pt.ptes.get(addr >> PAGE_SHIFT) if pt is not None else None

    def pte_alloc(self, addr: int) -> PageTable:
        idx = addr >> PMD_SHIFT
        pt = self.pgtables.get(idx)
        if pt is None:
            pt = PageTable(SpinLock(f"mm{self.id}.ptl[{idx:#x}]", LockClass.PTL, self.lockdep))
            self.pgtables[idx] = pt
        return pt

    def __repr__(self) -> str:
        return f"<Mm {self.id} vmas={len(self.vmas)} rss={self.rss_anon}>"
