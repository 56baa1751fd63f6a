"""The report of a run: validation against its JSON Schema, and the summary on the terminal."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from jsonschema.exceptions import best_match
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

#: Protocols under which any detector violation is a bug (shown in red).
SAFE_PROTOCOLS = frozenset({"recheck", "folio-lock"})
#: The server counters the summary shows first, as deltas over the run.
KEY_DELTAS = (
    "walk", "walk_fast_retries", "walk_slow_retries", "walk_contended", "move_pages", "move_retry", "fork",
    "anon_vma_reuse", "anon_vma_alloc", "anon_vma_free", "preempt_yields", "violations",
)


@cache
def schema() -> dict[str, Any]:
    """The report's JSON Schema, as shipped in the ``mmsim.loadgen`` package."""
    loaded: dict[str, Any] = json.loads(
        resources.files("mmsim.loadgen").joinpath("report.schema.json").read_text(encoding="utf-8")
    )
    return loaded


@cache
def _validator() -> Validator:
    cls = validator_for(schema())
    cls.check_schema(schema())
    return cls(schema())


def validate(report: object, name: str = "report") -> None:
    """Raise a ValueError naming the first problem (the most relevant one) if ``report`` is not a report."""
    error = best_match(_validator().iter_errors(report))  # type: ignore[arg-type]  # any object: a non-JSON one fails
    if error is not None:
        raise ValueError(f"{name} is not an mmsim loadgen report: {error.message} (at {error.json_path})")
    assert isinstance(report, dict)
    server, targets = report["server"], report["targets"]
    routing = server.get("routing")
    if routing in ("direct", "proxy") and len(targets) != 1:
        raise ValueError(f"{name} is not an mmsim loadgen report: routing {routing} with {len(targets)} targets "
                         "(at $.server.routing)")
    if routing == "static" and server.get("shards", len(targets)) != len(targets):
        raise ValueError(f"{name} is not an mmsim loadgen report: static routing to {len(targets)} targets counts "
                         f"{server['shards']} shards (at $.server.shards)")


def _ms(v: float) -> str:
    return f"{v:,.3f}" if v < 100 else f"{v:,.1f}"


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])) or "—"


def summary(report: dict[str, Any]) -> Group:
    """Rich tables of a report: per-operation figures, outcomes, the server's deltas, the client."""
    protocol = report["server"]["protocol"]
    mode = report["mode"]
    head = Text()
    head.append(f"{', '.join(report['targets'])}  ", style="bold")
    server = report["server"]
    if "shards" in server:
        head.append(f"{server['shards']} shard{'s' if server['shards'] != 1 else ''} ({server.get('routing', '?')})  ")
    head.append(f"protocol {protocol}  ", style="bold")
    head.append(f"{mode} loop")
    if report["target_rate"]:
        achieved = report["overall"]["throughput"]
        head.append(f", target {report['target_rate']:,.0f} calls/s, achieved {achieved:,.0f} "
                    f"({achieved / report['target_rate']:.3f})")
    head.append(f"; {report['duration_s']:.2f} s measured after a {report['warmup_s']:g} s warm-up "
                f"(ended by {report['end_reason']})")

    t = Table(title="latency (ms) and throughput", title_justify="left")
    for col in ("operation", "calls", "calls/s", "ops/s", "p50", "p90", "p99", "p99.9", "p99.99", "max",
                "errno outcomes", "failures"):
        t.add_column(col, justify="left" if col in ("operation", "errno outcomes", "failures") else "right")
    rows = list(report["operations"].items()) + [("all", report["overall"])]
    for name, f in rows:
        lat = f["latency_ms"]
        failures = _counts(f["failures"])
        t.add_row(
            Text(name, style="bold" if name == "all" else ""),
            f"{f['count']:,}", f"{f['throughput']:,.0f}", f"{f.get('ops_per_s', f['throughput']):,.0f}",
            *(_ms(lat[k]) for k in ("p50", "p90", "p99", "p99.9", "p99.99", "max")),
            _counts(f["errors"]),
            Text(failures, style="bold red" if f["failures"] else ""),
            end_section=name == rows[-2][0],
        )
    parts: list[Any] = [head, t]

    out = Table(title="outcomes", title_justify="left", show_header=False)
    out.add_column()
    out.add_column()
    out.add_row("status codes", _counts(report["statuses"]))
    out.add_row("errnos (expected outcomes)", _counts(report["errnos"]))
    gc = report.get("gc")
    if gc:
        out.add_row("GC collectors", f"{gc.get('trees', 0):,} trees: {gc.get('cycles', 0):,} cycles completed, "
                    f"{gc.get('faults', 0):,} faults, {gc.get('moves', 0):,} moves back; "
                    + _counts({k: v for k, v in gc.items() if k not in ("trees", "cycles", "faults", "moves")}))
    restarts = report.get("shard_restarts")
    if restarts:
        seen = ", ".join(f"shard {shard}: {n:,}" for shard, n in restarts.items())
        out.add_row(Text("shard restarts", style="yellow"),
                    Text(f"{seen}; {report.get('trees_recreated', 0):,} trees made again; calls they cost: "
                         f"{report['errnos'].get('shard_restarted', 0):,} (shard_restarted)", style="yellow"))
    if mode == "open":
        out.add_row("sends that left late",
                    Text(f"{report['late_sends']:,}", style="yellow" if report["late_sends"] else ""))
    parts.append(out)

    d = report["server_deltas"]
    st = Table(title=f"server counters over the run (protocol {protocol})", title_justify="left", show_header=False)
    st.add_column()
    st.add_column(justify="right")
    shown = [k for k in KEY_DELTAS if k in d] + sorted(k for k in d if k.startswith("violation_"))
    for k in shown:
        bad = (k == "violations" or k.startswith("violation_")) and d[k] and protocol in SAFE_PROTOCOLS
        st.add_row(k, Text(f"{d[k]:,}", style="bold red" if bad else ""))
    if "violations" not in d:
        st.add_row("violations", "0")
    swap = report.get("swap")
    if swap and any(swap.values()):
        st.add_row("swap-outs/s", f"{swap['swap_outs_per_s']:,.0f}")
        st.add_row("swap-ins/s", f"{swap['swap_ins_per_s']:,.0f}")
        st.add_row("swap-cache hits/s", f"{swap['swap_cache_hits_per_s']:,.0f}")
        st.add_row("swap-outs, swap-ins (faults)",
                   f"{swap['swap_outs']:,}, {swap['swap_ins']:,} ({swap['fault_swap_ins']:,})")
        st.add_row("reclaim runs (memcg, watermark), folios freed",
                   f"{swap['reclaim_runs']:,} ({swap['reclaim_memcg_runs']:,}, {swap['reclaim_kswapd_runs']:,}), "
                   f"{swap['reclaim_freed']:,}")
    parts.append(st)

    c = Table(title="client", title_justify="left", show_header=False)
    c.add_column()
    c.add_column()
    cpu = ", ".join(f"worker {x['worker']}: {x['utilization']:.0%} of a core" for x in report["client"]["cpu"])
    c.add_row(f"{report['client']['workers']} workers × {report['client']['concurrency']} in flight", cpu)
    if report["bottleneck"] == "client":
        c.add_row(Text("the client was the bottleneck", style="bold yellow"),
                  "a worker used 90% or more of a core: add --workers, or these figures are the generator's")
    parts.append(c)
    return Group(*parts)


def print_summary(report: dict[str, Any], console: Console) -> None:
    console.print(summary(report))
