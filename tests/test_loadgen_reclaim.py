"""``mmsim loadgen --profile reclaim``: a working set larger than the server's memory budget, so that
it reclaims and swaps under load while moves and walks run; the swap operations of a lane (against
a fake process), and the swap figures of the report."""

from __future__ import annotations

import asyncio
import errno
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from rich.console import Console
from servers import mmsim_serve
from test_loadgen import options

from mmsim.client import Client, DeadlineExceededError, PagemapEntry
from mmsim.loadgen import scrape
from mmsim.loadgen.access import Access
from mmsim.loadgen.cli import main
from mmsim.loadgen.profiles import CALLS, PROFILES, is_gc, is_swap, parse_mix
from mmsim.loadgen.report import validate
from mmsim.loadgen.runner import run, swap_figures
from mmsim.loadgen.worker import PAGEOUT_PAGES, SWAP_CHECK_TRIES, SWAPPED_OUT, Recorder, Worker, WorkerSpec
from mmsim.loadgen.workload import PAGE, REGION_PAGES_MAX, TreeSpec, Workload

#: The swap figures a reclaim run must move.
SWAPPED = ("swap_outs", "swap_ins", "swap_outs_per_s", "swap_ins_per_s")


# -- the profile and the workload


def test_the_reclaim_profile_is_a_swap_mix_of_the_new_operations() -> None:
    mix = PROFILES["reclaim"]
    assert {"pageout", "reclaim", "write", "read", "walk", "remap"} <= set(mix)
    assert is_swap(mix) and not is_gc(mix)
    assert not any(is_swap(PROFILES[p]) for p in PROFILES if p != "reclaim")
    assert [op.rpc for op in CALLS["pageout"]] == ["Madvise"] and [op.rpc for op in CALLS["reclaim"]] == ["Reclaim"]
    assert parse_mix("write=2,pageout=1") == {"write": 2, "pageout": 1} and is_swap(parse_mix("reclaim=1"))
    assert not is_swap(parse_mix("write=1,read=1,walk=1"))


def _tree(lanes: int, pages: int) -> TreeSpec:
    return TreeSpec(target=None, shard=0, root="r", root_pid=1, chain=(), shared=0x100000000, shared_pages=pages,
                    src=0x200000000, dst=0x300000000, remap_pages=8 + lanes * 65, rw=0x400000000,
                    rw_pages=lanes * pages, swap_pages=pages)


def test_each_lane_of_a_swap_mix_has_its_own_pages_of_the_rw_region() -> None:
    w = Workload(trees=[_tree(3, 10), _tree(3, 10)])
    lanes = w.lanes(6, race=False)
    sets = {(lane.tree, p) for lane in lanes for p in range(lane.swap_first, lane.swap_first + lane.swap_pages)}
    assert len(sets) == 6 * 10  # disjoint
    assert all(0 <= p < w.trees[t].rw_pages for t, p in sets)
    assert all(lane.swap_pages == 10 for lane in lanes)
    assert all(lane.swap_pages == 0 for lane in Workload(trees=[replace(_tree(3, 10), swap_pages=0)]).lanes(3, False))


