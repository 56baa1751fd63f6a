"""vm.max_map_count: mm->map_count kept as the kernel keeps it, and checked on every path that
adds a VMA with 6.18's errno (ENOMEM), comparison and partial effects.

From the 6.18 sources: do_mmap refuses when map_count > the limit (so a process at the limit maps
one VMA more); split_vma (vma_modify: mprotect, madvise, UFFDIO_(UN)REGISTER) when map_count >= the
limit, each split on its own, after the merge that needs no split was tried; munmap only when it
cuts a hole strictly inside one VMA (vms_gather_munmap_vmas); mremap with a new address wants
map_count + 2 < limit - 3 before anything (check_mremap_params) and a move map_count < limit - 3
(move_vma); fork copies the count of the VMAs it copies and checks nothing.
"""

from __future__ import annotations

import errno
import time

import pytest

from mmsim.client import Client, ops
from mmsim.client.testing import serve_in_process
from mmsim.server.mm.model import PAGE_SIZE, MemoryModel, MmError

P = PAGE_SIZE
A = 0x10000000
B = 0x20000000
LIMIT = 12


def clean(m: MemoryModel) -> None:
    assert m.check_invariants() == []
    assert not m.detectors.counts, m.detectors.events


def count(m: MemoryModel, pid: int) -> int:
    mm = m.processes[pid]
    assert mm.map_count == len(m.vmas(pid))
    return mm.map_count


def snapshot(m: MemoryModel, pid: int) -> tuple[object, ...]:
    """Everything an ENOMEM must leave as it was: the VMAs, the counts, the budget."""
    return (m.vmas(pid), m.processes[pid].map_count, m.k.vmas_live, m.k.memcg.usage, dict(m.ledger[pid]))


async def errno_of(coro) -> int:
    with pytest.raises(MmError) as e:
        await coro
    assert e.value.errno is not None
    return e.value.errno


async def at_count(m: MemoryModel, n: int, base: int = B) -> int:
    """A process with ``n`` VMAs: n one-page mappings with a page of hole between each, the first
    one written (so that it has an anon_vma and a page)."""
    pid = await m.create_process()
    for i in range(n):
        await m.mmap(pid, P, addr=base + 2 * i * P)
    await m.write(pid, base, 7)
    assert count(m, pid) == n
    return pid


async def unchanged_enomem(m: MemoryModel, pid: int, coro, err: int = errno.ENOMEM) -> None:
    before = snapshot(m, pid)
    assert await errno_of(coro) == err
    assert snapshot(m, pid) == before
    clean(m)


# ---------------------------------------------------------------------------------------------
# Keeping the count


async def test_map_count_follows_splits_merges_munmap_mremap_and_fork() -> None:
    m = MemoryModel()
    assert m.k.sysctl_max_map_count == 65530
    pid = await m.create_process()
    assert count(m, pid) == 0
    await m.mmap(pid, 8 * P, addr=A)
    await m.write(pid, A, 1)
    assert count(m, pid) == 1
    await m.mprotect(pid, A + 2 * P, 2 * P, "r")  # two splits
    assert count(m, pid) == 3
    await m.mprotect(pid, A + 2 * P, 2 * P, "rw")  # two merges
    assert count(m, pid) == 1
    await m.mmap(pid, 2 * P, addr=A + 8 * P)  # merges with the VMA below
    assert count(m, pid) == 1
    await m.munmap(pid, A + 4 * P, P)  # a hole in the middle
    assert count(m, pid) == 2
    await m.madvise(pid, A + P, P, "dontfork")
    assert count(m, pid) == 4
    await m.uffd_register(pid, A + 6 * P, 2 * P)
    assert count(m, pid) == 6
    await m.uffd_unregister(pid, A + 6 * P, 2 * P)
    assert count(m, pid) == 4
    child = await m.fork(pid)
    assert count(m, child) == 3  # the VM_DONTCOPY VMA is not copied, nor counted
    await m.mremap(pid, A + 8 * P, 2 * P, 2 * P, maymove=True, fixed=B)  # moves the tail off
    assert count(m, pid) == 5
    await m.mremap(pid, B, 2 * P, 4 * P)  # grows in place
    assert count(m, pid) == 5
    await m.munmap(pid, A, 16 * P)
    assert count(m, pid) == 1
    clean(m)
    await m.exit(child)
    assert m.processes[pid].map_count == 1
    clean(m)


def test_max_map_count_is_validated() -> None:
    assert MemoryModel(max_map_count=5).k.sysctl_max_map_count == 5
    with pytest.raises(ValueError):
        MemoryModel(max_map_count=-1)


