"""A load-generator worker: one OS process (started with ``spawn``) with its own event loop and
channels, driving its lanes in a closed or an open loop and recording every call in HDR histograms.

The parent sends ``("go", WorkerSpec)``; the worker sends ``("progress", {...})`` every half second
and ``("result", {...})`` (or ``("error", text)``) at the end. Latency is measured from the send in
a closed loop and from the intended send time in an open loop, so that a stall of the server shows
in the figures however the sends were delayed (no coordinated omission).

Each worker has one client of the deployment (``WorkerSpec.access``): with one target it addresses
every process by its handle alone, so that its calls go to the process's shard, directly or
through a proxy, as the runner's client found them.

In a GC mix a worker also runs the collector of each tree it owns (``WorkerSpec.gc_trees``, every
lane of which it has): a task beside the lanes, started before them and stopped once they are all
done, so that no read is left waiting for a fault's resolution (gc.py).

In a swap mix (``pageout`` or ``reclaim``) each lane's writes, reads, walks and pageouts pick
random pages of its own set; the lane knows what each page holds, so a read that returns another
value (a page lost or mixed up on its way to swap and back) fails the run, and a walk that finds
its page swapped out (ENOENT, and pagemap shows the swap entry) is the ``swapped_out`` outcome.

A shard that restarts under the run takes its trees with it: the worker tells the calls that cost
(the ``shard_restarted`` outcome) from other failures, makes the trees its lanes were on again on
the restarted shard and goes on with them (restart.py); it exits those at the end.
"""

from __future__ import annotations

import asyncio
import errno as errno_mod
import random
import signal
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import grpc
from hdrh.histogram import HdrHistogram

from mmsim.client import BatchStream, Client, MmsimError, Process, ProcessNotFoundError, ops

from .access import Access
from .gc import GcError, GcHeap
from .histograms import encode, new_histogram
from .profiles import OPS_PER_CALL
from .restart import PROBE_INTERVAL_S, SHARD_RESTARTED, Restarts, TreeSlot
from .workload import BLOCK, PAGE, LaneSpec, TreeSpec

#: A send later than its intended time by more than this is counted late (open loop).
LATE_S = 0.001
PROGRESS_S = 0.5
#: The per-second histograms keep 2 significant digits (the run's own keep 3).
SERIES_DIGITS = 2
HIGHEST_US = 60_000_000
#: The outcome (in a figures object's ``errors``) of a walk of a page that is swapped out (a swap mix).
SWAPPED_OUT = "swapped_out"
#: The pages of a lane's own set one pageout takes, and how often (one in N) it takes the lane's
#: remap page instead, so that moves meet swap entries.
PAGEOUT_PAGES = 4
PAGEOUT_REMAP_ONE_IN = 4
#: The folios one reclaim call asks for (SWAP_CLUSTER_MAX).
RECLAIM_PAGES = 32


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    access: Access  # the targets, the routing the runner found, the credential files
    trees: tuple[TreeSpec, ...]
    lanes: tuple[LaneSpec, ...]
    mix: tuple[tuple[str, int], ...]
    mode: str  # "closed" | "open"
    rate: float | None  # this worker's operations per second, open loop
    duration: float | None  # measured seconds (after the warm-up), or None with a count
    count: int | None  # this worker's measured calls, or None with a duration
    warmup: float
    start_at: float  # time.time() at which every worker starts
    seed: int
    call_timeout: float
    gc_trees: tuple[int, ...] = ()  # the trees whose GC collector this worker runs (a GC mix)
    keep: bool = False  # leave the trees made again after a shard restart on the server at the end


@dataclass
class OpStats:
    hist: HdrHistogram = field(default_factory=new_histogram)
    ok: int = 0
    ops: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)


