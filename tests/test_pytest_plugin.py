"""The pytest plugin shipped with the SDK: its fixtures are available to any test session
where mmsim is installed (entry point ``pytest11``), without importing anything."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmsim.client import Client, LimitExceededError
from mmsim.client.testing import serve_subprocess


async def test_mmsim_client_fixture_talks_to_a_fresh_server(mmsim_client: Client, mmsim_server: str) -> None:
    assert mmsim_server.startswith("127.0.0.1:")
    p = await mmsim_client.create_process()
    v = await p.mmap(4096)
    await p.write(v.start, 7)
    assert await p.read(v.start) == 7
    assert (await mmsim_client.stats())["processes"] == 1  # a server of this test's own
    assert await mmsim_client.check_invariants() == []


class TestOptions:
    @pytest.fixture
    def mmsim_server_options(self) -> dict[str, object]:
        return {"max_processes": 1}

    async def test_options_reach_the_server(self, mmsim_client: Client) -> None:
        await mmsim_client.create_process()
        with pytest.raises(LimitExceededError):
            await mmsim_client.create_process()


# -- the plugin in other projects' pytest runs (pytest in a subprocess, in a fresh directory)

UNRELATED = "def test_unrelated():\n    assert 1 + 1 == 2\n"
USES_FIXTURES = """\
async def test_uses_client(mmsim_client):
    p = await mmsim_client.create_process()
    v = await p.mmap(4096)
    await p.write(v.start, 5)
    assert await p.read(v.start) == 5


def test_uses_server(mmsim_server):
    pass
"""
NO_PYTEST_ASYNCIO = "raise ModuleNotFoundError(\"No module named 'pytest_asyncio'\")\n"


def _pytest(project: Path, ini: str, files: dict[str, str], *args: str, env: dict[str, str] | None = None) -> str:
    """Run pytest in ``project`` (a new directory with ``pytest.ini`` and ``files``): its output."""
    project.mkdir()
    (project / "pytest.ini").write_text(ini)
    for name, text in files.items():
        (project / name).write_text(text)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=project,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return f"rc={done.returncode}\n{done.stdout}{done.stderr}"


@pytest.fixture
def without_pytest_asyncio(tmp_path: Path) -> dict[str, str]:
    """An environment where ``import pytest_asyncio`` fails, as where mmsim is installed without its
    test extra (pytest-asyncio's own entry point is disabled with ``-p no:asyncio``)."""
    fake = tmp_path / "site" / "pytest_asyncio"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(NO_PYTEST_ASYNCIO)
    path = [str(tmp_path / "site"), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(path)}


def test_plugin_does_not_break_an_unrelated_run_without_pytest_asyncio(
    tmp_path: Path, without_pytest_asyncio: dict[str, str]
) -> None:
    out = _pytest(
        tmp_path / "p", "[pytest]\n", {"test_unrelated.py": UNRELATED}, "-p", "no:asyncio", env=without_pytest_asyncio
    )
    assert out.startswith("rc=0\n") and "1 passed" in out, out
    assert "pytest_asyncio" not in out, out
    # the mmsim plugin was loaded (and its fixtures are listed) all the same
    listing = _pytest(tmp_path / "q", "[pytest]\n", {}, "--fixtures", "-p", "no:asyncio", env=without_pytest_asyncio)
    assert "mmsim_client" in listing and "pytest-asyncio is not installed" in listing, listing


def test_fixtures_without_pytest_asyncio_say_what_is_needed(
    tmp_path: Path, without_pytest_asyncio: dict[str, str]
) -> None:
    out = _pytest(
        tmp_path / "p",
        "[pytest]\n",
        {"test_unrelated.py": UNRELATED, "test_uses.py": USES_FIXTURES},
        "-p",
        "no:asyncio",
        env=without_pytest_asyncio,
    )
    assert out.startswith("rc=1\n") and "1 passed, 2 errors" in out, out
    for name in ("mmsim_client", "mmsim_server"):
        assert f"the mmsim fixture '{name}' is an async fixture and needs the pytest-asyncio plugin" in out, out
    assert "which is not installed" in out and "pip install pytest-asyncio" in out, out
    assert 'asyncio_mode = "auto"\nasyncio_default_fixture_loop_scope = "function"' in out, out


def test_fixtures_with_pytest_asyncio_disabled_say_so(tmp_path: Path) -> None:
    out = _pytest(tmp_path / "p", "[pytest]\n", {"test_uses.py": USES_FIXTURES}, "-p", "no:asyncio")
    assert out.startswith("rc=1\n") and "2 errors" in out, out
    assert "needs the pytest-asyncio plugin, which is installed but not enabled" in out, out


def test_fixtures_keep_the_test_loop_whatever_the_default_fixture_loop_scope(tmp_path: Path) -> None:
    # The plugin's fixtures set loop_scope="function": a project whose other async fixtures default
    # to the session's loop still gets a client on its tests' own loop.
    ini = "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = session\n"
    out = _pytest(tmp_path / "p", ini, {"test_uses.py": USES_FIXTURES})
    assert out.startswith("rc=0\n") and "2 passed" in out, out


# -- a sharded deployment: given with --mmsim-target, or started for the test (shards > 1)

ASYNC_INI = "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
ON_BOTH_SHARDS = """\
import pytest
from mmsim.client import LimitExceededError


async def test_both_shards(mmsim_server, mmsim_client):
    assert mmsim_server == {target!r} or {target!r} == "any"
    assert [s.index for s in await mmsim_client.shards()] == [0, 1] and mmsim_client.routing == "direct"
    for shard in (0, 1):
        p = await mmsim_client.create_process(shard=shard)
        v = await p.mmap(4096)
        await p.write(v.start, 40 + shard)
        assert p.shard == shard and await mmsim_client.process(p.id).read(v.start) == 40 + shard
        await p.exit()
    assert await mmsim_client.check_invariants() == []
"""
OPTIONS_SHARDS = """\
@pytest.fixture
def mmsim_server_options():
    return {"shards": 2, "max_processes": 1}


async def test_options_reach_every_shard(mmsim_client):
    for shard in (0, 1):
        await mmsim_client.create_process(shard=shard)
        with pytest.raises(LimitExceededError):
            await mmsim_client.create_process(shard=shard)
"""


def test_a_target_is_used_instead_of_a_server_of_the_test(tmp_path: Path) -> None:
    with serve_subprocess("--shards", "2") as server:
        out = _pytest(tmp_path / "p", ASYNC_INI, {"test_shards.py": ON_BOTH_SHARDS.format(target=server.addr)},
                      "--mmsim-target", server.addr)
        assert out.startswith("rc=0\n") and "1 passed" in out, out


def test_options_with_shards_start_a_sharded_server(tmp_path: Path) -> None:
    files = {"test_shards.py": ON_BOTH_SHARDS.format(target="any") + "\n\n" + OPTIONS_SHARDS}
    out = _pytest(tmp_path / "p", ASYNC_INI, files)
    assert out.startswith("rc=0\n") and "2 passed" in out, out
