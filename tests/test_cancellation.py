"""Cancelling model operations part-way, at named breakpoints or while they wait for a lock.

Every scenario ends with the model audited (``check_invariants`` also proves no lock is held and no
task is left in an RCU read section) and the detectors silent, and then shows the operation still
works afterwards. Tasks are advanced with ``asyncio.sleep(0)`` turns only.
"""

from __future__ import annotations

import asyncio

import pytest

from mmsim.server.mm.locks import Current
from mmsim.server.mm.model import PAGE_SIZE, MemoryModel
from mmsim.server.mm.userfaultfd import MoveProgress

P = PAGE_SIZE
SRC = 0x10000000
DST = 0x20000000
PAGES = 4


async def turns(n: int = 8) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def clean(m: MemoryModel) -> None:
    assert m.check_invariants() == []
    assert not m.detectors.counts, m.detectors.events
    assert not m.k.rcu.readers


async def move_setup(m: MemoryModel, pages: int = PAGES) -> int:
    """src: pages written 100+i; dst: an empty range registered (MISSING) with the process's uffd."""
    pid = await m.create_process()
    await m.mmap(pid, pages * P, addr=SRC)
    await m.mmap(pid, pages * P, addr=DST)
    for i in range(pages):
        await m.write(pid, SRC + i * P, 100 + i)
    await m.uffd_register(pid, DST, pages * P, "missing")
    return pid


def root_of(m: MemoryModel, pid: int, addr: int):
    pte = m.processes[pid].pte_lookup(addr)
    assert pte is not None and pte.folio.mapping is not None
    return pte.folio.mapping


def assert_split(m: MemoryModel, pid: int, moved_pages: int, pages: int = PAGES) -> None:
    """Pages [0, moved) are at dst with their values, the rest still at src."""
    for i in range(pages):
        at_src, at_dst = m.folio(pid, SRC + i * P), m.folio(pid, DST + i * P)
        if i < moved_pages:
            assert at_src is None, i
            assert at_dst is not None and not at_dst.zero_page and at_dst.value == 100 + i, i
            assert at_dst.index == (DST >> 12) + i
        else:
            assert at_dst is None, i
            assert at_src is not None and at_src.value == 100 + i and at_src.exclusive, i


# ---------------------------------------------------------------------------------------------
# (a) a multi-page move


def folio_at(m: MemoryModel, pid: int, addr: int):
    pte = m.processes[pid].pte_lookup(addr)
    assert pte is not None
    return pte.folio


def hold_folio_locks(m: MemoryModel, pid: int, holder: Current, pages: range) -> dict:
    """Lock the src folios of ``pages``: 6.18's batched move stops a batch at a folio it cannot
    trylock, so each step then moves exactly the pages before the first one held."""
    locks = {}
    for i in pages:
        lk = folio_at(m, pid, SRC + i * P).lock
        assert lk.trylock(holder)
        locks[i] = lk
    return locks


@pytest.mark.parametrize("cancel_after", [1, 2, 3])
async def test_cancel_move_between_pages(cancel_after: int) -> None:
    m = MemoryModel()
    pid = await move_setup(m)
    holder = Current("holder")
    locks = hold_folio_locks(m, pid, holder, range(1, PAGES))
    bps = [m.k.sched.pause_at("move:between-pages") for _ in range(cancel_after)]
    progress = MoveProgress()
    task = asyncio.create_task(m.move(pid, DST, SRC, PAGES * P, progress=progress))
    for j, bp in enumerate(bps):
        await bp.wait_reached()
        assert progress.moved == (j + 1) * P
        if j < cancel_after - 1:
            locks.pop(j + 1).unlock(holder)
            bp.release()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for lk in locks.values():
        lk.unlock(holder)
    assert progress.moved == cancel_after * P
    assert_split(m, pid, cancel_after)
    clean(m)
    rest = (PAGES - cancel_after) * P
    off = cancel_after * P
    assert await m.move(pid, DST + off, SRC + off, rest) == rest
    assert_split(m, pid, PAGES)
    clean(m)


