"""The conformance corpus (tests/conformance/*.json) and the random-scenario generator.

Independent of the kernel: every corpus file loads and validates, the corpus covers every required
category, mmsim satisfies each scenario's own ``expect`` fields, and ``random_scenario`` is
deterministic and generates only valid, runnable scenarios.

Against the kernel (skipped where the oracle is unavailable): the whole corpus and 200 random
scenarios (seed 2026) behave the same on the live kernel and on mmsim.

Swap (``madvise`` pageout and cold, ``pte``): mmsim satisfies each swap scenario's recorded
``expect`` fields (one test per scenario), and runs generated swap scenarios; on the kernel, each
gives its recorded answers when replayed alone, and with swap they run on both sides like the rest
(those that page out are skipped, with the reason, without a usable swap device).

Large folios (THP settings, aligned ``mmap``, hugepage and nohugepage advice): on the kernel,
each scenario gives its recorded ``expect`` fields (skipped, with the reason, where the kernel
cannot run them); on mmsim, each runs on a server started with its THP settings and must satisfy
them too, but those of ``THP_NOT_YET``, strict xfails that must leave the set the day mmsim
passes them. A server whose THP settings are not a scenario's refuses it, with the reason.

Pins (``pin``, ``unpin``): on the kernel, each pin scenario gives its recorded ``expect`` fields;
on mmsim (a server of its THP settings) it must satisfy them too, but those of ``PIN_NOT_YET``,
strict xfails that must leave the set the day mmsim passes them.
"""

from __future__ import annotations

import errno
import io
import itertools
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from mmsim.client import Client
from mmsim.client.testing import serve_in_process
from mmsim.server.tools.conformance.generate import random_scenario
from mmsim.server.tools.conformance.mmsim_runner import MmsimRunner, SettingsMismatch, compare, server_settings
from mmsim.server.tools.conformance.scenario import (
    FIELDS,
    PAGE,
    PMD_SIZE,
    UNRECORDED,
    Scenario,
    StepResult,
    needs_swap,
    uses_pin,
    uses_swap,
    uses_thp,
)
from mmsim.server.tools.conformance.tool import (
    MmsimServers,
    Outcome,
    load_scenarios,
    record,
    render,
    replay_on_kernel,
    run_one,
    shrink,
)

CORPUS = Path(__file__).parent / "conformance"
FILES = sorted(CORPUS.glob("*.json"))
#: The corpus files with pins: each its own test, on the kernel and on mmsim (a server of its THP
#: settings), whatever else they do.
PIN_FILES = [p for p in FILES if uses_pin(Scenario.load(p))]
#: The pin corpus files mmsim does not pass yet, by stem ("5NN-pin-..."): a strict xfail each on
#: mmsim, to be taken out of the set the day mmsim passes it.
PIN_NOT_YET: set[str] = set()
#: The corpus files with large folios: each its own test on mmsim, on a server of its THP settings.
THP_FILES = [p for p in FILES if uses_thp(Scenario.load(p)) and p not in PIN_FILES]
#: The large-folio corpus files mmsim does not pass yet, by stem ("4NN-thp-..."): a strict xfail
#: each on mmsim, to be taken out of the set the day mmsim passes it.
THP_NOT_YET: set[str] = set()
#: The corpus files with swap steps (pageout, cold, pte): each its own test on mmsim.
SWAP_FILES = [p for p in FILES if uses_swap(Scenario.load(p)) and p not in THP_FILES and p not in PIN_FILES]
NAME = re.compile(r"^(\d{2,3})-([a-z]+)(-[a-z0-9]+)*$")

#: Every category the corpus must cover: the word after the number in a file's name, which is
#: also the first word of its description ("einval: ...").
REQUIRED_CATEGORIES = {
    "basic",  # plain moves
    "einval", "enoent", "eexist", "ebusy", "eagain",  # each errno of UFFDIO_MOVE
    "partial",  # partial progress at every position of a 4-page move
    "holes",  # ALLOW_SRC_HOLES
    "zeropage",  # zero-page moves and destinations
    "samevma",  # moves within one VMA, forward and overlapping
    "crossvma",  # ranges crossing into a neighbouring VMA, split and merged again
    "forkchain",  # P -> C -> G with exits in every order
    "cow",  # copy-on-write in parent and child
    "exclusive",  # exclusivity re-established by a write
    "dontfork", "dofork", "wipeonfork", "keeponfork",  # madvise fork flags
    "munmap",  # head, tail, middle (splitting), and moves into the holes
    "childuffd",  # a child registering its own userfaultfd ranges
    "childmove",  # moves in a child's new anon_vma
    "mprotect",  # splits, merges, errors, and accesses to PROT_NONE and read-only pages
    "dontneed",  # MADV_DONTNEED holes, before and after fork
    "mremap",  # shrink, grow in place, MAYMOVE, FIXED, DONTUNMAP, errors, registered ranges
    "copy",  # UFFDIO_COPY: success, EEXIST, ENOENT, EINVAL, partial progress
    "fault",  # faults waiting for the userfaultfd, their events, resolved by COPY/ZEROPAGE/MOVE
    "wake",  # DONTWAKE resolutions and UFFDIO_WAKE
    "swap",  # pageout, cold and the pte observation: swap entries, the swap cache, swap-in
    "thp",  # large folios: PMD THP and mTHP faults, moves, fork, COW, splits, pageout
    "pin",  # FOLL_PIN | FOLL_LONGTERM pins: moves, fork, unsharing, errors, reclaim, THP
}

RANDOM_SEED = 2026
RANDOM_COUNT = 200
#: The kernel runs are split into slices that `pytest -n` can run side by side.
SLICES = 4


def category(path: Path) -> str:
    m = NAME.match(path.stem)
    assert m, f"{path.name}: name must be NN-category-words"
    return m.group(2)


# ---------------------------------------------------------------------------------------------
# The corpus, without the kernel


def test_corpus_size() -> None:
    assert len(FILES) >= 40, f"only {len(FILES)} corpus files"
    numbers = [int(p.name.split("-", 1)[0]) for p in FILES]
    assert len(set(numbers)) == len(numbers), "corpus file numbers must be unique"


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_corpus_file_loads(path: Path) -> None:
    doc = json.loads(path.read_text())
    s = Scenario.load(path)  # validates
    assert s.name == path.stem
    assert s.description and "\n" not in s.description
    assert s.description.split(":")[0] == category(path), "the description starts with the category"
    for i, st in enumerate(doc["steps"]):
        for k in st.get("expect", {}):
            assert k in FIELDS, f"step {i}: unknown expect field {k}"
        # Nothing may block on the kernel: MISSING ranges are only moved into, never touched.
        assert st.get("mode") != "missing" or st["op"] == "uffd_register"


def test_corpus_categories() -> None:
    have = {category(p) for p in FILES}
    assert REQUIRED_CATEGORIES <= have, f"missing categories: {sorted(REQUIRED_CATEGORIES - have)}"
    assert have <= REQUIRED_CATEGORIES, f"unknown categories: {sorted(have - REQUIRED_CATEGORIES)}"


def test_corpus_partial_progress_positions() -> None:
    names = {p.stem.split("-", 1)[1] for p in FILES}
    for k in (1, 2, 3):
        assert f"partial-src-hole-at-{k}" in names
        assert f"partial-dst-populated-at-{k}" in names
    assert sum(1 for n in names if n.startswith("forkchain-exit-")) == 6


async def test_corpus_expectations_on_mmsim() -> None:
    """mmsim alone satisfies every ``expect`` the corpus states (the swap scenarios: one test each,
    below)."""
    failures: list[str] = []
    async with serve_in_process(log_level="error") as addr:
        async with Client(addr) as client:
            for s in load_scenarios([str(CORPUS)]):
                if uses_swap(s) or uses_thp(s) or uses_pin(s):
                    continue
                results = await MmsimRunner(client).run(s)
                for d in compare(s, None, results):
                    failures.append(f"{s.name} step {d.step}: {d.description}: expected {d.kernel}, mmsim {d.mmsim}")
            assert await client.check_invariants() == []
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)


@pytest.mark.parametrize("path", SWAP_FILES, ids=[p.stem for p in SWAP_FILES])
async def test_swap_corpus_on_mmsim(path: Path) -> None:
    """mmsim satisfies every ``expect`` of a scenario with swap steps, leaves no step a note and
    the model sound."""
    s = Scenario.load(path)
    async with serve_in_process(log_level="error") as addr:
        async with Client(addr) as client:
            results = await MmsimRunner(client).run(s)
            assert await client.check_invariants() == []
    assert [r.note for r in results if r.note] == []
    assert [(d.step, d.kernel, d.mmsim) for d in compare(s, None, results)] == []


def _not_yet(path: Path) -> list[pytest.MarkDecorator]:
    """A strict xfail for a large-folio corpus file of THP_NOT_YET, saying what it needs."""
    if path.stem not in THP_NOT_YET:
        return []
    what = path.stem.split("-", 2)[-1].replace("-", " ")
    return [pytest.mark.xfail(strict=True, reason=f"large folios: {what} not modelled yet")]


