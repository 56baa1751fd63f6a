"""mprotect, MADV_DONTNEED and mremap in the model, against what Linux 6.18 does.

Every errno and edge case asserted here was first observed on the live 6.18 kernel of these
machines (root, ctypes calls of mmap/mprotect/madvise/mremap, /proc/self/maps, /proc/self/smaps
VmFlags, /proc/self/pagemap, a userfaultfd opened with UFFD_FEATURE_MOVE only); the comment on each
test names the experiment. The module docstrings of server/mm/mprotect.py, madvise.py and
mremap.py list the results.
"""

from __future__ import annotations

import asyncio
import errno
from typing import Required, TypedDict

import pytest

from mmsim.server.mm.model import PAGE_SIZE, MemoryModel, MmError

P = PAGE_SIZE
A = 0x10000000
B = 0x20000000
C = 0x30000000


class MremapArgs(TypedDict, total=False):
    """The arguments of one ``MemoryModel.mremap`` call."""

    addr: Required[int]
    old: Required[int]
    new: Required[int]
    maymove: bool
    dontunmap: bool
    fixed: int


def clean(m: MemoryModel) -> None:
    assert m.check_invariants() == []
    assert not m.detectors.counts, m.detectors.events


def layout(m: MemoryModel, pid: int) -> list[tuple[int, int, str]]:
    return [(v.start, v.end, v.prot) for v in m.vmas(pid)]


async def setup(m: MemoryModel, pages: int = 8, addr: int = A, prot: str = "rw", base: int = 100) -> int:
    pid = await m.create_process()
    await m.mmap(pid, pages * P, prot=prot, addr=addr)
    if prot == "rw":
        for i in range(pages):
            await m.write(pid, addr + i * P, base + i)
    return pid


async def errno_of(coro) -> int:
    with pytest.raises(MmError) as e:
        await coro
    assert e.value.errno is not None
    return e.value.errno


# ---------------------------------------------------------------------------------------------
# mprotect


async def test_mprotect_splits_the_middle_and_merges_back() -> None:
    # kernel: mprotect(a+2P, 2P, PROT_READ) on an 8-page rw VMA -> 3 VMAs in /proc/self/maps;
    # PROT_READ|PROT_WRITE again -> one VMA; PROT_NONE -> "---".
    m = MemoryModel()
    pid = await setup(m)
    await m.mprotect(pid, A + 2 * P, 2 * P, "r")
    assert layout(m, pid) == [(A, A + 2 * P, "rw"), (A + 2 * P, A + 4 * P, "r"), (A + 4 * P, A + 8 * P, "rw")]
    assert m.folio(pid, A + 2 * P).writable is False  # PTEs write-protected with VM_WRITE gone
    assert await m.read(pid, A + 3 * P) == 103
    assert await errno_of(m.write(pid, A + 3 * P, 1)) == errno.EFAULT
    clean(m)
    await m.mprotect(pid, A + 2 * P, 2 * P, "rw")
    assert layout(m, pid) == [(A, A + 8 * P, "rw")]
    # kernel: no write fault after r -> rw on an exclusive page (ru_minflt unchanged): writable again.
    assert m.folio(pid, A + 2 * P).writable is True
    await m.mprotect(pid, A + 2 * P, 2 * P, "none")
    assert [v.prot for v in m.vmas(pid)] == ["rw", "none", "rw"]
    # kernel: a length that is not a page multiple is rounded up.
    await m.mprotect(pid, A, P + 1, "r")
    assert layout(m, pid)[0] == (A, A + 2 * P, "r")
    clean(m)


async def test_mprotect_errors() -> None:
    # kernel: misaligned start EINVAL (also with length 0); length 0 -> 0 (even over a hole, even
    # with bad prot bits); start + len wrapping -> ENOMEM before prot is looked at (0x10 prot);
    # bad prot bits otherwise EINVAL.
    m = MemoryModel()
    pid = await setup(m)
    assert await errno_of(m.mprotect(pid, A + 1, P, "r")) == errno.EINVAL
    assert await errno_of(m.mprotect(pid, A + 1, 0, "r")) == errno.EINVAL
    await m.mprotect(pid, A + 64 * P, 0, "bogus")
    assert await errno_of(m.mprotect(pid, A, (1 << 64) - P, "bogus")) == errno.ENOMEM
    assert await errno_of(m.mprotect(pid, A, P, "x")) == errno.EINVAL
    assert layout(m, pid) == [(A, A + 8 * P, "rw")]
    clean(m)


