"""The anonymous reverse map (mm/rmap.c): anon_vma trees, fork's cloning, and the rmap walk.

Only the root's rwsem is ever taken: ``anon_vma_lock_*`` lock ``anon_vma.root.rwsem``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .locks import Current, LockClass, LockdepState, RwSem, SpinLock
from .mm_types import ANON_VMA_BYTES, AVC_BYTES, PAGE_SHIFT, PMD_SHIFT, VM_ACCESS_FLAGS, VM_IGNORE_MERGE, Folio, Vma
from .rcu import TypesafeObject
from .sched import RESCHED_WORK, Scheduler, cond_resched, uninterruptible

if TYPE_CHECKING:
    from .kernel import Kernel


class AnonVma(TypesafeObject):
    """struct anon_vma. Allocated from a SLAB_TYPESAFE_BY_RCU cache (see rcu.TypesafeCache)."""

    __slots__ = ("id", "root", "parent", "refcount", "num_children", "num_active_vmas", "rb_root", "rwsem")

    def __init__(self, lockdep: LockdepState) -> None:
        # The slab constructor: runs once per object, not on reuse, like anon_vma_ctor.
        super().__init__()
        self.id = 0
        self.root: AnonVma = self
        self.parent: AnonVma = self
        self.refcount = 0
        self.num_children = 0
        self.num_active_vmas = 0
        # The interval tree of AVCs; iterated with an explicit pgoff overlap test.
        self.rb_root: dict[AnonVmaChain, None] = {}
        self.rwsem = RwSem("anon_vma.rwsem", LockClass.ANON_VMA, lockdep)

    def slab_release(self, poison: TypesafeObject) -> None:
        # A root is its own root: without this, an anon_vma let go would wait for the cyclic GC.
        self.root = self.parent = poison  # type: ignore[assignment]
        self.rb_root.clear()

    def __repr__(self) -> str:
        state = " freed" if self.freed else ""
        return f"<AnonVma {self.id} root={self.root.id} ref={self.refcount}{state}>"


class AnonVmaChain:
    """struct anon_vma_chain: links one VMA to one anon_vma."""

    __slots__ = ("vma", "anon_vma")

    def __init__(self, vma: Vma, anon_vma: AnonVma) -> None:
        self.vma = vma
        self.anon_vma = anon_vma


# ---------------------------------------------------------------------------------------------
# Allocation and lifetime


async def preempt_point_unkillable(sched: Scheduler, point: str) -> None:
    """A preemption point where the task must not stop half-way (inside a spinlocked section, in
    the middle of a free): a cancellation that arrives here is delivered at the task's next
    cancellation point instead. Call only when ``sched.should_preempt(point)`` said yes."""
    try:
        await sched.yield_now(point)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()


async def anon_vma_alloc(k: Kernel, cur: Current) -> AnonVma:
    """A new anon_vma from the slab, charged (ENOMEM before anything changes). The slab hands out
    a freed anon_vma again at once (SLAB_TYPESAFE_BY_RCU): a stale pointer then sees a live one."""
    sched = k.sched
    if sched.active and k.anon_vma_cache.free and sched.should_preempt("alloc:before-anon-vma-reuse"):
        await sched.yield_now("alloc:before-anon-vma-reuse")  # nothing taken yet
    k.memcg.charge(cur, ANON_VMA_BYTES)
    av = k.anon_vma_cache.alloc()
    av.id = k.next_anon_vma_id()
    av.rwsem.name = f"anon_vma{av.id}.rwsem"  # lockdep's and the traces' name for it
    av.refcount = 1
    av.num_children = 0
    av.num_active_vmas = 0
    av.parent = av
    av.root = av
    k.stats["anon_vma_alloc"] += 1
    return av


async def anon_vma_free(k: Kernel, cur: Current, av: AnonVma) -> None:
    """Free an anon_vma whose refcount reached zero. Expects no anon_vma lock held.

    A fast-path walker may hold the root read-locked without a reference on ``av``; taking the
    root for write once, if it is locked, waits for it as the kernel's anon_vma_free does (the
    free-no-root-handshake mutant skips it). The free always completes: a cancellation while
    waiting is raised after it.
    """
    sched = k.sched
    if sched.active and sched.should_preempt("free:before-anon-vma-free"):
        await preempt_point_unkillable(sched, "free:before-anon-vma-free")
    root = av.root
    try:
        if k.protocol.free_root_handshake and root.rwsem.is_locked():
            if not root.rwsem.down_write(cur):
                await root.rwsem.wait(cur)
            root.rwsem.up_write(cur)
    finally:
        # Even when cancelled while waiting, the object is unreachable: it goes back to the cache.
        k.anon_vma_cache.release(av)
        k.memcg.uncharge(ANON_VMA_BYTES)
        k.stats["anon_vma_free"] += 1
    if sched.active and sched.should_preempt("free:after-anon-vma-free"):
        await preempt_point_unkillable(sched, "free:after-anon-vma-free")


def get_anon_vma(av: AnonVma) -> None:
    av.refcount += 1


async def put_anon_vma(k: Kernel, cur: Current, av: AnonVma) -> None:
    av.refcount -= 1
    if av.refcount == 0:
        await __put_anon_vma(k, cur, av)


async def put_anon_vma_final(k: Kernel, cur: Current, av: AnonVma) -> None:
    """put_anon_vma's slow half, for callers that dropped the count themselves and saw zero."""
    await __put_anon_vma(k, cur, av)


