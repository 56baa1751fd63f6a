"""Swap through the service and the SDK: Pagemap (one entry per page, its bound, its errors), Reclaim
(unary and batched), madvise pageout and cold, the swap counters and gauges of GetStats and of the
Prometheus collector, and ``--swap-bytes`` reaching the model."""

from __future__ import annotations

import dataclasses
import errno

import grpc
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mmsim.client import Client, InvalidRequestError, LimitExceededError, PagemapEntry, ProcessNotFoundError, ops
from mmsim.client.testing import serve_in_process
from mmsim.server.metrics import Metrics
from mmsim.server.mm.model import MemoryModel
from mmsim.server.service import PAGEMAP_ENTRY_BYTES, RESPONSE_SLACK
from mmsim.v1 import mmsim_pb2 as pb

P = 4096
A = 0x100000000
#: The fields of a pagemap entry, named as /proc/PID/pagemap, /proc/kpageflags and mincore report them.
FIELDS = ("present", "swap", "exclusive", "uffd_wp", "soft_dirty", "swapcache", "pmd", "thp", "head", "tail",
          "zero_page", "ksm", "anon_exclusive", "mapcount")


@pytest.fixture
async def mm():
    async with serve_in_process(log_level="warning") as addr:
        async with Client(addr) as client:
            yield client


def flags(e: PagemapEntry) -> dict[str, object]:
    """The entry's fields but soft_dirty (which the model sets with the dirty bit)."""
    return {k: v for k, v in dataclasses.asdict(e).items() if k != "soft_dirty" and v}


async def reclaim_all(mm: Client, pages: int) -> int:
    """Reclaim until ``pages`` folios were freed (a page reclaimed dirty takes two passes): the calls made."""
    freed = calls = 0
    while freed < pages:
        assert calls < 8, f"only {freed} of {pages} folios freed in {calls} reclaims"
        freed += await mm.reclaim(pages)
        calls += 1
    return calls


def test_the_entry_has_exactly_the_fields_of_the_proto_and_a_short_repr() -> None:
    assert tuple(f.name for f in dataclasses.fields(PagemapEntry)) == FIELDS
    assert tuple(f.name for f in pb.PagemapEntry.DESCRIPTOR.fields) == FIELDS
    assert repr(PagemapEntry()) == "PagemapEntry()"
    e = PagemapEntry(swap=True, swapcache=True)
    assert repr(e) == "PagemapEntry(swap=True, swapcache=True)"
    assert e == PagemapEntry(swap=True, swapcache=True) and hash(e) == hash(PagemapEntry(swap=True, swapcache=True))
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.swap = False  # type: ignore[misc]


async def test_pagemap_after_write_zero_page_pageout_and_fork(mm: Client) -> None:
    p = await mm.create_process()
    await p.mmap(4 * P, addr=A)
    await p.write(A, 11)
    assert await p.read(A + P) == 0  # the zero page
    first = await p.pagemap(A, 4 * P)
    assert [flags(e) for e in first] == [
        {"present": True, "exclusive": True, "anon_exclusive": True, "mapcount": 1},
        {"present": True, "zero_page": True},
        {},
        {},
    ]
    assert all(isinstance(e, PagemapEntry) for e in first) and first[0].soft_dirty  # written: dirty
    assert await p.pagemap(A, 1) == first[:1]  # the length rounded up to a page
    assert await p.pagemap(A, 0) == []
    assert await p.pagemap(0x700000000, 2 * P) == [PagemapEntry(), PagemapEntry()]  # nothing mapped there

    await p.madvise(A, 2 * P, "pageout")  # the zero page is left alone
    out = await p.pagemap(A, 2 * P)
    assert [flags(e) for e in out] == [{"swap": True, "swapcache": True}, {"present": True, "zero_page": True}]
    assert await p.read(A) == 11  # a read swap-in: mapped again, still in the swap cache
    assert flags((await p.pagemap(A, P))[0]) == {"present": True, "exclusive": True, "swapcache": True,
                                                   "anon_exclusive": True, "mapcount": 1}

    child = await p.fork()
    shared = {"present": True, "swapcache": True, "mapcount": 2}
    assert [flags(e) for e in await p.pagemap(A, P)] == [flags(e) for e in await child.pagemap(A, P)] == [shared]
    await p.madvise(A, P, "cold")  # ages the page, swaps nothing out
    assert flags((await p.pagemap(A, P))[0]) == shared
    assert await mm.check_invariants() == []


async def test_pagemap_errors(mm: Client) -> None:
    p = await mm.create_process()
    await p.mmap(4 * P, addr=A)
    with pytest.raises(OSError) as e:
        await p.pagemap(A + 8, P)  # not page-aligned
    assert e.value.errno == errno.EINVAL and e.value.code == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    with pytest.raises(OSError) as e:
        await p.pagemap((1 << 64) - P, 2 * P)  # past the end of the address space
    assert e.value.errno == errno.EINVAL
    with pytest.raises(LimitExceededError) as limit:
        await p.pagemap(A, 1 << 40)  # 256 Mi pages
    assert limit.value.limit == "max_message_bytes" and limit.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    await p.exit()
    with pytest.raises(ProcessNotFoundError):
        await p.pagemap(A, P)
    with pytest.raises(InvalidRequestError):
        await mm.process("not-a-handle").pagemap(A, P)


