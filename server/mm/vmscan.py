"""Reclaim (mm/vmscan.c): the LRU scan, the unlocked rmap walker, and swap-out.

``shrink_lruvec`` reclaims up to ``nr_to_reclaim`` folios, as kswapd and direct reclaim do, in
passes from DEF_PRIORITY down to 0, each scanning ``size >> priority`` folios of a list:

- ``shrink_active_list`` takes folios from the active list's old end and walks each one's rmap
  with ``folio_referenced`` **without the folio lock** (the walker the mapping recheck was written
  for), clearing young bits; an anonymous folio is deactivated whatever it finds;
- ``shrink_inactive_list`` takes folios from the inactive list's old end to ``shrink_folio_list``.

``shrink_folio_list`` works on isolated folios, each with the isolation's reference: folio trylock
(a locked folio is skipped); unless told to ignore references, the locked rmap walk
(folio_check_references: young PTEs found once mark the folio PG_referenced and keep it, found
again or in several PTEs activate it); a folio not yet in the swap cache gets a slot
(folio_alloc_swap; none: the folio is activated, as with no swap); ``try_to_unmap`` turns every
PTE into a swap PTE; a dirty folio is written to its slot (``swap_writepage``), which the kernel
starts and finishes asynchronously: the written folio stays in the swap cache, clean, and is
rotated to the inactive list's old end, where a later pass frees it; a clean, unmapped folio in
the swap cache whose only other reference is the cache's is freed (__remove_mapping). So a page
reclaimed dirty costs two passes, and MADV_PAGEOUT (``reclaim_pages``, one pass over the folios it
isolated, references ignored) leaves it in the swap cache, as 6.18 does with a swap device that
writes asynchronously.

``try_to_free_mem_cgroup_pages`` is memcg reclaim: the model's budget (``--max-memory``) is full
and a folio's charge failed (a fault, a swap-in, UFFDIO_COPY), so it reclaims SWAP_CLUSTER_MAX
folios at least; ``mem_cgroup_charge`` retries the charge (up to MAX_RECLAIM_RETRIES times) and
fails with ENOMEM only when reclaim frees nothing: swap is full, or nothing is left to swap out.

Locks: the folio lock (trylock), then what the rmap walks take (the anon_vma root rwsem for read,
each PTL). No mmap_lock: reclaim reaches the page tables through the rmap only.
"""

from __future__ import annotations

from itertools import islice
from typing import TYPE_CHECKING

from .huge_memory import split_folio
from .locks import Current
from .memcontrol import MemoryLimitExceeded
from .memory import folio_get, folio_put
from .mm_types import FOLIO_BYTES, Folio, LargeFolio, MmError, folio_maybe_dma_pinned
from .page_ref import folio_ref_add
from .rmap import folio_referenced, try_to_unmap
from .sched import RESCHED_WORK, cond_resched, uninterruptible
from .swap import LRU_ACTIVE_ANON, LRU_INACTIVE_ANON, folio_putback_lru, lruvec_del_folio
from .swap_state import swap_cache_del_folio
from .swapfile import folio_alloc_swap

if TYPE_CHECKING:
    from .kernel import Kernel

#: The scan passes run from this priority down to 0 (a pass scans ``size >> priority``).
DEF_PRIORITY = 12
#: The folios a batch isolates, and the least memcg reclaim aims for.
SWAP_CLUSTER_MAX = 32
#: How often a charge is retried after reclaim freed something (try_charge_memcg).
MAX_RECLAIM_RETRIES = 16

# folio_check_references's verdicts
FOLIOREF_RECLAIM = 0
FOLIOREF_KEEP = 1
FOLIOREF_ACTIVATE = 2


def folio_isolate_lru(k: Kernel, folio: Folio) -> bool:
    """Take ``folio`` off its LRU list with a reference (False: it is on none)."""
    if not folio.lru:
        return False
    lruvec_del_folio(k.lruvec, folio)
    folio_ref_add(k, folio, 1)
    return True


def swap_writepage(k: Kernel, folio: Folio) -> None:
    """Write the locked folio's contents to its slot (pageout -> swap_writeout): the folio is
    clean afterwards. The kernel's write ends later (end_swap_bio_write); the model's at once."""
    assert folio.swap is not None
    k.swap.swap_data[folio.swap.offset] = folio.value
    folio.dirty = False
    k.stats["swap_out"] += 1


async def folio_check_references(k: Kernel, cur: Current, folio: Folio) -> int:
    """What reclaim does with a locked folio whose PTEs may be young: keep it for another trip
    round the inactive list, activate it, or reclaim it."""
    # folio_referenced(folio, is_locked=1): the folio is locked here, so the walk is 6.18's plain
    # one (rmap.folio_referenced, not the protocol's step, which may lock the folio itself).
    rwc = await folio_referenced(k, cur, folio, try_lock=True)
    if rwc.contended:
        return FOLIOREF_KEEP
    referenced_folio = folio.referenced
    folio.referenced = False  # folio_test_clear_referenced
    if rwc.referenced:
        folio.referenced = True  # spare it once; another reference activates it
        if referenced_folio or rwc.referenced > 1:
            return FOLIOREF_ACTIVATE
        return FOLIOREF_KEEP
    return FOLIOREF_RECLAIM


