"""The anonymous reverse map (mm/rmap.c): anon_vma trees, fork's cloning, and the rmap walk.

Only the root's rwsem is ever taken: ``anon_vma_lock_*`` lock ``anon_vma.root.rwsem``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .locks import Current, LockClass, LockdepState, RwSem
from .mm_types import ANON_VMA_BYTES, AVC_BYTES, PAGE_SHIFT, PMD_SHIFT, VM_ACCESS_FLAGS, VM_IGNORE_MERGE, Folio, Vma
from .rcu import TypesafeObject
from .sched import RESCHED_WORK, cond_resched, uninterruptible

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


def anon_vma_alloc(k: Kernel, cur: Current) -> AnonVma:
    """A new anon_vma from the slab, charged (ENOMEM before anything changes)."""
    k.memcg.charge(cur, ANON_VMA_BYTES)
    av = k.anon_vma_cache.alloc()
    av.id = k.next_anon_vma_id()
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
    root for write once, if it is locked, waits for it as the kernel's anon_vma_free does.
    """
    root = av.root
    if root.rwsem.is_locked():
        try:
            if not root.rwsem.down_write(cur):
                await root.rwsem.wait(cur)
            root.rwsem.up_write(cur)
        finally:
            # Even when cancelled while waiting, the object is unreachable: it goes back to the cache.
            k.anon_vma_cache.release(av)
            k.memcg.uncharge(ANON_VMA_BYTES)
            k.stats["anon_vma_free"] += 1
        return
    k.anon_vma_cache.release(av)
    k.memcg.uncharge(ANON_VMA_BYTES)
    k.stats["anon_vma_free"] += 1


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
    await anon_vma_free(k, cur, av)
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
        av = allocated = anon_vma_alloc(k, cur)
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
    shares one root). When ``dst`` has no anon_vma yet (fork), a candidate with no active VMA and
    at most one child is adopted as its own.
    """
    if not src.anon_vma_chain:
        return
    cost = len(src.anon_vma_chain) * AVC_BYTES
    k.memcg.charge(cur, cost, nofail=nofail)
    root = src.anon_vma_chain[0].anon_vma.root
    if not root.rwsem.down_write(cur):
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
    root.rwsem.up_write(cur)


async def anon_vma_fork(k: Kernel, cur: Current, vma: Vma, pvma: Vma) -> None:
    """Give the child VMA ``vma`` the parent's chain plus, unless one was reused, a new anon_vma."""
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
    try:
        await anon_vma_lock_write(cur, pvma.anon_vma)
    except BaseException:
        await uninterruptible(lambda: unlink_anon_vmas(k, cur, vma))
        raise
    av = anon_vma_alloc(k, cur)
    av.num_active_vmas += 1
    av.root = pvma.anon_vma.root
    av.parent = pvma.anon_vma
    get_anon_vma(av.root)
    vma.anon_vma = av
    k.memcg.charge(cur, AVC_BYTES)
    anon_vma_chain_link(vma, av)
    av.parent.num_children += 1
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


async def folio_lock_anon_vma_read(k: Kernel, cur: Current, folio: Folio, rwc: RmapWalkControl) -> AnonVma | None:
    """Read-lock the root of ``folio``'s anon_vma, retrying if the mapping moved under us.

    Expects no anon_vma lock held (and, under the folio-lock protocol, the folio lock). Returns
    the anon_vma with its root's rwsem held for read, or None (not mapped, or contended).
    """
    proto = k.protocol
    rcu = k.rcu
    sched = k.sched
    while True:
        rcu.read_lock(cur)
        av = folio.mapping  # READ_ONCE(folio->mapping)
        if av is None or folio.mapcount == 0:
            rcu.read_unlock(cur)
            return None
        if sched.active and sched.should_preempt("walk:after-mapping-read"):
            try:
                await sched.yield_now("walk:after-mapping-read")
            except BaseException:
                rcu.read_unlock(cur)
                raise
        if av.freed:
            rcu.check_access(cur, av, "READ_ONCE(anon_vma->root)")
        root = av.root
        if root.rwsem.down_read_trylock(cur):
            if proto.recheck_fast and folio.mapping is not av:
                root.rwsem.up_read(cur)
                rcu.read_unlock(cur)
                rwc.fast_retries += 1
                continue
            if folio.mapcount == 0:
                root.rwsem.up_read(cur)
                av = None
            rcu.read_unlock(cur)
            return av
        if rwc.try_lock:
            rwc.contended = True
            rcu.read_unlock(cur)
            return None
        # Slow path: pin the anon_vma, leave RCU, sleep on the root rwsem.
        if av.refcount == 0:
            rcu.read_unlock(cur)
            return None
        av.refcount += 1
        if folio.mapcount == 0:
            rcu.read_unlock(cur)
            await put_anon_vma(k, cur, av)
            return None
        rcu.read_unlock(cur)
        try:
            if sched.active and sched.should_preempt("walk:slow-before-lock"):
                await sched.yield_now("walk:slow-before-lock")
            rw = av.root.rwsem
            if not rw.down_read(cur):
                await rw.wait(cur)
        except BaseException:
            await put_anon_vma(k, cur, av)
            raise
        if proto.recheck_slow and folio.mapping is not av:
            rw.up_read(cur)
            await put_anon_vma(k, cur, av)
            rwc.slow_retries += 1
            continue
        av.refcount -= 1
        if av.refcount == 0:
            # We held the last reference.
            rw.up_read(cur)
            await __put_anon_vma(k, cur, av)
            return None
        return av


