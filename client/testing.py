"""Helpers for tests of code that uses the SDK: a real mmsim server inside the test's process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any


@asynccontextmanager
async def serve_in_process(**server_options: Any) -> AsyncIterator[str]:
    """Run an mmsim server in this process and event loop on 127.0.0.1 with a free port.

    Yields its address ``"127.0.0.1:PORT"``; the server is stopped on exit. ``server_options`` are
    fields of ``mmsim.server.app.ServerConfig`` (``protocol``, ``seed``, ``preempt``, limits, ...).

    Example::

        async with serve_in_process(protocol="recheck", seed=1) as addr:
            async with Client(addr) as mm:
                ...
    """
    from mmsim.server.app import ServerConfig, start_server

    options = {"listen": "127.0.0.1:0", **server_options}
    running = await start_server(ServerConfig(**options))
    host = options["listen"].rsplit(":", 1)[0]
    try:
        yield f"{host}:{running.port}"
    finally:
        await running.stop(None)


__all__ = ["serve_in_process"]
