"""Every RPC through the SDK against a real server on a loopback port, with the errno mapping."""

import asyncio
import errno
import random
import socket
from collections.abc import Awaitable, Callable

import pytest

from mmsim.client import (
    Client,
    DeadlineExceededError,
    InvalidRequestError,
    LimitExceededError,
    ProcessNotFoundError,
    ShardRestartedError,
    ops,
)
from mmsim.client.testing import serve_in_process

P = 4096
SRC, DST = 0x100000000, 0x200000000


@pytest.fixture
async def mm():
    async with serve_in_process(log_level="warning") as addr:
        async with Client(addr) as client:
            yield client


async def test_every_rpc(mm: Client) -> None:
    await mm.ping()
    p = await mm.create_process()
    assert isinstance(p.id, str) and p.id
    src = await p.mmap(4 * P, prot="rw", addr=SRC)
    assert (src.start, src.end, src.prot, src.uffd) == (SRC, SRC + 4 * P, "rw", None)
    dst = await p.mmap(4 * P, prot="rw", addr=DST, uffd="missing")
    assert dst.uffd == "missing"
    placed = await p.mmap(2 * P, prot="r")  # top-down placement
    assert placed.prot == "r" and placed.end - placed.start == 2 * P
    await p.write(SRC, 42)
    assert await p.read(SRC) == 42
    assert await p.read(placed.start) == 0  # zero page
    f = await p.folio(SRC)
    assert f is not None and (f.value, f.mapcount, f.exclusive, f.zero_page) == (42, 1, True, False)
    assert await p.folio(SRC + P) is None
    assert (await p.folio(placed.start)).zero_page  # type: ignore[union-attr]
    assert await p.remap(DST, SRC, P) == P
    moved = await p.folio(DST)
    assert moved is not None and moved.value == 42 and moved.index == DST >> 12
    w = await p.walk(DST)
    assert (w.referenced, w.contended, w.mappings) == (1, False, [(p.pid, DST)])
    assert (await p.walk(DST, blocking=True)).referenced == 0
    tree = await p.anon_vma_tree(DST)
    assert len(tree) == 1 and tree[0].id == moved.anon_vma and tree[0].vmas == [(p.pid, DST)]
    await p.write(SRC + P, 7)
    assert await p.remap(DST + P, SRC, 2 * P, allow_src_holes=True, dontwake=True) == 2 * P
    await p.madvise(SRC, 4 * P, "dontfork")
    assert [v.dontfork for v in await p.vmas() if v.start == SRC] == [True]
    await p.madvise(SRC, 4 * P, "dofork")
    await p.madvise(DST, 4 * P, "wipeonfork")
    await p.madvise(DST, 4 * P, "keeponfork")
    await p.uffd_unregister(DST, 4 * P)
    await p.uffd_register(DST, 4 * P, mode="wp")
    assert [v.uffd for v in await p.vmas() if v.start == DST] == ["wp"]
    child = await p.fork()
    assert child.id != p.id
    assert await child.read(DST) == 42
    w = await p.walk(DST)
    assert sorted(w.mappings) == sorted([(p.pid, DST), (child.pid, DST)])
    assert [v.uffd for v in await child.vmas() if v.start == DST] == [None]  # dropped at fork
    await p.munmap(placed.start, 2 * P)
    assert all(v.start != placed.start for v in await p.vmas())
    await child.exit()
    with pytest.raises(ProcessNotFoundError):
        await child.read(DST)
    assert await mm.check_invariants() == []
    stats = await mm.stats()
    assert stats["processes"] == 1 and stats["violations"] == 0 and stats["fork"] == 1
    results = await mm.batch([ops.write(p, SRC, 9), ops.read(p, SRC), ops.remap(p, DST, SRC, P), ops.folio(p, SRC)])
    assert results[1] == 9 and isinstance(results[2], FileExistsError) and results[3] is not None
    async with mm.batch_stream() as s:
        for i in range(3):
            r = await s.run([ops.write(p, SRC, 100 + i), ops.read(p, SRC)])
            assert r[1] == 100 + i
    await p.exit()
    assert await mm.check_invariants() == []


async def _two(mm: Client):
    p = await mm.create_process()
    await p.mmap(4 * P, addr=SRC)
    await p.mmap(4 * P, addr=DST, uffd="missing")
    return p


