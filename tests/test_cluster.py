"""``--cluster tcp://HOST:PORT``: a real Dask scheduler and two workers on loopback run the parts of
``mmsim explore``, ``mmsim mutate`` and ``mmsim conformance --random``, and a seed gives the same
result there as here."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from mmsim.server.cli import main
from mmsim.server.tools import cluster as cluster_mod
from mmsim.server.tools.cluster import ClusterError
from mmsim.server.tools.conformance import tool
from mmsim.server.tools.conformance.generate import random_scenario
from mmsim.server.tools.conformance.kernel import oracle_unavailable
from mmsim.server.tools.explore import explore
from mmsim.server.tools.litmus import load
from mmsim.server.tools.mutate import mutation_score

LITMUS = Path(__file__).parent / "litmus"
DASK = Path(sys.executable).parent / "dask"
pytestmark = pytest.mark.violations_expected  # the unsafe protocols and the mutants are meant to be caught

#: A worker preload (and the same change here) that makes every ``mapcount`` step of a conformance
#: scenario differ, so that a random run has differences to shrink and report.
SKEW = '''
from mmsim.server.tools.conformance.mmsim_runner import Difference


def skewed(compare):
    def compare_skewed(scenario, kernel, mmsim):
        return compare(scenario, kernel, mmsim) + [
            Difference(i, "mapcount", "mapcount (skewed)", {"skewed": 0}, {"skewed": 1})
            for i, st in enumerate(scenario.steps) if st["op"] == "mapcount"
        ]
    return compare_skewed
'''
PRELOAD = SKEW + '''
from mmsim.server.tools.conformance import tool

tool.compare = skewed(tool.compare)
'''


def _skewed() -> Callable[..., Any]:
    ns: dict[str, Any] = {}
    exec(SKEW, ns)
    return ns["skewed"]


def _until(what: str, ready: Callable[[], bool], procs: list[subprocess.Popen[bytes]], timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [p.args for p in procs if p.poll() is not None]
        assert not dead, f"exited while waiting for {what}: {dead}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:g} s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Dask scheduler on a free loopback port and two workers (one thread each, the conformance
    skew preloaded); its address."""
    d = tmp_path_factory.mktemp("dask")
    (d / "mmsim_skew.py").write_text(PRELOAD)
    sched_file = d / "scheduler.json"
    procs: list[subprocess.Popen[bytes]] = []
    logs = []

    def start(name: str, *args: str) -> None:
        log = (d / f"{name}.log").open("wb")
        logs.append(log)
        procs.append(subprocess.Popen([str(DASK), *args], cwd=d, stdout=log, stderr=subprocess.STDOUT,
                                      env={**os.environ, "PYTHONPATH": str(d)}))

    try:
        start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
              "--scheduler-file", str(sched_file))
        _until("scheduler file", lambda: sched_file.exists() and "address" in sched_file.read_text(), procs)
        address = json.loads(sched_file.read_text())["address"]
        for w in range(2):
            start(f"worker{w}", "worker", address, "--nthreads", "1", "--nworkers", "1", "--no-nanny",
                  "--no-dashboard", "--death-timeout", "60", "--preload", "mmsim_skew", "--local-directory", str(d))
        with cluster_mod.connect(address) as client:
            _until("two workers", lambda: len(client.nthreads()) == 2, procs)
        yield address
    finally:  # the workers first: a worker whose scheduler is gone waits for it
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in logs:
            log.close()


def _figures(s: Any) -> tuple[Any, ...]:
    rows = [(e.step, e.thread, e.kind, e.text) for e in s.first.events] if s.first else None
    return s.schedules, s.at, sorted(s.interleavings), sorted(s.findings), s.cut, dict(s.kinds), rows


@pytest.mark.parametrize("strategy", ["random", "pct"])
def test_a_search_gives_the_same_result_on_the_cluster_as_here(cluster: str, strategy: str) -> None:
    scn = load(LITMUS / "fast-path-race.litmus")
    here = explore(scn, "recheck-slow-only", strategy=strategy, schedules=400, seed=2)
    assert here.first is not None and here.at > 1  # a catch after some clean schedules
    for jobs, where in ((2, None), (1, cluster), (3, cluster)):
        there = explore(scn, "recheck-slow-only", strategy=strategy, schedules=400, seed=2, jobs=jobs, cluster=where)
        assert _figures(there) == _figures(here), (jobs, where)
    whole = explore(scn, "recheck-slow-only", strategy=strategy, schedules=300, seed=5, stop_on_catch=False)
    assert whole.schedules == 300 and whole.kinds
    assert _figures(explore(scn, "recheck-slow-only", strategy=strategy, schedules=300, seed=5,
                            stop_on_catch=False, cluster=cluster)) == _figures(whole)