async def __put_anon_vma(k: Kernel, cur: Current, av: AnonVma) -> None:
    """Free ``av`` and drop its reference on the root (which may free the root)."""
    root = av.root
    try:
        await anon_vma_free(k, cur, av)
    finally:
        if root is not av:
            root.refcount -= 1
            if root.refcount == 0:
                await anon_vma_free(k, cur, root)


async def anon_vma_lock_write(cur: Current, av: AnonVma) -> None:
    rw = av.root.rwsem
    if not rw.down_write(cur):
        await rw.wait(cur)


def anon_vma_unlock_write(cur: Current, av: AnonVma) -> None:
    av.root.rwsem.up_write(cur)


def anon_vma_chain_link(vma: Vma, av: AnonVma) -> AnonVmaChain:
    """Expects the root of ``av`` write-locked and the link charged (AVC_BYTES) by the caller."""
    avc = AnonVmaChain(vma, av)
    vma.anon_vma_chain.append(avc)
    av.rb_root[avc] = None
    return avc


# ---------------------------------------------------------------------------------------------
# Preparing, cloning and unlinking


def anon_vma_compatible(a: Vma, b: Vma) -> bool:
    """Could ``a`` and ``b`` (a directly below b) share an anon_vma?"""
    return (
        a.end == b.start
        and not ((a.flags ^ b.flags) & ~(VM_ACCESS_FLAGS | VM_IGNORE_MERGE))
        and b.pgoff == a.pgoff + a.pages
    )


def reusable_anon_vma(old: Vma, a: Vma, b: Vma) -> AnonVma | None:
    if anon_vma_compatible(a, b):
        av = old.anon_vma
        if av is not None and len(old.anon_vma_chain) == 1:
            return av
    return None


def find_mergeable_anon_vma(vma: Vma) -> AnonVma | None:
    """A neighbour's anon_vma that ``vma`` may share: the next VMA first, then the previous."""
    prev, nxt = vma.mm.vma_prev_next(vma)
    if nxt is not None:
        av = reusable_anon_vma(nxt, vma, nxt)
        if av is not None:
            return av
    if prev is not None:
        return reusable_anon_vma(prev, prev, vma)
    return None