class Recorder:
    """Everything one worker measures. Calls that started (or were due) before the end of the
    warm-up are not recorded."""

    def __init__(self, warm_end: float, end: float) -> None:
        self.warm_end = warm_end
        self.end = end  # calls completing later (the drain) count in the figures, not in the series
        self.ops: dict[str, OpStats] = {}
        self.statuses: Counter[str] = Counter()
        self.errnos: Counter[str] = Counter()
        self.late = 0
        self.series: list[list[Any]] = []  # per second: [ops, errors, histogram]
        self.calls = 0
        self.problems = 0  # errnos and failures, for the live line
        self.interval = HdrHistogram(1, HIGHEST_US, SERIES_DIGITS)  # since the last progress message

    def record(
        self, op: str, began: float, done: float, status: str, err: str | None, inner: Counter[str], nops: int
    ) -> None:
        if began < self.warm_end:
            return
        s = self.ops.get(op)
        if s is None:
            s = self.ops[op] = OpStats()
        us = max(1, min(HIGHEST_US, int((done - began) * 1e6)))
        s.hist.record_value(us)
        self.interval.record_value(us)
        self.statuses[status] += 1
        self.calls += 1
        problems = sum(inner.values())
        if status == "OK":
            s.ok += 1
            s.ops += nops
        elif err is not None:
            s.errors[err] += 1
            self.errnos[err] += 1
            problems += 1
        else:
            s.failures[status] += 1
            problems += 1
        for name, n in inner.items():  # errnos of the operations inside a batch
            s.errors[name] += n
            self.errnos[name] += n
        self.problems += problems
        if done >= self.end:
            return
        sec = int(done - self.warm_end)
        while len(self.series) <= sec:
            self.series.append([0, 0, HdrHistogram(1, HIGHEST_US, SERIES_DIGITS)])
        slot = self.series[sec]
        slot[0] += nops if status == "OK" else 0
        slot[1] += problems
        slot[2].record_value(us)

    def result(self) -> dict[str, Any]:
        return {
            "ops": {
                name: {
                    "hist": encode(s.hist), "ok": s.ok, "ops": s.ops, "errors": dict(s.errors),
                    "failures": dict(s.failures),
                }
                for name, s in self.ops.items()
            },
            "statuses": dict(self.statuses),
            "errnos": dict(self.errnos),
            "late": self.late,
            "series": [[n, e, encode(h)] for n, e, h in self.series],
        }


def classify(exc: BaseException) -> tuple[str, str | None]:
    """(status name, errno name or None) of a failed call."""
    if isinstance(exc, OSError) and exc.errno:
        code = getattr(exc, "code", None)
        return (code.name if code is not None else "UNKNOWN"), errno_mod.errorcode.get(exc.errno, str(exc.errno))
    if isinstance(exc, MmsimError):
        return exc.code.name, None
    return "CLIENT_ERROR", None


class WrongValue(Exception):
    """A read returned a value the page never had."""


class GcMixError(Exception):
    """A GC operation on a lane without a GC heap."""


#: How many times a walk's ENOENT is checked against pagemap while the server refuses the check
#: for room, and the first wait between two (doubled each time).
SWAP_CHECK_TRIES = 5
SWAP_CHECK_BACKOFF_S = 0.01


class SwappedOut(Exception):
    """A walk answered ENOENT for a page of the lane's own set that pagemap shows swapped out:
    nothing is mapped there, as a swap mix expects. ``at``: when the walk answered (perf_counter())."""

    def __init__(self, at: float) -> None:
        super().__init__("the page is swapped out")
        self.at = at


class Lane:
    """One call in flight at a time, on pages of its own (shared ones in the race profile) of its
    tree, which ``slot`` holds (the tree made again after a restart of its shard, too)."""

    def __init__(self, spec: LaneSpec, slot: TreeSlot) -> None:
        self.spec = spec
        self.slot = slot
        self.version = slot.version  # the slot's version the positions below are of
        self.single_at = 0  # 0: the page is in the source region, 1: in the destination
        self.block_at = 0
        self.value = 0
        self.stream: BatchStream | None = None
        #: A swap mix: what the pages of its set that it wrote hold (None: a write that may or may
        #: not have been made); a page not in it holds what the setup wrote.
        self.values: dict[int, int | None] = {}

    @property
    def tree(self) -> TreeSpec:
        return self.slot.spec

    @property
    def root(self) -> Process:
        return self.slot.root

    @property
    def heap(self) -> GcHeap | None:
        """Its tree's GC heap, in a GC mix."""
        return self.slot.heap

    @property
    def race_pos(self) -> dict[int, int]:
        return self.slot.race_pos

    async def sync(self) -> int:
        """Start over on the tree made again if it was (the pages back where a new tree has them,
        the stream of the old one dropped); the slot's version the next call is made on."""
        if self.version != self.slot.version:
            self.version = self.slot.version
            self.single_at = self.block_at = self.value = 0
            self.values = {}
            await self.drop_stream(None)
        return self.version

    async def drop_stream(self, exc: BaseException | None) -> None:
        """Cancel the lane's stream (it failed with ``exc``, or its tree is gone)."""
        stream, self.stream = self.stream, None
        if stream is not None:
            reason = exc or GcError("the stream's tree is gone")
            try:
                await stream.__aexit__(type(reason), reason, None)  # with an exception: the call is cancelled
            except (OSError, MmsimError, EOFError):
                pass

    def regions(self, at: int) -> tuple[int, int]:
        """(from, to) for a page now at ``at``."""
        t = self.tree
        return (t.src, t.dst) if at == 0 else (t.dst, t.src)

    def swap_page(self, rng: random.Random) -> int:
        """A random page of its own set (a swap mix), as an index in the rw region."""
        return self.spec.swap_first + rng.randrange(self.spec.swap_pages)

    def expected(self, page: int) -> int | None:
        """What page ``page`` of its set holds (None: not known)."""
        return self.values.get(page, self.tree.rw_value(page))


