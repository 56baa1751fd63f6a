"""Violation detectors' sink: structured events with counters.

The detectors themselves sit where the protocol can be judged from outside it (the walk's visit
hook in ``rmap``, the lockdep check in ``locks``, the RCU use-after-free check in ``rcu``, the audit in
``invariants``); they only observe, so they judge the unsafe protocol variants as well.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

#: The kinds of violation a detector can report.
KINDS = (
    "wrong-root-walk",  # a walker visits VMAs while not holding the folio's current root (or folio lock)
    "mapping-changed-during-walk",  # folio root/index changed under a walk that should exclude it
    "use-after-free",  # a freed anon_vma touched outside RCU protection
    "lock-order",  # a blocking acquisition against the lock order
    "invariant",  # check_invariants() found a broken invariant
)


@dataclass(frozen=True)
class Violation:
    kind: str
    detail: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        body = ", ".join(f"{k}={v}" for k, v in self.detail.items())
        return f"{self.kind}: {body}"


class Detectors:
    """Collects violations. ``events`` keeps the first ``keep`` of them; ``counts`` counts all."""

    def __init__(self, keep: int = 1000) -> None:
        self.keep = keep
        self.events: list[Violation] = []
        self.counts: Counter[str] = Counter()

    def report(self, kind: str, **detail: Any) -> None:
        assert kind in KINDS, kind
        self.counts[kind] += 1
        if len(self.events) < self.keep:
            self.events.append(Violation(kind, detail))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def clear(self) -> None:
        self.events.clear()
        self.counts.clear()
