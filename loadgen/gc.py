"""The GC workload's collector: one per tree, a task in the worker that has every lane of the tree.

Android ART's concurrent compacting GC, as a load (``server/tools/race.py``'s ``gc_race`` is the
in-process version). The tree's root has a heap registered MISSING with its userfaultfd. Each cycle:

1. ``mremap(heap, len, len, MAYMOVE | DONTUNMAP)`` moves every page to a from-space, leaving the heap
   range (the to-space) mapped, empty and still registered;
2. mutators (the ``gc_read`` operation) read to-space pages; each read faults and sleeps on the
   server, and its event reaches the collector on the process's ``Userfaults`` stream;
3. the collector resolves each fault with ``remap(to_page, from_page, 4096)`` (UFFDIO_MOVE), which
   wakes the read; two mutators may fault on one page, so a move may find the page already back
   (EEXIST, or ENOENT: the source gone), which is counted and otherwise harmless;
4. when every page is back and every move of the cycle has ended (a second fault's move left running
   would land in the next cycle, and take its page there for one already back, whose reader then
   sleeps for good), it unmaps the emptied from-space and starts the next cycle.

Walks (``walk``, ``walk_blocking``) meanwhile walk the same folios wherever they are, from-space or
to-space (``GcHeap.where``). At the end of the run (the worker's lanes all done, so no read waits)
the collector moves the pages still in the from-space back, unmaps it and closes its stream: the
heap is whole again, and no task is left running.
"""

from __future__ import annotations

import asyncio
import errno as errno_mod
import random
from collections import Counter
from typing import Any

from mmsim.client import MmsimError, Process, UserfaultEvent

from .workload import PAGE, TreeSpec

#: Errnos of a collector's move that mean the page is already back (another fault's move did it).
ALREADY_BACK = {errno_mod.EEXIST: "EEXIST", errno_mod.ENOENT: "ENOENT"}
#: Errnos of a move worth trying again (the folio busy for a moment), and how often.
TRANSIENT = frozenset({errno_mod.EAGAIN, errno_mod.EBUSY})
TRANSIENT_TRIES = 50


class GcError(Exception):
    """The collector could not go on (the run fails with this, rather than leave reads asleep)."""


