"""Unit tests of the model's primitives: RwSem, Mutex, SpinLock, lockdep, RCU, the typesafe cache
and the seeded scheduler.

Nothing here sleeps on the wall clock: tasks are advanced with ``asyncio.sleep(0)`` turns only.
"""

from __future__ import annotations

import asyncio
import errno

import pytest

from mmsim.server.mm.detectors import Detectors
from mmsim.server.mm.kernel import Kernel
from mmsim.server.mm.locks import Current, LockClass, LockdepState, Mutex, RwSem, SpinLock, release_all
from mmsim.server.mm.model import PAGE_SIZE, MemoryModel
from mmsim.server.mm.rcu import Rcu, TypesafeCache, TypesafeObject
from mmsim.server.mm.sched import POINTS, Scheduler
from mmsim.server.mm.userfaultfd import double_pt_lock, double_pt_unlock
from mmsim.server.tools.race import run_race

P = PAGE_SIZE


def ld() -> tuple[LockdepState, Detectors]:
    d = Detectors()
    return LockdepState(d), d


def rwsem(name: str = "sem", rank: LockClass = LockClass.ANON_VMA) -> tuple[RwSem, Detectors]:
    state, d = ld()
    return RwSem(name, rank, state), d


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def acquire_read(sem: RwSem, cur: Current, log: list[str] | None = None) -> None:
    if not sem.down_read(cur):
        await sem.wait(cur)
    if log is not None:
        log.append(cur.name)


async def acquire_write(sem: RwSem, cur: Current, log: list[str] | None = None) -> None:
    if not sem.down_write(cur):
        await sem.wait(cur)
    if log is not None:
        log.append(cur.name)


async def acquire_mutex(mx: Mutex, cur: Current, log: list[str] | None = None) -> None:
    if not mx.lock(cur):
        await mx.wait(cur)
    if log is not None:
        log.append(cur.name)


async def wait_bit(mx: Mutex, cur: Current, log: list[str] | None = None) -> None:
    if not mx.wait_bit(cur):
        await mx.wait(cur)
    if log is not None:
        log.append(cur.name)


# ---------------------------------------------------------------------------------------------
# RwSem


def test_uncontended_fast_path_needs_no_event_loop() -> None:
    """No running loop exists here: an acquisition that tried to queue would raise RuntimeError."""
    sem, d = rwsem()
    a, b = Current("a"), Current("b")
    assert sem.down_read(a) is True
    assert sem.down_read(b) is True
    assert sem.readers == 2 and sem.owner is None
    sem.up_read(a)
    sem.up_read(b)
    assert not sem.is_locked()
    assert sem.down_write(a) is True
    assert sem.owner is a and a.held == [sem]
    sem.up_write(a)
    assert a.held == [] and not sem.is_locked()
    state, _ = ld()
    mx = Mutex("m", LockClass.FOLIO_LOCK, state)
    assert mx.lock(a) is True
    mx.unlock(a)
    assert not d.counts


async def test_readers_share_writer_excludes() -> None:
    sem, d = rwsem()
    r1, r2, w = Current("r1"), Current("r2"), Current("w")
    assert sem.down_read(r1) and sem.down_read(r2)
    assert sem.readers == 2
    assert sem.down_write_trylock(w) is False
    log: list[str] = []
    t = asyncio.create_task(acquire_write(sem, w, log))
    await turns()
    assert log == [] and sem.owner is None
    sem.up_read(r1)
    await turns()
    assert log == [], "a writer must wait for every reader"
    sem.up_read(r2)
    await turns()
    await t
    assert log == ["w"] and sem.owner is w and sem.readers == 0
    # While the writer holds it, readers (trylock or blocking) are excluded.
    assert sem.down_read_trylock(r1) is False
    t2 = asyncio.create_task(acquire_read(sem, r1, log))
    await turns()
    assert log == ["w"]
    sem.up_write(w)
    await t2
    assert log == ["w", "r1"] and sem.readers == 1
    sem.up_read(r1)
    assert not sem.is_locked() and not d.counts


