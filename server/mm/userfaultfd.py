"""userfaultfd registration and UFFDIO_MOVE (fs/userfaultfd.c, mm/userfaultfd.c), as in 6.18."""

from __future__ import annotations

import asyncio
import errno
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .locks import Current, SpinLock
from .memcontrol import MemoryLimitExceeded
from .mm_types import (
    FOLIO_BYTES,
    PAGE_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_SHIFT,
    PMD_SIZE,
    PTE_BYTES,
    VM_ACCESS_FLAGS,
    VM_LOCKED,
    VM_SHARED,
    VM_UFFD_FLAGS,
    VM_UFFD_MISSING,
    VM_UFFD_WP,
    VM_WRITE,
    ZERO_PAGE,
    Folio,
    LimitExceeded,
    Mm,
    MmError,
    PageTable,
    Pte,
    Vma,
)
from .mmap import vma_modify
from .mmap_lock import lock_vma_under_rcu, vma_end_read, vma_start_read_locked
from .rmap import (
    AnonVma,
    anon_vma_prepare,
    folio_add_new_anon_rmap,
    folio_get_anon_vma,
    folio_move_anon_rmap,
    preempt_point_unkillable,
    put_anon_vma_final,
)
from .sched import RESCHED_WORK, cond_resched

if TYPE_CHECKING:
    from .kernel import Kernel

UFFDIO_MOVE_MODE_DONTWAKE = 1 << 0
UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES = 1 << 1
UFFD_FEATURE_MOVE = 1 << 16

UFFDIO_REGISTER_MODES = {"missing": VM_UFFD_MISSING, "wp": VM_UFFD_WP, "missing+wp": VM_UFFD_MISSING | VM_UFFD_WP}


#: A long move lets other tasks run after this many bytes (RESCHED_WORK pages).
RESCHED_BYTES = RESCHED_WORK * PAGE_SIZE

#: What a per-page error of move_pages means.
_STEP_ERRORS = {
    errno.EEXIST: "dst page is already populated",
    errno.ENOENT: "src page is not mapped",
    errno.EBUSY: "src page is not exclusive to this process",
}


class UserfaultfdCtx:
    """struct userfaultfd_ctx: one per mm here, opened on first registration."""

    def __init__(self, cid: int, mm: Mm) -> None:
        self.id = cid
        self.mm = mm
        self.features = UFFD_FEATURE_MOVE
        self.mmap_changing = 0  # raised only by non-cooperative events, which are not modelled
        # The faults asleep in handle_userfault (fault_pending_wqh and fault_wqh together), in
        # arrival order, and the ones whose events nobody has read yet (fault_pending_wqh).
        self.faults: dict[Userfault, None] = {}
        self.fault_pending: deque[Userfault] = deque()
        # Readers asleep until an event arrives (fd_wqh); set on exit (userfaultfd_release).
        self.read_waiters: list[asyncio.Future[None]] = []
        self.readers = 0  # listeners reading the events now (Userfaults streams)
        self.released = False

    def __repr__(self) -> str:
        return f"<UserfaultfdCtx {self.id} mm={self.mm.id}>"


def userfaultfd_ctx(k: Kernel, mm: Mm) -> UserfaultfdCtx:
    """The process's userfaultfd: opened on first use, also with nothing registered yet."""
    ctx = mm.uffd
    if ctx is None:
        ctx = mm.uffd = UserfaultfdCtx(k.next_vma_id(), mm)
    return ctx


def validate_range(mm: Mm, start: int, length: int) -> None:
    """fs/userfaultfd.c validate_range: EINVAL on misalignment, zero length or out of range."""
    if start & ~PAGE_MASK:
        raise MmError(errno.EINVAL, f"address {start:#x} is not page-aligned")
    if length & ~PAGE_MASK:
        raise MmError(errno.EINVAL, f"length {length:#x} is not page-aligned")
    if length <= 0:
        raise MmError(errno.EINVAL, "length must be positive")
    if start >= mm.task_size or length > mm.task_size - start:
        raise MmError(errno.EINVAL, "range exceeds the address space")


async def userfaultfd_register(k: Kernel, cur: Current, mm: Mm, start: int, length: int, mode: str) -> None:
    """UFFDIO_REGISTER. Expects mmap_lock held for write."""
    if mode not in UFFDIO_REGISTER_MODES:
        raise MmError(errno.EINVAL, f"mode must be one of {', '.join(UFFDIO_REGISTER_MODES)}, not {mode!r}")
    validate_range(mm, start, length)
    end = start + length
    vmas = mm.vmas_in(start, end)
    if not vmas:
        raise MmError(errno.EINVAL, "no mapping in the range")
    ctx = userfaultfd_ctx(k, mm)
    for vma in vmas:
        if vma.flags & VM_SHARED:
            raise MmError(errno.EINVAL, "shared mappings are not supported")
        if vma.uffd_ctx is not None and vma.uffd_ctx is not ctx:
            raise MmError(errno.EBUSY, "range registered with another userfaultfd")
    vm_flags = UFFDIO_REGISTER_MODES[mode]

    def update(vma: Vma) -> tuple[int, UserfaultfdCtx | None] | None:
        if vma.uffd_ctx is ctx and (vma.flags & vm_flags) == vm_flags:
            return None
        return (vma.flags & ~VM_UFFD_FLAGS) | vm_flags, ctx

    await vma_modify(k, cur, mm, start, end, update)


