"""What a client can leave pending is charged to --max-memory, and the server's RSS stays within
the documented bound (docs/server.md, "Memory"): the budget, plus what the server held before the
first call, plus a constant slack.

The attacks: Batches carrying a UffdCopy of 4M packed values (4 MB on the wire, 32 MB decoded)
next to a read that sleeps on a userfault, and thousands of reads asleep on userfaults.
Each runs against its own ``mmsim serve`` process, whose RSS is read from /proc.
"""

from __future__ import annotations

import asyncio
import errno
import os

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from servers import ServerProcess, mmsim_serve

from mmsim.client import Client
from mmsim.server.admission import CALL_BYTES, RESERVED_NOFAIL_BYTES
from mmsim.server.mm.memcontrol import INFLIGHT_SHARE
from mmsim.server.mm.mm_types import PAGE_SIZE as P
from mmsim.v1 import mmsim_pb2 as pb
from mmsim.v1 import mmsim_pb2_grpc

BUDGET = 64 << 20
#: What the reserved calls (admission.RESERVED) may be charged past the budget: --reserved-rpcs
#: (64 by default) calls of at most RESERVED_NOFAIL_BYTES.
OVERDRAFT = 64 * RESERVED_NOFAIL_BYTES
#: What RSS may pass the baseline and the budget by (docs/server.md "Memory"): the allocator's free
#: lists, gRPC's buffers for the messages being received, the audit's working set.
SLACK = 48 << 20

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")


def packed_values_batch(handle: str, addr: int, values: int) -> pb.BatchRequest:
    """A Batch: a UffdCopy of ``values`` one-byte values, then a read that sleeps on a userfault."""
    copy = pb.UffdCopyRequest(process=handle, dst=addr, len=P, values=[1] * values)
    return pb.BatchRequest(ops=[pb.Op(uffd_copy=copy), pb.Op(read=pb.AccessRequest(process=handle, addr=addr + P))])


def limit_of(e: grpc.aio.AioRpcError) -> str | None:
    # The stub asks for a grpc.Call; from_call reads only code(), details() and trailing_metadata(),
    # which an AioRpcError has.
    status = rpc_status.from_call(e)  # type: ignore[arg-type]
    for d in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if d.Unpack(info):
            return info.metadata.get("limit") or info.reason
    return None


async def warm(server: ServerProcess) -> int:
    """Run each path once, then the server's RSS: the baseline."""
    async with Client(server.addr) as mm:
        p = await mm.create_process()
        v = await p.mmap(4 * P, uffd="missing")
        reader = asyncio.create_task(p.read(v.start, timeout=30))
        while not (await p.list_userfaults()).waiting:
            await asyncio.sleep(0.01)
        await p.uffd_copy(v.start, P, [1])
        await reader
        await p.exit()
        await mm.check_invariants()
    return server.status("VmRSS")


@pytest.mark.parametrize(("max_request", "budget"), [("16M", BUDGET), ("64M", 3 * BUDGET)])
async def test_packed_values_attack_stays_within_the_bound(max_request: str, budget: int) -> None:
    """20 such Batches at once: under the default --max-request-bytes each is refused from its
    wire bytes before decoding; with a limit that lets them through, each is charged what it
    holds decoded, and those past the budget's share for calls in progress get ENOMEM. Either way
    the RSS bound holds and the server still answers."""
    values = 4_000_000
    with mmsim_serve("--max-memory", str(budget), "--max-request-bytes", max_request) as server:
        baseline = await warm(server)
        async with grpc.aio.insecure_channel(server.addr, options=[("grpc.max_send_message_length", 8 << 20)]) as ch:
            stub = mmsim_pb2_grpc.MemoryManagerStub(ch)
            p = await stub.CreateProcess(pb.CreateProcessRequest())
            v = await stub.Mmap(pb.MmapRequest(process=p.handle, length=2 * P, prot=pb.PROT_RW,
                                               uffd=pb.UFFD_MODE_MISSING))
            request = packed_values_batch(p.handle, v.start, values)
            assert request.ByteSize() > 4_000_000
            calls = [stub.Batch(request, timeout=60) for _ in range(20)]
            refused: list[str | None] = []
            pending = []
            for call in calls:
                try:
                    await asyncio.wait_for(asyncio.shield(call), 2.0 if max_request == "64M" else 30.0)
                    raise AssertionError("a Batch with an oversize copy came back OK")
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                    refused.append(limit_of(e))
                except TimeoutError:
                    pending.append(call)  # admitted: its read sleeps on the userfault
            peak = server.status("VmHWM")
            stats = (await stub.GetStats(pb.Empty())).counters
            if max_request == "16M":
                assert refused == ["max_request_bytes"] * 20 and not pending
            else:
                assert pending and refused and set(refused) == {"ENOMEM"}, (len(pending), refused)
                assert stats["memory_inflight_bytes"] >= len(pending) * (8 * values + CALL_BYTES)
            assert stats["memory_bytes"] + stats["memory_inflight_bytes"] <= budget + OVERDRAFT
            await stub.Ping(pb.Empty(), timeout=5)
            for call in pending:
                call.cancel()
            # While they arrive, gRPC holds each one's wire bytes until it is decoded and charged or
            # refused (docs/server.md "Memory": the messages being received).
            assert peak <= baseline + budget + SLACK + len(calls) * request.ByteSize(), (peak - baseline) >> 20
            async with Client(server.addr) as mm:
                assert await mm.check_invariants() == []


async def test_thousands_of_pending_faults_are_charged_and_bounded() -> None:
    """4,000 reads that would sleep on userfaults: each is charged what a call in progress costs;
    past the budget the rest get ENOMEM, and the RSS bound holds."""
    n = 4000
    with mmsim_serve("--max-memory", str(BUDGET), "--max-pending-faults", str(n),
                     "--max-pending-faults-per-process", str(n)) as server:
        baseline = await warm(server)
        async with Client(server.addr) as mm:
            p = await mm.create_process()
            v = await p.mmap(n * P, uffd="missing")
            reads = [asyncio.create_task(p.read(v.start + i * P, timeout=120)) for i in range(n)]
            done, _ = await asyncio.wait(reads, timeout=60, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t.exception() for t in done]
            assert failed and all(isinstance(e, OSError) and e.errno == errno.ENOMEM for e in failed), failed[:3]

            async def settled() -> bool:  # GetStats and ListUserfaults are reserved: admitted past the budget
                return (await mm.stats())["uffd_faults_asleep"] + sum(t.done() for t in reads) >= n

            while not await settled():
                await asyncio.sleep(0.05)
            asleep = len((await p.list_userfaults()).waiting)
            assert 0 < asleep < n
            assert asleep * CALL_BYTES <= BUDGET * INFLIGHT_SHARE  # room left for what resolves them
            stats = await mm.stats()
            assert stats["memory_bytes"] + stats["memory_inflight_bytes"] <= BUDGET + OVERDRAFT
            peak = server.status("VmHWM")
            assert peak <= baseline + BUDGET + SLACK, (peak - baseline) >> 20
            await mm.ping()
            await p.uffd_zeropage(v.start, n * P)
            results = await asyncio.gather(*reads, return_exceptions=True)
            assert sum(r == 0 for r in results) == asleep
            assert await mm.check_invariants() == []
