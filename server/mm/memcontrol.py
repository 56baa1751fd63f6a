"""Memory accounting (mm/memcontrol.c): one budget for everything the model grows with.

Every object a client can make the model allocate (PTEs, page tables, VMAs, anon_vmas, anon_vma
chains, folios, mms) is charged to one ``MemCgroup`` when it is made and uncharged when it goes,
as memcg charges page tables and slab objects. A charge that would pass the limit fails with
ENOMEM before anything changes.

An operation that makes several objects and must not stop half-way (splitting a VMA with its
chain, forking an anon_vma) first *reserves* its worst case: the bytes go into the task's stock
(``Current.memcg_stock``, like memcg's per-cpu stock) and the charges that follow take from it
and cannot fail. The system-call layer drains what is left when the call returns.

What each object is charged is its footprint, kept beside the types in ``mm_types`` (``*_BYTES``).
"""

from __future__ import annotations

import errno

from .locks import Current
from .mm_types import MmError

#: The most of the budget that calls in progress may hold (charge_inflight).
INFLIGHT_SHARE = 0.5


class MemoryLimitExceeded(MmError):
    """ENOMEM because the memory budget (``--max-memory``) would be exceeded."""

    def __init__(self, limit: int, wanted: int) -> None:
        super().__init__(errno.ENOMEM, f"memory limit of {limit} bytes reached ({wanted} more bytes needed)")
        self.limit = limit


class MemCgroup:
    """The budget: ``usage`` bytes charged of ``limit`` (None: no limit)."""

    __slots__ = ("limit", "usage", "peak", "failcnt", "inflight")

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.usage = 0
        self.peak = 0
        self.failcnt = 0
        #: Of ``usage``, what the calls in progress hold outside the model (charge_inflight):
        #: their decoded requests, and what a call waiting in the server costs.
        self.inflight = 0

    def _charge_usage(self, nbytes: int, nofail: bool) -> None:
        usage = self.usage + nbytes
        if self.limit is not None and usage > self.limit and not nofail:
            self.failcnt += 1
            raise MemoryLimitExceeded(self.limit, nbytes)
        self.usage = usage
        if usage > self.peak:
            self.peak = usage

    def charge(self, cur: Current, nbytes: int, nofail: bool = False) -> None:
        """Charge ``nbytes``, from the task's stock first. Raises ENOMEM (MemoryLimitExceeded)
        with nothing charged, unless ``nofail`` (__GFP_NOFAIL: a transient that is given back
        within the same operation)."""
        stock = cur.memcg_stock
        if stock:
            if stock >= nbytes:
                cur.memcg_stock = stock - nbytes
                return
            self._charge_usage(nbytes - stock, nofail)
            cur.memcg_stock = 0
            return
        self._charge_usage(nbytes, nofail)

    def reserve(self, cur: Current, nbytes: int) -> None:
        """Top the task's stock up to ``nbytes`` so that the next charges up to that amount cannot
        fail. Raises ENOMEM (nothing reserved) when the budget has no room."""
        short = nbytes - cur.memcg_stock
        if short > 0:
            self._charge_usage(short, False)
            cur.memcg_stock = nbytes

    def drain(self, cur: Current) -> None:
        """Give back what is left of the task's stock (at the end of a system call)."""
        if cur.memcg_stock:
            self.usage -= cur.memcg_stock
            cur.memcg_stock = 0

    def uncharge(self, nbytes: int) -> None:
        self.usage -= nbytes

    def charge_inflight(self, nbytes: int, nofail: bool = False) -> None:
        """Charge what a call in progress holds outside the model (its request, its waiting), so
        that pending work counts against the same budget as the objects it may create; at most
        INFLIGHT_SHARE of the budget, so that the calls that resolve pending work (a fault
        handler's UFFDIO_COPY) still find room for what they make. Raises ENOMEM
        (MemoryLimitExceeded) with nothing charged, unless ``nofail``."""
        limit = self.limit
        if limit is not None and not nofail and self.inflight + nbytes > limit * INFLIGHT_SHARE:
            self.failcnt += 1
            raise MemoryLimitExceeded(limit, nbytes)
        self._charge_usage(nbytes, nofail)
        self.inflight += nbytes

    def uncharge_inflight(self, nbytes: int) -> None:
        self.usage -= nbytes
        self.inflight -= nbytes
