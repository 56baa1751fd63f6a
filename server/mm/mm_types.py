"""The objects of the model (include/linux/mm_types.h): mm, VMA, folio, PTE and page tables.

Addresses and lengths are in bytes; a page is 4096 bytes. Page tables are two-level here: a PTE
table covers one PMD (2 MiB) and carries its own split PTL, as with USE_SPLIT_PTE_PTLOCKS.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, SupportsIndex, TypeVar

from sortedcontainers import SortedDict

from .locks import Current, LockClass, LockdepState, Mutex, RwSem, SpinLock

if TYPE_CHECKING:
    from typing_extensions import TypeIs

    from .memcontrol import MemCgroup
    from .rmap import AnonVma, AnonVmaChain
    from .swapfile import SwpEntry
    from .userfaultfd import UserfaultfdCtx

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)
PMD_SHIFT = 21
PMD_SIZE = 1 << PMD_SHIFT
PMD_MASK = ~(PMD_SIZE - 1)
PTRS_PER_PTE = 1 << (PMD_SHIFT - PAGE_SHIFT)
#: A PMD-mapped THP: order 9, 512 pages.
HPAGE_PMD_ORDER = PMD_SHIFT - PAGE_SHIFT
HPAGE_PMD_NR = 1 << HPAGE_PMD_ORDER
HPAGE_PMD_SIZE = PMD_SIZE
#: PMD locks (pmd_lockptr) are the split locks of the PMD table pages: one per 1 GiB.
PUD_SHIFT = 30
#: x86_64 with 4-level page tables.
TASK_SIZE = (1 << 47) - PAGE_SIZE
#: Where top-down placement starts, below the stack gap.
MMAP_BASE = 0x7F0000000000
#: The lowest address an mmap may use (vm.mmap_min_addr).
MMAP_MIN_ADDR = 0x10000
#: The default vm.max_map_count (DEFAULT_MAX_MAP_COUNT: USHRT_MAX - MAPCOUNT_ELF_CORE_MARGIN).
DEFAULT_MAX_MAP_COUNT = 65530

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
VM_HUGEPAGE = 0x20000000
VM_NOHUGEPAGE = 0x40000000
VM_SOFTDIRTY = 0x08000000
VM_ACCESS_FLAGS = VM_READ | VM_WRITE | VM_EXEC
VM_UFFD_FLAGS = VM_UFFD_MISSING | VM_UFFD_WP
#: Bits that may differ between VMAs that still merge.
VM_IGNORE_MERGE = VM_SOFTDIRTY

PROT_FLAGS = {"none": 0, "r": VM_READ, "rw": VM_READ | VM_WRITE}
#: VMAs an mm remembers from its last lookups.
VMACACHE_SIZE = 4

# What each object is charged to the memory budget (memcontrol): its measured footprint on 64-bit
# CPython 3.11, rounded up, including the dict and list slots that index it.
#: A present PTE: the Pte object, its slot in the PTE table, its entry in the content ledger.
PTE_BYTES = 160
#: A folio with its folio lock.
FOLIO_BYTES = 544
#: A PTE table with its split PTL and its slot in the mm's table index.
PGTABLE_BYTES = 512
#: A huge PMD: its deposited page table and the PTEs the PMD's split fills in it.
HUGE_PMD_BYTES = PGTABLE_BYTES + (1 << (PMD_SHIFT - PAGE_SHIFT)) * PTE_BYTES
#: A vm_area_struct and its slot in the mm's VMA tree.
VMA_BYTES = 512
#: An anon_vma with its rwsem.
ANON_VMA_BYTES = 512
#: One anon_vma_chain link, in the VMA's list and in the anon_vma's tree.
AVC_BYTES = 128
#: An mm_struct with its locks, tables and per-process bookkeeping (its ledger, its handle).
MM_BYTES = 5120
#: What one pinned page costs its pin's owner (the page pointer array of the pin, io_uring's bvec).
PIN_PAGE_BYTES = 16
#: What one pin costs besides its pages.
PIN_BYTES = 256
#: The most one pin may cover (io_uring's limit on a registered buffer: EFAULT beyond).
PIN_MAX_BYTES = 1 << 30
#: GUP_PIN_COUNTING_BIAS: a FOLL_PIN of a small folio raises its refcount by this much, so that
#: folio_maybe_dma_pinned can tell a pin from ordinary references (a large folio counts pins in
#: _pincount and raises its refcount by one per pinned page).
GUP_PIN_COUNTING_BIAS = 1 << 10


def folio_bytes(order: int) -> int:
    """What a folio of ``order`` is charged: FOLIO_BYTES a page, what its pages come to as small
    folios (so that split_folio, which the kernel does without allocating, needs no charge)."""
    return FOLIO_BYTES << order


_E = TypeVar("_E")


class KeyedDict(dict[int, _E]):
    """A dict of its own type, so that a schedule search can watch it entry by entry (two tasks'
    accesses of different entries commute): a PTE table's entries by virtual page number, the
    processes by pid, the swap cache and the swap device's contents by offset."""

    __slots__ = ()