async def userfaultfd_unregister(k: Kernel, cur: Current, mm: Mm, start: int, length: int) -> None:
    """UFFDIO_UNREGISTER. Expects mmap_lock held for write."""
    validate_range(mm, start, length)
    end = start + length
    if not mm.vmas_in(start, end):
        raise MmError(errno.EINVAL, "no mapping in the range")

    def update(vma: Vma) -> tuple[int, UserfaultfdCtx | None] | None:
        if vma.uffd_ctx is None:
            return None
        return vma.flags & ~VM_UFFD_FLAGS, None

    # The write-protect markers of the range go with the registration (checked on 6.18: a write
    # after UNREGISTER and a new WP registration does not fault).
    for vma in mm.vmas_in(start, end):
        if vma.flags & VM_UFFD_WP:
            await uffd_wp_clear(cur, mm, max(start, vma.start), min(end, vma.end))
    # Faults asleep in a MISSING-registered part are woken, so that they do not hang (their
    # retry then faults normally): checked on 6.18, a read fault pending at UNREGISTER resumes.
    ctx = mm.uffd
    if ctx is not None and ctx.faults:
        for vma in mm.vmas_in(start, end):
            if vma.flags & VM_UFFD_MISSING and vma.uffd_ctx is ctx:
                lo, hi = max(start, vma.start), min(end, vma.end)
                wake_userfault(k, ctx, lo, hi - lo)
    await vma_modify(k, cur, mm, start, end, update)


async def uffd_wp_clear(cur: Current, mm: Mm, start: int, end: int) -> None:
    """uffd_wp_range(..., false): drop the uffd-wp bit of the PTEs of [start, end). Expects
    mmap_lock held for write; takes each PTE table's PTL in turn; lets others run every
    RESCHED_WORK PTEs."""
    lo, hi = start >> PAGE_SHIFT, end >> PAGE_SHIFT
    work = 0
    for idx in mm.pgtables_in(start, end):
        pt = mm.pgtables.get(idx)
        if pt is None or not pt.ptes:
            continue
        pt.ptl.spin_lock(cur)
        for vpn, pte in pt.ptes.items():
            if lo <= vpn < hi:
                pte.uffd_wp = False
        pt.ptl.spin_unlock(cur)
        work += len(pt.ptes) + 1
        if work >= RESCHED_WORK:
            work = 0
            await cond_resched()


# ---------------------------------------------------------------------------------------------
# Userfaults: handle_userfault, the event queue, wake_userfault (fs/userfaultfd.c)


@dataclass(frozen=True)
class UffdEvent:
    """A UFFD_EVENT_PAGEFAULT message: the faulting page (page-aligned: no
    UFFD_FEATURE_EXACT_ADDRESS), whether the access was a write (UFFD_PAGEFAULT_FLAG_WRITE) and
    whether it is a write-protect fault (UFFD_PAGEFAULT_FLAG_WP)."""

    addr: int
    write: bool
    wp: bool


class Userfault:
    """struct userfaultfd_wait_queue: one access asleep in handle_userfault until woken."""

    __slots__ = ("event", "fut", "reader")

    def __init__(self, event: UffdEvent, fut: asyncio.Future[None]) -> None:
        self.event = event
        self.fut = fut  # done once woken (or withdrawn by a cancelled caller)
        # The delivered-but-unresolved events of the listener that read it (fault_wqh); None
        # while its event is still queued (fault_pending_wqh).
        self.reader: dict[Userfault, None] | None = None


class VmFaultRetry(Exception):
    """handle_userfault's VM_FAULT_RETRY: the fault is queued on ``userfault``; the caller drops
    mmap_lock, sleeps in userfault_wait and retries the access from the top."""

    def __init__(self, ctx: UserfaultfdCtx, userfault: Userfault) -> None:
        super().__init__("userfault")
        self.ctx = ctx
        self.userfault = userfault


def handle_userfault(k: Kernel, cur: Current, vma: Vma, addr: int, write: bool, wp: bool = False) -> VmFaultRetry:
    """A missing page in a VM_UFFD_MISSING VMA, or (``wp``, from do_wp_page, ``write`` set) a
    write to a uffd-wp PTE in a VM_UFFD_WP VMA: queue one event on the VMA's userfaultfd (two
    accesses to one page queue two, as 6.18 does for two threads) and wake its readers. Expects
    the VMA lock or mmap_lock held (read), no PTL; takes nothing (fault_pending_wqh's spinlock has no model
    counterpart: nothing runs between the PTE check and the queueing). Returns the
    VM_FAULT_RETRY for the caller to raise. A server bounds the faults asleep, per process and in
    all (the kernel does not): past either bound the access fails with LimitExceeded instead."""
    ctx = vma.uffd_ctx
    assert ctx is not None and not ctx.released
    if k.max_uffd_faults_per_mm is not None and len(ctx.faults) >= k.max_uffd_faults_per_mm:
        raise LimitExceeded("max_pending_faults_per_process", k.max_uffd_faults_per_mm)
    if k.max_uffd_faults is not None and k.uffd_faults_asleep >= k.max_uffd_faults:
        raise LimitExceeded("max_pending_faults", k.max_uffd_faults)
    uf = Userfault(UffdEvent(addr & PAGE_MASK, write, wp), asyncio.get_running_loop().create_future())
    ctx.faults[uf] = None
    k.uffd_faults_asleep += 1
    ctx.fault_pending.append(uf)
    _wake_readers(ctx)
    k.stats["uffd_faults"] += 1
    return VmFaultRetry(ctx, uf)


async def userfault_wait(k: Kernel, ctx: UserfaultfdCtx, uf: Userfault) -> None:
    """handle_userfault's sleep, with no lock held, until a COPY, ZEROPAGE, MOVE or WAKE covering
    the page (or UNREGISTER, or exit) wakes it. A sleep is reported to the schedule explorer's
    controller as rcu.synchronize_rcu does. A cancelled caller (gRPC deadline, client cancel)
    abandons the fault: it leaves the queues, its event too if nobody has read it."""
    fut = uf.fut
    if fut.done():
        return
    ctl = k.sched.controller
    if ctl is not None:
        ctl.blocked(fut)
    sleep = k.on_uffd_sleep  # the server's admission control: a sleeper holds no call slot
    if sleep is not None:
        sleep(True)
    try:
        await fut
    except asyncio.CancelledError:
        _userfault_remove(k, ctx, uf)
        raise
    finally:
        if sleep is not None:
            sleep(False)
    if ctl is not None:
        await ctl.park("uffd:woken")


