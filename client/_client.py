"""The client: channels, deadlines and retries (transport), and Process handles (domain)."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Sequence
from types import EllipsisType, TracebackType
from typing import Any, TypeAlias

import grpc

from mmsim.v1 import mmsim_pb2 as pb
from mmsim.v1 import mmsim_pb2_grpc

from . import ops as _ops
from ._types import AnonVma, FolioInfo, Vma, WalkResult, anon_vma_from_pb, folio_from_pb, vma_from_pb, walk_from_pb
from .errors import from_op_error, from_rpc_error

SERVICE = pb.DESCRIPTOR.services_by_name["MemoryManager"].full_name

#: A per-call deadline in seconds; ``None`` for none; ``...`` (the default) for the client's.
Timeout: TypeAlias = float | None | EllipsisType
#: One operation's outcome in a batch: a result (as the unary method returns it) or the exception.
Result: TypeAlias = Any

_METHODS = {
    "create_process": "CreateProcess",
    "fork": "Fork",
    "exit": "Exit",
    "mmap": "Mmap",
    "munmap": "Munmap",
    "madvise": "Madvise",
    "uffd_register": "UffdRegister",
    "uffd_unregister": "UffdUnregister",
    "read": "Read",
    "write": "Write",
    "remap": "Remap",
    "walk": "Walk",
    "get_folio": "GetFolio",
}


def service_config(retries: int) -> str:
    """The channel's service config: retry UNAVAILABLE ``retries`` times (gRPC caps attempts at 5)."""
    if retries <= 0:
        return json.dumps({"methodConfig": [{"name": [{"service": SERVICE}]}]})
    policy = {
        "maxAttempts": retries + 1,
        "initialBackoff": "0.05s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    return json.dumps({"methodConfig": [{"name": [{"service": SERVICE}], "retryPolicy": policy}]})


class _Conn:
    """One channel to one server address."""

    def __init__(self, target: str, options: Sequence[tuple[str, Any]]) -> None:
        self.target = target
        self.channel = grpc.aio.insecure_channel(target, options=list(options))
        self.stub = mmsim_pb2_grpc.MemoryManagerStub(self.channel)

    async def unary(self, method: str, request: Any, timeout: float | None) -> Any:
        try:
            return await getattr(self.stub, method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc


def _result(conn: _Conn, client: Client, response: Any) -> Result:
    """A unary response (or batch result payload) as the SDK returns it."""
    if isinstance(response, pb.Process):
        return Process(client, conn, response.handle, response.pid)
    if isinstance(response, pb.Vma):
        return vma_from_pb(response)
    if isinstance(response, pb.ReadResponse):
        return response.value
    if isinstance(response, pb.RemapResponse):
        return response.moved
    if isinstance(response, pb.WalkResponse):
        return walk_from_pb(response)
    if isinstance(response, pb.FolioResponse):
        return folio_from_pb(response)
    return None  # Empty, ExitResponse


def _op_result(conn: _Conn, client: Client, r: pb.OpResult) -> Result:
    kind = r.WhichOneof("result")
    if kind == "error":
        return from_op_error(r.error)
    return _result(conn, client, getattr(r, kind) if kind else None)


class Client:
    """A client of one or more mmsim servers.

    Example::

        async with Client("127.0.0.1:7077") as mm:
            p = await mm.create_process()
            v = await p.mmap(8 * 4096)
            await p.write(v.start, 42)
            assert await p.read(v.start) == 42

    ``target`` is an address or a list of them (one channel each; ``create_process`` goes
    round-robin over them and each :class:`Process` stays on its server). ``timeout`` is the default
    deadline of every call in seconds (``None``: none); each method takes ``timeout=`` to override
    it. ``retries`` is how many times a call failing with UNAVAILABLE is retried, by gRPC's own
    retry policy (at most 4). ``options`` are extra channel arguments, applied last.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None = 10.0,
        retries: int = 3,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.targets: list[str] = [target] if isinstance(target, str) else list(target)
        if not self.targets:
            raise ValueError("at least one target address is needed")
        self.timeout = timeout
        self.retries = retries
        merged: dict[str, Any] = {"grpc.enable_retries": 1, "grpc.service_config": service_config(retries)}
        merged.update(options)
        self.options: list[tuple[str, Any]] = list(merged.items())
        self._conns: list[_Conn] | None = None
        self._rr = itertools.count()

    # -- lifecycle
    @property
    def conns(self) -> list[_Conn]:
        # Channels are made on first use, inside the running event loop.
        if self._conns is None:
            self._conns = [_Conn(t, self.options) for t in self.targets]
        return self._conns

    async def __aenter__(self) -> Client:
        _ = self.conns  # open the channels now, inside the running loop
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every channel; calls still running are cancelled."""
        conns, self._conns = self._conns, None
        for c in conns or ():
            await c.channel.close()

    def _deadline(self, timeout: Timeout) -> float | None:
        return self.timeout if timeout is ... else timeout

    def _next_conn(self) -> _Conn:
        conns = self.conns
        return conns[next(self._rr) % len(conns)]

    def _conn_for(self, processes: Sequence[Process | None]) -> _Conn:
        conns = {id(p._conn): p._conn for p in processes if p is not None}
        if len(conns) > 1:
            raise ValueError("the operations of one batch must act on processes of the same server")
        return next(iter(conns.values())) if conns else self._next_conn()

    # -- calls
    async def create_process(self, *, timeout: Timeout = ...) -> Process:
        """A new, empty process on the next server (round-robin)."""
        conn = self._next_conn()
        reply = await conn.unary("CreateProcess", pb.CreateProcessRequest(), self._deadline(timeout))
        return Process(self, conn, reply.handle, reply.pid)

    async def ping(self, *, target: str | None = None, timeout: Timeout = ...) -> None:
        """A call that does nothing, on every server (or on ``target``)."""
        for c in self._select(target):
            await c.unary("Ping", pb.Empty(), self._deadline(timeout))

    async def check_invariants(self, *, target: str | None = None, timeout: Timeout = ...) -> list[str]:
        """Audit the model: the problems found (empty when sound), of every server or of ``target``."""
        problems: list[str] = []
        for c in self._select(target):
            reply = await c.unary("CheckInvariants", pb.CheckInvariantsRequest(), self._deadline(timeout))
            problems.extend(reply.problems)
        return problems

    async def stats(self, *, target: str | None = None, timeout: Timeout = ...) -> dict[str, int]:
        """The model's counters, summed over every server (or those of ``target``)."""
        total: dict[str, int] = {}
        for c in self._select(target):
            reply = await c.unary("GetStats", pb.StatsRequest(), self._deadline(timeout))
            for k, v in reply.counters.items():
                total[k] = total.get(k, 0) + v
        return total

    async def protocol(self, *, target: str | None = None, timeout: Timeout = ...) -> str:
        """The rmap/move protocol the server runs (of ``target``; of every server, joined with "+"
        where they differ)."""
        seen: list[str] = []
        for c in self._select(target):
            reply = await c.unary("GetStats", pb.StatsRequest(), self._deadline(timeout))
            if reply.protocol not in seen:
                seen.append(reply.protocol)
        return "+".join(seen)

    def process(self, handle: str, pid: int = 0, *, target: str | None = None) -> Process:
        """A :class:`Process` for a handle obtained elsewhere (another client, another OS process),
        on the server ``target`` (default: this client's first target)."""
        conn = self._select(target)[0] if target is not None else self.conns[0]
        return Process(self, conn, handle, pid)

    def _select(self, target: str | None) -> list[_Conn]:
        if target is None:
            return self.conns
        found = [c for c in self.conns if c.target == target]
        if not found:
            raise ValueError(f"{target!r} is not one of this client's targets {self.targets}")
        return found

    async def batch(
        self, ops: Sequence[_ops.Op], *, stop_on_error: bool = False, timeout: Timeout = ...
    ) -> list[Result]:
        """Run ``ops`` (built with :mod:`mmsim.client.ops`) in order in one call.

        Returns one entry per operation run: its result, as the unary method returns it, or the
        exception instance it failed with (not raised). With ``stop_on_error`` the list ends at the
        first failure. A failure of the whole call (e.g. too many operations) raises.
        """
        conn = self._conn_for([op.process for op in ops])
        request = pb.BatchRequest(ops=[op.message for op in ops], stop_on_error=stop_on_error)
        reply = await conn.unary("Batch", request, self._deadline(timeout))
        return [_op_result(conn, self, r) for r in reply.results]

    def batch_stream(self, *, via: Process | None = None, timeout: float | None = None) -> BatchStream:
        """A BatchStream call: send lists of operations and receive their results, on one stream.

        Example::

            async with mm.batch_stream() as stream:
                for i in range(100):
                    results = await stream.run([ops.write(p, addr, i), ops.read(p, addr)])

        The stream is opened to the server of ``via`` (default: the next one, round-robin); its
        deadline ``timeout`` covers the whole stream and is none by default. Sending and receiving may
        also be split over two tasks: ``send()`` ..., ``done_writing()``, and ``async for results in
        stream`` gets each list of results in order.
        """
        conn = via._conn if via is not None else self._next_conn()
        return BatchStream(self, conn, timeout)


class BatchStream:
    """An open BatchStream call (see :meth:`Client.batch_stream`); use it with ``async with``."""

    def __init__(self, client: Client, conn: _Conn, timeout: float | None) -> None:
        self._client = client
        self._conn = conn
        self._timeout = timeout
        self._call: Any = None
        self._writing = True

    async def __aenter__(self) -> BatchStream:
        self._call = self._conn.stub.BatchStream(timeout=self._timeout)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        call = self._call
        if call is None or call.done():
            return
        if exc is not None:
            call.cancel()
            return
        try:
            await self.done_writing()
            while await call.read() is not grpc.aio.EOF:
                pass  # results never received
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from e

    async def send(self, ops: Sequence[_ops.Op], *, stop_on_error: bool = False) -> None:
        """Send one list of operations; its results come back, in order, from :meth:`recv`."""
        if any(op.process is not None and op.process._conn is not self._conn for op in ops):
            raise ValueError("the operations of a stream must act on processes of the stream's server")
        try:
            await self._call.write(pb.BatchRequest(ops=[op.message for op in ops], stop_on_error=stop_on_error))
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from e

    async def recv(self) -> list[Result]:
        """The results of the oldest list sent and not yet received (see :meth:`Client.batch`)."""
        try:
            reply = await self._call.read()
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from e
        if reply is grpc.aio.EOF:
            raise EOFError("the stream has ended")
        return [_op_result(self._conn, self._client, r) for r in reply.results]

    async def run(self, ops: Sequence[_ops.Op], *, stop_on_error: bool = False) -> list[Result]:
        """Send ``ops`` and wait for their results."""
        await self.send(ops, stop_on_error=stop_on_error)
        return await self.recv()

    async def done_writing(self) -> None:
        """No more lists will be sent; the server ends the stream after the last results."""
        if self._writing:
            self._writing = False
            await self._call.done_writing()

    async def __aiter__(self) -> AsyncIterator[list[Result]]:
        """Each list of results in order, until the stream ends (after :meth:`done_writing`)."""
        while True:
            try:
                yield await self.recv()
            except EOFError:
                return


class Process:
    """A simulated process on the server (``target``) that issued it.

    ``id`` is its handle: an opaque, unguessable capability that lets whoever holds it act on the
    process, so keep it as you would a password. ``pid`` is the process's number on its server: it
    is how results (``WalkResult.mappings``, ``AnonVma.vmas``) name processes, and gives no access.
    """

    __slots__ = ("_client", "_conn", "id", "pid")

    def __init__(self, client: Client, conn: _Conn, id: str, pid: int = 0) -> None:
        self._client = client
        self._conn = conn
        self.id = id
        self.pid = pid

    @property
    def target(self) -> str:
        """The address of the server this process lives on."""
        return self._conn.target

    def __repr__(self) -> str:
        return f"Process(pid={self.pid}, target={self.target!r})"  # the handle is a secret

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Process) and (self.id, self._conn) == (other.id, other._conn)

    def __hash__(self) -> int:
        return hash((self.id, id(self._conn)))

    async def _call(self, method: str, request: Any, timeout: Timeout) -> Any:
        return await self._conn.unary(method, request, self._client._deadline(timeout))

    async def _run(self, op: _ops.Op, timeout: Timeout) -> Result:
        response = await self._call(_METHODS[op.kind], op.request, timeout)
        return _result(self._conn, self._client, response)

    # -- processes
    async def fork(self, *, timeout: Timeout = ...) -> Process:
        """fork(): the child, on the same server."""
        return await self._run(_ops.fork(self), timeout)  # type: ignore[no-any-return]

    async def exit(self, *, timeout: Timeout = ...) -> None:
        """exit(): tear the process down; its handle becomes unknown."""
        await self._run(_ops.exit(self), timeout)

    # -- mappings
    async def mmap(
        self,
        length: int,
        prot: str = "rw",
        uffd: str | None = None,
        addr: int | None = None,
        *,
        timeout: Timeout = ...,
    ) -> Vma:
        """Map private anonymous memory (at ``addr``, fixed-noreplace, if given), optionally
        registered with userfaultfd (``uffd``: None, "missing", "wp" or "missing+wp")."""
        return await self._run(_ops.mmap(self, length, prot, uffd, addr), timeout)  # type: ignore[no-any-return]

    async def munmap(self, addr: int, length: int, *, timeout: Timeout = ...) -> None:
        await self._run(_ops.munmap(self, addr, length), timeout)

    async def madvise(self, addr: int, length: int, advice: str, *, timeout: Timeout = ...) -> None:
        """``advice``: "dontfork", "dofork", "wipeonfork" or "keeponfork"."""
        await self._run(_ops.madvise(self, addr, length, advice), timeout)

    async def uffd_register(self, addr: int, length: int, mode: str = "missing", *, timeout: Timeout = ...) -> None:
        await self._run(_ops.uffd_register(self, addr, length, mode), timeout)

    async def uffd_unregister(self, addr: int, length: int, *, timeout: Timeout = ...) -> None:
        await self._run(_ops.uffd_unregister(self, addr, length), timeout)

    # -- accesses
    async def read(self, addr: int, *, timeout: Timeout = ...) -> int:
        return await self._run(_ops.read(self, addr), timeout)  # type: ignore[no-any-return]

    async def write(self, addr: int, value: int, *, timeout: Timeout = ...) -> None:
        await self._run(_ops.write(self, addr, value), timeout)

    async def remap(
        self,
        dst: int,
        src: int,
        length: int,
        allow_src_holes: bool = False,
        dontwake: bool = False,
        *,
        mode_bits: int = 0,
        timeout: Timeout = ...,
    ) -> int:
        """UFFDIO_MOVE: the bytes moved. A short move raises OSError (EAGAIN: BlockingIOError)
        with ``.moved``. ``mode_bits`` adds raw mode bits to the two flags."""
        op = _ops.remap(
            self, dst, src, length, allow_src_holes=allow_src_holes, dontwake=dontwake, mode_bits=mode_bits
        )
        return await self._run(op, timeout)  # type: ignore[no-any-return]

    async def walk(self, addr: int, blocking: bool = False, *, timeout: Timeout = ...) -> WalkResult:
        """The rmap walk (folio_referenced) of the folio at ``addr``."""
        return await self._run(_ops.walk(self, addr, blocking), timeout)  # type: ignore[no-any-return]

    # -- inspection
    async def folio(self, addr: int, *, timeout: Timeout = ...) -> FolioInfo | None:
        """The page mapped at ``addr`` (no fault is taken), or None."""
        return await self._run(_ops.folio(self, addr), timeout)  # type: ignore[no-any-return]

    async def vmas(self, *, timeout: Timeout = ...) -> list[Vma]:
        reply = await self._call("ListVmas", pb.ProcessRequest(process=self.id), timeout)
        return [vma_from_pb(v) for v in reply.vmas]

    async def anon_vma_tree(self, addr: int | None = None, *, timeout: Timeout = ...) -> list[AnonVma]:
        """The anon_vmas reachable from this process, or of the folio at ``addr``."""
        request = pb.AnonVmaTreeRequest(process=self.id)
        if addr is not None:
            request.addr = addr
        reply = await self._call("DumpAnonVmaTree", request, timeout)
        return [anon_vma_from_pb(a) for a in reply.anon_vmas]


__all__ = ["BatchStream", "Client", "Process", "Result", "Timeout"]
