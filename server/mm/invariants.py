"""check_invariants: a full audit of the model at a quiescent point (no call in flight).

Checks invariants I1-I7 of the reference, plus: mapcount equals the PTEs mapping a folio,
exclusive implies mapcount 1, refcounts, num_children / num_active_vmas, every mapping
reachable through its folio's anon_vma tree, no lock held, and data conservation against the
model's ledger.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import TYPE_CHECKING

from .mm_types import PAGE_SHIFT, PMD_SHIFT, ZERO_PAGE, Folio

if TYPE_CHECKING:
    from .model import MemoryModel
    from .rmap import AnonVma


def check_invariants(model: MemoryModel) -> list[str]:
    k = model.k
    problems: list[str] = []
    bad = problems.append
    live_avs: set[AnonVma] = set(k.anon_vma_cache.live)
    ptes_of: Counter[Folio] = Counter()
    folios: set[Folio] = set()
    active: Counter[AnonVma] = Counter()
    tree_vmas: dict[AnonVma, set[int]] = defaultdict(set)

    for pid, mm in model.processes.items():
        where = f"pid {pid}"
        if mm.mmap_lock.is_locked():
            bad(f"{where}: mmap_lock held at a quiescent point")
        if mm.page_table_lock.is_locked():
            bad(f"{where}: page_table_lock held")
        # VMAs: sorted, disjoint, aligned
        prev_end = 0
        for v in mm.vmas:
            if v.start >= v.end or v.start & 0xFFF or v.end & 0xFFF:
                bad(f"{where}: malformed {v}")
            if v.start < prev_end:
                bad(f"{where}: {v} overlaps the VMA before it")
            prev_end = v.end
            if v.mm is not mm:
                bad(f"{where}: {v} belongs to another mm")
        if [v.start for v in mm.vmas] != mm._starts:
            bad(f"{where}: VMA index out of sync")
        for v in mm.vmas:
            if v.anon_vma is not None:
                active[v.anon_vma] += 1
                if v.anon_vma not in {avc.anon_vma for avc in v.anon_vma_chain}:
                    bad(f"{where}: {v} has no AVC for its own anon_vma")
            roots = {avc.anon_vma.root for avc in v.anon_vma_chain}
            if len(roots) > 1:
                bad(f"{where}: {v} is chained to {len(roots)} anon_vma trees")
            for avc in v.anon_vma_chain:
                av = avc.anon_vma
                if avc.vma is not v:
                    bad(f"{where}: AVC of {v} points at another VMA")
                if av.freed or av not in live_avs:
                    bad(f"{where}: {v} chained to freed {av}")
                elif avc not in av.rb_root:
                    bad(f"{where}: AVC of {v} missing from {av}'s tree")
                tree_vmas[av].add(id(v))
        # Page tables and PTEs
        rss = 0
        for idx, pt in mm.pgtables.items():
            if pt.ptl.is_locked():
                bad(f"{where}: PTL {idx:#x} held")
            for vpn, pte in pt.ptes.items():
                addr = vpn << PAGE_SHIFT
                if vpn >> (PMD_SHIFT - PAGE_SHIFT) != idx:
                    bad(f"{where}: PTE {addr:#x} in the wrong table")
                vma = mm.vma_lookup(addr)
                if vma is None:
                    bad(f"{where}: PTE at {addr:#x} outside every VMA")
                    continue
                f = pte.folio
                if f is ZERO_PAGE:
                    if pte.write:
                        bad(f"{where}: writable zero-page PTE at {addr:#x}")
                    continue
                rss += 1
                ptes_of[f] += 1
                folios.add(f)
                if f.freed:
                    bad(f"{where}: PTE at {addr:#x} maps freed folio {f.id}")
                    continue
                if pte.write and not f.exclusive:
                    bad(f"{where}: writable PTE at {addr:#x} maps non-exclusive folio {f.id}")  # I4
                if f.index != vma.linear_page_index(addr):
                    bad(f"{where}: folio {f.id} index {f.index:#x} != lpi {vma.linear_page_index(addr):#x} at {addr:#x}")
                av = f.mapping
                if av is None:
                    bad(f"{where}: mapped folio {f.id} has no anon_vma")
                    continue
                if av.freed:
                    bad(f"{where}: folio {f.id} points at freed {av}")
                    continue
                if vma.anon_vma is None or av.root is not vma.anon_vma.root:
                    bad(f"{where}: folio {f.id} root differs from its VMA's at {addr:#x}")  # I2
                if not any(avc.anon_vma is av for avc in vma.anon_vma_chain):
                    bad(f"{where}: {vma} not in folio {f.id}'s anon_vma tree (unreachable by rmap)")
        if rss != mm.rss_anon:
            bad(f"{where}: RSS counter {mm.rss_anon} != {rss} mapped folios")
        # Data conservation
        actual = {
            vpn: pte.folio.value for pt in mm.pgtables.values() for vpn, pte in pt.ptes.items() if pte.folio is not ZERO_PAGE
        }
        expected = model.ledger.get(pid, {})
        if actual != expected:
            lost = sorted(set(expected) - set(actual))[:4]
            extra = sorted(set(actual) - set(expected))[:4]
            wrong = sorted(v for v in set(actual) & set(expected) if actual[v] != expected[v])[:4]
            bad(
                f"{where}: contents differ from the ledger: lost {[hex(v << PAGE_SHIFT) for v in lost]}, "
                f"unexpected {[hex(v << PAGE_SHIFT) for v in extra]}, wrong {[hex(v << PAGE_SHIFT) for v in wrong]}"
            )

    for f in folios:
        if f.mapcount != ptes_of[f]:
            bad(f"folio {f.id}: mapcount {f.mapcount} != {ptes_of[f]} PTEs")
        if f.exclusive and f.mapcount != 1:
            bad(f"folio {f.id}: exclusive with mapcount {f.mapcount}")
        if f.refcount != f.mapcount:
            bad(f"folio {f.id}: refcount {f.refcount} != mapcount {f.mapcount} at a quiescent point")
        if f.lock is not None and f.lock.is_locked():
            bad(f"folio {f.id}: locked at a quiescent point")
    if k.folios_live != len(folios):
        bad(f"{k.folios_live} folios allocated but {len(folios)} mapped (leak)")

    # anon_vma trees
    children: Counter[AnonVma] = Counter()
    nonroot_refs: Counter[AnonVma] = Counter()
    for av in live_avs:
        if av.freed:
            bad(f"{av} is in the live set but freed")
        if av.root.root is not av.root:
            bad(f"{av}: root {av.root} is not its own root")  # I5
        if av.root.freed or av.root not in live_avs:
            bad(f"{av}: root is freed")
        if av.parent.root is not av.root:
            bad(f"{av}: parent in another tree")
        if av.rb_root:
            children[av.parent] += 1
        if av.root is not av:
            nonroot_refs[av.root] += 1
        if av.rwsem.is_locked():
            bad(f"{av}: rwsem held at a quiescent point")
        for avc in av.rb_root:
            if id(avc.vma) not in tree_vmas[av]:
                bad(f"{av}: tree holds an AVC of a VMA that is gone")
    for av in live_avs:
        own = 1 if av.rb_root else 0
        if av.refcount != own + nonroot_refs[av]:
            bad(f"{av}: refcount {av.refcount} != {own} + {nonroot_refs[av]} children referencing it")  # I6
        if av.num_children != children[av]:
            bad(f"{av}: num_children {av.num_children} != {children[av]}")  # I7
        if av.num_active_vmas != active[av]:
            bad(f"{av}: num_active_vmas {av.num_active_vmas} != {active[av]}")
        if av.refcount == 0:
            bad(f"{av}: live with refcount 0")
    if k.rcu.readers:
        bad(f"{len(k.rcu.readers)} tasks still inside RCU read sections")
    return problems
