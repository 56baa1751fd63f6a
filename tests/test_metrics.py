"""The Prometheus metrics of one server process: the gRPC server metrics, the model's counters and
gauges read at scrape time, the lock-wait histogram, and /metrics over HTTP."""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mmsim.server.metrics import GO_CODE_NAMES, HANDLING_SECONDS_BOUNDS, Metrics, parse_listen, split_method
from mmsim.server.mm.detectors import KINDS
from mmsim.server.mm.locks import LOCK_WAIT_BOUNDS, Current, LockClass, LockdepState, LockWaitStats, Mutex
from mmsim.server.mm.model import PAGE_SIZE, MemoryModel, MmError

P = PAGE_SIZE
A, B = 0x100000000, 0x200000000
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: Metrics) -> Samples:
    """Every sample of one scrape, by (name, labels)."""
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def families(metrics: Metrics) -> dict[str, tuple[str, str]]:
    """name -> (type, help) of every family exposed."""
    text = generate_latest(metrics.registry).decode()
    return {f.name: (f.type, f.documentation) for f in text_string_to_metric_families(text)}


async def two_regions(m: MemoryModel, pages: int, dst_pages: tuple[int, ...] = ()) -> int:
    """A process with ``pages`` written at A, the same number of empty pages at B (but
    ``dst_pages``, written too), both registered with its userfaultfd."""
    pid = await m.create_process()
    await m.mmap(pid, pages * P, addr=A)
    await m.mmap(pid, pages * P, addr=B)
    for i in range(pages):
        await m.write(pid, A + i * P, i + 1)
    for i in dst_pages:
        await m.write(pid, B + i * P, 1000 + i)
    await m.uffd_register(pid, A, pages * P, "missing")
    await m.uffd_register(pid, B, pages * P, "missing")
    return pid


# -- the model's counters and gauges


async def test_model_counters_and_gauges() -> None:
    m = MemoryModel(protocol="recheck", seed=0)
    metrics = Metrics(m, shard=3, generation=7)
    before = scrape(metrics)
    assert value(before, "mmsim_moves_total", errno="OK") == 0
    assert value(before, "mmsim_processes") == 0 and value(before, "mmsim_vmas") == 0

    pid = await two_regions(m, 4)
    await m.move(pid, B, A, 4 * P)  # OK
    await m.move(pid, A, B, 2 * P)  # OK
    with pytest.raises(MmError) as e:  # dst B+2P is populated
        await m.move(pid, B + 2 * P, A, P)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(MmError) as e:  # nothing at src any more
        await m.move(pid, A + 2 * P, A + 3 * P, P)
    assert e.value.errno == errno.ENOENT
    child = await m.fork(pid)
    for _ in range(3):
        w = await m.walk(pid, A)
    assert (child, A) in w.mappings
    await m.write(child, A, 99)  # COW
    await m.munmap(pid, B + P, P)  # splits the VMA

    s = scrape(metrics)
    assert value(s, "mmsim_moves_total", errno="OK") == 2
    assert value(s, "mmsim_moves_total", errno="EEXIST") == 1
    assert value(s, "mmsim_moves_total", errno="ENOENT") == 1
    assert value(s, "mmsim_moved_pages_total") == 6
    assert value(s, "mmsim_walks_total") == 3
    assert value(s, "mmsim_walks_contended_total") == 0
    assert value(s, "mmsim_walk_recheck_retries_total", path="fast") == 0
    assert value(s, "mmsim_walk_recheck_retries_total", path="slow") == 0
    assert value(s, "mmsim_forks_total") == 1
    assert value(s, "mmsim_faults_total", kind="new_folio") == 4
    assert value(s, "mmsim_faults_total", kind="cow") == 1
    assert value(s, "mmsim_vma_splits_total") >= 1

    stats = m.stats()
    assert value(s, "mmsim_processes") == len(m.processes) == 2
    assert value(s, "mmsim_vmas") == sum(len(m.vmas(p)) for p in m.processes) == stats["vmas"]
    assert value(s, "mmsim_folios") == stats["folios"] > 0
    assert value(s, "mmsim_anon_vmas") == stats["anon_vmas"] > 0
    assert value(s, "mmsim_memory_bytes") == stats["memory_bytes"] > 0
    assert value(s, "mmsim_shard_info", shard="3", generation="7", protocol="recheck") == 1
    for kind in KINDS:
        assert value(s, "mmsim_detector_violations_total", kind=kind) == 0
    assert m.check_invariants() == []

    await m.exit(child)
    s = scrape(metrics)
    assert value(s, "mmsim_processes") == 1
    assert value(s, "mmsim_vmas") == len(m.vmas(pid))
    assert m.check_invariants() == []


