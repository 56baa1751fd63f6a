"""``mmsim explore``: schedule exploration of a litmus scenario in one in-process model.

The model's tasks are put under a :class:`Controller` (``Kernel.attach_controller``): at every
named preemption point, at every sleep on a lock or an RCU grace period and after every wake-up the
running thread parks, and the controller picks which parked thread goes on. At the hardware's
granularity (``--points all``, the DPOR search's default) it parks after every marked access and
lock operation too: those are plain calls in synchronous code, so each thread's steps run in a
greenlet of their own (:class:`_GreenTask`) and park there (:meth:`Controller.park_sync`). Only one thread runs
at a time, and the model is otherwise deterministic, so a run is a function of the scenario, the
protocol, the mutant and the list of picks: the *schedule*.

Strategies choose the picks:

- ``random``: a seeded uniform pick at every decision;
- ``pct``: probabilistic concurrency testing (Burckhardt et al.): random thread priorities, the
  highest-priority runnable thread runs, and at ``depth - 1`` random steps the running thread's
  priority drops below all others (a bug of depth d is found with probability ≥ 1/(n·k^(d-1)));
- ``exhaustive``: every schedule with at most ``--preemptions`` preemptions (a preemption: the
  running thread could go on and another is picked), depth-first, skipping a decision whose state
  (each thread's place and the model's shared state) was already explored with as many
  preemptions left.

A schedule is written down as its preemptions only: ``(step, thread)`` pairs; at every other
decision the running thread goes on (or, when it cannot, the first runnable one). That is what a
replay token carries, with the scenario's text, so ``mmsim explore --replay TOKEN`` needs nothing
else and reproduces the same events in the same order.
"""

from __future__ import annotations

import asyncio
import base64
import errno as errno_mod
import gc
import hashlib
import html
import io
import json
import multiprocessing as mp
import operator
import pickle
import random
import sys
import threading
import time
import types
import zlib
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import greenlet
from sortedcontainers import SortedDict, SortedList, SortedSet

from mmsim.v1.operations import BY_LITMUS, require

from ..mm import mm_types
from ..mm import trace as mm_trace
from ..mm.kernel import Deadlock, IdCounter, Kernel
from ..mm.ledger import PageLedger
from ..mm.locks import Mutex, RwSem, SpinLock, _Lock
from ..mm.memcontrol import MemCgroup
from ..mm.mm_types import (
    GUP_PIN_COUNTING_BIAS,
    PAGE_SIZE,
    Folio,
    GupPin,
    HugePmd,
    KeyedBytes,
    KeyedDict,
    LargeFolio,
    Mm,
    MmError,
    PageTable,
    Pte,
    SwapPte,
    Vma,
    is_migration_entry,
)
from ..mm.model import MemoryModel
from ..mm.rcu import Rcu, TypesafeCache, TypesafeObject
from ..mm.rmap import AnonVma, AnonVmaChain
from ..mm.swap import Lruvec
from ..mm.swapfile import SwapInfo
from ..mm.userfaultfd import Userfault, UserfaultfdCtx
from .litmus import Op, Scenario, ScenarioError, parse

STRATEGIES = ("random", "pct", "exhaustive", "dpor")
#: Where a search may interleave the threads (``--points``): at the named preemption points, lock
#: sleeps and wake-ups; or there and at every marked access and lock operation too.
POINT_SETS = ("named", "all")
#: Decisions in one schedule before it is cut short (a thread that never stops retrying).
MAX_STEPS = 20_000


# ---------------------------------------------------------------------------------------------
# The controller


_enter_task = asyncio.tasks._enter_task
_leave_task = asyncio.tasks._leave_task
_PyTask: Any = asyncio.tasks._PyTask  # type: ignore[attr-defined]


class _GreenTask(_PyTask):
    """A task each of whose steps runs in a greenlet of its own, so that its thread can park in the
    middle of synchronous code (Controller.park_sync): the model's marked accesses, lock operations
    and spin_locks are plain calls, and at the hardware's granularity each is a point."""

    def _Task__step(self, exc: BaseException | None = None) -> None:
        g = greenlet.greenlet(_PyTask._Task__step)
        g.gr_context = self._context
        g.switch(self, exc)


def _green_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
    task: asyncio.Task[Any] = _GreenTask(coro, loop=loop, **kwargs)
    return task


class Thread:
    __slots__ = ("index", "name", "ops", "state", "go", "point", "op_index", "held", "solo", "waits", "bit",
                 "sleeps_in", "inside", "spinlocks")

    def __init__(self, index: int, name: str, ops: list[Op]) -> None:
        self.index = index
        self.name = name
        self.ops = ops
        self.state = "running"  # running (until it parks at its start) | parked | blocked | done
        self.go: asyncio.Future[None] | None = None
        self.point = "start"
        self.op_index = 0
        self.held: list[str] = []
        #: The points it parked at since it last ran after another thread.
        self.solo: set[str] = set()
        #: The lock it sleeps on, while it sleeps on one (known when lock operations are traced).
        self.waits: Any = None
        #: Whether it sleeps only on that lock's bit, to take nothing (Mutex.wait_bit).
        self.bit = False
        #: The function it last slept in (locks' wait, synchronize_rcu, userfault_wait).
        self.sleeps_in = ""
        #: Parked inside synchronous code (Controller.park_sync): its stack cannot be looked into.
        self.inside = False
        #: The spinlocks (PTLs) it holds, while lock operations are traced.
        self.spinlocks = 0


@dataclass(slots=True)
class Event:
    step: int
    thread: int  # -1: the explorer itself (findings)
    kind: str  # point | lock | state | op | result | finding
    text: str
    held: tuple[str, ...] = ()


class Controller:
    """Runs the threads one at a time, asking ``choose`` at each decision (see module doc)."""

    def __init__(self, threads: list[Thread], choose: Callable[[Decision], int],
                 fingerprint: Callable[[], object] | None = None, fine: bool = False) -> None:
        self.threads = threads
        #: Every marked access and lock operation is a decision too (the threads run as _GreenTasks).
        self.fine = fine
        self.choose = choose
        #: The state each decision is taken in, when asked for (the exhaustive search prunes on it).
        self.fingerprint = fingerprint
        self.by_task: dict[asyncio.Task[Any], Thread] = {}
        self.sleepers: dict[int, Thread] = {}
        self.finished = asyncio.Event()
        self.current: Thread | None = None
        self.step = 0
        self.events: list[Event] = []
        self.decisions: list[Decision] = []
        self.cut = False
        #: Past the step limit: the threads run on unsupervised.
        self.detached = False
        #: Every live thread asleep, none to wake it: the threads of a deadlock, else empty.
        self.stuck: list[Thread] = []
        #: Set when every live thread sleeps while they run unsupervised (past the step limit).
        self.all_asleep: asyncio.Event | None = None
        #: The DPOR search's record of each step's accesses (told of sleeps and wake-ups), if any.
        self.watch: _Watch | None = None
        #: What ``choose`` raised, if it did (run_schedule raises it once the threads ran out).
        self.error: Exception | None = None

    def _thread(self) -> Thread | None:
        task = asyncio.current_task()
        th = self.by_task.get(task)  # type: ignore[arg-type]
        if th is None and self.current is not None and task is not None:
            # A task the running thread started and awaits (uninterruptible teardown): its own.
            th = self.by_task[task] = self.current
        return th

    def record(self, kind: str, text: str, th: Thread | None = None) -> None:
        th = th or self.current
        if th is None:
            self.events.append(Event(self.step, -1, kind, text))
        else:
            self.events.append(Event(self.step, th.index, kind, text, tuple(th.held) if th.held else ()))

    def wants(self, point: str) -> bool:
        """Park at ``point``, unless the running thread already parked there since another thread
        last ran: a retry loop that yields and re-validates (move_pages_pte) must go on, or it
        would come back to the same choice forever."""
        th = self._thread()
        if th is None or self.detached:
            return False
        return point not in th.solo

    async def park(self, point: str) -> None:
        th = self._thread()
        if th is None:
            return
        if self.detached:  # past the step limit: a plain yield, so that spinners let others run
            await asyncio.sleep(0)
            return
        if point.startswith("lock:"):  # the sleep on it ended: granted
            th.held.append(point[5:])
            th.waits = None
        elif point.startswith("woken:"):  # the sleep on its bit ended: let go (Mutex.wait_bit)
            th.waits = None
        if point != "start":
            self.record("point", point, th)
        th.solo.add(point)
        if self._stop(th, point):  # another thread was picked (or still runs): wait for a pick
            th.go = asyncio.get_running_loop().create_future()
            await th.go
        # else it picked itself: it goes on at once, without a turn of the event loop

    def _stop(self, th: Thread, point: str) -> bool:
        """``th`` parks at ``point`` and the next thread is picked; True unless it picked ``th``."""
        th.point = point
        th.state = "parked"
        th.go = None
        self._check_idle()
        if self.detached:  # the decision let the threads run out (the step limit, a failed pick)
            th.state = "running"
            return False
        return th.state == "parked"

    def park_sync(self, point: str) -> bool:
        """Park at ``point`` from synchronous code: a marked access, a lock operation or a contended
        spin_lock, which are points of their own at the hardware's granularity (``fine``). The
        running task's step is suspended where it is (its greenlet: _GreenTask) and goes on when
        the thread is picked again. False where the task cannot stop (not fine, not a thread's
        task, past the step limit)."""
        if not self.fine:
            return False
        th = self._thread()
        if th is None or self.detached:
            return False
        g = greenlet.getcurrent()
        if g.parent is None:  # not inside a _GreenTask's step (a callback of the loop)
            return False
        if not self._stop(th, point):  # it picked itself
            return True
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        go = th.go = loop.create_future()
        th.inside = True

        def resume(_: object) -> None:
            _enter_task(loop, task)
            g.switch()

        go.add_done_callback(resume)
        _leave_task(loop, task)
        g.parent.switch()  # back to the event loop; resume() comes back here
        th.inside = False
        return True

    def blocked(self, key: object) -> None:
        th = self._thread()
        if th is None:
            return
        self.sleepers[id(key)] = th
        th.sleeps_in = sys._getframe(1).f_code.co_name
        if self.detached:
            # Unsupervised, a sleep is only counted: one sleeper per live thread is a deadlock.
            live = [t for t in self.threads if t.state != "done"]
            if self.all_asleep is not None and len(self.sleepers) >= len(live) and not self.stuck:
                self.stuck = live
                self.all_asleep.set()
            return
        th.state = "blocked"
        self.record("point", "sleeps", th)
        self._check_idle()

    def woken(self, key: object) -> None:
        th = self.sleepers.pop(id(key), None)
        if th is not None:
            th.state = "running"  # it parks again before it touches anything
            if self.watch is not None:
                self.watch.woke(th)

    def done(self, th: Thread) -> None:
        th.state = "done"
        if not self.detached:
            self._check_idle()

    def _check_idle(self) -> None:
        if not any(t.state == "running" for t in self.threads):
            self._decide()

    def _detach(self) -> None:
        """Stop deciding: the parked threads run out unsupervised (the step limit, a failed pick)."""
        self.cut = self.detached = True
        for t in self.threads:
            if t.go is not None and not t.go.done():
                t.go.set_result(None)
        self.finished.set()

    def _decide(self) -> None:
        """Nothing runs: pick the next thread (called by the task that just parked, slept or ended,
        so a decision costs no turn of the event loop)."""
        runnable = [t.index for t in self.threads if t.state == "parked"]
        if not runnable:
            # Every thread that has not ended sleeps, and none is left to wake it: a deadlock
            # (run_schedule reports it and stops the sleepers; the controller decides no more).
            self.stuck = [t for t in self.threads if t.state == "blocked"]
            self.detached = bool(self.stuck)
            self.finished.set()
            return
        if self.step >= MAX_STEPS:
            self._detach()
            return
        cur = self.current.index if self.current is not None else None
        spinning = frozenset(t.index for t in self.threads if t.state == "parked" and t.point.startswith("spin:"))
        d = Decision(self.step, tuple(runnable), cur, self.fingerprint() if self.fingerprint else None, spinning)
        try:
            pick = self.choose(d)
            if pick not in runnable:
                raise ValueError(f"step {self.step}: thread {pick} cannot run (runnable: {runnable})")
        except Exception as e:  # noqa: BLE001 - the strategy's own failure: run_schedule raises it
            # Raised here, it would surface in whichever model function the thread parked in, and
            # no thread would be left to decide: the threads run out unsupervised instead.
            self.error = e
            self._detach()
            return
        d.pick = pick
        self.decisions.append(d)
        th = self.threads[pick]
        if self.current is not th:
            th.solo.clear()
        self.current = th
        self.step += 1
        th.state = "running"
        if th.go is not None:  # None: the deciding thread picked itself (see park)
            th.go.set_result(None)


@dataclass(slots=True)
class Decision:
    step: int
    runnable: tuple[int, ...]
    current: int | None
    state: object
    spinning: frozenset[int] = frozenset()  # runnable threads parked in a spin loop
    pick: int = -1

    @property
    def default(self) -> int:
        """The pick that is no preemption: the running thread, or the first runnable one; a thread
        that spins waits for the others (it cannot get anywhere by itself)."""
        if self.current in self.runnable and self.current not in self.spinning:
            return self.current
        return next((t for t in self.runnable if t not in self.spinning), self.runnable[0])


# ---------------------------------------------------------------------------------------------
# One run


@dataclass
class RunResult:
    events: list[Event]
    decisions: list[Decision]
    violations: list[str]
    findings: list[str]
    problems: list[str]
    cut: bool
    #: Run at the hardware's granularity (every marked access and lock operation a decision).
    fine: bool = False

    @property
    def preemptions(self) -> list[tuple[int, int]]:
        return [(d.step, d.pick) for d in self.decisions if d.pick != d.default]

    @property
    def caught(self) -> bool:
        return bool(self.violations or self.problems)

    @property
    def kinds(self) -> set[str]:
        """The detector kinds that caught it ("invariant" for the audit)."""
        return {v.split(":", 1)[0] for v in self.violations} | ({"invariant"} if self.problems else set())

    def signature(self) -> str:
        """Tells interleavings apart: the order in which the threads passed their points."""
        h = hashlib.blake2b(digest_size=12)
        for e in self.events:
            if e.kind in ("point", "op", "result"):
                h.update(f"{e.thread}:{e.text};".encode())
        return h.hexdigest()


