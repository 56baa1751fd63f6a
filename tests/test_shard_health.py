"""Shards report a peer that stops answering (SIGSTOP, hung, gone) as down, in the health service
``mmsim.shard.<i>`` and in GetTopology, and as serving again once it answers; what the supervisor
says and what the probe finds are combined."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from proxy import free_ports
from servers import mmsim_serve, shard_pids

from mmsim.client.testing import write_test_certificates
from mmsim.server.app import ServerConfig, start_server
from mmsim.server.topology import DOWN, SERVING, UNKNOWN, ShardInfo, Topology
from mmsim.v1 import mmsim_pb2 as pb
from mmsim.v1 import mmsim_pb2_grpc

SERVING_PB = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING_PB = health_pb2.HealthCheckResponse.NOT_SERVING
#: How soon a stopped peer must be reported down with the default probe (every 1 s, 2 failures).
DETECT = 5.0


async def _until(condition: Callable[[], Awaitable[Any]], timeout: float, what: str) -> float:
    """Poll ``condition()`` until it is true; the seconds that took. Fails after ``timeout``."""
    t0 = time.monotonic()
    while not await condition():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


class Observer:
    """Asks one shard what it reports of another: its health service and GetTopology."""

    def __init__(self, channel: grpc.aio.Channel, peer: int) -> None:
        self.health = health_pb2_grpc.HealthStub(channel)
        self.mm = mmsim_pb2_grpc.MemoryManagerStub(channel)
        self.peer = peer

    async def status(self) -> int | None:
        """The health status of ``mmsim.shard.<peer>``; None while not known (NOT_FOUND)."""
        try:
            reply = await self.health.Check(health_pb2.HealthCheckRequest(service=f"mmsim.shard.{self.peer}"),  # type: ignore[attr-defined]  # the stubs' HealthStub has no methods
                                            timeout=5)
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND, e
            return None
        return reply.status

    async def state(self) -> int:
        return (await self.mm.GetTopology(pb.TopologyRequest(), timeout=5)).shards[self.peer].state

    async def reports(self, status: int, state: int) -> bool:
        return await self.status() == status and await self.state() == state


async def _stopped_then_back(shard1: Observer, pid: int) -> None:
    """SIGSTOP shard 1's process ``pid``: reported down within DETECT; SIGCONT: serving again."""
    os.kill(pid, signal.SIGSTOP)
    try:
        await _until(lambda: shard1.reports(NOT_SERVING_PB, pb.SHARD_STATE_DOWN), DETECT, "down")
    finally:
        os.kill(pid, signal.SIGCONT)
    await _until(lambda: shard1.reports(SERVING_PB, pb.SHARD_STATE_SERVING), DETECT, "serving again")


# -- how the supervisor's word and the probe's findings combine


def _topology() -> tuple[Topology, list[ShardInfo]]:
    t = Topology(0, 5, [ShardInfo(0, "a:1", 5, SERVING), ShardInfo(1, "a:2", 0, UNKNOWN)])
    changes: list[ShardInfo] = []
    t.on_change = changes.append
    return t, changes


def test_a_peer_the_supervisor_says_serves_is_down_while_it_does_not_answer() -> None:
    t, changes = _topology()
    t.update([ShardInfo(0, "a:1", 5, SERVING), ShardInfo(1, "a:2", 7, SERVING)])
    t.probed(1, True)
    assert [c.state for c in changes] == [SERVING]
    t.probed(1, False)
    t.probed(1, False)
    assert t.shards[1].state == DOWN and t.to_pb().shards[1].state == pb.SHARD_STATE_DOWN
    t.probed(1, True)
    assert [c.state for c in changes] == [SERVING, DOWN, SERVING]  # one change each
    assert t.shards[1] == ShardInfo(1, "a:2", 7, SERVING) and t.shards[0].generation == 5


def test_a_peer_the_supervisor_said_down_is_back_only_once_it_also_answers() -> None:
    t, changes = _topology()
    t.update([ShardInfo(0, "a:1", 5, SERVING), ShardInfo(1, "a:2", 7, SERVING)])
    t.probed(1, True)
    t.update([ShardInfo(0, "a:1", 5, SERVING), ShardInfo(1, "a:2", 7, DOWN)])
    t.probed(1, True)  # an answer while the supervisor says down changes nothing
    assert t.shards[1].state == DOWN
    t.probed(1, False)
    t.update([ShardInfo(0, "a:1", 5, SERVING), ShardInfo(1, "a:2", 8, SERVING)])  # restarted
    assert t.shards[1].state == DOWN and t.shards[1].generation == 8
    t.probed(1, True)
    assert t.shards[1].state == SERVING
    assert [(c.generation, c.state) for c in changes] == [(7, SERVING), (7, DOWN), (8, DOWN), (8, SERVING)]


