"""The anonymous reverse map (mm/rmap.c): anon_vma trees, fork's cloning, and the rmap walk.

Lock ordering (the one table is ``locks.LOCK_ORDER``; lockdep checks it at run time)::

    mm->mmap_lock
      vma->vm_lock (per-VMA lock)
        folio lock (PG_locked)
          anon_vma->root->rwsem
            page-table lock (PTL)

Only the root's rwsem is ever taken: ``anon_vma_lock_*`` lock ``anon_vma->root->rwsem``, so a whole
tree (a process and its fork descendants) shares one lock. A folio's ``mapping`` names its
anon_vma; UFFDIO_MOVE may point it at an anon_vma with another root while the folio stays mapped,
under the folio lock and the old root's write lock, which is why a walker that holds neither reads
``folio->mapping`` again once it holds the root (folio_lock_anon_vma_read).

The steps a protocol variant may replace (steps.STEPS) are called through ``k.ops``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .locks import Current, LockClass, LockdepState, RwSem, SpinLock
from .mm_types import (
    ANON_VMA_BYTES,
    AVC_BYTES,
    PAGE_SHIFT,
    PMD_SHIFT,
    VM_ACCESS_FLAGS,
    VM_IGNORE_MERGE,
    VM_LOCKED,
    Folio,
    LargeFolio,
    Mm,
    SwapPte,
    Vma,
)
from .page_ref import folio_ref_add, folio_ref_sub
from .rcu import TypesafeObject
from .sched import RESCHED_WORK, cond_resched, uninterruptible
from .trace import READ_ONCE, atomic_add_return, atomic_inc_not_zero, trace_load, trace_store

if TYPE_CHECKING:
    from .kernel import Kernel
    from .swapfile import SwapInfo


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

    @property
    def trace_name(self) -> str:
        return f"anon_vma{self.id}" + (" (freed)" if self.freed else "")


class AnonVmaChain:
    """struct anon_vma_chain: links one VMA to one anon_vma."""

    __slots__ = ("vma", "anon_vma")

    def __init__(self, vma: Vma, anon_vma: AnonVma) -> None:
        self.vma = vma
        self.anon_vma = anon_vma


# ---------------------------------------------------------------------------------------------
# Allocation and lifetime


async def anon_vma_alloc(k: Kernel, cur: Current) -> AnonVma:
    """A new anon_vma from the slab, charged (ENOMEM before anything changes). The slab hands out
    a freed anon_vma again at once (SLAB_TYPESAFE_BY_RCU): a stale pointer then sees a live one."""
    sched = k.sched
    if sched.active and k.anon_vma_cache.free: await sched.point("alloc:before-anon-vma-reuse")
    k.memcg.charge(cur, ANON_VMA_BYTES)
    av = k.anon_vma_cache.alloc()
    av.id = k.next_anon_vma_id()
    av.rwsem.name = f"anon_vma{av.id}.rwsem"  # lockdep's and the traces' name for it
    av.refcount = 1
    if k.trace: trace_store(k, "anon_vma_alloc", av, "refcount")
    av.num_children = 0
    av.num_active_vmas = 0
    av.parent = av
    av.root = av
    if k.trace: trace_store(k, "anon_vma_alloc", av, "root")
    k.stats["anon_vma_alloc"] += 1
    return av


async def anon_vma_free(k: Kernel, cur: Current, anon_vma: AnonVma) -> None:
    """Free an anon_vma whose refcount reached zero. Expects no anon_vma lock held; runs to its end
    even if the task is cancelled meanwhile (the cancellation is delivered after).

    Synchronize against folio_lock_anon_vma_read() such that we can safely hold the lock without
    the anon_vma getting freed: a fast-path walker may hold the root read-locked with no reference
    on ``anon_vma``, its only guarantee that the folio is still mapped. Taking the root for write
    once, if it is locked, waits for it. (The kernel's barrier ordering that makes the test safe
    has no model counterpart: the model runs one task at a time.)
    """
    sched = k.sched
    if sched.active: await sched.point_unkillable("free:before-anon-vma-free")
    if anon_vma.root.rwsem.is_locked():  # rwsem_is_locked(&anon_vma->root->rwsem)
        await uninterruptible(lambda: anon_vma_lock_write(cur, anon_vma))
        anon_vma_unlock_write(cur, anon_vma)
    slab_free_anon_vma(k, anon_vma)
    if sched.active: await sched.point_unkillable("free:after-anon-vma-free")


def slab_free_anon_vma(k: Kernel, anon_vma: AnonVma) -> None:
    """kmem_cache_free(anon_vma_cachep, anon_vma): back in the type-stable cache, uncharged."""
    k.anon_vma_cache.release(anon_vma)
    k.memcg.uncharge(ANON_VMA_BYTES)
    k.stats["anon_vma_free"] += 1


def get_anon_vma(k: Kernel, anon_vma: AnonVma) -> None:
    atomic_add_return(k, anon_vma, 1)


def anon_vma_tryget(k: Kernel, cur: Current, anon_vma: AnonVma) -> bool:
    """atomic_inc_not_zero(&anon_vma->refcount): a pin held by ``cur`` (put with put_anon_vma, or
    by Kernel.give_back if the call fails), or False if the count is zero (being freed)."""
    if not atomic_inc_not_zero(k, anon_vma):
        return False
    cur.pins.append(anon_vma)
    return True


def anon_vma_put_testzero(k: Kernel, cur: Current, anon_vma: AnonVma) -> bool:
    """atomic_dec_and_test(&anon_vma->refcount) on ``cur``'s pin: True if it was the last."""
    unpin(cur, anon_vma)
    return atomic_add_return(k, anon_vma, -1) == 0


