"""The MemoryManager gRPC servicer: translation between protobuf and MemoryModel, nothing more.

Each operation a Batch can carry (mmsim.v1.operations) has an executor ``_op_<Op field>(request)
-> response`` that raises on failure; its unary handler, made from the executor (``_unary_rpc``),
turns the exception into a status with rich details, the batch handlers into an ``OpError``
result. The batch handlers answer with the response already serialized (bytes,
wire_encoding.py), which the server's handler wrapper (app.py) passes through as it is.

Processes are named by handles (handles.py), translated to pids on the way in; results name other
processes by pid only. What the model checks is left to the model: the servicer checks only what
the model cannot see (the per-request limits, the protobuf's own fields).
"""

from __future__ import annotations

import errno as errno_mod
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from mmsim.v1 import mmsim_pb2 as pb
from mmsim.v1 import mmsim_pb2_grpc
from mmsim.v1.operations import BATCHABLE, BY_OP_FIELD, Operation, require

from . import errors
from .handles import BadRequest, Handles, ProcessNotFound
from .mm.memcontrol import MemoryLimitExceeded
from .mm.model import PAGE_SIZE, LimitExceeded, MemoryModel, MmError, PagemapEntry, ResultTooLarge, VmaInfo
from .mm.sched import cond_resched
from .mm.userfaultfd import UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES, UFFDIO_MOVE_MODE_DONTWAKE
from .thp import size_policies
from .topology import Topology, new_generation
from .wire_encoding import (
    encode_error,
    encode_result,
    field_size,
    mapping_size,
    remap_result,
    result_header,
    varint,
)

PROT_FROM_PB = {pb.PROT_R: "r", pb.PROT_RW: "rw", pb.PROT_NONE: "none"}
PROT_TO_PB = {v: k for k, v in PROT_FROM_PB.items()}
UFFD_FROM_PB = {pb.UFFD_MODE_MISSING: "missing", pb.UFFD_MODE_WP: "wp", pb.UFFD_MODE_MISSING_WP: "missing+wp"}
UFFD_TO_PB: dict[str | None, pb.UffdMode] = {None: pb.UFFD_MODE_NONE, **{v: k for k, v in UFFD_FROM_PB.items()}}
ADVICE_FROM_PB = {
    pb.ADVICE_DONTFORK: "dontfork",
    pb.ADVICE_DOFORK: "dofork",
    pb.ADVICE_WIPEONFORK: "wipeonfork",
    pb.ADVICE_KEEPONFORK: "keeponfork",
    pb.ADVICE_DONTNEED: "dontneed",
    pb.ADVICE_COLD: "cold",
    pb.ADVICE_PAGEOUT: "pageout",
    pb.ADVICE_HUGEPAGE: "hugepage",
    pb.ADVICE_NOHUGEPAGE: "nohugepage",
}
#: The mode bits of UFFDIO_ZEROPAGE, and of UFFDIO_COPY (which also has UFFDIO_COPY_MODE_WP);
#: any other bit is EINVAL.
FILL_MODES = pb.FILL_MODE_DONTWAKE
COPY_MODES = FILL_MODES | pb.FILL_MODE_WP
assert UFFDIO_MOVE_MODE_DONTWAKE == pb.REMAP_MODE_DONTWAKE
assert UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES == pb.REMAP_MODE_ALLOW_SRC_HOLES


log = structlog.get_logger("mmsim.server")

