"""The behavioural test cases of the reference (linux-mm-semantics.md, section 7), one test each.

Conformance target: Linux 6.18 (protocol "recheck"); other protocols appear only as mutation runs
of the seed races (33, 34) and as the ~6.19 folio-lock variant of 33.

Out of scope (no tests), with the reason:
  * 16 pinned pages: the model has no page pinning (no MMF_HAS_PINNED / folio_maybe_dma_pinned).
  * 17 KSM pages: the model has no KSM.
  * 19, 20 swap PTEs: the model has no swap.
  * 22, the part needing MAP_SHARED, file-backed, hugetlb, pfnmap or IO mappings: the model maps
    only private anonymous memory.
  * 23, the VM_LOCKED half: the model has no mlock.
  * 18 and 25, the 6.8 column: the model follows 6.18 (zero pages move; a missing VMA is ENOENT).
  * 21, "registered with a different uffd": the model has one userfaultfd per process; the
    "dst not registered" half is tested.
  * 27 mmap_changing: the model has no UFFD_FEATURE_EVENT_FORK / non-cooperative events.
  * 28, 29, 30 THP: the model has only small (order-0) folios.
  * 32 uffd-wp / poison PTE markers: the model has no PTE markers.

Conventions: src is an unregistered private anonymous RW VMA at SRC, dst a private anonymous RW
VMA at DST registered (MISSING), with a gap between them so they never merge and get anon_vmas
with different roots. ``MmError.moved`` is the model's "bytes moved" (the positive ``.move`` of a
short move); for a hard error nothing was moved, so it is 0.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from typing import Any

import pytest

from mmsim.server.mm.locks import Current
from mmsim.server.mm.mm_types import PAGE_SHIFT, PAGE_SIZE, PMD_SHIFT, MmError
from mmsim.server.mm.model import MemoryModel, WalkResult
from mmsim.server.mm.userfaultfd import UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES, UFFDIO_MOVE_MODE_DONTWAKE

#: The mutation runs: an unsafe protocol, whose race the detectors must catch.
UNSAFE = pytest.mark.violations_expected

P = PAGE_SIZE
SRC = 0x1000_0000
DST = 0x2000_0000
FAR = 0x3000_0000  # a third, PMD-aligned area with no page table of its own
NPAGES = 8


def sval(i: int) -> int:
    """The value written to src page i."""
    return 0x5000 + i


def dval(i: int) -> int:
    """The value written to dst page i (a populated destination)."""
    return 0xD000 + i


# ---------------------------------------------------------------------------------------------
# helpers


async def new_env(
    protocol: str = "recheck",
    *,
    src_pages: Any = (0,),
    dst_pages: Any = (),
    dst_read: Any = (),
    npages: int = NPAGES,
    src_prot: str = "rw",
    dst_prot: str = "rw",
    register: str | None = "missing",
) -> tuple[MemoryModel, int]:
    """One process with the src and dst VMAs of the reference's default setup. dst pages are
    populated before the MISSING registration (touching a missing page afterwards would block)."""
    m = MemoryModel(protocol=protocol)
    pid = await m.create_process()
    s = await m.mmap(pid, npages * P, src_prot, addr=SRC)
    d = await m.mmap(pid, npages * P, dst_prot, addr=DST)
    assert (s.start, d.start) == (SRC, DST)
    for i in src_pages:
        await m.write(pid, SRC + i * P, sval(i))
    for i in dst_pages:
        await m.write(pid, DST + i * P, dval(i))
    for i in dst_read:
        assert await m.read(pid, DST + i * P) == 0
    if register is not None:
        await m.uffd_register(pid, DST, npages * P, register)
    assert len(m.vmas(pid)) == 2
    return m, pid


def vma(m: MemoryModel, pid: int, addr: int) -> Any:
    """The model's Vma containing ``addr`` (internal object, for structure assertions)."""
    v = m.processes[pid].vma_lookup(addr)
    assert v is not None, hex(addr)
    return v


def raw_folio(m: MemoryModel, pid: int, addr: int) -> Any:
    pte = m.processes[pid].pte_lookup(addr)
    return None if pte is None else pte.folio


def chain(v: Any) -> list[Any]:
    """The VMA's anon_vma_chain, oldest first (the kernel's list has the newest at its head)."""
    return [avc.anon_vma for avc in v.anon_vma_chain]


def tree(av: Any) -> list[tuple[int, int]]:
    """(pid, vma start) of every AVC in an anon_vma's interval tree."""
    return sorted((avc.vma.mm.id, avc.vma.start) for avc in av.rb_root)


def pages(m: MemoryModel, pid: int) -> dict[int, tuple[int, Any]]:
    """Every present PTE of the process: address -> (folio id, FolioInfo)."""
    mm = m.processes[pid]
    out = {}
    for pt in mm.pgtables.values():
        for vpn in pt.ptes:
            addr = vpn << PAGE_SHIFT
            out[addr] = (raw_folio(m, pid, addr).id, m.folio(pid, addr))
    return out


def full_state(m: MemoryModel, pid: int) -> tuple[Any, ...]:
    mm = m.processes[pid]
    return (pages(m, pid), m.vmas(pid), m.anon_vma_tree(pid), mm.rss_anon, m.k.folios_live)


