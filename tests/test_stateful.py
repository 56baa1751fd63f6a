"""Stateful property test: random sequences of every model operation on one MemoryModel.

A page-granular shadow, kept here independently of the model, predicts the VMA layout (prot,
MADV_DONTFORK/WIPEONFORK, userfaultfd mode), the contents of every written page and which pages
hold the zero page. Reclaim (MADV_PAGEOUT, MADV_COLD, the Reclaim call) may swap any written page
out: the shadow does not predict which, but a swapped-out page must still read back its value. After
every step the model's own audit must be clean, the detectors silent, and the model must agree
with the shadow.

Profiles: ``HYPOTHESIS_PROFILE=mmsim-ci`` (the default: derandomized, no example database) or
``mmsim-dev`` (random, more examples).
"""

from __future__ import annotations

import asyncio
import errno
import os
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mmsim.server.mm.model import PAGE_SIZE, MemoryModel, MmError, UffdEvent

P = PAGE_SIZE
SHIFT = 12
BASE = 0x10000000
SLOT_PAGES = 16
NSLOTS = 3
#: Adjacent fixed slots (they may merge), so fixed-address operations collide.
SLOTS = [BASE + i * SLOT_PAGES * P for i in range(NSLOTS)]

settings.register_profile(
    "mmsim-ci",
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "mmsim-dev",
    max_examples=500,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "mmsim-ci")
if PROFILE not in ("mmsim-ci", "mmsim-dev"):
    PROFILE = "mmsim-ci"

#: Errors each call may legitimately give (what the kernel's syscall could return here).
ERRNOS = {
    "mmap": {errno.EINVAL, errno.EEXIST, errno.ENOMEM},
    "munmap": {errno.EINVAL},
    "madvise": {errno.EINVAL, errno.ENOMEM},
    "reclaim": set(),
    "uffd_register": {errno.EINVAL, errno.EBUSY},
    "uffd_unregister": {errno.EINVAL},
    "read": {errno.EFAULT},
    "write": {errno.EFAULT},
    "fork": {errno.ENOMEM},
    "exit": set(),
    "move": {errno.EINVAL, errno.ENOENT, errno.EEXIST, errno.EBUSY, errno.EAGAIN},
    "walk": {errno.ENOENT},
}

#: What expect_access answers for a missing page in a MISSING range: the access blocks (queues a
#: userfault event and sleeps until a handler resolves the page).
BLOCKS = -1

#: (prot, dontfork, wipeonfork, uffd mode) of a mapped page.
PageState = tuple[str, bool, bool, Any]


class MemoryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.m = MemoryModel()
        self.pids: list[int] = []
        self.dead: list[int] = []
        self.layout: dict[int, dict[int, PageState]] = {}  # pid -> vpn -> page state
        self.data: dict[int, dict[int, int]] = {}  # pid -> vpn -> value (pages holding a folio)
        self.zero: dict[int, set[int]] = {}  # pid -> vpns mapping the zero page
        self.has_uffd: dict[int, bool] = {}  # the process has opened its userfaultfd
        self.next_value = 1

    # -- helpers
    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def call(self, op: str, coro: Any) -> tuple[Any, MmError | None]:
        try:
            return self.run(coro), None
        except MmError as e:
            assert e.errno in ERRNOS[op] | {errno.ESRCH}, (op, e.errno, e)
            event(f"{op}: {errno.errorcode[e.errno]}")
            return None, e

    def pid(self, i: int) -> int:
        return self.pids[i % len(self.pids)]

    def candidates(self, pid: int) -> list[int]:
        starts = sorted({v.start for v in self.m.vmas(pid)} | set(SLOTS))
        return starts

    def addr(self, pid: int, i: int, off: int) -> int:
        """Mostly a mapped page; otherwise a VMA start or a fixed slot, plus ``off`` pages."""
        mapped = sorted(self.layout[pid])
        if mapped and i % 4 != 3:
            return mapped[(i * SLOT_PAGES + off) % len(mapped)] << SHIFT
        c = self.candidates(pid)
        return c[i % len(c)] + off * P

    def pages(self, addr: int, npages: int) -> range:
        return range(addr >> SHIFT, (addr >> SHIFT) + npages)

    def present(self, pid: int, vpn: int) -> bool:
        return vpn in self.data[pid] or vpn in self.zero[pid]

    def drop(self, pid: int, vpns: range) -> None:
        for v in vpns:
            self.layout[pid].pop(v, None)
            self.data[pid].pop(v, None)
            self.zero[pid].discard(v)

    # -- processes
    @initialize(
        written=st.integers(0, SLOT_PAGES),
        register=st.sampled_from([None, "missing", "wp"]),
        third=st.booleans(),
    )
    def first_process(self, written: int, register: str | None, third: bool) -> None:
        """A process with slots 0 and 2 mapped (slot 0 partly written; slot 2 perhaps registered),
        so that moves, walks and forks have something to work on from the first step."""
        self.create_process()
        pid = self.pids[0]
        self.mmap(0, 0, 0, SLOT_PAGES, "rw")
        self.mmap(0, 2, 0, SLOT_PAGES, "rw")
        if third:
            self.mmap(0, None, 0, 4, "rw")
        for k in range(written):
            self.write_at(pid, SLOTS[0] + k * P)
        if register is not None:
            self.uffd_register(0, 0, 0, 1, register)  # i=0 -> the first mapped page: slot 0
            self.uffd_register(0, SLOT_PAGES, 0, SLOT_PAGES, register)  # slot 2

    @precondition(lambda self: len(self.pids) < 4)
    @rule()
    def create_process(self) -> None:
        pid = self.run(self.m.create_process())
        assert pid not in self.pids and pid not in self.dead
        self.pids.append(pid)
        self.layout[pid], self.data[pid], self.zero[pid], self.has_uffd[pid] = {}, {}, set(), False

    @precondition(lambda self: self.pids and len(self.pids) < 5)
    @rule(p=st.integers(0, 7))
    def fork(self, p: int) -> None:
        parent = self.pid(p)
        # vma_needs_copy: PTEs of a VMA without an anon_vma (only zero pages) are not copied.
        no_anon = {
            vpn for v in self.m.vmas(parent) if v.anon_vma is None for vpn in range(v.start >> SHIFT, v.end >> SHIFT)
        }
        assert not no_anon & set(self.data[parent]), "a page with data in a VMA without an anon_vma"
        child, err = self.call("fork", self.m.fork(parent))
        assert err is None, err
        assert child not in self.pids and child not in self.dead
        self.pids.append(child)
        lay: dict[int, PageState] = {
            v: (prot, df, wipe, None) for v, (prot, df, wipe, _) in self.layout[parent].items() if not df
        }
        self.layout[child] = lay
        copied = {v for v, s in lay.items() if not s[2]}
        self.data[child] = {v: x for v, x in self.data[parent].items() if v in copied}
        self.zero[child] = {v for v in self.zero[parent] if v in copied and v not in no_anon}
        self.has_uffd[child] = False
        event("fork: with pages" if self.data[child] else "fork: no pages")

    @precondition(lambda self: len(self.pids) > 1)
    @rule(p=st.integers(0, 7))
    def exit(self, p: int) -> None:
        pid = self.pid(p)
        _, err = self.call("exit", self.m.exit(pid))
        assert err is None, err
        self.pids.remove(pid)
        self.dead.append(pid)
        for d in (self.layout, self.data, self.zero, self.has_uffd):
            del d[pid]

    @precondition(lambda self: self.dead)
    @rule(p=st.integers(0, 7), op=st.sampled_from(["write", "read", "mmap", "fork", "move", "walk", "munmap", "exit"]))
    def dead_process(self, p: int, op: str) -> None:
        pid = self.dead[p % len(self.dead)]
        m = self.m
        coro = {
            "write": lambda: m.write(pid, BASE, 1),
            "read": lambda: m.read(pid, BASE),
            "mmap": lambda: m.mmap(pid, P),
            "fork": lambda: m.fork(pid),
            "move": lambda: m.move(pid, BASE, BASE + P, P),
            "walk": lambda: m.walk(pid, BASE),
            "munmap": lambda: m.munmap(pid, BASE, P),
            "exit": lambda: m.exit(pid),
        }[op]()
        _, err = self.call(op, coro)
        assert err is not None and err.errno == errno.ESRCH

    # -- mappings
    @precondition(lambda self: self.pids)
    @rule(
        p=st.integers(0, 7),
        slot=st.one_of(st.none(), st.integers(0, NSLOTS - 1)),
        off=st.integers(0, SLOT_PAGES - 1),
        npages=st.integers(1, SLOT_PAGES),
        prot=st.sampled_from(["rw", "rw", "rw", "r"]),
    )
    def mmap(self, p: int, slot: int | None, off: int, npages: int, prot: str) -> None:
        pid = self.pid(p)
        addr = None if slot is None else SLOTS[slot] + off * P
        info, err = self.call("mmap", self.m.mmap(pid, npages * P, prot=prot, addr=addr))
        if addr is not None:
            overlap = any(v in self.layout[pid] for v in self.pages(addr, npages))
            if overlap:
                assert err is not None and err.errno == errno.EEXIST
                return
        assert err is None, err
        assert info.end - info.start == npages * P and info.prot == prot
        if addr is not None:
            assert info.start == addr
        new = self.pages(info.start, npages)
        assert not any(v in self.layout[pid] for v in new), "mmap placed a mapping over another"
        for v in new:
            self.layout[pid][v] = (prot, False, False, None)

    @precondition(lambda self: self.pids)
    @rule(p=st.integers(0, 7), i=st.integers(0, 20), off=st.integers(0, SLOT_PAGES - 1), npages=st.integers(1, 20))
    def munmap(self, p: int, i: int, off: int, npages: int) -> None:
        pid = self.pid(p)
        addr = self.addr(pid, i, off)
        _, err = self.call("munmap", self.m.munmap(pid, addr, npages * P))
        assert err is None, err
        self.drop(pid, self.pages(addr, npages))

    @precondition(lambda self: self.pids)
    @rule(
        p=st.integers(0, 7),
        i=st.integers(0, 20),
        off=st.integers(0, SLOT_PAGES - 1),
        npages=st.integers(1, 20),
        advice=st.sampled_from(["dontfork", "dofork", "wipeonfork", "keeponfork"]),
    )
    def madvise(self, p: int, i: int, off: int, npages: int, advice: str) -> None:
        pid = self.pid(p)
        addr = self.addr(pid, i, off)
        _, err = self.call("madvise", self.m.madvise(pid, addr, npages * P, advice))
        rng = self.pages(addr, npages)
        lay = self.layout[pid]
        if all(v in lay for v in rng):
            assert err is None, err
        else:
            assert err is not None and err.errno == errno.ENOMEM, err
        # The mapped part changes either way (the kernel applies it, then reports ENOMEM).
        for v in rng:
            if v in lay:
                prot, df, wipe, uffd = lay[v]
                if advice == "dontfork":
                    df = True
                elif advice == "dofork":
                    df = False
                elif advice == "wipeonfork":
                    wipe = True
                else:
                    wipe = False
                lay[v] = (prot, df, wipe, uffd)

    @precondition(lambda self: self.pids)
    @rule(
        p=st.integers(0, 7),
        i=st.integers(0, 20),
        off=st.integers(0, SLOT_PAGES - 1),
        npages=st.integers(1, 20),
        mode=st.sampled_from(["missing", "missing", "wp", "missing+wp"]),
    )
    def uffd_register(self, p: int, i: int, off: int, npages: int, mode: str) -> None:
        pid = self.pid(p)
        addr = self.addr(pid, i, off)
        _, err = self.call("uffd_register", self.m.uffd_register(pid, addr, npages * P, mode))
        rng = [v for v in self.pages(addr, npages) if v in self.layout[pid]]
        if not rng:
            assert err is not None and err.errno == errno.EINVAL
            return
        assert err is None, err
        self.has_uffd[pid] = True
        bits = set(mode.split("+"))
        for v in rng:
            prot, df, wipe, old = self.layout[pid][v]
            # userfaultfd_register_range skips a VMA already registered with (at least) these
            # modes; otherwise the new modes replace the old ones.
            if old is None or not bits <= set(old.split("+")):
                self.layout[pid][v] = (prot, df, wipe, mode)

    @precondition(lambda self: self.pids)
    @rule(p=st.integers(0, 7), i=st.integers(0, 20), off=st.integers(0, SLOT_PAGES - 1), npages=st.integers(1, 20))
    def uffd_unregister(self, p: int, i: int, off: int, npages: int) -> None:
        pid = self.pid(p)
        addr = self.addr(pid, i, off)
        _, err = self.call("uffd_unregister", self.m.uffd_unregister(pid, addr, npages * P))
        rng = [v for v in self.pages(addr, npages) if v in self.layout[pid]]
        if not rng:
            assert err is not None and err.errno == errno.EINVAL
            return
        assert err is None, err
        for v in rng:
            prot, df, wipe, _ = self.layout[pid][v]
            self.layout[pid][v] = (prot, df, wipe, None)

    # -- accesses
    def expect_access(self, pid: int, vpn: int, write: bool) -> int | None:
        """The errno an access must fail with, BLOCKS, or None."""
        st_ = self.layout[pid].get(vpn)
        if st_ is None:
            return errno.EFAULT
        if write and st_[0] != "rw":
            return errno.EFAULT
        if not self.present(pid, vpn) and st_[3] is not None and "missing" in st_[3]:
            return BLOCKS
        return None

    def blocks(self, pid: int, vpn: int, write: bool, coro: Any) -> None:
        """The access must block with one event for its page; it is then abandoned (cancelled),
        which must withdraw the event and change nothing."""

        async def go() -> None:
            task = asyncio.ensure_future(coro)
            for _ in range(50):
                await asyncio.sleep(0)
                if task.done() or self.m.uffd_pending(pid):
                    break
            assert not task.done(), f"an access to a missing page of a MISSING range returned: {task}"
            assert self.m.uffd_pending(pid) == [UffdEvent(vpn << SHIFT, write, False)]
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            else:
                raise AssertionError("a cancelled blocked access completed")
            assert self.m.uffd_pending(pid) == []

        self.run(go())
        event(f"{'write' if write else 'read'}: blocks")

    @precondition(lambda self: self.pids)
    @rule(p=st.integers(0, 7), i=st.integers(0, 20), off=st.integers(0, SLOT_PAGES - 1))
    def read(self, p: int, i: int, off: int) -> None:
        pid = self.pid(p)
        addr = self.addr(pid, i, off)
        vpn = addr >> SHIFT
        want = self.expect_access(pid, vpn, False)
        if want == BLOCKS:
            self.blocks(pid, vpn, False, self.m.read(pid, addr))
            return
        value, err = self.call("read", self.m.read(pid, addr))
        if want is not None:
            assert err is not None and err.errno == want, (err, want)
            return
        assert err is None, err
        assert value == self.data[pid].get(vpn, 0)
        if vpn not in self.data[pid]:
            self.zero[pid].add(vpn)

    @precondition(lambda self: self.pids)
    @rule(p=st.integers(0, 7), i=st.integers(0, 20), off=st.integers(0, SLOT_PAGES - 1), from_data=st.booleans())
    def write(self, p: int, i: int, off: int, from_data: bool) -> None:
        pid = self.pid(p)
        if from_data and self.data[pid]:
            vpns = sorted(self.data[pid])
            addr = vpns[(i * SLOT_PAGES + off) % len(vpns)] << SHIFT
        else:
            addr = self.addr(pid, i, off)
        self.write_at(pid, addr)

    @precondition(lambda self: self.pids)
    @rule(p=st.integers(0, 7), i=st.integers(0, 20), off=st.integers(0, SLOT_PAGES - 1), npages=st.integers(2, 8))
    def write_range(self, p: int, i: int, off: int, npages: int) -> None:
        pid = self.pid(p)
        addr = self.addr(pid, i, off)
        for k in range(npages):
            self.write_at(pid, addr + k * P)

    def write_at(self, pid: int, addr: int) -> None:
        vpn = addr >> SHIFT
        value = self.next_value
        self.next_value += 1
        want = self.expect_access(pid, vpn, True)
        if want == BLOCKS:
            self.blocks(pid, vpn, True, self.m.write(pid, addr, value))
            return
        _, err = self.call("write", self.m.write(pid, addr, value))
        if want is not None:
            assert err is not None and err.errno == want, (err, want)
            return
        assert err is None, err
        self.data[pid][vpn] = value
        self.zero[pid].discard(vpn)

    # -- UFFDIO_MOVE
    @precondition(lambda self: self.pids)
    @rule(
        p=st.integers(0, 7),
        di=st.integers(0, 20),
        doff=st.integers(0, SLOT_PAGES - 1),
        si=st.integers(0, 40),
        soff=st.integers(0, SLOT_PAGES - 1),
        npages=st.sampled_from([1, 1, 1, 2, 2, 3, 4, 8, 16]),
        holes=st.booleans(),
        src_from_data=st.integers(0, 3),
        dst_from_uffd=st.integers(0, 3),
    )
    def move(
        self, p: int, di: int, doff: int, si: int, soff: int, npages: int, holes: bool, src_from_data: int,
        dst_from_uffd: int,
    ) -> None:
        pid = self.pid(p)
        free = sorted(v for v, s in self.layout[pid].items() if s[3] is not None and not self.present(pid, v))
        if dst_from_uffd and free:  # 3 in 4
            dst = free[(di * SLOT_PAGES + doff) % len(free)] << SHIFT
        else:
            dst = self.addr(pid, di, doff)
        if src_from_data and self.data[pid]:
            vpns = sorted(self.data[pid])
            src = vpns[si % len(vpns)] << SHIFT
        else:
            src = self.addr(pid, si, soff)
        mode = 2 if holes else 0  # UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES
        moved, err = self.call("move", self.m.move(pid, dst, src, npages * P, mode))
        if not self.has_uffd[pid]:
            # Nothing registered: the VMA lookup (ENOENT) or the dst registration check (EINVAL)
            # fails, as on the kernel, after dst got its anon_vma.
            assert err is not None and err.errno in (errno.ENOENT, errno.EINVAL), "nothing registered"
        if err is None:
            assert moved == npages * P
            nbytes = moved
        else:
            nbytes = err.moved
            if err.errno != errno.EAGAIN:
                assert nbytes == 0, "an error with progress is reported as EAGAIN"
            assert 0 <= nbytes < npages * P and nbytes % P == 0
        same = self.layout[pid].get(src >> SHIFT) is not None and self.m.processes[pid].vma_lookup(
            src
        ) is self.m.processes[pid].vma_lookup(dst)
        event(f"move: {'ok' if err is None else 'partial' if nbytes else 'failed'}"
              f"{' within one VMA' if same else ''}{' multi-page' if npages > 1 else ''}{' holes' if holes else ''}")
        s0, d0 = src >> SHIFT, dst >> SHIFT
        data, zero = self.data[pid], self.zero[pid]
        for k in range(nbytes >> SHIFT):
            s, d = s0 + k, d0 + k
            assert d in self.layout[pid] and s in self.layout[pid], "moved outside a mapping"
            assert not self.present(pid, d), "moved onto a populated dst page (EEXIST expected)"
            if s in data:
                data[d] = data.pop(s)
            elif s in zero:
                zero.discard(s)
                zero.add(d)
            else:
                assert holes, "a src hole moved without ALLOW_SRC_HOLES (ENOENT expected)"

    # -- reclaim
    @precondition(lambda self: self.pids)
    @rule(p=st.integers(0, 7), i=st.integers(0, 20), off=st.integers(0, SLOT_PAGES - 1), npages=st.integers(1, 20),
          advice=st.sampled_from(["pageout", "pageout", "cold"]))
    def pageout(self, p: int, i: int, off: int, npages: int, advice: str) -> None:
        """MADV_PAGEOUT or MADV_COLD: the layout and the contents stay; written pages mapped once
        may become swap entries."""
        pid = self.pid(p)
        addr = self.addr(pid, i, off)
        _, err = self.call("madvise", self.m.madvise(pid, addr, npages * P, advice))
        if all(v in self.layout[pid] for v in self.pages(addr, npages)):
            assert err is None, err
        else:
            assert err is not None and err.errno == errno.ENOMEM, err
        event(f"{advice}: {sum(self.swapped(pid, v) for v in self.pages(addr, npages))} swapped out")

    @precondition(lambda self: self.pids)
    @rule(pages=st.sampled_from([1, 4, 32, 1000]))
    def reclaim(self, pages: int) -> None:
        freed, err = self.call("reclaim", self.m.reclaim(pages))
        assert err is None and 0 <= freed
        event(f"reclaim: {'some' if freed else 'none'} freed")

    def swapped(self, pid: int, vpn: int) -> bool:
        return self.m.pagemap(pid, vpn << SHIFT, P)[0].swap

    # -- rmap walk
    @precondition(lambda self: self.pids)
    @rule(p=st.integers(0, 7), i=st.integers(0, 40), off=st.integers(0, SLOT_PAGES - 1),
          blocking=st.booleans(), from_data=st.booleans())
    def walk(self, p: int, i: int, off: int, blocking: bool, from_data: bool) -> None:
        pid = self.pid(p)
        if from_data and self.data[pid]:
            vpns = sorted(self.data[pid])
            addr = (vpns[i % len(vpns)] << SHIFT)
        else:
            addr = self.addr(pid, i, off)
        vpn = addr >> SHIFT
        swapped = self.swapped(pid, vpn)
        w, err = self.call("walk", self.m.walk(pid, addr, blocking=blocking))
        if vpn not in self.data[pid] or swapped:
            assert err is not None and err.errno == errno.ENOENT
            return
        assert err is None, err
        assert not w.contended and w.retries == 0, "nothing else runs: no contention, no retry"
        f = self.m.folio(pid, addr)
        assert f is not None
        page = addr & ~(P - 1)
        assert (pid, page) in w.mappings
        assert len(w.mappings) == f.mapcount, "a quiescent walk finds every mapping"
        folio = self.m.processes[pid].pte_lookup(addr).folio
        for mpid, maddr in w.mappings:
            assert mpid in self.pids
            assert self.m.processes[mpid].pte_lookup(maddr).folio is folio
            assert self.data[mpid][maddr >> SHIFT] == self.data[pid][vpn]
        assert 0 <= w.referenced <= len(w.mappings)
        # The young bits were cleared: a second walk with no access in between sees none.
        again, err = self.call("walk", self.m.walk(pid, addr, blocking=not blocking))
        assert err is None and again.referenced == 0 and again.mappings == w.mappings
        event(f"walk: {len(w.mappings)} mappings")

    # -- checks after every step
    @invariant()
    def audit_clean(self) -> None:
        assert self.m.check_invariants() == []
        assert not self.m.detectors.counts, self.m.detectors.events[:3]
        assert not self.m.k.rcu.readers

    @invariant()
    def matches_shadow(self) -> None:
        m = self.m
        assert sorted(m.processes) == sorted(self.pids)
        for pid in self.pids:
            layout: dict[int, PageState] = {}
            for v in m.vmas(pid):
                for vpn in range(v.start >> SHIFT, v.end >> SHIFT):
                    layout[vpn] = (v.prot, v.dontfork, v.wipeonfork, v.uffd)
            assert layout == self.layout[pid], f"pid {pid}: VMA layout differs from the shadow"
            data, zero = self.data[pid], self.zero[pid]
            for vpn in layout:
                f = m.folio(pid, vpn << SHIFT)
                if vpn in data and f is None:  # swapped out (the audit checks its contents against the ledger)
                    assert self.swapped(pid, vpn), (pid, hex(vpn << SHIFT))
                elif vpn in data:
                    assert f is not None and not f.zero_page and f.value == data[vpn], (pid, hex(vpn << SHIFT), f)
                    assert f.mapcount >= 1 and (not f.writable or f.exclusive)
                elif vpn in zero:
                    assert f is not None and f.zero_page, (pid, hex(vpn << SHIFT), f)
                else:
                    assert f is None, (pid, hex(vpn << SHIFT), f)
            assert set(data) <= set(layout) and zero <= set(layout)

    def teardown(self) -> None:
        try:
            # Tear everything down: the model must end with nothing allocated.
            for pid in list(self.pids):
                self.run(self.m.exit(pid))
            if self.pids:
                assert self.m.k.folios_live == 0
                assert self.m.k.swap.inuse_pages == 0 and len(self.m.k.lruvec) == 0
                assert not self.m.k.anon_vma_cache.live
                assert self.m.check_invariants() == []
        finally:
            self.loop.close()


TestMemoryModel = MemoryMachine.TestCase
TestMemoryModel.settings = settings.get_profile(PROFILE)
