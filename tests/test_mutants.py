"""Protocol mutants (kernel.MUTANTS): each one is killed by a scripted interleaving, and the same
script under the unmutated protocol reports nothing.

Every killing script is parametrized over ``None`` (the kernel as the protocol has it: no
violation, a clean audit) and the mutant (the named detector fires, or lockdep's deadlock check).
The mutants no scenario can tell from the kernel get an equivalence witness instead: the
script where they would matter, with the same verdict under both (docs/mutants.md argues it).
Interleavings are scripted with ``Scheduler.pause_at`` breakpoints (``Stops`` for the explorer's
points that it does not list) and event-loop turns only.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mmsim.server.mm.detectors import FINDING_KINDS, KINDS
from mmsim.server.mm.kernel import MUTANTS, PROTOCOLS, Deadlock, Kernel
from mmsim.server.mm.locks import Current
from mmsim.server.mm.memory import folio_put
from mmsim.server.mm.mm_types import HUGE_ZERO_FOLIO, PAGE_SIZE, PMD_SHIFT, MmError
from mmsim.server.mm.model import MemoryModel
from mmsim.server.mm.rmap import RmapWalkControl, folio_referenced
from mmsim.server.mm.sched import POINTS
from mmsim.server.mm.steps import STEPS, default_step
from mmsim.server.mm.variants import STRAY_PAGE_VALUE

T = TypeVar("T")
P = PAGE_SIZE
SRC = 0x1000_0000
DST = 0x2000_0000
FAR = 0x3000_0000
NPAGES = 4
DOCS = Path(__file__).resolve().parent.parent / "docs" / "mutants.md"
MUTATION = pytest.mark.violations_expected


def killed(mutant: str) -> list[Any]:
    """The parameters of a killing script: the kernel, then the mutant (whose violations are expected)."""
    return [None, pytest.param(mutant, marks=MUTATION)]


async def run_until(cond: Callable[[], Any], turns: int = 200) -> None:
    """Give the tasks event-loop turns until ``cond`` holds."""
    for _ in range(turns):
        if cond():
            return
        await asyncio.sleep(0)
    assert cond()


async def done(aw: Awaitable[T]) -> T:
    """Await a task that must finish now (a hang is a failure, not a stuck test)."""
    return await asyncio.wait_for(aw, 5)


async def env(
    protocol: str, mutant: str | None, register_src: bool = False, dst_pages: tuple[int, ...] = ()
) -> tuple[MemoryModel, int]:
    """One process: src (page 0 written) and dst (registered MISSING) in different PMDs and
    anon_vma trees; ``register_src`` registers src too (a move back), ``dst_pages`` are written
    before dst is registered."""
    m = MemoryModel(protocol=protocol, mutant=mutant)
    pid = await m.create_process()
    await m.mmap(pid, NPAGES * P, addr=SRC)
    await m.mmap(pid, NPAGES * P, addr=DST)
    await m.write(pid, SRC, 0x5000)
    for i in dst_pages:
        await m.write(pid, DST + i * P, 0xD000 + i)
    await m.uffd_register(pid, DST, NPAGES * P, "missing")
    if register_src:
        await m.uffd_register(pid, SRC, NPAGES * P, "missing")
    return m, pid


def folio_at(m: MemoryModel, pid: int, addr: int) -> Any:
    pte = m.processes[pid].pte_lookup(addr)
    assert pte is not None
    return pte.folio


def anon_vma_at(m: MemoryModel, pid: int, addr: int) -> Any:
    vma = m.processes[pid].vma_lookup(addr)
    assert vma is not None and vma.anon_vma is not None
    return vma.anon_vma


async def walk_folio(m: MemoryModel, folio: Any) -> RmapWalkControl:
    """folio_referenced (trylock mode) on a folio itself, as reclaim finds it on the LRU: while a
    move is half-way the folio may be mapped at no address yet."""
    folio.refcount += 1
    try:
        return await folio_referenced(m.k, Current("walk"), folio, try_lock=True)
    finally:
        folio_put(m.k, folio)


def verdict(m: MemoryModel, mutant: str | None, expected: set[str]) -> None:
    """The kernel: no violation and a clean audit. The mutant: at least ``expected`` fired."""
    fired = set(m.detectors.counts)
    if mutant is None:
        assert not fired, m.detectors.events
        assert m.check_invariants() == []
    else:
        assert expected <= fired, (mutant, dict(m.detectors.counts), m.detectors.events[:4])


# ---------------------------------------------------------------------------------------------
# The table


def test_table() -> None:
    for name, mut in MUTANTS.items():
        assert mut.name == name and mut.kernel and mut.failure and mut.protocols and mut.mutant
        assert set(mut.protocols) <= set(PROTOCOLS) and mut.replaces
        for protocol in mut.protocols:
            k = Kernel(protocol, mutant=name)
            assert k.protocol is PROTOCOLS[protocol] and k.mutant is mut
            clean = Kernel(protocol)
            for step, fn in mut.replaces.items():
                assert getattr(k.ops, step) is fn  # the mutant's step runs ...
                assert getattr(clean.ops, step) is not fn  # ... where the protocol runs another one
    kernel = Kernel("recheck").ops
    for step in STEPS:
        assert getattr(kernel, step) is default_step(step)  # the kernel's own code, no variant
    assert MemoryModel().k.mutant is None and Kernel("folio-lock", mutant="mover-no-folio-lock").mutant is not None


def test_unknown_or_inapplicable_mutant() -> None:
    with pytest.raises(ValueError) as e:
        Kernel("recheck", mutant="no-such-mutant")
    assert all(name in str(e.value) for name in MUTANTS)
    with pytest.raises(ValueError, match="applies to"):
        MemoryModel(protocol="no-recheck", mutant="no-recheck-fast")
    with pytest.raises(ValueError, match="applies to"):
        MemoryModel(protocol="recheck", mutant="folio-lock-walker-skips-lock")


#: The script that kills each non-equivalent mutant, and the witness of each equivalent one.
SCRIPTS = {
    "no-recheck-fast": "test_no_recheck_fast",
    "no-recheck-slow": "test_no_recheck_slow",
    "mover-no-root-lock": "test_mover_no_root_lock",
    "mover-no-folio-lock": "test_mover_no_folio_lock",
    "walker-no-anon-vma-get": "test_walker_no_anon_vma_get",
    "walker-root-read-outside-rcu": "test_walker_root_read_outside_rcu",
    "fork-no-root-lock": "test_fork_no_root_lock",
    "free-no-root-handshake": "test_free_no_root_handshake_is_equivalent",
    "move-index-before-mapping": "test_move_index_before_mapping_is_equivalent",
    "ptl-no-address-order": "test_ptl_no_address_order",
    "folio-lock-walker-skips-lock": "test_folio_lock_walker_skips_lock",
    "move-swap-keeps-mapping": "test_move_swap_keeps_mapping",
    "move-swap-no-has-cache-check": "test_move_swap_no_has_cache_check",
    "move-swap-no-folio-match-check": "test_move_swap_no_folio_match_check_is_equivalent",
    "move-huge-zero-as-folio": "test_move_huge_zero_as_folio",
    "move-huge-zero-pmd-from-null": "test_move_huge_zero_pmd_from_null",
    "move-large-folio-lock-sleeps": "test_move_large_folio_lock_sleeps",
    "split-under-rcu": "test_split_under_rcu",
    "move-rmap-before-pin-check": "test_move_rmap_before_pin_check",
    "move-pmd-rmap-before-pin-check": "test_move_pmd_rmap_before_pin_check",
}


def test_every_mutant_has_its_script_and_its_documentation() -> None:
    assert set(SCRIPTS) == set(MUTANTS)
    for name, script in SCRIPTS.items():
        assert callable(globals()[script])
        assert script.endswith("_is_equivalent") == MUTANTS[name].equivalent
    doc = DOCS.read_text()
    for name in MUTANTS:
        assert f"`{name}`" in doc, name
        assert SCRIPTS[name] in doc, name
    for kind in (*KINDS, *FINDING_KINDS):
        assert kind in doc, kind
    for point in POINTS:
        assert point in doc, point


# ---------------------------------------------------------------------------------------------
# The seed's two races: the recheck mutants


async def fast_path_race(protocol: str, mutant: str | None) -> tuple[MemoryModel, int, Any]:
    """W reads F's mapping (AVs) and stops before its root; M moves F to dst meanwhile (if it can:
    under folio-lock it waits for the folio lock W holds); then W goes on."""
    m, pid = await env(protocol, mutant)
    bp = m.k.sched.pause_at("walk:after-mapping-read")
    walker = asyncio.create_task(m.walk(pid, SRC))
    await bp.wait_reached()
    f = folio_at(m, pid, SRC)
    mover = asyncio.create_task(m.move(pid, DST, SRC, P))
    await run_until(lambda: mover.done() or bool(f.lock.waiters))
    bp.release()
    w = await done(walker)
    assert await done(mover) == P
    return m, pid, w


@pytest.mark.parametrize("mutant", killed("no-recheck-fast"))
async def test_no_recheck_fast(mutant: str | None) -> None:
    m, pid, w = await fast_path_race("recheck", mutant)
    if mutant is None:
        assert w.fast_retries == 1 and w.mappings == ((pid, DST),)
    else:
        assert w.fast_retries == 0 and w.mappings == ()
    verdict(m, mutant, {"wrong-root-walk"})


@pytest.mark.parametrize("mutant", killed("folio-lock-walker-skips-lock"))
async def test_folio_lock_walker_skips_lock(mutant: str | None) -> None:
    m, pid, w = await fast_path_race("folio-lock", mutant)
    # With the folio lock the mover waited and the walker found F at src; without, F left under it.
    assert w.mappings == (((pid, SRC),) if mutant is None else ())
    verdict(m, mutant, {"wrong-root-walk"})
    if mutant is not None:
        assert any(e.detail.get("why") == "folio not locked" for e in m.detectors.events)


@pytest.mark.parametrize("mutant", killed("no-recheck-slow"))
async def test_no_recheck_slow(mutant: str | None) -> None:
    """M holds RS for write; a blocking W pins AVs and sleeps on RS; M moves F and lets go; W wakes."""
    m, pid = await env("recheck", mutant)
    rs = anon_vma_at(m, pid, SRC).root.rwsem
    bp_move = m.k.sched.pause_at("move:anon-vma-locked")
    mover = asyncio.create_task(m.move(pid, DST, SRC, P))
    await bp_move.wait_reached()
    walker = asyncio.create_task(m.walk(pid, SRC, blocking=True))
    await run_until(lambda: any(not wt.write for wt in rs.waiters or ()))
    bp_move.release()
    assert await done(mover) == P
    w = await done(walker)
    assert w.slow_retries == (1 if mutant is None else 0)
    assert w.mappings == (((pid, DST),) if mutant is None else ())
    verdict(m, mutant, {"wrong-root-walk"})


# ---------------------------------------------------------------------------------------------
# The mover's locks


async def walker_holds_old_root_while_moving(protocol: str, mutant: str | None) -> tuple[MemoryModel, int, Any]:
    """W has locked F's root (and, under folio-lock, F) and read F's index; M tries to move F:
    the kernel's mover waits for W, the mutant's moves F under W's walk."""
    m, pid = await env(protocol, mutant)
    f = folio_at(m, pid, SRC)
    rs = anon_vma_at(m, pid, SRC).root.rwsem
    bp = m.k.sched.pause_at("walk:after-index-read")
    walker = asyncio.create_task(m.walk(pid, SRC))
    await bp.wait_reached()
    mover = asyncio.create_task(m.move(pid, DST, SRC, P))
    await run_until(lambda: mover.done() or bool(rs.waiters) or bool(f.lock.waiters))
    assert mover.done() == (mutant is not None)
    bp.release()
    w = await done(walker)
    assert await done(mover) == P
    return m, pid, w