@pytest.mark.parametrize(
    "name, exc_type, err",
    [
        ("populated dst", FileExistsError, errno.EEXIST),
        ("src hole", FileNotFoundError, errno.ENOENT),
        ("no vma", FileNotFoundError, errno.ENOENT),
        ("misaligned", OSError, errno.EINVAL),
        ("unregistered dst", OSError, errno.EINVAL),
        ("shared page", OSError, errno.EBUSY),
        ("write to read-only", OSError, errno.EFAULT),
        ("fixed overlap", FileExistsError, errno.EEXIST),
        ("below mmap_min_addr", PermissionError, errno.EPERM),
        ("madvise hole", OSError, errno.ENOMEM),
        ("copy onto a present page", FileExistsError, errno.EEXIST),
        ("copy into an unregistered range", FileNotFoundError, errno.ENOENT),
        ("mremap grow without maymove", OSError, errno.ENOMEM),
        ("mprotect misaligned", OSError, errno.EINVAL),
    ],
)
async def test_errno_mapping(mm: Client, name: str, exc_type: type, err: int) -> None:
    p = await _two(mm)
    await p.write(SRC, 1)
    calls: dict[str, Callable[[], Awaitable[object]] | None] = {
        "populated dst": lambda: p.remap(DST, SRC, P),
        "src hole": lambda: p.remap(DST, SRC + P, P),
        "no vma": lambda: p.remap(DST, 0x300000000, P),
        "misaligned": lambda: p.remap(DST, SRC + 1, P),
        "unregistered dst": lambda: p.remap(SRC + P, SRC, P),
        "write to read-only": None,
        "fixed overlap": lambda: p.mmap(P, addr=SRC),
        "below mmap_min_addr": lambda: p.mmap(P, addr=0x1000),
        "madvise hole": lambda: p.madvise(0x300000000, P, "dontfork"),
        "copy onto a present page": lambda: p.uffd_copy(DST, P, 5),
        "copy into an unregistered range": lambda: p.uffd_copy(SRC + P, P, 5),
        "mremap grow without maymove": lambda: p.mremap(SRC, 4 * P, 64 * P),
        "mprotect misaligned": lambda: p.mprotect(SRC + 1, P, "r"),
        "shared page": None,
    }
    if name == "copy onto a present page":
        assert await p.uffd_copy(DST, P, 4) == P
    if name == "mremap grow without maymove":
        await p.mmap(P, addr=SRC + 4 * P)  # a neighbour in the way
    if name == "populated dst":
        assert await p.remap(DST, SRC, P) == P
        await p.write(SRC, 2)
        call = calls[name]
    elif name == "shared page":
        await p.fork()
        call = lambda: p.remap(DST, SRC, P)  # noqa: E731
    elif name == "write to read-only":
        ro = await p.mmap(P, prot="r")
        call = lambda: p.write(ro.start, 1)  # noqa: E731
    else:
        call = calls[name]
    assert call is not None
    with pytest.raises(OSError) as e:
        await call()
    assert isinstance(e.value, exc_type) and e.value.errno == err
    assert e.value.moved == 0  # type: ignore[attr-defined]  # the SDK's errors carry what was done
    assert await mm.check_invariants() == []


async def test_partial_progress_carries_moved(mm: Client) -> None:
    p = await _two(mm)
    for i in range(4):
        if i != 2:
            await p.write(SRC + i * P, i)
    with pytest.raises(BlockingIOError) as e:  # EAGAIN: a short move
        await p.remap(DST, SRC, 4 * P)
    assert e.value.errno == errno.EAGAIN and e.value.moved == 2 * P  # type: ignore[attr-defined]  # the SDK's errors carry what was done
    with pytest.raises(FileNotFoundError):  # retrying from the hole shows the real error
        await p.remap(DST + 2 * P, SRC + 2 * P, 2 * P)
    assert await p.remap(DST + 3 * P, SRC + 3 * P, P) == P
    res = await mm.batch([ops.remap(p, DST, SRC, P), ops.remap(p, DST + 2 * P, SRC + 2 * P, P)])
    # dst is checked before src: a populated dst wins over a src hole
    assert isinstance(res[0], FileExistsError) and res[0].errno == errno.EEXIST
    assert isinstance(res[1], FileNotFoundError) and res[1].moved == 0  # type: ignore[attr-defined]  # the SDK's errors carry what was done