class Worker:
    def __init__(self, spec: WorkerSpec, mm: Client) -> None:
        self.spec = spec
        self.mm = mm
        self.rng = random.Random(spec.seed)
        names = [n for n, _ in spec.mix]
        weights = [w for _, w in spec.mix]
        self.choose: Callable[[], str] = lambda: self.rng.choices(names, weights)[0]
        self.slots = [TreeSlot(i, t, mm.process(t.root, t.root_pid, target=t.target)) for i, t in enumerate(spec.trees)]
        for t in spec.gc_trees:
            self.slots[t].heap = self.new_heap(self.slots[t])
        for lane in spec.lanes:
            if lane.gc and self.slots[lane.tree].heap is None:
                raise ValueError(f"a GC lane of tree {lane.tree}, whose collector is not this worker's")
        self.lanes = [Lane(lane, self.slots[lane.tree]) for lane in spec.lanes]
        self.restarts = Restarts(mm, spec.access, spec.call_timeout, self.new_heap)
        self.ops: dict[str, Callable[[Lane], Awaitable[Counter[str]]]] = {
            "ping": self.op_ping,
            "remap": self.op_remap,
            "remap64": self.op_remap64,
            "walk": lambda lane: self.op_walk(lane, False),
            "walk_blocking": lambda lane: self.op_walk(lane, True),
            "fork": self.op_fork,
            "write": self.op_write,
            "read": self.op_read,
            "mmap": self.op_mmap,
            "batch": self.op_batch,
            "stream": self.op_stream,
            "gc_read": self.op_gc_read,
            "pageout": self.op_pageout,
            "reclaim": self.op_reclaim,
        }
        #: What an operation waits for before it is issued (closed loop: not in its latency).
        self.prepare: dict[str, Callable[[Lane, float], Awaitable[bool]]] = {"gc_read": self.gc_ready}
        self.inflight = 0
        self.orphans: list[Process] = []

    def new_heap(self, slot: TreeSlot) -> GcHeap | None:
        """The GC heap of ``slot``'s tree (as it is now), if this worker runs its collector."""
        if slot.index not in self.spec.gc_trees:
            return None
        rng = random.Random(self.spec.seed * 7919 + slot.index + 1_000_003 * slot.version)
        return GcHeap(slot.spec, slot.root, rng, self.spec.call_timeout)

    # -- the operations: each returns the errnos of the operations inside it (a batch's)
    async def op_ping(self, lane: Lane) -> Counter[str]:
        tree = lane.tree
        if tree.shard is not None and tree.target is None:
            await self.mm.ping(shard=tree.shard)  # the tree's shard (directly or through the proxy)
        else:
            await self.mm.ping(target=tree.target)
        return Counter()

    async def op_remap(self, lane: Lane) -> Counter[str]:
        if lane.spec.race:
            return await self._race_remap(lane)
        frm, to = lane.regions(lane.single_at)
        off = lane.spec.single * PAGE
        await lane.root.remap(to + off, frm + off, PAGE)
        lane.single_at ^= 1
        return Counter()

    async def _race_remap(self, lane: Lane) -> Counter[str]:
        page = self.rng.choice(lane.spec.race)
        race_pos = lane.race_pos
        at = race_pos.get(page, 0)
        frm, to = lane.regions(at)
        off = page * PAGE
        try:
            await lane.root.remap(to + off, frm + off, PAGE)
        except OSError as e:
            if e.errno in (errno_mod.ENOENT, errno_mod.EEXIST):  # another lane moved it: it is there
                race_pos[page] = at ^ 1
            raise
        race_pos[page] = at ^ 1
        return Counter()

    async def op_remap64(self, lane: Lane) -> Counter[str]:
        frm, to = lane.regions(lane.block_at)
        off = lane.spec.block * PAGE
        await lane.root.remap(to + off, frm + off, BLOCK * PAGE)
        lane.block_at ^= 1
        return Counter()

    async def op_walk(self, lane: Lane, blocking: bool) -> Counter[str]:
        if lane.heap is not None:  # a GC page, in the from-space or back in the heap
            addr = lane.heap.where(self.rng.randrange(lane.heap.pages))
        elif lane.spec.swap_pages:
            addr = lane.tree.rw + lane.swap_page(self.rng) * PAGE
            try:
                await lane.root.walk(addr, blocking)
            except OSError as e:
                at = time.perf_counter()
                if e.errno == errno_mod.ENOENT and await self._swapped_out(lane, addr):
                    raise SwappedOut(at) from e
                raise
            return Counter()
        elif lane.spec.race:
            page = self.rng.choice(lane.spec.race)
            addr = lane.regions(lane.race_pos.get(page, 0))[0] + page * PAGE
        else:
            addr = lane.tree.shared + lane.spec.walk_page * PAGE
        await lane.root.walk(addr, blocking)
        return Counter()

    async def op_fork(self, lane: Lane) -> Counter[str]:
        child = await lane.root.fork()
        try:
            await child.exit()
        except BaseException:
            self.orphans.append(child)  # exited at the end of the run, whatever happened
            raise
        return Counter()

    async def _swapped_out(self, lane: Lane, addr: int) -> bool:
        """Whether pagemap shows a swap entry at ``addr`` (False if it cannot tell). A server short of
        room refuses the call (RESOURCE_EXHAUSTED: admission charges every call to --max-memory,
        and a swap mix runs past the budget): asked again, up to SWAP_CHECK_TRIES times, while the
        server reclaims. Only this lane swaps its pages in, so the answer is still the walk's."""
        for attempt in range(SWAP_CHECK_TRIES):
            try:
                return (await lane.root.pagemap(addr, PAGE))[0].swap
            except (OSError, MmsimError) as e:
                if getattr(e, "code", None) != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt + 1 == SWAP_CHECK_TRIES:
                    return False
            except IndexError:
                return False
            await asyncio.sleep(SWAP_CHECK_BACKOFF_S * 2**attempt)
        return False

    async def op_write(self, lane: Lane) -> Counter[str]:
        lane.value += 1
        if not lane.spec.swap_pages:
            await lane.root.write(lane.tree.rw + lane.spec.rw_page * PAGE, lane.value)
            return Counter()
        page = lane.swap_page(self.rng)
        was = lane.expected(page)
        lane.values[page] = None  # not known until the write answers
        try:
            await lane.root.write(lane.tree.rw + page * PAGE, lane.value)
        except OSError as e:
            if e.errno:  # refused (ENOMEM): nothing was written
                lane.values[page] = was
            raise
        lane.values[page] = lane.value
        return Counter()

    async def op_read(self, lane: Lane) -> Counter[str]:
        if not lane.spec.swap_pages:
            await lane.root.read(lane.tree.rw + lane.spec.rw_page * PAGE)
            return Counter()
        page = lane.swap_page(self.rng)
        value = await lane.root.read(lane.tree.rw + page * PAGE)
        want = lane.expected(page)
        if want is None:
            lane.values[page] = value
        elif value != want:
            raise WrongValue(f"page {page} of the rw region read {value}, not {want}")
        return Counter()

    async def op_pageout(self, lane: Lane) -> Counter[str]:
        """MADV_PAGEOUT of PAGEOUT_PAGES pages of the lane's set, or of its remap page (one call in
        PAGEOUT_REMAP_ONE_IN, and always without a set), wherever that is now."""
        spec = lane.spec
        if spec.swap_pages and self.rng.randrange(PAGEOUT_REMAP_ONE_IN):
            n = min(PAGEOUT_PAGES, spec.swap_pages)
            first = spec.swap_first + self.rng.randrange(spec.swap_pages - n + 1)
            await lane.root.madvise(lane.tree.rw + first * PAGE, n * PAGE, "pageout")
        else:
            await lane.root.madvise(lane.regions(lane.single_at)[0] + spec.single * PAGE, PAGE, "pageout")
        return Counter()

    async def op_reclaim(self, lane: Lane) -> Counter[str]:
        """Reclaim of RECLAIM_PAGES folios on the lane's tree's shard (or server)."""
        tree = lane.tree
        if tree.shard is not None and tree.target is None:
            await self.mm.reclaim(RECLAIM_PAGES, shard=tree.shard)
        else:
            await self.mm.reclaim(RECLAIM_PAGES, target=tree.target)
        return Counter()

    async def gc_ready(self, lane: Lane, end: float) -> bool:
        """Wait until the tree's GC cycle has pages to fault on (between two cycles, the collector
        unmaps the old from-space and moves the heap aside again), until ``end``; whether it has.
        A heap whose collector stopped is waited out: its tree's shard restarted, and the tree made
        again comes with a heap of its own (or the run fails with the collector)."""
        while True:
            if not await self.restarts.ready(lane.slot, end):
                return False
            heap = lane.heap
            if heap is None:
                return True
            if heap.dead:
                if time.perf_counter() >= end:
                    return False
                await asyncio.sleep(PROBE_INTERVAL_S)
                continue
            if heap.open.is_set():
                return True
            left = end - time.perf_counter()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(heap.open.wait(), None if left == float("inf") else left)
            except TimeoutError:
                return False

    async def op_gc_read(self, lane: Lane) -> Counter[str]:
        """A mutator's read of a to-space page: it faults, and the read returns once the collector
        has moved the page back (the page's value, or the run fails)."""
        heap = lane.heap
        if heap is None:
            raise GcMixError("gc_read on a lane without a GC heap")
        if not heap.open.is_set():  # open loop: the wait for the next cycle is in the latency
            await heap.open.wait()
        if heap.dead:
            raise GcError("the collector of the heap stopped")
        page = heap.claim()
        value = await lane.root.read(heap.to + page * PAGE)
        if value != lane.tree.gc_value(page):
            raise WrongValue(f"page {page} of the GC heap read {value}, not {lane.tree.gc_value(page)}")
        return Counter()

    async def op_mmap(self, lane: Lane) -> Counter[str]:
        v = await lane.root.mmap(PAGE)
        await lane.root.munmap(v.start, PAGE)
        return Counter()

    def _ping_pong(self, lane: Lane) -> list[ops.Op]:
        """256 single-page remaps of the lane's page, there and back."""
        off = lane.spec.single * PAGE
        a, b = lane.regions(lane.single_at)
        there = ops.remap(lane.root, b + off, a + off, PAGE)
        back = ops.remap(lane.root, a + off, b + off, PAGE)
        return [there, back] * (OPS_PER_CALL["batch"] // 2)

    def _settle(self, lane: Lane, results: list[Any]) -> Counter[str]:
        """The errnos of a batch's remaps (the lane's page follows those that worked). A process
        not found (its shard restarted) fails the call."""
        inner: Counter[str] = Counter()
        lost = next((r for r in results if isinstance(r, ProcessNotFoundError)), None)
        if lost is not None:
            raise lost
        for r in results:
            if isinstance(r, BaseException):
                _, err = classify(r)
                inner[err or type(r).__name__] += 1
            else:
                lane.single_at ^= 1  # each move that worked moved the page across
        return inner

    async def op_batch(self, lane: Lane) -> Counter[str]:
        return self._settle(lane, await self.mm.batch(self._ping_pong(lane)))

    async def op_stream(self, lane: Lane) -> Counter[str]:
        try:
            if lane.stream is None:
                lane.stream = self.mm.batch_stream(via=lane.root)
                await lane.stream.__aenter__()
            return self._settle(lane, await lane.stream.run(self._ping_pong(lane)))
        except (OSError, MmsimError, EOFError) as e:
            if not (isinstance(e, OSError) and e.errno):  # the stream is broken: the next call opens another
                await lane.drop_stream(e)
            raise

    # -- running one operation on a lane
    async def call(self, lane: Lane, op: str, began: float, rec: Recorder) -> None:
        """Make one call on ``lane`` and record it. A failure that a restart of the tree's shard
        caused is the ``shard_restarted`` outcome; telling so waits for the tree's recovery (the
        latency recorded ends with the failure)."""
        self.inflight += 1
        inner: Counter[str] = Counter()
        try:
            version = await lane.sync()
            try:
                inner = await self.ops[op](lane)
                status, err = "OK", None
            except SwappedOut as e:
                rec.record(op, began, e.at, "NOT_FOUND", SWAPPED_OUT, inner, OPS_PER_CALL[op])
                return
            except (OSError, MmsimError, EOFError, GcError) as e:
                failed_at = time.perf_counter()
                status, err = classify(e)
                if await self.restarts.caused(lane.slot, version, e, failed_at):
                    err = SHARD_RESTARTED
                rec.record(op, began, failed_at, status, err, inner, OPS_PER_CALL[op])
                return
            except WrongValue:
                status, err = "WRONG_VALUE", None  # a failure: the page lost its value
        finally:
            self.inflight -= 1
        rec.record(op, began, time.perf_counter(), status, err, inner, OPS_PER_CALL[op])

    async def collect(self, slot: TreeSlot, stop: asyncio.Event) -> dict[str, int]:
        """Run the collector of ``slot``'s heap until ``stop``, and after a restart of the tree's
        shard that of the heap made again (none once the tree is lost); what they did, summed. A
        collector that fails otherwise fails the run."""
        done: Counter[str] = Counter()
        while True:
            heap, version = slot.heap, slot.version
            assert heap is not None
            try:
                return dict(done + Counter(await heap.run(stop)))
            except (OSError, MmsimError, EOFError, GcError) as e:
                done += heap.stats
                if not await self.restarts.caused(slot, version, e, time.perf_counter()):
                    raise
            if not await self.restarts.ready(slot, float("inf")) or slot.heap is None or stop.is_set():
                await stop.wait()  # the tree is gone: no collector until the run's end
                return dict(done)

    async def close(self) -> list[str]:
        """Close the lanes' streams, exit the children that forks left and the trees made again
        after restarts (unless ``keep``); what kept a process from exiting."""
        for lane in self.lanes:
            stream, lane.stream = lane.stream, None
            if stream is not None:
                try:
                    await stream.__aexit__(None, None, None)
                except (OSError, MmsimError, EOFError):
                    pass  # broken by a restart of its shard: nothing to close
        for child in self.orphans:
            try:
                await child.exit()
            except (ProcessNotFoundError, ProcessLookupError):
                pass  # it did exit, or its shard restarted
            except MmsimError:
                pass  # its shard is unreachable: its tree goes with the teardown's
        return await self.restarts.close(self.spec.keep)


async def _progress(worker: Worker, rec: Recorder, conn: Connection, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), PROGRESS_S)
        except TimeoutError:
            pass
        hist = encode(rec.interval)
        rec.interval.reset()
        conn.send(("progress", {"worker": worker.spec.index, "calls": rec.calls, "problems": rec.problems,
                                "inflight": worker.inflight, "interval": hist}))