async def move_err(m: MemoryModel, pid: int, dst: int, src: int, length: int, mode: int = 0) -> MmError:
    with pytest.raises(MmError) as ei:
        await m.move(pid, dst, src, length, mode)
    return ei.value


async def run_until(cond: Callable[[], Any], turns: int = 100) -> None:
    """Give the tasks just created or released event-loop turns until they reach ``cond``."""
    for _ in range(turns):
        if cond():
            return
        await asyncio.sleep(0)
    assert cond()


def quiescent(m: MemoryModel) -> None:
    assert m.check_invariants() == []
    assert not m.detectors.counts


def assert_moved_folio(m: MemoryModel, pid: int, dst: int, value: int, folio: Any = None) -> None:
    """dst maps an exclusive, writable folio owned by dst's own anon_vma at dst's lpi."""
    dv = vma(m, pid, dst)
    info = m.folio(pid, dst)
    assert info is not None and not info.zero_page
    assert info.value == value
    assert info.writable
    assert info.exclusive and info.mapcount == 1
    assert info.anon_vma == dv.anon_vma.id
    assert info.index == dv.linear_page_index(dst)
    if folio is not None:
        assert raw_folio(m, pid, dst) is folio


def assert_src_page(m: MemoryModel, pid: int, addr: int, value: int) -> None:
    """The src page is still in place, untouched."""
    sv = vma(m, pid, addr)
    info = m.folio(pid, addr)
    assert info is not None and info.value == value
    assert info.exclusive and info.mapcount == 1 and info.writable
    assert info.anon_vma == sv.anon_vma.id
    assert info.index == sv.linear_page_index(addr)


# ---------------------------------------------------------------------------------------------
# 1-7: basic moves and the per-page error rules


async def test_case01_basic_move() -> None:
    m, pid = await new_env()
    mm = m.processes[pid]
    f = raw_folio(m, pid, SRC)
    before = m.folio(pid, SRC)
    assert before.exclusive and before.mapcount == 1
    refcount, rss = f.refcount, mm.rss_anon

    assert await m.move(pid, DST, SRC, P) == P

    assert m.folio(pid, SRC) is None  # src PTE none
    assert_moved_folio(m, pid, DST, sval(0), folio=f)
    dv, sv = vma(m, pid, DST), vma(m, pid, SRC)
    assert f.mapping is dv.anon_vma
    assert f.index == dv.linear_page_index(DST) == DST >> PAGE_SHIFT  # dst never moved: pgoff = addr >> 12
    assert dv.anon_vma.root is not sv.anon_vma.root
    # Mapcount, refcount and RSS unchanged.
    assert f.mapcount == 1 and f.refcount == refcount and mm.rss_anon == rss
    # The dst PTE is built from dst's prot: writable, young, dirty as the written src was (6.15+).
    dst_pte = mm.pte_lookup(DST)
    assert dst_pte.write and dst_pte.young and dst_pte.dirty
    # Reading S afterwards gives the zero page.
    assert await m.read(pid, SRC) == 0
    assert m.folio(pid, SRC).zero_page
    assert await m.read(pid, DST) == sval(0)
    quiescent(m)


async def test_case02_walk_after_move() -> None:
    m, pid = await new_env()
    await m.move(pid, DST, SRC, P)
    sv, dv = vma(m, pid, SRC), vma(m, pid, DST)
    assert m.folio(pid, DST).young  # the dst PTE is built young
    assert tree(dv.anon_vma) == [(pid, DST)]  # the src VMA is not in the folio's tree

    # The walk needs dst's root, not src's: with the src root write-held it still succeeds ...
    holder = Current("holder")
    assert sv.anon_vma.root.rwsem.down_write(holder)
    try:
        w = await m.walk(pid, DST)
    finally:
        sv.anon_vma.root.rwsem.up_write(holder)
    assert w == WalkResult(referenced=1, contended=False, mappings=((pid, DST),), fast_retries=0, slow_retries=0)
    assert not m.folio(pid, DST).young  # young cleared

    w2 = await m.walk(pid, DST)
    assert w2.referenced == 0 and w2.mappings == ((pid, DST),) and not w2.contended

    # ... and with dst's root write-held it is contended.
    assert dv.anon_vma.root.rwsem.down_write(holder)
    try:
        w3 = await m.walk(pid, DST)
    finally:
        dv.anon_vma.root.rwsem.up_write(holder)
    assert w3.referenced == -1 and w3.contended
    quiescent(m)


@pytest.mark.parametrize("dst_state", ["written", "zero-page"])
async def test_case03_populated_dst(dst_state: str) -> None:
    if dst_state == "written":
        m, pid = await new_env(dst_pages=(0,))
    else:
        m, pid = await new_env(dst_read=(0,))
        assert m.folio(pid, DST).zero_page
    before = pages(m, pid)
    src_tree = m.anon_vma_tree(pid, SRC)

    e = await move_err(m, pid, DST, SRC, P)
    assert e.errno == errno.EEXIST
    assert e.moved == 0
    assert pages(m, pid) == before  # nothing changes
    assert m.anon_vma_tree(pid, SRC) == src_tree
    assert_src_page(m, pid, SRC, sval(0))
    quiescent(m)