def _userfault_remove(k: Kernel, ctx: UserfaultfdCtx, uf: Userfault) -> None:
    if ctx.faults.pop(uf, 0) is None:  # still queued somewhere
        k.uffd_faults_asleep -= 1
        if uf.reader is not None:
            uf.reader.pop(uf, None)
        else:
            ctx.fault_pending.remove(uf)


def wake_userfault(k: Kernel, ctx: UserfaultfdCtx, start: int, length: int) -> int:
    """__wake_userfault: wake every fault on a page of [start, start + length) (length 0: every
    fault), read or not; an unread one's event leaves the queue (checked on 6.18: a fault
    resolved before its message was read leaves nothing to read). Takes nothing. Returns the
    faults woken."""
    if not ctx.faults:
        return 0
    end = start + length
    woken = [uf for uf in ctx.faults if not length or start <= uf.event.addr < end]
    ctl = k.sched.controller
    for uf in woken:
        _userfault_remove(k, ctx, uf)
        if not uf.fut.done():
            uf.fut.set_result(None)
            if ctl is not None:
                ctl.woken(uf.fut)
    return len(woken)


def _wake_readers(ctx: UserfaultfdCtx) -> None:
    waiters, ctx.read_waiters = ctx.read_waiters, []
    for fut in waiters:
        if not fut.done():
            fut.set_result(None)


def userfaultfd_release(k: Kernel, ctx: UserfaultfdCtx) -> None:
    """The process exits: every fault is woken (its retry finds the mm gone: ESRCH) and every
    reader ends. Expects mmap_lock held for write (exit_mmap)."""
    ctx.released = True
    wake_userfault(k, ctx, 0, 0)
    _wake_readers(ctx)


def userfaultfd_read(ctx: UserfaultfdCtx, delivered: dict[Userfault, None]) -> UffdEvent | None:
    """userfaultfd_ctx_read, non-blocking: the oldest unread event, moved to ``delivered`` (the
    listener's read-but-unresolved events), or None."""
    if not ctx.fault_pending:
        return None
    uf = ctx.fault_pending.popleft()
    uf.reader = delivered
    delivered[uf] = None
    return uf.event


async def userfaultfd_read_wait(k: Kernel, ctx: UserfaultfdCtx) -> None:
    """Sleep until an event arrives or the process exits (fd_wqh). No lock held."""
    fut = asyncio.get_running_loop().create_future()
    ctx.read_waiters.append(fut)
    sleep = k.on_uffd_sleep  # the server's admission control: a sleeper holds no call slot
    if sleep is not None:
        sleep(True)
    try:
        await fut
    finally:
        if sleep is not None:
            sleep(False)
        try:  # still there unless woken (a cancelled wait leaves a cancelled future)
            ctx.read_waiters.remove(fut)
        except ValueError:
            pass


def userfaultfd_unread(ctx: UserfaultfdCtx, delivered: dict[Userfault, None]) -> None:
    """A listener went away: the events it read whose faults still wait go back to the front of
    the queue, in their order, for the next listener."""
    back = list(delivered)
    delivered.clear()
    for uf in back:
        uf.reader = None
    ctx.fault_pending.extendleft(reversed(back))
    if back:
        _wake_readers(ctx)


# ---------------------------------------------------------------------------------------------
# UFFDIO_MOVE


class MoveProgress:
    """How far a move got: bytes moved so far, and a hook run after each completed step."""

    __slots__ = ("moved", "on_step")

    def __init__(self, on_step: Callable[[int, int, int], None] | None = None) -> None:
        self.moved = 0
        self.on_step = on_step  # (src_addr, dst_addr, bytes)


def double_pt_lock(cur: Current, ptl1: SpinLock, ptl2: SpinLock, ordered: bool = True) -> None:
    """Take two PTLs in address order, the second nested; one lock is taken once. Expects both
    free (see double_pt_lock_wait). ``ordered=False`` is the ptl-no-address-order mutant."""
    if ptl1 is ptl2:
        ptl1.spin_lock(cur)
        return
    if ordered and ptl2.key < ptl1.key:
        ptl1, ptl2 = ptl2, ptl1
    ptl1.spin_lock(cur)
    ptl2.spin_lock(cur, nested=True)


async def double_pt_lock_wait(k: Kernel, cur: Current, ptl1: SpinLock, ptl2: SpinLock) -> None:
    """double_pt_lock where others may run: when the scheduler is active, or a task preempted
    inside its section holds one of the PTLs. Spins (Kernel.spin_on) on a held PTL; between the
    first PTL and the nested one is the ``move:between-ptls`` point."""
    if ptl1 is ptl2:
        if ptl1.owner is not None:
            await k.spin_on(cur, ptl1)
        ptl1.spin_lock(cur)
        return
    if k.protocol.ptl_address_order and ptl2.key < ptl1.key:
        ptl1, ptl2 = ptl2, ptl1
    if ptl1.owner is not None:
        await k.spin_on(cur, ptl1)
    ptl1.spin_lock(cur)
    try:
        sched = k.sched
        if sched.active and sched.should_preempt("move:between-ptls"):
            await sched.yield_now("move:between-ptls")
        if ptl2.owner is not None:
            await k.spin_on(cur, ptl2)
    except BaseException:
        ptl1.spin_unlock(cur)
        raise
    ptl2.spin_lock(cur, nested=True)


def double_pt_unlock(cur: Current, ptl1: SpinLock, ptl2: SpinLock) -> None:
    ptl1.spin_unlock(cur)
    if ptl2 is not ptl1:
        ptl2.spin_unlock(cur)


def validate_move_areas(ctx: UserfaultfdCtx, src_vma: Vma, dst_vma: Vma) -> None:
    """Only a private anonymous, writable, same-prot pair with dst registered with ``ctx``."""
    if (src_vma.flags & VM_ACCESS_FLAGS) != (dst_vma.flags & VM_ACCESS_FLAGS):
        raise MmError(errno.EINVAL, "src and dst protections differ")
    if (src_vma.flags & VM_LOCKED) != (dst_vma.flags & VM_LOCKED):
        raise MmError(errno.EINVAL, "src and dst mlock states differ")
    if not src_vma.flags & VM_WRITE:
        raise MmError(errno.EINVAL, "src is not writable")
    if dst_vma.uffd_ctx is not ctx:
        raise MmError(errno.EINVAL, "dst is not registered with this userfaultfd")


