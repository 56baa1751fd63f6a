"""Prometheus metrics of one server process (one shard).

Two collectors on a registry of the process's own (not prometheus_client's global one):

* the gRPC server metrics of go-grpc-prometheus (``grpc_server_started_total``,
  ``grpc_server_handled_total``, ``grpc_server_handling_seconds``), fed by ``rpc_started`` and
  ``rpc_handled`` on the event loop's thread: a dictionary update or two per call, no lock;
* the model's counters and gauges, read when Prometheus scrapes, in the HTTP server's thread, from
  one reading of the counters the model keeps (``mm.stats.read_stats``: ``Kernel.stats``, the
  UFFDIO_MOVE outcomes, the live-object counts, the detectors, the lock-wait histogram), the same
  values GetStats returns: a scrape costs the model nothing between scrapes.

Scrapes run in another thread than the event loop that changes the model, so they read only ints
and copies of dictionaries and lists, each copy retried if the loop changed it meanwhile.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from mmsim.v1.wire import split_hostport

from .mm.detectors import FINDING_KINDS, KINDS
from .mm.locks import LOCK_WAIT_BOUNDS, LockClass
from .mm.model import MemoryModel
from .mm.stats import copy_dict, read_stats

#: grpc-go's names of the status codes, as go-grpc-prometheus writes them in ``grpc_code``.
GO_CODE_NAMES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}

#: The kinds of call, as go-grpc-prometheus names them in ``grpc_type``.
RPC_TYPES = ("unary", "client_stream", "server_stream", "bidi_stream")

#: Upper bounds, in seconds, of ``grpc_server_handling_seconds``' buckets: 50 µs to 10 s.
HANDLING_SECONDS_BOUNDS: tuple[float, ...] = (
    5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

#: The label value of each lock class in ``mmsim_lock_wait_seconds``.
LOCK_CLASS_LABELS: dict[LockClass, str] = {c: c.name.lower() for c in LockClass}


def split_method(full_method: str) -> tuple[str, str]:
    """("/pkg.Service/Method") -> ("pkg.Service", "Method"); ("unknown", "unknown") if malformed."""
    name = full_method[1:] if full_method.startswith("/") else full_method
    service, sep, method = name.partition("/")
    if not sep:
        return "unknown", "unknown"
    return service, method


def _buckets(bounds: Iterable[float], counts: list[int]) -> list[tuple[str, float]]:
    """Per-bucket counts (the last one +Inf) -> Prometheus' cumulative (le, count) pairs."""
    out: list[tuple[str, float]] = []
    total = 0
    for le, n in zip((*(floatToGoString(b) for b in bounds), "+Inf"), counts, strict=True):
        total += n
        out.append((le, total))
    return out


