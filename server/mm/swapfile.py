"""Swap devices (mm/swapfile.c): slots, the ``swap_map`` counts, and the SWAP_HAS_CACHE bit.

One device (``SwapInfo``, struct swap_info_struct) of ``swap_bytes`` holds ``swap_bytes //
PAGE_SIZE`` slots of PAGE_SIZE (``si->max``). Slot 0 is never handed out: on a real device it holds
the swap header (mkswap's signature and sizes), and swapon marks it SWAP_MAP_BAD, so a device has
``max - 1`` usable slots (``si->pages``). A device of fewer than two pages has none: every
allocation fails, as with no swap at all.

A slot is named by an entry (``SwpEntry``, swp_entry_t: the device's type and the slot's offset).
``swap_map[offset]`` is one byte per slot, kept as 6.18 keeps it (include/linux/swap.h):

- the low six bits count the references to the slot from page tables (swap PTEs), 1 to
  SWAP_MAP_MAX (0x3e); 0x3f is SWAP_MAP_BAD (the header slot);
- SWAP_HAS_CACHE (0x40): the slot is pinned for the swap cache: a folio is in the swap cache for it
  (swap_state.py), or is about to be (folio_alloc_swap, a swap-in's swapcache_prepare);
- COUNT_CONTINUED (0x80): the count went past SWAP_MAP_MAX and goes on in continuation digits. The
  kernel keeps those in continuation pages, one byte per slot per page, allocated on demand
  (add_swap_count_continuation, which may fail with ENOMEM); the model keeps them as one number per
  slot in ``swap_cont`` (the count is ``low + (SWAP_MAP_MAX + 1) * swap_cont[offset]``), which
  always has room.

A slot whose count and cache bit are both gone is free again (swap_entries_free). A new slot is
allocated with SWAP_HAS_CACHE set and a count of 0, for the folio that reclaim puts in the swap
cache at once (folio_alloc_swap); the swap PTEs that the unmap installs raise the count.

The kernel hands out slots from clusters of SWAPFILE_CLUSTER slots with a per-CPU cluster for each
order; the model's folios are order-0 and it takes the next free slot after the last one handed
out, wrapping round (which slot a folio gets changes nothing the model shows).

Errors: the kernel's functions return 0 or a negative errno where their callers branch on it
(swap_duplicate, swapcache_prepare, folio_alloc_swap), and these do the same. Where the kernel
prints "Bad swap offset entry" / "Unused swap offset entry" and does nothing (_swap_info_get), or
would corrupt the count (putting a reference that is not there), the model raises MmError(EINVAL)
before anything changes: a caller's bug made visible.

Locks: the kernel updates ``swap_map`` under the cluster lock (``ci->lock``) and the allocator
holds the per-CPU cluster's local lock and, on rotating media, ``si->global_cluster_lock``. None of
them has a model counterpart: no function here awaits, so nothing else runs between its reads and
its writes.

Memory accounting: with cgroup v2, 6.18 charges a swap slot to the memory cgroup's swap counter
(``memory.swap.current``, limited by ``memory.swap.max``: mem_cgroup_try_charge_swap in
folio_alloc_swap, mem_cgroup_uncharge_swap in swap_entries_free), not to ``memory.max``; a folio in
the swap cache is a page like any other and stays charged to ``memory.max`` until it is freed. The
model does the same: the kernel model's device (``Kernel.swap``) charges its slots to no budget,
and the device's size (``--swap-bytes``) is the swap counter's limit. So swapping a page out gives
the budget (``--max-memory``) back its folio, and an access runs out of memory (ENOMEM) only when
swap is full too. What the server keeps per slot in use (SWAP_SLOT_BYTES: its entries in the swap
table and in the device's contents) is bounded by the device's size instead: at most
``swap_bytes // PAGE_SIZE * SWAP_SLOT_BYTES`` (64 MiB for the default 1 GiB). A device built with a
``memcg`` (a test's) charges SWAP_SLOT_BYTES per slot to it, at those same two points; a charge
that fails makes the allocation fail (folio_alloc_swap returns -ENOMEM, as 6.18's does when the
swap charge fails), and reclaim keeps the folio. ``swap_map`` itself, one byte per slot, is
allocated with the device (as swapon allocates it): it is fixed by the configured size (at most
MAX_SWAP_BYTES) and does not grow with what clients do.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from .memcontrol import MemCgroup, MemoryLimitExceeded
from .mm_types import PAGE_SHIFT, Folio, KeyedBytes, KeyedDict, MmError

if TYPE_CHECKING:
    from .kernel import Kernel
    from .locks import Current

#: swap_map: the slot is pinned for the swap cache.
SWAP_HAS_CACHE = 0x40
#: swap_map: the count goes on in the continuation digits.
COUNT_CONTINUED = 0x80
#: The most references the low bits of a swap_map byte count.
SWAP_MAP_MAX = 0x3E
#: A slot never handed out (the header slot).
SWAP_MAP_BAD = 0x3F
#: The most a device may hold in the model: 16 Mi slots, a 16 MiB swap_map.
MAX_SWAP_BYTES = 64 << 30
#: The device's size unless told otherwise (``mmsim serve --swap-bytes``).
DEFAULT_SWAP_BYTES = 1 << 30
#: What the model keeps for one slot in use, charged to the budget: its entries in the swap table and
#: in the device's contents (CPython 3.11 dict entries of about 85 and 117 bytes), rounded up.
SWAP_SLOT_BYTES = 256


class SwpEntry(NamedTuple):
    """swp_entry_t: a slot on a swap device (``swp_type``, ``swp_offset``). Immutable and hashable."""

    type: int
    offset: int

    @property
    def trace_name(self) -> str:
        return f"swp{self.type}:{self.offset:#x}"


class SwapInfo:
    """struct swap_info_struct: one swap device of ``swap_bytes`` (rounded down to whole pages;
    ValueError past MAX_SWAP_BYTES or below 0). ``memcg``: the budget its slots are charged to
    (None: not charged)."""

    __slots__ = (
        "type", "max", "pages", "inuse_pages", "nr_swap_pages", "swap_map", "swap_cont", "swap_table",
        "swap_data", "next_offset", "memcg",
    )

    def __init__(self, swap_bytes: int, memcg: MemCgroup | None = None, type: int = 0) -> None:
        if not 0 <= swap_bytes <= MAX_SWAP_BYTES:
            raise ValueError(f"swap size must be between 0 and {MAX_SWAP_BYTES} bytes, not {swap_bytes}")
        self.type = type
        #: si->max: the slots, the header's included.
        self.max = swap_bytes >> PAGE_SHIFT
        #: si->pages (total_swap_pages): the slots that can be handed out.
        self.pages = max(self.max - 1, 0)
        #: si->inuse_pages: slots with a count or the cache bit.
        self.inuse_pages = 0
        #: nr_swap_pages: the free slots (the kernel's count over all devices; the model has one).
        self.nr_swap_pages = self.pages
        self.swap_map = KeyedBytes(self.max)
        if self.max:
            self.swap_map[0] = SWAP_MAP_BAD  # the swap header
        #: The continuation digits of the counts past SWAP_MAP_MAX: offset -> count // (SWAP_MAP_MAX + 1).
        self.swap_cont: KeyedDict[int] = KeyedDict()
        #: The swap cache (6.18's swap table, kept per cluster there): offset -> folio (swap_state.py).
        self.swap_table: KeyedDict[Folio] = KeyedDict()
        #: What the device holds: offset -> the contents swap-out wrote there (swap_writepage).
        self.swap_data: KeyedDict[int] = KeyedDict()
        #: Where the search for a free slot starts (the per-CPU cluster's next offset).
        self.next_offset = 1
        self.memcg = memcg

    def __repr__(self) -> str:
        return f"<SwapInfo type={self.type} pages={self.pages} inuse={self.inuse_pages}>"


def swap_count(ent: int) -> int:
    """The count part of a swap_map byte: without SWAP_HAS_CACHE, with COUNT_CONTINUED."""
    return ent & ~SWAP_HAS_CACHE


def _swap_info_get(si: SwapInfo, entry: SwpEntry, where: str) -> None:
    """_swap_info_get's checks of an entry whose reference is put: raises MmError(EINVAL) for an
    entry of another device, an offset past the device, the header slot, or a free slot."""
    off = entry.offset
    if entry.type != si.type:
        raise MmError(errno.EINVAL, f"{where}: bad swap file entry {entry.type}:{off:#x}")
    if not 0 <= off < si.max or si.swap_map[off] == SWAP_MAP_BAD:
        raise MmError(errno.EINVAL, f"{where}: bad swap offset entry {entry.type}:{off:#x}")
    if not si.swap_map[off]:
        raise MmError(errno.EINVAL, f"{where}: unused swap offset entry {entry.type}:{off:#x}")


# ---------------------------------------------------------------------------------------------
# Allocation and freeing


def swap_range_alloc(si: SwapInfo, nr_entries: int) -> None:
    """Count ``nr_entries`` slots as taken."""
    si.inuse_pages += nr_entries
    si.nr_swap_pages -= nr_entries


def swap_range_free(si: SwapInfo, nr_entries: int) -> None:
    """Count ``nr_entries`` slots as free again."""
    si.inuse_pages -= nr_entries
    si.nr_swap_pages += nr_entries


def swap_alloc(cur: Current, si: SwapInfo) -> SwpEntry | None:
    """The slot folio_alloc_swap takes for an order-0 folio (swap_alloc_fast / swap_alloc_slow,
    then cluster_alloc_range with SWAP_HAS_CACHE) with its charge (mem_cgroup_try_charge_swap):
    a free slot, its swap_map set to SWAP_HAS_CACHE, or None when the device is full or the budget
    has no room for SWAP_SLOT_BYTES (nothing changes then but the budget's failcnt)."""
    if si.nr_swap_pages <= 0:
        return None
    swap_map = si.swap_map
    off = swap_map.find(0, si.next_offset)
    if off < 0:
        off = swap_map.find(0, 1)
    assert off > 0, "nr_swap_pages counts a free slot that swap_map does not have"
    if si.memcg is not None:
        try:
            si.memcg.charge(cur, SWAP_SLOT_BYTES)
        except MemoryLimitExceeded:
            return None
    swap_map[off] = SWAP_HAS_CACHE
    swap_range_alloc(si, 1)
    si.next_offset = off + 1
    return SwpEntry(si.type, off)


def folio_alloc_swap(k: Kernel, cur: Current, si: SwapInfo, folio: Folio) -> int:
    """Give the locked ``folio`` a slot and put it in the swap cache (swap_cache_add_folio), as
    6.18's shrink_folio_list does for an anonymous folio not yet in the swap cache
    (``folio_alloc_swap(folio, __GFP_HIGH | __GFP_NOWARN)``; older kernels called add_to_swap
    there). Returns 0, or -ENOMEM with nothing changed when the device is full or the swap
    charge fails. Expects the folio locked and not in the swap cache."""
    from .swap_state import swap_cache_add_folio  # swap_state uses this module's entries and puts

    assert folio.lock is not None and folio.lock.is_locked(), f"folio_alloc_swap: folio {folio.id} not locked"
    assert not folio.swapcache, f"folio_alloc_swap: folio {folio.id} already in the swap cache"
    entry = swap_alloc(cur, si)
    if entry is None:
        return -errno.ENOMEM
    swap_cache_add_folio(k, si, folio, entry)
    return 0


def swap_entries_free(si: SwapInfo, entry: SwpEntry) -> None:
    """The slot's last reference and its cache bit are gone: it is free again, uncharged
    (mem_cgroup_uncharge_swap). Raises MmError(EINVAL), changing nothing, while a folio is still
    in the swap cache for it (the kernel's cluster_table_check warns)."""
    off = entry.offset
    if off in si.swap_table:
        raise MmError(errno.EINVAL, f"swap_entries_free: {entry.trace_name} still has a folio in the swap cache")
    si.swap_map[off] = 0
    si.swap_data.pop(off, None)
    if si.memcg is not None:
        si.memcg.uncharge(SWAP_SLOT_BYTES)
    swap_range_free(si, 1)


def swap_count_continued(si: SwapInfo, offset: int, count: int) -> bool:
    """Carry into the continuation digits (``count`` at SWAP_MAP_MAX: the low digit wraps to 0) or
    borrow from them (``count`` is COUNT_CONTINUED: the low digit is 0). Returns True when the
    digits go on holding a count afterwards."""
    high = si.swap_cont.get(offset, 0)
    if count & ~COUNT_CONTINUED == SWAP_MAP_MAX:
        si.swap_cont[offset] = high + 1
        return True
    assert high > 0, "COUNT_CONTINUED without continuation digits"
    if high > 1:
        si.swap_cont[offset] = high - 1
        return True
    del si.swap_cont[offset]
    return False


def swap_entry_put_locked(si: SwapInfo, entry: SwpEntry, usage: int) -> int:
    """Put one reference of ``usage`` (1: a swap PTE's; SWAP_HAS_CACHE: the cache's), freeing the
    slot when nothing is left (swap_entries_free). Returns what is left of the swap_map byte (0:
    freed). Raises MmError(EINVAL), changing nothing, when the slot holds no such reference (or a
    count past SWAP_MAP_MAX without COUNT_CONTINUED, which the kernel leaves as it is)."""
    off = entry.offset
    count = si.swap_map[off]
    has_cache = count & SWAP_HAS_CACHE
    count &= ~SWAP_HAS_CACHE
    if usage == SWAP_HAS_CACHE:
        if not has_cache:
            raise MmError(errno.EINVAL, f"swap_entry_put_locked: {entry.trace_name} has no SWAP_HAS_CACHE")
        has_cache = 0
    elif count & ~COUNT_CONTINUED > SWAP_MAP_MAX:
        raise MmError(errno.EINVAL, f"swap_entry_put_locked: {entry.trace_name} has a bad count {count:#x}")
    elif not count:
        raise MmError(errno.EINVAL, f"swap_entry_put_locked: {entry.trace_name} has no count to put")
    elif count == COUNT_CONTINUED:
        count = SWAP_MAP_MAX | COUNT_CONTINUED if swap_count_continued(si, off, count) else SWAP_MAP_MAX
    else:
        count -= 1
    usage = count | has_cache
    if usage:
        si.swap_map[off] = usage
    else:
        swap_entries_free(si, entry)
    return usage


def swap_entries_put_map(si: SwapInfo, entry: SwpEntry) -> bool:
    """Put a swap PTE's reference. Returns True when only the cache holds the slot afterwards (the
    caller may then try to reclaim its swap cache folio, as free_swap_and_cache_nr does)."""
    return swap_entry_put_locked(si, entry, 1) == SWAP_HAS_CACHE


def swap_free(si: SwapInfo, entry: SwpEntry) -> None:
    """swap_free / swap_free_nr(entry, 1): put a swap PTE's reference (the slot is free once its
    count and cache bit are both gone). Raises MmError(EINVAL), changing nothing, for an entry that
    is not in use (_swap_info_get) or has no count."""
    _swap_info_get(si, entry, "swap_free")
    swap_entries_put_map(si, entry)


def swap_entries_put_cache(si: SwapInfo, entry: SwpEntry) -> None:
    """Put the cache's reference: clear SWAP_HAS_CACHE, freeing the slot if its count is 0."""
    swap_entry_put_locked(si, entry, SWAP_HAS_CACHE)


def put_swap_folio(si: SwapInfo, entry: SwpEntry) -> None:
    """put_swap_folio for an order-0 folio: put the cache's reference on its slot, once the folio
    has left the swap cache (swap_cache_del_folio) or never entered it. Raises MmError(EINVAL),
    changing nothing, for an entry not in use or without SWAP_HAS_CACHE."""
    _swap_info_get(si, entry, "put_swap_folio")
    swap_entries_put_cache(si, entry)


# ---------------------------------------------------------------------------------------------
# Raising counts


def _swap_duplicate(si: SwapInfo, entry: SwpEntry, usage: int) -> int:
    """__swap_duplicate for one slot: add ``usage`` (1: a swap PTE's reference; SWAP_HAS_CACHE: the
    cache bit). Returns 0, or with nothing changed -EINVAL (an entry of another device or past it,
    or a count past SWAP_MAP_MAX without COUNT_CONTINUED: a corrupted map), -ENOENT (the header
    slot, or a free slot) or -EEXIST (the cache bit is already set)."""
    off = entry.offset
    if entry.type != si.type or not 0 <= off < si.max:
        return -errno.EINVAL
    swap_map = si.swap_map
    count = swap_map[off]
    if swap_count(count) == SWAP_MAP_BAD:
        return -errno.ENOENT
    has_cache = count & SWAP_HAS_CACHE
    count &= ~SWAP_HAS_CACHE
    if not count and not has_cache:
        return -errno.ENOENT
    if usage == SWAP_HAS_CACHE:
        if has_cache:
            return -errno.EEXIST
        has_cache = SWAP_HAS_CACHE
    elif count & ~COUNT_CONTINUED > SWAP_MAP_MAX:
        return -errno.EINVAL
    elif count & ~COUNT_CONTINUED < SWAP_MAP_MAX:
        count += usage
    else:
        swap_count_continued(si, off, count)  # the model's continuation always has room
        count = COUNT_CONTINUED
    swap_map[off] = count | has_cache
    return 0


def swap_duplicate(si: SwapInfo, entry: SwpEntry) -> int:
    """Add a swap PTE's reference (fork copying a swap PTE: copy_nonpresent_pte). Returns 0, or
    -EINVAL / -ENOENT as _swap_duplicate. The kernel's -ENOMEM (no continuation page could be
    allocated) does not happen in the model."""
    return _swap_duplicate(si, entry, 1)


def swapcache_prepare(si: SwapInfo, entry: SwpEntry) -> int:
    """Set SWAP_HAS_CACHE on a slot in use, pinning it for a folio about to enter the swap cache
    (swap-in: __read_swap_cache_async, do_swap_page's synchronous path). Returns 0, -EEXIST when the
    bit is already set (another task is adding a folio: the caller looks the cache up again, or
    waits), or -ENOENT / -EINVAL as _swap_duplicate."""
    return _swap_duplicate(si, entry, SWAP_HAS_CACHE)


def swapcache_clear(si: SwapInfo, entry: SwpEntry) -> None:
    """Clear the SWAP_HAS_CACHE that swapcache_prepare set, when no folio was added after all;
    frees the slot if its count is 0. Raises MmError(EINVAL), changing nothing, for an entry not
    in use or without the bit."""
    _swap_info_get(si, entry, "swapcache_clear")
    swap_entries_put_cache(si, entry)


# ---------------------------------------------------------------------------------------------
# Reading counts


def swap_map_count(si: SwapInfo, entry: SwpEntry) -> int:
    """__swap_count: the slot's swap_map count without SWAP_HAS_CACHE (COUNT_CONTINUED included).
    Raises MmError(EINVAL) for an entry of another device or past it."""
    if entry.type != si.type or not 0 <= entry.offset < si.max:
        raise MmError(errno.EINVAL, f"__swap_count: bad swap entry {entry.type}:{entry.offset:#x}")
    return swap_count(si.swap_map[entry.offset])


def swp_swapcount(si: SwapInfo, entry: SwpEntry) -> int:
    """The slot's whole count of swap PTE references, its continuation digits included; 0 for an
    entry that is not in use (as 6.18's swp_swapcount, which goes through _swap_info_get)."""
    off = entry.offset
    if entry.type != si.type or not 0 <= off < si.max:
        return 0
    count = swap_count(si.swap_map[off])
    if count == SWAP_MAP_BAD:
        return 0
    if not count & COUNT_CONTINUED:
        return count
    return (count & ~COUNT_CONTINUED) + (SWAP_MAP_MAX + 1) * si.swap_cont.get(off, 0)


# ---------------------------------------------------------------------------------------------
# Invariants


def _marks(test: Callable[[int], int]) -> bytes:
    """A bytes.translate table: 1 for the swap_map values ``test`` accepts, 0 for the others."""
    return bytes(1 if test(b) else 0 for b in range(256))


#: swap_map values that cannot occur past the header slot: a low count of SWAP_MAP_BAD.
_BAD_VALUE = _marks(lambda b: b & 0x3F == SWAP_MAP_BAD)
_CACHE_BIT = _marks(lambda b: b & SWAP_HAS_CACHE)
_CONTINUED_BIT = _marks(lambda b: b & COUNT_CONTINUED)


def _offsets(marked: bytes | bytearray, start: int, limit: int = 5) -> list[int]:
    """The first ``limit`` offsets from ``start`` whose mark is 1."""
    found: list[int] = []
    i = marked.find(1, start)
    while i >= 0 and len(found) < limit:
        found.append(i)
        i = marked.find(1, i + 1)
    return found


def swap_info_check(si: SwapInfo) -> list[str]:
    """Every problem of the device's bookkeeping, for a quiescent point (no call in flight):
    the header slot, counts (no SWAP_MAP_BAD past the header, COUNT_CONTINUED exactly where
    continuation digits are, the digits positive), ``inuse_pages`` and ``nr_swap_pages`` against
    the slots in use, and the swap cache against SWAP_HAS_CACHE (each cached folio's slot has the
    bit and the folio names the slot; no bit without a cached folio, since nothing holds it
    across a call). Runs in time linear in the device's size, in C but for the problem slots."""
    problems: list[str] = []
    swap_map = si.swap_map
    where = f"swap device {si.type}"
    if len(swap_map) != si.max:
        return [f"{where}: swap_map has {len(swap_map)} slots, not {si.max}"]
    if si.pages != max(si.max - 1, 0):
        problems.append(f"{where}: pages {si.pages} for a device of {si.max} slots")
    if si.max and swap_map[0] != SWAP_MAP_BAD:
        problems.append(f"{where}: header slot 0 is {swap_map[0]:#x}, not SWAP_MAP_BAD")
    bad = _offsets(swap_map.translate(_BAD_VALUE), 1)
    if bad:
        problems.append(f"{where}: SWAP_MAP_BAD counts past the header at {', '.join(map(hex, bad))}")
    in_use = si.max - 1 - swap_map.count(0) if si.max else 0
    if si.inuse_pages != in_use:
        problems.append(f"{where}: inuse_pages {si.inuse_pages} != {in_use} slots in use")
    if not 0 <= si.inuse_pages <= si.pages:
        problems.append(f"{where}: inuse_pages {si.inuse_pages} outside 0..{si.pages}")
    if si.nr_swap_pages != si.pages - si.inuse_pages:
        problems.append(f"{where}: nr_swap_pages {si.nr_swap_pages} != {si.pages} - {si.inuse_pages} in use")
    continued = swap_map.translate(_CONTINUED_BIT)
    if continued.count(1) != len(si.swap_cont) or any(not swap_map[off] & COUNT_CONTINUED for off in si.swap_cont):
        problems.append(f"{where}: COUNT_CONTINUED at {', '.join(map(hex, _offsets(continued, 0)))} but "
                        f"continuation digits at {', '.join(map(hex, sorted(si.swap_cont)[:5]))}")
    for off, high in si.swap_cont.items():
        if high <= 0:
            problems.append(f"{where}: continuation digits {high} at {off:#x}")
    cached = swap_map.translate(_CACHE_BIT)
    for off, folio in si.swap_table.items():
        if not 0 < off < si.max or not swap_map[off] & SWAP_HAS_CACHE:
            problems.append(f"{where}: folio {folio.id} in the swap cache at {off:#x} without SWAP_HAS_CACHE")
        if folio.swap != SwpEntry(si.type, off) or not folio.swapcache or folio.freed:
            problems.append(f"{where}: folio {folio.id} in the swap cache at {off:#x} has swap={folio.swap} "
                            f"swapcache={folio.swapcache} freed={folio.freed}")
        if folio.refcount < 1:
            problems.append(f"{where}: folio {folio.id} in the swap cache with refcount {folio.refcount}")
    if cached.count(1) != len(si.swap_table):
        orphans = [off for off in _offsets(cached, 0, len(si.swap_table) + 5) if off not in si.swap_table][:5]
        problems.append(f"{where}: SWAP_HAS_CACHE without a folio in the swap cache at {', '.join(map(hex, orphans))}")
    return problems
