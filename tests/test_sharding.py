"""Sharding: ``mmsim serve --shards N`` under its supervisor, the SDK's discovery and routing, a
real nginx that routes on the ``x-mmsim-shard`` header, restarts under a new generation, and a
drain on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from proxy import free_ports, run_nginx
from servers import shard_pids

from mmsim.client import Client, ProcessNotFoundError, ShardRestartedError, WrongShardError
from mmsim.client.testing import ServerProcess, serve_subprocess
from mmsim.server.deploy import nginx_config
from mmsim.v1 import mmsim_pb2 as pb
from mmsim.v1 import mmsim_pb2_grpc

P = 4096
SRC, DST = 0x100000000, 0x200000000


async def scenario(mm: Client, shard: int) -> list[Any]:
    """A tree on ``shard``: faults, fork, COW, a move, walks, a failing move. What it saw, with pids
    made relative to the root's (they differ between runs on the same shard)."""
    root = await mm.create_process(shard=shard)
    assert root.shard == shard

    def rel(pid: int) -> int:
        return pid - root.pid

    async def remap(dst: int, src_: int) -> Any:
        try:
            return await root.remap(dst, src_, P)
        except OSError as e:
            return (e.errno, getattr(e, "moved", None))

    out: list[Any] = []
    src = await root.mmap(8 * P, addr=SRC)
    await root.mmap(8 * P, uffd="missing", addr=DST)
    for i in range(8):
        await root.write(src.start + i * P, 100 + i)
    out.append(await remap(DST, SRC))  # exclusive: moved
    child = await root.fork()
    await child.write(src.start + P, 7)  # COW: the child gets its own page
    out.append(await remap(DST + P, SRC + P))  # not exclusive since the fork: EBUSY
    await root.write(src.start + 3 * P, 9)  # reused in place: exclusive again
    out.append(await remap(DST + 3 * P, SRC + 3 * P))
    out.append(await remap(DST + 3 * P, SRC + 4 * P))  # the destination is populated: EEXIST
    walk = await root.walk(SRC + 2 * P)
    out.append((walk.referenced, sorted((rel(pid), addr) for pid, addr in walk.mappings)))
    out.append([await root.read(DST), await root.read(DST + 3 * P), await child.read(SRC + P),
                await child.read(SRC + 3 * P)])
    folio = await child.folio(SRC + 2 * P)
    out.append((folio.mapcount, folio.value, folio.exclusive) if folio else None)
    out.append([(v.start, v.end, v.prot, v.uffd) for v in await root.vmas()])
    await child.exit()
    await root.exit()
    return out


@pytest.fixture
def sharded() -> Iterator[ServerProcess]:
    """``mmsim serve --shards 2`` on two consecutive free ports."""
    base = free_ports(2)
    with serve_subprocess("--shards", "2", "--listen", f"127.0.0.1:{base}", "--grace", "20") as server:
        yield server


@pytest.fixture
def proxy(sharded: ServerProcess, tmp_path: Path) -> Iterator[str]:
    """A real nginx in front of the two shards, with the configuration ``mmsim nginx-config``
    generates; its address."""
    port = free_ports(1)
    base = int(sharded.addresses[0].rsplit(":", 1)[1])
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_config(2, listen_port=port, shard_host="127.0.0.1", shard_port=base))
    with run_nginx(conf, port, tmp_path):
        yield f"127.0.0.1:{port}"


async def test_through_nginx_and_direct_the_same_scenario_gives_the_same_results(
    sharded: ServerProcess, proxy: str
) -> None:
    async with Client(sharded.addr) as direct, Client(proxy) as proxied:
        assert [s.address for s in await direct.shards()] == list(sharded.addresses)
        for shard in (0, 1):
            want = await scenario(direct, shard)
            got = await scenario(proxied, shard)
            assert got == want, (shard, got, want)
        assert direct.routing == "direct" and proxied.routing == "proxy"
        # Trees spread round-robin over both shards, through the proxy as directly.
        for mm in (direct, proxied):
            shards: list[int] = []
            for _ in range(4):
                placed = (await mm.create_process()).shard
                assert placed is not None
                shards.append(placed)
            assert sorted(shards) == [0, 0, 1, 1]
        assert await direct.check_invariants() == [] and await proxied.check_invariants() == []
        assert (await proxied.stats(shard=0))["processes"] == (await direct.stats(shard=0))["processes"]


