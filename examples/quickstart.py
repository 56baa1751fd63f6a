"""The README's first example as a script: map a source and a userfaultfd-registered destination,
write a value, move the page with UFFDIO_MOVE (remap), then show the folio and the rmap walk.

    make run                                   # first terminal: the server on 127.0.0.1:7077
    .venv/bin/python examples/quickstart.py    # second terminal (or: ... quickstart.py HOST:PORT)
"""

import asyncio
import os
import sys

from mmsim.client import Client, ServerUnavailableError

PAGE = 4096


def check(ok: bool, what: str) -> None:
    if not ok:
        sys.exit(f"FAILED: {what}")


async def main(addr: str) -> None:
    async with Client(addr) as mm:
        p = await mm.create_process()
        src = await p.mmap(PAGE)
        dst = await p.mmap(PAGE, uffd="missing")  # UFFDIO_MOVE needs a registered destination
        print(f"src {src.start:#x}, dst {dst.start:#x} (uffd={dst.uffd})")

        await p.write(src.start, 42)
        moved = await p.remap(dst.start, src.start, PAGE)
        print(f"remap moved {moved} bytes from src to dst")

        folio = await p.folio(dst.start)
        walk = await p.walk(dst.start)
        print("folio at dst:", folio)
        print("rmap walk:   ", walk)

        check(await p.folio(src.start) is None, "the page is still mapped at src")
        check(folio is not None and folio.value == 42, f"dst holds {folio}, not the value 42")
        check([a for _, a in walk.mappings] == [dst.start], "the walk did not find the page at dst alone")
        check(await mm.check_invariants() == [], "the server's model audit found problems")
        await p.exit()
    print("ok")


if __name__ == "__main__":
    addr = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MMSIM_ADDR", "127.0.0.1:7077")
    try:
        asyncio.run(main(addr))
    except ServerUnavailableError as e:
        sys.exit(f"cannot reach an mmsim server at {addr} ({e.details}); start one with `make run`")
