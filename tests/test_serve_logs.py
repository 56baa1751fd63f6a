"""The server's logs: the access log (one ``rpc`` line per call, sampled), and grpc's own loggers
kept quiet at debug."""

import asyncio
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from typing import Any

import grpc
import pytest
import pytest_asyncio
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from structlog.testing import capture_logs

from mmsim.server.app import RequestContextInterceptor
from mmsim.v1 import mmsim_pb2 as pb
from mmsim.v1 import mmsim_pb2_grpc

P = 4096
ACCESS_FIELDS = {"method", "code", "duration_ms", "request_id", "peer"}


class Served:
    """``mmsim serve`` in a subprocess on a free loopback port, its stderr read line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mmsim.server", "serve", "--listen", "127.0.0.1:0", *args],
            env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, event: str, timeout: float = 60) -> dict[str, Any]:
        """The first JSON record with this event, reading stderr up to it."""
        while True:
            line = self.lines.get(timeout=timeout)
            assert line is not None, f"the server exited before {event!r}: {''.join(self.stderr)}"
            self.stderr.append(line)
            if line.startswith("{") and (record := json.loads(line)).get("event") == event:
                return record

    def stop(self) -> list[dict[str, Any]]:
        """SIGTERM, the exit status checked; every JSON record it wrote."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=60) == 0
        while (line := self.lines.get(timeout=60)) is not None:
            self.stderr.append(line)
        return [json.loads(line) for line in self.stderr if line.startswith("{")]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.pump.join(timeout=60)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@pytest.fixture
def served() -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Served:
        started.append(Served(*args, env=env))
        return started[-1]

    yield start
    for s in started:
        s.kill()


async def _calls(addr: str) -> str:
    """A successful unary call with a request id, a failed one, a stream of two batches, a
    health check; the failed call's status code name."""
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = mmsim_pb2_grpc.MemoryManagerStub(ch)
        await stub.Ping(pb.Empty(), metadata=(("x-request-id", "req-7"),))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Read(pb.AccessRequest(process="nope.1", addr=0))
        failed = e.value.code().name
        p = await stub.CreateProcess(pb.CreateProcessRequest())
        v = await stub.Mmap(pb.MmapRequest(process=p.handle, length=P, prot=pb.PROT_RW))
        batches = [pb.BatchRequest(ops=[pb.Op(write=pb.WriteRequest(process=p.handle, addr=v.start, value=i))])
                   for i in range(2)]
        replies = [r async for r in stub.BatchStream(iter(batches))]
        assert len(replies) == 2
        await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())  # type: ignore[attr-defined]  # the stubs' HealthStub has no methods
    return failed


async def test_access_log_has_one_line_per_call_and_debug_has_no_grpc_lines(served) -> None:
    s = served("--log-format", "json", "--log-level", "debug")
    addr = s.wait_for("serving")["listen"]
    failed_code = await _calls(addr)
    records = s.stop()
    access = [r for r in records if r.get("event") == "rpc"]
    assert [r["method"] for r in access] == [
        "/mmsim.v1.MemoryManager/Ping",
        "/mmsim.v1.MemoryManager/Read",
        "/mmsim.v1.MemoryManager/CreateProcess",
        "/mmsim.v1.MemoryManager/Mmap",
        "/mmsim.v1.MemoryManager/BatchStream",  # one line for the whole stream, when it ends
        "/grpc.health.v1.Health/Check",
    ]
    for r in access:
        assert ACCESS_FIELDS <= set(r) and r["level"] == "info", r
        assert isinstance(r["duration_ms"], float) and r["duration_ms"] >= 0
        assert r["peer"].startswith("ipv4:127.0.0.1:") and r["request_id"]
    assert access[0]["request_id"] == "req-7" and access[0]["code"] == "OK"
    assert access[1]["code"] == failed_code and access[1]["details"]
    assert len({r["request_id"] for r in access}) == len(access)  # generated ids differ
    assert {r["code"] for r in access[2:]} == {"OK"}
    assert not [r for r in records if r.get("event") == "rpc failed"]  # one line per call, not two
    text = "".join(s.stderr)
    assert "Loaded running loop" not in text
    assert not [r for r in records if r.get("logger", "").startswith("grpc") and r["level"] in ("debug", "info")]