async def test_case04_partial_progress() -> None:
    m, pid = await new_env(src_pages=range(4), dst_pages=(2,))
    src_folios = [raw_folio(m, pid, SRC + i * P) for i in range(4)]
    dst2 = raw_folio(m, pid, DST + 2 * P)

    e = await move_err(m, pid, DST, SRC, 4 * P)
    assert e.errno == errno.EAGAIN
    assert e.moved == 2 * P
    for i in range(2):  # pages 0-1 moved
        assert m.folio(pid, SRC + i * P) is None
        assert_moved_folio(m, pid, DST + i * P, sval(i), folio=src_folios[i])
    # pages 2-3 untouched
    assert_src_page(m, pid, SRC + 2 * P, sval(2))
    assert_src_page(m, pid, SRC + 3 * P, sval(3))
    assert raw_folio(m, pid, DST + 2 * P) is dst2 and m.folio(pid, DST + 2 * P).value == dval(2)
    assert m.folio(pid, DST + 3 * P) is None

    # Retrying from S+2P, D+2P shows the real error.
    e2 = await move_err(m, pid, DST + 2 * P, SRC + 2 * P, 2 * P)
    assert e2.errno == errno.EEXIST and e2.moved == 0
    assert_src_page(m, pid, SRC + 2 * P, sval(2))
    assert m.folio(pid, DST + 3 * P) is None
    quiescent(m)


@pytest.mark.parametrize("k", [0, 2])
async def test_case05_src_hole_without_flag(k: int) -> None:
    present = [i for i in range(4) if i != k]
    m, pid = await new_env(src_pages=present)

    e = await move_err(m, pid, DST, SRC, 4 * P)
    if k == 0:
        assert e.errno == errno.ENOENT
        assert e.moved == 0
    else:
        assert e.errno == errno.EAGAIN
        assert e.moved == k * P
    for i in range(k):
        assert m.folio(pid, SRC + i * P) is None
        assert_moved_folio(m, pid, DST + i * P, sval(i))
    for i in range(k, 4):
        assert m.folio(pid, DST + i * P) is None
        if i != k:
            assert_src_page(m, pid, SRC + i * P, sval(i))
    assert m.folio(pid, SRC + k * P) is None
    if k:
        # The retry from the hole reports it.
        e2 = await move_err(m, pid, DST + k * P, SRC + k * P, (4 - k) * P)
        assert e2.errno == errno.ENOENT and e2.moved == 0
    quiescent(m)


async def test_case06_allow_src_holes() -> None:
    m, pid = await new_env(src_pages=(0, 2))
    f0, f2 = raw_folio(m, pid, SRC), raw_folio(m, pid, SRC + 2 * P)

    assert await m.move(pid, DST, SRC, 3 * P, UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES) == 3 * P
    assert_moved_folio(m, pid, DST, sval(0), folio=f0)
    assert_moved_folio(m, pid, DST + 2 * P, sval(2), folio=f2)
    assert m.folio(pid, DST + P) is None  # the hole stays none at dst
    for i in range(3):
        assert m.folio(pid, SRC + i * P) is None
    quiescent(m)


async def test_case07_check_ordering() -> None:
    # (a) dst populated, src a hole whose page table exists: EEXIST (dst checked first).
    m, pid = await new_env(src_pages=(1,), dst_pages=(0,))
    mm = m.processes[pid]
    assert SRC >> PMD_SHIFT in mm.pgtables and m.folio(pid, SRC) is None
    before = pages(m, pid)
    e = await move_err(m, pid, DST, SRC, P)
    assert e.errno == errno.EEXIST and e.moved == 0
    assert pages(m, pid) == before

    # (b) src has no page table at all and no ALLOW_SRC_HOLES: ENOENT, even with dst populated.
    await m.mmap(pid, NPAGES * P, "rw", addr=FAR)
    assert FAR >> PMD_SHIFT not in mm.pgtables
    e = await move_err(m, pid, DST, FAR, P)
    assert e.errno == errno.ENOENT and e.moved == 0
    assert pages(m, pid) == before

    # (c) The same with ALLOW_SRC_HOLES: the tables are allocated, then dst wins: EEXIST.
    e = await move_err(m, pid, DST, FAR, P, UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES)
    assert e.errno == errno.EEXIST and e.moved == 0
    assert pages(m, pid) == before
    assert m.folio(pid, DST).value == dval(0)
    quiescent(m)


# ---------------------------------------------------------------------------------------------
# 8-15: fork