async def anon_vma_prepare(k: Kernel, cur: Current, vma: Vma) -> None:
    """__anon_vma_prepare. Expects mmap_lock held. Takes the root rwsem (write), then page_table_lock."""
    if vma.anon_vma is not None:
        return
    mm = vma.mm
    memcg = k.memcg
    memcg.reserve(cur, ANON_VMA_BYTES + AVC_BYTES)  # ENOMEM here leaves nothing changed
    av = find_mergeable_anon_vma(vma)
    allocated = None
    if av is None:
        av = allocated = await anon_vma_alloc(k, cur)
        av.num_children += 1  # self-parent link for a new root
    try:
        await anon_vma_lock_write(cur, av)
    except BaseException:
        if allocated is not None:
            allocated.num_children -= 1
            await put_anon_vma(k, cur, allocated)
        raise
    mm.page_table_lock.spin_lock(cur)
    if vma.anon_vma is None:
        memcg.charge(cur, AVC_BYTES)
        vma.anon_vma = av
        anon_vma_chain_link(vma, av)
        av.num_active_vmas += 1
        allocated = None
    mm.page_table_lock.spin_unlock(cur)
    anon_vma_unlock_write(cur, av)
    if allocated is not None:
        # Lost a race with another fault preparing the same VMA.
        allocated.num_children -= 1
        await put_anon_vma(k, cur, allocated)


async def anon_vma_clone(k: Kernel, cur: Current, dst: Vma, src: Vma, nofail: bool = False) -> None:
    """Attach ``dst`` to every anon_vma ``src`` is attached to. Expects mmap_lock held for write.

    Charges the whole chain first (ENOMEM with nothing linked; ``nofail`` for a merge, which
    gives as many links back at once), then takes the root rwsem for write (all of a chain
    shares one root; the fork-no-root-lock mutant does not). When ``dst`` has no anon_vma yet
    (fork), a candidate with no active VMA and at most one child is adopted as its own.
    """
    if not src.anon_vma_chain:
        return
    cost = len(src.anon_vma_chain) * AVC_BYTES
    k.memcg.charge(cur, cost, nofail=nofail)
    root = src.anon_vma_chain[0].anon_vma.root
    locked = k.protocol.fork_root_lock
    if locked and not root.rwsem.down_write(cur):
        try:
            await root.rwsem.wait(cur)
        except BaseException:
            k.memcg.uncharge(cost)
            raise
    for pavc in src.anon_vma_chain:  # oldest first, as list_for_each_entry_reverse
        av = pavc.anon_vma
        anon_vma_chain_link(dst, av)
        if (
            dst.anon_vma is None
            and src.anon_vma is not None
            and av.num_children < 2
            and av.num_active_vmas == 0
        ):
            dst.anon_vma = av
            k.stats["anon_vma_reuse"] += 1
    if dst.anon_vma is not None:
        dst.anon_vma.num_active_vmas += 1
    if locked:
        root.rwsem.up_write(cur)


async def anon_vma_fork(k: Kernel, cur: Current, vma: Vma, pvma: Vma) -> None:
    """Give the child VMA ``vma`` the parent's chain plus, unless one was reused, a new anon_vma.
    Takes the (shared) root rwsem for write in anon_vma_clone, then again to link the new one."""
    if pvma.anon_vma is None:
        return
    # The worst case, reserved first: the parent's chain, and a new anon_vma with its link.
    k.memcg.reserve(cur, (len(pvma.anon_vma_chain) + 1) * AVC_BYTES + ANON_VMA_BYTES)
    vma.anon_vma = None
    await anon_vma_clone(k, cur, vma, pvma)
    if vma.anon_vma is not None:
        return
    # Lock the (shared) root before allocating, so a cancelled wait leaves nothing half-built
    # but the chain anon_vma_clone made, which the kernel's error path unlinks.
    locked = k.protocol.fork_root_lock
    try:
        if locked:
            await anon_vma_lock_write(cur, pvma.anon_vma)
        av = await anon_vma_alloc(k, cur)
    except BaseException:
        if locked and pvma.anon_vma.root.rwsem.owner is cur:
            anon_vma_unlock_write(cur, pvma.anon_vma)
        await uninterruptible(lambda: unlink_anon_vmas(k, cur, vma))
        raise
    av.num_active_vmas += 1
    av.root = pvma.anon_vma.root
    av.parent = pvma.anon_vma
    get_anon_vma(av.root)
    vma.anon_vma = av
    k.memcg.charge(cur, AVC_BYTES)
    anon_vma_chain_link(vma, av)
    av.parent.num_children += 1
    if locked:
        anon_vma_unlock_write(cur, av)


