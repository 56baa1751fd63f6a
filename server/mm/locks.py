"""Sleeping locks on asyncio, with the kernel's lock order checked at run time (lockdep).

The kernel's order, outermost first, is kept in ``LOCK_ORDER`` below and nowhere else:

    mmap_lock  ->  VMA lock  ->  folio lock  ->  anon_vma root rwsem  ->  page-table lock (PTL)

Every blocking acquisition is checked against the locks the acquiring task already holds: taking a
lock whose class ranks at or above a held one is a violation, except for the two nestings the
kernel annotates (fork's ``mmap_write_lock_nested`` on the child mm, and a second PTL taken
``spin_lock_nested``, as ``double_pt_lock`` (in address order) and ``copy_pte_range`` do). Trylocks are
exempt from the check, as in lockdep, but what they take counts as held.

Uncontended acquisition never awaits: ``down_read``/``down_write``/``lock`` return True when they got
the lock synchronously, and only a False answer is followed by ``await wait(cur)``. A waiter that is
cancelled leaves the queue, or gives back a lock that was handed to it before it could run.
A wait that ends with the lock granted is recorded, by lock class, in ``LockdepState.waits``.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections import deque
from enum import IntEnum
from time import perf_counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from .detectors import Detectors
    from .sched import Controller
    from .trace import Tracer


class LockClass(IntEnum):
    """Lock classes, ranked outermost (0) to innermost."""

    MMAP_LOCK = 0
    VMA_LOCK = 1
    FOLIO_LOCK = 2
    ANON_VMA = 3
    PTL = 4


#: The one lock-order table: (class, kernel name, which nesting of the same class is allowed).
LOCK_ORDER: tuple[tuple[LockClass, str, str], ...] = (
    (LockClass.MMAP_LOCK, "mm->mmap_lock", "mmap_write_lock_nested (fork: parent, then child)"),
    (LockClass.VMA_LOCK, "vma->vm_lock (per-VMA lock)",
     "down_read_nested (uffd_move_lock: dst VMA, then src VMA, under mmap_lock)"),
    (LockClass.FOLIO_LOCK, "folio lock (PG_locked)", "none"),
    (LockClass.ANON_VMA, "anon_vma->root->rwsem", "none"),
    (LockClass.PTL, "page-table lock", "spin_lock_nested (double_pt_lock by address; copy_pte_range dst, then src)"),
)


#: Upper bounds, in seconds, of the lock-wait histogram's buckets (a last one, +Inf, follows).
LOCK_WAIT_BOUNDS: tuple[float, ...] = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


class LockWaitStats:
    """Time spent waiting for a lock, per lock class: bucket counts over ``LOCK_WAIT_BOUNDS``
    (not cumulative; the last bucket is +Inf), and the sum in seconds. Only waits are recorded:
    an acquisition that does not sleep never reaches here."""

    __slots__ = ("counts", "sums")

    def __init__(self) -> None:
        n = len(LOCK_WAIT_BOUNDS) + 1
        self.counts: list[list[int]] = [[0] * n for _ in LockClass]
        self.sums: list[float] = [0.0] * len(LockClass)

    def observe(self, lock_class: LockClass, seconds: float) -> None:
        self.counts[lock_class][bisect_left(LOCK_WAIT_BOUNDS, seconds)] += 1
        self.sums[lock_class] += seconds

    def snapshot(self, lock_class: LockClass) -> tuple[list[int], float]:
        """Copies of one class's bucket counts and sum (safe to call from another thread)."""
        return list(self.counts[lock_class]), self.sums[lock_class]


class Current:
    """Per-task kernel state (what ``current`` points at): held locks, RCU nesting, a name."""

    __slots__ = ("op", "tag", "held", "rcu_nesting", "waiting", "memcg_stock", "pins")

    def __init__(self, op: str = "task", tag: object = None) -> None:
        self.op = op
        self.tag = tag  # formatted into the name only when one is needed
        self.held: list[_Lock] = []
        #: References a protocol function holds for a while (a walker's anon_vma pin, a mover's
        #: folio and anon_vma): what Kernel.give_back puts back if the call fails.
        self.pins: list[object] = []
        self.rcu_nesting = 0
        self.waiting: _Waiter | None = None
        self.memcg_stock = 0  # bytes reserved for this task's next charges (memcontrol)

    @property
    def name(self) -> str:
        return self.op if self.tag is None else f"{self.op}({self.tag})"

    def __repr__(self) -> str:
        return f"<Current {self.name}>"