async def test_malformed_and_limits() -> None:
    async with serve_in_process(log_level="warning", max_processes=2, max_remap_bytes=8 * P) as addr:
        async with Client(addr) as mm:
            p = await mm.create_process()
            with pytest.raises(LimitExceededError) as le:
                await p.remap(DST, SRC, 16 * P)
            assert le.value.limit == "max_remap_bytes"
            with pytest.raises(InvalidRequestError) as e:
                await mm.process("not a handle").vmas()
            assert [f for f, _ in e.value.field_violations] == ["process"]
            with pytest.raises(ValueError):
                await p.mmap(P, prot="rwx")  # refused by the SDK before sending
            await mm.create_process()
            with pytest.raises(LimitExceededError) as le:
                await mm.create_process()
            assert le.value.limit == "max_processes"


async def test_deadline_exceeded_through_the_sdk() -> None:
    async with serve_in_process(log_level="warning") as addr:
        async with Client(addr, timeout=0.2) as mm:
            p = await mm.create_process()
            await p.mmap(P, addr=SRC)
            await p.write(SRC, 1)
            # Hold the folio's anon_vma root so a blocking walk has to wait past its deadline.
            from mmsim.server.mm.locks import Current

            model = _server_model(addr)
            av = next(iter(model.processes.values())).pte_lookup(SRC).folio.mapping
            holder = Current("holder")
            assert av.root.rwsem.down_write(holder)
            try:
                with pytest.raises(DeadlineExceededError):
                    await p.walk(SRC, blocking=True)
            finally:
                while av.root.rwsem.waiters:
                    await asyncio.sleep(0)
                av.root.rwsem.up_write(holder)
            assert await mm.check_invariants() == []


def _server_model(addr: str):
    """The model of the in-process server listening on ``addr`` (found through the GC)."""
    import gc

    from mmsim.server.app import RunningServer

    port = int(addr.rsplit(":", 1)[1])
    return next(o for o in gc.get_objects() if isinstance(o, RunningServer) and o.port == port).model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_handles_do_not_survive_a_restart() -> None:
    port = _free_port()
    async with serve_in_process(listen=f"127.0.0.1:{port}", log_level="warning") as addr:
        async with Client(addr) as mm:
            old = await mm.create_process()
            await old.mmap(P, addr=SRC)
    async with serve_in_process(listen=f"127.0.0.1:{port}", log_level="warning") as addr:
        async with Client(addr) as mm:
            new = await mm.create_process()  # the same pid inside the new server
            await new.mmap(P, addr=SRC)
            assert new.id != old.id
            stale = mm.process(old.id)
            with pytest.raises(ShardRestartedError) as e:  # a ProcessNotFoundError, saying why
                await stale.vmas()
            assert isinstance(e.value, ProcessNotFoundError) and e.value.shard == 0
            assert len(await new.vmas()) == 1


async def test_two_hundred_concurrent_clients() -> None:
    async with serve_in_process(log_level="warning") as addr:

        async def one_client(seed: int) -> int:
            rng = random.Random(seed)
            done = 0
            async with Client(addr) as mm:
                p = await mm.create_process()
                a = await p.mmap(8 * P)
                b = await p.mmap(8 * P, uffd="missing")
                for _ in range(20):
                    i = rng.randrange(8)
                    kind = rng.choice(["write", "read", "remap", "walk", "fork"])
                    try:
                        if kind == "write":
                            await p.write(a.start + i * P, rng.randrange(1 << 32))
                        elif kind == "read":
                            await p.read(a.start + i * P)
                        elif kind == "remap":
                            await p.remap(b.start + i * P, a.start + i * P, P)
                        elif kind == "walk":
                            await p.walk(b.start + i * P, blocking=rng.random() < 0.5)
                        else:
                            c = await p.fork()
                            await c.exit()
                        done += 1
                    except OSError as e:
                        assert e.errno in (errno.EEXIST, errno.ENOENT, errno.EBUSY, errno.EAGAIN), e
                await p.exit()
            return done

        counts = await asyncio.gather(*(one_client(s) for s in range(200)))
        assert sum(counts) > 200 * 5
        async with Client(addr) as mm:
            assert await mm.check_invariants() == []
            stats = await mm.stats()
            assert stats["processes"] == 0 and stats["violations"] == 0


async def test_several_servers_round_robin_and_children_stay_home() -> None:
    async with serve_in_process(log_level="warning") as a, serve_in_process(log_level="warning") as b:
        async with Client([a, b]) as mm:
            p1, p2, p3 = [await mm.create_process() for _ in range(3)]
            assert [p.target for p in (p1, p2, p3)] == [a, b, a]
            c = await p2.fork()
            assert c.target == b
            v = await p2.mmap(P)
            await p2.write(v.start, 3)
            child = await p2.fork()
            assert await child.read(v.start) == 3
            stats = await mm.stats()
            assert stats["processes"] == 5  # summed over both servers
            per = [(await mm.stats(target=t))["processes"] for t in (a, b)]
            assert per == [2, 3]
            assert await mm.check_invariants() == []
            await mm.ping()


