"""The LRU lists (mm/swap.c): where reclaim finds the folios it may take.

One ``Lruvec`` per model (per shard: a node's lruvec with one memory cgroup) holds the two lists
of anonymous folios, inactive and active, each oldest first. A new anonymous folio goes on the
inactive list (``folio_add_lru``: lru_cache_add_inactive_or_unevictable since 5.9); reclaim moves
folios between the lists (vmscan.py); ``folio_deactivate`` (MADV_COLD) moves one to the inactive
list; a folio leaves its list when it is freed. The lists hold no reference on their folios;
isolation (``folio_isolate_lru``) takes one while reclaim works on a folio off its list.

The kernel first gathers additions in per-CPU batches (folio_batch, drained by lru_add_drain) and
takes ``lruvec->lru_lock`` to change a list; the model changes the lists at once, with no await
in between, so it has neither. MGLRU (lru_gen) is not modelled: the two-list LRU is what 6.18
runs with ``/sys/kernel/mm/lru_gen/enabled`` off.
"""

from __future__ import annotations

from collections import OrderedDict

from .mm_types import Folio

#: Folio.lru: on no list, on the inactive anon list, on the active anon list.
LRU_NONE = 0
LRU_INACTIVE_ANON = 1
LRU_ACTIVE_ANON = 2


class Lruvec:
    """The anon LRU lists: ``lists[LRU_INACTIVE_ANON]`` and ``lists[LRU_ACTIVE_ANON]``, each an
    ordered set of folios, oldest first (the kernel's list tail, where reclaim takes from)."""

    __slots__ = ("lists",)

    def __init__(self) -> None:
        self.lists: tuple[OrderedDict[Folio, None], ...] = (OrderedDict(), OrderedDict(), OrderedDict())

    @property
    def inactive(self) -> OrderedDict[Folio, None]:
        return self.lists[LRU_INACTIVE_ANON]

    @property
    def active(self) -> OrderedDict[Folio, None]:
        return self.lists[LRU_ACTIVE_ANON]

    def __len__(self) -> int:
        return len(self.lists[LRU_INACTIVE_ANON]) + len(self.lists[LRU_ACTIVE_ANON])


def folio_add_lru(lruvec: Lruvec, folio: Folio) -> None:
    """A new anonymous folio goes on the inactive list, newest (lru_cache_add_inactive_or_unevictable)."""
    lruvec.lists[LRU_INACTIVE_ANON][folio] = None
    folio.lru = LRU_INACTIVE_ANON


def lruvec_del_folio(lruvec: Lruvec, folio: Folio) -> None:
    """Take ``folio`` off its list (isolation, or the folio is freed)."""
    if folio.lru:
        del lruvec.lists[folio.lru][folio]
        folio.lru = LRU_NONE


def folio_putback_lru(lruvec: Lruvec, folio: Folio, active: bool = False, tail: bool = False) -> None:
    """Put an isolated folio back: on the active or inactive list, as its newest (or, ``tail``,
    as its oldest: folio_rotate_reclaimable, for a folio whose writeback reclaim started)."""
    lru = LRU_ACTIVE_ANON if active else LRU_INACTIVE_ANON
    lst = lruvec.lists[lru]
    lst[folio] = None
    if tail:
        lst.move_to_end(folio, last=False)
    folio.lru = lru


def folio_deactivate(lruvec: Lruvec, folio: Folio) -> None:
    """MADV_COLD: move a folio on the active list to the inactive list, as its newest
    (lru_deactivate); one already inactive stays where it is."""
    if folio.lru == LRU_ACTIVE_ANON:
        lruvec_del_folio(lruvec, folio)
        folio_putback_lru(lruvec, folio)
