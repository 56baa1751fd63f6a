"""The scripts in examples/ run as the README says, against a real server (one per test, in this
test's event loop), and the pytest example project passes as shipped, without warnings."""

import asyncio
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

from mmsim.client.testing import serve_in_process

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _env(**extra: str) -> dict[str, str]:
    """This environment without pytest's own variables (a script or a nested pytest run must not
    see them), plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}, **extra}


async def _run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``python args...`` to completion: its exit status and its output (stdout, then stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=cwd,
        env=env or _env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, (out + err).decode()


async def test_quickstart() -> None:
    async with serve_in_process(log_level="warning") as addr:
        rc, out = await _run(str(EXAMPLES / "quickstart.py"), addr)
    assert rc == 0, out
    lines = out.splitlines()
    assert lines[-1] == "ok", out
    assert "remap moved 4096 bytes" in out, out
    folio = next(line for line in lines if line.startswith("folio at dst:"))
    assert "value=42" in folio and "index=0x" in folio, out
    walk = next(line for line in lines if line.startswith("rmap walk:"))
    dst = next(line for line in lines if line.startswith("src ")).split("dst ")[1].split()[0]
    assert f", {dst})]" in walk, out  # found at dst, printed in hex


async def test_batch_and_stream() -> None:
    async with serve_in_process(log_level="warning") as addr:
        rc, out = await _run(str(EXAMPLES / "batch_and_stream.py"), addr)
    assert rc == 0, out
    assert "batch results:" in out and "remap  -> 4096" in out and "read   -> 7" in out, out
    assert "FileExistsError(17" in out, out  # the failed op is returned in place, not raised
    assert "dst now holds [7, 101, 102, 103, 104, 105, 106, 107]" in out and out.endswith("ok\n"), out


async def test_fork_and_walk_with_the_address_from_the_environment() -> None:
    async with serve_in_process(log_level="warning") as addr:
        rc, out = await _run(str(EXAMPLES / "fork_and_walk.py"), env=_env(MMSIM_ADDR=addr))
    assert rc == 0, out
    assert "after 3 forks, the walk of the folio at 0x" in out and "finds 4 mappings" in out, out
    assert "remap while the page is shared fails: [EBUSY]" in out, out
    assert "after the children wrote, the parent's folio has 1 mapping(s)" in out, out
    assert "remap in the parent moved 4096 bytes" in out and out.endswith("ok\n"), out


async def test_swap() -> None:
    async with serve_in_process(log_level="warning") as addr:
        rc, out = await _run(str(EXAMPLES / "swap.py"), addr)
    assert rc == 0, out
    assert "paged out:   PagemapEntry(swap=True" in out and "swapcache=True" in out, out
    assert "remap of a swap entry moved 4096 bytes; dst: PagemapEntry(swap=True" in out, out
    assert "swap-outs 4, swap-ins 2, swap-cache hits 1, slots in use 4" in out and out.endswith("ok\n"), out


async def test_thp() -> None:
    async with serve_in_process(log_level="warning") as addr:
        rc, out = await _run(str(EXAMPLES / "thp.py"), addr)
    assert rc == 0, out
    assert "after a write fault: PagemapEntry(present=True" in out and "pmd=True, thp=True, head=True" in out, out
    assert "remap of the whole 2 MiB moved 2097152 bytes" in out, out
    assert "THP faults 2, PMD moves 1, PMD splits 2, folio splits 1" in out and out.endswith("ok\n"), out


@pytest.mark.parametrize("script", ["quickstart.py", "batch_and_stream.py", "fork_and_walk.py", "swap.py", "thp.py"])
async def test_scripts_fail_without_a_server(script: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: connections to it are refused
        addr = f"127.0.0.1:{s.getsockname()[1]}"
        rc, out = await _run(str(EXAMPLES / script), addr)
    assert rc != 0, out
    assert f"cannot reach an mmsim server at {addr}" in out and "make run" in out, out
    assert "Traceback" not in out, out


async def test_pytest_example_passes_as_shipped(tmp_path: Path) -> None:
    project = tmp_path / "pytest_example"
    shutil.copytree(EXAMPLES / "pytest_example", project)
    rc, out = await _run("-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=project)
    assert rc == 0, out
    assert "2 passed" in out, out
    assert "warning" not in out.lower(), out  # e.g. PytestDeprecationWarning about the loop scope


async def test_the_readme_snippet_runs_as_a_script(tmp_path: Path) -> None:
    readme = (EXAMPLES.parent / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert "asyncio.run(" in snippet and '"127.0.0.1:7077"' in snippet
    async with serve_in_process(log_level="warning") as addr:
        script = tmp_path / "snippet.py"
        script.write_text(snippet.replace('"127.0.0.1:7077"', repr(addr)))
        rc, out = await _run(str(script))
    assert rc == 0, out
    assert "value=42" in out and "referenced=1" in out, out


async def test_userfault_handler() -> None:
    async with serve_in_process(log_level="warning") as addr:
        rc, out = await _run(str(EXAMPLES / "userfault_handler.py"), addr)
    assert rc == 0, out
    assert "the mutator read [1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007]" in out, out
    assert out.endswith("ok\n"), out