@pytest.mark.parametrize("mutant", killed("mover-no-root-lock"))
async def test_mover_no_root_lock(mutant: str | None) -> None:
    m, pid, w = await walker_holds_old_root_while_moving("recheck", mutant)
    assert w.mappings == (((pid, SRC),) if mutant is None else ())
    verdict(m, mutant, {"wrong-root-walk", "mapping-changed-during-walk"})


@pytest.mark.parametrize("mutant", killed("mover-no-folio-lock"))
async def test_mover_no_folio_lock(mutant: str | None) -> None:
    m, pid, w = await walker_holds_old_root_while_moving("folio-lock", mutant)
    assert w.mappings == (((pid, SRC),) if mutant is None else ())
    verdict(m, mutant, {"wrong-root-walk", "mapping-changed-during-walk"})


@pytest.mark.parametrize("mutant", killed("ptl-no-address-order"))
async def test_ptl_no_address_order(mutant: str | None) -> None:
    """M1 moves src page 0 to dst, M2 dst page 1 to src: the two PTLs, in opposite roles. M2 stops
    with its folio and anon_vma locked (its PTEs read, under the PTLs, before); M1 stops between
    its first PTL and its second; M2 goes on into its PTLs and spins. In address order both take
    the same PTL first, so M2 spins on it and M1 finishes; in argument order each holds the PTL
    the other spins on."""
    m, pid = await env("recheck", mutant, register_src=True, dst_pages=(1,))
    k = m.k
    bp2 = k.sched.pause_at("move:anon-vma-locked")
    m2 = asyncio.create_task(m.move(pid, SRC + P, DST + P, P))
    await bp2.wait_reached()
    bp = k.sched.pause_at("move:between-ptls")
    m1 = asyncio.create_task(m.move(pid, DST, SRC, P))
    await bp.wait_reached()
    bp2.release()
    await run_until(lambda: len(k.spinning) == 1)
    bp.release()
    if mutant is None:
        assert await done(m1) == P
    else:
        with pytest.raises(Deadlock):
            await done(m1)
    assert await done(m2) == P
    assert not k.spinning
    verdict(m, mutant, {"deadlock"})
    if mutant is not None:
        assert m.check_invariants() == []  # the deadlock was broken cleanly: M1 undid its step


