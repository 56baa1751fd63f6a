"""--max-memory bounds the server's memory: every growth path a client controls ends in
RESOURCE_EXHAUSTED (ENOMEM) with the model consistent, and the server's peak RSS stays within the
budget plus a constant (docs/server.md: "Memory").

Each path runs against its own ``mmsim serve`` process, whose RSS is read from /proc.
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
import pytest_asyncio
from servers import ServerProcess, mmsim_serve

from mmsim.client import Client, LimitExceededError, Process, ops
from mmsim.server.mm.mm_types import PAGE_SIZE as P
from mmsim.server.mm.model import MemoryModel

BUDGET = 16 << 20
#: What RSS may exceed the budget by: the interpreter's free lists and arenas that the model's
#: objects have been through, gRPC's buffers for one call in flight, the audit's working set
#: (docs/server.md: "Memory").
SLACK = 48 << 20

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")


class Server:
    """A budgeted server and its RSS once warmed up."""

    def __init__(self, proc: ServerProcess) -> None:
        self.proc = proc
        self.addr = proc.addr
        self.baseline = 0

    @property
    def rss(self) -> int:
        return self.proc.status("VmRSS")

    @property
    def peak(self) -> int:
        return self.proc.status("VmHWM")


@pytest_asyncio.fixture
async def budget_server() -> AsyncIterator[Server]:
    """No swap: a charge past the budget is ENOMEM at once (with swap it first reclaims:
    test_swap_postpones_enomem_until_swap_is_full)."""
    with mmsim_serve("--max-memory", str(BUDGET), "--swap-bytes", "0") as proc:
        server = Server(proc)
        async with Client(server.addr) as mm:  # warm the server's code paths before the baseline
            p = await mm.create_process()
            v = await p.mmap(16 * P)
            await mm.batch([ops.write(p, v.start + i * P, i) for i in range(16)] + [ops.fork(p)])
            await mm.check_invariants()
        server.baseline = server.rss
        yield server


async def grow_until_enomem(step: Callable[[], Awaitable[object]], max_steps: int = 100_000) -> OSError:
    """Run ``step`` until the server answers ENOMEM; return that error."""
    for _ in range(max_steps):
        try:
            result = await step()
        except OSError as e:
            assert e.errno == errno.ENOMEM, e
            return e
        if isinstance(result, list):  # a batch: its first failed operation
            failed = [r for r in result if isinstance(r, BaseException)]
            if failed:
                assert isinstance(failed[0], OSError) and failed[0].errno == errno.ENOMEM, failed[0]
                return failed[0]
    raise AssertionError("the budget was never reached")


async def check_bounded_and_consistent(server: Server, mm: Client) -> None:
    stats = await mm.stats()
    assert stats["memory_limit_failures"] > 0
    assert stats["memory_bytes"] <= BUDGET and stats["memory_peak_bytes"] <= BUDGET
    assert await mm.check_invariants() == []  # consistent, and the charges match the objects
    assert server.peak - server.baseline <= BUDGET + SLACK, (server.peak - server.baseline) >> 20


async def test_zero_page_ptes(budget_server: Server) -> None:
    """Reads fault in zero-page PTEs: each is charged."""
    async with Client(budget_server.addr) as mm:
        p = await mm.create_process()
        v = await p.mmap(1 << 32)
        done = 0

        async def reads() -> object:
            nonlocal done
            done += 5000
            return await mm.batch([ops.read(p, v.start + (done + i) * P) for i in range(5000)], stop_on_error=True)

        e = await grow_until_enomem(reads)
        assert "memory limit" in str(e)
        await check_bounded_and_consistent(budget_server, mm)
        await p.exit()  # giving memory back makes room again
        q = await mm.create_process()
        w = await q.mmap(P)
        await q.write(w.start, 1)


async def test_ptes_copied_by_fork(budget_server: Server) -> None:
    """Fork copies PTEs: a fork that does not fit fails whole, leaving no child."""
    async with Client(budget_server.addr) as mm:
        p = await mm.create_process()
        v = await p.mmap(1000 * P)
        await mm.batch([ops.write(p, v.start + i * P, i) for i in range(1000)])
        children: list[Process] = []
        before = (await mm.stats())["processes"]

        async def fork() -> object:
            children.append(await p.fork())
            return None

        await grow_until_enomem(fork)
        stats = await mm.stats()
        assert stats["processes"] == before + len(children)  # the failed fork left nothing behind
        await check_bounded_and_consistent(budget_server, mm)


async def test_page_tables_of_moves_over_holes(budget_server: Server) -> None:
    """Moves with ALLOW_SRC_HOLES allocate page tables on both sides: charged, and a move that
    cannot get one stops short (EAGAIN with the bytes moved) or fails ENOMEM."""
    async with Client(budget_server.addr) as mm:
        p = await mm.create_process()
        spare = await mm.create_process()  # about 2 MiB, given back below: room for ~4,000 tables
        w = await spare.mmap(3000 * P)
        await mm.batch([ops.write(spare, w.start + i * P, i) for i in range(3000)])
        # Fill the rest of the budget with folios.
        v = await p.mmap(1 << 30)
        filled = 0

        async def writes() -> object:
            nonlocal filled
            filled += 5000
            return await mm.batch([ops.write(p, v.start + (filled + i) * P, i) for i in range(5000)],
                                  stop_on_error=True)

        await grow_until_enomem(writes)

        async def write() -> object:  # to the last page: a batch's own request may not fit before
            nonlocal filled
            filled += 1
            return await p.write(v.start + filled * P, 1)  # type: ignore[func-returns-value]  # None, as the test checks

        filled += 5000
        await grow_until_enomem(write)
        await spare.exit()
        size = 1 << 30
        src = await p.mmap(8 * size)
        dst = await p.mmap(8 * size, uffd="missing")
        moved_short = 0
        for i in range(8):
            try:
                await p.remap(dst.start + i * size, src.start + i * size, size, allow_src_holes=True)
            except BlockingIOError as e:  # EAGAIN: it stopped at the budget
                moved_short = e.moved  # type: ignore[attr-defined]  # the SDK's errors carry what was done
                break
            except OSError as e:
                assert e.errno == errno.ENOMEM
                break
        else:
            raise AssertionError("the budget was never reached")
        assert moved_short % P == 0
        await check_bounded_and_consistent(budget_server, mm)


async def test_anon_vma_chains_of_a_deep_fork_chain(budget_server: Server) -> None:
    """Each child in a chain of forks links every ancestor's anon_vma: quadratic, and charged."""
    async with Client(budget_server.addr) as mm:
        p = await mm.create_process()
        v = await p.mmap(P)
        await p.write(v.start, 1)
        chain = [p]

        async def fork() -> object:
            chain.append(await chain[-1].fork())
            return None

        await grow_until_enomem(fork)
        assert len(chain) > 100
        await check_bounded_and_consistent(budget_server, mm)
        # The tree dump of the deepest child stops as soon as it is known not to fit.
        try:
            tree = await chain[-1].anon_vma_tree()
        except LimitExceededError as e:
            assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.limit == "max_message_bytes"
        else:
            assert len(tree) == len(chain)