async def test_access_log_sample_zero_keeps_only_failed_calls(served) -> None:
    s = served("--log-format", "json", env={"MMSIM_ACCESS_LOG_SAMPLE": "0"})
    addr = s.wait_for("serving")["listen"]
    failed_code = await _calls(addr)
    access = [r for r in s.stop() if r.get("event") == "rpc"]
    assert [(r["method"], r["code"]) for r in access] == [("/mmsim.v1.MemoryManager/Read", failed_code)]


# In process: the status each kind of ending is logged with, through the interceptor alone.

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
# The entries structlog captured, and serve(handlers, sample=1.0) -> a channel to them.
Logged = tuple[list[MutableMapping[str, Any]], Callable[..., Awaitable[grpc.aio.Channel]]]


@pytest_asyncio.fixture
async def logged() -> AsyncIterator[Logged]:
    """Captured log entries, and a function that serves handlers (name -> unary handler) behind
    the interceptor and returns a channel to them."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    servers: list[grpc.aio.Server] = []
    channels: list[grpc.aio.Channel] = []

    async def serve(handlers: dict[str, Handler], sample: float = 1.0) -> grpc.aio.Channel:
        server = grpc.aio.server(interceptors=[RequestContextInterceptor(sample)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "t.T", {name: grpc.unary_unary_rpc_method_handler(h) for name, h in handlers.items()}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
        return channels[-1]

    try:
        with capture_logs() as entries:
            yield entries, serve
            for ch in channels:
                await ch.close()
            for server in servers:
                await server.stop(None)
    finally:
        structlog.configure(**saved)


def _bytes_method(ch: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    """A unary method of ``ch`` that sends and returns raw bytes (no serializers)."""
    return ch.unary_unary(method)


async def _until(cond: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not cond():
            await asyncio.sleep(0.01)


async def test_access_log_statuses_of_errors_cancellation_and_unknown_methods(logged: Logged) -> None:
    entries, serve = logged
    started = asyncio.Event()

    async def ok(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def boom(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise RuntimeError("boom")

    async def hang(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        started.set()
        await asyncio.Event().wait()
        return b""

    ch = await serve({"Ok": ok, "Boom": boom, "Hang": hang})
    assert await _bytes_method(ch, "/t.T/Ok")(b"x") == b"x"
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _bytes_method(ch, "/t.T/Boom")(b"")
    assert e.value.code() == grpc.StatusCode.UNKNOWN
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _bytes_method(ch, "/t.T/Nope")(b"")
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    call = _bytes_method(ch, "/t.T/Hang")(b"")
    await started.wait()
    call.cancel()

    def codes() -> dict[str, str]:
        return {r["method"]: r["code"] for r in entries if r["event"] == "rpc"}

    await _until(lambda: len(codes()) == 4)
    assert codes() == {"/t.T/Ok": "OK", "/t.T/Boom": "UNKNOWN", "/t.T/Nope": "UNIMPLEMENTED", "/t.T/Hang": "CANCELLED"}
    for r in entries:
        if r["event"] == "rpc":
            assert ACCESS_FIELDS <= set(r) and r["log_level"] == "info"


async def test_access_log_sampling_drops_ok_calls_only(logged: Logged) -> None:
    entries, serve = logged

    async def ok(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def fail(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no")

    ch = await serve({"Ok": ok, "Fail": fail}, sample=0.0)
    for _ in range(20):
        await _bytes_method(ch, "/t.T/Ok")(b"x")
        with pytest.raises(grpc.aio.AioRpcError):
            await _bytes_method(ch, "/t.T/Fail")(b"")

    def access() -> list[MutableMapping[str, Any]]:
        return [r for r in entries if r["event"] == "rpc"]

    # abort() sends the status before the handler returns, so the last line may follow the reply;
    # an OK call's line is written before its reply.
    await _until(lambda: len(access()) >= 20)
    assert [r["code"] for r in access()] == ["FAILED_PRECONDITION"] * 20
    assert access()[0]["details"] == "no"
