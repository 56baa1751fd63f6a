"""A shard that restarts under the run: telling its failures from others, and re-creating its trees.

When a shard of ``mmsim serve --shards N`` dies, its supervisor starts it again under a new
generation, and every process it had is gone. A worker's calls on a tree of that shard then fail:
UNAVAILABLE while it is down (those in flight, and those sent meanwhile), a BatchStream breaks, and
once it serves again each call on an old handle gets NOT_FOUND with reason SHARD_RESTARTED
(``ShardRestartedError``), each operation of a Batch NOT_FOUND.

A worker holds each of its trees in a :class:`TreeSlot`. The first call on a tree that fails in a
way a restart could explain has the slot *recover* (one recovery at a time; the other lanes of the
tree wait for it): the tree's root is probed until its shard answers, and a SHARD_RESTARTED answer
is a restart; any other answer, or none within ``RESTART_WAIT_S``, is not, and the failure stands.
On a restart before the run's end the tree is built anew on the restarted shard, as it was (its
regions, chain and GC heap), and its lanes move to it; their calls that the restart cost count as
the ``shard_restarted`` outcome. A tree that cannot be built again is left: its lanes stop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import grpc

from mmsim.client import Client, MmsimError, Process, ProcessNotFoundError, ShardRestartedError

from .access import Access
from .gc import GcError, GcHeap
from .workload import TreeSpec, Workload, build_tree, teardown

#: The outcome (in a figures object's ``errors``) of a call that its tree's shard restart cost.
SHARD_RESTARTED = "shard_restarted"
#: The longest a shard is waited for (once unreachable) before a failure is not taken as its restart.
RESTART_WAIT_S = 10.0
#: Deadline of one probe of a tree's root, and the pause between two.
PROBE_TIMEOUT_S = 1.0
PROBE_INTERVAL_S = 0.05
#: Statuses without an errno that a restart of the call's shard gives (or may, for a call in flight).
RESTART_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.NOT_FOUND,
})


def may_be_restart(exc: BaseException) -> bool:
    """Whether a restart of the call's shard could explain ``exc`` (an errno cannot: the process answered)."""
    if isinstance(exc, OSError) and exc.errno:
        return False
    if isinstance(exc, MmsimError):
        return isinstance(exc, ProcessNotFoundError) or exc.code in RESTART_CODES
    return isinstance(exc, (EOFError, GcError))


class TreeSlot:
    """One tree as a worker uses it: its spec and root now, and its GC heap in a GC mix.

    ``version`` grows with each re-creation (a lane seeing a new one starts its pages over);
    ``recovery`` is the recovery under way, ``lost`` says the tree is gone for the rest of the run."""

    def __init__(self, index: int, spec: TreeSpec, root: Process) -> None:
        self.index = index
        self.spec = spec
        self.root = root
        self.version = 0
        self.heap: GcHeap | None = None
        self.race_pos: dict[int, int] = {}  # race profile: page -> where it is (0 source, 1 destination)
        self.recovery: asyncio.Task[bool] | None = None
        self.recovery_started = 0.0
        self.lost = False

    @property
    def shard(self) -> str:
        """What names its shard in the report: the index, or with several targets the server's address."""
        return str(self.spec.shard) if self.spec.shard is not None else str(self.spec.target)