async def test_mprotect_holes() -> None:
    # kernel: [a, a+8P) mapped, hole [8P, 12P), [12P, 16P) mapped:
    # range from 4P over the hole -> ENOMEM with [4P, 8P) already r--; hole at the start -> ENOMEM,
    # nothing changed; hole at the end -> the mapped part changed, ENOMEM; all hole -> ENOMEM.
    m = MemoryModel()
    pid = await setup(m)
    await m.mmap(pid, 4 * P, addr=A + 12 * P)
    assert await errno_of(m.mprotect(pid, A + 4 * P, 12 * P, "r")) == errno.ENOMEM
    assert layout(m, pid) == [(A, A + 4 * P, "rw"), (A + 4 * P, A + 8 * P, "r"), (A + 12 * P, A + 16 * P, "rw")]
    await m.mprotect(pid, A, 8 * P, "rw")
    assert await errno_of(m.mprotect(pid, A + 8 * P, 8 * P, "r")) == errno.ENOMEM
    assert layout(m, pid) == [(A, A + 8 * P, "rw"), (A + 12 * P, A + 16 * P, "rw")]
    assert await errno_of(m.mprotect(pid, A + 14 * P, 8 * P, "r")) == errno.ENOMEM
    assert layout(m, pid)[-1] == (A + 14 * P, A + 16 * P, "r")
    assert await errno_of(m.mprotect(pid, A + 20 * P, 4 * P, "r")) == errno.ENOMEM
    clean(m)


async def test_prot_none_mapping_and_access_faults() -> None:
    # kernel: mmap(PROT_NONE) shows "---"; a PROT_NONE page keeps its folio (pagemap present)
    # and gets its value back after PROT_READ|PROT_WRITE. An access is SIGSEGV: EFAULT here.
    m = MemoryModel()
    pid = await m.create_process()
    info = await m.mmap(pid, 2 * P, prot="none", addr=A)
    assert info.prot == "none"
    assert await errno_of(m.read(pid, A)) == errno.EFAULT
    assert await errno_of(m.write(pid, A, 1)) == errno.EFAULT
    pid2 = await setup(m)
    await m.mprotect(pid2, A, 8 * P, "none")
    assert await errno_of(m.read(pid2, A + P)) == errno.EFAULT
    assert m.folio(pid2, A + P).value == 101
    await m.mprotect(pid2, A, 8 * P, "rw")
    assert await m.read(pid2, A + P) == 101
    clean(m)


async def test_mprotect_vm_account() -> None:
    # kernel (smaps VmFlags "ac"): rw -> r drops VM_ACCOUNT from a never-faulted VMA, which then
    # merges with an adjacent VMA mapped r; a faulted one keeps it and does not merge.
    m = MemoryModel()
    pid = await m.create_process()
    await m.mmap(pid, 2 * P, addr=A)
    await m.mprotect(pid, A, 2 * P, "r")
    await m.mmap(pid, 2 * P, prot="r", addr=A + 2 * P)
    assert layout(m, pid) == [(A, A + 4 * P, "r")]
    await m.mmap(pid, 2 * P, addr=B)
    await m.write(pid, B, 1)
    await m.mprotect(pid, B, 2 * P, "r")
    await m.mmap(pid, 2 * P, prot="r", addr=B + 2 * P)
    assert layout(m, pid)[1:] == [(B, B + 2 * P, "r"), (B + 2 * P, B + 4 * P, "r")]
    clean(m)


