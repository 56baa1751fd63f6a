"""The mmsim gRPC server: configuration, start-up (health, reflection, limits, logging) and
graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
import logging
import random
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

from .auth import TokenInterceptor, exposure_refusal, read_token, server_credentials
from .mm.model import MemoryModel
from .metrics import Metrics
from .service import Limits, MemoryManagerServicer
from .topology import DOWN, SERVING, ShardInfo, Topology, follow_supervisor, new_generation

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
    max_message_bytes: int = 4 * 1024 * 1024
    max_remap_bytes: int = 1 << 30
    max_munmap_bytes: int = 1 << 36
    max_batch_ops: int = 10_000
    max_processes: int = 10_000
    max_pages: int = 2_000_000
    max_memory: int = 4 << 30  # the model's budget: 4 GiB, a sixth of this 24 GiB machine
    grace: float = 10.0
    log_format: str = "auto"  # auto | json | console
    log_level: str = "info"
    access_log_sample: float = 1.0  # fraction of OK calls in the access log; failed calls always
    # Sharding (topology.py, supervisor.py): with shards > 1, ``mmsim serve`` is a supervisor.
    shards: int = 1
    shard_index: int = 0
    peers: tuple[str, ...] = ()  # every shard's address, in index order; empty: this one alone
    generation: int = 0  # 0: topology.new_generation() at start
    supervised: bool = False  # started by a supervisor: topology on stdin, "ready" line on stdout
    metrics_listen: str = ""  # HOST:PORT of the Prometheus endpoint; empty: none
    # Access control (auth.py).
    token_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    insecure: bool = False


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


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as e:
            return MalformedRequest(e)

    return deserialize


def _passthrough(serializer: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """The method's serializer, except for a response a handler has already serialized (bytes)."""
    if serializer is None:
        return None

    def serialize(response: Any) -> bytes:
        return response if isinstance(response, bytes) else serializer(response)

    return serialize


async def _reject_malformed(context: grpc.aio.ServicerContext, request: MalformedRequest) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request message does not parse: {request.error}")


def _status(context: grpc.aio.ServicerContext, exc: BaseException | None) -> grpc.StatusCode:
    """The status a call ended with, as far as the handler can tell."""
    code = context.code()
    if isinstance(code, grpc.StatusCode) and code != grpc.StatusCode.OK:
        return code
    if exc is None:
        return grpc.StatusCode.OK
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class _Call:
    """One call's log context, access-log line and metrics."""

    __slots__ = ("method", "metrics", "request_id", "rpc_type", "sample", "t0")

    def __init__(self, method: str, request_id: str | None, sample: float, metrics: Metrics | None = None,
                 rpc_type: str = "unary") -> None:
        self.method = method
        self.request_id = request_id or secrets.token_hex(6)
        self.sample = sample
        self.metrics = metrics
        self.rpc_type = rpc_type
        structlog.contextvars.bind_contextvars(method=method, request_id=self.request_id)
        if metrics is not None:
            metrics.rpc_started(method, rpc_type)
        self.t0 = time.perf_counter()

    def done(self, context: grpc.aio.ServicerContext, exc: BaseException | None = None) -> None:
        seconds = time.perf_counter() - self.t0
        ms = round(seconds * 1e3, 3)
        code = _status(context, exc)
        if self.metrics is not None:
            self.metrics.rpc_handled(self.method, self.rpc_type, code, seconds)
        if code == grpc.StatusCode.OK:
            if self.sample < 1.0 and (self.sample <= 0.0 or random.random() >= self.sample):
                return
            log.info("rpc", method=self.method, code=code.name, duration_ms=ms, request_id=self.request_id,
                     peer=context.peer())
            return
        details = context.details() or (type(exc).__name__ if exc is not None else None)
        log.info("rpc", method=self.method, code=code.name, duration_ms=ms, request_id=self.request_id,
                 peer=context.peer(), details=details)


