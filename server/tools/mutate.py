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


@dataclass(frozen=True)
class Trial:
    """One scenario under one protocol against a mutant: the schedules run, and the kill if any."""

    schedules: int = 0
    strategy: str | None = None  # the strategy whose search killed it
    schedule: int = 0
    finding: str = ""


def kill(mutant: str, scenarios: list[Scenario], preemptions: int = 2, schedules: int = 2000,
         protocols: Sequence[str] | None = None) -> Kill:
    """Search for a scenario and protocol that kill ``mutant`` (a built-in name or FILE.py:NAME;
    steps.VariantError if it is no mutant); ``protocols``: only those of its protocols."""
    m = resolve(mutant, "mutant")
    k = Kill(m.name, m.equivalent, m.protocols, m.fix)
    if m.equivalent:
        return k
    for protocol in _among(m.protocols, protocols):
        for scn in scenarios:
            if _take(k, scn.name, protocol, trial(mutant, scn.text, scn.name, protocol, preemptions, schedules)):
                return k
    return k


def trial(mutant: str, text: str, name: str, protocol: str, preemptions: int, schedules: int) -> Trial:
    """Explore the scenario ``text`` (named ``name``) under ``protocol`` with ``mutant``: exhaustively
    up to ``preemptions``, then randomly; no search if the scenario is caught without the mutant
    too (it would prove nothing)."""
    from .litmus import parse

    if not _clean(text, name, protocol, preemptions, schedules):
        return Trial()
    scn = parse(text, f"{name}.litmus")
    run = 0
    for strategy in ("exhaustive", "random"):
        s = explore(scn, protocol, mutant, strategy=strategy, schedules=schedules, preemptions=preemptions)
        run += s.schedules
        if s.first is not None:
            first = (s.first.violations or s.first.problems or ["caught"])[0]
            return Trial(run, strategy, s.at, first.split(":", 1)[0] if s.first.violations else "audit: " + first)
    return Trial(run)


def _take(k: Kill, scenario: str, protocol: str, t: Trial) -> bool:
    """Count trial ``t`` into ``k``; True if it killed the mutant."""
    k.schedules += t.schedules
    if t.strategy is None:
        return False
    k.scenario, k.protocol, k.strategy, k.schedule, k.finding = scenario, protocol, t.strategy, t.schedule, t.finding
    return True


@functools.cache
def _clean(text: str, name: str, protocol: str, preemptions: int, schedules: int) -> bool:
    """Whether the scenario is clean under the protocol itself (its bounded exhaustive search)."""
    from .litmus import parse

    scn = parse(text, f"{name}.litmus")
    if scn.known.get(protocol):
        return False  # caught on purpose under this protocol: no kill can be told from it
    s = explore(scn, protocol, strategy="exhaustive", schedules=schedules, preemptions=preemptions)
    return s.first is None


def _among(theirs: Sequence[str], only: Sequence[str] | None) -> list[str]:
    return [p for p in theirs if only is None or p in only]


#: The protocols the kernel has had (no window of their own): where a generated program that
#: catches a mutant caught the mutant's bug, not a protocol's.
SAFE_PROTOCOLS = ("recheck", "folio-lock")


def mutation_score(scenarios: list[Scenario] | None = None, preemptions: int = 2,
                   schedules: int = 2000, extra: Sequence[str] = (),
                   cluster: str | None = None, protocols: Sequence[str] | None = None) -> tuple[list[Kill], float]:
    """Every mutant's kill (or survival), and the score: the built-in mutants, then ``extra``
    (user mutants, ``FILE.py:NAME``). ``cluster``: a Dask scheduler's address; each trial (a
    mutant and a protocol against a scenario) is a task of its workers, and the kills are the same
    as here (cluster.ClusterError when it cannot be used). ``protocols``: try each mutant under
    only those of its protocols (generated programs have no ``known:`` lines: under a protocol
    with a window of its own, such as ``recheck-slow-only``, a catch may be the protocol's)."""
    scenarios = library() if scenarios is None else scenarios
    names = (*MUTANTS, *extra)
    if cluster is not None:
        kills = _kills_on_cluster(cluster, names, scenarios, preemptions, schedules, protocols)
    else:
        kills = [kill(name, scenarios, preemptions, schedules, protocols) for name in names]
    scored = [k for k in kills if not k.equivalent]
    return kills, (sum(k.killed for k in scored) / len(scored) if scored else 1.0)


def _kills_on_cluster(address: str, names: Sequence[str], scenarios: list[Scenario], preemptions: int,
                      schedules: int, protocols: Sequence[str] | None = None) -> list[Kill]:
    """``kill`` of each mutant, its trials run on the cluster at ``address``: all are submitted at
    once, and taken in the order ``kill`` runs them; a mutant's trials after its kill are
    cancelled (and their schedules not counted, as ``kill`` never runs them)."""
    from .cluster import connect, in_order

    kills = []
    with connect(address) as client:
        queued = []
        for name in names:
            m = resolve(name, "mutant")
            k = Kill(m.name, m.equivalent, m.protocols, m.fix)
            order = [] if m.equivalent else [(scn, p) for p in _among(m.protocols, protocols) for scn in scenarios]
            calls = [(name, scn.text, scn.name, p, preemptions, schedules) for scn, p in order]
            queued.append((k, order, in_order(client, trial, calls)))
        for k, order, results in queued:
            for (scn, protocol), t in zip(order, results, strict=False):
                if _take(k, scn.name, protocol, t):
                    break
            results.close()  # cancels the trials after the kill
            kills.append(k)
    return kills


def killers(preemptions: int = 2, schedules: int = 2000) -> dict[str, tuple[str, str]]:
    """mutant -> (scenario, protocol) that kills it, for every killed mutant."""
    kills, _ = mutation_score(preemptions=preemptions, schedules=schedules)
    return {k.mutant: (k.scenario, k.protocol) for k in kills if k.killed}  # type: ignore[misc]
