"""Admission control (server/admission.py, docs/server.md "Admission and pending work"): calls asleep
on a userfault or waiting for userfault events hold no run slot, the reserve admits the calls that
resolve them when the run slots are full, what sleeps is bounded per process and in all, and the
audit is throttled.

Each test runs against its own ``mmsim serve`` process with small limits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servers import mmsim_serve

from mmsim.client import Client, LimitExceededError, Process, ops
from mmsim.server.mm.mm_types import PAGE_SIZE as P
from mmsim.server.mm.model import MemoryModel
from mmsim.v1 import mmsim_pb2 as pb
from mmsim.v1 import mmsim_pb2_grpc

RUN_SLOTS = 8
RESERVE = 8


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30.0) -> None:
    """Poll ``check`` until it holds, or fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not await check():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def block_faults(p: Process, start: int, n: int) -> list[asyncio.Task[int]]:
    """``n`` reads asleep on userfaults at ``start``, ``start`` + 4096, ...: returned once all sleep."""
    tasks = [asyncio.create_task(p.read(start + i * P, timeout=60)) for i in range(n)]

    async def asleep() -> bool:
        return len((await p.list_userfaults()).waiting) >= n

    await until(asleep, f"{n} faults asleep")
    return tasks


async def health(addr: str) -> int:
    async with grpc.aio.insecure_channel(addr) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)  # type: ignore[attr-defined]  # the stubs' HealthStub has no methods
        return int(reply.status)


async def test_faults_asleep_hold_no_run_slot_and_the_handler_resolves_them() -> None:
    """More faults asleep than there are run slots: everyone else's calls are still admitted,
    and one UFFDIO_ZEROPAGE wakes them all."""
    with mmsim_serve("--max-concurrent-rpcs", str(RUN_SLOTS), "--reserved-rpcs", str(RESERVE)) as server:
        async with Client(server.addr) as mm:
            p = await mm.create_process()
            n = 4 * (RUN_SLOTS + RESERVE)
            dst = await p.mmap(n * P, uffd="missing")
            faults = await block_faults(p, dst.start, n)
            other = await mm.create_process()  # not a reserved call: a run slot is free
            v = await other.mmap(P)
            await other.write(v.start, 7)
            assert await other.read(v.start) == 7
            await mm.ping()
            assert await health(server.addr) == health_pb2.HealthCheckResponse.SERVING
            assert await mm.check_invariants() == []
            assert await p.uffd_zeropage(dst.start, n * P) == n * P
            assert await asyncio.gather(*faults) == [0] * n
            assert await mm.check_invariants() == []


async def open_streams(mm: Client, p: Process, n: int) -> list[Any]:
    """``n`` BatchStreams that each ran one batch and stay open: each holds a run slot."""
    streams = []
    for _ in range(n):
        s = mm.batch_stream(via=p)
        await s.__aenter__()
        await s.run([ops.read(p, 0)])  # EFAULT, as an operation result: the stream is now admitted
        streams.append(s)
    return streams


async def test_the_reserve_admits_the_calls_that_resolve_pending_work() -> None:
    """With every run slot taken, a plain call is refused (RESOURCE_EXHAUSTED, max_concurrent_rpcs)
    while health checks, Ping and the calls that resolve faults or free memory are admitted."""
    with mmsim_serve("--max-concurrent-rpcs", str(RUN_SLOTS), "--reserved-rpcs", str(RESERVE)) as server:
        async with Client(server.addr) as mm:
            p = await mm.create_process()
            dst = await p.mmap(4 * P, uffd="missing")
            src = await p.mmap(P)
            await p.write(src.start, 5)
            faults = await block_faults(p, dst.start, 2)
            streams = await open_streams(mm, p, RUN_SLOTS)
            try:
                with pytest.raises(LimitExceededError) as refused:
                    await p.mmap(P)
                assert refused.value.limit == "max_concurrent_rpcs"
                await mm.ping()
                assert await health(server.addr) == health_pb2.HealthCheckResponse.SERVING
                assert await p.uffd_zeropage(dst.start, P) == P
                assert await p.remap(dst.start + P, src.start, P) == P
                await p.uffd_wake(dst.start, 4 * P)
                assert await asyncio.gather(*faults) == [0, 5]
                await p.munmap(dst.start + 2 * P, 2 * P)
            finally:
                for s in streams:
                    await s.__aexit__(None, None, None)
            v = await p.mmap(P)  # the run slots are free again
            assert v.start
            assert await mm.check_invariants() == []


