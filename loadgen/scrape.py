"""The servers' counters from their Prometheus endpoints (``mmsim loadgen --stats-from metrics``),
under the names GetStats gives them, so that the report's ``server_deltas`` mean the same either way.

Every shard serves its own ``/metrics`` (``mmsim serve --metrics-listen``); the topology says where
(``metrics_address``), or ``--metrics-url`` gives the endpoints (shards behind a proxy). Each scrape
is a blocking urllib request run in a thread, so the event loop never waits on it; the counters of
the endpoints are summed, as GetStats' are over the shards.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import replace

from prometheus_client.parser import text_string_to_metric_families

from mmsim.client import Client
from mmsim.v1.wire import advertised_address

from .access import Access

#: Seconds one scrape may take.
SCRAPE_TIMEOUT = 10.0

#: GetStats key -> the sample it is read from: (sample name, (label, value) or None).
SAMPLES: dict[str, tuple[str, tuple[str, str] | None]] = {
    "walk": ("mmsim_walks_total", None),
    "walk_contended": ("mmsim_walks_contended_total", None),
    "walk_fast_retries": ("mmsim_walk_recheck_retries_total", ("path", "fast")),
    "walk_slow_retries": ("mmsim_walk_recheck_retries_total", ("path", "slow")),
    "move_pages": ("mmsim_moved_pages_total", None),
    "move_retry": ("mmsim_move_retries_total", None),
    "fork": ("mmsim_forks_total", None),
    "anon_vma_reuse": ("mmsim_anon_vma_reuses_total", None),
    "anon_vma_alloc": ("mmsim_anon_vma_allocs_total", None),
    "anon_vma_free": ("mmsim_anon_vma_frees_total", None),
    "vma_merge": ("mmsim_vma_merges_total", None),
    "vma_split": ("mmsim_vma_splits_total", None),
    "rcu_gp_completed": ("mmsim_rcu_grace_periods_total", None),
    "preempt_yields": ("mmsim_preempt_yields_total", None),
    "memory_limit_failures": ("mmsim_memory_limit_failures_total", None),
    "swap_out": ("mmsim_swap_outs_total", None),
    "swap_in": ("mmsim_swap_ins_total", None),
    "swap_cache_hit": ("mmsim_swap_cache_hits_total", None),
    "reclaim_runs": ("mmsim_reclaim_runs_total", None),
    "reclaim_memcg": ("mmsim_reclaim_memcg_runs_total", None),
    "reclaim_kswapd": ("mmsim_reclaim_kswapd_runs_total", None),
    "processes": ("mmsim_processes", None),
    "vmas": ("mmsim_vmas", None),
    "folios": ("mmsim_folios", None),
    "anon_vmas": ("mmsim_anon_vmas", None),
    "memory_bytes": ("mmsim_memory_bytes", None),
    "memory_peak_bytes": ("mmsim_memory_peak_bytes", None),
    "memory_limit_bytes": ("mmsim_memory_limit_bytes", None),
    "swap_slots_in_use": ("mmsim_swap_slots_in_use", None),
    "swap_slots_total": ("mmsim_swap_slots_total", None),
    "swap_cache_folios": ("mmsim_swap_cache_folios", None),
}
#: Samples whose label names the key: (sample name, label, key prefix); ``violations`` is the sum
#: of the ``violation_<kind>`` keys, as in GetStats.
LABELLED: tuple[tuple[str, str, str], ...] = (
    ("mmsim_faults_total", "kind", "fault_"),
    ("mmsim_reclaim_folios_total", "outcome", "reclaim_"),
    ("mmsim_detector_violations_total", "kind", "violation_"),
)


def url_of(address: str) -> str:
    """The endpoint of a metrics address: ``HOST:PORT`` is ``http://HOST:PORT/metrics``; a URL is
    taken as it is."""
    return address if "://" in address else f"http://{address}/metrics"


def parse(text: str) -> dict[str, int]:
    """The GetStats counters in one Prometheus text exposition (samples not mapped are left out)."""
    wanted: dict[tuple[str, tuple[str, str] | None], str] = {v: k for k, v in SAMPLES.items()}
    labelled = {name: (label, prefix) for name, label, prefix in LABELLED}
    out: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = wanted.get((sample.name, None))
            if key is None:
                for label, value in sample.labels.items():
                    key = wanted.get((sample.name, (label, value)))
                    if key is not None:
                        break
            if key is None and sample.name in labelled:
                label, prefix = labelled[sample.name]
                if label in sample.labels:
                    key = prefix + sample.labels[label]
            if key is not None:
                out[key] = out.get(key, 0) + round(sample.value)
    out["violations"] = sum(v for k, v in out.items() if k.startswith("violation_"))
    return out


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as response:  # http(s) endpoints only
        body: bytes = response.read()
    return body.decode("utf-8")


def generation(text: str) -> int | None:
    """The generation of the shard that served ``text`` (its ``mmsim_shard_info``), or None."""
    for family in text_string_to_metric_families(text):
        if family.name == "mmsim_shard_info":
            for sample in family.samples:
                value = sample.labels.get("generation", "")
                if value.isdecimal() and int(value):
                    return int(value)
    return None


async def scrape_each(
    urls: Iterable[str], fetch: Callable[[str], str] = _fetch
) -> list[tuple[int | None, dict[str, int]]]:
    """The generation and the counters of each endpoint; each fetched in a thread, all at once."""
    texts = await asyncio.gather(*(asyncio.to_thread(fetch, url_of(u)) for u in urls))
    return [(generation(text), parse(text)) for text in texts]


async def scrape(urls: Iterable[str], fetch: Callable[[str], str] = _fetch) -> dict[str, int]:
    """The counters of every endpoint, summed; each fetched in a thread, all at once."""
    total: dict[str, int] = {}
    for _, counters in await scrape_each(urls, fetch):
        for k, v in counters.items():
            total[k] = total.get(k, 0) + v
    return total


async def endpoints(mm: Client, access: Callable[[], Access]) -> list[str]:
    """Every shard's metrics endpoint, from the topology (each target's, with several targets).
    ValueError naming a shard that serves none."""
    found: list[str] = []
    if mm.routing != "static":
        sources = [(mm.targets[0], await mm.shards())]
    else:
        sources = []
        base = access()
        for t in mm.targets:  # separate servers: each says where its shards serve metrics
            async with replace(base, targets=(t,), routing="auto").client(timeout=mm.timeout, retries=1) as c:
                sources.append((t, await c.shards()))
    for target, shards in sources:
        if not shards:
            raise ValueError(f"{target} does not say where it serves metrics: give --metrics-url")
        for s in shards:
            if not s.metrics_address:
                raise ValueError(f"shard {s.index} of {target} serves no metrics (mmsim serve --metrics-listen): "
                                 "give every endpoint with --metrics-url")
            url = url_of(advertised_address(s.metrics_address, target))
            if url not in found:
                found.append(url)
    return found


__all__ = ["LABELLED", "SAMPLES", "endpoints", "generation", "parse", "scrape", "scrape_each", "url_of"]
