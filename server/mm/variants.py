"""The built-in variants (steps.Variant): the kernel's protocol generations and the mutants.

Each replacement below is the default step (in rmap.py, userfaultfd.py or huge_memory.py) as that
generation or mutant has it; the comments mark what differs. The default steps are 6.18's
(``recheck``).

Protocols:

- ``recheck``: 6.8 to 6.18, the seed as merged: the mapping rechecked in both paths.
- ``recheck-slow-only``: the seed's v2, before review: the slow path only.
- ``no-recheck``: before the seed.
- ``folio-lock``: ~6.19: every rmap walker holds the folio lock; the mover takes no anon_vma lock.

Mutants (``MUTANTS``) are one-line deviations from the kernel, to prove that the detectors see
what each breaks (tests/test_mutants.py, docs/mutants.md, ``mmsim mutate``).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from .huge_memory import pmd_lock, pmd_none
from .locks import Current, SpinLock
from .memory import folio_put
from .migrate import migration_entry_wait
from .mm_types import (
    ANON_VMA_BYTES,
    AVC_BYTES,
    HPAGE_PMD_ORDER,
    HPAGE_PMD_SIZE,
    HUGE_ZERO_FOLIO,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_SHIFT,
    ZERO_PAGE,
    Folio,
    LargeFolio,
    PageTable,
    Pte,
    SwapPte,
    Vma,
    folio_maybe_dma_pinned,
    is_migration_entry,
)
from .page_ref import folio_ref_add
from .rmap import (
    AnonVma,
    PageAnonExclusive,
    RmapWalkControl,
    __put_anon_vma,
    anon_vma_alloc,
    anon_vma_chain_link,
    anon_vma_lock_read,
    anon_vma_lock_write,
    anon_vma_put_testzero,
    anon_vma_tryget,
    anon_vma_unlock_read,
    anon_vma_unlock_write,
    folio_get_anon_vma,
    folio_move_anon_rmap,
    folio_referenced,
    get_anon_vma,
    put_anon_vma,
    slab_free_anon_vma,
    unlink_anon_vmas,
)
from .sched import uninterruptible
from .steps import Variant
from .swap_state import folio_matches_swap_entry, swap_cache_get_folio
from .swapfile import SWAP_HAS_CACHE
from .trace import READ_ONCE, trace_store
from .userfaultfd import (
    check_ptes_for_batched_move,
    double_pt_lock,
    double_pt_unlock,
    move_anon_rmap_and_index,
    move_read_ptes,
    move_split_large_folio,
    move_zeropage_pte,
    swp_pte_same,
)

if TYPE_CHECKING:
    from .kernel import Kernel

# ---------------------------------------------------------------------------------------------
# folio_lock_anon_vma_read, generation by generation



async def flavr_recheck_slow_only(k: Kernel, cur: Current, folio: Folio, rwc: RmapWalkControl) -> AnonVma | None:
    """folio_lock_anon_vma_read as the seed's v2 had it, before review: the mapping is
    rechecked in the slow path only (the trylock fast path trusts the mapping it read)."""
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
            # (no recheck: the mapping read before the trylock is trusted)
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


async def flavr_recheck_fast_only(k: Kernel, cur: Current, folio: Folio, rwc: RmapWalkControl) -> AnonVma | None:
    """folio_lock_anon_vma_read without the slow path's recheck: a walker that slept on the
    old root walks the old tree after the folio moved."""
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

        # (no recheck after the sleep)
        if anon_vma_put_testzero(k, cur, anon_vma):
            # Ours was the last reference: unlock before freeing, since put_anon_vma() would
            # have anon_vma_free write-lock the root we hold.
            anon_vma_unlock_read(k, cur, anon_vma, root_anon_vma)
            await __put_anon_vma(k, cur, anon_vma)
            return None
        rwc.locked = root_anon_vma
        return anon_vma  # type: ignore[no-any-return]


async def flavr_no_recheck(k: Kernel, cur: Current, folio: Folio, rwc: RmapWalkControl) -> AnonVma | None:
    """folio_lock_anon_vma_read before the seed: the mapping is never read again under the lock."""
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
            # (no recheck: the mapping read before the trylock is trusted)
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

        # (no recheck after the sleep)
        if anon_vma_put_testzero(k, cur, anon_vma):
            # Ours was the last reference: unlock before freeing, since put_anon_vma() would
            # have anon_vma_free write-lock the root we hold.
            anon_vma_unlock_read(k, cur, anon_vma, root_anon_vma)
            await __put_anon_vma(k, cur, anon_vma)
            return None
        rwc.locked = root_anon_vma
        return anon_vma  # type: ignore[no-any-return]


async def flavr_no_anon_vma_get(k: Kernel, cur: Current, folio: Folio, rwc: RmapWalkControl) -> AnonVma | None:
    """folio_lock_anon_vma_read whose slow path sleeps on the root without pinning the
    anon_vma (atomic_inc_not_zero and its puts removed)."""
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

        # The trylock failed: we must sleep (the mutant: without pinning the anon_vma).
        if not folio.mapcount:
            rcu.read_unlock(cur)
            return None

        # (unpinned: it may be freed while we sleep outside RCU)
        rcu.read_unlock(cur)
        if sched.active: await sched.point("walk:slow-before-lock")
        root_anon_vma = await anon_vma_lock_read(k, cur, anon_vma)
        if sched.active: await sched.point("walk:slow-after-lock")

        # As in the fast path: the folio may have moved to another anon_vma while we slept.
        if READ_ONCE(k, where, folio, "mapping") is not anon_vma:
            anon_vma_unlock_read(k, cur, anon_vma, root_anon_vma)
            rwc.slow_retries += 1
            continue

        rwc.locked = root_anon_vma
        return anon_vma  # type: ignore[no-any-return]


async def flavr_root_read_outside_rcu(k: Kernel, cur: Current, folio: Folio, rwc: RmapWalkControl) -> AnonVma | None:
    """folio_lock_anon_vma_read that leaves the RCU read section right after reading the
    mapping, before it reads the anon_vma's root."""
    where = "folio_lock_anon_vma_read"
    sched = k.sched
    rcu = k.rcu
    while True:  # retry:
        rcu.read_lock(cur)
        anon_vma = READ_ONCE(k, where, folio, "mapping")
        if anon_vma is None or not folio.mapcount:  # !folio_mapped(folio)
            rcu.read_unlock(cur)
            return None
        rcu.read_unlock(cur)  # the mutant: moved above the root's read
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
                rwc.fast_retries += 1
                continue
            # Still mapped: this is still the folio's anon_vma, and the rwsem we hold keeps it
            # from being freed (anon_vma_free waits for a locked root).
            if not folio.mapcount:
                root_anon_vma.rwsem.up_read(cur)
                anon_vma = None
            else:
                rwc.locked = root_anon_vma
            return anon_vma  # type: ignore[no-any-return]

        if rwc.try_lock:
            rwc.contended = True
            return None

        # The trylock failed: we must sleep, so pin the anon_vma first.
        if not anon_vma_tryget(k, cur, anon_vma):
            return None
        if not folio.mapcount:
            await put_anon_vma(k, cur, anon_vma)
            return None

        # Pinned: it cannot be freed while we sleep outside RCU.
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


