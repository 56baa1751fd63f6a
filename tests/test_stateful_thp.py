"""Stateful property test of large folios: random sequences of operations on one MemoryModel with
transparent huge pages on (PMD-size THP, mTHP of orders 4 and 2, mostly the huge zero page; drawn
per example: enabled "always" or "madvise" with MADV_HUGEPAGE advice, the rmap protocol, a memory
budget that makes THP charges fail and reclaim run, and preemption for races).

The address space is three fixed slots of two PMDs each at a PMD-aligned base, plus one spare
PMD above them that grows and moves reach, so that faults allocate whole THPs, and whole-PMD
moves, mremaps and operations on part of a huge PMD or of a large folio all happen. The rules:
mmap, munmap, mprotect, madvise (DONTNEED, PAGEOUT, COLD, HUGEPAGE, NOHUGEPAGE and the fork
controls), userfaultfd (un)registration, reads and writes, UFFDIO_MOVE (1 page to 2 PMDs, with and
without ALLOW_SRC_HOLES), UFFDIO_COPY/ZEROPAGE, fork, exit, mremap (shrink, grow, move, DONTUNMAP),
reclaim, rmap walks, and a move racing another operation.

A page-granular shadow kept here predicts the VMA layout (prot, MADV_DONTFORK/WIPEONFORK,
MADV_HUGEPAGE/NOHUGEPAGE) and the value every page must read: the last value written there
(moves, mremaps and fork carry values; munmap, MADV_DONTNEED and a wiped or skipped fork drop
them; reclaim keeps them); every other page reads 0. The userfaultfd registration is read from the
model (mremap unregisters what it moves, merges included).

After every step the model's audit must be clean, the detectors silent, the layout as predicted,
every written page must hold its value (mapped, or swapped out with it), and no other page may hold
anything but zeros. The CI run must also have reached each large-folio path (THP_PATHS).

Profiles: ``HYPOTHESIS_PROFILE=mmsim-ci`` (the default: derandomized, no example database) or
``mmsim-dev`` (random, more examples).
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from mmsim.server.mm.mm_types import VM_DONTCOPY, VM_HUGEPAGE, VM_NOHUGEPAGE, VM_UFFD_FLAGS, VM_WIPEONFORK
from mmsim.server.mm.model import PAGE_SIZE, MemoryLimitExceeded, MemoryModel, MmError, UffdEvent

P = PAGE_SIZE
SHIFT = 12
PMD_PAGES = 512
PMD = PMD_PAGES * P
#: A PMD-aligned base; three adjacent slots of two PMDs each (they may merge), then a spare PMD.
BASE = 0x40000000
SLOT_PAGES = 2 * PMD_PAGES
NSLOTS = 3
SLOTS = [BASE + i * SLOT_PAGES * P for i in range(NSLOTS)]
WINDOW_PAGES = NSLOTS * SLOT_PAGES + PMD_PAGES
V0 = BASE >> SHIFT
#: UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES
ALLOW_SRC_HOLES = 2
#: A call that takes longer than this (event-loop seconds) is taken for a hang.
CALL_TIMEOUT = 30.0

settings.register_profile(
    "mmsim-thp-ci",
    max_examples=100,
    stateful_step_count=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "mmsim-thp-dev",
    max_examples=400,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = "mmsim-thp-dev" if os.environ.get("HYPOTHESIS_PROFILE") == "mmsim-dev" else "mmsim-thp-ci"

#: Errors each call may legitimately give (what the kernel's syscall could return here).
ERRNOS = {
    "mmap": {errno.EEXIST},
    "munmap": set(),
    "mprotect": {errno.ENOMEM},
    "madvise": {errno.ENOMEM},
    "mremap": {errno.EINVAL, errno.EFAULT, errno.ENOMEM},
    "reclaim": set(),
    "create_process": set(),
    "uffd_register": {errno.EINVAL, errno.EBUSY},
    "uffd_unregister": {errno.EINVAL},
    "read": {errno.EFAULT},
    "write": {errno.EFAULT},
    "fork": set(),
    "exit": set(),
    "move": {errno.EINVAL, errno.ENOENT, errno.EEXIST, errno.EBUSY, errno.EAGAIN},
    "fill": {errno.EINVAL, errno.ENOENT, errno.EEXIST, errno.EAGAIN},
    "walk": {errno.ENOENT},
}

#: What expect_access answers for a missing page in a MISSING range, and for a write to a uffd-wp
#: page in a WP range: the access blocks (a userfault).
BLOCKS = -1
BLOCKS_WP = -2

#: Page offsets in a slot that sit at or next to a folio's or a PMD's edge.
EDGES = [0, 1, 3, 4, 15, 16, 17, 255, 256, 508, 510, 511, 512, 513, 1020, 1023]
offsets = st.one_of(st.sampled_from(EDGES), st.integers(0, SLOT_PAGES - 1))
picks = st.integers(0, 255)

#: The arguments of a move (the move rule's, and the race rule's move).
MOVE_ARGS: Any = dict(
    p=picks,
    src_how=st.sampled_from(["value", "value", "huge", "huge", "any"]),
    dst_how=st.sampled_from(["free", "free", "free", "any"]),
    si=picks, soff=offsets, di=picks, doff=offsets,
    align=st.sampled_from([True, True, False]),
    npages=st.sampled_from([1, 1, 2, 3, 16, 17, 511, 512, 512, 512, 513, 1024]),
    fit=st.sampled_from([True, True, True, False]),
    holes=st.booleans(),
)

#: (prot, dontfork, wipeonfork, THP advice: None, "hugepage" or "nohugepage") of a mapped page.
PageState = tuple[str, bool, bool, "str | None"]

#: The model's counters of the large-folio paths, summed over a run: the CI run must reach each of
#: THP_PATHS (the others, rarer, are counted for the failure message).
REACHED: Counter[str] = Counter()
THP_PATHS = (
    "thp_fault_alloc", "mthp_fault_alloc", "thp_split_pmd", "thp_split_page", "thp_fork_copy", "thp_move_pmd",
    "thp_mremap_move",
)
THP_COUNTED = (*THP_PATHS, "thp_zero_page_fault", "thp_cow_split", "thp_wp_reuse", "thp_fault_fallback")


def oom(err: MmError | None) -> bool:
    """The call failed for the memory budget (ENOMEM before anything changed)."""
    return isinstance(err, MemoryLimitExceeded)


@dataclass
class MovePlan:
    """A move's process, window pages and length, and which pages of its ranges were populated."""

    pid: int
    src: int
    dst: int
    npages: int
    holes: bool
    pop: dict[int, bool]


class ThpMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.m: MemoryModel | None = None
        self.pids: list[int] = []
        self.layout: dict[int, list[PageState | None]] = {}  # pid -> window page -> state
        self.data: dict[int, dict[int, int]] = {}  # pid -> vpn -> value (pages written)
        self.next_value = 1
        self.budget: int | None = None
        self.racy = False

    # -- helpers
    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, CALL_TIMEOUT))

    def call(self, op: str, coro: Any) -> tuple[Any, MmError | None]:
        """Run a model call: its result, or the error it may legitimately give."""
        result: tuple[Any, MmError | None] = self.run(self.catch(op, coro))
        return result

    async def catch(self, op: str, coro: Any) -> tuple[Any, MmError | None]:
        try:
            return await coro, None
        except MemoryLimitExceeded as e:
            assert self.budget is not None, e
            event(f"{op}: out of memory")
            return None, e
        except MmError as e:
            assert e.errno in ERRNOS[op], (op, e.errno, e)
            event(f"{op}: {errno.errorcode[e.errno]}")
            return None, e

    @property
    def model(self) -> MemoryModel:
        assert self.m is not None
        return self.m

    def pid(self, i: int) -> int:
        return self.pids[i % len(self.pids)]

    def mapped(self, pid: int) -> list[int]:
        return [i for i, s in enumerate(self.layout[pid]) if s is not None]

    def page(self, pid: int, how: int, i: int, off: int) -> int:
        """A window page index: a mapped one, one holding a value or near one (in its folio,
        perhaps), one mapped by a huge PMD (mostly a write-protected one: shared after a fork),
        one of a PMD with nothing mapped yet (1 in 4); 1 in 8 a slot's ``off``th."""
        if how % 4 in (1, 2) and self.data[pid]:
            vpns = sorted(self.data[pid])
            w = vpns[i % len(vpns)] - V0
            return w if how % 4 == 1 else min(max(w + off % 33 - 16, 0), WINDOW_PAGES - 1)
        mm = self.model.processes[pid]
        huge = sorted(mm.huge_pmds, key=lambda idx: (mm.huge_pmds[idx].write, idx))
        if how % 8 == 6 and huge:
            return (huge[0 if i % 4 else i % len(huge)] << 9) - V0 + off % PMD_PAGES
        mapped = self.mapped(pid)
        if how % 8 in (0, 4):
            empty = [w for w in mapped if (V0 + w) >> 9 not in mm.pgtables and (V0 + w) >> 9 not in mm.huge_pmds]
            mapped = empty or mapped
        if how % 8 != 7 and mapped:
            return mapped[(i + off) % len(mapped)]
        return (i % NSLOTS) * SLOT_PAGES + off

    def span(self, pid: int, kind: str, how: int, i: int, off: int, n: int) -> tuple[int, int]:
        """(first window page, pages) of a range: whole PMDs, one page, a few pages across a PMD
        boundary, or anything; mostly where something is mapped."""
        lay = self.layout[pid]
        if kind in ("pmd", "cross"):
            pmds = list(range(WINDOW_PAGES // PMD_PAGES))
            if how % 8 != 7:
                pmds = [k for k in pmds if any(lay[k * PMD_PAGES : (k + 1) * PMD_PAGES])] or pmds
            pmd = pmds[i % len(pmds)]
            if kind == "pmd":
                return pmd * PMD_PAGES, PMD_PAGES * (1 + n % 2)
            edge = max(pmd, 1) * PMD_PAGES
            before = 1 + n % 16
            return edge - before, before + 1 + (n // 16) % 16
        if kind == "page":
            return self.page(pid, how, i, off), 1
        first = self.page(pid, how, i, off)
        return first, 1 + n % [8, 64, 600, SLOT_PAGES + 100][(n >> 8) % 4]

    def state_of(self, pid: int, vpn: int) -> PageState | None:
        w = vpn - V0
        return self.layout[pid][w] if 0 <= w < WINDOW_PAGES else None

    def uffd_mode(self, pid: int, addr: int) -> str | None:
        mm = self.model.processes[pid]
        vma = mm.vma_lookup(addr)
        return None if vma is None else next(
            (v.uffd for v in self.model.vmas(pid) if v.start == vma.start), None
        )

    def populated(self, pid: int, addr: int, npages: int) -> list[bool]:
        """Per page: present or swapped out (pagemap, no fault)."""
        return [e.present or e.swap for e in self.model.pagemap(pid, addr, npages * P)]

    def drop(self, pid: int, first: int, npages: int) -> None:
        """Window pages [first, first + npages) unmapped: no layout, no values."""
        lo, hi = max(first, 0), min(first + npages, WINDOW_PAGES)
        if lo >= hi:
            return
        self.layout[pid][lo:hi] = [None] * (hi - lo)
        self.zap(pid, lo, hi - lo)

    def zap(self, pid: int, first: int, npages: int) -> None:
        """Window pages [first, first + npages) lose their values."""
        data = self.data[pid]
        for v in [v for v in data if first <= v - V0 < first + npages]:
            del data[v]

    # -- processes
    @initialize(
        protocol=st.sampled_from(["recheck", "recheck", "recheck-slow-only", "no-recheck", "folio-lock"]),
        thp=st.sampled_from(["always", "always", "always", "madvise"]),
        mthp=st.sampled_from(["always", "inherit"]),
        zero_page=st.sampled_from([True, True, False]),
        advise=st.booleans(),
        writes=st.lists(offsets, min_size=1, max_size=6),
        register=st.sampled_from(["missing", "missing", "wp", "missing+wp", None]),
        budget=st.sampled_from([None, None, None, None, 3 << 18, 2 << 20]),
        preempt=st.sampled_from([0.0, 0.0, 0.3]),
        seed=picks,
    )
    def first_process(
        self, protocol: str, thp: str, mthp: str, zero_page: bool, advise: bool, writes: list[int],
        register: str | None, budget: int | None, preempt: float, seed: int,
    ) -> None:
        """The model, and a process with slots 0 and 2 mapped (slot 0 written here and there,
        perhaps advised MADV_HUGEPAGE; slot 2 perhaps registered), so that moves, splits and forks
        have large folios to work on from the first step. With a ``budget`` (max_memory) the THP
        and mTHP charges fail and fall back, reclaim runs, and any call may fail with ENOMEM,
        changing nothing."""
        self.budget = budget
        # Races only where the protocol is the kernel's (the older ones have the walk's bug).
        self.racy = preempt > 0 and protocol in ("recheck", "folio-lock")
        self.m = MemoryModel(
            protocol=protocol, thp=thp, thp_orders={9: "inherit", 4: mthp, 2: "always"}, thp_use_zero_page=zero_page,
            max_memory=budget, preempt=preempt if self.racy else 0.0, seed=seed,
        )
        event(f"{protocol}, thp={thp} mTHP-64K={mthp} zero_page={zero_page} budget={budget} racy={self.racy}")
        self.create_process()
        self.mmap(0, 0, 0, SLOT_PAGES, "rw", None)
        self.mmap(0, 2, 0, SLOT_PAGES, "rw", None)
        if advise:
            self.madvise(0, "pmd", 3, 0, 0, 1, "hugepage")  # window pages [0, 1024): slot 0
        for off in writes:
            self.write_at(self.pids[0], SLOTS[0] + off * P)
        if register is not None:
            _, err = self.call("uffd_register", self.model.uffd_register(self.pids[0], SLOTS[2], SLOT_PAGES * P,
                                                                        register))
            assert err is None or oom(err), err

    @precondition(lambda self: len(self.pids) < 4)
    @rule()
    def create_process(self) -> None:
        pid, err = self.call("create_process", self.model.create_process())
        if oom(err):
            return
        assert pid not in self.pids
        self.pids.append(pid)
        self.layout[pid] = [None] * WINDOW_PAGES
        self.data[pid] = {}

    @precondition(lambda self: self.pids and len(self.pids) < 5)
    @rule(p=picks)
    def fork(self, p: int) -> None:
        """fork, mostly of a process with a huge PMD (shared with the child, write-protected)."""
        parent = self.pid(p)
        if p % 4:
            parent = next((q for q in self.pids[p % len(self.pids):] if self.model.processes[q].huge_pmds), parent)
        child, err = self.call("fork", self.model.fork(parent))
        if oom(err):
            return
        assert err is None, err
        assert child not in self.pids
        self.pids.append(child)
        lay = [s if s is not None and not s[1] else None for s in self.layout[parent]]
        self.layout[child] = lay
        self.data[child] = {v: x for v, x in self.data[parent].items() if (s := lay[v - V0]) and not s[2]}
        event("fork: with values" if self.data[child] else "fork: no values")

    @precondition(lambda self: len(self.pids) > 1)
    @rule(p=picks)
    def exit(self, p: int) -> None:
        """A process exits: half the time the newest (a child after fork, whose parent's THPs
        are then write-protected and its own again)."""
        pid = self.pids[-1] if p % 2 else self.pid(p // 2)
        _, err = self.call("exit", self.model.exit(pid))
        assert err is None, err
        self.pids.remove(pid)
        del self.layout[pid], self.data[pid]

    # -- mappings
    @precondition(lambda self: self.pids)
    @rule(
        p=picks,
        slot=st.integers(0, NSLOTS - 1),
        off=st.sampled_from([0, 0, 1, 511, 512, 700]),
        npages=st.sampled_from([SLOT_PAGES, SLOT_PAGES, PMD_PAGES, PMD_PAGES + 1, 1, 16, 300]),
        prot=st.sampled_from(["rw", "rw", "rw", "r"]),
        uffd=st.sampled_from([None, "missing", "missing", "wp"]),
    )
    def mmap(self, p: int, slot: int, off: int, npages: int, prot: str, uffd: str | None) -> None:
        """mmap at a fixed address (MAP_FIXED_NOREPLACE), perhaps registered at once."""
        pid = self.pid(p)
        first = slot * SLOT_PAGES + off
        npages = min(npages, WINDOW_PAGES - first)
        info, err = self.call("mmap", self.model.mmap(pid, npages * P, prot=prot, addr=BASE + first * P, uffd=uffd))
        if oom(err):
            return
        if any(self.layout[pid][first : first + npages]):
            assert err is not None and err.errno == errno.EEXIST, err
            return
        assert err is None, err
        assert info.start == BASE + first * P and info.end - info.start == npages * P and info.prot == prot
        self.layout[pid][first : first + npages] = [(prot, False, False, None)] * npages

    @precondition(lambda self: self.pids)
    @rule(
        p=picks, kind=st.sampled_from(["pmd", "page", "cross", "any"]), how=picks, i=picks, off=offsets,
        n=st.integers(0, 2047),
    )
    def munmap(self, p: int, kind: str, how: int, i: int, off: int, n: int) -> None:
        pid = self.pid(p)
        first, npages = self.span(pid, kind, how, i, off, n)
        _, err = self.call("munmap", self.model.munmap(pid, BASE + first * P, npages * P))
        if oom(err):
            return
        assert err is None, err
        self.drop(pid, first, npages)

    @precondition(lambda self: self.pids)
    @rule(
        p=picks, kind=st.sampled_from(["pmd", "page", "cross", "any"]), how=picks, i=picks, off=offsets,
        n=st.integers(0, 2047), prot=st.sampled_from(["r", "rw", "rw", "rw", "none"]),
    )
    def mprotect(self, p: int, kind: str, how: int, i: int, off: int, n: int, prot: str) -> None:
        pid = self.pid(p)
        first, npages = self.span(pid, kind, how, i, off, n)
        _, err = self.call("mprotect", self.model.mprotect(pid, BASE + first * P, npages * P, prot))
        if oom(err):
            return
        lay = self.layout[pid]
        # The VMAs up to the first hole change; a hole anywhere is ENOMEM.
        k = 0
        while k < npages and first + k < WINDOW_PAGES and lay[first + k] is not None:
            _, df, wipe, thp = lay[first + k]  # type: ignore[misc]
            lay[first + k] = (prot, df, wipe, thp)
            k += 1
        if k == npages:
            assert err is None, err
        else:
            assert err is not None and err.errno == errno.ENOMEM, err

    @precondition(lambda self: self.pids)
    @rule(
        p=picks, kind=st.sampled_from(["pmd", "page", "cross", "any"]), how=picks, i=picks, off=offsets,
        n=st.integers(0, 2047),
        advice=st.sampled_from(["dontneed", "pageout", "pageout", "cold", "hugepage", "nohugepage", "dontfork",
                                "dofork", "wipeonfork", "keeponfork"]),
    )
    def madvise(self, p: int, kind: str, how: int, i: int, off: int, n: int, advice: str) -> None:
        pid = self.pid(p)
        first, npages = self.span(pid, kind, how, i, off, n)
        _, err = self.call("madvise", self.model.madvise(pid, BASE + first * P, npages * P, advice))
        if oom(err):
            return
        lay = self.layout[pid]
        inside = range(first, min(first + npages, WINDOW_PAGES))
        if all(lay[w] is not None for w in inside) and first + npages <= WINDOW_PAGES:
            assert err is None, err
        else:
            assert err is not None and err.errno == errno.ENOMEM, err
        # The mapped part changes either way (the kernel applies it, then reports ENOMEM).
        if advice == "dontneed":
            self.zap(pid, first, npages)
        elif advice in ("pageout", "cold"):
            event(f"{advice}: {sum(e.swap for e in self.model.pagemap(pid, BASE + first * P, npages * P))} swapped")
        else:
            for w in inside:
                s = lay[w]
                if s is None:
                    continue
                prot, df, wipe, thp = s
                if advice in ("dontfork", "dofork"):
                    df = advice == "dontfork"
                elif advice in ("wipeonfork", "keeponfork"):
                    wipe = advice == "wipeonfork"
                else:
                    thp = advice
                lay[w] = (prot, df, wipe, thp)

    @precondition(lambda self: self.pids)
    @rule(
        p=picks, kind=st.sampled_from(["pmd", "pmd", "page", "cross", "any"]), how=picks, i=picks, off=offsets,
        n=st.integers(0, 2047), mode=st.sampled_from(["missing", "wp", "missing+wp", "unregister"]),
    )
    def uffd_register(self, p: int, kind: str, how: int, i: int, off: int, n: int, mode: str) -> None:
        pid = self.pid(p)
        first, npages = self.span(pid, kind, how, i, off, n)
        addr, length = BASE + first * P, npages * P
        if mode == "unregister":
            _, err = self.call("uffd_unregister", self.model.uffd_unregister(pid, addr, length))
        else:
            _, err = self.call("uffd_register", self.model.uffd_register(pid, addr, length, mode))
        if oom(err):
            return
        if not any(self.layout[pid][max(first, 0) : first + npages]):
            assert err is not None and err.errno == errno.EINVAL, err
        else:
            assert err is None, err

    @precondition(lambda self: any(self.model.processes[pid].huge_pmds for pid in self.pids))
    @rule(
        p=picks, i=picks, off=offsets, n=st.integers(0, 4095), slot=st.integers(0, NSLOTS - 1),
        dontunmap=st.sampled_from([False, False, True]),
    )
    def mremap_pmd(self, p: int, i: int, off: int, n: int, slot: int, dontunmap: bool) -> None:
        """mremap (MREMAP_FIXED, perhaps DONTUNMAP) of a range from a huge PMD to a PMD boundary,
        where a process has one: the huge PMD moves whole."""
        turn = self.pids[p % len(self.pids):] + self.pids[: p % len(self.pids)]
        pid = next(q for q in turn if self.model.processes[q].huge_pmds)
        self.mremap(self.pids.index(pid), i, off, "dontunmap" if dontunmap else "move", n | 1, slot, True, 0)

    @precondition(lambda self: self.pids)
    @rule(
        p=picks, i=picks, off=offsets, kind=st.sampled_from(["shrink", "grow", "move", "move", "dontunmap"]),
        n=st.integers(0, 4095), slot=st.integers(0, NSLOTS - 1), aligned=st.sampled_from([True, False]),
        toff=st.sampled_from([1, 511, 513]),
    )
    def mremap(self, p: int, i: int, off: int, kind: str, n: int, slot: int, aligned: bool, toff: int) -> None:
        """mremap of a range inside one VMA (mostly one with a huge PMD): shrink, grow in place, or
        move (MREMAP_FIXED, with or without a size change; MREMAP_DONTUNMAP) to a slot, from and to
        a PMD boundary (``aligned``) or not."""
        pid = self.pid(p)
        mm = self.model.processes[pid]
        vmas = self.model.vmas(pid)
        if n % 4:
            vmas = [v for v in vmas if mm.huge_pmds_in(v.start, v.end)] or vmas
        if not vmas:
            return
        vma = vmas[i % len(vmas)]
        vfirst, vpages = (vma.start >> SHIFT) - V0, (vma.end - vma.start) >> SHIFT
        lay = self.layout[pid]
        if aligned:  # from a huge PMD (or the first PMD boundary) in the VMA, to a PMD boundary
            huge = mm.huge_pmds_in(vma.start, vma.end)
            a = (huge[off % len(huge)] << 9) - V0 - vfirst if huge else (-(vfirst % PMD_PAGES)) % PMD_PAGES
            a = a if a < vpages else 0
            toff = PMD_PAGES * (off % 2)
            old = [vpages - a, min(PMD_PAGES, vpages - a), min(SLOT_PAGES, vpages - a)][n % 3]
        else:
            a = off % vpages
            old = [vpages - a, min(PMD_PAGES, vpages - a), 1 + n % (vpages - a)][n % 3]
        addr = vma.start + a * P
        first = vfirst + a
        state = lay[first]
        assert state is not None
        if kind == "shrink":
            if old < 2:
                return
            new = 1 + (n >> 2) % (old - 1)
            _, err = self.call("mremap", self.model.mremap(pid, addr, old * P, new * P))
            if oom(err):
                return
            assert err is None, err
            self.drop(pid, first + new, old - new)
            return
        if kind == "grow":
            new = old + [1, 15, PMD_PAGES - 1, PMD_PAGES, SLOT_PAGES][(n >> 2) % 5]
            if first + new > WINDOW_PAGES:
                return
            _, err = self.call("mremap", self.model.mremap(pid, addr, old * P, new * P))
            if oom(err):
                return
            if a + old == vpages and not any(lay[first + old : first + new]):
                assert err is None, err
                lay[first + old : first + new] = [state] * (new - old)
                event("mremap: grown in place")
            else:
                assert err is not None and err.errno == errno.ENOMEM, err
            return
        dontunmap = kind == "dontunmap"
        new = old if dontunmap or n % 4 else max(1, old + [1, -1, PMD_PAGES][(n >> 2) % 3])
        # The first slot from ``slot`` on where the new range fits the window and does not overlap
        # the old one (else that slot: EINVAL, or nothing).
        fits = [t for k in range(NSLOTS) if (t := ((slot + k) % NSLOTS) * SLOT_PAGES + toff) + new <= WINDOW_PAGES]
        to = next((t for t in fits if not (t < first + old and first < t + new)), fits[0] if fits else None)
        if to is None:
            return
        _, err = self.call("mremap", self.model.mremap(
            pid, addr, old * P, new * P, maymove=True, dontunmap=dontunmap, fixed=BASE + to * P
        ))
        if oom(err):
            return
        if to < first + old and first < to + new:
            assert err is not None and err.errno == errno.EINVAL, err
            return
        assert err is None, err
        moved = min(old, new)
        states = lay[first : first + moved]
        values = {v - first - V0: x for v, x in self.data[pid].items() if first <= v - V0 < first + moved}
        self.drop(pid, to, new)  # MREMAP_FIXED unmaps the destination first
        if new < old:
            self.drop(pid, first + new, old - new)
        if dontunmap:
            self.zap(pid, first, old)  # the old range stays mapped, empty
        else:
            self.drop(pid, first, moved)
        lay[to : to + moved] = states
        if new > old:
            lay[to + old : to + new] = [state] * (new - old)  # the new tail, not populated
        for k, x in values.items():
            self.data[pid][V0 + to + k] = x
        event(f"mremap: {kind}{' PMD-aligned' if not (to - first) % PMD_PAGES else ''}")

    # -- accesses
    def expect_access(self, pid: int, vpn: int, write: bool) -> int | None:
        """The errno an access must fail with, BLOCKS, or None."""
        s = self.state_of(pid, vpn)
        if s is None or s[0] == "none" or (write and s[0] != "rw"):
            return errno.EFAULT
        mode = self.uffd_mode(pid, vpn << SHIFT)
        if mode is None:
            return None
        [e] = self.model.pagemap(pid, vpn << SHIFT, P)
        if "missing" in mode and not (e.present or e.swap):
            return BLOCKS
        if write and "wp" in mode and e.uffd_wp:
            return BLOCKS_WP
        return None

    def blocks(self, pid: int, vpn: int, write: bool, wp: bool, coro: Any) -> None:
        """The access must block with one event for its page; it is then abandoned (cancelled),
        which must withdraw the event and change nothing."""
        m = self.model

        async def go() -> None:
            task = asyncio.ensure_future(coro)
            for _ in range(1000):
                await asyncio.sleep(0)
                if task.done() or m.uffd_pending(pid):
                    break
            assert not task.done(), f"an access to a missing page of a MISSING range returned: {task}"
            assert m.uffd_pending(pid) == [UffdEvent(vpn << SHIFT, write, wp)]
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            else:
                raise AssertionError("a cancelled blocked access completed")
            assert m.uffd_pending(pid) == []

        self.run(go())
        event(f"{'write' if write else 'read'}: blocks{' (wp)' if wp else ''}")

    @precondition(lambda self: self.pids)
    @rule(p=picks, how=picks, i=picks, off=offsets)
    def read(self, p: int, how: int, i: int, off: int) -> None:
        pid = self.pid(p)
        vpn = V0 + self.page(pid, how, i, off)
        addr = vpn << SHIFT
        want = self.expect_access(pid, vpn, False)
        if want == BLOCKS:
            self.blocks(pid, vpn, False, False, self.model.read(pid, addr))
            return
        swapped = self.model.pagemap(pid, addr, P)[0].swap
        value, err = self.call("read", self.model.read(pid, addr))
        if oom(err):
            return
        if want is not None:
            assert err is not None and err.errno == want, (err, want)
            return
        assert err is None, err
        assert value == self.data[pid].get(vpn, 0), (hex(addr), value, self.data[pid].get(vpn, 0))
        if swapped:
            event("read: swapped in")

    @precondition(lambda self: self.pids)
    @rule(p=picks, how=picks, i=picks, off=offsets, npages=st.sampled_from([1, 1, 1, 2, 5, 17]))
    def write(self, p: int, how: int, i: int, off: int, npages: int) -> None:
        pid = self.pid(p)
        first = self.page(pid, how, i, off)
        for k in range(min(npages, WINDOW_PAGES - first)):
            self.write_at(pid, BASE + (first + k) * P)

    @precondition(lambda self: any(self.model.processes[pid].huge_pmds for pid in self.pids))
    @rule(p=picks, i=picks, off=offsets)
    def write_huge(self, p: int, i: int, off: int) -> None:
        """A write to a page mapped by a huge PMD, mostly a write-protected one (after a fork): the
        THP is reused whole, or its PMD split and the page copied."""
        turn = self.pids[p % len(self.pids):] + self.pids[: p % len(self.pids)]
        has = [q for q in turn if self.model.processes[q].huge_pmds]
        pid = next((q for q in has if not all(h.write for h in self.model.processes[q].huge_pmds.values())), has[0])
        self.write_at(pid, BASE + self.page(pid, 6, i, off) * P)

    def write_at(self, pid: int, addr: int) -> None:
        vpn = addr >> SHIFT
        value = self.next_value
        self.next_value += 1
        want = self.expect_access(pid, vpn, True)
        if want in (BLOCKS, BLOCKS_WP):
            self.blocks(pid, vpn, True, want == BLOCKS_WP, self.model.write(pid, addr, value))
            return
        _, err = self.call("write", self.model.write(pid, addr, value))
        if oom(err):
            return
        if want is not None:
            assert err is not None and err.errno == want, (err, want)
            return
        assert err is None, err
        self.data[pid][vpn] = value

    # -- UFFDIO_MOVE
    @precondition(lambda self: self.pids)
    @rule(**MOVE_ARGS)
    def move(
        self, p: int, src_how: str, dst_how: str, si: int, soff: int, di: int, doff: int, align: bool, npages: int,
        fit: bool, holes: bool,
    ) -> None:
        """UFFDIO_MOVE of 1 page to 2 PMDs, from a written page, a huge PMD or anywhere, to a free
        page of a registered range or anywhere, PMD-aligned or not; mostly cut to ``fit`` both
        VMAs."""
        plan = self.plan_move(p, src_how, dst_how, si, soff, di, doff, align, npages, fit, holes)
        self.settle_move(plan, self.call("move", self.start_move(plan)))

    @precondition(lambda self: self.pids)
    @rule(p=picks, si=picks, di=picks, two=st.booleans(), holes=st.booleans())
    def move_pmd(self, p: int, si: int, di: int, two: bool, holes: bool) -> None:
        """UFFDIO_MOVE of one or two whole PMDs from a huge PMD to a PMD of a registered range
        with nothing mapped (the huge PMD moves as it is), where a process has both."""
        turn = self.pids[p % len(self.pids):] + self.pids[: p % len(self.pids)]
        pid = next((q for q in turn if self.model.processes[q].huge_pmds and self.free_pmds(q)), turn[0])
        plan = self.plan_move(p, "huge", "free", si, 0, di, 0, True, PMD_PAGES * (1 + two), True, holes, pid=pid)
        self.settle_move(plan, self.call("move", self.start_move(plan)))

    def plan_move(
        self, p: int, src_how: str, dst_how: str, si: int, soff: int, di: int, doff: int, align: bool, npages: int,
        fit: bool, holes: bool, pid: int | None = None,
    ) -> MovePlan:
        """Pick a move's process (unless given), src, dst and length; note which pages of both
        ranges are populated before it."""
        m = self.model
        free: list[int] = []
        if pid is not None:
            free = self.free_registered(pid) if dst_how == "free" else []
        else:
            pid = self.pid(p)
            if dst_how == "free":  # the first process with a free registered page (and a huge PMD to move)
                turn = self.pids[p % len(self.pids):] + self.pids[: p % len(self.pids)]
                found = [(q, f) for q in turn if (f := self.free_registered(q))]
                found.sort(key=lambda qf: src_how == "huge" and not m.processes[qf[0]].huge_pmds)
                if found:
                    pid, free = found[0]
        mm = m.processes[pid]
        huge = sorted((idx << 9) - V0 for idx in mm.huge_pmds)
        if src_how == "huge" and huge:
            src = huge[si % len(huge)]
        elif src_how != "any" and self.data[pid]:
            src = sorted(self.data[pid])[si % len(self.data[pid])] - V0
        else:
            src = self.page(pid, 3, si, soff)
        if align:
            src -= src % PMD_PAGES
            free = self.free_pmds(pid) or [w for w in free if not w % PMD_PAGES] or free
            if src_how == "huge":  # whole PMDs
                npages = PMD_PAGES * (1 + npages % 2)
        dst = free[(di + doff) % len(free)] if free else self.page(pid, 0, di, doff)
        npages = min(npages, WINDOW_PAGES - max(src, dst))
        if fit:
            for w in (src, dst):
                vma = mm.vma_lookup(BASE + w * P)
                if vma is not None:
                    npages = min(npages, ((vma.end - BASE) >> SHIFT) - w)
        # Populated pages of both ranges, before: the move walks upwards page by page, so where
        # the ranges overlap a page moved to dst may be moved again as src (no overlap check).
        pop = dict(zip(range(src, src + npages), self.populated(pid, BASE + src * P, npages), strict=True))
        pop.update(zip(range(dst, dst + npages), self.populated(pid, BASE + dst * P, npages), strict=True))
        return MovePlan(pid, src, dst, npages, holes, pop)

    def start_move(self, plan: MovePlan) -> Any:
        return self.model.move(plan.pid, BASE + plan.dst * P, BASE + plan.src * P, plan.npages * P,
                               ALLOW_SRC_HOLES if plan.holes else 0)

    def settle_move(self, plan: MovePlan, result: tuple[Any, MmError | None]) -> None:
        """Check a move's result against its plan, and carry the values it moved."""
        moved, err = result
        src, dst, npages, holes, pop = plan.src, plan.dst, plan.npages, plan.holes, plan.pop
        if err is None:
            assert moved == npages * P
            nbytes = moved
        else:
            nbytes = err.moved
            if err.errno != errno.EAGAIN:
                assert nbytes == 0, "an error with progress is reported as EAGAIN"
            assert 0 <= nbytes < npages * P and nbytes % P == 0
        whole = not src % PMD_PAGES and not dst % PMD_PAGES and npages >= PMD_PAGES
        event(f"move: {'ok' if err is None else 'partial' if nbytes else 'failed'}"
              f"{' PMD-aligned' if whole else ''}{' holes' if holes else ''}")
        data, lay = self.data[plan.pid], self.layout[plan.pid]
        for k in range(nbytes >> SHIFT):
            s, d = src + k, dst + k
            assert lay[d] is not None and lay[s] is not None, "moved outside a mapping"
            assert not pop[d], f"moved onto a populated dst page {BASE + d * P:#x} (EEXIST expected)"
            assert pop[s] or holes, f"a src hole at {BASE + s * P:#x} moved without ALLOW_SRC_HOLES (ENOENT expected)"
            pop[d], pop[s] = pop[s], False
            if V0 + s in data:
                data[V0 + d] = data.pop(V0 + s)

    # -- races
    @precondition(lambda self: self.pids and self.racy)
    @rule(
        other=st.sampled_from(["reclaim", "pageout", "cold", "walk", "write", "read", "move"]),
        oi=picks, ooff=offsets, on=st.integers(0, 2047), **MOVE_ARGS,
    )
    def race(
        self, other: str, oi: int, ooff: int, on: int, p: int, src_how: str, dst_how: str, si: int, soff: int,
        di: int, doff: int, align: bool, npages: int, fit: bool, holes: bool,
    ) -> None:
        """A move and, at the same time (preempted at the model's points), an operation whose
        outcome does not depend on the interleaving: reclaim, MADV_PAGEOUT or MADV_COLD of a range
        around the move's src, an rmap walk, an access to a page of another PMD, or a second move
        of other pages."""
        plan = self.plan_move(p, src_how, dst_how, si, soff, di, doff, align, npages, fit, holes)
        pid, m = plan.pid, self.model
        busy = {w // PMD_PAGES for w in plan.pop}
        away = [w for w in self.mapped(pid) if w // PMD_PAGES not in busy]  # pages of other PMDs
        w = away[(oi + ooff) % len(away)] if away else self.page(pid, 1, oi, ooff)
        plan2: MovePlan | None = None
        if other == "move":
            plan2 = self.plan_move(
                oi, "value", "free", oi, ooff, on, ooff, False, 1 + on % 17, True, bool(on & 1), pid=pid
            )
            if busy & {w // PMD_PAGES for w in plan2.pop}:
                plan2, other = None, "reclaim"
        elif other in ("write", "read"):
            want = self.expect_access(pid, V0 + w, other == "write")
            if w // PMD_PAGES in busy or want in (BLOCKS, BLOCKS_WP):
                other = "reclaim"
        value = self.next_value
        self.next_value += 1
        first, length = self.span(pid, "any", 1, si, soff, on)
        partner = {
            "reclaim": lambda: m.reclaim(1 + on % 64),
            "pageout": lambda: m.madvise(pid, BASE + first * P, length * P, "pageout"),
            "cold": lambda: m.madvise(pid, BASE + first * P, length * P, "cold"),
            "walk": lambda: m.walk(pid, BASE + w * P, blocking=bool(on & 1)),
            "write": lambda: m.write(pid, BASE + w * P, value),
            "read": lambda: m.read(pid, BASE + w * P),
            "move": lambda: self.start_move(plan2),  # type: ignore[arg-type]
        }[other]
        op = {"pageout": "madvise", "cold": "madvise"}.get(other, other)

        async def both() -> tuple[tuple[Any, MmError | None], tuple[Any, MmError | None]]:
            return await asyncio.gather(self.catch("move", self.start_move(plan)), self.catch(op, partner()))

        first_result, (result, err) = self.run(both())
        event(f"race: move with {other}")
        self.settle_move(plan, first_result)
        if oom(err):
            return
        if other == "move":
            assert plan2 is not None
            self.settle_move(plan2, (result, err))
        elif other in ("write", "read"):
            want = self.expect_access(pid, V0 + w, other == "write")
            if want is not None:
                assert err is not None and err.errno == want, (err, want)
            else:
                assert err is None, err
                if other == "write":
                    self.data[pid][V0 + w] = value
                else:
                    assert result == self.data[pid].get(V0 + w, 0), (hex(BASE + w * P), result)
        elif other in ("pageout", "cold"):
            lay = self.layout[pid]
            holed = first + length > WINDOW_PAGES or not all(lay[first : first + length])
            assert (err is not None and err.errno == errno.ENOMEM) if holed else err is None, err
        elif other == "reclaim":
            assert err is None, err

    # -- UFFDIO_COPY, UFFDIO_ZEROPAGE
    @precondition(lambda self: self.pids)
    @rule(
        p=picks, i=picks, npages=st.sampled_from([1, 1, 4, 16, 600]),
        how=st.sampled_from(["copy", "copy", "copy-wp", "zeropage"]), free=st.sampled_from([True, True, False]),
    )
    def fill(self, p: int, i: int, npages: int, how: str, free: bool) -> None:
        """UFFDIO_COPY (perhaps MODE_WP) or UFFDIO_ZEROPAGE of some pages, mostly from a free page
        of a registered range."""
        pid = self.pid(p)
        m = self.model
        pages = self.free_registered(pid) if free else []
        dst = pages[i % len(pages)] if pages else self.page(pid, 0, i, i)
        npages = min(npages, WINDOW_PAGES - dst)
        addr = BASE + dst * P
        pop = self.populated(pid, addr, npages)
        values = list(range(self.next_value, self.next_value + npages))
        self.next_value += npages
        if how == "zeropage":
            done, err = self.call("fill", m.uffd_zeropage(pid, addr, npages * P))
        else:
            done, err = self.call("fill", m.uffd_copy(pid, addr, npages * P, values, wp=how == "copy-wp"))
        if err is not None:
            done = err.moved
            if err.errno != errno.EAGAIN:
                assert done == 0, "an error with progress is reported as EAGAIN"
        assert 0 <= done <= npages * P and done % P == 0
        mode = self.uffd_mode(pid, addr)
        assert not done or mode is not None, "filled an unregistered range"
        event(f"{how}: {'ok' if err is None else 'partial' if done else errno.errorcode[err.errno or 0]}")
        for k in range(done >> SHIFT):
            assert self.layout[pid][dst + k] is not None and not pop[k], f"filled a populated page {addr + k * P:#x}"
            if how != "zeropage":
                self.data[pid][V0 + dst + k] = values[k]

    def free_pmds(self, pid: int) -> list[int]:
        """The first window pages of the PMDs wholly inside registered VMAs with no page table and
        no huge PMD (where a huge PMD can move whole)."""
        mm = self.model.processes[pid]
        out: list[int] = []
        for v in mm.vmas:
            if v.flags & VM_UFFD_FLAGS:
                for idx in range(-(-v.start // PMD), v.end // PMD):
                    if idx not in mm.pgtables and idx not in mm.huge_pmds:
                        out.append((idx * PMD - BASE) >> SHIFT)
        return out

    def free_registered(self, pid: int) -> list[int]:
        """The window pages of registered VMAs with nothing there (a move's dst)."""
        out: list[int] = []
        for v in self.model.processes[pid].vmas:
            if v.flags & VM_UFFD_FLAGS:
                lo, n = (v.start >> SHIFT) - V0, (v.end - v.start) >> SHIFT
                out += [lo + k for k, pop in enumerate(self.populated(pid, v.start, n)) if not pop]
        return out

    # -- reclaim
    @precondition(lambda self: self.pids)
    @rule(pages=st.sampled_from([1, 32, 1000]))
    def reclaim(self, pages: int) -> None:
        freed, err = self.call("reclaim", self.model.reclaim(pages))
        assert err is None and freed >= 0
        event(f"reclaim: {'some' if freed else 'none'} freed")

    # -- rmap walk
    @precondition(lambda self: self.pids)
    @rule(p=picks, how=picks, i=picks, off=offsets, blocking=st.booleans())
    def walk(self, p: int, how: int, i: int, off: int, blocking: bool) -> None:
        """folio_referenced on the folio at a page: it finds every mapping of the folio, PMD or
        PTE, in every process (one per huge PMD, one per VMA and page table for PTEs)."""
        pid = self.pid(p)
        m = self.model
        vpn = V0 + self.page(pid, how if how % 4 == 3 else 1, i, off)
        addr = vpn << SHIFT
        mm = m.processes[pid]
        hp = mm.huge_pmd_lookup(addr)
        pte = mm.pte_lookup(addr)
        folio = hp.folio if hp is not None else pte.folio if pte is not None else None
        w, err = self.call("walk", m.walk(pid, addr, blocking=blocking))
        f = m.folio(pid, addr)
        if folio is None or f is None or f.zero_page:
            assert err is not None and err.errno == errno.ENOENT, err
            return
        assert err is None, err
        assert not w.contended and w.retries == 0, "nothing else runs: no contention, no retry"
        assert set(w.mappings) == self.folio_mappings(folio), (hex(addr), w.mappings)
        assert 0 <= w.referenced <= len(w.mappings)
        again, err = self.call("walk", m.walk(pid, addr, blocking=not blocking))
        assert err is None and again.referenced == 0 and again.mappings == w.mappings
        assert f.anon_vma in {r["id"] for r in m.anon_vma_tree(pid, addr)}
        event(f"walk: {'large' if f.order else 'small'} folio, {len(w.mappings)} mappings")

    def folio_mappings(self, folio: Any) -> set[tuple[int, int]]:
        """Where the rmap walk must find ``folio``: (pid, address) of each huge PMD mapping it, and of
        the first PTE mapping it in each VMA and page table."""
        out: set[tuple[int, int]] = set()
        for pid in self.pids:
            mm = self.model.processes[pid]
            for idx, hp in mm.huge_pmds.items():
                if hp.folio is folio:
                    out.add((pid, idx << 21))
            for vma in mm.vmas:
                for idx in mm.pgtables_in(vma.start, vma.end):
                    lo, hi = max(vma.start >> SHIFT, idx << 9), min(vma.end >> SHIFT, (idx + 1) << 9)
                    ptes = mm.pgtables[idx].ptes
                    first = next((v for v in range(lo, hi) if (e := ptes.get(v)) is not None and e.folio is folio),
                                 None)
                    if first is not None:
                        out.add((pid, first << SHIFT))
        return out

    # -- checks after every step
    @invariant()
    def audit_clean(self) -> None:
        if self.m is None:
            return
        problems = self.run(self.m.audit())
        assert not problems, problems[:3]
        assert not self.m.detectors.counts, self.m.detectors.events[:3]
        assert not self.m.k.rcu.readers

    @invariant()
    def matches_shadow(self) -> None:
        m = self.m
        if m is None:
            return
        assert sorted(m.processes) == sorted(self.pids)
        for pid in self.pids:
            mm = m.processes[pid]
            layout: list[PageState | None] = [None] * WINDOW_PAGES
            for v in mm.vmas:
                lo, hi = (v.start >> SHIFT) - V0, (v.end >> SHIFT) - V0
                assert 0 <= lo < hi <= WINDOW_PAGES, f"pid {pid}: a VMA outside the window: {v}"
                thp = "hugepage" if v.flags & VM_HUGEPAGE else "nohugepage" if v.flags & VM_NOHUGEPAGE else None
                layout[lo:hi] = [(v.prot, bool(v.flags & VM_DONTCOPY), bool(v.flags & VM_WIPEONFORK), thp)] * (hi - lo)
            if layout != self.layout[pid]:
                pairs = enumerate(zip(layout, self.layout[pid], strict=True))
                diff = [(hex(BASE + w * P), a, b) for w, (a, b) in pairs if a != b]
                raise AssertionError(f"pid {pid}: VMA layout differs from the shadow: {diff[:3]} ({len(diff)} pages)")
            data = self.data[pid]
            actual = self.values(pid)
            if actual != data:
                wrong = sorted((hex(v << SHIFT), actual.get(v), data.get(v))
                               for v in set(actual) | set(data) if actual.get(v) != data.get(v))
                raise AssertionError(f"pid {pid}: (page, model, shadow) differ: {wrong[:4]} ({len(wrong)} pages)")
            for vpn, value in data.items():
                f = m.folio(pid, vpn << SHIFT)
                if f is None:
                    assert m.pagemap(pid, vpn << SHIFT, P)[0].swap, (pid, hex(vpn << SHIFT))
                else:
                    assert not f.zero_page and f.value == value, (pid, hex(vpn << SHIFT), f, value)
                    assert f.mapcount >= 1 and (not f.writable or f.exclusive), (pid, hex(vpn << SHIFT), f)

    def values(self, pid: int) -> dict[int, int]:
        """Every page of the process whose contents are not zeros, by page number: mapped by a huge
        PMD or a PTE, or swapped out (the swap cache's folio, else the slot)."""
        m = self.model
        mm = m.processes[pid]
        si = m.k.swap
        out: dict[int, int] = {}
        for idx, hp in mm.huge_pmds.items():
            vpn0 = idx << 9
            out.update((vpn0 + i, x) for i, x in enumerate(hp.folio.values) if x)
        for pt in mm.pgtables.values():
            for vpn, pte in pt.ptes.items():
                if x := pte.value:
                    out[vpn] = x
            for vpn, swp in pt.swap.items():
                cached = si.swap_table.get(swp.slot.offset)
                x = cached.value if cached is not None else si.swap_data[swp.slot.offset]
                if x:
                    out[vpn] = x
        return out

    def teardown(self) -> None:
        try:
            m = self.m
            if m is None:
                return
            for key in THP_COUNTED:
                REACHED[key] += m.k.stats[key]
            # Tear everything down: the model must end with nothing allocated.
            for pid in list(self.pids):
                self.run(m.exit(pid))
            if self.pids:
                assert m.k.folios_live == 0
                assert m.k.swap.inuse_pages == 0 and len(m.k.lruvec) == 0
                assert not m.k.anon_vma_cache.live
                assert m.check_invariants() == []
        finally:
            self.loop.close()


def test_thp_state_machine() -> None:
    """The state machine, then (in CI, derandomized) proof that the run reached every large-folio
    path it is meant to exercise."""
    REACHED.clear()
    run_state_machine_as_test(ThpMachine, settings=settings.get_profile(PROFILE))
    if PROFILE == "mmsim-thp-ci":
        missing = [k for k in THP_PATHS if not REACHED[k]]
        assert not missing, f"the run never reached {missing}: {dict(REACHED)}"
