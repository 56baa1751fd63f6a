"""The client: channels, deadlines, retries and routing to shards (transport), and Process handles
(domain)."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from types import EllipsisType, TracebackType
from typing import Any, TypeAlias

import grpc

from mmsim.v1 import mmsim_pb2 as pb
from mmsim.v1 import mmsim_pb2_grpc
from mmsim.v1.operations import BY_OP_FIELD, ERROR_FIELD, RESULT_FIELDS, require
from mmsim.v1.wire import advertised_address

from . import ops as _ops
from ._types import (
    AnonVma,
    FolioInfo,
    PagemapEntry,
    ThpSettings,
    UserfaultEvent,
    Userfaults,
    Vma,
    WalkResult,
    anon_vma_from_pb,
    folio_from_pb,
    pagemap_from_pb,
    thp_from_pb,
    userfault_from_pb,
    vma_from_pb,
    walk_from_pb,
)
from .errors import MmsimError, from_op_error, from_rpc_error

SERVICE = pb.DESCRIPTOR.services_by_name["MemoryManager"].full_name

#: A per-call deadline in seconds; ``None`` for none; ``...`` (the default) for the client's.
Timeout: TypeAlias = float | EllipsisType | None
#: One operation's outcome in a batch: a result (as the unary method returns it) or the exception.
Result: TypeAlias = Any

#: The name under which an operation's error also gives the bytes it did (besides ``.moved``), by
#: its Op field: the response's field that counts them (``copied``, ``zeroed``).
_DONE_ALIAS = {field: op.done for field, op in BY_OP_FIELD.items() if op.done is not None and op.done != "moved"}


def _alias_done(kind: str, result: Any) -> Any:
    """A failed UFFDIO_COPY / ZEROPAGE's error also says its bytes done as ``.copied`` / ``.zeroed``."""
    alias = _DONE_ALIAS.get(kind)
    if alias is not None and isinstance(result, OSError):
        setattr(result, alias, getattr(result, "moved", 0))
    return result


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


#: The metadata header on which a proxy routes a call to its shard.
SHARD_HEADER = "x-mmsim-shard"


def shard_of(handle: str) -> int | None:
    """The shard index a process handle carries (``<shard>.<generation>.<pid>.<token>``), or None."""
    head = handle.split(".", 1)[0]
    return int(head) if head.isdigit() and len(head) <= 3 else None