async def test_reader_arriving_while_writer_waits_queues_behind_it() -> None:
    sem, _ = rwsem()
    r1, w, r2 = Current("r1"), Current("w"), Current("r2")
    assert sem.down_read(r1)
    log: list[str] = []
    tw = asyncio.create_task(acquire_write(sem, w, log))
    await turns()
    # The lock is only read-held, but a writer waits: a new reader must not barge in.
    assert sem.down_read(r2) is False
    tr = asyncio.create_task(sem.wait(r2))
    await turns()
    assert sem.readers == 1 and r2.held == []
    sem.up_read(r1)
    await tw
    await turns()
    assert log == ["w"] and not tr.done() and sem.owner is w
    sem.up_write(w)
    await tr
    assert sem.readers == 1 and r2.held == [sem]
    sem.up_read(r2)
    assert not sem.is_locked()


async def test_trylocks_fail_while_waiters_exist() -> None:
    sem, _ = rwsem()
    r1, w, r2 = Current("r1"), Current("w"), Current("r2")
    assert sem.down_read_trylock(r1)
    assert sem.down_read_trylock(r2), "readers share through the trylock too"
    sem.up_read(r2)
    t = asyncio.create_task(acquire_write(sem, w))
    await turns()
    assert sem.waiters
    assert sem.down_read_trylock(r2) is False
    assert sem.down_write_trylock(r2) is False
    assert r2.held == []
    sem.up_read(r1)
    await t
    sem.up_write(w)
    # Nobody holds it, nobody waits: the trylocks succeed again.
    assert sem.down_write_trylock(r2) is True
    sem.up_write(r2)
    state, _ = ld()
    mx = Mutex("m", LockClass.FOLIO_LOCK, state)
    a, b, c = Current("a"), Current("b"), Current("c")
    assert mx.trylock(a)
    tb = asyncio.create_task(acquire_mutex(mx, b))
    await turns()
    assert mx.trylock(c) is False
    mx.unlock(a)
    await tb
    assert mx.owner is b
    assert mx.trylock(c) is False
    mx.unlock(b)
    assert mx.trylock(c) is True
    mx.unlock(c)


async def test_rwsem_fifo_handoff() -> None:
    sem, _ = rwsem()
    w1, r1, r2, w2, r3 = (Current(n) for n in ("w1", "r1", "r2", "w2", "r3"))
    assert sem.down_write(w1)
    log: list[str] = []
    tasks = [
        asyncio.create_task(acquire_read(sem, r1, log)),
        asyncio.create_task(acquire_read(sem, r2, log)),
        asyncio.create_task(acquire_write(sem, w2, log)),
        asyncio.create_task(acquire_read(sem, r3, log)),
    ]
    await turns()
    assert [w.cur.name for w in sem.waiters or ()] == ["r1", "r2", "w2", "r3"]
    sem.up_write(w1)
    await turns()
    # Every reader up to the first waiting writer is granted at once; r3 stays behind w2.
    assert sorted(log) == ["r1", "r2"] and sem.readers == 2
    sem.up_read(r1)
    await turns()
    assert sorted(log) == ["r1", "r2"]
    sem.up_read(r2)
    await turns()
    assert log[2:] == ["w2"] and sem.owner is w2
    sem.up_write(w2)
    await asyncio.gather(*tasks)
    assert log[2:] == ["w2", "r3"]
    sem.up_read(r3)
    assert not sem.is_locked() and not sem.waiters


async def test_mutex_fifo_handoff() -> None:
    state, d = ld()
    mx = Mutex("folio.lock", LockClass.FOLIO_LOCK, state)
    holder = Current("holder")
    assert mx.lock(holder)
    assert mx.lock(Current("x")) is False  # queued (and left there: drop it again)
    mx.waiters.clear()
    curs = [Current(f"t{i}") for i in range(4)]
    log: list[str] = []
    tasks = [asyncio.create_task(acquire_mutex(mx, c, log)) for c in curs]
    await turns()
    assert log == []
    mx.unlock(holder)
    for i, c in enumerate(curs):
        await turns()
        assert log == [f"t{j}" for j in range(i + 1)]
        assert mx.owner is c and mx.is_locked()
        mx.unlock(c)
    await asyncio.gather(*tasks)
    assert not mx.is_locked() and not d.counts