class _Trace:
    """The trace's side of the model's events (mm/trace.Tracer): each lock operation (and the locks
    each thread holds), each marked access of the raced fields, refcount change, RCU section,
    cache free and reuse, and detector report, recorded under the thread that runs."""

    def __init__(self, ctl: Controller, states: bool = True) -> None:
        self.ctl = ctl
        #: Record the marked accesses, refcounts, RCU sections and the cache's frees as text.
        self.states = states

    def lock(self, op: str, lock: Any, result: bool | None) -> None:
        ctl = self.ctl
        th = ctl.current
        if th is None or ctl.detached:
            return
        if result is None and ("unlock" in op or op.startswith("up_")):
            if lock.name in th.held:
                th.held.remove(lock.name)
            ctl.record("lock", f"{op} {lock.name}", th)
            # A point once the release is whole (not while its waiters are still to be woken), and
            # not inside a PTL section: what the thread does until its PTL goes is under that PTL,
            # or a marked access (a point of its own).
            if op == "spin_unlock":
                th.spinlocks -= 1
            if ctl.fine and not lock.waiters and not th.spinlocks:
                ctl.park_sync(f"{op} {lock.name}")
            return
        if op == "wait_bit":  # nothing taken (Mutex.wait_bit): it sleeps on the bit or goes on
            if result is False:
                th.waits = lock
                th.bit = True
        elif result is not False:
            th.held.append(lock.name)
            th.spinlocks += op == "spin_lock"
        elif "try" not in op:
            th.waits = lock
            th.bit = False
        ok = "" if result is None else (" ✓" if result else (" ✗" if "try" in op else " (sleeps)"))
        ctl.record("lock", f"{op} {lock.name}{ok}", th)
        # A point after every operation on a sleeping lock (another task may find it held there:
        # its trylock fails, or it sleeps). Not after a spin_lock: a PTL is never trylocked, so
        # another task can only spin on it, which ends as if it had waited before the section:
        # a PTL section with no point inside stays in one step (the lock only read by it).
        if ctl.fine and (result or "try" in op):  # not before a sleep: that is a decision of its own
            ctl.park_sync(f"{op} {lock.name}")

    def state(self, text: str) -> None:
        ctl = self.ctl
        th = ctl.current
        if self.states and th is not None and not ctl.detached:
            ctl.record("state", text, th)

    def finding(self, text: str) -> None:
        self.ctl.record("finding", text)

    def access(self, obj: Any, field: str, write: bool) -> None:
        """A marked access: a point at the hardware's granularity (the trace shows it as text,
        ``state``, which the model sends next)."""
        ctl = self.ctl
        if ctl.fine:
            ctl.park_sync(f"{'WRITE_ONCE' if write else 'READ_ONCE'} {mm_trace.name(obj)}->{field}")

    def refcount(self, obj: Any, old: int, new: int) -> None:
        """An atomic add to a reference count: shown, and a point at the hardware's granularity."""
        what = f"{mm_trace.name(obj)} refcount"
        self.state(f"{what} {old} → {new}" if new != old or old else f"{what} 0: inc_not_zero fails")
        ctl = self.ctl
        if ctl.fine:
            ctl.park_sync(f"atomic_add {what}")


@contextmanager
def _tracing(m: MemoryModel, ctl: Controller, locks: bool, state: bool,
             watch: _Watch | None = None) -> Iterator[None]:
    """Record the model's events in ``ctl``'s trace for the run: detector reports always; lock
    operations with ``locks``; marked accesses, refcounts, RCU and the cache with ``state``; with
    ``watch``, every access of the shared state too, step by step (the DPOR search)."""
    k = m.k
    tr = watch or _Trace(ctl, state)
    k.detectors.trace = tr
    if locks or watch is not None or ctl.fine:
        k.lockdep.trace = tr
    if state or watch is not None or ctl.fine:
        k.trace = k.rcu.trace = tr
    if watch is not None:
        ctl.watch = watch
        mm_trace.set_field_hook(watch.field)
    try:
        yield
    finally:
        mm_trace.set_field_hook(None)
        k.attach_tracer(None)


#: The swap device of an explored model: room for every page a litmus scenario has, and a
#: swap_map small enough that restoring a snapshot for each schedule stays cheap.
SWAP_BYTES = 1 << 20


def _model(protocol: str, mutant: str | None) -> MemoryModel:
    if mutant is None:
        return MemoryModel(protocol=protocol, seed=0, preempt=0.0, swap_bytes=SWAP_BYTES)
    try:
        return MemoryModel(protocol=protocol, seed=0, preempt=0.0, mutant=mutant, swap_bytes=SWAP_BYTES)
    except TypeError:
        raise ScenarioError("this model has no protocol mutants") from None


def _ok(_: object) -> str:
    return "ok"


def _span(v: Any) -> str:
    return f"{v.start:#x}-{v.end:#x}"


def _walked(w: Any) -> str:
    maps = ", ".join(f"{p}:{x:#x}" for p, x in w.mappings)
    return (f"referenced {w.referenced} [{maps}]" + (" contended" if w.contended else "")
            + (f" retries {w.fast_retries}/{w.slow_retries}" if w.fast_retries or w.slow_retries else ""))


#: How each operation of the litmus language calls the model, given the pid of its first argument
#: (0 for none) and its arguments, and how its result reads in the trace. Every litmus operation
#: has one (mmsim.v1.operations).
_MODEL_CALLS: dict[str, tuple[Callable[[MemoryModel, int, tuple[Any, ...]], Awaitable[Any]], Callable[[Any], str]]] = {
    "process": (lambda m, pid, a: m.create_process(), "pid {}".format),
    "fork": (lambda m, pid, a: m.fork(pid), "pid {}".format),
    "exit": (lambda m, pid, a: m.exit(pid), _ok),
    "mmap": (lambda m, pid, a: m.mmap(pid, a[2] * PAGE_SIZE, prot=a[3], addr=a[1], uffd=a[4]), _span),
    "munmap": (lambda m, pid, a: m.munmap(pid, a[1], a[2] * PAGE_SIZE), _ok),
    "register": (lambda m, pid, a: m.uffd_register(pid, a[1], a[2] * PAGE_SIZE, a[3]), _ok),
    "unregister": (lambda m, pid, a: m.uffd_unregister(pid, a[1], a[2] * PAGE_SIZE), _ok),
    "madvise": (lambda m, pid, a: m.madvise(pid, a[1], a[2] * PAGE_SIZE, a[3]), _ok),
    "write": (lambda m, pid, a: m.write(pid, a[1], a[2]), _ok),
    "read": (lambda m, pid, a: m.read(pid, a[1]), str),
    "remap": (lambda m, pid, a: m.move(pid, a[1], a[2], a[3] * PAGE_SIZE), "moved {}".format),
    "copy": (lambda m, pid, a: m.uffd_copy(pid, a[1], a[2] * PAGE_SIZE, a[3]), "copied {}".format),
    "zeropage": (lambda m, pid, a: m.uffd_zeropage(pid, a[1], a[2] * PAGE_SIZE), "zeroed {}".format),
    "wake": (lambda m, pid, a: m.uffd_wake(pid, a[1], a[2] * PAGE_SIZE), _ok),
    "mprotect": (lambda m, pid, a: m.mprotect(pid, a[1], a[2] * PAGE_SIZE, a[3]), _ok),
    "mremap": (lambda m, pid, a: m.mremap(pid, a[1], a[2] * PAGE_SIZE, a[2] * PAGE_SIZE, maymove=True,
                                          dontunmap=bool(a[4]), fixed=a[3]), _span),
    "walk": (lambda m, pid, a: m.walk(pid, a[1], blocking=a[2] == "blocking"), _walked),
    "reclaim": (lambda m, pid, a: m.reclaim(a[0]), "reclaimed {}".format),
    "pin": (lambda m, pid, a: m.pin(pid, a[1], a[2] * PAGE_SIZE), lambda r: f"pin {r[0]}"),
    "unpin": (lambda m, pid, a: m.unpin(pid, a[1]), _ok),
}
require(_MODEL_CALLS, BY_LITMUS, "explore's model calls (explore._MODEL_CALLS)")


async def _apply(m: MemoryModel, procs: dict[str, int], op: Op) -> str:
    """Run one operation of a scenario (the process it defines, if any, named in ``procs``); what it
    returned, for the trace."""
    call, shown = _MODEL_CALLS[op.kind]
    a = op.args
    result = await call(m, procs[a[0]] if a and isinstance(a[0], str) else 0, a)
    if op.name is not None:
        procs[op.name] = result
    return shown(result)


def _fingerprint(m: MemoryModel, threads: list[Thread]) -> Callable[[], object]:
    """The state a decision is taken in: where each thread is, and the shared state it races on
    (each folio's anon_vma, index, mapcount, reference count and lock holder, by PTE or huge PMD;
    each anon_vma's root and refcount; swap and migration entries; the swap cache)."""

    def fp() -> object:
        folios: list[tuple[object, ...]] = []
        seen: dict[int, tuple[object, ...]] = {}  # each folio once (a large folio's PTEs map the same)

        def folio(f: Any) -> tuple[object, ...]:
            k = seen.get(id(f))
            if k is None:
                mapping = getattr(f, "mapping", None)
                lock = getattr(f, "lock", None)
                k = seen[id(f)] = (getattr(f, "id", 0), mapping.id if mapping else 0, mapping.root.id if mapping else 0,
                                   mapping.refcount if mapping else 0, getattr(f, "index", 0),
                                   getattr(f, "mapcount", 0), getattr(f, "refcount", 0), bool(lock and lock.owner),
                                   f.pincount)
            return k

        for mm in m.processes.values():
            for idx, hp in mm.huge_pmds.items():  # huge PMDs: the folio mapped whole
                hf = hp.folio
                hmap = hf.mapping
                folios.append((mm.id, -2, idx, hf.id, hmap.id if hmap else 0, hmap.root.id if hmap else 0,
                               hmap.refcount if hmap else 0, hf.index, hf.mapcount, hf.refcount,
                               bool(hf.lock and hf.lock.owner), hp.write, hf.pincount))
            for pt in mm.pgtables.values():
                for vpn, pte in pt.ptes.items():
                    folios.append((mm.id, vpn, pte.page, folio(pte.folio)))
                for vpn, swp in pt.swap.items():
                    e = swp.entry
                    folios.append((mm.id, vpn, -1, e.offset, int(swp.exclusive)) if not is_migration_entry(e) else
                                  (mm.id, vpn, -2, e.folio.id, e.page, e.write, e.exclusive))
        for off, f in m.k.swap.swap_table.items():  # the swap cache: mapped or not
            mapping = f.mapping
            folios.append((-1, off, f.id, mapping.id if mapping else 0, f.index, f.mapcount,
                           bool(f.lock is not None and f.lock.owner)))
        where = tuple((t.state, t.point, t.op_index, tuple(t.held)) for t in threads)
        return hash((where, tuple(folios)))

    return fp


async def set_up(scn: Scenario, protocol: str, mutant: str | None) -> tuple[MemoryModel, dict[str, int]]:
    """A model under ``protocol`` (and ``mutant``) with the scenario's setup done; its processes."""
    m = _model(protocol, mutant)
    procs: dict[str, int] = {}
    for op in scn.setup:
        try:
            await _apply(m, procs, op)
        except MmError as e:
            raise ScenarioError(f"line {op.line}: the setup's {op.kind} failed: {e}") from None
    return m, procs


async def snapshot(scn: Scenario, protocol: str, mutant: str | None) -> bytes:
    """The set-up model, pickled: a search restores it for every schedule instead of running the
    setup again (the setup is deterministic and leaves no task or lock behind, so a restored
    model is the one the setup would build)."""
    return pickle.dumps(await set_up(scn, protocol, mutant), pickle.HIGHEST_PROTOCOL)


def _restore(start: bytes) -> tuple[MemoryModel, dict[str, int], list[object]]:
    """A :func:`snapshot` unpickled, with every object it made in the order it made them (how a
    DPOR run names the set-up's objects). Only the list refers to them besides the model: the
    unpickler and its memo are gone when this returns (_Watch counts the references)."""
    u = pickle.Unpickler(io.BytesIO(start))
    m, procs = u.load()
    memo = u.memo.copy()
    return m, procs, [memo[i] for i in sorted(memo)]


async def run_schedule(scn: Scenario, protocol: str, mutant: str | None, choose: Callable[[Decision], int],
                       hashing: bool = False, start: bytes | None = None, trace: bool = True,
                       dpor: _Dpor | None = None, fine: bool = False,
                       on_model: Callable[[MemoryModel], None] | None = None) -> RunResult:
    """Run ``scn`` once under ``protocol`` (and ``mutant``), the picks made by ``choose``; with
    ``hashing``, each decision carries the fingerprint of the state it is taken in. ``start``: a
    :func:`snapshot` of the setup to begin from (else the setup is run). Without ``trace`` the
    events are only the threads' points, operations, results and findings (what tells
    interleavings apart), not their locks and state accesses: a search runs so, and runs the
    schedule it catches again with the whole trace (the same picks give the same run). ``dpor``:
    the DPOR search that watches every access of the run (with ``start`` given). ``fine``: every
    marked access (READ_ONCE, WRITE_ONCE, a refcount's change) and lock operation is a decision
    too, not only the named points, sleeps and wake-ups (the threads run as _GreenTasks).
    ``on_model``: told of the model once the threads ended (and it was audited)."""
    setup_objects: list[object] = []
    if start is not None and dpor is not None:
        m, procs, setup_objects = _restore(start)
    elif start is not None:
        m, procs = pickle.loads(start)
    else:
        m, procs = await set_up(scn, protocol, mutant)
    threads = [Thread(i, name, ops) for i, (name, ops) in enumerate(scn.threads)]
    if fine:  # the ledger is written when an operation returns: other tasks may run before that
        m.check_ledger = False
    ctl = Controller(threads, choose, _fingerprint(m, threads) if hashing else None, fine)
    watch = dpor.begin(ctl, m, setup_objects) if dpor is not None else None
    loop = asyncio.get_running_loop()
    factory = loop.get_task_factory()
    if fine:
        loop.set_task_factory(_green_factory)

    async def body(th: Thread) -> None:
        ctl.by_task[asyncio.current_task()] = th  # type: ignore[index]
        mine = dict(procs)
        try:
            await ctl.park("start")
            for i, op in enumerate(th.ops):
                th.op_index = i
                ctl.record("op", str(op), th)
                try:
                    out = await _apply(m, mine, op)
                except MmError as e:
                    out = errno_mod.errorcode.get(e.errno or 0, str(e.errno))
                    out += f" (moved {e.moved})" if e.moved else ""
                ctl.record("result", f"{op.kind} → {out}", th)
        finally:
            ctl.done(th)

    # The held locks are part of the exhaustive search's fingerprint: tracked whenever it hashes.
    unstopped: list[Thread] = []
    with _tracing(m, ctl, locks=trace or hashing, state=trace, watch=watch):
        m.k.attach_controller(ctl)
        try:
            tasks = [asyncio.ensure_future(body(th)) for th in threads]
            await ctl.finished.wait()
            if watch is not None:
                watch.finish()
            if ctl.cut and not ctl.stuck:  # unsupervised now: until they end, or all of them sleep
                ctl.all_asleep = asyncio.Event()
                asleep = asyncio.ensure_future(ctl.all_asleep.wait())
                await asyncio.wait([*tasks, asleep], return_when=asyncio.FIRST_COMPLETED)
                while not ctl.stuck and not all(t.done() for t in tasks):
                    await asyncio.wait([*(t for t in tasks if not t.done()), asleep],
                                       return_when=asyncio.FIRST_COMPLETED)
                asleep.cancel()
            if ctl.stuck:  # a deadlock: report it with what each thread waits for, and stop them
                if all(t.sleeps_in == "userfault_wait" for t in ctl.stuck):
                    # A fault waits for user space, which the scenario has no thread to play:
                    # as a process whose handler never answers, not a deadlock of the kernel.
                    ctl.record("finding", f"ends with {_asleep(ctl)}: a userfault nobody resolves")
                    ctl.stuck = []
                else:
                    m.detectors.report("deadlock", asleep=_asleep(ctl))
                unstopped = [threads[i] for i in await _stop(ctl, tasks)]
            done = [t for t in tasks if t.done()]
            outcomes = dict(zip(done, await asyncio.gather(*done, return_exceptions=True), strict=True))
        finally:
            m.k.attach_controller(None)
            if fine:
                loop.set_task_factory(factory)
    if ctl.error is not None:
        raise RuntimeError(f"the schedule's strategy failed at step {ctl.step}") from ctl.error
    if ctl.stuck:  # stopped half-way (an uninterruptible step too): the model is not quiescent
        problems = []
        ctl.record("finding", "no audit: the threads were stopped in a deadlock")
    else:
        problems = m.check_invariants()
        for p in problems:
            ctl.record("finding", f"invariant: {p}")
    for th in unstopped:
        problems.append(f"hang: thread {th.name} did not stop when its schedule was cancelled")
    for th, task in zip(threads, tasks, strict=True):
        out = outcomes.get(task)
        # A thread's operation may fail only with an errno (recorded as its result), or with
        # Deadlock where the detector already reported a cycle; anything else is a model bug.
        if isinstance(out, BaseException) and not isinstance(out, (asyncio.CancelledError, Deadlock)):
            problems.append(f"crash: thread {th.name} raised {type(out).__name__}: {out}")
            ctl.record("finding", f"crash: {type(out).__name__}: {out}", th)
    det = m.detectors
    findings = [str(f) for f in det.finding_events]
    if dpor is not None:
        dpor.ended(m)
    if on_model is not None:
        on_model(m)
    return RunResult(ctl.events, ctl.decisions, [str(v) for v in det.events], findings, problems, ctl.cut, fine)


