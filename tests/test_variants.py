"""User-written protocol variants (``FILE.py:NAME``): the examples in examples/variants behave as
documented, and ``--variant`` works, or fails with one line and status 2, on explore, race, mutate
and serve."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

import pytest
from servers import mmsim_serve

from mmsim.client import Client
from mmsim.server import app, cli
from mmsim.server.app import ServerConfig
from mmsim.server.cli import main
from mmsim.server.mm.steps import STEPS
from mmsim.server.supervisor import Supervisor, shard_environment
from mmsim.server.tools.explore import explore
from mmsim.server.tools.litmus import load
from mmsim.server.tools.mutate import mutation_score
from mmsim.server.tools.race import run_race

ROOT = Path(__file__).resolve().parent.parent
LITMUS = ROOT / "tests" / "litmus"
EXAMPLE = f"{ROOT / 'examples' / 'variants' / 'folio_lock.py'}:FOLIO_LOCK"
BROKEN = f"{ROOT / 'examples' / 'variants' / 'broken.py'}:BROKEN"
SCENARIOS = sorted(LITMUS.glob("*.litmus"))

#: A user's mutant of recheck: 6.18's folio_lock_anon_vma_read without the fast path's recheck.
USER_MUTANT = '''
from mmsim.server.mm.steps import Variant
from mmsim.server.mm.variants import flavr_recheck_slow_only

NO_FAST_RECHECK = Variant(
    "user-no-fast-recheck", "the trylock fast path trusts the mapping it read",
    {"folio_lock_anon_vma_read": flavr_recheck_slow_only}, applies_to=("recheck",),
)
'''


@pytest.fixture
def user_files(tmp_path: Path) -> Path:
    """A user mutant, a variant replacing an unknown step, and a file that raises on import."""
    (tmp_path / "mutant.py").write_text(USER_MUTANT)
    (tmp_path / "unknown_step.py").write_text(
        "from mmsim.server.mm.steps import Variant\n\n\nasync def f() -> None:\n    pass\n\n\n"
        "V = Variant('v', 'replaces a step that does not exist', {'folio_walk': f})\n"
    )
    (tmp_path / "raises.py").write_text("import math\n\nX = math.sqrt(-1)\n")
    (tmp_path / "foreign.py").write_text(USER_MUTANT.replace('applies_to=("recheck",)', 'applies_to=("mine",)'))
    (tmp_path / "litmus").mkdir()
    (tmp_path / "litmus" / "fast-path-race.litmus").write_text((LITMUS / "fast-path-race.litmus").read_text())
    return tmp_path


# -- the folio-lock example is the built-in folio-lock


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_the_folio_lock_example_explores_as_the_built_in_one(path: Path) -> None:
    scn = load(path)
    built_in, example = (explore(scn, protocol, strategy="exhaustive", preemptions=3, schedules=2000,
                                 stop_on_catch=False) for protocol in ("folio-lock", EXAMPLE))
    assert (example.first is None) == (built_in.first is None)
    assert (example.first and example.first.kinds) == (built_in.first and built_in.first.kinds)
    assert (example.schedules, example.cut) == (built_in.schedules, built_in.cut)
    assert example.interleavings == built_in.interleavings and len(example.interleavings) > 1


@pytest.mark.parametrize("workload", ["seed", "gc"])
def test_the_folio_lock_example_races_as_the_built_in_one(workload: str) -> None:
    for seed in range(3):
        built_in, example = (run_race(p, seed, workload) for p in ("folio-lock", EXAMPLE))
        assert example.signature == built_in.signature and example.signature
        assert (example.violations, example.problems, example.contended) == \
            (built_in.violations, built_in.problems, built_in.contended)
        assert example.protocol == EXAMPLE


# -- the broken example is caught


@pytest.mark.violations_expected
def test_explore_catches_the_broken_example(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("COLUMNS", "1000")  # titles on one line
    scenario = "tests/litmus/fast-path-race.litmus"
    assert main(["explore", scenario, "--variant", "examples/variants/broken.py:BROKEN"]) == 1
    out = capsys.readouterr().out
    assert "fast-path-race under folio-lock-trylock-fallback (examples/variants/broken.py:BROKEN): caught" in out
    assert "violation wrong-root-walk" in out
    # The replay token names the file by its absolute path: it replays from anywhere.
    token = out.strip().splitlines()[-1].split()[-1]
    monkeypatch.chdir(tmp_path)
    assert main(["explore", "--replay", token]) == 1
    assert "under folio-lock-trylock-fallback" in capsys.readouterr().out
    # The same scenario is clean under the change done right, built in and as the example.
    monkeypatch.chdir(ROOT)
    for protocol in ("folio-lock", EXAMPLE):
        assert explore(load(ROOT / scenario), protocol, strategy="exhaustive").first is None
    assert main(["explore", scenario, "--variant", "examples/variants/folio_lock.py:FOLIO_LOCK"]) == 0
    assert "folio-lock-example (examples/variants/folio_lock.py:FOLIO_LOCK)" in capsys.readouterr().out


@pytest.mark.violations_expected
def test_explore_applies_a_user_mutant_to_its_first_protocol(user_files: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # titles on one line
    spec = f"{user_files / 'mutant.py'}:NO_FAST_RECHECK"
    assert main(["explore", str(LITMUS / "fast-path-race.litmus"), "--variant", spec]) == 1
    out = capsys.readouterr().out
    assert f"fast-path-race under recheck + user-no-fast-recheck ({spec}): caught" in out
    assert "violation wrong-root-walk" in out


# -- mutate and race


@pytest.mark.violations_expected
def test_mutate_scores_a_user_mutant_with_the_built_in_ones(user_files: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    spec = f"{user_files / 'mutant.py'}:NO_FAST_RECHECK"
    litmus = str(user_files / "litmus")
    assert main(["mutate", "--litmus", litmus, "--variant", spec, "--schedules", "100"]) == 1  # built-ins survive
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if line.startswith("│")}
    assert "no-recheck-fast" in rows and "fast-path-race" in rows["no-recheck-fast"]
    assert "fast-path-race" in rows["user-no-fast-recheck"] and "wrong-root-walk" in rows["user-no-fast-recheck"]
    kills, _ = mutation_score([load(LITMUS / "fast-path-race.litmus")], schedules=100, extra=[spec])
    mine = kills[-1]
    assert (mine.mutant, mine.killed, mine.protocol, mine.protocols) == \
        ("user-no-fast-recheck", True, "recheck", ("recheck",))


def test_race_runs_a_user_protocol(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["race", "--protocol", "folio-lock", "--variant", EXAMPLE, "--seeds", "3"]) == 0
    rows = [line.split("│")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    assert [[c.strip() for c in r][:3] for r in rows] == [["folio-lock", "0", "0"], ["folio-lock-example", "0", "0"]]
    assert rows[0][1:] == rows[1][1:]  # the same figures


@pytest.mark.violations_expected
def test_race_fails_when_a_user_protocol_is_caught(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["race", "--protocol", "recheck", "--variant", BROKEN, "--seeds", "5"]) == 1
    rows = {line.split("│")[1].strip(): line for line in capsys.readouterr().out.splitlines() if line.startswith("│")}
    assert int(rows["folio-lock-trylock-fallback"].split("│")[2]) > 0


# -- serve


def _parse(argv: Sequence[str], env: dict[str, str] | None = None) -> ServerConfig:
    """The configuration ``mmsim serve ARGV`` runs with under ``env`` (no MMSIM_* variable by default)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MMSIM_")} | (env or {})
    with mock.patch.dict(os.environ, environ, clear=True):
        return cli.serve_config(cli.build_parser().parse_args(["serve", *argv]))