async def test_wait_bit_sleeps_until_the_lock_is_let_go_and_takes_nothing() -> None:
    """Mutex.wait_bit (folio_wait_bit on PG_locked, as migration_entry_wait_on_locked): free now,
    it answers True and takes nothing; held, the waiter sleeps and the release wakes it without
    handing it the lock, so a trylock right after succeeds. The first acquisition queued behind
    bit waiters still gets the lock; a bit waiter behind that acquisition waits for its release."""
    state, d = ld()
    mx = Mutex("folio.lock", LockClass.FOLIO_LOCK, state)
    a, b, c, e, x = (Current(n) for n in "abcex")
    assert mx.wait_bit(b) and mx.owner is None and b.held == [] and b.waiting is None
    assert mx.lock(a)
    log: list[str] = []
    tb = asyncio.create_task(wait_bit(mx, b, log))
    await turns()
    assert log == [] and [w.cur for w in mx.waiters or ()] == [b]
    mx.unlock(a)
    await tb
    assert log == ["b"] and mx.owner is None and b.held == [] and not mx.waiters
    assert mx.trylock(x)  # nothing was handed to the bit waiter: the lock is free
    tb2 = asyncio.create_task(wait_bit(mx, b, log))
    tc = asyncio.create_task(acquire_mutex(mx, c, log))
    te = asyncio.create_task(wait_bit(mx, e, log))
    await turns()
    assert [w.cur for w in mx.waiters or ()] == [b, c, e]
    mx.unlock(x)
    await asyncio.gather(tb2, tc)
    assert log == ["b", "b", "c"] and mx.owner is c and [w.cur for w in mx.waiters or ()] == [e]
    mx.unlock(c)
    await te
    assert log == ["b", "b", "c", "e"] and not mx.is_locked() and not mx.waiters and not d.counts
    # Queued while the lock is held, woken by its release before it came to sleep (a fault lets
    # its PTL go in between): the sleep then ends at once.
    assert mx.lock(a) and mx.wait_bit(b) is False
    mx.unlock(a)
    assert b.waiting is not None and b.waiting.fut.done()
    await mx.wait(b)
    assert b.waiting is None and b.held == [] and not mx.is_locked()


async def test_a_cancelled_bit_waiter_gives_nothing_back() -> None:
    """A bit waiter cancelled after the release woke it, before it ran, leaves the lock as the
    release left it (taken by the next acquisition, here): there is nothing of its own to give back."""
    state, _ = ld()
    mx = Mutex("m", LockClass.FOLIO_LOCK, state)
    a, b, c = Current("a"), Current("b"), Current("c")
    assert mx.lock(a)
    tb = asyncio.create_task(wait_bit(mx, b))
    tc = asyncio.create_task(acquire_mutex(mx, c))
    await turns()
    mx.unlock(a)
    assert mx.owner is c
    tb.cancel()
    with pytest.raises(asyncio.CancelledError):
        await tb
    await tc
    assert mx.owner is c and b.held == [] and b.waiting is None
    mx.unlock(c)


async def test_cancelled_waiter_leaves_queue_and_wakes_next() -> None:
    sem, _ = rwsem()
    r1, w, r2 = Current("r1"), Current("w"), Current("r2")
    assert sem.down_read(r1)
    tw = asyncio.create_task(acquire_write(sem, w))
    await turns()
    log: list[str] = []
    tr = asyncio.create_task(acquire_read(sem, r2, log))
    await turns()
    assert [x.cur for x in sem.waiters or ()] == [w, r2] and log == []
    tw.cancel()
    with pytest.raises(asyncio.CancelledError):
        await tw
    # The writer is gone from the queue, and the reader behind it was woken (r1 still reads).
    await tr
    assert log == ["r2"] and sem.readers == 2 and not sem.waiters
    assert w.held == [] and w.waiting is None
    sem.up_read(r1)
    sem.up_read(r2)
    assert not sem.is_locked()


async def test_cancelled_mutex_waiter_in_the_middle() -> None:
    state, _ = ld()
    mx = Mutex("m", LockClass.FOLIO_LOCK, state)
    a, b, c = Current("a"), Current("b"), Current("c")
    assert mx.lock(a)
    log: list[str] = []
    tb = asyncio.create_task(acquire_mutex(mx, b, log))
    tc = asyncio.create_task(acquire_mutex(mx, c, log))
    await turns()
    tb.cancel()
    with pytest.raises(asyncio.CancelledError):
        await tb
    assert [x.cur for x in mx.waiters or ()] == [c]
    assert mx.owner is a
    mx.unlock(a)
    await tc
    assert log == ["c"] and mx.owner is c and b.held == []
    mx.unlock(c)


