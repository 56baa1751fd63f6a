"""The load generator's shared HDR helpers, its PNG plot and its side-by-side comparison of runs."""

from __future__ import annotations

import copy
import json
import math
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hdrh.histogram import HdrHistogram
from jsonschema.validators import validator_for
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from mmsim.loadgen import compare as cmp
from mmsim.loadgen import histograms as hg
from mmsim.loadgen.plot import plot_report
from mmsim.loadgen.report import schema as report_schema

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _values(seed: int, n: int) -> list[int]:
    """Latencies in µs, log-uniform from 1 µs to 10 s."""
    rng = random.Random(seed)
    return [round(10 ** rng.uniform(0, 7)) for _ in range(n)]


def _histogram(values: Iterable[float]) -> HdrHistogram:
    h = hg.new_histogram()
    for v in values:
        hg.record(h, v)
    return h


# --- histograms ---------------------------------------------------------------------------------


def test_merge_is_exact() -> None:
    values = _values(7, 20_000)
    parts = [_histogram(values[i::4]) for i in range(4)]
    whole = _histogram(values)
    merged = hg.merge(parts)
    assert merged.get_total_count() == sum(p.get_total_count() for p in parts) == len(values)
    assert hg.percentiles(merged) == hg.percentiles(whole)
    assert merged.equals(whole)
    assert merged.get_min_value() == whole.get_min_value() and merged.get_max_value() == whole.get_max_value()
    # The parts are left as they were.
    assert [p.get_total_count() for p in parts] == [5000] * 4


def test_percentiles_are_milliseconds_within_the_precision() -> None:
    values = sorted(_values(11, 10_001))
    got = hg.percentiles(_histogram(values))
    assert list(got) == ["min", "mean", "p50", "p90", "p99", "p99.9", "p99.99", "max"]
    for key, p in hg.PERCENTILES.items():
        exact_ms = values[math.ceil(p / 100 * len(values)) - 1] / 1000
        assert got[key] == pytest.approx(exact_ms, rel=2e-3), key
    assert got["min"] == pytest.approx(values[0] / 1000, rel=2e-3)
    assert got["max"] == pytest.approx(values[-1] / 1000, rel=2e-3)
    assert got["mean"] == pytest.approx(sum(values) / len(values) / 1000, rel=2e-3)


def test_merge_of_an_empty_part_keeps_the_minimum() -> None:
    merged = hg.merge([_histogram([5000, 7000]), hg.new_histogram()])
    assert merged.get_total_count() == 2
    assert hg.percentiles(merged)["min"] == pytest.approx(5.0, rel=1e-3)


def test_encode_decode_round_trip() -> None:
    h = _histogram(_values(3, 5000))
    text = hg.encode(h)
    assert isinstance(text, str) and text.isascii()
    back = hg.decode(text)
    assert back.get_total_count() == 5000
    assert back.equals(h)
    assert hg.percentiles(back) == hg.percentiles(h)
    assert hg.encode(back) == text
    empty = hg.decode(hg.encode(hg.new_histogram()))
    assert empty.get_total_count() == 0


def test_empty_histogram_percentiles_are_zero() -> None:
    got = hg.percentiles(hg.new_histogram())
    assert got == {k: 0.0 for k in ("min", "mean", "p50", "p90", "p99", "p99.9", "p99.99", "max")}
    assert all(type(v) is float for v in got.values())


def test_record_clamps_to_the_range() -> None:
    h = hg.new_histogram()
    hg.record(h, 120_000_000)  # two minutes: past HIGHEST, hdrh alone would drop it
    hg.record(h, -3)
    assert h.get_total_count() == 2
    assert hg.percentiles(h)["max"] == pytest.approx(hg.HIGHEST / 1000, rel=1e-3)


def test_figures() -> None:
    h = _histogram([1000, 2000, 3000, 4000])
    f = hg.figures(h, ok=3, errors={"EBUSY": 1}, failures={}, duration_s=2.0)
    assert f["count"] == 4 and f["ok"] == 3 and f["errors"] == {"EBUSY": 1} and f["failures"] == {}
    assert f["throughput"] == 2.0
    assert f["latency_ms"] == hg.percentiles(h)
    encoded = f["histogram"]
    assert isinstance(encoded, str)
    assert hg.decode(encoded).equals(h)
    assert hg.figures(h, 4, {}, {}, 0)["throughput"] == 0


# --- synthetic reports --------------------------------------------------------------------------


