"""Swap: pages written, paged out with MADV_PAGEOUT (swap entries, their folios kept in the swap
cache), read back (a swap-cache hit: the page is mapped again, exclusive), paged out again and
reclaimed (the folios freed: a read now swaps the page in from its slot), and a swap entry moved
with UFFDIO_MOVE. `Process.pagemap` shows each page as /proc/PID/pagemap and /proc/kpageflags
would.

    make run                                # first terminal: the server on 127.0.0.1:7077
    .venv/bin/python examples/swap.py       # second terminal (or: ... swap.py HOST:PORT)
"""

import asyncio
import os
import sys

from mmsim.client import Client, ServerUnavailableError

PAGE = 4096
PAGES = 4


def check(ok: bool, what: str) -> None:
    if not ok:
        sys.exit(f"FAILED: {what}")


async def main(addr: str) -> None:
    async with Client(addr) as mm:
        p = await mm.create_process()
        src = await p.mmap(PAGES * PAGE)
        dst = await p.mmap(PAGE, uffd="missing")
        for i in range(PAGES):
            await p.write(src.start + i * PAGE, 100 + i)
        print("written:    ", (await p.pagemap(src.start, PAGE))[0])

        # MADV_PAGEOUT: every page gets a slot and a swap entry; written out, its folio stays in
        # the swap cache, clean.
        await p.madvise(src.start, PAGES * PAGE, "pageout")
        entries = await p.pagemap(src.start, PAGES * PAGE)
        print("paged out:  ", entries[0])
        check(all(e.swap and e.swapcache and not e.present for e in entries), "not every page was paged out")

        # A read maps the folio from the swap cache again (exclusive: the swap entry was).
        check(await p.read(src.start) == 100, "the first page lost its value")
        back = (await p.pagemap(src.start, PAGE))[0]
        print("read back:  ", back)
        check(back.present and back.swapcache and back.anon_exclusive, "the read did not map the cached folio")

        # Reclaim frees the clean folios still in the swap cache: the next read swaps in from the slot.
        freed = await mm.reclaim(PAGES)
        cold = (await p.pagemap(src.start + PAGE, PAGE))[0]
        print(f"reclaim freed {freed} folio(s); the second page:", cold)
        check(freed >= 1 and cold.swap and not cold.swapcache, "reclaim left the second page's folio cached")
        check(await p.read(src.start + PAGE) == 101, "the second page came back wrong")

        # UFFDIO_MOVE of an exclusive swap entry moves the entry as it is.
        moved = await p.remap(dst.start, src.start + 2 * PAGE, PAGE)
        at_dst = (await p.pagemap(dst.start, PAGE))[0]
        print(f"remap of a swap entry moved {moved} bytes; dst:", at_dst)
        check(moved == PAGE and at_dst.swap, "the swap entry did not move")
        check(await p.read(dst.start) == 102, "the moved page came back wrong")

        stats = await mm.stats()
        print(f"swap-outs {stats.get('swap_out', 0)}, swap-ins {stats.get('swap_in', 0)}, "
              f"swap-cache hits {stats.get('swap_cache_hit', 0)}, slots in use {stats['swap_slots_in_use']}")
        check(await mm.check_invariants() == [], "the server's model audit found problems")
        await p.exit()
    print("ok")


if __name__ == "__main__":
    addr = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MMSIM_ADDR", "127.0.0.1:7077")
    try:
        asyncio.run(main(addr))
    except ServerUnavailableError as e:
        sys.exit(f"cannot reach an mmsim server at {addr} ({e.details}); start one with `make run`")