# ---------------------------------------------------------------------------------------------
# The walker under folio-lock (~6.19)


async def folio_referenced_folio_locked(k: Kernel, cur: Current, folio: Folio, try_lock: bool) -> RmapWalkControl:
    """folio_referenced as ~6.19 has it: every walker holds the folio lock, an anonymous folio
    too (a trylock in ``try_lock`` mode, contention returns at once; else a sleep on it), so
    UFFDIO_MOVE, which locks the folio, cannot move it under the walk."""
    rwc = RmapWalkControl(try_lock=try_lock)
    if not folio.mapcount or folio.mapping is None:
        return rwc
    rwc.mapcount = folio.mapcount
    lock = folio.lock
    assert lock is not None
    if not lock.trylock(cur):
        if try_lock:
            rwc.contended = True
            return rwc
        if not lock.lock(cur): await lock.wait(cur)
    try:
        await k.ops.rmap_walk_anon(k, cur, folio, rwc)
    finally:
        lock.unlock(cur)
    return rwc


# ---------------------------------------------------------------------------------------------
# The mover


async def move_pages_pte_no_anon_vma_lock(
    k: Kernel, cur: Current, dst_vma: Vma, src_vma: Vma, dst_addr: int, src_addr: int, extent: int, holes: bool,
    dst_pt: PageTable, src_pt: PageTable,
) -> int:
    """move_pages_pte without the src anon_vma's root write lock: the folio lock alone keeps
    walkers out, which holds only where every walker takes the folio lock (~6.19). Swap PTEs move
    as 6.18 moves them (move_swap_pte takes no anon_vma lock either)."""
    dvpn, svpn = dst_addr >> PAGE_SHIFT, src_addr >> PAGE_SHIFT
    src_folio: Folio | None = None
    src_folio_pte: Pte | SwapPte | None = None
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
            src_folio = None
            continue

        # (no anon_vma lock: every walker holds the folio lock, which we hold)
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
        folio_put(k, src_folio, cur)  # the last reference if MADV_DONTNEED zapped the folio meanwhile
    return ret


async def move_pages_pte_no_locks(
    k: Kernel, cur: Current, dst_vma: Vma, src_vma: Vma, dst_addr: int, src_addr: int, extent: int, holes: bool,
    dst_pt: PageTable, src_pt: PageTable,
) -> int:
    """move_pages_pte that takes neither the src folio lock nor the anon_vma lock (a swap PTE's
    swap-cache folio is not locked either)."""
    dvpn, svpn = dst_addr >> PAGE_SHIFT, src_addr >> PAGE_SHIFT
    src_folio: Folio | None = None
    src_folio_pte: Pte | SwapPte | None = None
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
                    cur.pins.append(folio)  # the mutant: no folio_trylock / folio_lock
                    src_folio = folio
                    src_folio_pte = orig_src_swp
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
            folio_ref_add(k, folio, 1)  # folio_get(folio); the mutant: no folio_trylock / folio_lock
            cur.pins.append(folio)
            src_pt.ptl.spin_unlock(cur)
            src_folio = folio
            src_folio_pte = orig_src_pte
            if isinstance(folio, LargeFolio):  # split_folio needs the lock even here
                assert folio.lock is not None
                if not folio.lock.trylock(cur):
                    ret = -errno.EAGAIN
                    break
                ret = await k.ops.move_split_large_folio(k, cur, folio)
                if ret:
                    folio.lock.unlock(cur)
                    break
                src_folio = None
                continue
        if sched.active: await sched.point("move:after-folio-lock")

        # (no anon_vma lock either)
        if sched.active: await sched.point("move:anon-vma-locked")

        assert src_folio_pte is not None
        ret = await k.ops.move_present_ptes(
            k, cur, dst_vma, src_vma, dst_addr, src_addr, extent, dst_pt, src_pt, src_folio_pte, src_folio
        )
        break
    # out:
    if src_folio is not None:
        folio_put(k, src_folio, cur)  # the last reference if MADV_DONTNEED zapped the folio meanwhile
    return ret


async def move_present_ptes_index_first(
    k: Kernel, cur: Current, dst_vma: Vma, src_vma: Vma, dst_addr: int, src_addr: int, extent: int,
    dst_pt: PageTable, src_pt: PageTable, orig_src_pte: Pte, src_folio: Folio,
) -> int:
    """move_present_ptes storing folio->index before folio->mapping."""
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
            if sched.active and k.gup_fast_tasks: await sched.point_unkillable("move:pte-cleared")
            if folio_maybe_dma_pinned(src_folio):  # got pinned from under us: put it back, fail
                src_ptes[svpn] = pte
                if ret:
                    src_folio.lock.unlock(cur)  # type: ignore[union-attr]
                else:
                    ret = -errno.EBUSY
                break
            torn = sched.active
            if torn: k.torn[src_folio.id] = (src_folio.mapping, index)  # type: ignore[assignment]
            src_folio.index = index  # the mutant: the index first
            if k.trace: trace_store(k, "move_present_ptes", src_folio, "index")
            if torn: await sched.point_unkillable("move:after-mapping-store")
            folio_move_anon_rmap(k, src_folio, dst_vma)
            if torn: del k.torn[src_folio.id]
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