#: Bytes of a response kept free for the message framing and a final error result.
RESPONSE_SLACK = 1024
#: Entries converted to protobuf between two chances for other calls to run.
CONVERT_CHUNK = 1024
#: Operations of a Batch run between two chances for other calls to run.
BATCH_SLICE = 64
#: The most bytes the result of any operation but a walk takes in a BatchResponse (a Process
#: result, the largest, is a 76-character handle and a pid), a successful one or not: an error's
#: message is bounded by what it echoes (handles.ECHO_MAX).
RESULT_BOUND = 512
#: The operations of a batch whose result has no bound (a walk's mappings): run before their size is known.
_UNBOUNDED = frozenset(field for field, op in BY_OP_FIELD.items() if not op.bounded)
#: The fields of a pagemap entry, as the model's PagemapEntry and the proto's name them.
PAGEMAP_FIELDS = tuple(f.name for f in pb.PagemapEntry.DESCRIPTOR.fields)
#: The most bytes one entry takes in a PagemapResponse (every flag set, the largest mapcount): a
#: Pagemap covers at most (max_message_bytes - RESPONSE_SLACK) // PAGEMAP_ENTRY_BYTES pages.
PAGEMAP_ENTRY_BYTES = field_size(pb.PagemapEntry(
    **dict.fromkeys((name for name in PAGEMAP_FIELDS if name != "mapcount"), True), mapcount=0xFFFFFFFF
).ByteSize())
#: Pages a Pagemap reads from the model between two chances for other calls to run.
PAGEMAP_CHUNK = 1024
#: PagemapResponse.entries: field 1, length-delimited.
_ENTRIES_TAG = bytes([(1 << 3) | 2])


@dataclass(frozen=True)
class Limits:
    """Per-request limits enforced at the edge (the model enforces processes, pages and memory)."""

    #: The most bytes one Remap, UffdCopy or UffdZeropage may cover.
    max_remap_bytes: int = 1 << 30
    max_munmap_bytes: int = 1 << 36
    max_batch_ops: int = 10_000
    max_message_bytes: int = 4 * 1024 * 1024


class ResponseTooLarge(Exception):
    """The response would exceed the message size limit: RESOURCE_EXHAUSTED."""

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(f"{what} does not fit in a response of at most {limit} bytes (max-message-bytes)")
        self.limit = limit


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, list[Any], int, int]:
    """(code, message, detail messages, errno, moved) for a failed operation."""
    if isinstance(exc, MmError):
        err = exc.errno or 0
        name = errno_mod.errorcode.get(err, str(err))
        info = error_details_pb2.ErrorInfo(
            reason=name, domain=errors.DOMAIN, metadata={"errno": str(err), "moved": str(exc.moved)}
        )
        details: list[Any] = [info]
        if isinstance(exc, MemoryLimitExceeded):
            details.append(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(subject="max_memory", description=exc.strerror)
                    ]
                )
            )
        return errors.code_for_errno(err), f"[{name}] {exc.strerror}", details, err, exc.moved
    if isinstance(exc, BadRequest):
        br = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in exc.violations
            ]
        )
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc), [br], 0, 0
    if isinstance(exc, ProcessNotFound):
        info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=errors.DOMAIN, metadata=exc.metadata)
        return grpc.StatusCode.NOT_FOUND, str(exc), [info], 0, 0
    if isinstance(exc, (ResultTooLarge, ResponseTooLarge)):
        exc = LimitExceeded("max_message_bytes", exc.limit)
        return _status_for_limit(exc, "the response would exceed max_message_bytes")
    if isinstance(exc, LimitExceeded):
        return _status_for_limit(exc, str(exc))
    raise exc


def _status_for_limit(exc: LimitExceeded, message: str) -> tuple[grpc.StatusCode, str, list[Any], int, int]:
    info = error_details_pb2.ErrorInfo(
        reason=errors.LIMIT_EXCEEDED, domain=errors.DOMAIN, metadata={"limit": exc.limit, "value": str(exc.value)}
    )
    quota = error_details_pb2.QuotaFailure(
        violations=[error_details_pb2.QuotaFailure.Violation(subject=exc.limit, description=message)]
    )
    return grpc.StatusCode.RESOURCE_EXHAUSTED, message, [info, quota], 0, 0


def rich_status(code: grpc.StatusCode, message: str, details: list[Any]) -> grpc.Status:
    anys = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        anys.append(a)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=anys))


def status_of(exc: BaseException) -> grpc.Status:
    """The status a failed call answers with: its code, message and rich details (``_status_for``)."""
    code, message, details, _, _ = _status_for(exc)
    return rich_status(code, message, details)