def test_until_some_probe_is_answered_failures_leave_peers_as_told() -> None:
    t, changes = _topology()
    t.update([ShardInfo(0, "a:1", 5, SERVING), ShardInfo(1, "a:2", 7, SERVING)])
    t.probed(1, False)  # say, TLS peers that refuse this shard's certificate, this one included
    assert t.shards[1].state == SERVING and not t.probe_works
    t.update([ShardInfo(0, "a:1", 5, SERVING), ShardInfo(1, "a:2", 7, DOWN)])
    t.update([ShardInfo(0, "a:1", 5, SERVING), ShardInfo(1, "a:2", 8, SERVING)])
    assert t.shards[1].state == SERVING  # the supervisor alone is heard
    t.probed(0, True)  # this shard answers its own probe: the probe gets through
    assert t.probe_works and t.shards[0].state == SERVING
    t.probed(1, False)
    assert [(c.generation, c.state) for c in changes] == [(7, SERVING), (7, DOWN), (8, SERVING), (8, DOWN)]


def test_a_peer_never_heard_of_is_down_once_the_probe_works() -> None:
    t, changes = _topology()  # --peers: shard 1's state is not known
    t.probed(1, False)
    assert t.shards[1].state == UNKNOWN and changes == []
    t.probed(0, True)
    t.probed(1, False)
    assert t.shards[1].state == DOWN
    t.probed(1, True)
    assert t.shards[1].state == SERVING and t.to_pb().shards[1].state == pb.SHARD_STATE_SERVING


# -- the probe in a server


class HangingHealth(health.aio.HealthServicer):
    """A peer whose health check never answers while ``hung`` is set, as a hung process."""

    def __init__(self) -> None:
        super().__init__()
        self.hung = asyncio.Event()
        self.calls = 0

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Any:
        self.calls += 1
        if self.hung.is_set():
            await asyncio.Event().wait()
        return await super().Check(request, context)


async def test_a_hung_peer_is_reported_down_then_up_and_the_probe_stops_with_the_server() -> None:
    peer = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    servicer = HangingHealth()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, peer)
    peer_addr = f"127.0.0.1:{peer.add_insecure_port('127.0.0.1:0')}"
    await peer.start()
    running = await start_server(ServerConfig(listen="127.0.0.1:0", log_level="warning", shard_index=0,
                                              peers=("127.0.0.1:0", peer_addr), peer_probe_interval=0.2))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            shard1 = Observer(ch, 1)
            await _until(lambda: shard1.reports(SERVING_PB, pb.SHARD_STATE_SERVING), 5, "serving")
            servicer.hung.set()
            await _until(lambda: shard1.reports(NOT_SERVING_PB, pb.SHARD_STATE_DOWN), 5, "down while hung")
            servicer.hung.clear()
            await _until(lambda: shard1.reports(SERVING_PB, pb.SHARD_STATE_SERVING), 5, "serving again")
    finally:
        await running.stop(None)
        await peer.stop(None)
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "mmsim-peer-probe"]
    assert servicer.calls > 0


async def test_a_stopped_shard_is_reported_not_serving_by_its_peer_and_serving_once_continued() -> None:
    with mmsim_serve("--shards", "2") as server:
        pid = shard_pids(server.pid)[1]
        async with grpc.aio.insecure_channel(server.addresses[0]) as ch:
            shard1 = Observer(ch, 1)
            assert await shard1.reports(SERVING_PB, pb.SHARD_STATE_SERVING)
            await _stopped_then_back(shard1, pid)
            assert shard_pids(server.pid)[1] == pid  # the same process, not a restart


async def test_over_tls_a_stopped_shard_is_reported_down(tmp_path: Path) -> None:
    certs = write_test_certificates(tmp_path)
    with mmsim_serve("--shards", "2", "--tls-cert", str(certs["server_cert"]),
                     "--tls-key", str(certs["server_key"])) as server:
        pid = shard_pids(server.pid)[1]
        credentials = grpc.ssl_channel_credentials(certs["ca"].read_bytes())
        async with grpc.aio.secure_channel(server.addresses[0], credentials) as ch:
            shard1 = Observer(ch, 1)
            # Down shows the checks get through over TLS: were they refused, peers would stay as told.
            await _stopped_then_back(shard1, pid)