# ---------------------------------------------------------------------------------------------
# CVE-2024-27007: the folio changed before the pin check


async def move_present_ptes_rmap_before_pin_check(
    k: Kernel, cur: Current, dst_vma: Vma, src_vma: Vma, dst_addr: int, src_addr: int, extent: int,
    dst_pt: PageTable, src_pt: PageTable, orig_src_pte: Pte, src_folio: Folio,
) -> int:
    """move_present_ptes before d7a08838ab74 (6.8-rc): the folio is pointed at dst's anon_vma and
    index before its PTE is cleared and the pin checked again, so a move that fails there (a
    GUP-fast pin came in after the first check) puts the PTE back at src and leaves the folio
    with dst's mapping and index: rmap walks no longer find it where it is mapped."""
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
            # the mutant: the stores before the clear
            await move_anon_rmap_and_index(k, src_folio, dst_vma, index, "move_present_ptes")
            pte = src_ptes.pop(svpn)  # ptep_get_and_clear
            if sched.active and k.gup_fast_tasks: await sched.point_unkillable("move:pte-cleared")
            if folio_maybe_dma_pinned(src_folio):  # got pinned from under us: put it back, fail
                src_ptes[svpn] = pte  # (the folio keeps dst's anon_vma and index)
                if ret:
                    src_folio.lock.unlock(cur)  # type: ignore[union-attr]
                else:
                    ret = -errno.EBUSY
                break
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


async def move_pages_huge_pmd_rmap_before_pin_check(
    k: Kernel, cur: Current, dst_vma: Vma, src_vma: Vma, dst_addr: int, src_addr: int
) -> int:
    """move_pages_huge_pmd as 6.8 has it, before c0205eaf3af9 (6.9-rc5): under both PMD locks the
    folio is checked for pins, pointed at dst's anon_vma and index, and only then is the PMD
    cleared and the pin checked again; a move that fails there (a GUP-fast pin came in after the
    first check) puts the PMD back at src and leaves the THP with dst's mapping and index. Takes
    what the default takes (the PMD locks through double_pt_lock itself, as the default does)."""
    mm = src_vma.mm
    src_idx, dst_idx = src_addr >> PMD_SHIFT, dst_addr >> PMD_SHIFT
    src_ptl = await pmd_lock(k, cur, mm, src_addr)  # pmd_trans_huge_lock
    src_pmdval = mm.huge_pmds.get(src_idx)
    if src_pmdval is None:
        src_ptl.spin_unlock(cur)
        return -errno.ENOENT
    src_folio: LargeFolio | None = None
    if src_pmdval.folio is not HUGE_ZERO_FOLIO:
        if not PageAnonExclusive(k, src_pmdval.folio, 0):
            src_ptl.spin_unlock(cur)
            return -errno.EBUSY
        src_folio = src_pmdval.folio
        folio_ref_add(k, src_folio, 1)  # folio_get
        cur.pins.append(src_folio)
    src_ptl.spin_unlock(cur)
    src_anon_vma: AnonVma | None = None
    err = 0
    if src_folio is not None:
        lock = src_folio.lock
        assert lock is not None
        if not lock.lock(cur): await lock.wait(cur)
    dst_ptl = mm.pmd_lock(dst_addr)
    try:
        await double_pt_lock(k, cur, src_ptl, dst_ptl)
        if mm.huge_pmds.get(src_idx) is not src_pmdval or not pmd_none(mm, dst_idx):
            err = -errno.EAGAIN
        elif src_folio is not None:
            if not PageAnonExclusive(k, src_folio, 0):
                err = -errno.EBUSY
            else:
                src_anon_vma = await folio_get_anon_vma(k, cur, src_folio)
                if src_anon_vma is None:
                    err = -errno.EAGAIN
                else:
                    double_pt_unlock(cur, src_ptl, dst_ptl)
                    await anon_vma_lock_write(cur, src_anon_vma)
                    await double_pt_lock(k, cur, src_ptl, dst_ptl)
                    if mm.huge_pmds.get(src_idx) is not src_pmdval or not pmd_none(mm, dst_idx):
                        err = -errno.EAGAIN
        if not err and src_folio is not None and folio_maybe_dma_pinned(src_folio):
            err = -errno.EBUSY  # the first pin check, under both PMD locks
        if not err:
            if src_folio is not None:  # the mutant: the stores before the clear
                index = dst_vma.linear_page_index(dst_addr)
                await move_anon_rmap_and_index(k, src_folio, dst_vma, index, "move_pages_huge_pmd")
            hp = mm.huge_pmds.pop(src_idx)  # pmdp_huge_clear_flush
            if k.sched.active and k.gup_fast_tasks: await k.sched.point_unkillable("move:pmd-cleared")
            if src_folio is not None and folio_maybe_dma_pinned(src_folio):
                mm.huge_pmds[src_idx] = hp  # got pinned from under us: put it back, fail
                err = -errno.EBUSY  # (the folio keeps dst's anon_vma and index)
        if not err:
            if src_folio is not None:
                hp.write = hp.dirty = hp.young = True  # pmd_mkwrite(pmd_mkdirty(folio_mk_pmd()))
                hp.uffd_wp = False
                hp.soft_dirty = True
            else:
                hp.uffd_wp = False  # clear_uffd_wp_pmd(move_soft_dirty_pmd())
                hp.soft_dirty = True
            mm.huge_pmds[dst_idx] = hp  # set_pmd_at, and the deposit withdrawn and deposited
        double_pt_unlock(cur, src_ptl, dst_ptl)
    finally:
        if src_anon_vma is not None:
            anon_vma_unlock_write(cur, src_anon_vma)
            await put_anon_vma(k, cur, src_anon_vma)
        if src_folio is not None:
            assert src_folio.lock is not None
            if src_folio.lock.owner is cur:
                src_folio.lock.unlock(cur)
            folio_put(k, src_folio, cur)
    if err:
        return err
    k.stats["thp_move_pmd"] += 1
    return HPAGE_PMD_SIZE


# ---------------------------------------------------------------------------------------------
# The huge zero page: 5d4747a6cc8e (6.8-rc1) and the 2026 fix


