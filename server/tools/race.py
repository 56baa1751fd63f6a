"""A seeded concurrent workload where Remap, Walk, Fork, Exit and writes race in one model.

``run_race(protocol, seed)`` builds the seed patch's setup (a source VMA and a registered
destination VMA whose anon_vmas have different roots), then runs movers, trylock and blocking
walkers, a forker and a writer as concurrent tasks under the seeded scheduler. It returns what
the detectors saw, the walkers' retry counts and the audit at the end. The same protocol, seed and
parameters always give the same interleaving and result.

A seed's tasks run under a watchdog: when ``WATCHDOG_TURNS`` turns of the event loop go by with no
progress (no preemption point passed, no operation done), every task sleeps on something nobody
will release (a lock a task returned holding): the seed is reported as a ``deadlock`` with what
each task waits on, its tasks are cancelled, and the race goes on with the next seed. A task that
raises what the workload does not expect ends the seed the same way, as a ``crash``.
"""

from __future__ import annotations

import asyncio
import errno
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from ..mm.locks import Mutex, RwSem
from ..mm.mm_types import PAGE_SIZE, MmError
from ..mm.model import MemoryModel, WalkResult

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
    #: "crash: ..." (a task raised what the workload does not expect) or "deadlock: ..." (the
    #: watchdog saw no progress): the seed ended there; empty when it ran to its end.
    failure: str = ""


#: Turns of the event loop with no progress after which the watchdog calls a seed hung.
WATCHDOG_TURNS = 20_000
#: Turns of the event loop a hung or crashed seed's tasks get to end once cancelled.
STOP_TURNS = 1000


class SeedFailed(Exception):
    """A seed's tasks crashed or hung (the text says which, and how)."""


def _waits_on(task: asyncio.Task[Any]) -> str:
    """Where a sleeping task sleeps: its innermost function, and the lock it waits for there."""
    coro: Any = task.get_coro()
    while getattr(getattr(coro, "cr_await", None), "cr_frame", None) is not None:  # down the awaits
        coro = coro.cr_await
    frame = getattr(coro, "cr_frame", None)
    if frame is None:
        return f"{task.get_name()} (not started)"
    lock = frame.f_locals.get("self")
    on = ""
    if isinstance(lock, (Mutex, RwSem)):
        on = f" on {lock.name}" + (f" held by {lock.owner.name}" if lock.owner is not None
                                   else f" held by {lock.readers} reader(s)" if isinstance(lock, RwSem) else "")
    return f"{task.get_name()} sleeps in {frame.f_code.co_name}{on}"


