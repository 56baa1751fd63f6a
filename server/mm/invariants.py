"""The audit: every invariant of the model, checked at a quiescent point (no call in flight).

Checks invariants I1-I7 of the reference, plus: mapcount equals the PTEs mapping a folio,
exclusive implies mapcount 1, refcounts, num_children / num_active_vmas, every mapping
reachable through its folio's anon_vma tree, no lock held, data conservation against the
model's ledger, each mm's map_count against its VMAs, and the memory budget's usage against the
objects that exist. Swap: each slot's count against the swap PTEs naming it (an exclusive one
alone), the device's own bookkeeping (swapfile.swap_info_check), the swap cache's folios (a
reference for the cache besides their mappings), the swapped-out pages' contents against the
ledger, MM_SWAPENTS, and each live folio on exactly one LRU list.

``audit_steps`` is a generator that yields every RESCHED_WORK units of work, so that a running
server can let other tasks run; it needs no memory that grows with the model beyond counters per
anon_vma and per swap slot in use (folios carry their own scratch counters).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import count
from typing import TYPE_CHECKING

from .mm_types import (
    ANON_VMA_BYTES,
    AVC_BYTES,
    FOLIO_BYTES,
    GUP_PIN_COUNTING_BIAS,
    HPAGE_PMD_NR,
    HUGE_PMD_BYTES,
    HUGE_ZERO_FOLIO,
    MM_BYTES,
    PAGE_SHIFT,
    PGTABLE_BYTES,
    PIN_BYTES,
    PIN_PAGE_BYTES,
    PMD_SHIFT,
    PMD_SIZE,
    PTE_BYTES,
    VMA_BYTES,
    ZERO_PAGE,
    Folio,
    LargeFolio,
    Vma,
    is_migration_entry,
)
from .sched import RESCHED_WORK
from .swap import LRU_ACTIVE_ANON, LRU_INACTIVE_ANON
from .swapfile import SWAP_SLOT_BYTES, SwpEntry, swap_info_check, swp_swapcount

if TYPE_CHECKING:
    from .kernel import Kernel
    from .model import MemoryModel
    from .rmap import AnonVma

#: At most this many problems are listed; the rest are counted in one more line.
MAX_PROBLEMS = 1000

_generations = count(1)


def on_lru(k: Kernel, folio: Folio) -> bool:
    """The folio is on one of the LRU lists, the one its ``lru`` names."""
    return folio.lru in (LRU_INACTIVE_ANON, LRU_ACTIVE_ANON) and folio in k.lruvec.lists[folio.lru]


def _audit_reset(f: Folio, gen: int) -> None:
    """Start counting ``f``'s mappings for audit generation ``gen``."""
    f.audit_gen = gen
    f.audit_ptes = 0
    if isinstance(f, LargeFolio):
        f.audit_pages = [0] * f.nr_pages
        f.audit_pmds = 0
        f.audit_mms = {}


def _check_mapped(bad: Callable[[str], None], where: str, f: Folio, vma: Vma, addr: int, index: int, lpi: int) -> None:
    """A page of ``f`` (index ``index``) mapped at ``addr`` of ``vma``: its index and anon_vma."""
    if index != lpi:
        bad(f"{where}: folio {f.id} index {index:#x} != lpi {lpi:#x} at {addr:#x}")
    anon_vma = f.mapping
    if anon_vma is None:
        bad(f"{where}: mapped folio {f.id} has no anon_vma")
        return
    if anon_vma.freed:
        bad(f"{where}: folio {f.id} points at freed {anon_vma}")
        return
    if vma.anon_vma is None or anon_vma.root is not vma.anon_vma.root:
        bad(f"{where}: folio {f.id} root differs from its VMA's at {addr:#x}")  # I2
    if not any(avc.anon_vma is anon_vma for avc in vma.anon_vma_chain):
        bad(f"{where}: {vma} not in folio {f.id}'s anon_vma tree (unreachable by rmap)")


