"""FOLL_PIN pins (pin_user_pages with FOLL_WRITE | FOLL_LONGTERM): in the model (GUP-fast and the slow
path, the write fault that stores nothing, the checks that pins meet in UFFDIO_MOVE, fork, reclaim and
the folio split, the charges, the process's exit), and through the service and the SDK (Pin, Unpin,
batched, their errors, GetFolio's ``pinned``). The kernel's own answers are the conformance scenarios
``tests/conformance/5*-pin-*.json``."""

from __future__ import annotations

import asyncio
import errno

import pytest

from mmsim.client import Client, Pin, ops
from mmsim.client.testing import serve_in_process
from mmsim.server.mm.mm_types import GUP_PIN_COUNTING_BIAS, PIN_MAX_BYTES, MmError
from mmsim.server.mm.model import MemoryModel

P = 4096
HP = 2 << 20


async def env(**kw: object) -> tuple[MemoryModel, int, int, int]:
    """A process with an 8-page region holding 100.. and an 8-page MISSING-registered dst."""
    m = MemoryModel(**kw)  # type: ignore[arg-type]
    pid = await m.create_process()
    src = (await m.mmap(pid, 8 * P)).start
    dst = (await m.mmap(pid, 8 * P, uffd="missing")).start
    for i in range(8):
        await m.write(pid, src + i * P, 100 + i)
    return m, pid, src, dst


async def thp(m: MemoryModel, pid: int) -> int:
    """A 2 MiB-aligned hugepage region whose first write mapped a THP by a huge PMD."""
    start = (await m.mmap(pid, 2 * HP)).start
    t = (start + HP - 1) & ~(HP - 1)
    await m.madvise(pid, t, HP, "hugepage")
    await m.write(pid, t, 5)
    info = m.folio(pid, t)
    assert info is not None and info.order == 9 and info.pmd
    return t


def errno_of(e: BaseException) -> int | None:
    return getattr(e, "errno", None)


async def test_a_pinned_page_is_not_moved_until_unpinned() -> None:
    m, pid, src, dst = await env()
    pin, pages = await m.pin(pid, src, 2 * P)
    assert pages == 2 and m.folio(pid, src).pinned and not m.folio(pid, src + 2 * P).pinned  # type: ignore[union-attr]
    with pytest.raises(MmError) as e:
        await m.move(pid, dst, src, P)
    assert e.value.errno == errno.EBUSY and e.value.moved == 0
    # a move starting on an unpinned page stops short at the pinned one
    assert await m.move(pid, dst + 2 * P, src + 2 * P, P) == P
    assert await m.read(pid, src) == 100 and m.check_invariants() == []
    await m.unpin(pid, pin)
    assert not m.folio(pid, src).pinned  # type: ignore[union-attr]
    assert await m.move(pid, dst, src, 2 * P) == 2 * P
    assert await m.read(pid, dst + P) == 101 and m.check_invariants() == []


async def test_fork_copies_a_pinned_page_for_the_child_at_once() -> None:
    m, pid, src, _ = await env()
    await m.pin(pid, src, P)
    child = await m.fork(pid)
    parent_page, child_page = m.folio(pid, src), m.folio(child, src)
    assert parent_page is not None and child_page is not None
    # each has its own exclusive page (the parent's pinned one, the child's copy), both writable
    assert parent_page.exclusive and child_page.exclusive and parent_page.mapcount == child_page.mapcount == 1
    assert parent_page.pinned and not child_page.pinned and parent_page.anon_vma != child_page.anon_vma
    assert child_page.value == 100 and child_page.writable
    # an unpinned page is shared as usual
    shared = m.folio(child, src + P)
    assert shared is not None and shared.mapcount == 2 and not shared.exclusive
    await m.write(child, src, 7)
    assert await m.read(pid, src) == 100 and await m.read(child, src) == 7
    assert m.k.stats["fork_cow_for_dma"] == 1 and m.check_invariants() == []