def test_explore_on_the_cluster_from_the_command_line(
    cluster: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # one line per line, whatever the terminal the tests run in
    path = str(LITMUS / "fast-path-race.litmus")
    args = [path, "--protocol", "recheck-slow-only", "--strategy", "random", "--schedules", "400", "--seed", "2"]
    assert main(["explore", *args]) == 1
    here = capsys.readouterr().out.splitlines()
    assert main(["explore", *args, "--cluster", cluster]) == 1
    there = capsys.readouterr().out.splitlines()
    assert f"on the cluster at {cluster}" in there[0]
    assert there[0].split(", ")[:3] == here[0].split(", ")[:3]  # name, schedules and interleavings
    assert there[1:] == here[1:]  # the minimised trace and its replay token
    assert main(["explore", path, "--cluster", cluster]) == 2  # the exhaustive search stays here
    assert "--cluster runs the random and pct strategies" in capsys.readouterr().err


def test_the_mutation_score_and_kills_are_the_same_on_the_cluster(cluster: str) -> None:
    scenarios = [load(LITMUS / "anon-vma-reuse.litmus")]
    kills, score = mutation_score(scenarios, preemptions=2, schedules=30)
    assert 0 < score < 1 and any(not k.killed and not k.equivalent for k in kills)
    assert {k.strategy for k in kills if k.killed} == {"exhaustive", "random"}
    assert mutation_score(scenarios, preemptions=2, schedules=30, cluster=cluster) == (kills, score)


@pytest.mark.skipif(oracle_unavailable() is not None, reason=f"kernel oracle unavailable: {oracle_unavailable()}")
def test_random_conformance_gives_the_same_outcomes_with_the_workers_kernel(
        cluster: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    count = 2

    def skewed(seed: int) -> list[int]:
        """The lengths of the scenarios of ``seed`` that have a mapcount step."""
        rng = random.Random(seed)
        scenarios = [random_scenario(rng, name=f"random-{seed}-{n}") for n in range(count)]
        return [len(s.steps) for s in scenarios if any(st["op"] == "mapcount" for st in s.steps)]

    # a seed with one skewed scenario, a short one (quick to shrink), and others that are not
    seed = next(s for s in range(500) if len(n := skewed(s)) == 1 and n[0] <= 8)
    monkeypatch.setattr(tool, "compare", _skewed()(tool.compare))

    def run(**kw: Any) -> tuple[int, list[str]]:
        console = Console(record=True, width=400, force_terminal=False)
        status = asyncio.run(tool.conformance([], random_count=count, seed=seed, console=console, **kw))
        return status, console.export_text().splitlines()

    status, here = run(save=str(tmp_path / "here"))
    assert status == tool.EXIT_DIFFERENT and sum(line.startswith("DIFFERENT") for line in here) == 1
    status_there, there = run(save=str(tmp_path / "there"), cluster=cluster)
    kernel = f"Linux {platform.release()} ({platform.node()})"
    assert status_there == status
    assert [line for line in there if line.startswith("DIFFERENT")] == \
        [line + f"  on {kernel}" for line in here if line.startswith("DIFFERENT")]
    assert f"{count} random scenarios (seed {seed}) run on the cluster at {cluster}: {count} on {kernel}" in there
    assert [line for line in there if "random scenarios" not in line and not line.startswith("DIFFERENT")] == \
        [line for line in here if "random scenarios" not in line and not line.startswith("DIFFERENT")]
    saved = sorted(p.name for p in (tmp_path / "here").iterdir())
    assert saved and saved == sorted(p.name for p in (tmp_path / "there").iterdir())
    assert [(tmp_path / w / saved[0]).read_text() for w in ("here", "there")] == \
        [(tmp_path / "here" / saved[0]).read_text()] * 2


def test_a_cluster_that_cannot_be_used_is_one_line_and_status_2(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(LITMUS / "fast-path-race.litmus")
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        refused = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    assert main(["explore", path, "--strategy", "random", "--cluster", refused]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmsim explore: cannot reach the Dask scheduler at {refused}:") and err.count("\n") == 1
    assert main(["mutate", "--litmus", str(LITMUS), "--cluster", "nonsense://x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmsim mutate: not a Dask scheduler address: 'nonsense://x'") and err.count("\n") == 1
    assert main(["conformance", "--random", "2", "--server", "127.0.0.1:1", "--cluster", refused]) == 2
    assert "--cluster runs the --random scenarios" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "distributed", None)  # not installed
    with pytest.raises(ClusterError, match=r"pip install mmsim\[cluster\]"):
        explore(load(path), "recheck", strategy="random", cluster=refused)
    assert main(["conformance", "--random", "2", "--cluster", refused]) == 2
    assert "pip install mmsim[cluster]" in capsys.readouterr().err
