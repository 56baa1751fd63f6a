"""The model's counters and gauges, read in one place.

``read_stats`` takes one reading of everything the model counts (``Kernel.stats``, the UFFDIO_MOVE
outcomes, the live objects, the detectors, the memory budget, the swap device, the audits, the lock
waits) into a ``ModelStats``; ``ModelStats.as_dict`` is the flat name -> value map that GetStats
returns, and the Prometheus collector reads the same fields. A reading may be taken from another thread than the
event loop that changes the model: it reads ints, and copies of dictionaries and lists, each copy
retried if the loop changed it meanwhile.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from .locks import LockClass

if TYPE_CHECKING:
    from .model import MemoryModel

K = TypeVar("K")
V = TypeVar("V")


def copy_dict(d: Mapping[K, V]) -> dict[K, V]:
    """A copy of a dictionary that another thread may be changing."""
    while True:
        try:
            return dict(d)
        except RuntimeError:  # changed size during the copy
            continue


@dataclass(frozen=True)
class ModelStats:
    """One reading of the model's counters and gauges."""

    protocol: str
    #: ``Kernel.stats``: the protocol's event counters (walks, moves, faults, forks, VMA merges...).
    counters: dict[str, int]
    #: UFFDIO_MOVE calls by outcome: "OK" or the errno's name.
    move_results: dict[str, int]
    #: Detector violations and documented findings, by kind.
    violations: dict[str, int]
    findings: dict[str, int]
    processes: int
    folios: int
    vmas: int
    anon_vmas: int
    anon_vma_cache_reused: int
    rcu_gp_completed: int
    preempt_yields: int
    audits: int
    uffd_faults_asleep: int
    uffd_readers: int
    #: The memory budget: the model's objects, what calls in progress hold, the peak, the refused
    #: charges and the limit (None: no limit).
    memory_bytes: int
    memory_inflight_bytes: int
    memory_peak_bytes: int
    memory_limit_failures: int
    memory_limit_bytes: int | None
    #: The swap device: its slots in use (with a count or in the swap cache), its usable slots, and
    #: the folios in the swap cache.
    swap_slots_in_use: int
    swap_slots_total: int
    swap_cache_folios: int
    #: Time tasks slept for a lock, by class: (per-bucket counts over LOCK_WAIT_BOUNDS, sum).
    lock_waits: dict[LockClass, tuple[list[int], float]]

    def as_dict(self) -> dict[str, int]:
        """The flat counters GetStats returns."""
        out = dict(self.counters)
        out.update({f"violation_{kind}": n for kind, n in self.violations.items()})
        out["violations"] = sum(self.violations.values())
        # Documented windows of the protocol seen (detectors.FINDING_KINDS), apart from violations.
        out.update({f"finding_{kind}": n for kind, n in self.findings.items()})
        out["findings"] = sum(self.findings.values())
        out["processes"] = self.processes
        out["folios"] = self.folios
        out["vmas"] = self.vmas
        out["anon_vmas"] = self.anon_vmas
        out["anon_vma_cache_reused"] = self.anon_vma_cache_reused
        out["rcu_gp_completed"] = self.rcu_gp_completed
        out["preempt_yields"] = self.preempt_yields
        out["audits"] = self.audits
        out["uffd_faults_asleep"] = self.uffd_faults_asleep
        out["uffd_readers"] = self.uffd_readers
        out["memory_bytes"] = self.memory_bytes
        out["memory_inflight_bytes"] = self.memory_inflight_bytes
        out["memory_peak_bytes"] = self.memory_peak_bytes
        out["memory_limit_failures"] = self.memory_limit_failures
        if self.memory_limit_bytes is not None:
            out["memory_limit_bytes"] = self.memory_limit_bytes
        out["swap_slots_in_use"] = self.swap_slots_in_use
        out["swap_slots_total"] = self.swap_slots_total
        out["swap_cache_folios"] = self.swap_cache_folios
        return out


def read_stats(model: MemoryModel) -> ModelStats:
    """One reading of ``model``'s counters and gauges (safe from another thread)."""
    k = model.k
    memcg = k.memcg
    inflight = memcg.inflight
    waits = k.lockdep.waits
    swap = k.swap
    return ModelStats(
        protocol=k.protocol.name,
        counters=copy_dict(k.stats),
        move_results=copy_dict(k.move_results),
        violations=copy_dict(k.detectors.counts),
        findings=copy_dict(k.detectors.findings),
        processes=len(model.processes),
        folios=k.folios_live,
        vmas=k.vmas_live,
        anon_vmas=len(k.anon_vma_cache.live),
        anon_vma_cache_reused=k.anon_vma_cache.reused,
        rcu_gp_completed=k.rcu.gp_completed,
        preempt_yields=sum(copy_dict(k.sched.yields).values()),
        audits=model.auditor.audits,
        uffd_faults_asleep=k.uffd_faults_asleep,
        uffd_readers=k.uffd_readers,
        memory_bytes=memcg.usage - inflight,  # the model's objects
        memory_inflight_bytes=inflight,  # what the calls in progress hold (admission)
        memory_peak_bytes=memcg.peak,
        memory_limit_failures=memcg.failcnt,
        memory_limit_bytes=memcg.limit,
        swap_slots_in_use=swap.inuse_pages,
        swap_slots_total=swap.pages,
        swap_cache_folios=len(swap.swap_table),
        lock_waits={c: waits.snapshot(c) for c in LockClass},
    )