async def test_fork_of_a_process_that_never_pinned_shares_even_a_page_with_many_references() -> None:
    """folio_needs_cow_for_dma reads MMF_HAS_PINNED first: without it, references never look like a pin."""
    m, pid, src, _ = await env()
    m.k.stats.clear()
    child = await m.fork(pid)
    assert m.folio(child, src).mapcount == 2 and m.k.stats["fork_cow_for_dma"] == 0  # type: ignore[union-attr]


async def test_a_pin_unshares_a_page_shared_after_fork() -> None:
    m, pid, src, dst = await env()
    child = await m.fork(pid)
    assert m.folio(pid, src).mapcount == 2  # type: ignore[union-attr]
    await m.pin(child, src, P)
    mine, theirs = m.folio(child, src), m.folio(pid, src)
    assert mine is not None and theirs is not None
    assert mine.exclusive and mine.mapcount == 1 and mine.value == 100 and mine.pinned
    # the parent's page is now mapped only by the parent, but not exclusive until it writes
    assert theirs.mapcount == 1 and not theirs.exclusive and theirs.value == 100
    with pytest.raises(MmError) as e:
        await m.move(pid, dst, src, P)
    assert e.value.errno == errno.EBUSY
    await m.write(pid, src, 100)
    assert await m.move(pid, dst, src, P) == P and m.check_invariants() == []


async def test_a_pin_write_faults_the_zero_page_and_a_missing_page_without_storing() -> None:
    m, pid, _, _ = await env()
    z = (await m.mmap(pid, 2 * P)).start
    assert await m.read(pid, z) == 0 and m.folio(pid, z).zero_page  # type: ignore[union-attr]
    await m.pin(pid, z, 2 * P)
    for a in (z, z + P):
        info = m.folio(pid, a)
        assert info is not None and not info.zero_page and info.exclusive and info.writable and info.value == 0
    assert m.check_invariants() == []


async def test_a_pin_over_a_hole_or_a_read_only_range_fails_and_keeps_nothing() -> None:
    m, pid, src, _ = await env()
    hole = (await m.mmap(pid, 4 * P)).start
    await m.munmap(pid, hole + 2 * P, P)
    with pytest.raises(MmError) as e:
        await m.pin(pid, hole, 4 * P)
    assert e.value.errno == errno.EFAULT
    # the pages before the hole were faulted in (as the kernel leaves them) but are not pinned
    assert not m.folio(pid, hole).pinned and m.folio(pid, hole + 3 * P) is None  # type: ignore[union-attr]
    ro = (await m.mmap(pid, P, prot="r")).start
    with pytest.raises(MmError) as e:
        await m.pin(pid, ro, P)
    assert e.value.errno == errno.EFAULT
    for length, err in ((0, errno.EFAULT), (PIN_MAX_BYTES + P, errno.EFAULT)):
        with pytest.raises(MmError) as e:
            await m.pin(pid, src, length)
        assert e.value.errno == err
    with pytest.raises(MmError) as e:
        await m.unpin(pid, 99)
    assert e.value.errno == errno.ENOENT
    assert not any(mm.pins for mm in m.processes.values()) and m.check_invariants() == []


async def test_a_pinned_page_is_not_swapped_out() -> None:
    m, pid, src, _ = await env()
    await m.pin(pid, src, P)
    await m.madvise(pid, src, 2 * P, "pageout")
    e0, e1 = m.pagemap(pid, src, 2 * P)
    assert e0.present and not e0.swapcache and e1.swap
    assert await m.reclaim(64) >= 0 and m.pagemap(pid, src, P)[0].present
    assert m.check_invariants() == []