async def test_case08_shared_after_fork() -> None:
    m, pid = await new_env()
    f = raw_folio(m, pid, SRC)
    child = await m.fork(pid)
    assert raw_folio(m, child, SRC) is f
    # The child VMA loses the userfaultfd registration (no EVENT_FORK).
    assert [v.uffd for v in m.vmas(child) if v.start == DST] == [None]

    def check() -> None:
        pf, cf = m.folio(pid, SRC), m.folio(child, SRC)
        assert pf.mapcount == 2 and not pf.exclusive
        assert not pf.writable and not cf.writable  # both write-protected
        assert not cf.young  # the child PTE is made old
        assert pf.anon_vma == cf.anon_vma == vma(m, pid, SRC).anon_vma.id
        assert pf.value == cf.value == sval(0)

    check()
    before = (pages(m, pid), pages(m, child))
    e = await move_err(m, pid, DST, SRC, P)
    assert e.errno == errno.EBUSY and e.moved == 0
    check()
    assert (pages(m, pid), pages(m, child)) == before
    assert m.folio(pid, DST) is None
    quiescent(m)

    # A shared page behind an exclusive one: the exclusive page moves, the shared one stops the
    # move with EBUSY, reported as a short move (EAGAIN with .move = P).
    m, pid = await new_env(src_pages=(0, 1))
    child = await m.fork(pid)
    await m.write(pid, SRC, 0x2222)  # the parent's COW copy of page 0 is exclusive
    assert m.folio(pid, SRC).exclusive and not m.folio(pid, SRC + P).exclusive
    e = await move_err(m, pid, DST, SRC, 2 * P)
    assert e.errno == errno.EAGAIN and e.moved == P
    assert_moved_folio(m, pid, DST, 0x2222)
    shared = m.folio(pid, SRC + P)
    assert shared.mapcount == 2 and not shared.exclusive and shared.value == sval(1)
    assert m.folio(pid, DST + P) is None
    e = await move_err(m, pid, DST + P, SRC + P, P)
    assert e.errno == errno.EBUSY and e.moved == 0
    assert m.folio(child, SRC).value == sval(0) and m.folio(child, SRC + P).value == sval(1)
    quiescent(m)


async def test_case09_still_shared_after_child_exit() -> None:
    m, pid = await new_env()
    f = raw_folio(m, pid, SRC)
    child = await m.fork(pid)
    await m.exit(child)
    info = m.folio(pid, SRC)
    assert info.mapcount == 1 and not info.exclusive and not info.writable

    e = await move_err(m, pid, DST, SRC, P)
    assert e.errno == errno.EBUSY and e.moved == 0

    # A read does not restore exclusivity.
    assert await m.read(pid, SRC) == sval(0)
    assert not m.folio(pid, SRC).exclusive
    e = await move_err(m, pid, DST, SRC, P)
    assert e.errno == errno.EBUSY and e.moved == 0

    # A write reuses the folio: moved to the VMA's own anon_vma and exclusive again.
    await m.write(pid, SRC, 0x9999)
    assert raw_folio(m, pid, SRC) is f
    info = m.folio(pid, SRC)
    assert info.exclusive and info.writable and info.mapcount == 1 and info.value == 0x9999
    assert info.anon_vma == vma(m, pid, SRC).anon_vma.id

    assert await m.move(pid, DST, SRC, P) == P
    assert m.folio(pid, SRC) is None
    assert_moved_folio(m, pid, DST, 0x9999, folio=f)
    quiescent(m)


async def test_case10_madv_dontfork() -> None:
    m, pid = await new_env()
    await m.madvise(pid, SRC, NPAGES * P, "dontfork")
    assert [v.dontfork for v in m.vmas(pid) if v.start == SRC] == [True]
    f = raw_folio(m, pid, SRC)
    child = await m.fork(pid)

    assert m.processes[child].vma_lookup(SRC) is None  # no child VMA there
    assert [v.start for v in m.vmas(child)] == [DST]
    info = m.folio(pid, SRC)
    assert info.exclusive and info.mapcount == 1 and info.writable

    assert await m.move(pid, DST, SRC, P) == P
    assert m.folio(pid, SRC) is None
    assert_moved_folio(m, pid, DST, sval(0), folio=f)
    quiescent(m)


async def test_case11_madv_wipeonfork() -> None:
    m, pid = await new_env(src_pages=(0, 1))
    await m.madvise(pid, SRC, NPAGES * P, "wipeonfork")
    f = raw_folio(m, pid, SRC)
    child = await m.fork(pid)

    cv = m.processes[child].vma_lookup(SRC)
    assert cv is not None and (cv.start, cv.end) == (SRC, SRC + NPAGES * P)
    assert cv.anon_vma is None and cv.anon_vma_chain == []
    [cinfo] = [v for v in m.vmas(child) if v.start == SRC]
    assert cinfo.wipeonfork and cinfo.anon_vma is None
    for i in range(NPAGES):
        assert m.folio(child, SRC + i * P) is None  # no PTEs
    info = m.folio(pid, SRC)
    assert info.exclusive and info.mapcount == 1 and info.writable

    assert await m.move(pid, DST, SRC, P) == P
    assert_moved_folio(m, pid, DST, sval(0), folio=f)
    # A child read gives zero.
    assert await m.read(child, SRC) == 0
    assert await m.read(child, SRC + P) == 0
    assert m.folio(child, SRC).zero_page
    quiescent(m)


async def forked_env() -> tuple[MemoryModel, int, int, Any]:
    """Parent VMA V at SRC with one written page, and a forked child."""
    m = MemoryModel()
    pid = await m.create_process()
    await m.mmap(pid, NPAGES * P, "rw", addr=SRC)
    await m.write(pid, SRC, sval(0))
    v = vma(m, pid, SRC)
    a = v.anon_vma
    assert a.root is a and a.parent is a
    assert (a.refcount, a.num_children, a.num_active_vmas) == (1, 1, 1)
    child = await m.fork(pid)
    return m, pid, child, a


