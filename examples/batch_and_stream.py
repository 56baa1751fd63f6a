"""Many operations per call: ``Client.batch`` sends a list built with ``mmsim.client.ops`` in one
unary call; ``Client.batch_stream`` keeps one bidirectional stream open for list after list.
A failed operation does not raise: its exception takes its place among the results.

    make run                                         # first terminal: the server on 127.0.0.1:7077
    .venv/bin/python examples/batch_and_stream.py    # second terminal (or: ... batch_and_stream.py HOST:PORT)
"""

import asyncio
import os
import sys

from mmsim.client import Client, ServerUnavailableError, ops

PAGE = 4096
PAGES = 8


def check(ok: bool, what: str) -> None:
    if not ok:
        sys.exit(f"FAILED: {what}")


async def main(addr: str) -> None:
    async with Client(addr) as mm:
        p = await mm.create_process()
        src = await p.mmap(PAGES * PAGE)
        dst = await p.mmap(PAGES * PAGE, uffd="missing")

        # One call: write a page, move it, read it back at dst, and move it again (dst is now taken).
        results = await mm.batch(
            [
                ops.write(p, src.start, 7),
                ops.remap(p, dst.start, src.start, PAGE),
                ops.read(p, dst.start),
                ops.write(p, src.start, 8),
                ops.remap(p, dst.start, src.start, PAGE),
                ops.walk(p, dst.start),
            ]
        )
        print("batch results:")
        for name, r in zip(["write", "remap", "read", "write", "remap", "walk"], results, strict=True):
            print(f"  {name:6} -> {r!r}")
        check(results[1] == PAGE and results[2] == 7, "the first remap or read went wrong")
        check(isinstance(results[4], FileExistsError), "moving onto a populated dst did not fail with EEXIST")
        check([a for _, a in results[5].mappings] == [dst.start], "the walk did not find the page at dst")

        # One stream: a list of operations per page, each list's results as soon as they are done.
        async with mm.batch_stream(via=p) as stream:
            for i in range(1, PAGES):
                s, d = src.start + i * PAGE, dst.start + i * PAGE
                _, moved, value = await stream.run([ops.write(p, s, 100 + i), ops.remap(p, d, s, PAGE), ops.read(p, d)])
                check((moved, value) == (PAGE, 100 + i), f"page {i}: moved {moved!r}, read {value!r}")
        values = [await p.read(dst.start + i * PAGE) for i in range(PAGES)]
        print(f"stream moved pages 1..{PAGES - 1}; dst now holds {values}")
        check(values == [7] + [100 + i for i in range(1, PAGES)], "dst does not hold the moved values")
        check(await mm.check_invariants() == [], "the server's model audit found problems")
        await p.exit()
    print("ok")


if __name__ == "__main__":
    addr = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MMSIM_ADDR", "127.0.0.1:7077")
    try:
        asyncio.run(main(addr))
    except ServerUnavailableError as e:
        sys.exit(f"cannot reach an mmsim server at {addr} ({e.details}); start one with `make run`")