class KeyedBytes(bytearray):
    """A bytearray of its own type, watched byte by byte as KeyedDict is entry by entry (a swap
    device's ``swap_map``)."""

    __slots__ = ()


class MmError(OSError):
    """A memory-semantics error: the kernel's errno, and the bytes moved before it (UFFDIO_MOVE)."""

    def __init__(self, err: int, message: str = "", moved: int = 0) -> None:
        super().__init__(err, message or _errno.errorcode.get(err, str(err)))
        self.moved = moved


class LimitExceeded(Exception):
    """A configured limit of the model (processes, resident pages, sleeping userfaults, userfaultfd
    listeners) was reached: a server limit, not a kernel errno."""

    def __init__(self, limit: str, value: int, message: str | None = None) -> None:
        super().__init__(message or f"{limit} limit of {value} reached")
        self.limit = limit
        self.value = value


class Folio:
    """A small (order-0) anonymous folio. ``value`` stands in for the page's contents.

    Large folios are ``LargeFolio``; code that meets either reads a page's contents, precise
    mapcount and PG_anon_exclusive through ``page_value``, ``page_mapcount`` and
    ``page_anon_exclusive`` with the page's index in its folio (``Pte.page``)."""

    #: folio_order / folio_nr_pages / folio_test_large of a small folio.
    order = 0
    nr_pages = 1
    large = False

    __slots__ = (
        "id", "mapping", "index", "value", "mapcount", "refcount", "exclusive", "lock", "freed", "audit_gen",
        "audit_ptes", "swap", "swapcache", "dirty", "lru", "referenced", "pincount",
    )

    def __init__(self, fid: int, lock: Mutex | None) -> None:
        self._init_common(fid, lock)
        self.value = 0
        self.exclusive = False  # PageAnonExclusive

    def _init_common(self, fid: int, lock: Mutex | None) -> None:
        self.id = fid
        self.mapping: AnonVma | None = None  # folio->mapping without the PAGE_MAPPING_ANON bit
        self.index = 0
        self.mapcount = 0  # _mapcount + 1 (of a large folio: _large_mapcount + 1)
        self.refcount = 0
        self.lock = lock
        self.freed = False
        # The audit's scratch space: the PTEs it counted, valid while audit_gen is its generation.
        self.audit_gen = 0
        self.audit_ptes = 0
        # folio->swap and PG_swapcache: the slot whose swap cache holds the folio (swap_state).
        self.swap: SwpEntry | None = None
        self.swapcache = False
        # PG_dirty: the contents differ from the swap slot's (set when a dirty PTE is unmapped and
        # when the folio is given a slot; cleared by writeback).
        self.dirty = False
        # The LRU list the folio is on (swap.py: LRU_NONE, LRU_INACTIVE_ANON, LRU_ACTIVE_ANON),
        # and PG_referenced.
        self.lru = 0
        self.referenced = False
        # The FOLL_PIN pins of its pages (a large folio's _pincount; a small one keeps its pins as
        # GUP_PIN_COUNTING_BIAS each in its refcount, and this count only for the audit).
        self.pincount = 0

    def __repr__(self) -> str:
        return f"<Folio {self.id} idx={self.index:#x} map={self.mapcount} ref={self.refcount}>"

    def __reduce_ex__(self, protocol: SupportsIndex) -> str | tuple[Any, ...]:
        """The zero page and the huge zero folio stay the module's singletons through a pickle
        (the explorer's snapshot of a scenario's set-up); any other folio pickles as usual."""
        if self.lock is None and self.id == 0:
            return "HUGE_ZERO_FOLIO" if self.large else "ZERO_PAGE"
        return super().__reduce_ex__(protocol)

    @property
    def trace_name(self) -> str:
        return f"folio{self.id}"

    def page_value(self, i: int) -> int:
        """The contents of page ``i`` of the folio."""
        return self.value

    def set_page_value(self, i: int, value: int) -> None:
        self.value = value

    def page_mapcount(self, i: int) -> int:
        """folio_precise_page_mapcount: the mappings of page ``i`` (a PMD maps every page)."""
        return self.mapcount

    def page_anon_exclusive(self, i: int) -> bool:
        """PageAnonExclusive of page ``i`` (of a PMD-mapped folio: the head's bit is the mapping's)."""
        return self.exclusive

    def set_page_anon_exclusive(self, i: int, exclusive: bool) -> None:
        self.exclusive = exclusive