async def unlink_anon_vmas(k: Kernel, cur: Current, vma: Vma) -> None:
    """Detach a VMA from every anon_vma. Takes the root rwsem for write; frees outside it."""
    chain = vma.anon_vma_chain
    if not chain:
        vma.anon_vma = None
        return
    root = chain[0].anon_vma.root
    if not root.rwsem.down_write(cur):
        await root.rwsem.wait(cur)
    emptied: list[AnonVma] = []
    for avc in reversed(chain):  # newest first
        av = avc.anon_vma
        del av.rb_root[avc]
        if not av.rb_root:
            av.parent.num_children -= 1
            emptied.append(av)
    if vma.anon_vma is not None:
        vma.anon_vma.num_active_vmas -= 1
        vma.anon_vma = None
    k.memcg.uncharge(len(chain) * AVC_BYTES)
    chain.clear()
    root.rwsem.up_write(cur)
    for av in emptied:
        await put_anon_vma(k, cur, av)


# ---------------------------------------------------------------------------------------------
# Folio <-> anon_vma


def folio_add_new_anon_rmap(folio: Folio, vma: Vma, addr: int) -> None:
    """A new folio, born exclusive, mapped once at ``addr``. Expects the PTL held."""
    assert vma.anon_vma is not None
    folio.mapping = vma.anon_vma
    folio.index = vma.linear_page_index(addr)
    folio.exclusive = True
    folio.mapcount = 1


def folio_move_anon_rmap(folio: Folio, vma: Vma) -> None:
    """Point an exclusive folio at ``vma``'s own anon_vma.

    Expects the folio lock; when the new anon_vma may have a different root (UFFDIO_MOVE), also
    the old root's rwsem for write, which is what the walkers' recheck relies on.
    """
    folio.mapping = vma.anon_vma


def folio_get_anon_vma(k: Kernel, cur: Current, folio: Folio) -> AnonVma | None:
    """A referenced anon_vma of a mapped folio, or None. Takes and drops the RCU read lock.

    (The kernel tests folio_mapped again after the increment, against a concurrent unmap; no other
    task runs inside this function here, so that second test is the assertion below.)
    """
    rcu = k.rcu
    rcu.read_lock(cur)
    av = folio.mapping
    if av is None or folio.mapcount == 0:
        rcu.read_unlock(cur)
        return None
    if av.freed:
        rcu.check_access(cur, av, "folio_get_anon_vma")
    if av.refcount == 0:  # atomic_inc_not_zero failed
        rcu.read_unlock(cur)
        return None
    av.refcount += 1
    assert folio.mapcount > 0
    rcu.read_unlock(cur)
    return av


@dataclass
class RmapWalkControl:
    """struct rmap_walk_control plus what folio_referenced_one accumulates."""

    try_lock: bool
    contended: bool = False
    referenced: int = 0
    mapcount: int = 0
    mappings: list[tuple[int, int]] = field(default_factory=list)
    fast_retries: int = 0
    slow_retries: int = 0
    #: The root whose rwsem folio_lock_anon_vma_read took, as read then: the walk holds
    #: ``locked.rwsem`` for read. The detectors compare it with what the roots are now.
    locked: AnonVma | None = None


def anon_vma_unlock_read(k: Kernel, cur: Current, av: AnonVma, held: RwSem) -> None:
    """up_read(&anon_vma->root->rwsem): the root is read again at unlock. Releases ``held``, the
    rwsem the walker took; if ``av``'s root is now another one, the kernel would release a lock it
    does not hold: reported as unlock-mismatch."""
    if k.detect and av.root.rwsem is not held:  # the kernel's own read of anon_vma->root at unlock
        _check_unlock_mismatch(k, cur, av)
    held.up_read(cur)


def _check_unlock_mismatch(k: Kernel, cur: Current, av: AnonVma) -> None:
    k.detectors.report("unlock-mismatch", task=cur.name, anon_vma=av.id, root_now=av.root.id)