# ---------------------------------------------------------------------------------------------
# Swap: the 6.14 swap-cache fix


@pytest.mark.parametrize("mutant", killed("move-swap-keeps-mapping"))
async def test_move_swap_keeps_mapping(mutant: str | None) -> None:
    """F is paged out (a swap PTE at src, F clean in the swap cache); M moves the swap PTE to dst;
    a read at dst swaps F in from the swap cache. With the fix F moved to dst's anon_vma and index
    with its entry; without it the swap-in maps F where its anon_vma and index do not lead."""
    m, pid = await env("recheck", mutant)
    await m.madvise(pid, SRC, P, "pageout")
    swp = m.processes[pid].swap_pte_lookup(SRC)
    assert swp is not None
    f = m.k.swap.swap_table[swp.slot.offset]
    assert await done(m.move(pid, DST, SRC, P)) == P
    dst = m.processes[pid].vma_lookup(DST)
    assert dst is not None
    assert f.swapcache and (f.index == dst.linear_page_index(DST)) == (mutant is None)
    assert await done(m.read(pid, DST)) == 0x5000
    assert folio_at(m, pid, DST) is f and f.mapcount == 1
    verdict(m, mutant, {"anon-rmap-mismatch"})


# ---------------------------------------------------------------------------------------------
# Swap: the 6.16 swap-cache races (0ea148a79919)


async def swap_env(mutant: str | None) -> tuple[MemoryModel, int]:
    """One process: dst (two pages, its page table made first, so that its PTL is taken first;
    page 1 written; registered MISSING), and src's page paged out and its folio reclaimed: a
    swap PTE at src, nothing in the swap cache."""
    m = MemoryModel(protocol="recheck", mutant=mutant)
    pid = await m.create_process()
    await m.mmap(pid, 2 * P, addr=DST)
    await m.write(pid, DST + P, 0xD001)
    await m.uffd_register(pid, DST, 2 * P, "missing")
    await m.mmap(pid, NPAGES * P, addr=SRC)
    await m.write(pid, SRC, 0x5000)
    await m.madvise(pid, SRC, P, "pageout")
    assert await m.reclaim(1) == 1 and not m.k.swap.swap_table
    return m, pid


@pytest.mark.parametrize("mutant", killed("move-swap-no-has-cache-check"))
async def test_move_swap_no_has_cache_check(mutant: str | None) -> None:
    """M looks in the swap cache for src's entry (nothing) and stops between its PTLs (dst's
    taken); src's page is read in (a new folio G, in the swap cache for the same entry and mapped
    at src with src's anon_vma and index), written and paged out again: G keeps its slot and stays
    in the swap cache, and src's new swap PTE reads as the old one. The kernel (6.16) sees
    SWAP_HAS_CACHE under the PTLs and starts over, and G moves with the PTE; the mutant (6.15)
    moves the PTE alone, and a read at dst swaps G in where its anon_vma and index do not lead."""
    m, pid = await swap_env(mutant)
    mm = m.processes[pid]
    old = mm.swap_pte_lookup(SRC)
    assert old is not None
    bp = m.k.sched.pause_at("move:between-ptls")
    mover = asyncio.create_task(m.move(pid, DST, SRC, P))
    await bp.wait_reached()
    assert await m.read(pid, SRC) == 0x5000
    g = folio_at(m, pid, SRC)
    await m.write(pid, SRC, 0x5001)
    await m.madvise(pid, SRC, P, "pageout")
    new = mm.swap_pte_lookup(SRC)
    assert new is not None and new is not old and new.entry == old.entry and new.exclusive and g.swapcache
    bp.release()
    assert await done(mover) == P
    assert m.k.stats["move_retry"] == (1 if mutant is None else 0)
    assert (g.index == mm.vma_lookup(DST).linear_page_index(DST)) == (mutant is None)  # type: ignore[union-attr]
    assert await done(m.read(pid, DST)) == 0x5001 and folio_at(m, pid, DST) is g
    verdict(m, mutant, {"anon-rmap-mismatch"})
    if mutant is not None:
        assert any("index" in p for p in m.check_invariants())  # mapped where no rmap walk finds it