async def test_cancel_after_grant_gives_the_lock_back() -> None:
    state, _ = ld()
    mx = Mutex("m", LockClass.FOLIO_LOCK, state)
    a, b, c = Current("a"), Current("b"), Current("c")
    assert mx.lock(a)
    log: list[str] = []
    tb = asyncio.create_task(acquire_mutex(mx, b, log))
    tc = asyncio.create_task(acquire_mutex(mx, c, log))
    await turns()
    mx.unlock(a)
    # Handed to b, which has not run yet; cancel it before it can.
    assert mx.owner is b and b.held == [mx]
    tb.cancel()
    with pytest.raises(asyncio.CancelledError):
        await tb
    assert b.held == [] and "b" not in log
    await tc
    assert log == ["c"] and mx.owner is c
    mx.unlock(c)
    assert not mx.is_locked()


async def test_rwsem_cancel_after_grant_gives_it_back() -> None:
    sem, _ = rwsem()
    w1, w2, r = Current("w1"), Current("w2"), Current("r")
    assert sem.down_write(w1)
    log: list[str] = []
    t2 = asyncio.create_task(acquire_write(sem, w2, log))
    tr = asyncio.create_task(acquire_read(sem, r, log))
    await turns()
    sem.up_write(w1)
    assert sem.owner is w2
    t2.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t2
    await tr
    assert log == ["r"] and sem.owner is None and sem.readers == 1 and w2.held == []
    sem.up_read(r)
    assert not sem.is_locked()


async def test_release_between_cancel_and_waiter_running_skips_the_cancelled_waiter() -> None:
    """task.cancel() cancels the waiter's future at once, but the waiter leaves the queue only when
    its task next runs. A release in that window must not hand the lock to the cancelled waiter
    (set_result on a cancelled future raises InvalidStateError); the next live waiter gets it."""
    state, _ = ld()
    mx = Mutex("m", LockClass.FOLIO_LOCK, state)
    a, b, c = Current("a"), Current("b"), Current("c")
    assert mx.lock(a)
    log: list[str] = []
    tb = asyncio.create_task(acquire_mutex(mx, b, log))
    tc = asyncio.create_task(acquire_mutex(mx, c, log))
    await turns()
    tb.cancel()
    mx.unlock(a)  # before tb has run its cancellation handler
    with pytest.raises(asyncio.CancelledError):
        await tb
    await tc
    assert log == ["c"] and mx.owner is c and b.held == [] and not mx.waiters
    mx.unlock(c)
    assert not mx.is_locked()


async def test_rwsem_release_between_cancel_and_waiter_running() -> None:
    sem, _ = rwsem()
    r, w, r2 = Current("r"), Current("w"), Current("r2")
    assert sem.down_read(r)
    log: list[str] = []
    tw = asyncio.create_task(acquire_write(sem, w, log))
    tr = asyncio.create_task(acquire_read(sem, r2, log))
    await turns()
    tw.cancel()
    sem.up_read(r)  # the cancelled writer is still queued, its future already cancelled
    with pytest.raises(asyncio.CancelledError):
        await tw
    await tr
    assert log == ["r2"] and sem.owner is None and sem.readers == 1 and w.held == []
    sem.up_read(r2)
    assert not sem.is_locked() and not sem.waiters


def test_release_all_drops_everything() -> None:
    state, _ = ld()
    cur = Current("t")
    mm = RwSem("mmap", LockClass.MMAP_LOCK, state)
    fl = Mutex("folio", LockClass.FOLIO_LOCK, state)
    av = RwSem("av", LockClass.ANON_VMA, state)
    ptl = SpinLock("ptl", LockClass.PTL, state)
    assert mm.down_read(cur) and fl.lock(cur) and av.down_write(cur)
    ptl.spin_lock(cur)
    release_all(cur)
    assert cur.held == []
    assert not any(lk.is_locked() for lk in (mm, fl, av, ptl))


# ---------------------------------------------------------------------------------------------
# SpinLock


def test_spinlock_on_a_held_lock_raises() -> None:
    state, _ = ld()
    s = SpinLock("ptl", LockClass.PTL, state)
    a, b = Current("a"), Current("b")
    s.spin_lock(a)
    assert s.is_locked() and s.owner is a
    with pytest.raises(RuntimeError, match="spins on ptl"):
        s.spin_lock(b)
    assert s.owner is a and b.held == []
    s.spin_unlock(a)
    s.spin_lock(b)
    assert s.owner is b
    s.spin_unlock(b)
    assert not s.is_locked()