async def folio_lock_anon_vma_read(k: Kernel, cur: Current, folio: Folio, rwc: RmapWalkControl) -> AnonVma | None:
    """Read-lock the root of ``folio``'s anon_vma, retrying if the mapping moved under us.

    Expects no anon_vma lock held (and, under the folio-lock protocol, the folio lock). Takes the
    RCU read lock, then the root rwsem: a trylock, or (without ``try_lock``) a pin on the anon_vma
    and a sleep on the root with RCU dropped. Returns the anon_vma with its root's rwsem held for
    read (``rwc.locked``), or None (not mapped, or contended).
    """
    proto = k.protocol
    rcu = k.rcu
    sched = k.sched
    root_in_rcu = proto.walker_root_in_rcu
    pin = proto.walker_anon_vma_get
    while True:
        rcu.read_lock(cur)
        av = folio.mapping  # READ_ONCE(folio->mapping)
        if av is None or folio.mapcount == 0:
            rcu.read_unlock(cur)
            return None
        in_rcu = root_in_rcu
        if not in_rcu:
            rcu.read_unlock(cur)  # the walker-root-read-outside-rcu mutant
        if sched.active and sched.should_preempt("walk:after-mapping-read"):
            try:
                await sched.yield_now("walk:after-mapping-read")
            except BaseException:
                if in_rcu:
                    rcu.read_unlock(cur)
                raise
        if av.freed:
            rcu.check_access(cur, av, "READ_ONCE(anon_vma->root)")
        root = av.root  # READ_ONCE(anon_vma->root)
        if sched.active and sched.should_preempt("walk:after-root-read"):
            try:
                await sched.yield_now("walk:after-root-read")
            except BaseException:
                if in_rcu:
                    rcu.read_unlock(cur)
                raise
        if root.freed:
            rcu.check_access(cur, root, "down_read_trylock(&root_anon_vma->rwsem)")
        if root.rwsem.down_read_trylock(cur):
            if sched.active and sched.should_preempt("walk:after-trylock"):
                try:
                    await sched.yield_now("walk:after-trylock")
                except BaseException:
                    root.rwsem.up_read(cur)
                    if in_rcu:
                        rcu.read_unlock(cur)
                    raise
            if proto.recheck_fast and folio.mapping is not av:
                root.rwsem.up_read(cur)
                if in_rcu:
                    rcu.read_unlock(cur)
                rwc.fast_retries += 1
                continue
            if folio.mapcount == 0:
                root.rwsem.up_read(cur)
                av = None
            else:
                rwc.locked = root
            if in_rcu:
                rcu.read_unlock(cur)
            return av
        if rwc.try_lock:
            rwc.contended = True
            if in_rcu:
                rcu.read_unlock(cur)
            return None
        # Slow path: pin the anon_vma, leave RCU, sleep on the root rwsem.
        if pin:
            if av.refcount == 0:  # atomic_inc_not_zero failed
                if in_rcu:
                    rcu.read_unlock(cur)
                return None
            av.refcount += 1
        if folio.mapcount == 0:
            if in_rcu:
                rcu.read_unlock(cur)
            if pin:
                await put_anon_vma(k, cur, av)
            return None
        if in_rcu:
            rcu.read_unlock(cur)
        try:
            if sched.active and sched.should_preempt("walk:slow-before-lock"):
                await sched.yield_now("walk:slow-before-lock")
            if av.freed:
                rcu.check_access(cur, av, "anon_vma_lock_read")
            root = av.root  # anon_vma_lock_read: down_read(&anon_vma->root->rwsem)
            rw = root.rwsem
            if not rw.down_read(cur):
                await rw.wait(cur)
        except BaseException:
            if pin:
                await put_anon_vma(k, cur, av)
            raise
        if sched.active and sched.should_preempt("walk:slow-after-lock"):
            try:
                await sched.yield_now("walk:slow-after-lock")
            except BaseException:
                anon_vma_unlock_read(k, cur, av, rw)
                if pin:
                    await put_anon_vma(k, cur, av)
                raise
        if proto.recheck_slow and folio.mapping is not av:
            anon_vma_unlock_read(k, cur, av, rw)
            if pin:
                await put_anon_vma(k, cur, av)
            rwc.slow_retries += 1
            continue
        if pin:
            av.refcount -= 1
            if av.refcount == 0:
                # We held the last reference.
                anon_vma_unlock_read(k, cur, av, rw)
                await __put_anon_vma(k, cur, av)
                return None
        rwc.locked = root
        return av


