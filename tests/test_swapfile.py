"""Unit tests of the swap device (server/mm/swapfile.py) and the swap cache (server/mm/swap_state.py):
slots and their swap_map counts, SWAP_HAS_CACHE, the cache's folios, the budget's charges and the
device's invariant check."""

from __future__ import annotations

import errno
import pickle

import pytest

from mmsim.server.mm.kernel import Kernel
from mmsim.server.mm.locks import Current
from mmsim.server.mm.memcontrol import MemCgroup
from mmsim.server.mm.mm_types import FOLIO_BYTES, PAGE_SIZE, Folio, MmError
from mmsim.server.mm.swap_state import (
    folio_matches_swap_entry,
    swap_cache_add_folio,
    swap_cache_del_folio,
    swap_cache_get_folio,
)
from mmsim.server.mm.swapfile import (
    COUNT_CONTINUED,
    MAX_SWAP_BYTES,
    SWAP_HAS_CACHE,
    SWAP_MAP_BAD,
    SWAP_MAP_MAX,
    SWAP_SLOT_BYTES,
    SwapInfo,
    SwpEntry,
    folio_alloc_swap,
    put_swap_folio,
    swap_alloc,
    swap_duplicate,
    swap_free,
    swap_info_check,
    swap_map_count,
    swapcache_clear,
    swapcache_prepare,
    swp_swapcount,
)

CUR = Current("test")
ORPHANS = "SWAP_HAS_CACHE without a folio in the swap cache"


def device(pages: int, memcg: MemCgroup | None = None) -> SwapInfo:
    """A device of ``pages`` pages: ``pages - 1`` slots after the header."""
    return SwapInfo(pages * PAGE_SIZE, memcg)


def swapped(si: SwapInfo, count: int = 1) -> SwpEntry:
    """A slot counted by ``count`` swap PTEs and not in the swap cache (swapped out, written, and
    its folio reclaimed)."""
    entry = swap_alloc(CUR, si)
    assert entry is not None
    for _ in range(count):
        assert swap_duplicate(si, entry) == 0
    swapcache_clear(si, entry)
    return entry


def locked_folio(k: Kernel) -> Folio:
    """A folio as reclaim holds it: one reference (its mapping's), locked."""
    k.memcg.charge(CUR, FOLIO_BYTES)
    folio = k.folio_alloc()
    folio.refcount = 1
    assert folio.lock is not None and folio.lock.trylock(CUR)
    return folio


# ---------------------------------------------------------------------------------------------
# The device and its slots


def test_allocation_fills_the_device_then_fails_and_never_hands_out_the_header() -> None:
    si = device(5)
    assert (si.max, si.pages, si.nr_swap_pages, si.inuse_pages) == (5, 4, 4, 0)
    assert si.swap_map[0] == SWAP_MAP_BAD
    entries = [swap_alloc(CUR, si) for _ in range(4)]
    assert [e.offset for e in entries if e is not None] == [1, 2, 3, 4]
    assert all(si.swap_map[off] == SWAP_HAS_CACHE for off in range(1, 5))  # pinned for the cache, count 0
    assert (si.nr_swap_pages, si.inuse_pages) == (0, 4)
    assert swap_alloc(CUR, si) is None
    assert (si.nr_swap_pages, si.inuse_pages) == (0, 4)
    assert si.swap_map[0] == SWAP_MAP_BAD
    # Pinned for folios that never came (not a quiescent state): all the check finds.
    assert swap_info_check(si) == [f"swap device 0: {ORPHANS} at 0x1, 0x2, 0x3, 0x4"]