async def test_short_move_counts_as_eagain() -> None:
    m = MemoryModel()
    metrics = Metrics(m)
    pid = await two_regions(m, 2, dst_pages=(1,))  # the second page's dst is taken: one page moves
    with pytest.raises(MmError) as e:
        await m.move(pid, B, A, 2 * P)
    assert e.value.errno == errno.EAGAIN and e.value.moved == P
    s = scrape(metrics)
    assert value(s, "mmsim_moves_total", errno="EAGAIN") == 1
    assert value(s, "mmsim_moves_total", errno="OK") == 0


async def test_anon_vma_reuse_is_counted() -> None:
    m = MemoryModel()
    metrics = Metrics(m)
    p = await m.create_process()
    await m.mmap(p, P, addr=A)
    await m.write(p, A, 1)
    c1 = await m.fork(p)
    g = await m.fork(c1)
    await m.exit(c1)
    assert value(scrape(metrics), "mmsim_anon_vma_reuses_total") == 0
    await m.fork(g)  # adopts C1's old anon_vma, which has no VMA left and one child
    s = scrape(metrics)
    assert value(s, "mmsim_anon_vma_reuses_total") == 1
    assert value(s, "mmsim_processes") == 3


THP_COUNTERS = ("mmsim_thp_fault_allocs_total", "mmsim_thp_fault_fallbacks_total", "mmsim_thp_zero_page_faults_total",
                "mmsim_thp_pmd_splits_total", "mmsim_thp_folio_splits_total", "mmsim_thp_pmd_moves_total")


async def test_thp_counters() -> None:
    """A THP write fault, a huge zero page read, a whole-PMD move, then a one-page move out of the
    moved THP (its PMD split, then the folio) are each counted once."""
    huge = 2 << 20
    m = MemoryModel(thp="always")
    metrics = Metrics(m)
    assert {name: value(scrape(metrics), name) for name in THP_COUNTERS} == dict.fromkeys(THP_COUNTERS, 0)
    pid = await m.create_process()
    await m.mmap(pid, 2 * huge, addr=A)
    await m.mmap(pid, 2 * huge, addr=B)
    await m.write(pid, A, 7)
    assert await m.read(pid, A + huge) == 0
    await m.uffd_register(pid, A, 2 * huge, "missing")
    await m.uffd_register(pid, B, 2 * huge, "missing")
    await m.move(pid, B, A, huge)
    f = m.folio(pid, B)
    assert f is not None and (f.order, f.pmd, f.value) == (9, True, 7)
    await m.move(pid, B + huge, B + 5 * P, P)
    s = scrape(metrics)
    assert {name: value(s, name) for name in THP_COUNTERS} == {
        "mmsim_thp_fault_allocs_total": 1, "mmsim_thp_fault_fallbacks_total": 0, "mmsim_thp_zero_page_faults_total": 1,
        "mmsim_thp_pmd_splits_total": 1, "mmsim_thp_folio_splits_total": 1, "mmsim_thp_pmd_moves_total": 1,
    }
    stats = m.stats()
    assert (stats["thp_fault_alloc"], stats["thp_zero_page_fault"], stats["thp_move_pmd"]) == (1, 1, 1)
    assert m.check_invariants() == []


async def test_a_failed_split_is_counted() -> None:
    """A move of one page out of a THP with a pinned page: the split fails for the pin's
    references (the move's EBUSY), and the failure is counted; the successful split is not."""
    huge = 2 << 20
    m = MemoryModel(thp="always")
    metrics = Metrics(m)
    pid = await m.create_process()
    await m.mmap(pid, huge, addr=A)
    await m.mmap(pid, huge, addr=B)
    await m.write(pid, A, 7)
    await m.uffd_register(pid, B, huge, "missing")
    pin_id, _ = await m.pin(pid, A + P, P)
    with pytest.raises(MmError) as e:
        await m.move(pid, B, A, P)
    assert e.value.errno == errno.EBUSY
    s = scrape(metrics)
    assert value(s, "mmsim_thp_folio_split_failures_total") == 1 and value(s, "mmsim_thp_folio_splits_total") == 0
    await m.unpin(pid, pin_id)
    assert await m.move(pid, B, A, P) == P
    s = scrape(metrics)
    assert value(s, "mmsim_thp_folio_split_failures_total") == 1 and value(s, "mmsim_thp_folio_splits_total") == 1
    assert m.check_invariants() == []


