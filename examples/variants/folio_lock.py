"""The ~6.19 rmap locking change, written as a protocol variant: rmap walkers hold the folio lock,
and UFFDIO_MOVE no longer takes the anon_vma lock.

Up to 6.18, folio_referenced walks an anonymous folio without its folio lock, so UFFDIO_MOVE has
to write-lock the folio's anon_vma root to keep walkers out while it points ``folio->mapping`` at
another anon_vma, and the walker has to read the mapping again once it holds the root. With every
walker holding the folio lock, which the mover takes first anyway, the mover cannot move a folio
under a walk: its anon_vma lock has nothing left to exclude, and the walker's rechecks can never
see the mapping change.

Three steps change (docs/variants.md lists them with their lock contracts):

- ``folio_referenced``: lock the folio around the walk (a trylock in ``try_lock`` mode, where
  reclaim must not sleep; contention is reported and nothing is walked);
- ``folio_lock_anon_vma_read``: lock the root the folio's mapping names, with no recheck;
- ``move_pages_pte``: 6.18's, without the anon_vma root write lock.

Run it with::

    mmsim explore tests/litmus/slow-path-race.litmus --variant examples/variants/folio_lock.py:FOLIO_LOCK
    mmsim race --variant examples/variants/folio_lock.py:FOLIO_LOCK --seeds 20
    mmsim serve --variant examples/variants/folio_lock.py:FOLIO_LOCK
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from mmsim.server.mm.locks import Current
from mmsim.server.mm.memory import folio_put
from mmsim.server.mm.migrate import migration_entry_wait
from mmsim.server.mm.mm_types import (
    PAGE_SHIFT,
    PAGE_SIZE,
    ZERO_PAGE,
    Folio,
    PageTable,
    Pte,
    SwapPte,
    Vma,
    is_migration_entry,
)
from mmsim.server.mm.rmap import (
    AnonVma,
    RmapWalkControl,
    __put_anon_vma,
    anon_vma_lock_read,
    anon_vma_put_testzero,
    anon_vma_tryget,
    anon_vma_unlock_read,
    put_anon_vma,
)
from mmsim.server.mm.steps import Variant
from mmsim.server.mm.swap_state import swap_cache_get_folio
from mmsim.server.mm.trace import READ_ONCE
from mmsim.server.mm.userfaultfd import move_read_ptes, move_zeropage_pte

if TYPE_CHECKING:
    from mmsim.server.mm.kernel import Kernel


async def folio_referenced(k: Kernel, cur: Current, folio: Folio, try_lock: bool) -> RmapWalkControl:
    """How many VMAs referenced ``folio``, walked with the folio lock held (~6.19: anonymous
    folios too, not only file and KSM ones). Expects a folio reference held; takes the folio lock,
    then what rmap_walk_anon takes; holds nothing on return."""
    rwc = RmapWalkControl(try_lock=try_lock)
    if not folio.mapcount or folio.mapping is None:
        return rwc  # not mapped: nothing to walk, and no reason to wait for the lock
    rwc.mapcount = folio.mapcount
    lock = folio.lock
    assert lock is not None
    if not lock.trylock(cur):
        if try_lock:
            # Reclaim does not sleep on a folio lock: the folio counts as contended (referenced),
            # and it comes back to it later.
            rwc.contended = True
            return rwc
        if not lock.lock(cur): await lock.wait(cur)
    try:
        # From here to the unlock the folio cannot be moved: UFFDIO_MOVE locks it first.
        await k.ops.rmap_walk_anon(k, cur, folio, rwc)
    finally:
        lock.unlock(cur)
    return rwc


async def folio_lock_anon_vma_read(k: Kernel, cur: Current, folio: Folio, rwc: RmapWalkControl) -> AnonVma | None:
    """``folio``'s anon_vma with its root's rwsem held for read (``rwc.locked``), or None (not
    mapped, or contended in ``try_lock`` mode). Expects the folio lock held (folio_referenced),
    no anon_vma lock; takes the RCU read lock, then the root rwsem (a trylock in RCU, else a pin
    on the anon_vma and a sleep on the root outside RCU).

    The folio lock keeps ``folio->mapping`` from changing (only folio_move_anon_rmap changes it
    while the folio stays mapped, and the mover holds the folio lock to call it): the root read
    here is still the folio's root once it is locked, so neither path reads the mapping again."""
    where = "folio_lock_anon_vma_read"
    sched = k.sched
    rcu = k.rcu
    rcu.read_lock(cur)
    anon_vma = READ_ONCE(k, where, folio, "mapping")
    if anon_vma is None or not folio.mapcount:  # !folio_mapped(folio)
        rcu.read_unlock(cur)
        return None
    if sched.active: await sched.point("walk:after-mapping-read")

    # The anon_vma may still be freed and reused by the time we read its root: only RCU
    # (SLAB_TYPESAFE_BY_RCU) keeps the memory an anon_vma.
    if anon_vma.freed: rcu.check_access(cur, anon_vma, "READ_ONCE(anon_vma->root)")
    root: AnonVma = READ_ONCE(k, where, anon_vma, "root")
    if sched.active: await sched.point("walk:after-root-read")
    if root.freed: rcu.check_access(cur, root, "down_read_trylock(&root->rwsem)")
    if root.rwsem.down_read_trylock(cur):
        if sched.active: await sched.point("walk:after-trylock")
        # Unmapped meanwhile (an unmap does not need the folio lock): nothing to walk.
        if not folio.mapcount:
            root.rwsem.up_read(cur)
            rcu.read_unlock(cur)
            return None
        rwc.locked = root
        rcu.read_unlock(cur)
        return anon_vma

    if rwc.try_lock:
        rwc.contended = True
        rcu.read_unlock(cur)
        return None

    # Sleep on the root: pin the anon_vma first, so that it outlives the RCU section.
    if not anon_vma_tryget(k, cur, anon_vma):
        rcu.read_unlock(cur)
        return None
    if not folio.mapcount:
        rcu.read_unlock(cur)
        await put_anon_vma(k, cur, anon_vma)
        return None
    rcu.read_unlock(cur)
    if sched.active: await sched.point("walk:slow-before-lock")
    root = await anon_vma_lock_read(k, cur, anon_vma)
    if sched.active: await sched.point("walk:slow-after-lock")

    if anon_vma_put_testzero(k, cur, anon_vma):
        # Ours was the last reference: anon_vma_free would write-lock the root we hold, so
        # unlock before the free.
        anon_vma_unlock_read(k, cur, anon_vma, root)
        await __put_anon_vma(k, cur, anon_vma)
        return None
    rwc.locked = root
    return anon_vma


