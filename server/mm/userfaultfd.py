"""userfaultfd registration and UFFDIO_MOVE (fs/userfaultfd.c, mm/userfaultfd.c), as in 6.18.

UFFDIO_MOVE moves exclusive anonymous pages under the VMA read locks: per step (move_pages_pte) the
src folio lock, then its anon_vma root write lock (against rmap walkers that hold neither), then
both PTLs (double_pt_lock, in address order). A blocking acquisition happens with only the VMA
locks held, and the step starts over after it; the folio's mapping and index are stored with both
PTLs held (move_present_ptes). The steps a protocol variant may replace are called through ``k.ops``.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .huge_memory import __split_huge_pmd, pmd_none, split_folio
from .locks import Current, SpinLock
from .memcontrol import MemoryLimitExceeded
from .memory import charge_pte, folio_put
from .migrate import migration_entry_wait
from .mm_types import (
    FOLIO_BYTES,
    HUGE_ZERO_FOLIO,
    PAGE_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_MASK,
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
    LargeFolio,
    LimitExceeded,
    Mm,
    MmError,
    PageTable,
    Pte,
    SwapPte,
    Vma,
    folio_maybe_dma_pinned,
    is_migration_entry,
)
from .mmap import vma_modify
from .mmap_lock import lock_vma_under_rcu, vma_end_read, vma_start_read_locked
from .page_ref import folio_ref_add
from .rmap import (
    AnonVma,
    anon_vma_lock_write,
    anon_vma_prepare,
    folio_add_new_anon_rmap,
    folio_get_anon_vma,
    folio_move_anon_rmap,
)
from .sched import RESCHED_WORK, cond_resched
from .swap import folio_add_lru
from .swap_state import folio_matches_swap_entry, swap_cache_get_folio
from .swapfile import SWAP_HAS_CACHE
from .trace import READ_ONCE, atomic_add_return, trace_store

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
        if pt is None or not (pt.ptes or pt.swap):
            continue
        pt.ptl.spin_lock(cur)
        for vpn, pte in pt.ptes.items():
            if lo <= vpn < hi:
                pte.uffd_wp = False
        for vpn, swp in pt.swap.items():
            if lo <= vpn < hi:
                swp.uffd_wp = False  # pte_swp_clear_uffd_wp
        pt.ptl.spin_unlock(cur)
        work += len(pt.ptes) + len(pt.swap) + 1
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


async def double_pt_lock(k: Kernel, cur: Current, ptl1: SpinLock, ptl2: SpinLock) -> None:
    """Lock two PTLs in address order (lower first, the second nested), or the one if they are the
    same: two moves in opposite directions between two page tables would otherwise each hold one
    and spin on the other. Expects neither held by ``cur``; spins (Kernel.spin_on) on one held by
    a task preempted inside its section. Between the two is the ``move:between-ptls`` point."""
    if ptl1.key > ptl2.key:  # lock in virtual address order to avoid lock inversion
        ptl1, ptl2 = ptl2, ptl1
    await k.spin_lock(cur, ptl1)
    if ptl2 is not ptl1:
        if k.sched.active: await k.sched.point("move:between-ptls")
        await k.spin_lock(cur, ptl2, nested=True)


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
    ctx = mm.uffd or userfaultfd_ctx(k, mm)
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
        if progress.moved and not mode & UFFDIO_MOVE_MODE_DONTWAKE and ctx.faults:
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
            if mm.huge_pmds:
                if (dst_addr >> PMD_SHIFT) in mm.huge_pmds:  # pmd_trans_huge(dst_pmdval): be strict
                    err = errno.EEXIST
                    break
                src_hp = mm.huge_pmds.get(src_addr >> PMD_SHIFT)
                if src_hp is not None:
                    if move_splits_huge_pmd(dst_addr, src_addr, src_end) or not pmd_none(mm, dst_addr >> PMD_SHIFT):
                        if src_hp.folio is not HUGE_ZERO_FOLIO and not src_hp.folio.page_anon_exclusive(0):
                            err = errno.EBUSY
                            break
                        await __split_huge_pmd(k, cur, src_vma, src_addr)
                        continue  # the folio is split by move_pages_pte
                    step = await k.ops.move_pages_huge_pmd(k, cur, dst_vma, src_vma, dst_addr, src_addr)
                    if step < 0:
                        err = -step
                        if err == errno.EAGAIN:
                            k.stats["move_retry"] += 1
                            if sched.active: await sched.yield_now("spin:move-retry")
                            else: await asyncio.sleep(0)
                            continue
                        break
                    progress.moved += step
                    if progress.on_step is not None:
                        progress.on_step(src_addr, dst_addr, step)
                    src_addr += step
                    dst_addr += step
                    if sched.active: await sched.point("move:between-pages")
                    continue
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
            step = await k.ops.move_pages_pte(
                k, cur, dst_vma, src_vma, dst_addr, src_addr, extent, holes, dst_pt, src_pt
            )
            if step < 0:
                err = -step
                if err == errno.EAGAIN:
                    k.stats["move_retry"] += 1
                    # let whoever changed the PTE finish, then retry the step
                    if sched.active: await sched.yield_now("spin:move-retry")
                    else: await asyncio.sleep(0)
                    continue
                break
            progress.moved += step
            if progress.on_step is not None:
                progress.on_step(src_addr, dst_addr, step)
            src_addr += step
            dst_addr += step
            if sched.active: await sched.point("move:between-pages")
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


def move_splits_huge_pmd(dst_addr: int, src_addr: int, src_end: int) -> bool:
    """A move from ``src_addr`` cannot take the huge PMD there whole: either address is not
    PMD-aligned, or less than a PMD is left to move."""
    return bool(src_addr & ~PMD_MASK or dst_addr & ~PMD_MASK or src_end - src_addr < PMD_SIZE)


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
    if not lock.down_read(cur): await lock.wait(cur)
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
    if not lock.down_read(cur): await lock.wait(cur)
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


async def move_read_ptes(
    k: Kernel, cur: Current, dst_pt: PageTable, src_pt: PageTable, dvpn: int, svpn: int
) -> tuple[bool, Pte | None, SwapPte | None]:
    """move_pages_pte's reads of its PTEs, each under its PTL (spin_lock, ptep_get, spin_unlock):
    whether the dst PTE is used (present or swap), and the src PTE, present or swap (None: none).
    Expects neither PTL held; holds neither on return."""
    await k.spin_lock(cur, dst_pt.ptl)
    dst_used = dvpn in dst_pt.ptes or dvpn in dst_pt.swap  # orig_dst_pte = ptep_get(dst_pte)
    dst_pt.ptl.spin_unlock(cur)
    await k.spin_lock(cur, src_pt.ptl)
    src_pte = src_pt.ptes.get(svpn)  # orig_src_pte = ptep_get(src_pte)
    src_swp = src_pt.swap.get(svpn) if src_pte is None else None
    src_pt.ptl.spin_unlock(cur)
    return dst_used, src_pte, src_swp


async def move_pages_pte(
    k: Kernel, cur: Current, dst_vma: Vma, src_vma: Vma, dst_addr: int, src_addr: int, extent: int, holes: bool,
    dst_pt: PageTable, src_pt: PageTable,
) -> int:
    """One step of move_pages: a page, or a batch of present pages within one PMD
    (move_present_ptes). Returns the bytes moved (> 0), or a negative errno (-EAGAIN: retry).

    Expects the dst and src VMAs read-locked (uffd_move_lock). Takes the src folio lock, then the
    src folio's anon_vma root rwsem for write, then both PTLs (move_present_ptes). The PTEs are
    read, and the folio pinned, under their PTLs. A blocking acquisition happens with only the VMA
    locks held, and the step starts over (``retry``) after it; what changed while it did not
    sleep, move_present_ptes finds under both PTLs (pte_same: -EAGAIN). Every way out goes
    through ``out``.
    """
    dvpn, svpn = dst_addr >> PAGE_SHIFT, src_addr >> PAGE_SHIFT
    src_folio: Folio | None = None
    src_folio_pte: Pte | SwapPte | None = None
    src_anon_vma: AnonVma | None = None
    sched = k.sched
    while True:  # retry:
        dst_used, orig_src_pte, orig_src_swp = await move_read_ptes(k, cur, dst_pt, src_pt, dvpn, svpn)
        if dst_used:  # !pte_none(orig_dst_pte)
            ret = -errno.EEXIST
            break
        if orig_src_pte is None:
            if orig_src_swp is None:
                ret = PAGE_SIZE if holes else -errno.ENOENT  # nothing to do to move a hole
                break
            # A swap PTE (6.14+): its folio in the swap cache, if any, moves with it.
            if is_migration_entry(orig_src_swp.entry):  # a split has the page unmapped: wait, retry
                if src_folio is None:
                    await migration_entry_wait(k, cur, src_vma.mm, src_addr, orig_src_swp)
                ret = -errno.EAGAIN
                break
            if src_folio is not None and orig_src_swp is not src_folio_pte:
                ret = -errno.EAGAIN
                break
            if not orig_src_swp.exclusive:
                ret = -errno.EBUSY
                break
            if src_folio is None:
                folio = swap_cache_get_folio(k, k.swap, orig_src_swp.entry)
                if folio is not None:
                    cur.pins.append(folio)  # the task's pin: Kernel.give_back puts it if the call fails
                    src_folio = folio
                    src_folio_pte = orig_src_swp
                    assert folio.lock is not None
                    if not folio.lock.trylock(cur):
                        # now we can block and wait
                        if not folio.lock.lock(cur): await folio.lock.wait(cur)
                        continue
            if sched.active and src_folio is not None: await sched.point("move:swap-folio-locked")
            ret = await k.ops.move_swap_pte(
                k, cur, dst_vma, dst_addr, src_addr, dst_pt, src_pt, orig_src_swp, src_folio
            )
            break
        # The PTE changed while we slept on the folio lock: start over
        if src_folio is not None and orig_src_pte is not src_folio_pte:
            ret = -errno.EAGAIN
            break
        if orig_src_pte.folio is ZERO_PAGE:
            ret = await move_zeropage_pte(k, cur, dst_addr, src_addr, dst_pt, src_pt, orig_src_pte)
            break

        # Pin and lock the source folio, then its anon_vma. With the PTEs mapped (an RCU read
        # section) we may not sleep: on contention, let the PTEs go, sleep for the lock, retry.
        if src_folio is None:
            # Pin the folio under the PTL, so that it is not freed under us.
            await k.spin_lock(cur, src_pt.ptl)
            if src_pt.ptes.get(svpn) is not orig_src_pte:  # !pte_same(orig_src_pte, ptep_get(src_pte))
                src_pt.ptl.spin_unlock(cur)
                ret = -errno.EAGAIN
                break
            folio = orig_src_pte.folio
            if not folio.page_anon_exclusive(0):  # !PageAnonExclusive(&folio->page)
                src_pt.ptl.spin_unlock(cur)
                ret = -errno.EBUSY
                break
            ret = await k.ops.move_folio_lock(k, cur, folio, src_pt.ptl)
            if ret < 0:
                break
            src_folio = folio
            src_folio_pte = orig_src_pte
            if ret:
                continue  # slept for the lock: retry
        if sched.active: await sched.point("move:after-folio-lock")

        if isinstance(src_folio, LargeFolio):
            ret = await k.ops.move_split_large_folio(k, cur, src_folio)
            if ret:
                break
            src_folio = None  # split: reacquired, small, by the retry
            continue

        if src_anon_vma is None:
            # folio_referenced walks the anon_vma tree without the folio lock: only the anon_vma
            # (root) lock keeps it out while the folio changes anon_vma; the folio lock does not.
            src_anon_vma = await folio_get_anon_vma(k, cur, src_folio)
            if src_anon_vma is None:
                ret = -errno.EAGAIN  # page was unmapped from under us
                break
            if not src_anon_vma.root.rwsem.down_write_trylock(cur):  # anon_vma_trylock_write
                # now we can block and wait
                await anon_vma_lock_write(cur, src_anon_vma)
                continue
        if sched.active: await sched.point("move:anon-vma-locked")

        assert src_folio_pte is not None
        ret = await k.ops.move_present_ptes(
            k, cur, dst_vma, src_vma, dst_addr, src_addr, extent, dst_pt, src_pt, src_folio_pte, src_folio
        )
        break
    # out:
    if src_anon_vma is not None:
        src_anon_vma.root.rwsem.up_write(cur)  # anon_vma_unlock_write(src_anon_vma)
        cur.pins.pop()  # put_anon_vma(src_anon_vma): never the last, the src VMA (read-locked) holds one
        atomic_add_return(k, src_anon_vma, -1)
    if src_folio is not None:
        assert src_folio.lock is not None
        src_folio.lock.unlock(cur)
        folio_put(k, src_folio, cur)  # the last reference if MADV_DONTNEED zapped the folio meanwhile
    return ret


async def move_present_ptes(
    k: Kernel, cur: Current, dst_vma: Vma, src_vma: Vma, dst_addr: int, src_addr: int, extent: int,
    dst_pt: PageTable, src_pt: PageTable, orig_src_pte: Pte, src_folio: Folio,
) -> int:
    """Move the locked ``src_folio``, then every following page of ``extent`` that can go under
    the same PTL pair: dst none, src present and not the zero page, its folio trylockable,
    exclusive and under the same anon_vma (6.18's batched move). Each folio moves to dst's
    anon_vma at dst's index; mapcounts do not change. Returns the bytes moved, or a negative
    errno.

    Expects the folio lock (and the old root's rwsem for write); takes both PTLs (double_pt_lock).
    Per folio the kernel stores folio->mapping, then folio->index, then the dst PTE; between the
    first two is the ``move:after-mapping-store`` point, the residual window of the reference (the
    PTLs held: the step runs to its end even if the task is cancelled there).
    """
    dvpn, svpn = dst_addr >> PAGE_SHIFT, src_addr >> PAGE_SHIFT
    dst_ptes, src_ptes = dst_pt.ptes, src_pt.ptes
    sched = k.sched
    await k.ops.double_pt_lock(k, cur, dst_pt.ptl, src_pt.ptl)
    if dvpn in dst_ptes or dvpn in dst_pt.swap or src_ptes.get(svpn) is not orig_src_pte:
        ret = -errno.EAGAIN
    elif folio_maybe_dma_pinned(src_folio) or not src_folio.exclusive:
        ret = -errno.EBUSY
    else:
        src_anon_vma = src_folio.mapping
        index = ((dst_addr - dst_vma.start) >> PAGE_SHIFT) + dst_vma.pgoff  # linear_page_index(dst_vma, dst_addr)
        ret = 0
        while True:
            pte = src_ptes.pop(svpn)  # ptep_get_and_clear
            # GUP-fast takes no PTL: a pin may come in between the check above and the clear
            if sched.active and k.gup_fast_tasks: await sched.point_unkillable("move:pte-cleared")
            if folio_maybe_dma_pinned(src_folio):  # got pinned from under us: put it back, fail
                src_ptes[svpn] = pte
                if ret:
                    src_folio.lock.unlock(cur)  # type: ignore[union-attr]
                else:
                    ret = -errno.EBUSY
                break
            await move_anon_rmap_and_index(k, src_folio, dst_vma, index, "move_present_ptes")
            dst_ptes[dvpn] = Pte(src_folio, True, True, pte.dirty, False, True)  # dirty if src was; soft-dirty
            if ret:
                src_folio.lock.unlock(cur)  # type: ignore[union-attr]
            ret += PAGE_SIZE
            if ret == extent:
                break
            dvpn += 1
            svpn += 1
            index += 1
            folio = check_ptes_for_batched_move(k, cur, dst_pt, src_ptes, dvpn, svpn, src_anon_vma)
            if folio is None:
                break
            src_folio = folio
    double_pt_unlock(cur, dst_pt.ptl, src_pt.ptl)
    return ret


async def move_folio_lock(k: Kernel, cur: Current, folio: Folio, ptl: SpinLock) -> int:
    """move_pages_pte's pin and lock of the src folio, which its src PTE, under ``ptl``, still maps:
    0 when the trylock took it; 1 when it was contended and slept for (with the PTEs let go: the
    caller retries from the top); -EAGAIN for a contended large folio, which is not waited for with
    a raised refcount: two movers would make each other's split fail for ever (6.14). Expects
    ``ptl`` held, and lets it go before it returns (before it sleeps). Takes a reference (``cur``'s
    pin) unless it returns -EAGAIN, and the folio lock, sleeping only in the second case."""
    lock = folio.lock
    assert lock is not None
    locked = lock.trylock(cur)
    if not locked and folio.large:
        ptl.spin_unlock(cur)
        return -errno.EAGAIN
    folio_ref_add(k, folio, 1)  # folio_get(folio)
    cur.pins.append(folio)  # the task's pin: Kernel.give_back puts it if the call fails
    ptl.spin_unlock(cur)
    if locked:
        return 0
    # now we can block and wait
    if not lock.lock(cur): await lock.wait(cur)
    return 1


async def move_split_large_folio(k: Kernel, cur: Current, folio: LargeFolio) -> int:
    """move_pages_pte's split of the large src folio it locked and pinned, with the PTEs let go
    (split_folio can block). Returns 0, the folio split and its head's lock and reference given
    back (the step is retried), or -EBUSY with the folio still locked and pinned: a split that
    fails (others hold references: a pin, or a task that raised the refcount) ends the move
    there, as 6.18 does (one attempt, no retry). Takes what split_folio takes."""

    try:
        head = await split_folio(k, cur, folio)
    except MmError as e:
        if k.detect and e.errno == errno.EAGAIN: split_failed(k, cur, folio)
        return -errno.EBUSY
    assert head.lock is not None
    head.lock.unlock(cur)
    folio_put(k, head, cur)  # the last reference if the head was mapped nowhere
    return 0


def split_failed(k: Kernel, cur: Current, folio: LargeFolio) -> None:
    """The livelock detector: ``cur``'s split of ``folio`` failed for references others hold.
    When one of them is a mover asleep on the folio's lock (a retry loop that raised the
    refcount it waits with, what 6.14 took out of move_pages_pte), the movers fail each other's
    splits: for ever where a failed split is retried (6.8 to 6.13), with a spurious EBUSY in
    6.18. Reported as ``livelock``. A reference held by anyone else (a pin, a walker, reclaim, a
    fault) is no violation."""
    waiters = folio.lock.waiters if folio.lock is not None else None
    for w in waiters or ():
        other = w.cur
        if other.op == "move" and folio in other.pins:
            k.detectors.report(
                "livelock", task=cur.name, folio=folio.id, fails_with=other.name, refcount=folio.refcount,
                mapcount=folio.mapcount,
            )
            return


def check_ptes_for_batched_move(
    k: Kernel, cur: Current, dst_pt: PageTable, src_ptes: dict[int, Pte], dvpn: int, svpn: int,
    src_anon_vma: AnonVma | None,
) -> Folio | None:
    """The next page's folio, locked (trylock), if it can join the batch: dst none, src present
    and not the zero page, the folio exclusive and under the same anon_vma. Expects both PTLs."""
    if dvpn in dst_pt.ptes or dvpn in dst_pt.swap:
        return None
    pte = src_ptes.get(svpn)
    if pte is None or pte.folio is ZERO_PAGE or pte.folio.large:
        return None
    folio = pte.folio
    assert folio.lock is not None
    if not folio.lock.trylock(cur):
        return None
    if not folio.exclusive or READ_ONCE(k, "check_ptes_for_batched_move", folio, "mapping") is not src_anon_vma:
        folio.lock.unlock(cur)
        return None
    return folio


async def move_anon_rmap_and_index(k: Kernel, folio: Folio, vma: Vma, index: int, where: str) -> None:
    """A move's two stores (move_present_ptes, move_swap_pte, move_pages_huge_pmd):
    folio_move_anon_rmap(folio, vma), then folio->index. From the first to the second (the
    ``move:after-mapping-store`` point between them), the folio's (mapping, index) pair, which
    never held together, is in ``k.torn`` for the walkers' residual-window check. ``where``: the
    caller, as the trace names the store. Expects the PTLs held (the folio lock and the old root
    too)."""
    torn = k.sched.active
    if torn: k.torn[folio.id] = (vma.anon_vma, folio.index)  # type: ignore[assignment]
    folio_move_anon_rmap(k, folio, vma)
    if torn: await k.sched.point_unkillable("move:after-mapping-store")
    folio.index = index
    if torn: del k.torn[folio.id]
    if k.trace: trace_store(k, where, folio, "index")


def swp_pte_same(pte: SwapPte | None, orig: SwapPte) -> bool:
    """pte_same of a swap PTE and the one read before (is_pte_pages_stable): the same entry and
    bits, whether or not it is the same PTE (a page swapped in and out again to the slot it had
    reads the same)."""
    return (pte is not None and pte.entry == orig.entry and pte.exclusive == orig.exclusive
            and pte.uffd_wp == orig.uffd_wp and pte.soft_dirty == orig.soft_dirty)


async def move_swap_pte(
    k: Kernel, cur: Current, dst_vma: Vma, dst_addr: int, src_addr: int, dst_pt: PageTable, src_pt: PageTable,
    orig_src_pte: SwapPte, src_folio: Folio | None,
) -> int:
    """Move an exclusive swap PTE as it is (its slot's count unchanged), marked soft-dirty (6.15+).
    Its folio in the swap cache, if any (``src_folio``, locked by the caller), goes to dst's
    anon_vma at dst's index (6.14+), without the anon_vma lock: the folio is mapped nowhere and
    the entry is exclusive, so no rmap walk can reach it. The src PTE is compared by value
    (swp_pte_same), so a swap-in and swap-out of the page to the same slot meanwhile goes unseen
    there; EAGAIN (6.16+) when the folio no longer backs the entry, or when there is no folio but
    the slot has SWAP_HAS_CACHE (a folio came into the swap cache since the lookup). Takes both
    PTLs (double_pt_lock). Returns PAGE_SIZE or a negative errno."""
    dvpn, svpn = dst_addr >> PAGE_SHIFT, src_addr >> PAGE_SHIFT
    entry = orig_src_pte.entry
    assert not is_migration_entry(entry), "move_swap_pte of a migration entry"
    if src_folio is not None and not folio_matches_swap_entry(src_folio, entry):
        return -errno.EAGAIN
    await k.ops.double_pt_lock(k, cur, dst_pt.ptl, src_pt.ptl)
    if not dst_pt.pte_none(dvpn) or not swp_pte_same(src_pt.swap.get(svpn), orig_src_pte):
        ret = -errno.EAGAIN
    elif src_folio is None and k.swap.swap_map[entry.offset] & SWAP_HAS_CACHE:
        ret = -errno.EAGAIN
    else:
        if src_folio is not None:
            await move_anon_rmap_and_index(k, src_folio, dst_vma, dst_vma.linear_page_index(dst_addr), "move_swap_pte")
        pte = src_pt.swap.pop(svpn)  # ptep_get_and_clear
        pte.soft_dirty = True  # pte_swp_mksoft_dirty
        dst_pt.swap[dvpn] = pte
        ret = PAGE_SIZE
    double_pt_unlock(cur, dst_pt.ptl, src_pt.ptl)
    return ret


async def move_zeropage_pte(
    k: Kernel, cur: Current, dst_addr: int, src_addr: int, dst_pt: PageTable, src_pt: PageTable, orig_src_pte: Pte
) -> int:
    """The zero page moves as a special PTE (6.9+): no folio, no rmap. Takes both PTLs
    (double_pt_lock) and drops them."""
    dvpn, svpn = dst_addr >> PAGE_SHIFT, src_addr >> PAGE_SHIFT
    await k.ops.double_pt_lock(k, cur, dst_pt.ptl, src_pt.ptl)
    if not dst_pt.pte_none(dvpn) or src_pt.ptes.get(svpn) is not orig_src_pte:
        ret = -errno.EAGAIN
    else:
        del src_pt.ptes[svpn]
        dst_pt.ptes[dvpn] = Pte(ZERO_PAGE, False, True, False)
        ret = PAGE_SIZE
    double_pt_unlock(cur, dst_pt.ptl, src_pt.ptl)
    return ret


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
            if mm.huge_pmds and (addr >> PMD_SHIFT) in mm.huge_pmds:  # pmd_trans_huge(dst_pmdval)
                err = errno.EEXIST
                break
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
    if vpn in pt.ptes or vpn in pt.swap:  # seen before allocating: the kernel would allocate, then free
        return -errno.EEXIST
    ptl = pt.ptl
    memcg = k.memcg
    await charge_pte(k, cur, pt, PTE_BYTES + FOLIO_BYTES)
    await k.spin_lock(cur, ptl)
    if not pt.pte_none(vpn):
        ptl.spin_unlock(cur)
        memcg.uncharge(PTE_BYTES + FOLIO_BYTES)
        return -errno.EEXIST
    folio = k.folio_alloc()
    folio.value = value
    folio.refcount = 1
    folio_add_new_anon_rmap(folio, vma, addr)
    folio_add_lru(k.lruvec, folio)
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
    if not pt.pte_none(vpn):
        return -errno.EEXIST
    ptl = pt.ptl
    memcg = k.memcg
    await charge_pte(k, cur, pt, PTE_BYTES)
    await k.spin_lock(cur, ptl)
    if not pt.pte_none(vpn):
        ptl.spin_unlock(cur)
        memcg.uncharge(PTE_BYTES)
        return -errno.EEXIST
    pt.ptes[vpn] = Pte(ZERO_PAGE, False, True, False)
    ptl.spin_unlock(cur)
    return PAGE_SIZE
