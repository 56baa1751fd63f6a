"""fork, copy-on-write and the rmap walk: one folio shared by a parent and its children, found at
each of their mappings by the walk; then the children write (each gets its own copy), the parent
writes again (it owns its folio exclusively again) and can move it with UFFDIO_MOVE.

    make run                                      # first terminal: the server on 127.0.0.1:7077
    .venv/bin/python examples/fork_and_walk.py    # second terminal (or: ... fork_and_walk.py HOST:PORT)
"""

import asyncio
import errno
import os
import sys

from mmsim.client import Client, ServerUnavailableError

PAGE = 4096
CHILDREN = 3


def check(ok: bool, what: str) -> None:
    if not ok:
        sys.exit(f"FAILED: {what}")


async def main(addr: str) -> None:
    async with Client(addr) as mm:
        parent = await mm.create_process()
        src = await parent.mmap(PAGE)
        dst = await parent.mmap(PAGE, uffd="missing")
        await parent.write(src.start, 1)
        children = [await parent.fork() for _ in range(CHILDREN)]

        # After fork the parent and every child map the same folio, read-only (copy-on-write).
        shared = await parent.walk(src.start)
        print(f"after {CHILDREN} forks, the walk of the folio at {src.start:#x} finds {len(shared.mappings)} mappings:")
        for who, addr_ in shared.mappings:
            print(f"  {who} at {addr_:#x}")
        print("  folio:", await parent.folio(src.start))
        check(len(shared.mappings) == 1 + CHILDREN, f"expected {1 + CHILDREN} mappings")
        check({a for _, a in shared.mappings} == {src.start}, "the mappings are not all at the forked address")

        # A shared page cannot be moved: UFFDIO_MOVE answers EBUSY.
        try:
            await parent.remap(dst.start, src.start, PAGE)
            check(False, "the remap of a shared page succeeded")
        except OSError as e:
            check(e.errno == errno.EBUSY, f"expected EBUSY, got {e!r}")
            print(f"remap while the page is shared fails: {e.strerror}")

        # Each child writes: copy-on-write gives it its own folio.
        for i, child in enumerate(children):
            await child.write(src.start, 100 + i)
        for i, child in enumerate(children):
            own = await child.walk(src.start)
            check(await child.read(src.start) == 100 + i, "a child lost its write")
            check(len(own.mappings) == 1, "a child's copy is mapped more than once")
        alone = await parent.walk(src.start)
        print(f"after the children wrote, the parent's folio has {len(alone.mappings)} mapping(s):", alone)
        check(len(alone.mappings) == 1, "the parent's folio is still shared")

        # The parent's write reuses its folio and makes it exclusive again; now it can be moved.
        await parent.write(src.start, 2)
        moved = await parent.remap(dst.start, src.start, PAGE)
        walk = await parent.walk(dst.start)
        print(f"remap in the parent moved {moved} bytes; the walk now finds:", walk)
        check(moved == PAGE and await parent.read(dst.start) == 2, "the parent's page did not move")
        check([a for _, a in walk.mappings] == [dst.start], "the walk did not find the moved page at dst")
        check(await mm.check_invariants() == [], "the server's model audit found problems")
        for p in (*children, parent):
            await p.exit()
    print("ok")


if __name__ == "__main__":
    addr = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MMSIM_ADDR", "127.0.0.1:7077")
    try:
        asyncio.run(main(addr))
    except ServerUnavailableError as e:
        sys.exit(f"cannot reach an mmsim server at {addr} ({e.details}); start one with `make run`")