async def test_pagemap_holds_as_many_pages_as_the_message_limit_allows_at_their_largest() -> None:
    limit = 64 * 1024
    most = (limit - RESPONSE_SLACK) // PAGEMAP_ENTRY_BYTES
    async with serve_in_process(log_level="warning", max_message_bytes=limit) as addr, Client(addr) as mm:
        p = await mm.create_process()
        await p.mmap((most + 1) * P, addr=A)
        for i in range(0, most, 1000):
            await mm.batch([ops.write(p, A + j * P, j) for j in range(i, min(i + 1000, most))])
        await p.fork()  # every page mapped twice: the entries grow
        entries = await p.pagemap(A, most * P)  # more than one chunk of the server's reads
        assert len(entries) == most > 1024
        assert all(flags(e) == {"present": True, "mapcount": 2} for e in entries)
        with pytest.raises(LimitExceededError) as e:
            await p.pagemap(A, (most + 1) * P)
        assert e.value.limit == "max_message_bytes"


async def test_reclaim_swaps_pages_out_and_reads_bring_them_back(mm: Client) -> None:
    p = await mm.create_process()
    await p.mmap(16 * P, addr=A)
    await mm.batch([ops.write(p, A + i * P, 100 + i) for i in range(16)])
    assert await reclaim_all(mm, 16) >= 2  # written first (kept in the swap cache), freed after
    assert [flags(e) for e in await p.pagemap(A, 16 * P)] == [{"swap": True}] * 16  # out of the swap cache too
    stats = await mm.stats()
    assert stats["swap_out"] == 16 and stats["reclaim_freed"] == 16 and stats["reclaim_runs"] >= 2
    assert (stats["swap_slots_in_use"], stats["swap_cache_folios"], stats["folios"]) == (16, 0, 0)
    assert stats["swap_slots_total"] == (1 << 30) // P - 1  # the default device, less its header slot

    assert [await p.read(A + i * P) for i in range(16)] == [100 + i for i in range(16)]
    stats = await mm.stats()
    assert stats["swap_in"] == stats["fault_swap_in"] == 16 and stats["swap_cache_folios"] == 16
    assert all(e.present and e.swapcache for e in await p.pagemap(A, 16 * P))
    # In a batch, with the operations around it.
    results = await mm.batch([ops.write(p, A, 7), ops.reclaim((1 << 64) - 1), ops.read(p, A)])
    assert results[0] is None and isinstance(results[1], int) and results[2] == 7
    assert await mm.check_invariants() == []


async def test_pageout_and_reclaim_without_swap_keep_the_pages() -> None:
    async with serve_in_process(log_level="warning", swap_bytes=0) as addr, Client(addr) as mm:
        p = await mm.create_process()
        await p.mmap(4 * P, addr=A)
        await mm.batch([ops.write(p, A + i * P, i) for i in range(4)])
        assert await mm.reclaim(4) == 0
        await p.madvise(A, 4 * P, "pageout")
        assert all(e.present and not e.swap for e in await p.pagemap(A, 4 * P))
        stats = await mm.stats()
        assert (stats["swap_slots_total"], stats["swap_slots_in_use"], stats.get("swap_out", 0)) == (0, 0, 0)


async def test_unknown_advice_is_refused_by_the_sdk_and_the_server(mm: Client) -> None:
    p = await mm.create_process()
    await p.mmap(P, addr=A)
    with pytest.raises(ValueError, match="unknown advice 'reclaim'"):
        await p.madvise(A, P, "reclaim")
    with pytest.raises(InvalidRequestError):  # a value of the enum the server does not know
        await p._call("Madvise", pb.MadviseRequest(process=p.id, addr=A, length=P, advice=99), ...)  # type: ignore[arg-type]


async def test_the_swap_counters_and_gauges_reach_prometheus() -> None:
    m = MemoryModel(swap_bytes=1 << 20)
    metrics = Metrics(m)
    pid = await m.create_process()
    await m.mmap(pid, 4 * P, addr=A)
    for i in range(4):
        await m.write(pid, A + i * P, i + 1)
    await m.madvise(pid, A, 2 * P, "pageout")
    assert await m.read(pid, A) == 1
    text = generate_latest(metrics.registry).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("mmsim_swap_slots_total", ())] == (1 << 20) // P - 1
    assert samples[("mmsim_swap_slots_in_use", ())] == 2
    assert samples[("mmsim_swap_cache_folios", ())] == 2
    assert samples[("mmsim_swap_outs_total", ())] == 2
    assert samples[("mmsim_swap_cache_hits_total", ())] == 1
    assert samples[("mmsim_faults_total", (("kind", "swap_in"),))] == 1
    assert samples[("mmsim_reclaim_folios_total", (("outcome", "scanned"),))] == 2
    assert samples[("mmsim_reclaim_runs_total", ())] == 0  # pageout is not a reclaim run
    stats = m.stats()
    assert (stats["swap_slots_in_use"], stats["swap_cache_folios"], stats["swap_out"]) == (2, 2, 2)
