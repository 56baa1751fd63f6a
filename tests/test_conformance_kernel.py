"""The kernel oracle (server/tools/conformance/kernel.py) against facts of the reference, on the live kernel."""

from __future__ import annotations

import errno
import json
import os
import re
from typing import Any

import pytest

from mmsim.server.tools.conformance.kernel import KernelRunner, oracle_unavailable
from mmsim.server.tools.conformance.scenario import PAGE, Scenario, StepResult

REASON = oracle_unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"kernel oracle unavailable: {REASON}")


def _gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


def _pgid_members(pgid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2 :].split()[2]) == pgid:
                out.append(int(name))
    return out


def run(steps: list[dict[str, Any]], processes: tuple[str, ...] = ("P",), timeout: float = 5.0) -> list[StepResult]:
    runner = KernelRunner(step_timeout=timeout)
    sc = Scenario.from_dict({"name": "t", "processes": list(processes), "steps": steps})
    results = runner.run(sc)
    assert len(results) == len(steps)
    # Nothing is left behind: every helper (and the anchor) is gone, zombies included.
    assert runner.pids, "the runner records its processes"
    assert all(_gone(p) for p in runner.pids), [p for p in runner.pids if not _gone(p)]
    assert _pgid_members(runner.pids[0]) == []
    return results


def mm(region: str, pages: int, uffd: str | None = None, proc: str = "P") -> dict[str, Any]:
    return {"op": "mmap", "proc": proc, "region": region, "pages": pages, "uffd": uffd}


def w(region: str, page: int, value: int, proc: str = "P") -> dict[str, Any]:
    return {"op": "write", "proc": proc, "at": [region, page], "value": value}


def mv(dst: int, src: int, pages: int, mode: list[str] | None = None, proc: str = "P") -> dict[str, Any]:
    return {"op": "move", "proc": proc, "dst": ["dst", dst], "src": ["src", src], "pages": pages, "mode": mode or []}


def at(op: str, region: str, page: int, proc: str = "P") -> dict[str, Any]:
    return {"op": op, "proc": proc, "at": [region, page]}


def test_basic_move() -> None:
    r = run(
        [
            mm("src", 4),
            mm("dst", 4, "missing"),
            w("src", 0, 42),
            at("mapcount", "src", 0),
            mv(0, 0, 1),
            at("present", "src", 0),
            at("peek", "dst", 0),
            at("mapcount", "dst", 0),
        ]
    )
    assert all(x.errno == 0 for x in r), r
    assert r[0].addr and r[1].addr and r[0].addr != r[1].addr
    assert r[3].compared() == {"errno": 0, "present": True, "mapcount": 1}
    assert r[4].compared() == {"errno": 0, "moved": PAGE}
    assert r[5].present is False
    assert r[6].compared() == {"errno": 0, "present": True, "value": 42}
    assert r[7].compared() == {"errno": 0, "present": True, "mapcount": 1}


def test_populated_dst_is_eexist() -> None:
    r = run([mm("src", 1), mm("dst", 1, "wp"), w("src", 0, 1), w("dst", 0, 2), mv(0, 0, 1), at("peek", "src", 0)])
    assert r[4].compared() == {"errno": errno.EEXIST, "moved": 0}
    assert r[5].compared() == {"errno": 0, "present": True, "value": 1}


def test_src_hole() -> None:
    steps = [mm("src", 3), mm("dst", 3, "missing"), w("src", 0, 10), w("src", 2, 12)]
    r = run([*steps, mv(0, 0, 3), at("present", "dst", 0), at("present", "dst", 1), at("present", "src", 2)])
    assert r[4].compared() == {"errno": errno.EAGAIN, "moved": PAGE}
    assert [x.present for x in r[5:]] == [True, False, True]

    r = run([*steps, mv(0, 0, 3, ["allow_src_holes"]), at("peek", "dst", 0), at("present", "dst", 1),
             at("peek", "dst", 2)])
    assert r[4].compared() == {"errno": 0, "moved": 3 * PAGE}
    assert (r[5].value, r[6].present, r[7].value) == (10, False, 12)


def test_shared_after_fork_then_exit_then_write() -> None:
    r = run(
        [
            mm("src", 1),
            mm("dst", 1, "missing"),
            w("src", 0, 7),
            {"op": "fork", "proc": "P", "child": "C"},
            at("peek", "src", 0),  # a non-faulting read must not unshare the page
            at("peek", "src", 0, proc="C"),
            mv(0, 0, 1),  # 6
            at("mapcount", "src", 0),
            at("mapcount", "src", 0, proc="C"),
            {"op": "exit", "proc": "C"},  # 9
            mv(0, 0, 1),  # 10
            at("mapcount", "src", 0),
            at("mapcount", "src", 0, proc="C"),  # 12: C is gone
            w("src", 0, 8),
            mv(0, 0, 1),  # 14
            at("present", "src", 0),
            at("peek", "dst", 0),
        ]
    )
    assert all(x.errno == 0 for x in r[:6]), r
    assert r[4].value == r[5].value == 7
    assert r[6].compared() == {"errno": errno.EBUSY, "moved": 0}
    assert r[7].compared() == r[8].compared() == {"errno": 0, "present": True, "mapcount": 2}
    assert r[9].errno == 0
    assert r[10].compared() == {"errno": errno.EBUSY, "moved": 0}
    assert r[11].compared() == {"errno": 0, "present": True, "mapcount": 1}
    assert r[12].errno == errno.ESRCH and r[12].note == "process gone"
    assert r[13].errno == 0
    assert r[14].compared() == {"errno": 0, "moved": PAGE}
    assert r[15].present is False
    assert r[16].compared() == {"errno": 0, "present": True, "value": 8}