async def move_pages_huge_pmd_huge_zero_as_folio(
    k: Kernel, cur: Current, dst_vma: Vma, src_vma: Vma, dst_addr: int, src_addr: int
) -> int:
    """move_pages_huge_pmd before 5d4747a6cc8e (6.8-rc1): no case for the huge zero PMD, whose
    page is taken for an anonymous THP: PageAnonExclusive is asked of it under the PMD lock (the
    kernel's VM_BUG_ON_PGFLAGS(!PageAnon) under CONFIG_DEBUG_VM_PGFLAGS; otherwise the flag reads
    clear and the move fails with EBUSY), and had it passed, the huge zero folio would have been
    referenced and locked as a THP and its anon_vma (it has none) looked for. Takes what the
    default takes."""
    mm = src_vma.mm
    src_idx, dst_idx = src_addr >> PMD_SHIFT, dst_addr >> PMD_SHIFT
    src_ptl = await pmd_lock(k, cur, mm, src_addr)  # pmd_trans_huge_lock
    src_pmdval = mm.huge_pmds.get(src_idx)
    if src_pmdval is None:
        src_ptl.spin_unlock(cur)
        return -errno.ENOENT
    src_folio = src_pmdval.folio  # the mutant: the huge zero page too (no is_huge_zero_pmd case)
    if not PageAnonExclusive(k, src_folio, 0):
        src_ptl.spin_unlock(cur)
        return -errno.EBUSY
    folio_ref_add(k, src_folio, 1)  # folio_get
    cur.pins.append(src_folio)
    src_ptl.spin_unlock(cur)
    src_anon_vma: AnonVma | None = None
    err = 0
    lock = src_folio.lock
    assert lock is not None
    if not lock.lock(cur): await lock.wait(cur)
    dst_ptl = mm.pmd_lock(dst_addr)
    try:
        await double_pt_lock(k, cur, src_ptl, dst_ptl)
        if mm.huge_pmds.get(src_idx) is not src_pmdval or not pmd_none(mm, dst_idx):
            err = -errno.EAGAIN
        elif not PageAnonExclusive(k, src_folio, 0):
            err = -errno.EBUSY
        else:
            src_anon_vma = await folio_get_anon_vma(k, cur, src_folio)
            if src_anon_vma is None:
                err = -errno.EAGAIN
            else:
                double_pt_unlock(cur, src_ptl, dst_ptl)
                await anon_vma_lock_write(cur, src_anon_vma)
                await double_pt_lock(k, cur, src_ptl, dst_ptl)
                if mm.huge_pmds.get(src_idx) is not src_pmdval or not pmd_none(mm, dst_idx):
                    err = -errno.EAGAIN
        if not err and folio_maybe_dma_pinned(src_folio):
            err = -errno.EBUSY
        if not err:
            hp = mm.huge_pmds.pop(src_idx)  # pmdp_huge_clear_flush
            if k.sched.active and k.gup_fast_tasks: await k.sched.point_unkillable("move:pmd-cleared")
            if folio_maybe_dma_pinned(src_folio):
                mm.huge_pmds[src_idx] = hp  # got pinned from under us: put it back, fail
                err = -errno.EBUSY
        if not err:
            index = dst_vma.linear_page_index(dst_addr)
            await move_anon_rmap_and_index(k, src_folio, dst_vma, index, "move_pages_huge_pmd")
            hp.write = hp.dirty = hp.young = True  # pmd_mkwrite(pmd_mkdirty(folio_mk_pmd()))
            hp.uffd_wp = False
            hp.soft_dirty = True
            mm.huge_pmds[dst_idx] = hp  # set_pmd_at, and the deposit withdrawn and deposited
        double_pt_unlock(cur, src_ptl, dst_ptl)
    finally:
        if src_anon_vma is not None:
            anon_vma_unlock_write(cur, src_anon_vma)
            await put_anon_vma(k, cur, src_anon_vma)
        if lock.owner is cur:
            lock.unlock(cur)
        folio_put(k, src_folio, cur)
    if err:
        return err
    k.stats["thp_move_pmd"] += 1
    return HPAGE_PMD_SIZE


#: The contents of the memory a PMD built from a NULL folio maps.
STRAY_PAGE_VALUE = 0x5A5A5A5A


def folio_mk_pmd_null() -> LargeFolio:
    """What ``folio_mk_pmd(NULL, prot)`` maps: the pages at folio_pfn(NULL), memory the model does
    not own (no anon_vma, no mapcount or reference for the mapping, not on the LRU) holding
    someone else's data (STRAY_PAGE_VALUE in every page)."""
    stray = LargeFolio(-1, None, HPAGE_PMD_ORDER)
    stray.values = [STRAY_PAGE_VALUE] * stray.nr_pages
    return stray