async def rmap_walk_anon(k: Kernel, cur: Current, folio: Folio, rwc: RmapWalkControl) -> None:
    """Visit every VMA of the folio's anon_vma tree that covers ``folio.index``.

    Takes the anon_vma root rwsem for read through folio_lock_anon_vma_read; each visit takes that
    mm's PTL (folio_referenced_one), spinning while a task preempted inside its section holds it.
    The detectors (``_check_walk``) run at walk start, after the index read's preemption point,
    and at every visit that follows a point where other tasks ran (nothing can change between two
    visits otherwise); the residual-window finding at the index read.
    """
    av = await folio_lock_anon_vma_read(k, cur, folio, rwc)
    if av is None:
        return
    locked = rwc.locked
    assert locked is not None
    held = locked.rwsem
    sched = k.sched
    detect = k.detect
    walk_root: AnonVma | None = None
    ntree = 0
    residual = False
    try:
        pgoff = folio.index  # folio_pgoff(folio): READ_ONCE(folio->index)
        if detect:
            torn = k.torn
            if torn and torn.get(folio) == (av, pgoff):
                # The mover stored folio->mapping and not yet folio->index: (av, pgoff) never held.
                residual = True
                k.detectors.note(
                    "residual-index-window", task=cur.name, folio=folio.id, anon_vma=av.id, index_read=pgoff
                )
            walk_root, ntree = _check_walk_snapshot(folio, av)
        if sched.active and sched.should_preempt("walk:after-index-read"):
            await sched.yield_now("walk:after-index-read")
        if detect:
            _check_walk(k, cur, folio, av, locked, pgoff, walk_root, ntree, residual, "walk start")
        if av.freed:
            k.rcu.check_access(cur, av, "rmap_walk_anon tree")
        avcs = list(av.rb_root)
        stale = False  # other tasks ran since the last check
        for start in range(0, len(avcs), RESCHED_WORK):
            if start:  # a tree of thousands of VMAs: let others run (the rwsem stays held)
                await cond_resched()
                stale = True
            for avc in avcs[start : start + RESCHED_WORK] if len(avcs) > RESCHED_WORK else avcs:
                vma = avc.vma
                vpg = vma.pgoff
                if pgoff < vpg or pgoff >= vpg + ((vma.end - vma.start) >> PAGE_SHIFT):
                    continue
                addr = vma.start + ((pgoff - vpg) << PAGE_SHIFT)
                while True:
                    if stale:
                        stale = False
                        if detect:
                            _check_walk(k, cur, folio, av, locked, pgoff, walk_root, ntree, residual, "visit")
                    more = folio_referenced_one(cur, folio, vma, addr, rwc)
                    if more is True:
                        break
                    if more is False:
                        return  # every mapping found
                    await k.spin_on(cur, more)  # the PTL, held across a preemption point
                    stale = True
                if sched.active and sched.should_preempt("walk:per-vma"):
                    await sched.yield_now("walk:per-vma")
                    stale = True
    finally:
        anon_vma_unlock_read(k, cur, av, held)


def _check_walk_snapshot(folio: Folio, av: AnonVma) -> tuple[AnonVma | None, int]:
    """What the detectors compare a walk with later: the folio's current root, the tree's size."""
    mapping = folio.mapping
    return (mapping.root if mapping is not None else None), len(av.rb_root)