async def shrink_folio_list(k: Kernel, cur: Current, folio_list: list[Folio], ignore_references: bool) -> int:
    """Reclaim what can be of the isolated folios of ``folio_list`` (each holding the isolation's
    reference, which this puts back with the folio, on a list or freed). Returns the folios freed.
    Takes each folio lock (trylock), then what the rmap walks take."""
    lruvec = k.lruvec
    si = k.swap
    stats = k.stats
    sched = k.sched
    nr_reclaimed = 0
    work = 0
    done = 0  # the folios handled, each back on a list or freed
    try:
        for folio in folio_list:
            work += 1
            if work >= RESCHED_WORK:
                work = 0
                await cond_resched()
            stats["reclaim_scanned"] += 1
            lock = folio.lock
            assert lock is not None
            if not lock.trylock(cur):
                folio_putback_lru(lruvec, folio)  # keep
                folio_put(k, folio)
                done += 1
                continue
            if sched.active: await sched.point("reclaim:folio-locked")
            activate = False
            tail = False
            freed = False
            if not ignore_references:
                references = await folio_check_references(k, cur, folio)
            else:
                references = FOLIOREF_RECLAIM
            if references == FOLIOREF_RECLAIM and not folio.swapcache and folio_maybe_dma_pinned(folio):
                references = FOLIOREF_KEEP  # never put a pinned page into the swap cache
            if references == FOLIOREF_RECLAIM and isinstance(folio, LargeFolio):
                # The swap device takes no large folio: split it, the other pages joining the
                # list (split_folio_to_list), and go on with the head.
                try:
                    folio = await split_folio(k, cur, folio, folio_list, pinned=False)
                except MmError:
                    references = FOLIOREF_ACTIVATE
                else:
                    lock = folio.lock
                    assert lock is not None
                    stats["reclaim_thp_split"] += 1
            if references == FOLIOREF_ACTIVATE:
                activate = True
            elif references == FOLIOREF_RECLAIM and not folio.mapcount and not folio.swapcache:
                freed = folio.refcount == 1  # a split left it mapped nowhere (a zero page now)
            elif references == FOLIOREF_RECLAIM:
                if not folio.swapcache:
                    if folio_alloc_swap(k, cur, si, folio):
                        activate = True  # no slot: as with no swap, the folio stays and is activated
                    else:
                        folio.dirty = True  # folio_mark_dirty: the slot holds nothing yet
                if not activate and folio.mapcount and not await try_to_unmap(k, cur, folio):
                    activate = True  # still mapped (mlocked)
                if not activate:
                    if folio.dirty:
                        swap_writepage(k, folio)
                        tail = True  # written: rotated to the old end once the write ends
                    elif folio.refcount == 2:  # __remove_mapping: only the cache's and ours
                        swap_cache_del_folio(k, si, folio)
                        freed = True
            lock.unlock(cur)
            if freed:
                nr_reclaimed += 1
                stats["reclaim_freed"] += 1
            else:
                folio_putback_lru(lruvec, folio, active=activate, tail=tail)
                if activate:
                    stats["reclaim_activated"] += 1
            folio_put(k, folio)  # the isolation's reference: frees a reclaimed folio
            done += 1
    finally:
        for folio in folio_list[done:]:  # failed part-way (a detector's Deadlock): the rest go back
            folio_putback_lru(lruvec, folio)
            folio_put(k, folio)
    return nr_reclaimed


async def reclaim_pages(k: Kernel, cur: Current, folio_list: list[Folio]) -> int:
    """MADV_PAGEOUT's reclaim of the folios it isolated: one pass, references ignored."""
    return await shrink_folio_list(k, cur, folio_list, ignore_references=True)


def isolate_lru_folios(k: Kernel, lru: int, nr_to_scan: int) -> list[Folio]:
    """Up to ``nr_to_scan`` folios from the old end of list ``lru``, isolated."""
    folios = list(islice(k.lruvec.lists[lru], nr_to_scan))
    for folio in folios:
        folio_isolate_lru(k, folio)
    return folios


async def shrink_active_list(k: Kernel, cur: Current, nr_to_scan: int) -> None:
    """Age the active list: each folio taken from its old end is walked with folio_referenced
    without its folio lock (clearing the young bits it finds) and deactivated, an anonymous one
    whatever the walk found."""
    folios = isolate_lru_folios(k, LRU_ACTIVE_ANON, nr_to_scan)
    lruvec = k.lruvec
    done = 0
    try:
        for folio in folios:
            if folio.mapcount:
                await k.ops.folio_referenced(k, cur, folio, try_lock=True)
            k.stats["reclaim_deactivated"] += 1
            folio_putback_lru(lruvec, folio)
            folio_put(k, folio)
            done += 1
    finally:
        for folio in folios[done:]:  # failed part-way: the rest go back where they were
            folio_putback_lru(lruvec, folio, active=True)
            folio_put(k, folio)