@pytest.mark.parametrize("argv", [["--profile", "reclaim", "--pages", str(REGION_PAGES_MAX)],
                                  ["--mix", "write=1,pageout=1", "--pages", str(REGION_PAGES_MAX // 4)]])
def test_a_swap_set_too_large_for_its_region_is_bad_usage(argv: list[str], capsys: Any) -> None:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--workers", "1", "--concurrency", "16", "--trees", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "swap mix" in err, err


def test_the_swap_figures_are_the_counter_deltas_and_their_rates() -> None:
    d = {"swap_out": 300, "swap_in": 150, "swap_cache_hit": 6, "fault_swap_in": 156, "reclaim_runs": 12,
         "reclaim_memcg": 2, "reclaim_kswapd": 3, "reclaim_scanned": 900, "reclaim_freed": 280, "walk": 5}
    f = swap_figures(d, 3.0)
    assert f["swap_outs"] == 300 and f["swap_ins"] == 150 and f["reclaim_kswapd_runs"] == 3
    assert f["swap_outs_per_s"] == 100.0 and f["swap_ins_per_s"] == 50.0 and f["reclaim_runs_per_s"] == 4.0
    none = swap_figures({"walk": 5}, 0.0)
    assert set(none) == set(f) and not any(none.values())


def test_the_swap_metrics_map_to_getstats_keys() -> None:
    text = (
        "# TYPE mmsim_swap_outs counter\nmmsim_swap_outs_total 30.0\n"
        "# TYPE mmsim_swap_ins counter\nmmsim_swap_ins_total 20.0\n"
        "# TYPE mmsim_swap_cache_hits counter\nmmsim_swap_cache_hits_total 2.0\n"
        "# TYPE mmsim_reclaim_runs counter\nmmsim_reclaim_runs_total 4.0\n"
        "# TYPE mmsim_reclaim_memcg_runs counter\nmmsim_reclaim_memcg_runs_total 1.0\n"
        "# TYPE mmsim_reclaim_folios counter\n"
        'mmsim_reclaim_folios_total{outcome="scanned"} 90.0\nmmsim_reclaim_folios_total{outcome="freed"} 28.0\n'
        "# TYPE mmsim_faults counter\nmmsim_faults_total{kind=\"swap_in\"} 21.0\n"
        "# TYPE mmsim_swap_slots_in_use gauge\nmmsim_swap_slots_in_use 10.0\n"
    )
    assert scrape.parse(text) == {
        "swap_out": 30, "swap_in": 20, "swap_cache_hit": 2, "reclaim_runs": 4, "reclaim_memcg": 1,
        "reclaim_scanned": 90, "reclaim_freed": 28, "fault_swap_in": 21, "swap_slots_in_use": 10, "violations": 0,
    }


# -- a lane's swap operations, against a fake process


def _errno(err: int) -> OSError:
    e = OSError(err, errno.errorcode[err])
    e.code = grpc.StatusCode.NOT_FOUND if err == errno.ENOENT else grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    return e


class FakeProcess:
    """The pages of one process, some swapped out; ``fail`` is raised by the next access."""

    def __init__(self, rw: int, pages: int) -> None:
        self.values = {rw + i * PAGE: i + 1 for i in range(pages)}  # as the setup writes them
        self.swapped: set[int] = set()
        self.fail: BaseException | None = None
        self.paged_out: list[tuple[int, int]] = []
        #: Raised by the next pagemaps, one each (a server refusing them for room).
        self.pagemap_fail: list[BaseException] = []

    def _check(self) -> None:
        fail, self.fail = self.fail, None
        if fail is not None:
            raise fail

    async def read(self, addr: int) -> int:
        self._check()
        self.swapped.discard(addr)
        return self.values[addr]

    async def write(self, addr: int, value: int) -> None:
        self._check()
        self.swapped.discard(addr)
        self.values[addr] = value

    async def walk(self, addr: int, blocking: bool) -> None:
        self._check()
        if addr in self.swapped or addr not in self.values:
            raise _errno(errno.ENOENT)

    async def pagemap(self, addr: int, length: int) -> list[PagemapEntry]:
        if self.pagemap_fail:
            raise self.pagemap_fail.pop(0)
        return [PagemapEntry(swap=addr in self.swapped, present=addr not in self.swapped and addr in self.values)]

    async def madvise(self, addr: int, length: int, advice: str) -> None:
        assert advice == "pageout"
        self.paged_out.append((addr, length))
        self.swapped.update(range(addr, addr + length, PAGE))

    async def vmas(self, *, timeout: float | None = None) -> list[object]:
        return []


class FakeClient:
    def __init__(self, p: FakeProcess) -> None:
        self.p = p

    def process(self, handle: str, pid: int, *, target: str | None = None) -> FakeProcess:
        return self.p


@pytest.fixture
def lane() -> Iterator[tuple[Worker, Any, FakeProcess]]:
    tree = _tree(2, 8)
    p = FakeProcess(tree.rw, tree.rw_pages)
    lanes = Workload(trees=[tree]).lanes(2, race=False)
    spec = WorkerSpec(index=0, access=Access(("x:1",)), trees=(tree,), lanes=tuple(lanes[1:]),
                      mix=tuple(PROFILES["reclaim"].items()), mode="closed", rate=None, duration=1.0, count=None,
                      warmup=0.0, start_at=0.0, seed=3, call_timeout=1.0)
    worker = Worker(spec, FakeClient(p))  # type: ignore[arg-type]
    yield worker, worker.lanes[0], p


async def _call(worker: Worker, lane: Any, op: str) -> Recorder:
    rec = Recorder(0.0, 0.0)  # every call recorded, none in the per-second series
    await worker.call(lane, op, time.perf_counter(), rec)
    return rec


async def test_reads_check_what_the_lane_wrote_across_swap(lane: tuple[Worker, Any, FakeProcess]) -> None:
    worker, ln, p = lane
    own = {ln.tree.rw + i * PAGE for i in range(ln.spec.swap_first, ln.spec.swap_first + ln.spec.swap_pages)}
    for _ in range(40):
        for op in ("write", "pageout", "read"):
            rec = await _call(worker, ln, op)
            assert rec.statuses == Counter(OK=1), (op, rec.ops[op].failures)
    assert {a for a in p.values if p.values[a] != (a - ln.tree.rw) // PAGE + 1} <= own  # its writes, its pages
    assert all(a in own or (a, n) == (ln.regions(ln.single_at)[0] + ln.spec.single * PAGE, PAGE)
               for a, n in p.paged_out)
    assert any(n == PAGEOUT_PAGES * PAGE for _, n in p.paged_out)
    for addr in own:  # a page that lost its value fails the read that finds it
        p.values[addr] += 1000
    statuses = Counter[str]()
    for _ in range(10):
        statuses += (await _call(worker, ln, "read")).statuses
    assert statuses == Counter(WRONG_VALUE=10)


async def test_a_refused_write_keeps_the_value_and_an_unanswered_one_is_learnt(
    lane: tuple[Worker, Any, FakeProcess],
) -> None:
    worker, ln, p = lane
    p.fail = _errno(errno.ENOMEM)  # refused: nothing written, the page holds what it held
    assert (await _call(worker, ln, "write")).errnos == Counter(ENOMEM=1)
    assert all(v is not None for v in ln.values.values())
    p.fail = DeadlineExceededError("late", code=grpc.StatusCode.DEADLINE_EXCEEDED)  # may or may not be written
    assert (await _call(worker, ln, "write")).statuses == Counter(DEADLINE_EXCEEDED=1)
    unknown = [page for page, v in ln.values.items() if v is None]
    assert len(unknown) == 1
    p.values[ln.tree.rw + unknown[0] * PAGE] = 777
    while ln.values[unknown[0]] is None:  # the next read of it learns its value
        assert (await _call(worker, ln, "read")).statuses == Counter(OK=1)
    assert ln.values[unknown[0]] == 777


async def test_a_walk_of_a_swapped_out_page_is_its_own_outcome(lane: tuple[Worker, Any, FakeProcess]) -> None:
    worker, ln, p = lane
    own = [ln.tree.rw + i * PAGE for i in range(ln.spec.swap_first, ln.spec.swap_first + ln.spec.swap_pages)]
    p.swapped.update(own)
    rec = await _call(worker, ln, "walk")
    assert rec.ops["walk"].errors == Counter({SWAPPED_OUT: 1}) and rec.statuses == Counter(NOT_FOUND=1)
    for addr in own:  # nothing mapped and no swap entry either: a real ENOENT
        p.swapped.discard(addr)
        del p.values[addr]
    rec = await _call(worker, ln, "walk")
    assert rec.ops["walk"].errors == Counter(ENOENT=1)



async def test_a_swapped_out_walk_is_told_even_when_the_server_refuses_the_check_for_a_while(
        lane: tuple[Worker, Any, FakeProcess]) -> None:
    """The pagemap that tells a swapped-out page from a missing one is a call the server may refuse
    for room (RESOURCE_EXHAUSTED, ENOMEM) in a run past its budget: asked again, it tells; refused
    every time, or failing otherwise, the walk's ENOENT stands."""
    worker, ln, p = lane
    own = [ln.tree.rw + i * PAGE for i in range(ln.spec.swap_first, ln.spec.swap_first + ln.spec.swap_pages)]
    p.swapped.update(own)
    p.pagemap_fail = [_errno(errno.ENOMEM), _errno(errno.ENOMEM)]
    rec = await _call(worker, ln, "walk")
    assert rec.ops["walk"].errors == Counter({SWAPPED_OUT: 1}) and p.pagemap_fail == []
    p.pagemap_fail = [_errno(errno.ENOMEM) for _ in range(SWAP_CHECK_TRIES)]
    rec = await _call(worker, ln, "walk")
    assert rec.ops["walk"].errors == Counter(ENOENT=1) and p.pagemap_fail == []
    unavailable = OSError(errno.EIO, "EIO")
    p.pagemap_fail = [unavailable, _errno(errno.ENOMEM)]
    rec = await _call(worker, ln, "walk")
    assert rec.ops["walk"].errors == Counter(ENOENT=1) and len(p.pagemap_fail) == 1  # not asked again


# -- against servers


#: A run whose working set (about 2.5 MB) is well above BUDGET.
SMALL = ["--workers", "1", "--concurrency", "4", "--trees", "1", "--pages", "768", "--fork-depth", "1",
         "--duration", "1.5", "--warmup", "0.3", "--quiet"]
BUDGET = "1M"


async def _after(addr: str) -> tuple[list[str], dict[str, int]]:
    async with Client(addr) as mm:
        return await mm.check_invariants(), await mm.stats()


def test_the_reclaim_profile_swaps_past_a_small_budget(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "r.json"
    with mmsim_serve("--max-memory", BUDGET) as s:
        assert main(["--target", s.addr, "--profile", "reclaim", *SMALL, "--json", str(out)]) == 0
        problems, stats = asyncio.run(_after(s.addr))
    assert problems == [] and stats["processes"] == 0 and stats["swap_slots_in_use"] == 0
    report = json.loads(out.read_text())
    validate(report)
    assert report["overall"]["failures"] == {} and set(report["errnos"]) <= {SWAPPED_OUT}, report["errnos"]
    assert report["server_deltas"].get("violations", 0) == 0
    swap = report["swap"]
    assert all(swap[k] > 0 for k in SWAPPED), swap
    assert swap["reclaim_kswapd_runs"] + swap["reclaim_memcg_runs"] > 0, swap  # the server reclaimed by itself
    assert report["operations"]["walk"]["errors"].get(SWAPPED_OUT, 0) > 0  # some walks found their page out
    assert report["operations"]["read"]["ok"] > 0 and report["operations"]["remap"]["ok"] > 0
    text = capsys.readouterr().out
    assert "swap-outs/s" in text and "swap-ins/s" in text


async def test_without_a_budget_pageout_and_reclaim_swap_and_metrics_say_so() -> None:
    with mmsim_serve("--metrics-listen", "127.0.0.1:0") as s:
        report = await run(options(s.addr, profile="reclaim", pages=32, stats_from="metrics"), Console(quiet=True))
        validate(report)
        assert report["overall"]["failures"] == {} and set(report["errnos"]) <= {SWAPPED_OUT}
        assert all(report["swap"][k] > 0 for k in SWAPPED), report["swap"]
        assert report["swap"]["reclaim_runs"] > 0 and report["operations"]["pageout"]["ok"] > 0
        async with Client(s.addr) as mm:  # quiet now: the swap counters scraped equal GetStats'
            scraped = await scrape.scrape(await scrape.endpoints(mm, lambda: Access((s.addr,))))
            stats = await mm.stats()
        keys = [k for k in scrape.SAMPLES if k.startswith(("swap_", "reclaim_"))] + ["reclaim_scanned",
                                                                                       "reclaim_freed"]
        assert {k: stats.get(k, 0) for k in keys} == {k: scraped.get(k, 0) for k in keys}
        assert scraped["swap_out"] > 0
        problems, after = await _after(s.addr)
        assert problems == [] and after["processes"] == 0