async def userfaultfd_move(
    k: Kernel, cur: Current, mm: Mm, dst: int, src: int, length: int, mode: int, progress: MoveProgress
) -> int:
    """The UFFDIO_MOVE ioctl. Returns ``length``; raises MmError with ``moved`` set otherwise:
    EAGAIN with the bytes moved for a short move, or the error with nothing moved."""
    ctx = userfaultfd_ctx(k, mm)
    if ctx.mmap_changing:
        raise MmError(errno.EAGAIN, "a non-cooperative event is pending")
    validate_range(mm, dst, length)
    validate_range(mm, src, length)
    if mode & ~(UFFDIO_MOVE_MODE_DONTWAKE | UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES):
        raise MmError(errno.EINVAL, f"unknown mode bits {mode:#x}")
    if mm.users == 0:  # mmget_not_zero
        raise MmError(errno.ESRCH, "process has exited")
    try:
        await move_pages(k, cur, ctx, dst, src, length, mode, progress)
    finally:
        # The pages moved wake the faults waiting on them, even when the move stopped short
        # (or was cancelled: a fatal signal in move_pages also returns the bytes moved).
        if progress.moved and not mode & UFFDIO_MOVE_MODE_DONTWAKE:
            wake_userfault(k, ctx, dst, progress.moved)
    moved = progress.moved
    if moved != length:
        raise MmError(errno.EAGAIN, f"moved {moved} of {length} bytes", moved=moved)
    return moved


async def move_pages(
    k: Kernel, cur: Current, ctx: UserfaultfdCtx, dst_start: int, src_start: int, length: int, mode: int,
    progress: MoveProgress,
) -> None:
    """Move ``length`` bytes page by page. Expects nothing held; takes the two VMAs' read locks
    (uffd_move_lock, falling back to the mmap_lock to find them), then per step what
    move_pages_pte takes.

    Leaves the bytes moved in ``progress``. An error after some progress is swallowed (the caller
    reports a short move as EAGAIN); an error with none is raised.
    """
    mm = ctx.mm
    dst_vma, src_vma = await uffd_move_lock(k, cur, mm, dst_start, src_start)
    try:
        if mm.users == 0:
            raise MmError(errno.ESRCH, "process has exited")
        if ctx.mmap_changing:
            raise MmError(errno.EAGAIN, "a non-cooperative event is pending")
        if src_vma.flags & VM_SHARED or dst_vma.flags & VM_SHARED:
            raise MmError(errno.EINVAL, "shared mappings cannot be moved")
        if src_start + length > src_vma.end:
            raise MmError(errno.EINVAL, "src range leaves its mapping")
        if dst_start + length > dst_vma.end:
            raise MmError(errno.EINVAL, "dst range leaves its mapping")
        validate_move_areas(ctx, src_vma, dst_vma)

        sched = k.sched
        holes = bool(mode & UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES)
        pgtables = mm.pgtables
        src_addr, dst_addr, src_end = src_start, dst_start, src_start + length
        err = 0
        oom: MemoryLimitExceeded | None = None
        since_resched = 0
        while src_addr < src_end:
            src_pt = pgtables.get(src_addr >> PMD_SHIFT)
            if src_pt is None and not holes:
                err = errno.ENOENT
                break
            try:
                if src_pt is None:
                    src_pt = mm.pte_alloc(cur, src_addr)
                dst_pt = pgtables.get(dst_addr >> PMD_SHIFT) or mm.pte_alloc(cur, dst_addr)
            except MemoryLimitExceeded as e:
                err, oom = errno.ENOMEM, e  # mm_alloc_pmd / pte_alloc failed
                break
            # The largest extent one PTL pair covers: up to the end of either PMD.
            extent = min(
                src_end - src_addr, PMD_SIZE - (src_addr & (PMD_SIZE - 1)), PMD_SIZE - (dst_addr & (PMD_SIZE - 1))
            )
            step = await move_pages_pte(k, cur, dst_vma, src_vma, dst_addr, src_addr, extent, holes, dst_pt, src_pt)
            if step < 0:
                err = -step
                if err == errno.EAGAIN:
                    k.stats["move_retry"] += 1
                    await asyncio.sleep(0)  # let whoever changed the PTE finish, then retry the step
                    continue
                break
            progress.moved += step
            if progress.on_step is not None:
                progress.on_step(src_addr, dst_addr, step)
            src_addr += step
            dst_addr += step
            if sched.active and sched.should_preempt("move:between-pages"):
                await sched.yield_now("move:between-pages")
            since_resched += step
            if since_resched >= RESCHED_BYTES:
                since_resched = 0
                await cond_resched()  # a long move must not starve other calls
        k.stats["move_pages"] += progress.moved >> PAGE_SHIFT
        if err and not progress.moved:
            if oom is not None:
                raise oom
            raise MmError(err, f"{_STEP_ERRORS.get(err, os.strerror(err))} (src {src_addr:#x}, dst {dst_addr:#x})")
    finally:
        uffd_move_unlock(cur, dst_vma, src_vma)


async def find_vma_and_prepare_anon(k: Kernel, cur: Current, mm: Mm, addr: int) -> Vma:
    """The dst VMA at ``addr`` with an anon_vma (a move or a fill needs one). ENOENT for no VMA.
    Expects mmap_lock held (read); takes what anon_vma_prepare takes."""
    vma = mm.vma_lookup(addr)
    if vma is None:
        raise MmError(errno.ENOENT, f"no mapping at dst {addr:#x}")
    if not vma.flags & VM_SHARED and vma.anon_vma is None:  # anon_vma_prepare's inline test
        await anon_vma_prepare(k, cur, vma)
    return vma


