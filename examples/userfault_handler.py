"""A userfault handler, the way a concurrent compacting GC uses UFFDIO_MOVE: the heap's pages are
moved aside with mremap(MREMAP_DONTUNMAP), a mutator reads the heap (each read of a page faults
and waits), and the handler resolves each fault by moving the page back from the from-space.

    make run                                         # first terminal: the server on 127.0.0.1:7077
    .venv/bin/python examples/userfault_handler.py   # second terminal (or: ... userfault_handler.py HOST:PORT)
"""

import asyncio
import os
import sys

from mmsim.client import Client, ServerUnavailableError

PAGE = 4096
PAGES = 8


def check(ok: bool, what: str) -> None:
    if not ok:
        sys.exit(f"FAILED: {what}")


async def main(addr: str) -> None:
    async with Client(addr) as mm:
        p = await mm.create_process()
        heap = await p.mmap(PAGES * PAGE)
        for i in range(PAGES):
            await p.write(heap.start + i * PAGE, 1000 + i)
        await p.uffd_register(heap.start, PAGES * PAGE, "missing")
        # The from-space gets the pages; the heap stays mapped, empty, and registered.
        frm = await p.mremap(heap.start, PAGES * PAGE, PAGES * PAGE, maymove=True, dontunmap=True)
        print(f"heap {heap.start:#x}: pages moved aside to {frm.start:#x}")

        async def handler() -> int:
            resolved = 0
            events = p.userfaults()
            async for ev in events:
                i = (ev.addr - heap.start) // PAGE
                await p.remap(ev.addr, frm.start + i * PAGE, PAGE)  # UFFDIO_MOVE wakes the fault
                resolved += 1
                if resolved == PAGES:
                    await events.aclose()
            return resolved

        gc = asyncio.create_task(handler())
        values = [await p.read(heap.start + i * PAGE) for i in range(PAGES)]  # each read faults
        print("the mutator read", values)
        check(values == [1000 + i for i in range(PAGES)], "a page came back with the wrong value")
        check(await gc == PAGES, "the handler did not resolve every fault")
        walk = await p.walk(heap.start)
        print("the rmap walk finds page 0 at", [hex(a) for _, a in walk.mappings])
        check([a for _, a in walk.mappings] == [heap.start], "the walk did not find the page back in the heap")
        await p.munmap(frm.start, PAGES * PAGE)
        check(await mm.check_invariants() == [], "the server's model audit found problems")
        await p.exit()
    print("ok")


if __name__ == "__main__":
    addr = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MMSIM_ADDR", "127.0.0.1:7077")
    try:
        asyncio.run(main(addr))
    except ServerUnavailableError as e:
        sys.exit(f"cannot reach an mmsim server at {addr} ({e.details}); start one with `make run`")
