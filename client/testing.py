"""Helpers for tests of code that uses the SDK: a real mmsim server inside the test's process
(``serve_in_process``), or as a separate OS process (``serve_subprocess``)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ServerProcess:
    """A running ``mmsim serve``: its address (shard 0's, with shards), its OS process, and the
    address of every shard."""

    addr: str
    proc: subprocess.Popen[str]
    addresses: tuple[str, ...] = ()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self, key: str) -> int:
        """A /proc/<pid>/status figure in bytes (VmRSS, VmHWM): Linux only."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)


@contextmanager
def serve_subprocess(*args: str, check_exit: bool = True) -> Iterator[ServerProcess]:
    """Run ``mmsim serve --listen 127.0.0.1:0 ARGS`` as a separate OS process (the access log off),
    and yield it once it serves (with ``--shards N``, once every shard serves: ``addr`` is shard 0's
    address and ``addresses`` every shard's). On exit it is stopped with SIGTERM; with
    ``check_exit``, an exit status other than 0 raises RuntimeError. Its log is read and dropped, so
    it never blocks.

    Example::

        with serve_subprocess("--protocol", "no-recheck") as server:
            ... Client(server.addr) ...
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmsim.server", "serve", "--listen", "127.0.0.1:0", "--log-format", "json",
         "--access-log-sample", "0", *args],
        stderr=subprocess.PIPE, text=True,
    )
    assert proc.stderr is not None
    # A supervisor's shards log their own "serving" first; the supervisor's line lists them all.
    supervised = any(a == "--shards" or a.startswith("--shards=") for a in args) and \
        _flag(args, "--shards") not in (None, "1")
    try:
        while True:
            line = proc.stderr.readline()
            event = json.loads(line) if line.startswith("{") else {}
            if event.get("event") == "serving" and (not supervised or "shards" in event):
                break
            if not line.startswith("{") or event.get("level") in ("error", "critical"):
                raise RuntimeError(f"mmsim serve did not start: {line.strip() or proc.wait(30)}")
        threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
        yield ServerProcess(event["listen"], proc, tuple(event.get("shards", (event["listen"],))))
        proc.send_signal(signal.SIGCONT)  # in case it was left stopped
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(60)
        if check_exit and status != 0:
            raise RuntimeError(f"mmsim serve exited {status}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def _flag(args: tuple[str, ...], flag: str) -> str | None:
    """The value of the last ``flag VALUE`` or ``flag=VALUE`` in ``args``."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


__all__ = ["ServerProcess", "serve_in_process", "serve_subprocess"]