async def _stop(tasks: set[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and every task they started (an uninterruptible step's own), until all
    have ended or ``STOP_TURNS`` turns of the event loop went by."""
    me = asyncio.current_task()
    cancelled: set[asyncio.Task[Any]] = set()
    for _ in range(STOP_TURNS):
        pending = {t for t in asyncio.all_tasks() if t is not me and not t.done()}
        if not pending:
            return
        for t in pending - cancelled:
            t.cancel()
            cancelled.add(t)
        await asyncio.sleep(0)


async def _supervise(named: list[tuple[str, Coroutine[Any, Any, None]]], progress: Callable[[], object]) -> None:
    """Run the coroutines as tasks to their end under the watchdog; SeedFailed, with every task
    stopped, if one raises or none makes ``progress`` for ``WATCHDOG_TURNS`` turns."""
    tasks = [asyncio.ensure_future(c) for _, c in named]
    for (name, _), t in zip(named, tasks, strict=True):
        t.set_name(name)
    last, idle = progress(), 0
    failure = ""
    while not all(t.done() for t in tasks):
        crashed = next((t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None), None)
        if crashed is not None:
            e = crashed.exception()
            failure = f"crash: {crashed.get_name()} raised {type(e).__name__}: {' '.join(str(e).split())}"
            break
        await asyncio.sleep(0)
        now = progress()
        if now != last:
            last, idle = now, 0
            continue
        idle += 1
        if idle >= WATCHDOG_TURNS:
            failure = "deadlock: no progress in " + f"{WATCHDOG_TURNS} turns; " + "; ".join(
                _waits_on(t) for t in tasks if not t.done())
            break
    else:
        for t in tasks:
            if not t.cancelled() and t.exception() is not None:
                e = t.exception()
                failure = f"crash: {t.get_name()} raised {type(e).__name__}: {' '.join(str(e).split())}"
                break
        else:
            return
    await _stop(set(tasks))
    for t in tasks:  # retrieved: an ended task's exception is what the failure says
        if t.done() and not t.cancelled():
            t.exception()
    raise SeedFailed(failure)


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
            _count_walk(totals, w)
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

    async def handler() -> None:
        """The process's userfault handler: a write that lands on a page just moved away faults in
        a MISSING range and sleeps; fill it with the zero page (the write then copies it)."""
        events = m.uffd_events(pid)
        try:
            async for ev in events:
                try:
                    await m.uffd_zeropage(pid, ev.addr, PAGE_SIZE)
                    trace.append(("zero", ev.addr))
                except MmError as e:
                    # EEXIST: a move brought a page back there first, and woke the fault itself
                    assert e.errno in (errno.EEXIST, errno.ENOENT), e
        finally:
            await events.aclose()

    tasks = [("mover 1", mover()), ("mover 2", mover()), ("forker", forker()), ("writer", writer())]
    tasks += [(f"walker {j + 1}", walker(blocking=bool(j % 2))) for j in range(walkers)]
    serving = asyncio.ensure_future(handler())
    serving.set_name("handler")
    try:
        await _supervise(tasks, lambda: (len(trace), m.k.sched.hits.total(), totals["walks"]))
    except SeedFailed as e:
        return _result(m, protocol, seed, totals, trace, str(e))
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)
    return _result(m, protocol, seed, totals, trace)


def _count_walk(totals: dict[str, int], w: WalkResult) -> None:
    totals["walks"] += 1
    totals["fast"] += w.fast_retries
    totals["slow"] += w.slow_retries
    totals["contended"] += w.contended


def _result(m: MemoryModel, protocol: str, seed: int, totals: dict[str, int], trace: list[object],
            failure: str = "") -> RaceResult:
    """What a workload's run gives: the detectors' counts, the audit (none after a ``failure``:
    the tasks were stopped half-way), the walkers' figures."""
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
        problems=[] if failure else m.check_invariants(),
        signature=tuple(trace),
        failure=failure,
    )


#: The workloads ``mmsim race --workload`` runs.
WORKLOADS = ("seed", "gc")


def run_race(protocol: str, seed: int, workload: str = "seed", **kw: object) -> RaceResult:
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}")
    body = race if workload == "seed" else gc_race
    try:
        return asyncio.run(body(protocol, seed, **kw))  # type: ignore[arg-type]
    except Exception as e:  # noqa: BLE001 - a crash outside the supervised tasks (the setup) ends the seed too
        return RaceResult(protocol, seed, {}, [], 0, 0, 0, 0, 0,
                          failure=f"crash: the setup raised {type(e).__name__}: {' '.join(str(e).split())}")


#: Where the GC workload's heap is mapped.
GC_HEAP = 0x7E0000000000
#: Errors a collector's move may get when two mutators faulted on one page (the first move
#: resolved it: the second finds the destination populated, or the source gone).
GC_MOVE_ERRNOS = {errno.EEXIST, errno.ENOENT}


async def gc_race(
    protocol: str,
    seed: int,
    pages: int = 8,
    rounds: int = 3,
    preempt: float = 0.35,
    walkers: int = 2,
    mutators: int = 2,
) -> RaceResult:
    """A concurrent compacting GC in the style of Android ART's, racing a reclaim-like walker.

    Each of ``rounds`` GC cycles moves the heap's pages aside with ``mremap(MREMAP_MAYMOVE |
    MREMAP_DONTUNMAP)``: the from-space gets the pages, the heap's own range (the to-space) stays
    mapped, empty and registered MISSING with the userfaultfd. Mutators then read every page of
    the to-space, each read faulting and sleeping until the collector, reading the fault events,
    resolves it with UFFDIO_MOVE from the from-space; walkers run rmap walks (trylock and
    blocking) on the same folios wherever they are. The collector unmaps the emptied from-space
    at the end of a cycle. Every read must return the page's value, and the detectors and the
    audit must stay clean under the safe protocols."""
    m = MemoryModel(protocol=protocol, seed=seed, preempt=preempt)
    rng = random.Random(seed ^ 0x6C)
    pid = await m.create_process()
    length = pages * PAGE_SIZE
    heap = await m.mmap(pid, length, addr=GC_HEAP)
    to = heap.start
    for i in range(pages):
        await m.write(pid, to + i * PAGE_SIZE, 5000 + i)
    await m.uffd_register(pid, to, length, "missing")
    totals = {"fast": 0, "slow": 0, "contended": 0, "walks": 0, "moves": 0}
    trace: list[object] = []
    where: dict[int, int] = {}  # page -> the from-space address holding it, while it is there

    async def collector(frm: int, done: asyncio.Event) -> None:
        """Resolve each fault with a move from the from-space, until every page is back."""
        events = m.uffd_events(pid)
        try:
            async for ev in events:
                i = (ev.addr - to) // PAGE_SIZE
                try:
                    await m.move(pid, ev.addr, frm + i * PAGE_SIZE, PAGE_SIZE)
                    totals["moves"] += 1
                    where.pop(i, None)
                    trace.append(("gc-move", i))
                except MmError as e:
                    assert e.errno in GC_MOVE_ERRNOS, e
                    trace.append(("gc-move-err", i, e.errno))
                if not where:
                    done.set()
                    return
        finally:
            await events.aclose()

    async def mutator(order: list[int]) -> None:
        for i in order:
            value = await m.read(pid, to + i * PAGE_SIZE)
            assert value == 5000 + i, (i, value)
            trace.append(("read", i))

    async def walker(blocking: bool, done: asyncio.Event) -> None:
        for _ in range(pages):
            if done.is_set():
                return
            i = rng.randrange(pages)
            addr = where.get(i, to + i * PAGE_SIZE)
            f = m.folio(pid, addr)
            if f is None or f.zero_page:
                await asyncio.sleep(0)
                continue
            try:
                w = await m.walk(pid, addr, blocking=blocking)
            except MmError as e:
                assert e.errno == errno.ENOENT, e  # moved away meanwhile
                continue
            _count_walk(totals, w)
            trace.append(("walk", i, w.referenced))

    for _ in range(rounds):
        frm = (await m.mremap(pid, to, length, length, maymove=True, dontunmap=True)).start
        where.update({i: frm + i * PAGE_SIZE for i in range(pages)})
        done = asyncio.Event()
        orders = []
        for _ in range(mutators):
            order = list(range(pages))
            rng.shuffle(order)
            orders.append(order)
        try:
            await _supervise([("collector", collector(frm, done)),
                              *((f"mutator {j + 1}", mutator(o)) for j, o in enumerate(orders)),
                              *((f"walker {j + 1}", walker(bool(j % 2), done)) for j in range(walkers))],
                             lambda: (len(trace), m.k.sched.hits.total(), totals["walks"]))
        except SeedFailed as e:
            return _result(m, protocol, seed, totals, trace, str(e))
        await m.munmap(pid, frm, length)  # the emptied from-space
    return _result(m, protocol, seed, totals, trace)