async def test_responses_stop_at_the_message_limit(budget_server: Server) -> None:
    """A batch of walks whose results would be far past 4 MiB: it stops at the limit, with a
    RESOURCE_EXHAUSTED result for the walk that did not fit, and RSS stays bounded."""
    async with Client(budget_server.addr) as mm:
        p = await mm.create_process()
        v = await p.mmap(P)
        await p.write(v.start, 1)
        results = await mm.batch([ops.fork(p) for _ in range(1500)])
        assert not [r for r in results if isinstance(r, BaseException)]
        walks = await mm.batch([ops.walk(p, v.start) for _ in range(2000)])
        assert 0 < len(walks) < 2000
        assert all(len(w.mappings) == 1501 for w in walks[:-1])
        last = walks[-1]
        assert isinstance(last, LimitExceededError) and last.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await mm.check_invariants() == []
        assert budget_server.peak - budget_server.baseline <= BUDGET + SLACK


async def test_an_enomem_split_changes_nothing() -> None:
    """An operation that would have to split a VMA with a long chain, with no room for it: ENOMEM
    before anything changes, never half-applied."""
    m = MemoryModel()
    p = await m.create_process()
    v = await m.mmap(p, 8 * P)
    await m.write(p, v.start, 1)
    cur = p
    for _ in range(50):  # a child whose VMA is chained to 51 anon_vmas
        cur = await m.fork(cur)
    m.k.memcg.limit = m.k.memcg.usage + 1024  # less than one split of that VMA costs
    before = (m.vmas(cur), m.anon_vma_tree(cur), m.k.memcg.usage)
    for call in (
        m.munmap(cur, v.start + P, P),
        m.madvise(cur, v.start + P, P, "dontfork"),
        m.uffd_register(cur, v.start + P, P, "wp"),
    ):
        with pytest.raises(OSError) as e:
            await call
        assert e.value.errno == errno.ENOMEM
        assert (m.vmas(cur), m.anon_vma_tree(cur), m.k.memcg.usage) == before
    with pytest.raises(OSError) as e:
        await m.fork(cur)
    assert e.value.errno == errno.ENOMEM and m.k.memcg.usage == before[2]
    assert m.check_invariants() == []


@pytest.mark.violations_expected
async def test_the_audit_catches_a_charge_that_is_never_given_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mutant: munmap forgets to uncharge a VMA. The audit's charge check must fire."""
    from mmsim.server.mm import mmap as mmap_mod

    m = MemoryModel()
    p = await m.create_process()
    v = await m.mmap(p, 4 * P)
    assert m.check_invariants() == []
    monkeypatch.setattr(mmap_mod, "vm_area_free", lambda k, vma: None)
    await m.munmap(p, v.start, 4 * P)
    problems = m.check_invariants()
    assert any(p.startswith("memory budget:") for p in problems), problems


async def test_swap_postpones_enomem_until_swap_is_full() -> None:
    """With swap, writes past the budget reclaim (memcg reclaim: pages swapped out) instead of
    failing; ENOMEM comes once the swap device is full too, with the model consistent, every page
    holding its value, and the RSS within the budget plus what the device holds (docs/server.md)."""
    swap = 16 << 20
    with mmsim_serve("--max-memory", str(BUDGET), "--swap-bytes", str(swap)) as proc:
        server = Server(proc)
        server.baseline = server.rss
        async with Client(server.addr) as mm:
            p = await mm.create_process()
            v = await p.mmap(1 << 30)
            written = 0

            async def writes() -> object:
                nonlocal written
                result = await mm.batch([ops.write(p, v.start + (written + i) * P, written + i) for i in range(2000)],
                                        stop_on_error=True)
                written += sum(1 for r in result if not isinstance(r, BaseException))
                return result

            await grow_until_enomem(writes)
            stats = await mm.stats()
            resident = BUDGET // (P // 4)  # far fewer folios than were written fit the budget
            assert written > resident and stats["swap_slots_in_use"] >= stats["swap_slots_total"] - 64
            assert stats["swap_out"] > 0 and stats["reclaim_memcg"] > 0
            assert stats["memory_bytes"] <= BUDGET
            assert await mm.check_invariants() == []
            for i in range(0, written, 997):
                assert await p.read(v.start + i * P) == i
            assert server.peak - server.baseline <= BUDGET + swap // 16 + SLACK