@pytest.mark.parametrize("path", [pytest.param(p, marks=_not_yet(p)) for p in THP_FILES],
                         ids=[p.stem for p in THP_FILES])
async def test_thp_corpus_on_mmsim(path: Path) -> None:
    """mmsim, started with the scenario's THP settings, satisfies every ``expect`` of a
    large-folio scenario, leaves no step a note and the model sound."""
    s = Scenario.load(path)
    async with serve_in_process(log_level="error", **server_settings(s)) as addr:
        async with Client(addr) as client:
            results = await MmsimRunner(client).run(s)
            assert await client.check_invariants() == []
    assert [r.note for r in results if r.note] == []
    assert [(d.step, d.kernel, d.mmsim) for d in compare(s, None, results)] == []


def test_thp_not_yet_names_large_folio_corpus_files() -> None:
    assert THP_NOT_YET <= {p.stem for p in THP_FILES}


def _pin_not_yet(path: Path) -> list[pytest.MarkDecorator]:
    """A strict xfail for a pin corpus file of PIN_NOT_YET."""
    if path.stem not in PIN_NOT_YET:
        return []
    what = path.stem.split("-", 2)[-1].replace("-", " ")
    return [pytest.mark.xfail(strict=True, reason=f"pins: {what} not modelled yet")]


@pytest.mark.parametrize("path", [pytest.param(p, marks=_pin_not_yet(p)) for p in PIN_FILES],
                         ids=[p.stem for p in PIN_FILES])
async def test_pin_corpus_on_mmsim(path: Path) -> None:
    """mmsim, started with the scenario's THP settings, satisfies every ``expect`` of a pin
    scenario, leaves no step a note and the model sound."""
    s = Scenario.load(path)
    async with serve_in_process(log_level="error", **server_settings(s)) as addr:
        async with Client(addr) as client:
            results = await MmsimRunner(client).run(s)
            assert await client.check_invariants() == []
    assert [r.note for r in results if r.note] == []
    assert [(d.step, d.kernel, d.mmsim) for d in compare(s, None, results)] == []


def test_pin_not_yet_names_pin_corpus_files() -> None:
    assert PIN_NOT_YET <= {p.stem for p in PIN_FILES}


def test_pin_corpus_is_recorded() -> None:
    """The pin scenarios: at least 15, named 5NN-pin-*, each with a pin, every observing step
    with its recorded ``expect``; together they see a pin succeed and fail (EFAULT), an unpin, a
    move refused for a pin (EBUSY) and cut short by one (EAGAIN), a fork and a THP."""
    pin = [p for p in FILES if category(p) == "pin"]
    assert len(pin) >= 15, f"only {len(pin)} pin scenarios"
    assert set(pin) == set(PIN_FILES)
    assert all(p.name.startswith("5") for p in pin)
    seen: set[tuple[str, int]] = set()
    ops: set[str] = set()
    for p in pin:
        s = Scenario.load(p)
        ops |= {st["op"] for st in s.steps}
        for i, st in enumerate(s.steps):
            if st["op"] not in ("mmap", "fork", "exit"):
                assert "expect" in st, f"{p.name}: step {i} has no expect"
                seen.add((st["op"], st["expect"]["errno"]))
    assert {("pin", 0), ("pin", errno.EFAULT), ("unpin", 0), ("move", errno.EBUSY), ("move", errno.EAGAIN)} <= seen
    assert {"fork", "exit", "pte", "mremap", "munmap", "madvise"} <= ops
    assert any(uses_thp(Scenario.load(p)) for p in pin)


def test_thp_corpus_is_recorded() -> None:
    """The large-folio scenarios: at least 30, named 4NN-thp-*, each a large-folio one, every
    observing step with its recorded ``expect``; together they observe the new ``pte`` fields
    (pmd, head, tail) both ways, the huge zero page and mTHP settings."""
    thp = [p for p in FILES if category(p) == "thp"]
    assert len(thp) >= 30, f"only {len(thp)} thp scenarios"
    assert set(thp) == set(THP_FILES)
    assert all(p.name.startswith("4") for p in thp)
    seen: dict[str, set[Any]] = {}
    settings: list[dict[str, Any]] = []
    for p in thp:
        s = Scenario.load(p)
        if s.thp is not None:
            settings.append(s.thp)
        for i, st in enumerate(s.steps):
            if st["op"] not in ("mmap", "fork", "exit"):
                assert "expect" in st, f"{p.name}: step {i} has no expect"
            if st["op"] == "pte":
                for k, v in st["expect"].items():
                    seen.setdefault(k, set()).add(v)
    for field in ("pmd", "head", "tail", "thp", "zero_page", "exclusive", "anon_exclusive", "swap"):
        assert seen.get(field) == {False, True}, f"{field} is never {({False, True} - seen.get(field, set()))}"
    assert {2, 1, 0} <= seen["mapcount"]
    assert not set(seen) & set(UNRECORDED)
    assert any("mthp" in t for t in settings) and any("enabled" in t for t in settings)


async def test_an_aligned_region_run_alone_starts_on_a_pmd_boundary() -> None:
    """Without the kernel's addresses, an ``mmap`` with ``"align": "pmd"`` maps its region on a
    2 MiB boundary with no slack left around it (mprotect of the page below, or of the one above
    the guard page right above it, is ENOMEM), registered with the userfaultfd exactly (a move
    into it works); a plain region needs no such boundary."""
    aligned = {"op": "mmap", "proc": "P", "region": "a", "pages": 512, "align": "pmd", "uffd": "wp"}
    s = Scenario.from_dict({"name": "t", "steps": [
        aligned,
        {"op": "mmap", "proc": "P", "region": "b", "pages": 3},
        {"op": "mmap", "proc": "P", "region": "c", "pages": 8, "align": "pmd"},
        {"op": "mprotect", "proc": "P", "at": ["a", -1], "pages": 1, "prot": "r"},
        {"op": "mprotect", "proc": "P", "at": ["a", 513], "pages": 1, "prot": "r"},
        {"op": "mprotect", "proc": "P", "at": ["a", 511], "pages": 1, "prot": "r"},
        {"op": "mprotect", "proc": "P", "at": ["c", -1], "pages": 1, "prot": "r"},
        {"op": "mprotect", "proc": "P", "at": ["c", 8], "pages": 1, "prot": "r"},
        {"op": "write", "proc": "P", "at": ["b", 0], "value": 9},
        {"op": "move", "proc": "P", "dst": ["a", 0], "src": ["b", 0], "pages": 1},
        {"op": "peek", "proc": "P", "at": ["a", 0]},
    ]})
    async with serve_in_process(log_level="error") as addr, Client(addr) as client:
        results = await MmsimRunner(client).run(s)
        assert await client.check_invariants() == []
    a, b, c = (results[i].addr for i in range(3))
    assert a is not None and b is not None and c is not None
    assert a % PMD_SIZE == 0 and c % PMD_SIZE == 0
    spans = sorted([(a, a + 512 * PAGE), (b, b + 3 * PAGE), (c, c + 8 * PAGE)])
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
    assert [r.errno for r in results[3:8]] == [errno.ENOMEM, errno.ENOMEM, 0, errno.ENOMEM, errno.ENOMEM]
    assert (results[9].moved, results[10].value) == (PAGE, 9)
    assert [r.note for r in results if r.note] == []


async def test_a_server_with_other_thp_settings_refuses_the_scenario_clearly() -> None:
    """A scenario whose THP settings (over the kernel runner's baseline) are not the server's
    raises SettingsMismatch naming each setting that differs, before it creates any process; on
    a server started with ``server_settings`` it runs."""
    base: list[dict[str, Any]] = [
        {"op": "mmap", "proc": "P", "region": "a", "pages": 512, "align": "pmd"},
        {"op": "write", "proc": "P", "at": ["a", 0], "value": 1},
    ]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"mthp": {"64kB": "always"}}, r"hugepages-64kB always \(the server: never\)"),
        ({"enabled": "always", "use_zero_page": False},
         r"enabled always \(the server: madvise\), use_zero_page 0 \(the server: 1\)"),
        ({"mthp": {"2048kB": "never", "16kB": "madvise"}},
         r"hugepages-16kB madvise \(the server: never\), hugepages-2048kB never \(the server: inherit\)$"),
    ]
    async with serve_in_process(log_level="error") as addr, Client(addr) as client:
        before = (await client.stats())["processes"]
        for thp, what in cases:
            s = Scenario.from_dict({"name": "t", "thp": thp, "steps": base})
            refused = rf"^t: runs under THP settings the server does not have: {what}"
            with pytest.raises(SettingsMismatch, match=refused):
                await MmsimRunner(client).run(s)
        assert (await client.stats())["processes"] == before
        # The baseline's own settings, written out, are the default server's.
        same = {"enabled": "madvise", "use_zero_page": True, "mthp": {"2048kB": "inherit", "64kB": "never"}}
        ok = await MmsimRunner(client).run(Scenario.from_dict({"name": "t", "thp": same, "steps": base}))
        assert [r.errno for r in ok] == [0, 0]
    s = Scenario.from_dict({"name": "t", "thp": {"enabled": "never", "mthp": {"64kB": "always"}}, "steps": base})
    assert server_settings(s) == {"thp": "never", "mthp_sizes": "64K:always,2M", "thp_zero_page": True}
    async with serve_in_process(log_level="error", **server_settings(s)) as addr, Client(addr) as client:
        assert [r.errno for r in await MmsimRunner(client).run(s)] == [0, 0]
    with pytest.raises(SettingsMismatch, match="hugepages-8kB always: mmsim has no large folios of that size"):
        server_settings(Scenario.from_dict({"name": "t", "thp": {"mthp": {"8kB": "always"}}, "steps": base}))
    assert server_settings(Scenario.from_dict({"name": "t", "thp": {"mthp": {"8kB": "never"}}, "steps": base})) == {
        "thp": "madvise", "mthp_sizes": "2M", "thp_zero_page": True}