async def test_uffd_move_sees_mprotect() -> None:
    # kernel: UFFDIO_MOVE rw src -> PROT_NONE dst (registered): EINVAL; none -> none: EINVAL;
    # none -> rw: EINVAL; r -> r: EINVAL; rw -> rw: moves. Registering a PROT_NONE range works.
    m = MemoryModel()
    pid = await setup(m, pages=4)
    await m.mmap(pid, 4 * P, addr=B)
    await m.mprotect(pid, B, 4 * P, "none")
    await m.uffd_register(pid, B, 4 * P, "missing")
    assert await errno_of(m.move(pid, B, A, P)) == errno.EINVAL
    await m.mprotect(pid, A, 4 * P, "none")
    assert await errno_of(m.move(pid, B, A, P)) == errno.EINVAL
    await m.mprotect(pid, B, 4 * P, "rw")
    assert await errno_of(m.move(pid, B, A, P)) == errno.EINVAL
    await m.mprotect(pid, A, 4 * P, "r")
    await m.mprotect(pid, B, 4 * P, "r")
    assert await errno_of(m.move(pid, B, A, P)) == errno.EINVAL
    await m.mprotect(pid, A, 4 * P, "rw")
    await m.mprotect(pid, B, 4 * P, "rw")
    assert await m.move(pid, B, A, P) == P
    assert m.folio(pid, B).value == 100
    # kernel: mprotect of part of a registered range splits it; every part stays registered.
    await m.mprotect(pid, B + P, P, "r")
    assert [v.uffd for v in m.vmas(pid) if v.start >= B] == ["missing"] * 3
    clean(m)


# ---------------------------------------------------------------------------------------------
# MADV_DONTNEED


async def test_dontneed_zaps_a_subrange_without_splitting() -> None:
    # kernel: madvise(a+2P, 3P, MADV_DONTNEED): pagemap shows pages 2-4 not present, maps unchanged;
    # a read then maps the zero page (same PFN for every page), a write a new page.
    m = MemoryModel()
    pid = await setup(m)
    av = m.vmas(pid)[0].anon_vma
    folios = m.k.folios_live
    await m.madvise(pid, A + 2 * P, 3 * P, "dontneed")
    assert len(m.vmas(pid)) == 1 and m.vmas(pid)[0].anon_vma == av
    assert m.k.folios_live == folios - 3
    assert [m.folio(pid, A + i * P) is None for i in range(8)] == [False, False, True, True, True, False, False, False]
    assert not any((A >> 12) + i in m.ledger[pid] for i in (2, 3, 4))
    clean(m)
    assert await m.read(pid, A + 2 * P) == 0
    assert m.folio(pid, A + 2 * P).zero_page
    await m.write(pid, A + 3 * P, 7)
    f = m.folio(pid, A + 3 * P)
    assert f.value == 7 and f.mapcount == 1 and f.anon_vma == av
    # the zero page is zapped too
    await m.madvise(pid, A + 2 * P, P, "dontneed")
    assert m.folio(pid, A + 2 * P) is None
    clean(m)


async def test_dontneed_errors_and_holes() -> None:
    # kernel: misaligned EINVAL (also with len 0); len 0 -> 0 even on a hole; a hole at the start,
    # middle or end: every mapped part zapped, then ENOMEM; all hole: ENOMEM; start+len reaching
    # 2^64: EINVAL; past TASK_SIZE without wrapping: ENOMEM; unknown advice EINVAL.
    m = MemoryModel()
    pid = await setup(m)
    await m.mmap(pid, 4 * P, addr=A + 12 * P)
    for i in range(4):
        await m.write(pid, A + (12 + i) * P, 200 + i)
    assert await errno_of(m.madvise(pid, A + 1, P, "dontneed")) == errno.EINVAL
    assert await errno_of(m.madvise(pid, A + 1, 0, "dontneed")) == errno.EINVAL
    await m.madvise(pid, A + 9 * P, 0, "dontneed")
    assert await errno_of(m.madvise(pid, A + 6 * P, 8 * P, "dontneed")) == errno.ENOMEM
    present = [m.folio(pid, A + i * P) is not None for i in range(16)]
    assert present == [True] * 6 + [False] * 8 + [True] * 2
    assert await errno_of(m.madvise(pid, A + 9 * P, 2 * P, "dontneed")) == errno.ENOMEM
    assert await errno_of(m.madvise(pid, (1 << 64) - P, P, "dontneed")) == errno.EINVAL
    assert await errno_of(m.madvise(pid, (1 << 47) - P, 2 * P, "dontneed")) == errno.ENOMEM
    assert await errno_of(m.madvise(pid, A, P, "free")) == errno.EINVAL
    clean(m)


