"""The machine-wide state one model instance runs on: protocol variant, RCU, caches, scheduler.

Every protocol function takes this as ``k`` (what the kernel keeps in globals) and the running
task's ``Current`` as ``cur``; it calls the protocol's steps through ``k.ops`` (steps.Ops: the
kernel's functions, with the chosen variants' replacements).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING

from .detectors import Detectors
from .locks import Current, LockClass, LockdepState, Mutex, SpinLock, release_locks
from .memcontrol import MemCgroup
from .mm_types import (
    DEFAULT_MAX_MAP_COUNT,
    FOLIO_BYTES,
    HPAGE_PMD_ORDER,
    PAGE_SHIFT,
    Folio,
    KeyedDict,
    LargeFolio,
    folio_bytes,
)
from .rcu import Rcu, TypesafeCache
from .sched import Controller, Scheduler
from .steps import Ops, Variant, VariantError, resolve
from .swap import Lruvec, lruvec_del_folio
from .swapfile import DEFAULT_SWAP_BYTES, SwapInfo
from .variants import ALL_PROTOCOLS, MUTANTS, PROTOCOLS, RECHECK_FAMILY

if TYPE_CHECKING:
    from .rmap import AnonVma
    from .trace import Tracer

__all__ = [
    "ALL_PROTOCOLS", "MUTANTS", "PROTOCOLS", "RECHECK_FAMILY", "THP_ORDER_POLICIES", "THP_POLICIES", "Deadlock",
    "IdCounter", "Kernel", "Unwind", "Variant", "VariantError", "thp_size_order",
]


#: /sys/kernel/mm/transparent_hugepage/enabled, and each size's hugepages-<size>kB/enabled.
THP_POLICIES = ("always", "madvise", "never")
THP_ORDER_POLICIES = ("always", "inherit", "madvise", "never")


def thp_size_order(size: str) -> int:
    """The order of an mTHP size written as sysfs names it (``64kB``) or as ``64K``, ``2M``."""
    s = size.strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1:], 0)
    if not mult or not s[:-1].isdigit():
        raise ValueError(f"not a THP size: {size!r} (16K, 64K, ..., 2M)")
    nbytes = int(s[:-1]) * mult
    order = nbytes.bit_length() - 1 - PAGE_SHIFT
    if nbytes != 1 << (order + PAGE_SHIFT) or not 2 <= order <= HPAGE_PMD_ORDER:
        raise ValueError(f"not a THP size: {size!r} (a power of two from 16K to 2M)")
    return order


class IdCounter:
    """Hands out 1, 2, 3, ... (an itertools.count that pickles: the explorer snapshots a set-up
    kernel with pickle and restores it for every schedule)."""

    __slots__ = ("next",)

    def __init__(self) -> None:
        self.next = 1

    def __call__(self) -> int:
        n = self.next
        self.next = n + 1
        return n


class Deadlock(RuntimeError):
    """Raised in the task that closes a cycle of spinners (reported as a ``deadlock`` violation)."""


class Unwind:
    """What a function took since it entered, given back if it fails (cancelled at a preemption
    point or a lock sleep, or an error raised through it): its locks, innermost first, and its RCU
    read sections. For a section whose error path must run without them (anon_vma_fork's)::

        with k.unwind(cur):
            ...

    Nothing is done when the section completes: what it holds then is the caller's. Expects the
    locks held at entry still held when it fails."""

    __slots__ = ("k", "cur", "held", "rcu")

    def __init__(self, k: Kernel, cur: Current) -> None:
        self.k = k
        self.cur = cur
        self.held = len(cur.held)
        self.rcu = cur.rcu_nesting

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if et is not None:
            self.k.release(self.cur, self.held, self.rcu)


class Kernel:
    def __init__(
        self,
        protocol: str | Variant = "recheck",
        seed: int = 0,
        preempt: float = 0.0,
        detectors: bool = True,
        max_memory: int | None = None,
        mutant: str | Variant | None = None,
        max_map_count: int = DEFAULT_MAX_MAP_COUNT,
        swap_bytes: int = DEFAULT_SWAP_BYTES,
        thp: str = "madvise",
        thp_orders: dict[int, str] | None = None,
        thp_use_zero_page: bool = True,
    ) -> None:
        #: The protocol (a kernel generation or a user's variant) and the mutant applied to it.
        self.protocol = resolve(protocol, "protocol")
        self.mutant = resolve(mutant, "mutant") if mutant is not None else None
        if self.mutant is not None and self.protocol.name not in self.mutant.applies_to:
            raise VariantError(f"mutant {self.mutant.name!r} applies to {', '.join(self.mutant.applies_to)}, "
                               f"not {self.protocol.name!r}")
        #: The steps this kernel runs (steps.Ops): the defaults with both variants' replacements.
        self.ops = Ops.of(self.protocol, self.mutant)
        design = self.mutant.walkers_hold_folio_lock if self.mutant is not None else None
        #: The design says every rmap walker holds the folio lock (the walk detectors check it).
        self.walkers_hold_folio_lock = bool(self.protocol.walkers_hold_folio_lock if design is None else design)
        #: Who watches the model run (trace.Tracer): the explorer's trace; None otherwise.
        self.trace: Tracer | None = None
        self.detectors = Detectors()
        self.detect = detectors
        self.lockdep = LockdepState(self.detectors if detectors else None, enabled=detectors)
        self.rcu = Rcu(self.detectors if detectors else None)
        self.memcg = MemCgroup(max_memory)
        if max_map_count < 0:
            raise ValueError(f"max_map_count must not be negative, not {max_map_count}")
        #: vm.max_map_count: the VMAs a process may have (mmap, split_vma, munmap, mremap check it).
        self.sysctl_max_map_count = max_map_count
        #: The swap device (swapfile.py; ``swap_bytes`` 0: no usable slot; its slots are charged to
        #: no budget, as memcg charges them to memory.swap) and the LRU lists (swap.py).
        self.swap = SwapInfo(swap_bytes)
        self.lruvec = Lruvec()
        if thp not in THP_POLICIES:
            raise ValueError(f"THP policy must be one of {', '.join(THP_POLICIES)}, not {thp!r}")
        #: The THP policy as sysfs sets it: ``enabled`` (always, madvise, never), each size's own
        #: (order -> always, inherit, madvise, never; an order not named is never) and
        #: ``use_zero_page``. The default is this machine's: madvise, the PMD size inheriting it.
        self.thp_enabled = thp
        self.thp_orders = {HPAGE_PMD_ORDER: "inherit"} if thp_orders is None else dict(thp_orders)
        for order, policy in self.thp_orders.items():
            if not 2 <= order <= HPAGE_PMD_ORDER or policy not in THP_ORDER_POLICIES:
                raise ValueError(f"THP order {order}: {policy!r}")
        self.thp_use_zero_page = thp_use_zero_page
        #: The deferred split queue: large folios mapped in part (deferred_split_folio).
        self.deferred_split_queue: dict[LargeFolio, None] = {}
        #: Tasks inside GUP-fast's lockless walk (gup.py): while there are some, a mover's PTE
        #: clear is a point where one of them may run.
        self.gup_fast_tasks = 0
        self.sched = Scheduler(seed=seed, preempt=preempt)
        from .rmap import AnonVma  # the anon_vma slab needs the lockdep state for its rwsems

        self.anon_vma_cache: TypesafeCache[AnonVma] = TypesafeCache(self.rcu, partial(AnonVma, self.lockdep))
        self._anon_vma_ids = IdCounter()
        self._folio_ids = IdCounter()
        self._vma_ids = IdCounter()
        self.folios_live = 0
        self.folio_pages_live = 0  # the pages of the live folios
        self.vmas_live = 0
        self.stats: Counter[str] = Counter()
        #: UFFDIO_MOVE outcomes: "OK", or the errno's name (EAGAIN for a short move).
        self.move_results: Counter[str] = Counter()
        #: Folios whose (mapping, index) pair is torn: a mover preempted between storing the two
        #: (move_present_ptes) left this pair, which never held together, visible meanwhile; by
        #: folio id (keyed: a walker's look at its own folio's entry is all it reads of it).
        self.torn: KeyedDict[tuple[AnonVma, int]] = KeyedDict()
        #: Tasks spinning on a PTL (spin_on), for the deadlock check.
        self.spinning: dict[Current, SpinLock] = {}
        # What a client can leave asleep, bounded (None: no bound): userfaults in all and per
        # process (handle_userfault), and listeners per userfaultfd (userfaultfd_read_begin).
        self.max_uffd_faults: int | None = None
        self.max_uffd_faults_per_mm: int | None = None
        self.max_uffd_readers: int | None = None
        self.uffd_faults_asleep = 0
        self.uffd_readers = 0
        #: Told True when a task goes to sleep on a userfault or a userfaultfd read and False when
        #: it wakes: the server's admission control, for which a sleeper holds no call slot.
        self.on_uffd_sleep: Callable[[bool], None] | None = None

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        del state["ops"]  # the step table is the variants': made again (once) where it is restored
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self.ops = Ops.of(self.protocol, self.mutant)

    def unwind(self, cur: Current) -> Unwind:
        """What ``cur`` takes from here is given back if the section fails (see Unwind)."""
        return Unwind(self, cur)

    def release(self, cur: Current, held: int, rcu: int) -> None:
        """Drop the locks ``cur`` took after its first ``held`` (innermost first), then leave its
        RCU read sections down to ``rcu`` deep."""
        if len(cur.held) > held:
            release_locks(cur, cur.held[held:])
        while cur.rcu_nesting > rcu:
            self.rcu.read_unlock(cur)

    async def give_back(self, cur: Current) -> None:
        """A system call that failed or was cancelled part-way: give back everything its task still
        holds, innermost first: its locks, its RCU read sections, then its pins (``Current.pins``:
        a walker's anon_vma, a mover's folio and anon_vma), whose put may free. The protocol code
        has no cancellation paths of its own: the task's state says what it holds, and the call's
        boundary (the model's facade) undoes it."""
        self.release(cur, 0, 0)
        if cur.pins:
            from .rmap import unpin_all

            await unpin_all(self, cur, 0)  # anon_vma_free runs to its end, cancelled or not

    def attach_tracer(self, tracer: Tracer | None) -> None:
        """Tell ``tracer`` of every lock operation, marked access, RCU section, cache free and
        reuse, and detector report of this kernel (None: nobody)."""
        self.trace = tracer
        self.lockdep.trace = tracer
        self.rcu.trace = tracer
        self.detectors.trace = tracer

    def attach_controller(self, controller: Controller | None) -> None:
        """Put the schedule explorer's controller in charge of every preemption point, lock sleep
        and grace period of this kernel (None: give them back to the seeded scheduler)."""
        self.sched.controller = controller
        self.sched.active = controller is not None or self.sched.preempt > 0.0
        self.lockdep.controller = controller
        self.lockdep.spin = self.spin_on_sync if controller is not None else None
        self.rcu.controller = controller

    async def spin_on(self, cur: Current, ptl: SpinLock) -> None:
        """spin_lock's contended case: ``ptl`` is held by a task preempted inside its section (at a
        preemption point, which stands for another CPU running). Expects ``ptl`` not held by
        ``cur``; returns when it is free, without taking it (the caller takes it at once). Spins at
        the ``spin:ptl`` point. A cycle of spinners (each holding what the next spins on) is
        reported as a ``deadlock`` and broken by raising Deadlock here."""
        self.spinning[cur] = ptl
        try:
            while ptl.owner is not None:
                self._spin_check(cur, ptl)
                await self.sched.yield_now("spin:ptl")
        finally:
            del self.spinning[cur]

    async def spin_lock(self, cur: Current, ptl: SpinLock, nested: bool = False) -> None:
        """spin_lock(ptl), spinning first (spin_on) while a task preempted inside its section holds it."""
        if ptl.owner is not None:
            await self.spin_on(cur, ptl)
        ptl.spin_lock(cur, nested)

    def spin_on_sync(self, cur: Current, ptl: SpinLock) -> None:
        """spin_on from synchronous code (SpinLock.spin_lock, contended), where the explorer can park
        the running task anywhere (its points at the hardware's granularity); RuntimeError where it
        cannot (a PTL held across a sleep is then a bug of the caller)."""
        ctl = self.sched.controller
        self.spinning[cur] = ptl
        try:
            while (owner := ptl.owner) is not None:
                self._spin_check(cur, ptl)
                if ctl is None or not ctl.park_sync("spin:ptl"):
                    raise RuntimeError(f"{cur.name} spins on {ptl.name}, held by {owner.name} across a sleep")
        finally:
            del self.spinning[cur]

    def _spin_check(self, cur: Current, ptl: SpinLock) -> None:
        """Raise Deadlock (reported) when ``cur``, about to spin on ``ptl``, closes a cycle of spinners."""
        spinning = self.spinning
        owner: Current | None = ptl.owner
        seen = {cur}
        while owner is not None and owner not in seen and owner in spinning:
            seen.add(owner)
            owner = spinning[owner].owner
        if owner is cur:
            if self.detect:
                self.detectors.report(
                    "deadlock", task=cur.name, spins_on=ptl.name,
                    holds=[lk.name for lk in cur.held if isinstance(lk, SpinLock)],
                )
            raise Deadlock(f"{cur.name} spins on {ptl.name} in a cycle of spinning tasks")

    def folio_alloc(self) -> Folio:
        """A new folio; the caller has charged FOLIO_BYTES."""
        fid = self._folio_ids()
        self.folios_live += 1
        self.folio_pages_live += 1
        return Folio(fid, Mutex(f"folio{fid}.lock", LockClass.FOLIO_LOCK, self.lockdep))

    def folio_alloc_large(self, order: int) -> LargeFolio:
        """A new zero-filled folio of ``order`` (vma_alloc_anon_folio_pmd, alloc_anon_folio); the
        caller has charged folio_bytes(order)."""
        fid = self._folio_ids()
        self.folios_live += 1
        self.folio_pages_live += 1 << order
        return LargeFolio(fid, Mutex(f"folio{fid}.lock", LockClass.FOLIO_LOCK, self.lockdep), order)

    def folio_free(self, folio: Folio) -> None:
        """The last reference went: the mapping is reset only now (invariant I3)."""
        assert not folio.swapcache, f"folio {folio.id} freed while in the swap cache"
        if folio.lru:
            lruvec_del_folio(self.lruvec, folio)
        folio.freed = True
        folio.mapping = None
        self.folios_live -= 1
        self.folio_pages_live -= folio.nr_pages
        if isinstance(folio, LargeFolio):
            self.deferred_split_queue.pop(folio, None)
            folio.deferred_split = False
            self.memcg.uncharge(folio_bytes(folio.order))
        else:
            folio.exclusive = False
            self.memcg.uncharge(FOLIO_BYTES)

    def next_vma_id(self) -> int:
        return self._vma_ids()

    def next_anon_vma_id(self) -> int:
        return self._anon_vma_ids()
