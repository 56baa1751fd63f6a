"""The machine-wide state one model instance runs on: protocol variant, RCU, caches, scheduler.

Every protocol function takes this as ``k`` (what the kernel keeps in globals) and the running
task's ``Current`` as ``cur``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING

from .detectors import Detectors
from .locks import Current, LockClass, LockdepState, Mutex, SpinLock
from .memcontrol import MemCgroup
from .mm_types import DEFAULT_MAX_MAP_COUNT, FOLIO_BYTES, Folio
from .rcu import Rcu, TypesafeCache
from .sched import Controller, Scheduler

if TYPE_CHECKING:
    from .rmap import AnonVma


@dataclass(frozen=True)
class Protocol:
    """What one kernel generation does in folio_lock_anon_vma_read and move_pages_pte.

    The fields after the first five are what the mutants (``MUTANTS``) change; every kernel
    generation does all of them. The detectors read only the first five (the design)."""

    name: str
    recheck_fast: bool  # recheck folio->mapping after the trylock fast path
    recheck_slow: bool  # recheck folio->mapping after sleeping on the root rwsem
    walker_folio_lock: bool  # every rmap walker holds the folio lock (~6.19)
    mover_anon_vma_lock: bool  # UFFDIO_MOVE write-locks the src folio's anon_vma root
    mover_folio_lock: bool = True  # UFFDIO_MOVE locks the src folio
    walker_anon_vma_get: bool = True  # the slow path pins the anon_vma before it sleeps
    walker_root_in_rcu: bool = True  # READ_ONCE(anon_vma->root) and the trylock inside the RCU section
    walker_locks_folio: bool = True  # under folio-lock, the walker does take the folio lock
    fork_root_lock: bool = True  # anon_vma_clone / anon_vma_fork write-lock the root
    free_root_handshake: bool = True  # anon_vma_free write-locks a locked root once before freeing
    move_mapping_first: bool = True  # move_present_ptes stores folio->mapping, then folio->index
    ptl_address_order: bool = True  # double_pt_lock takes the lower-addressed PTL first
    mutant: str | None = None  # the mutant applied, if any


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        # 6.8 to 6.18: the seed as merged, recheck in both paths.
        Protocol("recheck", True, True, False, True),
        # The seed's v2, before review: the slow path only.
        Protocol("recheck-slow-only", False, True, False, True),
        # Before the seed.
        Protocol("no-recheck", False, False, False, True),
        # ~6.19: walkers hold the folio lock; the mover takes no anon_vma lock.
        Protocol("folio-lock", False, False, True, False),
    )
}


RECHECK_FAMILY = ("recheck", "recheck-slow-only", "no-recheck")
ALL_PROTOCOLS = (*RECHECK_FAMILY, "folio-lock")


@dataclass(frozen=True)
class Mutant:
    """A named one-line deviation from the kernel, to prove that the detectors see what it breaks.

    ``changes`` are the Protocol fields it sets; it may be applied to each of ``protocols`` (its
    killing scenario, in tests/test_mutants.py and docs/mutants.md, runs under the first).
    ``equivalent``: no scenario the model can express tells it from the kernel (argued in
    docs/mutants.md); the mutation score leaves it out."""

    name: str
    protocols: tuple[str, ...]
    changes: tuple[tuple[str, bool], ...]
    kernel: str  # the kernel line it changes
    failure: str  # what it should produce
    equivalent: bool = False


MUTANTS: dict[str, Mutant] = {
    m.name: m
    for m in (
        Mutant(
            "no-recheck-fast", ("recheck",), (("recheck_fast", False),),
            "folio_lock_anon_vma_read, after down_read_trylock succeeds: "
            "`if (unlikely((unsigned long)READ_ONCE(folio->mapping) != anon_mapping))` removed",
            "wrong-root-walk: the fast-path race (a move completes between the walker's mapping read and its trylock)",
        ),
        Mutant(
            "no-recheck-slow", ("recheck", "recheck-slow-only"), (("recheck_slow", False),),
            "folio_lock_anon_vma_read, after anon_vma_lock_read returns: the same mapping recheck removed",
            "wrong-root-walk: the slow-path race (the walker sleeps on the old root while the mover moves the folio)",
        ),
        Mutant(
            "mover-no-root-lock", RECHECK_FAMILY, (("mover_anon_vma_lock", False),),
            "move_pages_pte: `anon_vma_trylock_write(src_anon_vma)` / `anon_vma_lock_write(src_anon_vma)` removed",
            "wrong-root-walk and mapping-changed-during-walk: the folio moves under a walker that holds the old root",
        ),
        Mutant(
            "mover-no-folio-lock", ("folio-lock", *RECHECK_FAMILY), (("mover_folio_lock", False),),
            "move_pages_pte: `folio_trylock(src_folio)` / `folio_lock(src_folio)` removed",
            "under folio-lock: wrong-root-walk and mapping-changed-during-walk (the folio moves under a walker "
            "that holds its lock); under the recheck family no scenario tells it apart (docs/mutants.md)",
        ),
        Mutant(
            "walker-no-anon-vma-get", ALL_PROTOCOLS, (("walker_anon_vma_get", False),),
            "folio_lock_anon_vma_read slow path: `if (!atomic_inc_not_zero(&anon_vma->refcount))` "
            "(and the put_anon_vma / atomic_dec_and_test that drop it) removed",
            "use-after-free: the anon_vma is freed while the walker sleeps unpinned, and anon_vma_lock_read "
            "reads its root outside RCU",
        ),
        Mutant(
            "walker-root-read-outside-rcu", ALL_PROTOCOLS, (("walker_root_in_rcu", False),),
            "folio_lock_anon_vma_read: `rcu_read_unlock()` moved above `root_anon_vma = READ_ONCE(anon_vma->root)`",
            "use-after-free: the anon_vma read from folio->mapping is freed before the walker reads its root",
        ),
        Mutant(
            "fork-no-root-lock", ALL_PROTOCOLS, (("fork_root_lock", False),),
            "anon_vma_clone / anon_vma_fork: `anon_vma_lock_write(anon_vma)` (lock_anon_vma_root) removed",
            "tree-changed-during-walk: fork links the child's VMA into a tree whose root a walker holds",
        ),
        Mutant(
            "free-no-root-handshake", ALL_PROTOCOLS, (("free_root_handshake", False),),
            "anon_vma_free: `if (rwsem_is_locked(&anon_vma->root->rwsem)) { anon_vma_lock_write(anon_vma); "
            "anon_vma_unlock_write(anon_vma); }` removed",
            "none in the model: it orders memory, which the model (sequentially consistent) does not reorder",
            equivalent=True,
        ),
        Mutant(
            "move-index-before-mapping", ALL_PROTOCOLS, (("move_mapping_first", False),),
            "move_present_ptes: `src_folio->index = linear_page_index(dst_vma, dst_addr)` moved above "
            "`folio_move_anon_rmap(src_folio, dst_vma)`",
            "none: the torn pair (old mapping, new index) is seen only under the old root, which the mover "
            "holds; the residual-index-window finding disappears instead",
            equivalent=True,
        ),
        Mutant(
            "ptl-no-address-order", ALL_PROTOCOLS, (("ptl_address_order", False),),
            "double_pt_lock: `if (ptl1 > ptl2) swap(ptl1, ptl2);` removed",
            "deadlock: two moves in opposite directions between two page tables each hold one PTL and spin on "
            "the other",
        ),
        Mutant(
            "folio-lock-walker-skips-lock", ("folio-lock",), (("walker_locks_folio", False),),
            "folio_referenced (~6.19, every walker locks the folio): `folio_lock(folio)` skipped",
            "wrong-root-walk: the walker walks without the folio lock, and the tree the folio left",
        ),
    )
}


def protocol_with_mutant(protocol: str, mutant: str | None = None) -> Protocol:
    """The protocol ``protocol`` with ``mutant`` (a MUTANTS name) applied. ValueError if either is
    unknown, or if the mutant does not apply to the protocol."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; one of {', '.join(PROTOCOLS)}")
    proto = PROTOCOLS[protocol]
    if mutant is None:
        return proto
    m = MUTANTS.get(mutant)
    if m is None:
        raise ValueError(f"unknown mutant {mutant!r}; one of {', '.join(MUTANTS)}")
    if protocol not in m.protocols:
        raise ValueError(f"mutant {mutant!r} applies to {', '.join(m.protocols)}, not {protocol!r}")
    return replace(proto, mutant=mutant, **dict(m.changes))  # type: ignore[arg-type]  # the bool fields of Protocol


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