async def move_pages_huge_pmd_zero_pmd_from_null(
    k: Kernel, cur: Current, dst_vma: Vma, src_vma: Vma, dst_addr: int, src_addr: int
) -> int:
    """move_pages_huge_pmd from 6.16 to the 2026 fix ("mm/huge_memory: fix memory corruption on
    huge zero page move"): the huge zero PMD's destination entry is built by folio_mk_pmd from
    the src folio, which is NULL for the huge zero page, and is not marked special, so dst maps
    the memory at folio_pfn(NULL) as a huge page. Takes what the default takes."""
    mm = src_vma.mm
    src_idx, dst_idx = src_addr >> PMD_SHIFT, dst_addr >> PMD_SHIFT
    src_ptl = await pmd_lock(k, cur, mm, src_addr)  # pmd_trans_huge_lock
    src_pmdval = mm.huge_pmds.get(src_idx)
    if src_pmdval is None:
        src_ptl.spin_unlock(cur)
        return -errno.ENOENT
    src_folio: LargeFolio | None = None
    if src_pmdval.folio is not HUGE_ZERO_FOLIO:
        if not PageAnonExclusive(k, src_pmdval.folio, 0):
            src_ptl.spin_unlock(cur)
            return -errno.EBUSY
        src_folio = src_pmdval.folio
        folio_ref_add(k, src_folio, 1)  # folio_get
        cur.pins.append(src_folio)
    src_ptl.spin_unlock(cur)
    src_anon_vma: AnonVma | None = None
    err = 0
    if src_folio is not None:
        lock = src_folio.lock
        assert lock is not None
        if not lock.lock(cur): await lock.wait(cur)
    dst_ptl = mm.pmd_lock(dst_addr)
    try:
        await double_pt_lock(k, cur, src_ptl, dst_ptl)
        if mm.huge_pmds.get(src_idx) is not src_pmdval or not pmd_none(mm, dst_idx):
            err = -errno.EAGAIN
        elif src_folio is not None:
            if not PageAnonExclusive(k, src_folio, 0):
                err = -errno.EBUSY
            else:
                src_anon_vma = await folio_get_anon_vma(k, cur, src_folio)
                if src_anon_vma is None:
                    err = -errno.EAGAIN
                else:
                    double_pt_unlock(cur, src_ptl, dst_ptl)
                    await anon_vma_lock_write(cur, src_anon_vma)
                    await double_pt_lock(k, cur, src_ptl, dst_ptl)
                    if mm.huge_pmds.get(src_idx) is not src_pmdval or not pmd_none(mm, dst_idx):
                        err = -errno.EAGAIN
        if not err and src_folio is not None and folio_maybe_dma_pinned(src_folio):
            err = -errno.EBUSY
        if not err:
            hp = mm.huge_pmds.pop(src_idx)  # pmdp_huge_clear_flush
            if k.sched.active and k.gup_fast_tasks: await k.sched.point_unkillable("move:pmd-cleared")
            if src_folio is not None and folio_maybe_dma_pinned(src_folio):
                mm.huge_pmds[src_idx] = hp  # got pinned from under us: put it back, fail
                err = -errno.EBUSY
        if not err:
            if src_folio is not None:
                index = dst_vma.linear_page_index(dst_addr)
                await move_anon_rmap_and_index(k, src_folio, dst_vma, index, "move_pages_huge_pmd")
                hp.write = hp.dirty = hp.young = True  # pmd_mkwrite(pmd_mkdirty(folio_mk_pmd()))
                hp.uffd_wp = False
                hp.soft_dirty = True
            else:
                hp.folio = folio_mk_pmd_null()  # the mutant: folio_mk_pmd(src_folio), src_folio NULL
                hp.uffd_wp = False
                hp.soft_dirty = True
            mm.huge_pmds[dst_idx] = hp  # set_pmd_at, and the deposit withdrawn and deposited
        double_pt_unlock(cur, src_ptl, dst_ptl)
    finally:
        if src_anon_vma is not None:
            anon_vma_unlock_write(cur, src_anon_vma)
            await put_anon_vma(k, cur, src_anon_vma)
        if src_folio is not None:
            assert src_folio.lock is not None
            if src_folio.lock.owner is cur:
                src_folio.lock.unlock(cur)
            folio_put(k, src_folio, cur)
    if err:
        return err
    k.stats["thp_move_pmd"] += 1
    return HPAGE_PMD_SIZE


# ---------------------------------------------------------------------------------------------
# Swap PTEs: the 6.14 and 6.16 swap-cache fixes


async def move_swap_pte_keeps_mapping(
    k: Kernel, cur: Current, dst_vma: Vma, dst_addr: int, src_addr: int, dst_pt: PageTable, src_pt: PageTable,
    orig_src_pte: SwapPte, src_folio: Folio | None,
) -> int:
    """move_swap_pte before 6.14 (c50f8e6053b0): the swap PTE moves, the folio in the swap cache
    keeps the source's anon_vma and index."""
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
        # (the swap cache's folio is not pointed at dst_vma's anon_vma and index)
        pte = src_pt.swap.pop(svpn)
        pte.soft_dirty = True
        dst_pt.swap[dvpn] = pte
        ret = PAGE_SIZE
    double_pt_unlock(cur, dst_pt.ptl, src_pt.ptl)
    return ret


async def move_swap_pte_no_has_cache_check(
    k: Kernel, cur: Current, dst_vma: Vma, dst_addr: int, src_addr: int, dst_pt: PageTable, src_pt: PageTable,
    orig_src_pte: SwapPte, src_folio: Folio | None,
) -> int:
    """move_swap_pte before 0ea148a79919 (6.15) as to a swap PTE whose lookup found no folio: the
    PTE moves when it reads as it did, though a folio may have come into the swap cache for its
    entry since (the page swapped in and out again to the same slot, as 6.16's commit draws it),
    and that folio keeps the source's anon_vma and index."""
    dvpn, svpn = dst_addr >> PAGE_SHIFT, src_addr >> PAGE_SHIFT
    entry = orig_src_pte.entry
    assert not is_migration_entry(entry), "move_swap_pte of a migration entry"
    if src_folio is not None and not folio_matches_swap_entry(src_folio, entry):
        return -errno.EAGAIN
    await k.ops.double_pt_lock(k, cur, dst_pt.ptl, src_pt.ptl)
    if not dst_pt.pte_none(dvpn) or not swp_pte_same(src_pt.swap.get(svpn), orig_src_pte):
        ret = -errno.EAGAIN
    else:  # the mutant: no `READ_ONCE(si->swap_map[offset]) & SWAP_HAS_CACHE` for a missing folio
        if src_folio is not None:
            await move_anon_rmap_and_index(k, src_folio, dst_vma, dst_vma.linear_page_index(dst_addr), "move_swap_pte")
        pte = src_pt.swap.pop(svpn)  # ptep_get_and_clear
        pte.soft_dirty = True  # pte_swp_mksoft_dirty
        dst_pt.swap[dvpn] = pte
        ret = PAGE_SIZE
    double_pt_unlock(cur, dst_pt.ptl, src_pt.ptl)
    return ret


async def move_swap_pte_no_folio_match_check(
    k: Kernel, cur: Current, dst_vma: Vma, dst_addr: int, src_addr: int, dst_pt: PageTable, src_pt: PageTable,
    orig_src_pte: SwapPte, src_folio: Folio | None,
) -> int:
    """move_swap_pte before 0ea148a79919 (6.15) as to the folio the lookup found: it is moved with
    the PTE without checking, once locked, that it is still the swap cache's folio for the entry."""
    dvpn, svpn = dst_addr >> PAGE_SHIFT, src_addr >> PAGE_SHIFT
    entry = orig_src_pte.entry
    assert not is_migration_entry(entry), "move_swap_pte of a migration entry"
    # the mutant: no `folio_test_swapcache(src_folio) && entry.val == src_folio->swap.val` check
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


