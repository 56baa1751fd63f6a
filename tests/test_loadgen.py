"""``mmsim loadgen`` against real servers (separate OS processes, as users run them)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hdrh.histogram import HdrHistogram
from rich.console import Console
from servers import ServerProcess, mmsim_serve

from mmsim.client import Client
from mmsim.loadgen import histograms
from mmsim.loadgen.cli import main
from mmsim.loadgen.profiles import PROFILES
from mmsim.loadgen.report import validate
from mmsim.loadgen.runner import Options, bottleneck, merge, run


def options(target: str, **kw: Any) -> Options:
    base: dict[str, Any] = dict(
        targets=(target,), duration=1.0, count=None, warmup=0.3, workers=1, concurrency=4, rate=None,
        profile="mixed", mix=tuple(PROFILES["mixed"].items()), pages=16, trees=1, fork_depth=1, seed=1,
        call_timeout=30.0, keep=False, json=None, plot=None, quiet=True,
    )
    base.update(kw)
    if "profile" in kw and "mix" not in kw:
        base["mix"] = tuple(PROFILES[kw["profile"]].items())
    return Options(**base)


async def server_state(addr: str) -> tuple[dict[str, int], list[str]]:
    async with Client(addr) as mm:
        return await mm.stats(), await mm.check_invariants()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with mmsim_serve() as s:
        yield s


@pytest.mark.parametrize("profile", list(PROFILES))
async def test_each_profile_runs_reports_and_cleans_up(server: ServerProcess, profile: str) -> None:
    report = await run(options(server.addr, profile=profile, workers=2 if profile == "mixed" else 1),
                       Console(quiet=True))
    validate(report)
    assert report["server"]["protocol"] == "recheck" and report["mode"] == "closed"
    assert report["overall"]["count"] > 0 and report["overall"]["failures"] == {}
    assert set(report["operations"]) <= set(PROFILES[profile])
    for name, f in report["operations"].items():
        assert f["count"] == f["ok"] + sum(f["errors"].values()) + sum(f["failures"].values())
        assert f["ops"] == f["ok"] * (256 if name in ("batch", "stream") else 1)
    assert report["overall"]["count"] == sum(f["count"] for f in report["operations"].values())
    assert sum(report["statuses"].values()) == report["overall"]["count"]
    assert report["server_deltas"].get("violations", 0) == 0
    assert len(report["client"]["cpu"]) == report["client"]["workers"]
    assert report["timeseries"] and 0 < sum(s["ops"] for s in report["timeseries"]) <= report["overall"]["ops"]
    assert len(report["timeseries"]) <= report["duration_s"] + 1
    stats, problems = await server_state(server.addr)
    assert problems == [] and stats["processes"] == 0 and stats["folios"] == 0  # everything it made is gone


async def test_count_mode_stops_at_the_count(server: ServerProcess) -> None:
    report = await run(options(server.addr, duration=None, count=300, warmup=0.0, workers=2, profile="remap"),
                       Console(quiet=True))
    assert report["end_reason"] == "count" and report["overall"]["count"] == 300


def test_merged_histograms_are_exact() -> None:
    """Merged counts equal the sum of the workers' counts, and merged percentiles equal those of one
    histogram fed every value."""
    rng = random.Random(7)
    one = histograms.new_histogram()
    results = []
    for w in range(3):
        h = histograms.new_histogram()
        series = HdrHistogram(1, histograms.HIGHEST, 2)
        for _ in range(5000):
            v = int(10 ** rng.uniform(1, 6.5))
            h.record_value(v)
            one.record_value(v)
            series.record_value(v)
        results.append({
            "ops": {"remap": {"hist": histograms.encode(h), "ok": 4990, "ops": 4990, "errors": {"EBUSY": 10},
                              "failures": {}}},
            "statuses": {"OK": 4990, "FAILED_PRECONDITION": 10}, "errnos": {"EBUSY": 10}, "late": w,
            "series": [[4990, 10, histograms.encode(series)]], "worker": w, "cpu_s": 1.0, "wall_s": 2.0,
            "end_reason": "duration",
        })
    merged = merge(results, options("x:1"), 2.0)
    remap = merged["operations"]["remap"]
    assert remap["count"] == 15000 == one.get_total_count()
    assert remap["latency_ms"] == histograms.percentiles(one)
    assert remap["errors"] == {"EBUSY": 30} and remap["ok"] == 3 * 4990 and merged["late_sends"] == 3
    assert histograms.decode(remap["histogram"]).get_total_count() == 15000
    assert merged["timeseries"][0]["ops"] == 3 * 4990


async def test_open_loop_keeps_its_schedule_through_a_stall() -> None:
    """The server is stopped (SIGSTOP) for a second in the middle of an open-loop run: the sends
    stay on their intended schedule, those that had to wait for a free lane are counted late, and
    the latencies, measured from the intended times, include the stall."""
    rate, duration, stall = 200.0, 3.0, 1.0
    with mmsim_serve() as s:
        opts = options(s.addr, rate=rate, duration=duration, warmup=0.5, concurrency=4, profile="remap")

        def stall_server() -> None:
            os.kill(s.pid, signal.SIGSTOP)
            threading.Event().wait(stall)  # the stall itself is the point of this test
            os.kill(s.pid, signal.SIGCONT)

        loop = asyncio.get_running_loop()
        loop.call_later(0.5 + opts.warmup + 1.0, lambda: threading.Thread(target=stall_server).start())
        report = await run(opts, Console(quiet=True))
        validate(report)
        assert report["mode"] == "open" and report["target_rate"] == rate
        # Every intended send of the measured time was made: the schedule was kept.
        assert abs(report["overall"]["count"] - rate * duration) <= rate * 0.05
        assert report["late_sends"] >= 0.5 * rate * stall  # most sends due during the stall left late
        lat = report["overall"]["latency_ms"]
        assert lat["max"] >= 0.8 * stall * 1000  # measured from the intended time: the wait is in it
        # Most sends were not held up by the stall (the median far below it), the slowest were.
        assert lat["p50"] < 0.5 * stall * 1000 < lat["p99"]
        stats, problems = await server_state(s.addr)
        assert problems == [] and stats["processes"] == 0


@pytest.mark.parametrize(("protocol", "caught"), [("recheck", False), ("no-recheck", True)])
async def test_the_race_profile_makes_the_recheck_fire(protocol: str, caught: bool) -> None:
    with mmsim_serve("--protocol", protocol, "--preempt", "0.05") as s:
        report = await run(options(s.addr, profile="race", duration=3.0, concurrency=16), Console(quiet=True))
        d = report["server_deltas"]
        assert report["server"]["protocol"] == protocol
        if caught:
            assert d.get("violations", 0) > 0  # without the recheck, walkers walk the old tree
        else:
            assert d.get("walk_fast_retries", 0) + d.get("walk_slow_retries", 0) > 0
            assert d.get("violations", 0) == 0
        stats, problems = await server_state(s.addr)
        assert problems == [] and stats["processes"] == 0


def test_the_command_writes_a_valid_report_and_a_plot(server: ServerProcess, tmp_path: Any, capsys: Any) -> None:
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    status = main(["--target", server.addr, "--duration", "1", "--warmup", "0.2", "--trees", "1", "--pages", "8",
                   "--fork-depth", "1", "--quiet", "--json", str(out), "--plot", str(png)])
    assert status == 0
    report = json.loads(out.read_text())
    validate(report)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "latency (ms) and throughput" in text and "protocol recheck" in text
    assert main(["--compare", str(out), str(out)]) == 0
    assert "×1.000" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["--rate", "0"], ["--workers", "0"], ["--concurrency", "-1"], ["--mix", "remap=x"], ["--mix", "nope=1"],
        ["--target", "nowhere"], ["--duration", "1", "--count", "5"], ["--profile", "fast"], ["--pages", "0"],
        ["--compare", "only-one.json"], ["--warmup", "nan"], ["--unknown"], ["--token-file", "/no/such/file"],
        ["--tls-cert", __file__], ["--metrics-url", "h:1", "--stats-from", "grpc"], ["--metrics-url", "ftp://h/"],
        ["--stats-from", "prometheus"], ["--profile", "gc", "--workers", "3", "--trees", "2"],
    ],
)
def test_bad_options_are_one_line_and_status_2(argv: list[str], capsys: Any) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("mmsim loadgen: error: ") and "Traceback" not in err


def test_the_mmsim_command_hands_loadgen_its_arguments() -> None:
    r = subprocess.run([sys.executable, "-m", "mmsim.server", "loadgen", "--rate", "0"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and r.stderr == "mmsim loadgen: error: argument --rate: must be a positive number\n"


def test_an_unreachable_target_is_one_line_and_status_4() -> None:
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "mmsim.server", "loadgen", "--target", f"127.0.0.1:{port}", "--quiet",
                        "--duration", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 4, r.stderr
    assert r.stderr.count("\n") == 1 and "cannot reach" in r.stderr and "Traceback" not in r.stderr


def test_the_server_command_does_not_import_the_load_generator() -> None:
    code = (
        "import sys; from mmsim.server import cli; cli.build_parser();"
        "bad = [m for m in sys.modules if m.startswith('mmsim.loadgen')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_make_demo_runs_the_race_profile_and_writes_its_plot(tmp_path: Any) -> None:
    """What `make demo` runs, shortened."""
    r = subprocess.run(
        [sys.executable, "-m", "mmsim.loadgen.demo", "--duration", "1", "--plot", str(tmp_path / "d.png"),
         "--json", str(tmp_path / "d.json")],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "d.json").read_text())
    validate(report)
    assert report["options"]["profile"] == "race" and report["server"]["protocol"] == "recheck"
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"
    assert "violations" in r.stdout and "latency (ms) and throughput" in r.stdout


def test_ctrl_c_stops_the_run_and_still_reports(server: ServerProcess, tmp_path: Any) -> None:
    """SIGINT to the generator: the workers stop issuing calls, what was measured is reported
    (end_reason "interrupted"), and the workload is torn down."""
    out = tmp_path / "r.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmsim.server", "loadgen", "--target", server.addr, "--duration", "120", "--warmup", "0",
         "--trees", "1", "--pages", "8", "--json", str(out), "--profile", "remap"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    before = asyncio.run(server_state(server.addr))[0].get("move_pages", 0)
    while asyncio.run(server_state(server.addr))[0].get("move_pages", 0) < before + 200:  # the run is under way
        assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, stdout
    report = json.loads(out.read_text())
    validate(report)
    assert report["end_reason"] == "interrupted" and report["overall"]["count"] > 0
    assert report["duration_s"] < 60
    stats, problems = asyncio.run(server_state(server.addr))
    assert problems == [] and stats["processes"] == 0


def test_a_saturated_generator_is_flagged(capsys: Any) -> None:
    from mmsim.loadgen.report import print_summary

    busy, idle = {"worker": 0, "cpu_s": 4.8, "wall_s": 5.0, "utilization": 0.96}, {"worker": 1, "cpu_s": 2.0,
                                                                                    "wall_s": 5.0, "utilization": 0.4}
    assert bottleneck([idle]) == "server" and bottleneck([idle, busy]) == "client"
    report = json.loads((Path(__file__).parent / "data" / "loadgen-report.json").read_text())
    report["client"]["cpu"], report["bottleneck"] = [idle, busy], "client"
    validate(report)
    print_summary(report, Console(width=200))
    assert "the client was the bottleneck" in capsys.readouterr().out


def test_gc_lanes_put_every_lane_of_a_tree_in_the_worker_of_its_collector() -> None:
    from mmsim.loadgen.workload import TreeSpec, Workload, gc_lanes_per_tree, gc_trees

    w = Workload(trees=[TreeSpec(None, None, f"h{t}", t, (), 0, 4, 0, 0, 100, 0, 4, gc=1, gc_pages=4)
                        for t in range(5)])
    workers, concurrency = 2, 7
    lanes = w.gc_lanes(workers, concurrency)
    assert len(lanes) == workers * concurrency and all(lane.gc for lane in lanes)
    for i in range(workers):
        mine = lanes[i * concurrency:(i + 1) * concurrency]
        assert {lane.tree for lane in mine} == set(gc_trees(i, workers, 5))  # and each of its trees has lanes
    most = max(sum(1 for lane in lanes if lane.tree == t) for t in range(5))
    assert most <= gc_lanes_per_tree(workers, concurrency, 5)


@pytest.mark.parametrize("protocol", ["recheck", "folio-lock"])
async def test_the_gc_profile_collects_under_a_safe_protocol(protocol: str) -> None:
    """Two workers, each with the collector of its tree: mutators fault on the emptied heap and
    are woken by the collector's moves, walks walk the same folios; no violation, no read left
    waiting (the run ends at its duration, without a failed call), and nothing left behind."""
    with mmsim_serve("--protocol", protocol, "--preempt", "0.05") as s:
        report = await run(options(s.addr, profile="gc", duration=1.5, warmup=0.3, workers=2, concurrency=4,
                                   trees=None, call_timeout=5.0), Console(quiet=True))  # a stuck move fails fast
        validate(report)
        assert report["server"]["protocol"] == protocol and report["options"]["trees"] == 2
        ops = report["operations"]
        assert ops["gc_read"]["ok"] > 0 and ops["gc_read"]["errors"] == {}  # every read woken, with its value
        assert ops["walk"]["ok"] + ops["walk_blocking"]["ok"] > 0
        assert set(report["errnos"]) <= {"ENOENT"}  # a walk of a page that moved meanwhile
        assert report["overall"]["failures"] == {}
        assert report["duration_s"] < 1.5 + 1.0  # ended at --duration: no read was left asleep
        gc = report["gc"]
        assert gc["trees"] == 2 and gc["cycles"] > 0 and gc["moves"] > 0
        assert set(gc) <= {"trees", "cycles", "cycles_started", "faults", "moves", "move_EEXIST", "move_ENOENT",
                           "move_retries", "faults_already_back", "second_faults", "moved_at_end", "stray_faults"}
        assert gc.get("stray_faults", 0) == 0
        d = report["server_deltas"]
        assert d.get("violations", 0) == 0 and d.get("uffd_faults", 0) > 0 and d.get("move_pages", 0) > 0
        stats, problems = await server_state(s.addr)
        assert problems == [] and stats["processes"] == 0 and stats["folios"] == 0
