"""Server limits: past each one the answer is RESOURCE_EXHAUSTED or INVALID_ARGUMENT, and long
operations do not starve other calls."""

import asyncio

import grpc
import pytest

from mmsim.client import Client, LimitExceededError, ops
from mmsim.client.testing import serve_in_process

P = 4096


async def test_max_pages() -> None:
    async with serve_in_process(log_level="warning", max_pages=4) as addr:
        async with Client(addr) as mm:
            p = await mm.create_process()
            v = await p.mmap(8 * P)
            for i in range(4):
                await p.write(v.start + i * P, i)
            with pytest.raises(LimitExceededError) as e:
                await p.write(v.start + 4 * P, 4)
            assert e.value.limit == "max_pages"
            await p.write(v.start, 99)  # an existing page is still writable
            await p.munmap(v.start, P)
            await p.write(v.start + 4 * P, 4)  # room again
            assert await mm.check_invariants() == []


async def test_max_munmap_and_batch_ops() -> None:
    async with serve_in_process(log_level="warning", max_munmap_bytes=4 * P, max_batch_ops=3) as addr:
        async with Client(addr) as mm:
            p = await mm.create_process()
            v = await p.mmap(8 * P)
            # Every configured limit answers RESOURCE_EXHAUSTED, naming the limit.
            with pytest.raises(LimitExceededError) as e:
                await p.munmap(v.start, 8 * P)
            assert e.value.limit == "max_munmap_bytes" and e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            with pytest.raises(LimitExceededError) as e:
                await mm.batch([ops.read(p, v.start)] * 4)
            assert e.value.limit == "max_batch_ops" and e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert len(await mm.batch([ops.read(p, v.start)] * 3)) == 3
            assert len(await p.vmas()) == 1  # nothing was unmapped


async def test_message_size_limit() -> None:
    async with serve_in_process(log_level="warning", max_message_bytes=64 * 1024) as addr:
        async with Client(addr) as mm:
            p = await mm.create_process()
            v = await p.mmap(P)
            with pytest.raises(LimitExceededError):
                await mm.batch([ops.write(p, v.start, i) for i in range(10_000)])  # ~300 KB request
            await p.write(v.start, 1)
            assert await mm.check_invariants() == []


async def test_max_concurrent_rpcs() -> None:
    async with serve_in_process(log_level="warning", max_concurrent_rpcs=2) as addr:
        async with Client(addr, retries=0) as mm:
            p = await mm.create_process()
            v = await p.mmap(64 * P)
            big = [ops.write(p, v.start + (i % 64) * P, i) for i in range(5000)]
            calls = [asyncio.ensure_future(mm.batch(big)) for _ in range(8)]
            results = await asyncio.gather(*calls, return_exceptions=True)
            refused = [r for r in results if isinstance(r, BaseException)]
            assert refused and all(isinstance(r, LimitExceededError) for r in refused)
            assert any(not isinstance(r, BaseException) for r in results)
            assert await mm.check_invariants() == []


async def test_a_long_move_does_not_starve_other_calls() -> None:
    pages = 16384  # 64 MiB moved in one call
    async with serve_in_process(log_level="warning") as addr:
        async with Client(addr) as mm:
            p = await mm.create_process()
            src = await p.mmap(pages * P)
            dst = await p.mmap(pages * P, uffd="missing")
            for chunk in range(0, pages, 4096):
                await mm.batch([ops.write(p, src.start + i * P, i) for i in range(chunk, chunk + 4096)])
            other = await mm.create_process()
            move = asyncio.ensure_future(p.remap(dst.start, src.start, pages * P))
            # Each ping is answered while the move is still running: the move yields between chunks.
            answered_during = 0
            while not move.done():
                await other.vmas()
                answered_during += not move.done()
            assert await move == pages * P
            assert answered_during >= 2
            assert (await p.folio(dst.start + (pages - 1) * P)).value == pages - 1  # type: ignore[union-attr]


async def test_a_tree_dump_past_the_message_limit_is_resource_exhausted() -> None:
    for limit, fits in ((16 * 1024, False), (64 * 1024, True)):
        async with serve_in_process(log_level="warning", max_message_bytes=limit) as addr:
            async with Client(addr) as mm:
                p = await mm.create_process()
                v = await p.mmap(P)
                await p.write(v.start, 1)
                cur = p
                for _ in range(60):  # 1,891 entries: about 24 KB on the wire
                    cur = await cur.fork()
                if fits:
                    tree = await cur.anon_vma_tree()
                    assert sum(len(a.vmas) for a in tree) == 61 * 62 // 2
                else:
                    with pytest.raises(LimitExceededError) as e:
                        await cur.anon_vma_tree()
                    assert e.value.limit == "max_message_bytes"
                    assert len(await p.vmas()) == 1  # still serving
