"""MemoryModel: the model's public API, one async method per user-visible operation.

Each call runs as its own task (a ``Current``), takes the mm's mmap_lock the way the kernel's
system call would, and calls into the protocol code. Teardown-like operations (munmap, madvise,
registration, exit) finish even when the caller is cancelled; a cancelled move keeps the pages it
already moved; a cancelled fork is rolled back. Results are plain dataclasses.

A ledger of expected page contents (``ledger.PageLedger``) is kept beside the model, updated at
the same atomic points as the pages themselves, so that ``check_invariants`` can prove data is
neither lost nor duplicated. Every call passes the audit's gate (``audit.CallGate``); the counters
are read by ``stats.read_stats``.
"""

from __future__ import annotations

import dataclasses
import errno
import heapq
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

from .audit import Auditor, CallGate
from .fork import dup_mmap, exit_mmap
from .gup import __get_user_pages as get_user_pages
from .gup import gup_fast, unpin_user_pages
from .invariants import audit_steps
from .kernel import PROTOCOLS, IdCounter, Kernel
from .ledger import PageLedger
from .locks import Current
from .madvise import do_madvise
from .memcontrol import MemoryLimitExceeded
from .memory import folio_put, handle_mm_fault
from .mm_types import (
    AVC_BYTES,
    DEFAULT_MAX_MAP_COUNT,
    FOLIO_BYTES,
    HPAGE_PMD_NR,
    HUGE_ZERO_FOLIO,
    MM_BYTES,
    PAGE_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    PIN_BYTES,
    PIN_MAX_BYTES,
    PIN_PAGE_BYTES,
    VM_DONTCOPY,
    VM_UFFD_MISSING,
    VM_UFFD_WP,
    VM_WIPEONFORK,
    VMA_BYTES,
    ZERO_PAGE,
    Folio,
    GupPin,
    KeyedDict,
    LimitExceeded,
    Mm,
    MmError,
    Vma,
    folio_maybe_dma_pinned,
    is_migration_entry,
)
from .mmap import do_mmap, do_munmap, page_align
from .mmap_lock import lock_vma_under_rcu, vma_end_read, vma_end_write_all
from .mprotect import do_mprotect
from .mremap import MREMAP_DONTUNMAP, MREMAP_FIXED, MREMAP_MAYMOVE, RemapLog, do_mremap
from .page_ref import folio_try_get
from .rmap import AnonVma
from .sched import RESCHED_WORK, cond_resched, uninterruptible
from .stats import read_stats
from .steps import Variant
from .swapfile import DEFAULT_SWAP_BYTES
from .task_mmu import PagemapEntry, pagemap_read
from .userfaultfd import (
    UFFDIO_COPY_MODE_DONTWAKE,
    UFFDIO_COPY_MODE_WP,
    UFFDIO_REGISTER_MODES,
    FillProgress,
    MoveProgress,
    UffdEvent,
    Userfault,
    UserfaultfdCtx,
    VmFaultRetry,
    userfault_wait,
    userfaultfd_ctx,
    userfaultfd_fill,
    userfaultfd_move,
    userfaultfd_read,
    userfaultfd_read_wait,
    userfaultfd_register,
    userfaultfd_unread,
    userfaultfd_unregister,
    validate_range,
    wake_userfault,
)
from .vmscan import shrink_lruvec

#: The watermarks of the memory budget: high at 1/16 below the limit, low 1/64 of it below that
#: (a call that crosses the high one reclaims that much, a few milliseconds' work per MiB).
WATERMARK_SHARE = 16
WATERMARK_STEP = 64

U64_MAX = (1 << 64) - 1


def check_u64(value: object, what: str = "address") -> None:
    """EINVAL unless ``value`` is an unsigned 64-bit integer; ``what`` names it in the message."""
    if not isinstance(value, int) or value < 0 or value > U64_MAX:
        raise MmError(errno.EINVAL, f"{what} must be an unsigned 64-bit integer")


@dataclass(frozen=True)
class VmaInfo:
    start: int
    end: int
    prot: str
    uffd: str | None  # None, "missing", "wp" or "missing+wp"
    dontfork: bool
    wipeonfork: bool
    pgoff: int
    anon_vma: int | None


@dataclass(frozen=True)
class FolioInfo:
    zero_page: bool
    value: int
    mapcount: int
    exclusive: bool
    index: int
    anon_vma: int | None
    writable: bool
    young: bool
    #: The folio's order (0: a small folio; 9: a PMD-size THP) and whether a huge PMD maps it here.
    order: int = 0
    pmd: bool = False
    #: folio_maybe_dma_pinned: a FOLL_PIN pin holds the folio (or, for a small folio, enough
    #: references to look like one).
    pinned: bool = False


def mapped_folio(mm: Mm, addr: int) -> Folio | None:
    """The folio mapped at ``addr``, by a huge PMD or a PTE (either zero page too), or None."""
    hp = mm.huge_pmd_lookup(addr)
    if hp is not None:
        return hp.folio
    pte = mm.pte_lookup(addr & PAGE_MASK)
    return pte.folio if pte is not None else None


@dataclass(frozen=True)
class WalkResult:
    referenced: int
    contended: bool
    mappings: tuple[tuple[int, int], ...]
    fast_retries: int
    slow_retries: int

    @property
    def retries(self) -> int:
        return self.fast_retries + self.slow_retries


class ResultTooLarge(Exception):
    """An inspection result would hold more than the caller's limit of entries."""

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(f"{what} has more than {limit} entries")
        self.what = what
        self.limit = limit


def _uffd_mode(flags: int) -> str | None:
    modes = [name for bit, name in ((VM_UFFD_MISSING, "missing"), (VM_UFFD_WP, "wp")) if flags & bit]
    return "+".join(modes) or None


def vma_info(v: Vma) -> VmaInfo:
    return VmaInfo(
        start=v.start,
        end=v.end,
        prot=v.prot,
        uffd=_uffd_mode(v.flags),
        dontfork=bool(v.flags & VM_DONTCOPY),
        wipeonfork=bool(v.flags & VM_WIPEONFORK),
        pgoff=v.pgoff,
        anon_vma=v.anon_vma.id if v.anon_vma is not None else None,
    )