async def test_peers_given_with_peers_are_probed_too() -> None:
    base = free_ports(2)
    peers = f"127.0.0.1:{base},127.0.0.1:{base + 1}"
    with mmsim_serve("--shard-index", "0", "--listen", f"127.0.0.1:{base}", "--peers", peers) as shard0:
        async with grpc.aio.insecure_channel(shard0.addr) as ch:
            shard1 = Observer(ch, 1)
            await _until(lambda: shard1.reports(NOT_SERVING_PB, pb.SHARD_STATE_DOWN), DETECT, "down: not started")
            with mmsim_serve("--shard-index", "1", "--listen", f"127.0.0.1:{base + 1}", "--peers", peers) as s1:
                await _until(lambda: shard1.reports(SERVING_PB, pb.SHARD_STATE_SERVING), DETECT, "serving")
                await _stopped_then_back(shard1, s1.pid)
            # Shard 1 stopped (SIGTERM, exit status 0): down.
            await _until(lambda: shard1.reports(NOT_SERVING_PB, pb.SHARD_STATE_DOWN), DETECT, "down once gone")


def _next_json(stream: IO[str]) -> str:
    """The next line of the service's JSON log ("" at its end), past gRPC's own lines."""
    while (line := stream.readline()) and not line.startswith("{"):
        pass
    return line


def test_a_deployment_stops_cleanly_while_its_shards_probe_each_other() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmsim.server", "serve", "--shards", "2", "--listen", "127.0.0.1:0",
         "--log-format", "json", "--peer-probe-interval", "0.1"],
        stderr=subprocess.PIPE, text=True,
    )
    assert proc.stderr is not None
    try:
        while "shards" not in (event := json.loads(_next_json(proc.stderr) or '{"shards": 0}')):
            pass
        assert event["shards"], "the supervisor did not start"
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    # gRPC's own lines (not the service's JSON: "I1203 ... chttp2_transport.cc ... Got goaway" as
    # a probe meets a shard shutting down) may come in between; none may be a warning or an error.
    lines = rest.splitlines()
    assert [line for line in lines if not line.startswith(("{", "I"))] == []
    events = [json.loads(line) for line in lines if line.startswith("{")]
    assert [e for e in events if e["level"] not in ("debug", "info")] == []
    assert sum(e["event"] == "stopped" for e in events) == 3  # two shards and the supervisor


async def test_over_mutual_tls_a_shard_that_cannot_check_itself_leaves_its_peers_as_told(tmp_path: Path) -> None:
    certs = write_test_certificates(tmp_path)  # the server certificate is not for client use
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmsim.server", "serve", "--shards", "2", "--listen", "127.0.0.1:0",
         "--log-format", "json", "--tls-cert", str(certs["server_cert"]), "--tls-key", str(certs["server_key"]),
         "--tls-client-ca", str(certs["ca"])],
        stderr=subprocess.PIPE, text=True,
    )
    assert proc.stderr is not None
    events: list[dict[str, Any]] = []

    def until_logged(holds: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Read the log until an event for which ``holds``; that event."""
        while True:
            line = proc.stderr.readline()  # type: ignore[union-attr]
            assert line, "exited early"
            if line.startswith("{"):  # gRPC's own lines say why handshakes fail
                events.append(json.loads(line))
                if holds(events[-1]):
                    return events[-1]

    try:
        shard0 = (await asyncio.wait_for(asyncio.to_thread(until_logged, lambda e: "shards" in e), 60))["shards"][0]
        warning = await asyncio.wait_for(
            asyncio.to_thread(until_logged, lambda e: "its own health check" in e["event"]), 60)
        assert warning["level"] == "warning" and "not checked" in warning["event"], warning
        credentials = grpc.ssl_channel_credentials(certs["ca"].read_bytes(), certs["client_key"].read_bytes(),
                                                   certs["client_cert"].read_bytes())
        async with grpc.aio.secure_channel(shard0, credentials) as ch:
            assert await Observer(ch, 1).reports(SERVING_PB, pb.SHARD_STATE_SERVING)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert not [e for e in events if e["event"] == "peer does not answer"]