def _check_walk(
    k: Kernel, cur: Current, folio: Folio, av: AnonVma, locked: AnonVma, pgoff: int, walk_root: AnonVma | None,
    ntree: int, residual: bool, where: str,
) -> None:
    """Detectors for a walk that holds ``locked.rwsem`` (taken by folio_lock_anon_vma_read), walks
    ``av``'s tree and read ``pgoff`` when the folio's root was ``walk_root`` and ``av``'s tree held
    ``ntree`` links. The rwsem held must be the root rwsem of ``av`` and of the folio's current
    anon_vma (and, under the folio-lock protocol, the walker must hold the folio lock); the
    folio's root and index must not change while it walks (the index may, after a read in the
    residual window: that walk read the stale one); nor may ``av``'s tree."""
    det = k.detectors
    held = locked.rwsem
    if k.protocol.walker_folio_lock:
        assert folio.lock is not None
        if folio.lock.owner is not cur:
            det.report("wrong-root-walk", task=cur.name, folio=folio.id, where=where, why="folio not locked")
    if av.root.rwsem is not held:
        det.report(
            "wrong-root-walk", task=cur.name, folio=folio.id, where=where, why="the walked anon_vma's root is not held",
            held_root=locked.id, anon_vma=av.id, anon_vma_root=av.root.id,
        )
    cur_av = folio.mapping
    now_root = cur_av.root if cur_av is not None else None
    if now_root is not None and now_root.rwsem is not held:
        det.report(
            "wrong-root-walk", task=cur.name, folio=folio.id, where=where, why="the folio's root is not held",
            held_root=locked.id, folio_root=now_root.id,
        )
    if now_root is not walk_root or (folio.index != pgoff and not residual):
        det.report(
            "mapping-changed-during-walk", task=cur.name, folio=folio.id, where=where,
            index_then=pgoff, index_now=folio.index,
        )
    if len(av.rb_root) != ntree:
        det.report(
            "tree-changed-during-walk", task=cur.name, folio=folio.id, where=where, anon_vma=av.id,
            links_then=ntree, links_now=len(av.rb_root),
        )


def folio_referenced_one(cur: Current, folio: Folio, vma: Vma, addr: int, rwc: RmapWalkControl) -> bool | SpinLock:
    """Test and clear the young bit of the PTE at ``addr`` if it maps ``folio``. Takes that PTL.

    Returns False to stop the walk (every mapping found), True to go on; or, without doing
    anything, the PTL when a task preempted inside its section holds it (spin, then call again).
    """
    mm = vma.mm
    pt = mm.pgtables.get(addr >> PMD_SHIFT)
    if pt is None:
        return True
    ptl = pt.ptl
    if ptl.owner is not None:
        return ptl
    ptl.spin_lock(cur)  # page_vma_mapped_walk
    pte = pt.ptes.get(addr >> PAGE_SHIFT)
    if pte is not None and pte.folio is folio:
        if pte.young:
            pte.young = False
            rwc.referenced += 1
        rwc.mapcount -= 1
        rwc.mappings.append((mm.id, addr))
    ptl.spin_unlock(cur)
    return rwc.mapcount > 0


async def folio_referenced(k: Kernel, cur: Current, folio: Folio, try_lock: bool) -> RmapWalkControl:
    """How many VMAs referenced ``folio`` (clearing young bits). Expects a folio reference held.

    ``try_lock`` is folio_referenced's mode (contention returns at once, ``contended`` set); without
    it the walk sleeps on the root rwsem like page_idle's. Under the folio-lock protocol every walker
    takes the folio lock first (trylock, or sleeping without ``try_lock``).
    """
    rwc = RmapWalkControl(try_lock=try_lock)
    if folio.mapcount == 0 or folio.mapping is None:
        return rwc
    rwc.mapcount = folio.mapcount
    lock = folio.lock
    locked = False
    proto = k.protocol
    if proto.walker_folio_lock and proto.walker_locks_folio:
        assert lock is not None
        if not lock.trylock(cur):
            if try_lock:
                rwc.contended = True
                return rwc
            if not lock.lock(cur):
                await lock.wait(cur)
        locked = True
    try:
        await rmap_walk_anon(k, cur, folio, rwc)
    finally:
        if locked:
            assert lock is not None
            lock.unlock(cur)
    return rwc
