"""``cli.serve_argv``: the command line that gives a ServerConfig, read back by the parser to the
same configuration; and the supervisor's shards, whose settings are their command line alone."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import string
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmsim.server import cli
from mmsim.server.app import ServerConfig
from mmsim.server.mm.kernel import PROTOCOLS, THP_ORDER_POLICIES, THP_POLICIES
from mmsim.server.mm.swapfile import MAX_SWAP_BYTES
from mmsim.server.supervisor import Supervisor, shard_environment
from mmsim.server.thp import THP_ORDERS, format_mthp_sizes, parse_mthp_sizes
from mmsim.server.topology import MAX_SHARDS

CONFIG_VARS = {env for _, env, _, _, _ in cli.SERVE_FLAGS}


def parse(argv: Sequence[str], env: dict[str, str] | None = None) -> ServerConfig:
    """The configuration ``mmsim serve ARGV`` runs with under ``env`` (none of CONFIG_VARS by default)."""
    environ = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS} if env is None else env
    with mock.patch.dict(os.environ, environ, clear=True):
        return cli.serve_config(cli.build_parser().parse_args(["serve", *argv]))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Readable files, some with names a command line could take for something else."""
    d = tmp_path_factory.mktemp("files")
    out = []
    for name in ("token", "-starts-with-a-dash", "has=equals", "has space,comma"):
        (d / name).write_text("x")
        out.append(str(d / name))
    return out


def _valid(raw: str) -> bool:
    """Whether ``--listen`` takes ``raw``."""
    try:
        cli._listen(raw)
    except argparse.ArgumentTypeError:
        return False
    return True


_HOST = st.one_of(st.text(string.ascii_letters + string.digits + ".-_=%", min_size=1, max_size=24),
                  st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(lambda a: f"[{a}]"))
_ADDRESS = st.builds(lambda h, p: f"{h}:{p}", _HOST, st.integers(0, 65535)).filter(_valid)
_SECONDS = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)


def _values(files: list[str]) -> dict[object, st.SearchStrategy[object]]:
    """Each flag's value space, by its converter (by field for plain strings)."""
    return {
        cli._listen: _ADDRESS,
        cli._listen_or_off: st.one_of(st.just(""), _ADDRESS),
        cli._addresses: st.lists(_ADDRESS.filter(lambda a: "," not in a), max_size=4).map(tuple),
        cli._int: st.integers(-(2**63), 2**63),
        cli._positive: st.integers(1, 2**63),
        cli._non_negative: st.integers(0, 2**63),
        cli._bytes: st.integers(1, 2**63),
        cli._swap_bytes: st.integers(0, MAX_SWAP_BYTES),
        cli._shards: st.integers(1, MAX_SHARDS),
        cli._shard_index: st.integers(0, MAX_SHARDS - 1),
        cli._probability: st.floats(0.0, 1.0),
        cli._share: st.floats(0.0, 1.0, exclude_min=True),
        cli._seconds: _SECONDS,
        cli._bool: st.booleans(),
        cli._file: st.sampled_from(["", *files]),
        cli._mthp_sizes: st.dictionaries(st.sampled_from(THP_ORDERS), st.sampled_from(THP_ORDER_POLICIES))
        .map(format_mthp_sizes),
        "protocol": st.sampled_from(list(PROTOCOLS)),
        "thp": st.sampled_from(THP_POLICIES),
        "log_format": st.sampled_from(["auto", "json", "console"]),
        "log_level": st.sampled_from(["debug", "info", "warning", "error"]),
    }


def configs(files: list[str]) -> st.SearchStrategy[ServerConfig]:
    """Any configuration the parser can give: each field default or drawn from its value space."""
    values = _values(files)
    fields = {dest: st.one_of(st.just(getattr(ServerConfig(), dest)), values[dest if conv is str else conv])
              for _, _, dest, conv, _ in cli.SERVE_FLAGS}
    return st.builds(ServerConfig, supervised=st.booleans(), **fields)


def test_every_setting_has_a_flag() -> None:
    flagged = {dest for _, _, dest, _, _ in cli.SERVE_FLAGS} | {"supervised"}
    assert {f.name for f in dataclasses.fields(ServerConfig)} == flagged


def test_the_default_configuration_is_no_flags() -> None:
    assert cli.serve_argv(ServerConfig()) == []
    assert parse([]) == ServerConfig()


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_configuration_is_read_back_the_same(files: list[str], data: st.DataObject) -> None:
    config = data.draw(configs(files))
    argv = cli.serve_argv(config)
    assert parse(argv) == config, argv
    assert len(argv) == sum(getattr(config, f.name) != f.default for f in dataclasses.fields(ServerConfig))