async def move_pages_pte(
    k: Kernel, cur: Current, dst_vma: Vma, src_vma: Vma, dst_addr: int, src_addr: int, extent: int, holes: bool,
    dst_pt: PageTable, src_pt: PageTable,
) -> int:
    """One step of UFFDIO_MOVE: a page, or a batch of present pages within one PMD. Returns the
    bytes moved, or a negative errno (-EAGAIN: retry). Expects the dst and src VMAs read-locked;
    takes the src folio lock, then both PTLs (move_present_ptes); holds nothing on return.

    6.18's step, less the src anon_vma's root write lock: every rmap walker now holds the folio
    lock, so the folio lock alone keeps them out while the folio's mapping changes. A swap PTE
    moves as 6.18 moves it (its swap-cache folio locked; move_swap_pte takes no anon_vma lock)."""
    dvpn, svpn = dst_addr >> PAGE_SHIFT, src_addr >> PAGE_SHIFT
    src_folio: Folio | None = None
    src_folio_pte: Pte | SwapPte | None = None
    sched = k.sched
    while True:  # retry:
        dst_used, src_pte, src_swp = await move_read_ptes(k, cur, dst_pt, src_pt, dvpn, svpn)  # under their PTLs
        if dst_used:  # a present or a swap PTE at dst
            ret = -errno.EEXIST
            break
        if src_pte is None:
            if src_swp is None:
                ret = PAGE_SIZE if holes else -errno.ENOENT
                break
            if is_migration_entry(src_swp.entry):  # a split has the page unmapped: wait, retry
                if src_folio is None:
                    await migration_entry_wait(k, cur, src_vma.mm, src_addr, src_swp)
                ret = -errno.EAGAIN
                break
            if src_folio is not None and src_swp is not src_folio_pte:
                ret = -errno.EAGAIN  # the PTE changed while we slept on the folio lock
                break
            if not src_swp.exclusive:  # a swap entry shared with a fork child
                ret = -errno.EBUSY
                break
            if src_folio is None:
                folio = swap_cache_get_folio(k, k.swap, src_swp.entry)  # referenced, if there is one
                if folio is not None:
                    cur.pins.append(folio)  # Kernel.give_back puts it if the call fails
                    src_folio, src_folio_pte = folio, src_swp
                    assert folio.lock is not None
                    if not folio.lock.trylock(cur):
                        if not folio.lock.lock(cur): await folio.lock.wait(cur)
                        continue
            if sched.active and src_folio is not None: await sched.point("move:swap-folio-locked")
            ret = await k.ops.move_swap_pte(k, cur, dst_vma, dst_addr, src_addr, dst_pt, src_pt, src_swp, src_folio)
            break
        if src_folio is not None and src_pte is not src_folio_pte:
            ret = -errno.EAGAIN  # the PTE changed while we slept on the folio lock
            break
        if src_pte.folio is ZERO_PAGE:
            ret = await move_zeropage_pte(k, cur, dst_addr, src_addr, dst_pt, src_pt, src_pte)
            break

        if src_folio is None:
            await k.spin_lock(cur, src_pt.ptl)  # the folio pinned under the PTL that maps it
            if src_pt.ptes.get(svpn) is not src_pte:  # the PTE changed since it was read
                src_pt.ptl.spin_unlock(cur)
                ret = -errno.EAGAIN
                break
            folio = src_pte.folio
            if not folio.page_anon_exclusive(0):  # !PageAnonExclusive: shared with a fork child
                src_pt.ptl.spin_unlock(cur)
                ret = -errno.EBUSY
                break
            # The kernel's step: a reference and the folio lock (a sleep for a small folio's, with
            # only the VMA locks held: then look again; EAGAIN for a contended large folio). It
            # lets the PTL go.
            ret = await k.ops.move_folio_lock(k, cur, folio, src_pt.ptl)
            if ret < 0:
                break
            src_folio, src_folio_pte = folio, src_pte
            if ret:
                continue
        if sched.active: await sched.point("move:after-folio-lock")

        if src_folio.large:  # split it (the kernel's step), then look again
            ret = await k.ops.move_split_large_folio(k, cur, src_folio)
            if ret:
                break
            src_folio = None
            continue

        # 6.18 write-locks the folio's anon_vma root here. The walkers it kept out now wait
        # for the folio lock we hold, so the step goes on to the PTLs; the point stays, as the
        # place where a walker can run while the folio is locked and not yet moved.
        if sched.active: await sched.point("move:anon-vma-locked")

        assert src_folio_pte is not None
        ret = await k.ops.move_present_ptes(
            k, cur, dst_vma, src_vma, dst_addr, src_addr, extent, dst_pt, src_pt, src_folio_pte, src_folio
        )
        break
    # out:
    if src_folio is not None:
        assert src_folio.lock is not None
        src_folio.lock.unlock(cur)
        folio_put(k, src_folio, cur)
    return ret


FOLIO_LOCK = Variant(
    "folio-lock-example",
    "~6.19: rmap walkers hold the folio lock; UFFDIO_MOVE takes no anon_vma lock",
    {
        "folio_referenced": folio_referenced,
        "folio_lock_anon_vma_read": folio_lock_anon_vma_read,
        "move_pages_pte": move_pages_pte,
    },
    walkers_hold_folio_lock=True,
)