#: Turns of the event loop a deadlocked schedule's threads get to end once cancelled.
STOP_TURNS = 1000


def _asleep(ctl: Controller) -> str:
    """What each thread of a deadlock sleeps on and who holds it (the lock is known when lock
    operations are traced: a search's schedule caught is run again with its whole trace)."""
    parts = []
    for th in ctl.stuck:
        lock = th.waits
        if lock is None:
            parts.append(f"{th.name} sleeps in {th.sleeps_in} after {th.point}")
            continue
        holders = [t.name + (" itself" if t is th else " (ended holding it)" if t.state == "done" else "")
                   for t in ctl.threads if lock.name in t.held]
        owner = getattr(lock, "owner", None)
        if not holders and owner is not None:
            holders = [owner.name]
        parts.append(f"{th.name} sleeps on {lock.name}" + (f" held by {', '.join(holders)}" if holders else ""))
    return "; ".join(parts)


async def _stop(ctl: Controller, tasks: list[asyncio.Task[None]]) -> list[int]:
    """Cancel the threads of a deadlocked schedule, and the tasks of their uninterruptible steps
    (which a cancellation of the thread alone would leave asleep), until every one has ended or
    ``STOP_TURNS`` turns of the event loop went by; the indexes of the threads still running."""
    cancelled: set[asyncio.Future[Any]] = set()
    for _ in range(STOP_TURNS):
        pending = [t for t in (*tasks, *ctl.by_task) if not t.done() and t not in cancelled]
        if not pending and all(t.done() for t in tasks):
            return []
        for t in pending:
            t.cancel()
            cancelled.add(t)
        await asyncio.sleep(0)
    return [i for i, t in enumerate(tasks) if not t.done()]


def run_sync(scn: Scenario, protocol: str, mutant: str | None, choose: Callable[[Decision], int],
             fine: bool = False) -> RunResult:
    return asyncio.run(run_schedule(scn, protocol, mutant, choose, fine=fine))


# ---------------------------------------------------------------------------------------------
# Strategies


def follow(preemptions: dict[int, int]) -> Callable[[Decision], int]:
    """Pick as told at the given steps, else make no preemption."""

    def choose(d: Decision) -> int:
        pick = preemptions.get(d.step)
        return pick if pick is not None and pick in d.runnable else d.default

    return choose


def random_strategy(seed: int) -> Callable[[Decision], int]:
    rng = random.Random(seed)
    return lambda d: rng.choice(_movers(d))


def _movers(d: Decision) -> tuple[int, ...]:
    """The runnable threads that can get somewhere: a spinner only waits for the others."""
    return tuple(t for t in d.runnable if t not in d.spinning) or d.runnable


def pct_strategy(seed: int, threads: int, depth: int, steps: int) -> Callable[[Decision], int]:
    rng = random.Random(seed)
    prio = list(range(depth, depth + threads))
    rng.shuffle(prio)
    changes = {rng.randrange(max(1, steps)): i for i in range(depth - 1, 0, -1)}

    def choose(d: Decision) -> int:
        if d.step in changes and d.current is not None:
            prio[d.current] = changes[d.step]  # below every initial priority
        return max(_movers(d), key=lambda t: prio[t])

    return choose


@dataclass
class Search:
    """What an exploration did."""

    strategy: str
    schedules: int = 0
    interleavings: set[str] = field(default_factory=set)
    pruned: int = 0
    seconds: float = 0.0
    first: RunResult | None = None  # the first run that caught something
    at: int = 0  # its schedule number (1-based)
    findings: set[str] = field(default_factory=set)  # documented findings seen (not violations)
    cut: int = 0
    #: Each kind of check that caught a schedule (RunResult.kinds): the schedules it caught.
    kinds: Counter[str] = field(default_factory=Counter)
    #: DPOR: every trace explored (not cut short by --schedules, a catch or the step limit).
    complete: bool = False
    traces: int = 0  # DPOR: runs that were not sleep-set blocked (one per Mazurkiewicz trace)
    blocked: int = 0  # DPOR: runs whose every enabled thread came to sleep (redundant)
    states: int = 0  # DPOR: distinct states at the decisions of its runs
    fine: bool = False  # interleaved at every marked access and lock operation too (--points all)
    #: When it stops starting schedules (--time-limit), and whether it stopped for that.
    deadline: float | None = None
    timed_out: bool = False

    def out_of_time(self) -> bool:
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            self.timed_out = True
        return self.timed_out

    def account(self, r: RunResult, number: int) -> bool:
        """Count run ``r``, schedule ``number`` (1-based); True if it is the first caught."""
        self.schedules += 1
        self.interleavings.add(r.signature())
        self.findings.update(r.findings)
        self.cut += r.cut
        if r.caught:
            self.kinds.update(r.kinds)
        if r.caught and self.first is None:
            self.first, self.at = r, number
            return True
        return False

    def merge(self, other: Search) -> None:
        """Add a worker's part of the same search: its catch counts if it is the earliest."""
        self.schedules += other.schedules
        self.interleavings |= other.interleavings
        self.findings |= other.findings
        self.cut += other.cut
        self.kinds += other.kinds
        if other.first is not None and (self.first is None or other.at < self.at):
            self.first, self.at = other.first, other.at


def explore(scn: Scenario, protocol: str, mutant: str | None = None, strategy: str = "random",
            schedules: int = 1000, preemptions: int = 2, depth: int = 3, seed: int = 0,
            stop_on_catch: bool = True, jobs: int = 1, cluster: str | None = None, points: str | None = None,
            time_limit: float | None = None) -> Search:
    """Search the schedules of ``scn``; stops at the first that a detector or the audit catches.
    ``jobs`` > 1 spreads a random or PCT search over that many worker processes (the exhaustive
    and DPOR searches are one depth-first walk each, and run in this process).
    ``cluster``: a Dask scheduler's address; the random or PCT search's parts run on its workers
    (``jobs`` parts, or one per worker thread when ``jobs`` is 1; cluster.ClusterError when it
    cannot be used). The result does not depend on ``jobs`` or ``cluster``: schedule i is the same
    schedule in every part, the catch reported is the one with the lowest i, and the figures count
    the schedules up to it. ``points``: where the threads may be interleaved: ``named`` (the named
    preemption points, lock sleeps and wake-ups) or ``all`` (those and every marked access and lock
    operation: the hardware's granularity); by default ``all`` for dpor, ``named`` for the others.
    ``time_limit``: stop starting schedules after that many seconds (the search is then not
    complete; in one process only)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}")
    if jobs < 1:
        raise ValueError("jobs must be at least 1")
    points = points or ("all" if strategy == "dpor" else "named")
    if points not in POINT_SETS:
        raise ValueError(f"points must be one of {', '.join(POINT_SETS)}")
    fine = points == "all"
    workers = jobs > 1 and strategy in ("random", "pct") and schedules > 1  # worker processes
    for option, given in (("--points all", fine), ("--time-limit", time_limit is not None)):
        if given and (cluster is not None or workers):
            raise ValueError(f"{option} runs in one process: drop --jobs and --cluster")
    if cluster is not None:
        if strategy not in ("random", "pct"):
            raise ValueError(f"--cluster runs the random and pct strategies, not {strategy}: the exhaustive and "
                             "DPOR searches are one depth-first walk each, with one table of explored states")
        return _explore_parallel(scn, protocol, mutant, strategy, schedules, depth, seed, stop_on_catch,
                                 jobs, cluster)
    if workers:
        return _explore_parallel(scn, protocol, mutant, strategy, schedules, depth, seed, stop_on_catch,
                                 min(jobs, schedules))
    return asyncio.run(_explore(scn, protocol, mutant, strategy, schedules, preemptions, depth, seed, stop_on_catch,
                                fine, time_limit))


def _chooser(strategy: str, seed: int, i: int, threads: int, depth: int, steps: int) -> Callable[[Decision], int]:
    """Schedule ``i`` of a random or PCT search seeded ``seed``."""
    sub = (seed * 1_000_003 + i) & 0xFFFFFFFF
    return random_strategy(sub) if strategy == "random" else pct_strategy(sub, threads, depth, steps)


def _explore_parallel(scn: Scenario, protocol: str, mutant: str | None, strategy: str, schedules: int,
                      depth: int, seed: int, stop_on_catch: bool, jobs: int, cluster: str | None = None) -> Search:
    """A random or PCT search in ``jobs`` parts, over as many processes or on the Dask cluster at
    ``cluster``: part w runs schedules w, w + jobs, ...; a part that catches one lowers the shared
    bound past which no part starts a schedule, so every schedule below the lowest catch is still
    run, and the catch is the sequential one. The figures count the schedules up to that catch,
    as the sequential search does."""
    t0 = time.perf_counter()
    args = [(scn.text, scn.name, protocol, mutant, strategy, schedules, depth, seed, stop_on_catch)]
    if cluster is None:
        ctx = mp.get_context("fork" if threading.active_count() == 1 else "forkserver")
        with ctx.Pool(jobs, initializer=_worker_init, initargs=(ctx.Value("q", schedules),)) as pool:
            parts = pool.starmap(_explore_part, [(*args[0], w, jobs, _PoolBound()) for w in range(jobs)])
    else:
        from .cluster import explore_parts

        parts = explore_parts(cluster, _explore_part, args[0], schedules, jobs)
    s = Search(strategy)
    first = min((p for p in parts if p.first is not None), key=lambda p: p.at, default=None)
    limit = first.at if first is not None and stop_on_catch else schedules
    for _, signature, findings, cut, kinds in (t for p in parts for t in p.tallies if t[0] < limit):
        s.schedules += 1
        s.interleavings.add(signature)
        s.findings.update(findings)
        s.cut += cut
        s.kinds.update(kinds)
    if first is not None and first.first is not None:  # again, with the whole trace
        s.first, s.at = run_sync(scn, protocol, mutant, follow(dict(first.first.preemptions))), first.at
    s.seconds = time.perf_counter() - t0
    return s


class Bound(Protocol):
    """The schedule number past which no part of a parallel search starts a schedule (its lowest
    catch so far), shared by the parts."""

    def get(self) -> int: ...

    def lower(self, i: int) -> None: ...


_bound: Any = None


def _worker_init(bound: Any) -> None:
    global _bound
    _bound = bound


class _PoolBound:
    """The bound of a pool's processes: the shared value each got at its start (_worker_init)."""

    def get(self) -> int:
        return int(_bound.value)

    def lower(self, i: int) -> None:
        with _bound.get_lock():
            _bound.value = min(_bound.value, i)


@dataclass
class _Part:
    """What one part of a parallel search ran: per schedule, its number (0-based), its
    signature, its findings, whether it was cut and the kinds that caught it; and its first catch
    (``at``: its 1-based number)."""

    tallies: list[tuple[int, str, tuple[str, ...], bool, tuple[str, ...]]] = field(default_factory=list)
    first: RunResult | None = None
    at: int = 0


def _explore_part(text: str, name: str, protocol: str, mutant: str | None, strategy: str, schedules: int,
                  depth: int, seed: int, stop_on_catch: bool, w: int, jobs: int, bound: Bound) -> _Part:
    scn = parse(text, f"{name}.litmus")

    async def part() -> _Part:
        p = _Part()
        start = await snapshot(scn, protocol, mutant)
        steps = await _pct_steps(scn, protocol, mutant, start) if strategy == "pct" else 0
        for i in range(w, schedules, jobs):
            if stop_on_catch and i > bound.get():
                break
            r = await run_schedule(scn, protocol, mutant, _chooser(strategy, seed, i, len(scn.threads), depth, steps),
                                   start=start, trace=False)
            p.tallies.append((i, r.signature(), tuple(r.findings), r.cut,
                              tuple(sorted(r.kinds)) if r.caught else ()))
            if r.caught and p.first is None:
                p.first, p.at = r, i + 1
                if stop_on_catch:
                    bound.lower(i)
                    break
        return p

    return asyncio.run(part())


async def _pct_steps(scn: Scenario, protocol: str, mutant: str | None, start: bytes, fine: bool = False) -> int:
    """A PCT search's schedule length, to place its change points: the run with no preemption."""
    return len((await run_schedule(scn, protocol, mutant, follow({}), start=start, trace=False, fine=fine)).decisions)


async def _explore(scn: Scenario, protocol: str, mutant: str | None, strategy: str, schedules: int,
                   preemptions: int, depth: int, seed: int, stop_on_catch: bool, fine: bool = False,
                   time_limit: float | None = None) -> Search:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}")
    s = Search(strategy, fine=fine)
    t0 = time.perf_counter()
    if time_limit is not None:
        s.deadline = t0 + time_limit
    start = await snapshot(scn, protocol, mutant)

    if strategy in ("random", "pct"):
        steps = await _pct_steps(scn, protocol, mutant, start, fine) if strategy == "pct" else 0
        for i in range(schedules):
            choose = _chooser(strategy, seed, i, len(scn.threads), depth, steps)
            if (s.account(await run_schedule(scn, protocol, mutant, choose, start=start, trace=False, fine=fine),
                         i + 1) and stop_on_catch) or s.out_of_time():
                break
    elif strategy == "dpor":
        await _explore_dpor(s, scn, protocol, mutant, start, schedules, stop_on_catch, fine=fine)
        s.complete = s.complete and not s.cut
    else:
        # Depth-first over the preemption choices, at most ``preemptions`` of them per schedule.
        seen: dict[object, int] = {}
        stack: list[dict[int, int]] = [{}]
        while stack and s.schedules < schedules:
            pre = stack.pop()
            r = await run_schedule(scn, protocol, mutant, follow(pre), hashing=True, start=start, trace=False,
                                   fine=fine)
            if (s.account(r, s.schedules + 1) and stop_on_catch) or s.out_of_time():
                break
            used = len(pre)
            last = max(pre) if pre else -1
            for d in reversed(r.decisions):
                if d.step <= last:
                    break
                left = preemptions - used
                if seen.get(d.state, -1) >= left:
                    s.pruned += 1
                    continue
                seen[d.state] = left
                if left <= 0:
                    continue
                for alt in d.runnable:
                    if alt != d.default:
                        stack.append({**pre, d.step: alt})
    if s.first is not None:  # again, with the whole trace
        s.first = await run_schedule(scn, protocol, mutant, follow(dict(s.first.preemptions)), start=start,
                                     fine=s.first.fine)
    s.seconds = time.perf_counter() - t0
    return s