def test_a_freed_slot_is_handed_out_again_but_never_slot_0() -> None:
    si = device(4)
    first = [swap_alloc(CUR, si) for _ in range(3)]
    assert None not in first
    swapcache_clear(si, SwpEntry(0, 2))  # no count: the slot is free again
    assert (si.swap_map[2], si.nr_swap_pages, si.inuse_pages) == (0, 1, 2)
    again = swap_alloc(CUR, si)
    assert again == SwpEntry(0, 2)
    assert swap_alloc(CUR, si) is None
    for off in (1, 2, 3):
        swapcache_clear(si, SwpEntry(0, off))
    got = [swap_alloc(CUR, si) for _ in range(3)]
    assert sorted(e.offset for e in got if e is not None) == [1, 2, 3]
    assert swap_info_check(si) == [f"swap device 0: {ORPHANS} at 0x1, 0x2, 0x3"]


@pytest.mark.parametrize("swap_bytes", [0, PAGE_SIZE, PAGE_SIZE + 100, 2 * PAGE_SIZE - 1])
def test_a_device_of_less_than_two_pages_is_no_swap(swap_bytes: int) -> None:
    si = SwapInfo(swap_bytes)
    assert (si.pages, si.nr_swap_pages) == (0, 0)
    assert swap_alloc(CUR, si) is None
    assert swap_duplicate(si, SwpEntry(0, 0)) == (-errno.ENOENT if si.max else -errno.EINVAL)
    assert swap_info_check(si) == []


