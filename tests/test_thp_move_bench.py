"""benchmarks/thp_move_bench.py with tiny sizes: the model side moves whole huge PMDs (each move
counted in ``thp_move_pmd``, every destination still PMD-mapped), the small-page baseline moves
none, and the kernel side (where it can run) keeps its PMDs whole and skips, with the reason, a run
whose region got no THPs. No timing is asserted."""

from __future__ import annotations

import ctypes
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import thp_move_bench as bench

KERNEL_WHY = bench.kernel_unavailable()
PR_SET_THP_DISABLE = 41


async def test_model_moves_whole_pmds() -> None:
    run = await bench.model_moves(2, 7, huge=True)
    assert run.thp_move_pmd == 7
    assert run.pmd_mapped_after == 2
    assert run.moves_per_s > 0 and run.mib_per_s == pytest.approx(run.moves_per_s * 2)


async def test_model_small_pages_move_no_pmd() -> None:
    run = await bench.model_moves(2, 3, huge=False)
    assert run.thp_move_pmd == 0
    assert run.pmd_mapped_after == 0


def test_quick_run_reports_both_figures(tmp_path: Path) -> None:
    out = tmp_path / "thp.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["kernel_skipped"] == KERNEL_WHY
    for mode, moves in (("huge", 64), ("small", 8)):
        (model,) = figures[mode]["model_runs"]
        assert model["thp_move_pmd"] == (moves if mode == "huge" else 0)
        assert model["pmd_mapped_after"] == (2 if mode == "huge" else 0)
    assert figures["huge"]["model_moves_per_s"] > 0
    if KERNEL_WHY is None and not figures["kernel_no_thp"]:
        (kernel,) = figures["huge"]["kernel_runs"]
        assert kernel["huge_before"] == kernel["huge_after"] == 2
        assert figures["huge"]["model_vs_kernel"] > 0


@pytest.fixture
def thp_disabled() -> Iterator[None]:
    """THPs disabled for this process and the children it starts (PR_SET_THP_DISABLE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
        pytest.skip(f"prctl(PR_SET_THP_DISABLE): errno {ctypes.get_errno()}")
    try:
        yield
    finally:
        libc.prctl(PR_SET_THP_DISABLE, 0, 0, 0, 0)


@pytest.mark.skipif(KERNEL_WHY is not None, reason=f"kernel side unavailable: {KERNEL_WHY}")
def test_kernel_keeps_pmds_whole() -> None:
    run = bench.run_kernel(bench._build(bench.SOURCE), "huge", 2, 5)
    if isinstance(run, str):
        pytest.skip(f"no THPs for the region: {run}")
    assert run["moves"] == 5 and run["huge_before"] == run["huge_after"] == 2


@pytest.mark.skipif(KERNEL_WHY is not None, reason=f"kernel side unavailable: {KERNEL_WHY}")
def test_kernel_without_thps_is_skipped_with_the_reason(thp_disabled: None) -> None:
    run = bench.run_kernel(bench._build(bench.SOURCE), "huge", 2, 5)
    assert isinstance(run, str) and "0 of 2 PMDs of A are THP-backed" in run