async def test_case12_fork_structure() -> None:
    m, pid, child, a = await forked_env()
    v, cv = vma(m, pid, SRC), vma(m, child, SRC)
    b = cv.anon_vma
    assert b is not None and b is not a
    assert chain(cv) == [a, b]  # {B, A} with B at the head
    assert chain(v) == [a]
    assert b.root is a and b.parent is a
    assert (b.refcount, b.num_active_vmas, b.num_children) == (1, 1, 0)
    assert (a.refcount, a.num_children, a.num_active_vmas) == (2, 2, 1)
    assert v.anon_vma is a
    assert tree(a) == sorted([(pid, SRC), (child, SRC)])
    assert tree(b) == [(child, SRC)]
    # The same view through the public API.
    t = {d["id"]: d for d in m.anon_vma_tree(child)}
    assert t[b.id]["root"] == a.id and t[b.id]["parent"] == a.id
    assert (t[a.id]["refcount"], t[a.id]["num_children"]) == (2, 2)

    # F.mapping is still A; a walk visits both parent and child.
    f = raw_folio(m, pid, SRC)
    assert raw_folio(m, child, SRC) is f and f.mapping is a
    assert m.folio(pid, SRC).anon_vma == m.folio(child, SRC).anon_vma == a.id
    w = await m.walk(pid, SRC)
    assert w.mappings == tuple(sorted([(pid, SRC), (child, SRC)]))
    assert not w.contended
    assert w.referenced == 1  # only the parent PTE was young; the child's was made old
    quiescent(m)


async def test_case13_child_exit() -> None:
    m, pid, child, a = await forked_env()
    b = vma(m, child, SRC).anon_vma
    await m.exit(child)

    assert b.freed and b not in m.k.anon_vma_cache.live
    assert (a.refcount, a.num_children, a.num_active_vmas) == (1, 1, 1)
    assert tree(a) == [(pid, SRC)]
    assert [d["id"] for d in m.anon_vma_tree(pid)] == [a.id]
    info = m.folio(pid, SRC)
    assert info.mapcount == 1 and info.anon_vma == a.id
    w = await m.walk(pid, SRC)
    assert w.mappings == ((pid, SRC),)
    quiescent(m)


async def test_case14_anon_vma_reuse() -> None:
    m, p, c1, a = await forked_env()
    b1 = vma(m, c1, SRC).anon_vma
    g = await m.fork(c1)
    b2 = vma(m, g, SRC).anon_vma
    assert b2 is not b1 and b2.parent is b1 and b2.root is a
    await m.exit(c1)
    assert (b1.num_active_vmas, b1.num_children) == (0, 1)
    assert not b1.freed  # still in G's chain

    live = set(m.k.anon_vma_cache.live)
    allocs = m.k.stats["anon_vma_alloc"]
    b1_refcount, a_state = b1.refcount, (a.refcount, a.num_children, a.num_active_vmas)
    g2 = await m.fork(g)

    g2v = vma(m, g2, SRC)
    assert g2v.anon_vma is b1  # C1's old anon_vma is reused
    assert set(m.k.anon_vma_cache.live) == live and m.k.stats["anon_vma_alloc"] == allocs
    assert b1.num_active_vmas == 1
    assert b1.refcount == b1_refcount and b1.num_children == 1
    assert (a.refcount, a.num_children, a.num_active_vmas) == a_state
    assert chain(g2v) == [a, b1, b2]
    assert (p, SRC) in tree(a) and (g2, SRC) in tree(b1) and (g2, SRC) in tree(b2)

    # A COW in G2 lands in the adopted anon_vma.
    await m.write(g2, SRC, 0x6262)
    info = m.folio(g2, SRC)
    assert info.anon_vma == b1.id and info.exclusive and info.mapcount == 1
    quiescent(m)


async def test_case15_cow_in_child() -> None:
    m, pid = await new_env()
    pf = raw_folio(m, pid, SRC)
    child = await m.fork(pid)
    b = vma(m, child, SRC).anon_vma

    await m.write(child, SRC, 0x7777)
    cf = raw_folio(m, child, SRC)
    assert cf is not pf
    info = m.folio(child, SRC)
    assert info.anon_vma == b.id and info.exclusive and info.mapcount == 1 and info.writable
    assert info.index == vma(m, child, SRC).linear_page_index(SRC)
    # The parent's page is mapped once now, but stays non-exclusive until it writes.
    pinfo = m.folio(pid, SRC)
    assert pinfo.mapcount == 1 and not pinfo.exclusive and pinfo.value == sval(0)

    # Move the child's page inside the child's mm (the child registers its own dst).
    await m.uffd_register(child, DST, NPAGES * P, "missing")
    assert await m.move(child, DST, SRC, P) == P
    assert m.folio(child, SRC) is None
    assert_moved_folio(m, child, DST, 0x7777, folio=cf)
    assert m.folio(pid, SRC).value == sval(0) and m.folio(pid, DST) is None
    quiescent(m)


# ---------------------------------------------------------------------------------------------
# 18: zero page (6.9+)


