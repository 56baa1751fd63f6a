"""Violation detectors' sink: structured events with counters, and findings beside them.

The detectors themselves sit where the protocol can be judged from outside it (the walk's checks
in ``rmap``, the lockdep check in ``locks``, the RCU use-after-free check in ``rcu``, the spinning
deadlock check in ``kernel``, the audit in ``invariants``); they only observe, so they judge the
unsafe protocol variants and the mutants (``kernel.MUTANTS``) as well.

A violation is something the protocol must never let happen. A finding is a documented property of
the protocol as the kernel has it (the residual window of the reference, section 5): it is
recorded apart, so that "no violation" stays an assertion a correct protocol passes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .trace import Tracer

#: The kinds of violation a detector can report.
KINDS = (
    # A walker walks while the rwsem it took is not the root rwsem of the anon_vma it walks, or not
    # that of the folio's current anon_vma (folio->mapping); or, under the folio-lock protocol,
    # without the folio lock. Checked at walk start and at every visit after others could run.
    "wrong-root-walk",
    "mapping-changed-during-walk",  # folio root/index changed under a walk that should exclude it
    # The interval tree a walker iterates gained or lost a VMA while the walker held its root for
    # read: a writer linked or unlinked without the root write lock.
    "tree-changed-during-walk",
    # What the walker unlocks (anon_vma_unlock_read: anon_vma->root->rwsem, read again at unlock)
    # is not the rwsem it locked: the anon_vma's root changed under it (freed and reused).
    "unlock-mismatch",
    "use-after-free",  # a freed anon_vma touched outside RCU protection
    # A folio already in the anon rmap gains a mapping (a swap-in, fork's copy, a split's remap)
    # at an address where its anon_vma's root or its index is not what the VMA gives: the kernel's
    # __page_check_anon_rmap (VM_BUG_ON_FOLIO / VM_BUG_ON_PAGE under CONFIG_DEBUG_VM); or
    # PageAnonExclusive is asked of a page that is not anonymous (VM_BUG_ON_PGFLAGS).
    "anon-rmap-mismatch",
    "lock-order",  # a blocking acquisition against the lock order
    "deadlock",  # tasks spin on locks held by one another (ABBA): every CPU of the cycle hangs
    # A blocking acquisition (a sleep) inside an RCU read section: might_sleep()'s "sleeping
    # function called from invalid context".
    "might-sleep",
    # A retry loop that never progresses: a mover's split of a large folio failed again and again
    # for references other tasks hold while they wait (UFFDIO_MOVE's large-folio livelock).
    "livelock",
    "invariant",  # check_invariants() found a broken invariant
)

#: The kinds of finding: documented windows of the protocol as the kernel has it, not violations.
FINDING_KINDS = (
    # A walker read folio->mapping M and folio->index I that never held together: the mover stored
    # the new mapping and not yet the new index (move_present_ptes stores mapping first). The walk
    # then finds no VMA or a wrong address: a missed reference, never a false hit (reference, 5).
    "residual-index-window",
)


@dataclass(frozen=True)
class Violation:
    kind: str
    detail: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        body = ", ".join(f"{k}={v}" for k, v in self.detail.items())
        return f"{self.kind}: {body}"


class Detectors:
    """Collects violations and findings. ``events`` keeps the first ``keep`` violations, ``counts``
    counts all; ``finding_events`` and ``findings`` do the same for findings."""

    def __init__(self, keep: int = 1000) -> None:
        self.keep = keep
        self.events: list[Violation] = []
        self.counts: Counter[str] = Counter()
        self.finding_events: list[Violation] = []
        self.findings: Counter[str] = Counter()
        #: Told of every report and finding (trace.Tracer); None while nobody watches.
        self.trace: Tracer | None = None

    def report(self, kind: str, **detail: Any) -> None:
        """A violation."""
        assert kind in KINDS, kind
        self.counts[kind] += 1
        if len(self.events) < self.keep:
            self.events.append(Violation(kind, detail))
        if self.trace is not None:
            self.trace.finding(str(Violation(kind, detail)))

    def note(self, kind: str, **detail: Any) -> None:
        """A finding: a documented window of the protocol, kept apart from the violations."""
        assert kind in FINDING_KINDS, kind
        self.findings[kind] += 1
        if len(self.finding_events) < self.keep:
            self.finding_events.append(Violation(kind, detail))
        if self.trace is not None:
            self.trace.finding(f"finding {Violation(kind, detail)}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def clear(self) -> None:
        self.events.clear()
        self.counts.clear()
        self.finding_events.clear()
        self.findings.clear()
