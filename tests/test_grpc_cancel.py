"""Client cancellation and deadlines through gRPC: nothing left locked, the model consistent."""

import asyncio

import grpc
import pytest

from mmsim.server.mm.locks import Current
from mmsim.v1 import mmsim_pb2 as pb

P = 4096


async def _setup(stub, pages: int):
    p = (await stub.CreateProcess(pb.CreateProcessRequest())).handle
    src = await stub.Mmap(pb.MmapRequest(process=p, length=pages * P, prot=pb.PROT_RW, addr=0x100000000))
    dst = await stub.Mmap(
        pb.MmapRequest(process=p, length=pages * P, prot=pb.PROT_RW, addr=0x200000000, uffd=pb.UFFD_MODE_MISSING)
    )
    return p, src.start, dst.start


async def test_cancel_a_blocking_walk(server, stub) -> None:
    p, src, _ = await _setup(stub, 1)
    await stub.Write(pb.WriteRequest(process=p, addr=src, value=5))
    model = server.model
    pid = int(p.split(".")[2])  # <shard>.<generation>.<pid>.<token>
    folio = model.processes[pid].pte_lookup(src).folio
    av = folio.mapping
    refcount = av.refcount
    holder = Current("holder")
    assert av.root.rwsem.down_write(holder)  # a mover holding the root
    call = stub.Walk(pb.WalkRequest(process=p, addr=src, blocking=True))
    while not av.root.rwsem.waiters:  # the walk is asleep on the root rwsem
        await asyncio.sleep(0)
    assert av.refcount == refcount + 1  # the slow path pinned the anon_vma
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    while av.root.rwsem.waiters:  # the server side saw the cancellation and left the queue
        await asyncio.sleep(0)
    av.root.rwsem.up_write(holder)
    assert av.refcount == refcount
    assert list((await stub.CheckInvariants(pb.CheckInvariantsRequest())).problems) == []
    w = await stub.Walk(pb.WalkRequest(process=p, addr=src, blocking=True))
    assert len(w.mappings) == 1


async def test_cancel_a_large_move(server, stub) -> None:
    pages = 4096  # 16 MiB, eight PMD-sized steps
    p, src, dst = await _setup(stub, pages)
    ops = [pb.Op(write=pb.WriteRequest(process=p, addr=src + i * P, value=i + 1)) for i in range(pages)]
    assert not any(r.HasField("error") for r in (await stub.Batch(pb.BatchRequest(ops=ops))).results)
    bp = server.model.k.sched.pause_at("move:between-pages")
    call = stub.Remap(pb.RemapRequest(process=p, dst=dst, src=src, len=pages * P))
    await bp.wait_reached()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.wait_for(bp.wait_abandoned(), 30)  # the cancel has reached the server's task
    bp.release()
    for _ in range(100):  # let the server task unwind
        await asyncio.sleep(0)
    assert list((await stub.CheckInvariants(pb.CheckInvariantsRequest())).problems) == []
    # A prefix moved (one step of 512 pages), the rest stayed: move the remainder and check all.
    present = [(await stub.GetFolio(pb.AccessRequest(process=p, addr=dst + i * P))).present for i in range(pages)]
    first_left = present.index(False)
    assert 0 < first_left < pages and not any(present[first_left:])
    r = await stub.Remap(pb.RemapRequest(process=p, dst=dst + first_left * P, src=src + first_left * P,
                                         len=(pages - first_left) * P))
    assert r.moved == (pages - first_left) * P
    for i in (0, first_left - 1, first_left, pages - 1):
        f = await stub.GetFolio(pb.AccessRequest(process=p, addr=dst + i * P))
        assert f.present and f.value == i + 1
    assert list((await stub.CheckInvariants(pb.CheckInvariantsRequest())).problems) == []


async def test_deadline_exceeded(server, stub) -> None:
    p, src, _ = await _setup(stub, 1)
    await stub.Write(pb.WriteRequest(process=p, addr=src, value=5))
    model = server.model
    pid = int(p.split(".")[2])  # <shard>.<generation>.<pid>.<token>
    av = model.processes[pid].pte_lookup(src).folio.mapping
    holder = Current("holder")
    assert av.root.rwsem.down_write(holder)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Walk(pb.WalkRequest(process=p, addr=src, blocking=True), timeout=0.2)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        while av.root.rwsem.waiters:
            await asyncio.sleep(0)
    finally:
        av.root.rwsem.up_write(holder)
    assert list((await stub.CheckInvariants(pb.CheckInvariantsRequest())).problems) == []


async def test_cancel_a_pageout_asleep_on_the_root(server, stub) -> None:
    """MADV_PAGEOUT whose unmap (try_to_unmap's rmap walk) sleeps on an anon_vma root another task
    holds, cancelled by its client: it runs to its end once the root is free, and the model is
    consistent with every page holding its value. A Reclaim meanwhile keeps the folios (its
    references walk only tries the root)."""
    p, src, _ = await _setup(stub, 8)
    for i in range(8):
        await stub.Write(pb.WriteRequest(process=p, addr=src + i * P, value=i + 1))
    model = server.model
    pid = int(p.split(".")[2])  # <shard>.<generation>.<pid>.<token>
    av = model.processes[pid].pte_lookup(src).folio.mapping
    holder = Current("holder")
    assert av.root.rwsem.down_write(holder)  # a mover holding the root
    pageout = stub.Madvise(pb.MadviseRequest(process=p, addr=src, length=4 * P, advice=pb.ADVICE_PAGEOUT))
    while not av.root.rwsem.waiters:  # asleep in try_to_unmap
        await asyncio.sleep(0)
    pageout.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pageout
    # Reclaim meanwhile: its references walk trylocks the held root (contended: the folios are kept).
    assert (await stub.Reclaim(pb.ReclaimRequest(pages=8))).reclaimed == 0
    av.root.rwsem.up_write(holder)
    while av.root.rwsem.waiters or av.root.rwsem.is_locked():  # the server's tasks finish their work
        await asyncio.sleep(0)
    for _ in range(100):
        await asyncio.sleep(0)
    assert list((await stub.CheckInvariants(pb.CheckInvariantsRequest())).problems) == []
    swapped = [e.swap for e in (await stub.Pagemap(pb.RangeRequest(process=p, addr=src, length=8 * P))).entries]
    assert swapped[:4] == [True] * 4  # the pageout finished after its caller left
    for i in range(8):
        assert (await stub.Read(pb.AccessRequest(process=p, addr=src + i * P))).value == i + 1
    assert list((await stub.CheckInvariants(pb.CheckInvariantsRequest())).problems) == []