# ---------------------------------------------------------------------------------------------
# lockdep


def order_events(d: Detectors) -> list[dict]:
    return [e.detail for e in d.events if e.kind == "lock-order"]


@pytest.mark.violations_expected
def test_lockdep_ptl_then_mmap_lock_is_reported() -> None:
    state, d = ld()
    cur = Current("t")
    ptl = SpinLock("ptl", LockClass.PTL, state)
    mm = RwSem("mm.mmap_lock", LockClass.MMAP_LOCK, state)
    ptl.spin_lock(cur)
    assert mm.down_read(cur)  # free, so it is taken; lockdep still objects
    assert d.counts["lock-order"] == 1
    ev = order_events(d)[0]
    assert ev["acquiring"] == "mm.mmap_lock" and ev["held"] == "ptl" and ev["why"] == "inverted order"


@pytest.mark.violations_expected
def test_lockdep_anon_vma_then_folio_lock_is_reported() -> None:
    state, d = ld()
    cur = Current("t")
    av = RwSem("anon_vma", LockClass.ANON_VMA, state)
    fl = Mutex("folio", LockClass.FOLIO_LOCK, state)
    assert av.down_write(cur)
    assert fl.lock(cur)
    assert d.counts["lock-order"] == 1
    assert order_events(d)[0]["why"] == "inverted order"


def test_lockdep_kernel_order_is_clean() -> None:
    state, d = ld()
    cur = Current("t")
    mm = RwSem("mmap", LockClass.MMAP_LOCK, state)
    fl = Mutex("folio", LockClass.FOLIO_LOCK, state)
    av = RwSem("av", LockClass.ANON_VMA, state)
    ptl = SpinLock("ptl", LockClass.PTL, state)
    assert mm.down_read(cur) and fl.lock(cur) and av.down_write(cur)
    ptl.spin_lock(cur)
    assert not d.counts
    release_all(cur)


@pytest.mark.violations_expected
def test_lockdep_trylocks_are_exempt_but_count_as_held() -> None:
    state, d = ld()
    cur = Current("t")
    ptl = SpinLock("ptl", LockClass.PTL, state)
    mm = RwSem("mmap", LockClass.MMAP_LOCK, state)
    fl = Mutex("folio", LockClass.FOLIO_LOCK, state)
    av = RwSem("av", LockClass.ANON_VMA, state)
    ptl.spin_lock(cur)
    assert mm.down_read_trylock(cur)
    assert fl.trylock(cur)
    assert av.down_write_trylock(cur)
    assert not d.counts
    # What a trylock took is held: a blocking acquisition below it is checked against it.
    release_all(cur)
    assert fl.trylock(cur)
    assert mm.down_read(cur)
    assert d.counts["lock-order"] == 1
    assert order_events(d)[0]["held"] == "folio"
    release_all(cur)


@pytest.mark.violations_expected
def test_lockdep_nested_mmap_lock() -> None:
    state, d = ld()
    cur = Current("fork")
    parent = RwSem("mm1.mmap_lock", LockClass.MMAP_LOCK, state)
    child = RwSem("mm2.mmap_lock", LockClass.MMAP_LOCK, state)
    assert parent.down_write(cur)
    assert child.down_write(cur, nested=True)
    assert not d.counts
    child.up_write(cur)
    assert child.down_write(cur)  # no annotation
    assert d.counts["lock-order"] == 1
    assert order_events(d)[0]["why"] == "same class without a nesting annotation"
    release_all(cur)