async def test_dontneed_in_child_after_fork() -> None:
    # A DONTNEED in the child drops only the child's mapping: the parent's page has mapcount 1.
    m = MemoryModel()
    pid = await setup(m, pages=2)
    child = await m.fork(pid)
    assert m.folio(pid, A).mapcount == 2
    await m.madvise(child, A, 2 * P, "dontneed")
    assert m.folio(pid, A).mapcount == 1 and m.folio(pid, A).value == 100
    assert await m.read(child, A) == 0
    clean(m)
    # and in the parent: the child's page stays, the parent reads zero
    await m.write(child, A + P, 9)
    await m.madvise(pid, A, 2 * P, "dontneed")
    assert m.folio(child, A + P).value == 9 and m.folio(pid, A + P) is None
    assert m.k.folios_live == 1
    clean(m)


async def test_dontneed_in_missing_registered_range() -> None:
    # kernel: DONTNEED on a MISSING-registered range succeeds (no EVENT_REMOVE asked for); the
    # range stays registered and the page is gone (an access would now be a missing fault).
    m = MemoryModel()
    pid = await setup(m, pages=2)
    await m.uffd_register(pid, A, 2 * P, "missing")
    await m.madvise(pid, A, 2 * P, "dontneed")
    assert m.folio(pid, A) is None and m.vmas(pid)[0].uffd == "missing"
    clean(m)


# ---------------------------------------------------------------------------------------------
# mremap


async def test_mremap_shrink_and_grow_in_place() -> None:
    # kernel: shrink 8P -> 3P returns addr, maps [0, 3P); grow 4P -> 8P in place when free; grow
    # into exactly the next VMA's start merges with it; grow blocked by a VMA -> ENOMEM.
    m = MemoryModel()
    pid = await setup(m)
    info = await m.mremap(pid, A, 8 * P, 3 * P)
    assert (info.start, info.end) == (A, A + 3 * P)
    assert layout(m, pid) == [(A, A + 3 * P, "rw")]
    assert m.k.folios_live == 3 and len(m.ledger[pid]) == 3
    await m.mmap(pid, 2 * P, addr=A + 10 * P)
    info = await m.mremap(pid, A, 3 * P, 8 * P)
    assert info.start == A and layout(m, pid)[0] == (A, A + 8 * P, "rw")
    assert m.folio(pid, A + 2 * P).value == 102
    assert await errno_of(m.mremap(pid, A, 8 * P, 12 * P)) == errno.ENOMEM
    await m.mremap(pid, A, 8 * P, 10 * P)
    assert layout(m, pid) == [(A, A + 12 * P, "rw")]
    # kernel: growing a part that does not end at the VMA's end: ENOMEM without MAYMOVE
    assert await errno_of(m.mremap(pid, A, 2 * P, 3 * P)) == errno.ENOMEM
    clean(m)


async def test_mremap_shrink_and_no_op_span_anything() -> None:
    # kernel: [0, 4P) and [6P, 10P) mapped: mremap(a, 10P, 2P) unmaps [2P, 10P) over the hole;
    # mremap(a, 8P, 8P) (with or without MAYMOVE) returns a; a grow past the VMA's end: EFAULT.
    m = MemoryModel()
    pid = await setup(m, pages=4)
    await m.mmap(pid, 4 * P, addr=A + 6 * P)
    assert (await m.mremap(pid, A, 8 * P, 8 * P, maymove=True)).start == A
    assert await errno_of(m.mremap(pid, A, 6 * P, 8 * P, maymove=True)) == errno.EFAULT
    await m.mremap(pid, A, 10 * P, 2 * P)
    assert layout(m, pid) == [(A, A + 2 * P, "rw")]
    clean(m)