class GrpcServerCollector(Collector):
    """go-grpc-prometheus' server metrics, counted in plain dictionaries."""

    def __init__(self) -> None:
        self._names: dict[str, tuple[str, str]] = {}
        self._started: dict[tuple[str, str, str], int] = {}
        self._handled: dict[tuple[str, str, str, str], int] = {}
        self._seconds: dict[tuple[str, str, str], list[int]] = {}
        self._seconds_sum: dict[tuple[str, str, str], float] = {}

    def _key(self, full_method: str, rpc_type: str) -> tuple[str, str, str]:
        names = self._names.get(full_method)
        if names is None:
            names = self._names[full_method] = split_method(full_method)
        return rpc_type, names[0], names[1]

    def started(self, full_method: str, rpc_type: str) -> None:
        key = self._key(full_method, rpc_type)
        started = self._started
        started[key] = started.get(key, 0) + 1

    def handled(self, full_method: str, rpc_type: str, code: grpc.StatusCode, seconds: float) -> None:
        key = self._key(full_method, rpc_type)
        hkey = (*key, GO_CODE_NAMES.get(code, "Unknown"))
        handled = self._handled
        handled[hkey] = handled.get(hkey, 0) + 1
        counts = self._seconds.get(key)
        if counts is None:
            counts = self._seconds[key] = [0] * (len(HANDLING_SECONDS_BOUNDS) + 1)
        counts[bisect_left(HANDLING_SECONDS_BOUNDS, seconds)] += 1
        self._seconds_sum[key] = self._seconds_sum.get(key, 0.0) + seconds

    def collect(self) -> Iterator[Metric]:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        started = CounterMetricFamily(
            "grpc_server_started", "Total number of RPCs started on the server.", labels=labels
        )
        for key, n in sorted(copy_dict(self._started).items()):
            started.add_metric(key, n)
        yield started
        handled = CounterMetricFamily(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            labels=[*labels, "grpc_code"],
        )
        for hkey, n in sorted(copy_dict(self._handled).items()):
            handled.add_metric(hkey, n)
        yield handled
        seconds = HistogramMetricFamily(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
            labels=labels,
        )
        sums = copy_dict(self._seconds_sum)
        for key, counts in sorted(copy_dict(self._seconds).items()):
            seconds.add_metric(key, _buckets(HANDLING_SECONDS_BOUNDS, list(counts)), sums.get(key, 0.0))
        yield seconds


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class ModelCollector(Collector):
    """The model's counters and gauges, read at scrape time."""

    def __init__(self, model: MemoryModel, shard: int = 0, generation: int = 0) -> None:
        self.model = model
        self.shard = shard
        self.generation = generation

    def collect(self) -> Iterator[Metric]:
        s = read_stats(self.model)
        stats = s.counters

        info = GaugeMetricFamily(
            "mmsim_shard_info",
            "The shard this server process serves, its generation and the model's protocol; always 1.",
            labels=["shard", "generation", "protocol"],
        )
        info.add_metric([str(self.shard), str(self.generation), s.protocol], 1)
        yield info

        # -- gauges
        yield _gauge("mmsim_processes", "Live simulated processes.", s.processes)
        yield _gauge("mmsim_vmas", "Live VMAs, over all processes.", s.vmas)
        yield _gauge("mmsim_folios", "Live anonymous folios (resident pages).", s.folios)
        yield _gauge("mmsim_anon_vmas", "Live anon_vmas.", s.anon_vmas)
        yield _gauge("mmsim_memory_bytes", "Bytes of the model's objects charged to the memory budget.",
                     s.memory_bytes)
        yield _gauge("mmsim_memory_inflight_bytes",
                     "Bytes the calls in progress are charged to the memory budget (requests, waits).",
                     s.memory_inflight_bytes)
        yield _gauge("mmsim_memory_peak_bytes", "Most bytes ever charged to the memory budget.", s.memory_peak_bytes)
        if s.memory_limit_bytes is not None:
            yield _gauge("mmsim_memory_limit_bytes", "The memory budget (--max-memory), in bytes.",
                         s.memory_limit_bytes)
        yield _counter(
            "mmsim_memory_limit_failures", "Charges refused because the memory budget was reached (ENOMEM).",
            s.memory_limit_failures,
        )
        yield _gauge("mmsim_swap_slots_in_use", "Swap slots in use: referenced by swap entries or the swap cache.",
                     s.swap_slots_in_use)
        yield _gauge("mmsim_swap_slots_total", "Usable slots of the swap device (--swap-bytes), a page each.",
                     s.swap_slots_total)
        yield _gauge("mmsim_swap_cache_folios", "Folios in the swap cache.", s.swap_cache_folios)

        # -- the rmap walk
        yield _counter("mmsim_walks", "rmap walks (folio_referenced) completed.", stats.get("walk", 0))
        yield _counter(
            "mmsim_walks_contended", "rmap walks that found the anon_vma lock contended (trylock mode).",
            stats.get("walk_contended", 0),
        )
        retries = CounterMetricFamily(
            "mmsim_walk_recheck_retries",
            "rmap walks retried because folio->mapping changed while the anon_vma lock was taken, by the path "
            "that rechecked it: fast (after the trylock) or slow (after sleeping on the root rwsem).",
            labels=["path"],
        )
        retries.add_metric(["fast"], stats.get("walk_fast_retries", 0))
        retries.add_metric(["slow"], stats.get("walk_slow_retries", 0))
        yield retries

        # -- UFFDIO_MOVE
        moves = CounterMetricFamily(
            "mmsim_moves",
            "UFFDIO_MOVE calls (move_pages) by outcome: OK, or the errno returned (EAGAIN for a short move).",
            labels=["errno"],
        )
        results = dict(s.move_results)
        results.setdefault("OK", 0)
        for name, n in sorted(results.items()):
            moves.add_metric([name], n)
        yield moves
        yield _counter("mmsim_moved_pages", "Pages moved by UFFDIO_MOVE.", stats.get("move_pages", 0))
        yield _counter(
            "mmsim_move_retries", "move_pages steps retried after move_pages_pte answered EAGAIN.",
            stats.get("move_retry", 0),
        )

        # -- fork, anon_vmas, faults, VMAs
        yield _counter("mmsim_forks", "Completed forks (dup_mmap).", stats.get("fork", 0))
        yield _counter(
            "mmsim_anon_vma_reuses",
            "anon_vma_clone reusing an existing anon_vma (one with no VMA and at most one child) instead of "
            "allocating one for the child.",
            stats.get("anon_vma_reuse", 0),
        )
        yield _counter("mmsim_anon_vma_allocs", "anon_vmas allocated.", stats.get("anon_vma_alloc", 0))
        yield _counter("mmsim_anon_vma_frees", "anon_vmas freed.", stats.get("anon_vma_free", 0))
        faults = CounterMetricFamily(
            "mmsim_faults",
            "Page faults that changed a PTE, by kind: new_folio (first touch), cow (copy on write), wp_reuse "
            "(write fault reusing the folio in place), swap_in (a swap entry mapped again: do_swap_page).",
            labels=["kind"],
        )
        for kind in ("new_folio", "cow", "wp_reuse", "swap_in"):
            faults.add_metric([kind], stats.get(f"fault_{kind}", 0))
        yield faults
        # -- swap and reclaim
        yield _counter("mmsim_swap_outs", "Folios written to swap (swap_writepage).", stats.get("swap_out", 0))
        yield _counter("mmsim_swap_ins", "Folios read back from swap into the swap cache.", stats.get("swap_in", 0))
        yield _counter("mmsim_swap_cache_hits", "Swap-ins that found the folio in the swap cache.",
                       stats.get("swap_cache_hit", 0))
        yield _counter("mmsim_reclaim_runs", "Reclaim runs (shrink_lruvec): Reclaim calls and memory-budget reclaim.",
                       stats.get("reclaim_runs", 0))
        yield _counter("mmsim_reclaim_memcg_runs",
                       "Reclaim runs started because a charge would have passed the memory budget.",
                       stats.get("reclaim_memcg", 0))
        yield _counter("mmsim_reclaim_kswapd_runs",
                       "Reclaim runs started because a call found the memory budget above its high watermark.",
                       stats.get("reclaim_kswapd", 0))
        reclaim = CounterMetricFamily(
            "mmsim_reclaim_folios",
            "Folios reclaim handled, by what happened: scanned (tried for reclaim, by a Reclaim or by madvise "
            "pageout), freed, activated (kept on the active list: referenced, or no swap slot), deactivated (moved "
            "from the active to the inactive list).",
            labels=["outcome"],
        )
        for outcome in ("scanned", "freed", "activated", "deactivated"):
            reclaim.add_metric([outcome], stats.get(f"reclaim_{outcome}", 0))
        yield reclaim
        # -- transparent hugepages (the kernel's thp_* vmstat events)
        yield _counter("mmsim_thp_fault_allocs", "Page faults that allocated a PMD-size THP (thp_fault_alloc).",
                       stats.get("thp_fault_alloc", 0))
        yield _counter("mmsim_thp_fault_fallbacks",
                       "Page faults that could have had a PMD-size THP and fell back to small pages "
                       "(thp_fault_fallback).", stats.get("thp_fault_fallback", 0))
        yield _counter("mmsim_thp_zero_page_faults", "Read faults that mapped the huge zero page by a huge PMD.",
                       stats.get("thp_zero_page_fault", 0))
        yield _counter("mmsim_thp_pmd_splits", "Huge PMDs split into page tables of PTEs (thp_split_pmd).",
                       stats.get("thp_split_pmd", 0))
        yield _counter("mmsim_thp_folio_splits", "Large folios split into smaller ones (thp_split_page).",
                       stats.get("thp_split_page", 0))
        yield _counter("mmsim_thp_folio_split_failures", "Splits of a large folio that failed for a reference "
                       "besides its mappings (thp_split_page_failed).", stats.get("thp_split_page_failed", 0))
        yield _counter("mmsim_thp_pmd_moves", "Huge PMDs moved whole by UFFDIO_MOVE.", stats.get("thp_move_pmd", 0))
        yield _counter("mmsim_vma_merges", "VMA merges.", stats.get("vma_merge", 0))
        yield _counter("mmsim_vma_splits", "VMA splits.", stats.get("vma_split", 0))
        yield _counter("mmsim_rcu_grace_periods", "RCU grace periods completed.", s.rcu_gp_completed)
        yield _counter(
            "mmsim_preempt_yields", "Yields of the seeded scheduler at the preemption points.", s.preempt_yields
        )

        # -- detectors
        violations = CounterMetricFamily(
            "mmsim_detector_violations",
            "Violations the detectors reported, by kind (lockdep, walk detectors, RCU, audit).",
            labels=["kind"],
        )
        counts = s.violations
        for kind in (*KINDS, *sorted(set(counts) - set(KINDS))):
            violations.add_metric([kind], counts.get(kind, 0))
        yield violations
        findings = CounterMetricFamily(
            "mmsim_detector_findings",
            "Documented windows of the protocol as the kernel has it that the detectors saw, by kind "
            "(not violations; docs/protocol.md).",
            labels=["kind"],
        )
        seen = s.findings
        for kind in (*FINDING_KINDS, *sorted(set(seen) - set(FINDING_KINDS))):
            findings.add_metric([kind], seen.get(kind, 0))
        yield findings

        # -- lock waits
        waits = HistogramMetricFamily(
            "mmsim_lock_wait_seconds",
            "Time tasks slept waiting for a lock, by lock class; acquisitions that did not wait are not counted.",
            labels=["lock_class"],
        )
        for c in LockClass:
            bucket_counts, total = s.lock_waits[c]
            waits.add_metric([LOCK_CLASS_LABELS[c]], _buckets(LOCK_WAIT_BOUNDS, bucket_counts), total)
        yield waits


