"""``mmsim serve`` as a separate OS process, for tests that need one (RSS, signals, load)."""

import argparse

from mmsim.client.testing import ServerProcess
from mmsim.client.testing import serve_subprocess as mmsim_serve


def shard_pids(supervisor: int) -> dict[int, int]:
    """shard index -> OS pid, from the children of a ``mmsim serve --shards N`` supervisor."""
    index = argparse.ArgumentParser(add_help=False)
    index.add_argument("--shard-index", type=int, default=0)  # absent: shard 0
    out: dict[int, int] = {}
    with open(f"/proc/{supervisor}/task/{supervisor}/children") as f:
        for pid in map(int, f.read().split()):
            with open(f"/proc/{pid}/cmdline", "rb") as c:
                argv = c.read().decode().split("\0")
            out[index.parse_known_args(argv)[0].shard_index] = pid
    return out


__all__ = ["ServerProcess", "mmsim_serve", "shard_pids"]
