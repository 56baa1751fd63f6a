"""``mmsim mutate``: the litmus library against every protocol mutant (mm/variants.py ``MUTANTS``,
and a user's mutants given as ``FILE.py:NAME``).

A mutant is *killed* when some scenario, explored under one of the protocols the mutant applies
to, is caught by a detector or the audit, while the same scenario under the same protocol without
the mutant is clean. The mutation score is the killed mutants over the mutants that are not
argued equivalent (docs/mutants.md). Each scenario is searched exhaustively up to the preemption
bound first, then with random schedules.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..mm.kernel import MUTANTS
from ..mm.steps import resolve
from .explore import explore
from .litmus import Scenario, load

#: The library shipped with the sources (tests/litmus beside server/).
DEFAULT_LITMUS = Path(__file__).resolve().parents[2] / "tests" / "litmus"


@dataclass
class Kill:
    mutant: str  # its name
    equivalent: bool
    protocols: tuple[str, ...] = ()  # those it applies to
    fix: str = ""  # a bug from history: the kernel commit that fixed it
    scenario: str | None = None
    protocol: str | None = None
    strategy: str | None = None
    schedule: int = 0
    finding: str = ""
    schedules: int = 0  # run in all, to kill it or to give up

    @property
    def killed(self) -> bool:
        return self.scenario is not None


def library(directory: Path = DEFAULT_LITMUS) -> list[Scenario]:
    return [load(p) for p in sorted(directory.glob("*.litmus"))]


def kill(mutant: str, scenarios: list[Scenario], preemptions: int = 2, schedules: int = 2000) -> Kill:
    """Search for a scenario and protocol that kill ``mutant`` (a built-in name or FILE.py:NAME;
    steps.VariantError if it is no mutant)."""
    m = resolve(mutant, "mutant")
    k = Kill(m.name, m.equivalent, m.protocols, m.fix)
    if m.equivalent:
        return k
    for protocol in m.protocols:
        for scn in scenarios:
            if not _clean(scn.text, scn.name, protocol, preemptions, schedules):
                continue  # caught without the mutant too: it would prove nothing
            for strategy in ("exhaustive", "random"):
                s = explore(scn, protocol, mutant, strategy=strategy, schedules=schedules, preemptions=preemptions)
                k.schedules += s.schedules
                if s.first is not None:
                    first = (s.first.violations or s.first.problems or ["caught"])[0]
                    k.scenario, k.protocol, k.strategy, k.schedule = scn.name, protocol, strategy, s.at
                    k.finding = first.split(":", 1)[0] if s.first.violations else "audit: " + first
                    return k
    return k


@functools.cache
def _clean(text: str, name: str, protocol: str, preemptions: int, schedules: int) -> bool:
    """Whether the scenario is clean under the protocol itself (its bounded exhaustive search)."""
    from .litmus import parse

    scn = parse(text, f"{name}.litmus")
    if scn.known.get(protocol):
        return False  # caught on purpose under this protocol: no kill can be told from it
    s = explore(scn, protocol, strategy="exhaustive", schedules=schedules, preemptions=preemptions)
    return s.first is None


def mutation_score(scenarios: list[Scenario] | None = None, preemptions: int = 2,
                   schedules: int = 2000, extra: Sequence[str] = ()) -> tuple[list[Kill], float]:
    """Every mutant's kill (or survival), and the score: the built-in mutants, then ``extra``
    (user mutants, ``FILE.py:NAME``)."""
    scenarios = library() if scenarios is None else scenarios
    kills = [kill(name, scenarios, preemptions, schedules) for name in (*MUTANTS, *extra)]
    scored = [k for k in kills if not k.equivalent]
    return kills, (sum(k.killed for k in scored) / len(scored) if scored else 1.0)


def killers(preemptions: int = 2, schedules: int = 2000) -> dict[str, tuple[str, str]]:
    """mutant -> (scenario, protocol) that kills it, for every killed mutant."""
    kills, _ = mutation_score(preemptions=preemptions, schedules=schedules)
    return {k.mutant: (k.scenario, k.protocol) for k in kills if k.killed}  # type: ignore[misc]
