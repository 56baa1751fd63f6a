"""No client can crash the server process: streams left early, cancelled, timed out or left unread
at shutdown.

When a stream ends while its handler waits in a write, gRPC releases the call first and the
handler's generator is finalized after: anything that then asks the call's context for what gRPC
core holds (its peer) dereferences the released call, and the process dies with SIGSEGV. Each test
runs its own ``mmsim serve`` process with the access log on for every call (the default), repeats
the hostile action, checks that the server still answers Ping and Health, and that it exits 0 on
SIGTERM.

A client built with ``SLOW_READER`` keeps gRPC's initial 64 KiB receive window (no BDP probing),
so a server writing it larger responses that it does not read waits in that write.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from servers import ServerProcess, mmsim_serve

from mmsim.client import Client, ops
from mmsim.v1 import mmsim_pb2 as pb
from mmsim.v1 import mmsim_pb2_grpc

P = 4096
#: The access log as ``mmsim serve`` writes it by default: one line for every call.
SERVE_ARGS = ("--access-log-sample", "1")
SLOW_READER = [("grpc.http2.bdp_probe", 0)]
#: Get-folio operations in one request: a response of about 100 KB, more than a slow reader's window.
LARGE_BATCH = 4000
ROUNDS = 30

pytestmark = pytest.mark.timeout(60)


def _exit_text(status: int | None) -> str:
    if status is None:
        return "still running"
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return f"exit status {status}"


@contextmanager
def _serve(*args: str) -> Iterator[ServerProcess]:
    """``mmsim serve`` (the access log on for every call), failing the test with how the server
    ended if it died during the test, and unless it exits 0 on SIGTERM at the end."""
    with mmsim_serve(*SERVE_ARGS, *args, check_exit=False) as server:
        try:
            yield server
        except Exception:
            try:  # a call fails as soon as the server's sockets close, a moment before it is reaped
                status = server.proc.wait(5)
            except subprocess.TimeoutExpired:
                raise
            if status == 0:
                raise
            pytest.fail(f"mmsim serve died during the test: {_exit_text(status)}")
    assert server.proc.returncode == 0, f"mmsim serve ended with {_exit_text(server.proc.returncode)} on SIGTERM"


async def _assert_serving(server: ServerProcess) -> None:
    """The server process runs, and answers Ping and a Health check with SERVING."""
    assert server.proc.poll() is None, f"mmsim serve died: {_exit_text(server.proc.returncode)}"
    async with grpc.aio.insecure_channel(server.addr) as channel:
        await mmsim_pb2_grpc.MemoryManagerStub(channel).Ping(pb.Empty(), timeout=10)
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)  # type: ignore[attr-defined]  # the stubs' HealthStub has no methods
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0) -> None:
    """Poll ``check`` until it holds, or fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not await check():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def _present_page(stub: mmsim_pb2_grpc.MemoryManagerStub) -> tuple[str, int]:
    """A process and the address of a page it has written."""
    handle = (await stub.CreateProcess(pb.CreateProcessRequest(), timeout=10)).handle
    vma = await stub.Mmap(pb.MmapRequest(process=handle, length=P, prot=pb.PROT_RW), timeout=10)
    await stub.Write(pb.WriteRequest(process=handle, addr=vma.start, value=7), timeout=10)
    return handle, vma.start


def _folios(handle: str, addr: int, n: int) -> pb.BatchRequest:
    return pb.BatchRequest(ops=[pb.Op(get_folio=pb.AccessRequest(process=handle, addr=addr))] * n)


async def test_leaving_a_userfault_stream_early_with_events_queued() -> None:
    """``async for ev in p.userfaults(): ... break`` while more faults are queued: the stream is
    cancelled while the server writes it the next event. The faults stay, and resolve."""
    pages = 8
    with _serve() as server:
        async with Client(server.addr, timeout=10) as mm:
            p = await mm.create_process()
            v = await p.mmap(pages * P, uffd="missing")
            readers = [asyncio.ensure_future(p.read(v.start + i * P, timeout=60)) for i in range(pages)]
            try:
                async def asleep() -> bool:
                    return len((await p.list_userfaults()).waiting) == pages

                await _until(asleep, "the reads to sleep on their userfaults")
                for _ in range(ROUNDS):
                    async for ev in p.userfaults():
                        assert v.start <= ev.addr < v.end
                        break
                await _assert_serving(server)
                assert len((await p.list_userfaults()).waiting) == pages
                assert await p.uffd_copy(v.start, pages * P, 5) == pages * P
                assert await asyncio.gather(*readers) == [5] * pages
                assert await mm.check_invariants() == []
            finally:
                for r in readers:
                    r.cancel()
                await asyncio.gather(*readers, return_exceptions=True)


