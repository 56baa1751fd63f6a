"""Seeded random conformance scenarios (``mmsim conformance --random N --seed S``).

``random_scenario(rng, name)`` builds a scenario of 5 to 30 steps over 1 to 3 processes and 2 to 4
regions of 1 to 8 pages each (plus the regions of up to 3 fault episodes and the regions bound by
``mremap``), mixing every step kind of the format:

* the original operations, still the majority of the steps (UFFDIO_MOVE first among them):
  mmap, write, read, peek, present, mapcount, move, fork, exit, madvise (the fork flags), munmap,
  uffd_register ("wp") and uffd_unregister;
* ``mprotect`` of a subrange (or the whole) of a region to "none", "r" or "rw";
* ``madvise`` "dontneed" of a subrange (sometimes misaligned);
* ``mremap`` of a whole region: a shrink, a grow without MREMAP_MAYMOVE (ENOMEM where a neighbour is
  in the way), a move with "maymove" to a larger size, a move with "maymove" and "dontunmap" (same
  size), or a flag combination that is EINVAL;
* ``copy`` (UFFDIO_COPY) and ``zeropage`` (UFFDIO_ZEROPAGE) of a few pages, mostly into registered
  ranges, sometimes misaligned, of a bad length, with unknown mode bits or into unregistered pages;
* ``wake`` (UFFDIO_WAKE) of a range of a region (sometimes misaligned or of a bad length);
* fault episodes (below): ``fault``, ``events``, ``fault_status`` and resolutions by ``copy``,
  ``zeropage`` or ``move``, and ``wake``.

Each random step draws its kind from ``WEIGHTS``: about three quarters of the steps are original
operations (a move about one step in six), and nine scenarios in ten have some new operation,
four in ten a fault episode.

What it generates is always runnable on the live kernel:

* every region a step names exists in the acting process: a child inherits the regions its parent
  has at the fork, a region mapped later exists only in the process that mapped it (the generator
  keeps one region set per process);
* no step acts on a process that has exited, and at least one process stays alive;
* no step but a ``fault`` can block in the kernel: outside fault episodes, userfaultfd ranges are
  registered in "wp" mode only and nothing write-protects a page (no UFFDIO_WRITEPROTECT, no copy
  with mode "wp", no raw mode bit 1 << 1), so no access waits for a handler;
* a move's source range never runs past the end of its region's pages unless it is one of the
  deliberately bad moves (the kernel runner keeps a guard mapping above the regions, so such a
  move is EINVAL on both sides), and accesses only address pages of the region; copies, zero-fills
  and wakes stay inside their region too;
* a ``mremap`` binds a new region name only where it certainly succeeds (the generator tracks
  whether a region is still one mapping, with every page mapped, and whether anything may have
  changed it behind its name), so every name a later step uses has an address.

Fault episodes. The only "missing" registrations are the fresh regions of fault episodes, each
made in one process (at most ``MAX_PENDING_FAULTS`` faults per process in a scenario, so even a
shrunk scenario whose faults all stay blocked never runs out of fault threads): the region is
mapped with ``uffd: "missing"``, a ``fault`` (read or write, a unique id) is started on one of its
pages, maybe an ``events`` step reads its message; later (random steps may come in between) the
page is resolved by ``copy``, ``zeropage`` or ``move`` (from a page of another region of the same
process, written by the episode just before when the move must certainly succeed), possibly with
"dontwake", or a different page of the region is filled, or nothing is done; then a ``wake`` (of
the faulted page only where the episode certainly resolved it, so a fault is never woken while its
page is missing) and a ``fault_status``. Random steps of the owning process never touch an episode
region (a fork child gets it as an ordinary, unregistered region). So every step's answer is
settled, also after shrinking removes any subset of steps: a fault whose page is never resolved
stays blocked, a fault resolved with "dontwake" stays blocked until a wake, a resolved one
finishes; ``fault_status`` without its ``fault`` does not validate. A missing range must not be
aliased by older region names: an episode region is mapped only in a process where nothing has
been unmapped yet (every older region name still covers exactly its own mapping, so the new
region lands in fresh address space and no other name reaches it), and it is never unmapped by
its owner. ``events`` steps are only made inside episodes, right after the fault or the
resolution, never after a wake.

Swap. With ``swap=True`` (``mmsim conformance --random N --swap``) random steps also draw
``madvise`` pageout and cold of a subrange (sometimes misaligned: EINVAL) and ``pte`` observations
(``SWAP_WEIGHTS``); such scenarios run on the kernel and on mmsim like any other (one that pages
out needs an active swap device on the kernel's side). Without it (the default) the same ``rng``
state gives the very scenario it gave before swap steps existed.

Large folios. With ``thp=True`` random steps also draw (``THP_WEIGHTS``) 2 MiB-aligned regions of
512 or 1024 pages (``"align": "pmd"``, registered "wp" half the time) followed at once by
hugepage advice (nohugepage now and then) over the whole region, before anything touches it;
hugepage or nohugepage advice over a subrange of any region; and moves of a whole PMD (512 pages,
from a PMD boundary of one aligned region to one of another, registered, aligned region). Such
scenarios run on the kernel and on mmsim like any other. Without it (the default) the same
``rng`` state gives the very scenario it gave before.

Pins. With ``pin=True`` random steps also draw (``PIN_WEIGHTS``) ``pin`` of 1 to 3 pages of a
region, mostly from a present, writable page (written, mapped, read-write; now and then any
page, so a hole or a read-only page answers EFAULT; rarely from a byte offset, still inside the
region), and ``unpin`` of a pin the process still holds. A pin never touches a fault episode's
MISSING-registered region (whose missing pages its write fault would wait on), and nothing
write-protects a page, so a pin never blocks. A fork child holds none of its parent's pins; an
exited process's pins are gone with it. Without it (the default) the same ``rng`` state gives
the very scenario it gave before.

The same ``rng`` state gives the same scenario (only ``rng`` is drawn from, and every choice is
made over ordered lists).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .scenario import ADVICE, MAX_PENDING_FAULTS, PAGE, PMD_SIZE, PROTS, RECLAIM_ADVICE, THP_ADVICE, Scenario

MAX_PROCESSES = 3
MAX_STEPS = 30
#: Fault episodes in one scenario, at most.
MAX_EPISODES = 3
ROOT_NAMES = ("P", "Q")
CHILD_NAMES = ("C", "D")
#: The operations random steps draw from, with their weights. The original ones (mmap to
#: unregister) keep most of the weight, and a move is still the most likely single step.
WEIGHTS = (
    ("mmap", 6), ("write", 18), ("read", 6), ("peek", 7), ("present", 4), ("mapcount", 9),
    ("move", 22), ("fork", 5), ("exit", 3), ("madvise", 4), ("munmap", 3), ("register", 4),
    ("unregister", 2),
    ("mprotect", 4), ("dontneed", 3), ("mremap", 4), ("copy", 4), ("zeropage", 3), ("wake", 2),
    ("episode", 6),
)
#: The swap steps random steps also draw from with ``swap=True``.
SWAP_WEIGHTS = (("pageout", 12), ("cold", 3), ("pte", 10))
#: The large-folio steps random steps also draw from with ``thp=True``.
THP_WEIGHTS = (("thp_region", 6), ("hugepage", 3), ("pmd_move", 8))
#: The pin steps random steps also draw from with ``pin=True``.
PIN_WEIGHTS = (("pin", 10), ("unpin", 6))
#: The most pages one random pin takes.
PIN_PAGES = 3
#: The pages of a huge PMD.
PMD_PAGES = PMD_SIZE // PAGE
#: Raw mode bits a copy or zero-fill may carry that no kernel knows (never 1 << 1: "wp").
BAD_MODE_BITS = (1 << 2, 1 << 3, 1 << 5)


@dataclass
class _Region:
    pages: int
    prot: list[str]
    #: True where the page is certainly mapped, by this region's own mapping (False where it was
    #: unmapped, or may have been).
    mapped: list[bool]
    registered: list[bool]
    written: list[bool]
    dontfork: list[bool]
    #: Still (part of) one mapping with every page mapped: a whole-region mremap succeeds.
    intact: bool = True
    #: Mapped on a 2 MiB boundary (``"align": "pmd"``).
    aligned: bool = False

    @classmethod
    def new(cls, pages: int, prot: str, registered: bool, intact: bool = True) -> _Region:
        return cls(
            pages, [prot] * pages, [True] * pages, [registered] * pages, [False] * pages, [False] * pages, intact
        )

    def clone(self) -> _Region:
        return _Region(
            self.pages, list(self.prot), list(self.mapped), list(self.registered), list(self.written),
            list(self.dontfork), self.intact, self.aligned,
        )

    def unmap(self, start: int, n: int) -> None:
        for i in range(start, min(start + n, self.pages)):
            self.mapped[i] = self.registered[i] = self.written[i] = False
        if n > 0:
            self.intact = False


@dataclass
class _Proc:
    name: str
    #: The regions random steps use.
    regions: dict[str, _Region] = field(default_factory=dict)
    #: The fault-episode regions registered "missing" in this process: only their episode uses them.
    missing: dict[str, _Region] = field(default_factory=dict)
    #: Something was unmapped here: a new mapping may land in a hole inside an older region's range.
    holey: bool = False
    #: A step that changes mappings went through a page not certainly mapped by its region: it
    #: may have changed another region behind that region's name.
    tainted: bool = False
    #: Some range was marked dontfork (a child has a hole there).
    dontfork: bool = False
    #: Faults started by this process (each may stay unfinished).
    faults: int = 0
    #: The pins this process holds (a fork child holds none of them).
    pins: list[str] = field(default_factory=list)

    def copy_for_child(self, name: str, wiped: set[str]) -> _Proc:
        child = _Proc(name, holey=self.holey or self.dontfork, tainted=self.tainted, dontfork=self.dontfork)
        for rname, r in [*self.regions.items(), *self.missing.items()]:
            c = r.clone()
            c.registered = [False] * r.pages  # the child loses the userfaultfd registration
            if rname in wiped:
                c.written = [False] * r.pages
            for i in range(r.pages):
                if r.dontfork[i]:  # not inherited: a hole in the child
                    c.mapped[i] = c.written[i] = False
                    c.intact = False
            child.regions[rname] = c
        return child


class _Gen:
    def __init__(self, rng: random.Random, swap: bool = False, thp: bool = False, pin: bool = False) -> None:
        self.rng = rng
        self.weights: tuple[tuple[str, int], ...] = WEIGHTS + SWAP_WEIGHTS if swap else WEIGHTS
        self.thp = thp
        if thp:
            self.weights += THP_WEIGHTS
        if pin:
            self.weights += PIN_WEIGHTS
        self.steps: list[dict[str, Any]] = []
        roots = 1 if rng.random() < 0.8 else 2
        self.roots = list(ROOT_NAMES[:roots])
        self.procs: dict[str, _Proc] = {n: _Proc(n) for n in self.roots}
        self.alive: list[str] = list(self.roots)
        self.created = roots
        self.max_regions = rng.randint(2, 4)
        self.nregions = 0
        self.nremapped = 0
        self.nepisodes = 0
        self.npins = 0
        self.episode: Iterator[None] | None = None
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
        elif prefer == "intact":
            good = [n for n in names if p.regions[n].intact and not p.tainted]
            if good and self.rng.random() < 0.8:
                names = good
        name = self.rng.choice(names)
        return name, p.regions[name]

    def pick_page(self, r: _Region, prefer: list[bool] | None = None) -> int:
        if prefer is not None and self.rng.random() < 0.7:
            good = [i for i, b in enumerate(prefer) if b]
            if good:
                return self.rng.choice(good)
        return self.rng.randrange(r.pages)

    def subrange(self, r: _Region, whole: float = 0.0, most: int | None = None) -> tuple[int, int]:
        if whole and self.rng.random() < whole:
            return 0, r.pages
        start = self.rng.randrange(r.pages)
        return start, self.rng.randint(1, min(r.pages - start, most or r.pages))

    def add(self, op: str, proc: str, **fields: Any) -> dict[str, Any]:
        st = {"op": op, "proc": proc, **fields}
        self.steps.append(st)
        return st

    def touch(self, p: _Proc, r: _Region, start: int, n: int, split: bool = True) -> None:
        """Bookkeeping for a step that changes the mappings of ``[start, start + n)``."""
        if split and (start, n) != (0, r.pages):
            r.intact = False
        if not all(r.mapped[start : start + n]):
            # Through a hole the step may reach whatever was mapped there later.
            p.tainted = True
            for other in p.regions.values():
                other.intact = False

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
        p.regions[name] = _Region.new(pages, prot, uffd is not None, intact=not p.tainted)
        return True

    def op_thp_region(self) -> bool:
        """A 2 MiB-aligned region of one or two PMDs, with hugepage (or nohugepage) advice over it
        at once."""
        if self.nregions >= self.max_regions:
            return False
        p = self.pick_proc(with_regions=False)
        if p is None:
            return False
        rng = self.rng
        name = f"r{self.nregions}"
        self.nregions += 1
        pages = PMD_PAGES * rng.choice((1, 1, 2))
        uffd = "wp" if rng.random() < 0.5 else None
        st = self.add("mmap", p.name, region=name, pages=pages, align="pmd")
        if uffd:
            st["uffd"] = uffd
        advice = "hugepage" if rng.random() < 0.85 else "nohugepage"
        self.add("madvise", p.name, at=[name, 0], pages=pages, advice=advice)
        r = _Region.new(pages, "rw", uffd is not None, intact=not p.tainted)
        r.aligned = True
        p.regions[name] = r
        return True

    def op_hugepage(self) -> bool:
        """Hugepage or nohugepage advice over a subrange of a region."""
        p = self.pick_proc()
        if p is None:
            return False
        name, r = self.pick_region(p)
        start, n = self.subrange(r, whole=0.5)
        self.add("madvise", p.name, at=[name, start], pages=n, advice=self.rng.choice(THP_ADVICE))
        self.touch(p, r, start, n)
        return True

    def op_pmd_move(self) -> bool:
        """A move of a whole PMD, between PMD boundaries of two aligned regions of a process (the
        destination registered there)."""
        cands = [
            (self.procs[n], s, d)
            for n in self.alive
            for s, sr in self.procs[n].regions.items()
            for d, dr in self.procs[n].regions.items()
            if s != d and sr.aligned and dr.aligned and any(dr.registered)
            and sr.pages >= PMD_PAGES and dr.pages >= PMD_PAGES
        ]
        if not cands:
            return False
        rng = self.rng
        p, sname, dname = rng.choice(cands)
        s, d = p.regions[sname], p.regions[dname]
        spage = PMD_PAGES * rng.randrange(s.pages // PMD_PAGES)
        dpage = PMD_PAGES * rng.randrange(d.pages // PMD_PAGES)
        st = self.add("move", p.name, dst=[dname, dpage], src=[sname, spage], pages=PMD_PAGES)
        if rng.random() < 0.3:
            st["mode"] = ["allow_src_holes"]
        for i in range(PMD_PAGES):
            if s.written[spage + i] and not d.written[dpage + i] and d.registered[dpage + i]:
                d.written[dpage + i] = True
                s.written[spage + i] = False
        return True

    def op_pin(self) -> bool:
        """A pin of 1 to PIN_PAGES pages of a region (not a fault episode's), mostly from a present,
        writable page."""
        p = self.pick_proc()
        if p is None:
            return False
        name, r = self.pick_region(p, prefer="written")
        writable = [w and m and prot == "rw" for w, m, prot in zip(r.written, r.mapped, r.prot, strict=True)]
        page = self.pick_page(r, prefer=writable)
        n = self.rng.randint(1, min(PIN_PAGES, r.pages - page))
        at: list[Any] = [name, page]
        if self.rng.random() < 0.05 and page + n < r.pages:  # from a byte offset: the page after too
            at.append(self.rng.choice((8, 2048)))
        pin = f"pin{self.npins}"
        self.npins += 1
        self.add("pin", p.name, at=at, pages=n, pin=pin)
        p.pins.append(pin)
        return True

    def op_unpin(self) -> bool:
        """The unpin of a pin a live process holds."""
        cands = [self.procs[n] for n in self.alive if self.procs[n].pins]
        if not cands:
            return False
        p = self.rng.choice(cands)
        pin = self.rng.choice(p.pins)
        p.pins.remove(pin)
        self.add("unpin", p.name, pin=pin)
        return True

    def op_access(self, op: str) -> bool:
        p = self.pick_proc()
        if p is None:
            return False
        if op == "write":
            name, r = self.pick_region(p)
            page = self.pick_page(r)
            self.add("write", p.name, at=[name, page], value=self.rng.randrange(1, 1 << 32))
            if r.mapped[page] and r.prot[page] == "rw":
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
        self.touch(p, r, start, n)
        if advice == "wipeonfork":
            self.wiped.setdefault(p.name, set()).add(name)
        elif advice in ("dontfork", "dofork"):
            p.dontfork = p.dontfork or advice == "dontfork"
            for i in range(start, start + n):
                r.dontfork[i] = advice == "dontfork"
        return True

    def op_munmap(self) -> bool:
        p = self.pick_proc()
        if p is None:
            return False
        name, r = self.pick_region(p)
        start, n = self.subrange(r)
        self.add("munmap", p.name, at=[name, start], pages=n)
        self.touch(p, r, start, n)
        r.unmap(start, n)
        p.holey = True
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
        self.touch(p, r, start, n)
        for i in range(start, start + n):
            r.registered[i] = on and r.mapped[i]
        return True

    def op_mprotect(self) -> bool:
        p = self.pick_proc()
        if p is None:
            return False
        name, r = self.pick_region(p)
        start, n = self.subrange(r, whole=0.3)
        prot = self.rng.choice(PROTS)
        self.add("mprotect", p.name, at=[name, start], pages=n, prot=prot)
        self.touch(p, r, start, n)
        for i in range(start, start + n):
            if r.mapped[i]:
                r.prot[i] = prot
        return True

    def op_dontneed(self) -> bool:
        p = self.pick_proc()
        if p is None:
            return False
        name, r = self.pick_region(p, prefer="written")
        start, n = self.subrange(r)
        at: list[Any] = [name, start]
        if self.rng.random() < 0.05:
            at.append(self.rng.choice((16, 2048)))  # misaligned: EINVAL, nothing dropped
        self.add("madvise", p.name, at=at, pages=n, advice="dontneed")
        if len(at) == 2:
            for i in range(start, start + n):
                r.written[i] = False
        return True

    def op_reclaim(self, advice: str) -> bool:
        """``madvise`` pageout or cold of a subrange of a region (rarely misaligned: EINVAL)."""
        assert advice in RECLAIM_ADVICE
        p = self.pick_proc()
        if p is None:
            return False
        name, r = self.pick_region(p, prefer="written")
        start, n = self.subrange(r, whole=0.3)
        at: list[Any] = [name, start]
        if self.rng.random() < 0.05:
            at.append(self.rng.choice((16, 2048)))
        self.add("madvise", p.name, at=at, pages=n, advice=advice)
        return True

    def op_mremap(self) -> bool:
        p = self.pick_proc()
        if p is None:
            return False
        rng = self.rng
        name, r = self.pick_region(p, prefer="intact")
        kind = rng.choices(("shrink", "grow", "move", "dontunmap", "bad"), (3, 2, 4, 3, 1))[0]
        if kind == "shrink" and r.pages < 2:
            kind = "move"
        st: dict[str, Any] = {"op": "mremap", "proc": p.name, "at": [name, 0], "pages": r.pages}
        certain = r.intact and not p.tainted  # one mapping, every page mapped, nothing aliased
        new_name = f"m{self.nremapped}"
        if kind == "bad":
            bad = rng.randrange(3)
            if bad == 0:  # DONTUNMAP with a size change
                st.update(new_pages=r.pages + 1, flags=["maymove", "dontunmap"])
            elif bad == 1:  # a misaligned start
                st.update(at=[name, 0, rng.choice((8, 2048))], new_pages=r.pages, flags=["maymove"])
            else:  # flags mremap does not know
                st.update(new_pages=r.pages, flags=rng.choice((8, 16 | 1)))
            self.steps.append(st)
            return True
        if kind == "shrink":
            new = rng.randint(1, r.pages - 1)
            st["new_pages"] = new
            if rng.random() < 0.3:
                st["flags"] = ["maymove"]
            # Succeeds (in place) whenever the first page is mapped; the tail is unmapped then.
            bind = r.mapped[0] and not p.tainted and rng.random() < 0.6
            self.touch(p, r, 0, r.pages)
            p.holey = True
            if bind:
                st["region"] = new_name
                self.nremapped += 1
                head = r.clone()
                head.pages = new
                for key in ("prot", "mapped", "registered", "written", "dontfork"):
                    setattr(head, key, getattr(r, key)[:new])
                head.intact = r.intact
                # The old name now covers the new one and an unmapped tail: retire it.
                del p.regions[name]
                p.regions[new_name] = head
            else:
                r.unmap(new, r.pages - new)
            self.steps.append(st)
            return True
        if kind == "grow":  # in place or not at all (ENOMEM where something is in the way)
            st["new_pages"] = r.pages + rng.randint(1, 4)
            self.steps.append(st)
            return True
        # A move, to a larger size with MAYMOVE, or to the same size with DONTUNMAP.
        dontunmap = kind == "dontunmap"
        new = r.pages if dontunmap else r.pages + rng.randint(1, 3)
        st.update(new_pages=new, flags=["maymove", "dontunmap"] if dontunmap else ["maymove"])
        bind = certain and rng.random() < 0.85
        self.touch(p, r, 0, r.pages, split=False)
        if bind:
            st["region"] = new_name
            self.nremapped += 1
            moved = _Region.new(new, r.prot[0], registered=False)  # a moved range is not registered
            moved.written[: r.pages] = r.written
            moved.dontfork = [r.dontfork[0]] * new
            p.regions[new_name] = moved
        if dontunmap:
            # The old range stays mapped (and registered), empty if the move took place.
            r.written = [False] * r.pages
        elif bind and p.holey:
            # With free space above it the range may have grown in place, under both names.
            del p.regions[name]
        else:
            # Moved away (nothing above it is free where nothing was ever unmapped), or maybe.
            r.unmap(0, r.pages)
        if not dontunmap:
            p.holey = True
        self.steps.append(st)
        return True

    def op_copy(self, op: str) -> bool:
        p = self.pick_proc()
        if p is None:
            return False
        rng = self.rng
        name, r = self.pick_region(p, prefer="registered")
        page = self.pick_page(r, prefer=[g and not w for g, w in zip(r.registered, r.written, strict=True)])
        n = rng.randint(1, min(r.pages - page, 3))
        st: dict[str, Any] = {"op": op, "proc": p.name, "dst": [name, page]}
        bad = rng.random()
        good = False
        if bad < 0.05:  # a misaligned destination
            st["dst"] = [name, page, rng.choice((8, 512, PAGE - 1))]
            st["pages"] = n
        elif bad < 0.10:  # a zero length or one that is not whole pages
            st["len"] = rng.choice((0, n * PAGE + rng.choice((1, 512)), 100))
        else:
            st["pages"] = n
            good = True
        if op == "copy":
            if rng.random() < 0.3:
                st["values"] = [rng.randrange(1, 1 << 32) for _ in range(n)]
            else:
                st["value"] = rng.randrange(1, 1 << 32)
        if rng.random() < 0.04:
            st["mode"] = rng.choice(BAD_MODE_BITS) | rng.choice((0, 1))
            good = False
        elif rng.random() < 0.15:
            st["mode"] = ["dontwake"]
        self.steps.append(st)
        if good:  # best effort: fills the registered pages up to the first one present
            for i in range(page, page + n):
                if not (r.mapped[i] and r.registered[i]) or r.written[i]:
                    break
                r.written[i] = op == "copy"
        return True

    def op_wake(self) -> bool:
        p = self.pick_proc()
        if p is None:
            return False
        rng = self.rng
        name, r = self.pick_region(p, prefer="registered")
        start, n = self.subrange(r, most=4)
        st = self.add("wake", p.name, at=[name, start], pages=n)
        bad = rng.random()
        if bad < 0.07:
            st["at"] = [name, start, rng.choice((8, 2048))]
        elif bad < 0.14:
            del st["pages"]
            st["len"] = rng.choice((0, 100, n * PAGE + 1))
        return True

    # -- fault episodes --------------------------------------------------------------------------

    def op_episode(self) -> bool:
        if self.episode is not None or self.nepisodes >= MAX_EPISODES or len(self.steps) + 3 > MAX_STEPS:
            return False
        # Only where nothing was unmapped: the new missing range then aliases no older name.
        cands = [
            self.procs[n] for n in self.alive if not self.procs[n].holey and self.procs[n].faults < MAX_PENDING_FAULTS
        ]
        if not cands:
            return False
        self.episode = self._episode(self.rng.choice(cands))
        self.advance_episode()
        return True

    def advance_episode(self) -> None:
        assert self.episode is not None
        try:
            next(self.episode)
        except StopIteration:
            self.episode = None

    def _episode(self, p: _Proc) -> Iterator[None]:
        """The steps of one fault episode, in three groups; random steps may come between them."""
        rng = self.rng
        k = self.nepisodes
        self.nepisodes += 1
        name, fid = f"f{k}", f"fault{k}"
        pages = rng.randint(1, 4)
        self.add("mmap", p.name, region=name, pages=pages, uffd="missing")
        f = _Region.new(pages, "rw", registered=True, intact=not p.tainted)
        p.missing[name] = f
        q = rng.randrange(pages)
        fault = self.add("fault", p.name, at=[name, q], id=fid)
        write = rng.random() < 0.35
        if write:
            fault.update(write=True, value=rng.randrange(1, 1 << 32))
        p.faults += 1
        if rng.random() < 0.6:
            self.add("events", p.name)
        yield

        # The resolution: the page, certainly resolved or not; with DONTWAKE or not.
        if p.name not in self.alive or len(self.steps) + 3 > MAX_STEPS:
            return
        kind = rng.choices(("copy", "zeropage", "move", "other", "none"), (35, 20, 30, 8, 7))[0]
        srcs = [(n, r) for n, r in p.regions.items() if any(r.mapped)]
        if kind == "move" and not srcs:
            kind = "copy"
        if kind == "other" and pages < 2:
            kind = "none"
        resolved = dontwake = False
        if kind in ("copy", "zeropage"):
            lo, hi = q, q + 1
            if rng.random() < 0.3:  # a range around the page
                lo, hi = rng.randint(0, q), rng.randint(q + 1, pages)
            st = self.add(kind, p.name, dst=[name, lo], pages=hi - lo)
            if kind == "copy":
                if hi - lo > 1 and rng.random() < 0.5:
                    st["values"] = [rng.randrange(1 << 32) for _ in range(hi - lo)]
                else:
                    st["value"] = rng.randrange(1 << 32)
            dontwake = rng.random() < 0.3
            if dontwake:
                st["mode"] = ["dontwake"]
            resolved = True
            for i in range(lo, hi):
                f.written[i] = kind == "copy"
        elif kind == "move":
            written = [(n, r) for n, r in srcs if any(w and m for w, m in zip(r.written, r.mapped, strict=True))]
            sname, s = rng.choice(written if written and rng.random() < 0.7 else srcs)
            spage = self.pick_page(s, prefer=[w and m for w, m in zip(s.written, s.mapped, strict=True)])
            # Certain to succeed: a page of one untouched rw mapping, written (so exclusive) right now.
            sure = s.intact and not p.tainted and s.prot[spage] == "rw" and s.mapped[spage]
            if sure or rng.random() < 0.5:
                self.add("write", p.name, at=[sname, spage], value=rng.randrange(1, 1 << 32))
                if s.mapped[spage] and s.prot[spage] == "rw":
                    s.written[spage] = True
            else:
                sure = False
            st = self.add("move", p.name, dst=[name, q], src=[sname, spage], pages=1)
            dontwake = sure and rng.random() < 0.35
            if dontwake:
                st["mode"] = ["dontwake"]
            resolved = sure
            if sure:
                s.written[spage] = False
                f.written[q] = True
        elif kind == "other":  # fill another page: the fault stays blocked
            other = rng.choice([i for i in range(pages) if i != q])
            if rng.random() < 0.5:
                self.add("copy", p.name, dst=[name, other], pages=1, value=rng.randrange(1, 1 << 32))
                f.written[other] = True
            else:
                self.add("zeropage", p.name, dst=[name, other], pages=1)
        if rng.random() < 0.15:
            self.add("events", p.name)
        yield

        # A wake (of the faulted page only once it is certainly resolved), then the status.
        if p.name not in self.alive or len(self.steps) + 2 > MAX_STEPS:
            return
        if resolved and (dontwake or rng.random() < 0.2):
            if rng.random() < 0.7:
                self.add("wake", p.name, at=[name, q], pages=1)
            else:
                self.add("wake", p.name, at=[name, 0], pages=pages)
        elif pages > 1 and rng.random() < 0.1:  # a wake of another page wakes nothing
            self.add("wake", p.name, at=[name, rng.choice([i for i in range(pages) if i != q])], pages=1)
        if rng.random() < 0.9:
            self.add("fault_status", p.name, id=fid)

    # -- driver ----------------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        rng = self.rng
        length = rng.randint(5, MAX_STEPS)
        for _ in range(2):  # at least two regions (with ``thp``, aligned ones half the time)
            if self.thp and rng.random() < 0.5:
                self.op_thp_region()
            else:
                self.op_mmap()
        ops = [o for o, _ in self.weights]
        weights = [w for _, w in self.weights]
        while len(self.steps) < length:
            if self.episode is not None and rng.random() < 0.5:
                self.advance_episode()
                continue
            op = rng.choices(ops, weights)[0]
            if op == "mmap":
                self.op_mmap()
            elif op in ("write", "read", "peek", "present", "mapcount", "pte"):
                self.op_access(op)
            elif op in RECLAIM_ADVICE:
                self.op_reclaim(op)
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
            elif op in ("register", "unregister"):
                self.op_register(op == "register")
            elif op == "mprotect":
                self.op_mprotect()
            elif op == "dontneed":
                self.op_dontneed()
            elif op == "mremap":
                self.op_mremap()
            elif op in ("copy", "zeropage"):
                self.op_copy(op)
            elif op == "wake":
                self.op_wake()
            elif op == "thp_region":
                self.op_thp_region()
            elif op == "hugepage":
                self.op_hugepage()
            elif op == "pmd_move":
                self.op_pmd_move()
            elif op == "pin":
                self.op_pin()
            elif op == "unpin":
                self.op_unpin()
            else:
                self.op_episode()
        while self.episode is not None:  # finish the open episode, where there is room
            self.advance_episode()
        return self.steps


def random_scenario(
    rng: random.Random, name: str, swap: bool = False, thp: bool = False, pin: bool = False
) -> Scenario:
    """A random, valid scenario drawn from ``rng`` whose every answer is settled on the kernel;
    with ``swap``, also with pageout, cold and ``pte`` steps; with ``thp``, also with aligned
    regions, hugepage advice and moves of whole PMDs; with ``pin``, also with pins and unpins."""
    g = _Gen(rng, swap, thp, pin)
    steps = g.run()
    s = Scenario(
        name=name,
        steps=steps,
        processes=list(g.roots),
        description=(
            f"random scenario: {len(steps)} steps, {g.created} processes, {g.nregions} regions, "
            f"{g.nepisodes} fault episodes"
        ),
    )
    s.validate()
    return s