async def test_cancel_move_waiting_for_a_folio_lock() -> None:
    """The first batch moved pages 0-1; the mover then sleeps on page 2's folio lock."""
    m = MemoryModel()
    pid = await move_setup(m)
    holder = Current("holder")
    locks = hold_folio_locks(m, pid, holder, range(2, 3))
    progress = MoveProgress()
    task = asyncio.create_task(m.move(pid, DST, SRC, PAGES * P, progress=progress))
    await turns()
    assert not task.done() and progress.moved == 2 * P and locks[2].waiters
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not locks[2].waiters
    locks[2].unlock(holder)
    assert_split(m, pid, 2)
    clean(m)
    assert await m.move(pid, DST + 2 * P, SRC + 2 * P, 2 * P) == 2 * P
    assert_split(m, pid, PAGES)
    clean(m)


async def test_uncancelled_move_is_one_batch() -> None:
    """Control for the tests above: without held folio locks, one step moves the whole range."""
    m = MemoryModel()
    pid = await move_setup(m)
    bp = m.k.sched.pause_at("move:between-pages")
    progress = MoveProgress()
    task = asyncio.create_task(m.move(pid, DST, SRC, PAGES * P, progress=progress))
    await bp.wait_reached()
    assert progress.moved == PAGES * P
    bp.release()
    assert await task == PAGES * P
    assert_split(m, pid, PAGES)
    clean(m)


@pytest.mark.parametrize("cancel_at_page", [0, 2])
async def test_cancel_move_inside_anon_vma_locked_section(cancel_at_page: int) -> None:
    m = MemoryModel()
    pid = await move_setup(m)
    av = root_of(m, pid, SRC)
    root = av.root
    ref_before = (av.refcount, root.refcount)
    holder = Current("holder")
    # A held folio lock at cancel_at_page ends the first batch there.
    locks = hold_folio_locks(m, pid, holder, range(cancel_at_page, cancel_at_page + 1) if cancel_at_page else range(0))
    bp = m.k.sched.pause_at("move:anon-vma-locked")
    progress = MoveProgress()
    task = asyncio.create_task(m.move(pid, DST, SRC, PAGES * P, progress=progress))
    if cancel_at_page:
        await bp.wait_reached()
        bp.release()
        await turns()
        # The first batch went; the mover now sleeps on the held folio lock.
        assert progress.moved == cancel_at_page * P and locks[cancel_at_page].waiters
        bp = m.k.sched.pause_at("move:anon-vma-locked")
        locks.pop(cancel_at_page).unlock(holder)  # hands it to the mover
    await bp.wait_reached()
    # Parked with the src folio locked and the src root write-locked, mid-step.
    folio = folio_at(m, pid, SRC + cancel_at_page * P)
    assert folio.lock.is_locked() and folio.lock.owner is not holder and root.rwsem.owner is not None
    assert av.refcount == ref_before[0] + 1  # folio_get_anon_vma's reference
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert progress.moved == cancel_at_page * P
    assert not folio.lock.is_locked() and not root.rwsem.is_locked()
    assert (av.refcount, root.refcount) == ref_before
    assert_split(m, pid, cancel_at_page)
    clean(m)
    off = cancel_at_page * P
    assert await m.move(pid, DST + off, SRC + off, PAGES * P - off) == PAGES * P - off
    assert_split(m, pid, PAGES)
    clean(m)


async def test_cancel_move_waiting_for_the_anon_vma_lock() -> None:
    """The mover sleeps on the src root rwsem (held by someone else) with the folio locked."""
    m = MemoryModel()
    pid = await move_setup(m)
    root = root_of(m, pid, SRC).root
    holder = Current("holder")
    assert root.rwsem.down_read(holder)
    progress = MoveProgress()
    task = asyncio.create_task(m.move(pid, DST, SRC, PAGES * P, progress=progress))
    await turns()
    assert not task.done() and root.rwsem.waiters
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not root.rwsem.waiters and progress.moved == 0
    root.rwsem.up_read(holder)
    assert_split(m, pid, 0)
    clean(m)
    assert await m.move(pid, DST, SRC, PAGES * P) == PAGES * P
    clean(m)


# ---------------------------------------------------------------------------------------------
# (b) fork


