"""Unit tests of the client SDK that need no mmsim server: error translation, conversions from
protobuf, batch operation builders, channel configuration, and the Process/Client plumbing over a
fake stub. Two tests use a throwaway grpc.aio server with a fake servicer to check the wire path
(rich details in trailing metadata, gRPC's retry policy)."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from mmsim.client import (
    AnonVma,
    Client,
    DeadlineExceededError,
    FolioInfo,
    InvalidRequestError,
    LimitExceededError,
    MmsimError,
    Process,
    ProcessNotFoundError,
    ServerUnavailableError,
    Vma,
    WalkResult,
    ops,
)
from mmsim.client._client import _Conn, service_config
from mmsim.client._types import anon_vma_from_pb, folio_from_pb, vma_from_pb, walk_from_pb
from mmsim.client.errors import STATUS_DETAILS_KEY, from_op_error, from_rpc_error
from mmsim.server import errors as wire
from mmsim.v1 import mmsim_pb2 as pb
from mmsim.v1 import mmsim_pb2_grpc


# -- building real errors
def _pack(*details: Any) -> list[any_pb2.Any]:
    out = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        out.append(a)
    return out


def rpc_error(code: grpc.StatusCode, message: str, *details: Any) -> grpc.aio.AioRpcError:
    """An AioRpcError as grpc.aio raises it for a status built with grpc_status (as the server does)."""
    status = rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=_pack(*details)))
    return grpc.aio.AioRpcError(
        code=status.code,
        initial_metadata=grpc.aio.Metadata(),
        trailing_metadata=grpc.aio.Metadata(*status.trailing_metadata),
        details=status.details,
    )


def errno_info(err: int, moved: int = 0, domain: str = wire.DOMAIN) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(
        reason=errno.errorcode[err], domain=domain, metadata={"errno": str(err), "moved": str(moved)}
    )


def mm_error(err: int, message: str, moved: int = 0) -> grpc.aio.AioRpcError:
    return rpc_error(wire.code_for_errno(err), message, errno_info(err, moved))


# -- error translation
@pytest.mark.parametrize("err", sorted({*wire.ERRNO_TO_CODE, errno.ENOSPC, errno.EBUSY}))
def test_errno_gives_oserror_with_pythons_subclass(err: int) -> None:
    message = f"[{errno.errorcode[err]}] something went wrong"
    exc = from_rpc_error(mm_error(err, message))
    assert type(exc) is type(OSError(err, "x"))
    assert isinstance(exc, OSError)
    assert exc.errno == err
    assert exc.strerror == message  # kept intact
    assert exc.moved == 0  # type: ignore[attr-defined]
    assert exc.code == wire.code_for_errno(err)  # type: ignore[attr-defined]
    assert exc.reason == errno.errorcode[err]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("err", "cls"),
    [
        (errno.EEXIST, FileExistsError),
        (errno.ENOENT, FileNotFoundError),
        (errno.ESRCH, ProcessLookupError),
        (errno.EAGAIN, BlockingIOError),
        (errno.EPERM, PermissionError),
        (errno.EINTR, InterruptedError),
    ],
)
def test_errno_subclasses(err: int, cls: type[OSError]) -> None:
    assert isinstance(from_rpc_error(mm_error(err, "m")), cls)


def test_short_move_carries_moved() -> None:
    exc = from_rpc_error(mm_error(errno.EAGAIN, "[EAGAIN] short move", moved=3 * 4096))
    assert isinstance(exc, BlockingIOError)
    assert exc.moved == 3 * 4096  # type: ignore[attr-defined]


def test_missing_moved_is_zero() -> None:
    info = error_details_pb2.ErrorInfo(reason="EBUSY", domain=wire.DOMAIN, metadata={"errno": str(errno.EBUSY)})
    exc = from_rpc_error(rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "busy", info))
    assert isinstance(exc, OSError) and exc.errno == errno.EBUSY
    assert exc.moved == 0  # type: ignore[attr-defined]


def test_errno_of_another_domain_is_not_an_oserror() -> None:
    exc = from_rpc_error(
        rpc_error(grpc.StatusCode.ALREADY_EXISTS, "x", errno_info(errno.EEXIST, domain="example.com"))
    )
    assert not isinstance(exc, OSError)
    assert type(exc) is MmsimError
    assert exc.code == grpc.StatusCode.ALREADY_EXISTS


def test_process_not_found() -> None:
    info = error_details_pb2.ErrorInfo(
        reason=wire.PROCESS_NOT_FOUND, domain=wire.DOMAIN, metadata={"process": "abc.7"}
    )
    exc = from_rpc_error(rpc_error(grpc.StatusCode.NOT_FOUND, "no process 'abc.7' on this server", info))
    assert isinstance(exc, ProcessNotFoundError) and isinstance(exc, MmsimError)
    assert exc.code == grpc.StatusCode.NOT_FOUND
    assert exc.details == str(exc) == "no process 'abc.7' on this server"
    assert exc.reason == wire.PROCESS_NOT_FOUND
    assert exc.process == "abc.7"
    assert exc.status is not None and len(exc.status.details) == 1


def test_bad_request_field_violations() -> None:
    br = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="prot", description="unspecified"),
            error_details_pb2.BadRequest.FieldViolation(field="len", description="too long"),
        ]
    )
    exc = from_rpc_error(rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "prot: unspecified", br))
    assert type(exc) is InvalidRequestError
    assert exc.field_violations == [("prot", "unspecified"), ("len", "too long")]
    assert exc.details == "prot: unspecified"


def test_invalid_argument_with_errno_is_oserror() -> None:
    exc = from_rpc_error(mm_error(errno.EINVAL, "[EINVAL] bad"))
    assert type(exc) is OSError and exc.errno == errno.EINVAL


def test_limit_exceeded() -> None:
    info = error_details_pb2.ErrorInfo(
        reason=wire.LIMIT_EXCEEDED, domain=wire.DOMAIN, metadata={"limit": "max_pages", "value": "10"}
    )
    quota = error_details_pb2.QuotaFailure(
        violations=[error_details_pb2.QuotaFailure.Violation(subject="max_pages", description="reached")]
    )
    exc = from_rpc_error(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "max_pages limit of 10 reached", info, quota))
    assert isinstance(exc, LimitExceededError)
    assert exc.limit == "max_pages" and exc.metadata["value"] == "10"


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, LimitExceededError),  # e.g. the server's concurrent-RPC limit
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError),
        (grpc.StatusCode.UNAVAILABLE, ServerUnavailableError),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidRequestError),
        (grpc.StatusCode.INTERNAL, MmsimError),
        (grpc.StatusCode.UNIMPLEMENTED, MmsimError),
        (grpc.StatusCode.CANCELLED, MmsimError),
    ],
)
def test_plain_status_codes(code: grpc.StatusCode, cls: type[MmsimError]) -> None:
    exc = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="boom")
    out = from_rpc_error(exc)
    assert type(out) is cls
    assert isinstance(out, MmsimError)
    assert out.code == code and out.details == "boom" and out.status is None


def test_undecodable_details_fall_back_to_the_code() -> None:
    exc = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(),
        grpc.aio.Metadata((STATUS_DETAILS_KEY, b"\xff\xff not a status")),
        details="down",
    )
    assert type(from_rpc_error(exc)) is ServerUnavailableError


def test_no_trailing_metadata() -> None:
    exc = grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, None, None, details=None)
    out = from_rpc_error(exc)
    assert type(out) is DeadlineExceededError and out.details == ""


def test_op_errors() -> None:
    e = from_op_error(pb.OpError(code=code_pb2.ABORTED, message="[EAGAIN] short", errno=errno.EAGAIN, moved=8192))
    assert isinstance(e, BlockingIOError) and e.moved == 8192 and e.strerror == "[EAGAIN] short"  # type: ignore[attr-defined]
    assert e.code == grpc.StatusCode.ABORTED  # type: ignore[attr-defined]
    e = from_op_error(pb.OpError(code=code_pb2.NOT_FOUND, message="no process"))
    assert type(e) is ProcessNotFoundError
    e = from_op_error(pb.OpError(code=code_pb2.INVALID_ARGUMENT, message="prot: bad"))
    assert type(e) is InvalidRequestError and e.field_violations == []
    e = from_op_error(pb.OpError(code=code_pb2.RESOURCE_EXHAUSTED, message="limit"))
    assert type(e) is LimitExceededError
    e = from_op_error(pb.OpError(code=code_pb2.INTERNAL, message="?"))
    assert type(e) is MmsimError and e.code == grpc.StatusCode.INTERNAL


# -- conversions from protobuf
def test_vma_conversion() -> None:
    m = pb.Vma(start=0x1000, end=0x3000, prot=pb.PROT_RW, uffd=pb.UFFD_MODE_MISSING_WP, dontfork=True, pgoff=1)
    v = vma_from_pb(m)
    assert v == Vma(0x1000, 0x3000, "rw", "missing+wp", True, False, 1, None)
    assert vma_from_pb(pb.Vma(prot=pb.PROT_R, uffd=pb.UFFD_MODE_NONE, anon_vma=5)).anon_vma == 5
    assert vma_from_pb(pb.Vma(prot=pb.PROT_R, uffd=pb.UFFD_MODE_NONE)).uffd is None
    assert vma_from_pb(pb.Vma(prot=pb.PROT_R, uffd=pb.UFFD_MODE_WP)).prot == "r"
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.start = 0  # type: ignore[misc]


def test_folio_conversion() -> None:
    assert folio_from_pb(pb.FolioResponse(present=False, value=3)) is None
    f = folio_from_pb(
        pb.FolioResponse(present=True, value=42, mapcount=2, index=7, anon_vma=0, writable=True, young=True)
    )
    assert f == FolioInfo(
        zero_page=False, value=42, mapcount=2, exclusive=False, index=7, anon_vma=None, writable=True, young=True
    )
    z = folio_from_pb(pb.FolioResponse(present=True, zero_page=True))
    assert z is not None and z.zero_page and z.anon_vma is None
    assert folio_from_pb(pb.FolioResponse(present=True, anon_vma=3)).anon_vma == 3  # type: ignore[union-attr]


def test_walk_conversion() -> None:
    w = walk_from_pb(
        pb.WalkResponse(
            referenced=2,
            mappings=[pb.Mapping(pid=1, addr=0x1000), pb.Mapping(pid=2, addr=0x1000)],
            fast_retries=1,
            slow_retries=2,
        )
    )
    assert w == WalkResult(2, False, [(1, 0x1000), (2, 0x1000)], 1, 2)
    assert w.retries == 3
    c = walk_from_pb(pb.WalkResponse(referenced=-1, contended=True))
    assert c.referenced == -1 and c.contended and c.mappings == []


def test_anon_vma_conversion() -> None:
    a = anon_vma_from_pb(
        pb.AnonVma(
            id=2, root=1, parent=1, refcount=1, num_children=0, num_active_vmas=1,
            vmas=[pb.Mapping(pid=2, addr=0x7000)],
        )
    )
    assert a == AnonVma(2, 1, 1, 1, 0, 1, [(2, 0x7000)])


# -- batch operation builders
class _P(Process):
    """Stands in for a Process in the builders (they only read .id)."""

    def __init__(self, id: str) -> None:
        self.id = id


def test_op_builders() -> None:
    p = _P("h.1")
    o = ops.mmap(p, 8192, prot="r", uffd="wp")
    assert o.kind == "mmap" and o.process is p
    assert o.message.mmap == pb.MmapRequest(process="h.1", length=8192, prot=pb.PROT_R, uffd=pb.UFFD_MODE_WP)
    assert not o.message.mmap.HasField("addr")
    o = ops.mmap(p, 4096, addr=0)
    assert o.message.mmap.HasField("addr") and o.message.mmap.addr == 0
    assert ops.remap(p, 1, 2, 3).message.remap == pb.RemapRequest(process="h.1", dst=1, src=2, len=3, mode=0)
    m = ops.remap(p, 1, 2, 3, allow_src_holes=True, dontwake=True).message.remap.mode
    assert m == pb.REMAP_MODE_ALLOW_SRC_HOLES | pb.REMAP_MODE_DONTWAKE
    assert ops.madvise(p, 0, 4096, "wipeonfork").message.madvise.advice == pb.ADVICE_WIPEONFORK
    assert ops.uffd_register(p, 0, 4096).message.uffd_register.mode == pb.UFFD_MODE_MISSING
    assert ops.folio(p, 5).kind == "get_folio"
    assert ops.write(p, 8, 9).request == pb.WriteRequest(process="h.1", addr=8, value=9)
    assert ops.create_process().process is None
    for bad in (lambda: ops.mmap(p, 4096, prot="rwx"), lambda: ops.mmap(p, 4096, uffd="minor"),
                lambda: ops.madvise(p, 0, 1, "free"), lambda: ops.uffd_register(p, 0, 1, None)):  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            bad()


# -- channel configuration
def _opts(c: Client) -> dict[str, Any]:
    return dict(c.options)


def test_retry_policy_in_service_config() -> None:
    opts = _opts(Client("h:1", retries=2))
    assert opts["grpc.enable_retries"] == 1
    (mc,) = json.loads(opts["grpc.service_config"])["methodConfig"]
    assert mc["name"] == [{"service": "mmsim.v1.MemoryManager"}]
    assert mc["retryPolicy"]["maxAttempts"] == 3
    assert mc["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    (mc,) = json.loads(service_config(0))["methodConfig"]
    assert "retryPolicy" not in mc
    assert _opts(Client("h:1", options=[("grpc.enable_retries", 0), ("grpc.primary_user_agent", "t")])) == {
        **opts | {"grpc.service_config": service_config(3)},
        "grpc.enable_retries": 0,
        "grpc.primary_user_agent": "t",
    }


# -- Process / Client plumbing over a fake stub
class FakeStub(mmsim_pb2_grpc.MemoryManagerStub):
    """Answers every RPC with a canned response (or error) and records (method, request, timeout)."""

    def __init__(self, responses: dict[str, Any]) -> None:
        self.responses = responses
        self.calls: list[tuple[str, Any, float | None]] = []

    def __getattr__(self, method: str) -> Any:
        async def call(request: Any, timeout: float | None = None, metadata: Any = None) -> Any:
            self.calls.append((method, request, timeout))
            r = self.responses[method]
            if isinstance(r, BaseException):
                raise r
            return r

        return call


def fake_client(*stubs: FakeStub, **kw: Any) -> Client:
    client = Client([f"fake:{i}" for i in range(len(stubs))], **kw)
    conns = []
    for i, stub in enumerate(stubs):
        conn = _Conn.__new__(_Conn)
        conn.target, conn.stub, conn.base, conn._shard_md = f"fake:{i}", stub, (), {}
        conns.append(conn)
    client._conns = conns
    return client


async def test_process_methods_convert_results_and_pass_deadlines() -> None:
    stub = FakeStub(
        {
            "CreateProcess": pb.Process(handle="opaque/1"),
            "Fork": pb.Process(handle="opaque/2"),
            "Mmap": pb.Vma(start=4096, end=8192, prot=pb.PROT_RW),
            "Read": pb.ReadResponse(value=42),
            "Write": pb.Empty(),
            "Remap": pb.RemapResponse(moved=4096),
            "GetFolio": pb.FolioResponse(present=False),
            "Walk": pb.WalkResponse(referenced=1, mappings=[pb.Mapping(pid=1, addr=4096)]),
            "ListVmas": pb.ListVmasResponse(vmas=[pb.Vma(start=4096, end=8192, prot=pb.PROT_R, anon_vma=3)]),
            "DumpAnonVmaTree": pb.AnonVmaTreeResponse(anon_vmas=[pb.AnonVma(id=3, root=3, parent=3)]),
            "Exit": pb.ExitResponse(),
        }
    )
    mm = fake_client(stub, timeout=5.0)
    p = await mm.create_process()
    assert isinstance(p, Process) and p.id == "opaque/1" and p.target == "fake:0"
    v = await p.mmap(4096, timeout=1.5)
    assert v == Vma(4096, 8192, "rw", None, False, False, 0, None)
    assert await p.read(4096, timeout=None) == 42
    assert await p.write(4096, 1) is None  # type: ignore[func-returns-value]  # None, as the test checks
    assert await p.remap(0x10000, 4096, 4096, allow_src_holes=True) == 4096
    assert await p.folio(4096) is None
    assert (await p.walk(4096)).mappings == [(1, 4096)]
    assert (await p.vmas())[0].anon_vma == 3
    assert (await p.anon_vma_tree(addr=4096))[0].id == 3
    child = await p.fork()
    assert child.id == "opaque/2" and child._route is p._route
    assert await p.exit() is None  # type: ignore[func-returns-value]  # None, as the test checks
    timeouts = {m: t for m, _, t in stub.calls}
    assert timeouts["CreateProcess"] == 5.0 and timeouts["Mmap"] == 1.5 and timeouts["Read"] is None
    requests = {m: r for m, r, _ in stub.calls}
    assert requests["Remap"] == pb.RemapRequest(
        process="opaque/1", dst=0x10000, src=4096, len=4096, mode=pb.REMAP_MODE_ALLOW_SRC_HOLES
    )
    assert requests["DumpAnonVmaTree"].HasField("addr")
    assert requests["Mmap"].prot == pb.PROT_RW and not requests["Mmap"].HasField("addr")


async def test_failed_call_raises_translated_error_with_cause() -> None:
    err = mm_error(errno.EEXIST, "[EEXIST] overlaps")
    mm = fake_client(FakeStub({"CreateProcess": pb.Process(handle="h"), "Mmap": err}))
    p = await mm.create_process()
    with pytest.raises(FileExistsError) as info:
        await p.mmap(4096, addr=0)
    assert info.value.__cause__ is err
    assert info.value.strerror == "[EEXIST] overlaps"


async def test_cancellation_propagates_untouched() -> None:
    cancelled = asyncio.CancelledError("mine")
    mm = fake_client(FakeStub({"CreateProcess": pb.Process(handle="h"), "Read": cancelled}))
    p = await mm.create_process()
    with pytest.raises(asyncio.CancelledError) as info:
        await p.read(0)
    assert info.value is cancelled


async def test_round_robin_and_children_stay_on_their_server() -> None:
    a = FakeStub({"CreateProcess": pb.Process(handle="a"), "Fork": pb.Process(handle="a2")})
    b = FakeStub({"CreateProcess": pb.Process(handle="b"), "Fork": pb.Process(handle="b2")})
    mm = fake_client(a, b)
    p1, p2, p3 = [await mm.create_process() for _ in range(3)]
    assert [p.target for p in (p1, p2, p3)] == ["fake:0", "fake:1", "fake:0"]
    c2 = await p2.fork()
    assert c2.target == "fake:1" and c2.id == "b2"
    assert [m for m, _, _ in b.calls] == ["CreateProcess", "Fork"]


async def test_batch_results_and_errors_are_returned() -> None:
    results = [
        pb.OpResult(empty=pb.Empty()),
        pb.OpResult(read=pb.ReadResponse(value=7)),
        pb.OpResult(error=pb.OpError(code=code_pb2.ABORTED, message="short", errno=errno.EAGAIN, moved=4096)),
        pb.OpResult(remap=pb.RemapResponse(moved=8192)),
        pb.OpResult(folio=pb.FolioResponse(present=True, value=7, anon_vma=0)),
        pb.OpResult(walk=pb.WalkResponse(referenced=-1, contended=True)),
        pb.OpResult(vma=pb.Vma(start=1, end=2, prot=pb.PROT_R)),
        pb.OpResult(process=pb.Process(handle="new")),
        pb.OpResult(exit=pb.ExitResponse()),
    ]
    stub = FakeStub({"CreateProcess": pb.Process(handle="h"), "Batch": pb.BatchResponse(results=results)})
    mm = fake_client(stub)
    p = await mm.create_process()
    batch = [ops.write(p, 0, 7), ops.read(p, 0), ops.remap(p, 0, 8, 8192), ops.create_process()]
    out = await mm.batch(batch, stop_on_error=True, timeout=2.0)
    assert out[:2] == [None, 7]
    assert isinstance(out[2], BlockingIOError) and out[2].moved == 4096  # type: ignore[attr-defined]  # the SDK's errors carry what was done
    assert out[3] == 8192
    assert out[4] == FolioInfo(False, 7, 0, False, 0, None, False, False)
    assert out[5].contended and out[6].prot == "r"
    assert isinstance(out[7], Process) and out[7].id == "new" and out[7]._route is p._route
    assert out[8] is None
    method, request, timeout = stub.calls[-1]
    assert method == "Batch" and timeout == 2.0 and request.stop_on_error
    assert [o.WhichOneof("op") for o in request.ops] == ["write", "read", "remap", "create_process"]


async def test_batch_over_two_servers_is_refused() -> None:
    mm = fake_client(
        FakeStub({"CreateProcess": pb.Process(handle="a")}), FakeStub({"CreateProcess": pb.Process(handle="b")})
    )
    p, q = await mm.create_process(), await mm.create_process()
    with pytest.raises(ValueError):
        await mm.batch([ops.read(p, 0), ops.read(q, 0)])


async def test_stats_are_summed_over_servers() -> None:
    mm = fake_client(
        FakeStub({"GetStats": pb.StatsResponse(counters={"fork": 1, "walk": 2})}),
        FakeStub({"GetStats": pb.StatsResponse(counters={"fork": 3})}),
    )
    assert await mm.stats() == {"fork": 4, "walk": 2}
    assert await mm.stats(target="fake:1") == {"fork": 3}


# -- the wire path, against a throwaway servicer (not the mmsim server)
class FlakyServicer(mmsim_pb2_grpc.MemoryManagerServicer):
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts = 0

    async def Ping(self, request: pb.Empty, context: grpc.aio.ServicerContext) -> pb.Empty:
        self.attempts += 1
        if self.attempts <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        return pb.Empty()

    async def Remap(self, request: pb.RemapRequest, context: grpc.aio.ServicerContext) -> pb.RemapResponse:
        status = status_pb2.Status(
            code=code_pb2.ABORTED, message="[EAGAIN] short move", details=_pack(errno_info(errno.EAGAIN, 12288))
        )
        await context.abort_with_status(rpc_status.to_status(status))
        raise AssertionError


async def _serve(servicer: FlakyServicer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    mmsim_pb2_grpc.add_MemoryManagerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_wire_rich_status_and_retries() -> None:
    servicer = FlakyServicer(failures=2)
    server, addr = await _serve(servicer)
    try:
        async with Client(addr, retries=3) as mm:
            await mm.ping()
            assert servicer.attempts == 3
            p = mm.process("any")
            with pytest.raises(BlockingIOError) as info:
                await p.remap(0, 4096, 4 * 4096)
            assert info.value.moved == 12288  # type: ignore[attr-defined]
            assert info.value.strerror == "[EAGAIN] short move"
            assert isinstance(info.value.__cause__, grpc.aio.AioRpcError)
        servicer.attempts = 0
        async with Client(addr, retries=0) as mm:
            with pytest.raises(ServerUnavailableError) as unavailable:
                await mm.ping()
            assert servicer.attempts == 1 and unavailable.value.details == "try again"
    finally:
        await server.stop(None)


async def test_deadline_exceeded_against_unreachable_server() -> None:
    # A port nobody listens on: UNAVAILABLE, retried, or DEADLINE_EXCEEDED; both are MmsimErrors.
    async with Client("127.0.0.1:1", retries=1, timeout=0.5) as mm:
        with pytest.raises((ServerUnavailableError, DeadlineExceededError)):
            await mm.ping()


async def test_processes_named_by_handle_batch_with_those_the_client_created() -> None:
    """With a list of targets, a Process made from a handle shares its server's route, so one batch
    may act on it and on a process the client created there."""
    stub = FakeStub({"CreateProcess": pb.Process(handle="h1"), "Batch": pb.BatchResponse(results=[])})
    mm = fake_client(stub, FakeStub({}))
    p = await mm.create_process()
    q = mm.process("h2", target="fake:0")
    assert q._route is p._route and mm.process("h3")._route is p._route
    assert await mm.batch([ops.read(p, 0), ops.read(q, 0)]) == []
    with pytest.raises(ValueError, match="not one of this client's targets"):
        mm.process("h4", target="elsewhere:1")