async def test_mremap_param_errors() -> None:
    # kernel: each of these with a 4-page VMA at a.
    m = MemoryModel()
    pid = await setup(m, pages=4)
    cases: list[tuple[MremapArgs, int]] = [
        (MremapArgs(addr=A + 1, old=4 * P, new=4 * P), errno.EINVAL),  # misaligned
        (MremapArgs(addr=A, old=4 * P, new=0), errno.EINVAL),  # new_len 0
        (MremapArgs(addr=A, old=4 * P, new=1 << 47), errno.EINVAL),  # new_len > TASK_SIZE
        (MremapArgs(addr=A, old=0, new=4 * P), errno.EINVAL),  # old_len 0, private
        (MremapArgs(addr=A, old=0, new=4 * P, maymove=True), errno.EINVAL),
        (MremapArgs(addr=A, old=4 * P, new=4 * P, fixed=C), errno.EINVAL),  # FIXED without MAYMOVE
        (MremapArgs(addr=A, old=4 * P, new=4 * P, dontunmap=True), errno.EINVAL),  # DONTUNMAP without MAYMOVE
        (MremapArgs(addr=A, old=4 * P, new=8 * P, maymove=True, dontunmap=True), errno.EINVAL),  # resize
        (MremapArgs(addr=A, old=4 * P, new=4 * P, maymove=True, fixed=C + 1), errno.EINVAL),  # misaligned new
        (MremapArgs(addr=A, old=4 * P, new=4 * P, maymove=True, fixed=A + 2 * P), errno.EINVAL),  # overlap
        (MremapArgs(addr=A, old=4 * P, new=8 * P, maymove=True, fixed=A - 4 * P), errno.EINVAL),  # overlap
        (MremapArgs(addr=A, old=4 * P, new=4 * P, maymove=True, fixed=(1 << 47) - 4 * P), errno.EINVAL),  # > TASK_SIZE
        (MremapArgs(addr=C, old=P, new=P), errno.EFAULT),  # nothing mapped
        (MremapArgs(addr=C, old=P, new=2 * P, maymove=True), errno.EFAULT),
    ]
    for kw, err in cases:
        got = await errno_of(
            m.mremap(
                pid, kw["addr"], kw["old"], kw["new"], maymove=kw.get("maymove", False),
                dontunmap=kw.get("dontunmap", False), fixed=kw.get("fixed"),
            )
        )
        assert got == err, kw
    assert layout(m, pid) == [(A, A + 4 * P, "rw")]
    # kernel: a FIXED move right next to the old range is fine
    assert (await m.mremap(pid, A, 4 * P, 4 * P, maymove=True, fixed=A + 4 * P)).start == A + 4 * P
    assert layout(m, pid) == [(A + 4 * P, A + 8 * P, "rw")]
    clean(m)


async def test_mremap_dontunmap_without_fixed_compares_with_address_zero() -> None:
    # kernel: a 0x20000-byte mapping at 0x10000, MREMAP_MAYMOVE|MREMAP_DONTUNMAP: EINVAL (the old
    # range overlaps [0, new_len)).
    m = MemoryModel()
    pid = await m.create_process()
    await m.mmap(pid, 0x20000, addr=0x10000)
    assert await errno_of(m.mremap(pid, 0x10000, 0x20000, 0x20000, maymove=True, dontunmap=True)) == errno.EINVAL
    clean(m)


async def test_mremap_move_carries_pages_and_rmap() -> None:
    # kernel: a grow with MAYMOVE blocked in place moves: same PFNs and values at the new address,
    # the new tail not present, the old range gone.
    m = MemoryModel()
    pid = await setup(m, pages=4)
    await m.mmap(pid, 2 * P, prot="r", addr=A + 4 * P)
    child = await m.fork(pid)
    before = [m.folio(pid, A + i * P) for i in range(4)]
    info = await m.mremap(pid, A, 4 * P, 8 * P, maymove=True)
    new = info.start
    assert new != A and info.end == new + 8 * P
    assert layout(m, pid) == [(A + 4 * P, A + 6 * P, "r"), (new, new + 8 * P, "rw")]
    for i in range(4):
        f = m.folio(pid, new + i * P)
        assert f is not None and f.value == 100 + i and f.mapcount == 2
        assert f.index == before[i].index and f.anon_vma == before[i].anon_vma  # pgoff moved with it
        assert m.folio(pid, A + i * P) is None
    assert m.folio(pid, new + 5 * P) is None
    w = await m.walk(pid, new + 2 * P, blocking=True)
    assert sorted(w.mappings) == sorted([(pid, new + 2 * P), (child, A + 2 * P)])
    assert await m.read(pid, new + 3 * P) == 103 and await m.read(pid, new + 6 * P) == 0
    assert await errno_of(m.read(pid, A)) == errno.EFAULT
    await m.write(pid, new, 5)  # COW at the new address; the child keeps its page
    assert await m.read(child, A) == 100
    clean(m)