class RequestContextInterceptor(grpc.aio.ServerInterceptor):
    """Binds a request id and the method to the log context of each call, writes the access log
    (one ``rpc`` line per call at info: OK calls sampled, failed ones always), counts each call in
    the Prometheus metrics (when there are), and answers unparseable request messages with
    INVALID_ARGUMENT."""

    def __init__(self, access_log_sample: float = 1.0, metrics: Metrics | None = None) -> None:
        self.access_log_sample = access_log_sample
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        rid = next((v for k, v in details.invocation_metadata or () if k == "x-request-id"), None)
        sample = self.access_log_sample
        metrics = self.metrics
        if handler is None:  # gRPC answers UNIMPLEMENTED itself; no handler, so no context or peer
            log.info("rpc", method=method, code="UNIMPLEMENTED", duration_ms=0.0,
                     request_id=rid or secrets.token_hex(6), peer=None)
            return handler

        async def checked(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            async for request in requests:
                if isinstance(request, MalformedRequest):
                    await _reject_malformed(context, request)
                yield request

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                call = _Call(method, rid, sample, metrics, "unary")
                try:
                    if isinstance(request, MalformedRequest):
                        await _reject_malformed(context, request)
                    response = await inner_uu(request, context)
                except BaseException as e:
                    call.done(context, e)
                    raise
                call.done(context)
                return response

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, _tolerant(handler.request_deserializer), _passthrough(handler.response_serializer)
            )
        if handler.stream_stream is not None:
            inner_ss = handler.stream_stream

            async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                call = _Call(method, rid, sample, metrics, "bidi_stream")  # one access line when the stream ends
                try:
                    async for response in inner_ss(checked(requests, context), context):
                        yield response
                except BaseException as e:
                    call.done(context, e)
                    raise
                call.done(context)

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, _tolerant(handler.request_deserializer), _passthrough(handler.response_serializer)
            )
        if handler.unary_stream is not None:  # health's Watch
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                call = _Call(method, rid, sample, metrics, "server_stream")
                try:
                    if isinstance(request, MalformedRequest):
                        await _reject_malformed(context, request)
                    responses = inner_us(request, context)
                    if inspect.isawaitable(responses):  # a handler that writes with context.write (health's Watch)
                        await responses
                    else:
                        try:
                            async for response in responses:
                                yield response
                        finally:  # the stream ended early (the client went away): close the handler's now
                            await responses.aclose()
                except BaseException as e:
                    call.done(context, e)
                    raise
                call.done(context)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, _tolerant(handler.request_deserializer), _passthrough(handler.response_serializer)
            )
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                call = _Call(method, rid, sample, metrics, "client_stream")
                try:
                    response = await inner_su(checked(requests, context), context)
                except BaseException as e:
                    call.done(context, e)
                    raise
                call.done(context)
                return response

            return grpc.stream_unary_rpc_method_handler(
                stream_unary, _tolerant(handler.request_deserializer), _passthrough(handler.response_serializer)
            )
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
        await self.server.stop(grace)
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)


