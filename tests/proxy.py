"""A real nginx in front of mmsim shards, for the tests that route through a proxy.

nginx comes from Debian (``apt-get install nginx``): when it is missing and the tests run as root,
it is installed; otherwise the test is skipped, saying why.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

NGINX_PATHS = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")


def _find() -> str | None:
    return shutil.which("nginx") or next((p for p in NGINX_PATHS if os.access(p, os.X_OK)), None)


def nginx_binary() -> str:
    """The nginx executable, installed from Debian if need be (root only); skips the test if none.
    Test processes running side by side (pytest-xdist) install it once: they take a lock first."""
    found = _find()
    if found:
        return found
    if os.geteuid() != 0:
        pytest.skip("nginx is not installed, and installing it (apt-get install nginx) needs root")
    with open("/tmp/mmsim-nginx-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _find() or _install()


def _install() -> str:
    if shutil.which("apt-get") is None:
        pytest.skip("nginx is not installed, and this machine has no apt-get to install it with")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "nginx"]
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:  # a fresh machine may need its package lists first
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    found = _find()
    if done.returncode != 0 or not found:
        pytest.skip(f"nginx could not be installed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
    return found


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def run_nginx(conf: Path, port: int, workdir: Path) -> Iterator[subprocess.Popen[str]]:
    """nginx with the configuration file ``conf``, in the foreground, until it accepts on ``port``;
    stopped (gracefully, then killed) on exit."""
    nginx = nginx_binary()
    check = subprocess.run([nginx, "-t", "-c", str(conf), "-g", f"pid {workdir}/nginx-test.pid;"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen([nginx, "-c", str(conf), "-g", f"daemon off; pid {workdir}/nginx.pid;"],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not _accepts(port):  # waiting for a condition, polled
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else "nginx exited"
            assert time.monotonic() < deadline, "nginx did not start listening"
            time.sleep(0.02)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive free loopback ports."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")