def test_serve_takes_the_variant_as_its_protocol_and_gives_it_to_its_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    config = _parse(["--variant", "examples/variants/folio_lock.py:FOLIO_LOCK", "--shards", "2"])
    assert config.protocol == EXAMPLE  # the file made absolute
    assert _parse(["--shards", "2"], {"MMSIM_VARIANT": EXAMPLE}) == config
    assert _parse(["--protocol", "no-recheck"], {"MMSIM_VARIANT": EXAMPLE}).protocol == "no-recheck"
    assert _parse(["--variant", EXAMPLE], {"MMSIM_PROTOCOL": "no-recheck"}).protocol == EXAMPLE
    sup = Supervisor(config)
    for shard in sup.shards:
        argv = sup.command(shard, 1)[4:]
        assert f"--variant={EXAMPLE}" in argv and not any(a.startswith("--protocol") for a in argv)
        assert _parse(argv, shard_environment()).protocol == EXAMPLE


def test_served_shards_run_the_variant() -> None:
    async def protocols(addresses: Sequence[str]) -> list[str]:
        async with Client(addresses[0]) as c:
            return [await c.protocol(target=a) for a in addresses]

    with mmsim_serve("--variant", EXAMPLE, "--shards", "2") as server:
        assert asyncio.run(protocols(server.addresses)) == ["folio-lock-example"] * 2


