"""The standard gRPC services beside MemoryManager, and shutdown."""

import asyncio
import os
import signal
import socket
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mmsim.v1 import mmsim_pb2 as pb
from mmsim.v1 import mmsim_pb2_grpc

P = 4096


async def test_health_reports_serving(channel: grpc.aio.Channel) -> None:
    h = health_pb2_grpc.HealthStub(channel)
    for service in ("", "mmsim.v1.MemoryManager"):
        r = await h.Check(health_pb2.HealthCheckRequest(service=service))  # type: ignore[attr-defined]  # the stubs' HealthStub has no methods
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await h.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))  # type: ignore[attr-defined]  # the stubs' HealthStub has no methods
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_and_describes_the_service(channel: grpc.aio.Channel) -> None:
    r = reflection_pb2_grpc.ServerReflectionStub(channel)  # type: ignore[arg-type]  # the stubs' reflection stub is for a sync channel

    async def ask(**kw: object) -> reflection_pb2.ServerReflectionResponse:
        call = r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**kw)]))  # type: ignore[arg-type, operator]  # the stubs' reflection stub is for a sync channel
        return [resp async for resp in call][0]  # noqa: RUF015 - the stream is read to its end

    listed = await ask(list_services="")
    names = {s.name for s in listed.list_services_response.service}
    assert {"mmsim.v1.MemoryManager", "grpc.health.v1.Health"} <= names
    described = await ask(file_containing_symbol="mmsim.v1.MemoryManager")
    assert described.file_descriptor_response.file_descriptor_proto


async def test_stop_drains_in_flight_calls_and_refuses_new_ones(server, stub) -> None:
    p = await stub.CreateProcess(pb.CreateProcessRequest())
    v = await stub.Mmap(pb.MmapRequest(process=p.handle, length=64 * P, prot=pb.PROT_RW))
    ops = [pb.Op(write=pb.WriteRequest(process=p.handle, addr=v.start + (i % 64) * P, value=i)) for i in range(5000)]
    batches = [asyncio.ensure_future(stub.Batch(pb.BatchRequest(ops=ops))) for _ in range(4)]
    while server.model.k.stats["fault_new_folio"] == 0:  # the first batch is running on the server
        await asyncio.sleep(0)
    await server.stop(30)
    results = await asyncio.gather(*batches, return_exceptions=True)
    finished = [r for r in results if not isinstance(r, BaseException)]
    # The call already running was drained to completion; calls not yet accepted were refused.
    assert finished
    for resp in finished:
        assert len(resp.results) == len(ops) and not any(r.HasField("error") for r in resp.results)
    for r in results:
        if isinstance(r, BaseException):
            assert isinstance(r, grpc.aio.AioRpcError)
            assert r.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Ping(pb.Empty(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.model.check_invariants() == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _wait_serving(addr: str, proc: subprocess.Popen) -> None:
    async with grpc.aio.insecure_channel(addr) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        for _ in range(200):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                r = await h.Check(health_pb2.HealthCheckRequest(), timeout=1, wait_for_ready=True)  # type: ignore[attr-defined]  # the stubs' HealthStub has no methods
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.05)
        raise AssertionError("server never became healthy")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_while_calls_are_in_flight_exits_zero(sig: signal.Signals) -> None:
    addr = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "MMSIM_LISTEN": addr, "MMSIM_LOG_FORMAT": "json"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmsim.server", "serve", "--grace", "20"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        await _wait_serving(addr, proc)
        async with grpc.aio.insecure_channel(addr) as ch:
            stub = mmsim_pb2_grpc.MemoryManagerStub(ch)
            p = await stub.CreateProcess(pb.CreateProcessRequest())
            v = await stub.Mmap(pb.MmapRequest(process=p.handle, length=64 * P, prot=pb.PROT_RW))
            ops = [pb.Op(write=pb.WriteRequest(process=p.handle, addr=v.start + (i % 64) * P, value=i))
                   for i in range(5000)]
            calls = [asyncio.ensure_future(stub.Batch(pb.BatchRequest(ops=ops))) for _ in range(8)]
            calls += [asyncio.ensure_future(stub.Read(pb.AccessRequest(process=p.handle, addr=v.start)))
                      for _ in range(50)]
            await asyncio.sleep(0.05)
            proc.send_signal(sig)
            results = await asyncio.gather(*calls, return_exceptions=True)
        for r in results:
            if isinstance(r, grpc.aio.AioRpcError):
                assert r.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), r
            else:
                assert not isinstance(r, BaseException), r
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert '"audit": "clean"' in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_json_logs_carry_request_id_and_method() -> None:
    import json

    addr = f"127.0.0.1:{_free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmsim.server", "serve", "--listen", addr, "--log-level", "debug"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        await _wait_serving(addr, proc)
        async with grpc.aio.insecure_channel(addr) as ch:
            stub = mmsim_pb2_grpc.MemoryManagerStub(ch)
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Read(pb.AccessRequest(process="0.1.1.00000000000000000000000000000000", addr=0),
                                metadata=(("x-request-id", "req-42"),))
            for bad in ("0.1.\u00b2", "0.1." + "9" * 5000, "x" * 8192):  # once UNKNOWN, with 9 KB of traceback
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Read(pb.AccessRequest(process=bad, addr=0))
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]  # JSON: not a terminal
    failed = [r for r in records if r.get("event") == "rpc" and r.get("code") != "OK"]
    assert failed and failed[0]["request_id"] == "req-42"
    assert failed[0]["method"] == "/mmsim.v1.MemoryManager/Read" and failed[0]["code"] == "NOT_FOUND"
    assert all("timestamp" in r and "level" in r for r in records)
    assert not [r for r in records if "exception" in r or "Traceback" in str(r)]
    assert max(len(line) for line in err.splitlines()) < 1024  # echoed input is truncated
    assert any(r.get("event") == "serving" for r in records)