async def test_protocol_and_reattaching_a_handle() -> None:
    async with serve_in_process(log_level="warning", protocol="no-recheck") as addr:
        async with Client(addr) as mm, Client(addr) as other:
            assert await mm.protocol() == "no-recheck"
            p = await mm.create_process()
            v = await p.mmap(P, addr=SRC)
            await p.write(SRC, 7)
            same = other.process(p.id, p.pid)  # the handle, passed to another client
            assert await same.read(SRC) == 7 and same.pid == p.pid and same.target == addr
            assert [x.start for x in await same.vmas()] == [v.start]


async def test_vma_calls(mm: Client) -> None:
    """mprotect splits and merges, MADV_DONTNEED zaps, mremap moves the pages with their values."""
    p = await _two(mm)
    for i in range(4):
        await p.write(SRC + i * P, 10 + i)
    await p.mprotect(SRC + P, P, "none")
    vmas = [v for v in await p.vmas() if SRC <= v.start < SRC + 4 * P]
    assert [(v.start - SRC, v.prot) for v in vmas] == [(0, "rw"), (P, "none"), (2 * P, "rw")]
    with pytest.raises(OSError) as e:
        await p.read(SRC + P)
    assert e.value.errno == errno.EFAULT
    await p.mprotect(SRC + P, P, "rw")
    assert len([v for v in await p.vmas() if SRC <= v.start < SRC + 4 * P]) == 1
    await p.madvise(SRC + 3 * P, P, "dontneed")
    assert await p.folio(SRC + 3 * P) is None and await p.read(SRC + 3 * P) == 0
    moved = await p.mremap(SRC, 4 * P, 8 * P, maymove=True, fixed=0x500000000)
    assert (moved.start, moved.end) == (0x500000000, 0x500000000 + 8 * P)
    assert [await p.read(moved.start + i * P) for i in range(3)] == [10, 11, 12]
    assert await p.folio(SRC) is None
    assert await mm.check_invariants() == []


async def test_fault_handler_loop(mm: Client) -> None:
    """A read of a missing page in a MISSING range waits; its event arrives on userfaults(); a
    UFFDIO_COPY resolves it; a short copy's error carries .copied; batches take the new calls."""
    p = await _two(mm)
    reader = asyncio.create_task(p.read(DST + P))
    events = p.userfaults()
    ev = await anext(events)
    assert (ev.addr, ev.write, ev.wp) == (DST + P, False, False)
    assert (await p.list_userfaults()).waiting == (ev,)
    assert await p.uffd_copy(DST + P, P, 77) == P
    assert await reader == 77
    await events.aclose()
    assert (await p.list_userfaults()).waiting == ()
    await p.uffd_copy(DST + 3 * P, P, 1)
    with pytest.raises(BlockingIOError) as e:
        await p.uffd_copy(DST + 2 * P, 2 * P, [5, 6])
    assert e.value.copied == P and e.value.moved == P  # type: ignore[attr-defined]  # the SDK's errors carry what was done
    res = await mm.batch([ops.uffd_zeropage(p, DST, P), ops.uffd_zeropage(p, DST, P), ops.uffd_wake(p, DST, P)])
    assert res[0] == P and isinstance(res[1], FileExistsError) and res[1].zeroed == 0 and res[2] is None  # type: ignore[attr-defined]  # the SDK's errors carry what was done
    assert await p.read_userfaults() == []
    assert await mm.check_invariants() == []


async def test_a_fault_with_a_deadline_changes_nothing(mm: Client) -> None:
    p = await _two(mm)
    from mmsim.client import DeadlineExceededError

    with pytest.raises(DeadlineExceededError):
        await p.write(DST, 5, timeout=0.2)
    lists = await p.list_userfaults()
    assert lists.waiting == () and lists.queued == ()
    assert await p.folio(DST) is None
    assert await mm.check_invariants() == []


async def test_the_event_stream_reconnects_without_losing_events(mm: Client) -> None:
    """A handler whose stream drops after taking an event gets it again on its next stream."""
    p = await _two(mm)
    reader = asyncio.create_task(p.read(DST))
    first = p.userfaults()
    ev = await anext(first)
    await first.aclose()  # the client drops the stream with the fault unresolved
    again = p.userfaults()
    assert await anext(again) == ev
    await p.uffd_zeropage(DST, P)
    assert await reader == 0
    await again.aclose()
