"""The machine-wide state one model instance runs on: protocol variant, RCU, caches, scheduler.

Every protocol function takes this as ``k`` (what the kernel keeps in globals) and the running
task's ``Current`` as ``cur``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import count

from .detectors import Detectors
from .locks import LockClass, LockdepState, Mutex
from .memcontrol import MemCgroup
from .mm_types import FOLIO_BYTES, Folio
from .rcu import Rcu, TypesafeCache
from .sched import Controller, Scheduler


@dataclass(frozen=True)
class Protocol:
    """What one kernel generation does in folio_lock_anon_vma_read and move_pages_pte."""

    name: str
    recheck_fast: bool  # recheck folio->mapping after the trylock fast path
    recheck_slow: bool  # recheck folio->mapping after sleeping on the root rwsem
    walker_folio_lock: bool  # every rmap walker holds the folio lock (~6.19)
    mover_anon_vma_lock: bool  # UFFDIO_MOVE write-locks the src folio's anon_vma root


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


class Kernel:
    def __init__(
        self,
        protocol: str = "recheck",
        seed: int = 0,
        preempt: float = 0.0,
        detectors: bool = True,
        max_memory: int | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; one of {', '.join(PROTOCOLS)}")
        self.protocol = PROTOCOLS[protocol]
        self.detectors = Detectors()
        self.detect = detectors
        self.lockdep = LockdepState(self.detectors if detectors else None, enabled=detectors)
        self.rcu = Rcu(self.detectors if detectors else None)
        self.memcg = MemCgroup(max_memory)
        self.sched = Scheduler(seed=seed, preempt=preempt)
        from .rmap import AnonVma  # the anon_vma slab needs the lockdep state for its rwsems

        self.anon_vma_cache: TypesafeCache[AnonVma] = TypesafeCache(self.rcu, lambda: AnonVma(self.lockdep))
        self._anon_vma_ids = count(1)
        self._folio_ids = count(1)
        self._vma_ids = count(1)
        self.folios_live = 0
        self.vmas_live = 0
        self.stats: Counter[str] = Counter()
        #: UFFDIO_MOVE outcomes: "OK", or the errno's name (EAGAIN for a short move).
        self.move_results: Counter[str] = Counter()

    def attach_controller(self, controller: Controller | None) -> None:
        """Put the schedule explorer's controller in charge of every preemption point, lock sleep
        and grace period of this kernel (None: give them back to the seeded scheduler)."""
        self.sched.controller = controller
        self.sched.active = controller is not None or self.sched.preempt > 0.0
        self.lockdep.controller = controller
        self.rcu.controller = controller

    def folio_alloc(self) -> Folio:
        """A new folio; the caller has charged FOLIO_BYTES."""
        fid = next(self._folio_ids)
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
        return next(self._vma_ids)

    def next_anon_vma_id(self) -> int:
        return next(self._anon_vma_ids)