@pytest.mark.violations_expected
async def test_detector_violations_by_kind() -> None:
    m = MemoryModel()
    metrics = Metrics(m)
    m.detectors.report("lock-order", task="t", acquiring="a", held="b", why="test")
    m.detectors.report("lock-order", task="t", acquiring="a", held="b", why="test")
    s = scrape(metrics)
    assert value(s, "mmsim_detector_violations_total", kind="lock-order") == 2
    assert value(s, "mmsim_detector_violations_total", kind="use-after-free") == 0
    assert value(s, "mmsim_detector_findings_total", kind="residual-index-window") == 0
    m.detectors.note("residual-index-window", folio=1)
    s = scrape(metrics)
    assert value(s, "mmsim_detector_findings_total", kind="residual-index-window") == 1
    assert value(s, "mmsim_detector_violations_total", kind="lock-order") == 2  # findings apart
    assert m.stats()["finding_residual-index-window"] == 1 and m.stats()["findings"] == 1
    assert m.stats()["violations"] == 2


async def test_every_family_has_help() -> None:
    m = MemoryModel(max_memory=1 << 20)
    metrics = Metrics(m)
    metrics.rpc_started("/mmsim.v1.MemoryManager/Ping", "unary")
    metrics.rpc_handled("/mmsim.v1.MemoryManager/Ping", "unary", grpc.StatusCode.OK, 1e-4)
    fams = families(metrics)
    for name in (
        "grpc_server_started", "grpc_server_handled", "grpc_server_handling_seconds", "mmsim_walk_recheck_retries",
        "mmsim_walks_contended", "mmsim_walks", "mmsim_moves", "mmsim_lock_wait_seconds", "mmsim_processes",
        "mmsim_vmas", "mmsim_folios", "mmsim_anon_vmas", "mmsim_anon_vma_reuses", "mmsim_detector_violations",
        "mmsim_detector_findings",
        "mmsim_shard_info", "mmsim_memory_limit_bytes",
    ):
        assert name in fams, name
    for name, (_, doc) in fams.items():
        assert doc, f"{name} has no HELP"
    assert fams["grpc_server_handling_seconds"][0] == "histogram"
    assert fams["mmsim_lock_wait_seconds"][0] == "histogram"
    assert fams["mmsim_moves"][0] == "counter" and fams["mmsim_folios"][0] == "gauge"


# -- gRPC server metrics


def test_rpc_metrics_use_go_grpc_prometheus_names() -> None:
    metrics = Metrics(MemoryModel())
    remap = "/mmsim.v1.MemoryManager/Remap"
    calls = ((grpc.StatusCode.OK, 2e-4), (grpc.StatusCode.OK, 0.3), (grpc.StatusCode.INVALID_ARGUMENT, 1e-3))
    for code, seconds in calls:
        metrics.rpc_started(remap, "unary")
        metrics.rpc_handled(remap, "unary", code, seconds)
    metrics.rpc_started("/mmsim.v1.MemoryManager/Batch", "bidi_stream")
    metrics.rpc_handled("/mmsim.v1.MemoryManager/Batch", "bidi_stream", grpc.StatusCode.CANCELLED, 0.01)
    metrics.rpc_started("/grpc.health.v1.Health/Watch", "server_stream")

    s = scrape(metrics)
    rl = {"grpc_type": "unary", "grpc_service": "mmsim.v1.MemoryManager", "grpc_method": "Remap"}
    bl = {"grpc_type": "bidi_stream", "grpc_service": "mmsim.v1.MemoryManager", "grpc_method": "Batch"}
    hl = {"grpc_type": "server_stream", "grpc_service": "grpc.health.v1.Health", "grpc_method": "Watch"}
    assert value(s, "grpc_server_started_total", **rl) == 3
    assert value(s, "grpc_server_started_total", **bl) == 1
    assert value(s, "grpc_server_started_total", **hl) == 1
    assert value(s, "grpc_server_handled_total", **rl, grpc_code="OK") == 2
    assert value(s, "grpc_server_handled_total", **rl, grpc_code="InvalidArgument") == 1
    assert value(s, "grpc_server_handled_total", **bl, grpc_code="Canceled") == 1
    assert not [k for k in s if k[0] == "grpc_server_handled_total" and ("grpc_method", "Watch") in k[1]]

    assert value(s, "grpc_server_handling_seconds_count", **rl) == 3
    assert value(s, "grpc_server_handling_seconds_sum", **rl) == pytest.approx(0.3012)
    assert value(s, "grpc_server_handling_seconds_bucket", **rl, le="0.0001") == 0
    assert value(s, "grpc_server_handling_seconds_bucket", **rl, le="0.00025") == 1
    assert value(s, "grpc_server_handling_seconds_bucket", **rl, le="0.001") == 2  # le is inclusive
    assert value(s, "grpc_server_handling_seconds_bucket", **rl, le="0.25") == 2
    assert value(s, "grpc_server_handling_seconds_bucket", **rl, le="0.5") == 3
    assert value(s, "grpc_server_handling_seconds_bucket", **rl, le="+Inf") == 3
    assert HANDLING_SECONDS_BOUNDS[0] <= 1e-4 and HANDLING_SECONDS_BOUNDS[-1] >= 5
    assert not [k for k in s if k[0].endswith("_created")]