#: The shared zero page: mapped read-only, no rmap, never freed.
ZERO_PAGE = Folio(0, None)


class LargeFolio(Folio):
    """A large (order > 0) anonymous folio, as 6.18 keeps one: per page its contents
    (``values``), its PTE mappings (``pages_mapcount``: each page's _mapcount + 1) and its
    PG_anon_exclusive (``anon_exclusive``); for the folio ``entire_mapcount`` (the huge PMDs
    mapping it whole), ``mapcount`` (_large_mapcount + 1: every PTE and every PMD mapping it, one
    each) and ``mm_mapcounts`` (the mappings per mm: the _mm_id slots' counts, which say whether
    the folio may be mapped by more than one process; kept exactly here, for any number of mms).
    ``deferred_split``: on the deferred split queue (mapped in part). Each mapping, PTE or PMD,
    holds one reference."""

    __slots__ = ("order", "nr_pages", "values", "pages_mapcount", "anon_exclusive", "entire_mapcount",
                 "mm_mapcounts", "deferred_split", "audit_pages", "audit_pmds", "audit_mms")

    large = True

    def __init__(self, fid: int, lock: Mutex | None, order: int) -> None:
        self._init_common(fid, lock)
        self.order = order
        self.nr_pages = nr = 1 << order
        self.values = [0] * nr
        self.pages_mapcount = [0] * nr
        self.anon_exclusive = [False] * nr
        self.entire_mapcount = 0
        self.mm_mapcounts: KeyedDict[int] = KeyedDict()
        self.deferred_split = False
        # The audit's scratch space (valid while audit_gen is its generation): the PTEs it counted
        # per page, the huge PMDs, the mappings per mm.
        self.audit_pages: list[int] = []
        self.audit_pmds = 0
        self.audit_mms: dict[int, int] = {}

    @property
    def value(self) -> int:
        raise AttributeError(f"large folio {self.id}: a page's contents are page_value(i)")

    @value.setter
    def value(self, v: int) -> None:
        raise AttributeError(f"large folio {self.id}: a page's contents are set_page_value(i, v)")

    @property
    def exclusive(self) -> bool:
        raise AttributeError(f"large folio {self.id}: PG_anon_exclusive is per page (page_anon_exclusive)")

    @exclusive.setter
    def exclusive(self, v: bool) -> None:
        raise AttributeError(f"large folio {self.id}: PG_anon_exclusive is per page (set_page_anon_exclusive)")

    def __repr__(self) -> str:
        return (f"<LargeFolio {self.id} order={self.order} idx={self.index:#x} map={self.mapcount} "
                f"entire={self.entire_mapcount} ref={self.refcount}>")

    def page_value(self, i: int) -> int:
        return self.values[i]

    def set_page_value(self, i: int, value: int) -> None:
        self.values[i] = value

    def page_mapcount(self, i: int) -> int:
        return self.pages_mapcount[i] + self.entire_mapcount

    def page_anon_exclusive(self, i: int) -> bool:
        return self.anon_exclusive[i]

    def set_page_anon_exclusive(self, i: int, exclusive: bool) -> None:
        self.anon_exclusive[i] = exclusive

    def maybe_mapped_shared(self) -> bool:
        """folio_maybe_mapped_shared: mapped by more than one mm."""
        return len(self.mm_mapcounts) > 1

    def mm_map(self, mm_id: int, n: int) -> None:
        """Count ``n`` more mappings (negative: fewer) by mm ``mm_id``."""
        c = self.mm_mapcounts.get(mm_id, 0) + n
        if c:
            self.mm_mapcounts[mm_id] = c
        else:
            self.mm_mapcounts.pop(mm_id, None)