def test_zero_page_then_move_onto_it() -> None:
    r = run(
        [
            mm("src", 1),
            mm("dst", 2, "wp"),  # WP-only: a read fault does not wait for a handler
            mm("dst2", 1),
            w("src", 0, 5),
            at("read", "dst", 0),  # 4
            at("mapcount", "dst", 0),
            at("peek", "dst", 0),
            mv(0, 0, 1),  # 7
            at("read", "dst2", 0),  # 8: fault first, register afterwards
            {"op": "uffd_register", "proc": "P", "at": ["dst2", 0], "pages": 1, "mode": "missing"},
            {"op": "move", "proc": "P", "dst": ["dst2", 0], "src": ["src", 0], "pages": 1},
            at("peek", "src", 0),
        ]
    )
    assert r[4].compared() == {"errno": 0, "value": 0}
    assert r[5].compared() == {"errno": 0, "present": True, "mapcount": 0}
    assert r[6].compared() == {"errno": 0, "present": True, "value": 0}
    assert r[7].compared() == {"errno": errno.EEXIST, "moved": 0}
    assert r[8].compared() == {"errno": 0, "value": 0}
    assert r[9].errno == 0
    assert r[10].compared() == {"errno": errno.EEXIST, "moved": 0}
    assert r[11].compared() == {"errno": 0, "present": True, "value": 5}


def test_blocked_step_is_timed_out_and_cleaned_up() -> None:
    r = run(
        [
            mm("dst", 2, "missing"),
            mm("q", 1, proc="Q"),
            w("dst", 0, 1),  # 2: blocks: a missing page in a MISSING-registered range, no handler
            w("q", 0, 3, proc="Q"),  # the other processes carry on
            {"op": "fork", "proc": "Q", "child": "QC"},
            {"op": "exit", "proc": "Q"},  # QC is orphaned
            at("peek", "q", 0, proc="QC"),
            at("mapcount", "q", 0, proc="QC"),
            w("q", 0, 4, proc="QC"),
            at("peek", "q", 0, proc="QC"),
            at("present", "dst", 0),  # 10: P is gone
            {"op": "exit", "proc": "P"},
        ],
        processes=("P", "Q"),
        timeout=1.0,
    )
    assert r[2].errno == errno.ETIMEDOUT and r[2].note == "blocked"
    assert all(x.errno == 0 for x in r[3:10]), r
    assert r[6].compared() == {"errno": 0, "present": True, "value": 3}
    assert r[7].compared() == {"errno": 0, "present": True, "mapcount": 1}
    assert r[9].compared() == {"errno": 0, "present": True, "value": 4}
    for x in r[10:]:
        assert x.errno == errno.ESRCH and x.note == "process gone", r


def test_blocked_fork_child_is_cleaned_up() -> None:
    """A child left blocked (and orphaned) when the run ends is still killed and reaped."""
    r = run(
        [
            mm("dst", 1, "missing"),
            {"op": "fork", "proc": "P", "child": "C"},
            {"op": "uffd_register", "proc": "C", "at": ["dst", 0], "pages": 1, "mode": "missing"},
            {"op": "exit", "proc": "P"},
            w("dst", 0, 1, proc="C"),
        ],
        timeout=1.0,
    )
    assert [x.errno for x in r] == [0, 0, 0, 0, errno.ETIMEDOUT]


def test_oracle_unavailable_is_none_here() -> None:
    assert oracle_unavailable() is None


def test_runner_error_still_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = KernelRunner(step_timeout=1.0)
    real = KernelRunner._command

    def failing(step: dict[str, Any], addrs: dict[str, int]) -> dict[str, Any]:
        if step["op"] == "peek":
            raise RuntimeError("boom")
        return real(step, addrs)

    monkeypatch.setattr(KernelRunner, "_command", staticmethod(failing))
    sc = Scenario.from_dict(
        {"name": "t",
         "steps": [mm("a", 1), w("a", 0, 1), {"op": "fork", "proc": "P", "child": "C"}, at("peek", "a", 0)]}
    )
    with pytest.raises(RuntimeError, match="boom"):
        runner.run(sc)
    assert len(runner.pids) == 3
    assert all(_gone(p) for p in runner.pids)


# ---------------------------------------------------------------------------------------------
# Faults in threads of a helper, their events, and the ioctls that resolve them


def fault(region: str, page: int, fid: str, write: bool = False, proc: str = "P", value: int = 0) -> dict[str, Any]:
    return {"op": "fault", "proc": proc, "at": [region, page], "id": fid, "write": write, "value": value}


def status(fid: str, proc: str = "P") -> dict[str, Any]:
    return {"op": "fault_status", "proc": proc, "id": fid}


def events(proc: str = "P") -> dict[str, Any]:
    return {"op": "events", "proc": proc}


def copy(region: str, page: int, values: list[int], proc: str = "P", mode: list[str] | None = None) -> dict[str, Any]:
    return {"op": "copy", "proc": proc, "dst": [region, page], "pages": len(values), "values": values,
            "mode": mode or []}


def test_fault_blocks_until_resolved_by_copy() -> None:
    r = run(
        [
            mm("a", 2, "missing"),
            fault("a", 1, "f"),
            status("f"),  # 2
            events(),
            copy("a", 1, [42], mode=["dontwake"]),  # 4: maps the page, wakes nobody
            status("f"),
            {"op": "wake", "proc": "P", "at": ["a", 0], "pages": 2},
            status("f"),  # 7
            at("peek", "a", 1),
        ]
    )
    assert r[1].compared() == {"errno": 0}
    assert r[2].compared() == {"errno": 0, "blocked": True}
    assert r[3].compared() == {"errno": 0, "events": [["a", 1, "r"]]}
    assert r[4].compared() == {"errno": 0, "copied": PAGE}
    assert r[5].blocked is True
    assert r[6].errno == 0
    assert r[7].compared() == {"errno": 0, "blocked": False, "value": 42}
    assert r[8].compared() == {"errno": 0, "present": True, "value": 42}