async def test_mremap_fixed_replaces_the_target() -> None:
    # kernel: 4 pages moved FIXED to the middle of an 8-page mapping: its pages 2-5 replaced (the
    # old values gone), the mapping split around the new VMA.
    m = MemoryModel()
    pid = await setup(m, pages=4)
    await m.mmap(pid, 8 * P, addr=B)
    for i in range(8):
        await m.write(pid, B + i * P, 900 + i)
    folios = m.k.folios_live
    info = await m.mremap(pid, A, 4 * P, 4 * P, maymove=True, fixed=B + 2 * P)
    assert info.start == B + 2 * P
    assert [await m.read(pid, B + i * P) for i in range(8)] == [900, 901, 100, 101, 102, 103, 906, 907]
    assert layout(m, pid) == [(B, B + 2 * P, "rw"), (B + 2 * P, B + 6 * P, "rw"), (B + 6 * P, B + 8 * P, "rw")]
    assert m.k.folios_live == folios - 4
    clean(m)
    # FIXED with a smaller length: the tail is unmapped first, the rest moves
    info = await m.mremap(pid, B + 2 * P, 4 * P, 2 * P, maymove=True, fixed=C)
    assert (info.start, info.end) == (C, C + 2 * P)
    assert [m.folio(pid, C + i * P).value for i in range(2)] == [100, 101]
    clean(m)


async def test_mremap_fixed_moves_several_vmas() -> None:
    # kernel (6.17+): [0, 4P) rw and [6P, 8P) r, mremap(a, 8P, 8P, MAYMOVE|FIXED, t) moves both,
    # the 2-page gap kept; a hole at the start: EFAULT; resizing across VMAs: EFAULT; a trailing
    # hole is fine; a partial range moves the parts.
    m = MemoryModel()
    pid = await setup(m, pages=4)
    await m.mmap(pid, 2 * P, prot="r", addr=A + 6 * P)
    assert await errno_of(m.mremap(pid, A, 8 * P, 10 * P, maymove=True, fixed=C)) == errno.EFAULT
    assert await errno_of(m.mremap(pid, A - 2 * P, 6 * P, 6 * P, maymove=True, fixed=C)) == errno.EFAULT
    info = await m.mremap(pid, A + 2 * P, 5 * P, 5 * P, maymove=True, fixed=C)
    assert info.start == C
    assert layout(m, pid) == [
        (A, A + 2 * P, "rw"), (A + 7 * P, A + 8 * P, "r"), (C, C + 2 * P, "rw"), (C + 4 * P, C + 5 * P, "r")
    ]
    assert [m.folio(pid, C + i * P).value for i in range(2)] == [102, 103]
    clean(m)
    await m.mremap(pid, A, 4 * P, 4 * P, maymove=True, fixed=B)  # trailing hole [2P, 4P)
    assert layout(m, pid)[1] == (B, B + 2 * P, "rw")
    clean(m)


async def test_mremap_multi_vma_move_refuses_registered_vmas() -> None:
    # kernel: [0, 4P) and [6P, 8P): the 2nd registered -> the 1st moved, then EFAULT; the 1st
    # registered -> EFAULT, nothing moved; one registered VMA with a trailing hole -> EFAULT.
    m = MemoryModel()
    pid = await setup(m, pages=4)
    await m.mmap(pid, 2 * P, addr=A + 6 * P)
    await m.write(pid, A + 6 * P, 7)
    await m.uffd_register(pid, A + 6 * P, 2 * P, "missing")
    assert await errno_of(m.mremap(pid, A, 8 * P, 8 * P, maymove=True, fixed=C)) == errno.EFAULT
    assert [(v.start, v.uffd) for v in m.vmas(pid)] == [(A + 6 * P, "missing"), (C, None)]
    assert m.folio(pid, C + P).value == 101
    clean(m)
    pid2 = await setup(m, pages=4)
    await m.mmap(pid2, 2 * P, addr=A + 6 * P)
    await m.uffd_register(pid2, A, 4 * P, "missing")
    assert await errno_of(m.mremap(pid2, A, 8 * P, 8 * P, maymove=True, fixed=C)) == errno.EFAULT
    assert await errno_of(m.mremap(pid2, A, 5 * P, 5 * P, maymove=True, fixed=C)) == errno.EFAULT
    assert [v.start for v in m.vmas(pid2)] == [A, A + 6 * P]
    clean(m)