@pytest.mark.parametrize("mutant", [None, "move-swap-no-folio-match-check"])
async def test_move_swap_no_folio_match_check_is_equivalent(mutant: str | None) -> None:
    """Where the folio check would matter: M finds F in the swap cache for src's entry (a
    reference taken) and sleeps on F's lock, which reclaim holds (stopped at
    ``reclaim:folio-locked``) to free F from the swap cache. Reclaim cannot: M's reference is one
    more than the cache's and its own (__remove_mapping). So when M has F locked, F still backs
    the entry (the other ways out of the swap cache need the slot's count at zero, which src's
    swap PTE holds up), with or without the check: F moves with the PTE either way."""
    m, pid = await env("recheck", mutant)
    await m.madvise(pid, SRC, P, "pageout")
    swp = m.processes[pid].swap_pte_lookup(SRC)
    assert swp is not None
    f = m.k.swap.swap_table[swp.slot.offset]
    lock = f.lock
    assert lock is not None
    bp = m.k.sched.pause_at("reclaim:folio-locked")
    reclaim = asyncio.create_task(m.reclaim(1))
    await bp.wait_reached()
    assert lock.owner is not None
    mover = asyncio.create_task(m.move(pid, DST, SRC, P))
    await run_until(lambda: bool(lock.waiters))
    bp.release()
    assert await done(reclaim) == 0  # F is referenced by the mover: kept
    assert await done(mover) == P
    dst = m.processes[pid].vma_lookup(DST)
    assert dst is not None and f.swapcache and f.swap == swp.entry and f.index == dst.linear_page_index(DST)
    assert await done(m.read(pid, DST)) == 0x5000 and folio_at(m, pid, DST) is f
    assert not m.detectors.counts and m.check_invariants() == []


# ---------------------------------------------------------------------------------------------
# Large folios: the 6.14 livelock, and the split under RCU

THP = 0x4000_0000  # 2 MiB-aligned
HPAGE = 512


def _reached_or(bp: Any, ended: Callable[[], bool]) -> Callable[[], bool]:
    """The condition: a task parked at ``bp``, or every mover ended."""
    return lambda: bp.reached.is_set() or ended()


async def thp_env(mutant: str | None) -> tuple[MemoryModel, int]:
    """One process: a THP at THP (pages 0 and 1 written), its PMD split by a DONTNEED of its last
    page (a large folio mapped by PTEs), and dst (registered MISSING)."""
    m = MemoryModel(protocol="recheck", mutant=mutant)
    pid = await m.create_process()
    await m.mmap(pid, HPAGE * P, addr=THP)
    await m.madvise(pid, THP, HPAGE * P, "hugepage")
    await m.write(pid, THP, 0x5000)
    await m.write(pid, THP + P, 0x5001)
    await m.madvise(pid, THP + (HPAGE - 1) * P, P, "dontneed")
    info = m.folio(pid, THP)
    assert info is not None and info.order == 9 and not info.pmd
    await m.mmap(pid, NPAGES * P, addr=DST)
    await m.uffd_register(pid, DST, NPAGES * P, "missing")
    return m, pid


@pytest.mark.parametrize("mutant", killed("move-large-folio-lock-sleeps"))
async def test_move_large_folio_lock_sleeps(mutant: str | None) -> None:
    """M1 and M2 move two pages of one large folio; whoever holds its lock (to split it) stops at
    ``move:after-folio-lock`` until the other has backed off or sleeps on the lock, round after
    round. The kernel (6.14+): the other backs off (EAGAIN, no reference kept), so the first split
    succeeds and both moves complete. The mutant: the other sleeps on the lock with its reference
    raised, so the split fails for that reference (where the split was retried, the roles swapped
    every round and no split ever succeeded): the livelock detector reports it, and as 6.18 does
    the mover whose split failed gives up with EBUSY (the other then completes)."""
    m, pid = await thp_env(mutant)
    f = folio_at(m, pid, THP)
    movers = [asyncio.create_task(m.move(pid, DST, THP, P)), asyncio.create_task(m.move(pid, DST + P, THP + P, P))]

    def ended() -> bool:
        return all(t.done() for t in movers)

    for _ in range(64):  # rounds
        bp = m.k.sched.pause_at("move:after-folio-lock")
        await run_until(_reached_or(bp, ended), turns=2000)
        if not bp.reached.is_set():
            break
        retries = m.k.stats["move_retry"]

        def other_waits_or_backs_off(retries: int = retries) -> bool:
            return bool(f.lock.waiters) or m.k.stats["move_retry"] > retries or any(t.done() for t in movers)

        await run_until(other_waits_or_backs_off, turns=2000)
        holder = f.lock.owner

        def holder_went_on(holder: Current | None = holder) -> bool:
            return f.lock.owner is not holder or ended()

        bp.release()
        await run_until(holder_went_on, turns=2000)
    bp.release()
    results = await done(asyncio.gather(*movers, return_exceptions=True))
    if mutant is None:
        assert results == [P, P]
        assert await m.read(pid, DST) == 0x5000 and await m.read(pid, DST + P) == 0x5001
    else:
        # the mover whose split failed for the sleeper's reference gives up (6.18: EBUSY)
        assert sum(isinstance(r, MmError) and r.errno == errno.EBUSY for r in results) == 1 and P in results, results
        assert m.check_invariants() == []  # the failed mover gave back its lock and reference
    verdict(m, mutant, {"livelock"})