async def test_one_server_per_distinct_thp_settings() -> None:
    """``MmsimServers`` starts a server for each distinct THP settings the scenarios ask for, the
    first time one needs it, and gives the same one to scenarios with the same settings; given a
    server, it gives that one to every scenario, and run_one skips one whose settings it does not
    have, with the reason, before the kernel runs it."""
    steps: list[dict[str, Any]] = [{"op": "mmap", "proc": "P", "region": "a", "pages": 1}]
    plain = Scenario.from_dict({"name": "plain", "steps": steps})
    baseline = Scenario.from_dict({"name": "baseline", "thp": {"enabled": "madvise"}, "steps": steps})
    mthp = Scenario.from_dict({"name": "mthp", "thp": {"mthp": {"64kB": "always"}}, "steps": steps})
    never = Scenario.from_dict({"name": "never", "thp": {"enabled": "never"}, "steps": steps})
    async with MmsimServers() as servers:
        clients = [await servers.client(s) for s in (plain, baseline, mthp, never, mthp)]
        assert clients[0] is clients[1] and clients[2] is clients[4]
        assert len({id(c) for c in clients}) == 3
        settings = [await c.thp() for c in clients[1:4]]
        assert [(t.enabled, t.policy("64kB")) for t in settings if t is not None] == [
            ("madvise", "never"), ("madvise", "always"), ("never", "never")]

        class NoKernel:
            def run(self, scenario: Scenario) -> list[StepResult]:
                raise AssertionError("the kernel must not run a scenario the server refuses")

        async with MmsimServers(clients[0].targets[0]) as given:
            assert await given.client(mthp) is await given.client(plain)
            outcome = await run_one(mthp, NoKernel(), await given.client(mthp))
    assert outcome.skipped == "runs under THP settings the server does not have: hugepages-64kB always " \
        "(the server: never)"
    assert (outcome.kernel, outcome.mmsim, outcome.differences) == ([], [], [])


