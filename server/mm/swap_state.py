"""The swap cache (mm/swap_state.c): the folio, if any, that stands for a swap slot in memory.

A folio is in the swap cache between swap-out and the freeing of its slot, or from swap-in until
the slot is let go: reclaim puts it there when it gives the folio a slot (folio_alloc_swap) and
takes it out once the folio is written (__remove_mapping); swap-in finds it there (a fault that
races reclaim, or a second fault on the same slot) or adds the folio it reads; UFFDIO_MOVE of a
swap PTE (6.14+) moves the cached folio's ``mapping`` and ``index`` with the entry.

6.18 keeps the swap cache in the swap table, one per cluster of the device (mm/swap_table.h: a slot's
entry is a folio, a workingset shadow, or nothing); before 6.18 it was an address_space per 64 MiB
of swap, an xarray. The model keeps it in the device, as ``SwapInfo.swap_table`` (offset -> folio).
Shadows (the workingset's refault distance) are not modelled. The names are 6.18's:
swap_cache_add_folio, swap_cache_get_folio and swap_cache_del_folio were add_to_swap_cache,
lookup_swap_cache / filemap_get_folio and delete_from_swap_cache.

A folio in the swap cache holds ``folio.swap`` (its slot's entry) and ``folio.swapcache``
(PG_swapcache), the cache holds one reference on it (``folio->_refcount``), and its slot has
SWAP_HAS_CACHE (swapfile.py), set before the folio is added (folio_alloc_swap, swapcache_prepare)
and put when it is deleted.

Locks: 6.18 changes the swap table under the swap cluster lock (``ci->lock``; older kernels took the
xarray's ``xa_lock``), and looks it up under RCU, taking a reference only if the folio's count is
not zero (folio_try_get). None of them has a model counterpart: no function here awaits, so
nothing else runs between a lookup and its reference, or within an update. The folio lock, which
the kernel expects held to add or delete (VM_WARN_ON_ONCE_FOLIO), is the model's too: adding and
deleting assert it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .mm_types import Folio
from .page_ref import folio_ref_add, folio_ref_sub, folio_try_get
from .swapfile import SWAP_HAS_CACHE, SwapInfo, SwpEntry, put_swap_folio

if TYPE_CHECKING:
    from .kernel import Kernel


def swap_cache_add_folio(k: Kernel, si: SwapInfo, folio: Folio, entry: SwpEntry) -> None:
    """Put ``folio`` in the swap cache for ``entry`` (add_to_swap_cache before 6.18): sets
    ``folio.swap`` and ``folio.swapcache`` and takes the cache's reference. Expects the folio
    locked and not in the swap cache, and the slot pinned with SWAP_HAS_CACHE and without a
    cached folio (the caller's folio_alloc_swap or swapcache_prepare)."""
    off = entry.offset
    assert folio.lock is not None and folio.lock.is_locked(), f"swap_cache_add_folio: folio {folio.id} not locked"
    assert not folio.swapcache, f"swap_cache_add_folio: folio {folio.id} already in the swap cache"
    assert entry.type == si.type and 0 < off < si.max and si.swap_map[off] & SWAP_HAS_CACHE, \
        f"swap_cache_add_folio: {entry.trace_name} not pinned with SWAP_HAS_CACHE"
    assert off not in si.swap_table, f"swap_cache_add_folio: {entry.trace_name} already has a folio"
    si.swap_table[off] = folio
    folio_ref_add(k, folio, 1)
    folio.swapcache = True
    folio.swap = entry


def swap_cache_get_folio(k: Kernel, si: SwapInfo, entry: SwpEntry) -> Folio | None:
    """The folio in the swap cache for ``entry``, with a reference taken for the caller (put it
    with memory.folio_put), or None. The folio is not locked: the caller locks it and checks that
    it still holds ``entry`` (folio_matches_swap_entry) before using it."""
    if entry.type != si.type:
        return None
    folio = si.swap_table.get(entry.offset)
    if folio is None:
        return None
    if not folio_try_get(k, folio):  # never fails: the cache's own reference keeps it above zero
        return None
    return folio


def folio_matches_swap_entry(folio: Folio, entry: SwpEntry) -> bool:
    """``folio`` is (still) in the swap cache for ``entry``. Expects the folio locked, so that it
    cannot enter or leave the swap cache meanwhile."""
    return folio.swapcache and folio.swap == entry


def swap_cache_del_folio(k: Kernel, si: SwapInfo, folio: Folio) -> None:
    """Take ``folio`` out of the swap cache (delete_from_swap_cache before 6.18): clears
    ``folio.swap`` and ``folio.swapcache``, puts the slot's SWAP_HAS_CACHE (put_swap_folio: the
    slot is freed if no swap PTE counts it) and drops the cache's reference. Expects the folio
    locked, in the swap cache, and referenced by the caller besides the cache."""
    entry = folio.swap
    assert folio.lock is not None and folio.lock.is_locked(), f"swap_cache_del_folio: folio {folio.id} not locked"
    assert folio.swapcache and entry is not None, f"swap_cache_del_folio: folio {folio.id} not in the swap cache"
    assert si.swap_table.get(entry.offset) is folio, f"swap_cache_del_folio: {entry.trace_name} holds another folio"
    assert folio.refcount > 1, f"swap_cache_del_folio: folio {folio.id} has no reference besides the cache's"
    del si.swap_table[entry.offset]
    folio.swap = None
    folio.swapcache = False
    put_swap_folio(si, entry)
    folio_ref_sub(k, folio, 1)
