"""The userfaultfd handler's side in the model: UFFDIO_COPY, UFFDIO_ZEROPAGE, UFFDIO_WAKE, and
accesses that block on a missing page of a MISSING-registered range (handle_userfault) until the
handler resolves or wakes them, with their events on the process's userfaultfd.

The errnos and the partial-progress rule were checked on the live 6.18 kernel of these machines
(root, ctypes scripts: userfaultfd(2), UFFDIO_API, then the ioctls on a private anonymous mapping;
blocking faults made by a second thread doing a memmove into the range, messages read from the
O_NONBLOCK userfaultfd). Each test names the experiment it follows as "6.18: ...".

Tasks are advanced with ``asyncio.sleep(0)`` turns, the event stream, or futures; never timed sleeps
(except the ``wait_for`` deadlines, which are the point of those tests).
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable
from typing import Any

import pytest

from mmsim.server.mm.model import PAGE_SIZE, MemoryModel, MmError, UffdEvent
from mmsim.server.mm.userfaultfd import UFFDIO_MOVE_MODE_DONTWAKE

P = PAGE_SIZE
DST = 0x20000000
SRC = 0x10000000
OTHER = 0x30000000
PAGES = 4


def dst_vma(m: MemoryModel, pid: int):
    [v] = [v for v in m.vmas(pid) if v.start == DST]
    return v


async def turns(n: int = 8) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def clean(m: MemoryModel) -> None:
    assert m.check_invariants() == []
    assert not m.detectors.counts, m.detectors.events
    for mm in m.processes.values():
        assert not mm.mmap_lock.is_locked()
        if mm.uffd is not None:
            assert not mm.uffd.read_waiters, "a listener's wait left behind"


async def setup(pages: int = PAGES, prot: str = "rw") -> tuple[MemoryModel, int]:
    """DST: ``pages`` pages registered MISSING; SRC: ``pages`` written pages 100+i; OTHER: a plain
    unregistered mapping."""
    m = MemoryModel()
    pid = await m.create_process()
    await m.mmap(pid, pages * P, prot=prot, addr=DST, uffd="missing")
    await m.mmap(pid, pages * P, addr=SRC)
    for i in range(pages):
        await m.write(pid, SRC + i * P, 100 + i)
    await m.mmap(pid, pages * P, addr=OTHER)
    return m, pid


async def blocked(m: MemoryModel, pid: int, coro: Awaitable[Any], queued: int = 1) -> asyncio.Task[Any]:
    """Start an access and let it run until ``queued`` events are pending: it is asleep."""
    task = asyncio.ensure_future(coro)
    for _ in range(50):
        await asyncio.sleep(0)
        if len(m.uffd_pending(pid)) >= queued:
            break
    assert not task.done(), task
    assert len(m.uffd_pending(pid)) >= queued
    return task


async def still_blocked(task: asyncio.Task[Any]) -> None:
    await turns(20)
    assert not task.done()


# ---------------------------------------------------------------------------------------------
# UFFDIO_COPY


async def test_copy_success() -> None:
    """6.18: a 1-page COPY into a registered range returns 0, .copy = 4096, the value readable."""
    m, pid = await setup()
    assert dst_vma(m, pid).anon_vma is None
    assert await m.uffd_copy(pid, DST + P, P, 42) == P
    f = m.folio(pid, DST + P)
    assert f is not None and not f.zero_page
    assert (f.value, f.mapcount, f.exclusive, f.writable) == (42, 1, True, True)
    assert f.index == (DST >> 12) + 1
    assert f.anon_vma is not None and f.anon_vma == dst_vma(m, pid).anon_vma
    assert m.ledger[pid] == {**{(SRC >> 12) + i: 100 + i for i in range(PAGES)}, (DST >> 12) + 1: 42}
    w = await m.walk(pid, DST + P)
    assert w.mappings == ((pid, DST + P),) and w.referenced == 1
    assert await m.read(pid, DST + P) == 42  # present: no fault, no event
    await m.write(pid, DST + P, 43)  # exclusive and writable: reused in place
    assert m.folio(pid, DST + P).value == 43
    assert m.uffd_pending(pid) == []
    assert m.stats()["uffd_copy_pages"] == 1
    clean(m)


async def test_copy_values_per_page() -> None:
    m, pid = await setup()
    assert await m.uffd_copy(pid, DST, PAGES * P, [7, 8, 9, 10]) == PAGES * P
    assert [m.folio(pid, DST + i * P).value for i in range(PAGES)] == [7, 8, 9, 10]
    av = {m.folio(pid, DST + i * P).anon_vma for i in range(PAGES)}
    assert len(av) == 1 and None not in av
    # One int fills every page.
    m2, pid2 = await setup()
    assert await m2.uffd_copy(pid2, DST, 3 * P, 5) == 3 * P
    assert [m2.folio(pid2, DST + i * P).value for i in range(3)] == [5, 5, 5]
    assert m2.folio(pid2, DST + 3 * P) is None
    clean(m)
    clean(m2)


async def test_copy_values_list_mismatch_is_einval() -> None:
    m, pid = await setup()
    for values in ([1, 2, 3], [1, 2, 3, 4, 5], []):
        with pytest.raises(MmError) as ei:
            await m.uffd_copy(pid, DST, PAGES * P, values)
        assert ei.value.errno == errno.EINVAL and ei.value.moved == 0
    for bad in (-1, 1 << 64):
        with pytest.raises(MmError) as ei:
            await m.uffd_copy(pid, DST, P, bad)
        assert ei.value.errno == errno.EINVAL
    assert all(m.folio(pid, DST + i * P) is None for i in range(PAGES))
    clean(m)


async def test_copy_einval() -> None:
    """6.18: misaligned dst, misaligned len, len 0, a range past task_size -> -1/EINVAL with .copy
    untouched (validate_range runs before mfill_atomic): the model reports moved=0."""
    m, pid = await setup()
    for dst, length in ((DST + 8, P), (DST, 100), (DST, 0), (DST, 1 << 47)):
        with pytest.raises(MmError) as ei:
            await m.uffd_copy(pid, dst, length, 1)
        assert ei.value.errno == errno.EINVAL and ei.value.moved == 0, (dst, length)
    with pytest.raises(MmError) as ei:
        await m.uffd_zeropage(pid, DST + 8, P)
    assert ei.value.errno == errno.EINVAL
    assert m.folio(pid, DST) is None
    clean(m)


async def test_copy_enoent() -> None:
    """6.18: no VMA at dst, dst VMA not registered, the range leaving the registered VMA (into an
    unregistered VMA, a hole, or another registered VMA): -1/ENOENT, .copy = -ENOENT."""
    m, pid = await setup()
    await m.mmap(pid, 2 * P, addr=DST + PAGES * P, uffd="wp")  # registered, another VMA
    cases = [
        (0x50000000, P),  # no VMA
        (OTHER, P),  # not registered
        (DST + 3 * P, 2 * P),  # leaves DST's VMA into the next registered one
        (DST + PAGES * P + P, 2 * P),  # leaves into a hole
        (0, P),  # 6.18 has no mmap_min_addr check: dst 0 -> ENOENT
    ]
    for dst, length in cases:
        for call in (m.uffd_copy(pid, dst, length, 1), m.uffd_zeropage(pid, dst, length)):
            with pytest.raises(MmError) as ei:
                await call
            assert ei.value.errno == errno.ENOENT and ei.value.moved == 0, hex(dst)
    assert m.folio(pid, DST + 3 * P) is None and m.folio(pid, OTHER) is None
    # 6.18's uffd_lock_vma prepares the dst anon_vma before validate_dst_vma refuses it.
    assert [v.anon_vma is not None for v in m.vmas(pid) if v.start == OTHER] == [True]
    clean(m)


async def test_copy_eexist() -> None:
    """6.18: a present dst page (a folio, or the zero page after ZEROPAGE) -> -1/EEXIST, .copy =
    -EEXIST, nothing changes."""
    m, pid = await setup()
    await m.uffd_copy(pid, DST, P, 1)
    await m.uffd_zeropage(pid, DST + P, P)
    for dst in (DST, DST + P):
        with pytest.raises(MmError) as ei:
            await m.uffd_copy(pid, dst, P, 2)
        assert ei.value.errno == errno.EEXIST and ei.value.moved == 0
    assert m.folio(pid, DST).value == 1 and m.folio(pid, DST + P).zero_page
    clean(m)


async def test_copy_partial_progress() -> None:
    """6.18: COPY of 4 pages whose 3rd is present -> the ioctl returns -1/EAGAIN and .copy = 8192;
    pages 0-1 are filled, 2-3 untouched; retrying from the 3rd page gives EEXIST (.copy -EEXIST)."""
    m, pid = await setup()
    await m.uffd_copy(pid, DST + 2 * P, P, 99)
    with pytest.raises(MmError) as ei:
        await m.uffd_copy(pid, DST, PAGES * P, [1, 2, 3, 4])
    assert ei.value.errno == errno.EAGAIN and ei.value.moved == 2 * P
    assert [m.folio(pid, DST + i * P).value for i in range(3)] == [1, 2, 99]
    assert m.folio(pid, DST + 3 * P) is None
    with pytest.raises(MmError) as ei:
        await m.uffd_copy(pid, DST + 2 * P, 2 * P, [3, 4])
    assert ei.value.errno == errno.EEXIST and ei.value.moved == 0
    clean(m)


async def test_copy_into_read_only_range() -> None:
    """6.18: COPY (and ZEROPAGE) into a read-only registered VMA succeed; the page is mapped
    read-only and readable."""
    m, pid = await setup(prot="r")
    assert await m.uffd_copy(pid, DST, P, 11) == P
    f = m.folio(pid, DST)
    assert f.value == 11 and not f.writable and f.exclusive and f.mapcount == 1
    assert await m.read(pid, DST) == 11
    with pytest.raises(MmError) as ei:
        await m.write(pid, DST, 1)
    assert ei.value.errno == errno.EFAULT
    assert await m.uffd_zeropage(pid, DST + P, P) == P
    clean(m)


async def test_copy_into_wp_only_range() -> None:
    """6.18: only registration is checked, not the MISSING mode: COPY into a WP-only range works."""
    m = MemoryModel()
    pid = await m.create_process()
    await m.mmap(pid, 2 * P, addr=DST, uffd="wp")
    assert await m.uffd_copy(pid, DST, P, 3) == P
    assert await m.uffd_zeropage(pid, DST + P, P) == P
    assert await m.read(pid, DST) == 3
    clean(m)


async def test_copy_memory_budget() -> None:
    """The folio and PTE are charged before anything changes: ENOMEM with nothing done, or a short
    copy (EAGAIN with the bytes done) when the budget runs out part-way (with no swap to reclaim
    to: with swap, the same copy swaps the pages it copied out and completes)."""
    swapping = MemoryModel(max_memory=1 << 20)
    spid = await swapping.create_process()
    await swapping.mmap(spid, 4096 * P, addr=DST, uffd="missing")
    assert await swapping.uffd_copy(spid, DST, 4096 * P, 1) == 4096 * P
    assert swapping.k.stats["reclaim_memcg"] > 0 and swapping.check_invariants() == []
    m = MemoryModel(max_memory=1 << 20, swap_bytes=0)
    pid = await m.create_process()
    await m.mmap(pid, 4096 * P, addr=DST, uffd="missing")
    with pytest.raises(MmError) as ei:
        await m.uffd_copy(pid, DST, 4096 * P, 1)
    assert ei.value.errno == errno.EAGAIN and 0 < ei.value.moved < 4096 * P
    done = ei.value.moved
    with pytest.raises(MmError) as ei:
        await m.uffd_copy(pid, DST + done, P, 1)
    assert ei.value.errno == errno.ENOMEM and ei.value.moved == 0
    assert m.check_invariants() == []


# ---------------------------------------------------------------------------------------------
# UFFDIO_ZEROPAGE and UFFDIO_WAKE


async def test_zeropage_success_and_eexist() -> None:
    """6.18: ZEROPAGE maps the zero page (reads 0), a second ZEROPAGE or a COPY there -> EEXIST;
    3 pages whose 2nd is present -> -1/EAGAIN, .zeropage = 4096."""
    m, pid = await setup()
    assert await m.uffd_zeropage(pid, DST, P) == P
    f = m.folio(pid, DST)
    assert f.zero_page and not f.writable
    assert DST >> 12 not in m.ledger[pid]
    with pytest.raises(MmError) as ei:
        await m.uffd_zeropage(pid, DST, P)
    assert ei.value.errno == errno.EEXIST and ei.value.moved == 0
    assert await m.read(pid, DST) == 0
    await m.uffd_copy(pid, DST + 2 * P, P, 5)
    with pytest.raises(MmError) as ei:
        await m.uffd_zeropage(pid, DST + P, 3 * P)
    assert ei.value.errno == errno.EAGAIN and ei.value.moved == P
    assert m.folio(pid, DST + P).zero_page and m.folio(pid, DST + 3 * P) is None
    # A write to the zero page breaks COW without a userfault (the PTE is not none).
    await m.write(pid, DST, 6)
    assert m.folio(pid, DST).value == 6 and m.uffd_pending(pid) == []
    clean(m)


async def test_wake_validation() -> None:
    """6.18: UFFDIO_WAKE with len 0, a misaligned start, or a range past task_size -> EINVAL; on an
    unmapped range -> 0 (no VMA is looked at)."""
    m, pid = await setup()
    for addr, length in ((DST, 0), (DST + 8, P), (DST, 1 << 47)):
        with pytest.raises(MmError) as ei:
            await m.uffd_wake(pid, addr, length)
        assert ei.value.errno == errno.EINVAL
    await m.uffd_wake(pid, 0x10000, P)
    with pytest.raises(MmError) as ei:
        await m.uffd_wake(12345, DST, P)
    assert ei.value.errno == errno.ESRCH


# ---------------------------------------------------------------------------------------------
# Blocking faults


@pytest.mark.parametrize("how", ["copy", "zeropage", "move"])
@pytest.mark.parametrize("write", [False, True])
async def test_fault_resolved(how: str, write: bool) -> None:
    """6.18: a read (write) of a missing page in a MISSING range blocks and queues one message,
    flags 0 (UFFD_PAGEFAULT_FLAG_WRITE), its address page-aligned; COPY, ZEROPAGE and MOVE into
    the page wake it; the read returns the page's value; a write resolved by ZEROPAGE completes
    (COW of the zero page)."""
    m, pid = await setup()
    addr = DST + P + 24
    access = m.write(pid, addr, 555) if write else m.read(pid, addr)
    task = await blocked(m, pid, access)
    assert m.uffd_pending(pid) == [UffdEvent(DST + P, write, False)]
    assert not m.processes[pid].mmap_lock.is_locked()  # the sleeper dropped mmap_lock
    if how == "copy":
        assert await m.uffd_copy(pid, DST + P, P, 77) == P
        expect = 77
    elif how == "zeropage":
        assert await m.uffd_zeropage(pid, DST + P, P) == P
        expect = 0
    else:
        assert await m.move(pid, DST + P, SRC + 2 * P, P) == P
        expect = 102
    result = await task
    assert m.uffd_pending(pid) == []
    if write:
        assert result is None
        f = m.folio(pid, DST + P)
        assert f.value == 555 and f.writable and f.exclusive
        assert m.ledger[pid][(DST + P) >> 12] == 555
    else:
        assert result == expect
    assert m.stats()["uffd_faults"] == 1
    clean(m)


async def test_present_page_raises_no_event() -> None:
    m, pid = await setup()
    await m.uffd_copy(pid, DST, P, 4)
    assert await m.read(pid, DST) == 4
    await m.write(pid, DST, 5)
    assert await m.read(pid, OTHER) == 0  # unregistered: the zero page, no event
    assert m.uffd_pending(pid) == [] and m.stats().get("uffd_faults", 0) == 0
    clean(m)


async def test_fault_event_withdrawn_when_resolved_unread() -> None:
    """6.18: a fault resolved (COPY) before its message was read leaves nothing to read."""
    m, pid = await setup()
    task = await blocked(m, pid, m.read(pid, DST))
    await m.uffd_copy(pid, DST, P, 8)
    assert await task == 8
    assert m.uffd_pending(pid) == []
    events = m.uffd_events(pid)
    nxt = asyncio.ensure_future(events.__anext__())
    await turns()
    assert not nxt.done()  # nothing to deliver
    nxt.cancel()
    with pytest.raises(asyncio.CancelledError):
        await nxt
    await events.aclose()
    clean(m)


async def test_dontwake_then_wake() -> None:
    """6.18: COPY / ZEROPAGE / MOVE with DONTWAKE fill the page but leave the fault asleep; a WAKE
    covering it lets it retry and complete without another event."""
    for how in ("copy", "zeropage", "move"):
        m, pid = await setup()
        task = await blocked(m, pid, m.read(pid, DST + 2 * P))
        [ev] = m.uffd_pending(pid)
        if how == "copy":
            await m.uffd_copy(pid, DST + 2 * P, P, 31, dontwake=True)
        elif how == "zeropage":
            await m.uffd_zeropage(pid, DST + 2 * P, P, dontwake=True)
        else:
            await m.move(pid, DST + 2 * P, SRC, P, UFFDIO_MOVE_MODE_DONTWAKE)
        await still_blocked(task)
        assert m.uffd_pending(pid) == [ev]  # still asleep: the event stays queued
        await m.uffd_wake(pid, DST, PAGES * P)
        assert await task == {"copy": 31, "zeropage": 0, "move": 100}[how]
        assert m.uffd_pending(pid) == [] and m.stats()["uffd_faults"] == 1
        clean(m)


async def test_wake_without_resolving_faults_again() -> None:
    """6.18: UFFDIO_WAKE of a fault whose page is still missing: the retry faults again and queues
    a new message (the old one, unread, is gone)."""
    m, pid = await setup()
    task = await blocked(m, pid, m.write(pid, DST, 9))
    await m.uffd_wake(pid, DST, P)
    await turns()
    assert not task.done()
    assert m.uffd_pending(pid) == [UffdEvent(DST, True, False)]
    assert m.stats()["uffd_faults"] == 2
    await m.uffd_copy(pid, DST, P, 1)
    await task
    assert m.folio(pid, DST).value == 9
    clean(m)


async def test_other_page_resolved_stays_asleep() -> None:
    """6.18: a COPY of another page, or a WAKE not covering the fault, leaves it asleep."""
    m, pid = await setup()
    task = await blocked(m, pid, m.read(pid, DST + P))
    await m.uffd_copy(pid, DST, P, 1)
    await m.uffd_zeropage(pid, DST + 2 * P, P)
    await m.move(pid, DST + 3 * P, SRC, P)
    await m.uffd_wake(pid, DST + 2 * P, 2 * P)
    await still_blocked(task)
    assert m.uffd_pending(pid) == [UffdEvent(DST + P, False, False)]
    await m.uffd_copy(pid, DST + P, P, 2)
    assert await task == 2
    clean(m)


async def test_two_faults_on_one_page() -> None:
    """6.18: two threads faulting on one missing page queue two messages (same address); one COPY
    wakes both and both read the copied value."""
    m, pid = await setup()
    t1 = await blocked(m, pid, m.read(pid, DST + 3 * P))
    t2 = await blocked(m, pid, m.read(pid, DST + 3 * P + 8), queued=2)
    assert m.uffd_pending(pid) == [UffdEvent(DST + 3 * P, False, False)] * 2
    await m.uffd_copy(pid, DST + 3 * P, P, 64)
    assert await t1 == 64 and await t2 == 64
    assert m.uffd_pending(pid) == []
    clean(m)


async def test_unregister_wakes_faults() -> None:
    """6.18: UFFDIO_UNREGISTER wakes the faults of the range; the retry faults normally."""
    m, pid = await setup()
    task = await blocked(m, pid, m.read(pid, DST))
    await m.uffd_unregister(pid, DST, PAGES * P)
    assert await task == 0
    assert m.folio(pid, DST).zero_page and m.uffd_pending(pid) == []
    clean(m)


# ---------------------------------------------------------------------------------------------
# Cancellation, exit, unmap


@pytest.mark.parametrize("read_first", [False, True])
async def test_fault_deadline(read_first: bool) -> None:
    """A fault whose caller gives up (a deadline) is abandoned: TimeoutError, nothing changed, no
    lock held, its event withdrawn (if unread; a read one is not handed out again)."""
    m, pid = await setup()
    events = m.uffd_events(pid)
    access = asyncio.ensure_future(asyncio.wait_for(m.read(pid, DST), 0.05))
    if read_first:
        assert await events.__anext__() == UffdEvent(DST, False, False)
    with pytest.raises(TimeoutError):
        await access
    assert m.uffd_pending(pid) == []
    assert not m.processes[pid].uffd.faults
    await events.aclose()
    assert m.uffd_pending(pid) == []  # a withdrawn fault is not given back
    clean(m)
    # The model still works: the page can be filled, faulted, and the next fault gets an event.
    assert await m.uffd_copy(pid, DST, P, 3) == P
    assert await m.read(pid, DST) == 3
    task = await blocked(m, pid, m.read(pid, DST + P))
    await m.uffd_zeropage(pid, DST + P, P)
    assert await task == 0
    clean(m)


async def test_fault_task_cancel() -> None:
    m, pid = await setup()
    task = await blocked(m, pid, m.write(pid, DST + P, 1))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert m.uffd_pending(pid) == [] and m.folio(pid, DST + P) is None
    assert (DST + P) >> 12 not in m.ledger[pid]
    clean(m)
    # A COPY after the cancel wakes nobody and works.
    assert await m.uffd_copy(pid, DST + P, P, 2) == P
    clean(m)


async def test_fault_cancelled_after_wake_changes_nothing() -> None:
    """Woken, then cancelled before it could run: the retry never happens."""
    m, pid = await setup()
    task = await blocked(m, pid, m.write(pid, DST, 1))
    await m.uffd_zeropage(pid, DST, P)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert m.folio(pid, DST).zero_page
    clean(m)


async def test_audit_does_not_wait_for_sleeping_faults() -> None:
    """A sleeping fault is not a call in progress: the audit (quiescent point) runs meanwhile."""
    m, pid = await setup()
    task = await blocked(m, pid, m.read(pid, DST))
    assert await asyncio.wait_for(m.audit(), 5) == []
    await m.uffd_copy(pid, DST, P, 1)
    assert await task == 1


async def test_fault_pending_at_exit_is_esrch() -> None:
    m, pid = await setup()
    events = m.uffd_events(pid)
    reader = asyncio.ensure_future(events.__anext__())
    t1 = await blocked(m, pid, m.read(pid, DST))
    assert await reader == UffdEvent(DST, False, False)
    t2 = await blocked(m, pid, m.write(pid, DST + P, 1))
    assert await events.__anext__() == UffdEvent(DST + P, True, False)
    after = asyncio.ensure_future(events.__anext__())
    await turns()
    assert not after.done()
    await m.exit(pid)
    for t in (t1, t2):
        with pytest.raises(MmError) as ei:
            await t
        assert ei.value.errno == errno.ESRCH
    with pytest.raises(StopAsyncIteration):  # the exit ends every listener
        await after
    with pytest.raises(MmError) as ei:
        m.uffd_events(pid)
    assert ei.value.errno == errno.ESRCH
    clean(m)


async def test_fault_pending_at_munmap_is_efault_once_woken() -> None:
    """6.18: munmap does not wake a pending fault; a WAKE then retries it into no VMA: SIGSEGV."""
    m, pid = await setup()
    task = await blocked(m, pid, m.read(pid, DST + P))
    await m.munmap(pid, DST, PAGES * P)
    await still_blocked(task)
    await m.uffd_wake(pid, DST, PAGES * P)
    with pytest.raises(MmError) as ei:
        await task
    assert ei.value.errno == errno.EFAULT
    clean(m)


# ---------------------------------------------------------------------------------------------
# The event stream


async def test_events_queued_before_listener() -> None:
    m, pid = await setup()
    t1 = await blocked(m, pid, m.read(pid, DST + 2 * P))
    t2 = await blocked(m, pid, m.write(pid, DST, 4), queued=2)
    events = m.uffd_events(pid)
    got = [await events.__anext__(), await events.__anext__()]
    assert got == [UffdEvent(DST + 2 * P, False, False), UffdEvent(DST, True, False)]
    assert m.uffd_pending(pid) == []  # delivered
    # A new fault reaches the waiting listener.
    nxt = asyncio.ensure_future(events.__anext__())
    await turns()
    assert not nxt.done()
    t3 = await blocked_no_queue(m, pid, m.read(pid, DST + 3 * P))
    assert await nxt == UffdEvent(DST + 3 * P, False, False)
    await m.uffd_copy(pid, DST, PAGES * P, [1, 2, 3, 4])
    assert (await t1, await t2, await t3) == (3, None, 4)
    assert m.folio(pid, DST).value == 4
    await events.aclose()
    assert m.uffd_pending(pid) == []  # resolved: nothing given back
    clean(m)


async def blocked_no_queue(m: MemoryModel, pid: int, coro: Awaitable[Any]) -> asyncio.Task[Any]:
    """Start an access that a waiting listener will take at once."""
    task = asyncio.ensure_future(coro)
    await turns()
    assert not task.done()
    return task


async def test_listener_closed_gives_events_back() -> None:
    """A listener closed while the faults of the events it took still wait: the next listener gets
    them again, first and in order; resolved ones are not given back."""
    m, pid = await setup()
    ts = [await blocked(m, pid, m.read(pid, DST + i * P), queued=i + 1) for i in range(3)]
    first = m.uffd_events(pid)
    assert await first.__anext__() == UffdEvent(DST, False, False)
    assert await first.__anext__() == UffdEvent(DST + P, False, False)
    assert m.uffd_pending(pid) == [UffdEvent(DST + 2 * P, False, False)]
    await m.uffd_copy(pid, DST + P, P, 11)  # resolves the second one
    assert await ts[1] == 11
    await first.aclose()
    assert m.uffd_pending(pid) == [UffdEvent(DST, False, False), UffdEvent(DST + 2 * P, False, False)]
    second = m.uffd_events(pid)
    assert await second.__anext__() == UffdEvent(DST, False, False)
    # The consumer is cancelled while waiting in the middle of an async for: same rule.
    async def consume() -> None:
        async for _ in second:
            pass

    c = asyncio.ensure_future(consume())
    await turns()
    c.cancel()
    with pytest.raises(asyncio.CancelledError):
        await c
    await second.aclose()
    third = m.uffd_events(pid)
    assert [await third.__anext__(), await third.__anext__()] == [
        UffdEvent(DST, False, False), UffdEvent(DST + 2 * P, False, False)
    ]
    await m.uffd_zeropage(pid, DST, P)
    await m.uffd_zeropage(pid, DST + 2 * P, P)
    assert await ts[0] == 0 and await ts[2] == 0
    await third.aclose()
    assert m.uffd_pending(pid) == []
    assert not m.processes[pid].uffd.faults
    clean(m)


async def test_listeners_coming_and_going_keep_nothing() -> None:
    """Nothing grows as listeners come and go: the one waiting fault's event is handed back and
    forth, the read waiters are cleaned up."""
    m, pid = await setup()
    task = await blocked(m, pid, m.read(pid, DST))
    ctx = m.processes[pid].uffd
    for _ in range(50):
        ev = m.uffd_events(pid)
        assert await ev.__anext__() == UffdEvent(DST, False, False)
        nxt = asyncio.ensure_future(ev.__anext__())
        await asyncio.sleep(0)
        nxt.cancel()
        with pytest.raises(asyncio.CancelledError):
            await nxt
        await ev.aclose()
        assert len(ctx.fault_pending) == 1 and len(ctx.faults) == 1 and not ctx.read_waiters
    await m.uffd_copy(pid, DST, P, 1)
    assert await task == 1
    clean(m)


async def test_long_copy_lets_others_run() -> None:
    """A long COPY yields every RESCHED_WORK pages: a read of another range completes meanwhile."""
    m = MemoryModel()
    pid = await m.create_process()
    n = 4096
    await m.mmap(pid, n * P, addr=DST, uffd="missing")
    await m.mmap(pid, P, addr=OTHER)
    copy = asyncio.ensure_future(m.uffd_copy(pid, DST, n * P, 1))
    await asyncio.sleep(0)
    other = asyncio.ensure_future(m.read(pid, OTHER))
    await other
    assert not copy.done()
    assert await copy == n * P
    clean(m)


# ---------------------------------------------------------------------------------------------
# The schedule explorer sees the sleep


def test_explorer_sees_the_fault_sleep() -> None:
    """Under the explorer a blocked fault is reported asleep (never "running" while it waits, which
    would hang the controller) and woken by the move; every schedule ends with the read returning
    the moved value, and no run ends in a deadlock finding."""
    from mmsim.server.tools.explore import explore, random_strategy, run_sync
    from mmsim.server.tools.litmus import parse

    scn = parse(
        "name: fault-vs-move\n"
        "setup:\n"
        "  p = process\n"
        "  mmap p 0x100000 1 rw missing\n"
        "  mmap p 0x40000000 1\n"
        "  write p 0x40000000 7\n"
        "thread reader:\n"
        "  read p 0x100000\n"
        "thread mover:\n"
        "  remap p 0x100000 0x40000000 1\n"
    )
    slept = 0
    for seed in range(12):
        r = run_sync(scn, "recheck", None, random_strategy(seed))
        texts = [(e.thread, e.kind, e.text) for e in r.events]
        assert (0, "result", "read → 7") in texts, texts
        assert (1, "result", "remap → moved 4096") in texts, texts
        assert not r.problems and not r.violations
        assert not any(k == "finding" for _, k, _ in texts), texts
        slept += (0, "point", "sleeps") in texts
    assert slept  # some schedule ran the read first: it slept, and was woken by the move
    s = explore(scn, "recheck", strategy="exhaustive", preemptions=2)
    assert s.first is None and s.schedules >= 2


# ---------------------------------------------------------------------------------------------
# UFFDIO_COPY_MODE_WP and write-protect faults (6.18: the scenarios 140 and 163 of the
# conformance corpus, and conformance-runner experiments on the live kernel)


def uffd_wp_bit(m: MemoryModel, pid: int, addr: int) -> bool:
    pte = m.processes[pid].pte_lookup(addr)
    assert pte is not None
    return pte.uffd_wp


async def setup_wp(uffd: str = "wp") -> tuple[MemoryModel, int]:
    """DST: two pages registered ``uffd``, the first copied with MODE_WP holding 5."""
    m = MemoryModel()
    pid = await m.create_process()
    await m.mmap(pid, 2 * P, addr=DST, uffd=uffd)
    assert await m.uffd_copy(pid, DST, P, 5, wp=True) == P
    return m, pid


async def test_copy_wp_maps_write_protected_page() -> None:
    """6.18: COPY with MODE_WP into a WP-registered range succeeds; the page reads its value (a
    read raises no event) and is mapped read-only with the uffd-wp bit."""
    m, pid = await setup_wp()
    info = m.folio(pid, DST)
    assert info is not None and info.value == 5 and info.exclusive and not info.writable
    assert uffd_wp_bit(m, pid, DST)
    assert await m.read(pid, DST) == 5
    assert m.uffd_pending(pid) == []
    # Without MODE_WP the page is writable, as before.
    assert await m.uffd_copy(pid, DST + P, P, 6) == P
    assert m.folio(pid, DST + P).writable and not uffd_wp_bit(m, pid, DST + P)
    clean(m)


async def test_copy_wp_needs_wp_registration() -> None:
    """6.18: COPY with MODE_WP into a MISSING-only range is EINVAL, nothing copied; the mode is
    checked after the VMA (an unregistered dst stays ENOENT)."""
    m, pid = await setup()
    with pytest.raises(MmError) as e:
        await m.uffd_copy(pid, DST, P, 1, wp=True)
    assert e.value.errno == errno.EINVAL and e.value.moved == 0
    assert m.folio(pid, DST) is None
    with pytest.raises(MmError) as e:
        await m.uffd_copy(pid, OTHER, P, 1, wp=True)
    assert e.value.errno == errno.ENOENT
    clean(m)


async def test_write_to_copy_wp_page_blocks_and_wake_faults_again() -> None:
    """6.18: a write to a page copied with MODE_WP is a write-protect userfault: its event has the
    write and wp flags and it waits, the page unchanged. UFFDIO_WAKE makes it retry and, the bit
    still set, fault again (a new event). Once the range is unregistered (which wakes no WP
    fault) a wake lets it write the page in place."""
    m, pid = await setup_wp()
    task = await blocked(m, pid, m.write(pid, DST, 9))
    assert m.uffd_pending(pid) == [UffdEvent(DST, True, True)]
    await still_blocked(task)
    assert m.folio(pid, DST).value == 5
    await m.uffd_wake(pid, DST, P)
    await turns()
    assert not task.done()
    assert m.uffd_pending(pid) == [UffdEvent(DST, True, True)]
    assert m.stats()["uffd_faults"] == 2
    await m.uffd_unregister(pid, DST, 2 * P)
    await still_blocked(task)
    await m.uffd_wake(pid, DST, P)
    await task
    info = m.folio(pid, DST)
    assert info is not None and info.value == 9 and info.writable
    clean(m)


async def test_copy_wp_with_missing_and_wp_registration() -> None:
    """A "missing+wp" range: a read of a missing page waits (a MISSING event), a COPY with MODE_WP
    resolves it, and a write to that page then waits as a WP fault."""
    m = MemoryModel()
    pid = await m.create_process()
    await m.mmap(pid, 2 * P, addr=DST, uffd="missing+wp")
    reader = await blocked(m, pid, m.read(pid, DST))
    assert m.uffd_pending(pid) == [UffdEvent(DST, False, False)]
    assert await m.uffd_copy(pid, DST, P, 7, wp=True) == P
    assert await reader == 7
    writer = await blocked(m, pid, m.write(pid, DST, 8))
    assert m.uffd_pending(pid) == [UffdEvent(DST, True, True)]
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writer
    clean(m)


async def test_wp_fault_cancel_changes_nothing() -> None:
    """A cancelled write-protect fault leaves the queue and the page as they were."""
    m, pid = await setup_wp()
    task = await blocked(m, pid, m.write(pid, DST, 9))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert m.uffd_pending(pid) == []
    info = m.folio(pid, DST)
    assert info is not None and info.value == 5 and not info.writable
    assert uffd_wp_bit(m, pid, DST)
    assert m.check_invariants() == []
    assert await m.read(pid, DST) == 5
    clean(m)


async def test_copy_wp_bit_not_inherited_by_fork_child() -> None:
    """6.18: the child of a fork has no registration and no uffd-wp bit (it writes its COW copy
    even after registering WP itself); the parent keeps both (its write still waits)."""
    m, pid = await setup_wp()
    child = await m.fork(pid)
    await m.uffd_register(child, DST, 2 * P, "wp")
    await m.write(child, DST, 7)
    assert m.folio(child, DST).value == 7
    assert m.uffd_pending(child) == []
    assert uffd_wp_bit(m, pid, DST)
    task = await blocked(m, pid, m.write(pid, DST, 8))
    assert m.uffd_pending(pid) == [UffdEvent(DST, True, True)]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert m.folio(pid, DST).value == 5
    clean(m)


async def test_move_drops_the_uffd_wp_bit() -> None:
    """6.18: UFFDIO_MOVE of a page copied with MODE_WP, into a WP-registered range: the moved page
    is writable, without the bit (a write does not wait)."""
    m = MemoryModel()
    pid = await m.create_process()
    await m.mmap(pid, 2 * P, addr=SRC, uffd="wp")
    await m.mmap(pid, 2 * P, addr=DST, uffd="wp")
    assert await m.uffd_copy(pid, SRC, P, 3, wp=True) == P
    assert await m.move(pid, DST, SRC, P) == P
    assert not uffd_wp_bit(m, pid, DST)
    await m.write(pid, DST, 4)
    assert m.folio(pid, DST).value == 4 and m.uffd_pending(pid) == []
    clean(m)