def _large_folio_problem(k: Kernel, f: LargeFolio) -> str | None:
    """What is wrong with a large folio's counts against the mappings the audit found."""
    if f.entire_mapcount != f.audit_pmds:
        return f"entire_mapcount {f.entire_mapcount} != {f.audit_pmds} huge PMDs"
    if f.pages_mapcount != f.audit_pages:
        bad_pages = [i for i in range(f.nr_pages) if f.pages_mapcount[i] != f.audit_pages[i]]
        return f"per-page mapcounts differ from the PTEs at pages {bad_pages[:8]}"
    if f.mm_mapcounts != f.audit_mms:
        return f"mappings per mm {f.mm_mapcounts} != {f.audit_mms}"
    shared = [i for i in range(f.nr_pages) if f.anon_exclusive[i] and f.page_mapcount(i) > 1]
    if shared:
        return f"anon-exclusive pages mapped more than once: {shared[:8]}"
    if f.deferred_split != (f in k.deferred_split_queue):
        return "deferred_split flag disagrees with the deferred split queue"
    return None


def _check_refs(bad: Callable[[str], None], f: Folio, mapcount: int, pins: int) -> None:
    """At a quiescent point a folio's references are its mappings', the swap cache's (one per
    page) and its pins' (GUP_PIN_COUNTING_BIAS each on a small folio), and its pin count is the
    pins'."""
    expected = mapcount + f.swapcache * f.nr_pages + (pins if f.large else pins * GUP_PIN_COUNTING_BIAS)
    if f.refcount != expected:
        bad(f"folio {f.id}: refcount {f.refcount} != mapcount {mapcount} + {int(f.swapcache)} (the swap "
            f"cache's) + {pins} pins at a quiescent point")
    if f.pincount != pins:
        bad(f"folio {f.id}: pin count {f.pincount} != {pins} pins held")


def _unchecked(p: str) -> None:
    """A ledger difference where the ledger is not compared (MemoryModel.check_ledger)."""