def test_events_name_regions_and_kinds() -> None:
    """Addresses come back as [region, page, kind], named after the region bound last."""
    r = run(
        [
            mm("blk", 1),
            mm("a", 3, "missing"),
            mm("b", 2, "wp"),
            copy("b", 1, [5], mode=["wp"]),
            fault("a", 2, "r"),
            fault("a", 0, "w", write=True, value=3),
            fault("b", 1, "wp", write=True, value=4),
            events(),  # 7
            {"op": "mremap", "proc": "P", "at": ["a", 0], "pages": 3, "new_pages": 3, "region": "a2"},
            fault("a2", 1, "again"),
            events(),  # 10
            events(),
        ]
    )
    assert r[7].events == [["a", 2, "r"], ["a", 0, "w"], ["b", 1, "wp"]]
    assert r[8].compared() == {"errno": 0, "relocated": False}
    assert r[8].addr == r[1].addr
    assert r[10].events == [["a2", 1, "r"]]
    assert r[11].events == []


def test_fault_threads_do_not_move_regions() -> None:
    """Fault threads (and a fork child's new ones) map nothing where regions go: the next region
    still lands right below the last one, in the parent and in the child."""
    r = run(
        [
            mm("a", 2, "missing"),
            fault("a", 0, "f"),
            mm("b", 1),
            {"op": "fork", "proc": "P", "child": "C"},
            fault("b", 0, "c", proc="C"),
            mm("c", 1, proc="C"),
            mm("d", 1),
        ]
    )
    assert r[0].addr is not None
    assert r[2].addr == r[0].addr - PAGE
    assert r[5].addr == r[2].addr - PAGE
    assert r[6].addr == r[2].addr - PAGE


def test_pending_fault_left_at_the_end_leaves_nothing_behind() -> None:
    # run() asserts that every helper, the anchor and the process group are gone.
    r = run([mm("a", 1, "missing"), fault("a", 0, "f"), status("f"), {"op": "fork", "proc": "P", "child": "C"}])
    assert r[2].blocked is True and r[3].errno == 0


def test_exit_and_fork_with_a_pending_fault() -> None:
    r = run(
        [
            mm("a", 2, "missing"),
            mm("q", 1, proc="Q"),
            fault("a", 0, "f"),
            {"op": "fork", "proc": "P", "child": "C"},  # 3: only the forking thread is in C
            fault("a", 0, "c", proc="C"),  # C's range is not registered: no wait
            status("c", proc="C"),
            events(proc="C"),
            status("f"),  # 7
            copy("a", 0, [9]),
            status("f"),
            fault("a", 1, "g"),  # 10
            {"op": "exit", "proc": "P"},  # with g pending
            at("peek", "a", 0, proc="C"),
            at("present", "a", 0),
            w("q", 0, 2, proc="Q"),
        ],
        processes=("P", "Q"),
    )
    assert [x.errno for x in r[:12]] == [0] * 12, r
    assert r[5].compared() == {"errno": 0, "blocked": False, "value": 0}
    assert r[6].events == []
    assert r[7].blocked is True
    assert r[9].compared() == {"errno": 0, "blocked": False, "value": 9}
    assert r[12].compared() == {"errno": 0, "present": True, "value": 0}
    assert r[13].errno == errno.ESRCH
    assert r[14].errno == 0


def test_a_child_cannot_ask_for_its_parents_fault() -> None:
    from mmsim.server.tools.conformance.scenario import ScenarioError

    steps = [mm("a", 1, "missing"), fault("a", 0, "f"), {"op": "fork", "proc": "P", "child": "C"},
             status("f", proc="C")]
    with pytest.raises(ScenarioError, match="not a fault started earlier by C"):
        Scenario.from_dict({"name": "t", "steps": steps})
    with pytest.raises(ScenarioError, match="not used by another fault"):
        Scenario.from_dict({"name": "t", "steps": [mm("a", 1), fault("a", 0, "f"), fault("a", 0, "f")]})
    with pytest.raises(ScenarioError, match="'to' is required"):
        Scenario.from_dict({"name": "t", "steps": [
            mm("a", 1), {"op": "mremap", "at": ["a", 0], "pages": 1, "new_pages": 1, "flags": ["maymove", "fixed"]},
        ]})


def test_copy_and_zeropage_progress() -> None:
    """Progress before an error is reported as copied/zeroed bytes with EAGAIN."""
    r = run(
        [
            mm("a", 4, "missing"),
            copy("a", 2, [7]),
            copy("a", 0, [1, 2, 3, 4]),  # 2: stops at the present page 2
            {"op": "zeropage", "proc": "P", "dst": ["a", 3], "pages": 1},
            {"op": "zeropage", "proc": "P", "dst": ["a", 0], "pages": 4},  # 4: page 0 is present
            copy("a", 0, [1]),
            at("peek", "a", 1),
            at("mapcount", "a", 3),
        ]
    )
    assert r[2].compared() == {"errno": errno.EAGAIN, "copied": 2 * PAGE}
    assert r[3].compared() == {"errno": 0, "zeroed": PAGE}
    assert r[4].compared() == {"errno": errno.EEXIST, "zeroed": 0}
    assert r[5].compared() == {"errno": errno.EEXIST, "copied": 0}
    assert r[6].value == 2
    assert r[7].compared() == {"errno": 0, "present": True, "mapcount": 0}


def test_mremap_binds_a_region() -> None:
    r = run(
        [
            mm("blk", 1),
            mm("a", 2),
            w("a", 1, 5),
            {"op": "mremap", "proc": "P", "at": ["a", 0], "pages": 2, "new_pages": 4, "flags": ["maymove"],
             "region": "b"},
            at("peek", "b", 1),
            at("present", "a", 1),
            {"op": "mremap", "proc": "P", "at": ["b", 0], "pages": 4, "new_pages": 4, "flags": ["maymove", "fixed"],
             "to": ["a", 0]},
        ]
    )
    assert r[3].compared() == {"errno": 0, "relocated": True}
    assert r[3].addr not in (None, r[1].addr)
    assert r[4].compared() == {"errno": 0, "present": True, "value": 5}
    assert r[5].present is False
    assert r[6].compared() == {"errno": 0, "relocated": True} and r[6].addr == r[1].addr


