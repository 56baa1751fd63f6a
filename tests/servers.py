"""``mmsim serve`` as a separate OS process, for tests that need one (RSS, signals, load)."""

from mmsim.client.testing import ServerProcess
from mmsim.client.testing import serve_subprocess as mmsim_serve


def shard_pids(supervisor: int) -> dict[int, int]:
    """shard index -> OS pid, from the children of a ``mmsim serve --shards N`` supervisor."""
    out: dict[int, int] = {}
    with open(f"/proc/{supervisor}/task/{supervisor}/children") as f:
        for pid in map(int, f.read().split()):
            with open(f"/proc/{pid}/cmdline", "rb") as c:
                argv = c.read().decode().split("\0")
            out[int(argv[argv.index("--shard-index") + 1])] = pid
    return out


__all__ = ["ServerProcess", "mmsim_serve", "shard_pids"]
