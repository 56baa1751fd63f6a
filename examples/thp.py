"""Large folios: a 2 MiB-aligned region advised MADV_HUGEPAGE gets a THP mapped by a huge PMD at
its first write fault; UFFDIO_MOVE of the whole 2 MiB moves the huge PMD in one step; moving one
page out of a THP splits it (the PMD, then the folio: the pages left behind that read zeros become
the shared zero page); a fork shares the THP, and the child's write copies one page only.
`Process.pagemap` shows each page as /proc/PID/pagemap and /proc/kpageflags would.

    make run                                # first terminal: the server on 127.0.0.1:7077
    .venv/bin/python examples/thp.py        # second terminal (or: ... thp.py HOST:PORT)
"""

import asyncio
import os
import sys

from mmsim.client import Client, Process, ServerUnavailableError

PAGE = 4096
PMD = 2 << 20


def check(ok: bool, what: str) -> None:
    if not ok:
        sys.exit(f"FAILED: {what}")


async def aligned(p: Process, uffd: str | None = None) -> int:
    """A 2 MiB region on a 2 MiB boundary: map twice that, keep the aligned middle."""
    big = await p.mmap(2 * PMD, uffd=uffd)
    start = (big.start + PMD - 1) & ~(PMD - 1)
    if start > big.start:
        await p.munmap(big.start, start - big.start)
    if start + PMD < big.end:
        await p.munmap(start + PMD, big.end - start - PMD)
    return start


async def main(addr: str) -> None:
    async with Client(addr) as mm:
        settings = await mm.thp()
        print("THP settings:", settings)
        p = await mm.create_process()
        src = await aligned(p)
        dst = await aligned(p, uffd="missing")
        await p.madvise(src, PMD, "hugepage")
        await p.write(src, 1)
        await p.write(src + PAGE, 2)
        head = (await p.pagemap(src, PAGE))[0]
        print("after a write fault:", head)
        check(head.pmd and head.thp and head.head and head.anon_exclusive, "no THP by a huge PMD")
        print("its folio:", await p.folio(src + 5 * PAGE))

        # The whole PMD moves as it is.
        moved = await p.remap(dst, src, PMD)
        at_dst = (await p.pagemap(dst, PAGE))[0]
        print(f"remap of the whole 2 MiB moved {moved} bytes; dst:", at_dst)
        check(moved == PMD and at_dst.pmd, "the huge PMD was not moved whole")

        # One page out of it: the PMD and the folio are split first.
        one = await p.mmap(PAGE, uffd="missing")
        await p.remap(one.start, dst + PAGE, PAGE)
        left = await p.pagemap(dst, 3 * PAGE)
        print("after moving page 1 out:", left[0], left[2], sep="\n  ")
        check(not left[0].pmd and not left[0].thp and left[2].zero_page, "the THP was not split")
        check(await p.read(one.start) == 2 and await p.read(dst) == 1, "a value was lost")

        # A fresh THP shared by fork: the child's write copies one small page.
        third = await aligned(p)
        await p.madvise(third, PMD, "hugepage")
        await p.write(third, 7)
        child = await p.fork()
        await child.write(third + 8 * PAGE, 70)
        mine, theirs = (await p.pagemap(third + 8 * PAGE, PAGE))[0], (await child.pagemap(third + 8 * PAGE, PAGE))[0]
        print("after the child's write: parent", mine, "child", theirs, sep="\n  ")
        check(mine.pmd and not theirs.thp and theirs.anon_exclusive, "COW did not copy one page")

        stats = await mm.stats()
        print(f"THP faults {stats.get('thp_fault_alloc', 0)}, PMD moves {stats.get('thp_move_pmd', 0)}, "
              f"PMD splits {stats.get('thp_split_pmd', 0)}, folio splits {stats.get('thp_split_page', 0)}")
        check(await mm.check_invariants() == [], "the server's model audit found problems")
        await child.exit()
        await p.exit()
    print("ok")


if __name__ == "__main__":
    addr = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MMSIM_ADDR", "127.0.0.1:7077")
    try:
        asyncio.run(main(addr))
    except ServerUnavailableError as e:
        sys.exit(f"cannot reach an mmsim server at {addr} ({e.details}); start one with `make run`")