async def test_pending_faults_are_bounded_per_process_and_in_all() -> None:
    with mmsim_serve("--max-pending-faults", "6", "--max-pending-faults-per-process", "4") as server:
        async with Client(server.addr) as mm:
            a, b = await mm.create_process(), await mm.create_process()
            va = await a.mmap(8 * P, uffd="missing")
            vb = await b.mmap(8 * P, uffd="missing")
            fa = await block_faults(a, va.start, 4)
            with pytest.raises(LimitExceededError) as per_process:
                await a.read(va.start + 4 * P)
            assert per_process.value.limit == "max_pending_faults_per_process"
            fb = await block_faults(b, vb.start, 2)
            with pytest.raises(LimitExceededError) as in_all:
                await b.read(vb.start + 2 * P)
            assert in_all.value.limit == "max_pending_faults"
            assert len((await a.list_userfaults()).waiting) == 4  # the refused access left nothing behind
            assert await a.uffd_zeropage(va.start, 4 * P) == 4 * P
            assert await asyncio.gather(*fa) == [0] * 4
            fb += await block_faults(b, vb.start + 2 * P, 2)  # room again: 4 in b
            assert await b.uffd_zeropage(vb.start, 4 * P) == 4 * P
            assert await asyncio.gather(*fb) == [0] * 4
            assert await mm.check_invariants() == []


async def test_userfault_streams_are_bounded_per_process() -> None:
    with mmsim_serve("--max-userfault-streams", "2") as server:
        async with grpc.aio.insecure_channel(server.addr) as ch:
            stub = mmsim_pb2_grpc.MemoryManagerStub(ch)
            p = await stub.CreateProcess(pb.CreateProcessRequest())
            await stub.Mmap(pb.MmapRequest(process=p.handle, length=P, prot=pb.PROT_RW, uffd=pb.UFFD_MODE_MISSING))

            async def listening(n: int) -> bool:
                listeners = await stub.GetStats(pb.Empty())
                return listeners.counters.get("uffd_readers", 0) == n

            first = stub.Userfaults(pb.UserfaultsRequest(process=p.handle))
            second = stub.Userfaults(pb.UserfaultsRequest(process=p.handle))
            await until(lambda: listening(2), "two listeners")
            third = stub.Userfaults(pb.UserfaultsRequest(process=p.handle))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await third.read()
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_userfault_streams" in (refused.value.details() or "") + str(refused.value.trailing_metadata())
            first.cancel()
            await until(lambda: listening(1), "the cancelled listener gone")
            fourth = stub.Userfaults(pb.UserfaultsRequest(process=p.handle))
            await until(lambda: listening(2), "a new listener admitted")
            second.cancel()
            fourth.cancel()


async def test_concurrent_audits_share_one_run_and_a_loop_of_audits_is_throttled() -> None:
    m = MemoryModel(audit_share=0.25)
    pid = await m.create_process()
    await m.mmap(pid, 64 * P)
    results = await asyncio.gather(*(m.audit() for _ in range(20)))
    assert results == [[]] * 20
    assert m.stats()["audits"] <= 2  # the first, and one for every call that came while it ran
    await m.audit()
    allowed = m.audit_next
    assert allowed > asyncio.get_running_loop().time()  # the next audit may not start at once
    ran = m.stats()["audits"]
    assert await m.audit() == []
    assert m.stats()["audits"] == ran + 1
    assert m.audit_started >= allowed  # it started no sooner than the throttle allowed