def parse_listen(listen: str) -> tuple[str, int]:
    """"HOST:PORT" or "[V6]:PORT" -> (host, port); ValueError if malformed."""
    return split_hostport(listen)


class Metrics:
    """The Prometheus metrics of one server process: its own ``registry``, the gRPC server
    metrics (``rpc_started``/``rpc_handled``, called on the event loop's thread) and the model's,
    and ``/metrics`` served over HTTP in a daemon thread (``start_http``/``stop``)."""

    def __init__(self, model: MemoryModel, *, shard: int = 0, generation: int = 0) -> None:
        self.model = model
        self.registry = CollectorRegistry(auto_describe=False)
        self._grpc = GrpcServerCollector()
        self.registry.register(self._grpc)
        self.registry.register(ModelCollector(model, shard, generation))
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def rpc_started(self, full_method: str, rpc_type: str) -> None:
        """A call of ``full_method`` ("/pkg.Service/Method") began; ``rpc_type`` is in RPC_TYPES."""
        self._grpc.started(full_method, rpc_type)

    def rpc_handled(self, full_method: str, rpc_type: str, code: grpc.StatusCode, seconds: float) -> None:
        """A call ended with ``code`` after ``seconds``."""
        self._grpc.handled(full_method, rpc_type, code, seconds)

    def start_http(self, listen: str) -> int:
        """Serve ``/metrics`` on ``listen`` ("HOST:PORT"; PORT 0 picks a free one) in a daemon
        thread; returns the bound port. ValueError for a malformed address, OSError if it cannot
        be bound."""
        if self._http is not None:
            raise RuntimeError("the metrics HTTP server is already running")
        host, port = parse_listen(listen)
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_address[1])

    def stop(self) -> None:
        """Stop the HTTP server and close its socket (waits for its thread, about half a second at
        most); does nothing if it is not running."""
        http, thread = self._http, self._thread
        self._http = self._thread = None
        if http is None:
            return
        http.shutdown()
        http.server_close()
        if thread is not None:
            thread.join(timeout=5)


__all__ = [
    "GO_CODE_NAMES",
    "HANDLING_SECONDS_BOUNDS",
    "RPC_TYPES",
    "GrpcServerCollector",
    "Metrics",
    "ModelCollector",
    "parse_listen",
    "split_method",
]