# -- bad variants


def _bad_cases(files: Path) -> list[tuple[str, list[str], str, str]]:
    """(command, its other arguments, a bad --variant, what stderr says): each command's bad values."""
    mutant = f"{files / 'mutant.py'}:NO_FAST_RECHECK"
    foreign = f"{files / 'foreign.py'}:NO_FAST_RECHECK"  # a mutant of a protocol that is not built in
    scenario = str(files / "litmus" / "fast-path-race.litmus")
    args = {
        "explore": [scenario],
        "race": ["--seeds", "1"],
        "mutate": ["--litmus", str(files / "litmus")],
        "serve": ["--listen", "127.0.0.1:0"],
    }
    common = [
        (f"{files / 'none.py'}:X", "no such variant file"),
        (f"{EXAMPLE.rpartition(':')[0]}:NOPE", "has no variant NOPE; it defines FOLIO_LOCK"),
        (f"{files / 'unknown_step.py'}:V", "replaces unknown step 'folio_walk'"),
        (f"{files / 'raises.py'}:X", "raised ValueError: math domain error (line 3)"),
        ("no-such-thing", "is not FILE.py:NAME, nor a built-in protocol or mutant"),
    ]
    return [(cmd, rest, spec, why) for cmd, rest in args.items() for spec, why in common] + [
        ("race", args["race"], mutant, "'user-no-fast-recheck' is a mutant (it applies to recheck), not a protocol"),
        ("serve", args["serve"], mutant, "'user-no-fast-recheck' is a mutant (it applies to recheck), not a protocol"),
        ("mutate", args["mutate"], EXAMPLE, "'folio-lock-example' is a protocol, not a mutant"),
        ("explore", [scenario, "--protocol", "folio-lock"], mutant, "applies to recheck, not 'folio-lock'"),
        ("explore", [scenario, "--protocol", "folio-lock"], EXAMPLE, "give --protocol or --variant, not both"),
        ("explore", [scenario, "--mutant", "no-recheck-fast"], mutant, "give --mutant or --variant, not both"),
        ("explore", [scenario], foreign, "applies to mine: give one of them that is a built-in protocol"),
        ("mutate", args["mutate"], foreign, "applies to 'mine', not a built-in protocol"),
    ]


def test_a_bad_variant_is_one_line_and_status_2(user_files: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def listens(*args: object) -> None:
        raise AssertionError("mmsim serve started with a bad --variant")

    monkeypatch.setattr(app, "serve", listens)
    monkeypatch.setattr(Supervisor, "__init__", listens)
    for command, rest, spec, why in _bad_cases(user_files):
        assert main([command, *rest, "--variant", spec]) == 2, (command, spec)
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1, (command, spec, err)
        assert err.startswith(f"mmsim {command}: --variant {spec}: ") and why in err, (command, spec, err)


def test_serve_with_both_protocol_and_variant_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["serve", "--protocol", "recheck", "--variant", EXAMPLE])
    assert e.value.code == 2
    assert capsys.readouterr().err == "mmsim serve: error: give --protocol or --variant, not both\n"


# -- the documentation


def test_the_documented_steps_are_the_steps() -> None:
    text = (ROOT / "docs" / "variants.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)\.py` \| (.*?) \| (.*?) \|$", text, re.M)
    assert [(s.name, s.module, s.expects, s.takes) for s in STEPS.values()] == rows