@pytest.mark.violations_expected
async def test_lockdep_double_pt_lock_is_allowed() -> None:
    k = Kernel()
    state, d = k.lockdep, k.detectors
    cur = Current("mover")
    mm = RwSem("mmap", LockClass.MMAP_LOCK, state)
    fl = Mutex("folio", LockClass.FOLIO_LOCK, state)
    av = RwSem("av", LockClass.ANON_VMA, state)
    p1 = SpinLock("ptl1", LockClass.PTL, state)
    p2 = SpinLock("ptl2", LockClass.PTL, state)
    assert mm.down_read(cur) and fl.lock(cur) and av.down_write(cur)
    for a, b in ((p1, p2), (p2, p1)):
        await double_pt_lock(k, cur, a, b)
        assert p1.owner is cur and p2.owner is cur
        # Taken in address (key) order whichever way round they were passed.
        ptls = [lk for lk in cur.held if isinstance(lk, SpinLock)]
        assert [lk.key for lk in ptls] == sorted(lk.key for lk in ptls)
        double_pt_unlock(cur, a, b)
        assert not p1.is_locked() and not p2.is_locked()
    await double_pt_lock(k, cur, p1, p1)  # one lock: taken once
    assert [lk for lk in cur.held if isinstance(lk, SpinLock)] == [p1]
    double_pt_unlock(cur, p1, p1)
    assert not p1.is_locked()
    assert not d.counts, d.events
    # Without the nesting annotation, a second PTL is a lockdep report.
    p1.spin_lock(cur)
    p2.spin_lock(cur)
    assert d.counts["lock-order"] == 1
    release_all(cur)


@pytest.mark.violations_expected
def test_lockdep_recursive_acquisition_is_reported() -> None:
    state, d = ld()
    cur = Current("t")
    sem = RwSem("av", LockClass.ANON_VMA, state)
    assert sem.down_read(cur)
    assert sem.down_read(cur)  # a second read of the same rwsem: may deadlock behind a writer
    assert d.counts["lock-order"] == 1
    assert order_events(d)[0]["why"] == "recursive acquisition"
    sem.up_read(cur)
    sem.up_read(cur)
    s = SpinLock("ptl", LockClass.PTL, state)
    s.spin_lock(cur)
    with pytest.raises(RuntimeError):
        s.spin_lock(cur, nested=True)
    assert d.counts["lock-order"] == 2
    assert order_events(d)[1]["why"] == "recursive acquisition"
    s.spin_unlock(cur)


@pytest.mark.violations_expected
async def test_lockdep_recursive_mutex_is_reported() -> None:
    state, d = ld()
    cur = Current("t")
    mx = Mutex("folio", LockClass.FOLIO_LOCK, state)
    assert mx.lock(cur)
    assert mx.lock(cur) is False  # would deadlock on itself
    assert order_events(d)[0]["why"] == "recursive acquisition"
    mx.waiters.clear()
    cur.waiting = None
    mx.unlock(cur)


def test_lockdep_disabled_reports_nothing() -> None:
    d = Detectors()
    state = LockdepState(d, enabled=False)
    cur = Current("t")
    ptl = SpinLock("ptl", LockClass.PTL, state)
    mm = RwSem("mmap", LockClass.MMAP_LOCK, state)
    ptl.spin_lock(cur)
    assert mm.down_read(cur)
    assert not d.counts
    release_all(cur)


def test_model_lock_order_objects() -> None:
    """The model's real locks carry the kernel ranks."""
    m = MemoryModel()
    pid = asyncio.run(m.create_process())
    mm = m.processes[pid]
    assert mm.mmap_lock.rank == LockClass.MMAP_LOCK
    assert mm.page_table_lock.rank == LockClass.PTL
    assert mm.pte_alloc(Current("test"), 0x100000).ptl.rank == LockClass.PTL
    assert LockClass.MMAP_LOCK < LockClass.FOLIO_LOCK < LockClass.ANON_VMA < LockClass.PTL


# ---------------------------------------------------------------------------------------------
# The uncontended model paths complete without ever suspending