@pytest.mark.parametrize(("changes", "argv"), [
    ({"peers": ("127.0.0.1:7077", "[::1]:7078", "h:0")}, ["--peers=127.0.0.1:7077,[::1]:7078,h:0"]),
    ({"peers": ("10.0.0.1:1",)}, ["--peers=10.0.0.1:1"]),
    ({"insecure": True, "supervised": True}, ["--insecure=true", "--supervised"]),
    ({"detectors": False}, ["--detectors=false"]),
    ({"swap_bytes": 0}, ["--swap-bytes=0"]),
    ({"swap_bytes": MAX_SWAP_BYTES, "max_memory": 1 << 30}, ["--max-memory=1073741824", "--swap-bytes=68719476736"]),
    ({"max_memory": 512 << 20, "max_request_bytes": 3 << 40}, ["--max-request-bytes=3298534883328",
                                                                "--max-memory=536870912"]),
    ({"preempt": 0.1 + 0.2, "grace": 1e-7, "audit_share": 5e-324},
     ["--preempt=0.30000000000000004", "--audit-share=5e-324", "--grace=1e-07"]),
    ({"max_connection_age": 1e300, "seed": -3}, ["--seed=-3", "--max-connection-age=1e+300"]),
    ({"metrics_listen": "127.0.0.1:0", "listen": "-h:1"}, ["--listen=-h:1", "--metrics-listen=127.0.0.1:0"]),
    ({"shards": MAX_SHARDS, "shard_index": MAX_SHARDS - 1, "generation": 1 << 62},
     [f"--shards={MAX_SHARDS}", f"--shard-index={MAX_SHARDS - 1}", f"--generation={1 << 62}"]),
    ({"protocol": "no-recheck", "log_level": "debug"}, ["--protocol=no-recheck", "--log-level=debug"]),
    ({"thp": "always", "mthp_sizes": "64K:always,2M", "thp_zero_page": False},
     ["--thp=always", "--mthp-sizes=64K:always,2M", "--thp-zero-page=false"]),
    ({"mthp_sizes": ""}, ["--mthp-sizes="]),
])
def test_examples(changes: dict[str, object], argv: list[str]) -> None:
    config = dataclasses.replace(ServerConfig(), **changes)  # type: ignore[arg-type]
    assert cli.serve_argv(config) == argv
    assert parse(argv) == config


@pytest.mark.parametrize(("raw", "swap_bytes"), [
    ("0", 0), ("0G", 0), ("00", 0), ("512M", 512 << 20), ("4096", 4096), ("64G", MAX_SWAP_BYTES), ("1GiB", 1 << 30),
])
def test_swap_bytes_takes_the_size_syntax_and_zero(raw: str, swap_bytes: int) -> None:
    assert parse(["--swap-bytes", raw]).swap_bytes == swap_bytes
    assert parse([], {"MMSIM_SWAP_BYTES": raw}).swap_bytes == swap_bytes
    assert parse([]).swap_bytes == 1 << 30


@pytest.mark.parametrize(("raw", "mthp_sizes", "orders"), [
    ("2M", "2M", {9: "inherit"}),
    ("2M,64K:always", "64K:always,2M", {4: "always", 9: "inherit"}),
    (" 64kB : madvise , 2048kB:never ", "64K:madvise", {4: "madvise", 9: "never"}),
    ("16K:inherit,1M:always", "16K,1M:always", {2: "inherit", 8: "always"}),
    ("2M:never", "", {9: "never"}),
])
def test_mthp_sizes_take_size_or_size_policy(raw: str, mthp_sizes: str, orders: dict[int, str]) -> None:
    """Each SIZE or SIZE:POLICY (a bare size inherits --thp), written back by size, sizes that are
    never left out; from the flag and from MMSIM_MTHP_SIZES alike."""
    assert parse(["--mthp-sizes", raw]).mthp_sizes == mthp_sizes
    assert parse([], {"MMSIM_MTHP_SIZES": raw}).mthp_sizes == mthp_sizes
    assert parse_mthp_sizes(raw) == orders
    assert parse_mthp_sizes(mthp_sizes) == {o: p for o, p in orders.items() if p != "never"}