@pytest.mark.parametrize(
    ("thp", "error"),
    [
        ([], "must be an object"),
        ({"defrag": "always"}, "unknown keys"),
        ({"enabled": "sometimes"}, "enabled must be one of"),
        ({"use_zero_page": 1}, "use_zero_page must be true or false"),
        ({"mthp": {"48kB": "always"}}, "mthp size '48kB'"),
        ({"mthp": {"4096kB": "always"}}, "mthp size '4096kB'"),
        ({"mthp": {"64kB": "on"}}, "mthp 64kB must be one of"),
        ({"mthp": ["64kB"]}, "mthp must be an object"),
    ],
)
def test_thp_settings_are_validated(thp: Any, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Scenario.from_dict({"name": "t", "thp": thp, "steps": []})


def test_thp_format() -> None:
    """``align`` takes "pmd" only, hugepage and nohugepage are advice, ``thp`` survives a round
    trip, and what makes a scenario a large-folio one."""
    mmap = {"op": "mmap", "proc": "P", "region": "a", "pages": 512}
    with pytest.raises(ValueError, match="align must be one of"):
        Scenario.from_dict({"name": "t", "steps": [{**mmap, "align": "2m"}]})
    s = Scenario.from_dict({"name": "t", "thp": {"enabled": "always", "use_zero_page": False,
                                                  "mthp": {"64kB": "inherit", "2048kB": "never"}}, "steps": [mmap]})
    assert Scenario.from_dict(json.loads(json.dumps(s.to_dict()))).thp == s.thp and uses_thp(s)
    assert not uses_thp(Scenario.from_dict({"name": "t", "steps": [mmap]}))
    for advice in ("hugepage", "nohugepage"):
        assert uses_thp(Scenario.from_dict({"name": "t", "steps": [
            mmap, {"op": "madvise", "proc": "P", "at": ["a", 0], "pages": 1, "advice": advice}]}))
    assert uses_thp(Scenario.from_dict({"name": "t", "steps": [{**mmap, "align": "pmd"}]}))
    assert {"pmd", "head", "tail"} <= set(FIELDS)


def test_swap_corpus_is_recorded() -> None:
    """The swap scenarios: at least 30, each with swap steps, every observing step with its
    recorded ``expect``, and together they observe every ``pte`` field but those recording
    leaves out (UNRECORDED: they depend on the kernel's configuration)."""
    swap = [p for p in FILES if category(p) == "swap"]
    assert len(swap) >= 30, f"only {len(swap)} swap scenarios"
    assert set(swap) <= set(SWAP_FILES)
    assert not set(swap) & set(THP_FILES)
    seen: set[str] = set()
    for p in swap:
        for i, st in enumerate(Scenario.load(p).steps):
            if st["op"] not in ("mmap", "fork", "exit"):
                assert "expect" in st, f"{p.name}: step {i} has no expect"
            if st["op"] == "pte":
                seen |= set(st["expect"])
    assert {"present", "swap", "exclusive", "uffd_wp", "swapcache", "thp", "zero_page", "ksm", "mapcount",
            "anon_exclusive"} <= seen
    assert not seen & set(UNRECORDED)


async def test_mmsim_runner_runs_swap_steps_with_the_kernel_runners_fields() -> None:
    """The mmsim runner runs pageout, cold and ``pte`` steps, and a ``pte`` step reports the
    fields the kernel runner does: the five pagemap bits always; ``swapcache`` too for a swap
    entry; for a present page also ``swapcache``, ``pmd``, ``thp``, ``head``, ``tail``,
    ``zero_page``, ``ksm``, ``mapcount``, and ``anon_exclusive`` unless it is the zero page."""
    s = Scenario.from_dict({"name": "t", "steps": [
        {"op": "mmap", "proc": "P", "region": "a", "pages": 4},
        {"op": "write", "proc": "P", "at": ["a", 0], "value": 7},
        {"op": "pte", "proc": "P", "at": ["a", 0, 8]},  # a byte into the page: the page's entry
        {"op": "madvise", "proc": "P", "at": ["a", 0], "pages": 1, "advice": "pageout"},
        {"op": "pte", "proc": "P", "at": ["a", 0]},
        {"op": "read", "proc": "P", "at": ["a", 1]},
        {"op": "pte", "proc": "P", "at": ["a", 1]},
        {"op": "pte", "proc": "P", "at": ["a", 2]},
        {"op": "madvise", "proc": "P", "at": ["a", 0], "pages": 4, "advice": "cold"},
        {"op": "peek", "proc": "P", "at": ["a", 0]},
        {"op": "read", "proc": "P", "at": ["a", 0]},
    ]})
    async with serve_in_process(log_level="error") as addr:
        async with Client(addr) as client:
            results = await MmsimRunner(client).run(s)
            assert await client.check_invariants() == []
    assert [r.errno for r in results] == [0] * len(s.steps) and [r.note for r in results if r.note] == []
    bits = {"uffd_wp": False, "soft_dirty": results[2].soft_dirty}
    small = {"pmd": False, "head": False, "tail": False}
    assert results[2].compared() == {"errno": 0, "present": True, "swap": False, "exclusive": True, **bits,
                                     "swapcache": False, "thp": False, "zero_page": False, "ksm": False,
                                     "mapcount": 1, "anon_exclusive": True, **small}
    assert results[4].compared() == {"errno": 0, "present": False, "swap": True, "exclusive": False,
                                     "uffd_wp": False, "soft_dirty": results[4].soft_dirty, "swapcache": True}
    zero = results[6].compared()  # the zero page: no anon_exclusive
    assert zero == {"errno": 0, "present": True, "swap": False, "exclusive": False, "uffd_wp": False,
                    "soft_dirty": zero["soft_dirty"], "swapcache": False, "thp": False, "zero_page": True,
                    "ksm": False, "mapcount": 0, **small}
    none = results[7].compared()  # no page: the five pagemap bits only
    assert none.pop("soft_dirty") in (False, True)
    assert none == {"errno": 0, "present": False, "swap": False, "exclusive": False, "uffd_wp": False}
    assert results[9].compared() == {"errno": 0, "present": False}  # still swapped out: a peek does not fault
    assert results[10].value == 7


# ---------------------------------------------------------------------------------------------
# The generator, without the kernel


def check_runnable(s: Scenario) -> None:
    """What the generator promises beyond Scenario.validate."""
    assert 5 <= len(s.steps) <= 30, len(s.steps)
    regions: dict[str, set[str]] = {p: set() for p in s.processes}
    alive = set(s.processes)
    created = set(s.processes)
    mapped = 0
    for i, st in enumerate(s.steps):
        proc = st["proc"]
        assert proc in alive, f"step {i}: {proc} is not alive"
        for key in ("at", "dst", "src"):
            if key in st:
                assert st[key][0] in regions[proc], f"step {i}: region {st[key][0]} does not exist in {proc}"
        if st["op"] == "mmap":
            assert 1 <= st["pages"] <= 8
            assert st.get("uffd") in (None, "wp", "missing")  # "missing": a fault episode's own region
            regions[proc].add(st["region"])
            mapped += st.get("uffd") != "missing"
        elif st["op"] == "mremap" and "region" in st:
            regions[proc].add(st["region"])
        elif st["op"] == "uffd_register":
            assert st["mode"] == "wp"
        elif st["op"] == "fork":
            assert st["child"] not in created
            created.add(st["child"])
            alive.add(st["child"])
            regions[st["child"]] = set(regions[proc])
        elif st["op"] == "exit":
            alive.discard(proc)
    assert alive, "some process stays alive"
    assert 1 <= len(created) <= 3
    assert 2 <= mapped <= 4


def test_random_scenarios_deterministic_and_valid() -> None:
    ops: set[str] = set()
    for seed in range(300):
        a = random_scenario(random.Random(seed), name=f"r{seed}")
        b = random_scenario(random.Random(seed), name=f"r{seed}")
        assert a.to_dict() == b.to_dict(), f"seed {seed} is not deterministic"
        Scenario.from_dict(json.loads(json.dumps(a.to_dict())))  # valid, and survives JSON
        check_runnable(a)
        ops |= {st["op"] for st in a.steps}
    assert ops == {
        "mmap", "munmap", "madvise", "uffd_register", "uffd_unregister", "write", "read", "peek",
        "present", "mapcount", "move", "fork", "exit",
        "mprotect", "mremap", "copy", "zeropage", "wake", "fault", "fault_status", "events",
    }
    # One rng drawn from repeatedly gives the same sequence again.
    r1, r2 = random.Random(7), random.Random(7)
    assert [random_scenario(r1, "x").to_dict() for _ in range(20)] == [
        random_scenario(r2, "x").to_dict() for _ in range(20)
    ]


async def test_random_scenarios_run_on_mmsim() -> None:
    """Generated scenarios run on mmsim without malformed requests and leave the model sound."""
    rng = random.Random(RANDOM_SEED)
    async with serve_in_process(log_level="error") as addr:
        async with Client(addr) as client:
            for n in range(100):
                s = random_scenario(rng, name=f"random-{n}")
                for i, r in enumerate(await MmsimRunner(client).run(s)):
                    assert not r.note, (s.name, i, s.steps[i], r)  # no malformed request, no dead process
            assert await client.check_invariants() == []


async def test_random_swap_scenarios_run_on_mmsim() -> None:
    """Generated scenarios with pageout, cold and ``pte`` steps run on mmsim without malformed
    requests and leave the model sound; their ``pte`` steps report what the kernel runner's do."""
    rng = random.Random(RANDOM_SEED)
    ptes = 0
    async with serve_in_process(log_level="error") as addr:
        async with Client(addr) as client:
            for n in range(60):
                s = random_scenario(rng, name=f"swap-{n}", swap=True)
                for i, r in enumerate(await MmsimRunner(client).run(s)):
                    assert not r.note, (s.name, i, s.steps[i], r)
                    if s.steps[i]["op"] == "pte" and not r.errno:
                        ptes += 1
                        assert r.present is not None and r.swap is not None and r.soft_dirty is not None
                        assert (r.mapcount is not None) == r.present
                        assert (r.swapcache is not None) == (r.present or r.swap)
            assert await client.check_invariants() == []
            stats = await client.stats()
    assert ptes >= 30 and stats["swap_out"] > 0


# ---------------------------------------------------------------------------------------------
# Against the kernel


def _oracle_or_skip() -> Any:
    from mmsim.server.tools.conformance.kernel import KernelRunner, oracle_unavailable

    why = oracle_unavailable()
    if why is not None:
        pytest.skip(f"kernel oracle unavailable: {why}")
    return KernelRunner(step_timeout=5.0)


def _report(bad: list[Outcome], extra: list[str] | None = None) -> str:
    buf = io.StringIO()
    console = Console(file=buf, width=200, force_terminal=False, color_system=None)
    for o in bad:
        render(o, console)
    return f"{len(bad)} scenario(s) differ between the kernel and mmsim:\n" + buf.getvalue() + "\n".join(extra or [])


@pytest.mark.parametrize("part", range(SLICES // 2))
async def test_corpus_on_kernel(part: int) -> None:
    """The corpus behaves the same on the kernel and on mmsim (but the scenarios that page out,
    where the kernel has no usable swap; the large-folio ones run on the kernel alone, below)."""
    from mmsim.server.tools.conformance.kernel import swap_unavailable

    runner = _oracle_or_skip()
    no_swap = swap_unavailable()
    bad: list[Outcome] = []
    async with serve_in_process(log_level="error") as addr:
        async with Client(addr) as client:
            runnable = [
                s for s in load_scenarios([str(CORPUS)])
                if (no_swap is None or not needs_swap(s)) and not uses_thp(s) and not uses_pin(s)
            ]
            for s in runnable[part :: SLICES // 2]:
                outcome = await run_one(s, runner, client)
                if outcome.differences:
                    bad.append(outcome)
    if bad:
        pytest.fail(_report(bad), pytrace=False)


def _swap_or_skip(s: Scenario) -> None:
    from mmsim.server.tools.conformance.kernel import swap_unavailable

    if needs_swap(s) and (why := swap_unavailable()) is not None:
        pytest.skip(f"{s.name} pages out, and swap is unavailable: {why}")


@pytest.mark.parametrize("path", SWAP_FILES, ids=[p.stem for p in SWAP_FILES])
async def test_swap_corpus_on_kernel(path: Path) -> None:
    """A scenario with swap steps gives its recorded answers on the live kernel, replayed there
    alone, with no step left unsettled."""
    runner = _oracle_or_skip()
    s = Scenario.load(path)
    _swap_or_skip(s)
    outcome = await replay_on_kernel(s, runner)
    assert outcome.kernel_only and outcome.mmsim == []
    if outcome.differences:
        pytest.fail(_report([outcome]), pytrace=False)
    assert [(i, r.note) for i, r in enumerate(outcome.kernel) if r.note] == []


def _thp_or_skip(s: Scenario) -> None:
    from mmsim.server.tools.conformance.kernel import thp_unavailable

    if (why := thp_unavailable(s)) is not None:
        pytest.skip(f"{s.name}: transparent hugepages unavailable: {why}")


@pytest.mark.parametrize("path", THP_FILES, ids=[p.stem for p in THP_FILES])
async def test_thp_corpus_on_kernel(path: Path) -> None:
    """A large-folio scenario gives its recorded answers on the live kernel (replayed there
    alone, under its THP settings), with no step left unsettled; a run whose huge page faults fell
    back to small pages for want of memory is skipped, with the reason."""
    runner = _oracle_or_skip()
    s = Scenario.load(path)
    _swap_or_skip(s)
    _thp_or_skip(s)
    outcome = await replay_on_kernel(s, runner)
    assert outcome.kernel_only and outcome.mmsim == []
    if outcome.skipped is not None:
        pytest.skip(outcome.skipped)
    if outcome.differences:
        pytest.fail(_report([outcome]), pytrace=False)
    assert [(i, r.note) for i, r in enumerate(outcome.kernel) if r.note] == []


def _pin_or_skip() -> None:
    from mmsim.server.tools.conformance.kernel import pin_unavailable

    if (why := pin_unavailable()) is not None:
        pytest.skip(f"pins unavailable: {why}")


@pytest.mark.parametrize("path", PIN_FILES, ids=[p.stem for p in PIN_FILES])
async def test_pin_corpus_on_kernel(path: Path) -> None:
    """A pin scenario gives its recorded answers on the live kernel (replayed there alone, under
    its THP settings where it has large folios), with no step left unsettled."""
    runner = _oracle_or_skip()
    _pin_or_skip()
    s = Scenario.load(path)
    _swap_or_skip(s)
    if uses_thp(s):
        _thp_or_skip(s)
    outcome = await replay_on_kernel(s, runner)
    assert outcome.kernel_only and outcome.mmsim == []
    if outcome.skipped is not None:
        pytest.skip(outcome.skipped)
    if outcome.differences:
        pytest.fail(_report([outcome]), pytrace=False)
    assert [(i, r.note) for i, r in enumerate(outcome.kernel) if r.note] == []


@pytest.mark.parametrize("part", range(SLICES))
async def test_random_scenarios_on_kernel(part: int) -> None:
    runner = _oracle_or_skip()
    rng = random.Random(RANDOM_SEED)
    scenarios = [random_scenario(rng, name=f"random-{RANDOM_SEED}-{n}") for n in range(RANDOM_COUNT)]
    bad: list[Outcome] = []
    reproducers: list[str] = []
    async with serve_in_process(log_level="error") as addr:
        async with Client(addr) as client:
            for s in scenarios[part::SLICES]:
                outcome = await run_one(s, runner, client)
                if not outcome.differences:
                    continue
                if len(bad) < 2:  # shrink the first few, to show a minimal reproducer

                    async def fails(c: Scenario) -> bool:
                        return bool((await run_one(c, runner, client)).differences)

                    small = await shrink(s, fails)
                    outcome = await run_one(small, runner, client)
                    reproducers.append(json.dumps(small.to_dict()))
                bad.append(outcome)
    if bad:
        pytest.fail(_report(bad, ["minimal reproducers:", *reproducers]), pytrace=False)


#: Random large-folio scenarios compared on the kernel and on mmsim (each in an aligned region,
#: with hugepage advice, whole-PMD moves and the ``pte`` observation).
RANDOM_THP_COUNT = 60


@pytest.mark.parametrize("part", range(SLICES))
async def test_random_thp_scenarios_on_kernel(part: int) -> None:
    """Random large-folio scenarios give the same answers on the kernel and on mmsim (each on a
    server of its THP settings); a kernel run whose huge page faults fell back to small pages is
    skipped, as are scenarios the kernel's THP support cannot run."""
    from mmsim.server.tools.conformance.kernel import thp_unavailable

    runner = _oracle_or_skip()
    rng = random.Random(RANDOM_SEED)
    scenarios = [random_scenario(rng, name=f"thp-{RANDOM_SEED}-{n}", thp=True) for n in range(RANDOM_THP_COUNT)]
    bad: list[Outcome] = []
    ran = 0
    async with MmsimServers() as servers:
        for s in scenarios[part::SLICES]:
            if thp_unavailable(s) is not None:
                continue
            outcome = await run_one(s, runner, await servers.client(s))
            ran += outcome.skipped is None
            if outcome.differences:
                bad.append(outcome)
    if bad:
        pytest.fail(_report(bad), pytrace=False)
    if not ran:
        pytest.skip("transparent hugepages unavailable for every scenario of this slice")


async def test_shrink_finds_a_one_minimal_reproducer() -> None:
    """The shrinker keeps only the steps a failure needs: here, a move that fails EBUSY."""
    noisy = Scenario.from_dict(
        {
            "name": "noisy-ebusy",
            "processes": ["P"],
            "steps": [
                {"op": "mmap", "proc": "P", "region": "a", "pages": 2},
                {"op": "mmap", "proc": "P", "region": "b", "pages": 2, "uffd": "wp"},
                {"op": "write", "proc": "P", "at": ["a", 1], "value": 5},
                {"op": "read", "proc": "P", "at": ["a", 0]},
                {"op": "write", "proc": "P", "at": ["a", 0], "value": 7},
                {"op": "peek", "proc": "P", "at": ["b", 1]},
                {"op": "fork", "proc": "P", "child": "C"},
                {"op": "mapcount", "proc": "C", "at": ["a", 0]},
                {"op": "move", "proc": "P", "dst": ["b", 0], "src": ["a", 0], "pages": 1},
                {"op": "present", "proc": "P", "at": ["a", 1]},
            ],
        }
    )
    async with serve_in_process(log_level="warning") as addr:
        async with Client(addr) as client:
            runner = MmsimRunner(client)

            async def fails(s: Scenario) -> bool:
                return any(r.errno == errno.EBUSY for r in await runner.run(s))

            assert await fails(noisy)
            small = await shrink(noisy, fails)
    ops = [st["op"] for st in small.steps]
    # mmap a, mmap b, a write to a[0], the fork that shares it, and the move: nothing else.
    assert ops == ["mmap", "mmap", "write", "fork", "move"]
    assert small.steps[2]["at"] == ["a", 0]


def test_command_reports_an_unavailable_oracle_with_its_own_status(monkeypatch, capsys) -> None:
    """Seen as an unprivileged user, the command says why the kernel oracle is unavailable and
    exits 3 (not 0, not 1)."""
    import os

    from mmsim.server.cli import main

    monkeypatch.setattr(os, "geteuid", lambda: 65534)
    corpus = sorted(Path(__file__).parent.joinpath("conformance").glob("*.json"))[0]
    assert main(["conformance", str(corpus)]) == 3
    assert "kernel oracle unavailable: not root" in capsys.readouterr().out


class _ScriptedKernel:
    """Kernel answers given in turn (a stand-in for the oracle's answers only, to test how
    run_one treats a kernel run that disagrees with the next one)."""

    def __init__(self, *answers: list[Any]) -> None:
        self.answers = list(answers)
        self.runs = 0

    def run(self, scenario: Scenario) -> list[Any]:
        self.runs += 1
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def test_fields_that_depend_on_the_kernels_configuration_are_not_compared_between_runs() -> None:
    """soft_dirty (UNRECORDED) may differ between the kernel and mmsim; any other field may not,
    and a scenario's own ``expect`` is still checked."""
    from mmsim.server.tools.conformance.scenario import StepResult

    sc = Scenario.from_dict({"name": "t", "processes": ["P"], "steps": [
        {"op": "mmap", "proc": "P", "region": "a", "pages": 1},
        {"op": "pte", "proc": "P", "at": ["a", 0], "expect": {"present": False}},
    ]})
    kernel = [StepResult(), StepResult(present=False, swap=False, soft_dirty=False)]
    assert compare(sc, kernel, [StepResult(), StepResult(present=False, swap=False, soft_dirty=True)]) == []
    [d] = compare(sc, kernel, [StepResult(), StepResult(present=False, swap=True, soft_dirty=True)])
    assert (d.step, d.kernel["swap"], d.mmsim["swap"]) == (1, False, True)
    [d] = compare(sc, None, [StepResult(), StepResult(present=True)])
    assert d.expected and d.kernel == {"present": False}


async def test_a_difference_counts_only_when_two_kernel_runs_agree() -> None:
    from mmsim.server.tools.conformance.scenario import StepResult

    sc = Scenario.from_dict({"name": "t", "processes": ["P"], "steps": [
        {"op": "mmap", "proc": "P", "region": "a", "pages": 1},
        {"op": "write", "proc": "P", "at": ["a", 0], "value": 3},
        {"op": "peek", "proc": "P", "at": ["a", 0]},
    ]})
    true = [StepResult(addr=0x7F0000000000), StepResult(), StepResult(present=True, value=3)]
    disturbed = [StepResult(addr=0x7F0000000000), StepResult(), StepResult(present=False)]
    async with serve_in_process(log_level="error") as addr:
        async with Client(addr) as client:
            flaky = _ScriptedKernel(disturbed, true, true)
            out = await run_one(sc, flaky, client)
            assert out.differences == [] and flaky.runs == 2
            wrong = _ScriptedKernel(disturbed)  # the kernel says it every time: a real difference
            out = await run_one(sc, wrong, client)
            assert [d.step for d in out.differences] == [2] and wrong.runs == 2


# ---------------------------------------------------------------------------------------------
# The generator's newer operations and fault episodes


_OLD_OPS = {
    "mmap", "munmap", "madvise", "uffd_register", "uffd_unregister", "write", "read", "peek",
    "present", "mapcount", "move", "fork", "exit",
}


def _kinds(st: dict[str, Any]) -> set[str]:
    """What a generated step exercises, finer than its op."""
    op = st["op"]
    if op == "mprotect":
        return {f"mprotect-{st['prot']}"}
    if op == "madvise":
        return {"dontneed"} if st["advice"] == "dontneed" else {"madvise"}
    if op == "mmap":
        return {"mmap-missing"} if st.get("uffd") == "missing" else {"mmap"}
    if op == "mremap":
        flags = st.get("flags", [])
        if not isinstance(flags, list):
            kind = "mremap-bad"
        elif "dontunmap" in flags:
            kind = "mremap-dontunmap" if st["new_pages"] == st["pages"] else "mremap-bad"
        elif "maymove" in flags and st["new_pages"] > st["pages"]:
            kind = "mremap-move"
        else:
            kind = "mremap-shrink" if st["new_pages"] < st["pages"] else "mremap-grow"
        return {kind, "mremap-bound"} if "region" in st else {kind}
    if op == "fault":
        return {"fault-write" if st.get("write") else "fault-read"}
    return {op}


def test_generator_draws_each_new_operation() -> None:
    """Over 200 seeds every new operation (and each variant of it) shows up, the original
    operations stay the majority of the steps with the move the most common one, and most
    scenarios have some new operation."""
    seen: dict[str, int] = {}
    steps = old = with_new = 0
    for seed in range(200):
        s = random_scenario(random.Random(seed), name=f"r{seed}")
        new = False
        for st in s.steps:
            for k in _kinds(st):
                seen[k] = seen.get(k, 0) + 1
            steps += 1
            is_old = bool(_kinds(st) & _OLD_OPS)  # a dontneed or a missing mmap is not
            old += is_old
            new = new or not is_old
        with_new += new
    wanted = {
        "mprotect-none", "mprotect-r", "mprotect-rw", "dontneed", "mremap-shrink", "mremap-grow",
        "mremap-move", "mremap-dontunmap", "mremap-bad", "mremap-bound", "copy", "zeropage", "wake",
        "mmap-missing", "fault-read", "fault-write", "fault_status", "events",
    }
    assert wanted <= set(seen), f"never drawn: {sorted(wanted - set(seen))}"
    assert old / steps > 0.6, f"the original operations are only {old / steps:.0%} of the steps"
    assert max(seen, key=lambda k: seen[k]) == "move"
    assert with_new / 200 > 0.75, f"only {with_new} of 200 scenarios have a new operation"


def _check_episodes(s: Scenario) -> None:
    """The rules of fault episodes (beyond Scenario.validate): "missing" only on the fresh
    region of an episode, faults only there and by its owner, at most MAX_PENDING_FAULTS faults
    per process, nothing else of the owner touches the region, copies never write-protect, and
    no ``events`` step of a process comes right after its ``wake``."""
    from mmsim.server.tools.conformance.scenario import COPY_MODES, MAX_PENDING_FAULTS

    owner: dict[str, str] = {}  # missing region -> the process that mapped it
    faults: dict[str, int] = {}
    last: dict[str, str] = {}  # process -> its previous step's op
    episode_ops = {"fault", "copy", "zeropage", "move", "wake"}
    for i, st in enumerate(s.steps):
        proc, op = st["proc"], st["op"]
        if op == "mmap" and st.get("uffd") == "missing":
            owner[st["region"]] = proc
        if op == "fault":
            assert owner.get(st["at"][0]) == proc, f"step {i}: a fault outside its own episode region"
            faults[proc] = faults.get(proc, 0) + 1
            assert faults[proc] <= MAX_PENDING_FAULTS, f"step {i}: too many faults in {proc}"
        for key in ("at", "dst", "to"):
            if key in st and owner.get(st[key][0]) == proc:
                assert op in episode_ops, f"step {i}: {op} touches the episode region {st[key][0]}"
        if "src" in st:
            assert owner.get(st["src"][0]) != proc, f"step {i}: a move out of an episode region"
        if op in ("copy", "zeropage"):
            mode = st.get("mode", [])
            assert "wp" not in mode if isinstance(mode, list) else not mode & COPY_MODES["wp"], f"step {i}: wp"
        if op == "uffd_register":
            assert st["mode"] == "wp"
        if op == "events":
            assert last.get(proc) != "wake", f"step {i}: events right after a wake"
        last[proc] = op


def test_generator_seed_2026_deterministic_valid_and_episodes_sound() -> None:
    """The 200 scenarios the kernel tests run (seed 2026): drawn twice from one rng they are the
    same, each validates (also after a JSON round trip), is runnable and keeps the rules of
    fault episodes; and so does every scenario shrinking could make from them by removing one
    step, where it still validates."""
    r1, r2 = random.Random(RANDOM_SEED), random.Random(RANDOM_SEED)
    for n in range(RANDOM_COUNT):
        a = random_scenario(r1, name=f"random-{RANDOM_SEED}-{n}")
        b = random_scenario(r2, name=f"random-{RANDOM_SEED}-{n}")
        assert a.to_dict() == b.to_dict(), f"scenario {n} is not deterministic"
        Scenario.from_dict(json.loads(json.dumps(a.to_dict())))
        check_runnable(a)
        _check_episodes(a)
        for i in range(len(a.steps)):
            try:
                cand = Scenario.from_dict({**a.to_dict(), "steps": a.steps[:i] + a.steps[i + 1 :]})
            except ValueError:
                continue
            _check_episodes(cand)


async def test_random_fault_scenarios_agree_twice_on_kernel() -> None:
    """Generated scenarios with fault episodes are settled: two kernel runs give the same
    answers at every step, and no step leaves a note (nothing blocked past its step, every
    region name bound, no helper gone)."""
    runner = _oracle_or_skip()
    rng = random.Random(RANDOM_SEED)
    scenarios = [random_scenario(rng, name=f"random-{RANDOM_SEED}-{n}") for n in range(60)]
    with_faults = [s for s in scenarios if any(st["op"] == "fault" for st in s.steps)][:8]
    assert len(with_faults) == 8
    problems = _disagreements(runner, with_faults)
    assert not problems, "\n".join(problems)


def _disagreements(runner: Any, scenarios: list[Scenario]) -> list[str]:
    """Each step where two kernel runs of a scenario answered differently, or that left a note."""
    problems: list[str] = []
    for s in scenarios:
        first, second = runner.run(s), runner.run(s)
        for i, (a, b) in enumerate(zip(first, second, strict=True)):
            if a.compared() != b.compared():
                problems.append(f"{s.name} step {i} {s.steps[i]}: {a.compared()} then {b.compared()}")
            if a.note:
                problems.append(f"{s.name} step {i} {s.steps[i]}: note {a.note!r}")
    return problems


# ---------------------------------------------------------------------------------------------
# Swap: generated scenarios, the command's kernel-only runs and its record mode


def test_swap_generator_deterministic_valid_and_drawn() -> None:
    """With ``swap=True`` the generator draws pageout, cold and ``pte`` (and every original
    operation still), deterministically, valid and runnable; without it, none of them."""
    drawn: set[str] = set()
    for seed in range(200):
        a = random_scenario(random.Random(seed), name=f"s{seed}", swap=True)
        assert a.to_dict() == random_scenario(random.Random(seed), name=f"s{seed}", swap=True).to_dict()
        Scenario.from_dict(json.loads(json.dumps(a.to_dict())))
        check_runnable(a)
        _check_episodes(a)
        drawn |= {st["op"] if st["op"] != "madvise" else st["advice"] for st in a.steps}
        plain = random_scenario(random.Random(seed), name=f"s{seed}")
        assert not uses_swap(plain)
    assert {"pageout", "cold", "pte", "move", "fault", "mremap", "copy"} <= drawn


async def test_random_swap_scenarios_agree_twice_on_kernel() -> None:
    """Generated scenarios with pageout, cold and ``pte`` steps are settled on the kernel (the
    LRU drained before, swap writeback waited for after): two runs give the same answers at every
    step, and no step leaves a note."""
    from mmsim.server.tools.conformance.kernel import swap_unavailable

    runner = _oracle_or_skip()
    if (why := swap_unavailable()) is not None:
        pytest.skip(f"swap is unavailable: {why}")
    rng = random.Random(RANDOM_SEED)
    scenarios = [random_scenario(rng, name=f"swap-{RANDOM_SEED}-{n}", swap=True) for n in range(25)]
    assert sum(needs_swap(s) for s in scenarios) >= 12
    problems = _disagreements(runner, scenarios)
    assert not problems, "\n".join(problems)


def _swap_scenario_files() -> list[Path]:
    return [p for p in SWAP_FILES if needs_swap(Scenario.load(p))]


async def test_command_runs_swap_scenarios_on_both_or_skips_them(monkeypatch, capsys) -> None:
    """``mmsim conformance`` runs a swap scenario on the kernel and on mmsim (exit 0 when they
    agree), and without usable swap skips the ones that page out, saying why (still exit 0)."""
    from mmsim.server.tools.conformance import kernel
    from mmsim.server.tools.conformance.tool import conformance

    _oracle_or_skip()
    paging, cold = _swap_scenario_files()[0], next(p for p in SWAP_FILES if not needs_swap(Scenario.load(p)))
    console = Console(file=io.StringIO(), width=200, color_system=None)
    if kernel.swap_unavailable() is None:
        assert await conformance([str(paging), str(cold)], console=console) == 0
        out = console.file.getvalue()  # type: ignore[attr-defined]
        assert f"same  {paging.stem}" in out and "kernel only" not in out
        assert "2 of 2 scenarios" in out
    monkeypatch.setattr(kernel, "swap_unavailable", lambda: "no active swap (for this test)")
    console = Console(file=io.StringIO(), width=200, color_system=None)
    assert await conformance([str(paging), str(cold)], console=console) == 0
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert f"skipped  {paging.stem}: no active swap (for this test)" in out
    assert f"same  {cold.stem}" in out and "1 of 1 scenarios" in out and "1 skipped" in out


async def test_command_runs_random_swap_scenarios_on_both_or_skips_them(monkeypatch) -> None:
    """``mmsim conformance --random N --swap``: generated swap scenarios run on the kernel and on
    mmsim; without usable swap, those that page out are skipped, saying why."""
    from mmsim.server.tools.conformance import kernel
    from mmsim.server.tools.conformance.tool import conformance

    _oracle_or_skip()
    rng = random.Random(RANDOM_SEED)
    generated = [random_scenario(rng, name=f"random-{RANDOM_SEED}-{n}", swap=True) for n in range(8)]
    paging = [s.name for s in generated if needs_swap(s)]
    assert 0 < len(paging) < 8
    if kernel.swap_unavailable() is None:
        console = Console(file=io.StringIO(), width=200, color_system=None)
        assert await conformance([], random_count=8, seed=RANDOM_SEED, swap=True, console=console) == 0
        assert "8 of 8 scenarios" in console.file.getvalue()  # type: ignore[attr-defined]
    monkeypatch.setattr(kernel, "swap_unavailable", lambda: "no active swap (for this test)")
    console = Console(file=io.StringIO(), width=200, color_system=None)
    assert await conformance([], random_count=8, seed=RANDOM_SEED, swap=True, console=console) == 0
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert [line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("skipped")] == paging
    assert f"{8 - len(paging)} of {8 - len(paging)} scenarios" in out and f"{len(paging)} skipped" in out


def test_record_writes_the_kernels_answers_as_expects(tmp_path: Path) -> None:
    """Record mode runs a scenario file on the kernel and writes each step's answers into its
    ``expect``: from a copy of a corpus file stripped of them, it writes back the corpus file
    (recorded before ``pte`` reported pmd, head and tail: with those, all false for its small
    pages, as the only addition)."""
    from mmsim.server.tools.conformance.kernel import swap_unavailable

    _oracle_or_skip()
    if (why := swap_unavailable()) is not None:
        pytest.skip(f"swap is unavailable: {why}")
    src = CORPUS / "311-swap-fork-after-pageout.json"
    doc = json.loads(src.read_text())
    for st in doc["steps"]:
        st.pop("expect", None)
    bare = tmp_path / src.name
    bare.write_text(json.dumps(doc))
    console = Console(file=io.StringIO(), width=200, color_system=None)
    assert record([str(bare)], console=console) == 0
    got, want = json.loads(bare.read_text()), json.loads(src.read_text())
    for st in got["steps"]:
        new = {k: st.get("expect", {}).pop(k) for k in ("pmd", "head", "tail") if k in st.get("expect", {})}
        assert new in ({}, {"pmd": False, "head": False, "tail": False}), new
        assert bool(new) == (st["op"] == "pte" and st["expect"].get("present", False))
    assert got == want
    assert "recorded  311-swap-fork-after-pageout" in console.file.getvalue()  # type: ignore[attr-defined]


def test_record_writes_a_thp_scenario_back(tmp_path: Path) -> None:
    """Record mode on a large-folio corpus file stripped of its expects writes back the very
    file, and leaves the machine's THP settings as they were."""
    from mmsim.server.tools.conformance.kernel import thp_settings_for

    _oracle_or_skip()
    src = CORPUS / "419-thp-cow-child-writes.json"
    _thp_or_skip(Scenario.load(src))
    before = _sysfs(thp_settings_for(None))
    doc = json.loads(src.read_text())
    for st in doc["steps"]:
        st.pop("expect", None)
    bare = tmp_path / src.name
    bare.write_text(json.dumps(doc))
    console = Console(file=io.StringIO(), width=200, color_system=None)
    assert record([str(bare)], console=console) == 0
    assert bare.read_text() == src.read_text()
    assert "recorded  419-thp-cow-child-writes" in console.file.getvalue()  # type: ignore[attr-defined]
    assert _sysfs(thp_settings_for(None)) == before


def _sysfs(paths: dict[str, str]) -> dict[str, str]:
    """The settings, read while no large-folio run (of another test worker) has them changed."""
    from mmsim.server.tools.conformance.kernel import read_thp_setting, thp_settings

    with thp_settings(None):
        return {p: read_thp_setting(p) for p in paths}


def test_record_skips_a_scenario_whose_kernel_runs_are_unreliable(tmp_path: Path, monkeypatch) -> None:
    """A scenario whose every kernel run has an unreliable step (a huge page fault that fell back
    to small pages) is not recorded: the file stays as it was, the command says why and exits 1."""
    from mmsim.server.tools.conformance import kernel

    _oracle_or_skip()
    doc = {"name": "t", "processes": ["P"], "steps": [
        {"op": "mmap", "proc": "P", "region": "a", "pages": 512, "align": "pmd"},
        {"op": "write", "proc": "P", "at": ["a", 0], "value": 1},
    ]}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(doc))
    fell_back = [StepResult(addr=0x7F0000000000), StepResult(unreliable="a huge page fault fell back: x +1")]
    scripted = _ScriptedKernel(fell_back)
    monkeypatch.setattr(kernel, "KernelRunner", lambda step_timeout=5.0: scripted)
    monkeypatch.setattr(kernel, "thp_unavailable", lambda s=None: None)
    console = Console(file=io.StringIO(), width=300, color_system=None)
    assert record([str(path)], console=console) == 1
    assert json.loads(path.read_text()) == doc and scripted.runs == 4
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "skipped  t: unreliable kernel run: step 1: a huge page fault fell back: x +1" in out


async def test_replay_skips_a_scenario_whose_kernel_runs_are_unreliable() -> None:
    """replay_on_kernel runs an unreliable scenario again, counts a reliable run as usual, and
    skips the scenario with the reason when every run is unreliable."""
    sc = Scenario.from_dict({"name": "t", "processes": ["P"], "steps": [
        {"op": "mmap", "proc": "P", "region": "a", "pages": 512, "align": "pmd"},
        {"op": "write", "proc": "P", "at": ["a", 0], "value": 1, "expect": {"errno": 0}},
    ]})
    fell_back = [StepResult(), StepResult(unreliable="a huge page fault fell back")]
    ok = [StepResult(), StepResult()]
    out = await replay_on_kernel(sc, _ScriptedKernel(fell_back, ok))
    assert out.skipped is None and out.differences == [] and out.kernel == ok
    flaky = _ScriptedKernel(fell_back)
    out = await replay_on_kernel(sc, flaky)
    assert out.skipped == "unreliable kernel run: step 1: a huge page fault fell back" and flaky.runs == 4
    assert out.differences == []


# ---------------------------------------------------------------------------------------------
# Large folios: generated scenarios and the command's kernel-only runs


def test_thp_generator_deterministic_valid_and_drawn() -> None:
    """With ``thp=True`` the generator draws 2 MiB-aligned regions (hugepage advice right after),
    hugepage and nohugepage advice and moves of whole PMDs, deterministically and valid; without
    it, none of them, and the very scenario ``thp=False`` gives."""
    drawn: set[str] = set()
    large = 0
    for seed in range(200):
        a = random_scenario(random.Random(seed), name=f"t{seed}", thp=True)
        assert a.to_dict() == random_scenario(random.Random(seed), name=f"t{seed}", thp=True).to_dict()
        Scenario.from_dict(json.loads(json.dumps(a.to_dict())))
        _check_episodes(a)
        large += uses_thp(a)
        for i, st in enumerate(a.steps):
            if st["op"] == "mmap" and "align" in st:
                drawn.add("aligned")
                assert st["pages"] % 512 == 0
                nxt = a.steps[i + 1]
                assert nxt["op"] == "madvise" and nxt["advice"] in ("hugepage", "nohugepage")
                assert nxt["at"] == [st["region"], 0] and nxt["pages"] == st["pages"]
            elif st["op"] == "madvise" and st["advice"] in ("hugepage", "nohugepage"):
                drawn.add(st["advice"])
            elif st["op"] == "move" and st.get("pages") == 512 and st["src"][1] % 512 == 0 == st["dst"][1] % 512:
                drawn.add("pmd-move")
        plain = random_scenario(random.Random(seed), name=f"t{seed}")
        assert not uses_thp(plain)
        assert plain.to_dict() == random_scenario(random.Random(seed), name=f"t{seed}", thp=False).to_dict()
    assert {"aligned", "hugepage", "nohugepage", "pmd-move"} <= drawn
    assert large > 150, f"only {large} of 200 scenarios have large folios"


async def test_random_thp_scenarios_agree_twice_on_kernel() -> None:
    """Generated large-folio scenarios are settled on the kernel (THP settings applied,
    khugepaged asleep, no underused THP split by reclaim): two runs give the same answers at every
    step, and no step leaves a note. A pair of runs with an unreliable step (the machine got in
    the way: no huge page to allocate, say) is run again, up to three pairs: a scenario that is
    never reliable is a problem too."""
    from mmsim.server.tools.conformance.kernel import thp_unavailable

    runner = _oracle_or_skip()
    if (why := thp_unavailable()) is not None:
        pytest.skip(f"transparent hugepages unavailable: {why}")
    rng = random.Random(RANDOM_SEED)
    scenarios = [random_scenario(rng, name=f"thp-{RANDOM_SEED}-{n}", thp=True) for n in range(12)]
    scenarios = [s for s in scenarios if uses_thp(s)]
    assert len(scenarios) >= 8
    assert any(st["op"] == "move" and st.get("pages") == 512 for s in scenarios for st in s.steps)
    problems: list[str] = []
    for s in scenarios:
        for _ in range(3):
            first, second = runner.run(s), runner.run(s)
            unreliable = [
                f"{s.name} step {i}: {x}" for run in (first, second) for i, r in enumerate(run) if (x := r.unreliable)
            ]
            if not unreliable:
                break
        problems += unreliable
        for i, (a, b) in enumerate(zip(first, second, strict=True)):
            if not unreliable and a.compared() != b.compared():
                problems.append(f"{s.name} step {i} {s.steps[i]}: {a.compared()} then {b.compared()}")
            problems += [f"{s.name} step {i}: {x}" for x in (a.note, b.note) if x]
    assert not problems, "\n".join(problems)


async def test_command_runs_thp_scenarios_on_servers_of_their_settings(tmp_path: Path, monkeypatch) -> None:
    """``mmsim conformance`` runs a large-folio scenario on the kernel and on an mmsim server
    started with its THP settings (here: THP off, so small pages on both sides), next to a plain
    one on a server of the baseline's; where the kernel cannot run it, it is skipped with the
    reason (exit 0 either way). Given a server with other settings, it is skipped, with the reason."""
    from mmsim.server.tools.conformance import kernel
    from mmsim.server.tools.conformance.tool import conformance

    _oracle_or_skip()
    thp = tmp_path / "thp-never.json"
    thp.write_text(json.dumps({"name": "thp-never", "thp": {"enabled": "never"}, "steps": [
        {"op": "mmap", "proc": "P", "region": "a", "pages": 512, "align": "pmd"},
        {"op": "madvise", "proc": "P", "at": ["a", 0], "pages": 512, "advice": "hugepage"},
        {"op": "write", "proc": "P", "at": ["a", 3], "value": 5},
        {"op": "pte", "proc": "P", "at": ["a", 3]},
        {"op": "mapcount", "proc": "P", "at": ["a", 4]},
    ]}))
    plain = CORPUS / "01-basic-move.json"
    if kernel.thp_unavailable(Scenario.load(thp)) is None:
        console = Console(file=io.StringIO(), width=200, color_system=None)
        assert await conformance([str(thp), str(plain)], console=console) == 0
        out = console.file.getvalue()  # type: ignore[attr-defined]
        assert "same  thp-never  (5 steps)\n" in out and f"same  {plain.stem}  (" in out
        assert "kernel only" not in out
        assert "2 of 2 scenarios behave the same on the kernel and on mmsim\n" in out
        async with serve_in_process(log_level="error") as addr:
            console = Console(file=io.StringIO(), width=200, color_system=None)
            assert await conformance([str(thp), str(plain)], server=addr, console=console) == 0
        out = console.file.getvalue()  # type: ignore[attr-defined]
        why = "runs under THP settings the server does not have: enabled never (the server: madvise)"
        assert f"skipped  thp-never: {why}" in out
        assert f"1 of 1 scenarios behave the same on the kernel and on mmsim (1 skipped: {why})" in out
    monkeypatch.setattr(kernel, "thp_unavailable", lambda s=None: "no transparent hugepages (for this test)")
    console = Console(file=io.StringIO(), width=200, color_system=None)
    assert await conformance([str(thp), str(plain)], console=console) == 0
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "skipped  thp-never: no transparent hugepages (for this test)" in out
    assert "1 of 1 scenarios" in out and "1 skipped: no transparent hugepages (for this test)" in out


async def test_random_thp_scenarios_run_on_mmsim() -> None:
    """Generated large-folio scenarios run on mmsim without malformed requests and leave the model
    sound."""
    rng = random.Random(RANDOM_SEED)
    large = 0
    async with serve_in_process(log_level="error") as addr, Client(addr) as client:
        for n in range(40):
            s = random_scenario(rng, name=f"thp-{n}", thp=True)
            large += uses_thp(s)
            for i, r in enumerate(await MmsimRunner(client).run(s)):
                assert not r.note, (s.name, i, s.steps[i], r)
        assert await client.check_invariants() == []
        stats = await client.stats()
    assert large >= 20 and stats.get("thp_fault_alloc", 0) > 0


async def test_command_runs_random_thp_scenarios_on_both() -> None:
    """``conformance(..., random_count=N, thp=True)``: generated large-folio scenarios run on the
    kernel and on mmsim like the others, and behave the same."""
    from mmsim.server.tools.conformance.kernel import thp_unavailable
    from mmsim.server.tools.conformance.tool import conformance

    _oracle_or_skip()
    if (why := thp_unavailable()) is not None:
        pytest.skip(f"transparent hugepages unavailable: {why}")
    console = Console(file=io.StringIO(), width=200, color_system=None)
    status = await conformance([], random_count=6, seed=RANDOM_SEED, thp=True, console=console)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert status == 0, out
    assert "6 of 6 scenarios behave the same on the kernel and on mmsim" in out and "kernel only" not in out


# ---------------------------------------------------------------------------------------------
# Pins: generated scenarios


def test_pin_generator_deterministic_valid_and_drawn() -> None:
    """With ``pin=True`` the generator draws pins (of pages of the process's own regions, never of
    its MISSING-registered episode regions) and unpins of pins the process holds,
    deterministically, valid and runnable; without it, none, and the very scenario ``pin=False``
    gives."""
    pins = unpins = 0
    for seed in range(200):
        a = random_scenario(random.Random(seed), name=f"p{seed}", pin=True)
        assert a.to_dict() == random_scenario(random.Random(seed), name=f"p{seed}", pin=True).to_dict()
        Scenario.from_dict(json.loads(json.dumps(a.to_dict())))
        check_runnable(a)
        _check_episodes(a)
        missing = {(st["proc"], st["region"]) for st in a.steps if st["op"] == "mmap" and st.get("uffd") == "missing"}
        held: dict[str, str] = {}
        for i, st in enumerate(a.steps):
            if st["op"] == "pin":
                pins += 1
                assert (st["proc"], st["at"][0]) not in missing, f"seed {seed} step {i}: a pin of a missing range"
                held[st["pin"]] = st["proc"]
            elif st["op"] == "unpin":
                unpins += 1
                assert held.pop(st["pin"]) == st["proc"]
        plain = random_scenario(random.Random(seed), name=f"p{seed}")
        assert not uses_pin(plain)
        assert plain.to_dict() == random_scenario(random.Random(seed), name=f"p{seed}", pin=False).to_dict()
    assert pins >= 100 and unpins >= 20, (pins, unpins)


async def test_random_pin_scenarios_agree_twice_on_kernel() -> None:
    """Generated scenarios with pins are settled on the kernel: two runs give the same answers at
    every step, no step leaves a note (no pin blocked), and pins both succeed and fail."""
    runner = _oracle_or_skip()
    _pin_or_skip()
    rng = random.Random(RANDOM_SEED)
    scenarios = [s for s in (random_scenario(rng, name=f"pin-{RANDOM_SEED}-{n}", pin=True) for n in range(24))
                 if uses_pin(s)]
    assert len(scenarios) >= 8
    problems = _disagreements(runner, scenarios)
    assert not problems, "\n".join(problems)


#: Random scenarios with pins (and swap steps) compared on the kernel and on mmsim.
RANDOM_PIN_COUNT = 40


async def test_random_pin_scenarios_on_kernel() -> None:
    """Generated scenarios with pins, pageout, cold and ``pte`` give the same answers on the
    kernel and on mmsim (those that page out are skipped where the kernel has no usable swap)."""
    from mmsim.server.tools.conformance.kernel import swap_unavailable

    runner = _oracle_or_skip()
    _pin_or_skip()
    no_swap = swap_unavailable()
    rng = random.Random(RANDOM_SEED)
    scenarios = [random_scenario(rng, name=f"pin-{RANDOM_SEED}-{n}", swap=True, pin=True)
                 for n in range(RANDOM_PIN_COUNT)]
    bad: list[Outcome] = []
    async with serve_in_process(log_level="error") as addr, Client(addr) as client:
        for s in scenarios:
            if no_swap is not None and needs_swap(s):
                continue
            outcome = await run_one(s, runner, client)
            if outcome.differences:
                bad.append(outcome)
    if bad:
        pytest.fail(_report(bad), pytrace=False)
