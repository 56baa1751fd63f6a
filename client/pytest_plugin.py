"""pytest fixtures for code that uses the SDK (registered as the ``mmsim`` pytest11 plugin).

``mmsim_server`` yields the address of an in-process server, started per test with the options
returned by the ``mmsim_server_options`` fixture (override it to change them); ``mmsim_client``
yields a :class:`~mmsim.client.Client` connected to it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from ._client import Client
from .testing import serve_in_process


@pytest.fixture
def mmsim_server_options() -> dict[str, Any]:
    """Options of the ``mmsim_server`` fixture (``ServerConfig`` fields); override to change them."""
    return {}


@pytest_asyncio.fixture
async def mmsim_server(mmsim_server_options: dict[str, Any]) -> AsyncIterator[str]:
    """The address ("127.0.0.1:PORT") of an mmsim server running in the test's event loop."""
    async with serve_in_process(**mmsim_server_options) as address:
        yield address


@pytest_asyncio.fixture
async def mmsim_client(mmsim_server: str) -> AsyncIterator[Client]:
    """A Client connected to ``mmsim_server``."""
    async with Client(mmsim_server) as client:
        yield client