# ---------------------------------------------------------------------------------------------
# Fork, free, PTLs


async def anon_vma_clone_unlocked(k: Kernel, cur: Current, dst: Vma, src: Vma, nofail: bool = False) -> None:
    """anon_vma_clone that links ``dst`` into the trees without the root rwsem."""
    if not src.anon_vma_chain:
        return
    k.memcg.charge(cur, len(src.anon_vma_chain) * AVC_BYTES, nofail=nofail)
    for pavc in src.anon_vma_chain:  # the mutant: no lock_anon_vma_root
        anon_vma = pavc.anon_vma
        anon_vma_chain_link(dst, anon_vma)
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


async def anon_vma_fork_unlocked(k: Kernel, cur: Current, vma: Vma, pvma: Vma) -> None:
    """anon_vma_fork that links the child's new anon_vma without the root rwsem."""
    if pvma.anon_vma is None:
        return
    k.memcg.reserve(cur, (len(pvma.anon_vma_chain) + 1) * AVC_BYTES + ANON_VMA_BYTES)
    vma.anon_vma = None
    await k.ops.anon_vma_clone(k, cur, vma, pvma)
    if vma.anon_vma is not None:
        return
    try:
        anon_vma = await anon_vma_alloc(k, cur)  # the mutant: no anon_vma_lock_write
    except BaseException:
        await uninterruptible(lambda: unlink_anon_vmas(k, cur, vma))
        raise
    anon_vma.num_active_vmas += 1
    anon_vma.root = pvma.anon_vma.root
    anon_vma.parent = pvma.anon_vma
    get_anon_vma(k, anon_vma.root)
    vma.anon_vma = anon_vma
    k.memcg.charge(cur, AVC_BYTES)
    anon_vma_chain_link(vma, anon_vma)
    anon_vma.parent.num_children += 1


async def anon_vma_free_no_handshake(k: Kernel, cur: Current, anon_vma: AnonVma) -> None:
    """anon_vma_free without the write lock and unlock of a locked root before the free."""
    sched = k.sched
    if sched.active: await sched.point_unkillable("free:before-anon-vma-free")
    slab_free_anon_vma(k, anon_vma)
    if sched.active: await sched.point_unkillable("free:after-anon-vma-free")


async def double_pt_lock_unordered(k: Kernel, cur: Current, ptl1: SpinLock, ptl2: SpinLock) -> None:
    """double_pt_lock that takes the PTLs in the order given (the dst's, then the src's)."""
    await k.spin_lock(cur, ptl1)
    if ptl2 is not ptl1:
        if k.sched.active: await k.sched.point("move:between-ptls")
        await k.spin_lock(cur, ptl2, nested=True)


# ---------------------------------------------------------------------------------------------
# The registry


RECHECK_FAMILY = ("recheck", "recheck-slow-only", "no-recheck")
ALL_PROTOCOLS = (*RECHECK_FAMILY, "folio-lock")

PROTOCOLS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("recheck", "6.8 to 6.18: the seed as merged, the mapping rechecked in both paths"),
        Variant("recheck-slow-only", "the seed's v2, before review: the slow path's recheck only",
                {"folio_lock_anon_vma_read": flavr_recheck_slow_only}),
        Variant("no-recheck", "before the seed: no recheck", {"folio_lock_anon_vma_read": flavr_no_recheck}),
        Variant(
            "folio-lock", "~6.19: rmap walkers hold the folio lock; the mover drops the anon_vma lock",
            {"folio_referenced": folio_referenced_folio_locked, "folio_lock_anon_vma_read": flavr_no_recheck,
             "move_pages_pte": move_pages_pte_no_anon_vma_lock},
            walkers_hold_folio_lock=True,
        ),
    )
}


async def move_folio_lock_sleeps_on_large(k: Kernel, cur: Current, folio: Folio, ptl: SpinLock) -> int:
    """move_folio_lock before 6.14: a contended large folio's lock is slept for, its reference
    raised (as for a small folio)."""
    lock = folio.lock
    assert lock is not None
    locked = lock.trylock(cur)
    folio_ref_add(k, folio, 1)  # folio_get(folio), even for a large folio whose lock is contended
    cur.pins.append(folio)
    ptl.spin_unlock(cur)
    if locked:
        return 0
    if not lock.lock(cur): await lock.wait(cur)
    return 1


async def move_split_large_folio_under_rcu(k: Kernel, cur: Current, folio: LargeFolio) -> int:
    """move_split_large_folio with the PTEs still mapped: split_folio called inside the RCU read
    section that pte_offset_map opened."""
    rcu = k.rcu
    rcu.read_lock(cur)  # the PTE mapping's RCU section, not let go before the split
    try:
        return await move_split_large_folio(k, cur, folio)
    finally:
        rcu.read_unlock(cur)