# ---------------------------------------------------------------------------------------------
# DPOR: source sets and sleep sets (Abdulla, Aronis, Jonsson, Sagonas, POPL 2014)
#
# A *step* is what one thread does between two decisions: the transition from its pick to the
# next park, sleep or end (at the hardware's granularity, a park after a marked access or a lock
# operation too: _Trace.access and _Trace.lock say which). Two steps are dependent when they are
# the same thread's, or when one writes what the other reads or writes. What a step reads and
# writes is watched, not declared: while a DPOR search runs, every field of the model's shared objects (the classes in
# _WATCHED: folios, PTEs, page tables, VMAs, mms, anon_vmas and their chains, locks, RCU, the
# type-stable cache, swap, LRU, memcg, userfaultfd contexts, id counters) reports each read and
# store (mm.trace.watch_fields) and the marked accesses report through Tracer.access. Steps run
# atomically (one thread at a time), so only what a step leaves behind matters to the others: a
# field it stored but left as it found it counts as read, not written; so does a lock it took and
# let go within the step (the lock's owner, reader holds and waiters are as before), and the two
# orders of two such steps that touch nothing else in common end in the same state. A container
# (dict, list, set, bytearray, ...) reached through a field is a variable of its own: a step reads
# it when it reaches it through a field, or when the thread's suspended coroutines refer to it at
# the step's start (a local, an iterator on their stack: _Watch._holding; a thread that picked
# itself, or parked inside synchronous code, is on no stack the garbage collector shows, and reads
# each container it reached that something refers to besides the fields that hold it, the
# container it sits in and the run's own records, as reference counts tell: _Watch._referred),
# and writes it when its contents differ after the step. Some variables are watched entry by entry, by their owners'
# methods (_keyed): the mm's VMA tree, page tables and huge PMDs (SortedDicts: a lookup reads its
# key's entry, a store writes it; an iteration, a range or a size reads all, and a thread that
# holds a view or an iterator reads all of it in each later step; a bisection reads all of it
# once), the KeyedDicts (each PTE table's entries, the processes, the page ledgers by process, the
# swap cache, the torn (mapping, index) pairs by folio, ...), the page ledgers, the RCU reader set
# (one entry per task) and each rwsem's read holds (one entry per thread; a writer reads them all,
# a release that may hand the lock on writes them all). A small folio's folio_maybe_dma_pinned
# reads its pinned test, which only a refcount change across GUP_PIN_COUNTING_BIAS writes. A
# reference count changes by atomic adds (mm.trace.atomic_add_return, _Watch.refcount), each a
# read and a write of the count; the race analysis lets two threads' adds commute where no order
# of them can change a test of the count (_commuting_adds), and sleep sets do not. A
# vma_lookup that the VMA cache answers reads the VMA's extent and its tree entry (the cache is
# not watched). Bookkeeping that decides nothing while the threads run is not watched (_ignored):
# statistics, mm->rss_anon, memcg's high-water mark, the anon_vma cache's live set, ids and lock
# keys (which of two objects made at once gets the lower id is taken as immaterial),
# and, where the scenario has no limit, no page budget or no reclaim to read them, memcg usage,
# the live-folio counts and the LRU order. A sleep on a lock, a grace period or a userfault,
# the wake-up and the woken thread's next step write one variable per sleeper, so the wake-up
# happens before the woken step. Variables are named the same way in every run: objects of the
# set-up model by their place in its pickle, module-level objects by their name, objects a run
# makes by their maker's thread and count, so that the steps of different runs (a sleep set's)
# compare.
#
# A thread parked at a spin point (spin:*) whose steps come back to the same point having changed
# nothing (a futile spin: the PTL's holder has not let go, the move step still says EAGAIN) is
# not enabled again until another step changes something the spin read: a futile spin is an
# iteration (one step or several: a retry's reference taken and put back are two decisions) that
# leaves the state as it was while no other thread's step in between depended on it (_Spin), as
# if it were one step, and this bounds the spins of a run, so every search ends.
#
# Exclusive locks (the PTLs, the folio lock, an rwsem held for write) are handled lock-aware in
# the race analysis, not in the sleep sets. A release that hands a lock to another thread's
# acquisition is no race to reverse (the taker first would only spin or sleep); the acquisitions'
# order is, and it is reversed at the step that took the lock before. Where the first section
# comes before nothing of another thread's from the acquisition on (other than through the lock,
# locks nested the same way in both, or locks handed on freely), the hand-off is free (_Handoff):
# the lock orders nothing between the two sections, and the search explores one order of them. A
# failed trylock of the lock inside the section is an order (its thread went another way).
#
# States are fingerprinted only to count them: no subtree is skipped for a state seen before.
# Pruning a state already explored would hide the races between the current prefix and the steps
# of the skipped subtree, and with them backtrack points the prefix needs (stateful DPOR needs a
# summary of the skipped subtree's accesses for that, which this search does not keep).


#: Fields that are bookkeeping, not shared state any step's outcome depends on (statistics, the
#: watchers themselves, names and constants). ``Kernel.spinning`` (each spinner's PTL) is read only
#: by a spinner that closes a cycle of them: whichever order two spinners enter, the one that
#: spins second finds the cycle and reports the deadlock. ``Mm.vmacache`` saves vma_lookup its
#: tree walk and is kept coherent: _keyed makes a hit read the VMA's extent and its tree entry.
_UNWATCHED = frozenset({"lockdep", "trace", "controller", "detectors", "sched", "stats", "move_results", "name",
                        "rank", "key", "ops", "protocol", "mutant", "detect", "gate", "auditor", "waits",
                        "spinning", "vmacache"})

#: The classes whose fields the DPOR search watches.
_WATCHED: tuple[type, ...] = (
    Folio, LargeFolio, Pte, HugePmd, SwapPte, PageTable, Vma, Mm, GupPin, AnonVma, AnonVmaChain, TypesafeObject,
    _Lock, RwSem, Mutex, SpinLock, Rcu, TypesafeCache, MemCgroup, SwapInfo, Lruvec, UserfaultfdCtx, Userfault,
    Kernel, IdCounter, MemoryModel, PageLedger,
)

_CONTAINERS = (dict, list, set, bytearray, deque, SortedList, SortedSet)

#: Fields that only count (added to and subtracted from, never steering a step), read by the audit
#: after the threads end: their changes commute. ``mm->rss_anon``; memcg's high-water mark and
#: failure count; the id counters (which of two objects made at once gets the lower id is taken as
#: immaterial: no protocol decision compares ids); the anon_vma cache's set of live objects (an
#: allocation adds its own object, a free takes its own away: only the audit reads the set).
_COUNTERS: dict[str, tuple[type, ...]] = {"rss_anon": (Mm,), "peak": (MemCgroup,), "failcnt": (MemCgroup,),
                                          "next": (IdCounter,), "live": (TypesafeCache,)}

#: Containers watched entry by entry through their owners' methods (:func:`_keyed`), not as fields.
_KEYED: dict[str, tuple[type, ...]] = {"readers": (Rcu, RwSem), "_holdouts": (Rcu,), "_pmds": (PageLedger,),
                                       "_len": (PageLedger,)}


def _ignored(scn: Scenario, m: MemoryModel) -> dict[str, tuple[type, ...]]:
    """The fields a DPOR search of ``scn`` on ``m`` does not watch: :data:`_COUNTERS` always (the
    RCU reader set and the ledger are watched per entry instead); memcg's usage when it has no
    limit (it decides nothing then); the live-folio counts when no page budget reads them and no
    thread reclaims (whose result counts the pages it freed); the LRU lists when no thread scans
    them (their order is read only by shrink_lruvec: the ``reclaim`` operation, or reclaim under a
    memcg limit or a page budget; MADV_PAGEOUT and MADV_COLD take the folios their PTEs map, and
    membership is the folio's own ``lru`` field)."""
    ignored = {**_COUNTERS, **_KEYED}
    ops = {op.kind for _, thread_ops in scn.threads for op in thread_ops}
    advice = {str(a) for _, thread_ops in scn.threads for op in thread_ops if op.kind == "madvise" for a in op.args}
    reclaims = "reclaim" in ops or bool(advice & {"pageout", "cold"})
    if m.k.memcg.limit is None:
        for f in ("usage", "inflight"):
            ignored[f] = (MemCgroup,)
    if getattr(m, "max_pages", None) is None and not reclaims:
        for f in ("folios_live", "folio_pages_live"):
            ignored[f] = (Kernel,)
    if "reclaim" not in ops and m.k.memcg.limit is None and getattr(m, "max_pages", None) is None:
        ignored["lists"] = (Lruvec,)
    return ignored


#: Each type met inside a container: 0 a value, 1 a dict, 2 a sequence, 3 a set, 4 bytes (_kind).
_KINDS: dict[type, int] = {}


def _kind(t: type) -> int:
    k = _KINDS.get(t)
    if k is None:
        k = _KINDS[t] = (1 if issubclass(t, dict) else 2 if issubclass(t, (list, deque, tuple, SortedList, SortedSet))
                         else 3 if issubclass(t, (set, frozenset)) else 4 if issubclass(t, bytearray) else 0)
    return k


class _Same:
    """Values that compare by identity, element by element (a flat container's contents)."""

    __slots__ = ("items",)

    def __init__(self, items: tuple[Any, ...]) -> None:
        self.items = items

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Same):
            return NotImplemented
        a, b = self.items, other.items
        if len(a) != len(b):
            return False
        return all(map(operator.is_, a, b)) or all(map(operator.eq, map(_Ident, a), map(_Ident, b)))

    def __hash__(self) -> int:
        return hash(tuple(map(hash, map(_Ident, self.items))))


def _freeze(v: Any) -> Any:
    """A container's contents as a value (nested containers too; other objects by identity)."""
    k = _kind(type(v))
    if k == 1:
        values = tuple(v.values())
        if not any(_kind(type(x)) for x in values):
            return tuple(v), _Same(values)
        return tuple((key, _freeze(x)) for key, x in v.items())
    if k == 2:
        items = tuple(v)
        if not any(_kind(type(x)) for x in items):
            return _Same(items)
        return tuple(_freeze(x) for x in items)
    if k == 3:
        return frozenset(_freeze(x) for x in v)
    if k == 4:
        return bytes(v)
    return _Ident(v)


#: Per type: whether a coroutine's reference to one may lead to a container (_looks_into).
_LOOKS_INTO: dict[type, bool] = {}


def _looks_into(t: type) -> bool:
    """Whether :meth:`_Watch._holding` looks through an object of type ``t`` for the containers it
    refers to: an iterator, a view, a bound method, a tuple or list of the interpreter's own, or a
    helper object of the project's (a walk's control, an unwind record); not a watched model
    object (its containers are reached through its fields), a value, or the event loop's."""
    v = _LOOKS_INTO.get(t)
    if v is None:
        module = t.__module__ or ""
        v = _LOOKS_INTO[t] = ((module in ("builtins", "itertools", "_collections", "collections")
                               or module.startswith(__package__.split(".", 1)[0]))
                              and not issubclass(t, (str, int, float, bytes, type, types.CodeType, types.FunctionType,
                                                     types.ModuleType, *_WATCHED)))
    return v


def _items(c: Any) -> Any:
    """What container ``c`` holds (a dict: its values; bytes: nothing that refers to anything)."""
    return c.values() if isinstance(c, dict) else () if isinstance(c, bytearray) else c


def _nested(v: Any) -> Iterator[Any]:
    """The containers inside container ``v``, at any depth."""
    for x in _items(v):
        if isinstance(x, (*_CONTAINERS, tuple, frozenset)):
            yield x
            yield from _nested(x)