def test_prot_none_pages_are_peeked_not_read() -> None:
    r = run([mm("a", 1), w("a", 0, 3), {"op": "mprotect", "proc": "P", "at": ["a", 0], "pages": 1, "prot": "none"},
             at("peek", "a", 0), at("read", "a", 0), w("a", 0, 4), at("mapcount", "a", 0)])
    assert r[3].compared() == {"errno": 0, "present": True, "value": 3}
    assert r[4].errno == errno.EFAULT and r[5].errno == errno.EFAULT
    assert r[6].mapcount == 1


# ---------------------------------------------------------------------------------------------
# Swap: pageout, cold and the pte observation


def _swap_or_skip() -> None:
    from mmsim.server.tools.conformance.kernel import swap_unavailable

    why = swap_unavailable()
    if why is not None:
        pytest.skip(f"swap is unavailable: {why}")


def adv(region: str, page: int, advice: str, pages: int = 1, proc: str = "P") -> dict[str, Any]:
    return {"op": "madvise", "proc": proc, "at": [region, page], "pages": pages, "advice": advice}


def test_pte_of_a_present_page_a_zero_page_and_none() -> None:
    r = run([mm("a", 3), w("a", 0, 5), at("read", "a", 1), at("pte", "a", 0), at("pte", "a", 1), at("pte", "a", 2),
             adv("a", 0, "cold", 3), at("pte", "a", 0), at("peek", "a", 0)])
    assert r[3].present and r[3].exclusive and r[3].anon_exclusive and r[3].mapcount == 1
    assert (r[3].swap, r[3].swapcache, r[3].zero_page, r[3].thp, r[3].ksm, r[3].uffd_wp) == (False,) * 6
    assert r[4].present and r[4].zero_page and r[4].mapcount == 0 and not r[4].exclusive
    assert r[4].anon_exclusive is None  # the zero page is no anonymous folio
    assert r[5].compared() == {"errno": 0, "present": False, "swap": False, "exclusive": False, "uffd_wp": False,
                               "soft_dirty": r[5].soft_dirty}
    assert r[6].errno == 0 and r[7].compared() == r[3].compared()  # cold leaves the PTE as it was
    assert r[8].value == 5


def test_pageout_swap_entry_swapin_and_fork() -> None:
    """A paged-out page is a swap entry whose folio is in the swap cache; a fork shares the entry;
    the reads of each process (user-mode loads, not pinning ones) map the one swap-cache folio
    twice, where a pinning read would have unshared it."""
    _swap_or_skip()
    r = run([mm("a", 1), w("a", 0, 42), adv("a", 0, "pageout"), at("pte", "a", 0), at("peek", "a", 0),
             {"op": "fork", "proc": "P", "child": "C"}, at("read", "a", 0), at("read", "a", 0, proc="C"),
             at("pte", "a", 0), at("pte", "a", 0, proc="C")])
    assert [x.note for x in r] == [""] * len(r)
    assert r[3].compared() == {"errno": 0, "present": False, "swap": True, "exclusive": False, "uffd_wp": False,
                               "soft_dirty": r[3].soft_dirty, "swapcache": True}
    assert r[4].present is False
    assert r[6].value == r[7].value == 42
    for x in r[8:]:
        assert (x.present, x.swap, x.mapcount, x.swapcache, x.anon_exclusive) == (True, False, 2, True, False)


def test_pageout_of_a_range_with_an_unmapped_page_is_enomem_after_the_mapped_one() -> None:
    _swap_or_skip()
    r = run([mm("a", 2), w("a", 0, 1), {"op": "munmap", "proc": "P", "at": ["a", 1], "pages": 1},
             adv("a", 0, "pageout", 2), at("pte", "a", 0)])
    assert r[3].errno == errno.ENOMEM
    assert r[4].swap is True