@pytest.mark.parametrize("mutant", killed("split-under-rcu"))
async def test_split_under_rcu(mutant: str | None) -> None:
    """M moves one page out of a large folio: move_pages_pte splits the folio first. The kernel
    lets the PTEs (and their RCU read section) go before split_folio, which sleeps on the
    anon_vma rwsem; the mutant splits inside the section."""
    m, pid = await thp_env(mutant)
    assert await done(m.move(pid, DST, THP, P)) == P
    info = m.folio(pid, THP + P)
    assert info is not None and info.order == 0 and info.value == 0x5001
    verdict(m, mutant, {"might-sleep"})


# ---------------------------------------------------------------------------------------------
# Pins: CVE-2024-27007, the folio changed before the mover's second pin check


class Stop:
    """One armed stop of :class:`Stops`: ``reached`` once a task parks there, ``release()`` lets it on."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self._go = asyncio.Event()

    def release(self) -> None:
        self._go.set()

    async def wait_reached(self) -> None:
        await self.reached.wait()


class Stops:
    """Breakpoints at any point, through the explorer's hook (``Kernel.attach_controller``): for
    the points ``Scheduler.pause_at`` does not list, GUP-fast's and the mover's after its PTE or
    PMD clear (taken only while a task is inside GUP-fast). A task parks at an armed point until
    released; elsewhere (other points, a lock granted, a spinner) it yields one turn and goes on."""

    def __init__(self, m: MemoryModel) -> None:
        self.armed: dict[str, list[Stop]] = {}
        m.k.attach_controller(self)

    def pause_at(self, point: str) -> Stop:
        stop = Stop()
        self.armed.setdefault(point, []).append(stop)
        return stop

    def wants(self, point: str) -> bool:
        return bool(self.armed.get(point))

    async def park(self, point: str) -> None:
        stops = self.armed.get(point)
        if not stops:
            await asyncio.sleep(0)
            return
        stop = stops.pop(0)
        stop.reached.set()
        await stop._go.wait()

    def blocked(self, key: object) -> None:
        pass

    def woken(self, key: object) -> None:
        pass

    def park_sync(self, point: str) -> bool:
        return False  # it stops tasks at the named points only


async def pin_races_move(m: MemoryModel, pid: int, pin_at: int, move: Awaitable[int], cleared: str) -> tuple[int, int]:
    """G pins the page at ``pin_at`` (GUP-fast) and stops after reading its entry; M (``move``)
    checks the folio for pins (none yet), clears the entry and stops at ``cleared``; G takes its
    pin and stops before reading the entry again; M checks again, finds the pin, puts the entry
    back and fails with EBUSY; G finds the entry as it read it and keeps its pin. Returns G's pin."""
    stops = Stops(m)
    read = stops.pause_at("gup:pte-read")
    pinner = asyncio.create_task(m.pin(pid, pin_at, P))
    await read.wait_reached()
    at_clear = stops.pause_at(cleared)
    mover = asyncio.ensure_future(move)
    await at_clear.wait_reached()
    grabbed = stops.pause_at("gup:grabbed")
    read.release()
    await grabbed.wait_reached()
    at_clear.release()
    with pytest.raises(MmError) as e:
        await done(mover)
    assert e.value.errno == errno.EBUSY
    grabbed.release()
    return await done(pinner)


def rmap_verdict(m: MemoryModel, mutant: str | None, f: Any, vma: Any, addr: int) -> None:
    """The kernel: the folio still points where it is mapped. The mutant: it points at dst's
    anon_vma and index, and the audit's rmap checks say where it is mapped no walk leads."""
    assert (f.mapping is vma.anon_vma and f.index == vma.linear_page_index(addr)) == (mutant is None)
    if mutant is not None:
        problems = m.check_invariants()
        assert any("index" in p for p in problems) and any("anon_vma tree" in p for p in problems), problems
    verdict(m, mutant, {"invariant"})


@pytest.mark.parametrize("mutant", killed("move-rmap-before-pin-check"))
async def test_move_rmap_before_pin_check(mutant: str | None) -> None:
    """The PTE half (d7a08838ab74): G pins F at src while M moves it to dst (``pin_races_move``).
    The kernel changes nothing of F before the second check; the mutant had already pointed F at
    dst's anon_vma and index, and the failed move leaves it so, mapped at src."""
    m, pid = await env("recheck", mutant)
    f = folio_at(m, pid, SRC)
    _, pages = await pin_races_move(m, pid, SRC, m.move(pid, DST, SRC, P), "move:pte-cleared")
    assert pages == 1 and folio_at(m, pid, SRC) is f and f.pincount == 1
    assert m.processes[pid].pte_lookup(DST) is None
    rmap_verdict(m, mutant, f, m.processes[pid].vma_lookup(SRC), SRC)


THP_DST = 0x5000_0000  # 2 MiB-aligned


@pytest.mark.parametrize("mutant", killed("move-pmd-rmap-before-pin-check"))
async def test_move_pmd_rmap_before_pin_check(mutant: str | None) -> None:
    """The THP half (c0205eaf3af9, CVE-2024-27007): a PMD-mapped THP at THP, a registered dst at
    THP_DST; G pins its first page while M moves the whole PMD (``pin_races_move``, the mover
    stopping at ``move:pmd-cleared``). The kernel changes nothing of the THP before the second
    check; the mutant (6.8) had already pointed it at dst's anon_vma and index."""
    m = MemoryModel(protocol="recheck", mutant=mutant)
    pid = await m.create_process()
    await m.mmap(pid, HPAGE * P, addr=THP)
    await m.madvise(pid, THP, HPAGE * P, "hugepage")
    await m.write(pid, THP, 0x5000)
    await m.mmap(pid, HPAGE * P, addr=THP_DST)
    await m.uffd_register(pid, THP_DST, HPAGE * P, "missing")
    mm = m.processes[pid]
    hp = mm.huge_pmds[THP >> PMD_SHIFT]
    f = hp.folio
    _, pages = await pin_races_move(m, pid, THP, m.move(pid, THP_DST, THP, HPAGE * P), "move:pmd-cleared")
    assert pages == 1 and mm.huge_pmds.get(THP >> PMD_SHIFT) is hp and f.pincount == 1
    assert (THP_DST >> PMD_SHIFT) not in mm.huge_pmds
    rmap_verdict(m, mutant, f, mm.vma_lookup(THP), THP)