def _hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


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
    host, _, port_s = listen.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    port = int(port_s)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ListenError(f"cannot listen on {listen}: {e.strerror}") from None
    ips = list(dict.fromkeys(str(info[4][0]) for info in infos))

    def fail(ip: str, port: int, why: str | None) -> ListenError:
        target = _hostport(ip, port)
        where = listen if target == listen else f"{listen} ({target})"
        return ListenError(f"cannot listen on {where}: {why or 'gRPC could not bind it'}")

    exposed = [_hostport(ip, port) for ip in ips]
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
                got = server.add_insecure_port(_hostport(ip, port))
            else:
                got = server.add_secure_port(_hostport(ip, port), credentials)
        except RuntimeError:
            got = 0
        if got == 0:
            if bound:  # gRPC listens from add_insecure_port on, and only a stop closes those sockets
                await server.start()
                await server.stop(None)
            raise fail(ip, port, _bind_error(ip, port))
        port = got
        bound.append(_hostport(ip, got))
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
    )
    limits = Limits(
        max_remap_bytes=config.max_remap_bytes,
        max_munmap_bytes=config.max_munmap_bytes,
        max_batch_ops=config.max_batch_ops,
        max_message_bytes=config.max_message_bytes,
    )
    generation = config.generation or new_generation()
    metrics = Metrics(model, shard=config.shard_index, generation=generation) if config.metrics_listen else None
    interceptors: list[grpc.aio.ServerInterceptor] = [RequestContextInterceptor(config.access_log_sample, metrics)]
    if token is not None:  # inside the access log: a refused call still gets its line
        interceptors.append(TokenInterceptor(token))
    server = grpc.aio.server(
        interceptors=interceptors,
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
            # A call waiting in gRPC core's queue is never cancelled for its age (the default is
            # 30 s, answered CANCELLED though no one cancelled it): the client's deadline decides.
            ("grpc.server_max_unrequested_time_in_server", 24 * 3600),
            # Nor shed while fewer are queued than the limit of calls in progress lets through.
            ("grpc.server.max_pending_requests", max(1000, 2 * config.max_concurrent_rpcs)),
            ("grpc.server.max_pending_requests_hard_limit", max(3000, 4 * config.max_concurrent_rpcs)),
        ],
    )
    topology = Topology.standalone(config.shard_index, generation, config.listen, config.peers)
    mmsim_pb2_grpc.add_MemoryManagerServicer_to_server(MemoryManagerServicer(model, limits, topology), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _add_reflection(server, (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
    port, addresses = await _listen(server, config.listen, credentials, token=token is not None,
                                    insecure=config.insecure)
    host = config.listen.rsplit(":", 1)[0]
    metrics_address = ""
    if metrics is not None:
        try:
            metrics_port = metrics.start_http(config.metrics_listen)
        except (OSError, ValueError) as e:
            await server.start()
            await server.stop(None)  # what _listen bound
            raise ListenError(f"cannot serve metrics on {config.metrics_listen}: {e}") from None
        metrics_address = f"{config.metrics_listen.rsplit(':', 1)[0]}:{metrics_port}"
    topology.set_self(f"{host}:{port}", metrics_address)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await _follow_shard_health(topology, health_servicer)
    tls = "mutual" if config.tls_client_ca else "on" if credentials is not None else "off"
    log.info("serving", listen=f"{host}:{port}", addresses=list(addresses), protocol=config.protocol,
             shard=topology.index, generation=generation, tls=tls, token=token is not None,
             **({"metrics": metrics_address} if metrics_address else {}))
    running = RunningServer(server, port, model, health_servicer, addresses, topology, metrics)
    running.metrics_address = metrics_address
    return running


def shard_health_service(index: int) -> str:
    """The health service name that reports shard ``index`` of the deployment (on every shard that
    knows it: SERVING, or NOT_SERVING while its supervisor restarts it)."""
    return f"mmsim.shard.{index}"


_HEALTH = {SERVING: health_pb2.HealthCheckResponse.SERVING, DOWN: health_pb2.HealthCheckResponse.NOT_SERVING}


async def _follow_shard_health(topology: Topology, health_servicer: Any) -> None:
    """Report each shard's state in this shard's health service, now and as the supervisor tells."""
    for s in topology.shards:
        if s.state in _HEALTH:
            await health_servicer.set(shard_health_service(s.index), _HEALTH[s.state])

    def changed(s: ShardInfo) -> None:
        if s.state in _HEALTH:
            asyncio.ensure_future(health_servicer.set(shard_health_service(s.index), _HEALTH[s.state]))

    topology.on_change = changed


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

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals
        signals += 1
        log.info("signal", signal=sig.name, action="drain" if signals == 1 else "cancel calls")
        if signals == 1:
            stopping.set()
        elif running is not None:
            asyncio.ensure_future(running.server.stop(0))

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
