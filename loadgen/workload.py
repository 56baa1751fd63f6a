"""The workload the generator builds on the server before a run, and tears down after it.

Each process tree has a root with three kinds of memory:

- a *shared* region of ``--pages`` pages, written before the root is forked down a chain of
  ``--fork-depth`` descendants, so that each of its folios is mapped by every process of the
  chain: what the walks visit;
- a *remap* pair, source and destination, both registered with userfaultfd (MISSING) and marked
  MADV_DONTFORK (forks do not share them), holding the pages that remaps ping-pong between them;
- a small *rw* region (MADV_DONTFORK) for writes and reads.

Every concurrent *lane* (a worker's slot for one call in flight) owns pages of its tree's remap pair
(one single page and a block of 64) and one rw page, so lanes never contend for a page, except in the
race profile, where every lane of a tree works on the same few pages on purpose.

Against a sharded deployment the trees are spread over the shards (tree ``t`` on shard ``t mod N``),
and every call on a tree goes to its shard: a tree is one shard's, as every process of it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmsim.client import Client, ops

PAGE = 4096
BLOCK = 64
#: Where each region of a root is mapped: apart, so that no two merge into one VMA.
SHARED_AT, SRC_AT, DST_AT, RW_AT = 0x100000000, 0x200000000, 0x300000000, 0x400000000
#: Pages every lane of a tree shares in the race profile.
RACE_PAGES = 8
#: Operations per Batch call while setting up.
SETUP_BATCH = 2000


@dataclass(frozen=True)
class TreeSpec:
    """One process tree on the server, as the workers need it (plain data: it crosses processes).

    ``target`` is its server's address with a list of targets (static routing), and None where the
    client routes by the handle's shard; ``shard`` is the index of its shard (None: static)."""

    target: str | None
    shard: int | None
    root: str  # the root's handle
    root_pid: int
    chain: tuple[tuple[str, int], ...]  # (handle, pid) of each descendant, the root's child first
    shared: int
    shared_pages: int
    src: int
    dst: int
    remap_pages: int
    rw: int
    rw_pages: int


@dataclass(frozen=True)
class LaneSpec:
    """What one lane works on: pages of its tree's remap pair and rw region, a page to walk."""

    tree: int
    single: int  # page index in the remap pair
    block: int  # first page of its 64-page block
    rw_page: int
    walk_page: int
    race: tuple[int, ...] = ()  # the race profile's shared pages (indexes in the remap pair)


@dataclass
class Workload:
    trees: list[TreeSpec] = field(default_factory=list)
    #: Every process the setup created, handle and target (None: routed by shard), for the teardown.
    created: list[tuple[str, str | None]] = field(default_factory=list)

    def lanes(self, count: int, race: bool) -> list[LaneSpec]:
        """``count`` lanes spread round-robin over the trees."""
        out = []
        per_tree = [0] * len(self.trees)
        for i in range(count):
            t = i % len(self.trees)
            k = per_tree[t]
            per_tree[t] += 1
            tree = self.trees[t]
            base = RACE_PAGES + k * (1 + BLOCK)
            out.append(
                LaneSpec(
                    tree=t,
                    single=base,
                    block=base + 1,
                    rw_page=k % tree.rw_pages,
                    walk_page=k % tree.shared_pages,
                    race=tuple(range(RACE_PAGES)) if race else (),
                )
            )
        return out


def lanes_per_tree(lanes: int, trees: int) -> int:
    return -(-lanes // trees)


def remap_pages(lanes: int, trees: int) -> int:
    """Pages of each remap region: the race pages, then a page and a block for each lane."""
    return RACE_PAGES + lanes_per_tree(lanes, trees) * (1 + BLOCK)


#: The most pages a region may have: the regions of a root are mapped this far apart.
REGION_PAGES_MAX = (SRC_AT - SHARED_AT) // PAGE


async def build(
    w: Workload, mm: Client, trees: int, pages: int, fork_depth: int, lanes: int, progress: object = None
) -> None:
    """Build ``trees`` trees into ``w``, spread round-robin over the client's shards (or its targets,
    with a list of them), each ready for ``lanes_per_tree`` lanes. Every process is in ``w.created``
    as soon as it exists, so that a failed build is torn down too. ``progress`` is called with
    (done, total) after each step."""
    per_tree = lanes_per_tree(lanes, trees)
    remap = remap_pages(lanes, trees)
    steps_per_tree = 4 + fork_depth
    total = trees * steps_per_tree
    done = 0
    routes = len(await mm.routes())
    static = mm.routing == "static"

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)  # type: ignore[operator]

    for t in range(trees):
        if static:
            root = await mm.create_process()  # round-robin over the targets
            target: str | None = root.target
            shard: int | None = None
        else:
            root = await mm.create_process(shard=t % routes if routes > 1 else None)
            target, shard = None, root.shard
        w.created.append((root.id, target))
        shared = await root.mmap(pages * PAGE, addr=SHARED_AT)
        await _write_pages(mm, root, shared.start, pages)
        step()
        chain: list[tuple[str, int]] = []
        parent = root
        for _ in range(fork_depth):
            parent = await parent.fork()
            chain.append((parent.id, parent.pid))
            w.created.append((parent.id, target))
            step()
        src = await root.mmap(remap * PAGE, addr=SRC_AT)
        await _write_pages(mm, root, src.start, remap)  # before registering: no fault handler
        step()
        await root.uffd_register(src.start, remap * PAGE, "missing")  # moves come back to it
        dst = await root.mmap(remap * PAGE, uffd="missing", addr=DST_AT)
        for region in (src, dst):
            await root.madvise(region.start, remap * PAGE, "dontfork")
        step()
        rw_pages = per_tree
        rw = await root.mmap(rw_pages * PAGE, addr=RW_AT)
        await root.madvise(rw.start, rw_pages * PAGE, "dontfork")
        await _write_pages(mm, root, rw.start, rw_pages)
        step()
        w.trees.append(
            TreeSpec(
                target=target, shard=shard, root=root.id, root_pid=root.pid, chain=tuple(chain), shared=shared.start,
                shared_pages=pages, src=src.start, dst=dst.start, remap_pages=remap, rw=rw.start,
                rw_pages=rw_pages,
            )
        )


async def _write_pages(mm: Client, p: object, start: int, pages: int) -> None:
    for first in range(0, pages, SETUP_BATCH):
        n = min(SETUP_BATCH, pages - first)
        results = await mm.batch([ops.write(p, start + (first + i) * PAGE, first + i + 1) for i in range(n)])  # type: ignore[arg-type]
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]


async def teardown(mm: Client, w: Workload) -> int:
    """Exit every process the setup created, descendants first. Returns how many exited."""
    exited = 0
    for handle, target in reversed(w.created):
        await mm.process(handle, target=target).exit()
        exited += 1
    return exited