async def put_anon_vma(k: Kernel, cur: Current, anon_vma: AnonVma) -> None:
    """Drop a reference (``cur``'s pin, if it is one); the last frees ``anon_vma`` (and may free
    its root)."""
    if cur.pins:
        unpin(cur, anon_vma)
    if atomic_add_return(k, anon_vma, -1) == 0:  # atomic_dec_and_test
        await __put_anon_vma(k, cur, anon_vma)


async def __put_anon_vma(k: Kernel, cur: Current, anon_vma: AnonVma) -> None:
    """Free ``anon_vma`` and drop its reference on the root (which may free the root)."""
    root = anon_vma.root
    await k.ops.anon_vma_free(k, cur, anon_vma)
    if root is not anon_vma and atomic_add_return(k, root, -1) == 0:
        await k.ops.anon_vma_free(k, cur, root)


def unpin(cur: Current, obj: object) -> None:
    """``obj``'s reference, pinned by ``cur``, is dropped (or handed on): Kernel.give_back forgets it."""
    pins = cur.pins
    if pins and pins[-1] is obj:
        pins.pop()
        return
    for i in range(len(pins) - 2, -1, -1):
        if pins[i] is obj:
            del pins[i]
            return


async def unpin_all(k: Kernel, cur: Current, keep: int) -> None:
    """Put back the pins ``cur`` took after its first ``keep`` (Kernel.give_back), newest first."""
    from .memory import folio_put

    while len(cur.pins) > keep:
        obj = cur.pins[-1]
        if isinstance(obj, AnonVma):
            await put_anon_vma(k, cur, obj)
        else:
            assert isinstance(obj, Folio)
            folio_put(k, obj, cur)


async def anon_vma_lock_write(cur: Current, anon_vma: AnonVma) -> None:
    rwsem = anon_vma.root.rwsem
    if not rwsem.down_write(cur): await rwsem.wait(cur)


def anon_vma_unlock_write(cur: Current, anon_vma: AnonVma) -> None:
    anon_vma.root.rwsem.up_write(cur)


async def anon_vma_lock_read(k: Kernel, cur: Current, anon_vma: AnonVma) -> AnonVma:
    """down_read(&anon_vma->root->rwsem): returns the root it locked."""
    if anon_vma.freed: k.rcu.check_access(cur, anon_vma, "anon_vma_lock_read")
    root = READ_ONCE(k, "anon_vma_lock_read", anon_vma, "root")
    if not root.rwsem.down_read(cur): await root.rwsem.wait(cur)
    return root  # type: ignore[no-any-return]


