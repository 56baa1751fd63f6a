"""The mmsim gRPC server: configuration, start-up (health, reflection, limits, logging) and
graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
import logging
import random
import re
import secrets
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from mmsim.v1 import mmsim_pb2, mmsim_pb2_grpc
from mmsim.v1.wire import join_hostport, split_hostport

from .admission import Admission, Ticket
from .auth import TokenInterceptor, exposure_refusal, read_token, server_credentials
from .metrics import Metrics
from .mm.memcontrol import MemCgroup, MemoryLimitExceeded
from .mm.mm_types import LimitExceeded
from .mm.model import MemoryModel
from .mm.swapfile import DEFAULT_SWAP_BYTES
from .service import Limits, MemoryManagerServicer, status_of
from .thp import DEFAULT_MTHP_SIZES, parse_mthp_sizes
from .topology import DOWN, SERVING, ShardInfo, Topology, follow_supervisor, new_generation, peer_credentials

SERVICE_NAME = mmsim_pb2.DESCRIPTOR.services_by_name["MemoryManager"].full_name
#: Server reflection's current name; grpcio-reflection 1.85 only ships v1alpha, which is the same
#: protocol on the wire under an older package name.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
log = structlog.get_logger("mmsim.server")


@dataclass
class ServerConfig:
    """Every setting of ``mmsim serve``; each has a flag and an environment variable (see cli.py)."""

    listen: str = "127.0.0.1:7077"
    protocol: str = "recheck"
    seed: int = 0
    preempt: float = 0.0
    detectors: bool = True
    max_concurrent_rpcs: int = 1024
    # Admission and pending work (admission.py).
    reserved_rpcs: int = 64
    max_pending_faults: int = 4096
    max_pending_faults_per_process: int = 1024
    max_userfault_streams: int = 4
    max_request_bytes: int = 16 << 20
    audit_share: float = 0.1
    max_message_bytes: int = 4 * 1024 * 1024
    max_remap_bytes: int = 1 << 30
    max_munmap_bytes: int = 1 << 36
    max_batch_ops: int = 10_000
    max_processes: int = 10_000
    max_pages: int = 2_000_000
    max_memory: int = 4 << 30  # the model's budget: 4 GiB, a sixth of this 24 GiB machine
    swap_bytes: int = DEFAULT_SWAP_BYTES  # the model's swap device: 1 GiB; 0: no swap
    # Transparent hugepages (thp.py): transparent_hugepage/enabled, each size's policy, use_zero_page.
    thp: str = "madvise"  # always | madvise | never
    mthp_sizes: str = DEFAULT_MTHP_SIZES  # SIZE or SIZE:POLICY, comma-separated; sizes not listed: never
    thp_zero_page: bool = True
    grace: float = 10.0
    log_format: str = "auto"  # auto | json | console
    log_level: str = "info"
    access_log_sample: float = 1.0  # fraction of OK calls in the access log; failed calls always
    # Connections (connection_options), in seconds; what 0 means: each flag's help (cli.py).
    max_connections: int = 1024  # connections open at once; 0: no limit
    max_connection_idle: float = 300.0  # no call for this long: GOAWAY, then closed
    max_connection_age: float = 0.0  # GOAWAY once this old (off)
    max_connection_age_grace: float = 30.0  # then calls still running get this long
    keepalive_time: float = 7200.0  # ping a connection quiet for this long
    keepalive_timeout: float = 20.0  # close it when the ping is not answered within this
    min_ping_interval: float = 300.0  # clients' pings more often than this: GOAWAY too_many_pings
    handshake_timeout: float = 20.0  # TCP connect to the client's SETTINGS acknowledged (and TLS)
    # Sharding (topology.py, supervisor.py): with shards > 1, ``mmsim serve`` is a supervisor.
    shards: int = 1
    shard_index: int = 0
    peers: tuple[str, ...] = ()  # every shard's address, in index order; empty: this one alone
    generation: int = 0  # 0: topology.new_generation() at start
    supervised: bool = False  # started by a supervisor: topology on stdin, "ready" line on stdout
    peer_probe_interval: float = 1.0  # seconds between health checks of each peer (topology.PeerProbe); 0: none
    peer_probe_failures: int = 2  # failed checks in a row that make a peer down
    metrics_listen: str = ""  # HOST:PORT of the Prometheus endpoint; empty: none
    # Access control (auth.py).
    token_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    insecure: bool = False

    def connection_options(self) -> list[tuple[str, int]]:
        """The gRPC server's channel arguments for connections: how many, idle and age limits, keepalive,
        the ping policy for clients and the handshake timeout. In grpcio 1.85 an unanswered ping
        closes the connection after ``grpc.http2.ping_timeout_ms`` (keepalive_timeout_ms alone
        does not), and a client that never acknowledges the server's SETTINGS after
        ``grpc.http2.settings_timeout``: both are set too. Durations beyond gRPC's longest
        (2**31 - 1 ms, 24 days) are taken as that; a negative one is a ValueError."""

        def ms(name: str, seconds: float, zero: int) -> int:
            """``seconds`` in milliseconds; 0 stands for ``zero``."""
            if not seconds >= 0:
                raise ValueError(f"{name} must not be negative")
            return zero if seconds == 0 else max(1, round(min(seconds, _NEVER_MS / 1000) * 1000))

        handshake = ms("handshake_timeout", self.handshake_timeout, _NEVER_MS)
        timeout = ms("keepalive_timeout", self.keepalive_timeout, _NEVER_MS)
        return [
            ("grpc.max_connection_idle_ms", ms("max_connection_idle", self.max_connection_idle, _NEVER_MS)),
            ("grpc.max_connection_age_ms", ms("max_connection_age", self.max_connection_age, _NEVER_MS)),
            ("grpc.max_connection_age_grace_ms", ms("max_connection_age_grace", self.max_connection_age_grace, 0)),
            ("grpc.keepalive_time_ms", ms("keepalive_time", self.keepalive_time, _NEVER_MS)),
            ("grpc.keepalive_timeout_ms", timeout),
            ("grpc.http2.ping_timeout_ms", timeout),
            # Clients may keep an idle connection alive with pings, no more often than this.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", ms("min_ping_interval", self.min_ping_interval, 0)),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.server_handshake_timeout_ms", handshake),
            ("grpc.http2.settings_timeout", handshake),
            *([("grpc.max_allowed_incoming_connections", self.max_connections)] if self.max_connections else []),
        ]


#: The longest duration gRPC takes (its channel arguments are int32 milliseconds): never.
_NEVER_MS = 2**31 - 1


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """structlog JSON when not on a terminal, readable output on one; stdlib logs go through it."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    if not console:
        shared.append(structlog.processors.dict_tracebacks)
    structlog.configure(
        # Level first: below it (an access line at --log-level warning), nothing else runs.
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(processor=renderer, foreign_pre_chain=shared))
    handler.addFilter(_quiet_grpc)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("grpc").setLevel(max(logging.WARNING, root.level))


