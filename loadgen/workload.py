"""The workload the generator builds on the server before a run, and tears down after it.

Each process tree has a root with three kinds of memory:

- a *shared* region of ``--pages`` pages, written before the root is forked down a chain of
  ``--fork-depth`` descendants, so that each of its folios is mapped by every process of the
  chain: what the walks visit;
- a *remap* pair, source and destination, both registered with userfaultfd (MISSING) and marked
  MADV_DONTFORK (forks do not share them), holding the pages that remaps ping-pong between them;
- a small *rw* region (MADV_DONTFORK) for writes and reads;
- with a GC mix (``gc_read``, the gc profile), a *heap* of ``--pages`` pages (MADV_DONTFORK), written,
  then registered MISSING: each GC cycle of the tree's collector moves its pages aside with
  mremap(MAYMOVE|DONTUNMAP), and the mutators' faults on the emptied heap bring them back;
- with a swap mix (``pageout`` or ``reclaim``, the reclaim profile), ``--pages`` pages of the rw
  region for each lane: its own set, which the server swaps out (MADV_PAGEOUT, Reclaim, or reclaim
  by itself past ``--max-memory``) and its reads and writes swap back in.

Every concurrent *lane* (a worker's slot for one call in flight) owns pages of its tree's remap pair
(one single page and a block of 64) and one rw page, so lanes never contend for a page, except in the
race profile, where every lane of a tree works on the same few pages on purpose, and the GC mixes,
where the lanes of a tree read and walk its heap's pages. In a GC mix every lane of a tree is in the
worker that runs the tree's collector (``Workload.gc_lanes``): tree ``t`` is worker ``t mod W``'s.

Against a sharded deployment the trees are spread over the shards (tree ``t`` on shard ``t mod N``),
and every call on a tree goes to its shard: a tree is one shard's, as every process of it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mmsim.client import Client, MmsimError, Process, ProcessNotFoundError, ops

PAGE = 4096
BLOCK = 64
#: Where each region of a root is mapped: apart, so that no two merge into one VMA.
SHARED_AT, SRC_AT, DST_AT, RW_AT = 0x100000000, 0x200000000, 0x300000000, 0x400000000
#: Where the GC heap (the to-space) of a root is mapped, in a GC mix.
GC_AT = 0x500000000
#: Pages every lane of a tree shares in the race profile.
RACE_PAGES = 8
#: Operations per Batch call while setting up: few enough that the request, charged to the server's
#: memory budget while it runs, fits a small ``--max-memory`` (the reclaim profile's).
SETUP_BATCH = 256


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
    gc: int = 0  # the GC heap's start (its to-space), 0 without one
    gc_pages: int = 0
    swap_pages: int = 0  # a swap mix: the pages of each lane's own set in the rw region, 0 without

    def rw_value(self, page: int) -> int:
        """The value the setup writes to the rw region's page ``page``."""
        return page + 1

    def gc_value(self, page: int) -> int:
        """The value written to the GC heap's page ``page`` (every move keeps it)."""
        return page + 1


@dataclass(frozen=True)
class LaneSpec:
    """What one lane works on: pages of its tree's remap pair and rw region, a page to walk."""

    tree: int
    single: int  # page index in the remap pair
    block: int  # first page of its 64-page block
    rw_page: int
    walk_page: int
    race: tuple[int, ...] = ()  # the race profile's shared pages (indexes in the remap pair)
    gc: bool = False  # a GC mix: its walks walk its tree's heap pages, wherever they are
    swap_first: int = 0  # a swap mix: its own set, pages [swap_first, swap_first + swap_pages) of the rw region
    swap_pages: int = 0


@dataclass
class Workload:
    trees: list[TreeSpec] = field(default_factory=list)
    #: Every process the setup created, handle and target (None: routed by shard), for the teardown.
    created: list[tuple[str, str | None]] = field(default_factory=list)

    def lanes(self, count: int, race: bool) -> list[LaneSpec]:
        """``count`` lanes spread round-robin over the trees."""
        return self._lanes([i % len(self.trees) for i in range(count)], race, False)

    def gc_lanes(self, workers: int, concurrency: int) -> list[LaneSpec]:
        """A GC mix's lanes, in worker order (``concurrency`` each): worker ``w``'s spread round-robin
        over the trees whose collector it runs (``gc_trees``), so that a tree's mutators, walkers
        and collector share one event loop."""
        order = []
        for w in range(workers):
            mine = gc_trees(w, workers, len(self.trees))
            order += [mine[i % len(mine)] for i in range(concurrency)]
        return self._lanes(order, False, True)

    def _lanes(self, trees: list[int], race: bool, gc: bool) -> list[LaneSpec]:
        out = []
        per_tree = [0] * len(self.trees)
        for t in trees:
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
                    gc=gc,
                    swap_first=k * tree.swap_pages,
                    swap_pages=tree.swap_pages,
                )
            )
        return out


def gc_trees(worker: int, workers: int, trees: int) -> tuple[int, ...]:
    """The trees whose collector worker ``worker`` runs (and whose every lane it has): ``t mod W``.
    A GC mix needs at least as many trees as workers."""
    return tuple(range(worker, trees, workers))