async def test_a_handle_sent_to_another_shard_is_not_found_naming_the_right_one(
    sharded: ServerProcess, proxy: str
) -> None:
    async with Client(sharded.addr) as mm:
        p = await mm.create_process(shard=1)
        await p.mmap(P, addr=SRC)
    for address, metadata in ((sharded.addresses[0], None), (proxy, (("x-mmsim-shard", "0"),))):
        async with grpc.aio.insecure_channel(address) as ch:
            stub = mmsim_pb2_grpc.MemoryManagerStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.ListVmas(pb.ProcessRequest(process=p.id), timeout=10, metadata=metadata)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            details = e.value.details()
            assert details is not None
            assert "shard 1" in details and "this is shard 0" in details
            # The proxy routes on the header: shard 1's handle with shard 1's header is served.
            if metadata is not None:
                vmas = await stub.ListVmas(pb.ProcessRequest(process=p.id), timeout=10,
                                           metadata=(("x-mmsim-shard", "1"),))
                assert [v.start for v in vmas.vmas] == [SRC]
    async with Client(sharded.addr) as mm:  # through the SDK a handle always reaches its shard
        assert [v.start for v in await mm.process(p.id).vmas()] == [SRC]
    async with Client([sharded.addresses[0]]) as static:
        with pytest.raises(WrongShardError) as info:
            await static.process(p.id).vmas()
        assert info.value.shard == 1 and isinstance(info.value, ProcessNotFoundError)


async def test_discovery_from_the_first_address_reaches_every_shard(sharded: ServerProcess) -> None:
    async with Client(sharded.addr) as mm:
        shards = await mm.shards()
        assert [s.index for s in shards] == [0, 1]
        assert all(s.state == pb.SHARD_STATE_SERVING and s.generation > 0 for s in shards)
        assert sorted({r.conn.target for r in await mm.routes()}) == sorted(sharded.addresses)
        for shard in (0, 1):
            p = await mm.create_process(shard=shard)
            await p.mmap(P, addr=SRC)
            await p.write(SRC, shard + 40)
            # A Process made from the bare handle routes by the shard it carries.
            assert await mm.process(p.id).read(SRC) == shard + 40
            assert (await mm.stats(shard=shard))["processes"] == 1
        await mm.ping()
        assert await mm.protocol() == "recheck"


async def test_reclaim_runs_on_every_shard_and_sums_what_they_freed(sharded: ServerProcess) -> None:
    """Each shard has its own LRU lists and swap device: Client.reclaim runs on every shard and
    returns the folios freed in all; ``shard=`` runs it on one."""
    async with Client(sharded.addr) as mm:
        procs = []
        for shard in (0, 1):
            p = await mm.create_process(shard=shard)
            await p.mmap(8 * P, addr=SRC)
            for i in range(8):
                await p.write(SRC + i * P, 100 * shard + i)
            await p.madvise(SRC, 8 * P, "pageout")  # written, kept in each shard's swap cache
            procs.append(p)
        assert await mm.reclaim(4, shard=1) == 4
        assert (await mm.stats(shard=0))["swap_cache_folios"] == 8
        assert (await mm.stats(shard=1))["swap_cache_folios"] == 4
        assert await mm.reclaim(100) == 12  # both shards: 8 + the 4 left
        for shard, p in enumerate(procs):
            stats = await mm.stats(shard=shard)
            assert stats["swap_cache_folios"] == 0 and stats["swap_slots_in_use"] == 8
            assert [await p.read(SRC + i * P) for i in range(8)] == [100 * shard + i for i in range(8)]
        assert await mm.check_invariants() == []


async def _until(condition: Any, timeout: float = 60.0) -> Any:
    """Poll ``condition()`` (async) until it returns something true; its value."""
    deadline = time.monotonic() + timeout
    while not (value := await condition()):
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.05)
    return value


