"""MemoryModel: the model's public API, one async method per user-visible operation.

Each call runs as its own task (a ``Current``), takes the mm's mmap_lock the way the kernel's
system call would, and calls into the protocol code. Teardown-like operations (munmap, madvise,
registration, exit) finish even when the caller is cancelled; a cancelled move keeps the pages it
already moved; a cancelled fork is rolled back. Results are plain dataclasses.

A ledger of expected page contents is kept beside the model, updated at the same atomic points
as the pages themselves, so that ``check_invariants`` can prove data is neither lost nor duplicated.
"""

from __future__ import annotations

import dataclasses
import errno
from dataclasses import dataclass
from itertools import count
from typing import Any

from .fork import dup_mmap, exit_mmap
from .sched import uninterruptible
from .invariants import check_invariants
from .kernel import PROTOCOLS, Kernel
from .locks import Current
from .memory import folio_put, handle_mm_fault
from .mm_types import (
    PAGE_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    VM_DONTCOPY,
    VM_UFFD_MISSING,
    VM_UFFD_WP,
    VM_WIPEONFORK,
    ZERO_PAGE,
    Mm,
    MmError,
    Vma,
)
from .mmap import do_madvise, do_mmap, do_munmap, page_align
from .rmap import AnonVma, folio_referenced
from .userfaultfd import (
    UFFDIO_REGISTER_MODES,
    MoveProgress,
    userfaultfd_move,
    userfaultfd_register,
    userfaultfd_unregister,
)

U64_MAX = (1 << 64) - 1


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


class LimitExceeded(Exception):
    """A configured limit of the model (processes, resident pages) was reached."""

    def __init__(self, limit: str, value: int) -> None:
        super().__init__(f"{limit} limit of {value} reached")
        self.limit = limit
        self.value = value