async def fork_setup(m: MemoryModel) -> int:
    pid = await m.create_process()
    # Two VMAs with a gap: separate anon_vma trees, two dup_mmap iterations.
    for base in (SRC, DST):
        await m.mmap(pid, PAGES * P, addr=base)
        for i in range(PAGES):
            await m.write(pid, base + i * P, base + i)
    return pid


def snapshot(m: MemoryModel, pid: int) -> tuple:
    trees = m.anon_vma_tree(pid)
    folios = [m.folio(pid, base + i * P) for base in (SRC, DST) for i in range(PAGES)]
    return trees, len(m.k.anon_vma_cache.live), m.k.folios_live, [(f.value, f.mapcount) for f in folios]


@pytest.mark.parametrize("cancel_at_vma", [0, 1])
async def test_cancel_fork_after_anon_vma_fork(cancel_at_vma: int) -> None:
    m = MemoryModel()
    pid = await fork_setup(m)
    before = snapshot(m, pid)
    procs = set(m.processes)
    bps = [m.k.sched.pause_at("fork:after-anon-vma-fork") for _ in range(cancel_at_vma + 1)]
    task = asyncio.create_task(m.fork(pid))
    for bp in bps[:-1]:
        await bp.wait_reached()
        bp.release()
    await bps[-1].wait_reached()
    # Mid-fork the parent's trees have gained the child's anon_vma.
    assert len(m.k.anon_vma_cache.live) > before[1]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert set(m.processes) == procs and set(m.ledger) == procs and set(m.parents) == procs
    trees, live, folios_live, pages = snapshot(m, pid)
    assert trees == before[0], "anon_vma counters must be back to their values before the fork"
    assert (live, folios_live, pages) == before[1:]
    clean(m)
    child = await m.fork(pid)
    assert child in m.processes and m.parents[child] == pid
    for base in (SRC, DST):
        for i in range(PAGES):
            f = m.folio(child, base + i * P)
            assert f is not None and f.value == base + i and f.mapcount == 2
    clean(m)
    # The parent can still write (COW) and the child keeps the old contents.
    await m.write(pid, SRC, 1)
    assert m.folio(child, SRC).value == SRC and m.folio(pid, SRC).value == 1
    clean(m)


async def test_cancel_fork_waiting_in_anon_vma_fork() -> None:
    """Cancel a fork between anon_vma_clone (done) and the root lock for its new anon_vma.

    anon_vma_clone hands the root rwsem to the next waiter when it unlocks, so the fork sleeps
    again in anon_vma_fork; the child VMA already has AVCs in the parent's tree but is not linked
    into the child mm yet. The rollback must remove them too (the kernel's anon_vma_fork error
    path calls unlink_anon_vmas on the child VMA).
    """
    m = MemoryModel()
    pid = await m.create_process()
    await m.mmap(pid, PAGES * P, addr=SRC)
    for i in range(PAGES):
        await m.write(pid, SRC + i * P, 100 + i)
    before = snapshot_one(m, pid)
    root = root_of(m, pid, SRC).root
    x, y = Current("x"), Current("y")
    assert root.rwsem.down_write(x)
    fork = asyncio.create_task(m.fork(pid))
    await turns()
    assert [w.cur.name.startswith("fork") for w in root.rwsem.waiters or ()] == [True]
    assert root.rwsem.down_write(y) is False  # y queues behind the fork

    async def y_waits() -> None:
        await root.rwsem.wait(y)

    ty = asyncio.create_task(y_waits())
    await turns(1)
    root.rwsem.up_write(x)  # fork gets it, clones, hands it to y, then waits again
    await turns()
    assert ty.done() and root.rwsem.owner is y
    assert not fork.done() and root.rwsem.waiters
    fork.cancel()
    await turns()
    # The rollback may itself need the root (to unlink the clone's chain): let y go first.
    root.rwsem.up_write(y)
    with pytest.raises(asyncio.CancelledError):
        await fork
    await ty
    assert set(m.processes) == {pid}
    assert snapshot_one(m, pid) == before
    clean(m)
    child = await m.fork(pid)
    assert m.folio(child, SRC).value == 100
    clean(m)


def snapshot_one(m: MemoryModel, pid: int) -> tuple:
    return m.anon_vma_tree(pid), len(m.k.anon_vma_cache.live), m.k.folios_live


