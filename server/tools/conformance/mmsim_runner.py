"""Replaying a scenario on mmsim through the SDK, and comparing it with the kernel's run.

A scenario runs on a server whose transparent hugepage settings are the ones it runs under on the
kernel (its ``thp`` settings over THP_BASELINE): ``server_settings`` gives that server's
settings, and a server with others refuses it with SettingsMismatch, naming what differs.

``pin`` is ``Process.pin`` of the step's pages, kept by the scenario's pin name until ``unpin``
(``Process.unpin``); an ``unpin`` whose pin step failed answers EINVAL, as the kernel runner does.
"""

from __future__ import annotations

import asyncio
import errno as errno_mod
import time
from dataclasses import dataclass, field
from typing import Any

from mmsim.client import Client, MmsimError, Pin, Process, ThpSettings, ops

from ...mm.kernel import thp_size_order
from ...thp import format_mthp_sizes, size_policies
from .kernel import THP_BASELINE
from .scenario import (
    FIELDS,
    FILL_VMAS_PAGES,
    MAX_MAP_COUNT,
    PAGE,
    PMD_SIZE,
    UNRECORDED,
    Scenario,
    StepResult,
    copy_mode,
    copy_values,
    event_entry,
    length,
    move_mode,
    place,
    remap_flags,
    uses_thp,
)

#: How long a ``fault`` or ``fault_status`` step waits for a fault to settle (asleep or done).
SETTLE_S = 2.0
#: Polls of a fault seen asleep, in a row, before ``fault_status`` calls it blocked.
SETTLED_POLLS = 3
POLL_S = 0.005
#: The mprotects of a ``fill_vmas`` step go in Batch calls of this many (the server takes 10,000).
FILL_BATCH = 5000


class SettingsMismatch(Exception):
    """The server's transparent hugepage settings are not the ones the scenario runs under (its
    ``thp`` settings over the kernel runner's baseline, THP_BASELINE): the scenario cannot run
    there, and is skipped with ``reason``. The message is ``NAME: reason``."""

    def __init__(self, scenario: str, reason: str) -> None:
        super().__init__(f"{scenario}: {reason}")
        self.scenario = scenario
        self.reason = reason


def thp_orders(scenario: Scenario) -> tuple[str, bool, dict[int, str]]:
    """The THP settings ``scenario`` runs under, as the model takes them: ``enabled``,
    ``use_zero_page`` and the policy of each large folio order. SettingsMismatch for an mTHP size
    the model does not have (8kB) that is not ``never``."""
    thp = scenario.thp or {}
    orders: dict[int, str] = {}
    for size, policy in {**THP_BASELINE["mthp"], **thp.get("mthp", {})}.items():
        try:
            orders[thp_size_order(size)] = policy
        except ValueError:
            if policy != "never":
                raise SettingsMismatch(scenario.name, f"its thp settings ask for hugepages-{size} {policy}: mmsim "
                                       "has no large folios of that size (16kB to 2048kB)") from None
    enabled = thp.get("enabled", THP_BASELINE["enabled"])
    return enabled, bool(thp.get("use_zero_page", THP_BASELINE["use_zero_page"])), orders


def server_settings(scenario: Scenario) -> dict[str, Any]:
    """The settings (``ServerConfig`` fields: ``thp``, ``mthp_sizes``, ``thp_zero_page``) of a
    server that runs ``scenario`` under its THP settings; SettingsMismatch if no server can."""
    enabled, zero_page, orders = thp_orders(scenario)
    return {"thp": enabled, "mthp_sizes": format_mthp_sizes(orders), "thp_zero_page": zero_page}


def settings_mismatch(scenario: Scenario, server: ThpSettings | None) -> str | None:
    """Why a server with the THP settings ``server`` (None: it reports none, it has no large
    folios) cannot run ``scenario``, naming each setting that differs; None if it can.
    SettingsMismatch if no server can."""
    enabled, zero_page, orders = thp_orders(scenario)
    if server is None:
        if not uses_thp(scenario):
            return None
        return "a large-folio scenario, and the server reports no THP settings"
    wanted = size_policies(orders)
    differ = [f"enabled {enabled} (the server: {server.enabled})"] if server.enabled != enabled else []
    if server.use_zero_page != zero_page:
        differ.append(f"use_zero_page {int(zero_page)} (the server: {int(server.use_zero_page)})")
    for size in sorted({*wanted, *server.sizes}, key=lambda name: (len(name), name)):  # "16kB" ... "2048kB"
        if (want := wanted.get(size, "never")) != (has := server.policy(size)):
            differ.append(f"hugepages-{size} {want} (the server: {has})")
    if not differ:
        return None
    return f"runs under THP settings the server does not have: {', '.join(differ)}"