async def uffd_lock_vma(k: Kernel, cur: Current, mm: Mm, addr: int) -> Vma:
    """The slow half of uffd_lock_vma, for when ``lock_vma_under_rcu`` (its fast half, inline in
    the callers) failed: the VMA found and prepared under the mmap_lock (read), whose release leaves
    the VMA lock held. ENOENT for no VMA. Takes the VMA lock for read (and, meanwhile, the
    mmap_lock and what anon_vma_prepare takes)."""
    lock = mm.mmap_lock
    if not lock.down_read(cur):
        await lock.wait(cur)
    try:
        vma = await find_vma_and_prepare_anon(k, cur, mm, addr)
        await vma_start_read_locked(cur, vma)
        return vma
    finally:
        lock.up_read(cur)


async def uffd_move_lock(k: Kernel, cur: Current, mm: Mm, dst_start: int, src_start: int) -> tuple[Vma, Vma]:
    """6.9+: read-lock the dst VMA, then the src VMA without waiting; if that fails, let the dst
    go and read-lock both under the mmap_lock (dst first, src nested). ENOENT for a missing VMA.
    Takes the VMA locks for read; holds nothing else on return."""
    dst_vma = lock_vma_under_rcu(cur, mm, dst_start) or await uffd_lock_vma(k, cur, mm, dst_start)
    if dst_vma.start <= src_start < dst_vma.end:
        return dst_vma, dst_vma
    src_vma = lock_vma_under_rcu(cur, mm, src_start)
    if src_vma is not None:
        return dst_vma, src_vma
    vma_end_read(cur, dst_vma)
    lock = mm.mmap_lock
    if not lock.down_read(cur):
        await lock.wait(cur)
    try:
        # find_vmas_mm_locked: the dst may have lost its anon_vma while unlocked (DONTUNMAP)
        dst_vma = await find_vma_and_prepare_anon(k, cur, mm, dst_start)
        found = dst_vma if dst_vma.start <= src_start < dst_vma.end else mm.vma_lookup(src_start)
        if found is None:
            raise MmError(errno.ENOENT, f"no mapping at src {src_start:#x}")
        src_vma = found
        await vma_start_read_locked(cur, dst_vma)
        if src_vma is not dst_vma:
            try:
                await vma_start_read_locked(cur, src_vma, nested=True)
            except BaseException:
                vma_end_read(cur, dst_vma)
                raise
        return dst_vma, src_vma
    finally:
        lock.up_read(cur)


def uffd_move_unlock(cur: Current, dst_vma: Vma, src_vma: Vma) -> None:
    dst_vma.vm_lock.up_read(cur)  # vma_end_read
    if src_vma is not dst_vma:
        src_vma.vm_lock.up_read(cur)


async def move_pages_pte(
    k: Kernel, cur: Current, dst_vma: Vma, src_vma: Vma, dst_addr: int, src_addr: int, extent: int, holes: bool,
    dst_pt: PageTable, src_pt: PageTable,
) -> int:
    """One step: a page, or a batch of present pages within one PMD (move_present_ptes).

    Expects the dst and src VMAs read-locked (uffd_move_lock). Takes the src folio lock, then the
    src folio's anon_vma root rwsem for write (not under the folio-lock protocol), then both PTLs.
    Blocking acquisitions happen with only the VMA locks held and restart the step. Returns the bytes moved (> 0), or a
    negative errno (-EAGAIN: retry this step). The mover-no-folio-lock and mover-no-root-lock
    mutants skip the src folio's lock and the root lock.
    """
    dvpn, svpn = dst_addr >> PAGE_SHIFT, src_addr >> PAGE_SHIFT
    src_folio: Folio | None = None
    folio_locked = False
    src_anon_vma: AnonVma | None = None
    av_locked = False
    orig_src_pte: Pte | None = None
    proto = k.protocol
    sched = k.sched
    try:
        while True:  # retry:
            if dvpn in dst_pt.ptes:
                return -errno.EEXIST
            src_pte = src_pt.ptes.get(svpn)
            if src_pte is None:
                return PAGE_SIZE if holes else -errno.ENOENT  # a hole moves as nothing
            if src_folio is not None and (src_pte is not orig_src_pte or src_pte.folio is not src_folio):
                return -errno.EAGAIN
            folio = src_pte.folio
            if folio is ZERO_PAGE:
                if sched.active or dst_pt.ptl.owner is not None or src_pt.ptl.owner is not None:
                    await double_pt_lock_wait(k, cur, dst_pt.ptl, src_pt.ptl)
                else:
                    double_pt_lock(cur, dst_pt.ptl, src_pt.ptl, proto.ptl_address_order)
                return move_zeropage_pte(cur, dst_addr, src_addr, dst_pt, src_pt, src_pte)
            if src_folio is None:
                if not folio.exclusive:
                    return -errno.EBUSY
                folio.refcount += 1  # folio_get
                src_folio = folio
                orig_src_pte = src_pte
                if proto.mover_folio_lock:
                    lock = folio.lock
                    assert lock is not None
                    if not lock.trylock(cur):
                        if not lock.lock(cur):
                            await lock.wait(cur)
                        folio_locked = True
                        continue
                    folio_locked = True
            if sched.active and sched.should_preempt("move:after-folio-lock"):
                await sched.yield_now("move:after-folio-lock")
                continue
            if proto.mover_anon_vma_lock and src_anon_vma is None:
                src_anon_vma = folio_get_anon_vma(k, cur, src_folio)
                if src_anon_vma is None:
                    return -errno.EAGAIN
                rw = src_anon_vma.root.rwsem
                if not rw.down_write_trylock(cur):
                    if not rw.down_write(cur):
                        await rw.wait(cur)
                    av_locked = True
                    continue
                av_locked = True
            if sched.active and sched.should_preempt("move:anon-vma-locked"):
                await sched.yield_now("move:anon-vma-locked")
                continue
            assert orig_src_pte is not None
            if sched.active or dst_pt.ptl.owner is not None or src_pt.ptl.owner is not None:
                return await move_present_ptes_preemptible(
                    k, cur, dst_vma, src_vma, dst_addr, src_addr, extent, dst_pt, src_pt, orig_src_pte, src_folio
                )
            return move_present_ptes(
                k, cur, dst_vma, src_vma, dst_addr, src_addr, extent, dst_pt, src_pt, orig_src_pte, src_folio
            )
    finally:
        if src_anon_vma is not None:
            if av_locked:
                src_anon_vma.root.rwsem.up_write(cur)
            src_anon_vma.refcount -= 1  # put_anon_vma: the folio's VMA still holds it
            if src_anon_vma.refcount == 0:
                await put_anon_vma_final(k, cur, src_anon_vma)
        if src_folio is not None:
            if folio_locked:
                assert src_folio.lock is not None
                src_folio.lock.unlock(cur)
            src_folio.refcount -= 1  # folio_put: still mapped, never the last reference
            assert src_folio.refcount > 0