def run_without_suspending(coro):
    """Drive a coroutine by hand: it must finish on the first step, never yielding to a loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise AssertionError("the coroutine suspended on an uncontended path")


async def test_model_fast_paths_never_await() -> None:
    m = MemoryModel()
    pid = await m.create_process()
    src = await m.mmap(pid, 4 * P, addr=0x10000000)
    dst = await m.mmap(pid, 4 * P, addr=0x20000000)
    await m.uffd_register(pid, dst.start, 4 * P)
    assert run_without_suspending(m.write(pid, src.start, 7)) is None
    assert run_without_suspending(m.write(pid, src.start + P, 8)) is None
    assert run_without_suspending(m.read(pid, src.start)) == 7
    assert run_without_suspending(m.read(pid, src.start + 2 * P)) == 0
    w = run_without_suspending(m.walk(pid, src.start, blocking=True))
    assert w.mappings == ((pid, src.start),) and not w.contended
    assert run_without_suspending(m.move(pid, dst.start, src.start, 2 * P)) == 2 * P
    assert m.folio(pid, dst.start + P).value == 8
    assert m.check_invariants() == [] and not m.detectors.counts


# ---------------------------------------------------------------------------------------------
# RCU


def test_rcu_read_sections_nest() -> None:
    rcu = Rcu()
    t = Current("t")
    rcu.read_lock(t)
    rcu.read_lock(t)
    rcu.read_unlock(t)
    assert t in rcu.readers and t.rcu_nesting == 1
    rcu.read_unlock(t)
    assert t not in rcu.readers and t.rcu_nesting == 0


def test_synchronize_rcu_without_readers_returns_at_once() -> None:
    rcu = Rcu()
    before = rcu.gp_completed
    assert run_without_suspending(rcu.synchronize_rcu()) is None
    assert rcu.gp_completed == before + 1 and not rcu.gp_in_progress


async def test_grace_period_waits_for_pre_existing_readers_only() -> None:
    rcu = Rcu()
    old, new = Current("old"), Current("new")
    rcu.read_lock(old)
    sync = asyncio.create_task(rcu.synchronize_rcu())
    await turns()
    assert not sync.done() and rcu.gp_in_progress
    rcu.read_lock(new)  # begins after the grace period did
    await turns()
    assert not sync.done()
    rcu.read_unlock(old)
    await turns()
    assert sync.done(), "a reader that began after synchronize_rcu must not hold it up"
    await sync
    assert new in rcu.readers
    rcu.read_unlock(new)
    assert not rcu.gp_in_progress and rcu.gp_completed == rcu.gp_started


async def test_synchronize_rcu_during_an_older_grace_period_waits_for_a_new_one() -> None:
    rcu = Rcu()
    a, b = Current("a"), Current("b")
    rcu.read_lock(a)
    rcu.request_gp()  # GP 1, held up by a
    assert rcu.gp_in_progress
    rcu.read_lock(b)  # after GP 1 began, before synchronize_rcu
    sync = asyncio.create_task(rcu.synchronize_rcu())
    await turns()
    rcu.read_unlock(a)
    await turns()
    # GP 1 is over, but it began before b's section, which predates synchronize_rcu.
    assert rcu.gp_completed == 1 and rcu.gp_in_progress
    assert not sync.done()
    rcu.read_unlock(b)
    await sync
    assert rcu.gp_completed == 2


class Obj(TypesafeObject):
    made = 0

    def __init__(self) -> None:
        super().__init__()
        Obj.made += 1


def test_typesafe_cache_reuses_a_freed_object_at_once() -> None:
    rcu = Rcu()
    cache: TypesafeCache[Obj] = TypesafeCache(rcu, Obj)
    made = Obj.made
    a = cache.alloc()
    assert Obj.made == made + 1 and a in cache.live
    cache.release(a)
    assert a.freed and a not in cache.live
    b = cache.alloc()
    assert b is a, "SLAB_TYPESAFE_BY_RCU: the freed object comes back at once"
    assert not b.freed and cache.reused == 1 and Obj.made == made + 1
    c = cache.alloc()
    assert c is not a and Obj.made == made + 2
    with pytest.raises(AssertionError):
        cache.release(c)
        cache.release(c)


def uaf_events(d: Detectors) -> list[dict]:
    return [e.detail for e in d.events if e.kind == "use-after-free"]


@pytest.mark.violations_expected
def test_check_access_use_after_free() -> None:
    d = Detectors()
    rcu = Rcu(d)
    cache: TypesafeCache[Obj] = TypesafeCache(rcu, Obj)
    obj = cache.alloc()
    early, t = Current("early"), Current("t")
    rcu.check_access(t, obj, "live")  # live: never a problem
    assert not d.counts
    rcu.read_lock(early)
    cache.release(obj)  # starts a grace period, held up by `early`
    assert rcu.gp_in_progress
    rcu.check_access(early, obj, "inside a section from before the free")
    assert not d.counts
    rcu.check_access(t, obj, "no section")
    assert uaf_events(d)[-1]["why"] == "outside an RCU read section"
    rcu.read_unlock(early)
    assert not rcu.gp_in_progress  # the grace period that began after the free is over
    rcu.read_lock(t)
    rcu.check_access(t, obj, "section after the grace period")
    rcu.read_unlock(t)
    assert uaf_events(d)[-1]["why"] == "after a grace period that began after the free"
    assert d.counts["use-after-free"] == 2


@pytest.mark.violations_expected
def test_check_access_grace_period_begun_before_the_free_does_not_count() -> None:
    d = Detectors()
    rcu = Rcu(d)
    cache: TypesafeCache[Obj] = TypesafeCache(rcu, Obj)
    obj = cache.alloc()
    r1, r2, r3 = Current("r1"), Current("r2"), Current("r3")
    rcu.read_lock(r1)
    rcu.request_gp()  # GP 1 begins before the free
    rcu.read_lock(r2)
    cache.release(obj)
    rcu.read_unlock(r1)  # GP 1 ends; GP 2 (after the free) is held up by r2
    assert rcu.gp_completed == 1 and rcu.gp_in_progress
    rcu.check_access(r2, obj, "still protected")
    assert not d.counts
    rcu.read_unlock(r2)
    rcu.read_lock(r3)
    rcu.check_access(r3, obj, "too late")
    rcu.read_unlock(r3)
    assert d.counts["use-after-free"] == 1


# ---------------------------------------------------------------------------------------------
# Scheduler


def decisions(seed: int, preempt: float, n: int = 200) -> list[bool]:
    s = Scheduler(seed, preempt)
    return [s.should_preempt(POINTS[i % len(POINTS)]) for i in range(n)]


def test_scheduler_same_seed_same_decisions() -> None:
    a, b = decisions(11, 0.4), decisions(11, 0.4)
    assert a == b
    assert any(a) and not all(a)
    assert any(decisions(s, 0.4) != a for s in range(12, 20))
    assert not any(decisions(11, 0.0))
    assert Scheduler(0, 0.0).active is False and Scheduler(0, 0.3).active is True


async def test_scheduler_yield_bursts_are_seeded() -> None:
    async def count_turns(seed: int) -> list[int]:
        s = Scheduler(seed, 1.0)
        out = []
        for _ in range(20):
            ticks = 0
            done = False

            async def ticker() -> None:
                nonlocal ticks
                while not done:  # noqa: B023 - awaited within its iteration
                    ticks += 1
                    await asyncio.sleep(0)

            t = asyncio.create_task(ticker())
            await asyncio.sleep(0)
            ticks = 0
            await s.yield_now("walk:per-vma")
            out.append(ticks)
            done = True
            await t
        return out

    a, b = await count_turns(5), await count_turns(5)
    assert a == b and min(a) >= 1 and max(a) <= 4


def test_scheduler_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        Scheduler(0, 1.5)
    with pytest.raises(ValueError):
        Scheduler(0, 0.1, max_burst=0)
    with pytest.raises(ValueError):
        Scheduler(0).pause_at("no:such-point")


def test_breakpoint_forces_a_preemption() -> None:
    s = Scheduler(0, 0.0)
    assert not s.active
    s.pause_at("move:between-pages")
    assert s.active
    assert s.should_preempt("move:between-pages") is True
    assert s.should_preempt("walk:per-vma") is False


def test_run_race_is_deterministic_per_seed() -> None:
    for seed in (1, 9):
        a, b = run_race("recheck", seed), run_race("recheck", seed)
        assert a.signature == b.signature and a.signature
        assert a.violations == b.violations
        assert a.problems == b.problems == []
        assert (a.walks, a.moves, a.fast_retries, a.slow_retries) == (b.walks, b.moves, b.fast_retries, b.slow_retries)
    sigs = {run_race("recheck", seed).signature for seed in range(6)}
    assert len(sigs) > 1


@pytest.mark.violations_expected
def test_run_race_unsafe_protocol_deterministic() -> None:
    a, b = run_race("no-recheck", 4), run_race("no-recheck", 4)
    assert a.signature == b.signature and a.violations == b.violations and a.events == b.events


def test_errno_constants_sane() -> None:
    # The model raises OSError subclasses carrying the kernel's errno.
    from mmsim.server.mm.model import MmError

    e = MmError(errno.EAGAIN, "x", moved=P)
    assert isinstance(e, OSError) and e.errno == errno.EAGAIN and e.moved == P
