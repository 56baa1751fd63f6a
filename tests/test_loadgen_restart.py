"""``mmsim loadgen`` while a shard of ``mmsim serve --shards 2`` restarts under it: the shard's
process is killed once the load reaches it, its supervisor starts it again, and the run goes on to
its end, counts the calls the restart cost, makes the lost trees again on the restarted shard and
writes its report."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from servers import ServerProcess, mmsim_serve, shard_pids

from mmsim.client import Client, MmsimError, ShardRestartedError
from mmsim.loadgen.gc import GcError
from mmsim.loadgen.report import validate
from mmsim.loadgen.restart import SHARD_RESTARTED, may_be_restart
from mmsim.loadgen.runner import Reading, counter_deltas, shard_restarts
from mmsim.v1 import mmsim_pb2 as pb

T = TypeVar("T")


@pytest.fixture(scope="module")
def two_shards() -> Iterator[ServerProcess]:
    with mmsim_serve("--shards", "2") as s:
        yield s


async def _until(condition: Callable[[], Awaitable[T]], what: str, timeout: float = 30.0) -> T:
    """Poll ``condition()`` until it gives something true; that."""
    deadline = time.monotonic() + timeout
    while not (value := await condition()):
        assert time.monotonic() < deadline, f"{what} never happened"
        await asyncio.sleep(0.05)
    return value


async def _shard_1(mm: Client) -> pb.ShardInfo | None:
    """Shard 1 when it serves, else None (it is restarting, or its stats cannot be read yet)."""
    try:
        s = (await mm.shards())[1]
        return s if s.state == pb.SHARD_STATE_SERVING else None
    except MmsimError:
        return None


async def _run_killing_shard_1(server: ServerProcess, tmp_path: Path, *args: str) -> tuple[int, str, dict[str, Any]]:
    """Run ``mmsim loadgen ARGS`` on the deployment; once the load moves pages on shard 1, SIGKILL
    that shard. The exit status, the output and the report, checked against shard 1: it restarted
    once, the load reached the new generation and the run left nothing there."""
    report_path = tmp_path / "report.json"
    async with Client(server.addr, timeout=10) as mm:
        before = await _until(lambda: _shard_1(mm), "shard 1 serving")
        moved = (await mm.stats(shard=1)).get("move_pages", 0)
        with open(tmp_path / "out.txt", "w+") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mmsim.server", "loadgen", "--target", server.addr, "--duration", "8",
                 "--warmup", "0", "--pages", "8", "--fork-depth", "1", "--concurrency", "8", "--quiet",
                 "--json", str(report_path), *args],
                stdout=out, stderr=subprocess.STDOUT, text=True,
            )
            try:
                async def loaded() -> bool:
                    assert proc.poll() is None, "the run ended before the load reached shard 1"
                    return (await mm.stats(shard=1)).get("move_pages", 0) > moved

                await _until(loaded, "a move on shard 1")
                os.kill(shard_pids(server.pid)[1], signal.SIGKILL)
                status = await asyncio.to_thread(proc.wait, 60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            out.seek(0)
            output = out.read()
        after = await _until(lambda: _shard_1(mm), "shard 1 serving again")
        assert after.generation != before.generation
        stats = await mm.stats(shard=1)  # counted since the restart: the trees made again
        assert stats.get("move_pages", 0) > 0, stats  # the load went on on the restarted shard
        assert stats["processes"] == 0, stats  # and they were exited at the end
        assert await mm.check_invariants() == []
    assert report_path.exists(), output
    return status, output, json.loads(report_path.read_text())


def _check_report(report: dict[str, Any], workers: int) -> None:
    validate(report)
    assert report["shard_restarts"] == {"1": 1}
    assert 1 <= report["trees_recreated"] <= workers
    assert report["end_reason"] == "duration"
    overall = report["overall"]
    assert overall["errors"].get(SHARD_RESTARTED, 0) > 0, overall["errors"]
    assert report["errnos"][SHARD_RESTARTED] == overall["errors"][SHARD_RESTARTED]
    assert overall["failures"] == {}, overall["failures"]
    assert overall["ok"] > 10 * overall["errors"][SHARD_RESTARTED]  # the other outcomes are still counted
    assert report["statuses"]["OK"] == overall["ok"]
    assert sum(report["statuses"].values()) == overall["count"]
    for f in report["operations"].values():
        assert f["count"] == f["ok"] + sum(f["errors"].values()) + sum(f["failures"].values())
    assert report["timeseries"][-1]["ops"] > 0  # the run went on to its end


@pytest.mark.parametrize("profile", ["mixed", "gc", "reclaim"])
async def test_a_shard_restart_under_the_run_is_an_outcome(
    two_shards: ServerProcess, tmp_path: Path, profile: str
) -> None:
    """Two worker processes, each with lanes on both shards (mixed, reclaim: their pages of the tree
    made again hold what its setup wrote, as each read checks), or each running the collector of
    its own tree's GC heap (gc)."""
    status, output, report = await _run_killing_shard_1(two_shards, tmp_path, "--workers", "2", "--profile", profile)
    assert status == 0, output
    assert "Traceback" not in output, output
    assert "shard restarts" in output and "shard 1: 1" in output  # the summary says so
    _check_report(report, workers=2)
    if profile == "gc":
        assert report["gc"]["cycles"] > 0
    if profile == "reclaim":
        assert report["operations"]["read"]["ok"] > 0 and report["swap"]["swap_ins"] > 0


def test_counters_of_a_restarted_shard_count_from_its_restart() -> None:
    before: Reading = {"0": (7, {"walk": 100, "fork": 5}), "1": (8, {"walk": 900, "fork": 50})}
    after: Reading = {"0": (7, {"walk": 130, "fork": 5}), "1": (9, {"walk": 40, "fork": 2})}
    assert counter_deltas(before, after) == {"walk": 70, "fork": 2}
    unknown: Reading = {"0": (None, {"walk": 100})}  # no generation: a plain difference
    assert counter_deltas(unknown, {"0": (None, {"walk": 90})}) == {"walk": -10}


def test_restarts_are_counted_once_per_generation() -> None:
    results = [{"restarts": {"generations": {"1": ["20", "30"]}, "recreated": 2}},
               {"restarts": {"generations": {"1": ["30"]}, "recreated": 1}}, {}]
    assert shard_restarts(results, {0: 1, 1: 10}, {0: 1, 1: 30}) == {"1": 2}
    # A shard no tree was on: its generation changed over the run.
    assert shard_restarts([], {0: 1, 1: 10}, {0: 5, 1: 10}) == {"0": 1}


def test_what_a_restart_may_explain() -> None:
    assert may_be_restart(ShardRestartedError("gone", code=grpc.StatusCode.NOT_FOUND))
    assert may_be_restart(MmsimError("down", code=grpc.StatusCode.UNAVAILABLE))
    assert may_be_restart(GcError("the collector stopped")) and may_be_restart(EOFError())
    assert not may_be_restart(FileExistsError(17, "EEXIST"))  # an errno: the process answered
    assert not may_be_restart(MmsimError("bad", code=grpc.StatusCode.INVALID_ARGUMENT))
