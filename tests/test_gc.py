"""The model frees its objects by reference counting alone: churn through every operation leaves
nothing for CPython's cyclic collector. The server relies on it when it freezes what survives a
full collection (app.freeze_after_full_collections), so that no frozen object can leak."""

from __future__ import annotations

import gc
from collections import Counter

import pytest

from mmsim.server.mm import rcu
from mmsim.server.mm.model import MemoryModel

P = 4096


async def churn(m: MemoryModel, rounds: int) -> None:
    for _ in range(rounds):
        p = await m.create_process()
        v = await m.mmap(p, 64 * P)
        d = await m.mmap(p, 64 * P, uffd="missing")
        for i in range(64):
            await m.write(p, v.start + i * P, i)
        c = await m.fork(p)
        g = await m.fork(c)
        await m.write(c, v.start, 5)
        for i in range(16, 24):
            await m.write(p, v.start + i * P, i)  # exclusive again: movable
        await m.move(p, d.start, v.start + 16 * P, 8 * P)
        await m.walk(p, v.start + 32 * P)
        await m.walk(c, v.start + 33 * P, blocking=True)
        await m.munmap(p, v.start + 40 * P, 8 * P)
        await m.madvise(p, v.start, 8 * P, "dontfork")
        await m.uffd_register(p, v.start + 48 * P, 4 * P, "wp")
        with pytest.raises(OSError):
            await m.move(p, d.start, v.start + 16 * P, P)  # EEXIST: an error path too
        for x in (g, c, p):
            await m.exit(x)


async def test_model_churn_leaves_no_cyclic_garbage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rcu, "CACHE_FREE_MAX", 2)  # anon_vmas are let go of, not only cached
    m = MemoryModel()
    await churn(m, 2)  # warm up: first-use allocations (caches, ids) are not garbage
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        await churn(m, 20)
        assert m.k.stats["anon_vma_free"] > 20 * 3
        assert m.check_invariants() == []
        gc.collect()
        leaked = Counter(type(o).__name__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    model_types = {"Mm", "Vma", "Folio", "Pte", "PageTable", "AnonVma", "AnonVmaChain", "RwSem", "Mutex", "SpinLock",
                   "UserfaultfdCtx", "SortedDict", "PageLedger", "Current"}
    assert not {t: n for t, n in leaked.items() if t in model_types}, leaked.most_common(10)


def test_an_anon_vma_let_go_of_is_poisoned_not_left_in_a_cycle() -> None:
    cache = rcu.TypesafeCache(rcu.Rcu(), lambda: __import__("mmsim.server.mm.rmap", fromlist=["x"]).AnonVma(
        __import__("mmsim.server.mm.locks", fromlist=["x"]).LockdepState()))
    objs = [cache.alloc() for _ in range(rcu.CACHE_FREE_MAX + 1)]
    for o in objs:
        cache.release(o)
    first = objs[0]
    assert first not in cache.free and first.root is cache.poison and first.parent is cache.poison
    assert cache.poison.freed and all(o.root is o for o in objs[1:])