MUTANTS: dict[str, Variant] = {
    m.name: m
    for m in (
        Variant(
            "no-recheck-fast", "the trylock fast path's recheck removed",
            {"folio_lock_anon_vma_read": flavr_recheck_slow_only}, applies_to=("recheck",),
            kernel="folio_lock_anon_vma_read, after down_read_trylock succeeds: "
            "`if (unlikely((unsigned long)READ_ONCE(folio->mapping) != anon_mapping))` removed",
            fix="Peter Xu's review of v2 of \"userfaultfd: UFFDIO_REMAP: rmap preparation\" (2023-09-28): the "
            "recheck added to the trylock fast path before the merge (6.8)",
            failure="wrong-root-walk: the fast-path race (a move completes between the walker's mapping read and "
            "its trylock)",
        ),
        Variant(
            "no-recheck-slow", "the slow path's recheck removed",
            {"folio_lock_anon_vma_read": flavr_recheck_fast_only}, applies_to=("recheck",),
            kernel="folio_lock_anon_vma_read, after anon_vma_lock_read returns: the same mapping recheck removed",
            failure="wrong-root-walk: the slow-path race (the walker sleeps on the old root while the mover moves "
            "the folio)",
        ),
        Variant(
            "mover-no-root-lock", "the mover takes no anon_vma lock",
            {"move_pages_pte": move_pages_pte_no_anon_vma_lock}, applies_to=RECHECK_FAMILY,
            kernel="move_pages_pte: `anon_vma_trylock_write(src_anon_vma)` / `anon_vma_lock_write(src_anon_vma)` "
            "removed",
            failure="wrong-root-walk and mapping-changed-during-walk: the folio moves under a walker that holds the "
            "old root",
        ),
        Variant(
            "mover-no-folio-lock", "the mover takes no folio lock",
            {"move_pages_pte": move_pages_pte_no_locks}, applies_to=("folio-lock",),
            kernel="move_pages_pte: `folio_trylock(src_folio)` / `folio_lock(src_folio)` removed",
            failure="under folio-lock: wrong-root-walk and mapping-changed-during-walk (the folio moves under a "
            "walker that holds its lock); under the recheck family the anon_vma lock still orders it "
            "(docs/mutants.md)",
        ),
        Variant(
            "walker-no-anon-vma-get", "the slow path sleeps without pinning the anon_vma",
            {"folio_lock_anon_vma_read": flavr_no_anon_vma_get}, applies_to=("recheck",),
            kernel="folio_lock_anon_vma_read slow path: `if (!atomic_inc_not_zero(&anon_vma->refcount))` "
            "(and the put_anon_vma / atomic_dec_and_test that drop it) removed",
            failure="use-after-free: the anon_vma is freed while the walker sleeps unpinned, and anon_vma_lock_read "
            "reads its root outside RCU",
        ),
        Variant(
            "walker-root-read-outside-rcu", "the root is read after the RCU read section ended",
            {"folio_lock_anon_vma_read": flavr_root_read_outside_rcu}, applies_to=("recheck",),
            kernel="folio_lock_anon_vma_read: `rcu_read_unlock()` moved above "
            "`root_anon_vma = READ_ONCE(anon_vma->root)`",
            failure="use-after-free: the anon_vma read from folio->mapping is freed before the walker reads its root",
        ),
        Variant(
            "fork-no-root-lock", "fork links the child into the trees without the root lock",
            {"anon_vma_clone": anon_vma_clone_unlocked, "anon_vma_fork": anon_vma_fork_unlocked},
            applies_to=ALL_PROTOCOLS,
            kernel="anon_vma_clone / anon_vma_fork: `anon_vma_lock_write(anon_vma)` (lock_anon_vma_root) removed",
            failure="tree-changed-during-walk: fork links the child's VMA into a tree whose root a walker holds",
        ),
        Variant(
            "free-no-root-handshake", "anon_vma_free skips waiting out a locked root",
            {"anon_vma_free": anon_vma_free_no_handshake}, applies_to=ALL_PROTOCOLS,
            kernel="anon_vma_free: `if (rwsem_is_locked(&anon_vma->root->rwsem)) { anon_vma_lock_write(anon_vma); "
            "anon_vma_unlock_write(anon_vma); }` removed",
            failure="none in the model: it orders memory, which the model (sequentially consistent) does not reorder",
            equivalent=True,
        ),
        Variant(
            "move-index-before-mapping", "the mover stores folio->index before folio->mapping",
            {"move_present_ptes": move_present_ptes_index_first}, applies_to=ALL_PROTOCOLS,
            kernel="move_present_ptes: `src_folio->index = linear_page_index(dst_vma, dst_addr)` moved above "
            "`folio_move_anon_rmap(src_folio, dst_vma)`",
            failure="none: the torn pair (old mapping, new index) is seen only under the old root, which the mover "
            "holds; the residual-index-window finding disappears instead",
            equivalent=True,
        ),
        Variant(
            "ptl-no-address-order", "double_pt_lock takes the PTLs in argument order",
            {"double_pt_lock": double_pt_lock_unordered}, applies_to=ALL_PROTOCOLS,
            kernel="double_pt_lock: `if (ptl1 > ptl2) swap(ptl1, ptl2);` removed",
            failure="deadlock: two moves in opposite directions between two page tables each hold one PTL and spin "
            "on the other",
        ),
        Variant(
            "move-swap-keeps-mapping", "a moved swap PTE's folio in the swap cache keeps its anon_vma and index",
            {"move_swap_pte": move_swap_pte_keeps_mapping}, applies_to=ALL_PROTOCOLS,
            kernel="move_swap_pte (6.14+, c50f8e6053b0): `folio_move_anon_rmap(src_folio, dst_vma); "
            "src_folio->index = linear_page_index(dst_vma, dst_addr);` removed",
            failure="anon-rmap-mismatch: a swap-in at dst finds the cached folio at the source's anon_vma and index "
            "(the kernel's BUG_ON in __page_check_anon_rmap)",
            fix="c50f8e6053b0 mm: fix kernel BUG when userfaultfd_move encounters swapcache (6.14)",
        ),
        Variant(
            "move-swap-no-has-cache-check", "a swap PTE whose lookup found no folio moves without looking again",
            {"move_swap_pte": move_swap_pte_no_has_cache_check}, applies_to=ALL_PROTOCOLS,
            kernel="move_swap_pte (6.15, before 0ea148a79919): `if (READ_ONCE(si->swap_map[swp_offset(entry)]) & "
            "SWAP_HAS_CACHE) { double_pt_unlock(dst_ptl, src_ptl); return -EAGAIN; }` for a missing src_folio "
            "removed",
            failure="anon-rmap-mismatch: the page is swapped in and out again to the same slot between the mover's "
            "swap-cache lookup (none) and its PTLs; the swap PTE reads the same, so it moves without the folio now "
            "in the swap cache, and a swap-in at dst maps that folio at the source's anon_vma and index",
            fix="0ea148a79919 mm: userfaultfd: fix race of userfaultfd_move and swap cache (6.16)",
        ),
        Variant(
            "move-swap-no-folio-match-check", "the swap-cache folio is moved without checking it still backs the entry",
            {"move_swap_pte": move_swap_pte_no_folio_match_check}, applies_to=ALL_PROTOCOLS,
            kernel="move_swap_pte (6.15, before 0ea148a79919): `if (src_folio && unlikely(!folio_test_swapcache("
            "src_folio) || entry.val != src_folio->swap.val)) return -EAGAIN;` removed",
            failure="none in the model: while the mover holds its reference the folio leaves the swap cache only "
            "once no swap PTE names its slot, and a freed slot is not handed out again within a scenario, so a swap "
            "PTE that reads the same is backed by the folio found (docs/mutants.md)",
            equivalent=True,
        ),
        Variant(
            "move-large-folio-lock-sleeps", "a mover sleeps for a large folio's lock with its reference raised",
            {"move_folio_lock": move_folio_lock_sleeps_on_large}, applies_to=RECHECK_FAMILY,
            kernel="move_pages_pte: `if (!locked && folio_test_large(folio)) { spin_unlock(src_ptl); err = -EAGAIN; "
            "goto out; }` removed (the folio_get and folio_lock of a small folio then apply to a large one too)",
            failure="livelock: a mover's split of a large folio fails for the reference of another mover asleep on "
            "the folio's lock; where the failed split is retried (6.8 to 6.13) the two fail each other for ever, "
            "6.18 fails the move with EBUSY",
            fix="37b338eed105 userfaultfd: do not block on locking a large folio with raised refcount (6.14)",
        ),
        Variant(
            "split-under-rcu", "a mover splits a large folio inside the PTE mapping's RCU read section",
            {"move_split_large_folio": move_split_large_folio_under_rcu}, applies_to=RECHECK_FAMILY,
            kernel="move_pages_pte: `pte_unmap(&orig_src_pte); pte_unmap(&orig_dst_pte); src_pte = dst_pte = NULL;` "
            "before `split_folio(src_folio)` removed",
            failure="might-sleep: split_folio sleeps on the anon_vma rwsem inside an RCU read section",
            fix="the UFFDIO_MOVE series before its merge (6.8): the PTEs are unmapped before split_folio",
        ),
        Variant(
            "move-rmap-before-pin-check", "the mover changes the folio before the PTE clear and its pin check",
            {"move_present_ptes": move_present_ptes_rmap_before_pin_check}, applies_to=ALL_PROTOCOLS,
            kernel="move_present_pte (d7a08838ab74): `folio_move_anon_rmap(src_folio, dst_vma); "
            "src_folio->index = linear_page_index(dst_vma, dst_addr);` moved back above `ptep_clear_flush` and the "
            "`folio_maybe_dma_pinned` check that puts the PTE back",
            failure="invariant (the audit's rmap checks): a GUP-fast pin lands between the first pin check and the "
            "PTE clear; the move puts the PTE back and fails with EBUSY, the folio mapped at src with dst's anon_vma "
            "and index, where no rmap walk finds it",
            fix="d7a08838ab74 mm: userfaultfd: fix unexpected change to src_folio when UFFDIO_MOVE fails (6.8-rc)",
        ),
        Variant(
            "move-pmd-rmap-before-pin-check", "the PMD mover changes the THP before the PMD clear and its pin check",
            {"move_pages_huge_pmd": move_pages_huge_pmd_rmap_before_pin_check}, applies_to=ALL_PROTOCOLS,
            kernel="move_pages_huge_pmd (c0205eaf3af9): `folio_move_anon_rmap(src_folio, dst_vma); "
            "src_folio->index = linear_page_index(dst_vma, dst_addr);` moved back above `pmdp_huge_clear_flush` and "
            "the `folio_maybe_dma_pinned` check that puts the PMD back",
            failure="invariant (the audit's rmap checks): a GUP-fast pin of the THP lands between the first pin check "
            "and the PMD clear; the move puts the PMD back and fails with EBUSY, the THP mapped at src with dst's "
            "anon_vma and index (CVE-2024-27007)",
            fix="c0205eaf3af9 userfaultfd: change src_folio after ensuring it's unpinned in UFFDIO_MOVE (6.9-rc5, "
            "CVE-2024-27007)",
        ),
        Variant(
            "move-huge-zero-as-folio", "the whole-PMD move takes the huge zero page for an anonymous THP",
            {"move_pages_huge_pmd": move_pages_huge_pmd_huge_zero_as_folio}, applies_to=ALL_PROTOCOLS,
            kernel="move_pages_huge_pmd (6.8-rc1, before 5d4747a6cc8e): the huge zero PMD case removed: "
            "`if (unlikely(!PageAnonExclusive(src_page)))` asked of the huge zero page, then folio_get and folio_lock "
            "of it as of a THP",
            failure="anon-rmap-mismatch: PageAnonExclusive of the huge zero page, which is not anonymous (the "
            "kernel's VM_BUG_ON_PGFLAGS, syzbot's report); the move then fails with EBUSY where 6.18 moves the PMD",
            fix="5d4747a6cc8e userfaultfd: avoid huge_zero_page in UFFDIO_MOVE (6.8-rc1)",
        ),
        Variant(
            "move-huge-zero-pmd-from-null", "the moved huge zero PMD is built from the NULL src folio",
            {"move_pages_huge_pmd": move_pages_huge_pmd_zero_pmd_from_null}, applies_to=ALL_PROTOCOLS,
            kernel="move_pages_huge_pmd (6.16 to the 2026 fix): the huge zero PMD's dst entry "
            "`_dst_pmd = folio_mk_pmd(src_folio, dst_vma->vm_page_prot)` with src_folio NULL, where the fix builds it "
            "from the huge zero folio and marks it special (pmd_mkspecial); the fix's commit id is not recorded here",
            failure="invariant (the audit's rmap and ledger checks): dst maps the memory at folio_pfn(NULL) as a huge "
            "page, a folio with no anon_vma, mapcount or reference, holding someone else's data (memory corruption)",
            fix="mm/huge_memory: fix memory corruption on huge zero page move (Lorenzo Stoakes, 2026)",
        ),
        Variant(
            "folio-lock-walker-skips-lock", "under folio-lock, the walker does not take the folio lock",
            {"folio_referenced": folio_referenced}, applies_to=("folio-lock",),
            kernel="folio_referenced (~6.19, every walker locks the folio): `folio_lock(folio)` skipped",
            failure="wrong-root-walk: the walker walks without the folio lock, and the tree the folio left",
        ),
    )
}
