"""RCU read sections and grace periods, and the SLAB_TYPESAFE_BY_RCU anon_vma cache.

Grace periods run one at a time. A grace period that starts snapshots the tasks inside a read
section; it completes when the last of them leaves. The model requests one whenever an object is
freed, as the RCU core does when callbacks are queued, and ``synchronize_rcu`` waits for one.

Freed anon_vmas go back to a type-stable cache and may be handed out again at once, as another
anon_vma: a stale pointer can then see a different, live anon_vma. What is forbidden is touching an
anon_vma while it is free from outside a read section, or once a grace period that began after
the free has completed (the slab page could then be gone).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar

from .locks import Current
from .trace import name as trace_name

if TYPE_CHECKING:
    from .detectors import Detectors
    from .sched import Controller
    from .trace import Tracer


class Rcu:
    def __init__(self, detectors: Detectors | None = None) -> None:
        self.detectors = detectors
        self.gp_started = 0  # grace periods begun
        self.gp_completed = 0  # grace periods ended
        self.readers: set[Current] = set()
        self._holdouts: set[Current] = set()
        self._gp_requested = False
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        #: The schedule explorer's controller (sched.Controller); None outside exploration.
        self.controller: Controller | None = None
        #: Told of read-side entries and exits, and of the cache's frees and reuses (trace.Tracer).
        self.trace: Tracer | None = None

    # -- read side
    def read_lock(self, cur: Current) -> None:
        if cur.rcu_nesting == 0:
            self.readers.add(cur)
            if self.trace is not None:
                self.trace.state("rcu_read_lock")
        cur.rcu_nesting += 1

    def read_unlock(self, cur: Current) -> None:
        cur.rcu_nesting -= 1
        if cur.rcu_nesting == 0:
            self.readers.discard(cur)
            if self.trace is not None:
                self.trace.state("rcu_read_unlock")
            if cur in self._holdouts:
                self._holdouts.discard(cur)
                if not self._holdouts:
                    self._complete_gp()

    @property
    def gp_in_progress(self) -> bool:
        return self.gp_started != self.gp_completed

    # -- update side
    def request_gp(self) -> None:
        """Ask for a grace period to begin after now (as call_rcu does)."""
        if self.gp_in_progress:
            self._gp_requested = True
        else:
            self._start_gp()

    def _start_gp(self) -> None:
        self._gp_requested = False
        self.gp_started += 1
        self._holdouts = set(self.readers)
        if not self._holdouts:
            self._complete_gp()

    def _complete_gp(self) -> None:
        self.gp_completed = self.gp_started
        if self._waiters:
            done = [w for w in self._waiters if w[0] <= self.gp_completed]
            self._waiters = [w for w in self._waiters if w[0] > self.gp_completed]
            for _, fut in done:
                if not fut.done():
                    fut.set_result(None)
                    if self.controller is not None:
                        self.controller.woken(fut)
        if self._gp_requested:
            self._start_gp()

    async def synchronize_rcu(self) -> None:
        """Wait until every read section that began before the call has ended."""
        if self.gp_in_progress:
            self._gp_requested = True  # the running one began too early
            target = self.gp_started + 1
        else:
            self._start_gp()
            target = self.gp_started
        if self.gp_completed >= target:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        ctl = self.controller
        if ctl is not None:
            ctl.blocked(fut)
        await fut
        if ctl is not None:
            await ctl.park("rcu:grace-period")

    # -- use-after-free detector
    def check_access(self, cur: Current, obj: TypesafeObject, what: str) -> None:
        """Report a touch of ``obj`` while it is free and not protected by RCU."""
        if not obj.freed:
            return
        if cur.rcu_nesting == 0:
            why = "outside an RCU read section"
        elif self.gp_completed > obj.free_gp:
            why = "after a grace period that began after the free"
        else:
            return  # type-stable: legal to look, the identity must be rechecked
        if self.detectors is not None:
            self.detectors.report("use-after-free", task=cur.name, object=repr(obj), access=what, why=why)


class TypesafeObject:
    """Base of objects from a SLAB_TYPESAFE_BY_RCU cache: ``freed`` and the GP count at the free."""

    __slots__ = ("freed", "free_gp")

    def __init__(self) -> None:
        self.freed = False
        self.free_gp = 0

    def slab_release(self, poison: TypesafeObject) -> None:
        """The cache lets this free object go: point what it references at ``poison``."""


T = TypeVar("T", bound=TypesafeObject)


#: Free objects a cache keeps for reuse; beyond it the oldest goes back to the allocator.
CACHE_FREE_MAX = 4096


class TypesafeCache(Generic[T]):
    """A kmem_cache with SLAB_TYPESAFE_BY_RCU: freed objects are reused at once, most recent first.

    At most CACHE_FREE_MAX free objects are kept; the oldest beyond it is let go, its pointers
    poisoned (``slab_release``): a stale pointer to it still sees a freed object of the right type,
    and it is left in no reference cycle, so that it is reclaimed at once."""

    def __init__(self, rcu: Rcu, ctor: Callable[[], T]) -> None:
        self.rcu = rcu
        self.ctor = ctor
        self.free: deque[T] = deque()
        #: What the pointers of an object let go of are set to (slab poisoning): freed for good.
        self.poison = ctor()
        self.poison.freed = True
        self.live: set[T] = set()
        self.allocated = 0
        self.reused = 0

    def alloc(self) -> T:
        if self.free:
            obj = self.free.pop()
            obj.freed = False
            self.reused += 1
            if self.rcu.trace is not None:
                self.rcu.trace.state(f"anon_vma_alloc: the cache hands out freed {trace_name(obj)} again")
        else:
            obj = self.ctor()  # the constructor runs only for a new slab object
        self.allocated += 1
        self.live.add(obj)
        return obj

    def release(self, obj: T) -> None:
        assert not obj.freed, "double free"
        if self.rcu.trace is not None:
            self.rcu.trace.state(f"anon_vma_free: {trace_name(obj)} back in the SLAB_TYPESAFE_BY_RCU cache")
        obj.freed = True
        obj.free_gp = self.rcu.gp_started
        self.live.discard(obj)
        if len(self.free) >= CACHE_FREE_MAX:
            self.free.popleft().slab_release(self.poison)
        self.free.append(obj)
        self.rcu.request_gp()