class _Waiter:
    """A task queued on a lock: ``write`` True for an exclusive acquisition, False for a shared
    one, None for a wait that takes nothing (Mutex.wait_bit)."""

    __slots__ = ("fut", "cur", "write", "since")

    def __init__(self, fut: asyncio.Future[None], cur: Current, write: bool | None) -> None:
        self.fut = fut
        self.cur = cur
        self.write = write
        self.since = perf_counter()


class LockdepState:
    """Where violations go, and the lock-wait times; shared by all locks of one model instance."""

    __slots__ = ("controller", "detectors", "enabled", "spin", "trace", "waits")

    def __init__(self, detectors: Detectors | None = None, enabled: bool = True) -> None:
        self.detectors = detectors
        self.enabled = enabled
        self.waits = LockWaitStats()
        #: The schedule explorer's controller (sched.Controller), told of every sleep on a lock and
        #: every wake-up; None outside exploration.
        self.controller: Controller | None = None
        #: Told of every acquisition and release (trace.Tracer); None while nobody watches.
        self.trace: Tracer | None = None
        #: spin_lock's contended case where the running task can spin from synchronous code (the
        #: explorer at the hardware's granularity: Kernel.spin_on_sync); None elsewhere.
        self.spin: Callable[[Current, SpinLock], None] | None = None


_lock_seq = 0