def test_thp_settings_default_and_from_the_environment() -> None:
    default = parse([])
    assert (default.thp, default.mthp_sizes, default.thp_zero_page) == ("madvise", "2M", True)
    env = parse([], {"MMSIM_THP": "always", "MMSIM_MTHP_SIZES": "64K", "MMSIM_THP_ZERO_PAGE": "off"})
    assert (env.thp, env.mthp_sizes, env.thp_zero_page) == ("always", "64K", False)
    flags = parse(["--thp", "never", "--thp-zero-page", "on"], {"MMSIM_THP": "always", "MMSIM_THP_ZERO_PAGE": "off"})
    assert (flags.thp, flags.thp_zero_page) == ("never", True)


def test_files_whose_names_look_like_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("-token", "--tls-cert", ""):
        if name:
            Path(name).write_text("x")
        config = ServerConfig(token_file=name, tls_cert=name)
        assert parse(cli.serve_argv(config)) == config


def test_flags_override_the_environment_in_the_argv_too() -> None:
    """A value written out is the flag's, whatever the environment says."""
    env = {"MMSIM_SEED": "not a number", "MMSIM_PROTOCOL": "folio-lock", "MMSIM_MAX_MEMORY": "1G"}
    config = ServerConfig(seed=7, protocol="no-recheck", max_memory=2 << 30)
    assert parse(cli.serve_argv(config), env) == config


# -- the supervisor's shards


def test_a_shard_runs_the_supervisors_configuration_but_its_own_place() -> None:
    config = parse(["--shards", "3", "--listen", "127.0.0.1:7000", "--metrics-listen", "127.0.0.1:9000",
                    "--protocol", "folio-lock", "--max-memory", "1G", "--swap-bytes", "0", "--detectors", "false",
                    "--thp", "always", "--mthp-sizes", "2M,64K:madvise", "--thp-zero-page", "off",
                    "--grace", "2.5", "--insecure"])
    sup = Supervisor(config)
    for shard in sup.shards:
        cmd = sup.command(shard, 12345)
        assert cmd[:4] == [sys.executable, "-m", "mmsim.server", "serve"]
        got = parse(cmd[4:], shard_environment())
        assert got == dataclasses.replace(
            config, shards=1, shard_index=shard.index, listen=f"127.0.0.1:{7000 + shard.index}",
            metrics_listen=f"127.0.0.1:{9000 + shard.index}", generation=12345, supervised=True)


def test_settings_from_the_environment_reach_the_shards_as_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMSIM_PROTOCOL", "no-recheck")  # taken by the supervisor
    monkeypatch.setenv("MMSIM_METRICS_LISTEN", "127.0.0.1:9000")  # overridden on its command line
    monkeypatch.setenv("MMSIM_SHARDS", "2")
    monkeypatch.setenv("MMSIM_ADDR", "127.0.0.1:1")  # not a setting of mmsim serve: kept
    config = cli.serve_config(cli.build_parser().parse_args(["serve", "--metrics-listen="]))
    assert (config.shards, config.protocol, config.metrics_listen) == (2, "no-recheck", "")
    env = shard_environment()
    assert not CONFIG_VARS & env.keys() and env["MMSIM_ADDR"] == "127.0.0.1:1"
    sup = Supervisor(config)
    shard = parse(sup.command(sup.shards[1], 1)[4:], env)
    assert (shard.shards, shard.shard_index, shard.protocol, shard.metrics_listen) == (1, 1, "no-recheck", "")


def test_a_real_supervisor_passes_its_environment_on_through_the_configuration() -> None:
    """Two shards (MMSIM_SHARDS, not their own supervisors), under MMSIM_PROTOCOL, without the
    metrics endpoint that MMSIM_METRICS_LISTEN asks for and the command line turns off."""
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
    env |= {"MMSIM_SHARDS": "2", "MMSIM_PROTOCOL": "no-recheck", "MMSIM_METRICS_LISTEN": "127.0.0.1:0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmsim.server", "serve", "--listen", "127.0.0.1:0", "--metrics-listen=",
         "--log-format", "json", "--access-log-sample", "0"],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    assert proc.stderr is not None
    try:
        serving = []
        while True:
            line = proc.stderr.readline()
            assert line, f"the supervisor exited {proc.wait(60)} before it served"
            event = json.loads(line) if line.startswith("{") else {}
            if event.get("event") == "serving":
                serving.append(event)
                if "shards" in event:
                    break
        *shards, supervisor = serving
        assert len(supervisor["shards"]) == 2 and supervisor["metrics"] == []
        assert sorted(e["shard"] for e in shards) == [0, 1]
        assert all(e["protocol"] == "no-recheck" and "metrics" not in e for e in shards), shards
        proc.send_signal(signal.SIGTERM)
        proc.stderr.read()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