# ---------------------------------------------------------------------------------------------
# The huge zero page: 5d4747a6cc8e (6.8-rc1) and the 2026 fix


async def huge_zero_move(mutant: str | None) -> tuple[MemoryModel, int, int | MmError]:
    """A read of a hugepage range at THP maps the huge zero page by a huge PMD; M moves that PMD
    whole to THP_DST (registered MISSING) while a reader sleeps on the userfault there. Returns
    the move's result (or its error) once the reader has read (the move woke it) or still sleeps."""
    m = MemoryModel(protocol="recheck", mutant=mutant)
    pid = await m.create_process()
    await m.mmap(pid, HPAGE * P, addr=THP)
    await m.madvise(pid, THP, HPAGE * P, "hugepage")
    assert await m.read(pid, THP) == 0
    mm = m.processes[pid]
    assert mm.huge_pmds[THP >> PMD_SHIFT].folio is HUGE_ZERO_FOLIO
    await m.mmap(pid, HPAGE * P, addr=THP_DST, uffd="missing")
    reader = asyncio.create_task(m.read(pid, THP_DST))
    await run_until(lambda: mm.uffd is not None and bool(mm.uffd.faults))
    try:
        moved: int | MmError = await done(m.move(pid, THP_DST, THP, HPAGE * P))
    except MmError as e:
        moved = e
    if isinstance(moved, MmError):
        reader.cancel()  # nothing filled dst: the fault sleeps until its handler gives up
        with pytest.raises(asyncio.CancelledError):
            await reader
    else:
        await done(reader)
    return m, pid, moved


@pytest.mark.parametrize("mutant", killed("move-huge-zero-as-folio"))
async def test_move_huge_zero_as_folio(mutant: str | None) -> None:
    """The kernel (6.9+) moves the huge zero PMD with no folio and no lock; the mutant (6.8-rc1
    before 5d4747a6cc8e) asks PageAnonExclusive of the huge zero page, which is not anonymous
    (syzbot's VM_BUG_ON), and the move fails with EBUSY."""
    m, pid, moved = await huge_zero_move(mutant)
    mm = m.processes[pid]
    if mutant is None:
        assert moved == HPAGE * P and mm.huge_pmds[THP_DST >> PMD_SHIFT].folio is HUGE_ZERO_FOLIO
        assert (THP >> PMD_SHIFT) not in mm.huge_pmds and await m.read(pid, THP_DST + P) == 0
    else:
        assert isinstance(moved, MmError) and moved.errno == errno.EBUSY
        assert mm.huge_pmds[THP >> PMD_SHIFT].folio is HUGE_ZERO_FOLIO
    assert HUGE_ZERO_FOLIO.mapping is None and HUGE_ZERO_FOLIO.refcount == 0
    verdict(m, mutant, {"anon-rmap-mismatch"})
    if mutant is not None:
        assert m.check_invariants() == []  # nothing else changed: the report is the only trace


@pytest.mark.parametrize("mutant", killed("move-huge-zero-pmd-from-null"))
async def test_move_huge_zero_pmd_from_null(mutant: str | None) -> None:
    """The kernel (with the 2026 fix) maps the huge zero page at dst, a special PMD: the reader
    reads zeros. The mutant (6.16 on) builds dst's PMD from the NULL src folio: dst maps memory
    the model does not own, someone else's data, with no anon_vma, mapcount or reference: the
    audit's ledger and rmap checks."""
    m, pid, moved = await huge_zero_move(mutant)
    assert moved == HPAGE * P
    hp = m.processes[pid].huge_pmds[THP_DST >> PMD_SHIFT]
    assert (hp.folio is HUGE_ZERO_FOLIO) == (mutant is None) and not hp.write
    assert await m.read(pid, THP_DST + P) == (0 if mutant is None else STRAY_PAGE_VALUE)
    verdict(m, mutant, {"invariant"} if mutant is None else set())
    if mutant is not None:
        problems = m.check_invariants()
        assert any("contents differ from the ledger" in p for p in problems), problems
        assert any("has no anon_vma" in p for p in problems) and any("mapcount" in p for p in problems), problems


# ---------------------------------------------------------------------------------------------
# The rmap sanity check at every folio_add_anon_rmap site