# ---------------------------------------------------------------------------------------------
# (c) a blocking walk waiting on the root rwsem; (d) a walk parked inside its RCU section


async def walk_setup(m: MemoryModel) -> tuple[int, int]:
    pid = await m.create_process()
    await m.mmap(pid, PAGES * P, addr=SRC)
    await m.write(pid, SRC, 42)
    child = await m.fork(pid)  # two mappings of the folio, a tree with two anon_vmas
    return pid, child


async def test_cancel_blocking_walk_waiting_on_root_rwsem() -> None:
    m = MemoryModel()
    pid, child = await walk_setup(m)
    av = root_of(m, pid, SRC)
    root = av.root
    folio = m.processes[pid].pte_lookup(SRC).folio
    ref_before, root_ref_before, folio_ref_before = av.refcount, root.refcount, folio.refcount
    holder = Current("holder")
    assert root.rwsem.down_write(holder)
    task = asyncio.create_task(m.walk(pid, SRC, blocking=True))
    await turns()
    assert not task.done() and len(root.rwsem.waiters or ()) == 1
    # The slow path pinned the anon_vma and left its RCU section before sleeping.
    assert av.refcount == ref_before + 1 and not m.k.rcu.readers
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not root.rwsem.waiters
    root.rwsem.up_write(holder)
    assert (av.refcount, root.refcount, folio.refcount) == (ref_before, root_ref_before, folio_ref_before)
    assert not m.k.rcu.readers
    clean(m)
    w = await m.walk(pid, SRC, blocking=True)
    assert set(w.mappings) == {(pid, SRC), (child, SRC)} and not w.contended
    clean(m)


async def test_trylock_walk_reports_contention_instead_of_blocking() -> None:
    m = MemoryModel()
    pid, _ = await walk_setup(m)
    root = root_of(m, pid, SRC).root
    holder = Current("holder")
    assert root.rwsem.down_write(holder)
    w = await m.walk(pid, SRC, blocking=False)
    assert w.contended and w.referenced == -1 and w.mappings == ()
    root.rwsem.up_write(holder)
    clean(m)


async def test_cancel_walk_parked_in_rcu_read_section() -> None:
    m = MemoryModel()
    pid, child = await walk_setup(m)
    av = root_of(m, pid, SRC)
    folio = m.processes[pid].pte_lookup(SRC).folio
    refs = (av.refcount, av.root.refcount, folio.refcount)
    bp = m.k.sched.pause_at("walk:after-mapping-read")
    task = asyncio.create_task(m.walk(pid, SRC))
    await bp.wait_reached()
    assert len(m.k.rcu.readers) == 1
    # A grace period requested now is held up by the parked walker.
    m.k.rcu.request_gp()
    assert m.k.rcu.gp_in_progress
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not m.k.rcu.readers
    assert not m.k.rcu.gp_in_progress, "the walker's read section ended: the grace period completes"
    assert (av.refcount, av.root.refcount, folio.refcount) == refs
    clean(m)
    w = await m.walk(pid, SRC)
    assert set(w.mappings) == {(pid, SRC), (child, SRC)}
    clean(m)


# ---------------------------------------------------------------------------------------------
# (e) exit and munmap: uninterruptible once started, never started if cancelled while queued


async def test_cancel_exit_while_waiting_for_mmap_lock_never_starts() -> None:
    m = MemoryModel()
    pid = await move_setup(m)
    mm = m.processes[pid]
    holder = Current("holder")
    assert mm.mmap_lock.down_read(holder)
    task = asyncio.create_task(m.exit(pid))
    await turns()
    assert not task.done() and mm.mmap_lock.waiters
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    mm.mmap_lock.up_read(holder)
    # Never started: the process and its pages are all there.
    assert pid in m.processes and mm.users == 1 and not mm.mmap_lock.waiters
    assert_split(m, pid, 0)
    clean(m)
    await m.exit(pid)
    assert pid not in m.processes and m.k.folios_live == 0 and not m.k.anon_vma_cache.live
    clean(m)