@pytest.mark.violations_expected
async def test_audit_sees_a_wrong_map_count() -> None:
    m = MemoryModel()
    pid = await at_count(m, 2)
    m.processes[pid].map_count += 1
    assert any("map_count 3 != 2 VMAs" in p for p in m.check_invariants())


# ---------------------------------------------------------------------------------------------
# Each path at the limit


async def test_mmap_may_pass_the_limit_by_one() -> None:
    # do_mmap: map_count > limit -> ENOMEM, before the address is placed or checked.
    m = MemoryModel(max_map_count=LIMIT)
    pid = await at_count(m, LIMIT)
    await m.mmap(pid, P, addr=A)  # map_count == limit: still allowed
    assert count(m, pid) == LIMIT + 1
    await unchanged_enomem(m, pid, m.mmap(pid, P, addr=A + 4 * P))
    await unchanged_enomem(m, pid, m.mmap(pid, P))  # placed top-down
    await unchanged_enomem(m, pid, m.mmap(pid, P, addr=A))  # ENOMEM before EEXIST
    await unchanged_enomem(m, pid, m.mmap(pid, P, addr=A + 1))  # and before EINVAL
    await unchanged_enomem(m, pid, m.mmap(pid, P, addr=A + 4 * P, uffd="missing"))
    # A mapping that merges into its neighbour is refused all the same: the check comes first.
    await unchanged_enomem(m, pid, m.mmap(pid, P, addr=A + P))
    await m.munmap(pid, A, P)
    await m.mmap(pid, P, addr=A + 4 * P)
    assert count(m, pid) == LIMIT + 1
    clean(m)


async def test_mprotect_split_at_the_limit() -> None:
    m = MemoryModel(max_map_count=LIMIT)
    pid = await at_count(m, LIMIT - 1)
    await m.mmap(pid, 4 * P, addr=A)
    await m.write(pid, A + P, 5)
    assert count(m, pid) == LIMIT
    await unchanged_enomem(m, pid, m.mprotect(pid, A + P, P, "r"))  # would make two VMAs more
    await unchanged_enomem(m, pid, m.mprotect(pid, A, P, "r"))  # one more
    await unchanged_enomem(m, pid, m.mprotect(pid, A + 3 * P, P, "none"))
    # No split: allowed at the limit.
    await m.mprotect(pid, A, 4 * P, "r")
    await m.mprotect(pid, B, P, "r")
    assert count(m, pid) == LIMIT
    assert await m.read(pid, A + P) == 5
    clean(m)


async def test_mprotect_second_split_fails_after_the_first() -> None:
    # vma_modify: split at start (checked), split at end (checked); the first split stays when
    # the second fails, the flags are not changed.
    m = MemoryModel(max_map_count=LIMIT)
    pid = await at_count(m, LIMIT - 2)
    await m.mmap(pid, 4 * P, addr=A)
    await m.write(pid, A + 2 * P, 9)
    assert count(m, pid) == LIMIT - 1
    assert await errno_of(m.mprotect(pid, A + P, 2 * P, "r")) == errno.ENOMEM
    assert count(m, pid) == LIMIT
    assert [(v.start, v.end, v.prot) for v in m.vmas(pid) if v.start >= A and v.end <= A + 4 * P] == [
        (A, A + P, "rw"), (A + P, A + 4 * P, "rw")
    ]
    await m.write(pid, A + 2 * P, 10)  # still writable
    assert await m.read(pid, A + 2 * P) == 10
    clean(m)


async def test_mprotect_that_merges_needs_no_room() -> None:
    # vma_merge_existing_range first: mprotect of the first page of a VMA to its lower
    # neighbour's protection moves the boundary, no split, so it succeeds at the limit.
    m = MemoryModel(max_map_count=LIMIT)
    pid = await at_count(m, LIMIT - 2)
    await m.mmap(pid, 2 * P, prot="r", addr=A)
    await m.mmap(pid, 2 * P, prot="rw", addr=A + 2 * P)
    assert count(m, pid) == LIMIT
    await m.mprotect(pid, A + 2 * P, P, "r")  # left merge
    await m.mprotect(pid, A + 2 * P, P, "rw")  # and the right merge back
    assert count(m, pid) == LIMIT
    assert [(v.start, v.end, v.prot) for v in m.vmas(pid)][:2] == [(A, A + 2 * P, "r"), (A + 2 * P, A + 4 * P, "rw")]
    # The same change in the middle of the rw VMA does need room.
    await m.mmap(pid, 4 * P, addr=A + 8 * P)
    await unchanged_enomem(m, pid, m.mprotect(pid, A + 9 * P, P, "r"))
    clean(m)