#: The huge zero folio: mapped read-only by huge PMDs, no rmap, never freed.
HUGE_ZERO_FOLIO = LargeFolio(0, None, HPAGE_PMD_ORDER)


def folio_maybe_dma_pinned(folio: Folio) -> bool:
    """folio_maybe_dma_pinned: a large folio with pins; a small one whose refcount reaches
    GUP_PIN_COUNTING_BIAS (which enough plain references also do: "maybe")."""
    if folio.large:
        return folio.pincount > 0
    return folio.refcount >= GUP_PIN_COUNTING_BIAS


class GupPin:
    """A FOLL_PIN pin of a range of a process's pages (pin_user_pages, as an io_uring buffer
    registration makes one): per page, the folio pinned and the page's index in it. It outlives
    the mapping (an unmapped pinned folio stays allocated and charged until unpinned); the
    process's exit ends it."""

    __slots__ = ("id", "addr", "pages")

    def __init__(self, pin_id: int, addr: int) -> None:
        self.id = pin_id
        self.addr = addr
        self.pages: list[Folio] = []


class Pte:
    """A present PTE. The zero page is mapped by a PTE whose folio is ZERO_PAGE. ``uffd_wp`` is
    the uffd-wp bit (set by UFFDIO_COPY_MODE_WP): in a VM_UFFD_WP VMA a write to the page is a
    write-protect userfault; the PTE is then never writable. ``soft_dirty`` is the soft-dirty bit
    where it is set apart from the dirty bit (x86's pte_mkdirty sets both): a move (6.15+) and a
    swap-in of a soft-dirty swap PTE; pagemap reports ``dirty or soft_dirty``."""

    __slots__ = ("folio", "write", "young", "dirty", "uffd_wp", "soft_dirty", "page")

    def __init__(
        self, folio: Folio, write: bool, young: bool, dirty: bool, uffd_wp: bool = False, soft_dirty: bool = False,
        page: int = 0,
    ) -> None:
        self.folio = folio
        self.write = write
        self.young = young
        self.dirty = dirty
        self.uffd_wp = uffd_wp
        self.soft_dirty = soft_dirty
        self.page = page  # the mapped page's index in its folio (folio_page_idx); 0 for a small one

    @property
    def value(self) -> int:
        """The mapped page's contents."""
        return self.folio.page_value(self.page)


class HugePmd:
    """A present huge PMD (pmd_trans_huge): the PMD-size folio (a LargeFolio, or HUGE_ZERO_FOLIO)
    mapped whole, with the bits of its entry, and the page table deposited for the split
    (pgtable_trans_huge_deposit; it becomes the PTE table when the PMD is split, and is charged as
    one from the start). A huge PMD always lies wholly inside one VMA: whatever splits the VMA
    inside it splits the PMD first (vma_adjust_trans_huge). Its lock is ``Mm.pmd_lock``."""

    __slots__ = ("folio", "write", "young", "dirty", "uffd_wp", "soft_dirty", "deposit")

    def __init__(
        self, folio: LargeFolio, write: bool, young: bool, dirty: bool, deposit: PageTable, uffd_wp: bool = False,
        soft_dirty: bool = False,
    ) -> None:
        self.folio = folio
        self.write = write
        self.young = young
        self.dirty = dirty
        self.uffd_wp = uffd_wp
        self.soft_dirty = soft_dirty
        self.deposit = deposit