async def test_an_unmapped_pinned_folio_lives_until_unpinned_and_exit_unpins() -> None:
    m, pid, src, _ = await env()
    folios = m.k.folios_live
    pin, _ = await m.pin(pid, src, 2 * P)
    await m.madvise(pid, src, 2 * P, "dontneed")
    assert await m.read(pid, src) == 0  # a new zero page; the pinned folios are mapped nowhere
    assert m.k.folios_live == folios and m.check_invariants() == []
    await m.unpin(pid, pin)
    assert m.k.folios_live == folios - 2 and m.check_invariants() == []
    # a process's exit gives back its pins (and the memory they held)
    await m.pin(pid, src + 4 * P, 4 * P)
    child = await m.fork(pid)
    await m.exit(pid)
    assert m.check_invariants() == []
    await m.exit(child)
    assert m.k.folios_live == 0 and m.k.memcg.usage == 0 and m.check_invariants() == []


async def test_pins_are_charged_to_the_memory_budget() -> None:
    m, pid, src, _ = await env(max_memory=1 << 20)
    before = m.k.memcg.usage
    pin, _ = await m.pin(pid, src, 8 * P)
    assert m.k.memcg.usage > before
    await m.unpin(pid, pin)
    assert m.k.memcg.usage == before


async def test_a_pinned_thp_is_neither_moved_nor_split_and_fork_splits_its_pmd() -> None:
    m, pid, _, _ = await env()
    t = await thp(m, pid)
    dst = (await m.mmap(pid, 2 * HP, uffd="missing")).start
    dst = (dst + HP - 1) & ~(HP - 1)
    await m.pin(pid, t + 5 * P, P)
    f = m.folio(pid, t)
    assert f is not None and f.pinned
    # a large folio counts pins in _pincount, a small one in its refcount
    assert 0 < m.k.stats["gup_pin_pages"] < GUP_PIN_COUNTING_BIAS
    with pytest.raises(MmError) as e:  # whole: the pin check after the PMD clear puts it back
        await m.move(pid, dst, t, HP)
    assert e.value.errno == errno.EBUSY and m.folio(pid, t).pmd  # type: ignore[union-attr]
    with pytest.raises(MmError) as e:  # one page: the PMD is split, the folio's split fails
        await m.move(pid, dst, t + P, P)
    after = m.folio(pid, t)
    assert e.value.errno == errno.EBUSY and after is not None and after.order == 9 and not after.pmd
    assert m.check_invariants() == []
    child = await m.fork(pid)
    # every exclusive page of the pinned folio is copied small for the child
    for a in (t, t + 5 * P, t + 511 * P):
        c = m.folio(child, a)
        assert c is not None and c.order == 0 and c.exclusive and not c.pinned
    assert await m.read(child, t) == 5 and m.check_invariants() == []




async def test_fork_of_a_pinned_pmd_mapped_thp_splits_the_parents_pmd() -> None:
    m, pid, _, _ = await env()
    t = await thp(m, pid)
    await m.pin(pid, t, P)
    child = await m.fork(pid)
    parent_page = m.folio(pid, t)
    assert parent_page is not None and parent_page.order == 9 and not parent_page.pmd and parent_page.exclusive
    child_page = m.folio(child, t + 7 * P)
    assert child_page is not None and child_page.order == 0 and child_page.value == 0
    assert m.check_invariants() == []


async def test_a_pin_in_a_missing_range_sleeps_on_the_userfault_and_cancelling_it_keeps_nothing() -> None:
    m, pid, _, dst = await env()
    task = asyncio.create_task(m.pin(pid, dst, 2 * P))
    while not m.uffd_waiting(pid):
        await asyncio.sleep(0)
    (event,) = m.uffd_waiting(pid)
    assert event.write  # GUP's FOLL_WRITE fault
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not m.processes[pid].pins and m.check_invariants() == []
    # resolved by a copy, the pin completes
    task = asyncio.create_task(m.pin(pid, dst, P))
    while not m.uffd_waiting(pid):
        await asyncio.sleep(0)
    await m.uffd_copy(pid, dst, P, 9)
    _, pages = await asyncio.wait_for(task, 5)
    assert pages == 1 and m.folio(pid, dst).pinned and await m.read(pid, dst) == 9  # type: ignore[union-attr]
    assert m.check_invariants() == []