async def test_madvise_split_at_the_limit() -> None:
    # madvise_vma_behavior turns the split's ENOMEM into EAGAIN (checked on 6.18: MADV_DONTFORK
    # of one page in the middle of a VMA at the limit); a hole stays ENOMEM.
    m = MemoryModel(max_map_count=LIMIT)
    pid = await at_count(m, LIMIT - 1)
    await m.mmap(pid, 4 * P, addr=A)
    await unchanged_enomem(m, pid, m.madvise(pid, A + P, P, "dontfork"), errno.EAGAIN)
    await unchanged_enomem(m, pid, m.madvise(pid, A + 3 * P, P, "wipeonfork"), errno.EAGAIN)
    await unchanged_enomem(m, pid, m.madvise(pid, A + 4 * P, P, "dontfork"))  # a hole
    await m.madvise(pid, A, 4 * P, "dontfork")  # the whole VMA: no split
    await m.madvise(pid, A + P, P, "dontneed")  # zaps, never splits
    assert count(m, pid) == LIMIT
    clean(m)


async def test_uffd_register_and_unregister_split_at_the_limit() -> None:
    m = MemoryModel(max_map_count=LIMIT)
    pid = await at_count(m, LIMIT - 1)
    await m.mmap(pid, 4 * P, addr=A)
    await unchanged_enomem(m, pid, m.uffd_register(pid, A + P, 2 * P))
    await unchanged_enomem(m, pid, m.uffd_register(pid, A, P, mode="wp"))
    await m.uffd_register(pid, A, 4 * P)  # the whole VMA: no split
    await unchanged_enomem(m, pid, m.uffd_unregister(pid, A + P, P))
    await m.uffd_unregister(pid, A, 4 * P)
    assert count(m, pid) == LIMIT
    clean(m)


async def test_mmap_with_uffd_undone_at_the_limit() -> None:
    # mmap(uffd=...) maps, then registers; when the registration's split is refused the mapping
    # is undone, and the merge it made with its neighbour too.
    m = MemoryModel(max_map_count=LIMIT)
    pid = await at_count(m, LIMIT - 1)
    await m.mmap(pid, 2 * P, addr=A)
    before = snapshot(m, pid)
    assert await errno_of(m.mmap(pid, 2 * P, addr=A + 2 * P, uffd="missing")) == errno.ENOMEM
    assert snapshot(m, pid)[1:] == before[1:]
    assert [(v.start, v.end) for v in m.vmas(pid)][:2] == [(A, A + 2 * P), (B, B + P)]
    clean(m)


async def test_munmap_middle_at_the_limit() -> None:
    # vms_gather_munmap_vmas: a hole strictly inside one VMA needs room for one more; any other
    # munmap may pass the limit for the moment.
    m = MemoryModel(max_map_count=LIMIT)
    pid = await at_count(m, LIMIT - 2)
    await m.mmap(pid, 4 * P, addr=A)
    await m.mmap(pid, 4 * P, prot="r", addr=A + 4 * P)
    await m.write(pid, A + P, 3)
    assert count(m, pid) == LIMIT
    await unchanged_enomem(m, pid, m.munmap(pid, A + P, P))
    await unchanged_enomem(m, pid, m.munmap(pid, A + 5 * P, 2 * P))
    await m.munmap(pid, A + 3 * P, 2 * P)  # across the boundary: two splits, two removals
    assert count(m, pid) == LIMIT
    await m.munmap(pid, A + 2 * P, P)  # the end of a VMA
    await m.munmap(pid, A + 5 * P, P)  # the start of one
    assert count(m, pid) == LIMIT
    assert await m.read(pid, A + P) == 3
    clean(m)