@pytest.mark.parametrize("broken", [False, pytest.param(True, marks=MUTATION)])
@pytest.mark.parametrize("site", ["swap-in", "fork-pte", "fork-pmd", "split-pmd", "split-folio"])
async def test_anon_rmap_check_at_every_site(site: str, broken: bool) -> None:
    """Each place the model adds a mapping of a folio already in the anon rmap checks, as
    __page_check_anon_rmap does, that the folio's anon_vma root is the VMA's and its index the
    VMA's linear page index there: the swap-in of a cached folio, fork's copy of a PTE and of a
    huge PMD, the split of a huge PMD into PTEs and the remap of a split folio's pages. Each is
    run on a folio whose index (or VMA's anon_vma) was made wrong just before (``broken``),
    and on one left alone."""
    m = MemoryModel(protocol="recheck")
    pid = await m.create_process()
    mm = m.processes[pid]
    if site in ("swap-in", "fork-pte"):
        await m.mmap(pid, NPAGES * P, addr=SRC)
        await m.write(pid, SRC, 0x5000)
        f = folio_at(m, pid, SRC)
        if site == "swap-in":
            await m.madvise(pid, SRC, P, "pageout")
            f.index += broken
            assert await m.read(pid, SRC) == 0x5000
        else:
            f.index += broken
            await m.fork(pid)
        at = SRC
    else:
        await m.mmap(pid, HPAGE * P, addr=THP)
        await m.madvise(pid, THP, HPAGE * P, "hugepage")
        await m.write(pid, THP, 0x5000)
        await m.write(pid, THP + P, 0x5001)
        f = mm.huge_pmds[THP >> PMD_SHIFT].folio
        if site == "fork-pmd":
            f.index += broken
            await m.fork(pid)
            at = THP
        elif site == "split-pmd":
            f.index += broken
            await m.madvise(pid, THP + (HPAGE - 1) * P, P, "dontneed")
            at = THP
        else:  # split-folio: moving one page of a large folio mapped by PTEs splits it first
            await m.madvise(pid, THP + (HPAGE - 1) * P, P, "dontneed")
            await m.mmap(pid, NPAGES * P, addr=DST, uffd="missing")
            vma = mm.vma_lookup(THP)
            assert vma is not None and vma.anon_vma is not None
            own = vma.anon_vma
            if broken:
                other = await m.create_process()
                await m.mmap(other, P, addr=SRC)
                await m.write(other, SRC, 1)
                vma.anon_vma = anon_vma_at(m, other, SRC)  # another tree: another root
            assert await m.move(pid, DST, THP + 2 * P, P) == P
            vma.anon_vma = own
            at = THP  # page 0, remapped to a folio of its own
    events = [e for e in m.detectors.events if e.kind == "anon-rmap-mismatch"]
    if not broken:
        assert not m.detectors.counts and m.check_invariants() == []
    else:
        assert events and set(m.detectors.counts) == {"anon-rmap-mismatch"}, m.detectors.events
        assert at in {e.detail["addr"] for e in events}, events


@pytest.mark.parametrize("mutant", killed("walker-no-anon-vma-get"))
async def test_walker_no_anon_vma_get(mutant: str | None) -> None:
    """M holds RS for write; a blocking W fails its trylock and stops before sleeping on RS; M moves
    F; src is unmapped, which drops AVs's last reference but W's pin; W goes on to lock AVs's root."""
    m, pid = await env("recheck", mutant)
    avs = anon_vma_at(m, pid, SRC)
    bp_move = m.k.sched.pause_at("move:anon-vma-locked")
    mover = asyncio.create_task(m.move(pid, DST, SRC, P))
    await bp_move.wait_reached()
    bp_walk = m.k.sched.pause_at("walk:slow-before-lock")
    walker = asyncio.create_task(m.walk(pid, SRC, blocking=True))
    await bp_walk.wait_reached()
    bp_move.release()
    assert await done(mover) == P
    await m.munmap(pid, SRC, NPAGES * P)
    assert avs.freed == (mutant is not None)  # the kernel's pin keeps it
    bp_walk.release()
    w = await done(walker)
    assert w.mappings == ((pid, DST),) and w.slow_retries == 1
    assert avs.freed  # the kernel's walker dropped the last reference
    verdict(m, mutant, {"use-after-free"})


@pytest.mark.parametrize("mutant", killed("walker-root-read-outside-rcu"))
async def test_walker_root_read_outside_rcu(mutant: str | None) -> None:
    """W reads F's mapping (AVs) and stops before reading its root; M moves F and src is unmapped,
    freeing AVs; W reads AVs->root: inside RCU that is legal (type-stable), outside it is not."""
    m, pid = await env("recheck", mutant)
    avs = anon_vma_at(m, pid, SRC)
    bp = m.k.sched.pause_at("walk:after-mapping-read")
    walker = asyncio.create_task(m.walk(pid, SRC))
    await bp.wait_reached()
    assert await done(m.move(pid, DST, SRC, P)) == P
    await m.munmap(pid, SRC, NPAGES * P)
    assert avs.freed
    bp.release()
    w = await done(walker)
    assert w.mappings == ((pid, DST),) and w.fast_retries == 1
    verdict(m, mutant, {"use-after-free"})


# ---------------------------------------------------------------------------------------------
# fork


@pytest.mark.parametrize("mutant", killed("fork-no-root-lock"))
async def test_fork_no_root_lock(mutant: str | None) -> None:
    """W holds src's root and read F's index; the process forks: the kernel's anon_vma_clone waits
    for the root, the mutant's links the child's VMA into the tree W walks."""
    m, pid = await env("recheck", mutant)
    rs = anon_vma_at(m, pid, SRC).root.rwsem
    bp = m.k.sched.pause_at("walk:after-index-read")
    walker = asyncio.create_task(m.walk(pid, SRC))
    await bp.wait_reached()
    fork = asyncio.create_task(m.fork(pid))
    await run_until(lambda: fork.done() or any(wt.write for wt in rs.waiters or ()))
    assert fork.done() == (mutant is not None)
    bp.release()
    await done(walker)
    child = await done(fork)
    assert m.folio(child, SRC) is not None
    verdict(m, mutant, {"tree-changed-during-walk"})


# ---------------------------------------------------------------------------------------------
# The equivalent mutants: the script where each would matter, the same verdict either way


@pytest.mark.parametrize("mutant", [None, "free-no-root-handshake"])
async def test_free_no_root_handshake_is_equivalent(mutant: str | None) -> None:
    """W has read F's mapping AVs and its root; src is unmapped and AVs's last reference goes,
    its free stopping before the handshake; W trylocks AVs's root and stops before its recheck;
    the free goes on (the kernel's waits for W's read lock, the mutant's frees at once); W finds
    F unmapped and unlocks through the root it read. Neither walks a freed tree."""
    m, pid = await env("recheck", mutant)
    k = m.k
    avs = anon_vma_at(m, pid, SRC)
    rs = avs.root.rwsem
    bp_walk = k.sched.pause_at("walk:after-root-read")
    walker = asyncio.create_task(m.walk(pid, SRC))
    await bp_walk.wait_reached()
    bp_free = k.sched.pause_at("free:before-anon-vma-free")
    unmap = asyncio.create_task(m.munmap(pid, SRC, NPAGES * P))
    await bp_free.wait_reached()
    assert avs.refcount == 0 and not avs.freed
    bp_trylocked = k.sched.pause_at("walk:after-trylock")
    bp_walk.release()
    await bp_trylocked.wait_reached()
    assert rs.readers == 1
    bp_free.release()
    await run_until(lambda: unmap.done() or bool(rs.waiters))
    assert unmap.done() == (mutant is not None)  # the handshake waits for the walker
    bp_trylocked.release()
    w = await done(walker)
    await done(unmap)
    assert avs.freed and w.mappings == () and w.referenced == 0
    assert not m.detectors.counts and m.check_invariants() == []


