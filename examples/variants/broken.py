"""A plausible, broken, version of the ~6.19 change (folio_lock.py), which ``mmsim explore`` catches.

The reasoning it follows: "every walker holds the folio lock, so UFFDIO_MOVE may drop the anon_vma
lock"; but reclaim's walker (``try_lock`` mode) must not sleep, and reporting the folio as
contended every time a mover holds its lock loses its referenced bit, so on contention that
walker walks without the folio lock, trusting the mapping recheck under the anon_vma lock that
6.18's folio_lock_anon_vma_read does. The recheck only helps while the mover write-locks the old
root: this mover does not. The walker locks the old root, rechecks the mapping (unchanged: the
mover holds the folio lock and has not moved it yet), and walks; the mover, which the walker's
read lock no longer excludes, then points the folio at the destination's anon_vma under it.

    mmsim explore tests/litmus/fast-path-race.litmus --variant examples/variants/broken.py:BROKEN

catches it (docs/variants.md shows the trace).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mmsim.server.mm.locks import Current
from mmsim.server.mm.mm_types import Folio
from mmsim.server.mm.rmap import RmapWalkControl
from mmsim.server.mm.steps import Variant, load_variant

if TYPE_CHECKING:
    from mmsim.server.mm.kernel import Kernel

#: The correct change, whose mover (6.18's without the anon_vma lock) this one keeps.
FOLIO_LOCK = load_variant(f"{Path(__file__).with_name('folio_lock.py')}:FOLIO_LOCK")


async def folio_referenced(k: Kernel, cur: Current, folio: Folio, try_lock: bool) -> RmapWalkControl:
    """folio_referenced holding the folio lock, except that a ``try_lock`` walker that finds it
    taken walks without it (the bug: nothing keeps the mover out of that walk)."""
    rwc = RmapWalkControl(try_lock=try_lock)
    if not folio.mapcount or folio.mapping is None:
        return rwc
    rwc.mapcount = folio.mapcount
    lock = folio.lock
    assert lock is not None
    locked = lock.trylock(cur)
    if not locked and not try_lock:
        if not lock.lock(cur): await lock.wait(cur)
        locked = True
    try:
        # Unlocked, in try_lock mode: folio_lock_anon_vma_read's recheck is meant to cover it.
        await k.ops.rmap_walk_anon(k, cur, folio, rwc)
    finally:
        if locked:
            lock.unlock(cur)
    return rwc


BROKEN = Variant(
    "folio-lock-trylock-fallback",
    "walkers hold the folio lock but fall back to an unlocked walk on trylock contention; the mover "
    "takes no anon_vma lock",
    # folio_lock_anon_vma_read stays 6.18's, with both rechecks, for the unlocked walk.
    {"folio_referenced": folio_referenced, "move_pages_pte": FOLIO_LOCK.replaces["move_pages_pte"]},
    walkers_hold_folio_lock=False,  # not every walker holds it: the detectors judge by the roots
)