class _Ident:
    """Compares by identity (a model object inside a frozen container)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Ident):
            return NotImplemented
        a, b = self.obj, other.obj
        if a is b:
            return True
        return type(a) is type(b) and isinstance(a, (int, str, bytes, float, tuple, frozenset, type(None))) and a == b

    def __hash__(self) -> int:
        a = self.obj
        return hash(a) if isinstance(a, (int, str, bytes, float, tuple, frozenset)) else id(a)


class _Step:
    """What one step (a thread's transition) read and wrote; ``changed``: what it left different."""

    __slots__ = ("thread", "reads", "writes", "some", "changed", "olds", "kolds", "adds", "free", "spin", "futile",
                 "spun", "acq", "hold", "rel", "locks", "waits")

    def __init__(self, thread: int) -> None:
        self.thread = thread
        self.reads: set[object] = set()
        self.writes: set[object] = set()
        #: Writes of some entry of a keyed variable (v, "#any"): they race with a read of all of v,
        #: not with each other (the entries' own keys say which).
        self.some: set[object] = set()
        self.changed: set[object] = set()
        self.olds: dict[object, tuple[Any, str, Any]] = {}
        #: Keyed entries written: key -> (how to read the entry now, its value at the first write).
        self.kolds: dict[tuple[object, object], tuple[Callable[[], Any], Any]] = {}
        #: The counters this step changed by atomic adds alone (no plain read or store of them):
        #: counter -> [the count before its first add, the sum so far, the least and the greatest
        #: sum after any of its adds (0 counted: the count before)] (_Watch.refcount).
        self.adds: dict[object, list[int]] = {}
        #: Of those, the ones whose adds commute with the other steps' adds in the run being
        #: analysed (_commuting_adds).
        self.free: set[object] = set()
        self.spin: str | None = None
        #: It ended a futile spin (_Watch._spun), which read ``spun``.
        self.futile = False
        self.spun: set[object] = set()
        #: The exclusive locks (spinlocks, mutexes, rwsems held for write: their owner fields) it
        #: took, those of them it still held at its end, and those it let go of that an earlier
        #: step of its thread took (_Handoff); those it went to sleep on.
        self.acq: set[object] = set()
        self.hold: set[object] = set()
        self.rel: set[object] = set()
        self.waits: set[object] = set()
        #: Its operations on them in order: (owner, True for an acquisition).
        self.locks: list[tuple[object, bool]] = []


def _dependent(a: _Step | None, b: _Step | None, adds: bool = False) -> bool:
    """Whether two steps may not commute (a step not known depends on every other). An atomic add
    is a read and a write of its counter; with ``adds``, two steps whose only common accesses are
    adds to counters free in both (_commuting_adds) commute."""
    if a is None or b is None or a.thread == b.thread:
        return True
    aw, bw = a.writes, b.writes
    if (aw.isdisjoint(b.reads) and aw.isdisjoint(bw) and bw.isdisjoint(a.reads)
            and a.some.isdisjoint(b.reads) and b.some.isdisjoint(a.reads)):
        return False
    if not (adds and a.free and b.free):
        return True
    return bool(_common(a, b))


def _common(a: _Step, b: _Step) -> set[object]:
    """The variables through which two steps may not commute (_dependent, with ``adds``)."""
    aw, bw, ar, br = a.writes, b.writes, a.reads, b.reads
    common = (aw & br) | (aw & bw) | (bw & ar) | (a.some & br) | (b.some & ar)
    if a.free and b.free:
        common -= a.free & b.free
    return common


def _hands_on(a: _Step | None, b: _Step, lock_of: dict[object, object]) -> bool:
    """Whether ``a`` only hands ``b`` an exclusive lock: all they conflict on belongs to locks
    that ``a`` let go of and ``b`` took (_belongs). That order is not a race to reverse: ``b``
    first would find the lock held, and spin or sleep. The order that matters is that of the
    acquisitions, and _races reverses it where ``b`` races with the step that took the lock
    before ``a`` let it go, which the hand-off does not order before ``b``."""
    if a is None or not a.rel or a.rel.isdisjoint(b.acq):
        return False
    locks = a.rel & b.acq
    return all(any(_belongs(v, k, b.thread, lock_of) for k in locks) for v in _common(a, b))


def _belongs(v: object, key: object, taker: int, lock_of: dict[object, object]) -> bool:
    """Whether variable ``v`` is part of the lock whose owner is ``key``, as its hand-off to
    thread ``taker`` sees it: the lock's own fields and entries, its waiter queue, and the
    taker's sleep on it."""
    name = key[0]  # type: ignore[index]
    obj = v[0]  # type: ignore[index]
    return obj == name or lock_of.get(obj) == name or obj == ("wait", taker)


class _Handoff:
    """An exclusive lock handed on in a run: thread ``t0``'s section of it (its steps from ``first``,
    which took it, to ``last``, which let it go), then step ``taker`` of another thread took it,
    after ``tries`` (the taker's steps that found it held), and held it to step ``until``.

    The two sections are ordered by the lock alone (the hand-off is ``free``) when no step of the
    first is ordered, other than by the lock or by its thread's later steps, before a step of
    another thread from the acquisition on (``orders``). The other order of the two sections then
    makes no other order of conflicting steps: a step of the section that conflicts with one of
    the taker's before its acquisition is a race of its own, reversible where the section holds
    the lock (the taker has not reached it there). The lock's owner is then no dependency between
    the two sections' steps (the acquisition finds it free in either order, and a try that found
    it held only waited), and the search explores one order of the two sections, as lock-aware
    reductions do (LAPOR, Kokologiannakis et al., OOPSLA 2019)."""

    __slots__ = ("key", "t0", "first", "last", "t1", "taker", "tries", "until", "free", "lock_of")

    def __init__(self, key: object, t0: int, first: int, last: int, t1: int, taker: int, tries: list[int],
                 lock_of: dict[object, object]) -> None:
        self.key = key
        self.lock_of = lock_of
        self.t0 = t0
        self.first = first
        self.last = last
        self.t1 = t1
        self.taker = taker
        self.tries = tries
        self.until = taker
        self.free = False

    def takers(self) -> list[int]:
        """The steps of the second section's thread, and of its tries, whose dependency on the
        first section through the lock the hand-off hides when free (with the other thread's
        steps: _happens_before tests them)."""
        return [*self.tries, *range(self.taker, self.until + 1)]

    def hides(self, i: int, ti: int) -> bool:
        """Whether step ``i`` (thread ``ti``) is one of the first section's."""
        return ti == self.t0 and self.first <= i <= self.last

    def covers(self, v: object) -> bool:
        """Whether variable ``v`` is part of the lock (_belongs)."""
        return _belongs(v, self.key, self.t1, self.lock_of)

    def orders(self, steps: list[_Step | None], nests: list[dict[object, tuple[frozenset[object],
                                                                                 frozenset[object]]]], pred: list[int],
               direct: list[list[int]], threads: list[int], hidden: dict[int, list[_Handoff]],
               spinlocks: set[object]) -> bool:
        """Whether a step of the section comes, other than through the lock or the section's
        thread's later steps, before a step of another thread from the acquisition on. A
        conflict on the lock alone is no such order (the lock's sections are ordered by their
        own hand-offs) unless the other step reads its owner plainly (a failed trylock, whose
        thread goes another way), nor one on another lock that both steps take or let go of only
        while they hold this one, or only while they do not (the inner lock's order follows the
        outer's: _same_nesting), or that is handed on freely between them (``hidden``); one on
        another lock otherwise is (two locks taken in the other order make a deadlock)."""
        t0, j, key = self.t0, self.taker, self.key
        later = 0  # what comes before the other threads' steps from the acquisition on
        for y in range(j, len(threads)):
            if threads[y] != t0:
                later |= pred[y] | (1 << y)
        for z in range(self.first + 1, len(threads)):
            if threads[z] == t0 or not (later >> z) & 1:
                continue
            b = steps[z]
            for x in direct[z]:
                if threads[x] != t0 or not self.first <= x <= self.last:
                    continue
                a = steps[x]
                if a is None or b is None:
                    return True
                hs = _hidden(hidden, x, z, threads) if x in hidden or z in hidden else []
                for v in _common(a, b):
                    if self.covers(v):
                        if v == key and not (key in b.acq or key in b.rel or key in b.waits or key in spinlocks):
                            return True  # a plain read of the owner: a failed trylock
                    elif not any(h.covers(v) for h in hs) and not _same_nesting(key, v, nests[x], nests[z]):
                        return True
        return False


def _handoffs(steps: list[_Step | None], threads: list[int], lock_of: dict[object, object],
              spinlocks: set[object]) -> list[_Handoff]:
    """The exclusive locks handed on from one thread's section to another thread in a run. A
    try is a step of the taker's that slept on the lock, or that read a spinlock's owner without
    taking it (it spun: a spinlock is never trylocked)."""
    out: list[_Handoff] = []
    took: dict[object, int] = {}  # each held lock's owner -> the step that took it
    section: dict[object, tuple[int, int]] = {}  # each let-go lock -> its last section
    holding: dict[object, _Handoff] = {}  # each held lock -> the hand-off that gave it
    for j, b in enumerate(steps):
        if b is None:
            took.clear()
            section.clear()
            holding.clear()
            continue
        tj = threads[j]
        for key in b.acq:
            sec = section.get(key)
            if sec is not None and threads[sec[0]] != tj:
                tries = [x for x in range(sec[0] + 1, j) if threads[x] == tj and (st := steps[x]) is not None
                         and (key in st.waits or (key in spinlocks and key in st.reads and key not in st.acq))]
                h = _Handoff(key, threads[sec[0]], sec[0], sec[1], tj, j, tries, lock_of)
                out.append(h)
                if key in b.hold:
                    holding[key] = h
        for key in b.rel:
            a = took.pop(key, None)
            if a is not None:
                section[key] = (a, j)
            given = holding.pop(key, None)
            if given is not None:
                given.until = j
        for key in b.hold:
            took[key] = j
            section.pop(key, None)
    for h in holding.values():  # held to the run's end
        h.until = len(steps) - 1
    return out


def _lock_aware(steps: list[_Step | None], threads: list[int], handoffs: bool = True,
                lock_of: dict[object, object] | None = None,
                spinlocks: set[object] | None = None) -> tuple[list[_Handoff], list[int], list[list[int]]]:
    """A run's lock hand-offs (each marked free or not: _Handoff), and its steps' happens-before
    predecessors and direct dependencies with the free ones not counted (every one counted
    without ``handoffs``). The least fixed point: a hand-off is free when it orders nothing with
    those found free before it not counted, so that no two justify each other."""
    lock_of = lock_of if lock_of is not None else {}
    spinlocks = spinlocks if spinlocks is not None else set()
    found = _handoffs(steps, threads, lock_of, spinlocks) if handoffs else []
    nests = _nesting(steps, threads) if found else []
    while True:
        hidden = _hiding(threads, [h for h in found if h.free])
        pred, direct = _happens_before(steps, threads, hidden)
        freed = [h for h in found
                 if not h.free and not h.orders(steps, nests, pred, direct, threads, hidden, spinlocks)]
        if not freed:
            return found, pred, direct
        for h in freed:
            h.free = True


def _nesting(steps: list[_Step | None], threads: list[int]) -> list[dict[object, tuple[frozenset[object],
                                                                                     frozenset[object]]]]:
    """For each step, each exclusive lock it took or let go of -> the other locks its thread held
    at every such operation, and those it held at any of them."""
    held: dict[int, set[object]] = {}
    out: list[dict[object, tuple[frozenset[object], frozenset[object]]]] = []
    for j, b in enumerate(steps):
        mine = held.setdefault(threads[j], set())
        nest: dict[object, tuple[frozenset[object], frozenset[object]]] = {}
        if b is not None:
            for key, take in b.locks:
                if take:
                    now = frozenset(mine)
                    mine.add(key)
                else:
                    mine.discard(key)
                    now = frozenset(mine)
                was = nest.get(key)
                nest[key] = (was[0] & now, was[1] | now) if was is not None else (now, now)
        out.append(nest)
    return out


def _same_nesting(key: object, v: object, x: dict[object, tuple[frozenset[object], frozenset[object]]],
                  z: dict[object, tuple[frozenset[object], frozenset[object]]]) -> bool:
    """Whether two steps take or let go of lock ``v`` (an owner) only while they hold lock ``key``,
    or only while they do not: its order and that of ``key``'s sections are one (the inner's
    follows the outer's), and no deadlock of the two is possible."""
    a, b = x.get(v), z.get(v)
    if a is None or b is None:
        return False
    return (key in a[0] and key in b[0]) or (key not in a[1] and key not in b[1])


def _hiding(threads: list[int], free: list[_Handoff]) -> dict[int, list[_Handoff]]:
    """Each step of a taker's thread -> the free hand-offs that hide its dependencies through the
    lock on the first section's steps."""
    hidden: dict[int, list[_Handoff]] = {}
    for h in free:
        for x in h.takers():
            if threads[x] == h.t1:
                hidden.setdefault(x, []).append(h)
    return hidden


def _hidden(hidden: dict[int, list[_Handoff]], i: int, j: int, threads: list[int]) -> list[_Handoff]:
    """The locks through which steps ``i`` and ``j`` do not depend on each other: those handed on
    freely from the section of one to the other."""
    return ([h for h in hidden.get(j, ()) if h.hides(i, threads[i])]
            + [h for h in hidden.get(i, ()) if h.hides(j, threads[j])])


def _happens_before(steps: list[_Step | None], threads: list[int],
                    hidden: dict[int, list[_Handoff]]) -> tuple[list[int], list[list[int]]]:
    """Each step's happens-before predecessors (as bits) and its direct dependencies on other
    threads' steps, those through the locks handed on freely (``hidden``: _hiding) not counted."""
    n = len(steps)
    pred = [0] * n
    direct: list[list[int]] = [[] for _ in range(n)]
    # The steps so far that read, write, or write some entry of each variable (an index: a step's
    # dependencies on other threads' steps are among those of what it touches), and those not
    # known (dependent on every step).
    readers: dict[object, list[int]] = {}
    writers: dict[object, list[int]] = {}
    somes: dict[object, list[int]] = {}
    unknown: list[int] = []
    last: dict[int, int] = {}  # each thread's latest step (its earlier ones come before it)
    for j, b in enumerate(steps):
        tj = threads[j]
        if b is None:
            cand: set[int] = set(range(j))
        else:
            cand = set(unknown)
            for k in b.reads:
                cand.update(writers.get(k, ()), somes.get(k, ()))
            for k in b.writes:
                cand.update(writers.get(k, ()), readers.get(k, ()))
            for k in b.some:
                cand.update(readers.get(k, ()))
        dj: list[int] = []
        for i in sorted(cand):
            a = steps[i]
            if threads[i] == tj or not _dependent(a, b, adds=True):
                continue
            if a is not None and b is not None and (i in hidden or j in hidden):
                hs = _hidden(hidden, i, j, threads)
                if hs and all(any(h.covers(v) for h in hs) for v in _common(a, b)):
                    continue
            dj.append(i)
        direct[j] = dj
        mine = last.get(tj)
        pj = pred[mine] | (1 << mine) if mine is not None else 0
        for i in dj:
            pj |= pred[i] | (1 << i)
        pred[j] = pj
        last[tj] = j
        if b is None:
            unknown.append(j)
        else:
            for k in b.reads:
                readers.setdefault(k, []).append(j)
            for k in b.writes:
                writers.setdefault(k, []).append(j)
            for k in b.some:
                somes.setdefault(k, []).append(j)
    return pred, direct


def _commuting_adds(steps: list[_Step | None]) -> None:
    """Which atomic adds of the run commute with each other (each step's ``free``). A counter's adds
    between two other accesses of it (a plain read or store, which every add depends on) make a
    segment. From the count at its start, every order of the segment's adds that keeps each
    thread's own order passes through counts between that count plus the sum, over the threads,
    of the least partial sum of the thread's adds (0 counted), and that count plus the sum of the
    greatest. If no count in that range is zero, and none crosses GUP_PIN_COUNTING_BIAS, no add's
    own test (a put's zero test, an inc_not_zero, a folio's pinned test) comes out differently in
    another order, and every order ends in the same count: the segment's adds commute. The range
    is the same in every order of the run that keeps its other dependencies, so that every run of
    a trace sees it the same."""
    for st in steps:
        if st is not None and st.free:
            st.free = set()
    counters: set[object] = set()
    for st in steps:
        if st is not None and st.adds:
            counters.update(st.adds)
    for c in counters:
        seg: list[_Step] = []
        start = 0
        sums: dict[int, list[int]] = {}  # thread -> [its sum so far, least, greatest]
        for st in [*steps, None]:
            a = st.adds.get(c) if st is not None else None
            if a is not None:
                assert st is not None
                if not seg:
                    start = a[0]
                seg.append(st)
                t = sums.setdefault(st.thread, [0, 0, 0])
                t[1] = min(t[1], t[0] + a[2])
                t[2] = max(t[2], t[0] + a[3])
                t[0] += a[1]
                continue
            if st is not None and c not in st.reads and c not in st.writes:
                continue
            if len(sums) > 1:
                lo = start + sum(t[1] for t in sums.values())
                hi = start + sum(t[2] for t in sums.values())
                if lo > 0 and (hi < GUP_PIN_COUNTING_BIAS or lo >= GUP_PIN_COUNTING_BIAS):
                    for x in seg:
                        x.free.add(c)
            seg = []
            sums = {}


def _mm_modules() -> list[types.ModuleType]:
    """The model's modules (server/mm)."""
    prefix = __package__.rsplit(".", 1)[0] + ".mm"
    return [mod for mod_name, mod in list(sys.modules.items()) if mod_name.startswith(prefix)]


def _module_objects() -> dict[int, object]:
    """Names for the model's module-level objects (ZERO_PAGE, HUGE_ZERO_FOLIO) and their containers."""
    names: dict[int, object] = {}
    for mod in _mm_modules():
        mod_name = mod.__name__
        for attr, obj in vars(mod).items():
            if isinstance(obj, _WATCHED):
                names[id(obj)] = ("g", mod_name, attr)
                for slot in getattr(type(obj), "__slots__", ()):
                    v = getattr(obj, slot, None)
                    if isinstance(v, _CONTAINERS):
                        names[id(v)] = ("g", mod_name, attr, slot)
    return names


def _pinned_test(st: _Step, var: object, obj: Any, old: Any, new: Any) -> None:
    """``obj``'s refcount went from ``old`` to ``new`` in ``st``: if ``obj`` is a small folio and
    the count crossed GUP_PIN_COUNTING_BIAS, the step wrote its pinned test (_Watch.pinned)."""
    if (type(obj) is Folio and type(new) is int
            and ((old if type(old) is int else 0) >= GUP_PIN_COUNTING_BIAS) != (new >= GUP_PIN_COUNTING_BIAS)):
        key = (var, _PINNED)
        st.writes.add(key)
        st.changed.add(key)


def _same(now: Any, old: Any) -> bool:
    """Whether a field holds what it held: the same object, or an equal number, string or flag."""
    return now is old or (isinstance(now, (int, str, bool)) and type(now) is type(old) and now == old)


class _Spin:
    """One spin iteration of a thread under way (_Watch._spun): what its steps read and wrote,
    what they found before their first change (fields, keyed entries, containers) and the sum of
    their adds; what the other threads' steps meanwhile read and wrote; whether any of those
    depended on one of its steps (``clean`` False)."""

    __slots__ = ("point", "reads", "writes", "olds", "kolds", "conts", "net", "others_r", "others_w", "clean")

    def __init__(self, point: str) -> None:
        self.point = point
        self.reads: set[object] = set()
        self.writes: set[object] = set()
        self.olds: dict[object, tuple[Any, str, Any]] = {}
        self.kolds: dict[object, tuple[Callable[[], Any], Any]] = {}
        self.conts: dict[int, tuple[Any, Any]] = {}
        self.net: Counter[object] = Counter()
        self.others_r: set[object] = set()
        self.others_w: set[object] = set()
        self.clean = True

    def other(self, st: _Step) -> None:
        """Another thread's step ran during the iteration."""
        w = st.writes | st.some
        if not (w.isdisjoint(self.reads) and w.isdisjoint(self.writes) and st.reads.isdisjoint(self.writes)):
            self.clean = False
        self.others_r |= st.reads
        self.others_w |= w

    def add(self, st: _Step, conts: list[tuple[int, Any, Any]], mixed: bool) -> None:
        """One of its steps closed."""
        w = st.writes | st.some
        if mixed or not (w.isdisjoint(self.others_r) and w.isdisjoint(self.others_w)
                         and st.reads.isdisjoint(self.others_w)):
            self.clean = False
        self.reads |= st.reads
        self.writes |= w
        for key, old in st.olds.items():
            self.olds.setdefault(key, old)
        for key, kold in st.kolds.items():
            self.kolds.setdefault(key, kold)
        for i, c, before in conts:
            self.conts.setdefault(i, (c, before))
        for key, a in st.adds.items():
            self.net[key] += a[1]

    def unchanged(self) -> bool:
        """Whether the state it wrote is as it found it."""
        return (all(_same(getattr(obj, f, mm_trace.UNSET), old) for obj, f, old in self.olds.values())
                and all(now_fn() == old for now_fn, old in self.kolds.values())
                and all(_freeze(c) == before for c, before in self.conts.values())
                and not any(self.net.values()))


class _Watch(_Trace):
    """One DPOR run's record of the steps: the accesses of each thread's step under way, named
    as every run names them."""

    def __init__(self, ctl: Controller, setup: list[object], on_step: Callable[[_Step], None],
                 ignored: dict[str, tuple[type, ...]] | None = None) -> None:
        super().__init__(ctl)
        self.ignored = ignored if ignored is not None else {**_COUNTERS, **_KEYED}
        #: (class, field) -> whether the field is not watched (the cache of ``ignored``).
        self.skip: dict[tuple[type, str], bool] = {}
        self.names: dict[int, object] = dict(_GLOBAL_NAMES)
        for i, obj in enumerate(setup):
            self.names[id(obj)] = ("s", i)
        self.keep = setup  # alive for the run: no id is reused under another name
        self.made: Counter[int] = Counter()
        self.open: dict[int, _Step] = {}
        #: Each thread's containers: id -> (variable, container), and their contents at its step's start.
        self.reached: dict[int, dict[int, tuple[object, Any]]] = {th.index: {} for th in ctl.threads}
        self.frozen: dict[int, dict[int, Any]] = {th.index: {} for th in ctl.threads}
        #: Each thread's read holds of each rwsem: (id(rwsem), thread) -> count (_reader).
        self.read_holds: dict[tuple[int, int], int] = {}
        #: Containers nested in a reached one: id -> the reached one's id.
        self.inner: dict[int, int] = {}
        #: Each thread's keyed variables it holds a view of (held): id -> variable.
        self.lazy: dict[int, dict[int, object]] = {th.index: {} for th in ctl.threads}
        self.on_step = on_step
        self.active = True
        #: Each thread's spin iteration under way.
        self.spins: dict[int, _Spin] = {}
        #: The references to each of the set-up's containers when the run began (the model's, the
        #: set-up list's, the pickle's intermediate state), and how many watched fields came to
        #: hold each container since, less those that let go of it: what _referred expects.
        self.base: dict[int, int] = {}
        for obj in setup:
            if type(obj) in _COUNTED:
                self.base[id(obj)] = _refs(obj) - _REFS_OVERHEAD
        self.stored: Counter[int] = Counter()
        #: Reached containers held by something the run cannot count (a tuple in a field).
        self.loose: set[int] = set()
        #: Each lock's waiter queue -> the lock (variable names), and the spinlocks' owners
        #: (_Handoff: what belongs to a lock).
        self.lock_of: dict[object, object] = {}
        self.spinlocks: set[object] = set()

    def _name(self, obj: Any, th: int) -> object:
        n = self.names.get(id(obj))
        if n is None:
            self.made[th] += 1
            n = self.names[id(obj)] = (th, self.made[th])
            self.keep.append(obj)
        return n

    def _step(self) -> tuple[int, _Step] | None:
        ctl = self.ctl
        if not self.active or ctl.detached:
            return None
        # The thread the search picked: only it runs (the others are parked, a woken sleeper
        # parks before it touches anything), and a task it started and awaits counts as its own
        # (Controller._thread), so the running task need not be looked up.
        th = ctl.current
        if th is None:
            return None
        i = th.index
        st = self.open.get(i)
        if st is None:
            st = self.open[i] = _Step(i)
        return i, st

    def field(self, obj: Any, field: str, write: bool, old: Any, new: Any) -> None:
        """mm.trace's field hook: one read or store of a watched field."""
        skip = self.skip.get((type(obj), field))
        if skip is None:
            ign = self.ignored.get(field)
            skip = field in _UNWATCHED or (ign is not None and issubclass(type(obj), ign))
            self.skip[(type(obj), field)] = skip
        if skip:
            return
        got = self._step()
        if got is None:
            return
        th, st = got
        key = (self._name(obj, th), field)  # named: alive for the run, so is its hold on a container
        if write and old is not new:  # a field that comes to hold a container (reached below), or lets go of one
            if type(old) in _COUNTED:
                self.stored[id(old)] -= 1
            if type(new) in _COUNTED:
                self.stored[id(new)] += 1
        if write:
            st.writes.add(key)
            if key not in st.olds:
                st.olds[key] = (obj, field, old)
        else:
            st.reads.add(key)
        t = type(new)
        k = _KINDS.get(t)
        if k is None:
            k = _kind(t)
        if not k or t is SortedDict or t is KeyedDict or t is KeyedBytes:  # a value; or watched entry by entry
            # (_keyed)
            return
        if t is tuple:
            for x in new:
                if _kind(type(x)) and type(x) is not tuple:
                    self._reach(th, x)
                    self.loose.add(id(x))
        elif t is not frozenset:
            if t is deque and field == "waiters":
                self.lock_of[self._name(new, th)] = key[0]
            self._reach(th, new)

    def _reach(self, th: int, c: Any) -> None:
        """Thread ``th``'s step reached container ``c`` through a field: it reads it, and writes
        it if its contents differ at the step's end (noted now: nothing else changed it since the
        step began, unless through a reference the thread held, which begin noted)."""
        reached = self.reached[th]
        i = id(c)
        if i not in reached:
            reached[i] = (self._name(c, th), c)
            for inner in _nested(c):
                self.inner.setdefault(id(inner), i)
        frozen = self.frozen[th]
        if i not in frozen:
            mm_trace.set_field_hook(None)
            try:
                frozen[i] = _freeze(c)
            finally:
                mm_trace.set_field_hook(self.field)

    def access(self, obj: Any, field: str, write: bool) -> None:
        got = self._step()
        if got is not None:
            th, st = got
            key = (self._name(obj, th), field)
            (st.writes if write else st.reads).add(key)
        super().access(obj, field, write)

    def lock(self, op: str, lock: Any, result: bool | None) -> None:
        """A lock operation: the lock's own fields (owner, waiters) say what it read and changed,
        so that a lock taken and let go within one step is only a read of it. An rwsem's reader
        count is one entry per thread (each thread's read holds): two readers commute, a writer
        reads every entry, a release that may hand the lock on writes them all."""
        got = self._step()
        if got is not None and (type(lock) is not RwSem or "write" in op):  # an exclusive hold
            self._exclusive(got[1], (self._name(lock, got[0]), "owner"), op, result, type(lock) is SpinLock)
        if got is not None and isinstance(lock, RwSem):
            th = got[0]
            if op.startswith("down_read"):
                if result:
                    self._reader(lock, th, 1)
            elif op == "up_read":
                self._reader(lock, th, -1)
                if lock.waiters:
                    self.keyed(lock, None, True)
            elif op.startswith("down_write"):
                self.keyed(lock, None, False)
            elif op == "up_write" and lock.waiters:
                self.keyed(lock, None, True)
        super().lock(op, lock, result)  # records it, and parks there at the hardware's granularity

    def _exclusive(self, st: _Step, key: object, op: str, result: bool | None, spin: bool) -> None:
        """An operation of ``st`` on an exclusive lock (its owner ``key``): an acquisition, a
        sleep on it, or a release (_Handoff). A failed trylock is only a read of the owner."""
        if spin:
            self.spinlocks.add(key)
        if op == "wait_bit":  # a read of the owner, and a sleep on it while held: nothing taken
            if not result:
                st.waits.add(key)
            return
        if op in ("spin_unlock", "unlock", "up_write"):
            st.locks.append((key, False))
            if key in st.hold:
                st.hold.discard(key)
            else:
                st.rel.add(key)
        elif result or op == "spin_lock":
            st.locks.append((key, True))
            st.acq.add(key)
            st.hold.add(key)
        elif "try" not in op:
            st.waits.add(key)

    def _reader(self, lock: RwSem, th: int, delta: int) -> None:
        """Thread ``th`` took (1) or let go of (-1) a read hold of ``lock``."""
        key = (id(lock), th)
        counts = self.read_holds
        self.keyed(lock, ("r", th), True, lambda: counts.get(key, 0))
        counts[key] = counts.get(key, 0) + delta

    def refcount(self, obj: Any, old: int, new: int) -> None:
        """An atomic add to ``obj->refcount``: an add, not a read and a store (_Step.adds); one that
        takes a small folio's count across GUP_PIN_COUNTING_BIAS writes its pinned test."""
        got = self._step()
        if got is not None:
            th, st = got
            key = (self._name(obj, th), "refcount")
            a = st.adds.get(key)
            if a is None:
                a = st.adds[key] = [old, 0, 0, 0]
            a[1] += new - old
            if a[1] < a[2]:
                a[2] = a[1]
            elif a[1] > a[3]:
                a[3] = a[1]
            _pinned_test(st, key[0], obj, old, new)
        super().refcount(obj, old, new)

    def pinned(self, folio: Folio) -> None:
        """folio_maybe_dma_pinned of a small folio: a read of whether its refcount reaches
        GUP_PIN_COUNTING_BIAS, not of the count (a reference taken or dropped below the bias
        commutes with it; close writes the test's key when a step's change crosses the bias)."""
        got = self._step()
        if got is not None:
            got[1].reads.add((self._name(folio, got[0]), _PINNED))

    def held(self, obj: Any) -> None:
        """The running thread holds a view or iterator of the keyed ``obj``: each of its later steps
        reads all of it."""
        got = self._step()
        if got is not None:
            self.lazy[got[0]].setdefault(id(obj), self._name(obj, got[0]))

    def keyed(self, obj: Any, key: object, write: bool, now: Callable[[], Any] | None = None, part: str = "") -> None:
        """An access of one entry ``key`` of ``obj`` (a keyed variable: the RCU reader set, a
        ledger); ``key`` None: all of it (a read of every entry, or a write that moves entries
        wholesale). ``now`` reads the entry, so that a step that leaves it as it found it only
        read it."""
        got = self._step()
        if got is None:
            return
        th, st = got
        var = self._name(obj, th)
        if part:  # one of several keyed variables of obj
            var = (var, part)
        if key is not None and not isinstance(key[1], (int, str)):  # type: ignore[index]
            key = (key[0], self._name(key[1], th))  # type: ignore[index]
        if key is None:
            st.reads.add((var, "#any"))
            st.reads.add((var, "*"))
            if write:
                st.writes.add((var, "*"))
            return
        k = (var, key)
        st.reads.add((var, "*"))
        st.reads.add(k)
        if write:
            st.writes.add(k)
            st.some.add((var, "#any"))
            if now is not None and k not in st.kolds:
                st.kolds[k] = (now, now())

    def state(self, text: str) -> None:
        """The text of the accesses is not kept (the structured ones are)."""

    def woke(self, th: Thread) -> None:
        """``th`` was woken by the running thread: its next step comes after this one."""
        key = (("wait", th.index), "")
        got = self._step()
        if got is not None:
            got[1].writes.add(key)
        nxt = self.open.setdefault(th.index, _Step(th.index))
        nxt.reads.add(key)
        nxt.writes.add(key)
        lock = th.waits
        if th.bit:
            return  # woken on the lock's bit, given nothing (Mutex.wait_bit)
        if isinstance(lock, Mutex) or (isinstance(lock, RwSem) and lock.owner is not None):  # granted it
            self._exclusive(nxt, (self._name(lock, got[0] if got else th.index), "owner"), "grant", True, False)

    def begin(self, th: Thread) -> None:
        """``th`` was picked: its step starts (its containers' contents noted)."""
        st = self.open.setdefault(th.index, _Step(th.index))
        st.spin = th.point if th.point.startswith("spin:") else None
        for var in self.lazy[th.index].values():
            st.reads.add((var, "#any"))
            st.reads.add((var, "*"))
        mm_trace.set_field_hook(None)
        try:
            reached = self.reached[th.index]
            # A thread that picked itself has not stopped, and one parked inside synchronous code
            # (Controller.park_sync) is on no coroutine's stack: neither can be looked into, and
            # the containers it may touch are those something besides the model refers to.
            holds = (self._referred(reached) if th.inside or self.ctl.by_task.get(asyncio.current_task()) is th  # type: ignore[arg-type]
                     else self._holding(th))
            self.frozen[th.index] = {i: _freeze(reached[i][1]) for i in holds}
        finally:
            mm_trace.set_field_hook(self.field)

    def _referred(self, reached: dict[int, tuple[object, Any]]) -> set[int]:
        """Of the containers a thread reached, those that something refers to besides the watched
        fields that hold them, the run's own records (the set-up's objects, each thread's reached
        entry) and the container they sit in: a thread's local, a value on its stack (executing
        frames show neither to the garbage collector, but each counts in the reference count), an
        iterator, a view or a bound method. Any thread's: it may be another's, never missed. Every
        one reached where references are not counted (_REFCOUNTS false)."""
        if not _REFCOUNTS:
            return set(reached)
        base = self.base
        stored = self.stored
        loose = self.loose
        threads = self.reached.values()
        held: set[int] = set()
        for i, (_, c) in reached.items():
            # One each: the set-up's references (or the run's list of what it named), the fields
            # that came to hold it, each thread's reached entry.
            known = base.get(i, 1) + stored[i] + sum(1 for r in threads if i in r)
            if i in loose or _refs(c) - _REFS_OVERHEAD > known or self._inner_referred(c):
                held.add(i)
        return held

    def _inner_referred(self, c: Any) -> bool:
        """Whether something refers to a mutable container inside ``c`` (or to a tuple that holds
        one), at any depth, besides the container it sits in (and the set-up's references, for
        one of the set-up's): a thread may then change it without touching ``c``."""
        base = self.base
        for x in _items(c):
            t = type(x)
            if not _kind(t):
                continue
            if _refs(x) - _REFS_OVERHEAD > base.get(id(x), 1) and (t not in (tuple, frozenset) or _holds_mutable(x)):
                return True
            if self._inner_referred(x):
                return True
        return False

    def _holding(self, th: Thread) -> set[int]:
        """The containers ``th`` reached that its coroutines, suspended, refer to (in a local, on
        their stack, or through an iterator, view or bound method there): those its next step may
        touch without going through a field."""
        reached = self.reached[th.index]
        inner = self.inner
        found: set[int] = set()
        if not reached:
            return found

        def note(obj: Any) -> bool:
            i = id(obj)
            if i in reached:
                found.add(i)
                return True
            j = inner.get(i)
            if j is not None and j in reached:
                found.add(j)
                return True
            return False

        tasks = [t for t, owner in self.ctl.by_task.items() if owner is th and not t.done()]
        seen: set[int] = set()
        while tasks:
            c: Any = tasks.pop().get_coro()
            while c is not None and id(c) not in seen:
                seen.add(id(c))
                nxt = None
                for r in gc.get_referents(c):
                    if note(r):
                        continue
                    t = type(r)
                    if t is types.CoroutineType or t is types.GeneratorType or t is types.AsyncGeneratorType:
                        nxt = r
                    elif _looks_into(t):
                        for r2 in gc.get_referents(r):
                            note(r2)
                    elif issubclass(t, asyncio.Task):
                        tasks.append(r)
                c = nxt
        return found

    def close(self, th: Thread) -> _Step:
        """``th``'s step ended (it parked, slept or ended): what it read, wrote and changed."""
        st = self.open.pop(th.index, None) or _Step(th.index)
        mm_trace.set_field_hook(None)
        try:
            frozen = self.frozen[th.index]
            reached = self.reached[th.index]
            key: object
            conts: list[tuple[int, Any, Any]] = []  # the containers it changed, with their contents before
            for i, before in frozen.items():
                var, c = reached[i]
                key = (var, "[]")
                st.reads.add(key)
                if _freeze(c) != before:
                    st.writes.add(key)
                    st.changed.add(key)
                    conts.append((i, c, before))
            self.frozen[th.index] = {}
            for key, (obj, field, old) in st.olds.items():
                now = getattr(obj, field, mm_trace.UNSET)
                if not _same(now, old):
                    st.changed.add(key)
                    if field == "refcount":
                        _pinned_test(st, key[0], obj, old, now)  # type: ignore[index]
                else:  # left as it was: to the others, the step only read it
                    st.writes.discard(key)
                    st.reads.add(key)
            mixed = False
            for key, a in list(st.adds.items()):  # an add is a read, and a write unless it came back
                if key in st.reads or key in st.writes:  # read or stored plainly too: not an add
                    del st.adds[key]
                    mixed = True
                st.reads.add(key)
                if a[1]:
                    st.writes.add(key)
                    st.changed.add(key)
            if st.kolds:
                for key, (now_fn, old) in st.kolds.items():
                    if now_fn() == old:
                        st.writes.discard(key)
                    else:
                        st.changed.add(key)
                st.some = {(k[0], "#any") for k in st.kolds if k in st.writes}
            if th.state == "blocked":
                key = (("wait", th.index), "")
                st.reads.add(key)
                st.writes.add(key)
            self._spun(th, st, conts, mixed)
        finally:
            mm_trace.set_field_hook(self.field if self.active else None)
        st.olds = {}
        st.kolds = {}
        return st

    def _spun(self, th: Thread, st: _Step, conts: list[tuple[int, Any, Any]], mixed: bool) -> None:
        """Whether ``th``'s closing step ends a futile spin (``st.futile``, with what the spin read
        in ``st.spun``): a spin iteration, from a step that began at a spin point to one that
        parks there again, that left everything as it found it (each field stored, each keyed
        entry, each container changed, the sum of each counter's adds) while no other thread's
        step that ran meanwhile depended on any of its steps, but futile spins (which change
        nothing: only their own thread waits on what they read). Such an iteration is as if it
        were one step that changed nothing."""
        spins = self.spins
        it = spins.get(th.index)
        if st.spin is not None:  # it began at a spin point: a new iteration (the last did not come back)
            it = spins[th.index] = _Spin(st.spin)
        if it is not None:
            it.add(st, conts, mixed)
            if th.state == "parked" and th.point == it.point:
                del spins[th.index]
                if it.clean and it.unchanged():
                    st.futile = True
                    st.spun = it.reads
            elif th.state == "done":
                del spins[th.index]
        if not st.futile:
            for t, other in spins.items():
                if t != th.index:
                    other.other(st)

    def finish(self) -> None:
        """The threads ended (or the run stopped): the last step closes; nothing more is watched."""
        cur = self.ctl.current
        if cur is not None and not self.ctl.detached:
            self.on_step(self.close(cur))
        self.active = False
        mm_trace.set_field_hook(None)


def _refs(c: object) -> int:
    """sys.getrefcount(c), called as _Watch._referred calls it."""
    return sys.getrefcount(c)


def _calibrate() -> int:
    for c in (list[int](),):  # held by the tuple and this loop's variable, as a reached entry and its loop
        return _refs(c) - 1
    raise AssertionError


#: The references _Watch._referred's own loop and calls add to each container it counts.
_REFS_OVERHEAD = _calibrate()
#: The containers whose references are counted (the others are watched entry by entry, or immutable).
_COUNTED = frozenset({*_CONTAINERS, Counter})
#: Whether reference counts count every reference to a container (CPython up to 3.13: a value on
#: an executing frame's stack holds one; 3.14 may borrow them).
_REFCOUNTS = sys.implementation.name == "cpython" and sys.version_info < (3, 14)


def _holds_mutable(v: Any) -> bool:
    """Whether a mutable container sits inside ``v`` at any depth."""
    return any(not isinstance(x, (tuple, frozenset)) for x in _nested(v))


_ABSENT = object()
#: The key of a small folio's pinned test (folio_maybe_dma_pinned: refcount ≥ the bias).
_PINNED = "refcount>=GUP_PIN_COUNTING_BIAS"

#: How the DPOR search sees each method of a SortedDict (the mm's VMA tree, page tables and huge
#: PMDs): a read or write of the entry its key names; a read of every entry (``lazy``: what it
#: returns reads the dict later, so the thread reads all of it from then on); a write of all.
_SD_KINDS = {
    "__getitem__": "key-read", "get": "key-read", "__contains__": "key-read",
    "__setitem__": "key-write", "__delitem__": "key-write", "pop": "key-write", "setdefault": "key-write",
    "__iter__": "lazy", "__reversed__": "lazy", "keys": "lazy", "values": "lazy", "items": "lazy",
    "clear": "write", "popitem": "write", "update": "write", "__ior__": "write",
}
#: The rest of a SortedDict's methods: reads of every entry.
_SD_OTHER = ("__len__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__repr__", "__str__", "copy",
             "__copy__", "peekitem", "__or__", "__ror__")
#: The SortedList methods a SortedDict hands out as its own attributes (irange, bisect, ...): reads
#: of every entry, lazy.
_SD_LIST_METHODS = frozenset({"irange", "islice", "index", "bisect", "bisect_left", "bisect_right", "bisect_key",
                              "bisect_key_left", "bisect_key_right", "irange_key", "_list"})
#: Those of them whose result reads the dict later (an iterator, the list itself): lazy.
_SD_LAZY = frozenset({"irange", "islice", "irange_key", "_list"})


def _watching() -> _Watch | None:
    """The DPOR run's watch while it watches (not while it takes a fingerprint or closes a step)."""
    hook = mm_trace.field_hook
    return getattr(hook, "__self__", None)


@contextmanager
def _keyed() -> Iterator[None]:
    """While in the block, the RCU reader set and the page ledgers report their accesses entry by
    entry (_Watch.keyed): a task entering or leaving a read section writes its own entry (and its
    holdout entry, if a grace period waits for it: the last to leave reads them all), a grace
    period's start reads every reader and writes every holdout; a ledger's page lookups and
    stores read and write that page's entry, its iteration and size read every entry, a PMD's
    table carried over or a ledger let go writes them all; an rwsem's is_locked reads every read
    hold; a SortedDict's methods as _SD_KINDS says. Two tasks' read sections, or two writers of
    different pages, then commute."""
    undo: list[tuple[type | types.ModuleType, str, Any]] = []

    def patch(cls: type | types.ModuleType, attr: str, fn: Callable[..., Any]) -> None:
        undo.append((cls, attr, cls.__dict__.get(attr, _ABSENT)))
        setattr(cls, attr, fn)

    rcu_lock, rcu_unlock, start_gp = Rcu.read_lock, Rcu.read_unlock, Rcu._start_gp
    maybe_pinned = mm_types.folio_maybe_dma_pinned

    def folio_maybe_dma_pinned(folio: Folio) -> bool:
        w = _watching()
        if w is None or folio.large:  # a large folio's test reads its pincount: a field of its own
            return maybe_pinned(folio)
        mm_trace.set_field_hook(None)
        try:
            got = maybe_pinned(folio)
        finally:
            mm_trace.set_field_hook(w.field)
        w.pinned(folio)
        return got

    def read_lock(self: Rcu, cur: Any) -> None:
        w = _watching()
        if w is not None and cur.rcu_nesting == 0:
            w.keyed(self, ("rcu", cur), True, lambda: cur in self.readers)
        rcu_lock(self, cur)

    def read_unlock(self: Rcu, cur: Any) -> None:
        w = _watching()
        if w is not None and cur.rcu_nesting == 1:
            w.keyed(self, ("rcu", cur), True, lambda: cur in self.readers)
            holdout = cur in self._holdouts
            w.keyed(self, ("holdout", cur), holdout, lambda: cur in self._holdouts, part="holdouts")
            if holdout:  # the last holdout to leave ends the grace period
                w.keyed(self, None, False, part="holdouts")
        rcu_unlock(self, cur)

    def _start_gp(self: Rcu) -> None:
        w = _watching()
        if w is not None:  # reads every reader, makes them all holdouts
            w.keyed(self, None, False)
            w.keyed(self, None, True, part="holdouts")
        start_gp(self)

    get, getitem, setitem, delitem, contains, it, length, move_pmd, release = (
        PageLedger.get, PageLedger.__getitem__, PageLedger.__setitem__, PageLedger.__delitem__,
        PageLedger.__contains__, PageLedger.__iter__, PageLedger.__len__, PageLedger.move_pmd, PageLedger.release)

    def entry(self: PageLedger, vpn: Any, write: bool) -> None:
        w = _watching()
        if w is not None:
            w.keyed(self, ("page", vpn), write, (lambda: get(self, vpn, mm_trace.UNSET)) if write else None)

    def whole(self: PageLedger, write: bool) -> None:
        w = _watching()
        if w is not None:
            w.keyed(self, None, write)

    def l_get(self: PageLedger, vpn: int, default: int | None = None) -> int | None:
        entry(self, vpn, False)
        return get(self, vpn, default)

    def l_getitem(self: PageLedger, vpn: int) -> int:
        entry(self, vpn, False)
        return getitem(self, vpn)

    def l_contains(self: PageLedger, vpn: object) -> bool:
        entry(self, vpn, False)
        return contains(self, vpn)

    def l_setitem(self: PageLedger, vpn: int, value: int) -> None:
        entry(self, vpn, True)
        setitem(self, vpn, value)

    def l_delitem(self: PageLedger, vpn: int) -> None:
        entry(self, vpn, True)
        delitem(self, vpn)

    def l_iter(self: PageLedger) -> Iterator[int]:
        whole(self, False)
        return it(self)

    def l_len(self: PageLedger) -> int:
        whole(self, False)
        return length(self)

    def l_move_pmd(self: PageLedger, src_idx: int, dst_idx: int) -> None:
        whole(self, True)
        move_pmd(self, src_idx, dst_idx)

    async def l_release(self: PageLedger) -> None:
        whole(self, True)
        await release(self)
        whole(self, True)

    def sd_method(name: str, orig: Callable[..., Any]) -> Callable[..., Any]:
        kind = _SD_KINDS.get(name, "read")
        if kind == "key-read" or kind == "key-write":
            write = kind == "key-write"

            def keyed_method(self: SortedDict, key: Any, *args: Any) -> Any:
                w = _watching()
                if w is not None:
                    try:
                        hash(key)
                    except TypeError:
                        w.keyed(self, None, write)
                    else:
                        w.keyed(self, ("key", key), write,
                                (lambda: dict.get(self, key, mm_trace.UNSET)) if write else None)  # type: ignore[call-overload]
                return orig(self, key, *args)

            return keyed_method

        def whole_method(self: SortedDict, *args: Any, **kwargs: Any) -> Any:
            w = _watching()
            if w is not None:
                w.keyed(self, None, kind == "write")
                if kind == "lazy":
                    w.held(self)
            return orig(self, *args, **kwargs)

        return whole_method

    def bytes_method(name: str, orig: Callable[..., Any]) -> Callable[..., Any]:
        write = name == "__setitem__"

        def keyed_byte(self: KeyedBytes, i: Any, *args: Any) -> Any:
            w = _watching()
            if w is not None:
                if isinstance(i, int):
                    w.keyed(self, ("key", i), write, (lambda: bytearray.__getitem__(self, i)) if write else None)
                else:
                    w.keyed(self, None, write)
            return orig(self, i, *args)

        return keyed_byte

    def sd_getattribute(self: SortedDict, attr: str) -> Any:
        if attr in _SD_LIST_METHODS:
            w = _watching()
            if w is not None:
                w.keyed(self, None, False)
                if attr in _SD_LAZY:
                    w.held(self)
        return object.__getattribute__(self, attr)

    lookup = Mm.vma_lookup

    def vma_lookup(self: Mm, addr: int) -> Vma | None:
        """Mm.vma_lookup as the search sees it: the VMA cache (unwatched: it only saves the tree
        walk, and is kept coherent) hands out a VMA that contains ``addr``; such a hit reads that
        VMA's extent and the tree's entry for it, which an unlink or a split writes. A miss reads
        the tree as vma_lookup does."""
        w = _watching()
        if w is not None:
            mm_trace.set_field_hook(None)
            try:
                hit = next((v for v in self.vmacache if v.start <= addr < v.end), None)
            finally:
                mm_trace.set_field_hook(w.field)
            if hit is not None and hit.start <= addr < hit.end and self.mm_mt.get(hit.start) is hit:
                return hit
        return lookup(self, addr)

    is_locked = RwSem.is_locked

    def rwsem_is_locked(self: RwSem) -> bool:
        w = _watching()
        if w is not None:
            w.keyed(self, None, False)
        return is_locked(self)

    try:
        patch(RwSem, "is_locked", rwsem_is_locked)
        patch(Mm, "vma_lookup", vma_lookup)
        for attr in (*_SD_KINDS, *_SD_OTHER):
            patch(SortedDict, attr, sd_method(attr, getattr(SortedDict, attr)))
            if hasattr(dict, attr):  # a PTE table's entries: the same, by their dict methods
                patch(KeyedDict, attr, sd_method(attr, getattr(dict, attr)))
        for attr in ("__getitem__", "__setitem__"):  # a swap_map's bytes by offset; a slice: all of it
            patch(KeyedBytes, attr, bytes_method(attr, getattr(bytearray, attr)))
        for attr in ("find", "rfind", "index", "count", "__iter__", "__len__", "__contains__", "__eq__"):
            patch(KeyedBytes, attr, sd_method(attr, getattr(bytearray, attr)))
        patch(SortedDict, "__getattribute__", sd_getattribute)
        patch(Rcu, "read_lock", read_lock)
        for mod in _mm_modules():  # each module that imported it by name
            if vars(mod).get("folio_maybe_dma_pinned") is maybe_pinned:
                patch(mod, "folio_maybe_dma_pinned", folio_maybe_dma_pinned)
        patch(Rcu, "read_unlock", read_unlock)
        patch(Rcu, "_start_gp", _start_gp)
        for attr, fn in (("get", l_get), ("__getitem__", l_getitem), ("__contains__", l_contains),
                         ("__setitem__", l_setitem), ("__delitem__", l_delitem), ("__iter__", l_iter),
                         ("__len__", l_len), ("move_pmd", l_move_pmd), ("release", l_release)):
            patch(PageLedger, attr, fn)
        yield
    finally:
        for cls, attr, fn in reversed(undo):
            if fn is _ABSENT:
                delattr(cls, attr)
            else:
                setattr(cls, attr, fn)


_GLOBAL_NAMES: dict[int, object] = {}
#: Decisions of one DPOR run past which it is cut (and the search not complete).
MAX_DPOR_STEPS = 500


@dataclass
class _Node:
    """A decision of the current path: the threads enabled there, its sleep set (each sleeping
    thread with its next step), the threads to explore (backtrack, a source set), those explored
    (with their steps), the pick on the path and its step."""

    enabled: tuple[int, ...]
    sleep: dict[int, _Step | None]
    backtrack: set[int]
    pick: int
    done: dict[int, _Step | None] = field(default_factory=dict)
    step: _Step | None = None


class _Dpor:
    """Source-DPOR with sleep sets over the runs of one scenario: each run follows the path's
    picks up to the node being explored, the new pick there, then its own (the running thread
    while it can go on and is not asleep) until the threads end or every enabled thread sleeps."""

    def __init__(self, full: bool = False, handoffs: bool = True) -> None:
        #: Every schedule instead (no sleep sets, every enabled thread at every node): brute force.
        self.full = full
        #: Exclusive locks handed on freely order nothing (_Handoff); else every hand-off orders.
        self.handoffs = handoffs
        #: The scenario searched, and the fields its runs do not watch (_ignored).
        self.scn: Scenario | None = None
        self.ignored: dict[str, tuple[type, ...]] | None = None
        self.path: list[_Node] = []
        self.target: tuple[int, int] | None = None  # (depth, thread) of the next run's new pick
        self.states: set[object] = set()
        #: The run's state fingerprint (unwatched), when the search counts states.
        self.fingerprint: Callable[[], object] | None = None
        self.traces = 0  # runs that were not sleep-set blocked
        self.blocked_runs = 0
        # per run
        self.ctl: Controller | None = None
        self.watch: _Watch | None = None
        self.recording = True
        self.blocked = False
        self.disabled: dict[int, set[object]] = {}
        self.steps = 0
        self.cut = False
        self.last_model: MemoryModel | None = None

    def begin(self, ctl: Controller, m: MemoryModel, setup: list[object]) -> _Watch:
        """A run starts: watch it."""
        self.ctl = ctl
        self.recording = True
        self.blocked = False
        self.cut = False
        self.disabled = {}
        self.steps = 0
        if self.ignored is None:
            self.ignored = _ignored(self.scn, m) if self.scn is not None else None
        self.watch = _Watch(ctl, setup, self._stepped, self.ignored)
        fp = ctl.fingerprint
        self.fingerprint = None
        if fp is not None:  # taken where the run is new (_pick), not by the controller at every decision
            def unwatched() -> object:
                mm_trace.set_field_hook(None)
                try:
                    return fp()
                finally:
                    mm_trace.set_field_hook(self.watch.field if self.watch and self.watch.active else None)
            self.fingerprint = unwatched
            ctl.fingerprint = None
        return self.watch

    def ended(self, m: MemoryModel) -> None:
        """A run ended: find its races and count it."""
        self.last_model = m
        if not self.full:
            _commuting_adds([nd.step for nd in self.path])
            self._races(self.target[0] if self.target is not None else 0)
        if self.blocked:
            self.blocked_runs += 1
        else:
            self.traces += 1

    def _stepped(self, st: _Step) -> None:
        """A step closed: on the path, and what it enables or disables among the spinners."""
        i = self.steps
        self.steps += 1
        if self.recording and i < len(self.path):
            self.path[i].step = st
        if st.changed:
            for q in [q for q, reads in self.disabled.items() if q != st.thread and not reads.isdisjoint(st.changed)]:
                del self.disabled[q]
        if st.futile:
            self.disabled[st.thread] = st.spun
        else:
            self.disabled.pop(st.thread, None)

    def choose(self, d: Decision) -> int:
        ctl = self.ctl
        w = self.watch
        assert ctl is not None and w is not None
        if ctl.current is not None:
            self._stepped(w.close(ctl.current))
        pick = self._pick(d)
        w.begin(ctl.threads[pick])
        return pick

    def _pick(self, d: Decision) -> int:
        s = d.step
        if not self.recording:
            return d.default
        enabled = tuple(t for t in d.runnable if t not in self.disabled)
        depth = self.target[0] if self.target is not None else 0
        if s >= depth and self.fingerprint is not None:  # the states before it: counted when first run
            self.states.add(self.fingerprint())
        if s < depth or (s == depth and self.target is not None):
            node = self.path[s]
            pick = self.target[1] if s == depth and self.target is not None else node.pick
            if pick not in enabled:
                if pick not in d.runnable:
                    raise RuntimeError(f"step {s}: the replayed pick {pick} cannot run ({d.runnable}): "
                                       "the model ran differently on the same picks")
                # A futile spinner that a step woke in the first run and not now: what the steps
                # are taken to read (the containers a thread still refers to) may differ.
                enabled = tuple(sorted((*enabled, pick)))
            node.pick = pick
            node.enabled = enabled
            return pick
        sleep: dict[int, _Step | None] = {}
        if s > 0 and not self.full:
            parent = self.path[s - 1]
            for q, st in (*parent.sleep.items(), *parent.done.items()):
                if q != parent.pick and not _dependent(st, parent.step):
                    sleep[q] = st
        avail = [t for t in enabled if t not in sleep]
        if s >= MAX_DPOR_STEPS:  # a run that does not end: cut (the search is not complete)
            self.recording = False
            self.cut = True
            return d.default
        if not avail:  # every enabled thread sleeps (or none is enabled: a livelock of spinners)
            self.recording = False
            self.blocked = bool(enabled)
            return d.default
        if d.current in avail and d.current not in d.spinning:
            pick = d.current
        else:
            pick = next((t for t in avail if t not in d.spinning), avail[0])
        self.path.append(_Node(enabled, sleep, set(enabled) if self.full else {pick}, pick))
        return pick

    def _races(self, start: int) -> None:
        """Source-DPOR's race analysis of the run's new steps (from ``start``): for each race
        i ⋖ j, a thread that can start the reversed order goes into node i's backtrack set,
        unless one already is there. A lock handed on freely orders nothing (_Handoff)."""
        path = self.path
        steps = [nd.step for nd in path]
        threads = [nd.pick for nd in path]
        w = self.watch
        lock_of: dict[object, object] = w.lock_of if w else {}
        _, pred, direct = _lock_aware(steps, threads, self.handoffs, lock_of, w.spinlocks if w else None)
        last: dict[int, int] = {}  # each thread's latest step so far
        for j, b in enumerate(steps):
            mine = last.get(threads[j])
            last[threads[j]] = j
            if j < start:
                continue
            via = pred[mine] if mine is not None else 0
            passed = 0  # the releases that handed it a lock (not races: _hands_on)
            for i in direct[j]:
                if self.handoffs and b is not None and b.acq and _hands_on(steps[i], b, lock_of):
                    passed |= 1 << i
                else:
                    via |= pred[i]
            for i in direct[j]:
                if not ((via | passed) >> i) & 1:
                    self._reverse(i, j, pred)

    def _reverse(self, i: int, j: int, pred: list[int]) -> None:
        node = self.path[i]
        v = [k for k in range(i + 1, j) if not (pred[k] >> i) & 1] + [j]
        initials: set[int] = set()
        seen: set[int] = set()
        for x, k in enumerate(v):
            t = self.path[k].pick
            if t in seen:
                continue
            seen.add(t)
            if not any((pred[k] >> k2) & 1 for k2 in v[:x]):
                initials.add(t)
        if initials & (node.backtrack | node.done.keys()) or initials & node.sleep.keys():
            return
        able = sorted(t for t in initials if t in node.enabled)
        if able:
            node.backtrack.add(able[0])
        else:  # none of them can start here: every enabled thread
            node.backtrack.update(t for t in node.enabled if t not in node.sleep)

    def next_run(self) -> bool:
        """Move to the deepest node with a thread left to explore; False when none is left."""
        path = self.path
        while path:
            node = path[-1]
            node.done[node.pick] = node.step
            left = sorted(t for t in node.backtrack if t not in node.done and t not in node.sleep)
            if left:
                self.target = (len(path) - 1, left[0])
                return True
            path.pop()
        return False


async def _explore_dpor(s: Search, scn: Scenario, protocol: str, mutant: str | None, start: bytes,
                        schedules: int, stop_on_catch: bool, full: bool = False, handoffs: bool = True,
                        on_run: Callable[[RunResult, MemoryModel | None, bool], None] | None = None,
                        fine: bool = True) -> None:
    """The DPOR search (see above): every Mazurkiewicz trace of the scenario once, or until
    ``schedules`` runs or a catch (with ``stop_on_catch``). ``full``: every schedule instead (the
    futile spins aside), no reduction: what tests hold DPOR against. ``on_run``: told of each run,
    its model after the threads ended, and whether it was sleep-set blocked. ``fine``: at the
    hardware's granularity (run_schedule), else at the named points. ``handoffs``: the lock-aware
    reduction of exclusive locks' hand-offs (_Handoff); without it, every hand-off is an order to
    reverse (what tests hold it against)."""
    if not _GLOBAL_NAMES:
        _GLOBAL_NAMES.update(_module_objects())
    dp = _Dpor(full, handoffs)
    dp.scn = scn
    with mm_trace.watch_fields(_WATCHED), _keyed():
        while True:
            r = await run_schedule(scn, protocol, mutant, dp.choose, hashing=True, start=start, trace=False, dpor=dp,
                                   fine=fine)
            if on_run is not None:
                on_run(r, dp.last_model, dp.blocked)
            s.cut += dp.cut and not r.cut
            if s.account(r, s.schedules + 1) and stop_on_catch:
                break
            if not dp.next_run():
                s.complete = True
                break
            if s.schedules >= schedules or s.out_of_time():
                break
    s.traces = dp.traces
    s.blocked = dp.blocked_runs
    s.states = len(dp.states)


def minimize(scn: Scenario, protocol: str, mutant: str | None, r: RunResult) -> RunResult:
    """The run with as few preemptions as still get it caught by the same kind of check."""

    want = r.kinds
    pre = dict(r.preemptions)
    best = run_sync(scn, protocol, mutant, follow(pre), r.fine)
    changed = True
    while changed:
        changed = False
        for step in sorted(pre):
            trial = {k: v for k, v in pre.items() if k != step}
            t = run_sync(scn, protocol, mutant, follow(trial), r.fine)
            if t.caught and t.kinds & want:
                pre, best, changed = trial, t, True
                break
    return best


# ---------------------------------------------------------------------------------------------
# Replay tokens


def token(scn: Scenario, protocol: str, mutant: str | None, preemptions: list[tuple[int, int]],
          fine: bool = False) -> str:
    """A replay token: the scenario, the protocol and mutant, and the schedule (its preemptions, at
    the named points or, ``fine``, at the hardware's granularity)."""
    doc = {"v": 1, "name": scn.name, "scenario": scn.text, "protocol": protocol, "mutant": mutant,
           "preemptions": preemptions, **({"fine": True} if fine else {})}
    packed = zlib.compress(json.dumps(doc, separators=(",", ":")).encode(), 9)
    return base64.urlsafe_b64encode(packed).decode().rstrip("=")


def untoken(tok: str) -> tuple[Scenario, str, str | None, dict[int, int], bool]:
    """What :func:`token` packed: scenario, protocol, mutant, preemptions, and whether fine."""
    try:
        raw = zlib.decompress(base64.urlsafe_b64decode(tok + "=" * (-len(tok) % 4)))
        doc = json.loads(raw)
        scn = parse(doc["scenario"], f"{doc['name']}.litmus")
        return (scn, str(doc["protocol"]), doc.get("mutant"), {int(k): int(v) for k, v in doc["preemptions"]},
                bool(doc.get("fine", False)))
    except ScenarioError:
        raise
    except Exception as e:  # noqa: BLE001 - any damage to the token is one error
        raise ScenarioError(f"not a replay token ({type(e).__name__})") from None


# ---------------------------------------------------------------------------------------------
# Traces


def trace_rows(scn: Scenario, r: RunResult) -> list[tuple[int, int, str, str]]:
    """(step, thread, kind, text): one row per event."""
    return [(e.step, e.thread, e.kind,
             e.text + (f"   [holds {', '.join(e.held)}]" if e.held and e.kind != "op" else ""))
            for e in r.events]


def trace_html(scn: Scenario, r: RunResult, title: str) -> str:
    """A self-contained HTML sequence diagram: one column per thread, one row per event."""
    names = [n for n, _ in scn.threads]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = []
    for e in r.events:
        cells = []
        for i in range(len(names)):
            if i == e.thread:
                held = f'<div class="held">holds {html.escape(", ".join(e.held))}</div>' if e.held else ""
                cells.append(f'<td class="{e.kind}">{html.escape(e.text)}{held}</td>')
            else:
                cells.append('<td class="idle"></td>')
        if e.thread < 0:
            cells = [f'<td class="finding" colspan="{len(names)}">{html.escape(e.text)}</td>']
        rows.append(f"<tr><th class='step'>{e.step}</th>{''.join(cells)}</tr>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font: 13px/1.35 system-ui, sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }}
th, td {{ border-left: 2px solid #bbb; padding: 2px 10px; vertical-align: top; }}
thead th {{ background: #eee; position: sticky; top: 0; }}
th.step {{ color: #888; font-weight: normal; text-align: right; }}
td.point {{ color: #555; }} td.lock {{ color: #05a; }} td.state {{ color: #838; }} td.op {{ font-weight: bold; }}
td.result {{ color: #070; }} td.finding {{ background: #fdd; color: #900; font-weight: bold; }}
td.idle {{ background: #fafafa; }} div.held {{ color: #999; font-size: 11px; }}
</style></head><body>
<h2>{html.escape(title)}</h2>
<table><thead><tr><th>step</th>{head}</tr></thead><tbody>
{chr(10).join(rows)}
</tbody></table></body></html>
"""