class MigrationEntry:
    """A migration entry (a swp_entry_t of a migration type, non_swap_entry): page ``page`` of
    ``folio`` while a split has it unmapped (try_to_migrate, TTU_SPLIT_HUGE_PMD), with what the
    PTE it replaced said: ``write`` (a writable migration entry), ``exclusive`` (writable or
    readable-exclusive: the page was PageAnonExclusive), ``young`` and ``dirty``. It holds no
    mapcount and no reference; it counts in the mm's MM_ANONPAGES. Whoever meets one waits for
    the folio's lock (migration_entry_wait) and retries; remove_migration_pte maps the page again."""

    __slots__ = ("folio", "page", "write", "exclusive", "young", "dirty")

    def __init__(self, folio: LargeFolio, page: int, write: bool, exclusive: bool, young: bool, dirty: bool) -> None:
        self.folio = folio
        self.page = page
        self.write = write
        self.exclusive = exclusive
        self.young = young
        self.dirty = dirty

    @property
    def trace_name(self) -> str:
        return f"migration:folio{self.folio.id}[{self.page}]"


def is_migration_entry(entry: SwpEntry | MigrationEntry) -> TypeIs[MigrationEntry]:
    """is_migration_entry: a swap PTE that names a page being split, not a slot."""
    return type(entry) is MigrationEntry


class SwapPte:
    """A swap PTE (a non-present PTE holding a swap entry): the slot, and the bits 6.18 keeps in
    it: ``exclusive`` (pte_swp_exclusive: the page was exclusive when unmapped, so a swap-in may
    map it writable and exclusive again), ``uffd_wp`` and ``soft_dirty``. Kept in the PTE table's
    ``swap`` map, beside the present PTEs of ``ptes``: a page number is in at most one of them, and
    in neither while its PTE is none. Charged PTE_BYTES, as a present PTE. Its ``entry`` is a
    ``MigrationEntry`` while a split has the page unmapped (``exclusive`` is then False: the
    entry's own bit says it)."""

    __slots__ = ("entry", "exclusive", "uffd_wp", "soft_dirty")

    def __init__(
        self, entry: SwpEntry | MigrationEntry, exclusive: bool, uffd_wp: bool = False, soft_dirty: bool = False
    ) -> None:
        self.entry = entry
        self.exclusive = exclusive
        self.uffd_wp = uffd_wp
        self.soft_dirty = soft_dirty

    @property
    def slot(self) -> SwpEntry:
        """The slot a swap entry names (never asked of a migration entry)."""
        entry = self.entry
        assert not is_migration_entry(entry), f"{entry.trace_name} names no swap slot"
        return entry


class PageTable:
    """One PTE table: the entries of one PMD and its split PTL. Its present PTEs are in ``ptes``,
    its swap PTEs in ``swap`` (a page number is in at most one; in neither: pte_none)."""

    __slots__ = ("ptes", "swap", "ptl")

    def __init__(self, ptl: SpinLock) -> None:
        self.ptes: KeyedDict[Pte] = KeyedDict()  # virtual page number -> present PTE
        self.swap: KeyedDict[SwapPte] = KeyedDict()  # virtual page number -> swap PTE
        self.ptl = ptl

    def pte_none(self, vpn: int) -> bool:
        return vpn not in self.ptes and vpn not in self.swap


class Vma:
    """vm_area_struct for a private anonymous mapping."""

    __slots__ = ("id", "mm", "start", "end", "pgoff", "flags", "anon_vma", "anon_vma_chain", "uffd_ctx", "vm_lock",
                 "vm_lock_seq")

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
        # The per-VMA lock (mmap_lock.py): readers (a move, a fault) hold it for read; a writer
        # write-locks the VMA for the rest of its mmap_lock write section (vm_lock_seq ==
        # mm.mm_lock_seq).
        self.vm_lock = RwSem(f"mm{mm.id}.vma{vid}.vm_lock", LockClass.VMA_LOCK, mm.lockdep)
        self.vm_lock_seq = -1

    @property
    def pages(self) -> int:
        return (self.end - self.start) >> PAGE_SHIFT

    def linear_page_index(self, addr: int) -> int:
        return ((addr - self.start) >> PAGE_SHIFT) + self.pgoff

    @property
    def prot(self) -> str:
        if not self.flags & VM_READ:
            return "none"
        return "rw" if self.flags & VM_WRITE else "r"

    def __repr__(self) -> str:
        return f"<Vma {self.id} {self.start:#x}-{self.end:#x} pgoff={self.pgoff:#x} flags={self.flags:#x}>"