class GcHeap:
    """One tree's heap and its collector's state, shared by the tree's lanes (one event loop).

    During a cycle, ``pending`` is the set of pages still in the from-space at ``frm``; ``unclaimed``
    those no mutator has read yet this cycle, which mutators take first, so that almost every read
    faults. ``open`` is set while some page is pending: a mutator waits for it before reading."""

    def __init__(self, tree: TreeSpec, root: Process, rng: random.Random, call_timeout: float) -> None:
        self.tree = tree
        self.root = root
        self.rng = rng
        self.timeout = call_timeout
        self.to = tree.gc
        self.pages = tree.gc_pages
        self.length = tree.gc_pages * PAGE
        self.frm: int | None = None
        self.pending: set[int] = set()
        self.unclaimed: list[int] = []
        self.open = asyncio.Event()
        self.back = asyncio.Event()  # every page of the cycle is back
        self.failed: BaseException | None = None
        self.broken = asyncio.Event()
        self.moves: set[asyncio.Task[None]] = set()
        self.between = True  # no cycle's state yet (before the first, between two): events wait
        self.deferred: list[UserfaultEvent] = []
        self.stats: Counter[str] = Counter()
        self.dead = False  # the collector stopped: its tree is gone, or it failed

    def abandon(self) -> None:
        """Give the heap up (its tree's shard restarted: the tree is gone): the collector stops, and
        no mutator waits on it any longer."""
        if self.failed is None:
            self.failed = GcError(f"the tree {self.tree.root_pid} of the heap is gone")
        self.broken.set()
        self.dead = True
        self.open.set()

    # -- the lanes' side
    def claim(self) -> int:
        """The page a mutator reads now (the heap is open): one nobody read this cycle, else one
        another mutator faulted on (the second fault on a page)."""
        if self.unclaimed:
            return self.unclaimed.pop()
        self.stats["second_faults"] += 1
        return self.rng.choice(tuple(self.pending))

    def where(self, page: int) -> int:
        """Where page ``page``'s folio is now: the from-space while it is pending, else the heap."""
        if page in self.pending and self.frm is not None:
            return self.frm + page * PAGE
        return self.to + page * PAGE

    # -- the collector
    async def run(self, stop: asyncio.Event) -> dict[str, int]:
        """Cycle until ``stop`` (set once no lane of the tree is left), then leave the heap whole.
        The counts of what it did."""
        events = self.root.userfaults()
        pump = asyncio.create_task(self._pump(events))
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                await self._start_cycle()
                back = asyncio.create_task(self.back.wait())
                broken = asyncio.create_task(self.broken.wait())
                try:
                    await asyncio.wait({back, broken, stopping, pump}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    back.cancel()
                    broken.cancel()
                self._check(pump)
                if self.back.is_set():
                    if self.moves:  # a second fault's move of a page back already: it ends in this cycle
                        await asyncio.gather(*self.moves, return_exceptions=True)
                        self._check(pump)
                    await self._end_cycle()
            if self.moves:
                await asyncio.gather(*self.moves, return_exceptions=True)
            self._check(pump)
            await self._finish()
        except BaseException:
            self.dead = True
            self.open.set()  # no mutator waits for a collector that stopped
            raise
        finally:
            stopping.cancel()
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
            await events.aclose()
            for t in list(self.moves):
                t.cancel()
        return dict(self.stats)

    def _check(self, pump: asyncio.Task[None]) -> None:
        if isinstance(self.failed, GcError):
            raise self.failed
        if self.failed is not None:
            raise GcError(f"the collector of tree {self.tree.root_pid}'s heap: {self.failed}") from self.failed
        if pump.done():
            exc = pump.exception() if not pump.cancelled() else None
            raise GcError(f"the userfault stream of tree {self.tree.root_pid} ended: {exc or 'the process exited'}")

    async def _start_cycle(self) -> None:
        vma = await self.root.mremap(self.to, self.length, self.length, maymove=True, dontunmap=True,
                                     timeout=self.timeout)
        self.frm = vma.start
        self.pending = set(range(self.pages))
        self.unclaimed = list(range(self.pages))
        self.rng.shuffle(self.unclaimed)
        self.back.clear()
        self.between = False
        self.stats["cycles_started"] += 1
        self.open.set()
        deferred, self.deferred = self.deferred, []
        for ev in deferred:  # faults taken while the cycle was being set up
            self._on_fault(ev)

    async def _end_cycle(self) -> None:
        self.between = True
        assert self.frm is not None
        await self.root.munmap(self.frm, self.length, timeout=self.timeout)  # the emptied from-space
        self.frm = None
        self.stats["cycles"] += 1

    async def _finish(self) -> None:
        """Move back whatever no mutator faulted on, and unmap the from-space."""
        self.between = True
        self.open.clear()
        if self.frm is None:
            return
        for page in sorted(self.pending):
            try:
                await self.root.remap(self.to + page * PAGE, self.frm + page * PAGE, PAGE, timeout=self.timeout)
                self.stats["moved_at_end"] += 1
            except OSError as e:
                if e.errno not in ALREADY_BACK:
                    raise
        self.pending.clear()
        await self.root.munmap(self.frm, self.length, timeout=self.timeout)
        self.frm = None

    async def _pump(self, events: Any) -> None:
        async for ev in events:
            self.stats["faults"] += 1
            if self.between:
                self.deferred.append(ev)
            else:
                self._on_fault(ev)

    def _on_fault(self, ev: UserfaultEvent) -> None:
        page = (ev.addr - self.to) // PAGE
        if not 0 <= page < self.pages:
            self.stats["stray_faults"] += 1
            return
        if page not in self.pending:  # already back: its move woke this fault too
            self.stats["faults_already_back"] += 1
            return
        task = asyncio.create_task(self._move(page))
        self.moves.add(task)
        task.add_done_callback(self.moves.discard)

    async def _move(self, page: int) -> None:
        frm = self.frm
        assert frm is not None
        try:
            for attempt in range(TRANSIENT_TRIES):
                try:
                    await self.root.remap(self.to + page * PAGE, frm + page * PAGE, PAGE, timeout=self.timeout)
                    self.stats["moves"] += 1
                    break
                except OSError as e:
                    if e.errno in ALREADY_BACK:  # a second fault's move: the first brought it back
                        self.stats[f"move_{ALREADY_BACK[e.errno]}"] += 1
                        break
                    if e.errno in TRANSIENT and attempt + 1 < TRANSIENT_TRIES:
                        self.stats["move_retries"] += 1
                        await asyncio.sleep(0.001 * (attempt + 1))
                        continue
                    raise
        except (OSError, MmsimError) as e:
            self.failed = e
            self.broken.set()
            return
        self.pending.discard(page)
        try:
            self.unclaimed.remove(page)  # a stale event brought it back early: no mutator reads it
        except ValueError:
            pass
        if not self.pending:
            self.open.clear()
            self.back.set()


__all__ = ["GcError", "GcHeap"]
