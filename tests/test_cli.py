"""The mmsim command."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mmsim.server import cli
from mmsim.server.cli import SERVE_FLAGS, main

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.violations_expected  # the no-recheck rows
def test_race_command_reports_and_passes_for_safe_protocols(capsys) -> None:
    assert main(["race", "--seeds", "20", "--protocol", "recheck", "--protocol", "no-recheck"]) == 3  # known only
    out = capsys.readouterr().out
    assert "recheck" in out and "no-recheck" in out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 5}
    assert rows["recheck"].split("│")[2].strip() == "0"  # no seed caught
    assert int(rows["no-recheck"].split("│")[2].strip()) > 0


def _usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``mmsim argv``, which must fail as bad usage; its one line of stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err and "usage:" not in err
    return err.rstrip("\n")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["race", "--preempt", "2"], "mmsim race: error: argument --preempt: must be within [0, 1]"),
        (["race", "--preempt", "-0.5"], "mmsim race: error: argument --preempt: must be within [0, 1]"),
        (["race", "--preempt", "often"], "mmsim race: error: argument --preempt: expected a number, got 'often'"),
        (["race", "--seeds", "0"], "mmsim race: error: argument --seeds: must be positive"),
        (["race", "--seeds", "-5"], "mmsim race: error: argument --seeds: must be positive"),
        (["race", "--seeds", "many"], "mmsim race: error: argument --seeds: expected an integer, got 'many'"),
        (["race", "--protocol", "rcu"], "mmsim race: error: argument --protocol: invalid choice: 'rcu'"),
        (["serve", "--grace", "-1"], "mmsim serve: error: argument --grace: must not be negative"),
        (["serve", "--grace", "inf"], "mmsim serve: error: argument --grace: expected a finite number, got 'inf'"),
        (["serve", "--preempt", "nan"], "mmsim serve: error: argument --preempt: expected a finite number, got 'nan'"),
        (["serve", "--listen", "7077"], "mmsim serve: error: argument --listen: expected HOST:PORT, got '7077'"),
        (["serve", "--listen", "h:70000"], "mmsim serve: error: argument --listen: expected HOST:PORT, got 'h:70000'"),
        (["serve", "--max-pages", "0"], "mmsim serve: error: argument --max-pages: must be positive"),
        (["serve", "--swap-bytes", "65G"], "mmsim serve: error: argument --swap-bytes: at most 68719476736 (64G)"),
        (["serve", "--swap-bytes", "-1"],
         "mmsim serve: error: argument --swap-bytes: expected a size such as 4294967296, 512M or 4G"),
        (["serve", "--thp", "sometimes"], "mmsim serve: error: argument --thp: invalid choice: 'sometimes'"),
        (["serve", "--mthp-sizes", "48K"],
         "mmsim serve: error: argument --mthp-sizes: not a THP size: '48K' (a power of two from 16K to 2M)"),
        (["serve", "--mthp-sizes", "8K"],
         "mmsim serve: error: argument --mthp-sizes: not a THP size: '8K' (a power of two from 16K to 2M)"),
        (["serve", "--mthp-sizes", "64K:on"], "mmsim serve: error: argument --mthp-sizes: 64K: the policy must be "
         "one of always, inherit, madvise, never, not 'on'"),
        (["serve", "--mthp-sizes", "2M,64K,2048kB:always"],
         "mmsim serve: error: argument --mthp-sizes: 2M is given twice"),
        (["serve", "--mthp-sizes", "2M,,64K"],
         "mmsim serve: error: argument --mthp-sizes: expected SIZE or SIZE:POLICY, got ''"),
        (["serve", "--thp-zero-page", "maybe"],
         "mmsim serve: error: argument --thp-zero-page: expected true or false, got 'maybe'"),
        (["serve", "--detectors", "maybe"],
         "mmsim serve: error: argument --detectors: expected true or false, got 'maybe'"),
        (["serve", "--log-level", "verbose"], "mmsim serve: error: argument --log-level: invalid choice: 'verbose'"),
        (["serve", "--access-log-sample", "1.5"],
         "mmsim serve: error: argument --access-log-sample: must be within [0, 1]"),
        (["serve", "--no-such-flag"], "mmsim: error: unrecognized arguments: --no-such-flag"),
        (["conformance", "--random", "-1"], "mmsim conformance: error: argument --random: must not be negative"),
        (["conformance", "--step-timeout", "-1"],
         "mmsim conformance: error: argument --step-timeout: must not be negative"),
        ([], "mmsim: error: the following arguments are required: command"),
    ],
)
def test_bad_flag_values_are_one_line_and_status_2(capsys, argv: list[str], message: str) -> None:
    assert _usage_error(capsys, argv).startswith(message)


#: A bad value for each kind of serve flag, by its converter.
BAD_ENV = {cli._listen: "7077", cli._probability: "2", cli._int: "x", cli._bool: "maybe",
           cli._positive: "0", cli._seconds: "-1", cli._bytes: "4Q", str: "bogus", cli._shards: "1001",
           cli._shard_index: "-1", cli._addresses: "a,b", cli._non_negative: "-2", cli._listen_or_off: "x",
           cli._file: "/no/such/file", cli._share: "0", cli._swap_bytes: "65G", cli._mthp_sizes: "48K"}


@pytest.mark.parametrize("flag", SERVE_FLAGS, ids=[f[1] for f in SERVE_FLAGS])
def test_bad_environment_variables_are_one_line_and_status_2(capsys, monkeypatch, flag) -> None:
    _, env, _, conv, _ = flag
    monkeypatch.setenv(env, BAD_ENV[conv])
    assert _usage_error(capsys, ["serve"]).startswith(f"mmsim serve: error: environment variable {env}: ")


def test_a_flag_overrides_a_bad_environment_variable_and_other_commands_ignore_it(capsys, monkeypatch) -> None:
    monkeypatch.setenv("MMSIM_PROTOCOL", "rcu")
    assert _usage_error(capsys, ["race", "--seeds", "1"]).startswith(
        "mmsim race: error: environment variable MMSIM_PROTOCOL: invalid choice: 'rcu'"
    )
    monkeypatch.setenv("MMSIM_GRACE", "-1")  # serve's, not the race's
    assert main(["race", "--seeds", "1", "--protocol", "recheck"]) == 0
    assert "recheck" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["serve", "race", "conformance"])
def test_help_lists_the_exit_statuses(capsys, command: str) -> None:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    statuses = out.split("exit status:\n", 1)[1].splitlines()
    assert statuses[0].startswith("  0  ") and any(s.startswith("  1  ") for s in statuses)
    assert any(s.startswith("  2  bad usage") for s in statuses)
    if command == "conformance":
        assert "  3  the kernel oracle is unavailable" in out
        assert f"  {cli.EXIT_UNREACHABLE}  the mmsim server could not be reached" in out
    if command == "serve":
        assert "  1  could not start: cannot listen" in out
        assert "--access-log-sample FRACTION" in out and "[MMSIM_ACCESS_LOG_SAMPLE]" in out


def _mmsim(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mmsim.server", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_bad_value_in_a_real_process_is_one_line_without_traceback() -> None:
    r = _mmsim("race", "--preempt", "2")
    assert r.returncode == 2
    assert r.stderr == "mmsim race: error: argument --preempt: must be within [0, 1]\n"


def test_conformance_against_an_unreachable_server_exits_4_with_one_line() -> None:
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = _mmsim("conformance", "tests/conformance", "--server", f"127.0.0.1:{port}")
    assert r.returncode == cli.EXIT_UNREACHABLE == 4, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"mmsim conformance: cannot reach the mmsim server at 127.0.0.1:{port}: UNAVAILABLE")


def _make(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("HOST", "PORT", "MAKEFLAGS", "MFLAGS")}
    r = subprocess.run(["make", "--no-print-directory", *args], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_make_help_lists_every_target_with_one_line() -> None:
    lines = _make("help").splitlines()
    listed = {line.split()[0]: line for line in lines}
    assert {"test", "run", "bench", "proto", "clean", "help"} <= set(listed)
    assert len(lines) == len(listed) and all(len(line.split()) > 1 for line in lines)


def test_make_run_takes_host_and_port() -> None:
    assert _make("-n", "run", "PORT=7080").splitlines()[-1].endswith("mmsim serve --listen 127.0.0.1:7080")
    assert _make("-n", "run", "HOST=::1", "PORT=7081").splitlines()[-1].endswith("mmsim serve --listen [::1]:7081")
    assert _make("-n", "run").splitlines()[-1].rstrip().endswith("mmsim serve")  # MMSIM_LISTEN still applies
    assert _make("-n", "run", "ARGS=--shards 2").splitlines()[-1].endswith("mmsim serve --shards 2")


@pytest.mark.parametrize(
    ("raw", "value"), [("4294967296", 1 << 32), ("512M", 512 << 20), ("4G", 4 << 30), ("64KiB", 64 << 10)]
)
def test_max_memory_takes_sizes(raw: str, value: int) -> None:
    args = cli.build_parser().parse_args(["serve", "--max-memory", raw])
    assert args.max_memory == value


@pytest.mark.parametrize("raw", ["0", "-1G", "4Q", "G", "1.5G"])
def test_max_memory_rejects_bad_sizes(capsys, raw: str) -> None:
    assert _usage_error(capsys, ["serve", "--max-memory", raw]).startswith("mmsim serve: error: argument --max-memory")


def test_conformance_random_thp_runs_them_on_both() -> None:
    """``mmsim conformance --random N --thp``: the generated scenarios map aligned regions and ask for
    huge pages; they run on the kernel and on mmsim (or are skipped where the kernel has no THP)."""
    from mmsim.server.tools.conformance.kernel import oracle_unavailable

    if (why := oracle_unavailable()) is not None:
        pytest.skip(why)
    r = _mmsim("conformance", "--random", "2", "--thp", "--seed", "5", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 random scenarios (seed 5) run" in r.stdout
    assert "kernel only" not in r.stdout
    assert "2 of 2 scenarios behave the same on the kernel and on mmsim" in r.stdout or "skipped" in r.stdout