def anon_vma_unlock_read(k: Kernel, cur: Current, anon_vma: AnonVma, root: AnonVma) -> None:
    """up_read(&anon_vma->root->rwsem). ``root`` is the root whose rwsem the caller locked: the
    kernel reads anon_vma->root again here, and a different one now (the anon_vma freed and
    reused under an unpinned walker) would release a lock it does not hold: unlock-mismatch."""
    if k.detect and anon_vma.root is not root: check_unlock_mismatch(k, cur, anon_vma)
    root.rwsem.up_read(cur)


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
    await k.spin_lock(cur, mm.page_table_lock)
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
    gives as many links back at once), then takes the root rwsem for write: all of a chain shares
    one root, and a walker holding it for read must not see the tree change. When ``dst`` has no
    anon_vma yet (fork), a candidate with no active VMA and at most one child is adopted as its own.
    """
    if not src.anon_vma_chain:
        return
    cost = len(src.anon_vma_chain) * AVC_BYTES
    k.memcg.charge(cur, cost, nofail=nofail)
    root = src.anon_vma_chain[0].anon_vma.root
    try:
        await anon_vma_lock_write(cur, root)  # lock_anon_vma_root
    except BaseException:
        k.memcg.uncharge(cost)
        raise
    for pavc in src.anon_vma_chain:  # oldest first, as list_for_each_entry_reverse
        anon_vma = pavc.anon_vma
        anon_vma_chain_link(dst, anon_vma)
        # Reuse an existing anon_vma if it has no VMA and only one anon_vma child: the
        # anon_vma hierarchy then does not grow with every fork of a forking process.
        if (
            dst.anon_vma is None
            and src.anon_vma is not None
            and anon_vma.num_children < 2
            and anon_vma.num_active_vmas == 0
        ):
            dst.anon_vma = anon_vma
            k.stats["anon_vma_reuse"] += 1
    if dst.anon_vma is not None:
        dst.anon_vma.num_active_vmas += 1
    anon_vma_unlock_write(cur, root)  # unlock_anon_vma_root


async def anon_vma_fork(k: Kernel, cur: Current, vma: Vma, pvma: Vma) -> None:
    """Give the child VMA ``vma`` the parent's chain plus, unless one was reused, a new anon_vma.
    Takes the (shared) root rwsem for write in anon_vma_clone, then again to link the new one.
    ENOMEM or a cancellation unlinks what was linked (the kernel's out_error)."""
    if pvma.anon_vma is None:
        return
    # The worst case, reserved first: the parent's chain, and a new anon_vma with its link.
    k.memcg.reserve(cur, (len(pvma.anon_vma_chain) + 1) * AVC_BYTES + ANON_VMA_BYTES)
    # First, attach the new VMA to the parent VMA's anon_vmas, so rmap can find non-COWed pages
    # in child processes.
    vma.anon_vma = None
    await k.ops.anon_vma_clone(k, cur, vma, pvma)
    # An existing anon_vma has been reused, all done then.
    if vma.anon_vma is not None:
        return
    # Then add our own anon_vma. The root is locked before the allocation, so that a cancelled
    # wait leaves nothing half-built but the chain anon_vma_clone made.
    try:
        with k.unwind(cur):
            await anon_vma_lock_write(cur, pvma.anon_vma)
            anon_vma = await anon_vma_alloc(k, cur)
    except BaseException:
        await uninterruptible(lambda: unlink_anon_vmas(k, cur, vma))  # out_error:
        raise
    anon_vma.num_active_vmas += 1
    anon_vma.root = pvma.anon_vma.root
    if k.trace: trace_store(k, "anon_vma_fork", anon_vma, "root")
    anon_vma.parent = pvma.anon_vma
    # With refcounts, an anon_vma can stay around longer than the process it belongs to. The
    # root anon_vma needs to be pinned until this anon_vma is freed, because the lock lives in
    # the root.
    get_anon_vma(k, anon_vma.root)
    # Mark this anon_vma as the one where our new (COWed) pages go.
    vma.anon_vma = anon_vma
    k.memcg.charge(cur, AVC_BYTES)
    anon_vma_chain_link(vma, anon_vma)
    anon_vma.parent.num_children += 1
    anon_vma_unlock_write(cur, anon_vma)


async def unlink_anon_vmas(k: Kernel, cur: Current, vma: Vma) -> None:
    """Detach a VMA from every anon_vma. Takes the root rwsem for write; frees outside it."""
    chain = vma.anon_vma_chain
    if not chain:
        vma.anon_vma = None
        return
    root = chain[0].anon_vma.root
    if not root.rwsem.down_write(cur): await root.rwsem.wait(cur)
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


def folio_add_new_anon_rmap(folio: Folio, vma: Vma, addr: int, pmd: bool = False) -> None:
    """A new folio, born exclusive, mapped at ``addr`` (its first page's address): a small folio
    once; a large one by a huge PMD (``pmd``: one entire mapping, PG_anon_exclusive on the head
    alone) or by a PTE per page (each page mapped once and PG_anon_exclusive). Expects the PTL
    (or the PMD lock) held."""
    assert vma.anon_vma is not None
    folio.mapping = vma.anon_vma
    folio.index = vma.linear_page_index(addr)
    if not isinstance(folio, LargeFolio):
        folio.exclusive = True
        folio.mapcount = 1
        return
    nr = folio.nr_pages
    if pmd:
        folio.entire_mapcount = 1
        folio.mapcount = 1
        folio.anon_exclusive[0] = True
        folio.mm_map(vma.mm.id, 1)
    else:
        folio.pages_mapcount = [1] * nr
        folio.anon_exclusive = [True] * nr
        folio.mapcount = nr
        folio.mm_map(vma.mm.id, nr)


def folio_remove_rmap_pte(k: Kernel, folio: Folio, page: int, mm: Mm) -> None:
    """Page ``page`` of ``folio`` lost a PTE mapping in ``mm`` (folio_remove_rmap_pte); a large
    folio left mapped in part goes on the deferred split queue. The reference is the caller's to
    put. Expects the PTL held."""
    folio.mapcount -= 1
    if isinstance(folio, LargeFolio):
        folio.pages_mapcount[page] -= 1
        folio.mm_map(mm.id, -1)
        if folio.mapcount and not folio.pages_mapcount[page] and not folio.entire_mapcount:
            from .huge_memory import deferred_split_folio  # (huge_memory -> rmap)

            deferred_split_folio(k, folio)


def folio_remove_rmap_pmd(k: Kernel, folio: LargeFolio, mm: Mm) -> None:
    """``folio`` lost a huge PMD mapping in ``mm`` (folio_remove_rmap_pmd); left mapped in part by
    PTEs, it goes on the deferred split queue. Expects the PMD lock held."""
    folio.mapcount -= 1
    folio.entire_mapcount -= 1
    folio.mm_map(mm.id, -1)
    if folio.mapcount and not folio.entire_mapcount and not all(folio.pages_mapcount):
        from .huge_memory import deferred_split_folio  # (huge_memory -> rmap)

        deferred_split_folio(k, folio)


def folio_dup_anon_rmap_pte(k: Kernel, folio: Folio, page: int, mm: Mm) -> None:
    """Fork maps page ``page`` of ``folio`` into the child ``mm`` too (folio_try_dup_anon_rmap_pte;
    the model has no pins, so it never fails): one more mapping and reference, the page no longer
    PG_anon_exclusive. Expects both PTLs held."""
    folio_ref_add(k, folio, 1)
    folio.mapcount += 1
    if isinstance(folio, LargeFolio):
        folio.pages_mapcount[page] += 1
        folio.anon_exclusive[page] = False
        folio.mm_map(mm.id, 1)
    else:
        folio.exclusive = False


def __page_check_anon_rmap(k: Kernel, cur: Current | None, folio: Folio, page: int, vma: Vma, addr: int) -> None:
    """The kernel's rmap sanity check of a folio already in the anon rmap that gains a mapping of
    page ``page`` at ``addr`` of ``vma`` (__page_check_anon_rmap, VM_BUG_ON_FOLIO / VM_BUG_ON_PAGE
    under CONFIG_DEBUG_VM): its anon_vma's root is the VMA's and the page's index is the VMA's
    linear_page_index of ``addr``. Anything else is reported as ``anon-rmap-mismatch``."""
    av = folio.mapping
    lpi = vma.linear_page_index(addr)
    root = vma.anon_vma.root if vma.anon_vma is not None else None
    if av is None or av.root is not root or folio.index + page != lpi:
        k.detectors.report(
            "anon-rmap-mismatch", task=cur.name if cur is not None else None, folio=folio.id, addr=addr,
            anon_vma=av.id if av is not None else None, index=folio.index + page, linear_page_index=lpi,
        )


def PageAnonExclusive(k: Kernel, folio: Folio, page: int) -> bool:
    """PG_anon_exclusive of page ``page``, with the kernel's check that the page is anonymous
    (VM_BUG_ON_PGFLAGS(!PageAnon(page)) under CONFIG_DEBUG_VM_PGFLAGS): asked of a page that is not
    (the huge zero page, the zero page), it is reported as ``anon-rmap-mismatch``."""
    if folio.mapping is None and k.detect:
        k.detectors.report("anon-rmap-mismatch", folio=folio.id, why="PageAnonExclusive of a page that is not anon")
    return folio.page_anon_exclusive(page)


def folio_move_anon_rmap(k: Kernel, folio: Folio, vma: Vma) -> None:
    """Point an exclusive folio at ``vma``'s own anon_vma.

    Expects the folio lock; when the new anon_vma may have a different root (UFFDIO_MOVE), also
    the old root's rwsem for write, which is what the walkers' recheck relies on.
    """
    folio.mapping = vma.anon_vma  # WRITE_ONCE(folio->mapping, anon_vma)
    if k.trace: trace_store(k, "folio_move_anon_rmap", folio, "mapping")


async def folio_get_anon_vma(k: Kernel, cur: Current, folio: Folio) -> AnonVma | None:
    """A referenced anon_vma of a mapped folio, or None: a pin held by ``cur`` until put_anon_vma.
    Takes and drops the RCU read lock. The folio is tested mapped again after the increment: a
    concurrent unmap may have zapped it since the first test, and then the reference taken may
    be all that keeps the anon_vma (put again, which may free it)."""
    rcu = k.rcu
    rcu.read_lock(cur)
    anon_vma = folio.mapping  # READ_ONCE(folio->mapping)
    if k.trace: trace_load(k, "folio_get_anon_vma", folio, "mapping")
    if anon_vma is None or not folio.mapcount:
        rcu.read_unlock(cur)
        return None
    if anon_vma.freed: rcu.check_access(cur, anon_vma, "folio_get_anon_vma")
    if not atomic_inc_not_zero(k, anon_vma):  # being freed
        rcu.read_unlock(cur)
        return None
    cur.pins.append(anon_vma)
    if not folio.mapcount:  # folio_mapped() again
        rcu.read_unlock(cur)
        await put_anon_vma(k, cur, anon_vma)
        return None
    rcu.read_unlock(cur)
    return anon_vma


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
    #: What the walk does at each mapping (rwc->rmap_one): None for folio_referenced_one, or
    #: try_to_unmap_one.
    rmap_one: Callable[[Kernel, Current, Folio, Vma, int, RmapWalkControl], SpinLock | None] | None = None
    #: try_to_unmap: the walk stopped at a mapping it may not unmap (rwc->done after a false rmap_one).
    aborted: bool = False
    #: try_to_unmap: the swap device whose slots the swap PTEs name.
    si: SwapInfo | None = None


def check_unlock_mismatch(k: Kernel, cur: Current, av: AnonVma) -> None:
    k.detectors.report("unlock-mismatch", task=cur.name, anon_vma=av.id, root_now=av.root.id)


async def folio_lock_anon_vma_read(k: Kernel, cur: Current, folio: Folio, rwc: RmapWalkControl) -> AnonVma | None:
    """Similar to folio_get_anon_vma() except it locks the anon_vma: ``folio``'s anon_vma with its
    root's rwsem held for read (``rwc.locked``: the root locked), or None (not mapped; or contended
    in ``try_lock`` mode, ``rwc.contended`` set).

    Expects no anon_vma lock held. Takes the RCU read lock, then the root rwsem: a trylock inside
    RCU, or (the walk may sleep) a pin on the anon_vma and a sleep on the root with RCU dropped.

    Its caller may not hold the folio lock, so UFFDIO_MOVE (folio_move_anon_rmap) can point the
    folio at an anon_vma with another root at any time until we hold the old root, which the mover
    write-locks: the mapping is read again under the lock, in both paths, and we retry if it moved.
    """
    where = "folio_lock_anon_vma_read"
    sched = k.sched
    rcu = k.rcu
    while True:  # retry:
        rcu.read_lock(cur)
        anon_vma = READ_ONCE(k, where, folio, "mapping")
        if anon_vma is None or not folio.mapcount:  # !folio_mapped(folio)
            rcu.read_unlock(cur)
            return None
        if sched.active: await sched.point("walk:after-mapping-read")

        if anon_vma.freed: rcu.check_access(cur, anon_vma, "READ_ONCE(anon_vma->root)")
        root_anon_vma = READ_ONCE(k, where, anon_vma, "root")
        if sched.active: await sched.point("walk:after-root-read")
        if root_anon_vma.freed: rcu.check_access(cur, root_anon_vma, "down_read_trylock(&root->rwsem)")
        if root_anon_vma.rwsem.down_read_trylock(cur):
            if sched.active: await sched.point("walk:after-trylock")
            # Without the folio lock, folio_move_anon_rmap() (UFFDIO_MOVE) may have pointed the
            # folio at another anon_vma, under another root, before we locked this one.
            if READ_ONCE(k, where, folio, "mapping") is not anon_vma:
                root_anon_vma.rwsem.up_read(cur)
                rcu.read_unlock(cur)
                rwc.fast_retries += 1
                continue
            # Still mapped: this is still the folio's anon_vma, and the rwsem we hold keeps it
            # from being freed (anon_vma_free waits for a locked root).
            if not folio.mapcount:
                root_anon_vma.rwsem.up_read(cur)
                anon_vma = None
            else:
                rwc.locked = root_anon_vma
            rcu.read_unlock(cur)
            return anon_vma  # type: ignore[no-any-return]

        if rwc.try_lock:
            rwc.contended = True
            rcu.read_unlock(cur)
            return None

        # The trylock failed: we must sleep, so pin the anon_vma first.
        if not anon_vma_tryget(k, cur, anon_vma):
            rcu.read_unlock(cur)
            return None
        if not folio.mapcount:
            rcu.read_unlock(cur)
            await put_anon_vma(k, cur, anon_vma)
            return None

        # Pinned: it cannot be freed while we sleep outside RCU.
        rcu.read_unlock(cur)
        if sched.active: await sched.point("walk:slow-before-lock")
        root_anon_vma = await anon_vma_lock_read(k, cur, anon_vma)
        if sched.active: await sched.point("walk:slow-after-lock")

        # As in the fast path: the folio may have moved to another anon_vma while we slept.
        if READ_ONCE(k, where, folio, "mapping") is not anon_vma:
            anon_vma_unlock_read(k, cur, anon_vma, root_anon_vma)
            await put_anon_vma(k, cur, anon_vma)
            rwc.slow_retries += 1
            continue

        if anon_vma_put_testzero(k, cur, anon_vma):
            # Ours was the last reference: unlock before freeing, since put_anon_vma() would
            # have anon_vma_free write-lock the root we hold.
            anon_vma_unlock_read(k, cur, anon_vma, root_anon_vma)
            await __put_anon_vma(k, cur, anon_vma)
            return None
        rwc.locked = root_anon_vma
        return anon_vma  # type: ignore[no-any-return]


async def rmap_walk_anon(k: Kernel, cur: Current, folio: Folio, rwc: RmapWalkControl) -> None:
    """Visit every VMA of the folio's anon_vma tree that covers ``folio->index``.

    Takes the anon_vma root rwsem for read (folio_lock_anon_vma_read); each visit takes that mm's
    PTL (folio_referenced_one), spinning while a task preempted inside its section holds it. The
    walk's detectors (check_walk) run at walk start, after the index read's preemption point, and
    at every visit that follows a point where other tasks ran (nothing can change between two
    visits otherwise); the residual-window finding at the index read.
    """
    anon_vma = await k.ops.folio_lock_anon_vma_read(k, cur, folio, rwc)
    if anon_vma is None:
        return
    locked = rwc.locked
    assert locked is not None
    sched = k.sched
    try:
        # The walk's snapshot is taken with the index read, before the point that read is.
        snap = walk_snapshot(k, cur, folio, anon_vma, folio.index) if k.detect else None
        pgoff_start = READ_ONCE(k, "rmap_walk_anon", folio, "index")  # folio_pgoff(folio)
        pgoff_end = pgoff_start + folio.nr_pages - 1
        if sched.active: await sched.point("walk:after-index-read")
        if snap: check_walk(k, cur, folio, anon_vma, locked, pgoff_start, snap, "walk start")

        if anon_vma.freed: k.rcu.check_access(cur, anon_vma, "rmap_walk_anon tree")
        stale = False  # other tasks ran since the last check
        # anon_vma_interval_tree_foreach(avc, &anon_vma->rb_root, pgoff_start, pgoff_end)
        avcs = list(anon_vma.rb_root)
        rmap_one = rwc.rmap_one or folio_referenced_one
        for chunk in range(0, len(avcs), RESCHED_WORK):
            if chunk:  # a tree of thousands of VMAs: let others run (cond_resched)
                await cond_resched()
                stale = True
            for avc in avcs[chunk : chunk + RESCHED_WORK]:
                vma = avc.vma
                if not (vma.pgoff <= pgoff_end and pgoff_start < vma.pgoff + ((vma.end - vma.start) >> PAGE_SHIFT)):
                    continue
                # vma_address(): the folio's first page in the VMA (a large folio may start before it)
                address = vma.start + ((max(pgoff_start, vma.pgoff) - vma.pgoff) << PAGE_SHIFT)
                if stale and snap: check_walk(k, cur, folio, anon_vma, locked, pgoff_start, snap, "visit")
                while (ptl := rmap_one(k, cur, folio, vma, address, rwc)) is not None:
                    await k.spin_on(cur, ptl)  # the PTL, held across a preemption point
                    if snap: check_walk(k, cur, folio, anon_vma, locked, pgoff_start, snap, "visit")
                if not rwc.mapcount or rwc.aborted:
                    return  # every mapping found (rwc->done)
                stale = sched.active and await sched.point("walk:per-vma")
    finally:
        anon_vma_unlock_read(k, cur, anon_vma, locked)


class WalkSnapshot:
    """What the walk detectors compare a walk with later: the folio's root when the walk read its
    index, the tree's size then, and whether that read fell into the residual window."""

    __slots__ = ("root", "links", "residual")

    def __init__(self, root: AnonVma | None, links: int, residual: bool) -> None:
        self.root = root
        self.links = links
        self.residual = residual


def walk_snapshot(k: Kernel, cur: Current, folio: Folio, av: AnonVma, pgoff: int) -> WalkSnapshot:
    residual = k.torn.get(folio.id) == (av, pgoff)
    if residual:
        # The mover stored folio->mapping and not yet folio->index: (av, pgoff) never held.
        k.detectors.note("residual-index-window", task=cur.name, folio=folio.id, anon_vma=av.id, index_read=pgoff)
    mapping = folio.mapping
    return WalkSnapshot(mapping.root if mapping is not None else None, len(av.rb_root), residual)


def check_walk(
    k: Kernel, cur: Current, folio: Folio, av: AnonVma, locked: AnonVma, pgoff: int, snap: WalkSnapshot, where: str
) -> None:
    """The walk's lockdep_assert: it holds ``locked.rwsem`` (taken by folio_lock_anon_vma_read) and
    walks ``av``'s tree, having read ``pgoff``. The rwsem held must be the root rwsem of ``av``
    and of the folio's current anon_vma (and, where the design says walkers hold the folio lock,
    the walker must hold it); the folio's root and index must not change while it walks (the
    index may, after a read in the residual window: that walk read the stale one); nor may
    ``av``'s tree."""
    det = k.detectors
    held = locked.rwsem
    if k.walkers_hold_folio_lock:
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
    if now_root is not snap.root or (folio.index != pgoff and not snap.residual):
        det.report(
            "mapping-changed-during-walk", task=cur.name, folio=folio.id, where=where,
            index_then=pgoff, index_now=folio.index,
        )
    if len(av.rb_root) != snap.links:
        det.report(
            "tree-changed-during-walk", task=cur.name, folio=folio.id, where=where, anon_vma=av.id,
            links_then=snap.links, links_now=len(av.rb_root),
        )


def folio_referenced_one(
    k: Kernel, cur: Current, folio: Folio, vma: Vma, addr: int, rwc: RmapWalkControl
) -> SpinLock | None:
    """Test and clear the young bit of the PTE at ``addr`` if it maps ``folio`` (counting the
    mapping found in ``rwc``); of a large folio, of every huge PMD and PTE mapping one of its
    pages in ``vma`` from ``addr`` on (page_vma_mapped_walk), a referenced mapping counted once.
    Takes that PTL (the PMD lock, each PTL in turn). Returns None; or, without doing anything,
    the PTL when a task preempted inside its section holds it (spin, then call again).
    """
    if isinstance(folio, LargeFolio):
        return folio_referenced_large(cur, folio, vma, addr, rwc)
    mm = vma.mm
    pt = mm.pgtables.get(addr >> PMD_SHIFT)
    if pt is None:
        return None
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
    return None


def folio_referenced_large(
    cur: Current, folio: LargeFolio, vma: Vma, addr: int, rwc: RmapWalkControl
) -> SpinLock | None:
    """folio_referenced_one for a large folio (see there)."""
    mm = vma.mm
    end = min(vma.end, addr + ((folio.index + folio.nr_pages - vma.linear_page_index(addr)) << PAGE_SHIFT))
    hp_idx = [i for i in mm.huge_pmds_in(addr, end) if mm.huge_pmds[i].folio is folio]
    pt_idx = [i for i in mm.pgtables_in(addr, end)]
    locks = [mm.pmd_lock(i << PMD_SHIFT) for i in hp_idx] + [mm.pgtables[i].ptl for i in pt_idx]
    for ptl in locks:
        if ptl.owner is not None:
            return ptl
    for i in hp_idx:
        ptl = mm.pmd_lock(i << PMD_SHIFT)
        ptl.spin_lock(cur)
        hp = mm.huge_pmds[i]
        if hp.young:
            hp.young = False
            rwc.referenced += 1
        rwc.mapcount -= 1
        rwc.mappings.append((mm.id, i << PMD_SHIFT))
        ptl.spin_unlock(cur)
    lo, hi = addr >> PAGE_SHIFT, end >> PAGE_SHIFT
    for i in pt_idx:
        pt = mm.pgtables[i]
        pt.ptl.spin_lock(cur)
        young = False
        first = None
        for vpn in range(max(lo, i << (PMD_SHIFT - PAGE_SHIFT)), min(hi, (i + 1) << (PMD_SHIFT - PAGE_SHIFT))):
            pte = pt.ptes.get(vpn)
            if pte is not None and pte.folio is folio:
                young |= pte.young
                pte.young = False
                rwc.mapcount -= 1
                first = vpn if first is None else first
        if first is not None:
            rwc.mappings.append((mm.id, first << PAGE_SHIFT))
            rwc.referenced += young
        pt.ptl.spin_unlock(cur)
    return None


def try_to_unmap_one(
    k: Kernel, cur: Current, folio: Folio, vma: Vma, addr: int, rwc: RmapWalkControl
) -> SpinLock | None:
    """Replace the PTE at ``addr``, if it maps ``folio``, by a swap PTE for the folio's slot
    (``folio.swap``): the slot's count raised (swap_duplicate), PageAnonExclusive handed to the
    swap PTE's exclusive bit (folio_try_share_anon_rmap_pte), the uffd-wp and soft-dirty bits
    kept, a dirty PTE's dirtiness given to the folio, the mapping and its reference dropped
    (never the last: the caller holds one). In an mlocked VMA the walk stops with the folio still
    mapped. Expects the folio locked and in the swap cache; takes that PTL. Returns None; or,
    without doing anything, the PTL when a task preempted inside its section holds it."""
    from .swapfile import swap_duplicate  # (swapfile -> memcontrol -> locks; rmap is below it)

    mm = vma.mm
    pt = mm.pgtables.get(addr >> PMD_SHIFT)
    if pt is None:
        return None
    ptl = pt.ptl
    if ptl.owner is not None:
        return ptl
    ptl.spin_lock(cur)  # page_vma_mapped_walk
    vpn = addr >> PAGE_SHIFT
    pte = pt.ptes.get(vpn)
    if pte is not None and pte.folio is folio:
        if vma.flags & VM_LOCKED:
            rwc.aborted = True  # an mlocked page stays (the walk's done: try_to_unmap fails)
        else:
            entry = folio.swap
            assert entry is not None and rwc.si is not None, "try_to_unmap_one: folio not in the swap cache"
            del pt.ptes[vpn]  # ptep_clear_flush
            if pte.dirty:
                folio.dirty = True  # folio_mark_dirty
            err = swap_duplicate(rwc.si, entry)
            assert err == 0, f"try_to_unmap_one: swap_duplicate {entry.trace_name}: {err}"
            anon_exclusive = folio.exclusive
            folio.exclusive = False  # folio_try_share_anon_rmap_pte: the swap PTE carries it now
            pt.swap[vpn] = SwapPte(entry, anon_exclusive, pte.uffd_wp, pte.dirty or pte.soft_dirty)
            mm.rss_anon -= 1
            mm.swap_ents += 1
            folio.mapcount -= 1  # folio_remove_rmap_pte
            folio_ref_sub(k, folio, 1)  # folio_put: the caller's reference stays
            rwc.mapcount -= 1
            rwc.mappings.append((mm.id, addr))
    ptl.spin_unlock(cur)
    return None


async def try_to_unmap(k: Kernel, cur: Current, folio: Folio) -> bool:
    """Unmap every mapping of ``folio`` through the rmap walk (rmap_walk_anon, blocking on the
    anon_vma root rwsem), each PTE becoming a swap PTE (try_to_unmap_one). Returns True when the
    folio is mapped nowhere afterwards. Expects the folio locked, in the swap cache, and a
    reference held."""
    if not folio.mapcount:
        return True
    rwc = RmapWalkControl(try_lock=False, rmap_one=try_to_unmap_one, si=k.swap)
    rwc.mapcount = folio.mapcount
    await k.ops.rmap_walk_anon(k, cur, folio, rwc)
    return not folio.mapcount


async def folio_referenced(k: Kernel, cur: Current, folio: Folio, try_lock: bool) -> RmapWalkControl:
    """How many VMAs referenced ``folio`` (clearing young bits). Expects a folio reference held.

    ``try_lock`` is folio_referenced's mode (contention returns at once, ``contended`` set); without
    it the walk sleeps on the root rwsem like page_idle's. An anonymous folio is walked without its
    folio lock (6.18: only file and KSM folios are trylocked here), which is why the walk rechecks
    the mapping under the anon_vma lock.
    """
    rwc = RmapWalkControl(try_lock=try_lock)
    if not folio.mapcount or folio.mapping is None:
        return rwc
    rwc.mapcount = folio.mapcount
    await k.ops.rmap_walk_anon(k, cur, folio, rwc)
    return rwc