def test_go_code_names_cover_every_status_code() -> None:
    assert set(GO_CODE_NAMES) == set(grpc.StatusCode)
    assert GO_CODE_NAMES[grpc.StatusCode.CANCELLED] == "Canceled"
    assert GO_CODE_NAMES[grpc.StatusCode.DEADLINE_EXCEEDED] == "DeadlineExceeded"
    assert len(set(GO_CODE_NAMES.values())) == 17


def test_split_method() -> None:
    assert split_method("/mmsim.v1.MemoryManager/Remap") == ("mmsim.v1.MemoryManager", "Remap")
    assert split_method("pkg.S/M") == ("pkg.S", "M")
    assert split_method("nonsense") == ("unknown", "unknown")


# -- lock waits


def test_lock_wait_stats_buckets() -> None:
    w = LockWaitStats()
    w.observe(LockClass.PTL, LOCK_WAIT_BOUNDS[0])  # on a bound: in that bucket
    w.observe(LockClass.PTL, LOCK_WAIT_BOUNDS[0] * 1.01)
    w.observe(LockClass.PTL, 1e6)
    counts, total = w.snapshot(LockClass.PTL)
    assert counts[0] == 1 and counts[1] == 1 and counts[-1] == 1 and sum(counts) == 3
    assert total == pytest.approx(1e6 + 2.01 * LOCK_WAIT_BOUNDS[0])
    assert sum(w.snapshot(LockClass.MMAP_LOCK)[0]) == 0


async def test_lock_wait_recorded_only_when_a_task_sleeps() -> None:
    state = LockdepState()
    mx = Mutex("m", LockClass.FOLIO_LOCK, state)
    a, b = Current("a"), Current("b")
    assert mx.lock(a)
    mx.unlock(a)
    assert sum(state.waits.snapshot(LockClass.FOLIO_LOCK)[0]) == 0  # uncontended: nothing

    assert mx.lock(a)
    assert not mx.lock(b)
    waiter = asyncio.ensure_future(mx.wait(b))
    await asyncio.sleep(0)
    mx.unlock(a)
    await waiter
    mx.unlock(b)
    assert sum(state.waits.snapshot(LockClass.FOLIO_LOCK)[0]) == 1

    # A waiter cancelled before the lock is granted records nothing.
    assert mx.lock(a)
    assert not mx.lock(b)
    waiter = asyncio.ensure_future(mx.wait(b))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    mx.unlock(a)
    assert sum(state.waits.snapshot(LockClass.FOLIO_LOCK)[0]) == 1