async def test_case18_zero_page_moves() -> None:
    m, pid = await new_env(src_pages=())
    assert await m.read(pid, SRC) == 0
    assert m.folio(pid, SRC).zero_page
    folios = m.k.folios_live

    assert await m.move(pid, DST, SRC, P) == P
    assert m.folio(pid, SRC) is None  # src none
    d = m.folio(pid, DST)
    assert d.zero_page and not d.writable  # a special zero-page PTE
    assert m.k.folios_live == folios  # no folio involved
    assert await m.read(pid, DST) == 0
    quiescent(m)


# ---------------------------------------------------------------------------------------------
# 21-26: validation


async def test_case21_dst_not_registered() -> None:
    m, pid = await new_env(register=None)
    await m.mmap(pid, NPAGES * P, "rw", addr=FAR)
    await m.uffd_register(pid, FAR, NPAGES * P, "missing")  # the process has a userfaultfd
    assert [v.uffd for v in m.vmas(pid)] == [None, None, "missing"]
    before = pages(m, pid)

    e = await move_err(m, pid, DST, SRC, P)
    assert e.errno == errno.EINVAL and e.moved == 0
    assert pages(m, pid) == before
    assert_src_page(m, pid, SRC, sval(0))

    # The source needs no registration: the same page moves into the registered area.
    assert await m.move(pid, FAR, SRC, P) == P
    assert_moved_folio(m, pid, FAR, sval(0))
    quiescent(m)


@pytest.mark.parametrize("src_prot,dst_prot", [("rw", "r"), ("r", "r"), ("r", "rw")])
async def test_case23_prot_mismatch_and_read_only(src_prot: str, dst_prot: str) -> None:
    m, pid = await new_env(src_pages=(0,) if src_prot == "rw" else (), src_prot=src_prot, dst_prot=dst_prot)
    if src_prot == "r":
        assert await m.read(pid, SRC) == 0  # something present at src
    assert [v.prot for v in m.vmas(pid)] == [src_prot, dst_prot]
    before = pages(m, pid)

    e = await move_err(m, pid, DST, SRC, P)
    assert e.errno == errno.EINVAL and e.moved == 0
    assert pages(m, pid) == before
    assert m.folio(pid, DST) is None
    quiescent(m)


@pytest.mark.parametrize("side", ["src", "dst"])
async def test_case24_range_leaves_vma(side: str) -> None:
    m, pid = await new_env(src_pages=range(4), npages=4)
    # Adjacent, non-mergeable neighbours above both VMAs: the range leaves its VMA but not mapped memory.
    await m.mmap(pid, 4 * P, "r", addr=SRC + 4 * P)
    await m.mmap(pid, 4 * P, "r", addr=DST + 4 * P)
    assert len(m.vmas(pid)) == 4
    before = pages(m, pid)

    if side == "src":
        e = await move_err(m, pid, DST, SRC + 2 * P, 4 * P)  # src + len > src_vma.end
    else:
        e = await move_err(m, pid, DST + 2 * P, SRC, 4 * P)  # dst + len > dst_vma.end
    assert e.errno == errno.EINVAL and e.moved == 0
    assert pages(m, pid) == before  # not even the first page moved
    quiescent(m)


@pytest.mark.parametrize("side", ["dst", "src"])
async def test_case25_no_vma_at_start(side: str) -> None:
    m, pid = await new_env()
    assert m.processes[pid].vma_lookup(FAR) is None
    before = pages(m, pid)
    if side == "dst":
        e = await move_err(m, pid, FAR, SRC, P)
    else:
        e = await move_err(m, pid, DST, FAR, P)
    assert e.errno == errno.ENOENT and e.moved == 0  # 6.9+: vma_lookup
    assert pages(m, pid) == before
    quiescent(m)