def _quiet_grpc(record: logging.LogRecord) -> bool:
    """grpc's own loggers only from WARNING up: at DEBUG they log every event loop they find."""
    return record.levelno >= logging.WARNING or not record.name.startswith("grpc")


class MalformedRequest:
    """Stands for a request message that failed to parse, so the handler can answer
    INVALID_ARGUMENT instead of the library's UNKNOWN."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class RefusedRequest:
    """Stands for a request refused before it was decoded (admission.charge_request): past
    --max-request-bytes, or without room in the memory budget."""

    def __init__(self, status: grpc.Status) -> None:
        self.status = status


def _tolerant(method: str, deserializer: Callable[[bytes], Any] | None, admission: Admission) -> Callable[[bytes], Any]:
    """The method's deserializer (none: the bytes as they are), returning (message, charge): the
    message, or a MalformedRequest or RefusedRequest in its place, and the RequestCharge that
    keeps what it holds charged to the memory budget for as long as it lives. A request is
    charged before it is decoded, and one that does not fit is never decoded."""

    def deserialize(data: bytes) -> Any:
        try:
            charge = admission.charge_request(method, data)
        except (LimitExceeded, MemoryLimitExceeded) as e:
            return RefusedRequest(status_of(e)), None
        if deserializer is None:
            return data, charge
        try:
            return deserializer(data), charge
        except DecodeError as e:
            return MalformedRequest(e), charge

    return deserialize


def _passthrough(serializer: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """The method's serializer, except for a response already serialized (bytes): the
    interceptor serializes every response itself, to check its size first."""
    if serializer is None:
        return None

    def serialize(response: Any) -> bytes:
        return response if isinstance(response, bytes) else serializer(response)

    return serialize


#: What a request id may hold, and how much of it is kept; anything else is replaced by "_".
REQUEST_ID_MAX = 64
_REQUEST_ID_BAD = re.compile(r"[^A-Za-z0-9._:/@+=-]")


def request_id(raw: str | bytes | None) -> str:
    """The ``x-request-id`` a client sent, as the log may hold it: printable token characters
    only, at most REQUEST_ID_MAX of them; a fresh one when it sent none."""
    if not raw:
        return secrets.token_hex(6)
    if isinstance(raw, bytes):  # gRPC gives str for a key without -bin; the type allows bytes
        raw = raw.decode("ascii", "replace")
    return _REQUEST_ID_BAD.sub("_", raw[:REQUEST_ID_MAX])


class _Call:
    """One call: its log context, access-log line, metrics and admission ticket. Everything the
    log needs is taken from the context when the call starts; after that the context is read
    only while the handler still runs (an abort's code and details), never once the call may
    have ended (a cancelled stream's generator is finalized after its call is gone)."""

    __slots__ = ("admission", "deadline", "method", "metrics", "peer", "request_id", "rpc_type", "sample", "t0",
                 "ticket")

    def __init__(self, context: grpc.aio.ServicerContext, method: str, rid: str, sample: float,
                 metrics: Metrics | None, rpc_type: str, admission: Admission) -> None:
        self.method = method
        self.request_id = rid
        self.sample = sample
        self.metrics = metrics
        self.rpc_type = rpc_type
        self.admission = admission
        self.ticket: Ticket | None = None
        self.peer = context.peer()
        remaining = context.time_remaining()
        self.t0 = time.perf_counter()
        self.deadline = None if remaining is None else self.t0 + remaining
        structlog.contextvars.bind_contextvars(method=method, request_id=rid)
        if metrics is not None:
            metrics.rpc_started(method, rpc_type)

    async def admit(self, context: grpc.aio.ServicerContext, request: Any) -> Any:
        """The request message, once the call is admitted with it (a stream's next message: once
        its charge replaces the last one's); aborts the call (malformed, refused, no slot, no
        memory) otherwise."""
        message, charge = request
        del request
        refusal: grpc.Status | None = None
        if isinstance(message, MalformedRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request message does not parse: {message.error}")
        if isinstance(message, RefusedRequest):
            refusal = message.status
        elif self.ticket is None:
            try:
                self.ticket = self.admission.admit(self.method, charge)
            except (LimitExceeded, MemoryLimitExceeded) as e:
                refusal = status_of(e)
        else:
            self.ticket.request = charge
        if refusal is not None:
            del message, charge  # nothing of a refused request outlives its answer
            await context.abort_with_status(refusal)
        return message

    async def respond(
        self, context: grpc.aio.ServicerContext, response: Any, serialize: Callable[[Any], bytes]
    ) -> bytes:
        """The response, serialized; RESOURCE_EXHAUSTED instead if it passes --max-message-bytes."""
        data = response if type(response) is bytes else serialize(response)
        limit = self.admission.max_message_bytes
        if len(data) > limit:
            await context.abort_with_status(status_of(LimitExceeded(
                "max_message_bytes", limit, f"the response would be {len(data)} bytes, more than {limit} "
                "(max-message-bytes)")))
        return data

    def done(self, context: grpc.aio.ServicerContext, exc: BaseException | None = None) -> None:
        if self.ticket is not None:
            self.admission.done(self.ticket)
            self.ticket = None
        seconds = time.perf_counter() - self.t0
        details: str | None = None
        if exc is None or isinstance(exc, grpc.aio.AbortError):
            # The handler returned or aborted: the call is still in progress, its state readable.
            code = context.code()
            code = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK
            details = context.details() if code != grpc.StatusCode.OK else None
        elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            late = self.deadline is not None and time.perf_counter() >= self.deadline
            code = grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.CANCELLED
        else:
            code = grpc.StatusCode.UNKNOWN
        if self.metrics is not None:
            self.metrics.rpc_handled(self.method, self.rpc_type, code, seconds)
        if code == grpc.StatusCode.OK:
            if self.sample < 1.0 and (self.sample <= 0.0 or random.random() >= self.sample):
                return
            log.info("rpc", method=self.method, code=code.name, duration_ms=round(seconds * 1e3, 3),
                     request_id=self.request_id, peer=self.peer)
            return
        log.info("rpc", method=self.method, code=code.name, duration_ms=round(seconds * 1e3, 3),
                 request_id=self.request_id, peer=self.peer,
                 details=details or (type(exc).__name__ if exc is not None else None))


class RequestContextInterceptor(grpc.aio.ServerInterceptor):
    """Binds a request id and the method to the log context of each call, writes the access log
    (one ``rpc`` line per call at info: OK calls sampled, failed ones always), counts each call in
    the Prometheus metrics (when there are), admits it (admission.py: run slots, the reserve, its
    charge to the memory budget), answers unparseable or oversize request messages, and checks
    each response's size before it is sent, so that the log says what the client got."""

    def __init__(self, access_log_sample: float = 1.0, metrics: Metrics | None = None,
                 admission: Admission | None = None) -> None:
        self.access_log_sample = access_log_sample
        self.metrics = metrics
        self.admission = admission or Admission(1024, 64, MemCgroup())

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        method = details.method
        rid = request_id(next((v for k, v in details.invocation_metadata or () if k == "x-request-id"), None))
        sample = self.access_log_sample
        metrics = self.metrics
        admission = self.admission
        if handler is None:  # gRPC answers UNIMPLEMENTED itself; no handler, so no context or peer
            log.info("rpc", method=method, code="UNIMPLEMENTED", duration_ms=0.0, request_id=rid, peer=None)
            return handler
        deserialize = _tolerant(method, handler.request_deserializer, admission)
        serialize = handler.response_serializer or (lambda r: r)

        async def admitted(call: _Call, requests: Any, context: grpc.aio.ServicerContext) -> Any:
            async for request in requests:
                yield await call.admit(context, request)

        if handler.unary_unary is not None:
            inner_uu: Any = handler.unary_unary  # an aio handler: the stubs type the sync server's

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                call = _Call(context, method, rid, sample, metrics, "unary", admission)
                try:
                    response = await call.respond(context, await inner_uu(await call.admit(context, request), context),
                                                  serialize)
                except BaseException as e:
                    call.done(context, e)
                    raise
                call.done(context)
                return response

            return grpc.unary_unary_rpc_method_handler(unary_unary, deserialize, _passthrough(serialize))
        if handler.stream_stream is not None:
            inner_ss: Any = handler.stream_stream  # an aio handler: the stubs type the sync server's

            async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                call = _Call(context, method, rid, sample, metrics, "bidi_stream", admission)  # one line at the end
                try:
                    async for response in inner_ss(admitted(call, requests, context), context):
                        yield await call.respond(context, response, serialize)
                except BaseException as e:
                    call.done(context, e)
                    raise
                call.done(context)

            return grpc.stream_stream_rpc_method_handler(stream_stream, deserialize, _passthrough(serialize))
        if handler.unary_stream is not None:  # Userfaults, health's Watch
            inner_us: Any = handler.unary_stream  # an aio handler: the stubs type the sync server's

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                call = _Call(context, method, rid, sample, metrics, "server_stream", admission)
                try:
                    responses = inner_us(await call.admit(context, request), context)
                    if inspect.isawaitable(responses):  # a handler that writes with context.write (health's Watch)
                        await responses
                    else:
                        try:
                            async for response in responses:
                                yield await call.respond(context, response, serialize)
                        finally:  # the stream ended early (the client went away): close the handler's now
                            await responses.aclose()
                except BaseException as e:
                    call.done(context, e)
                    raise
                call.done(context)

            return grpc.unary_stream_rpc_method_handler(unary_stream, deserialize, _passthrough(serialize))
        if handler.stream_unary is not None:
            inner_su: Any = handler.stream_unary  # an aio handler: the stubs type the sync server's

            async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                call = _Call(context, method, rid, sample, metrics, "client_stream", admission)
                try:
                    response = await call.respond(context, await inner_su(admitted(call, requests, context), context),
                                                  serialize)
                except BaseException as e:
                    call.done(context, e)
                    raise
                call.done(context)
                return response

            return grpc.stream_unary_rpc_method_handler(stream_unary, deserialize, _passthrough(serialize))
        return handler


class ListenError(OSError):
    """The server cannot listen on the address asked for (in use, not local, unknown host)."""


class RunningServer:
    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        model: MemoryModel,
        health_servicer: Any,
        addresses: tuple[str, ...] = (),
        topology: Topology | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.server = server
        self.port = port
        self.model = model
        self.health = health_servicer
        #: Every address bound, ``IP:PORT`` (``[IPv6]:PORT``).
        self.addresses = addresses
        self.topology = topology
        #: The Prometheus metrics, when served (``metrics_address``: where).
        self.metrics = metrics
        self.metrics_address = ""

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking calls, let running ones finish within ``grace`` seconds, cancel the rest."""
        await self.health.enter_graceful_shutdown()
        if self.topology is not None:
            await self.topology.stop_probe()
        await self.server.stop(grace)
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)


def _bind_error(ip: str, port: int) -> str | None:
    """Why ``ip:port`` cannot be bound (None if it can), found by binding a socket as gRPC does."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((ip, port))
    except OSError as e:
        return (e.strerror or str(e)).lower()
    return None


async def _listen(
    server: grpc.aio.Server,
    listen: str,
    credentials: grpc.ServerCredentials | None = None,
    *,
    token: bool = False,
    insecure: bool = False,
) -> tuple[int, tuple[str, ...]]:
    """Bind every address ``listen``'s host resolves to, all on one port (port 0: the port the
    first bind got), with TLS when ``credentials`` are given, or raise :class:`ListenError`. gRPC
    alone binds what it can of a name, and says nothing when one of its addresses is taken. An
    address beyond loopback with neither TLS nor a ``token`` is refused before anything is bound,
    unless ``insecure``."""
    host, port = split_hostport(listen)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ListenError(f"cannot listen on {listen}: {e.strerror}") from None
    ips = list(dict.fromkeys(str(info[4][0]) for info in infos))

    def fail(ip: str, port: int, why: str | None) -> ListenError:
        target = join_hostport(ip, port)
        where = listen if target == listen else f"{listen} ({target})"
        return ListenError(f"cannot listen on {where}: {why or 'gRPC could not bind it'}")

    exposed = [join_hostport(ip, port) for ip in ips]
    if (refusal := exposure_refusal(exposed, tls=credentials is not None, token=token, insecure=insecure)):
        raise ListenError(refusal)
    # Every address is tried first, so that the usual failure binds nothing, says why, and
    # spares gRPC's own error line on stderr.
    for ip in ips:
        if (why := _bind_error(ip, port)) is not None:
            raise fail(ip, port, why)
    bound: list[str] = []
    for ip in ips:
        try:
            if credentials is None:
                got = server.add_insecure_port(join_hostport(ip, port))
            else:
                got = server.add_secure_port(join_hostport(ip, port), credentials)
        except RuntimeError:
            got = 0
        if got == 0:
            if bound:  # gRPC listens from add_insecure_port on, and only a stop closes those sockets
                await server.start()
                await server.stop(None)
            raise fail(ip, port, _bind_error(ip, port))
        port = got
        bound.append(join_hostport(ip, got))
    if exposure_refusal(exposed, tls=credentials is not None, token=token, insecure=False):
        log.warning("--insecure: the server is reachable from the network without TLS or a token",
                    listen=listen, addresses=bound)
    return port, tuple(bound)


def _reflection_v1_file() -> None:
    """Put grpc/reflection/v1/reflection.proto in the default pool, so that reflection can
    describe its own v1 service: v1alpha's descriptor under the v1 package, as upstream has it."""
    pool = descriptor_pool.Default()
    name = "grpc/reflection/v1/reflection.proto"
    try:
        pool.FindFileByName(name)
        return
    except KeyError:
        pass
    old, new = "grpc.reflection.v1alpha", "grpc.reflection.v1"
    fd = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(fd)
    fd.name, fd.package = name, new
    fd.ClearField("options")
    for message in fd.message_type:
        for f in message.field:
            if f.HasField("type_name"):
                f.type_name = f.type_name.replace(f".{old}.", f".{new}.")
    for service in fd.service:
        service.ClearField("options")
        for m in service.method:
            m.input_type = m.input_type.replace(f".{old}.", f".{new}.")
            m.output_type = m.output_type.replace(f".{old}.", f".{new}.")
    pool.AddSerializedFile(fd.SerializeToString())


def _add_reflection(server: grpc.aio.Server, service_names: tuple[str, ...]) -> None:
    """Server reflection as ``grpc.reflection.v1`` and ``grpc.reflection.v1alpha``: one servicer,
    since the two are the same messages on the wire."""
    _reflection_v1_file()
    names = (*service_names, REFLECTION_V1, reflection.SERVICE_NAME)
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": v1}),)
    )


async def start_server(config: ServerConfig) -> RunningServer:
    """Start serving ``config.listen`` (port 0: a free one) in the running event loop: every
    address its host resolves to, or :class:`ListenError` (also for an address beyond loopback
    without TLS or a token: auth.exposure_refusal). A token or TLS file that does not load is an
    auth.CredentialsError."""
    if not structlog.is_configured():
        # Embedded (tests, the conformance tool): keep structlog's defaults, filtered to the level.
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(config.log_level.upper())))
    # Access control first: a token or certificate that does not load is an error before anything starts.
    token = read_token(config.token_file) if config.token_file else None
    credentials = (server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca or None)
                   if config.tls_cert else None)
    model = MemoryModel(
        protocol=config.protocol,
        seed=config.seed,
        preempt=config.preempt,
        detectors=config.detectors,
        max_processes=config.max_processes,
        max_pages=config.max_pages,
        max_memory=config.max_memory,
        swap_bytes=config.swap_bytes,
        thp=config.thp,
        thp_orders=parse_mthp_sizes(config.mthp_sizes),
        thp_use_zero_page=config.thp_zero_page,
        max_pending_faults=config.max_pending_faults,
        max_pending_faults_per_process=config.max_pending_faults_per_process,
        max_userfault_streams=config.max_userfault_streams,
        audit_share=config.audit_share,
    )
    admission = Admission(config.max_concurrent_rpcs, config.reserved_rpcs, model.k.memcg,
                          config.max_request_bytes, config.max_message_bytes)
    model.k.on_uffd_sleep = admission.on_uffd_sleep
    limits = Limits(
        max_remap_bytes=config.max_remap_bytes,
        max_munmap_bytes=config.max_munmap_bytes,
        max_batch_ops=config.max_batch_ops,
        max_message_bytes=config.max_message_bytes,
    )
    generation = config.generation or new_generation()
    metrics = Metrics(model, shard=config.shard_index, generation=generation) if config.metrics_listen else None
    interceptors: list[grpc.aio.ServerInterceptor] = [
        RequestContextInterceptor(config.access_log_sample, metrics, admission)]
    if token is not None:  # inside the access log: a refused call still gets its line
        interceptors.append(TokenInterceptor(token))
    calls_at_once = max(1000, config.max_concurrent_rpcs + config.reserved_rpcs + config.max_pending_faults)
    # No maximum_concurrent_rpcs here: gRPC's would count calls asleep on a userfault and refuse
    # the calls that resolve them; the interceptor admits calls instead (admission.py).
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
            # A call waiting in gRPC core's queue is never cancelled for its age (the default is
            # 30 s, answered CANCELLED though no one cancelled it): the client's deadline decides.
            ("grpc.server_max_unrequested_time_in_server", 24 * 3600),
            # Nor shed while fewer are queued than the limit of calls in progress lets through.
            # gRPC core cancels calls that wait beyond these for the server to take them: room for
            # every call the admission control may let in at once (admission.py), faults asleep too.
            ("grpc.server.max_pending_requests", 2 * calls_at_once),
            ("grpc.server.max_pending_requests_hard_limit", 4 * calls_at_once),
            # Idle, old and silent connections are closed; dead peers found by keepalive pings.
            *config.connection_options(),
        ],
    )
    topology = Topology.standalone(config.shard_index, generation, config.listen, config.peers)
    mmsim_pb2_grpc.add_MemoryManagerServicer_to_server(MemoryManagerServicer(model, limits, topology), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _add_reflection(server, (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
    port, addresses = await _listen(server, config.listen, credentials, token=token is not None,
                                    insecure=config.insecure)
    address = join_hostport(split_hostport(config.listen)[0], port)
    metrics_address = ""
    if metrics is not None:
        try:
            metrics_port = metrics.start_http(config.metrics_listen)
        except (OSError, ValueError) as e:
            await server.start()
            await server.stop(None)  # what _listen bound
            raise ListenError(f"cannot serve metrics on {config.metrics_listen}: {e}") from None
        metrics_address = join_hostport(split_hostport(config.metrics_listen)[0], metrics_port)
    topology.set_self(address, metrics_address)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await _follow_shard_health(topology, health_servicer, config)
    tls = "mutual" if config.tls_client_ca else "on" if credentials is not None else "off"
    log.info("serving", listen=address, addresses=list(addresses), protocol=config.protocol,
             shard=topology.index, generation=generation, tls=tls, token=token is not None,
             **({"metrics": metrics_address} if metrics_address else {}))
    running = RunningServer(server, port, model, health_servicer, addresses, topology, metrics)
    running.metrics_address = metrics_address
    return running


def shard_health_service(index: int) -> str:
    """The health service name that reports shard ``index`` of the deployment (on every shard that
    knows it: SERVING, or NOT_SERVING while its supervisor restarts it or while it does not answer
    this shard's probes)."""
    return f"mmsim.shard.{index}"


_HEALTH = {SERVING: health_pb2.HealthCheckResponse.SERVING, DOWN: health_pb2.HealthCheckResponse.NOT_SERVING}


async def _follow_shard_health(topology: Topology, health_servicer: Any, config: ServerConfig) -> None:
    """Report each shard's state in this shard's health service, now and as the supervisor tells
    and the peer probe finds; start the probe (topology.PeerProbe) where there are peers to probe,
    over TLS when this shard serves TLS. ``RunningServer.stop`` stops it."""
    for s in topology.shards:
        if s.state in _HEALTH:
            await health_servicer.set(shard_health_service(s.index), _HEALTH[s.state])
    pending: set[asyncio.Future[None]] = set()  # held until done: the loop keeps tasks weakly

    def changed(s: ShardInfo) -> None:
        if s.state in _HEALTH:
            f = asyncio.ensure_future(health_servicer.set(shard_health_service(s.index), _HEALTH[s.state]))
            pending.add(f)
            f.add_done_callback(pending.discard)

    topology.on_change = changed
    if config.peer_probe_interval > 0 and (config.peers or config.supervised):
        topology.start_probe(config.peer_probe_interval, config.peer_probe_failures,
                             peer_credentials(config.tls_cert, config.tls_key, config.tls_client_ca))


def freeze_after_full_collections() -> None:
    """Keep CPython's full collections short however large the model grows: after each one, what
    survived moves to the permanent generation (gc.freeze), so the next one scans only what was
    made since (a full collection over a model of 300,000 objects took 30-90 ms, over millions,
    seconds). The model frees its objects by reference counting alone, in no reference cycle
    (tests/test_gc.py), so nothing frozen waits for the cyclic collector to be reclaimed."""

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "stop" and info["generation"] == 2:
            gc.freeze()

    gc.callbacks.append(on_gc)


async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM or SIGINT, then drain within the grace period; a second signal cancels
    the calls still running. Returns the exit status (0)."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    signals = 0
    running: RunningServer | None = None
    stops: set[asyncio.Future[None]] = set()  # the loop holds tasks weakly: keep each until it is done

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals
        signals += 1
        log.info("signal", signal=sig.name, action="drain" if signals == 1 else "cancel calls")
        if signals == 1:
            stopping.set()
        elif running is not None:
            stop = asyncio.ensure_future(running.server.stop(0))
            stops.add(stop)
            stop.add_done_callback(stops.discard)

    freeze_after_full_collections()
    # Before the server starts, so that a signal right after "serving" is never the default action.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    running = await start_server(config)
    follower: asyncio.Future[None] | None = None
    if config.supervised:
        assert running.topology is not None
        print(json.dumps({"event": "ready", "address": running.topology.shards[config.shard_index].address,
                          "generation": running.topology.generation,
                          "metrics_address": running.metrics_address}), flush=True)
        follower = asyncio.ensure_future(follow_supervisor(running.topology, stopping.set))
    await stopping.wait()
    if follower is not None:
        follower.cancel()  # no topology matters once draining starts
    await running.stop(config.grace)
    problems = running.model.check_invariants()
    log.info("stopped", audit="clean" if not problems else f"{len(problems)} problems")
    return 0