async def run_worker(spec: WorkerSpec, conn: Connection) -> dict[str, Any]:
    async with spec.access.client(timeout=spec.call_timeout, retries=0) as mm:
        await mm.routes()  # the discovery, before the start: no call of the run waits for it
        worker = Worker(spec, mm)
        stop_gc = asyncio.Event()  # set once every lane is done: no read waits on a collector then
        collectors = [asyncio.create_task(worker.collect(worker.slots[t], stop_gc)) for t in spec.gc_trees]
        await asyncio.sleep(max(0.0, spec.start_at - time.time()))
        t0 = time.perf_counter()
        warm_end = t0 + spec.warmup
        end = warm_end + spec.duration if spec.duration is not None else float("inf")
        worker.restarts.end = end
        rec = Recorder(warm_end, end)
        cpu_at_warm_end: list[float] = []

        async def mark_warm_end() -> None:
            await asyncio.sleep(spec.warmup)
            cpu_at_warm_end.append(time.process_time())

        marker = asyncio.create_task(mark_warm_end())
        stop_progress = asyncio.Event()
        progress = asyncio.create_task(_progress(worker, rec, conn, stop_progress))
        counted = 0
        interrupted = False

        def on_message() -> None:  # the parent's ("stop",): no new call; those in flight finish
            nonlocal interrupted
            try:
                while conn.poll():
                    if conn.recv()[0] == "stop":
                        interrupted = True
            except (EOFError, OSError):
                interrupted = True  # the parent is gone
            if interrupted:
                asyncio.get_running_loop().remove_reader(conn.fileno())

        asyncio.get_running_loop().add_reader(conn.fileno(), on_message)

        def may_issue(began: float) -> bool:
            nonlocal counted
            if began >= end or interrupted:
                return False
            if spec.count is not None and began >= warm_end:
                if counted >= spec.count:
                    return False
                counted += 1
            return True

        async def closed_loop() -> None:
            async def lane_loop(lane: Lane) -> None:
                while True:
                    if not await worker.restarts.ready(lane.slot, end):  # its tree made again, or lost
                        return
                    op = worker.choose()
                    prepare = worker.prepare.get(op)
                    if prepare is not None and not await prepare(lane, end):
                        return
                    began = time.perf_counter()
                    if not may_issue(began):
                        return
                    await worker.call(lane, op, began, rec)

            await asyncio.gather(*(lane_loop(lane) for lane in worker.lanes))

        async def open_loop() -> None:
            assert spec.rate is not None and spec.rate > 0
            interval = 1.0 / spec.rate
            free: asyncio.Queue[Lane] = asyncio.Queue()
            for lane in worker.lanes:
                free.put_nowait(lane)
            tasks: set[asyncio.Task[None]] = set()

            async def run_on(lane: Lane, op: str, intended: float) -> None:
                try:
                    if await worker.restarts.ready(lane.slot, end):  # the wait is in the latency
                        await worker.call(lane, op, intended, rec)
                finally:
                    free.put_nowait(lane)

            k = 0
            while True:
                intended = t0 + k * interval
                if not may_issue(intended):
                    break
                ahead = intended - time.perf_counter()
                if ahead > LATE_S:
                    await asyncio.sleep(ahead)
                lane = await free.get()  # every lane busy: this send leaves late
                if time.perf_counter() - intended > LATE_S and intended >= warm_end:
                    rec.late += 1
                task = asyncio.create_task(run_on(lane, worker.choose(), intended))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                k += 1
            if tasks:
                await asyncio.gather(*tasks)

        await _drive(closed_loop() if spec.mode == "closed" else open_loop(), collectors)
        finished = time.perf_counter()
        stop_gc.set()
        gc = [await c for c in collectors]
        if not interrupted:
            asyncio.get_running_loop().remove_reader(conn.fileno())
        marker.cancel()
        cpu0 = cpu_at_warm_end[0] if cpu_at_warm_end else time.process_time()
        cpu = time.process_time() - cpu0
        stop_progress.set()
        await progress
        problems = await worker.close()
        result = rec.result()
        result.update(restarts=worker.restarts.result(), problems=problems)
        if gc:
            result["gc"] = dict(sum((Counter(g) for g in gc), Counter(trees=len(gc))))
        wall = max(0.0, finished - warm_end)
        result.update(
            worker=spec.index,
            cpu_s=cpu,
            wall_s=wall,
            end_reason="interrupted" if interrupted else "count" if spec.count is not None else "duration",
        )
        return result


async def _drive(lanes: Awaitable[None], collectors: list[asyncio.Task[dict[str, int]]]) -> None:
    """Run the lanes; a collector that stops before they are done (it failed) fails the worker
    rather than leave reads waiting on it."""
    if not collectors:
        await lanes
        return
    driving = asyncio.ensure_future(lanes)
    await asyncio.wait({driving, *collectors}, return_when=asyncio.FIRST_COMPLETED)
    if not driving.done():
        driving.cancel()
        await asyncio.gather(driving, return_exceptions=True)
        for c in collectors:
            if c.done():
                c.result()  # its exception
        raise RuntimeError("a GC collector stopped before the run's end")
    driving.result()


def worker_main(conn: Connection) -> None:
    """The worker process: wait for the spec, run, send the result. Ctrl-C reaches the parent, which
    stops the workers with a message (their figures up to then are reported)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        msg = conn.recv()
        if msg[0] != "go":
            return
        conn.send(("result", asyncio.run(run_worker(msg[1], conn))))
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        pass
    except Exception:  # noqa: BLE001 - the parent reports the traceback
        try:
            conn.send(("error", traceback.format_exc(limit=8)))
        except (BrokenPipeError, OSError):
            pass
    finally:
        conn.close()