async def test_mremap_dontunmap_keeps_an_empty_old_vma() -> None:
    # kernel: MAYMOVE|DONTUNMAP: the old VMA stays in maps with its flags, no page present there,
    # reads give 0; the pages are at the new address.
    m = MemoryModel()
    pid = await setup(m, pages=4)
    info = await m.mremap(pid, A, 4 * P, 4 * P, maymove=True, dontunmap=True)
    new = info.start
    vmas = {v.start: v for v in m.vmas(pid)}
    assert set(vmas) == {A, new} and vmas[A].end == A + 4 * P and vmas[A].prot == "rw"
    assert vmas[A].anon_vma is None  # all of it moved: its anon_vma links dropped
    assert all(m.folio(pid, A + i * P) is None for i in range(4))
    assert [m.folio(pid, new + i * P).value for i in range(4)] == [100, 101, 102, 103]
    assert await m.read(pid, A) == 0 and m.folio(pid, A).zero_page
    await m.write(pid, A + P, 5)
    clean(m)
    # part of a VMA, FIXED: the old VMA is not split and keeps its anon_vma
    pid2 = await setup(m, pages=8)
    av = m.vmas(pid2)[0].anon_vma
    await m.mremap(pid2, A + 2 * P, 2 * P, 2 * P, maymove=True, dontunmap=True, fixed=C)
    assert layout(m, pid2) == [(A, A + 8 * P, "rw"), (C, C + 2 * P, "rw")]
    assert m.vmas(pid2)[0].anon_vma == av
    assert [m.folio(pid2, A + i * P) is not None for i in range(8)] == [True, True, False, False] + [True] * 4
    clean(m)


async def test_mremap_and_userfaultfd_registration() -> None:
    # kernel, userfaultfd with UFFD_FEATURE_MOVE only (no EVENT_REMAP), smaps VmFlags "um":
    # grow/shrink in place keep it; any move drops it on the new VMA; DONTUNMAP leaves the old
    # range registered.
    m = MemoryModel()
    pid = await setup(m, pages=4)
    await m.uffd_register(pid, A, 4 * P, "missing")
    await m.mremap(pid, A, 4 * P, 6 * P)
    await m.mremap(pid, A, 6 * P, 3 * P)
    assert [(v.start, v.end, v.uffd) for v in m.vmas(pid)] == [(A, A + 3 * P, "missing")]
    info = await m.mremap(pid, A, 3 * P, 3 * P, maymove=True, fixed=C)
    assert [(v.start, v.uffd) for v in m.vmas(pid)] == [(C, None)]
    assert info.uffd is None
    await m.uffd_register(pid, C, 3 * P, "missing")
    info = await m.mremap(pid, C, 3 * P, 3 * P, maymove=True, dontunmap=True, fixed=B)
    assert [(v.start, v.uffd) for v in m.vmas(pid)] == [(B, None), (C, "missing")]
    assert m.folio(pid, C) is None and m.folio(pid, B).value == 100
    clean(m)


async def test_mremap_merging_into_a_registered_neighbour_unregisters_it() -> None:
    # kernel: N registered and faulted at t, S registered and never faulted: S moved FIXED to
    # N's end merges with N (one VMA) and the whole VMA loses "um". S registered moved next to an
    # unregistered N: no merge (different userfaultfd), then two VMAs, neither registered.
    m = MemoryModel()
    pid = await setup(m, pages=4, addr=B)
    await m.uffd_register(pid, B, 4 * P, "missing")
    await m.mmap(pid, 2 * P, addr=A)
    await m.uffd_register(pid, A, 2 * P, "missing")
    await m.mremap(pid, A, 2 * P, 2 * P, maymove=True, fixed=B + 4 * P)
    assert [(v.start, v.end, v.uffd) for v in m.vmas(pid)] == [(B, B + 6 * P, None)]
    pid2 = await setup(m, pages=4, addr=B)
    await m.mmap(pid2, 2 * P, addr=A)
    await m.uffd_register(pid2, A, 2 * P, "missing")
    await m.mremap(pid2, A, 2 * P, 2 * P, maymove=True, fixed=B + 4 * P)
    assert [(v.start, v.uffd) for v in m.vmas(pid2)] == [(B, None), (B + 4 * P, None)]
    clean(m)