def move_present_ptes(
    k: Kernel, cur: Current, dst_vma: Vma, src_vma: Vma, dst_addr: int, src_addr: int, extent: int,
    dst_pt: PageTable, src_pt: PageTable, orig_src_pte: Pte, folio: Folio,
    window: list[tuple[Folio, int, bool]] | None = None,
) -> int:
    """Move the locked ``folio``, then every following page of ``extent`` that can go under the
    same PTL pair: dst none, src present and not the zero page, its folio trylockable, exclusive
    and under the same anon_vma (6.18's batched move). Expects the folio lock (and the old root's
    rwsem for write); takes both PTLs, which must be free (nobody else runs meanwhile). Each folio
    moves to dst's anon_vma at dst's index; mapcounts do not change. Returns the bytes moved, or a
    negative errno.

    Per folio the kernel stores folio->mapping, then folio->index, then the dst PTE (the
    move-index-before-mapping mutant swaps the two stores). With ``window``, the PTLs are the
    caller's (move_present_ptes_preemptible): each folio gets its first store only, and the rest
    of its move is left in ``window`` (folio, page, dirty) for after the caller's point.
    """
    dvpn, svpn = dst_addr >> PAGE_SHIFT, src_addr >> PAGE_SHIFT
    dst_ptes, src_ptes = dst_pt.ptes, src_pt.ptes
    proto = k.protocol
    if window is None:
        double_pt_lock(cur, dst_pt.ptl, src_pt.ptl, proto.ptl_address_order)
    try:
        if dvpn in dst_ptes or src_ptes.get(svpn) is not orig_src_pte:
            return -errno.EAGAIN
        if not folio.exclusive:
            return -errno.EBUSY
        anon_vma = folio.mapping
        index = ((dst_addr - dst_vma.start) >> PAGE_SHIFT) + dst_vma.pgoff  # linear_page_index
        plain = window is None and proto.move_mapping_first  # both stores now, the kernel's order
        pte = orig_src_pte
        n = 0
        last = extent >> PAGE_SHIFT
        while True:
            del src_ptes[svpn + n]  # ptep_clear_flush
            if plain:
                folio_move_anon_rmap(folio, dst_vma)  # WRITE_ONCE(folio->mapping)
                folio.index = index + n
                # Built from dst's prot: writable, accessed; dirty only if src was (6.15+).
                dst_ptes[dvpn + n] = Pte(folio, True, True, pte.dirty)
                if n:
                    folio.lock.unlock(cur)  # type: ignore[union-attr]
            elif window is None:  # move-index-before-mapping
                folio.index = index + n
                folio_move_anon_rmap(folio, dst_vma)
                dst_ptes[dvpn + n] = Pte(folio, True, True, pte.dirty)
                if n:
                    folio.lock.unlock(cur)  # type: ignore[union-attr]
            else:  # the first store only; the caller does the rest after its point
                if proto.move_mapping_first:
                    folio_move_anon_rmap(folio, dst_vma)
                else:
                    folio.index = index + n
                window.append((folio, n, pte.dirty))
            n += 1
            if n == last:
                break
            # check_ptes_for_batched_move
            if dvpn + n in dst_ptes:
                break
            pte = src_ptes.get(svpn + n)  # type: ignore[assignment]
            if pte is None or pte.folio is ZERO_PAGE:
                break
            folio = pte.folio
            if not folio.lock.trylock(cur):  # type: ignore[union-attr]
                break
            if not folio.exclusive or folio.mapping is not anon_vma:
                folio.lock.unlock(cur)  # type: ignore[union-attr]
                break
        return n << PAGE_SHIFT
    finally:
        if window is None:
            double_pt_unlock(cur, dst_pt.ptl, src_pt.ptl)


def _check_record_torn(torn: dict[Folio, tuple[AnonVma, int]], window: list[tuple[Folio, int, bool]]) -> None:
    """For the walkers' residual-window check: the (mapping, index) pairs left torn."""
    for f, _, _ in window:
        torn[f] = (f.mapping, f.index)  # type: ignore[assignment]


async def move_present_ptes_preemptible(
    k: Kernel, cur: Current, dst_vma: Vma, src_vma: Vma, dst_addr: int, src_addr: int, extent: int,
    dst_pt: PageTable, src_pt: PageTable, orig_src_pte: Pte, folio: Folio,
) -> int:
    """move_present_ptes where other tasks may run: with the scheduler active, or a PTL held by
    a task preempted inside its section. Takes the PTLs with double_pt_lock_wait (spinning, the
    ``move:between-ptls`` point); between each folio's two stores is the
    ``move:after-mapping-store`` point, the residual window of the reference (PTLs held: the step
    runs to its end even if the task is cancelled there). A batch's folios are in the window
    together; meanwhile each torn (mapping, index) pair, which never held together, is in
    ``k.torn`` for the walkers' residual-window check."""
    sched = k.sched
    dst_ptl, src_ptl = dst_pt.ptl, src_pt.ptl
    await double_pt_lock_wait(k, cur, dst_ptl, src_ptl)
    try:
        window: list[tuple[Folio, int, bool]] = []
        moved = move_present_ptes(
            k, cur, dst_vma, src_vma, dst_addr, src_addr, extent, dst_pt, src_pt, orig_src_pte, folio, window
        )
        if window and sched.active and sched.should_preempt("move:after-mapping-store"):
            torn = k.torn
            _check_record_torn(torn, window)
            try:
                await preempt_point_unkillable(sched, "move:after-mapping-store")
            finally:
                for f, _, _ in window:
                    del torn[f]
        mapping_first = k.protocol.move_mapping_first
        dvpn = dst_addr >> PAGE_SHIFT
        index = ((dst_addr - dst_vma.start) >> PAGE_SHIFT) + dst_vma.pgoff  # linear_page_index
        dst_ptes = dst_pt.ptes
        for f, n, dirty in window:
            if mapping_first:
                f.index = index + n
            else:
                folio_move_anon_rmap(f, dst_vma)
            dst_ptes[dvpn + n] = Pte(f, True, True, dirty)
            if n:
                f.lock.unlock(cur)  # type: ignore[union-attr]
        return moved
    finally:
        double_pt_unlock(cur, dst_ptl, src_ptl)


