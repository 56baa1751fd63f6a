"""Kernel baseline: the live kernel's UFFDIO_MOVE rate.

Builds ``kernel_move.c`` (next to this file) with ``cc -O2`` into a cache
directory outside the repository, runs it a few times and reports the
per-run figures with their medians, so that a benchmark can state its rate
as a ratio to the kernel's.

Run as a script to print a table of the three modes.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().with_name("kernel_move.c")
MODES = ("single", "bulk64", "bulk")

# userfaultfd(2) syscall numbers by machine.
_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}

# Constants from <linux/userfaultfd.h> and <fcntl.h> (Linux, x86_64/aarch64).
_UFFD_USER_MODE_ONLY = 1
_O_CLOEXEC = 0o2000000
_O_NONBLOCK = 0o4000
_UFFD_API = 0xAA
_UFFD_FEATURE_MOVE = 1 << 16
# _IOWR(0xAA, 0x3F, struct uffdio_api { __u64 api, features, ioctls; })
_UFFDIO_API = (3 << 30) | (24 << 16) | (0xAA << 8) | 0x3F


def _compiler() -> str | None:
    return shutil.which("cc")


def kernel_oracle_unavailable() -> str | None:
    """Return why the kernel baseline cannot run here, or None if it can."""
    if sys.platform != "linux":
        return f"not Linux ({sys.platform})"
    if os.geteuid() != 0:
        return "not running as root"
    nr = _SYS_USERFAULTFD.get(platform.machine())
    if nr is None:
        return f"unknown userfaultfd syscall number for {platform.machine()}"

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    flags = _O_CLOEXEC | _O_NONBLOCK
    fd = libc.syscall(ctypes.c_long(nr), ctypes.c_int(flags | _UFFD_USER_MODE_ONLY))
    if fd < 0 and ctypes.get_errno() == errno.EINVAL:
        fd = libc.syscall(ctypes.c_long(nr), ctypes.c_int(flags))
    if fd < 0:
        return f"userfaultfd syscall failed: {os.strerror(ctypes.get_errno())}"
    try:
        buf = bytearray(struct.pack("=QQQ", _UFFD_API, _UFFD_FEATURE_MOVE, 0))
        try:
            fcntl.ioctl(fd, _UFFDIO_API, buf)
        except OSError as exc:
            return f"UFFDIO_API refused UFFD_FEATURE_MOVE: {exc.strerror}"
        _, features, _ = struct.unpack("=QQQ", buf)
        if not features & _UFFD_FEATURE_MOVE:
            return "UFFDIO_API does not offer UFFD_FEATURE_MOVE"
    finally:
        os.close(fd)

    if _compiler() is None:
        return "no C compiler (cc) on PATH"
    return None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    path = Path(base) / "mmsim"
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError:
        path = Path(tempfile.gettempdir()) / f"mmsim-{os.getuid()}"
        path.mkdir(parents=True, exist_ok=True)
        return path


def build_kernel_move() -> Path:
    """Compile kernel_move.c once per source version; return the binary."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    binary = _cache_dir() / f"kernel_move-{digest}"
    if binary.exists():
        return binary
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc) on PATH")
    # Build under a temporary name, then rename: concurrent builders are safe.
    fd, tmp = tempfile.mkstemp(dir=binary.parent, prefix=binary.name + ".")
    os.close(fd)
    try:
        subprocess.run(
            [cc, "-O2", "-o", tmp, str(SOURCE)],
            check=True,
            capture_output=True,
            text=True,
        )
        os.replace(tmp, binary)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"cc failed:\n{exc.stderr}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return binary


def run_kernel_move(mode: str, n: int, repeats: int = 5) -> dict:
    """Run kernel_move ``repeats`` times; return the runs and their medians.

    ``mode`` is "single" (n one-page moves), "bulk64" (n 64-page moves) or
    "bulk" (one move of n MiB).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if n <= 0 or repeats <= 0:
        raise ValueError("n and repeats must be positive")
    binary = build_kernel_move()
    runs = []
    for _ in range(repeats):
        proc = subprocess.run(
            [str(binary), mode, str(n)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"kernel_move {mode} {n} exited {proc.returncode}: "
                f"{proc.stderr.strip()}"
            )
        runs.append(json.loads(proc.stdout))
    return {
        "mode": mode,
        "n": n,
        "runs": runs,
        "median_seconds": statistics.median(r["seconds"] for r in runs),
        "median_ops_per_s": statistics.median(r["ops_per_s"] for r in runs),
        "median_pages_per_s": statistics.median(r["pages_per_s"] for r in runs),
    }


def main() -> int:
    reason = kernel_oracle_unavailable()
    if reason is not None:
        print(f"kernel baseline unavailable: {reason}", file=sys.stderr)
        return 1
    print(f"{'mode':<8} {'n':>8} {'ops':>8} {'pages':>9} "
          f"{'median s':>11} {'ops/s':>13} {'pages/s':>13}")
    for mode, n in (("single", 200_000), ("bulk64", 20_000), ("bulk", 256)):
        res = run_kernel_move(mode, n)
        first = res["runs"][0]
        print(f"{mode:<8} {n:>8} {first['ops']:>8} {first['pages']:>9} "
              f"{res['median_seconds']:>11.6f} "
              f"{res['median_ops_per_s']:>13,.0f} "
              f"{res['median_pages_per_s']:>13,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