_HANDLED = (MmError, BadRequest, ProcessNotFound, LimitExceeded, ResultTooLarge, ResponseTooLarge)


class MemoryManagerServicer(mmsim_pb2_grpc.MemoryManagerServicer):
    def __init__(self, model: MemoryModel, limits: Limits | None = None, topology: Topology | None = None) -> None:
        self.model = model
        self.limits = limits or Limits()
        self.topology = topology or Topology.standalone(0, new_generation(), "")
        #: The handles of this shard's processes.
        self.handles = Handles(self.topology, model.processes)
        #: The pid a handle names (Handles.pid), bound once: every operation looks one up.
        self.pid = self.handles.pid
        #: The executor of each operation a Batch can carry, by its Op field.
        self._ops: dict[str, Callable[[Any], Awaitable[Any]]] = {
            field: getattr(self, f"_op_{field}") for field in BY_OP_FIELD
        }

    # -- running one operation
    async def _unary(self, context: grpc.aio.ServicerContext, op: Callable[[Any], Awaitable[Any]], request: Any) -> Any:
        try:
            return await op(request)
        except _HANDLED as exc:
            await context.abort_with_status(status_of(exc))

    async def _run_op(self, i: int, op: pb.Op) -> tuple[bytes, bool]:
        """One operation of a batch: its serialized OpResult, and whether it is an error. An
        unexpected failure of one operation (a bug) is INTERNAL for that operation alone, logged
        with its traceback."""
        kind = op.WhichOneof("op")
        if kind is None:
            return encode_error(_op_error(BadRequest(f"ops[{i}]", "no operation set"))), True
        try:
            if kind == "remap":  # the batch path's commonest operation, straight to its encoding
                return remap_result(await self._remap(op.remap)), False
            return encode_result(await self._ops[kind](getattr(op, kind))), False
        except _HANDLED as exc:
            return encode_error(_op_error(exc)), True
        except Exception:
            log.exception("batch operation failed", op=kind, index=i)
            error = pb.OpError(code=grpc.StatusCode.INTERNAL.value[0], message=f"operation {kind} failed on the server")
            return encode_error(error), True

    async def _batch(self, request: pb.BatchRequest) -> bytes:
        """Run the operations in order; the serialized BatchResponse. Each result is serialized as
        soon as it is known (a 4 MiB response is not built, nor encoded, in one go). The response
        stops growing at the message size limit: the operation whose result would not fit gets a
        RESOURCE_EXHAUSTED result (what it did stands) and the later ones are not run."""
        if len(request.ops) > self.limits.max_batch_ops:  # an edge limit: the model never sees a batch
            raise LimitExceeded("max_batch_ops", self.limits.max_batch_ops)
        budget = self.limits.max_message_bytes - RESPONSE_SLACK
        size = 0
        parts: list[bytes] = []
        for i, op in enumerate(request.ops):
            # An operation whose result may not fit is not run: a fork or a new process whose handle
            # could not be returned would be out of everyone's reach. (A walk's result has no bound:
            # it runs, and changes nothing, before its size is known: operations.py sees to it
            # that an operation without a bound changes nothing.)
            if size + RESULT_BOUND > budget and op.WhichOneof("op") not in _UNBOUNDED:
                parts += _too_large_result(i, self.limits.max_message_bytes)
                break
            data, failed = await self._run_op(i, op)
            field = result_header(len(data))
            size += len(field) + len(data)
            if size > budget:
                parts += _too_large_result(i, self.limits.max_message_bytes)
                break
            parts += (field, data)
            if request.stop_on_error and failed:
                break
            if i % BATCH_SLICE == BATCH_SLICE - 1 or len(data) > CONVERT_CHUNK * 16:
                await cond_resched()  # let other calls run between slices of a long batch
        return b"".join(parts)

    # -- executors: request message -> response message, raising on failure
    async def _op_create_process(self, request: pb.CreateProcessRequest) -> pb.Process:
        if request.HasField("shard") and request.shard != self.topology.index:
            raise self.handles.wrong_shard(request.shard)
        return self.handles.issue(await self.model.create_process())

    async def _op_fork(self, request: pb.ProcessRequest) -> pb.Process:
        return self.handles.issue(await self.model.fork(self.pid(request.process)))

    async def _op_exit(self, request: pb.ProcessRequest) -> pb.ExitResponse:
        pid = self.pid(request.process)
        try:
            await self.model.exit(pid)
        finally:
            if pid not in self.model.processes:
                self.handles.revoke(pid)
        return pb.ExitResponse()

    async def _op_mmap(self, request: pb.MmapRequest) -> pb.Vma:
        pid = self.pid(request.process)
        prot = _enum(PROT_FROM_PB, request.prot, "prot")
        uffd = None if request.uffd == pb.UFFD_MODE_NONE else _enum(UFFD_FROM_PB, request.uffd, "uffd")
        addr = request.addr if request.HasField("addr") else None
        return vma_to_pb(await self.model.mmap(pid, request.length, prot, addr, uffd))

    async def _op_munmap(self, request: pb.RangeRequest) -> pb.Empty:
        pid = self.pid(request.process)
        if request.length > self.limits.max_munmap_bytes:  # an edge limit, RESOURCE_EXHAUSTED: no errno
            raise LimitExceeded("max_munmap_bytes", self.limits.max_munmap_bytes)
        await self.model.munmap(pid, request.addr, request.length)
        return pb.Empty()

    async def _op_madvise(self, request: pb.MadviseRequest) -> pb.Empty:
        pid = self.pid(request.process)
        await self.model.madvise(pid, request.addr, request.length, _enum(ADVICE_FROM_PB, request.advice, "advice"))
        return pb.Empty()

    async def _op_mprotect(self, request: pb.MprotectRequest) -> pb.Empty:
        pid = self.pid(request.process)
        await self.model.mprotect(pid, request.addr, request.length, _enum(PROT_FROM_PB, request.prot, "prot"))
        return pb.Empty()

    async def _op_mremap(self, request: pb.MremapRequest) -> pb.Vma:
        pid = self.pid(request.process)
        fixed = request.fixed if request.HasField("fixed") else None
        return vma_to_pb(await self.model.mremap(pid, request.addr, request.old_length, request.new_length,
                                                 maymove=request.maymove, dontunmap=request.dontunmap, fixed=fixed))

    def _fill_args(self, request: pb.UffdCopyRequest | pb.UffdZeropageRequest, modes: int) -> tuple[int, bool]:
        pid = self.pid(request.process)
        if request.len > self.limits.max_remap_bytes:  # an edge limit, RESOURCE_EXHAUSTED: no errno
            raise LimitExceeded("max_remap_bytes", self.limits.max_remap_bytes)
        if request.mode & ~modes:  # the model takes the flags, not the bits: it cannot see these
            raise MmError(errno_mod.EINVAL, f"unknown mode bits {request.mode & ~modes:#x}")
        return pid, bool(request.mode & pb.FILL_MODE_DONTWAKE)

    async def _op_uffd_copy(self, request: pb.UffdCopyRequest) -> pb.UffdCopyResponse:
        pid, dontwake = self._fill_args(request, COPY_MODES)
        wp = bool(request.mode & pb.FILL_MODE_WP)
        if not request.values:  # a missing field: INVALID_ARGUMENT naming it, not the model's EINVAL
            raise BadRequest("values", "one value for every page, or one per page, is required")
        # The repeated field as it is: its values are not unpacked into a list (a 4 MB request holds
        # up to 4M of them; the model checks their number first, then reads them page by page).
        values: int | Sequence[int] = request.values[0] if len(request.values) == 1 else request.values
        copied = await self.model.uffd_copy(pid, request.dst, request.len, values, dontwake=dontwake, wp=wp)
        return pb.UffdCopyResponse(copied=copied)

    async def _op_uffd_zeropage(self, request: pb.UffdZeropageRequest) -> pb.UffdZeropageResponse:
        pid, dontwake = self._fill_args(request, FILL_MODES)
        return pb.UffdZeropageResponse(zeroed=await self.model.uffd_zeropage(pid, request.dst, request.len,
                                                                             dontwake=dontwake))

    async def _op_uffd_wake(self, request: pb.RangeRequest) -> pb.Empty:
        await self.model.uffd_wake(self.pid(request.process), request.addr, request.length)
        return pb.Empty()

    async def _op_uffd_register(self, request: pb.UffdRegisterRequest) -> pb.Empty:
        pid = self.pid(request.process)
        mode = _enum(UFFD_FROM_PB, request.mode, "mode")
        await self.model.uffd_register(pid, request.addr, request.length, mode)
        return pb.Empty()

    async def _op_uffd_unregister(self, request: pb.RangeRequest) -> pb.Empty:
        await self.model.uffd_unregister(self.pid(request.process), request.addr, request.length)
        return pb.Empty()

    async def _op_read(self, request: pb.AccessRequest) -> pb.ReadResponse:
        return pb.ReadResponse(value=await self.model.read(self.pid(request.process), request.addr))

    async def _op_write(self, request: pb.WriteRequest) -> pb.Empty:
        await self.model.write(self.pid(request.process), request.addr, request.value)
        return pb.Empty()

    async def _remap(self, request: pb.RemapRequest) -> int:
        pid = self.pid(request.process)
        length = request.len
        if length > self.limits.max_remap_bytes:  # an edge limit, RESOURCE_EXHAUSTED: no errno
            raise LimitExceeded("max_remap_bytes", self.limits.max_remap_bytes)
        return await self.model.move(pid, request.dst, request.src, length, request.mode)

    async def _op_remap(self, request: pb.RemapRequest) -> pb.RemapResponse:
        return pb.RemapResponse(moved=await self._remap(request))

    async def _op_reclaim(self, request: pb.ReclaimRequest) -> pb.ReclaimResponse:
        return pb.ReclaimResponse(reclaimed=await self.model.reclaim(request.pages))

    async def _op_pin(self, request: pb.PinRequest) -> pb.PinResponse:
        pin, pages = await self.model.pin(self.pid(request.process), request.addr, request.length)
        return pb.PinResponse(pin=pin, pages=pages)

    async def _op_unpin(self, request: pb.UnpinRequest) -> pb.Empty:
        await self.model.unpin(self.pid(request.process), request.pin)
        return pb.Empty()

    async def _op_walk(self, request: pb.WalkRequest) -> pb.WalkResponse:
        w = await self.model.walk(self.pid(request.process), request.addr, request.blocking)
        reply = pb.WalkResponse(
            referenced=w.referenced,
            contended=w.contended,
            fast_retries=w.fast_retries,
            slow_retries=w.slow_retries,
        )
        mappings = w.mappings
        for i in range(0, len(mappings), CONVERT_CHUNK):
            for p, a in mappings[i : i + CONVERT_CHUNK]:
                reply.mappings.add(pid=p, addr=a)
            if len(mappings) > CONVERT_CHUNK:
                await cond_resched()  # a folio mapped by thousands of processes
        return reply

    async def _op_get_folio(self, request: pb.AccessRequest) -> pb.FolioResponse:
        f = self.model.folio(self.pid(request.process), request.addr)
        if f is None:
            return pb.FolioResponse(present=False)
        return pb.FolioResponse(
            present=True,
            zero_page=f.zero_page,
            value=f.value,
            mapcount=f.mapcount,
            exclusive=f.exclusive,
            index=f.index,
            anon_vma=f.anon_vma or 0,
            writable=f.writable,
            young=f.young,
            order=f.order,
            pmd=f.pmd,
            pinned=f.pinned,
        )

    # -- RPCs: each operation a Batch can carry has its unary RPC made from its executor (_unary_rpc)
    async def Userfaults(
        self, request: pb.UserfaultsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.UserfaultEvent]:
        try:
            events = self.model.uffd_events(self.pid(request.process), nonblocking=request.nonblocking)
        except _HANDLED as exc:
            await context.abort_with_status(status_of(exc))
        # The generator gives back the events it delivered whose faults still wait when the
        # stream ends (the client went away): the next stream gets them again.
        try:
            async for e in events:
                yield _userfault_pb(e)
        finally:
            await events.aclose()

    async def ListUserfaults(self, request, context):
        async def op(req: pb.ProcessRequest) -> pb.ListUserfaultsResponse:
            pid = self.pid(req.process)
            return pb.ListUserfaultsResponse(
                queued=[_userfault_pb(e) for e in self.model.uffd_pending(pid)],
                waiting=[_userfault_pb(e) for e in self.model.uffd_waiting(pid)],
            )

        return await self._unary(context, op, request)

    async def ListVmas(self, request, context):
        async def op(req: pb.ProcessRequest) -> pb.ListVmasResponse:
            limit = self.limits.max_message_bytes
            budget, size = limit - RESPONSE_SLACK, 0
            reply = pb.ListVmasResponse()
            async for v in self.model.vmas_iter(self.pid(req.process)):
                vma = vma_to_pb(v)
                size += field_size(vma.ByteSize())
                if size > budget:  # before the reply grows past what can be sent
                    raise ResponseTooLarge("the VMA list", limit)
                reply.vmas.append(vma)
            return reply

        return await self._unary(context, op, request)

    async def DumpAnonVmaTree(self, request, context):
        async def op(req: pb.AnonVmaTreeRequest) -> pb.AnonVmaTreeResponse:
            addr = req.addr if req.HasField("addr") else None
            limit = self.limits.max_message_bytes
            budget = limit - RESPONSE_SLACK
            reply = pb.AnonVmaTreeResponse()
            size = 0
            converted = 0
            # Every entry of ``vmas`` takes at least 6 bytes on the wire: give up before
            # collecting more than can fit, and stop building as soon as the bytes pass the limit.
            records = self.model.anon_vma_tree_iter(self.pid(req.process), addr, max_mappings=budget // 6)
            async for a in records:
                av = reply.anon_vmas.add(
                    id=a["id"],
                    root=a["root"],
                    parent=a["parent"],
                    refcount=a["refcount"],
                    num_children=a["num_children"],
                    num_active_vmas=a["num_active_vmas"],
                )
                n = av.ByteSize()
                vmas = a["vmas"]
                for i in range(0, len(vmas), CONVERT_CHUNK):
                    chunk = vmas[i : i + CONVERT_CHUNK]
                    for p, s in chunk:
                        av.vmas.add(pid=p, addr=s)
                        n += field_size(mapping_size(p, s))
                    if size + n > budget:
                        raise ResponseTooLarge("the anon_vma tree", limit)
                    converted += len(chunk)
                    if converted >= CONVERT_CHUNK:
                        converted = 0
                        await cond_resched()
                size += field_size(n)
                if size > budget:
                    raise ResponseTooLarge("the anon_vma tree", limit)
            return reply

        return await self._unary(context, op, request)

    async def Pagemap(self, request, context):
        async def op(req: pb.RangeRequest) -> bytes:
            """The serialized PagemapResponse, read from the model a chunk of pages at a time (as
            pagemap_read does, the page tables may change between chunks)."""
            pid = self.pid(req.process)
            limit = self.limits.max_message_bytes
            pages = -(-req.length // PAGE_SIZE)
            # The model checks the address (EINVAL) as it reads the first chunk, before the count is.
            entries = self.model.pagemap(pid, req.addr, min(pages, PAGEMAP_CHUNK) * PAGE_SIZE)
            if pages > (limit - RESPONSE_SLACK) // PAGEMAP_ENTRY_BYTES:
                raise ResponseTooLarge(f"the pagemap of {pages} pages", limit)
            fields: dict[PagemapEntry, bytes] = {}  # each distinct entry serialized once
            parts: list[bytes] = []
            done = 0
            while True:
                for e in entries:
                    field = fields.get(e)
                    if field is None:
                        field = fields[e] = _pagemap_field(e)
                    parts.append(field)
                done += len(entries)
                if done >= pages:
                    return b"".join(parts)
                await cond_resched()
                n = min(pages - done, PAGEMAP_CHUNK)
                entries = self.model.pagemap(pid, req.addr + done * PAGE_SIZE, n * PAGE_SIZE)

        return await self._unary(context, op, request)

    async def CheckInvariants(self, request, context):
        return pb.CheckInvariantsResponse(problems=await self.model.audit())

    async def GetStats(self, request, context):
        return pb.StatsResponse(
            counters=self.model.stats(), protocol=self.model.protocol, thp=thp_settings_pb(self.model)
        )

    async def Batch(self, request, context):
        return await self._unary(context, self._batch, request)

    async def BatchStream(
        self, request_iterator: AsyncIterator[pb.BatchRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for request in request_iterator:
            try:
                yield await self._batch(request)
            except _HANDLED as exc:
                await context.abort_with_status(status_of(exc))

    async def Ping(self, request, context):
        return pb.Empty()

    async def GetTopology(self, request, context):
        return self.topology.to_pb()


def _unary_rpc(op: Operation) -> Callable[..., Awaitable[Any]]:
    """The handler of ``op``'s unary RPC: its executor, a failure answered as a rich status."""
    field = op.op_field

    async def rpc(self: MemoryManagerServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unary(context, self._ops[field], request)  # type: ignore[index]

    rpc.__name__ = op.rpc
    rpc.__qualname__ = f"{MemoryManagerServicer.__qualname__}.{op.rpc}"
    return rpc


# Every operation a Batch carries has an executor, and (unless the class has its own) a unary RPC.
require([name.removeprefix("_op_") for name in vars(MemoryManagerServicer) if name.startswith("_op_")],
        BY_OP_FIELD, "MemoryManagerServicer's _op_ executors")
for _op in BATCHABLE:
    if _op.rpc not in vars(MemoryManagerServicer):
        setattr(MemoryManagerServicer, _op.rpc, _unary_rpc(_op))


def _enum(table: Mapping[Any, str], value: int, field: str) -> str:
    try:
        return table[value]
    except KeyError:
        raise BadRequest(field, f"unspecified or unknown value {value}; one of {sorted(table)} is required") from None


def _pagemap_field(e: PagemapEntry) -> bytes:
    """One entry of PagemapResponse.entries as it is on the wire: tag, length, message."""
    body = pb.PagemapEntry(**{name: getattr(e, name) for name in PAGEMAP_FIELDS}).SerializeToString()
    return _ENTRIES_TAG + varint(len(body)) + body


def _userfault_pb(e: Any) -> pb.UserfaultEvent:
    return pb.UserfaultEvent(addr=e.addr, write=e.write, wp=e.wp)


def thp_settings_pb(model: MemoryModel) -> pb.ThpSettings:
    """The model's transparent hugepage settings, as sysfs shows them: every size it has."""
    k = model.k
    return pb.ThpSettings(enabled=k.thp_enabled, use_zero_page=k.thp_use_zero_page,
                          sizes=size_policies(k.thp_orders))


def vma_to_pb(v: VmaInfo) -> pb.Vma:
    return pb.Vma(
        start=v.start,
        end=v.end,
        prot=PROT_TO_PB[v.prot],
        uffd=UFFD_TO_PB[v.uffd],
        dontfork=v.dontfork,
        wipeonfork=v.wipeonfork,
        pgoff=v.pgoff,
        anon_vma=v.anon_vma or 0,
    )


def _too_large_result(i: int, limit: int) -> tuple[bytes, bytes]:
    """The field and the OpResult that stand for ops[i], whose result would pass ``limit``."""
    data = encode_error(_op_error(ResponseTooLarge(f"the result of ops[{i}]", limit)))
    return result_header(len(data)), data


def _op_error(exc: BaseException) -> pb.OpError:
    code, message, _, err, moved = _status_for(exc)
    return pb.OpError(code=code.value[0], message=message, errno=err, moved=moved)


__all__ = ["BadRequest", "Limits", "MemoryManagerServicer", "ProcessNotFound", "ResponseTooLarge"]
