"""The audit's quiescent point, and audits run from a live model.

Every model call passes the ``CallGate``: ``enter`` at its start (waiting while an audit waits
for, or holds, the quiescent point), ``leave`` at its end. An ``Auditor`` closes the gate, waits
until the calls in progress have left, runs the audit (``invariants.audit_steps``) letting other
tasks (not model calls) run every RESCHED_WORK units of work, and opens the gate again. Audits
asked for at once share one run, and ``share`` below 1 throttles them to that share of the time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from .detectors import Detectors
from .sched import cond_resched

#: The audit's work: appends every problem found to the list, yielding every RESCHED_WORK units.
AuditSteps = Callable[[list[str]], Iterator[None]]


class CallGate:
    """The model calls in progress, and the pause an audit puts on new ones."""

    __slots__ = ("calls", "paused", "_drained")

    def __init__(self) -> None:
        self.calls = 0
        #: Set while an audit waits for the quiescent point or runs: new calls wait for it.
        self.paused: asyncio.Event | None = None
        self._drained: asyncio.Future[None] | None = None

    async def wait(self) -> None:
        """Sleep while an audit waits for, or holds, the quiescent point."""
        while self.paused is not None:
            await self.paused.wait()

    async def enter(self) -> None:
        """Start of a call: wait while an audit waits for, or holds, the quiescent point, then
        count the call in."""
        if self.paused is not None:
            await self.wait()
        self.calls += 1

    def try_enter(self) -> bool:
        """``enter`` without a wait: count the call in and return True, unless an audit waits for
        or holds the quiescent point (then False: ``await enter()``). The model's hot calls use
        ``if not gate.try_enter(): await gate.enter()``, which saves a coroutine per call."""
        if self.paused is not None:
            return False
        self.calls += 1
        return True

    def leave(self) -> None:
        """End of a call: a waiting audit starts once no call is left."""
        self.calls -= 1
        drained = self._drained
        if drained is not None and not self.calls and not drained.done():
            drained.set_result(None)

    async def close(self) -> None:
        """Hold new calls at the gate, and wait until those in progress have left."""
        self.paused = asyncio.Event()
        if self.calls:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained

    def open(self) -> None:
        """Let the calls held at the gate go on."""
        paused, self.paused, self._drained = self.paused, None, None
        if paused is not None:
            paused.set()


class Auditor:
    """Audits of one model at ``gate``'s quiescent point; each problem found is also reported to
    ``detectors``. ``share`` throttles audits to that share of the time (1.0: unthrottled)."""

    def __init__(self, gate: CallGate, detectors: Detectors, share: float = 1.0) -> None:
        self.gate = gate
        self.detectors = detectors
        self.share = share
        #: Audits started so far, and the last one's result.
        self.audits = 0
        self.result: list[str] = []
        #: When the last audit began, and when the next may (event-loop time).
        self.started = 0.0
        self.next = 0.0
        self._lock: asyncio.Lock | None = None

    def check(self, steps: AuditSteps) -> list[str]:
        """Run the audit at once, in one go (the caller is at a quiescent point)."""
        problems: list[str] = []
        for _ in steps(problems):
            pass
        return self._report(problems)

    async def audit(self, steps: AuditSteps) -> list[str]:
        """Run the audit at the quiescent point: new calls wait while the calls in progress finish
        and the audit runs. A caller takes the result of an audit that began after it asked; with
        ``share`` below 1 the next audit waits until the last one's time is that share of the time
        since it began, so that a loop of audits cannot hold everyone else's calls up."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        arrived = self.audits
        loop = asyncio.get_running_loop()
        async with self._lock:
            if self.audits > arrived:
                return list(self.result)  # an audit that began after this call arrived has run
            wait = self.next - loop.time()
            if wait > 0:  # the throttle: let the calls that audits held up run first
                await asyncio.sleep(wait)
            self.audits += 1
            t0 = self.started = loop.time()
            try:
                await self.gate.close()
                problems: list[str] = []
                for _ in steps(problems):
                    await cond_resched()
                self.result = self._report(problems)
                return list(self.result)
            finally:
                self.gate.open()
                if self.share < 1.0:
                    self.next = loop.time() + (loop.time() - t0) * (1.0 / self.share - 1.0)

    def _report(self, problems: list[str]) -> list[str]:
        for p in problems:
            self.detectors.report("invariant", problem=p)
        return problems