async def test_cancel_exit_between_vmas_still_completes() -> None:
    m = MemoryModel()
    pid = await move_setup(m)
    other = await m.create_process()
    await m.mmap(other, P, addr=SRC)
    await m.write(other, SRC, 5)
    bp = m.k.sched.pause_at("exit:between-vmas")
    task = asyncio.create_task(m.exit(pid))
    await bp.wait_reached()
    assert len(m.processes[pid].vmas) == 1  # one of the two VMAs torn down
    task.cancel()
    await turns()
    assert not task.done(), "exit is uninterruptible: it waits for its teardown to finish"
    bp.release()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Completed: the process is gone entirely.
    assert pid not in m.processes and pid not in m.ledger
    assert m.k.folios_live == 1 and m.folio(other, SRC).value == 5
    clean(m)


async def test_cancel_munmap_while_waiting_for_mmap_lock_never_starts() -> None:
    m = MemoryModel()
    pid = await move_setup(m)
    mm = m.processes[pid]
    holder = Current("holder")  # a reader of the mmap_lock (another fault, say)
    assert mm.mmap_lock.down_read(holder)
    unmap = asyncio.create_task(m.munmap(pid, SRC, PAGES * P))
    await turns()
    assert not unmap.done() and mm.mmap_lock.waiters
    unmap.cancel()
    with pytest.raises(asyncio.CancelledError):
        await unmap
    mm.mmap_lock.up_read(holder)
    # Never started: the src VMA is still mapped.
    assert [(v.start, v.end) for v in m.vmas(pid)] == [(SRC, SRC + PAGES * P), (DST, DST + PAGES * P)]
    clean(m)


async def test_cancel_munmap_waiting_for_the_moved_vma_still_completes() -> None:
    """A move holds its two VMAs' locks for read, not the mmap_lock: a munmap of the src VMA takes
    the mmap_lock at once and then waits (vma_start_write) for the move, uninterruptibly; cancelled
    there, it still completes once the move is done."""
    m = MemoryModel()
    pid = await move_setup(m)
    mm = m.processes[pid]
    bp = m.k.sched.pause_at("move:between-pages")
    mover = asyncio.create_task(m.move(pid, DST, SRC, PAGES * P))
    await bp.wait_reached()
    src_vma = mm.vma_lookup(SRC)
    unmap = asyncio.create_task(m.munmap(pid, SRC, PAGES * P))
    await turns()
    assert not unmap.done() and src_vma.vm_lock.waiters and mm.mmap_lock.owner is not None
    unmap.cancel()
    await turns()
    assert not unmap.done(), "munmap waits for the VMA uninterruptibly once it holds the mmap_lock"
    bp.release()
    assert await mover == PAGES * P
    with pytest.raises(asyncio.CancelledError):
        await unmap
    assert [v.start for v in m.vmas(pid)] == [DST]
    clean(m)


@pytest.mark.parametrize("partial", [False, True])
async def test_cancel_munmap_waiting_on_anon_vma_lock_still_completes(partial: bool) -> None:
    m = MemoryModel()
    pid = await move_setup(m)
    root = root_of(m, pid, SRC).root
    holder = Current("holder")
    assert root.rwsem.down_write(holder)
    # Whole: unlink_anon_vmas sleeps on the root; partial: the split's anon_vma_clone does.
    length = 2 * P if partial else PAGES * P
    task = asyncio.create_task(m.munmap(pid, SRC, length))
    await turns()
    assert not task.done() and root.rwsem.waiters
    task.cancel()
    await turns()
    assert not task.done(), "munmap is uninterruptible once it has started"
    root.rwsem.up_write(holder)
    with pytest.raises(asyncio.CancelledError):
        await task
    # Completed.
    for i in range(PAGES):
        f = m.folio(pid, SRC + i * P)
        if i * P < length:
            assert f is None
        else:
            assert f is not None and f.value == 100 + i
    expect = [(SRC + 2 * P, SRC + PAGES * P)] if partial else []
    assert [(v.start, v.end) for v in m.vmas(pid)] == expect + [(DST, DST + PAGES * P)]
    clean(m)
    await m.exit(pid)
    assert m.k.folios_live == 0 and not m.k.anon_vma_cache.live
    clean(m)