async def test_lock_wait_histogram_in_the_model() -> None:
    m = MemoryModel()
    metrics = Metrics(m)
    pid = await two_regions(m, 4)
    await m.move(pid, B, A, 4 * P)
    await m.fork(pid)
    await m.walk(pid, B)
    await m.walk(pid, B, blocking=True)
    s = scrape(metrics)
    for c in ("mmap_lock", "folio_lock", "anon_vma", "ptl"):  # nothing ran concurrently
        assert value(s, "mmsim_lock_wait_seconds_count", lock_class=c) == 0
        assert value(s, "mmsim_lock_wait_seconds_sum", lock_class=c) == 0

    # Hold the process's mmap_lock for write: an mmap has to sleep for it, about 20 ms.
    mm = m.processes[pid]
    holder = Current("holder")
    assert mm.mmap_lock.down_write(holder)
    task = asyncio.ensure_future(m.mmap(pid, P))
    await asyncio.sleep(0.02)
    assert not task.done()
    mm.mmap_lock.up_write(holder)
    await task

    # Hold the folio's anon_vma root for write: a blocking walk sleeps on it (the slow path).
    root = mm.pte_lookup(B).folio.mapping.root
    assert root.rwsem.down_write(holder)
    walk = asyncio.ensure_future(m.walk(pid, B, blocking=True))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not walk.done()
    root.rwsem.up_write(holder)
    assert len((await walk).mappings) == 2

    s = scrape(metrics)
    assert value(s, "mmsim_lock_wait_seconds_count", lock_class="mmap_lock") == 1
    assert value(s, "mmsim_lock_wait_seconds_sum", lock_class="mmap_lock") >= 0.02
    assert value(s, "mmsim_lock_wait_seconds_bucket", lock_class="mmap_lock", le="0.01") == 0
    assert value(s, "mmsim_lock_wait_seconds_bucket", lock_class="mmap_lock", le="+Inf") == 1
    assert value(s, "mmsim_lock_wait_seconds_count", lock_class="anon_vma") == 1
    assert value(s, "mmsim_lock_wait_seconds_count", lock_class="folio_lock") == 0
    assert value(s, "mmsim_lock_wait_seconds_count", lock_class="ptl") == 0
    assert m.check_invariants() == []


# -- scrapes from another thread while the loop works


async def test_scrapes_from_another_thread_while_the_model_changes() -> None:
    m = MemoryModel()
    metrics = Metrics(m)
    pid = await two_regions(m, 8)
    q = await m.create_process()
    await m.mmap(q, P, addr=A)
    await m.write(q, A, 1)
    stop = threading.Event()
    errors: list[BaseException] = []
    scrapes = 0

    def scraper() -> None:
        nonlocal scrapes
        while not stop.is_set():
            try:
                generate_latest(metrics.registry)
                scrapes += 1
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return

    t = threading.Thread(target=scraper)
    t.start()
    try:
        for i in range(300):
            metrics.rpc_started(f"/mmsim.v1.MemoryManager/M{i % 50}", "unary")
            await m.move(pid, B, A, 8 * P)
            await m.move(pid, A, B, 8 * P)
            child = await m.fork(q)
            await m.walk(q, A)
            await m.exit(child)
            metrics.rpc_handled(f"/mmsim.v1.MemoryManager/M{i % 50}", "unary", grpc.StatusCode.OK, 1e-4)
    finally:
        stop.set()
        await asyncio.to_thread(t.join)
    assert not errors, errors
    assert scrapes > 0
    assert value(scrape(metrics), "mmsim_moves_total", errno="OK") == 600


# -- HTTP


def test_http_serves_metrics_and_stops() -> None:
    metrics = Metrics(MemoryModel())
    metrics.rpc_started("/mmsim.v1.MemoryManager/Ping", "unary")
    port = metrics.start_http("127.0.0.1:0")
    try:
        assert port > 0
        with pytest.raises(RuntimeError):
            metrics.start_http("127.0.0.1:0")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            body = r.read().decode()
        labels = 'grpc_method="Ping",grpc_service="mmsim.v1.MemoryManager",grpc_type="unary"'
        assert f"grpc_server_started_total{{{labels}}} 1.0" in body
        assert "mmsim_shard_info" in body

        # The port is taken now: binding it again fails.
        other = Metrics(MemoryModel())
        with pytest.raises(OSError):
            other.start_http(f"127.0.0.1:{port}")
    finally:
        metrics.stop()
    metrics.stop()  # a second stop does nothing
    with pytest.raises(urllib.error.URLError), urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5):
        pass


def test_http_on_ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    metrics = Metrics(MemoryModel())
    port = metrics.start_http("[::1]:0")
    try:
        with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=10) as r:
            assert b"mmsim_processes 0.0" in r.read()
    finally:
        metrics.stop()


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9090") == ("127.0.0.1", 9090)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen("localhost:0") == ("localhost", 0)
    for bad in ("9090", ":9090", "host:", "host:http", "host:70000"):
        with pytest.raises(ValueError):
            parse_listen(bad)