class Kernel:
    def __init__(
        self,
        protocol: str = "recheck",
        seed: int = 0,
        preempt: float = 0.0,
        detectors: bool = True,
        max_memory: int | None = None,
        mutant: str | None = None,
        max_map_count: int = DEFAULT_MAX_MAP_COUNT,
    ) -> None:
        self.protocol = protocol_with_mutant(protocol, mutant)
        self.mutant = MUTANTS[mutant] if mutant is not None else None
        self.detectors = Detectors()
        self.detect = detectors
        self.lockdep = LockdepState(self.detectors if detectors else None, enabled=detectors)
        self.rcu = Rcu(self.detectors if detectors else None)
        self.memcg = MemCgroup(max_memory)
        if max_map_count < 0:
            raise ValueError(f"max_map_count must not be negative, not {max_map_count}")
        #: vm.max_map_count: the VMAs a process may have (mmap, split_vma, munmap, mremap check it).
        self.sysctl_max_map_count = max_map_count
        self.sched = Scheduler(seed=seed, preempt=preempt)
        from .rmap import AnonVma  # the anon_vma slab needs the lockdep state for its rwsems

        self.anon_vma_cache: TypesafeCache[AnonVma] = TypesafeCache(self.rcu, partial(AnonVma, self.lockdep))
        self._anon_vma_ids = IdCounter()
        self._folio_ids = IdCounter()
        self._vma_ids = IdCounter()
        self.folios_live = 0
        self.vmas_live = 0
        self.stats: Counter[str] = Counter()
        #: UFFDIO_MOVE outcomes: "OK", or the errno's name (EAGAIN for a short move).
        self.move_results: Counter[str] = Counter()
        #: Folios whose (mapping, index) pair is torn: a mover preempted between storing the two
        #: (move_present_ptes) left this pair, which never held together, visible meanwhile.
        self.torn: dict[Folio, tuple[AnonVma, int]] = {}
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

    def attach_controller(self, controller: Controller | None) -> None:
        """Put the schedule explorer's controller in charge of every preemption point, lock sleep
        and grace period of this kernel (None: give them back to the seeded scheduler)."""
        self.sched.controller = controller
        self.sched.active = controller is not None or self.sched.preempt > 0.0
        self.lockdep.controller = controller
        self.rcu.controller = controller

    async def spin_on(self, cur: Current, ptl: SpinLock) -> None:
        """spin_lock's contended case: ``ptl`` is held by a task preempted inside its section (at a
        preemption point, which stands for another CPU running). Expects ``ptl`` not held by
        ``cur``; returns when it is free, without taking it (the caller takes it at once). Spins at
        the ``spin:ptl`` point. A cycle of spinners (each holding what the next spins on) is
        reported as a ``deadlock`` and broken by raising Deadlock here."""
        spinning = self.spinning
        spinning[cur] = ptl
        try:
            while ptl.owner is not None:
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
                await self.sched.yield_now("spin:ptl")
        finally:
            del spinning[cur]

    def folio_alloc(self) -> Folio:
        """A new folio; the caller has charged FOLIO_BYTES."""
        fid = self._folio_ids()
        self.folios_live += 1
        return Folio(fid, Mutex(f"folio{fid}.lock", LockClass.FOLIO_LOCK, self.lockdep))

    def folio_free(self, folio: Folio) -> None:
        """The last reference went: the mapping is reset only now (invariant I3)."""
        folio.freed = True
        folio.mapping = None
        folio.exclusive = False
        self.folios_live -= 1
        self.memcg.uncharge(FOLIO_BYTES)

    def next_vma_id(self) -> int:
        return self._vma_ids()

    def next_anon_vma_id(self) -> int:
        return self._anon_vma_ids()
