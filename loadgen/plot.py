"""One PNG of a load generator report: the latency distribution of each operation, throughput over
time and p99 over time.

It draws on a ``matplotlib.figure.Figure`` with the Agg canvas, without pyplot, so that nothing global
(the backend, pyplot's list of open figures) changes and it runs headless.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from mmsim.loadgen import histograms

#: The figures marked on each operation's distribution: latency_ms key -> percentile (None: the maximum).
MARKED: dict[str, float | None] = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 99.9, "max": None}
#: The lowest latency drawn on a log axis, in ms (a recorded 0 µs is drawn at 1 µs).
FLOOR_MS = histograms.LOWEST / 1000.0


def _nines(percentile: float) -> float:
    """Where a percentile sits on the distribution's x axis: 90% at 1, 99% at 2, 99.9% at 3, ..."""
    return -math.log10(1.0 - percentile / 100.0)


def _distribution(encoded: str) -> tuple[list[float], list[float]]:
    """The histogram's exact percentile distribution as steps: (nines, ms) points to draw "steps-post".

    Each recorded value (the highest equivalent value of its bucket, as HdrHistogram reports a
    percentile) holds from the fraction of calls below it to the fraction at or below it; a point is
    where the step starts. The last step, which runs to 100%, has no end here: the caller draws it on
    to the "max" position.
    """
    h = histograms.decode(encoded)
    total = h.get_total_count()
    xs: list[float] = []
    ys: list[float] = []
    below = 0
    for item in h.get_recorded_iterator():
        xs.append(_nines(100.0 * below / total))
        ys.append(max(item.value_iterated_to / 1000.0, FLOOR_MS))
        below = item.total_count_to_this_value
    return xs, ys


def _mantissa(v: float) -> int:
    return round(v / 10 ** math.floor(math.log10(v))) if v > 0 else 0


def _log_ms_axis(ax: Axes) -> None:
    """Label a log y axis of milliseconds 0.01, 0.1, 1, 10 (and 2, 3, 5 when it spans a decade or so)."""
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    low, high = ax.get_ylim()
    if low > 0 and high / low < 30:
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if _mantissa(v) in (2, 3, 5) else ""))
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())


def _title(report: Mapping[str, Any]) -> str:
    targets: Sequence[str] = report["targets"]
    where = ", ".join(targets[:3]) + (f" +{len(targets) - 3} more" if len(targets) > 3 else "")
    rate = report["target_rate"]
    if report["mode"] == "open":
        loop = f"open loop at {rate:g} ops/s" if rate is not None else "open loop"
    else:
        loop = "closed loop" + (f" (target {rate:g} ops/s)" if rate is not None else "")
    first = f"mmsim loadgen: {where} · protocol {report['server']['protocol']} · {loop}"
    second = (
        f"{report['duration_s']:g} s measured after {report['warmup_s']:g} s warm-up ({report['end_reason']})"
        f" · {report['overall']['count']} calls · late sends {report['late_sends']}"
    )
    if report["bottleneck"] == "client":
        second += " · CLIENT-BOUND: the figures are the generator's"
    return f"{first}\n{second}"


def _plot_latency(ax: Axes, operations: Mapping[str, Mapping[str, Any]]) -> None:
    max_x = 4.0
    lines: list[tuple[str, list[float], list[float], Mapping[str, float]]] = []
    for name, fig in operations.items():
        xs, ys = _distribution(fig["histogram"]) if fig["count"] else ([], [])
        if xs:
            max_x = max(max_x, float(math.ceil(xs[-1])))
        lines.append((name, xs, ys, fig["latency_ms"]) if fig["count"] else (name, [], [], {}))
    at_max = max_x + 1.0
    drawn = False
    for name, xs, ys, latency in lines:
        if not latency:
            ax.plot([], [], label=f"{name} (no calls)")
            continue
        drawn = True
        (line,) = ax.plot(xs + [at_max], ys + ys[-1:], label=name, linewidth=1.2, drawstyle="steps-post")
        mx = [at_max if p is None else _nines(p) for p in MARKED.values()]
        my = [max(latency[key], FLOOR_MS) for key in MARKED]
        ax.plot(mx, my, "o", color=line.get_color(), markersize=4)
    if drawn:
        ax.set_yscale("log")
        _log_ms_axis(ax)
    else:
        ax.text(0.5, 0.5, "no calls in the measured time", transform=ax.transAxes, ha="center", va="center")
        ax.set_yticks([])
    ticks = [_nines(50.0)] + [float(n) for n in range(1, int(max_x) + 1)] + [at_max]
    labels = ["50%"] + [f"{100 - 10.0 ** (2 - n):.{max(n - 2, 0)}f}%" for n in range(1, int(max_x) + 1)] + ["max"]
    ax.set_xticks(ticks, labels)
    ax.set_xlim(0, at_max + 0.2)
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms)")
    ax.set_title("latency distribution per operation (dots: the report's p50, p90, p99, p99.9, max)")
    ax.grid(True, which="major", alpha=0.3)
    if lines:
        ax.legend(loc="upper left", fontsize="small")


def _plot_throughput(ax: Axes, report: Mapping[str, Any]) -> None:
    series = report["timeseries"]
    t = [s["t"] for s in series]
    ax.plot(t, [s["ops"] for s in series], "o-", markersize=3, label="ops/s")
    if any(s["errors"] for s in series):
        ax.plot(t, [s["errors"] for s in series], "x-", markersize=3, color="tab:red", label="errors/s")
    if report["target_rate"] is not None:
        ax.axhline(report["target_rate"], linestyle="--", color="grey", linewidth=1, label="target rate")
    ax.set_ylim(bottom=0)
    if t:
        ax.set_xlim(min(t) - 0.5, max(t) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("time (s)")
    ax.set_ylabel("per second")
    ax.set_title("throughput over time")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")


def _plot_p99(ax: Axes, report: Mapping[str, Any]) -> None:
    series = report["timeseries"]
    t = [s["t"] for s in series]
    p99 = [math.nan if s["p99_ms"] is None else max(s["p99_ms"], FLOOR_MS) for s in series]
    p50 = [math.nan if s["p50_ms"] is None else max(s["p50_ms"], FLOOR_MS) for s in series]
    ax.plot(t, p99, "o-", markersize=3, color="tab:purple", label="p99")
    ax.plot(t, p50, "o:", markersize=3, color="tab:grey", label="p50")
    if any(not math.isnan(v) for v in p99 + p50):
        ax.set_yscale("log")
        _log_ms_axis(ax)
    else:
        ax.text(0.5, 0.5, "no latencies in the measured time", transform=ax.transAxes, ha="center", va="center")
        ax.set_yticks([])
    ax.set_xlabel("time (s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("p99 over time (per second)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")


def report_figure(report: Mapping[str, Any]) -> Figure:
    """The report's figure: three axes, latency distribution (top), throughput, p99 over time."""
    fig = Figure(figsize=(12, 11), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(3, 1, height_ratios=[1.5, 1, 1])
    latency, throughput, p99 = (fig.add_subplot(grid[i]) for i in range(3))
    throughput.sharex(p99)
    _plot_latency(latency, report["operations"])
    _plot_throughput(throughput, report)
    _plot_p99(p99, report)
    fig.suptitle(_title(report))
    return fig


def plot_report(report: Mapping[str, Any], path: str | Path) -> Figure:
    """Write the report's figure to ``path`` as a PNG; returns the figure (for inspection)."""
    fig = report_figure(report)
    fig.savefig(Path(path), format="png", dpi=100)
    return fig