class _Leave(Exception):
    """Leaves a ``batch_stream`` block, which cancels the stream."""


async def test_cancelling_a_batch_stream_after_its_first_response() -> None:
    """A BatchStream cancelled right after its first response, while the server writes the next
    ones: raw gRPC calls, and the SDK's ``batch_stream`` left by an exception."""
    with _serve() as server:
        async with grpc.aio.insecure_channel(server.addr) as channel:
            stub = mmsim_pb2_grpc.MemoryManagerStub(channel)
            handle, addr = await _present_page(stub)
            for _ in range(ROUNDS):
                call = stub.BatchStream(timeout=10)
                for _ in range(5):
                    await call.write(_folios(handle, addr, 100))
                first = await call.read()
                assert first.results[0].folio.value == 7
                call.cancel()
            await _assert_serving(server)
        async with Client(server.addr, timeout=10) as mm:
            p = await mm.create_process()
            v = await p.mmap(P)
            await p.write(v.start, 7)
            for _ in range(ROUNDS):
                with suppress(_Leave):
                    async with mm.batch_stream(via=p, timeout=10) as stream:
                        for _ in range(5):
                            await stream.send([ops.folio(p, v.start)] * 100)
                        first = await stream.recv()
                        assert first[0].value == 7
                        raise _Leave
            await _assert_serving(server)
            assert await mm.check_invariants() == []


@pytest.mark.parametrize("service", ["grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"])
async def test_cancelling_a_reflection_stream_after_its_first_response(service: str) -> None:
    """Server reflection (no process handle needed, nor a token on a default server) cancelled
    right after its first response, while the server writes the next ones."""
    with _serve() as server:
        async with grpc.aio.insecure_channel(server.addr) as channel:
            # v1 and v1alpha are the same messages on the wire.
            info = channel.stream_stream(
                f"/{service}/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            for _ in range(ROUNDS):
                call = info(timeout=10)
                for _ in range(5):
                    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
                first = await call.read()
                assert isinstance(first, reflection_pb2.ServerReflectionResponse)
                assert "mmsim.v1.MemoryManager" in {s.name for s in first.list_services_response.service}
                call.cancel()
        await _assert_serving(server)


async def test_batch_stream_deadline_passes_while_its_responses_are_unread() -> None:
    """A BatchStream whose client does not read its large responses: its deadline passes while the
    server waits to write them."""
    with _serve() as server:
        async with grpc.aio.insecure_channel(server.addr, options=SLOW_READER) as channel:
            stub = mmsim_pb2_grpc.MemoryManagerStub(channel)
            handle, addr = await _present_page(stub)
            request = _folios(handle, addr, LARGE_BATCH)
            for _ in range(15):
                call = stub.BatchStream(timeout=0.2)
                for _ in range(2):
                    await call.write(request)
                assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await _assert_serving(server)


async def test_sigterm_with_unread_batch_streams_open() -> None:
    """SIGTERM while BatchStreams whose large responses the client does not read are open: the
    server drains, cancels them when the grace period ends (their generators are finalized as the
    event loop closes, after "stopped"), and exits 0."""
    for _ in range(3):
        with _serve("--grace", "0.5") as server:
            async with grpc.aio.insecure_channel(server.addr, options=SLOW_READER) as channel:
                stub = mmsim_pb2_grpc.MemoryManagerStub(channel)
                handle, addr = await _present_page(stub)
                request = _folios(handle, addr, LARGE_BATCH)
                calls = [stub.BatchStream() for _ in range(3)]
                for call in calls:
                    for _ in range(2):
                        await call.write(request)
                await _assert_serving(server)
                server.proc.send_signal(signal.SIGTERM)
                status = await asyncio.to_thread(server.proc.wait, 30)
                assert status == 0, f"mmsim serve ended with {_exit_text(status)} on SIGTERM"