def _report(
    seed: int,
    scale: float,
    ops: dict[str, int],
    *,
    seconds: int = 10,
    protocol: str = "kernel",
    rate: float | None = 2000.0,
    deltas: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A report as the load generator writes it: ``ops`` is operation -> calls, latencies times ``scale``."""
    rng = random.Random(seed)
    hists: dict[str, HdrHistogram] = {}
    operations = {}
    all_errors: dict[str, int] = {}
    for name, n in ops.items():
        h = hg.new_histogram()
        for _ in range(n):
            hg.record(h, scale * rng.lognormvariate(math.log(300), 0.8))
        errors = {"EBUSY": n // 50} if name == "remap" and n else {}
        for k, v in errors.items():
            all_errors[k] = all_errors.get(k, 0) + v
        operations[name] = hg.figures(h, n - sum(errors.values()), errors, {}, float(seconds))
        hists[name] = h
    overall_h = hg.merge(hists.values())
    total = overall_h.get_total_count()
    overall = hg.figures(overall_h, total - sum(all_errors.values()), all_errors, {}, float(seconds))
    timeseries = [
        {
            "t": t,
            "ops": total // seconds + rng.randint(-20, 20),
            "errors": sum(all_errors.values()) // seconds,
            "p50_ms": round(0.3 * scale * rng.uniform(0.9, 1.1), 3),
            "p99_ms": round(2.0 * scale * rng.uniform(0.8, 1.5), 3),
        }
        for t in range(seconds)
    ]
    return {
        "schema": "mmsim.loadgen.report/1",
        "created": "2026-11-26T10:00:00Z",
        "versions": {"mmsim": "0.1.0", "python": "3.12.3", "grpcio": "1.85.1", "hdrhistogram": "0.10.8"},
        "git_revision": "3e450ad",
        "options": {"target": ["127.0.0.1:50051"], "rate": rate, "duration": seconds, "profile": "mixed"},
        "targets": ["127.0.0.1:50051"],
        "server": {"protocol": protocol},
        "mode": "open" if rate is not None else "closed",
        "target_rate": rate,
        "warmup_s": 2.0,
        "duration_s": float(seconds),
        "end_reason": "duration",
        "operations": operations,
        "overall": overall,
        "statuses": {"OK": total},
        "errnos": all_errors,
        "late_sends": 3,
        "timeseries": timeseries,
        "server_deltas": {
            "walk": 1000,
            "walk_fast_retries": 10,
            "walk_slow_retries": 2,
            "walk_contended": 0,
            "move_retry": 40,
            "violations": 0,
            "processes": 0,
        }
        | (deltas or {}),
        "client": {
            "workers": 1,
            "concurrency": 64,
            "cpu": [{"worker": 0, "cpu_s": 4.1, "wall_s": 10.0, "utilization": 0.41}],
        },
        "bottleneck": "server",
    }


@pytest.fixture(scope="module")
def run_a() -> dict[str, Any]:
    return _report(1, 1.0, {"remap": 3000, "walk": 2000, "fork": 300})


@pytest.fixture(scope="module")
def run_b() -> dict[str, Any]:
    return _report(
        2, 1.7, {"remap": 2500, "walk": 2100, "mmap": 200}, protocol="fixed", deltas={"move_retry": 10, "violations": 2}
    )


def test_the_synthetic_reports_are_reports(run_a: dict[str, Any], run_b: dict[str, Any]) -> None:
    validator = validator_for(report_schema())(report_schema())
    validator.check_schema(report_schema())
    for r in (run_a, run_b):
        assert not list(validator.iter_errors(r))


# --- plot ---------------------------------------------------------------------------------------


def _check_png(path: Path, fig: Any) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 20_000
    assert len(fig.axes) == 3


def test_plot_report(tmp_path: Path, run_a: dict[str, Any]) -> None:
    out = tmp_path / "run.png"
    fig = plot_report(run_a, out)
    _check_png(out, fig)
    latency, throughput, p99 = fig.axes
    assert latency.get_yscale() == "log" and p99.get_yscale() == "log"
    labels = [t.get_text() for t in latency.get_legend().get_texts()]
    assert labels == ["remap", "walk", "fork"]
    # One distribution line per operation, ending at its max; one marker set (5 dots) per operation.
    dist = [ln for ln in latency.get_lines() if ln.get_linestyle() != "None"]
    dots = [ln for ln in latency.get_lines() if ln.get_linestyle() == "None"]
    assert len(dist) == 3 and [len(np.asarray(d.get_xdata())) for d in dots] == [5, 5, 5]
    assert np.asarray(dist[0].get_ydata())[-1] == pytest.approx(run_a["operations"]["remap"]["latency_ms"]["max"])
    assert list(np.asarray(throughput.get_lines()[0].get_ydata())) == [s["ops"] for s in run_a["timeseries"]]
    assert list(np.asarray(p99.get_lines()[0].get_ydata())) == [s["p99_ms"] for s in run_a["timeseries"]]
    title = fig.get_suptitle()
    assert "127.0.0.1:50051" in title and "kernel" in title and "open loop at 2000 ops/s" in title


def test_plot_edge_cases(tmp_path: Path) -> None:
    # One operation, one second of timeseries, a closed loop.
    r = _report(5, 1.0, {"walk": 50}, seconds=1, rate=None)
    fig = plot_report(r, tmp_path / "one.png")
    _check_png(tmp_path / "one.png", fig)
    assert "closed loop" in fig.get_suptitle()
    # An operation with no calls, and seconds with no latency at all.
    r = _report(6, 1.0, {"remap": 100, "fork": 0}, seconds=3)
    r["timeseries"][1].update(ops=0, p50_ms=None, p99_ms=None)
    fig = plot_report(r, tmp_path / "zero.png")
    _check_png(tmp_path / "zero.png", fig)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["remap", "fork (no calls)"]
    # Nothing at all ran.
    r = _report(7, 1.0, {"fork": 0}, seconds=1)
    r["timeseries"][0].update(ops=0, p50_ms=None, p99_ms=None)
    fig = plot_report(r, str(tmp_path / "none.png"))
    assert (tmp_path / "none.png").read_bytes()[:8] == PNG_SIGNATURE and len(fig.axes) == 3
    # No operation ran at all, and the run ended before its first second.
    r["operations"], r["timeseries"], r["duration_s"] = {}, [], 0.4
    fig = plot_report(r, tmp_path / "empty.png")
    assert (tmp_path / "empty.png").read_bytes()[:8] == PNG_SIGNATURE and len(fig.axes) == 3
    assert fig.axes[0].get_legend() is None


# --- compare ------------------------------------------------------------------------------------


def _cells(table: Table) -> dict[tuple[str, str], list[Text]]:
    """(operation, figure) -> the run cells of that row."""
    columns = [list(c.cells) for c in table.columns]
    out: dict[tuple[str, str], list[Text]] = {}
    section = ""
    for i in range(table.row_count):
        label, figure = str(columns[0][i]), str(columns[1][i])
        section = label or section
        out[(section, figure)] = [_text(c[i]) for c in columns[2:]]
    return out


def _text(cell: RenderableType) -> Text:
    """A run cell, which compare() makes a Text."""
    assert isinstance(cell, Text), cell
    return cell


def _ratio_style(cell: Text) -> str:
    """The style of the ``×ratio`` part of a cell ("" if none)."""
    assert "×" in cell.plain
    spans = [s for s in cell.spans if cell.plain[s.start : s.end].startswith("×")]
    return str(spans[0].style) if spans else ""


def test_compare_ratios(run_a: dict[str, Any], run_b: dict[str, Any]) -> None:
    table = cmp.compare([run_a, run_b], ["A", "B"])
    assert [c.header for c in table.columns][2:] == ["A", "B"]
    cells = _cells(table)

    a, b = run_a["operations"]["remap"], run_b["operations"]["remap"]
    a_p99, b_p99 = cells[("remap", "p99 (ms)")]
    assert str(a_p99) == f"{a['latency_ms']['p99']:.3f}"
    expected = b["latency_ms"]["p99"] / a["latency_ms"]["p99"]
    assert 1.3 < expected < 2.2  # B's latencies are 1.7 times A's
    assert str(b_p99) == f"{b['latency_ms']['p99']:.3f} ×{expected:.3f}"
    assert _ratio_style(b_p99) == "red"  # slower

    _, b_tp = cells[("remap", "throughput (calls/s)")]
    assert str(b_tp) == f"{b['throughput']:.3f} ×{b['throughput'] / a['throughput']:.3f}"
    assert b["throughput"] < a["throughput"] and _ratio_style(b_tp) == "red"  # less throughput
    _, w_b = cells[("walk", "throughput (calls/s)")]
    assert _ratio_style(w_b) == "green"  # walk: 2100 calls against 2000

    for key in ("p50", "p90", "p99.9", "max"):
        oa, ob = run_a["overall"]["latency_ms"][key], run_b["overall"]["latency_ms"][key]
        assert str(cells[("overall", f"{key} (ms)")][1]) == f"{ob:.3f} ×{ob / oa:.3f}"

    # An operation of one run only.
    fork_p99 = run_a["operations"]["fork"]["latency_ms"]["p99"]
    assert [str(c) for c in cells[("fork", "p99 (ms)")]] == [f"{fork_p99:.3f}", "—"]
    assert str(cells[("mmap", "p99 (ms)")][0]) == "—"
    assert str(cells[("mmap", "p99 (ms)")][1]) == f"{run_b['operations']['mmap']['latency_ms']['p99']:.3f}"

    # The run's settings and the server counters.
    assert [str(c) for c in cells[("run", "server protocol")]] == ["kernel", "fixed"]
    assert [str(c) for c in cells[("run", "mode")]] == ["open", "open"]
    assert [str(c) for c in cells[("run", "target rate (ops/s)")]] == ["2000", "2000"]
    assert [str(c) for c in cells[("run", "late sends")]] == ["3", "3 ×1.000"]
    errors_a = sum(run_a["overall"]["errors"].values())
    errors_b = sum(run_b["overall"]["errors"].values())
    assert [str(c) for c in cells[("run", "errors (errno)")]] == [
        f"{errors_a}",
        f"{errors_b} ×{errors_b / errors_a:.3f}",
    ]
    assert [str(c) for c in cells[("server", "move_retry")]] == ["40", "10 ×0.250"]
    assert _ratio_style(cells[("server", "move_retry")][1]) == "green"
    assert [str(c) for c in cells[("server", "violations")]] == ["0", "2 ×∞"]
    for key in cmp.SERVER_DELTAS:
        assert ("server", key) in cells


def test_compare_of_a_run_with_itself_is_all_ones(run_a: dict[str, Any]) -> None:
    cells = _cells(cmp.compare([run_a, run_a, run_a], ["x", "y", "z"]))
    for (section, figure), row in cells.items():
        if section in ("remap", "walk", "fork", "overall"):
            assert all(str(c).endswith(" ×1.000") for c in row[1:]), (section, figure)
            assert all(_ratio_style(c) == "" for c in row[1:])


def test_compare_ops_per_second(run_a: dict[str, Any], run_b: dict[str, Any]) -> None:
    """ops/s (a batch call counts its operations) is compared for every operation."""
    a, b = copy.deepcopy(run_a), copy.deepcopy(run_b)
    a["operations"]["remap"]["ops_per_s"] = 76800.0
    b["operations"]["remap"]["ops_per_s"] = 64000.0
    cells = _cells(cmp.compare([a, b], ["A", "B"]))
    assert [str(c) for c in cells[("remap", "ops/s")]] == ["76800.000", "64000.000 ×0.833"]
    assert _ratio_style(cells[("remap", "ops/s")][1]) == "red"
    walk_a, walk_b = a["operations"]["walk"]["ops_per_s"], b["operations"]["walk"]["ops_per_s"]
    assert [str(c) for c in cells[("walk", "ops/s")]] == [f"{walk_a:.3f}", f"{walk_b:.3f} ×{walk_b / walk_a:.3f}"]


def test_compare_an_operation_without_calls() -> None:
    """No calls, no latency: the other run's latency stands alone, not "×∞" against a 0."""
    a = _report(8, 1.0, {"remap": 100, "mmap": 0}, seconds=2)
    b = _report(9, 1.0, {"remap": 100, "mmap": 40}, seconds=2)
    cells = _cells(cmp.compare([a, b], ["A", "B"]))
    mmap_p99 = b["operations"]["mmap"]["latency_ms"]["p99"]
    assert [str(c) for c in cells[("mmap", "p99 (ms)")]] == ["—", f"{mmap_p99:.3f}"]
    assert [str(c) for c in cells[("mmap", "throughput (calls/s)")]] == ["0.000", "20.000 ×∞"]


def test_print_compare(tmp_path: Path, run_a: dict[str, Any], run_b: dict[str, Any]) -> None:
    for name, r in (("before", run_a), ("after", run_b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    console = Console(record=True, width=200, color_system=None)
    cmp.print_compare([str(tmp_path / "before.json"), tmp_path / "after.json"], console)
    text = console.export_text()
    assert "before" in text and "after" in text
    b, a = run_b["overall"]["latency_ms"]["p99"], run_a["overall"]["latency_ms"]["p99"]
    assert f"×{b / a:.3f}" in text


def test_not_a_report_is_a_value_error(tmp_path: Path, run_a: dict[str, Any]) -> None:
    bad = copy.deepcopy(run_a)
    del bad["overall"]
    with pytest.raises(ValueError, match=r"'overall' is a required property"):
        cmp.compare([run_a, bad], ["A", "bad"])

    bad = copy.deepcopy(run_a)
    bad["operations"]["remap"]["latency_ms"]["p99"] = "slow"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"bad\.json is not an mmsim loadgen report: 'slow' is not of type 'number'"
                       r" \(at \$\.operations\.remap\.latency_ms\.p99\)"):
        cmp.print_compare([tmp_path / "bad.json"], Console(file=None, record=True))

    (tmp_path / "notes.json").write_text("p99 was fine\n")
    with pytest.raises(ValueError, match=r"notes\.json is not an mmsim loadgen report: not JSON"):
        cmp.load_report(tmp_path / "notes.json")

    (tmp_path / "other.json").write_text(json.dumps({"schema": "something/else"}))
    with pytest.raises(ValueError, match=r"other\.json is not an mmsim loadgen report"):
        cmp.load_report(tmp_path / "other.json")

    with pytest.raises(ValueError, match="nothing to compare"):
        cmp.compare([], [])
    with pytest.raises(ValueError, match="2 reports but 1 names"):
        cmp.compare([run_a, run_a], ["A"])
