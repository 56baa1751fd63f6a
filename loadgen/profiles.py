"""The operations the load generator knows, and the named profiles (weighted mixes of them)."""

from __future__ import annotations

from mmsim.v1.operations import Operation, require, rows

#: Every operation, with what one call of it does.
OPERATIONS: dict[str, str] = {
    "ping": "the empty RPC: the cost of a call on this stack, the baseline of every other figure",
    "remap": "UFFDIO_MOVE of one page, ping-ponged between a source and a registered destination",
    "remap64": "UFFDIO_MOVE of 64 pages at once, ping-ponged likewise",
    "walk": "the rmap walk (folio_referenced), trylock mode, of a page shared along the fork chain",
    "walk_blocking": "the same walk in blocking mode (sleeps on the anon_vma root)",
    "fork": "fork of the tree's root, then exit of the child (one operation)",
    "write": "a write of one page (a fault or a store)",
    "read": "a read of one page",
    "mmap": "mmap of one page, then munmap of it (one operation)",
    "batch": "one Batch call of 256 single-page remaps (each counts as one operation)",
    "stream": "the same 256 remaps as one list on a BatchStream (each counts as one operation)",
    "gc_read": "a mutator's read of a page of the tree's GC heap still in the from-space: it faults and waits "
    "until the tree's collector moves the page back (the gc profile; walks then walk the GC pages)",
    "pageout": "MADV_PAGEOUT of 4 of the lane's own pages, or (one call in 4) of its remap page: swapped out "
    "(a swap mix, as with reclaim: writes, reads and walks then pick random pages of the lane's own)",
    "reclaim": "Reclaim of up to 32 folios of the tree's shard, any process's (shrink_lruvec: swap-outs)",
}

#: The RPCs one call of each operation makes (mmsim.v1.operations), in order.
CALLS: dict[str, tuple[Operation, ...]] = {
    "ping": rows("Ping"),
    "remap": rows("Remap"),
    "remap64": rows("Remap"),
    "walk": rows("Walk"),
    "walk_blocking": rows("Walk"),
    "fork": rows("Fork", "Exit"),
    "write": rows("Write"),
    "read": rows("Read"),
    "mmap": rows("Mmap", "Munmap"),
    "batch": rows("Batch"),
    "stream": rows("BatchStream"),
    "gc_read": rows("Read"),
    "pageout": rows("Madvise"),
    "reclaim": rows("Reclaim"),
}
require(CALLS, OPERATIONS, "the load generator's operations (profiles.CALLS)")

#: How many operations one call of each counts for.
OPS_PER_CALL: dict[str, int] = {name: 1 for name in OPERATIONS} | {"batch": 256, "stream": 256}

#: Named profiles: operation -> weight.
PROFILES: dict[str, dict[str, int]] = {
    "mixed": {"remap": 4, "remap64": 1, "walk": 3, "walk_blocking": 1, "fork": 1, "write": 2, "read": 2, "mmap": 1},
    "remap": {"remap": 1},
    "ping": {"ping": 1},
    "batch": {"batch": 1, "stream": 1},
    "fork-storm": {"fork": 4, "walk": 1, "write": 1},
    # Walks and moves on the same folios of the same trees, so that the mapping recheck fires.
    "race": {"remap": 2, "walk": 3, "walk_blocking": 1},
    # Android ART's concurrent compacting GC: each tree's heap moved aside by mremap(MAYMOVE|DONTUNMAP)
    # every cycle, mutators faulting on the empty to-space, a collector moving each page back
    # (UFFDIO_MOVE), walks on the same folios in either space.
    "gc": {"gc_read": 4, "walk": 2, "walk_blocking": 1},
    # A working set larger than the resident budget (mmsim serve --max-memory below it): the server
    # reclaims and swaps under load, each lane's reads and writes swap its pages back in, walks find
    # some swapped out, and moves move swap entries. A Reclaim call frees tens of folios: so rare, it
    # leaves about three walks in four finding their page mapped where no budget binds.
    "reclaim": {"write": 60, "read": 60, "remap": 30, "walk": 30, "pageout": 4, "reclaim": 1},
}
DEFAULT_PROFILE = "mixed"

#: Where the ops of the race profile act: the same pages for every lane of a tree.
SHARED_PAGES_PROFILES = frozenset({"race"})


def is_gc(mix: dict[str, int] | tuple[tuple[str, int], ...]) -> bool:
    """Whether a mix runs the GC workload (it has gc_read): a heap and a collector per tree, every
    lane of a tree in the worker that runs its collector, and walks on the GC pages."""
    return "gc_read" in dict(mix)


def is_swap(mix: dict[str, int] | tuple[tuple[str, int], ...]) -> bool:
    """Whether a mix runs the swap workload (it has pageout or reclaim): every lane gets ``--pages``
    pages of its own, which its writes, reads (each value checked), walks and pageouts pick from
    at random."""
    return not {"pageout", "reclaim"}.isdisjoint(dict(mix))


def parse_mix(text: str) -> dict[str, int]:
    """``op=weight,...`` (e.g. ``remap=3,walk=1``): a ValueError names what is wrong."""
    mix: dict[str, int] = {}
    for part in text.split(","):
        name, sep, weight = part.strip().partition("=")
        if not sep:
            raise ValueError(f"{part.strip()!r} is not op=weight")
        if name not in OPERATIONS:
            raise ValueError(f"unknown operation {name!r}; one of {', '.join(OPERATIONS)}")
        if not weight.isdecimal() or int(weight) <= 0:
            raise ValueError(f"the weight of {name} must be a positive integer, not {weight!r}")
        if name in mix:
            raise ValueError(f"{name} is given twice")
        mix[name] = int(weight)
    return mix
