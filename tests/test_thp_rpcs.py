"""Large folios through the service and the SDK: madvise hugepage and nohugepage, a folio's order
and huge PMD (unary and batched), the server's THP settings (GetStats, ``Client.thp``) and
``mmsim serve --thp``, ``--mthp-sizes`` and ``--thp-zero-page`` reaching the model."""

from __future__ import annotations

import grpc
import pytest
from servers import mmsim_serve

from mmsim.client import Client, InvalidRequestError, MmsimError, ThpSettings, ops
from mmsim.client._types import thp_from_pb
from mmsim.client.testing import serve_in_process
from mmsim.v1 import mmsim_pb2 as pb

P = 4096
HUGE = 2 << 20
A = 0x100000000  # 2 MiB-aligned
B = 0x200000000
#: What sysfs shows without settings of a scenario's own: the PMD size inherits "enabled".
DEFAULT_SIZES = {"16kB": "never", "32kB": "never", "64kB": "never", "128kB": "never", "256kB": "never",
                 "512kB": "never", "1024kB": "never", "2048kB": "inherit"}


async def test_hugepage_advice_gives_a_pmd_thp_under_madvise() -> None:
    """Under the default policy (madvise) a write fault maps a PMD-size THP only in a range given
    madvise hugepage; GetFolio says so by order and pmd, unary and in a Batch."""
    async with serve_in_process(log_level="warning") as addr, Client(addr) as mm:
        p = await mm.create_process()
        await p.mmap(2 * HUGE, addr=A)
        await p.madvise(A, HUGE, "hugepage")
        await p.write(A + 3 * P, 5)
        await p.write(A + HUGE, 6)  # the second 2 MiB has no advice: a small folio
        f = await p.folio(A + 3 * P)
        assert f is not None and (f.order, f.pmd, f.value, f.mapcount) == (9, True, 5, 1)
        small = await p.folio(A + HUGE)
        assert small is not None and (small.order, small.pmd) == (0, False)
        [batched, none] = await mm.batch([ops.folio(p, A + 3 * P), ops.folio(p, A + 7 * P)])
        assert batched == f and none is not None and (none.order, none.pmd, none.value) == (9, True, 0)
        stats = await mm.stats()
        assert stats["thp_fault_alloc"] == 1
        assert await mm.check_invariants() == []


async def test_nohugepage_advice_refuses_large_folios_under_always() -> None:
    async with serve_in_process(log_level="warning", thp="always") as addr, Client(addr) as mm:
        p = await mm.create_process()
        await p.mmap(2 * HUGE, addr=A)
        await p.madvise(A + HUGE, HUGE, "nohugepage")
        await p.write(A, 1)
        await p.write(A + HUGE, 2)
        huge, small = await p.folio(A), await p.folio(A + HUGE)
        assert huge is not None and (huge.order, huge.pmd) == (9, True)
        assert small is not None and (small.order, small.pmd) == (0, False)
        assert [(v.start, v.end) for v in await p.vmas()] == [(A, A + HUGE), (A + HUGE, A + 2 * HUGE)]
        assert await mm.check_invariants() == []


async def test_an_advice_the_server_does_not_know_is_refused() -> None:
    async with serve_in_process(log_level="warning") as addr, Client(addr) as mm:
        p = await mm.create_process()
        await p.mmap(P, addr=A)
        with pytest.raises(ValueError, match="unknown advice 'huge'"):
            await p.madvise(A, P, "huge")
        with pytest.raises(InvalidRequestError):
            await p._call("Madvise", pb.MadviseRequest(process=p.id, addr=A, length=P, advice=10), ...)  # type: ignore[arg-type]


async def test_the_server_reports_its_thp_settings() -> None:
    async with serve_in_process(log_level="warning") as addr, Client(addr) as mm:
        assert await mm.thp() == ThpSettings(enabled="madvise", use_zero_page=True, sizes=DEFAULT_SIZES)
    async with serve_in_process(log_level="warning", thp="never", mthp_sizes="64K:always,2M:madvise,16K",
                                thp_zero_page=False) as addr, Client(addr) as mm:
        thp = await mm.thp()
        assert thp == ThpSettings(enabled="never", use_zero_page=False, sizes={
            **DEFAULT_SIZES, "16kB": "inherit", "64kB": "always", "2048kB": "madvise"})
        assert thp is not None and thp.policy("64kB") == "always" and thp.policy("8kB") == "never"


async def test_mthp_sizes_reach_the_model() -> None:
    """With 64K always, a write fault maps a 64 KiB folio by PTEs (and a read the zero page)."""
    async with serve_in_process(log_level="warning", mthp_sizes="64K:always") as addr, Client(addr) as mm:
        p = await mm.create_process()
        await p.mmap(HUGE, addr=A)
        await p.write(A + 17 * P, 3)
        f = await p.folio(A + 17 * P)
        assert f is not None and (f.order, f.pmd, f.value) == (4, False, 3)
        assert await mm.check_invariants() == []


async def test_shards_with_different_settings_are_named() -> None:
    async with serve_in_process(log_level="warning") as a, serve_in_process(log_level="warning", thp="always") as b:
        async with Client([a, b]) as mm:
            with pytest.raises(MmsimError, match="the shards run different THP settings") as e:
                await mm.thp()
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
            settings = await mm.thp(target=b)
            assert settings is not None and settings.enabled == "always"


def test_a_server_without_large_folios_reports_none() -> None:
    assert thp_from_pb(pb.StatsResponse(protocol="recheck")) is None
    reply = pb.StatsResponse(thp=pb.ThpSettings(enabled="never"))
    assert thp_from_pb(reply) == ThpSettings(enabled="never", use_zero_page=False, sizes={})


async def test_serve_flags_reach_the_model() -> None:
    """``mmsim serve --thp always --mthp-sizes ... --thp-zero-page off``: a read fault of a
    THP-sized range allocates a THP (no huge zero page); the settings are those GetStats reports."""
    with mmsim_serve("--thp", "always", "--mthp-sizes", "2M,64K:madvise", "--thp-zero-page", "off") as server:
        async with Client(server.addr) as mm:
            thp = await mm.thp()
            assert thp == ThpSettings(enabled="always", use_zero_page=False,
                                      sizes={**DEFAULT_SIZES, "64kB": "madvise"})
            p = await mm.create_process()
            await p.mmap(HUGE, addr=A)
            assert await p.read(A) == 0
            f = await p.folio(A)
            assert f is not None and (f.order, f.pmd, f.zero_page) == (9, True, False)