def move_zeropage_pte(
    cur: Current, dst_addr: int, src_addr: int, dst_pt: PageTable, src_pt: PageTable, orig_src_pte: Pte
) -> int:
    """The zero page moves as a special PTE (6.9+): no folio, no rmap. Expects both PTLs held
    (double_pt_lock); drops them."""
    dvpn, svpn = dst_addr >> PAGE_SHIFT, src_addr >> PAGE_SHIFT
    try:
        if dvpn in dst_pt.ptes or src_pt.ptes.get(svpn) is not orig_src_pte:
            return -errno.EAGAIN
        del src_pt.ptes[svpn]
        dst_pt.ptes[dvpn] = Pte(ZERO_PAGE, False, True, False)
        return PAGE_SIZE
    finally:
        double_pt_unlock(cur, dst_pt.ptl, src_pt.ptl)


# ---------------------------------------------------------------------------------------------
# UFFDIO_COPY and UFFDIO_ZEROPAGE (fs/userfaultfd.c userfaultfd_copy / _zeropage, mm/userfaultfd.c
# mfill_atomic). Checked on the live 6.18 kernel (ctypes, root):
#   * misaligned dst or len, len 0, range past task_size, unknown mode bit: EINVAL, the result
#     field untouched (validate_range and the mode check come before mfill_atomic);
#   * no VMA at dst, the VMA not registered, or the range leaving the VMA (into an unregistered
#     VMA, a hole or another registered VMA): ENOENT, result field -ENOENT;
#   * a read-only registered VMA: COPY and ZEROPAGE succeed, the page mapped read-only;
#   * a WP-only registered VMA: both succeed too (only registration is checked);
#   * dst page present (a folio or the zero page): EEXIST, result field -EEXIST;
#   * 4 pages whose 3rd is present: the ioctl returns -1/EAGAIN and the result field holds the
#     bytes done (8192); pages 0-1 filled, 2-3 untouched; retrying from the 3rd gives EEXIST.
#   * there is no mmap_min_addr check (dst 0 -> ENOENT).
#   * COPY with MODE_WP into a VMA not registered for WP: EINVAL, nothing copied (the check comes
#     after the ENOENT ones); into a WP-registered one the page is mapped read-only with the
#     uffd-wp bit: reads see it, a write is a write-protect userfault. ZEROPAGE has no WP mode.

UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_COPY_MODE_WP = 1 << 1
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0


class FillProgress:
    """How far a COPY / ZEROPAGE got: bytes filled so far, and a hook run as each page is
    installed, under its PTL (``(vpn, value)``: the model's ledger)."""

    __slots__ = ("done", "on_page")

    def __init__(self, on_page: Callable[[int, int], None] | None = None) -> None:
        self.done = 0
        self.on_page = on_page


async def userfaultfd_fill(
    k: Kernel, cur: Current, mm: Mm, dst: int, length: int, values: int | Sequence[int] | None, mode: int,
    progress: FillProgress,
) -> int:
    """The UFFDIO_COPY (``values``: one value for every page, or one per page) or, with
    ``values`` None, UFFDIO_ZEROPAGE ioctl. Expects nothing held (mfill_atomic takes the locks).
    Returns ``length``; raises MmError with ``moved`` set otherwise: EAGAIN with the bytes done
    for a short fill, or the error with nothing done. The pages filled wake the faults waiting
    on them unless DONTWAKE (also when a cancelled fill stops short)."""
    ctx = userfaultfd_ctx(k, mm)
    if ctx.mmap_changing:
        raise MmError(errno.EAGAIN, "a non-cooperative event is pending")
    validate_range(mm, dst, length)
    pages = length >> PAGE_SHIFT
    if isinstance(values, int):
        values = _Repeat(values, pages)
    elif values is not None and len(values) != pages:
        # The model's src buffer: like a src range the kernel refuses before looking at dst.
        raise MmError(errno.EINVAL, f"{len(values)} values for {pages} pages")
    known = UFFDIO_COPY_MODE_DONTWAKE | (UFFDIO_COPY_MODE_WP if values is not None else 0)
    if mode & ~known:
        raise MmError(errno.EINVAL, f"unknown mode bits {mode:#x}")
    if mm.users == 0:  # mmget_not_zero
        raise MmError(errno.ESRCH, "process has exited")
    try:
        await mfill_atomic(k, cur, ctx, dst, length, values, progress, wp=bool(mode & UFFDIO_COPY_MODE_WP))
    finally:
        if progress.done and not mode & UFFDIO_COPY_MODE_DONTWAKE:
            wake_userfault(k, ctx, dst, progress.done)
    done = progress.done
    if done != length:
        raise MmError(errno.EAGAIN, f"filled {done} of {length} bytes", moved=done)
    return done


class _Repeat(Sequence[int]):
    """One value for every page, without a list as long as the range."""

    __slots__ = ("value", "n")

    def __init__(self, value: int, n: int) -> None:
        self.value = value
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        return self.value


