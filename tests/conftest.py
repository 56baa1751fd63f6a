"""Shared fixtures: a real mmsim gRPC server on a free loopback port, per test; and a guard that
fails any test in which a detector fired, unless the test is marked ``violations_expected``."""

from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import pytest_asyncio

from mmsim.server.app import RunningServer, ServerConfig, start_server
from mmsim.server.mm.detectors import Detectors
from mmsim.v1 import mmsim_pb2_grpc


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "violations_expected: the test provokes detector violations on purpose")


@pytest.fixture(autouse=True)
def no_unexpected_violations(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every Detectors created during the test must end with no violation recorded."""
    created: list[Detectors] = []
    original = Detectors.__init__

    def tracking_init(self: Detectors, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        created.append(self)

    monkeypatch.setattr(Detectors, "__init__", tracking_init)
    yield
    if request.node.get_closest_marker("violations_expected") is None:
        fired = [str(v) for d in created for v in d.events]
        assert not fired, f"detectors fired: {fired[:5]}"


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
