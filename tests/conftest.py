"""Shared fixtures: a real mmsim gRPC server on a free loopback port, per test."""

from collections.abc import AsyncIterator

import grpc
import pytest_asyncio

from mmsim.server.app import RunningServer, ServerConfig, start_server
from mmsim.v1 import mmsim_pb2_grpc


@pytest_asyncio.fixture
async def server() -> AsyncIterator[RunningServer]:
    running = await start_server(ServerConfig(listen="127.0.0.1:0", log_level="warning"))
    try:
        yield running
    finally:
        await running.stop(None)


@pytest_asyncio.fixture
async def channel(server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest_asyncio.fixture
async def stub(channel: grpc.aio.Channel) -> mmsim_pb2_grpc.MemoryManagerStub:
    return mmsim_pb2_grpc.MemoryManagerStub(channel)