async def test_mremap_at_the_limit() -> None:
    # 6.18: with MREMAP_FIXED or MREMAP_DONTUNMAP, ENOMEM unless map_count + 2 < limit - 3, before
    # anything; any move (move_vma) ENOMEM unless map_count < limit - 3; shrinking and growing
    # in place add no VMA and are not checked.
    m = MemoryModel(max_map_count=LIMIT)
    pid = await at_count(m, LIMIT - 5)
    await m.mmap(pid, 4 * P, addr=A)
    await m.write(pid, A, 11)
    assert count(m, pid) == LIMIT - 4
    await unchanged_enomem(m, pid, m.mremap(pid, A, 4 * P, 4 * P, maymove=True, fixed=A + 64 * P))
    await unchanged_enomem(m, pid, m.mremap(pid, A, 4 * P, 4 * P, maymove=True, dontunmap=True))
    # Growing the first half cannot happen in place: a move, allowed as map_count < limit - 3.
    moved = await m.mremap(pid, A, 2 * P, 8 * P, maymove=True)
    assert moved.start != A and await m.read(pid, moved.start) == 11
    assert count(m, pid) == LIMIT - 3
    await unchanged_enomem(m, pid, m.mremap(pid, A + 2 * P, P, 2 * P, maymove=True))
    await m.mremap(pid, moved.start, 8 * P, 4 * P)  # shrink
    await m.mremap(pid, moved.start, 4 * P, 6 * P)  # grow in place
    assert count(m, pid) == LIMIT - 3
    # Two VMAs fewer, and the FIXED move fits: map_count + 2 < limit - 3.
    await m.munmap(pid, A + 2 * P, 2 * P)
    await m.munmap(pid, B, P)
    assert count(m, pid) == LIMIT - 5
    await unchanged_enomem(m, pid, m.mremap(pid, moved.start, P, P, maymove=True, fixed=A + 64 * P))
    await m.munmap(pid, B + 2 * P, P)
    await m.mremap(pid, moved.start, P, P, maymove=True, fixed=A + 64 * P)
    assert await m.read(pid, A + 64 * P) == 11
    clean(m)


async def test_fork_copies_the_count_and_checks_nothing() -> None:
    m = MemoryModel(max_map_count=LIMIT)
    pid = await at_count(m, LIMIT)
    await m.mmap(pid, P, addr=A)  # one past the limit, as mmap allows
    child = await m.fork(pid)
    assert count(m, child) == LIMIT + 1
    await unchanged_enomem(m, child, m.mmap(child, P, addr=A + 2 * P))
    await m.exit(child)
    clean(m)


# ---------------------------------------------------------------------------------------------
# The default limit, reached with mprotect


async def test_mprotect_reaches_the_default_limit() -> None:
    # The report: alternating page protections over one big mapping. 32,764 mprotects of one
    # page in the middle of the rest each make two VMAs more (65,529), the last page one more.
    m = MemoryModel()
    limit = m.k.sysctl_max_map_count
    assert limit == 65530
    pid = await m.create_process()
    pages = limit + 2
    await m.mmap(pid, pages * P, addr=A)
    await m.write(pid, A, 1)
    t0 = time.perf_counter()
    for i in range(1, limit - 1, 2):
        await m.mprotect(pid, A + i * P, P, "r")
    assert count(m, pid) == limit - 1
    await m.mprotect(pid, A + (pages - 1) * P, P, "r")
    elapsed = time.perf_counter() - t0
    assert count(m, pid) == limit
    assert elapsed < 30, f"{elapsed:.1f} s to split {limit} VMAs"
    await unchanged_enomem(m, pid, m.mprotect(pid, A + (pages - 3) * P, P, "none"))  # the rw tail
    await unchanged_enomem(m, pid, m.madvise(pid, A + (pages - 3) * P, P, "dontfork"), errno.EAGAIN)
    await unchanged_enomem(m, pid, m.munmap(pid, A + (pages - 3) * P, P))
    await unchanged_enomem(m, pid, m.uffd_register(pid, A + (pages - 3) * P, P))
    await m.mmap(pid, P, addr=B)  # mmap allows one more
    assert count(m, pid) == limit + 1
    await unchanged_enomem(m, pid, m.mmap(pid, P, addr=B + 2 * P))


async def test_enomem_at_the_limit_through_grpc() -> None:
    # The same over the wire, at the server's default limit: ENOMEM is RESOURCE_EXHAUSTED with the
    # errno, an OSError with errno ENOMEM in the SDK.
    async with serve_in_process(log_level="warning") as addr:
        async with Client(addr) as mm:
            p = await mm.create_process()
            limit = 65530
            pages = limit + 2
            await p.mmap(pages * P, prot="rw", addr=A)
            splits = [ops.mprotect(p, A + i * P, P, "r") for i in range(1, limit - 1, 2)]
            splits.append(ops.mprotect(p, A + (pages - 1) * P, P, "r"))
            for i in range(0, len(splits), 10_000):
                results = await mm.batch(splits[i : i + 10_000], stop_on_error=True)
                assert not any(isinstance(r, BaseException) for r in results)
            with pytest.raises(OSError) as e:
                await p.mprotect(A + (pages - 3) * P, P, "none")
            assert e.value.errno == errno.ENOMEM
            assert e.value.code.name == "RESOURCE_EXHAUSTED"  # type: ignore[attr-defined]
            assert await mm.check_invariants() == []