async def shrink_inactive_list(k: Kernel, cur: Current, nr_to_scan: int, nr_to_reclaim: int) -> int:
    """Reclaim from the inactive list's old end, SWAP_CLUSTER_MAX folios at a time (fewer when
    less is left to free, so that no more than ``nr_to_reclaim`` are), until ``nr_to_scan`` were
    scanned or ``nr_to_reclaim`` freed."""
    reclaimed = 0
    while nr_to_scan > 0 and reclaimed < nr_to_reclaim:
        # At most what is left to reclaim: a batch frees no more than it isolates.
        folios = isolate_lru_folios(k, LRU_INACTIVE_ANON, min(nr_to_scan, SWAP_CLUSTER_MAX, nr_to_reclaim - reclaimed))
        if not folios:
            break
        nr_to_scan -= len(folios)
        reclaimed += await shrink_folio_list(k, cur, folios, ignore_references=False)
    return reclaimed


def inactive_is_low(k: Kernel) -> bool:
    """The inactive list is smaller than the active one (an inactive ratio of 1: under 1 GiB)."""
    lists = k.lruvec.lists
    return len(lists[LRU_INACTIVE_ANON]) < len(lists[LRU_ACTIVE_ANON])


async def deferred_split_scan(k: Kernel, cur: Current, nr_to_scan: int) -> int:
    """The deferred split shrinker (mm/huge_memory.c): split up to ``nr_to_scan`` of the large
    folios queued as mapped in part, each trylocked (a contended or unsplittable one stays
    queued), so that their unmapped pages are freed. Returns the pages freed."""
    queue = k.deferred_split_queue
    freed = 0
    for folio in list(islice(queue, nr_to_scan)):
        lock = folio.lock
        assert lock is not None
        if not lock.trylock(cur):
            continue
        folio_get(k, cur, folio)  # folio_try_get: its LRU place keeps it above zero
        before = k.folio_pages_live
        try:
            head = await split_folio(k, cur, folio)
        except MmError:
            lock.unlock(cur)
            folio_put(k, folio, cur)
            continue
        head_lock = head.lock
        assert head_lock is not None
        head_lock.unlock(cur)
        folio_put(k, head, cur)
        freed += before - k.folio_pages_live  # the unmapped pages (and the zero-filled ones)
        k.stats["thp_deferred_split"] += 1
    return freed


async def shrink_lruvec(k: Kernel, cur: Current, nr_to_reclaim: int) -> int:
    """Reclaim up to ``nr_to_reclaim`` folios (at least one pass), from DEF_PRIORITY down to 0;
    each pass ages the active list when the inactive one is low, then shrinks the inactive one.
    The deferred split queue's shrinker runs first (shrink_slab), its freed pages counted with
    the folios. Returns the folios freed. Without swap only the shrinker frees anything: an
    anonymous folio has nowhere to go (can_reclaim_anon_pages)."""
    reclaimed = await deferred_split_scan(k, cur, SWAP_CLUSTER_MAX) if k.deferred_split_queue else 0
    if not k.swap.pages:
        return reclaimed
    lists = k.lruvec.lists
    for priority in range(DEF_PRIORITY, -1, -1):
        if inactive_is_low(k):
            await shrink_active_list(k, cur, max(len(lists[LRU_ACTIVE_ANON]) >> priority, 1))
        reclaimed += await shrink_inactive_list(k, cur, len(lists[LRU_INACTIVE_ANON]) >> priority,
                                                nr_to_reclaim - reclaimed)
        if reclaimed >= nr_to_reclaim:
            break
    k.stats["reclaim_runs"] += 1
    return reclaimed


async def try_to_free_mem_cgroup_pages(k: Kernel, cur: Current, nr_pages: int) -> int:
    """memcg reclaim after a failed charge: at least SWAP_CLUSTER_MAX folios. Returns the folios freed."""
    k.stats["reclaim_memcg"] += 1
    return await shrink_lruvec(k, cur, max(nr_pages, SWAP_CLUSTER_MAX))


async def mem_cgroup_charge(k: Kernel, cur: Current, nbytes: int) -> None:
    """A charge of ``nbytes`` that failed, again (try_charge_memcg's slow path): reclaim and retry,
    up to MAX_RECLAIM_RETRIES times; ENOMEM (MemoryLimitExceeded) once reclaim frees nothing.
    Expects no PTL and no anon_vma lock held (reclaim takes them); a folio charge's callers hold
    at most the mmap_lock or the VMA's lock, for read, as the kernel's direct reclaim may."""
    memcg = k.memcg
    for retries in range(MAX_RECLAIM_RETRIES, -1, -1):
        try:
            memcg.charge(cur, nbytes)
            return
        except MemoryLimitExceeded:
            # Reclaim runs to its end if the faulting call is cancelled meanwhile.
            if not retries or not await uninterruptible(
                lambda: try_to_free_mem_cgroup_pages(k, cur, -(-nbytes // FOLIO_BYTES))
            ):
                raise
