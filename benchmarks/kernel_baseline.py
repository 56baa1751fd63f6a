"""Kernel baseline: the live kernel's UFFDIO_MOVE rate.

Builds ``kernel_move.c`` (next to this file) with ``cc -O2`` into a cache
directory outside the repository, runs it a few times and reports the
per-run figures with their medians, so that a benchmark can state its rate
as a ratio to the kernel's.

Run as a script to print a table of the three modes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mmsim.server.tools.conformance.kernel import uffd_move_unavailable

SOURCE = Path(__file__).resolve().with_name("kernel_move.c")
MODES = ("single", "bulk64", "bulk")

def _compiler() -> str | None:
    return shutil.which("cc")


def kernel_oracle_unavailable() -> str | None:
    """Return why the kernel baseline cannot run here, or None if it can."""
    why = uffd_move_unavailable()
    if why is not None:
        return why
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
    return _build(SOURCE)


#: The userfault round trip (fault, event, UFFDIO_COPY, wake) with a handler thread.
FAULT_SOURCE = SOURCE.with_name("kernel_fault.c")


def run_kernel_fault(n: int, repeats: int = 5) -> dict:
    """Run kernel_fault (n faults, each resolved by a handler thread's UFFDIO_COPY) ``repeats``
    times; the runs and the median faults per second."""
    binary = _build(FAULT_SOURCE, "-pthread")
    runs = []
    for _ in range(repeats):
        proc = subprocess.run([str(binary), str(n)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"kernel_fault {n} exited {proc.returncode}: {proc.stderr.strip()}")
        runs.append(json.loads(proc.stdout))
    return {"n": n, "runs": runs, "median_ops_per_s": statistics.median(r["ops_per_s"] for r in runs)}


def _build(source_path: Path, *flags: str) -> Path:
    """Compile a C source once per source version; return the binary."""
    source = source_path.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    binary = _cache_dir() / f"{source_path.stem}-{digest}"
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
            [cc, "-O2", *flags, "-o", tmp, str(source_path)],
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