class _Conn:
    """One channel to one address, and the metadata every call on it carries (the token)."""

    def __init__(
        self,
        target: str,
        options: Sequence[tuple[str, Any]],
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        if credentials is not None:
            self.channel = grpc.aio.secure_channel(target, credentials, options=list(options))
        else:
            self.channel = grpc.aio.insecure_channel(target, options=list(options))
        self.stub = mmsim_pb2_grpc.MemoryManagerStub(self.channel)
        self.base: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._shard_md: dict[int, tuple[tuple[str, str], ...]] = {}

    def metadata(self, shard: int | None) -> tuple[tuple[str, str], ...] | None:
        """The call metadata: the token, and the shard header where a proxy routes (``shard``)."""
        if shard is None:
            return self.base or None
        md = self._shard_md.get(shard)
        if md is None:
            md = self._shard_md[shard] = (*self.base, (SHARD_HEADER, str(shard)))
        return md

    async def unary(self, method: str, request: Any, timeout: float | None, shard: int | None = None) -> Any:
        try:
            return await getattr(self.stub, method)(request, timeout=timeout, metadata=self.metadata(shard))
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc


class _Route:
    """Where the calls of one shard go: a channel, and the shard header to send on it (None when the
    channel reaches that shard directly)."""

    __slots__ = ("conn", "header", "shard")

    def __init__(self, conn: _Conn, shard: int | None, header: bool) -> None:
        self.conn = conn
        self.shard = shard
        self.header = shard if header else None

    async def unary(self, method: str, request: Any, timeout: float | None) -> Any:
        return await self.conn.unary(method, request, timeout, self.header)

    def server_stream(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """A server-streaming call (not yet read from): iterate it for the responses."""
        return getattr(self.conn.stub, method)(request, timeout=timeout, metadata=self.conn.metadata(self.header))


#: How the SDK returns each result, by its OpResult field (operations.Operation.result_field):
#: ``decode(route, client, message)``; Empty and ExitResponse are None.
_DECODE: dict[str, Callable[[_Route, Client, Any], Result]] = {
    "process": lambda route, client, m: Process(client, route, m.handle, m.pid),
    "vma": lambda route, client, m: vma_from_pb(m),
    "read": lambda route, client, m: m.value,
    "remap": lambda route, client, m: m.moved,
    "walk": lambda route, client, m: walk_from_pb(m),
    "folio": lambda route, client, m: folio_from_pb(m),
    "uffd_copy": lambda route, client, m: m.copied,
    "uffd_zeropage": lambda route, client, m: m.zeroed,
    "reclaim": lambda route, client, m: m.reclaimed,
    "pin": lambda route, client, m: m.pin,
    "empty": lambda route, client, m: None,
    "exit": lambda route, client, m: None,
}
require(_DECODE, RESULT_FIELDS, "the SDK's result decoders")


def _op_result(route: _Route, client: Client, r: pb.OpResult) -> Result:
    """A batch's result as the SDK returns it: the unary method's result, or the error's exception."""
    kind = r.WhichOneof("result")
    if kind == ERROR_FIELD:
        return from_op_error(r.error)
    if kind is None:
        return None
    return _DECODE[kind](route, client, getattr(r, kind))


class Client:
    """A client of an mmsim deployment: one server, N shards, or N shards behind one proxy.

    Example::

        async with Client("127.0.0.1:7077") as mm:
            p = await mm.create_process()
            v = await p.mmap(8 * 4096)
            await p.write(v.start, 42)
            assert await p.read(v.start) == 42

    With one address, the client first asks it for the deployment's topology (GetTopology) and
    routes every call that acts on a process to that process's shard (handles carry it):

    - **direct**: the address is a shard itself; the client opens a channel to every shard's
      advertised address (an unspecified host, 0.0.0.0 or ::, is taken as the host of ``target``);
    - **proxy**: the address is a proxy that routes on the ``x-mmsim-shard`` metadata header (a
      probe with that header set reaches the shard it names); every call goes to the proxy, with the
      header wherever the call acts on a process or asks for a shard.

    ``routing`` forces one ("direct" or "proxy"; default "auto": told apart by that probe).
    ``create_process`` spreads new trees over the shards round-robin, or takes ``shard=``.
    ``check_invariants``, ``stats``, ``protocol``, ``thp`` and ``ping`` ask every shard and merge.

    ``target`` may also be a list of addresses (one channel each, no discovery): ``create_process``
    goes round-robin over them and each :class:`Process` stays on its server.

    ``timeout`` is the default deadline of every call in seconds (``None``: none); each method
    takes ``timeout=`` to override it. ``retries`` is how many times a call failing with UNAVAILABLE
    is retried, by gRPC's own retry policy (at most 4). ``options`` are extra channel arguments,
    applied last. ``credentials`` (see :func:`mmsim.client.tls_credentials`) makes the channels
    TLS; ``token`` is sent as ``authorization: Bearer TOKEN`` on every call.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None = 10.0,
        retries: int = 3,
        options: Sequence[tuple[str, Any]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        routing: str = "auto",
    ) -> None:
        self.targets: list[str] = [target] if isinstance(target, str) else list(target)
        if not self.targets:
            raise ValueError("at least one target address is needed")
        if routing not in ("auto", "direct", "proxy"):
            raise ValueError(f"routing must be auto, direct or proxy, not {routing!r}")
        self.timeout = timeout
        self.retries = retries
        merged: dict[str, Any] = {"grpc.enable_retries": 1, "grpc.service_config": service_config(retries)}
        merged.update(options)
        self.options: list[tuple[str, Any]] = list(merged.items())
        self.credentials = credentials
        self.token = token
        #: "auto" until discovery, then "direct", "proxy" or "static" (a list of targets; a lone
        #: server without GetTopology).
        self.routing = routing if isinstance(target, str) else "static"
        #: The deployment's shards as the last discovery found them (pb.ShardInfo), in index order.
        self.topology: list[pb.ShardInfo] = []
        self._conns: list[_Conn] | None = None
        self._routes: list[_Route] | None = None  # one per shard (per target when static)
        self._discovery: asyncio.Future[None] | None = None
        self._rr = itertools.count()

    # -- lifecycle
    def _conn(self, target: str) -> _Conn:
        for c in self._conns or ():
            if c.target == target:
                return c
        c = _Conn(target, self.options, self.credentials, self.token)
        self._conns = [*(self._conns or ()), c]
        return c

    @property
    def conns(self) -> list[_Conn]:
        # Channels are made on first use, inside the running event loop.
        if self._conns is None:
            for t in self.targets:
                self._conn(t)
        assert self._conns is not None
        return self._conns

    async def __aenter__(self) -> Client:
        _ = self.conns  # open the channels now, inside the running loop; discovery on first call
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every channel; calls still running are cancelled."""
        conns, self._conns, self._routes, self._discovery = self._conns, None, None, None
        for c in conns or ():
            await c.channel.close()

    def _deadline(self, timeout: Timeout) -> float | None:
        return self.timeout if timeout is ... else timeout

    # -- routing
    async def routes(self) -> list[_Route]:
        """One route per shard (per target with a list of targets), discovering them on first use."""
        if self._routes is not None:
            return self._routes
        if self.routing == "static":
            return self._static_routes()
        if self._discovery is None:
            self._discovery = asyncio.ensure_future(self._discover())
        try:
            await asyncio.shield(self._discovery)
        except BaseException:
            if self._discovery is not None and self._discovery.done():
                self._discovery = None  # a failed discovery is tried again by the next call
            raise
        assert self._routes is not None
        return self._routes

    def _static_routes(self) -> list[_Route]:
        """With a list of targets: one route per target, made once (batches and streams tell
        processes' servers apart by their route)."""
        if self._routes is None:
            self._routes = [_Route(c, None, False) for c in self.conns]
        return self._routes

    async def _topology(self, conn: _Conn, shard: int | None) -> pb.Topology:
        return await conn.unary("GetTopology", pb.TopologyRequest(), self._deadline(...), shard)

    async def _discover(self) -> None:
        """Ask the one target for the topology, and tell a shard from a proxy in front of shards."""
        conn = self.conns[0]
        try:
            first = await self._topology(conn, None)
        except MmsimError as e:
            if e.code != grpc.StatusCode.UNIMPLEMENTED:
                raise
            self.routing, self._routes = "static", [_Route(conn, None, False)]  # a server without shards
            return
        shards = list(first.shards)
        self.topology = shards
        if len(shards) <= 1:
            if self.routing == "auto":
                self.routing = "direct"
            self._routes = [_Route(conn, first.shard if self.routing == "proxy" else None, self.routing == "proxy")]
            return
        routing = self.routing
        if routing == "auto":
            # Through a proxy, the header picks the shard that answers; a shard answers for itself.
            other = (first.shard + 1) % len(shards)
            probe = await self._topology(conn, other)
            routing = "proxy" if probe.shard == other else "direct"
        if routing == "proxy":
            self._routes = [_Route(conn, s.index, True) for s in shards]
        else:
            routes = []
            for s in shards:
                address = conn.target if s.index == first.shard else advertised_address(s.address, conn.target)
                routes.append(_Route(self._conn(address), s.index, False))
            self._routes = routes
        self.routing = routing

    async def _route_of(self, handle: str) -> _Route:
        """Where the calls on the process ``handle`` go."""
        routes = await self.routes()
        if self.routing == "static":
            return routes[0]
        shard = shard_of(handle)
        if shard is None or shard >= len(routes):
            return routes[0]  # the server answers INVALID_ARGUMENT or NOT_FOUND naming the shard
        return routes[shard]

    async def _next_route(self, shard: int | None = None) -> _Route:
        routes = await self.routes()
        if shard is None:
            return routes[next(self._rr) % len(routes)]
        if self.routing == "static" or not 0 <= shard < len(routes):
            raise ValueError(f"no shard {shard} in this client's deployment of {len(routes)}")
        return routes[shard]

    async def _route_for(self, processes: Sequence[Process | None]) -> _Route:
        routes = {id(r): r for p in processes if p is not None for r in (await p._resolve(),)}
        if len(routes) > 1:
            raise ValueError("the operations of one batch must act on processes of the same shard")
        return next(iter(routes.values())) if routes else await self._next_route()

    async def _select(self, target: str | None, shard: int | None = None) -> list[_Route]:
        routes = await self.routes()
        if shard is not None:
            return [await self._next_route(shard)]
        if target is None:
            return routes
        found = [r for r in routes if r.conn.target == target]
        if not found:
            raise ValueError(f"{target!r} is not one of this client's targets {[r.conn.target for r in routes]}")
        return found

    # -- calls
    async def create_process(self, *, shard: int | None = None, timeout: Timeout = ...) -> Process:
        """A new, empty process: a new tree, on the next shard (round-robin) or on ``shard``."""
        route = await self._next_route(shard)
        request = pb.CreateProcessRequest() if shard is None else pb.CreateProcessRequest(shard=shard)
        reply = await route.unary("CreateProcess", request, self._deadline(timeout))
        return Process(self, route, reply.handle, reply.pid)

    async def ping(self, *, target: str | None = None, shard: int | None = None, timeout: Timeout = ...) -> None:
        """A call that does nothing, on every shard or server (or on ``target`` or ``shard``)."""
        for r in await self._select(target, shard):
            await r.unary("Ping", pb.Empty(), self._deadline(timeout))

    async def check_invariants(
        self, *, target: str | None = None, shard: int | None = None, timeout: Timeout = ...
    ) -> list[str]:
        """Audit the model: the problems found (empty when sound), of every shard or server (or of
        ``target`` or ``shard``); with several, each problem starts with the shard it is on."""
        problems: list[str] = []
        routes = await self._select(target, shard)
        for r in routes:
            reply = await r.unary("CheckInvariants", pb.CheckInvariantsRequest(), self._deadline(timeout))
            where = f"shard {r.shard}: " if len(routes) > 1 and r.shard is not None else ""
            problems.extend(where + p for p in reply.problems)
        return problems

    async def stats(
        self, *, target: str | None = None, shard: int | None = None, timeout: Timeout = ...
    ) -> dict[str, int]:
        """The model's counters, summed over every shard or server (or those of ``target`` or ``shard``)."""
        total: dict[str, int] = {}
        for r in await self._select(target, shard):
            reply = await r.unary("GetStats", pb.StatsRequest(), self._deadline(timeout))
            for k, v in reply.counters.items():
                total[k] = total.get(k, 0) + v
        return total

    async def reclaim(
        self, pages: int, *, target: str | None = None, shard: int | None = None, timeout: Timeout = ...
    ) -> int:
        """Memory reclaim, as kswapd runs it: every shard or server (or ``target`` or ``shard``)
        swaps out and frees up to ``pages`` folios of its own, any process's. The folios freed,
        summed. A folio reclaimed dirty is written to swap and stays in the swap cache (its page a
        swap entry) until a later reclaim frees it; 0 without swap."""
        request = pb.ReclaimRequest(pages=pages)
        total = 0
        for r in await self._select(target, shard):
            total += (await r.unary("Reclaim", request, self._deadline(timeout))).reclaimed
        return total

    async def protocol(self, *, target: str | None = None, timeout: Timeout = ...) -> str:
        """The rmap/move protocol the server runs (of ``target``; of every shard, joined with "+"
        where they differ)."""
        seen: list[str] = []
        for r in await self._select(target):
            reply = await r.unary("GetStats", pb.StatsRequest(), self._deadline(timeout))
            if reply.protocol not in seen:
                seen.append(reply.protocol)
        return "+".join(seen)

    async def thp(
        self, *, target: str | None = None, shard: int | None = None, timeout: Timeout = ...
    ) -> ThpSettings | None:
        """The transparent hugepage settings the server runs with (``mmsim serve --thp``,
        ``--mthp-sizes``, ``--thp-zero-page``), of every shard (or of ``target`` or ``shard``);
        None from a server without large folios. Shards that run different settings raise
        MmsimError (FAILED_PRECONDITION) naming them."""
        found: list[tuple[int | None, ThpSettings | None]] = []
        for r in await self._select(target, shard):
            reply = await r.unary("GetStats", pb.StatsRequest(), self._deadline(timeout))
            found.append((r.shard, thp_from_pb(reply)))
        first = found[0][1]
        if any(settings != first for _, settings in found):
            shown = "; ".join(f"shard {i}: {settings}" for i, settings in found)
            raise MmsimError(f"the shards run different THP settings: {shown}",
                             code=grpc.StatusCode.FAILED_PRECONDITION)
        return first

    async def shards(self, *, timeout: Timeout = ...) -> list[pb.ShardInfo]:
        """The deployment's shards as they are now (GetTopology): index, address, generation, state."""
        routes = await self.routes()
        if self.routing == "static":
            return []
        reply = await routes[0].unary("GetTopology", pb.TopologyRequest(), self._deadline(timeout))
        self.topology = list(reply.shards)
        return self.topology

    def process(self, handle: str, pid: int = 0, *, target: str | None = None) -> Process:
        """A :class:`Process` for a handle obtained elsewhere (another client, another OS process):
        on its shard, or with a list of targets on the server ``target`` (default: the first)."""
        if self.routing == "static":
            if target is not None and target not in self.targets:
                raise ValueError(f"{target!r} is not one of this client's targets {self.targets}")
            routes = self._static_routes()
            route = next(r for r in routes if r.conn.target == target) if target is not None else routes[0]
            return Process(self, route, handle, pid)
        return Process(self, None, handle, pid)  # routed on first use, once the topology is known

    async def batch(
        self, ops: Sequence[_ops.Op], *, stop_on_error: bool = False, timeout: Timeout = ...
    ) -> list[Result]:
        """Run ``ops`` (built with :mod:`mmsim.client.ops`) in order in one call.

        The operations must act on processes of one shard. Returns one entry per operation run: its
        result, as the unary method returns it, or the exception instance it failed with (not
        raised). With ``stop_on_error`` the list ends at the first failure. A failure of the whole
        call (e.g. too many operations) raises.
        """
        route = await self._route_for([op.process for op in ops])
        request = pb.BatchRequest(ops=[op.message for op in ops], stop_on_error=stop_on_error)
        reply = await route.unary("Batch", request, self._deadline(timeout))
        kinds = [op.kind for op in ops]
        return [_alias_done(kinds[i] if i < len(kinds) else "", _op_result(route, self, r))
                for i, r in enumerate(reply.results)]

    def batch_stream(self, *, via: Process | None = None, timeout: float | None = None) -> BatchStream:
        """A BatchStream call: send lists of operations and receive their results, on one stream.

        Example::

            async with mm.batch_stream(via=p) as stream:
                for i in range(100):
                    results = await stream.run([ops.write(p, addr, i), ops.read(p, addr)])

        The stream is opened to the shard of ``via`` (default: the next one, round-robin); its
        deadline ``timeout`` covers the whole stream and is none by default. Sending and receiving may
        also be split over two tasks: ``send()`` ..., ``done_writing()``, and ``async for results in
        stream`` gets each list of results in order.
        """
        return BatchStream(self, via, timeout)


class BatchStream:
    """An open BatchStream call (see :meth:`Client.batch_stream`); use it with ``async with``."""

    def __init__(self, client: Client, via: Process | None, timeout: float | None) -> None:
        self._client = client
        self._via = via
        self._route: _Route | None = None
        self._timeout = timeout
        self._call: Any = None
        self._writing = True

    async def __aenter__(self) -> BatchStream:
        route = await self._via._resolve() if self._via is not None else await self._client._next_route()
        self._route = route
        self._call = route.conn.stub.BatchStream(timeout=self._timeout, metadata=route.conn.metadata(route.header))
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
        for op in ops:
            if op.process is not None and await op.process._resolve() is not self._route:
                raise ValueError("the operations of a stream must act on processes of the stream's shard")
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
        assert self._route is not None
        return [_op_result(self._route, self._client, r) for r in reply.results]

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


class Pin:
    """A FOLL_PIN pin of a process's pages (see ``Process.pin``): ``id`` names it in its
    process, ``pages`` is the number of pages it holds."""

    __slots__ = ("addr", "id", "length", "process")

    def __init__(self, process: Process, id: int, addr: int, length: int) -> None:
        self.process = process
        self.id = id
        self.addr = addr
        self.length = length

    @property
    def pages(self) -> int:
        return ((self.addr + self.length + 4095) >> 12) - (self.addr >> 12)

    async def unpin(self, *, timeout: Timeout = ...) -> None:
        await self.process.unpin(self, timeout=timeout)

    async def __aenter__(self) -> Pin:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.unpin()

    def __repr__(self) -> str:
        return f"Pin(id={self.id}, addr={self.addr:#x}, length={self.length:#x}, process={self.process!r})"


class Process:
    """A simulated process on the shard (or server) that issued it.

    ``id`` is its handle: an opaque, unguessable capability that lets whoever holds it act on the
    process, so keep it as you would a password. ``pid`` is the process's number on its shard: it
    is how results (``WalkResult.mappings``, ``AnonVma.vmas``) name processes, and gives no access.
    ``shard`` is the index of its shard (the handle carries it).
    """

    __slots__ = ("_client", "_route", "id", "pid")

    def __init__(self, client: Client, route: _Route | None, id: str, pid: int = 0) -> None:
        self._client = client
        self._route = route
        self.id = id
        self.pid = pid

    @property
    def shard(self) -> int | None:
        """The index of the shard this process lives on (None if the handle does not say)."""
        return shard_of(self.id)

    @property
    def target(self) -> str:
        """The address its calls go to: its shard's, or the proxy's."""
        if self._route is None:
            return self._client.targets[0]
        return self._route.conn.target

    def __repr__(self) -> str:
        return f"Process(pid={self.pid}, shard={self.shard}, target={self.target!r})"  # the handle is a secret

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Process) and (self.id, self._client) == (other.id, other._client)

    def __hash__(self) -> int:
        return hash((self.id, id(self._client)))

    async def _resolve(self) -> _Route:
        route = self._route
        if route is None:
            route = self._route = await self._client._route_of(self.id)
        return route

    async def _call(self, method: str, request: Any, timeout: Timeout) -> Any:
        route = self._route or await self._resolve()
        return await route.conn.unary(method, request, self._client._deadline(timeout), route.header)

    async def _run(self, op: _ops.Op, timeout: Timeout) -> Result:
        row = BY_OP_FIELD[op.kind]
        try:
            response = await self._call(row.rpc, op.request, timeout)
        except OSError as e:
            _alias_done(op.kind, e)
            raise
        return _DECODE[row.result_field](self._route, self._client, response)  # type: ignore[arg-type, index]

    # -- processes
    async def fork(self, *, timeout: Timeout = ...) -> Process:
        """fork(): the child, on the same server."""
        return await self._run(_ops.fork(self), timeout)

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
        return await self._run(_ops.mmap(self, length, prot, uffd, addr), timeout)

    async def munmap(self, addr: int, length: int, *, timeout: Timeout = ...) -> None:
        await self._run(_ops.munmap(self, addr, length), timeout)

    async def madvise(self, addr: int, length: int, advice: str, *, timeout: Timeout = ...) -> None:
        """``advice``: "dontfork", "dofork", "wipeonfork", "keeponfork", "dontneed" (zap the
        range's pages: a later read sees the zero page, a write a new page), "cold" (deactivate the
        range's exclusive pages: reclaim takes them first), "pageout" (reclaim them now: each
        becomes a swap entry, its folio written to swap and left in the swap cache), "hugepage"
        (MADV_HUGEPAGE: the range may have large folios where the server's THP settings say
        "madvise") or "nohugepage" (MADV_NOHUGEPAGE: it gets none)."""
        await self._run(_ops.madvise(self, addr, length, advice), timeout)

    async def mprotect(self, addr: int, length: int, prot: str, *, timeout: Timeout = ...) -> None:
        """mprotect: ``prot`` is "none", "r" or "rw" (VMAs split and merge as the kernel's do)."""
        await self._run(_ops.mprotect(self, addr, length, prot), timeout)

    async def mremap(
        self,
        addr: int,
        old_length: int,
        new_length: int,
        *,
        maymove: bool = False,
        dontunmap: bool = False,
        fixed: int | None = None,
        timeout: Timeout = ...,
    ) -> Vma:
        """mremap: shrink in place, grow in place, or move (``maymove``, MREMAP_MAYMOVE), leaving
        the old range mapped but empty (``dontunmap``) or to exactly ``fixed``. The new range."""
        op = _ops.mremap(self, addr, old_length, new_length, maymove=maymove, dontunmap=dontunmap, fixed=fixed)
        return await self._run(op, timeout)

    # -- the userfault handler's side
    async def uffd_copy(
        self, dst: int, length: int, values: int | list[int], *, dontwake: bool = False, wp: bool = False,
        mode_bits: int = 0, timeout: Timeout = ...,
    ) -> int:
        """UFFDIO_COPY: fill the missing pages of [dst, dst + length) with ``values`` (one value for
        every page, or one per page) and wake the faults waiting there (unless ``dontwake``). With
        ``wp`` (UFFDIO_COPY_MODE_WP; the range must be registered for WP, else EINVAL) the pages
        are mapped write-protected: a write to one waits as a write-protect userfault. The bytes
        copied; an error after some pages has ``.copied`` (and ``.moved``)."""
        op = _ops.uffd_copy(self, dst, length, values, dontwake=dontwake, wp=wp, mode_bits=mode_bits)
        return await self._run(op, timeout)

    async def uffd_zeropage(
        self, dst: int, length: int, *, dontwake: bool = False, mode_bits: int = 0, timeout: Timeout = ...
    ) -> int:
        """UFFDIO_ZEROPAGE: map the zero page at the missing pages of the range and wake the faults
        waiting there (unless ``dontwake``). The bytes zeroed; an error after some has ``.zeroed``."""
        op = _ops.uffd_zeropage(self, dst, length, dontwake=dontwake, mode_bits=mode_bits)
        return await self._run(op, timeout)

    async def uffd_wake(self, addr: int, length: int, *, timeout: Timeout = ...) -> None:
        """UFFDIO_WAKE: wake the faults waiting on the range (they fault again)."""
        await self._run(_ops.uffd_wake(self, addr, length), timeout)

    async def read_userfaults(self, *, timeout: Timeout = ...) -> list[UserfaultEvent]:
        """The events queued on this process's userfaultfd now, taken off the queue without waiting
        for more (a read of an O_NONBLOCK userfaultfd); [] when none is queued."""
        route = self._route or await self._resolve()
        request = pb.UserfaultsRequest(process=self.id, nonblocking=True)
        stream = route.server_stream("Userfaults", request, self._client._deadline(timeout))
        try:
            return [userfault_from_pb(m) async for m in stream]
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from e

    async def list_userfaults(self, *, timeout: Timeout = ...) -> Userfaults:
        """What waits on this process's userfaultfd, without taking anything: the queued events
        and the faults asleep."""
        reply = await self._call("ListUserfaults", pb.ProcessRequest(process=self.id), timeout)
        return Userfaults(tuple(userfault_from_pb(m) for m in reply.queued),
                          tuple(userfault_from_pb(m) for m in reply.waiting))

    async def userfaults(self, *, reconnect: int = 5) -> AsyncGenerator[UserfaultEvent, None]:
        """The fault events of this process's userfaultfd, in order, as they arrive (those queued
        before the call first), until the process exits.

        Example (a userfault handler)::

            async for ev in p.userfaults():
                await p.uffd_copy(ev.addr, 4096, fill(ev.addr))

        An event whose fault is still waiting when a stream ends is delivered again on the next
        one: a handler that reconnects loses nothing (it may see an event twice; resolving a page
        twice gives EEXIST). A stream that breaks (UNAVAILABLE) is opened again, up to
        ``reconnect`` times in a row."""
        route = self._route or await self._resolve()
        request = pb.UserfaultsRequest(process=self.id)
        failures = 0
        while True:
            call = route.server_stream("Userfaults", request)
            try:
                async for m in call:
                    failures = 0
                    yield userfault_from_pb(m)
                return  # the process exited
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or failures >= reconnect:
                    raise from_rpc_error(e) from e
                failures += 1
                await asyncio.sleep(min(1.0, 0.05 * 2 ** failures))  # backoff before reconnecting
            finally:
                call.cancel()

    async def uffd_register(self, addr: int, length: int, mode: str = "missing", *, timeout: Timeout = ...) -> None:
        await self._run(_ops.uffd_register(self, addr, length, mode), timeout)

    async def uffd_unregister(self, addr: int, length: int, *, timeout: Timeout = ...) -> None:
        await self._run(_ops.uffd_unregister(self, addr, length), timeout)

    # -- accesses
    async def read(self, addr: int, *, timeout: Timeout = ...) -> int:
        return await self._run(_ops.read(self, addr), timeout)

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
        return await self._run(op, timeout)

    async def walk(self, addr: int, blocking: bool = False, *, timeout: Timeout = ...) -> WalkResult:
        """The rmap walk (folio_referenced) of the folio at ``addr``. Raises ENOENT where nothing
        with a reverse map is mapped there (a hole, the zero page, a swapped-out page), and EAGAIN
        while a split of its large folio has it unmapped or its count frozen (try again)."""
        return await self._run(_ops.walk(self, addr, blocking), timeout)

    # -- pins
    async def pin(self, addr: int, length: int, *, timeout: Timeout = ...) -> Pin:
        """FOLL_PIN the pages covering [addr, addr + length), as pin_user_pages(FOLL_WRITE |
        FOLL_LONGTERM) does for an io_uring buffer registration: each page is made present,
        writable and exclusive (a write fault that stores nothing), then pinned. While pinned, a
        page is not moved (EBUSY), not swapped out, and copied for the child at fork; its large
        folio is not split. Raises EFAULT for length 0 or more than 1 GiB, a hole or a
        range not writable. The pin lasts until ``Pin.unpin`` or the process's exit; use it as an
        async context manager to unpin on leaving."""
        pin_id = await self._run(_ops.pin(self, addr, length), timeout)
        return Pin(self, pin_id, addr, length)

    async def unpin(self, pin: Pin | int, *, timeout: Timeout = ...) -> None:
        """Give back a pin (a ``Pin`` or its id); ENOENT for one the process does not have."""
        await self._run(_ops.unpin(self, pin.id if isinstance(pin, Pin) else pin), timeout)

    # -- inspection
    async def folio(self, addr: int, *, timeout: Timeout = ...) -> FolioInfo | None:
        """The page mapped at ``addr`` (no fault is taken), or None; its ``order`` is that of its
        folio (0: a small one) and ``pmd`` whether a huge PMD maps it here."""
        return await self._run(_ops.folio(self, addr), timeout)

    async def pagemap(self, addr: int, length: int, *, timeout: Timeout = ...) -> list[PagemapEntry]:
        """What /proc/PID/pagemap (with mincore and /proc/kpageflags) says of each page of
        [addr, addr + length), length rounded up to whole pages, without faulting: one entry per
        page, in order. ``addr`` must be page-aligned (else EINVAL); a range of more pages than a
        response can hold raises LimitExceededError (``max_message_bytes``)."""
        reply = await self._call("Pagemap", pb.RangeRequest(process=self.id, addr=addr, length=length), timeout)
        return [pagemap_from_pb(m) for m in reply.entries]

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
