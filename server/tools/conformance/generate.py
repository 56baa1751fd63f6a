"""Seeded random conformance scenarios (``mmsim conformance --random N --seed S``).

``random_scenario(rng, name)`` builds a scenario of 5 to 30 steps over 1 to 3 processes and 2 to 4
regions of 1 to 8 pages each, mixing every step kind of the format. What it generates is always
runnable on the live kernel:

* every region a step names exists in the acting process: a child inherits the regions its parent
  has at the fork, a region mapped later exists only in the process that mapped it (the generator
  keeps one region set per process);
* no step acts on a process that has exited, and at least one process stays alive;
* nothing can block in the kernel: userfaultfd ranges are registered in "wp" mode only (no
  UFFDIO_WRITEPROTECT is ever issued, so no access faults to userspace), never "missing";
* a move's source range never runs past the end of its region's pages unless it is one of the
  deliberately bad moves (the kernel runner keeps a guard mapping above the regions, so such a
  move is EINVAL on both sides), and accesses only address pages of the region.

Moves are also issued in processes that have not registered any range yet (the kernel runner
opens a process's userfaultfd on first use), so the validation order before the registration
check is exercised too.

The same ``rng`` state gives the same scenario (only ``rng`` is drawn from, and every choice is
made over ordered lists).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from .scenario import ADVICE, PAGE, Scenario

MAX_PROCESSES = 3
ROOT_NAMES = ("P", "Q")
CHILD_NAMES = ("C", "D")


@dataclass
class _Region:
    pages: int
    prot: str
    mapped: list[bool]
    registered: list[bool]
    written: list[bool] = field(default_factory=list)


@dataclass
class _Proc:
    name: str
    regions: dict[str, _Region] = field(default_factory=dict)

    def copy_for_child(self, name: str, wiped: set[str]) -> _Proc:
        child = _Proc(name)
        for rname, r in self.regions.items():
            child.regions[rname] = _Region(
                r.pages,
                r.prot,
                list(r.mapped),
                [False] * r.pages,  # the child loses the userfaultfd registration
                [False] * r.pages if rname in wiped else list(r.written),
            )
        return child


class _Gen:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.steps: list[dict[str, Any]] = []
        roots = 1 if rng.random() < 0.8 else 2
        self.roots = list(ROOT_NAMES[:roots])
        self.procs: dict[str, _Proc] = {n: _Proc(n) for n in self.roots}
        self.alive: list[str] = list(self.roots)
        self.created = roots
        self.max_regions = rng.randint(2, 4)
        self.nregions = 0
        self.wiped: dict[str, set[str]] = {}  # proc -> regions with wipeonfork somewhere (approx.)

    # -- helpers ---------------------------------------------------------------------------------

    def pick_proc(self, with_regions: bool = True) -> _Proc | None:
        cands = [self.procs[n] for n in self.alive if not with_regions or self.procs[n].regions]
        return self.rng.choice(cands) if cands else None

    def pick_region(self, p: _Proc, prefer: str | None = None) -> tuple[str, _Region]:
        names = list(p.regions)
        if prefer == "registered":
            good = [n for n in names if any(p.regions[n].registered)]
            if good and self.rng.random() < 0.8:
                names = good
        elif prefer == "written":
            good = [n for n in names if any(p.regions[n].written)]
            if good and self.rng.random() < 0.7:
                names = good
        name = self.rng.choice(names)
        return name, p.regions[name]

    def pick_page(self, r: _Region, prefer: list[bool] | None = None) -> int:
        if prefer is not None and self.rng.random() < 0.7:
            good = [i for i, b in enumerate(prefer) if b]
            if good:
                return self.rng.choice(good)
        return self.rng.randrange(r.pages)

    def subrange(self, r: _Region) -> tuple[int, int]:
        start = self.rng.randrange(r.pages)
        return start, self.rng.randint(1, r.pages - start)

    def add(self, op: str, proc: str, **fields: Any) -> dict[str, Any]:
        st = {"op": op, "proc": proc, **fields}
        self.steps.append(st)
        return st

    # -- operations ------------------------------------------------------------------------------

    def op_mmap(self) -> bool:
        if self.nregions >= self.max_regions:
            return False
        p = self.pick_proc(with_regions=False)
        if p is None:
            return False
        name = f"r{self.nregions}"
        self.nregions += 1
        pages = self.rng.randint(1, 8)
        prot = "r" if self.rng.random() < 0.1 else "rw"
        uffd = "wp" if self.rng.random() < 0.5 else None
        st = self.add("mmap", p.name, region=name, pages=pages)
        if prot != "rw":
            st["prot"] = prot
        if uffd:
            st["uffd"] = uffd
        p.regions[name] = _Region(pages, prot, [True] * pages, [uffd is not None] * pages, [False] * pages)
        return True

    def op_access(self, op: str) -> bool:
        p = self.pick_proc()
        if p is None:
            return False
        if op == "write":
            name, r = self.pick_region(p)
            page = self.pick_page(r)
            self.add("write", p.name, at=[name, page], value=self.rng.randrange(1, 1 << 32))
            if r.mapped[page] and r.prot == "rw":
                r.written[page] = True
        else:
            name, r = self.pick_region(p, prefer="written")
            page = self.pick_page(r, prefer=r.written)
            self.add(op, p.name, at=[name, page])
        return True

    def op_move(self) -> bool:
        p = self.pick_proc()
        if p is None:
            return False
        rng = self.rng
        sname, s = self.pick_region(p, prefer="written")
        dname, d = self.pick_region(p, prefer="registered")
        spage = self.pick_page(s, prefer=s.written)
        dpage = self.pick_page(d, prefer=[not w for w in d.written] if any(d.registered) else None)
        room = min(s.pages - spage, d.pages - dpage)
        pages = rng.randint(1, max(1, min(room, 4)))
        st: dict[str, Any] = {"op": "move", "proc": p.name, "dst": [dname, dpage], "src": [sname, spage]}
        bad = rng.random()
        if bad < 0.04:  # a misaligned address
            which = rng.choice(("dst", "src"))
            st[which] = [st[which][0], st[which][1], rng.choice((1, 8, 2048, 4095))]
            st["pages"] = pages
        elif bad < 0.08:  # a misaligned or zero length
            st["len"] = rng.choice((0, pages * PAGE + rng.choice((1, 512, PAGE - 1)), 100))
        elif bad < 0.14:  # too long: the dst range (or the src range) runs past its region
            over = rng.randint(1, 3)
            if rng.random() < 0.5:
                st["pages"] = d.pages - dpage + over
            else:
                st["pages"] = s.pages - spage + over
        else:
            st["pages"] = pages
        modes: list[str] = []
        if rng.random() < 0.3:
            modes.append("allow_src_holes")
        if rng.random() < 0.1:
            modes.append("dontwake")
        if rng.random() < 0.03:
            st["mode"] = rng.choice((4, 8, 1 << 5)) | (2 if modes else 0)
        elif modes:
            st["mode"] = modes
        self.steps.append(st)
        # Best-effort bookkeeping (only used to bias later choices).
        n = st.get("pages", 0)
        if "len" not in st and len(st["dst"]) == 2 and len(st["src"]) == 2:
            for i in range(n):
                if spage + i < s.pages and dpage + i < d.pages and s.written[spage + i] and not d.written[dpage + i]:
                    if d.registered[dpage + i] and not (sname == dname and spage + i == dpage + i):
                        d.written[dpage + i] = True
                        s.written[spage + i] = False
        return True

    def op_fork(self) -> bool:
        if self.created >= MAX_PROCESSES:
            return False
        p = self.pick_proc(with_regions=False)
        if p is None:
            return False
        child = CHILD_NAMES[self.created - len(self.roots)]
        self.created += 1
        self.add("fork", p.name, child=child)
        self.procs[child] = p.copy_for_child(child, self.wiped.get(p.name, set()))
        self.wiped[child] = set(self.wiped.get(p.name, set()))
        self.alive.append(child)
        return True

    def op_exit(self) -> bool:
        # Keep at least one live process that has regions, so that every later step has a target.
        cands = [n for n in self.alive if any(self.procs[o].regions for o in self.alive if o != n)]
        if not cands:
            return False
        name = self.rng.choice(cands)
        self.add("exit", name)
        self.alive.remove(name)
        return True

    def op_madvise(self) -> bool:
        p = self.pick_proc()
        if p is None:
            return False
        name, r = self.pick_region(p)
        start, n = self.subrange(r)
        advice = self.rng.choice(ADVICE)
        self.add("madvise", p.name, at=[name, start], pages=n, advice=advice)
        if advice == "wipeonfork":
            self.wiped.setdefault(p.name, set()).add(name)
        return True

    def op_munmap(self) -> bool:
        p = self.pick_proc()
        if p is None:
            return False
        name, r = self.pick_region(p)
        start, n = self.subrange(r)
        self.add("munmap", p.name, at=[name, start], pages=n)
        for i in range(start, start + n):
            r.mapped[i] = r.registered[i] = r.written[i] = False
        return True

    def op_register(self, on: bool) -> bool:
        p = self.pick_proc()
        if p is None:
            return False
        name, r = self.pick_region(p)
        start, n = self.subrange(r)
        if on:
            self.add("uffd_register", p.name, at=[name, start], pages=n, mode="wp")
        else:
            self.add("uffd_unregister", p.name, at=[name, start], pages=n)
        for i in range(start, start + n):
            r.registered[i] = on and r.mapped[i]
        return True

    # -- driver ----------------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        rng = self.rng
        length = rng.randint(5, 30)
        self.op_mmap()
        self.op_mmap()  # at least two regions
        table = (
            ("mmap", 6), ("write", 18), ("read", 6), ("peek", 7), ("present", 4), ("mapcount", 9),
            ("move", 22), ("fork", 5), ("exit", 3), ("madvise", 4), ("munmap", 3), ("register", 4),
            ("unregister", 2),
        )
        ops = [o for o, _ in table]
        weights = [w for _, w in table]
        while len(self.steps) < length:
            op = rng.choices(ops, weights)[0]
            if op == "mmap":
                self.op_mmap()
            elif op in ("write", "read", "peek", "present", "mapcount"):
                self.op_access(op)
            elif op == "move":
                self.op_move()
            elif op == "fork":
                self.op_fork()
            elif op == "exit":
                self.op_exit()
            elif op == "madvise":
                self.op_madvise()
            elif op == "munmap":
                self.op_munmap()
            else:
                self.op_register(op == "register")
        return self.steps


def random_scenario(rng: random.Random, name: str) -> Scenario:
    """A random, valid, non-blocking scenario drawn from ``rng``."""
    g = _Gen(rng)
    steps = g.run()
    s = Scenario(
        name=name,
        steps=steps,
        processes=list(g.roots),
        description=f"random scenario: {len(steps)} steps, {g.created} processes, {g.nregions} regions",
    )
    s.validate()
    return s