class PageLedger(dict[int, int]):
    """Expected contents of one process: virtual page number -> value, for pages holding a folio."""

    def moved(self, src_addr: int, dst_addr: int, nbytes: int) -> None:
        """UFFDIO_MOVE carried ``nbytes`` from src to dst (holes and zero pages carry nothing)."""
        s, d = src_addr >> PAGE_SHIFT, dst_addr >> PAGE_SHIFT
        if nbytes == PAGE_SIZE:
            value = self.pop(s, None)
            if value is not None:
                self[d] = value
            return
        for i in range(nbytes >> PAGE_SHIFT):
            value = self.pop(s + i, None)
            if value is not None:
                self[d + i] = value


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

    ``protocol`` picks the rmap/move protocol generation (see ``kernel.PROTOCOLS``); ``seed`` and
    ``preempt`` drive the scheduler at the named preemption points; ``detectors`` turns lockdep, the
    walk detectors and the use-after-free check on.
    """

    def __init__(
        self,
        protocol: str = "recheck",
        seed: int = 0,
        preempt: float = 0.0,
        detectors: bool = True,
        max_processes: int | None = None,
        max_pages: int | None = None,
    ) -> None:
        self.k = Kernel(protocol=protocol, seed=seed, preempt=preempt, detectors=detectors)
        self.max_processes = max_processes
        self.max_pages = max_pages
        self.processes: dict[int, Mm] = {}
        self.parents: dict[int, int | None] = {}
        self._pids = count(1)
        #: Expected contents: pid -> {virtual page number: value} for every page holding a folio.
        self.ledger: dict[int, PageLedger] = {}

    @property
    def protocol(self) -> str:
        return self.k.protocol.name

    @property
    def detectors(self) -> Any:
        return self.k.detectors

    # -- helpers
    def _cur(self, op: str, pid: int) -> Current:
        return Current(op, pid)

    def _mm(self, pid: int) -> Mm:
        mm = self.processes.get(pid)
        if mm is None:
            raise MmError(errno.ESRCH, f"no process {pid}")
        return mm

    @staticmethod
    def _check_addr(addr: int, what: str = "address") -> None:
        if not isinstance(addr, int) or addr < 0 or addr > U64_MAX:
            raise MmError(errno.EINVAL, f"{what} must be an unsigned 64-bit integer")

    async def _write_locked(self, mm: Mm, cur: Current, body: Any) -> Any:
        """Take mmap_lock for write (cancellable), then run ``body`` to completion."""
        lock = mm.mmap_lock
        if not lock.down_write(cur):
            await lock.wait(cur)
        try:
            if mm.users == 0:
                raise MmError(errno.ESRCH, "process has exited")
            return await uninterruptible(body)
        finally:
            lock.up_write(cur)

    # -- processes
    def _check_process_limit(self) -> None:
        if self.max_processes is not None and len(self.processes) >= self.max_processes:
            raise LimitExceeded("max_processes", self.max_processes)

    async def create_process(self) -> int:
        self._check_process_limit()
        pid = next(self._pids)
        self.processes[pid] = Mm(pid, self.k.lockdep)
        self.parents[pid] = None
        self.ledger[pid] = PageLedger()
        return pid

    async def fork(self, pid: int) -> int:
        """fork(): dup_mmap under both mmap_locks. A cancelled fork leaves no child behind."""
        parent = self._mm(pid)
        self._check_process_limit()
        cur = self._cur("fork", pid)
        k = self.k
        cpid = next(self._pids)
        child = Mm(cpid, k.lockdep)
        child.mmap_base = parent.mmap_base
        lock = parent.mmap_lock
        if not lock.down_write(cur):
            await lock.wait(cur)
        try:
            if parent.users == 0:
                raise MmError(errno.ESRCH, "process has exited")
            child.mmap_lock.down_write(cur, nested=True)  # mmap_write_lock_nested: new, uncontended
            try:
                await dup_mmap(k, cur, child, parent)
            except BaseException:
                await uninterruptible(lambda: exit_mmap(k, cur, child))
                raise
            finally:
                child.mmap_lock.up_write(cur)
            self.processes[cpid] = child
            self.parents[cpid] = pid
            copied = [(v.start >> PAGE_SHIFT, v.end >> PAGE_SHIFT) for v in child.vmas if not v.flags & VM_WIPEONFORK]
            self.ledger[cpid] = PageLedger(
                (vpn, val) for vpn, val in self.ledger[pid].items() if any(lo <= vpn < hi for lo, hi in copied)
            )
        finally:
            lock.up_write(cur)
        return cpid

    async def exit(self, pid: int) -> None:
        """exit(): the mm is torn down completely, even if the caller is cancelled."""
        mm = self._mm(pid)
        cur = self._cur("exit", pid)
        k = self.k

        async def body() -> None:
            await exit_mmap(k, cur, mm)
            self.processes.pop(pid, None)
            self.ledger.pop(pid, None)

        await self._write_locked(mm, cur, body)

    # -- mappings
    async def mmap(
        self, pid: int, length: int, prot: str = "rw", addr: int | None = None, uffd: str | None = None
    ) -> VmaInfo:
        """mmap of private anonymous memory; with ``uffd`` ("missing", "wp") the new range is
        registered with the process's userfaultfd under the same mmap_lock."""
        mm = self._mm(pid)
        if addr is not None:
            self._check_addr(addr)
        if uffd is not None and uffd not in UFFDIO_REGISTER_MODES:
            raise MmError(errno.EINVAL, f"uffd mode must be one of {', '.join(UFFDIO_REGISTER_MODES)}, not {uffd!r}")
        cur = self._cur("mmap", pid)

        async def body() -> VmaInfo:
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

        return await self._write_locked(mm, cur, body)

    async def munmap(self, pid: int, addr: int, length: int) -> None:
        mm = self._mm(pid)
        self._check_addr(addr)
        cur = self._cur("munmap", pid)

        async def body() -> None:
            removed = await do_munmap(self.k, cur, mm, addr, length)
            ledger = self.ledger[pid]
            for v in removed:
                for vpn in [p for p in ledger if v.start >> PAGE_SHIFT <= p < v.end >> PAGE_SHIFT]:
                    del ledger[vpn]

        await self._write_locked(mm, cur, body)

    async def madvise(self, pid: int, addr: int, length: int, advice: str) -> None:
        mm = self._mm(pid)
        self._check_addr(addr)
        cur = self._cur("madvise", pid)
        await self._write_locked(mm, cur, lambda: do_madvise(self.k, cur, mm, addr, length, advice))

    async def uffd_register(self, pid: int, addr: int, length: int, mode: str = "missing") -> None:
        mm = self._mm(pid)
        self._check_addr(addr)
        cur = self._cur("uffd_register", pid)
        await self._write_locked(mm, cur, lambda: userfaultfd_register(self.k, cur, mm, addr, length, mode))

    async def uffd_unregister(self, pid: int, addr: int, length: int) -> None:
        mm = self._mm(pid)
        self._check_addr(addr)
        cur = self._cur("uffd_unregister", pid)
        await self._write_locked(mm, cur, lambda: userfaultfd_unregister(self.k, cur, mm, addr, length))

    # -- accesses
    async def _access(self, pid: int, addr: int, write: bool, value: int) -> int:
        mm = self._mm(pid)
        self._check_addr(addr)
        cur = self._cur("write" if write else "read", pid)
        lock = mm.mmap_lock
        if not lock.down_read(cur):
            await lock.wait(cur)
        try:
            if mm.users == 0:
                raise MmError(errno.ESRCH, "process has exited")
            vma = mm.vma_lookup(addr)
            if vma is None:
                raise MmError(errno.EFAULT, f"no mapping at {addr:#x} (SIGSEGV)")
            result = await handle_mm_fault(self.k, cur, vma, addr & PAGE_MASK, write, value)
            if write:
                self.ledger[pid][addr >> PAGE_SHIFT] = value
            return result
        finally:
            lock.up_read(cur)

    async def read(self, pid: int, addr: int) -> int:
        """A read access: faults in the zero page where nothing is mapped."""
        return await self._access(pid, addr, False, 0)

    async def write(self, pid: int, addr: int, value: int) -> None:
        """A write access: a new folio, a COW copy, or the folio reused in place."""
        if not isinstance(value, int) or not 0 <= value <= U64_MAX:
            raise MmError(errno.EINVAL, "value must be an unsigned 64-bit integer")
        if self.max_pages is not None and self.k.folios_live >= self.max_pages:
            pte = self._mm(pid).pte_lookup(addr & PAGE_MASK) if isinstance(addr, int) and addr >= 0 else None
            if pte is None or not pte.write:  # the write may need a new folio
                raise LimitExceeded("max_pages", self.max_pages)
        await self._access(pid, addr, True, value)

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
                self._check_addr(v, what)
        if progress is None:
            progress = MoveProgress()
        progress.on_step = self.ledger[pid].moved
        cur = Current("move", pid)
        return await userfaultfd_move(self.k, cur, mm, dst, src, length, mode, progress)

    # -- rmap walk
    async def walk(self, pid: int, addr: int, blocking: bool = False) -> WalkResult:
        """folio_referenced on the folio mapped at ``addr``: trylock mode, or blocking (slow path)."""
        mm = self._mm(pid)
        self._check_addr(addr)
        pte = mm.pte_lookup(addr)
        if pte is None:
            raise MmError(errno.ENOENT, f"nothing mapped at {addr:#x}")
        folio = pte.folio
        if folio is ZERO_PAGE:
            raise MmError(errno.ENOENT, f"the zero page at {addr:#x} has no reverse map")
        cur = self._cur("walk", pid)
        folio.refcount += 1  # the caller's reference, as reclaim holds one
        try:
            rwc = await folio_referenced(self.k, cur, folio, try_lock=not blocking)
        finally:
            folio_put(self.k, folio)
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

    # -- inspection
    def folio(self, pid: int, addr: int) -> FolioInfo | None:
        """The folio mapped at ``addr`` (no fault is taken), or None if nothing is mapped."""
        mm = self._mm(pid)
        self._check_addr(addr)
        pte = mm.pte_lookup(addr)
        if pte is None:
            return None
        f = pte.folio
        if f is ZERO_PAGE:
            return FolioInfo(True, 0, 0, False, 0, None, pte.write, pte.young)
        return FolioInfo(
            zero_page=False,
            value=f.value,
            mapcount=f.mapcount,
            exclusive=f.exclusive,
            index=f.index,
            anon_vma=f.mapping.id if f.mapping is not None else None,
            writable=pte.write,
            young=pte.young,
        )

    def vmas(self, pid: int) -> list[VmaInfo]:
        return [vma_info(v) for v in self._mm(pid).vmas]

    def anon_vma_tree(self, pid: int, addr: int | None = None) -> list[dict[str, Any]]:
        """The anon_vma trees reachable from a process (or from the folio at ``addr``): one entry
        per anon_vma with its root, parent, counters and the (pid, vma start) of each AVC."""
        mm = self._mm(pid)
        seen: dict[int, AnonVma] = {}
        if addr is not None:
            pte = mm.pte_lookup(addr)
            if pte is None or pte.folio is ZERO_PAGE or pte.folio.mapping is None:
                raise MmError(errno.ENOENT, f"no anonymous folio at {addr:#x}")
            roots = [pte.folio.mapping.root]
        else:
            roots = list({id(avc.anon_vma.root): avc.anon_vma.root for v in mm.vmas for avc in v.anon_vma_chain}.values())
        wanted = {id(r) for r in roots}
        for av in self.k.anon_vma_cache.live:
            if id(av.root) in wanted:
                seen[av.id] = av
        return [
            {
                "id": av.id,
                "root": av.root.id,
                "parent": av.parent.id,
                "refcount": av.refcount,
                "num_children": av.num_children,
                "num_active_vmas": av.num_active_vmas,
                "vmas": sorted((avc.vma.mm.id, avc.vma.start) for avc in av.rb_root),
            }
            for _, av in sorted(seen.items())
        ]

    def check_invariants(self) -> list[str]:
        """Audit the whole model at a quiescent point; every problem is also a detector event."""
        problems = check_invariants(self)
        for p in problems:
            self.k.detectors.report("invariant", problem=p)
        return problems

    def stats(self) -> dict[str, int]:
        k = self.k
        out: dict[str, int] = dict(k.stats)
        out.update({f"violation_{kind}": n for kind, n in k.detectors.counts.items()})
        out["violations"] = k.detectors.total
        out["processes"] = len(self.processes)
        out["folios"] = k.folios_live
        out["anon_vmas"] = len(k.anon_vma_cache.live)
        out["anon_vma_cache_reused"] = k.anon_vma_cache.reused
        out["rcu_gp_completed"] = k.rcu.gp_completed
        out["preempt_yields"] = sum(k.sched.yields.values())
        return out


__all__ = ["PROTOCOLS", "PAGE_SIZE", "FolioInfo", "LimitExceeded", "MemoryModel", "MmError", "VmaInfo", "WalkResult"]