class MemoryModel:
    """A set of simulated processes sharing one simulated kernel.

    ``protocol`` picks the rmap/move protocol: a generation (``kernel.PROTOCOLS``), a
    ``steps.Variant`` or ``FILE.py:NAME`` (a user's variant); ``seed`` and
    ``preempt`` drive the scheduler at the named preemption points; ``detectors`` turns lockdep, the
    walk detectors and the use-after-free check on. ``max_memory`` is the budget, in bytes, that
    every object the model grows with is charged to (ENOMEM beyond it; None: no limit).
    ``mutant`` applies a mutant (``kernel.MUTANTS``, a Variant or ``FILE.py:NAME``) to the protocol
    (mutation testing).
    ``max_map_count`` is vm.max_map_count, the VMAs a process may have (ENOMEM beyond, as the
    kernel checks it; 65530 as in Linux). ``max_pending_faults`` (in all) and
    ``max_pending_faults_per_process`` bound the accesses asleep on a userfault,
    ``max_userfault_streams`` the listeners of one process's events (LimitExceeded beyond each;
    None: no bound). ``audit_share`` throttles ``audit`` to that share of the time.
    ``swap_bytes`` is the swap device's size (0: no swap): reclaim swaps pages out to it, and an
    access whose charge would pass ``max_memory`` reclaims first (ENOMEM once nothing more can go).
    """

    def __init__(
        self,
        protocol: str | Variant = "recheck",
        seed: int = 0,
        preempt: float = 0.0,
        detectors: bool = True,
        max_processes: int | None = None,
        max_pages: int | None = None,
        max_memory: int | None = None,
        mutant: str | Variant | None = None,
        max_pending_faults: int | None = None,
        max_pending_faults_per_process: int | None = None,
        max_userfault_streams: int | None = None,
        audit_share: float = 1.0,
        max_map_count: int = DEFAULT_MAX_MAP_COUNT,
        swap_bytes: int = DEFAULT_SWAP_BYTES,
        thp: str = "madvise",
        thp_orders: dict[int, str] | None = None,
        thp_use_zero_page: bool = True,
    ) -> None:
        self.k = Kernel(
            protocol=protocol, seed=seed, preempt=preempt, detectors=detectors, max_memory=max_memory, mutant=mutant,
            max_map_count=max_map_count, swap_bytes=swap_bytes, thp=thp, thp_orders=thp_orders,
            thp_use_zero_page=thp_use_zero_page,
        )
        #: The high watermark: above it, with swap room, a call that allocates first reclaims down
        #: to the low one (_kswapd).
        self._high = max_memory - max_memory // WATERMARK_SHARE if max_memory is not None else None
        self.k.max_uffd_faults = max_pending_faults
        self.k.max_uffd_faults_per_mm = max_pending_faults_per_process
        self.k.max_uffd_readers = max_userfault_streams
        self.max_processes = max_processes
        self.max_pages = max_pages
        self.processes: KeyedDict[Mm] = KeyedDict()
        self.parents: KeyedDict[int | None] = KeyedDict()
        self._pids = IdCounter()
        #: Expected contents: pid -> {virtual page number: value} for every page written or filled
        #: (a page of a large folio that is not in it must read 0).
        self.ledger: KeyedDict[PageLedger] = KeyedDict()
        #: Whether the audit compares the contents with the ledger. The ledger is written when an
        #: operation returns, not where it takes effect (under its PTL): where other tasks may run
        #: in between (the explorer at the hardware's granularity), two operations on one page can
        #: reach it in the other order.
        self.check_ledger = True
        #: The audit's quiescent point: every call enters it at its start and leaves it at its end.
        self.gate = CallGate()
        self.auditor = Auditor(self.gate, self.k.detectors, audit_share)

    @property
    def protocol(self) -> str:
        return self.k.protocol.name

    @property
    def detectors(self) -> Any:
        return self.k.detectors

    @property
    def audit_share(self) -> float:
        """The most of the time audits may take (``audit``): 1.0 leaves them unthrottled."""
        return self.auditor.share

    @audit_share.setter
    def audit_share(self, share: float) -> None:
        self.auditor.share = share

    @property
    def audit_started(self) -> float:
        """When the last audit began (event-loop time)."""
        return self.auditor.started

    @property
    def audit_next(self) -> float:
        """When the next audit may begin (event-loop time)."""
        return self.auditor.next

    # -- helpers
    def _cur(self, op: str, pid: int) -> Current:
        return Current(op, pid)

    def _mm(self, pid: int) -> Mm:
        mm = self.processes.get(pid)
        if mm is None:
            raise MmError(errno.ESRCH, f"no process {pid}")
        return mm

    def _call_done(self, cur: Current) -> None:
        """End of a system call: give back the task's unused memory reservation, and leave the
        audit's gate."""
        if cur.memcg_stock:
            self.k.memcg.drain(cur)
        self.gate.leave()

    async def _write_locked(self, mm: Mm, cur: Current, body: Any) -> Any:
        """Take mmap_lock for write (cancellable), then run ``body`` to completion."""
        if not self.gate.try_enter(): await self.gate.enter()
        try:
            if self._high is not None and self.k.memcg.usage > self._high: await self._kswapd()
            lock = mm.mmap_lock
            if not lock.down_write(cur): await lock.wait(cur)
            try:
                if mm.users == 0:
                    raise MmError(errno.ESRCH, "process has exited")
                return await uninterruptible(body)
            finally:
                vma_end_write_all(mm)
                lock.up_write(cur)
        finally:
            self._call_done(cur)

    # -- processes
    def _check_process_limit(self) -> None:
        if self.max_processes is not None and len(self.processes) >= self.max_processes:
            raise LimitExceeded("max_processes", self.max_processes)

    async def create_process(self) -> int:
        self._check_process_limit()
        await self.gate.wait()
        self.k.memcg.charge(Current("create_process"), MM_BYTES)
        pid = self._pids()
        self.processes[pid] = Mm(pid, self.k.lockdep, self.k.memcg)
        self.parents[pid] = None
        self.ledger[pid] = PageLedger()
        return pid

    async def fork(self, pid: int) -> int:
        """fork(): dup_mmap under both mmap_locks. A fork that fails (ENOMEM) or is cancelled leaves
        no child behind."""
        parent = self._mm(pid)
        self._check_process_limit()
        if not self.gate.try_enter(): await self.gate.enter()
        cur = self._cur("fork", pid)
        k = self.k
        try:
            if self._high is not None and self.k.memcg.usage > self._high: await self._kswapd()
            lock = parent.mmap_lock
            if not lock.down_write(cur): await lock.wait(cur)
            try:
                if parent.users == 0:
                    raise MmError(errno.ESRCH, "process has exited")
                k.memcg.charge(cur, MM_BYTES)
                cpid = self._pids()
                child = Mm(cpid, k.lockdep, k.memcg)
                child.mmap_base = parent.mmap_base
                child.mmap_lock.down_write(cur, nested=True)  # mmap_write_lock_nested: new, uncontended
                copied: list[int] = []
                try:
                    await dup_mmap(k, cur, child, parent, copied)
                except BaseException:
                    await uninterruptible(lambda: exit_mmap(k, cur, child))
                    k.memcg.uncharge(MM_BYTES)
                    raise
                finally:
                    vma_end_write_all(child)
                    child.mmap_lock.up_write(cur)
                ledger = await self.ledger[pid].copy_pages(copied)
                self._ledger_zeros(child, ledger, copied)  # pages of a large folio copied small
                self.processes[cpid] = child
                self.parents[cpid] = pid
                self.ledger[cpid] = ledger
            finally:
                vma_end_write_all(parent)
                lock.up_write(cur)
        finally:
            self._call_done(cur)
        return cpid

    async def exit(self, pid: int) -> None:
        """exit(): the mm is torn down completely, even if the caller is cancelled."""
        mm = self._mm(pid)
        cur = self._cur("exit", pid)
        k = self.k

        async def body() -> None:
            await exit_mmap(k, cur, mm)
            for pin in mm.pins.values():  # exit_files: the pins' owner (the io_uring) goes
                self._unpin(pin)
            mm.pins.clear()
            k.memcg.uncharge(MM_BYTES)
            self.processes.pop(pid, None)
            ledger = self.ledger.pop(pid, None)
            if ledger is not None:
                await ledger.release()

        await self._write_locked(mm, cur, body)

    # -- mappings
    async def mmap(
        self, pid: int, length: int, prot: str = "rw", addr: int | None = None, uffd: str | None = None
    ) -> VmaInfo:
        """mmap of private anonymous memory; with ``uffd`` ("missing", "wp") the new range is
        registered with the process's userfaultfd under the same mmap_lock."""
        mm = self._mm(pid)
        if addr is not None:
            check_u64(addr)
        if uffd is not None and uffd not in UFFDIO_REGISTER_MODES:
            raise MmError(errno.EINVAL, f"uffd mode must be one of {', '.join(UFFDIO_REGISTER_MODES)}, not {uffd!r}")
        cur = self._cur("mmap", pid)

        async def body() -> VmaInfo:
            if uffd is not None:
                # The VMA, and two splits of the VMA it may merge into (whose chain is at most one
                # link long), so that registering, or undoing the mmap, cannot fail half-way.
                self.k.memcg.reserve(cur, 3 * VMA_BYTES + 2 * AVC_BYTES)
            start = await do_mmap(self.k, cur, mm, addr, length, prot)
            if uffd is not None:
                try:
                    await userfaultfd_register(self.k, cur, mm, start, page_align(length), uffd)
                except MmError:
                    await do_munmap(self.k, cur, mm, start, length)
                    raise
            vma = mm.vma_lookup(start)
            assert vma is not None
            # The range just mapped; the VMA holding it may be larger after a merge.
            return dataclasses.replace(
                vma_info(vma), start=start, end=start + page_align(length), pgoff=vma.linear_page_index(start)
            )

        info: VmaInfo = await self._write_locked(mm, cur, body)
        return info

    async def munmap(self, pid: int, addr: int, length: int) -> None:
        mm = self._mm(pid)
        check_u64(addr)
        cur = self._cur("munmap", pid)

        async def body() -> None:
            unmapped: list[int] = []
            try:
                await do_munmap(self.k, cur, mm, addr, length, unmapped)
            finally:  # what was unmapped leaves the ledger, also if the munmap then failed
                await self.ledger[pid].remapped(unmapped)

        await self._write_locked(mm, cur, body)

    async def madvise(self, pid: int, addr: int, length: int, advice: str) -> None:
        """madvise: the fork controls ("dontfork", "dofork", "wipeonfork", "keeponfork") and
        "dontneed" (the range's pages zapped, dropped from the ledger even when a hole then makes
        it fail with ENOMEM)."""
        mm = self._mm(pid)
        check_u64(addr)
        cur = self._cur("madvise", pid)

        async def body() -> None:
            unmapped: list[int] = []
            try:
                await do_madvise(self.k, cur, mm, addr, length, advice, unmapped)
            finally:
                await self.ledger[pid].remapped(unmapped)

        await self._write_locked(mm, cur, body)

    async def mprotect(self, pid: int, addr: int, length: int, prot: str) -> None:
        """mprotect with prot "none", "r" or "rw": the range split off its VMAs, merged back with
        neighbours that then match. A hole after the start changes what comes before it, then
        ENOMEM."""
        mm = self._mm(pid)
        check_u64(addr)
        cur = self._cur("mprotect", pid)
        await self._write_locked(mm, cur, lambda: do_mprotect(self.k, cur, mm, addr, length, prot))

    async def mremap(
        self,
        pid: int,
        addr: int,
        old_length: int,
        new_length: int,
        *,
        maymove: bool = False,
        dontunmap: bool = False,
        fixed: int | None = None,
    ) -> VmaInfo:
        """mremap: shrink or grow in place, or move (MREMAP_MAYMOVE; MREMAP_DONTUNMAP keeps the old
        range mapped and empty; ``fixed``: MREMAP_FIXED to that address, replacing what is there).
        Returns the new range, as ``mmap`` does. The pages keep their values at the new address."""
        mm = self._mm(pid)
        check_u64(addr)
        if fixed is not None:
            check_u64(fixed, "fixed")
        for what, n in (("old_length", old_length), ("new_length", new_length)):
            check_u64(n, what)
        flags = (MREMAP_MAYMOVE if maymove else 0) | (MREMAP_DONTUNMAP if dontunmap else 0)
        if fixed is not None:
            flags |= MREMAP_FIXED
        cur = self._cur("mremap", pid)

        async def body() -> VmaInfo:
            log = RemapLog()
            try:
                start = await do_mremap(self.k, cur, mm, addr, old_length, new_length, flags, fixed or 0, log)
            finally:
                await self.ledger[pid].remapped(log.unmapped, log.moved)
            vma = mm.vma_lookup(start)
            assert vma is not None
            return dataclasses.replace(
                vma_info(vma), start=start, end=start + page_align(new_length), pgoff=vma.linear_page_index(start)
            )

        info: VmaInfo = await self._write_locked(mm, cur, body)
        return info

    async def uffd_register(self, pid: int, addr: int, length: int, mode: str = "missing") -> None:
        mm = self._mm(pid)
        check_u64(addr)
        cur = self._cur("uffd_register", pid)
        await self._write_locked(mm, cur, lambda: userfaultfd_register(self.k, cur, mm, addr, length, mode))

    async def uffd_unregister(self, pid: int, addr: int, length: int) -> None:
        mm = self._mm(pid)
        check_u64(addr)
        cur = self._cur("uffd_unregister", pid)
        await self._write_locked(mm, cur, lambda: userfaultfd_unregister(self.k, cur, mm, addr, length))

    # -- accesses
    async def _access(self, pid: int, addr: int, write: bool, value: int) -> int:
        """A user access: the VMA's lock for read (or, failing that, mmap_lock for read and the VMA
        looked up under it), handle_mm_fault. A missing page in a
        MISSING-registered range blocks as handle_userfault does: the fault's event is queued,
        mmap_lock dropped, and the access sleeps (holding nothing, and not counted as a call in
        progress for the audit) until woken, then retries from the top: ESRCH if the process
        exited meanwhile, EFAULT if the range is gone. A cancelled sleep changes nothing."""
        mm = self._mm(pid)
        check_u64(addr)
        if not self.gate.try_enter(): await self.gate.enter()
        in_call = True
        cur = self._cur("write" if write else "read", pid)
        k = self.k
        try:
            if self._high is not None and self.k.memcg.usage > self._high: await self._kswapd()
            while True:
                # do_user_addr_fault: the VMA's lock alone where it can (lock_vma_under_rcu), else
                # the mmap_lock for read.
                vma = lock_vma_under_rcu(cur, mm, addr) if type(addr) is int else None
                lock = None
                if vma is None:
                    lock = mm.mmap_lock
                    if not lock.down_read(cur): await lock.wait(cur)
                try:
                    if mm.users == 0:
                        raise MmError(errno.ESRCH, "process has exited")
                    if vma is None:
                        vma = mm.vma_lookup(addr)
                        if vma is None:
                            raise MmError(errno.EFAULT, f"no mapping at {addr:#x} (SIGSEGV)")
                    result = await handle_mm_fault(k, cur, vma, addr & PAGE_MASK, write, value)
                    if write:
                        self.ledger[pid][addr >> PAGE_SHIFT] = value
                    return result
                except VmFaultRetry as retry:
                    fault = retry
                finally:
                    if lock is None:
                        vma_end_read(cur, vma)  # type: ignore[arg-type]
                    else:
                        lock.up_read(cur)
                in_call = False
                await self._userfault_sleep(cur, fault)
                in_call = True
        except BaseException:
            if cur.held or cur.pins or cur.rcu_nesting:
                await k.give_back(cur)  # cancelled part-way through a swap-in (its folio's lock and pin)
            raise
        finally:
            if in_call:
                self._call_done(cur)

    async def _userfault_sleep(self, cur: Current, fault: VmFaultRetry) -> None:
        """A call's sleep on a userfault, locks dropped: out of the audit's gate (no call in
        progress) until woken, then back in. Expects the call inside the gate; leaves it inside,
        or outside if the sleep is cancelled."""
        self._call_done(cur)
        await userfault_wait(self.k, fault.ctx, fault.userfault)
        if not self.gate.try_enter(): await self.gate.enter()

    async def read(self, pid: int, addr: int) -> int:
        """A read access: faults in the zero page where nothing is mapped (in a MISSING range:
        blocks until a userfault handler resolves the page)."""
        return await self._access(pid, addr, False, 0)

    async def write(self, pid: int, addr: int, value: int) -> None:
        """A write access: a new folio, a COW copy, or the folio reused in place."""
        check_u64(value, "value")
        if self.max_pages is not None and self.k.folio_pages_live >= self.max_pages:
            mm = self._mm(pid)
            ok = isinstance(addr, int) and addr >= 0
            entry = (mm.huge_pmd_lookup(addr) or mm.pte_lookup(addr & PAGE_MASK)) if ok else None
            if entry is None or not entry.write:  # the write may need a new folio
                raise LimitExceeded("max_pages", self.max_pages)
        await self._access(pid, addr, True, value)

    # -- pins
    async def pin(self, pid: int, addr: int, length: int) -> tuple[int, int]:
        """pin_user_pages_fast(FOLL_WRITE | FOLL_LONGTERM) of the pages covering [addr, addr +
        length), as an io_uring buffer registration takes them: GUP-fast first, then the slow path
        under the mmap_lock, which write-faults (storing nothing) every page that is missing,
        read-only, shared or the zero page, sleeping on a userfault like an access would. Returns
        the pin's id and its pages. EFAULT (as io_uring's registration answers) for an empty
        range, one over 1 GiB, one with a hole or one not writable (nothing stays pinned then).
        The pin and its pages are charged to the memory budget; ``unpin`` or the process's exit
        gives them back."""
        mm = self._mm(pid)
        check_u64(addr)
        check_u64(length, "length")
        if not length:
            raise MmError(errno.EFAULT, "empty range")
        if length > PIN_MAX_BYTES:
            raise MmError(errno.EFAULT, f"a pin covers at most {PIN_MAX_BYTES} bytes")
        start = addr & PAGE_MASK
        end = page_align(addr + length)
        if end > mm.task_size:
            raise MmError(errno.EFAULT, f"range beyond the address space at {addr:#x}")
        n = (end - start) >> PAGE_SHIFT
        k = self.k
        if not self.gate.try_enter(): await self.gate.enter()
        in_call = True
        cur = self._cur("pin", pid)
        nbytes = PIN_BYTES + n * PIN_PAGE_BYTES
        pin = GupPin(mm.next_pin, start)
        mm.next_pin += 1  # taken now: another pin of the process may run while this one sleeps
        try:
            k.memcg.charge(cur, nbytes)
            try:
                mm.has_pinned = True  # mm_set_has_pinned_flag: before any page is pinned
                await gup_fast(k, cur, mm, start, n, pin)
                while len(pin.pages) < n:
                    lock = mm.mmap_lock
                    if not lock.down_read(cur): await lock.wait(cur)
                    try:
                        if mm.users == 0:
                            raise MmError(errno.ESRCH, "process has exited")
                        done = len(pin.pages)
                        await get_user_pages(k, cur, mm, start + (done << PAGE_SHIFT), n - done, pin)
                        continue
                    except VmFaultRetry as retry:
                        fault = retry
                    finally:
                        lock.up_read(cur)
                    in_call = False
                    await self._userfault_sleep(cur, fault)
                    in_call = True
                if mm.users == 0:
                    raise MmError(errno.ESRCH, "process has exited")
            except BaseException:
                unpin_user_pages(k, pin)
                k.memcg.uncharge(nbytes)
                if cur.held or cur.pins or cur.rcu_nesting:
                    await k.give_back(cur)
                raise
        finally:
            if mm.users:  # the pages faulted in, also by a pin that then failed
                self._ledger_zeros(mm, self.ledger[pid], range(start >> PAGE_SHIFT, end >> PAGE_SHIFT))
            if in_call:
                self._call_done(cur)
        mm.pins[pin.id] = pin
        k.stats["gup_pin_pages"] += n
        return pin.id, n

    @staticmethod
    def _ledger_zeros(mm: Mm, ledger: PageLedger, vpns: Iterable[int]) -> None:
        """Pages nobody wrote (they read 0) that a small folio of their own now holds (a pin's
        write fault, fork's copy of a pinned large folio's page): the ledger expects 0 there."""
        for vpn in vpns:
            if vpn not in ledger:
                pte = mm.pte_lookup(vpn << PAGE_SHIFT)
                if pte is not None and pte.folio is not ZERO_PAGE and not pte.folio.large:
                    ledger[vpn] = 0

    def _unpin(self, pin: GupPin) -> None:
        n = len(pin.pages)
        unpin_user_pages(self.k, pin)
        self.k.memcg.uncharge(PIN_BYTES + n * PIN_PAGE_BYTES)
        self.k.stats["gup_unpin_pages"] += n

    async def unpin(self, pid: int, pin_id: int) -> None:
        """unpin_user_pages of the pin ``pin_id`` of the process (ENOENT if it has none by that id):
        a folio that only the pin still held is freed."""
        mm = self._mm(pid)
        if not self.gate.try_enter(): await self.gate.enter()
        cur = self._cur("unpin", pid)
        try:
            pin = mm.pins.pop(pin_id, None)
            if pin is None:
                raise MmError(errno.ENOENT, f"process {pid} has no pin {pin_id}")
            self._unpin(pin)
        finally:
            self._call_done(cur)

    # -- UFFDIO_MOVE
    async def move(
        self, pid: int, dst: int, src: int, length: int, mode: int = 0, *, progress: MoveProgress | None = None
    ) -> int:
        """UFFDIO_MOVE within process ``pid``. Returns the bytes moved (== length); raises MmError
        with ``moved`` for a short move (EAGAIN) or an error."""
        mm = self.processes.get(pid)
        if mm is None:
            raise MmError(errno.ESRCH, f"no process {pid}")
        if not (type(dst) is int and type(src) is int and type(length) is int and type(mode) is int) or not (
            0 <= (dst | src | length | mode) <= U64_MAX
        ):
            for what, v in (("dst", dst), ("src", src), ("len", length), ("mode", mode)):
                check_u64(v, what)
        if progress is None:
            progress = MoveProgress()
        progress.on_step = self.ledger[pid].moved
        if not self.gate.try_enter(): await self.gate.enter()
        cur = Current("move", pid)
        try:
            if self._high is not None and self.k.memcg.usage > self._high: await self._kswapd()
            moved = await userfaultfd_move(self.k, cur, mm, dst, src, length, mode, progress)
        except BaseException as e:
            if cur.held or cur.pins or cur.rcu_nesting:
                await self.k.give_back(cur)  # cancelled (or a detector's Deadlock) part-way
            if isinstance(e, MmError):
                self.k.move_results[errno.errorcode.get(e.errno or 0, str(e.errno))] += 1
            raise
        finally:
            self._call_done(cur)
        self.k.move_results["OK"] += 1
        return moved

    # -- userfaultfd: the handler's side
    async def _fill(
        self, op: str, pid: int, dst: int, length: int, values: Any, dontwake: bool, wp: bool = False
    ) -> int:
        mm = self._mm(pid)
        for what, v in (("dst", dst), ("len", length)):
            check_u64(v, what)
        progress = FillProgress(self.ledger[pid].__setitem__)
        if not self.gate.try_enter(): await self.gate.enter()
        cur = self._cur(op, pid)
        try:
            if self._high is not None and self.k.memcg.usage > self._high: await self._kswapd()
            return await userfaultfd_fill(
                self.k, cur, mm, dst, length, values,
                (UFFDIO_COPY_MODE_DONTWAKE if dontwake else 0) | (UFFDIO_COPY_MODE_WP if wp else 0), progress,
            )
        finally:
            self._call_done(cur)

    async def uffd_copy(
        self, pid: int, dst: int, length: int, values: int | Sequence[int], *, dontwake: bool = False,
        wp: bool = False,
    ) -> int:
        """UFFDIO_COPY: new exclusive folios holding ``values`` (one int for every page, or one per
        page: EINVAL if the list does not match) at [dst, dst + length), waking the faults waiting
        there unless ``dontwake``. With ``wp`` (UFFDIO_COPY_MODE_WP) the pages are mapped
        write-protected with the uffd-wp bit (a write to one is then a write-protect userfault);
        EINVAL unless the VMA is registered for WP. Returns the bytes copied (== length); raises
        MmError with ``moved`` = the bytes copied: EAGAIN for a short copy (a later page present),
        or the error with nothing copied (ENOENT: not inside one registered VMA; EEXIST; EINVAL). Takes
        mmap_lock for read, the dst anon_vma root (anon_vma_prepare), then each PTL
        (userfaultfd.mfill_atomic). A cancelled copy keeps (and wakes) the pages it filled."""
        self._mm(pid)
        if isinstance(values, Sequence):
            if type(length) is int and length > 0 and not length & ~PAGE_MASK and len(values) != length >> PAGE_SHIFT:
                raise MmError(errno.EINVAL, f"{len(values)} values for {length >> PAGE_SHIFT} pages")
            for i in range(0, len(values), RESCHED_WORK):  # a long list is checked without stalling others
                if i:
                    await cond_resched()
                if not all(type(v) is int and 0 <= v <= U64_MAX for v in values[i : i + RESCHED_WORK]):
                    raise MmError(errno.EINVAL, "values must be unsigned 64-bit integers")
        elif type(values) is not int or not 0 <= values <= U64_MAX:
            raise MmError(errno.EINVAL, "value must be an unsigned 64-bit integer")
        if self.max_pages is not None and type(length) is int and length > 0:
            if self.k.folio_pages_live + ((length + PAGE_SIZE - 1) >> PAGE_SHIFT) > self.max_pages:
                raise LimitExceeded("max_pages", self.max_pages)
        return await self._fill("uffd_copy", pid, dst, length, values, dontwake, wp)

    async def uffd_zeropage(self, pid: int, dst: int, length: int, *, dontwake: bool = False) -> int:
        """UFFDIO_ZEROPAGE: the shared zero page at [dst, dst + length), waking the faults waiting
        there unless ``dontwake``. Result and errors as ``uffd_copy`` (``moved`` = bytes zeroed).
        Takes mmap_lock for read, the dst anon_vma root, then each PTL."""
        return await self._fill("uffd_zeropage", pid, dst, length, None, dontwake)

    async def uffd_wake(self, pid: int, addr: int, length: int) -> None:
        """UFFDIO_WAKE: wake the faults waiting on [addr, addr + length) (they retry, and fault
        again if the page is still missing). EINVAL for a bad range (validate_range); no VMA is
        looked at (checked on 6.18: a wake of an unmapped range returns 0). Takes no lock."""
        mm = self._mm(pid)
        for what, v in (("addr", addr), ("len", length)):
            check_u64(v, what)
        validate_range(mm, addr, length)
        if mm.uffd is not None:
            wake_userfault(self.k, mm.uffd, addr, length)

    def _uffd_ctx(self, pid: int) -> UserfaultfdCtx:
        mm = self._mm(pid)
        if mm.users == 0:
            raise MmError(errno.ESRCH, "process has exited")
        return userfaultfd_ctx(self.k, mm)

    def uffd_events(self, pid: int, nonblocking: bool = False) -> AsyncGenerator[UffdEvent, None]:
        """The process's userfault events, as a read of its userfaultfd gives them: those queued
        (also before anyone listened) in order, then each new one as it comes, until the process
        exits (then the iterator ends). ESRCH at once for no such process. An event handed out
        stays delivered while its fault waits; when the iterator is closed (aclose, cancellation)
        the events it handed out whose faults still wait go back to the front of the queue for
        the next listener. At most ``Kernel.max_uffd_readers`` iterators read one process's
        events at once (LimitExceeded beyond). ``nonblocking`` (a read of an O_NONBLOCK userfaultfd): the events queued
        now, then the iterator ends; the events it handed out stay delivered."""
        ctx = self._uffd_ctx(pid)
        limit = self.k.max_uffd_readers
        if limit is not None and ctx.readers >= limit:
            raise LimitExceeded("max_userfault_streams", limit)
        ctx.readers += 1  # given back when the iterator ends; the caller must iterate it
        self.k.uffd_readers += 1
        return self._uffd_events(ctx, nonblocking)

    async def _uffd_events(self, ctx: UserfaultfdCtx, nonblocking: bool = False) -> AsyncGenerator[UffdEvent, None]:
        delivered: dict[Userfault, None] = {}
        try:
            while True:
                event = userfaultfd_read(ctx, delivered)
                if event is not None:
                    yield event
                elif ctx.released or nonblocking:
                    if nonblocking:  # read(2) took them: they are not given back
                        consumed: dict[Userfault, None] = {}  # read, and no listener to give back to
                        for uf in delivered:
                            uf.reader = consumed
                        delivered.clear()
                    return
                else:
                    await userfaultfd_read_wait(self.k, ctx)
        finally:
            ctx.readers -= 1
            self.k.uffd_readers -= 1
            userfaultfd_unread(ctx, delivered)

    def uffd_pending(self, pid: int) -> list[UffdEvent]:
        """The events queued and not yet delivered to a listener, oldest first."""
        uffd = self._mm(pid).uffd
        return [] if uffd is None else [uf.event for uf in uffd.fault_pending]

    def uffd_waiting(self, pid: int) -> list[UffdEvent]:
        """The faults asleep on the process's userfaultfd now, oldest first (delivered or not)."""
        uffd = self._mm(pid).uffd
        return [] if uffd is None else [uf.event for uf in uffd.faults]

    # -- rmap walk
    async def walk(self, pid: int, addr: int, blocking: bool = False) -> WalkResult:
        """folio_referenced on the folio mapped at ``addr``: trylock mode, or blocking (slow path)."""
        mm = self._mm(pid)
        check_u64(addr)
        if not self.gate.try_enter(): await self.gate.enter()
        cur = self._cur("walk", pid)
        try:
            folio = mapped_folio(mm, addr)
            if folio is None:
                swp = mm.swap_pte_lookup(addr)
                if swp is not None and is_migration_entry(swp.entry):
                    raise MmError(errno.EAGAIN, f"the folio at {addr:#x} is being split")
                raise MmError(errno.ENOENT, f"the page at {addr:#x} is swapped out" if swp is not None else
                              f"nothing mapped at {addr:#x}")
            if folio is ZERO_PAGE or folio is HUGE_ZERO_FOLIO:
                raise MmError(errno.ENOENT, f"the zero page at {addr:#x} has no reverse map")
            if not folio_try_get(self.k, folio):  # the caller's reference, as a PFN walker takes one
                raise MmError(errno.EAGAIN, f"the folio at {addr:#x} is being split or freed")
            try:
                rwc = await self.k.ops.folio_referenced(self.k, cur, folio, try_lock=not blocking)
            except BaseException:
                await self.k.give_back(cur)  # cancelled (or a detector's Deadlock) part-way
                raise
            finally:
                folio_put(self.k, folio)
        finally:
            self._call_done(cur)
        self.k.stats["walk"] += 1
        self.k.stats["walk_fast_retries"] += rwc.fast_retries
        self.k.stats["walk_slow_retries"] += rwc.slow_retries
        if rwc.contended:
            self.k.stats["walk_contended"] += 1
        return WalkResult(
            referenced=-1 if rwc.contended else rwc.referenced,
            contended=rwc.contended,
            mappings=tuple(sorted(rwc.mappings)),
            fast_retries=rwc.fast_retries,
            slow_retries=rwc.slow_retries,
        )

    # -- reclaim
    async def _kswapd(self) -> None:
        """kswapd's balancing (balance_pgdat), done by the call that finds the budget above its high
        watermark (the budget less 1/WATERMARK_SHARE of it): reclaim down to the low watermark
        (1/WATERMARK_STEP of the budget lower) before the call allocates, so that what memcg
        reclaim does not cover (page tables, VMAs, anon_vmas) finds room too while swap has it.
        Runs to its end even if the call is cancelled; nothing happens without swap room."""
        k = self.k
        if not k.swap.nr_swap_pages:
            return
        memcg = k.memcg
        assert memcg.limit is not None and self._high is not None
        low = self._high - memcg.limit // WATERMARK_STEP
        cur = Current("kswapd", 0)
        k.stats["reclaim_kswapd"] += 1
        try:
            await uninterruptible(lambda: shrink_lruvec(k, cur, (memcg.usage - low) // FOLIO_BYTES + 1))
        except BaseException:
            await k.give_back(cur)  # a detector's Deadlock part-way
            raise

    async def reclaim(self, pages: int) -> int:
        """Reclaim up to ``pages`` folios (shrink_lruvec: the active list aged by the unlocked rmap
        walker, the inactive list's folios swapped out and freed once written). Returns the folios
        freed; 0 without swap. Runs to its end even if the caller is cancelled."""
        check_u64(pages, "pages")
        if not self.gate.try_enter(): await self.gate.enter()
        cur = self._cur("reclaim", 0)
        k = self.k
        try:
            try:
                return await uninterruptible(lambda: shrink_lruvec(k, cur, pages))
            except BaseException:
                await k.give_back(cur)  # a detector's Deadlock part-way
                raise
        finally:
            self._call_done(cur)

    # -- inspection
    def pagemap(self, pid: int, addr: int, length: int, max_pages: int | None = None) -> list[PagemapEntry]:
        """What /proc/PID/pagemap, mincore, /proc/kpageflags and /proc/kpagecount say of each page
        of [addr, addr + length) (length rounded up to whole pages), without faulting. EINVAL for
        an address that is not page-aligned or a range past the address space; ResultTooLarge for
        more than ``max_pages`` pages."""
        mm = self._mm(pid)
        check_u64(addr)
        check_u64(length, "length")
        if addr & ~PAGE_MASK:
            raise MmError(errno.EINVAL, f"address {addr:#x} is not page-aligned")
        pages = page_align(length) >> PAGE_SHIFT
        if addr + (pages << PAGE_SHIFT) > 1 << 64:
            raise MmError(errno.EINVAL, "range wraps around the address space")
        if max_pages is not None and pages > max_pages:
            raise ResultTooLarge("the pagemap", max_pages)
        return pagemap_read(mm, self.k.swap, addr, pages)

    def folio(self, pid: int, addr: int) -> FolioInfo | None:
        """The folio mapped at ``addr`` (no fault is taken), or None if nothing is mapped."""
        mm = self._mm(pid)
        check_u64(addr)
        hp = mm.huge_pmd_lookup(addr)
        if hp is not None:
            f: Folio = hp.folio
            i = (addr >> PAGE_SHIFT) & (HPAGE_PMD_NR - 1)
            write, young, pmd = hp.write, hp.young, True
            if f is HUGE_ZERO_FOLIO:
                return FolioInfo(True, 0, 0, False, 0, None, False, young, f.order, True, False)
        else:
            pte = mm.pte_lookup(addr)
            if pte is None:
                return None
            f, i, write, young, pmd = pte.folio, pte.page, pte.write, pte.young, False
            if f is ZERO_PAGE:
                return FolioInfo(True, 0, 0, False, 0, None, write, young)
        return FolioInfo(
            zero_page=False,
            value=f.page_value(i),
            mapcount=f.page_mapcount(i),
            exclusive=f.page_anon_exclusive(0 if pmd else i),
            index=f.index,
            anon_vma=f.mapping.id if f.mapping is not None else None,
            writable=write,
            young=young,
            order=f.order,
            pmd=pmd,
            pinned=folio_maybe_dma_pinned(f),
        )

    def vmas(self, pid: int) -> list[VmaInfo]:
        return [vma_info(v) for v in self._mm(pid).vmas]

    async def vmas_iter(self, pid: int) -> AsyncIterator[VmaInfo]:
        """The process's VMAs in address order, letting other tasks run every RESCHED_WORK (as
        /proc/pid/maps does, the listing is not one snapshot when the VMAs change meanwhile)."""
        mt = self._mm(pid).mm_mt
        last: int | None = None
        while True:
            keys = mt.irange() if last is None else mt.irange(minimum=last, inclusive=(False, True))
            chunk = list(islice(keys, RESCHED_WORK))
            for key in chunk:
                v = mt.get(key)
                if v is not None:
                    yield vma_info(v)
            if len(chunk) < RESCHED_WORK:
                return
            last = chunk[-1]
            await cond_resched()

    def _anon_vma_tree_steps(
        self, pid: int, addr: int | None, max_mappings: int | None
    ) -> Iterator[dict[str, Any] | None]:
        """The records of ``anon_vma_tree``, one at a time, with a None every RESCHED_WORK units of
        work (the async form lets other tasks run there). Raises ResultTooLarge as soon as the
        trees are known to hold more than ``max_mappings`` AVCs (the records' ``vmas`` entries)."""
        mm = self._mm(pid)
        if addr is not None:
            folio = mapped_folio(mm, addr)
            if folio is None or folio.mapping is None:  # none, or either zero page
                raise MmError(errno.ENOENT, f"no anonymous folio at {addr:#x}")
            roots = [folio.mapping.root]
        else:
            seen_roots: dict[int, AnonVma] = {}
            work = 0
            for v in mm.vmas:
                if v.anon_vma_chain:
                    root = v.anon_vma_chain[0].anon_vma.root
                    seen_roots[id(root)] = root
                work += 1
                if work >= RESCHED_WORK:
                    work = 0
                    yield None
            roots = list(seen_roots.values())
        # Every VMA of a tree is chained to its root; the anon_vmas of the tree are the root and
        # whatever those VMAs' chains link to. Their AVCs are exactly the records' entries.
        members: dict[int, AnonVma] = {}
        total = 0
        work = 0
        for root in roots:
            members[id(root)] = root
            for root_avc in list(root.rb_root):
                chain = root_avc.vma.anon_vma_chain
                total += len(chain)
                if max_mappings is not None and total > max_mappings:
                    raise ResultTooLarge("the anon_vma tree", max_mappings)
                for avc in chain:
                    members[id(avc.anon_vma)] = avc.anon_vma
                work += 1 + len(chain)
                if work >= RESCHED_WORK:
                    work = 0
                    yield None
        for av in sorted(members.values(), key=lambda a: a.id):
            if av.freed:  # let go while we yielded
                continue
            avcs = list(av.rb_root)
            work += 1 + len(avcs)
            if work >= RESCHED_WORK:
                work = 0
                yield None
            if len(avcs) <= RESCHED_WORK:
                vmas = sorted((avc.vma.mm.id, avc.vma.start) for avc in avcs)
            else:  # sorted runs, merged, with room for others between them
                runs = []
                for i in range(0, len(avcs), RESCHED_WORK):
                    runs.append(sorted((avc.vma.mm.id, avc.vma.start) for avc in avcs[i : i + RESCHED_WORK]))
                    yield None
                vmas = []
                for entry in heapq.merge(*runs):
                    vmas.append(entry)
                    if len(vmas) % RESCHED_WORK == 0:
                        yield None
            yield {
                "id": av.id,
                "root": av.root.id,
                "parent": av.parent.id,
                "refcount": av.refcount,
                "num_children": av.num_children,
                "num_active_vmas": av.num_active_vmas,
                "vmas": vmas,
            }

    def anon_vma_tree(self, pid: int, addr: int | None = None) -> list[dict[str, Any]]:
        """The anon_vma trees reachable from a process (or from the folio at ``addr``): one entry
        per anon_vma with its root, parent, counters and the (pid, vma start) of each AVC."""
        return [r for r in self._anon_vma_tree_steps(pid, addr, None) if r is not None]

    async def anon_vma_tree_iter(
        self, pid: int, addr: int | None = None, max_mappings: int | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """``anon_vma_tree`` one record at a time, letting other tasks run every RESCHED_WORK units
        of work; ResultTooLarge once more than ``max_mappings`` AVCs are known to be in it."""
        for r in self._anon_vma_tree_steps(pid, addr, max_mappings):
            if r is None:
                await cond_resched()
            else:
                yield r

    def _audit_steps(self, problems: list[str]) -> Iterator[None]:
        return audit_steps(self, problems)

    def check_invariants(self) -> list[str]:
        """Audit the whole model at a quiescent point; every problem is also a detector event."""
        return self.auditor.check(self._audit_steps)

    async def audit(self) -> list[str]:
        """``check_invariants`` from a running server: new calls wait while the calls in progress
        finish and the audit runs, and the audit lets other tasks (not model calls) run every
        RESCHED_WORK units of work, so the event loop never stalls. Audits asked for at once share
        one run (a caller takes the result of an audit that began after it asked), and with
        ``audit_share`` below 1 the next audit waits until the last one's time is that share of the
        time since it began: a client that loops the audit cannot hold everyone else's calls up."""
        return await self.auditor.audit(self._audit_steps)

    def stats(self) -> dict[str, int]:
        """The model's counters, by name (``stats.ModelStats.as_dict``)."""
        return read_stats(self).as_dict()


__all__ = [
    "PROTOCOLS",
    "PAGE_SIZE",
    "FolioInfo",
    "LimitExceeded",
    "MemoryLimitExceeded",
    "MemoryModel",
    "MmError",
    "PageLedger",
    "PagemapEntry",
    "ResultTooLarge",
    "UffdEvent",
    "VmaInfo",
    "WalkResult",
]