def audit_steps(model: MemoryModel, problems: list[str]) -> Iterator[None]:
    """Append every problem found to ``problems``, yielding every RESCHED_WORK units of work."""
    k = model.k
    found = 0

    def bad(p: str) -> None:
        nonlocal found
        found += 1
        if found <= MAX_PROBLEMS:
            problems.append(p)

    gen = next(_generations)
    live_avs = k.anon_vma_cache.live
    active: Counter[AnonVma] = Counter()
    tree_avcs = 0  # AVCs reached from the VMAs (each must be in its anon_vma's tree)
    vmas = 0
    charged = len(model.processes) * MM_BYTES + len(live_avs) * ANON_VMA_BYTES + k.folio_pages_live * FOLIO_BYTES
    si = k.swap
    if si.memcg is not None:
        charged += si.inuse_pages * SWAP_SLOT_BYTES
    # The FOLL_PIN pins of every process: the references each folio owes them.
    pinned: Counter[Folio] = Counter()
    for mm in model.processes.values():
        for pin in mm.pins.values():
            charged += PIN_BYTES + len(pin.pages) * PIN_PAGE_BYTES
            pinned.update(pin.pages)
    swap_refs: Counter[int] = Counter()  # slot offset -> swap PTEs naming it
    swap_exclusive: list[tuple[str, int]] = []
    work = 0

    # Pass 1: VMAs, chains, page tables; count the PTEs of each folio on the folio itself.
    for pid, mm in model.processes.items():
        where = f"pid {pid}"
        if mm.mmap_lock.is_locked():
            bad(f"{where}: mmap_lock held at a quiescent point")
        if mm.page_table_lock.is_locked():
            bad(f"{where}: page_table_lock held")
        prev_end = 0
        for key, v in mm.mm_mt.items():
            if key != v.start:
                bad(f"{where}: {v} filed under {key:#x} in the VMA tree")
            if v.start >= v.end or v.start & 0xFFF or v.end & 0xFFF:
                bad(f"{where}: malformed {v}")
            if v.start < prev_end:
                bad(f"{where}: {v} overlaps the VMA before it")
            prev_end = v.end
            if v.mm is not mm:
                bad(f"{where}: {v} belongs to another mm")
            charged += VMA_BYTES + len(v.anon_vma_chain) * AVC_BYTES
            vmas += 1
            if v.anon_vma is not None:
                active[v.anon_vma] += 1
                if not any(avc.anon_vma is v.anon_vma for avc in v.anon_vma_chain):
                    bad(f"{where}: {v} has no AVC for its own anon_vma")
            root = v.anon_vma_chain[0].anon_vma.root if v.anon_vma_chain else None
            for avc in v.anon_vma_chain:
                av = avc.anon_vma
                if av.root is not root:
                    bad(f"{where}: {v} is chained to more than one anon_vma tree")
                if avc.vma is not v:
                    bad(f"{where}: AVC of {v} points at another VMA")
                if av.freed or av not in live_avs:
                    bad(f"{where}: {v} chained to freed {av}")
                elif avc not in av.rb_root:
                    bad(f"{where}: AVC of {v} missing from {av}'s tree")
                else:
                    tree_avcs += 1
            work += 1 + len(v.anon_vma_chain)
            if work >= RESCHED_WORK:
                work = 0
                yield
        if mm.map_count != len(mm.mm_mt):
            bad(f"{where}: map_count {mm.map_count} != {len(mm.mm_mt)} VMAs")
        charged += len(mm.pgtables) * PGTABLE_BYTES + len(mm.huge_pmds) * HUGE_PMD_BYTES
        rss = 0
        matched = 0  # ledger entries found mapped
        swapped = 0
        ledger: Mapping[int, int] = model.ledger.get(pid) or {}
        ledger_bad = bad if model.check_ledger else _unchecked
        for idx, hp in mm.huge_pmds.items():
            haddr = idx << PMD_SHIFT
            if idx in mm.pgtables:
                bad(f"{where}: {haddr:#x} has both a huge PMD and a PTE table")
            if mm.pmd_lock(haddr).is_locked():
                bad(f"{where}: PMD lock of {haddr:#x} held")
            vma = mm.vma_lookup(haddr)
            if vma is None or vma.end < haddr + PMD_SIZE:
                bad(f"{where}: huge PMD at {haddr:#x} not inside one VMA")
                continue
            vpn0 = haddr >> PAGE_SHIFT
            f: Folio = hp.folio
            if f is HUGE_ZERO_FOLIO:
                if hp.write:
                    bad(f"{where}: writable huge zero PMD at {haddr:#x}")
                matched += sum(1 for i in range(HPAGE_PMD_NR) if ledger.get(vpn0 + i) == 0)
                continue
            rss += HPAGE_PMD_NR
            if f.audit_gen != gen:
                _audit_reset(f, gen)
            f.audit_ptes += 1
            if isinstance(f, LargeFolio):
                f.audit_pmds += 1
                f.audit_mms[mm.id] = f.audit_mms.get(mm.id, 0) + 1
            for i in range(HPAGE_PMD_NR):
                expected = ledger.get(vpn0 + i)
                if expected is not None:
                    matched += 1
                if (expected or 0) != f.page_value(i):
                    at = (vpn0 + i) << PAGE_SHIFT
                    ledger_bad(f"{where}: contents differ from the ledger: wrong value at {at:#x}")
                    break
            if f.freed:
                bad(f"{where}: huge PMD at {haddr:#x} maps freed folio {f.id}")
                continue
            if hp.write and not f.page_anon_exclusive(0):
                bad(f"{where}: writable huge PMD at {haddr:#x} maps a folio whose head is not anon-exclusive")  # I4
            _check_mapped(bad, where, f, vma, haddr, f.index, vma.linear_page_index(haddr))
        for idx, pt in mm.pgtables.items():
            if pt.ptl.is_locked():
                bad(f"{where}: PTL {idx:#x} held")
            charged += (len(pt.ptes) + len(pt.swap)) * PTE_BYTES
            for vpn, swp in pt.swap.items():
                addr = vpn << PAGE_SHIFT
                if vpn in pt.ptes:
                    bad(f"{where}: {addr:#x} has both a present and a swap PTE")
                if vpn >> (PMD_SHIFT - PAGE_SHIFT) != idx:
                    bad(f"{where}: swap PTE {addr:#x} in the wrong table")
                if mm.vma_lookup(addr) is None:
                    bad(f"{where}: swap PTE at {addr:#x} outside every VMA")
                entry = swp.entry
                if is_migration_entry(entry):  # a split runs to its end within one call
                    bad(f"{where}: migration entry for {entry.trace_name} left at {addr:#x}")
                    rss += 1  # MM_ANONPAGES counts it, MM_SWAPENTS does not
                    continue
                swapped += 1
                off = entry.offset
                swap_refs[off] += 1
                if swp.exclusive:
                    swap_exclusive.append((f"{where}: {addr:#x}", off))
                cached = si.swap_table.get(off)
                value = cached.value if cached is not None else si.swap_data.get(off)
                expected = ledger.get(vpn)
                if value is None:
                    bad(f"{where}: swap PTE at {addr:#x} names slot {off:#x}, which holds nothing")
                elif expected is None:
                    ledger_bad(f"{where}: contents differ from the ledger: unexpected swapped-out page at {addr:#x}")
                elif expected != value:
                    ledger_bad(f"{where}: contents differ from the ledger: wrong swapped-out value at {addr:#x}")
            for vpn, pte in pt.ptes.items():
                addr = vpn << PAGE_SHIFT
                if vpn >> (PMD_SHIFT - PAGE_SHIFT) != idx:
                    bad(f"{where}: PTE {addr:#x} in the wrong table")
                vma = mm.vma_lookup(addr)
                if vma is None:
                    bad(f"{where}: PTE at {addr:#x} outside every VMA")
                    continue
                f = pte.folio
                expected = ledger.get(vpn)
                if f is ZERO_PAGE:
                    if pte.write:
                        bad(f"{where}: writable zero-page PTE at {addr:#x}")
                    if expected == 0:  # written zeros, then mapped by the zero page (a folio split)
                        matched += 1
                    elif expected is not None:
                        ledger_bad(f"{where}: contents differ from the ledger: the zero page at {addr:#x}")
                    continue
                rss += 1
                if f.audit_gen != gen:
                    _audit_reset(f, gen)
                f.audit_ptes += 1
                i = pte.page
                if isinstance(f, LargeFolio):
                    f.audit_pages[i] += 1
                    f.audit_mms[mm.id] = f.audit_mms.get(mm.id, 0) + 1
                value = f.page_value(i)
                if expected is None:
                    if not f.large or value:  # a large folio's page nobody wrote reads 0
                        ledger_bad(f"{where}: contents differ from the ledger: unexpected page at {addr:#x}")
                else:
                    matched += 1
                    if expected != value:
                        ledger_bad(f"{where}: contents differ from the ledger: wrong value at {addr:#x}")
                if f.freed:
                    bad(f"{where}: PTE at {addr:#x} maps freed folio {f.id}")
                    continue
                if pte.write and not f.page_anon_exclusive(i):
                    bad(f"{where}: writable PTE at {addr:#x} maps non-exclusive folio {f.id}")  # I4
                _check_mapped(bad, where, f, vma, addr, f.index + i, vma.linear_page_index(addr))
            work += 1 + len(pt.ptes)
            if work >= RESCHED_WORK:
                work = 0
                yield
        if rss != mm.rss_anon:
            bad(f"{where}: RSS counter {mm.rss_anon} != {rss} mapped pages")
        if swapped != mm.swap_ents:
            bad(f"{where}: MM_SWAPENTS {mm.swap_ents} != {swapped} swap PTEs")
        if len(ledger) != matched + swapped:
            lost = [vpn for vpn in ledger if mm.pte_lookup(vpn << PAGE_SHIFT) is None
                    and mm.swap_pte_lookup(vpn << PAGE_SHIFT) is None][:4]
            ledger_bad(f"{where}: contents differ from the ledger: lost {[hex(v << PAGE_SHIFT) for v in lost]}")

    # Pass 2: each folio once, against the PTEs counted on it.
    folios = 0
    for mm in model.processes.values():
        tables: list[Iterable[Folio]] = [(hp.folio for hp in mm.huge_pmds.values())]
        tables.extend((pte.folio for pte in pt.ptes.values()) for pt in mm.pgtables.values())
        for mapped in tables:
            n = 0
            for f in mapped:
                n += 1
                if f.audit_gen != gen:
                    continue
                f.audit_gen = -gen  # seen
                folios += 1
                if f.mapcount != f.audit_ptes:
                    bad(f"folio {f.id}: mapcount {f.mapcount} != {f.audit_ptes} PTEs and PMDs")
                if isinstance(f, LargeFolio):
                    problem = _large_folio_problem(k, f)
                    if problem:
                        bad(f"folio {f.id}: {problem}")
                elif f.exclusive and f.mapcount != 1:
                    bad(f"folio {f.id}: exclusive with mapcount {f.mapcount}")
                _check_refs(bad, f, f.mapcount, pinned[f])
                if not on_lru(k, f):
                    bad(f"folio {f.id}: on no LRU list at a quiescent point")
                if f.lock is not None and f.lock.is_locked():
                    bad(f"folio {f.id}: locked at a quiescent point")
            work += 1 + n
            if work >= RESCHED_WORK:
                work = 0
                yield
    # The swap device and the swap cache: folios mapped nowhere are counted here.
    problems.extend(swap_info_check(si))
    for off, f in si.swap_table.items():
        if f.audit_gen != -gen:  # not reached through a PTE
            f.audit_gen = -gen
            folios += 1
            if f.mapcount:
                bad(f"folio {f.id} in the swap cache: mapcount {f.mapcount} but no PTE maps it")
            _check_refs(bad, f, 0, pinned[f])
            if f.exclusive:
                bad(f"folio {f.id} in the swap cache, unmapped, is PageAnonExclusive")
            if f.dirty and f.swap is not None and swp_swapcount(si, f.swap):
                bad(f"folio {f.id} in the swap cache, unmapped, is dirty: its slot {off:#x} was never written")
            if not on_lru(k, f):
                bad(f"folio {f.id}: on no LRU list at a quiescent point")
        work += 1
        if work >= RESCHED_WORK:
            work = 0
            yield
    for f in pinned:  # pinned, and neither mapped nor in the swap cache
        if f.audit_gen != -gen:
            f.audit_gen = -gen
            folios += 1
            if f.freed:
                bad(f"folio {f.id}: pinned but freed")
            if f.mapcount:
                bad(f"folio {f.id}: pinned, mapcount {f.mapcount} but no PTE maps it")
            _check_refs(bad, f, 0, pinned[f])
            if not on_lru(k, f):
                bad(f"folio {f.id}: on no LRU list at a quiescent point")
    for off, n in swap_refs.items():
        have = swp_swapcount(si, SwpEntry(si.type, off))
        if have != n:
            bad(f"swap slot {off:#x}: count {have} != {n} swap PTEs naming it")
        if off not in si.swap_table and off not in si.swap_data:
            bad(f"swap slot {off:#x}: named by {n} swap PTEs but holds nothing")
    for where_addr, off in swap_exclusive:
        if swap_refs[off] != 1:
            bad(f"{where_addr}: exclusive swap PTE, but {swap_refs[off]} swap PTEs name slot {off:#x}")
    in_use_counts = si.inuse_pages - sum(1 for off in si.swap_table if not swp_swapcount(si, SwpEntry(si.type, off)))
    if in_use_counts != len(swap_refs):
        bad(f"swap: {in_use_counts} slots hold a count but {len(swap_refs)} are named by swap PTEs (leak)")
    lru_total = len(k.lruvec)
    if lru_total != k.folios_live:
        bad(f"{lru_total} folios on the LRU lists but {k.folios_live} live")
    if k.folios_live != folios:
        bad(f"{k.folios_live} folios allocated but {folios} mapped, in the swap cache or pinned (leak)")

    # anon_vma trees
    children: Counter[AnonVma] = Counter()
    nonroot_refs: Counter[AnonVma] = Counter()
    tree_total = 0
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
        tree_total += len(av.rb_root)
        for avc in av.rb_root:
            v = avc.vma
            owner = model.processes.get(v.mm.id)
            if owner is not v.mm or v.mm.mm_mt.get(v.start) is not v:
                bad(f"{av}: tree holds an AVC of a VMA that is gone")
        work += 1 + len(av.rb_root)
        if work >= RESCHED_WORK:
            work = 0
            yield
    if tree_total != tree_avcs:
        bad(f"the anon_vma trees hold {tree_total} AVCs but the VMAs' chains {tree_avcs}")
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
    if k.vmas_live != vmas:
        bad(f"VMA count: {k.vmas_live} counted live but {vmas} in the VMA trees")
    if k.memcg.usage - k.memcg.inflight != charged:
        bad(f"memory budget: {k.memcg.usage - k.memcg.inflight} bytes charged to the model but the objects that "
            f"exist come to {charged}")
    if found > MAX_PROBLEMS:
        problems.append(f"... and {found - MAX_PROBLEMS} more problems")