def gc_lanes_per_tree(workers: int, concurrency: int, trees: int) -> int:
    """The most lanes a tree gets in a GC mix (``Workload.gc_lanes``)."""
    return -(-concurrency // max(1, trees // workers))


def lanes_per_tree(lanes: int, trees: int) -> int:
    return -(-lanes // trees)


def remap_pages(lanes: int, trees: int) -> int:
    """Pages of each remap region: the race pages, then a page and a block for each lane."""
    return RACE_PAGES + lanes_per_tree(lanes, trees) * (1 + BLOCK)


#: The most pages a region may have: the regions of a root are mapped this far apart.
REGION_PAGES_MAX = (SRC_AT - SHARED_AT) // PAGE


async def build(
    w: Workload, mm: Client, trees: int, pages: int, fork_depth: int, lanes: int, progress: object = None,
    *, per_tree: int | None = None, gc: bool = False, swap: bool = False,
) -> None:
    """Build ``trees`` trees into ``w``, spread round-robin over the client's shards (or its targets,
    with a list of them), each ready for ``per_tree`` lanes (default ``lanes_per_tree``), with a
    GC heap of ``pages`` pages if ``gc``, and a set of ``pages`` pages for each lane if ``swap``.
    Every process is in ``w.created`` as soon as it exists, so that a failed build is torn down too.
    ``progress`` is called with (done, total) after each step."""
    if per_tree is None:
        per_tree = lanes_per_tree(lanes, trees)
    remap = RACE_PAGES + per_tree * (1 + BLOCK)
    steps_per_tree = 4 + fork_depth + (1 if gc else 0)
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
        else:
            root = await mm.create_process(shard=t % routes if routes > 1 else None)
        w.trees.append(await build_tree(
            w, mm, root, static=static, pages=pages, fork_depth=fork_depth, remap=remap,
            rw_pages=per_tree * pages if swap else per_tree, gc=gc, swap_pages=pages if swap else 0, step=step,
        ))


async def build_tree(
    w: Workload, mm: Client, root: Process, *, static: bool, pages: int, fork_depth: int, remap: int,
    rw_pages: int, gc: bool, swap_pages: int = 0, step: Callable[[], None] | None = None,
) -> TreeSpec:
    """Make the new process ``root`` (of ``mm``) a tree: its regions, written, and its chain of
    ``fork_depth`` descendants; its spec (``swap_pages``: of each lane's set in the rw region, a
    swap mix). Every process is in ``w.created`` as soon as it exists."""
    target = root.target if static else None
    shard = None if static else root.shard
    w.created.append((root.id, target))
    shared = await root.mmap(pages * PAGE, addr=SHARED_AT)
    await _write_pages(mm, root, shared.start, pages)
    if step is not None:
        step()
    chain: list[tuple[str, int]] = []
    parent = root
    for _ in range(fork_depth):
        parent = await parent.fork()
        chain.append((parent.id, parent.pid))
        w.created.append((parent.id, target))
        if step is not None:
            step()
    src = await root.mmap(remap * PAGE, addr=SRC_AT)
    await _write_pages(mm, root, src.start, remap)  # before registering: no fault handler
    if step is not None:
        step()
    await root.uffd_register(src.start, remap * PAGE, "missing")  # moves come back to it
    dst = await root.mmap(remap * PAGE, uffd="missing", addr=DST_AT)
    for region in (src, dst):
        await root.madvise(region.start, remap * PAGE, "dontfork")
    if step is not None:
        step()
    rw = await root.mmap(rw_pages * PAGE, addr=RW_AT)
    await root.madvise(rw.start, rw_pages * PAGE, "dontfork")
    await _write_pages(mm, root, rw.start, rw_pages)
    if step is not None:
        step()
    heap = 0
    if gc:  # the GC heap: written, then registered (the faults on its emptied range come to the collector)
        heap = (await root.mmap(pages * PAGE, addr=GC_AT)).start
        await root.madvise(heap, pages * PAGE, "dontfork")  # its folios stay exclusive: movable
        await _write_pages(mm, root, heap, pages)
        await root.uffd_register(heap, pages * PAGE, "missing")
        if step is not None:
            step()
    return TreeSpec(
        target=target, shard=shard, root=root.id, root_pid=root.pid, chain=tuple(chain), shared=shared.start,
        shared_pages=pages, src=src.start, dst=dst.start, remap_pages=remap, rw=rw.start,
        rw_pages=rw_pages, gc=heap, gc_pages=pages if gc else 0, swap_pages=swap_pages,
    )


async def _write_pages(mm: Client, p: object, start: int, pages: int) -> None:
    for first in range(0, pages, SETUP_BATCH):
        n = min(SETUP_BATCH, pages - first)
        results = await mm.batch([ops.write(p, start + (first + i) * PAGE, first + i + 1) for i in range(n)])  # type: ignore[arg-type]
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]


async def teardown(mm: Client, w: Workload) -> tuple[int, list[str]]:
    """Exit every process the setup created, descendants first: how many exited, and what kept the
    others from exiting (one line each). A process its shard's restart took is gone already."""
    exited = 0
    problems: list[str] = []
    for handle, target in reversed(w.created):
        try:
            await mm.process(handle, target=target).exit()
            exited += 1
        except ProcessNotFoundError:  # its shard restarted (or it exited otherwise): nothing left to do
            pass
        except (OSError, MmsimError) as e:
            problems.append(str(e))
    return exited, problems