async def test_a_split_that_fails_ends_the_move_with_ebusy() -> None:
    """6.18 (as recorded on the kernel): one split attempt, no retry, EBUSY; unpinned, it splits."""
    m, pid, _, _ = await env()
    t = await thp(m, pid)
    await m.madvise(pid, t + (HP - P), P, "dontneed")  # PTE-mapped now
    dst = (await m.mmap(pid, 4 * P, uffd="missing")).start
    pin, _ = await m.pin(pid, t + 3 * P, P)
    with pytest.raises(MmError) as e:
        await m.move(pid, dst, t, P)
    assert e.value.errno == errno.EBUSY and m.folio(pid, t).order == 9  # type: ignore[union-attr]
    await m.unpin(pid, pin)
    assert await m.move(pid, dst, t, P) == P and m.folio(pid, t + P).order == 0  # type: ignore[union-attr]
    assert m.check_invariants() == []


# -- through the service and the SDK


@pytest.fixture
async def mm():
    async with serve_in_process(log_level="warning") as addr:
        async with Client(addr) as client:
            yield client


async def test_sdk_pin_unpin_and_folio_pinned(mm: Client) -> None:
    p = await mm.create_process()
    v = await p.mmap(4 * P)
    dst = await p.mmap(4 * P, uffd="missing")
    await p.write(v.start, 42)
    pin = await p.pin(v.start + 10, P)  # the pages the range covers: two
    assert isinstance(pin, Pin) and pin.pages == 2 and "Pin(id=1" in repr(pin)
    assert (await p.folio(v.start)).pinned  # type: ignore[union-attr]
    with pytest.raises(OSError) as e:  # memory-semantics errors are OSErrors with the kernel's errno
        await p.remap(dst.start, v.start, P)
    assert e.value.errno == errno.EBUSY
    async with await p.pin(v.start + 2 * P, P):  # a context manager unpins on leaving
        assert (await p.folio(v.start + 2 * P)).pinned  # type: ignore[union-attr]
    assert not (await p.folio(v.start + 2 * P)).pinned  # type: ignore[union-attr]
    await pin.unpin()
    assert not (await p.folio(v.start)).pinned  # type: ignore[union-attr]
    assert await p.remap(dst.start, v.start, P) == P
    with pytest.raises(OSError) as e:
        await p.unpin(pin)
    assert e.value.errno == errno.ENOENT
    for length, err in ((0, errno.EFAULT), (PIN_MAX_BYTES + P, errno.EFAULT)):
        with pytest.raises(OSError) as e:
            await p.pin(v.start, length)
        assert e.value.errno == err
    stats = await mm.stats()
    assert stats["gup_pin_pages"] == 3 and stats["gup_unpin_pages"] == 3


async def test_sdk_pin_in_a_batch(mm: Client) -> None:
    p = await mm.create_process()
    v = await p.mmap(2 * P)
    results = await mm.batch([ops.pin(p, v.start, 2 * P), ops.folio(p, v.start + P), ops.unpin(p, 1),
                              ops.folio(p, v.start + P)])
    assert results[0] == 1 and results[1].pinned and results[2] is None and not results[3].pinned


async def test_two_pins_of_one_process_in_flight_at_once_get_their_own_ids() -> None:
    """A pin asleep on a userfault while another pin of the process completes (found by a
    generated program: both once got the same id, and one of them leaked)."""
    m, pid, src, dst = await env()
    first = asyncio.create_task(m.pin(pid, dst, P))
    while not m.uffd_waiting(pid):
        await asyncio.sleep(0)
    second, _ = await m.pin(pid, src, P)
    await m.uffd_copy(pid, dst, P, 3)
    first_id, _ = await asyncio.wait_for(first, 5)
    assert first_id != second and set(m.processes[pid].pins) == {first_id, second}
    assert m.check_invariants() == []
    await m.unpin(pid, first_id)
    await m.unpin(pid, second)
    assert m.check_invariants() == []