ARG_CASES: dict[str, Callable[[int], tuple[int, int, int, int]]] = {
    # name: task_size -> (dst, src, len, mode)
    "src-misaligned": lambda ts: (DST, SRC + P // 2, P, 0),
    "dst-misaligned": lambda ts: (DST + 8, SRC, P, 0),
    "len-misaligned": lambda ts: (DST, SRC, P + 1, 0),
    "len-zero": lambda ts: (DST, SRC, 0, 0),
    "src-range-wraps": lambda ts: (DST, SRC, (1 << 64) - SRC + P, 0),
    "dst-range-wraps": lambda ts: (DST, SRC, (1 << 64) - DST + P, 0),
    "dst-beyond-task-size": lambda ts: (ts, SRC, P, 0),
    "src-beyond-task-size": lambda ts: (DST, ts, P, 0),
    "src-range-crosses-task-size": lambda ts: (DST, ts - P, 2 * P, 0),
    "unknown-mode-bit": lambda ts: (DST, SRC, P, 1 << 2),
}


@pytest.mark.parametrize("name", list(ARG_CASES))
async def test_case26_argument_validation(name: str) -> None:
    m, pid = await new_env()
    dst, src, length, mode = ARG_CASES[name](m.processes[pid].task_size)
    before = full_state(m, pid)

    e = await move_err(m, pid, dst, src, length, mode)
    assert e.errno == errno.EINVAL and e.moved == 0
    # Rejected at the ioctl level, before move_pages: not even dst's anon_vma is prepared.
    assert full_state(m, pid) == before
    assert vma(m, pid, DST).anon_vma is None

    # The known mode bits are accepted.
    assert await m.move(pid, DST, SRC, P, UFFDIO_MOVE_MODE_DONTWAKE) == P
    assert_moved_folio(m, pid, DST, sval(0))
    quiescent(m)


# ---------------------------------------------------------------------------------------------
# 31: move inside one VMA


async def test_case31_move_within_one_vma() -> None:
    m = MemoryModel()
    pid = await m.create_process()
    await m.mmap(pid, NPAGES * P, "rw", addr=SRC)
    await m.write(pid, SRC, sval(0))
    await m.uffd_register(pid, SRC, NPAGES * P, "missing")
    [v] = m.processes[pid].vmas
    f = raw_folio(m, pid, SRC)

    dst = SRC + 5 * P
    assert await m.move(pid, dst, SRC, P) == P
    assert m.folio(pid, SRC) is None
    assert_moved_folio(m, pid, dst, sval(0), folio=f)
    assert f.mapping is v.anon_vma
    assert f.index == v.linear_page_index(dst) == v.pgoff + 5
    assert list(m.processes[pid].vmas) == [v] and len(chain(v)) == 1
    quiescent(m)


# ---------------------------------------------------------------------------------------------
# 33-35: the seed races and contention


@pytest.mark.parametrize(
    "protocol",
    ["recheck", pytest.param("no-recheck", marks=UNSAFE), pytest.param("recheck-slow-only", marks=UNSAFE)],
)
async def test_case33_seed_race_fast_path(protocol: str) -> None:
    m, pid = await new_env(protocol)
    avs = vma(m, pid, SRC).anon_vma
    f = raw_folio(m, pid, SRC)

    bp = m.k.sched.pause_at("walk:after-mapping-read")
    walker = asyncio.create_task(m.walk(pid, SRC))
    await bp.wait_reached()  # W read F.mapping = AVs, root RS; nothing locked yet
    assert f.mapping is avs and not avs.root.rwsem.is_locked()

    assert await m.move(pid, DST, SRC, P) == P  # M runs to completion
    avd = vma(m, pid, DST).anon_vma
    assert f.mapping is avd and avd.root is not avs.root
    assert m.folio(pid, DST).young

    bp.release()
    w = await walker
    assert not w.contended and w.slow_retries == 0
    if protocol == "recheck":
        # The recheck sees the changed mapping, retries on AVd/RD and finds F at D.
        assert w.fast_retries == 1
        assert w.mappings == ((pid, DST),)
        assert w.referenced == 1
        assert not m.folio(pid, DST).young
        quiescent(m)
    else:
        # Mutation: no fast-path recheck, W walks AVs's tree and misses D.
        assert w.fast_retries == 0
        assert w.mappings == ()
        assert w.referenced == 0
        assert m.folio(pid, DST).young  # the dst young bit is left set
        assert m.check_invariants() == []  # the state is fine; the walk result is wrong
        assert dict(m.detectors.counts) == {"wrong-root-walk": 1}


async def test_case33_seed_race_fast_path_folio_lock_protocol() -> None:
    """The ~6.19 variant: the walker holds the folio lock, so the mover waits for it."""
    m, pid = await new_env("folio-lock")
    f = raw_folio(m, pid, SRC)

    bp = m.k.sched.pause_at("walk:after-mapping-read")
    walker = asyncio.create_task(m.walk(pid, SRC))
    await bp.wait_reached()
    assert f.lock.is_locked()

    mover = asyncio.create_task(m.move(pid, DST, SRC, P))
    await run_until(lambda: len(f.lock.waiters or ()) == 1)  # M sleeps on the folio lock
    assert m.folio(pid, DST) is None and m.folio(pid, SRC) is not None

    bp.release()
    w = await walker
    assert w == WalkResult(referenced=1, contended=False, mappings=((pid, SRC),), fast_retries=0, slow_retries=0)
    assert await mover == P
    assert_moved_folio(m, pid, DST, sval(0), folio=f)
    quiescent(m)


@pytest.mark.parametrize(
    "protocol",
    ["recheck", "recheck-slow-only", pytest.param("no-recheck", marks=UNSAFE)],
)
async def test_case34_seed_race_slow_path(protocol: str) -> None:
    m, pid = await new_env(protocol)
    avs = vma(m, pid, SRC).anon_vma
    rs = avs.root.rwsem
    f = raw_folio(m, pid, SRC)
    prior = avs.refcount

    # M parks inside its section holding F's lock and RS for write (and a reference on AVs).
    bp_move = m.k.sched.pause_at("move:anon-vma-locked")
    mover = asyncio.create_task(m.move(pid, DST, SRC, P))
    await bp_move.wait_reached()
    assert rs.owner is not None and f.lock.is_locked()
    assert avs.refcount == prior + 1

    # W (blocking, no try_lock) fails the trylock, pins AVs, and sleeps on RS.
    bp_walk = m.k.sched.pause_at("walk:slow-before-lock")
    walker = asyncio.create_task(m.walk(pid, SRC, blocking=True))
    await bp_walk.wait_reached()
    assert avs.refcount == prior + 2
    bp_walk.release()
    await run_until(lambda: any(not wt.write for wt in rs.waiters or ()))

    bp_move.release()
    assert await mover == P
    w = await walker
    avd = vma(m, pid, DST).anon_vma
    assert f.mapping is avd and avd.root is not avs.root
    assert avs.refcount == prior  # the walker's reference is dropped either way
    assert not w.contended and w.fast_retries == 0
    if protocol != "no-recheck":
        # The slow-path recheck: unlock, put AVs, retry on AVd/RD and find D.
        assert w.slow_retries == 1
        assert w.mappings == ((pid, DST),)
        assert w.referenced == 1
        assert not m.folio(pid, DST).young
        quiescent(m)
    else:
        # Mutation: W walks AVs under RS and misses D.
        assert w.slow_retries == 0
        assert w.mappings == () and w.referenced == 0
        assert m.folio(pid, DST).young
        assert m.check_invariants() == []
        assert dict(m.detectors.counts) == {"wrong-root-walk": 1}


async def test_case35_contention() -> None:
    m, pid = await new_env()
    avs = vma(m, pid, SRC).anon_vma

    # A mover holding the source root's write lock.
    bp = m.k.sched.pause_at("move:anon-vma-locked")
    mover = asyncio.create_task(m.move(pid, DST, SRC, P))
    await bp.wait_reached()
    assert avs.root.rwsem.owner is not None
    assert m.folio(pid, SRC).young
    before = (pages(m, pid), m.anon_vma_tree(pid))
    w = await m.walk(pid, SRC)
    assert w == WalkResult(referenced=-1, contended=True, mappings=(), fast_retries=0, slow_retries=0)
    assert (pages(m, pid), m.anon_vma_tree(pid)) == before  # no young bit cleared, nothing changed
    assert m.folio(pid, SRC).young
    bp.release()
    assert await mover == P

    # The root rwsem taken directly (now the dst root: the folio lives there).
    avd = vma(m, pid, DST).anon_vma
    holder = Current("holder")
    assert avd.root.rwsem.down_write(holder)
    try:
        before = (pages(m, pid), m.anon_vma_tree(pid))
        w = await m.walk(pid, DST)
        assert w.referenced == -1 and w.contended and w.mappings == ()
        assert (pages(m, pid), m.anon_vma_tree(pid)) == before
        assert m.folio(pid, DST).young
    finally:
        avd.root.rwsem.up_write(holder)
    w = await m.walk(pid, DST)
    assert w.referenced == 1 and not w.contended and w.mappings == ((pid, DST),)
    assert not m.folio(pid, DST).young
    quiescent(m)


# ---------------------------------------------------------------------------------------------
# 36-37


@pytest.mark.parametrize("failure", ["prot-mismatch", "dst-not-registered"])
async def test_case36_anon_vma_prepared_before_validation(failure: str) -> None:
    if failure == "prot-mismatch":
        m, pid = await new_env(dst_prot="r")
    else:
        m, pid = await new_env(register=None)
        await m.mmap(pid, NPAGES * P, "rw", addr=FAR)
        await m.uffd_register(pid, FAR, NPAGES * P, "missing")
    dv = vma(m, pid, DST)
    assert dv.anon_vma is None and dv.anon_vma_chain == []
    before = pages(m, pid)
    live = set(m.k.anon_vma_cache.live)

    e = await move_err(m, pid, DST, SRC, P)
    assert e.errno == errno.EINVAL and e.moved == 0
    assert pages(m, pid) == before  # nothing moved ...
    # ... yet dst now has an anon_vma: a new root (no mergeable neighbour here).
    av = dv.anon_vma
    assert av is not None and av not in live
    assert av.root is av and av.parent is av
    assert (av.refcount, av.num_children, av.num_active_vmas) == (1, 1, 1)
    assert chain(dv) == [av] and tree(av) == [(pid, DST)]
    assert [v.anon_vma for v in m.vmas(pid) if v.start == DST] == [av.id]
    quiescent(m)


async def test_case37_move_then_fork() -> None:
    m, pid = await new_env()
    f = raw_folio(m, pid, SRC)
    assert await m.move(pid, DST, SRC, P) == P
    avd = vma(m, pid, DST).anon_vma

    child = await m.fork(pid)
    cv = vma(m, child, DST)
    b = cv.anon_vma
    assert chain(cv) == [avd, b]  # the child's chain includes dst_vma.anon_vma's tree
    assert b.parent is avd and b.root is avd.root
    assert (avd.refcount, avd.num_children) == (2, 2)
    assert tree(avd) == sorted([(pid, DST), (child, DST)])

    assert raw_folio(m, child, DST) is f
    for p in (pid, child):
        info = m.folio(p, DST)
        assert not info.exclusive and info.mapcount == 2 and not info.writable
        assert info.anon_vma == avd.id  # mapping stays dst_vma.anon_vma
        assert info.index == vma(m, p, DST).linear_page_index(DST)
    w = await m.walk(pid, DST)
    assert w.mappings == tuple(sorted([(pid, DST), (child, DST)]))
    assert w.referenced == 1  # the parent's dst PTE was young, the child's is made old
    quiescent(m)
