"""Replaying a scenario on mmsim through the SDK, and comparing it with the kernel's run."""

from __future__ import annotations

import errno as errno_mod
from dataclasses import dataclass
from typing import Any

from mmsim.client import Client, MmsimError, Process

from .scenario import FIELDS, PAGE, Scenario, StepResult, move_len, move_mode, place


class MmsimRunner:
    """Runs scenarios against one mmsim server, each in processes of its own (exited at the end)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def run(self, scenario: Scenario, kernel: list[StepResult] | None = None) -> list[StepResult]:
        """Run ``scenario``. With the kernel's results, each region is mapped at the very
        address the kernel chose; without, mmsim places it."""
        procs: dict[str, Process] = {}
        alive: set[str] = set()
        for name in scenario.processes:
            procs[name] = await self.client.create_process()
            alive.add(name)
        addrs: dict[str, int] = {}
        results: list[StepResult] = []
        try:
            for i, step in enumerate(scenario.steps):
                proc = step.get("proc", scenario.processes[0])
                hint = kernel[i].addr if kernel is not None and kernel[i].addr is not None else None
                r = StepResult()
                try:
                    if proc not in alive:
                        raise ProcessLookupError(errno_mod.ESRCH, "process gone")
                    await self._step(step, procs, alive, addrs, hint, r)
                except OSError as e:
                    r.errno = e.errno or 0
                    if step["op"] == "move":
                        r.moved = getattr(e, "moved", 0)
                except MmsimError as e:
                    r.errno = errno_mod.ESRCH if e.code is not None and e.code.name == "NOT_FOUND" else errno_mod.EINVAL
                    r.note = str(e)
                    if step["op"] == "move":
                        r.moved = 0
                results.append(r)
        finally:
            for name in alive:
                try:
                    await procs[name].exit()
                except (OSError, MmsimError):
                    pass
        return results

    async def _step(
        self, st: dict[str, Any], procs: dict[str, Process], alive: set[str], addrs: dict[str, int], hint: int | None,
        r: StepResult,
    ) -> None:
        op = st["op"]
        p = procs[st.get("proc") or next(iter(procs))]
        if op == "mmap":
            v = await p.mmap(int(st["pages"]) * PAGE, prot=st.get("prot", "rw"), uffd=st.get("uffd"), addr=hint)
            addrs[st["region"]] = r.addr = v.start
            return
        if op == "fork":
            procs[st["child"]] = await p.fork()
            alive.add(st["child"])
            return
        if op == "exit":
            await p.exit()
            alive.discard(st.get("proc") or next(iter(procs)))
            return
        if op == "move":
            length = move_len(st)
            mode = move_mode(st)
            r.moved = await p.remap(
                place(addrs, st["dst"]), place(addrs, st["src"]), length,
                allow_src_holes=bool(mode & 2), dontwake=bool(mode & 1), mode_bits=mode & ~3,
            )
            return
        addr = place(addrs, st["at"])
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
    for key in ("region", "at", "dst", "src", "pages", "len", "mode", "value", "advice", "child", "uffd"):
        if key in step:
            parts.append(f"{key}={step[key]}")
    return " ".join(str(p) for p in parts if p != "")


def compare(scenario: Scenario, kernel: list[StepResult] | None, mmsim: list[StepResult]) -> list[Difference]:
    """Steps where the two runs differ, and steps where a run disagrees with the scenario's own
    ``expect`` (then the other side is shown as the expectation)."""
    diffs: list[Difference] = []
    for i, step in enumerate(scenario.steps):
        m = mmsim[i].compared()
        if kernel is not None:
            k = kernel[i].compared()
            if k != m:
                diffs.append(Difference(i, step["op"], describe(step), k, m))
                continue
        expect = step.get("expect")
        if expect:
            got = {f: m.get(f) for f in FIELDS if f in expect}
            if got != {f: expect[f] for f in got}:
                diffs.append(Difference(i, step["op"], describe(step), dict(expect), got, expected=True))
    return diffs