def test_a_partial_page_is_not_a_slot_and_sizes_are_bounded() -> None:
    assert SwapInfo(3 * PAGE_SIZE + PAGE_SIZE // 2).pages == 2
    assert SwapInfo(MAX_SWAP_BYTES).pages == (MAX_SWAP_BYTES // PAGE_SIZE) - 1
    with pytest.raises(ValueError, match="swap size"):
        SwapInfo(-1)
    with pytest.raises(ValueError, match="swap size"):
        SwapInfo(MAX_SWAP_BYTES + PAGE_SIZE)


def test_counts_through_duplicate_and_free() -> None:
    si = device(3)
    entry = swap_alloc(CUR, si)
    assert entry is not None
    for n in range(1, 4):  # three swap PTEs (the unmap's, then fork's copies)
        assert swap_duplicate(si, entry) == 0
        assert swap_map_count(si, entry) == n == swp_swapcount(si, entry)
    assert si.swap_map[entry.offset] == 3 | SWAP_HAS_CACHE
    swapcache_clear(si, entry)
    assert si.swap_map[entry.offset] == 3
    swap_free(si, entry)
    swap_free(si, entry)
    assert (swp_swapcount(si, entry), si.inuse_pages) == (1, 1)
    swap_free(si, entry)
    assert (si.swap_map[entry.offset], si.inuse_pages, si.nr_swap_pages) == (0, 0, 2)
    assert swp_swapcount(si, entry) == 0
    assert swap_info_check(si) == []


def test_counts_past_swap_map_max_go_on_in_continuation_digits() -> None:
    si = device(2)
    entry = swap_alloc(CUR, si)
    assert entry is not None
    n = 3 * (SWAP_MAP_MAX + 1) + 5
    for _ in range(n):
        assert swap_duplicate(si, entry) == 0
    assert swp_swapcount(si, entry) == n
    assert swap_map_count(si, entry) == 5 | COUNT_CONTINUED
    assert si.swap_map[entry.offset] == 5 | COUNT_CONTINUED | SWAP_HAS_CACHE
    assert swap_info_check(si) == [f"swap device 0: {ORPHANS} at 0x1"]
    for left in range(n - 1, -1, -1):
        swap_free(si, entry)
        assert swp_swapcount(si, entry) == left
        if left == SWAP_MAP_MAX:  # the last borrow: the digits are gone
            assert si.swap_map[entry.offset] == SWAP_MAP_MAX | SWAP_HAS_CACHE and not si.swap_cont
    assert si.swap_map[entry.offset] == SWAP_HAS_CACHE and not si.swap_cont
    assert si.inuse_pages == 1  # the cache bit still holds it
    swapcache_clear(si, entry)
    assert si.inuse_pages == 0
    assert swap_info_check(si) == []


def test_swap_duplicate_fails_as_the_kernel_does_and_changes_nothing() -> None:
    si = device(4)
    entry = swapped(si)
    before = bytes(si.swap_map)
    assert swap_duplicate(si, SwpEntry(0, 2)) == -errno.ENOENT  # a free slot
    assert swap_duplicate(si, SwpEntry(0, 0)) == -errno.ENOENT  # the header (SWAP_MAP_BAD)
    assert swap_duplicate(si, SwpEntry(1, entry.offset)) == -errno.EINVAL  # another device
    assert swap_duplicate(si, SwpEntry(0, 4)) == -errno.EINVAL  # past the device
    assert swap_duplicate(si, SwpEntry(0, -1)) == -errno.EINVAL
    assert bytes(si.swap_map) == before
    si.swap_map[3] = SWAP_MAP_BAD | COUNT_CONTINUED  # a count past SWAP_MAP_MAX: corrupted
    assert swap_duplicate(si, SwpEntry(0, 3)) == -errno.EINVAL
    assert si.swap_map[3] == SWAP_MAP_BAD | COUNT_CONTINUED


def test_putting_a_reference_that_is_not_there_raises_and_changes_nothing() -> None:
    si = device(4)
    entry = swapped(si)
    before = bytes(si.swap_map)
    for bad in (SwpEntry(0, 2), SwpEntry(0, 0), SwpEntry(0, 9), SwpEntry(3, entry.offset)):
        with pytest.raises(MmError) as e:
            swap_free(si, bad)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(MmError):
            put_swap_folio(si, bad)
    with pytest.raises(MmError, match="SWAP_HAS_CACHE"):
        swapcache_clear(si, entry)  # counted, but not pinned for the cache
    with pytest.raises(MmError, match="__swap_count"):
        swap_map_count(si, SwpEntry(0, 4))
    assert bytes(si.swap_map) == before and si.inuse_pages == 1
    cached = swap_alloc(CUR, si)
    assert cached is not None
    with pytest.raises(MmError, match="no count"):
        swap_free(si, cached)  # only the cache bit: no swap PTE's count to put
    assert si.swap_map[cached.offset] == SWAP_HAS_CACHE
    swapcache_clear(si, cached)
    assert swap_info_check(si) == []


# ---------------------------------------------------------------------------------------------
# SWAP_HAS_CACHE


def test_swapcache_prepare_sets_the_bit_once_and_clear_puts_it() -> None:
    si = device(4)
    entry = swapped(si, count=2)
    assert swapcache_prepare(si, entry) == 0
    assert si.swap_map[entry.offset] == 2 | SWAP_HAS_CACHE
    assert swapcache_prepare(si, entry) == -errno.EEXIST  # another swap-in got there first
    assert si.swap_map[entry.offset] == 2 | SWAP_HAS_CACHE
    swapcache_clear(si, entry)
    assert si.swap_map[entry.offset] == 2
    assert swapcache_prepare(si, SwpEntry(0, 3)) == -errno.ENOENT  # a free slot: nothing to swap in
    assert swapcache_prepare(si, SwpEntry(0, 0)) == -errno.ENOENT
    assert si.swap_map[3] == 0 and si.swap_map[0] == SWAP_MAP_BAD
    assert swap_info_check(si) == []


@pytest.mark.parametrize("cache_first", [True, False])
def test_a_slot_is_freed_only_when_count_and_cache_bit_are_both_gone(cache_first: bool) -> None:
    si = device(2)  # one slot
    entry = swap_alloc(CUR, si)
    assert entry is not None and swap_duplicate(si, entry) == 0
    if cache_first:
        swapcache_clear(si, entry)
        assert si.swap_map[entry.offset] == 1
    else:
        swap_free(si, entry)
        assert si.swap_map[entry.offset] == SWAP_HAS_CACHE
    assert (si.inuse_pages, si.nr_swap_pages) == (1, 0)
    assert swap_alloc(CUR, si) is None  # still taken
    if cache_first:
        swap_free(si, entry)
    else:
        swapcache_clear(si, entry)
    assert (si.swap_map[entry.offset], si.inuse_pages, si.nr_swap_pages) == (0, 0, 1)
    assert swap_alloc(CUR, si) == entry


# ---------------------------------------------------------------------------------------------
# The swap cache


def test_folio_alloc_swap_puts_the_folio_in_the_swap_cache_and_deleting_lets_it_go() -> None:
    k = Kernel()
    si = device(4)
    folio = locked_folio(k)
    assert folio_alloc_swap(k, CUR, si, folio) == 0
    entry = folio.swap
    assert entry is not None and folio.swapcache and folio_matches_swap_entry(folio, entry)
    assert folio.refcount == 2  # its mapping's and the cache's
    assert si.swap_map[entry.offset] == SWAP_HAS_CACHE and si.swap_table == {entry.offset: folio}
    assert swap_info_check(si) == []

    found = swap_cache_get_folio(k, si, entry)
    assert found is folio and folio.refcount == 3  # a reference for the caller
    folio.refcount -= 1
    assert swap_cache_get_folio(k, si, SwpEntry(0, entry.offset + 1)) is None
    assert swap_cache_get_folio(k, si, SwpEntry(1, entry.offset)) is None

    assert swap_duplicate(si, entry) == 0  # the unmap's swap PTE
    swap_cache_del_folio(k, si, folio)
    assert (folio.swap, folio.swapcache, folio.refcount) == (None, False, 1)
    assert not folio_matches_swap_entry(folio, entry)
    assert si.swap_map[entry.offset] == 1 and si.swap_table == {}  # the PTE still counts the slot
    assert swap_cache_get_folio(k, si, entry) is None
    assert swap_info_check(si) == []
    swap_free(si, entry)
    assert (si.swap_map[entry.offset], si.inuse_pages) == (0, 0)


def test_deleting_a_folio_whose_slot_has_no_count_frees_the_slot() -> None:
    k = Kernel()
    si = device(2)
    folio = locked_folio(k)
    assert folio_alloc_swap(k, CUR, si, folio) == 0
    entry = folio.swap
    assert entry is not None
    swap_cache_del_folio(k, si, folio)
    assert (si.swap_map[entry.offset], si.inuse_pages, si.nr_swap_pages) == (0, 0, 1)
    assert folio.refcount == 1 and not folio.swapcache


def test_swap_in_adds_a_folio_for_a_slot_it_pinned() -> None:
    k = Kernel()
    si = device(3)
    entry = swapped(si)
    folio = locked_folio(k)
    assert swapcache_prepare(si, entry) == 0
    swap_cache_add_folio(k, si, folio, entry)
    assert swap_cache_get_folio(k, si, entry) is folio
    folio.refcount -= 1
    assert si.swap_map[entry.offset] == 1 | SWAP_HAS_CACHE and swap_info_check(si) == []
    with pytest.raises(AssertionError, match="already has a folio"):
        swap_cache_add_folio(k, si, locked_folio(k), entry)


def test_folio_alloc_swap_on_a_full_device_fails_and_leaves_the_folio_alone() -> None:
    k = Kernel()
    si = device(2)
    first, second = locked_folio(k), locked_folio(k)
    assert folio_alloc_swap(k, CUR, si, first) == 0
    assert folio_alloc_swap(k, CUR, si, second) == -errno.ENOMEM
    assert (second.swap, second.swapcache, second.refcount) == (None, False, 1)
    assert len(si.swap_table) == 1 and swap_info_check(si) == []
    assert folio_alloc_swap(k, CUR, device(1), second) == -errno.ENOMEM  # no swap at all


# ---------------------------------------------------------------------------------------------
# Memory accounting


def test_slots_in_use_are_charged_to_the_budget() -> None:
    memcg = MemCgroup(limit=2 * SWAP_SLOT_BYTES + SWAP_SLOT_BYTES // 2)
    si = device(8, memcg)
    a, b = swap_alloc(CUR, si), swap_alloc(CUR, si)
    assert a is not None and b is not None
    assert memcg.usage == 2 * SWAP_SLOT_BYTES
    assert swap_alloc(CUR, si) is None  # the device has room, the budget has not
    assert (memcg.failcnt, memcg.usage, si.inuse_pages, si.nr_swap_pages) == (1, 2 * SWAP_SLOT_BYTES, 2, 5)
    assert swap_duplicate(si, a) == 0 and memcg.usage == 2 * SWAP_SLOT_BYTES  # a count costs nothing more
    swapcache_clear(si, b)
    assert memcg.usage == SWAP_SLOT_BYTES
    c = swap_alloc(CUR, si)
    assert c is not None
    swapcache_clear(si, a)
    swap_free(si, a)
    assert memcg.usage == SWAP_SLOT_BYTES
    swapcache_clear(si, c)
    assert memcg.usage == 0 and swap_info_check(si) == []


def test_folio_alloc_swap_fails_when_the_swap_charge_fails() -> None:
    k = Kernel(max_memory=FOLIO_BYTES + SWAP_SLOT_BYTES // 2)
    si = SwapInfo(4 * PAGE_SIZE, k.memcg)
    folio = locked_folio(k)
    assert folio_alloc_swap(k, CUR, si, folio) == -errno.ENOMEM
    assert (folio.swapcache, si.inuse_pages, k.memcg.failcnt) == (False, 0, 1)


# ---------------------------------------------------------------------------------------------
# The invariant check


def test_the_invariant_check_catches_a_corrupted_swap_map() -> None:
    k = Kernel()
    si = device(8)
    entry = swapped(si, count=2)
    folio = locked_folio(k)
    assert folio_alloc_swap(k, CUR, si, folio) == 0
    assert swap_info_check(si) == []

    si.swap_map[5] = 1  # a count nobody allocated
    problems = swap_info_check(si)
    assert any("inuse_pages 2 != 3" in p for p in problems), problems
    si.swap_map[5] = 0

    si.swap_map[entry.offset] |= SWAP_HAS_CACHE  # the cache bit without a folio
    assert any("SWAP_HAS_CACHE without a folio" in p and hex(entry.offset) in p for p in swap_info_check(si))
    si.swap_map[entry.offset] = 2

    si.swap_map[entry.offset] = 2 | COUNT_CONTINUED  # continued, without digits
    assert any("COUNT_CONTINUED" in p for p in swap_info_check(si))
    si.swap_map[entry.offset] = SWAP_MAP_BAD  # a bad slot past the header
    assert any("SWAP_MAP_BAD" in p for p in swap_info_check(si))
    si.swap_map[entry.offset] = 2

    si.swap_map[0] = 0
    assert any("header" in p for p in swap_info_check(si))
    si.swap_map[0] = SWAP_MAP_BAD

    si.nr_swap_pages += 1
    assert any("nr_swap_pages" in p for p in swap_info_check(si))
    si.nr_swap_pages -= 1

    assert folio.swap is not None
    si.swap_map[folio.swap.offset] = 0  # a cached folio whose slot lost its bit
    assert any(f"folio {folio.id} in the swap cache" in p for p in swap_info_check(si))
    si.swap_map[folio.swap.offset] = SWAP_HAS_CACHE
    assert swap_info_check(si) == []


def test_a_device_pickles_with_its_cache() -> None:
    k = Kernel()
    si = device(3)
    folio = locked_folio(k)
    assert folio_alloc_swap(k, CUR, si, folio) == 0
    copy = pickle.loads(pickle.dumps(si))
    assert bytes(copy.swap_map) == bytes(si.swap_map) and copy.inuse_pages == 1
    [(off, cached)] = copy.swap_table.items()
    assert cached.swap == SwpEntry(0, off) and cached.swapcache