class _Lock:
    __slots__ = ("name", "rank", "key", "lockdep", "waiters")

    def __init__(self, name: str, rank: LockClass, lockdep: LockdepState) -> None:
        global _lock_seq
        _lock_seq += 1
        self.name = name
        self.rank = rank
        # Stands in for the lock's address: double_pt_lock orders PTLs by it.
        self.key = _lock_seq
        self.lockdep = lockdep
        # Made on first contention: most locks (one per folio) are never waited for.
        self.waiters: deque[_Waiter] | None = None

    def _might_sleep(self, cur: Current) -> None:
        """might_sleep(): a blocking acquisition inside an RCU read section ("BUG: sleeping
        function called from invalid context")."""
        ld = self.lockdep
        if ld.enabled and ld.detectors is not None:
            ld.detectors.report("might-sleep", task=cur.name, acquiring=self.name, rcu_nesting=cur.rcu_nesting)

    def _check_order(self, cur: Current, nested: bool) -> None:
        """lockdep: a blocking acquisition must rank below every lock already held."""
        rank = self.rank
        for h in cur.held:
            if h.rank >= rank:
                break
        else:
            return
        for h in cur.held:
            if h.rank < rank:
                continue
            if h is self:
                why = "recursive acquisition"
            elif h.rank == rank and nested:
                continue
            elif h.rank == rank:
                why = "same class without a nesting annotation"
            else:
                why = "inverted order"
            ld = self.lockdep
            if ld.detectors is not None:
                ld.detectors.report(
                    "lock-order",
                    task=cur.name,
                    acquiring=self.name,
                    held=h.name,
                    why=why,
                )
            return

    async def wait(self, cur: Current) -> None:
        """Sleep until the acquisition queued by a False answer is granted (cancellation-safe)."""
        w = cur.waiting
        assert w is not None, "wait() without a queued acquisition"
        ctl = self.lockdep.controller
        if ctl is not None:
            if w.fut.done():  # woken before it slept (a bit waiter that let its PTL go first):
                _ = self.waiters  # the release that woke it is read here, as a wake-up would be
            else:
                ctl.blocked(w.fut)
        try:
            await w.fut
        except asyncio.CancelledError:
            if w.fut.done() and not w.fut.cancelled():
                # Granted, but cancelled before running: give it back.
                self._release_granted(w)
            else:
                try:
                    self.waiters.remove(w)  # type: ignore[union-attr]
                except ValueError:
                    pass
                self._wake()
            raise
        finally:
            cur.waiting = None
        self.lockdep.waits.observe(self.rank, perf_counter() - w.since)
        if ctl is not None:  # granted (or, waiting on the bit, woken): runs again only when the explorer picks it
            await ctl.park(f"lock:{self.name}" if w.write is not None else f"woken:{self.name}")

    def _enqueue(self, cur: Current, write: bool | None) -> None:
        fut = asyncio.get_running_loop().create_future()
        w = _Waiter(fut, cur, write)
        if self.waiters is None:
            self.waiters = deque()
        self.waiters.append(w)
        cur.waiting = w

    def _grant(self, w: _Waiter) -> None:
        """Wake ``w``, whose acquisition is now done."""
        w.fut.set_result(None)
        ctl = self.lockdep.controller
        if ctl is not None:
            ctl.woken(w.fut)

    def _release_granted(self, w: _Waiter) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _wake(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class RwSem(_Lock):
    """A fair reader/writer semaphore (``struct rw_semaphore``)."""

    __slots__ = ("readers", "owner")

    def __init__(self, name: str, rank: LockClass, lockdep: LockdepState) -> None:
        super().__init__(name, rank, lockdep)
        self.readers = 0
        self.owner: Current | None = None

    def is_locked(self) -> bool:
        return self.readers > 0 or self.owner is not None

    # -- trylocks: no order check, fail when anyone holds it for write or waits for it
    def down_read_trylock(self, cur: Current) -> bool:
        ok = self.owner is None and not self.waiters
        if ok:
            self.readers += 1
            cur.held.append(self)
        if self.lockdep.trace is not None:
            self.lockdep.trace.lock("down_read_trylock", self, ok)
        return ok

    def down_write_trylock(self, cur: Current) -> bool:
        ok = self.owner is None and self.readers == 0 and not self.waiters
        if ok:
            self.owner = cur
            cur.held.append(self)
        if self.lockdep.trace is not None:
            self.lockdep.trace.lock("down_write_trylock", self, ok)
        return ok

    # -- blocking acquisitions: True if taken now; False means "await self.wait(cur)"
    def down_read(self, cur: Current, nested: bool = False) -> bool:
        if cur.rcu_nesting: self._might_sleep(cur)
        if cur.held and self.lockdep.enabled:
            self._check_order(cur, nested)
        ok = self.owner is None and not self.waiters
        if ok:
            self.readers += 1
            cur.held.append(self)
        else:
            self._enqueue(cur, False)
        if self.lockdep.trace is not None:
            self.lockdep.trace.lock("down_read", self, ok)
        return ok

    def down_write(self, cur: Current, nested: bool = False) -> bool:
        if cur.rcu_nesting: self._might_sleep(cur)
        if cur.held and self.lockdep.enabled:
            self._check_order(cur, nested)
        ok = self.owner is None and self.readers == 0 and not self.waiters
        if ok:
            self.owner = cur
            cur.held.append(self)
        else:
            self._enqueue(cur, True)
        if self.lockdep.trace is not None:
            self.lockdep.trace.lock("down_write", self, ok)
        return ok

    def up_read(self, cur: Current) -> None:
        self.readers -= 1
        cur.held.remove(self)
        if self.lockdep.trace is not None:
            self.lockdep.trace.lock("up_read", self, None)
        if self.readers == 0 and self.waiters:
            self._wake()

    def up_write(self, cur: Current) -> None:
        self.owner = None
        cur.held.remove(self)
        if self.lockdep.trace is not None:
            self.lockdep.trace.lock("up_write", self, None)
        if self.waiters:
            self._wake()

    def _release_granted(self, w: _Waiter) -> None:
        if w.write:
            self.up_write(w.cur)
        else:
            self.up_read(w.cur)

    def _wake(self) -> None:
        """Hand the lock to the head of the queue: one writer, or every reader up to a writer."""
        q = self.waiters
        while q:
            w = q[0]
            if w.fut.done():  # cancelled before it could run: it only has to leave the queue
                q.popleft()
                continue
            if w.write:
                if self.owner is None and self.readers == 0:
                    q.popleft()
                    self.owner = w.cur
                    w.cur.held.append(self)
                    self._grant(w)
                return
            if self.owner is not None:
                return
            q.popleft()
            self.readers += 1
            w.cur.held.append(self)
            self._grant(w)


class Mutex(_Lock):
    """A sleeping lock held by one task: the folio lock, and the PTLs."""

    __slots__ = ("owner",)

    def __init__(self, name: str, rank: LockClass, lockdep: LockdepState) -> None:
        super().__init__(name, rank, lockdep)
        self.owner: Current | None = None

    def is_locked(self) -> bool:
        return self.owner is not None

    def trylock(self, cur: Current) -> bool:
        ok = self.owner is None and not self.waiters
        if ok:
            self.owner = cur
            cur.held.append(self)
        if self.lockdep.trace is not None:
            self.lockdep.trace.lock("trylock", self, ok)
        return ok

    def lock(self, cur: Current, nested: bool = False) -> bool:
        if cur.rcu_nesting: self._might_sleep(cur)
        if cur.held and self.lockdep.enabled:
            self._check_order(cur, nested)
        ok = self.owner is None and not self.waiters
        if ok:
            self.owner = cur
            cur.held.append(self)
        else:
            self._enqueue(cur, True)
        if self.lockdep.trace is not None:
            self.lockdep.trace.lock("lock", self, ok)
        return ok

    def wait_bit(self, cur: Current) -> bool:
        """folio_wait_bit(PG_locked) as migration_entry_wait_on_locked uses it: wait until the lock
        is let go, without taking it. True if it is free now; False means "await self.wait(cur)",
        which returns once a release has woken ``cur`` (the lock may be taken again by then)."""
        if cur.rcu_nesting: self._might_sleep(cur)
        ok = self.owner is None
        if not ok:
            self._enqueue(cur, None)
        if self.lockdep.trace is not None:
            self.lockdep.trace.lock("wait_bit", self, ok)
        return ok

    def unlock(self, cur: Current) -> None:
        self.owner = None
        cur.held.remove(self)
        if self.lockdep.trace is not None:
            self.lockdep.trace.lock("unlock", self, None)
        if self.waiters:
            self._wake()

    def _release_granted(self, w: _Waiter) -> None:
        if w.write is not None:  # a bit waiter was given nothing
            self.unlock(w.cur)

    def _wake(self) -> None:
        """Wake the queue in order up to the first acquisition, which gets the lock: the bit
        waiters before it are only woken (wake_up_page_bit)."""
        q = self.waiters
        while q and self.owner is None:
            w = q.popleft()
            if w.fut.done():  # cancelled before it could run
                continue
            if w.write is None:
                self._grant(w)
                continue
            self.owner = w.cur
            w.cur.held.append(self)
            self._grant(w)


def release_all(cur: Current) -> None:
    """Drop every lock ``cur`` still holds, innermost first (used on cancellation paths)."""
    release_locks(cur, list(cur.held))


def release_locks(cur: Current, locks: list[_Lock]) -> None:
    """Drop ``locks`` (held by ``cur``), innermost first."""
    for lk in reversed(locks):
        if isinstance(lk, RwSem):
            if lk.owner is cur:
                lk.up_write(cur)
            else:
                lk.up_read(cur)
        elif isinstance(lk, Mutex):
            lk.unlock(cur)
        else:
            assert isinstance(lk, SpinLock)
            lk.spin_unlock(cur)


class SpinLock(_Lock):
    """A spinning lock (the PTLs). Nobody sleeps while holding one, so in a single-threaded model a
    spin_lock() always finds it free; finding it taken means a holder slept, which is a bug."""

    __slots__ = ("owner",)

    def __init__(self, name: str, rank: LockClass, lockdep: LockdepState) -> None:
        super().__init__(name, rank, lockdep)
        self.owner: Current | None = None

    def is_locked(self) -> bool:
        return self.owner is not None

    def spin_lock(self, cur: Current, nested: bool = False) -> None:
        if self.lockdep.enabled:
            rank = self.rank
            for h in cur.held:
                if h.rank >= rank:
                    self._check_order(cur, nested)
                    break
        if self.owner is not None:
            if self.lockdep.spin is None:
                raise RuntimeError(f"{cur.name} spins on {self.name}, held by {self.owner.name} across a sleep")
            self.lockdep.spin(cur, self)  # a holder preempted inside its section: spin until it lets go
        self.owner = cur
        cur.held.append(self)
        if self.lockdep.trace is not None:
            self.lockdep.trace.lock("spin_lock", self, None)

    def spin_unlock(self, cur: Current) -> None:
        self.owner = None
        cur.held.remove(self)
        if self.lockdep.trace is not None:
            self.lockdep.trace.lock("spin_unlock", self, None)