@pytest.mark.parametrize("mutant", [None, "move-index-before-mapping"])
async def test_move_index_before_mapping_is_equivalent(mutant: str | None) -> None:
    """M stops between its two stores (PTLs, the folio lock and the old root held) while W walks F.
    The kernel stored the new mapping first: W locks the new root, which M does not hold, reads
    the stale index (the residual window: a finding, not a violation) and finds nothing. The
    mutant stored the index first: W reads the old mapping and finds its root write-locked."""
    m, pid = await env("recheck", mutant)
    k = m.k
    f = folio_at(m, pid, SRC)
    bp = k.sched.pause_at("move:after-mapping-store")
    mover = asyncio.create_task(m.move(pid, DST, SRC, P))
    await bp.wait_reached()
    assert f.id in k.torn
    rwc = await done(walk_folio(m, f))
    bp.release()
    assert await done(mover) == P
    assert not k.torn
    if mutant is None:
        assert rwc.mappings == [] and not rwc.contended
        assert dict(m.detectors.findings) == {"residual-index-window": 1}
        assert m.stats()["finding_residual-index-window"] == 1  # exported beside the violations
    else:
        assert rwc.contended
        assert not m.detectors.findings
    assert not m.detectors.counts and m.check_invariants() == []
    w = await m.walk(pid, DST)  # quiescent: exact
    assert w.mappings == ((pid, DST),)


# ---------------------------------------------------------------------------------------------
# The finer points themselves


async def test_ptl_held_across_a_point_makes_others_spin() -> None:
    """A mover stopped between its two stores holds src's and dst's PTLs: a walk of another folio
    in dst's table and a fault in src's spin until it goes on (another CPU holds the spinlock)."""
    m, pid = await env("recheck", None, dst_pages=(2,))
    bp = m.k.sched.pause_at("move:after-mapping-store")
    mover = asyncio.create_task(m.move(pid, DST, SRC, P))
    await bp.wait_reached()
    walker = asyncio.create_task(m.walk(pid, DST + 2 * P))  # dst's root: the mover holds only src's
    writer = asyncio.create_task(m.write(pid, SRC + 2 * P, 0x5002))
    await run_until(lambda: len(m.k.spinning) == 2)
    assert not walker.done() and not writer.done()
    bp.release()
    assert await done(mover) == P
    assert (await done(walker)).mappings == ((pid, DST + 2 * P),)
    await done(writer)
    assert not m.k.spinning and not m.detectors.counts and m.check_invariants() == []


async def test_cancelled_inside_a_spinlocked_section_finishes_the_step() -> None:
    """A move cancelled while stopped between its two stores completes the page (PTLs held: it
    cannot stop half-way) and takes the cancellation after."""
    m, pid = await env("recheck", None)
    bp = m.k.sched.pause_at("move:after-mapping-store")
    mover = asyncio.create_task(m.move(pid, DST, SRC, P))
    await bp.wait_reached()
    mover.cancel()
    with pytest.raises(asyncio.CancelledError):
        await done(mover)
    assert m.folio(pid, DST) is not None and m.folio(pid, DST).value == 0x5000  # type: ignore[union-attr]
    assert not m.k.torn and not m.detectors.counts and m.check_invariants() == []


@pytest.mark.violations_expected
async def test_typesafe_reuse_defeats_the_pointer_recheck() -> None:
    """A finding about the modelled protocol (recheck, 6.8-6.18): the walker reads F's anon_vma A
    and A's root R, and is preempted before its trylock. Meanwhile F moves away, A is freed and
    reused (SLAB_TYPESAFE_BY_RCU) as a root for another VMA, and F moves into that VMA: F's mapping
    is A again. The walker trylocks R, its pointer recheck passes, and it walks A's tree holding R,
    not A's root; anon_vma_unlock_read then releases A's rwsem, which it never took."""
    m = MemoryModel()
    parent = await m.create_process()
    await m.mmap(parent, NPAGES * P, addr=SRC)
    await m.write(parent, SRC, 1)
    child = await m.fork(parent)
    await m.write(child, SRC, 2)  # COW: F, in the child's own anon_vma A, whose root R is the parent's
    a = anon_vma_at(m, child, SRC)
    assert a.root is not a
    await m.mmap(child, NPAGES * P, addr=DST, uffd="missing")
    await m.mmap(child, NPAGES * P, addr=FAR, uffd="missing")
    bp = m.k.sched.pause_at("walk:after-root-read")
    walker = asyncio.create_task(m.walk(child, SRC))
    await bp.wait_reached()
    assert await m.move(child, DST, SRC, P) == P
    await m.munmap(child, SRC, NPAGES * P)
    assert a.freed
    assert await m.move(child, FAR, DST, P) == P  # FAR's anon_vma_prepare reuses A, as a root
    assert anon_vma_at(m, child, FAR) is a and a.root is a
    bp.release()
    w = await done(walker)
    assert w.fast_retries == 0  # the recheck compared pointers: A is A
    counts = m.detectors.counts
    assert counts["wrong-root-walk"] >= 1 and counts["unlock-mismatch"] == 1
    assert m.check_invariants() == []  # the model released the lock it did take