async def test_a_killed_shard_restarts_under_a_new_generation(sharded: ServerProcess) -> None:
    async with Client(sharded.addr) as mm:
        keep = await mm.create_process(shard=0)
        await keep.mmap(4 * P, addr=SRC)
        await keep.write(SRC, 11)
        kept_child = await keep.fork()
        lost = await mm.create_process(shard=1)
        await lost.mmap(P, addr=SRC)
        before = {s.index: s.generation for s in await mm.shards()}
        async with grpc.aio.insecure_channel(sharded.addresses[0]) as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service="mmsim.shard.1"))  # type: ignore[attr-defined]  # the stubs' HealthStub has no methods
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            os.kill(shard_pids(sharded.pid)[1], signal.SIGKILL)
            # Shard 0 reports shard 1 down while the supervisor restarts it, then up again.
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()

        async def restarted() -> Any:
            shards = await mm.shards()
            s1 = shards[1]
            return s1 if s1.state == pb.SHARD_STATE_SERVING and s1.generation > before[1] else None

        s1 = await _until(restarted)
        assert s1.address == sharded.addresses[1]  # the same address across the restart
        with pytest.raises(ShardRestartedError) as info:
            await lost.vmas()
        assert info.value.shard == 1 and "restarted" in info.value.details
        # The new shard serves new trees; nothing of the old one is there.
        fresh = await mm.create_process(shard=1)
        assert fresh.id != lost.id and fresh.id.split(".")[1] == str(s1.generation)
        assert (await mm.stats(shard=1))["processes"] == 1
        # The other shard's trees are untouched.
        assert (await mm.shards())[0].generation == before[0]
        assert await keep.read(SRC) == 11 and await kept_child.read(SRC) == 11
        assert await mm.check_invariants(shard=0) == [] and await mm.check_invariants(shard=1) == []


async def test_sigterm_to_the_supervisor_drains_every_shard_and_exits_zero() -> None:
    base = free_ports(2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmsim.server", "serve", "--shards", "2", "--listen", f"127.0.0.1:{base}",
         "--grace", "30", "--log-format", "json", "--access-log-sample", "0"],
        stderr=subprocess.PIPE, text=True,
    )
    assert proc.stderr is not None
    try:
        while "shards" not in (event := json.loads(proc.stderr.readline() or '{"shards": 0}')):
            pass
        assert event["shards"], "the supervisor did not start"
        async with Client(f"127.0.0.1:{base}", timeout=60) as mm:
            procs = [await mm.create_process(shard=s) for s in (0, 1)]
            stubs = []
            for p in procs:
                await p.mmap(64 * P, addr=SRC)
                stubs.append((p, mmsim_pb2_grpc.MemoryManagerStub((await p._resolve()).conn.channel)))
            ops = {p.id: [pb.Op(write=pb.WriteRequest(process=p.id, addr=SRC + (i % 64) * P, value=i))
                          for i in range(4000)] for p in procs}
            calls = [asyncio.ensure_future(stub.Batch(pb.BatchRequest(ops=ops[p.id]), timeout=60))
                     for p, stub in stubs for _ in range(6)]
            # Both shards have calls in progress (their stats move) when the signal comes.
            await _until(lambda: _both_busy(mm))
            proc.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*calls, return_exceptions=True)
        ok = [r for r in results if not isinstance(r, BaseException)]
        for r in results:
            if isinstance(r, BaseException):  # not yet taken in when the shard stopped taking calls
                assert isinstance(r, grpc.aio.AioRpcError), r
                assert r.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), r
        assert ok and all(len(r.results) == 4000 for r in ok)  # what was accepted ran to the end
        rest = proc.stderr.read()
        assert proc.wait(60) == 0
        events = [json.loads(line) for line in rest.splitlines() if line.startswith("{")]
        stopped = [e for e in events if e.get("event") == "stopped"]
        assert sum(1 for e in stopped if e.get("audit") == "clean") == 2, stopped
        assert any(e.get("logger") == "mmsim.supervisor" and "failed" not in e for e in stopped)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


async def _both_busy(mm: Client) -> bool:
    """Both shards have begun a batch: its first writes made folios there."""
    return all([(await mm.stats(shard=s)).get("folios", 0) > 0 for s in (0, 1)])


