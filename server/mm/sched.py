"""The seeded scheduler behind the named preemption points.

A preemption point marks a place where another CPU could act. At each point the scheduler draws
from its own ``random.Random(seed)`` whether the running task yields, and for how many turns of the
event loop. Everything else in a model run is deterministic (one event loop, FIFO wake-ups, no
timers or I/O), so the same seed and the same workload give the same interleaving and result.

Hot paths test ``sched.active`` first, so a scheduler with nothing armed costs one attribute load.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

T = TypeVar("T")

#: The named points. Each is placed in the function its name gives.
POINTS = (
    "walk:after-mapping-read",  # folio_lock_anon_vma_read: between READ_ONCE(mapping) and reading its root
    "walk:after-root-read",  # folio_lock_anon_vma_read: between READ_ONCE(anon_vma->root) and its down_read_trylock
    "walk:after-trylock",  # folio_lock_anon_vma_read: the root trylocked, before the fast path's mapping recheck
    "walk:slow-before-lock",  # folio_lock_anon_vma_read slow path: ref taken, RCU dropped, before sleeping
    "walk:slow-after-lock",  # folio_lock_anon_vma_read slow path: the root read-locked, before the recheck
    "walk:after-index-read",  # rmap_walk_anon: between reading folio->index (pgoff) and the VMA loop
    "walk:per-vma",  # rmap_walk_anon: between two VMAs of one walk
    "move:after-folio-lock",  # move_pages_pte: between the folio lock and the anon_vma lock
    "move:anon-vma-locked",  # move_pages_pte: inside the src anon_vma write-locked section
    "move:between-ptls",  # double_pt_lock: the first PTL taken, before the nested one
    "move:after-mapping-store",  # move_present_ptes: folio->mapping stored, not folio->index
    "move:between-pages",  # move_pages: between two steps (cond_resched)
    "spin:move-retry",  # move_pages: a step returned -EAGAIN, retried after cond_resched
    "fork:after-anon-vma-fork",  # dup_mmap: between linking anon_vma chains and copying PTEs
    "fault:before-pte-lock",  # handle_mm_fault: after anon_vma_prepare, before taking the PTL
    "swapin:after-lookup",  # do_swap_page: the swap cache's folio referenced, not yet locked
    "move:swap-folio-locked",  # move_pages_pte: a swap PTE's swap-cache folio locked, before the PTLs
    "move:pte-cleared",  # move_present_ptes: the src PTE cleared, before the second pin check (GUP-fast about)
    "move:pmd-cleared",  # move_pages_huge_pmd: the src PMD cleared, before the second pin check (GUP-fast about)
    "gup:pte-read",  # gup_fast: the PTE (or huge PMD) read locklessly, the folio not yet pinned
    "gup:grabbed",  # gup_fast: the folio pinned, before the PTE is read again
    "reclaim:folio-locked",  # shrink_folio_list: the folio trylocked, before its references and unmap
    "split:unmapped",  # __folio_split: every mapping a migration entry, before the count is frozen
    "exit:between-vmas",  # exit_mmap: between tearing down two VMAs
    "free:before-anon-vma-free",  # anon_vma_free: refcount zero, before the root handshake and the slab free
    "free:after-anon-vma-free",  # anon_vma_free: back in the SLAB_TYPESAFE_BY_RCU cache, reusable at once
    "alloc:before-anon-vma-reuse",  # anon_vma_alloc: the cache is about to hand a freed anon_vma out again
    "spin:ptl",  # spin_lock on a PTL held by a task preempted inside its section: spin, others run
)


#: Units of work (PTEs, VMAs, anon_vma chain links, pages audited) a loop whose length a client
#: controls may do before it lets other tasks run (cond_resched). A unit costs about a microsecond,
#: so a slice stays well under a millisecond.
RESCHED_WORK = 256
#: Turns of the event loop cond_resched gives. grpc.aio takes in a new call of a method only after
#: the previous one has gone round the loop about five times; one turn per slice would let calls
#: queue in gRPC core behind a long operation (and be cancelled there after
#: grpc.server_max_unrequested_time_in_server).
RESCHED_TURNS = 8


async def cond_resched() -> None:
    """Let the other ready tasks and gRPC's intake run (the kernel's cond_resched, between chunks of
    work). Callers hold no spinlock (PTL) when they call it; sleeping locks may be held, as in the
    kernel."""
    for _ in range(RESCHED_TURNS):
        await asyncio.sleep(0)


class Breakpoint:
    """A pause at a named point: the next task to reach it stops there until ``release()``.

    ``reached`` is set once a task is parked; tests use it to script an exact interleaving
    (for instance, park a walker after it read ``folio->mapping``, run a move, release it).
    ``abandoned`` is set if the parked task is cancelled there (a client's cancel has arrived).
    """

    def __init__(self, point: str) -> None:
        self.point = point
        self.reached = asyncio.Event()
        #: Set when the parked task was cancelled instead of released (its caller went away).
        self.abandoned = asyncio.Event()
        self._go = asyncio.Event()

    def release(self) -> None:
        self._go.set()

    async def wait_reached(self) -> None:
        await self.reached.wait()

    async def wait_abandoned(self) -> None:
        await self.abandoned.wait()


class Controller(Protocol):
    """Who decides, under schedule exploration (tools/explore.py), which task runs next. Every
    preemption point, every sleep on a lock or a grace period and every wake-up is reported to
    it; the running task parks at each point until the controller picks it again."""

    async def park(self, point: str) -> None: ...

    def wants(self, point: str) -> bool: ...  # whether the running task parks at ``point`` now

    def blocked(self, key: object) -> None: ...  # the running task sleeps until ``key`` is done

    def woken(self, key: object) -> None: ...  # the task sleeping on ``key`` may run again

    # Park at ``point`` from synchronous code (a marked access, a lock operation, a spin_lock):
    # False when the running task cannot stop there (it runs at the named points only).
    def park_sync(self, point: str) -> bool: ...


class Scheduler:
    def __init__(self, seed: int = 0, preempt: float = 0.0, max_burst: int = 4) -> None:
        if not 0.0 <= preempt <= 1.0:
            raise ValueError("preempt probability must be within [0, 1]")
        if max_burst < 1:
            raise ValueError("max_burst must be at least 1")
        self.seed = seed
        self.preempt = preempt
        self.max_burst = max_burst
        self._rng: random.Random | None = None  # made on first use (a model pickles lighter without)
        self.hits: Counter[str] = Counter()
        self.yields: Counter[str] = Counter()
        self._breakpoints: dict[str, list[Breakpoint]] = {}
        #: The explorer's controller: every point is then a choice of the next task.
        self.controller: Controller | None = None
        #: True when any point may yield; hot paths test only this.
        self.active = preempt > 0.0

    @property
    def rng(self) -> random.Random:
        if self._rng is None:
            self._rng = random.Random(self.seed)
        return self._rng

    def pause_at(self, point: str) -> Breakpoint:
        """Arm a one-shot breakpoint at ``point`` (one of POINTS)."""
        if point not in POINTS:
            raise ValueError(f"unknown preemption point {point!r}")
        bp = Breakpoint(point)
        self._breakpoints.setdefault(point, []).append(bp)
        self.active = True
        return bp

    def should_preempt(self, point: str) -> bool:
        """Decide whether the task at ``point`` yields; call only when ``self.active``."""
        self.hits[point] += 1
        if self.controller is not None:
            return self.controller.wants(point)
        if self._breakpoints.get(point):
            return True
        if self.preempt and self.rng.random() < self.preempt:
            self.yields[point] += 1
            return True
        return False

    async def point(self, point: str) -> bool:
        """A preemption point: other CPUs may act here. Call only when ``self.active``::

            if sched.active: await sched.point("walk:per-vma")

        Returns whether other tasks may have run (a retry loop revalidates then)."""
        ctl = self.controller
        if ctl is not None:  # the explorer's choice (should_preempt and yield_now, inline)
            self.hits[point] += 1
            if ctl.wants(point):
                await ctl.park(point)
                return True
            return False
        if self.should_preempt(point):
            await self.yield_now(point)
            return True
        return False

    async def point_unkillable(self, point: str) -> None:
        """A preemption point where the task must not stop half-way (inside a spinlocked section, in
        the middle of a free): a cancellation that arrives here is delivered at the task's next
        cancellation point instead. Call only when ``self.active``."""
        if self.should_preempt(point):
            try:
                await self.yield_now(point)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                assert task is not None
                task.cancel()

    async def yield_now(self, point: str) -> None:
        """Let other tasks run: until released at an armed breakpoint, else for a seeded number
        of event-loop turns."""
        if self.controller is not None:
            await self.controller.park(point)
            return
        bps = self._breakpoints.get(point)
        if bps:
            bp = bps.pop(0)
            if not bps:
                del self._breakpoints[point]
            self.active = self.preempt > 0.0 or bool(self._breakpoints)
            bp.reached.set()
            try:
                await bp._go.wait()
            except asyncio.CancelledError:
                bp.abandoned.set()
                raise
            return
        for _ in range(self.rng.randint(1, self.max_burst)):
            await asyncio.sleep(0)


async def uninterruptible(fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn()`` to completion even if the caller is cancelled (TASK_UNINTERRUPTIBLE), then
    deliver the cancellation. Used for teardown that must not stop half-way."""
    task = asyncio.ensure_future(fn())
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError()
    return result