async def mfill_atomic(
    k: Kernel, cur: Current, ctx: UserfaultfdCtx, dst_start: int, length: int, values: Sequence[int] | None,
    progress: FillProgress, *, wp: bool = False,
) -> None:
    """Fill [dst_start, dst_start + length) page by page: new exclusive folios holding
    ``values`` (COPY; with ``wp``, MODE_WP: mapped write-protected with the uffd-wp bit, EINVAL
    unless the VMA is registered for WP), or the zero page (``values`` None: ZEROPAGE). Expects
    nothing held; takes
    the dst VMA's read lock (uffd_mfill_lock: uffd_lock_vma, which falls back to the mmap_lock and
    prepares the dst anon_vma before the VMA is validated), then each page's PTL. Lets other tasks
    run every RESCHED_WORK pages.

    Leaves the bytes filled in ``progress``. An error after some progress is swallowed (the
    caller reports a short fill as EAGAIN); an error with none is raised.
    """
    mm = ctx.mm
    dst_vma = lock_vma_under_rcu(cur, mm, dst_start) or await uffd_lock_vma(k, cur, mm, dst_start)
    try:
        if mm.users == 0:
            raise MmError(errno.ESRCH, "process has exited")
        # validate_dst_vma
        if dst_start + length > dst_vma.end:
            raise MmError(errno.ENOENT, "dst range leaves its mapping")
        if dst_vma.uffd_ctx is None:
            raise MmError(errno.ENOENT, "dst is not registered with a userfaultfd")
        if ctx.mmap_changing:
            raise MmError(errno.EAGAIN, "a non-cooperative event is pending")
        if dst_vma.flags & VM_SHARED:
            raise MmError(errno.EINVAL, "shared anonymous mappings are not supported")
        if wp and not dst_vma.flags & VM_UFFD_WP:  # the mode is checked once dst_vma is known
            raise MmError(errno.EINVAL, "copy mode wp needs a range registered for write-protect")

        err = 0
        oom: MemoryLimitExceeded | None = None
        addr, end = dst_start, dst_start + length
        i = 0
        since_resched = 0
        while addr < end:
            try:
                pt = mm.pte_alloc(cur, addr)  # mm_alloc_pmd / pte_alloc
                if values is None:
                    step = await mfill_atomic_pte_zeropage(k, cur, dst_vma, pt, addr)
                else:
                    step = await mfill_atomic_pte_copy(k, cur, dst_vma, pt, addr, values[i], progress, wp)
            except MemoryLimitExceeded as e:
                err, oom = errno.ENOMEM, e
                break
            if step < 0:
                err = -step
                break
            progress.done += PAGE_SIZE
            addr += PAGE_SIZE
            i += 1
            since_resched += 1
            if since_resched >= RESCHED_WORK:
                since_resched = 0
                await cond_resched()  # a long fill must not starve other calls
        k.stats["uffd_copy_pages" if values is not None else "uffd_zeropage_pages"] += progress.done >> PAGE_SHIFT
        if err and not progress.done:
            if oom is not None:
                raise oom
            raise MmError(err, f"dst page {addr:#x} is already populated" if err == errno.EEXIST else os.strerror(err))
    finally:
        vma_end_read(cur, dst_vma)


async def mfill_atomic_pte_copy(
    k: Kernel, cur: Current, vma: Vma, pt: PageTable, addr: int, value: int, progress: FillProgress,
    wp: bool = False,
) -> int:
    """One page of COPY: a new folio, born exclusive (folio_add_new_anon_rmap), mapcount 1,
    charged before anything changes; mapped dirty and young, writable only if the VMA is and
    ``wp`` (MODE_WP) is not, with the uffd-wp bit if ``wp`` (mfill_atomic_install_pte). Expects
    the VMA read-locked (or mmap_lock for read) and its anon_vma; takes the PTL. Returns PAGE_SIZE, or -EEXIST
    if the PTE is not none."""
    mm = vma.mm
    vpn = addr >> PAGE_SHIFT
    if vpn in pt.ptes:  # seen before allocating: the kernel would allocate, then free
        return -errno.EEXIST
    ptl = pt.ptl
    if ptl.owner is not None:  # a mover preempted inside its PTL section
        await k.spin_on(cur, ptl)
    memcg = k.memcg
    memcg.charge(cur, PTE_BYTES + FOLIO_BYTES)
    ptl.spin_lock(cur)
    if vpn in pt.ptes:
        ptl.spin_unlock(cur)
        memcg.uncharge(PTE_BYTES + FOLIO_BYTES)
        return -errno.EEXIST
    folio = k.folio_alloc()
    folio.value = value
    folio.refcount = 1
    folio_add_new_anon_rmap(folio, vma, addr)
    pt.ptes[vpn] = Pte(folio, not wp and bool(vma.flags & VM_WRITE), True, True, wp)
    mm.rss_anon += 1
    if progress.on_page is not None:
        progress.on_page(vpn, value)
    ptl.spin_unlock(cur)
    return PAGE_SIZE


async def mfill_atomic_pte_zeropage(k: Kernel, cur: Current, vma: Vma, pt: PageTable, addr: int) -> int:
    """One page of ZEROPAGE: the shared zero page, mapped read-only (a special PTE: no folio, no
    rmap, no RSS). Expects the VMA read-locked (or mmap_lock for read); takes the PTL. Returns PAGE_SIZE, or -EEXIST
    if the PTE is not none."""
    vpn = addr >> PAGE_SHIFT
    if vpn in pt.ptes:
        return -errno.EEXIST
    ptl = pt.ptl
    if ptl.owner is not None:
        await k.spin_on(cur, ptl)
    memcg = k.memcg
    memcg.charge(cur, PTE_BYTES)
    ptl.spin_lock(cur)
    if vpn in pt.ptes:
        ptl.spin_unlock(cur)
        memcg.uncharge(PTE_BYTES)
        return -errno.EEXIST
    pt.ptes[vpn] = Pte(ZERO_PAGE, False, True, False)
    ptl.spin_unlock(cur)
    return PAGE_SIZE
