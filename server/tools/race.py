"""A seeded concurrent workload where Remap, Walk, Fork, Exit and writes race in one model.

``run_race(protocol, seed)`` builds the seed patch's setup (a source VMA and a registered
destination VMA whose anon_vmas have different roots), then runs movers, trylock and blocking
walkers, a forker and a writer as concurrent tasks under the seeded scheduler. It returns what
the detectors saw, the walkers' retry counts and the audit at the end. The same protocol, seed and
parameters always give the same interleaving and result.
"""

from __future__ import annotations

import asyncio
import errno
import random
from dataclasses import dataclass, field

from ..mm.mm_types import PAGE_SIZE, MmError
from ..mm.model import MemoryModel

#: Errors a racing operation may legitimately get.
EXPECTED_ERRNOS = {errno.EBUSY, errno.EEXIST, errno.ENOENT, errno.EAGAIN, errno.ESRCH}


@dataclass
class RaceResult:
    protocol: str
    seed: int
    violations: dict[str, int]
    events: list[str]
    fast_retries: int
    slow_retries: int
    contended: int
    walks: int
    moves: int
    problems: list[str] = field(default_factory=list)
    signature: tuple[object, ...] = ()


async def race(
    protocol: str,
    seed: int,
    pages: int = 4,
    rounds: int = 12,
    preempt: float = 0.35,
    walkers: int = 2,
) -> RaceResult:
    m = MemoryModel(protocol=protocol, seed=seed, preempt=preempt)
    rng = random.Random(seed ^ 0x5EED)
    pid = await m.create_process()
    base = 0x7F0000000000
    # Two mappings with a gap between them, so they never merge and get separate roots.
    a = await m.mmap(pid, pages * PAGE_SIZE, addr=base)
    b = await m.mmap(pid, pages * PAGE_SIZE, addr=base + 2 * pages * PAGE_SIZE)
    await m.madvise(pid, a.start, pages * PAGE_SIZE, "dontfork")
    await m.uffd_register(pid, b.start, pages * PAGE_SIZE, "missing")
    for i in range(pages):
        await m.write(pid, a.start + i * PAGE_SIZE, 1000 + i)
    await m.uffd_register(pid, a.start, pages * PAGE_SIZE, "missing")
    totals = {"fast": 0, "slow": 0, "contended": 0, "walks": 0, "moves": 0}
    trace: list[object] = []

    def addr_of(i: int) -> int:
        """Where page i lives now (its folio moves back and forth between a and b)."""
        for base_addr in (a.start, b.start):
            f = m.folio(pid, base_addr + i * PAGE_SIZE)
            if f is not None and not f.zero_page:
                return base_addr + i * PAGE_SIZE
        return -1

    async def mover() -> None:
        for _ in range(rounds):
            i = rng.randrange(pages)
            src = addr_of(i)
            if src < 0:
                await asyncio.sleep(0)
                continue
            dst = (b.start if src < b.start else a.start) + i * PAGE_SIZE
            try:
                await m.move(pid, dst, src, PAGE_SIZE)
                totals["moves"] += 1
                trace.append(("mv", i, dst))
            except MmError as e:
                assert e.errno in EXPECTED_ERRNOS, e
                trace.append(("mv-err", i, e.errno))

    async def walker(blocking: bool) -> None:
        for _ in range(rounds):
            i = rng.randrange(pages)
            addr = addr_of(i)
            if addr < 0:
                await asyncio.sleep(0)
                continue
            try:
                w = await m.walk(pid, addr, blocking=blocking)
            except MmError as e:
                assert e.errno == errno.ENOENT, e
                continue
            totals["walks"] += 1
            totals["fast"] += w.fast_retries
            totals["slow"] += w.slow_retries
            totals["contended"] += w.contended
            trace.append(("walk", i, w.referenced, w.mappings))

    async def forker() -> None:
        for _ in range(max(1, rounds // 4)):
            try:
                child = await m.fork(pid)
                await asyncio.sleep(0)
                await m.exit(child)
                trace.append(("fork", child))
            except MmError as e:
                assert e.errno in EXPECTED_ERRNOS, e

    async def writer() -> None:
        for _ in range(rounds // 2):
            i = rng.randrange(pages)
            addr = addr_of(i)
            if addr < 0:
                await asyncio.sleep(0)
                continue
            try:
                await m.write(pid, addr, rng.randrange(1 << 32))
            except MmError as e:
                # A page moved away between lookup and write lands in a MISSING range.
                assert e.errno in EXPECTED_ERRNOS, e

    tasks = [mover(), mover(), forker(), writer()]
    tasks += [walker(blocking=bool(j % 2)) for j in range(walkers)]
    await asyncio.gather(*tasks)
    problems = m.check_invariants()
    det = m.detectors
    return RaceResult(
        protocol=protocol,
        seed=seed,
        violations=dict(det.counts),
        events=[str(e) for e in det.events[:5]],
        fast_retries=totals["fast"],
        slow_retries=totals["slow"],
        contended=totals["contended"],
        walks=totals["walks"],
        moves=totals["moves"],
        problems=problems,
        signature=tuple(trace),
    )


def run_race(protocol: str, seed: int, **kw: object) -> RaceResult:
    return asyncio.run(race(protocol, seed, **kw))  # type: ignore[arg-type]
