"""The mmsim gRPC server: configuration, start-up (health, reflection, limits, logging) and
graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mmsim.v1 import mmsim_pb2, mmsim_pb2_grpc

from .mm.model import MemoryModel
from .service import Limits, MemoryManagerServicer

SERVICE_NAME = mmsim_pb2.DESCRIPTOR.services_by_name["MemoryManager"].full_name
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
    grace: float = 10.0
    log_format: str = "auto"  # auto | json | console
    log_level: str = "info"
    instance: str = field(default_factory=lambda: secrets.token_hex(8))


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
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(processor=renderer, foreign_pre_chain=shared))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


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


async def _reject_malformed(context: grpc.aio.ServicerContext, request: MalformedRequest) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request message does not parse: {request.error}")


class RequestContextInterceptor(grpc.aio.ServerInterceptor):
    """Binds a request id and the method to the log context of each call, logs failures, and
    answers unparseable request messages with INVALID_ARGUMENT."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        rid = next((v for k, v in details.invocation_metadata or () if k == "x-request-id"), None)

        def bind() -> float:
            structlog.contextvars.bind_contextvars(method=method, request_id=rid or secrets.token_hex(6))
            return time.perf_counter()

        def done(context: grpc.aio.ServicerContext, t0: float) -> None:
            code = context.code()
            if code not in (None, grpc.StatusCode.OK):
                # Memory-semantics errors are ordinary answers: debug level, not noise at info.
                log.debug("rpc failed", code=code.name, details=context.details(), ms=round((time.perf_counter() - t0) * 1e3, 3))

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                t0 = bind()
                try:
                    if isinstance(request, MalformedRequest):
                        await _reject_malformed(context, request)
                    return await inner_uu(request, context)
                finally:
                    done(context, t0)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, _tolerant(handler.request_deserializer), handler.response_serializer
            )
        if handler.stream_stream is not None:
            inner_ss = handler.stream_stream

            async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                t0 = bind()

                async def checked() -> Any:
                    async for request in requests:
                        if isinstance(request, MalformedRequest):
                            await _reject_malformed(context, request)
                        yield request

                try:
                    async for response in inner_ss(checked(), context):
                        yield response
                finally:
                    done(context, t0)

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, _tolerant(handler.request_deserializer), handler.response_serializer
            )
        return handler  # unary-stream / stream-unary: none in this service; health's Watch passes through


class RunningServer:
    def __init__(self, server: grpc.aio.Server, port: int, model: MemoryModel, health_servicer: Any) -> None:
        self.server = server
        self.port = port
        self.model = model
        self.health = health_servicer

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking calls, let running ones finish within ``grace`` seconds, cancel the rest."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(config: ServerConfig) -> RunningServer:
    """Start serving ``config.listen`` (port 0: a free one) in the running event loop."""
    if not structlog.is_configured():
        # Embedded (tests, the conformance tool): keep structlog's defaults, filtered to the level.
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(config.log_level.upper())))
    model = MemoryModel(
        protocol=config.protocol,
        seed=config.seed,
        preempt=config.preempt,
        detectors=config.detectors,
        max_processes=config.max_processes,
        max_pages=config.max_pages,
    )
    limits = Limits(
        max_remap_bytes=config.max_remap_bytes,
        max_munmap_bytes=config.max_munmap_bytes,
        max_batch_ops=config.max_batch_ops,
    )
    server = grpc.aio.server(
        interceptors=[RequestContextInterceptor()],
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    mmsim_pb2_grpc.add_MemoryManagerServicer_to_server(
        MemoryManagerServicer(model, limits, config.instance), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(config.listen)
    if port == 0:
        raise OSError(f"cannot listen on {config.listen}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    host = config.listen.rsplit(":", 1)[0]
    log.info("serving", listen=f"{host}:{port}", protocol=config.protocol, instance=config.instance)
    return RunningServer(server, port, model, health_servicer)


async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM or SIGINT, then drain within the grace period; a second signal cancels
    the calls still running. Returns the exit status (0)."""
    running = await start_server(config)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    signals = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals
        signals += 1
        log.info("signal", signal=sig.name, action="drain" if signals == 1 else "cancel calls")
        if signals == 1:
            stopping.set()
        else:
            asyncio.ensure_future(running.server.stop(0))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await stopping.wait()
    await running.stop(config.grace)
    problems = running.model.check_invariants()
    log.info("stopped", audit="clean" if not problems else f"{len(problems)} problems")
    return 0
