"""Side by side: the reports of several load generator runs, each after the first with its ratio to the
first (``1.234 ×0.913``), red where it is worse and green where it is better.

Every report is checked against ``report.schema.json`` (shipped in this package) first: a file that is
not a report is a ValueError that says what is wrong and where.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .report import validate as validate_report

#: The latency figures compared, by their key in ``latency_ms``.
LATENCIES: tuple[str, ...] = ("p50", "p90", "p99", "p99.9", "max")
#: The server counters compared (from ``server_deltas``); more of any of them is worse.
SERVER_DELTAS: tuple[str, ...] = (
    "walk_fast_retries",
    "walk_slow_retries",
    "walk_contended",
    "move_retry",
    "violations",
)
#: A ratio this close to 1 is not coloured: it is noise.
TOLERANCE = 0.01
#: What a cell shows where the run has no such figure.
ABSENT = "—"

WORSE = "red"
BETTER = "green"


def load_report(path: str | Path) -> dict[str, Any]:
    """Read and validate one report; a ValueError if it is not JSON or not a report."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not an mmsim loadgen report: not JSON ({exc})") from exc
    validate_report(report, str(path))
    assert isinstance(report, dict)
    return report


def _ratio_text(value: float, base: float | None, higher_is_worse: bool, fmt: Callable[[float], str]) -> Text:
    """``value`` then, if there is a base to compare with, ``×ratio`` coloured by which way it went."""
    text = Text(fmt(value))
    if base is None:
        return text
    if base == 0:
        if value == 0:
            return text
        ratio = math.inf
    else:
        ratio = value / base
    if abs(ratio - 1.0) <= TOLERANCE:
        style = ""
    else:
        style = WORSE if (ratio > 1.0) == higher_is_worse else BETTER
    text.append(" ")
    text.append("×∞" if math.isinf(ratio) else f"×{ratio:.3f}", style=style)
    return text


def _float(value: float) -> str:
    return f"{value:.3f}"


def _int(value: float) -> str:
    return f"{int(value)}"


def _numeric_row(
    values: Sequence[float | None], higher_is_worse: bool, fmt: Callable[[float], str] = _float
) -> list[Text]:
    """One cell per run: ABSENT where None, else the value and, after the first run, its ratio to it."""
    base = values[0]
    cells = []
    for i, value in enumerate(values):
        if value is None:
            cells.append(Text(ABSENT))
        else:
            cells.append(_ratio_text(value, None if i == 0 else base, higher_is_worse, fmt))
    return cells


def _figures_rows(table: Table, label: str, figures: Sequence[Mapping[str, Any] | None]) -> None:
    """The throughput and latency rows of one operation (or of the overall figures)."""
    rows: list[tuple[str, list[float | None], bool]] = [
        ("throughput (calls/s)", [None if f is None else f["throughput"] for f in figures], False),
    ]
    if any(f is not None and "ops_per_s" in f for f in figures):
        # A Batch or stream call carries many operations: ops/s is what compares it with unary calls.
        rows.append(("ops/s", [None if f is None else f.get("ops_per_s") for f in figures], False))
    for key in LATENCIES:
        # No calls, no latency: a 0 there is no figure to compare with.
        rows.append((f"{key} (ms)", [None if not f or not f["count"] else f["latency_ms"][key] for f in figures], True))
    for n, (metric, values, higher_is_worse) in enumerate(rows):
        table.add_row(
            label if n == 0 else "",
            metric,
            *_numeric_row(values, higher_is_worse),
            end_section=n == len(rows) - 1,
        )


def _plain_row(table: Table, label: str, metric: str, values: Sequence[str]) -> None:
    first = values[0]
    cells = [Text(v) if i == 0 or v == first else Text(v, style="bold") for i, v in enumerate(values)]
    table.add_row(label, metric, *cells)


def compare(reports: Sequence[Mapping[str, Any]], names: Sequence[str]) -> Table:
    """The table of ``reports`` side by side, one column per run, named by ``names``.

    Rows: the run's settings (server protocol, mode, target rate), late sends, errors and failures;
    for each operation (in the order they first appear) and overall: throughput, p50, p90, p99, p99.9 and
    max; then the main server counters. Each run after the first shows its value and ``×`` its ratio to
    the first run's, red where worse (slower, less throughput, more errors), green where better.
    """
    if not reports:
        raise ValueError("nothing to compare: no reports")
    if len(reports) != len(names):
        raise ValueError(f"{len(reports)} reports but {len(names)} names")
    for report, name in zip(reports, names, strict=True):
        validate_report(report, name)

    table = Table(title="mmsim loadgen: runs compared (ratios to the first run)")
    table.add_column("operation", style="bold")
    table.add_column("figure")
    for name in names:
        table.add_column(name, justify="right")

    def rate(r: Mapping[str, Any]) -> str:
        return "—" if r["target_rate"] is None else f"{r['target_rate']:g}"

    _plain_row(table, "run", "server protocol", [r["server"]["protocol"] for r in reports])
    _plain_row(table, "", "shards (routing)", [_shards(r["server"]) for r in reports])
    _plain_row(table, "", "mode", [r["mode"] for r in reports])
    _plain_row(table, "", "target rate (ops/s)", [rate(r) for r in reports])
    _plain_row(table, "", "measured (s)", [f"{r['duration_s']:g} ({r['end_reason']})" for r in reports])
    _plain_row(table, "", "bottleneck", [r["bottleneck"] for r in reports])
    table.add_row("", "late sends", *_numeric_row([r["late_sends"] for r in reports], True, _int))
    table.add_row(
        "", "errors (errno)", *_numeric_row([sum(r["overall"]["errors"].values()) for r in reports], True, _int)
    )
    table.add_row(
        "",
        "failures (gRPC)",
        *_numeric_row([sum(r["overall"]["failures"].values()) for r in reports], True, _int),
        end_section=True,
    )

    operations: dict[str, None] = {}
    for r in reports:
        operations.update(dict.fromkeys(r["operations"]))
    for op in operations:
        _figures_rows(table, op, [r["operations"].get(op) for r in reports])
    _figures_rows(table, "overall", [r["overall"] for r in reports])

    for n, key in enumerate(SERVER_DELTAS):
        values = [r["server_deltas"].get(key) for r in reports]
        cells = _numeric_row(values, True, _int)
        if key == "violations":
            for cell, value in zip(cells, values, strict=True):
                if value:
                    cell.stylize("bold red", 0, len(_int(value)))
        table.add_row("server" if n == 0 else "", key, *cells)
    return table


def _shards(server: Mapping[str, Any]) -> str:
    return f"{server['shards']} ({server.get('routing', '?')})" if "shards" in server else "—"


def print_compare(paths: Sequence[str | Path], console: Console) -> None:
    """Load, validate and print the comparison of the reports at ``paths`` (named by their file names)."""
    reports = [load_report(p) for p in paths]
    names = [Path(p).stem for p in paths]
    if len(set(names)) != len(names):
        names = [str(p) for p in paths]
    console.print(compare(reports, names))