class Restarts:
    """A worker's side of shard restarts: recovering its slots, the generations seen, the trees made."""

    def __init__(
        self, mm: Client, access: Access, call_timeout: float, new_heap: Callable[[TreeSlot], GcHeap | None],
    ) -> None:
        self.mm = mm
        self.access = access
        self.call_timeout = call_timeout
        self.new_heap = new_heap
        self.end = float("inf")  # perf_counter() at which the run ends: no tree is made after it
        self.wait_s = min(RESTART_WAIT_S, call_timeout)
        #: Every process made by a re-creation, for the teardown.
        self.workload = Workload()
        #: shard -> the generations it restarted under, as seen here.
        self.generations: dict[str, set[str]] = {}
        self.recreated = 0
        self._static: dict[str, Client] = {}

    async def caused(self, slot: TreeSlot, version: int, exc: BaseException, failed_at: float) -> bool:
        """Whether a restart of ``slot``'s shard caused ``exc``, the failure (at ``failed_at``,
        perf_counter()) of a call made on the slot's ``version``. It waits for a recovery of the
        slot that started after the failure, starting one if none has: for the shard, up to
        ``RESTART_WAIT_S``, and for the tree to be made again."""
        if not may_be_restart(exc):
            return False
        while slot.version == version:
            if slot.lost:
                return True  # its shard restarted, and the tree could not be made again
            recovery = slot.recovery
            if recovery is None:
                recovery = slot.recovery = asyncio.create_task(self._recover(slot, exc))
                slot.recovery_started = time.perf_counter()
            if slot.recovery_started < failed_at:  # began before this failure: its probe may predate it
                await asyncio.wait({recovery})
                continue
            return await asyncio.shield(recovery) or slot.version != version
        return True  # the tree was made again meanwhile: this call was on the one that is gone

    async def ready(self, slot: TreeSlot, until: float) -> bool:
        """Wait for ``slot``'s recovery, if one is under way, until ``until`` (perf_counter());
        whether the tree is usable."""
        while (recovery := slot.recovery) is not None:
            left = until - time.perf_counter()
            if left <= 0:
                return False
            await asyncio.wait({recovery}, timeout=None if left == float("inf") else left)
        return not slot.lost

    async def _recover(self, slot: TreeSlot, exc: BaseException) -> bool:
        """Tell whether the slot's shard restarted (probing its root unless ``exc`` says so); if it
        did, make the tree again before the run's end. Whether it restarted."""
        try:
            deadline = time.perf_counter() + self.wait_s
            if isinstance(exc, ShardRestartedError):
                generation = exc.metadata.get("generation", "")
            else:
                found = await self._probe(slot.root, deadline)
                if found is None:
                    return False
                generation = found
            self.generations.setdefault(slot.shard, set()).add(generation)
            if slot.heap is not None:
                slot.heap.abandon()
            if time.perf_counter() >= self.end:
                slot.lost = True
                return True
            try:
                await self._rebuild(slot, max(deadline, time.perf_counter() + self.wait_s))
            except (OSError, MmsimError):
                slot.lost = True  # the shard serves no new tree: the lanes of this one stop
            return True
        finally:
            slot.recovery = None

    async def _probe(self, root: Process, deadline: float) -> str | None:
        """The generation ``root``'s shard restarted under, or None when the root answers (or is
        gone otherwise, or the shard stays unreachable until ``deadline``)."""
        while True:
            try:
                await root.vmas(timeout=PROBE_TIMEOUT_S)
                return None
            except ShardRestartedError as e:
                return e.metadata.get("generation", "")
            except ProcessNotFoundError:
                return None
            except MmsimError as e:
                if e.code not in RESTART_CODES or time.perf_counter() >= deadline:
                    return None
            except OSError:
                return None
            await asyncio.sleep(PROBE_INTERVAL_S)

    async def _rebuild(self, slot: TreeSlot, deadline: float) -> None:
        """Build the slot's tree again on its shard, as it was, trying again while the shard is
        still starting (or restarts again) until ``deadline``; then move the slot to it."""
        old = slot.spec
        while True:
            try:
                mm = await self._client_of(old)
                root = await (mm.create_process(shard=old.shard) if old.target is None else mm.create_process())
                spec = await build_tree(
                    self.workload, mm, root, static=old.target is not None, pages=old.shared_pages,
                    fork_depth=len(old.chain), remap=old.remap_pages, rw_pages=old.rw_pages, gc=bool(old.gc),
                    swap_pages=old.swap_pages,
                )
                break
            except MmsimError as e:
                if e.code not in RESTART_CODES or time.perf_counter() >= deadline:
                    raise
                await asyncio.sleep(PROBE_INTERVAL_S)
        slot.spec = spec
        slot.root = self.mm.process(spec.root, spec.root_pid, target=spec.target)
        slot.race_pos = {}
        slot.version += 1
        slot.heap = self.new_heap(slot)
        self.recreated += 1

    async def _client_of(self, tree: TreeSpec) -> Client:
        """The client that makes a tree where ``tree`` was: the worker's, or with several targets
        one of that server alone (the worker's client creates on each in turn)."""
        if tree.target is None:
            return self.mm
        client = self._static.get(tree.target)
        if client is None:
            access = replace(self.access, targets=(tree.target,), routing="auto")
            client = self._static[tree.target] = access.client(timeout=self.call_timeout, retries=0)
        return client

    async def close(self, keep: bool) -> list[str]:
        """Exit the trees made here (unless ``keep``), close the clients; what kept a process from exiting."""
        problems: list[str] = []
        if not keep:
            _, problems = await teardown(self.mm, self.workload)
        for client in self._static.values():
            await client.close()
        return problems

    def result(self) -> dict[str, Any]:
        return {"generations": {k: sorted(v) for k, v in self.generations.items()}, "recreated": self.recreated}


__all__ = ["PROBE_TIMEOUT_S", "RESTART_WAIT_S", "SHARD_RESTARTED", "Restarts", "TreeSlot", "may_be_restart"]