@dataclass
class _Run:
    """One scenario's state on mmsim: its processes, regions and fault tasks."""

    procs: dict[str, Process] = field(default_factory=dict)
    alive: set[str] = field(default_factory=set)
    addrs: dict[str, int] = field(default_factory=dict)
    #: name -> (start, pages), in binding order (the last binding of an address names it).
    regions: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: The processes that have the kernel runner's guard page mapped (own or inherited).
    guarded: set[str] = field(default_factory=set)
    #: fault id -> (the access in flight, its process, its address).
    faults: dict[str, tuple[asyncio.Task[Any], Process, int]] = field(default_factory=dict)
    #: pin name -> the pin, while it is held (a failed ``pin`` step leaves none).
    pins: dict[str, Pin] = field(default_factory=dict)

    def bind(self, name: str, start: int, pages: int) -> None:
        self.addrs[name] = start
        self.regions.pop(name, None)
        self.regions[name] = (start, pages)


class MmsimRunner:
    """Runs scenarios against one mmsim server, each in processes of its own (exited at the end)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def check(self, scenario: Scenario) -> None:
        """Raise SettingsMismatch, with the reason, if the server's THP settings are not those
        ``scenario`` runs under."""
        why = settings_mismatch(scenario, await self.client.thp())
        if why is not None:
            raise SettingsMismatch(scenario.name, why)

    async def run(self, scenario: Scenario, kernel: list[StepResult] | None = None) -> list[StepResult]:
        """Run ``scenario``. With the kernel's results, each region is mapped at the very
        address the kernel chose; without, mmsim places it (a region that asks for ``align``
        on a 2 MiB boundary). Raises SettingsMismatch before anything runs if the server's THP
        settings are not those the scenario runs under."""
        await self.check(scenario)
        run = _Run()
        for name in scenario.processes:
            run.procs[name] = await self.client.create_process()
            run.alive.add(name)
        results: list[StepResult] = []
        try:
            for i, step in enumerate(scenario.steps):
                proc = step.get("proc", scenario.processes[0])
                hint = kernel[i].addr if kernel is not None and kernel[i].addr is not None else None
                guard = kernel[i].guard if kernel is not None else None
                if guard and step["op"] == "mmap" and proc in run.alive and proc not in run.guarded:
                    # The kernel's helper has a PROT_NONE page right above its regions; the same
                    # neighbour decides whether a region can grow in place.
                    await run.procs[proc].mmap(PAGE, prot="none", addr=guard)
                    run.guarded.add(proc)
                r = StepResult()
                done = _DONE.get(step["op"])
                try:
                    if proc not in run.alive:
                        raise ProcessLookupError(errno_mod.ESRCH, "process gone")
                    await self._step(step, run, hint, r)
                except KeyError as e:  # a region whose mmap or mremap failed: no address, as the kernel runner says
                    r.errno = errno_mod.EINVAL
                    r.note = f"region {e.args[0]!r} has no address"
                except OSError as e:
                    r.errno = e.errno or 0
                    if done:
                        setattr(r, done, getattr(e, "moved", 0))
                except MmsimError as e:
                    r.errno = errno_mod.ESRCH if e.code is not None and e.code.name == "NOT_FOUND" else errno_mod.EINVAL
                    r.note = str(e)
                    if done:
                        setattr(r, done, 0)
                results.append(r)
        finally:
            for name in run.alive:
                try:
                    await run.procs[name].exit()
                except (OSError, MmsimError):
                    pass
            for task, _, _ in run.faults.values():  # the exits ended them; collect them
                task.cancel()
            await asyncio.gather(*(t for t, _, _ in run.faults.values()), return_exceptions=True)
        return results

    async def _step(self, st: dict[str, Any], run: _Run, hint: int | None, r: StepResult) -> None:
        op = st["op"]
        procs, addrs = run.procs, run.addrs
        p = procs[st.get("proc") or next(iter(procs))]
        if op == "mmap":
            start, end = await self._mmap(st, p, hint)
            run.bind(st["region"], start, int(st["pages"]))
            r.addr = start
            proc = st.get("proc") or next(iter(procs))
            if hint is None and proc not in run.guarded:
                # Run alone, mmsim places the first region at the top of the mmap area: give it the
                # PROT_NONE neighbour the kernel runner's regions have right above them.
                try:
                    await p.mmap(PAGE, prot="none", addr=end)
                except OSError:
                    pass
                run.guarded.add(proc)
            return
        if op == "fill_vmas":
            await self._fill_vmas(st, run, p, hint, r)
            return
        if op == "fork":
            procs[st["child"]] = await p.fork()
            run.alive.add(st["child"])
            if (st.get("proc") or next(iter(procs))) in run.guarded:
                run.guarded.add(st["child"])  # the child inherits the guard page
            return
        if op == "exit":
            await p.exit()
            run.alive.discard(st.get("proc") or next(iter(procs)))
            return
        if op == "move":
            mode = move_mode(st)
            r.moved = await p.remap(
                place(addrs, st["dst"]), place(addrs, st["src"]), length(st),
                allow_src_holes=bool(mode & 2), dontwake=bool(mode & 1), mode_bits=mode & ~3,
            )
            return
        if op in ("copy", "zeropage"):
            mode = copy_mode(st)
            dst = place(addrs, st["dst"])
            if op == "copy":
                vals = copy_values(st)
                values: int | list[int] = vals[0] if vals and all(v == vals[0] for v in vals) else vals
                r.copied = await p.uffd_copy(
                    dst, length(st), values, dontwake=bool(mode & 1), wp=bool(mode & 2), mode_bits=mode & ~3
                )
            else:
                r.zeroed = await p.uffd_zeropage(dst, length(st), dontwake=bool(mode & 1), mode_bits=mode & ~1)
            return
        if op == "events":
            r.events = [self._event(run, e) for e in await p.read_userfaults()]
            return
        if op == "fault_status":
            await self._fault_status(run, st["id"], r)
            return
        if op == "unpin":
            pin = run.pins.pop(st["pin"], None)
            if pin is None:  # its pin step failed: nothing to release
                raise OSError(errno_mod.EINVAL, f"no pin {st['pin']!r} is held")
            await p.unpin(pin)
            return
        addr = place(addrs, st["at"])
        if op == "mremap":
            await self._mremap(st, run, p, addr, hint, r)
            return
        if op == "fault":
            await self._fault(run, st, p, addr)
            return
        if op == "pte":
            await self._pte(p, addr, r)
            return
        if op == "pin":
            run.pins[st["pin"]] = await p.pin(addr, int(st["pages"]) * PAGE)
            return
        if op == "mprotect":
            await p.mprotect(addr, int(st["pages"]) * PAGE, st["prot"])
            return
        if op == "wake":
            await p.uffd_wake(addr, length(st))
            return
        if op == "munmap":
            await p.munmap(addr, int(st["pages"]) * PAGE)
        elif op == "madvise":
            await p.madvise(addr, int(st["pages"]) * PAGE, st["advice"])
        elif op == "uffd_register":
            await p.uffd_register(addr, int(st["pages"]) * PAGE, mode=st["mode"])
        elif op == "uffd_unregister":
            await p.uffd_unregister(addr, int(st["pages"]) * PAGE)
        elif op == "write":
            await p.write(addr, int(st["value"]))
        elif op == "read":
            r.value = await p.read(addr)
        else:  # peek, present, mapcount: no fault taken
            f = await p.folio(addr)
            r.present = f is not None
            if op == "peek" and f is not None:
                r.value = f.value
            if op == "mapcount" and f is not None:
                r.mapcount = f.mapcount


    @staticmethod
    async def _mmap(st: dict[str, Any], p: Process, hint: int | None) -> tuple[int, int]:
        """Map an ``mmap`` step's region where the kernel put it, or, alone, where mmsim places it;
        a region that asks for ``"align": "pmd"`` as the kernel runner maps one: 2 MiB more, then
        the slack below and above the 2 MiB boundary in it unmapped (and registered after, so
        only the region is). Its start and end."""
        size, prot, uffd = int(st["pages"]) * PAGE, st.get("prot", "rw"), st.get("uffd")
        if hint is not None or st.get("align") != "pmd":
            v = await p.mmap(size, prot=prot, uffd=uffd, addr=hint)
            return v.start, v.end
        v = await p.mmap(size + PMD_SIZE, prot=prot)
        start = (v.start + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
        if start > v.start:
            await p.munmap(v.start, start - v.start)
        if v.end > start + size:
            await p.munmap(start + size, v.end - start - size)
        if uffd:
            await p.uffd_register(start, size, mode=uffd)
        return start, start + size

    async def _fill_vmas(self, st: dict[str, Any], run: _Run, p: Process, hint: int | None, r: StepResult) -> None:
        """The region where the kernel put it (or, alone, placed top-down with a hole page on each
        side, as the kernel runner leaves it), then one-page mprotects until the process has
        MAX_MAP_COUNT - leave VMAs, in Batch calls."""
        pages = FILL_VMAS_PAGES
        if hint is None:
            v = await p.mmap((pages + 2) * PAGE, prot="rw")
            await p.munmap(v.start, PAGE)
            await p.munmap(v.end - PAGE, PAGE)
            start = v.start + PAGE
        else:
            start = (await p.mmap(pages * PAGE, prot="rw", addr=hint)).start
        run.bind(st["region"], start, pages)
        r.addr = start
        count = len(await p.vmas())
        need = MAX_MAP_COUNT - int(st["leave"]) - count
        if not 0 <= need < pages - 1:
            raise OSError(errno_mod.ERANGE, f"cannot fill {count} VMAs up to {MAX_MAP_COUNT} - {st['leave']}")
        splits = [ops.mprotect(p, start + (2 * i + 1) * PAGE, PAGE, "r") for i in range(need // 2)]
        if need % 2:
            splits.append(ops.mprotect(p, start + (pages - 1) * PAGE, PAGE, "r"))
        for i in range(0, len(splits), FILL_BATCH):
            for res in await self.client.batch(splits[i : i + FILL_BATCH], stop_on_error=True):
                if isinstance(res, BaseException):
                    raise res

    @staticmethod
    async def _mremap(st: dict[str, Any], run: _Run, p: Process, addr: int, hint: int | None, r: StepResult) -> None:
        flags = remap_flags(st)
        maymove, fixed_flag, dontunmap = bool(flags & 1), bool(flags & 2), bool(flags & 4)
        if flags & ~7:  # bits mremap does not know: EINVAL, before anything else
            raise OSError(errno_mod.EINVAL, f"unknown mremap flags {flags & ~7:#x}")
        fixed = place(run.addrs, st["to"]) if fixed_flag and "to" in st else None
        if fixed_flag and fixed is None:
            fixed = 0
        if fixed is None and hint is not None and hint != addr and maymove:
            # Where the kernel moved it: a move to a free range there is what MREMAP_MAYMOVE's
            # own placement would have done in the kernel's address space.
            fixed = hint
        if fixed_flag and not maymove:
            raise OSError(errno_mod.EINVAL, "MREMAP_FIXED without MREMAP_MAYMOVE")
        v = await p.mremap(addr, int(st["pages"]) * PAGE, int(st["new_pages"]) * PAGE, maymove=maymove,
                           dontunmap=dontunmap, fixed=fixed)
        r.addr = v.start
        r.relocated = v.start != addr
        if "region" in st:
            run.bind(st["region"], v.start, int(st["new_pages"]))

    @staticmethod
    async def _pte(p: Process, addr: int, r: StepResult) -> None:
        """The page's pagemap entry, with the fields the kernel runner reports: the five pagemap
        bits always; for a swap entry also ``swapcache`` (mincore); for a present page also what
        kpageflags, kpagecount and PAGEMAP_SCAN say, ``anon_exclusive`` only for an anonymous page
        (not the zero page) that is no tail page mapped by a PTE."""
        [e] = await p.pagemap(addr & ~(PAGE - 1), PAGE)
        r.present, r.swap, r.exclusive = e.present, e.swap, e.exclusive
        r.uffd_wp, r.soft_dirty = e.uffd_wp, e.soft_dirty
        if e.present:
            r.swapcache, r.zero_page, r.ksm = e.swapcache, e.zero_page, e.ksm
            r.pmd, r.head, r.tail = e.pmd, e.head, e.tail
            r.thp = e.thp or e.head or e.tail
            r.mapcount = 0 if e.zero_page else e.mapcount
            if not e.zero_page and not e.ksm and (e.pmd or not e.tail):
                r.anon_exclusive = e.anon_exclusive
        elif e.swap:
            r.swapcache = e.swapcache

    @staticmethod
    async def _fault(run: _Run, st: dict[str, Any], p: Process, addr: int) -> None:
        """Start the access in a task of its own; return once it is done or asleep on the
        userfaultfd (so that an ``events`` step right after it sees its event)."""
        page = addr & ~(PAGE - 1)
        before = sum(1 for e in (await p.list_userfaults()).waiting if e.addr == page)
        task: asyncio.Task[Any]
        if st.get("write", False):
            task = asyncio.create_task(p.write(addr, int(st.get("value", 0)), timeout=None))
        else:
            task = asyncio.create_task(p.read(addr, timeout=None))
        run.faults[st["id"]] = (task, p, addr)
        deadline = time.monotonic() + SETTLE_S
        while not task.done() and time.monotonic() < deadline:
            waiting = sum(1 for e in (await p.list_userfaults()).waiting if e.addr == page)
            if waiting > before:
                return
            await asyncio.sleep(POLL_S)

    @staticmethod
    async def _fault_status(run: _Run, fid: str, r: StepResult) -> None:
        """``blocked`` once the fault has been seen asleep SETTLED_POLLS times in a row; else,
        when its access is done, what a read got."""
        task, p, addr = run.faults[fid]
        page = addr & ~(PAGE - 1)
        seen = 0
        deadline = time.monotonic() + SETTLE_S
        while not task.done() and time.monotonic() < deadline:
            try:
                waiting = any(e.addr == page for e in (await p.list_userfaults()).waiting)
            except (OSError, MmsimError):
                waiting = False
            seen = seen + 1 if waiting else 0
            if seen >= SETTLED_POLLS:
                r.blocked = True
                return
            await asyncio.sleep(POLL_S)
        if not task.done():
            r.blocked = True
            return
        r.blocked = False
        if task.exception() is None:
            value = task.result()
            if value is not None:
                r.value = value

    @staticmethod
    def _event(run: _Run, e: Any) -> list[Any]:
        return event_entry(run.regions, e.addr, "wp" if e.wp else ("w" if e.write else "r"))


#: The field in which a failed step reports the bytes it did (the error's ``.moved``).
_DONE = {"move": "moved", "copy": "copied", "zeropage": "zeroed"}


@dataclass
class Difference:
    step: int
    op: str
    description: str
    kernel: dict[str, Any]  # for a broken ``expect``: what the scenario expected
    mmsim: dict[str, Any]
    expected: bool = False  # mmsim contradicts the scenario's own ``expect``, not the kernel


def describe(step: dict[str, Any]) -> str:
    parts = [step["op"], step.get("proc", "")]
    keys = ("region", "at", "dst", "src", "pages", "len", "mode", "value", "advice", "child", "uffd", "align", "pin")
    for key in keys:
        if key in step:
            parts.append(f"{key}={step[key]}")
    return " ".join(str(p) for p in parts if p != "")


def _comparable(fields: dict[str, Any]) -> dict[str, Any]:
    """A step's recorded fields but those of UNRECORDED."""
    return {f: v for f, v in fields.items() if f not in UNRECORDED}


def compare(scenario: Scenario, kernel: list[StepResult] | None, mmsim: list[StepResult]) -> list[Difference]:
    """Steps where the two runs differ, and steps where a run disagrees with the scenario's own
    ``expect`` (then the other side is shown as the expectation). The fields of UNRECORDED, whose
    answer depends on the kernel's configuration, are not compared between the runs."""
    diffs: list[Difference] = []
    for i, step in enumerate(scenario.steps):
        m = mmsim[i].compared()
        if kernel is not None:
            k = kernel[i].compared()
            if _comparable(k) != _comparable(m):
                diffs.append(Difference(i, step["op"], describe(step), k, m))
                continue
        expect = step.get("expect")
        if expect:
            got = {f: m.get(f) for f in FIELDS if f in expect}
            if got != {f: expect[f] for f in got}:
                diffs.append(Difference(i, step["op"], describe(step), dict(expect), got, expected=True))
    return diffs