async def rmap_walk_anon(k: Kernel, cur: Current, folio: Folio, rwc: RmapWalkControl) -> None:
    """Visit every VMA of the folio's anon_vma tree that covers ``folio.index``.

    Takes the anon_vma root rwsem for read through folio_lock_anon_vma_read; each visit takes that
    mm's PTL (folio_referenced_one).
    """
    av = await folio_lock_anon_vma_read(k, cur, folio, rwc)
    if av is None:
        return
    root = av.root
    rw = root.rwsem
    try:
        detect = k.detect
        walk_root = folio.mapping.root if folio.mapping is not None else None
        walk_index = folio.index
        if detect:
            _check_walk(k, cur, folio, root, walk_root, walk_index, "walk start")
        pgoff = folio.index
        folio_locked = k.protocol.walker_folio_lock
        sched = k.sched
        rcu = k.rcu
        if av.freed:
            rcu.check_access(cur, av, "rmap_walk_anon tree")
        avcs = list(av.rb_root)
        for start in range(0, len(avcs), RESCHED_WORK):
            if start:  # a tree of thousands of VMAs: let others run (the rwsem stays held)
                await cond_resched()
            for avc in avcs[start : start + RESCHED_WORK] if len(avcs) > RESCHED_WORK else avcs:
                vma = avc.vma
                vpg = vma.pgoff
                if pgoff < vpg or pgoff >= vpg + ((vma.end - vma.start) >> PAGE_SHIFT):
                    continue
                if detect and (
                    folio.index != walk_index
                    or (folio.lock.owner is not cur if folio_locked else folio.mapping.root is not root)  # type: ignore[union-attr]
                    or folio.mapping.root is not walk_root  # type: ignore[union-attr]
                ):
                    _check_walk(k, cur, folio, root, walk_root, walk_index, "visit")
                addr = vma.start + ((pgoff - vpg) << PAGE_SHIFT)
                if not folio_referenced_one(cur, folio, vma, addr, rwc):
                    return  # every mapping found
                if sched.active and sched.should_preempt("walk:per-vma"):
                    await sched.yield_now("walk:per-vma")
    finally:
        rw.up_read(cur)


def _check_walk(
    k: Kernel, cur: Current, folio: Folio, held_root: AnonVma, walk_root: AnonVma | None, walk_index: int, where: str
) -> None:
    """Detectors for a walk: it must hold the folio's current root (or the folio lock under the
    folio-lock protocol), and the folio's root and index must not change while it walks."""
    if k.protocol.walker_folio_lock:
        assert folio.lock is not None
        if folio.lock.owner is not cur:
            k.detectors.report("wrong-root-walk", task=cur.name, folio=folio.id, where=where, why="folio not locked")
    else:
        cur_av = folio.mapping
        if cur_av is not None and cur_av.root is not held_root:
            k.detectors.report(
                "wrong-root-walk",
                task=cur.name,
                folio=folio.id,
                where=where,
                held_root=held_root.id,
                folio_root=cur_av.root.id,
            )
    now_root = folio.mapping.root if folio.mapping is not None else None
    if where != "walk start" and (now_root is not walk_root or folio.index != walk_index):
        k.detectors.report(
            "mapping-changed-during-walk",
            task=cur.name,
            folio=folio.id,
            index_then=walk_index,
            index_now=folio.index,
        )


def folio_referenced_one(cur: Current, folio: Folio, vma: Vma, addr: int, rwc: RmapWalkControl) -> bool:
    """Test and clear the young bit of the PTE at ``addr`` if it maps ``folio``. Takes that PTL.

    Returns False to stop the walk (every mapping found).
    """
    mm = vma.mm
    pt = mm.pgtables.get(addr >> PMD_SHIFT)
    if pt is None:
        return True
    ptl = pt.ptl
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
    if k.protocol.walker_folio_lock:
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