def _scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus endpoint: (name, sorted labels) -> value."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_every_shard_serves_metrics_that_move_under_load() -> None:
    with serve_subprocess("--shards", "2", "--metrics-listen", "127.0.0.1:0") as server:
        async with Client(server.addr) as mm:
            shards = await mm.shards()
            assert all(s.metrics_address for s in shards)
            before = [_scrape(s.metrics_address) for s in shards]
            for shard in (0, 1):
                await scenario(mm, shard)
            after = [_scrape(s.metrics_address) for s in shards]
    remap = ("grpc_service", "mmsim.v1.MemoryManager"), ("grpc_method", "Remap"), ("grpc_type", "unary")
    for b, a in zip(before, after, strict=True):
        started = ("grpc_server_started_total", tuple(sorted(remap)))
        handled_ok = ("grpc_server_handled_total", tuple(sorted((*remap, ("grpc_code", "OK")))))
        busy = ("grpc_server_handled_total", tuple(sorted((*remap, ("grpc_code", "FailedPrecondition")))))
        assert a[started] - b.get(started, 0) == 4  # the scenario's four moves
        assert a[handled_ok] - b.get(handled_ok, 0) == 2 and a[busy] - b.get(busy, 0) == 1
        seconds = ("grpc_server_handling_seconds_count", tuple(sorted(remap)))
        assert a[seconds] == a[started]
        assert a[("mmsim_moves_total", (("errno", "OK"),))] - b.get(("mmsim_moves_total", (("errno", "OK"),)), 0) == 2
        assert a[("mmsim_walks_total", ())] > b.get(("mmsim_walks_total", ()), 0)
        assert a[("mmsim_processes", ())] == 0  # the scenario's processes exited


def test_a_shard_that_cannot_listen_stops_the_supervisor_with_status_1() -> None:
    base = free_ports(2)
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", base + 1))
        busy.listen()
        done = subprocess.run(
            [sys.executable, "-m", "mmsim.server", "serve", "--shards", "2", "--listen", f"127.0.0.1:{base}"],
            capture_output=True, text=True, timeout=120,
        )
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{base + 1}" in done.stderr
    assert "mmsim serve: shard 1 did not start" in done.stderr


def test_the_supervisor_refuses_a_network_address_without_credentials_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mmsim.server", "serve", "--shards", "2", "--listen", "0.0.0.0:0"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "mmsim serve: refusing to listen on 0.0.0.0:0 (not loopback) without TLS or a token; "
        "give --tls-cert/--tls-key or --token-file, or --insecure"
    ]


async def test_the_load_generator_works_through_the_proxy(sharded: ServerProcess, proxy: str) -> None:
    from rich.console import Console
    from test_loadgen import options

    from mmsim.loadgen.report import validate
    from mmsim.loadgen.runner import run

    async def per_shard() -> list[dict[str, int]]:
        async with Client(sharded.addr) as mm:
            return [await mm.stats(shard=0), await mm.stats(shard=1)]

    before = await per_shard()
    report = await run(options(proxy, trees=None, workers=2), Console(quiet=True))
    validate(report)
    assert report["server"] == {"protocol": "recheck", "shards": 2, "routing": "proxy"}
    assert report["overall"]["ok"] > 0 and report["overall"]["failures"] == {}, report["overall"]
    assert report["errnos"] == {} and set(report["statuses"]) == {"OK"}
    after = await per_shard()
    for b, a in zip(before, after, strict=True):  # both shards did work, reached through nginx
        assert all(a.get(k, 0) > b.get(k, 0) for k in ("walk", "move_pages", "fork")), (b, a)
        assert a["processes"] == 0


PLUGIN_THROUGH_PROXY = """\
async def test_through_the_proxy(mmsim_server, mmsim_client):
    assert mmsim_server == {proxy!r}
    for shard in (0, 1):
        p = await mmsim_client.create_process(shard=shard)
        v = await p.mmap(4096)
        await p.write(v.start, 40 + shard)
        assert p.shard == shard and await mmsim_client.process(p.id).read(v.start) == 40 + shard
        await p.exit()
    assert mmsim_client.routing == "proxy" and await mmsim_client.check_invariants() == []
"""


def test_the_pytest_plugin_works_through_the_proxy(sharded: ServerProcess, proxy: str, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "pytest.ini").write_text(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    (project / "test_proxy.py").write_text(PLUGIN_THROUGH_PROXY.format(proxy=proxy))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--mmsim-target", proxy],
                          cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout + done.stderr