async def test_uffd_move_after_mremap() -> None:
    # The moved pages are exclusive at their new address: UFFDIO_MOVE takes them from there.
    m = MemoryModel()
    pid = await setup(m, pages=2)
    await m.mremap(pid, A, 2 * P, 2 * P, maymove=True, fixed=C)
    await m.mmap(pid, 2 * P, addr=B, uffd="missing")
    assert await m.move(pid, B, C, 2 * P) == 2 * P
    assert m.folio(pid, B + P).value == 101 and m.folio(pid, B + P).index == (B >> 12) + 1
    clean(m)


# ---------------------------------------------------------------------------------------------
# the memory budget and cancellation


async def test_budget_enomem_changes_nothing() -> None:
    m = MemoryModel()
    pid = await setup(m, pages=8)
    await m.mmap(pid, 8 * P, addr=C)
    await m.write(pid, C, 1)
    k = m.k
    k.memcg.limit = k.memcg.usage  # no room for one more object

    def snapshot():
        return (m.vmas(pid), [m.folio(pid, A + i * P) for i in range(8)], dict(m.ledger[pid]), k.memcg.usage)

    before = snapshot()
    assert await errno_of(m.mprotect(pid, A + 2 * P, 2 * P, "r")) == errno.ENOMEM  # a split
    assert await errno_of(m.mremap(pid, A, 8 * P, 8 * P, maymove=True, fixed=B)) == errno.ENOMEM
    assert await errno_of(m.mremap(pid, A, 8 * P, 8 * P, maymove=True, fixed=C + 2 * P)) == errno.ENOMEM
    assert await errno_of(m.mremap(pid, A, 8 * P, 4 * P, maymove=True, fixed=B)) == errno.ENOMEM
    assert snapshot() == before
    clean(m)
    await m.madvise(pid, A, 2 * P, "dontneed")  # allocates nothing
    k.memcg.limit = None
    await m.mremap(pid, A, 8 * P, 8 * P, maymove=True, fixed=B)
    clean(m)


PAGES = 1024  # several RESCHED_WORK slices


async def _big(m: MemoryModel) -> int:
    pid = await m.create_process()
    await m.mmap(pid, PAGES * P, addr=A)
    await asyncio.gather(*(m.write(pid, A + i * P, i) for i in range(PAGES)))
    return pid


async def _cancel_after(task: asyncio.Task, turns: int) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)
    assert not task.done(), "the call should still be in its loop"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("turns", [3, 20, 60])
async def test_cancel_mremap_mid_move(turns: int) -> None:
    m = MemoryModel()
    pid = await _big(m)
    child = await m.fork(pid)
    task = asyncio.create_task(m.mremap(pid, A, PAGES * P, PAGES * P, maymove=True, fixed=B + 3 * P))
    await _cancel_after(task, turns)
    clean(m)  # mremap is uninterruptible once started: it finished
    assert m.folio(pid, B + 3 * P + 5 * P).value == 5 and m.folio(child, A + 5 * P).mapcount == 2
    await m.mremap(pid, B + 3 * P, PAGES * P, 2 * PAGES * P, maymove=True)
    clean(m)


@pytest.mark.parametrize("turns", [3, 12])
async def test_cancel_mprotect_and_dontneed_mid_call(turns: int) -> None:
    m = MemoryModel()
    pid = await _big(m)
    task = asyncio.create_task(m.mprotect(pid, A + P, (PAGES - 2) * P, "r"))
    await _cancel_after(task, turns)
    clean(m)
    assert [v.prot for v in m.vmas(pid)] == ["rw", "r", "rw"]
    task = asyncio.create_task(m.madvise(pid, A, PAGES * P, "dontneed"))
    await _cancel_after(task, turns)
    clean(m)
    assert m.k.folios_live == 0 and not m.ledger[pid]


async def test_walk_during_a_move_finds_the_page() -> None:
    # A blocking rmap walk started while a long move runs: it sees each page at its old or new
    # address, never neither.
    m = MemoryModel()
    pid = await _big(m)
    task = asyncio.create_task(m.mremap(pid, A, PAGES * P, PAGES * P, maymove=True, fixed=C))
    walks = []
    for i in range(0, PAGES, 97):
        await asyncio.sleep(0)
        addr_old, addr_new = A + i * P, C + i * P
        at = addr_new if m.processes[pid].pte_lookup(addr_new) is not None else addr_old
        walks.append((await m.walk(pid, at, blocking=True)).referenced)
    await task
    assert all(r == 1 for r in walks)
    clean(m)