def test_lru_add_drain_all_puts_another_cpus_batch_on_the_lru() -> None:
    """A page faulted on one CPU sits in that CPU's LRU batch (not on the LRU, where pageout
    would skip it) until the batches are drained; the empty move_pages drains every CPU's."""
    import ctypes
    import struct

    from mmsim.server.tools.conformance import kernel as k

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    libc = k._Libc()
    flags = os.open("/proc/kpageflags", os.O_RDONLY)
    pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
    lru = 1 << 5
    buf = libc.mmap(None, 64 * PAGE, 3, k._MAP_PRIVATE | k._MAP_ANONYMOUS, -1, 0)
    seen_off_lru = 0
    try:
        for i in range(64):
            addr = buf + i * PAGE
            os.sched_setaffinity(0, {cpus[1]})
            ctypes.c_uint64.from_address(addr).value = i + 1
            os.sched_setaffinity(0, {cpus[0]})
            pfn = struct.unpack("<Q", os.pread(pagemap, 8, addr // PAGE * 8))[0] & k._PM_PFN_MASK
            before = struct.unpack("<Q", os.pread(flags, 8, pfn * 8))[0]
            assert libc.lru_add_drain_all() == 0
            after = struct.unpack("<Q", os.pread(flags, 8, pfn * 8))[0]
            assert after & lru, f"page {i} is not on the LRU after the drain"
            if not before & lru:
                seen_off_lru += 1
                if seen_off_lru >= 3:
                    break
    finally:
        os.sched_setaffinity(0, set(cpus))
        libc.munmap(buf, 64 * PAGE)
        os.close(flags)
        os.close(pagemap)
    assert seen_off_lru >= 3, "no page was ever seen in another CPU's batch"


def test_pageout_returns_once_its_swap_writeback_has_ended() -> None:
    """The helper's pageout waits until the pages it wrote out are no longer under writeback
    (their PFNs, read before, show KPF_WRITEBACK clear when it returns)."""
    import ctypes
    import socket
    import struct

    from mmsim.server.tools.conformance import kernel as k

    _swap_or_skip()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    h = k._Helper(a)
    buf = h.libc.mmap(None, 8 * PAGE, 3, k._MAP_PRIVATE | k._MAP_ANONYMOUS, -1, 0)
    try:
        for i in range(8):
            ctypes.c_uint64.from_address(buf + i * PAGE).value = i + 1
        pfns = [struct.unpack("<Q", os.pread(h.pagemap, 8, (buf + i * PAGE) // PAGE * 8))[0] & k._PM_PFN_MASK
                for i in range(8)]
        for i in range(8):
            assert h._reclaim(buf + i * PAGE, PAGE, "pageout") == {"errno": 0}
            assert not h._kpageflags(pfns[i]) & k._KPF_WRITEBACK
            assert h._pagemap(buf + i * PAGE) & k._PM_SWAP
        assert [ctypes.c_uint64.from_address(buf + i * PAGE).value for i in range(8)] == list(range(1, 9))
    finally:
        h.libc.munmap(buf, 8 * PAGE)
        for fd in (h.pagemap, h.kpagecount, h.kpageflags):
            os.close(fd)
        a.close()
        b.close()


@pytest.mark.parametrize(
    ("swaps", "meminfo", "zswap", "why"),
    [
        ("Filename Type Size Used Priority\n", "SwapFree: 0 kB\n", None, "no active swap"),
        ("Filename Type\n/dev/zram0 partition 1 0 100\n", "SwapFree: 999999 kB\n", "N\n", "is zram"),
        ("Filename Type\n/var/tmp/s file 1 0 -2\n", "SwapFree: 999999 kB\n", "Y\n", "zswap is enabled"),
        ("Filename Type\n/var/tmp/s file 1 0 -2\n", "SwapTotal: 9 kB\nSwapFree: 8 kB\n", None, "0 MiB of swap free"),
        ("Filename Type\n/var/tmp/s file 1 0 -2\n", "SwapFree: 262140 kB\n", "N\n", None),
    ],
)
def test_swap_unusable_says_why(swaps: str, meminfo: str, zswap: str | None, why: str | None) -> None:
    from mmsim.server.tools.conformance.kernel import swap_unusable

    got = swap_unusable(swaps, meminfo, zswap)
    assert got is None if why is None else (got is not None and why in got), got


# ---------------------------------------------------------------------------------------------
# Large folios: aligned regions, THP settings, the pte step's pmd, head and tail


def _thp_or_skip(sc: Scenario | None = None) -> None:
    from mmsim.server.tools.conformance.kernel import thp_unavailable

    why = thp_unavailable(sc)
    if why is not None:
        pytest.skip(f"transparent hugepages unavailable: {why}")


def _thp_sysfs(locked: bool = True) -> dict[str, str]:
    """Every setting a large-folio scenario may change, as it reads now: with ``locked``, while
    no large-folio run (of another test worker) has them changed."""
    from mmsim.server.tools.conformance.kernel import read_thp_setting, thp_settings, thp_settings_for

    paths = [*thp_settings_for({"enabled": "never", "use_zero_page": False}), "/proc/sys/vm/min_free_kbytes"]
    if not locked:
        return {p: read_thp_setting(p) for p in paths}
    with thp_settings(None):
        return {p: read_thp_setting(p) for p in paths}


def test_aligned_mmap_maps_exactly_the_region_on_a_pmd_boundary() -> None:
    """``"align": "pmd"`` puts the region on a 2 MiB boundary, with nothing of the slack left
    mapped right above it, and a write fault in it after MADV_HUGEPAGE maps a huge PMD."""
    _thp_or_skip()
    steps = [
        {**mm("a", 512), "align": "pmd"}, {**mm("b", 3), "align": "pmd"},
        {"op": "mprotect", "proc": "P", "at": ["a", 512], "pages": 1, "prot": "r"},
        {"op": "mprotect", "proc": "P", "at": ["b", 3], "pages": 1, "prot": "r"},
        adv("a", 0, "hugepage", 512), w("a", 5, 9), at("pte", "a", 0), at("pte", "a", 5), at("pte", "a", 511),
        w("b", 0, 1), at("pte", "b", 0),
    ]
    r = run(steps)
    assert [x.errno for x in r[:2]] == [0, 0] and r[0].addr and r[1].addr
    assert r[0].addr % (2 << 20) == 0 and r[1].addr % (2 << 20) == 0
    assert [x.errno for x in r[2:4]] == [errno.ENOMEM, errno.ENOMEM]  # the page above: unmapped
    assert [x.unreliable for x in r] == [""] * len(r)
    head, mid, last = r[6], r[7], r[8]
    assert (head.pmd, head.thp, head.head, head.tail, head.mapcount) == (True, True, True, False, 1)
    assert (mid.pmd, mid.head, mid.tail, last.pmd, last.tail) == (True, False, True, True, True)
    assert mid.anon_exclusive is True  # a tail page under a huge PMD: the head's bit is the PMD's
    assert (r[10].pmd, r[10].thp, r[10].head, r[10].tail) == (False, False, False, False)


def test_pte_of_a_pte_mapped_tail_page_leaves_anon_exclusive_out() -> None:
    """Once the PMD is split, a tail page's own PG_anon_exclusive is not what kpageflags shows
    (it shows the head's): ``anon_exclusive`` is left out there, kept on the head."""
    _thp_or_skip()
    r = run([{**mm("a", 512), "align": "pmd"}, adv("a", 0, "hugepage", 512), w("a", 0, 1),
             {"op": "munmap", "proc": "P", "at": ["a", 100], "pages": 1}, at("pte", "a", 0), at("pte", "a", 1)])
    assert (r[4].pmd, r[4].head, r[4].anon_exclusive) == (False, True, True)
    assert (r[5].pmd, r[5].tail, r[5].thp, r[5].anon_exclusive) == (False, True, True, None)


def test_thp_settings_are_applied_for_the_scenario_and_restored_after() -> None:
    """A scenario's ``thp`` settings hold while it runs (a 64 KiB mTHP, a read fault that gets
    a THP instead of the huge zero page) and the machine's settings are back, exactly, after."""
    sc = Scenario.from_dict({"name": "t", "thp": {"use_zero_page": False, "mthp": {"64kB": "always"}}, "steps": [
        {**mm("a", 512), "align": "pmd"}, {**mm("s", 32), "align": "pmd"}, adv("a", 0, "hugepage", 512),
        at("read", "a", 0), at("pte", "a", 0), w("s", 0, 1), at("pte", "s", 15), at("pte", "s", 16),
    ]})
    _thp_or_skip(sc)
    before = _thp_sysfs()
    r = KernelRunner().run(sc)
    assert _thp_sysfs() == before
    assert [x.errno for x in r] == [0] * len(r) and [x.unreliable for x in r] == [""] * len(r)
    assert (r[4].pmd, r[4].zero_page, r[4].mapcount) == (True, False, 1)
    assert (r[6].thp, r[6].pmd, r[6].tail) == (True, False, True) and r[7].present is False


def test_thp_settings_are_restored_when_the_run_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings are restored, and no journal is left, when the run raises part-way (the
    settings were in force when it did)."""
    from mmsim.server.tools.conformance import kernel

    sc = Scenario.from_dict({"name": "t", "thp": {"enabled": "always", "mthp": {"64kB": "madvise"}},
                             "steps": [mm("a", 1)]})
    _thp_or_skip(sc)
    before = _thp_sysfs()
    seen: dict[str, str] = {}

    def failing(self: KernelRunner, scenario: Scenario, thp: bool) -> list[StepResult]:
        seen.update(_thp_sysfs(locked=False))  # this run holds the lock
        raise RuntimeError("boom")

    monkeypatch.setattr(KernelRunner, "_run", failing)
    with pytest.raises(RuntimeError, match="boom"):
        KernelRunner().run(sc)
    root = kernel.THP_SYSFS
    assert seen[f"{root}/enabled"] == "always" and seen[f"{root}/hugepages-64kB/enabled"] == "madvise"
    assert seen[f"{root}/khugepaged/scan_sleep_millisecs"] == str(kernel.KHUGEPAGED_SLEEP_MS)
    assert _thp_sysfs() == before
    assert not os.path.exists(kernel._thp_journal_path())


def test_a_killed_runs_settings_are_restored_from_the_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings a run changed and could not restore (it was killed) are restored from the
    journal, which then goes; a large-folio run does that first, before it applies its own."""
    import fcntl

    from mmsim.server.tools.conformance import kernel

    _thp_or_skip()
    path = f"{kernel.THP_SYSFS}/hugepages-64kB/enabled"
    if not os.path.exists(path):
        pytest.skip("no 64kB mTHP size")
    lock = os.open(kernel._thp_lock_path(), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a large-folio run: no other run sees what follows
        before = _thp_sysfs(locked=False)
        old = kernel.read_thp_setting(path)
        with open(kernel._thp_journal_path(), "w") as f:
            json.dump({path: old}, f)
        with open(path, "w") as f:
            f.write("madvise" if old != "madvise" else "never")
        try:
            kernel.restore_pending_thp_settings()
            assert _thp_sysfs(locked=False) == before
            assert not os.path.exists(kernel._thp_journal_path())
        finally:
            if kernel.read_thp_setting(path) != old:
                with open(path, "w") as f:
                    f.write(old)
            if os.path.exists(kernel._thp_journal_path()):
                os.unlink(kernel._thp_journal_path())
    finally:
        os.close(lock)
    order: list[str] = []
    monkeypatch.setattr(kernel, "restore_pending_thp_settings", lambda: order.append("restore"))
    real = kernel._write_thp_setting

    def write(path: str, value: str) -> None:
        order.append("write")
        real(path, value)

    monkeypatch.setattr(kernel, "_write_thp_setting", write)
    with kernel.thp_settings(Scenario.from_dict({"name": "t", "steps": []})):
        pass
    assert order[:2] == ["restore", "write"]


def test_runs_hold_the_settings_lock() -> None:
    """A run holds the settings lock, shared (no large-folio run changes the settings under it)
    or, for a large-folio scenario, exclusive."""
    import fcntl
    import threading

    from mmsim.server.tools.conformance import kernel

    def try_lock(how: int) -> bool:
        fd = os.open(kernel._thp_lock_path(), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    def held_by_us() -> list[str]:
        """This process's flock modes on the lock file (/proc/locks: other test workers may hold it
        too, so a lock attempt cannot tell whether this process let go)."""
        ino = os.stat(kernel._thp_lock_path()).st_ino
        with open("/proc/locks") as f:
            rows = [line.split() for line in f]
        return [r[3] for r in rows if r[1] == "FLOCK" and r[4] == str(os.getpid()) and r[5].endswith(f":{ino}")]

    got: dict[str, bool] = {}
    with kernel.thp_settings(None):
        t = threading.Thread(target=lambda: got.update(ex=try_lock(fcntl.LOCK_EX), sh=try_lock(fcntl.LOCK_SH)))
        t.start()
        t.join()
        assert held_by_us() == ["READ"]
    assert got == {"ex": False, "sh": True}
    assert held_by_us() == []  # let go when the run ends


def test_thp_counters_and_what_a_move_of_them_means(tmp_path: Any) -> None:
    """``thp_counters`` reads the fallback, swap-out and collapse counters; ``thp_disturbance``
    says which kind of disturbance a move of them is."""
    from mmsim.server.tools.conformance.kernel import thp_counters, thp_disturbance

    root = tmp_path / "thp"
    for size in ("64kB", "2048kB"):
        (root / f"hugepages-{size}" / "stats").mkdir(parents=True)
        (root / f"hugepages-{size}" / "stats" / "anon_fault_fallback").write_text("3\n")
        (root / f"hugepages-{size}" / "stats" / "swpout").write_text("0\n")
    (root / "khugepaged").mkdir()
    (root / "khugepaged" / "pages_collapsed").write_text("7\n")
    vmstat = tmp_path / "vmstat"
    vmstat.write_text("nr_free_pages 1\nthp_fault_alloc 9\nthp_fault_fallback 2\nthp_zero_page_alloc_failed 0\n"
                      "thp_swpout 0\nthp_underused_split_page 4\nthp_migration_split 0\nthp_split_pmd 6\n")
    c = thp_counters(str(root), str(vmstat))
    assert c == {"thp_fault_fallback": 2, "thp_zero_page_alloc_failed": 0, "thp_swpout": 0,
                 "thp_underused_split_page": 4, "thp_migration_split": 0,
                 "hugepages-2048kB anon_fault_fallback": 3, "hugepages-2048kB swpout": 0,
                 "hugepages-64kB anon_fault_fallback": 3, "hugepages-64kB swpout": 0,
                 "khugepaged pages_collapsed": 7}
    assert thp_disturbance(c, c) == ""
    fell = {**c, "thp_fault_fallback": 3, "hugepages-2048kB anon_fault_fallback": 4}
    assert thp_disturbance(c, fell) == ("a huge page fault fell back to smaller pages (no huge page could be "
                                        "allocated): thp_fault_fallback +1, hugepages-2048kB anon_fault_fallback +1")
    assert thp_disturbance(c, {**c, "khugepaged pages_collapsed": 8}).startswith("khugepaged collapsed pages")
    assert thp_disturbance(c, {**c, "hugepages-64kB swpout": 1}).startswith("a large folio was swapped out whole")
    assert thp_disturbance(c, {**c, "thp_underused_split_page": 5}) == (
        "the shrinker split a huge page as underused (reclaim ran while the scenario ran): thp_underused_split_page +1")
    assert thp_disturbance(c, {**c, "thp_migration_split": 1}).startswith("a migration split a huge page")


def _drop_slab_before(monkeypatch: pytest.MonkeyPatch, index: int) -> None:
    """Make the kernel run every shrinker (drop_caches 2), as reclaim anywhere on the machine
    would, right before step ``index`` of the next kernel run."""
    seen = [0]
    step = KernelRunner._step

    def dropping(self: KernelRunner, *args: Any, **kwargs: Any) -> StepResult:
        if seen[0] == index:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2\n")
        seen[0] += 1
        return step(self, *args, **kwargs)

    monkeypatch.setattr(KernelRunner, "_step", dropping)


@pytest.mark.parametrize("shrink_underused", ["0", "1"])
def test_reclaim_does_not_split_an_underused_huge_page_behind_the_scenario(
    monkeypatch: pytest.MonkeyPatch, shrink_underused: str
) -> None:
    """A huge page with one written page is underused (max_ptes_none is 0 while a large-folio
    scenario runs), and the shrinker that reclaim runs splits such a page. A large-folio scenario
    runs with that splitting off, so its THP stays PMD-mapped through a shrink and a move into it
    still fails with EEXIST. With the splitting left on, the split is not taken for the
    scenario's answer: the step is marked unreliable."""
    from mmsim.server.tools.conformance import kernel

    _thp_or_skip()
    if not os.path.exists(f"{kernel.THP_SYSFS}/shrink_underused"):
        pytest.skip("this kernel does not split underused huge pages (no shrink_underused)")
    if not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        pytest.skip("/proc/sys/vm/drop_caches is not writable (running the shrinkers needs root)")
    monkeypatch.setattr(kernel, "SHRINK_UNDERUSED", shrink_underused)
    _drop_slab_before(monkeypatch, 5)
    steps = [
        {**mm("dst", 512, "wp"), "align": "pmd"}, mm("src", 1), adv("dst", 0, "hugepage", 512), w("dst", 7, 3),
        at("pte", "src", 0), at("pte", "dst", 100), mv(100, 0, 1), at("peek", "dst", 7),
    ]
    r = run(steps)
    if shrink_underused == "0":
        assert r[5].pmd is True and r[5].present and [x.unreliable for x in r] == [""] * len(r)
        assert (r[6].errno, r[6].moved) == (errno.EEXIST, 0)
    else:
        assert r[5].pmd is False, "the shrinker left the underused huge page whole"
        assert r[5].unreliable.startswith("the shrinker split a huge page as underused"), r[5].unreliable
        assert (r[6].errno, r[6].moved) == (errno.ENOENT, 0)
    assert r[7].value == 3


def test_thp_unavailable_says_why_for_a_missing_size(monkeypatch: pytest.MonkeyPatch) -> None:
    from mmsim.server.tools.conformance import kernel

    _thp_or_skip()
    sc = Scenario.from_dict({"name": "t", "thp": {"mthp": {"8kB": "always"}}, "steps": []})
    if os.path.exists(f"{kernel.THP_SYSFS}/hugepages-8kB/enabled"):
        pytest.skip("this kernel has an 8kB mTHP setting")
    assert kernel.thp_unavailable(sc) == "no hugepages-8kB/enabled (a size or setting this kernel lacks)"
    monkeypatch.setattr(kernel, "THP_SYSFS", "/nonexistent/transparent_hugepage")
    assert (kernel.thp_unavailable() or "").startswith("no transparent hugepages: ")


# ---------------------------------------------------------------------------------------------
# Pins: io_uring buffer registrations held by the helper that made them


def _pin_or_skip() -> None:
    from mmsim.server.tools.conformance.kernel import pin_unavailable

    why = pin_unavailable()
    if why is not None:
        pytest.skip(f"pins unavailable: {why}")


def pin(region: str, page: int, name: str, pages: int = 1, proc: str = "P") -> dict[str, Any]:
    return {"op": "pin", "proc": proc, "at": [region, page], "pages": pages, "pin": name}


def unpin(name: str, proc: str = "P") -> dict[str, Any]:
    return {"op": "unpin", "proc": proc, "pin": name}


def _rings(pid: int) -> int:
    """The io_uring instances process ``pid`` has open."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[io_uring]"
        except OSError:
            pass
    return n


def test_pin_holds_a_page_until_its_unpin() -> None:
    """A pinned page is EBUSY to move until its unpin; a second pin of the page holds it too; a
    process that exits with pins held leaves nothing behind (``run`` checks)."""
    _pin_or_skip()
    r = run([mm("src", 2), mm("dst", 2, "wp"), w("src", 0, 7), pin("src", 0, "a"), mv(0, 0, 1),
             pin("src", 0, "b", 2), unpin("a"), mv(0, 0, 1), unpin("b"), mv(0, 0, 1), at("peek", "dst", 0),
             pin("src", 1, "c"), {"op": "exit", "proc": "P"}])
    assert [x.note for x in r] == [""] * len(r)
    assert [x.errno for x in r[3:10]] == [0, errno.EBUSY, 0, 0, errno.EBUSY, 0, 0]
    assert r[9].moved == PAGE and r[10].value == 7
    assert r[11].errno == 0 and r[12].errno == 0


def test_pin_is_all_or_nothing_and_needs_write_access() -> None:
    """A pin over a hole is EFAULT and holds nothing (the page before the hole was write-faulted
    in, and moves); one of a read-only or PROT_NONE page is EFAULT; an unpin of a failed pin is
    EINVAL; a pin of the zero page replaces it with a page of the process's own."""
    _pin_or_skip()
    r = run([mm("src", 3), mm("dst", 3, "wp"), {"op": "munmap", "proc": "P", "at": ["src", 1], "pages": 1},
             pin("src", 0, "a", 3), at("pte", "src", 0), mv(0, 0, 1), unpin("a"),
             {"op": "mmap", "proc": "P", "region": "ro", "pages": 1, "prot": "r"},
             {"op": "mmap", "proc": "P", "region": "no", "pages": 1, "prot": "none"},
             pin("ro", 0, "b"), pin("no", 0, "c"),
             at("read", "src", 2), pin("src", 2, "d"), at("pte", "src", 2)])
    assert r[3].compared() == {"errno": errno.EFAULT}
    assert (r[4].present, r[4].mapcount, r[4].anon_exclusive) == (True, 1, True)
    assert r[5].compared() == {"errno": 0, "moved": PAGE}
    assert r[6].compared() == {"errno": errno.EINVAL}
    assert [x.errno for x in r[9:11]] == [errno.EFAULT, errno.EFAULT]
    assert r[12].errno == 0
    assert (r[13].present, r[13].zero_page, r[13].mapcount, r[13].exclusive) == (True, False, 1, True)


def test_pin_rings_are_the_pinning_process_alone() -> None:
    """Each pin is a ring of the helper that made it; a fork child closes the rings it inherited
    at once; an unpin closes its ring."""
    from mmsim.server.tools.conformance.kernel import _Run

    _pin_or_skip()
    runner = KernelRunner(step_timeout=5.0)
    sc = Scenario.from_dict({"name": "t", "steps": [
        mm("a", 2), w("a", 0, 1), pin("a", 0, "p"), pin("a", 1, "q"), {"op": "fork", "proc": "P", "child": "C"},
        pin("a", 0, "c", proc="C"), unpin("p"),
    ]})
    run_ = _Run(["P"], startup_timeout=15.0)
    try:
        addrs: dict[str, int] = {}
        regions: dict[str, tuple[int, int]] = {}
        steps = iter(sc.steps)
        results = [runner._step(run_, sc, addrs, next(steps), regions) for _ in range(5)]
        parent, child = run_.procs["P"].pid, run_.procs["C"].pid
        assert (_rings(parent), _rings(child)) == (2, 0)
        results += [runner._step(run_, sc, addrs, st, regions) for st in steps]
        assert (_rings(parent), _rings(child)) == (1, 1)
        assert [x.errno for x in results] == [0] * len(sc.steps)
    finally:
        run_.close()


def test_pin_unavailable_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    from mmsim.server.tools.conformance import kernel

    _pin_or_skip()
    assert kernel.pin_unavailable() is None
    monkeypatch.setattr(kernel._Libc, "io_uring_setup", lambda self, entries: -errno.EPERM)
    assert (kernel.pin_unavailable() or "").startswith("no io_uring: io_uring_setup: EPERM (kernel.io_uring_disabled ")
    monkeypatch.setattr(kernel, "oracle_unavailable", lambda: "not root")
    assert kernel.pin_unavailable() == "not root"


@pytest.mark.parametrize(
    ("steps", "error"),
    [
        ([mm("a", 1), unpin("x")], "'x' is not a pin made earlier by P"),
        ([mm("a", 1), pin("a", 0, "x"), unpin("x"), unpin("x")], "'x' is unpinned already"),
        ([mm("a", 1), pin("a", 0, "x"), pin("a", 0, "x")], "pin must be a name not used by another pin"),
        ([mm("a", 1), pin("a", 0, "x"), {"op": "fork", "proc": "P", "child": "C"}, unpin("x", proc="C")],
         "'x' is not a pin made earlier by C"),
        ([mm("a", 1), pin("a", 0, "x", pages=0)], "pages must be an integer in [1, 262144]"),
        ([mm("a", 1), {"op": "pin", "proc": "P", "at": ["a", 0], "pin": "x"}], "missing ['pages']"),
    ],
)
def test_pin_steps_are_validated(steps: list[dict[str, Any]], error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        Scenario.from_dict({"name": "t", "steps": steps})
