"""The distribution: `python -m build` makes an sdist and a wheel that pass `twine check`; the wheel,
installed alone into a fresh virtualenv (requirements.lock as constraints), has the server and the SDK
without the load generator's extra, serves, and runs examples/quickstart.py against itself."""

from __future__ import annotations

import email.parser
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
# The `loadgen` extra's distributions and their modules; `pip install mmsim` has none of them.
LOADGEN_EXTRA = {"hdrhistogram": "hdrh", "jsonschema": "jsonschema", "matplotlib": "matplotlib"}
HINT = "pip install 'mmsim[loadgen]'"


def _env() -> dict[str, str]:
    """This environment less what would point a child at the project's sources or configure mmsim."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("MMSIM_") and k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def _run(*cmd: str | Path, timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=_env())


def _sources(dest: Path) -> Path:
    """A copy of the files a commit would hold (tracked, or untracked and not ignored); the checkout
    itself where it is not a git one."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, timeout=60)
    if listed.returncode != 0:
        return ROOT
    for name in filter(None, listed.stdout.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _check_fetched(done: subprocess.CompletedProcess[str], what: str) -> None:
    """Fail where ``done`` (a step that downloads from the package index) failed; skip instead where
    the index cannot be reached."""
    if done.returncode == 0:
        return
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple/").rstrip("/") + "/pip/"
    try:
        urllib.request.urlopen(index, timeout=15).close()
    except (OSError, urllib.error.URLError) as e:
        pytest.skip(f"the package index is unreachable ({index}: {e}), so {what} cannot fetch its dependencies")
    raise AssertionError(f"{what} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")


def _wait_serving(proc: subprocess.Popen[str], reader: threading.Thread, lines: queue.Queue[str],
                  deadline: float) -> str:
    """The address from the server's "serving" log line (its stderr, which ``reader`` puts in ``lines``)."""
    seen = []
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        seen.append(line)
        event = json.loads(line) if line.startswith("{") else {}
        if event.get("event") == "serving":
            return str(event["listen"])
        if not reader.is_alive() and lines.empty():
            break
    raise AssertionError(f"mmsim serve did not report serving (exit {proc.poll()}): {''.join(seen)[-2000:]}")


def test_without_the_loadgen_extra() -> None:
    # Here the extra is installed: none of it may be imported on the way to the SDK, the server or the CLI.
    probe = ("import sys, mmsim.client, mmsim.client.testing, mmsim.server.app, mmsim.server.cli\n"
             f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(LOADGEN_EXTRA.values())!r}))")
    done = _run(sys.executable, "-c", probe, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"imported with the SDK or the server: {done.stdout.strip()}"
    # sys.modules[name] = None: the module counts as not installed, as in a plain `pip install mmsim`;
    # `mmsim loadgen` then says, in one line, what to install.
    probe = ("import sys\nsys.modules['matplotlib'] = None\nfrom mmsim.server.cli import main\n"
             "sys.exit(main(['loadgen', '--target', '127.0.0.1:1', '--count', '1']))")
    done = _run(sys.executable, "-c", probe, timeout=60)
    assert done.returncode == 2, done
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "matplotlib not installed" in done.stderr and HINT in done.stderr, \
        done.stderr


def test_wheel_and_sdist_install_serve_and_run_the_quickstart(tmp_path: Path) -> None:
    started = time.monotonic()
    src = _sources(tmp_path / "src")
    dist = tmp_path / "dist"
    built = _run(sys.executable, "-m", "build", "--outdir", dist, src, timeout=300)  # the wheel from the sdist
    _check_fetched(built, "python -m build")
    (sdist,) = dist.glob("mmsim-*.tar.gz")
    (wheel,) = dist.glob("mmsim-*-py3-none-any.whl")
    checked = _run(sys.executable, "-m", "twine", "check", "--strict", sdist, wheel, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    top = sdist.name.removesuffix(".tar.gz")
    with tarfile.open(sdist) as tar:
        in_sdist = {n.removeprefix(f"{top}/") for n in tar.getnames()}
    assert {"pyproject.toml", "README.md", "proto/mmsim/v1/mmsim.proto", "proto/mmsim/v1/mmsim_pb2.py",
            "proto/mmsim/v1/mmsim_pb2_grpc.py", "loadgen/report.schema.json", "server/cli.py",
            "client/__init__.py"} <= in_sdist
    with zipfile.ZipFile(wheel) as whl:
        in_wheel = set(whl.namelist())
        info = next(n for n in in_wheel if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(whl.read(info).decode())
    assert {"mmsim/v1/mmsim_pb2.py", "mmsim/v1/mmsim_pb2_grpc.py", "mmsim/v1/mmsim.proto",
            "mmsim/loadgen/report.schema.json", "mmsim/server/mm/kernel.py", "mmsim/client/__init__.py"} <= in_wheel
    assert not any(n.startswith("tests/") for n in in_wheel)
    requires = [Requirement(r) for r in metadata.get_all("Requires-Dist", [])]
    core = {r.name.lower() for r in requires if r.marker is None}
    assert {"grpcio", "protobuf", "rich"} <= core
    assert not core & set(LOADGEN_EXTRA), "the load generator's libraries are not in the loadgen extra"
    pinned = [str(r) for r in requires if any(s.operator in ("==", "===") for s in r.specifier)]
    assert not pinned, f"exact pins belong in requirements.lock, not the metadata: {pinned}"
    assert {"loadgen", "test", "locust", "docs"} <= set(metadata.get_all("Provides-Extra", []))

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py, mmsim = env_dir / "bin/python", env_dir / "bin/mmsim"
    installed = _run(py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel, "-c", LOCK,
                     timeout=600)
    _check_fetched(installed, "pip install WHEEL -c requirements.lock")
    listed = _run(py, "-m", "pip", "list", "--format=json", timeout=120)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"mmsim", "grpcio", "protobuf", "structlog"} <= names
    assert not names & (set(LOADGEN_EXTRA) | {"numpy", "pytest", "locust"}), \
        f"installed without being asked for: {sorted(names & (set(LOADGEN_EXTRA) | {'numpy', 'pytest', 'locust'}))}"
    assert _run(py, "-m", "pip", "check", timeout=120).returncode == 0

    probe = ("import sys, importlib.resources as r, mmsim.client, mmsim.server, mmsim.server.cli, mmsim.v1\n"
             "assert r.files('mmsim.loadgen').joinpath('report.schema.json').is_file()\n"
             "assert r.files('mmsim.v1').joinpath('mmsim.proto').is_file()\n"
             "print(mmsim.server.__file__)")
    imported = _run(py, "-c", probe, timeout=60, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert Path(imported.stdout.strip()).is_relative_to(env_dir), "mmsim was not imported from the wheel"
    helped = _run(mmsim, "--help", timeout=60, cwd=tmp_path)
    assert helped.returncode == 0 and "loadgen" in helped.stdout, helped.stderr
    refused = _run(mmsim, "loadgen", "--target", "127.0.0.1:1", "--count", "1", timeout=60, cwd=tmp_path)
    assert refused.returncode == 2, refused
    assert "Traceback" not in refused.stderr and refused.stderr.count("\n") == 1 and HINT in refused.stderr, \
        refused.stderr

    server = subprocess.Popen([str(mmsim), "serve", "--listen", "127.0.0.1:0", "--log-format", "json",
                               "--access-log-sample", "0"], stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                              env=_env())
    assert server.stderr is not None
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in server.stderr], daemon=True)  # type: ignore[func-returns-value]  # None, as the test checks
    reader.start()
    try:
        addr = _wait_serving(server, reader, lines, time.monotonic() + 60)
        quick = _run(py, ROOT / "examples/quickstart.py", addr, timeout=120, cwd=tmp_path)
        assert quick.returncode == 0, quick.stdout + quick.stderr
        assert "remap moved 4096 bytes" in quick.stdout and quick.stdout.splitlines()[-1] == "ok", quick.stdout
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        reader.join(30)
        server.stderr.close()
    print(f"built, installed and served in {time.monotonic() - started:.1f} s")
