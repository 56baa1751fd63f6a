"""``mmsim serve`` as a separate OS process, for tests that need one (RSS, signals, load)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class ServerProcess:
    def __init__(self, proc: subprocess.Popen[str], addr: str) -> None:
        self.proc = proc
        self.addr = addr

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self, key: str) -> int:
        """A /proc/<pid>/status figure in bytes (VmRSS, VmHWM)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)


@contextmanager
def mmsim_serve(*args: str) -> Iterator[ServerProcess]:
    """Start ``mmsim serve --listen 127.0.0.1:0 ARGS`` and wait until it serves; on exit, SIGTERM
    it and check that it exits 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmsim.server", "serve", "--listen", "127.0.0.1:0", "--log-format", "json",
         "--access-log-sample", "0", *args],
        stderr=subprocess.PIPE, text=True,
    )
    assert proc.stderr is not None
    try:
        line = proc.stderr.readline()
        event = json.loads(line) if line.startswith("{") else {}
        if event.get("event") != "serving":
            raise RuntimeError(f"mmsim serve did not start: {line!r}")
        drain = threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True)  # type: ignore[union-attr]
        drain.start()  # the server's log must never fill the pipe
        yield ServerProcess(proc, event["listen"])
        proc.send_signal(signal.SIGCONT)  # in case a test left it stopped
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