class Mm:
    """mm_struct: its VMAs in address order, its page tables and its mmap_lock.

    The VMAs are kept in a sorted map keyed by start address (the kernel's maple tree): lookup,
    insert and delete take logarithmic time. The PTE tables are kept in a sorted map keyed by PMD
    index, so that walks over a range visit only the tables that exist, as the kernel's page-table
    walk skips empty PMDs.
    """

    def __init__(self, mid: int, lockdep: LockdepState, memcg: MemCgroup | None = None) -> None:
        self.id = mid
        self.lockdep = lockdep
        self.memcg = memcg
        self.mmap_lock = RwSem(f"mm{mid}.mmap_lock", LockClass.MMAP_LOCK, lockdep)
        # mm->mm_lock_seq: a VMA whose vm_lock_seq equals it is write-locked (mmap_lock.py); it
        # grows at every release of mmap_lock for write (vma_end_write_all).
        self.mm_lock_seq = 0
        # mm->page_table_lock: taken by anon_vma_prepare; ranks with the PTLs.
        self.page_table_lock = SpinLock(f"mm{mid}.page_table_lock", LockClass.PTL, lockdep)
        self.mm_mt: SortedDict[int, Vma] = SortedDict()  # vma.start -> vma
        # mm->map_count: kept by the operations that add and remove VMAs, as the kernel keeps it
        # (mmap, split, merge, munmap, copy_vma, dup_mmap); the audit checks it against the tree.
        self.map_count = 0
        # The VMAs found last (the kernel's former per-thread vmacache): a move looks up its src and
        # dst VMAs on every call, and a linked VMA's [start, end) is always its current extent.
        self.vmacache: list[Vma] = []
        self.pgtables: SortedDict[int, PageTable] = SortedDict()  # PMD index -> PTE table
        # PMD index -> huge PMD. A PMD index is in at most one of pgtables and huge_pmds; in
        # neither while its PMD is none.
        self.huge_pmds: SortedDict[int, HugePmd] = SortedDict()
        self.pmd_ptls: dict[int, SpinLock] = {}  # 1 GiB index -> the PMD table page's split lock
        self.users = 1  # mm_users
        self.rss_anon = 0  # MM_ANONPAGES
        self.swap_ents = 0  # MM_SWAPENTS
        self.uffd: UserfaultfdCtx | None = None
        self.mmap_base = MMAP_BASE
        self.task_size = TASK_SIZE
        # MMF_HAS_PINNED: set by the first FOLL_PIN of the mm's pages, never cleared, not inherited.
        self.has_pinned = False
        # The process's pins (gup.py), by id: each a list of (folio, refs) it holds.
        self.pins: dict[int, GupPin] = {}
        self.next_pin = 1

    # -- the VMA tree
    @property
    def vmas(self) -> Sequence[Vma]:
        """The VMAs in address order (a live, indexable view)."""
        return self.mm_mt.values()

    def find_vma(self, addr: int) -> Vma | None:
        """The first VMA whose end lies above ``addr`` (find_vma)."""
        mt = self.mm_mt
        i = mt.bisect_right(addr)
        if i:
            v = mt.peekitem(i - 1)[1]
            if v.end > addr:
                return v
        return mt.peekitem(i)[1] if i < len(mt) else None

    def vma_lookup(self, addr: int) -> Vma | None:
        """The VMA containing ``addr``, or None (vmacache_find, then the tree)."""
        for v in self.vmacache:
            if v.start <= addr < v.end:
                return v
        mt = self.mm_mt
        i = mt.bisect_right(addr)
        if i:
            v = mt.peekitem(i - 1)[1]
            if v.end > addr:
                cache = self.vmacache
                if len(cache) >= VMACACHE_SIZE:
                    del cache[0]
                cache.append(v)
                return v
        return None

    def vmas_in(self, start: int, end: int) -> list[Vma]:
        """VMAs overlapping [start, end), in address order."""
        first = self.vma_lookup(start)
        out = [first] if first is not None else []
        mt = self.mm_mt
        for key in mt.irange(start, end, inclusive=(first is None, False)):
            out.append(mt[key])
        return out

    def vma_prev_next(self, vma: Vma) -> tuple[Vma | None, Vma | None]:
        mt = self.mm_mt
        i = mt.index(vma.start)
        return (mt.peekitem(i - 1)[1] if i else None, mt.peekitem(i + 1)[1] if i + 1 < len(mt) else None)

    def vma_link(self, vma: Vma) -> None:
        assert vma.start not in self.mm_mt
        self.mm_mt[vma.start] = vma

    def vma_unlink(self, vma: Vma) -> None:
        del self.mm_mt[vma.start]
        if vma in self.vmacache:
            self.vmacache.remove(vma)

    # -- page tables
    def pte_lookup(self, addr: int) -> Pte | None:
        pt = self.pgtables.get(addr >> PMD_SHIFT)
        return pt.ptes.get(addr >> PAGE_SHIFT) if pt is not None else None

    def swap_pte_lookup(self, addr: int) -> SwapPte | None:
        pt = self.pgtables.get(addr >> PMD_SHIFT)
        return pt.swap.get(addr >> PAGE_SHIFT) if pt is not None else None

    def pte_alloc(self, cur: Current, addr: int) -> PageTable:
        """The PTE table covering ``addr``, allocated (and charged: ENOMEM) if there is none.
        Expects no huge PMD there (the caller has split it or taken its own path)."""
        idx = addr >> PMD_SHIFT
        pt = self.pgtables.get(idx)
        if pt is None:
            assert idx not in self.huge_pmds, f"pte_alloc over the huge PMD at {addr:#x}"
            if self.memcg is not None:
                self.memcg.charge(cur, PGTABLE_BYTES)
            pt = self.new_pgtable(idx)
            self.pgtables[idx] = pt
        return pt

    def new_pgtable(self, idx: int) -> PageTable:
        """A PTE table for PMD index ``idx`` (pte_alloc_one), not yet installed; its charge is the
        caller's."""
        return PageTable(SpinLock(f"mm{self.id}.ptl[{idx:#x}]", LockClass.PTL, self.lockdep))

    def pmd_lock(self, addr: int) -> SpinLock:
        """The lock of the PMD covering ``addr`` (pmd_lockptr: its PMD table page's split lock)."""
        gi = addr >> PUD_SHIFT
        ptl = self.pmd_ptls.get(gi)
        if ptl is None:
            ptl = self.pmd_ptls[gi] = SpinLock(f"mm{self.id}.pmd_lock[{gi:#x}]", LockClass.PTL, self.lockdep)
        return ptl

    def huge_pmd_lookup(self, addr: int) -> HugePmd | None:
        return self.huge_pmds.get(addr >> PMD_SHIFT) if self.huge_pmds else None

    def pte_free(self, idx: int) -> None:
        """Free the (empty) PTE table at PMD index ``idx``."""
        pt = self.pgtables.pop(idx)
        assert not pt.ptes and not pt.swap, "freeing a PTE table that still maps pages"
        if self.memcg is not None:
            self.memcg.uncharge(PGTABLE_BYTES)

    def huge_pmds_in(self, start: int, end: int) -> list[int]:
        """PMD indexes of the huge PMDs in [start, end)."""
        if end <= start or not self.huge_pmds:
            return []
        return list(self.huge_pmds.irange(start >> PMD_SHIFT, (end - 1) >> PMD_SHIFT))

    def pgtables_in(self, start: int, end: int) -> list[int]:
        """PMD indexes of the PTE tables that exist in [start, end)."""
        if end <= start:
            return []
        return list(self.pgtables.irange(start >> PMD_SHIFT, (end - 1) >> PMD_SHIFT))

    def __repr__(self) -> str:
        return f"<Mm {self.id} vmas={len(self.mm_mt)} rss={self.rss_anon}>"
