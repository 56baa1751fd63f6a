"""``mmsim conformance``: run scenarios on the live kernel and on mmsim, and show what differs.

A scenario that pages out is skipped, with the reason, where the kernel has no usable swap.
A scenario runs on an mmsim server with its transparent hugepage settings (``MmsimServers``: the
servers started in this process, one per distinct settings; a ``--server`` with other settings
skips it, with the reason). A large-folio scenario (THP settings, an aligned ``mmap``, hugepage
or nohugepage advice) is skipped, with the reason, where the kernel cannot run it
(``thp_unavailable``), and so is one whose every kernel run was unreliable (a huge page fault
fell back to small pages for want of memory).
``record`` runs scenarios on the kernel and writes what it answered into their ``expect`` fields;
``replay_on_kernel`` runs one on the kernel only, against them.
"""

from __future__ import annotations

import asyncio
import json
import platform
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.table import Table

from mmsim.client import Client

from .mmsim_runner import Difference, MmsimRunner, SettingsMismatch, compare, server_settings
from .scenario import UNRECORDED, Scenario, StepResult, needs_swap, uses_pin, uses_thp

#: Exit statuses of the command.
EXIT_OK, EXIT_DIFFERENT, EXIT_USAGE, EXIT_NO_ORACLE = 0, 1, 2, 3


@dataclass
class Outcome:
    scenario: Scenario
    kernel: list[StepResult]
    mmsim: list[StepResult]
    differences: list[Difference]
    #: Run on the kernel only (replay_on_kernel): the differences are the kernel's answers
    #: against the scenario's ``expect`` fields.
    kernel_only: bool = False
    #: Why the scenario was not run (no usable swap for a pageout, no usable THP for a large-folio
    #: scenario, kernel runs whose huge page faults fell back to small pages, an mmsim server with
    #: other THP settings), or None.
    skipped: str | None = None


def load_scenarios(paths: list[str]) -> list[Scenario]:
    """Scenario files, and every ``*.json`` under the directories given, in name order."""
    out: list[Scenario] = []
    for p in paths:
        path = Path(p)
        files = sorted(path.rglob("*.json")) if path.is_dir() else [path]
        out.extend(Scenario.load(f) for f in files)
    return out


class MmsimServers:
    """The mmsim servers scenarios run on: the one given (``server``), or servers started in this
    process, one per distinct THP settings (``server_settings``), each the first time a scenario
    needs it. An async context manager: the clients are closed and the servers stopped at its end."""

    def __init__(self, server: str | None = None) -> None:
        self.server = server
        self._stack = AsyncExitStack()
        #: The client of each server started, by its settings.
        self._clients: dict[tuple[tuple[str, Any], ...], Client] = {}

    async def __aenter__(self) -> MmsimServers:
        await self._stack.__aenter__()
        if self.server is not None:
            self._clients[()] = await self._stack.enter_async_context(Client(self.server))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        self._clients.clear()
        return await self._stack.__aexit__(exc_type, exc, tb)

    async def client(self, scenario: Scenario) -> Client:
        """The client of the server ``scenario`` runs on: the one given, or the one started with
        its THP settings (started now if none is yet). SettingsMismatch if no server can run it."""
        if self.server is not None:
            return self._clients[()]
        settings = server_settings(scenario)
        key = tuple(sorted(settings.items()))
        if key not in self._clients:
            from mmsim.client.testing import serve_in_process

            # No edge limits: every request must reach the model, whose answers are compared.
            addr = await self._stack.enter_async_context(serve_in_process(
                log_level="warning", max_remap_bytes=(1 << 64) - 1, max_munmap_bytes=(1 << 64) - 1, **settings
            ))
            self._clients[key] = await self._stack.enter_async_context(Client(addr))
        return self._clients[key]


#: Kernel runs of a scenario that differs, at most, until two in a row agree (see run_one).
KERNEL_RUNS = 4


async def run_one(scenario: Scenario, kernel_runner: object, client: Client) -> Outcome:
    """Run ``scenario`` on the kernel and on mmsim (``client``'s server) and compare; skipped, with
    the reason, if that server's THP settings are not the scenario's (before the kernel runs it).
    The kernel is a live system that other activity can disturb (reclaim isolating a folio, a
    background scan holding its lock, a huge page fault falling back to small pages), so an
    unreliable kernel run is run again (if every one is, the outcome is skipped with the reason),
    and a scenario that differs is run on the kernel again: a difference counts only against
    kernel answers that two runs in a row agree on."""
    mmsim_runner = MmsimRunner(client)
    try:
        await mmsim_runner.check(scenario)
    except SettingsMismatch as e:
        return Outcome(scenario, [], [], [], skipped=e.reason)
    run = kernel_runner.run  # type: ignore[attr-defined]
    kernel = await asyncio.to_thread(run, scenario)
    for _ in range(KERNEL_RUNS - 1):
        if unreliable(kernel) is None:
            break
        kernel = await asyncio.to_thread(run, scenario)
    if (why := unreliable(kernel)) is not None:
        return Outcome(scenario, kernel, [], [], skipped=f"unreliable kernel run: {why}")
    mmsim = await mmsim_runner.run(scenario, kernel)
    diffs = compare(scenario, kernel, mmsim)
    for _ in range(KERNEL_RUNS - 1):
        if not diffs:
            break
        again = await asyncio.to_thread(run, scenario)
        if unreliable(again) is not None:
            continue  # the last reliable run stands
        if [r.compared() for r in again] == [r.compared() for r in kernel]:
            break  # the kernel says the same twice: the difference is real
        kernel = again
        mmsim = await mmsim_runner.run(scenario, kernel)
        diffs = compare(scenario, kernel, mmsim)
    return Outcome(scenario, kernel, mmsim, diffs)


def unreliable(results: list[StepResult]) -> str | None:
    """Why a kernel run cannot be trusted (its first unreliable step), or None."""
    return next((f"step {i}: {r.unreliable}" for i, r in enumerate(results) if r.unreliable), None)


async def replay_on_kernel(scenario: Scenario, kernel_runner: object) -> Outcome:
    """Run ``scenario`` on the kernel only and check the answers against its ``expect`` fields,
    again while two runs in a row do not agree (as in run_one) or a run is unreliable; if every
    run is, the outcome is skipped with the reason."""
    run = kernel_runner.run  # type: ignore[attr-defined]
    kernel = await asyncio.to_thread(run, scenario)
    diffs = compare(scenario, None, kernel)
    for _ in range(KERNEL_RUNS - 1):
        if not diffs and unreliable(kernel) is None:
            break
        again = await asyncio.to_thread(run, scenario)
        if (
            unreliable(kernel) is None
            and unreliable(again) is None
            and [r.compared() for r in again] == [r.compared() for r in kernel]
        ):
            break
        kernel = again
        diffs = compare(scenario, None, kernel)
    if (why := unreliable(kernel)) is not None:
        return Outcome(scenario, kernel, [], [], kernel_only=True, skipped=f"unreliable kernel run: {why}")
    return Outcome(scenario, kernel, [], diffs, kernel_only=True)


def _recorded(doc: dict[str, object]) -> str:
    """A scenario document in the corpus's layout: one line per step."""
    head = {k: v for k, v in doc.items() if k != "steps"}
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    steps = ",\n".join(f"    {json.dumps(st)}" for st in doc["steps"])  # type: ignore[attr-defined]
    return "{\n" + "\n".join(lines) + '\n  "steps": [\n' + steps + "\n  ]\n}\n"


#: Steps whose ``expect`` recording leaves out when they succeed (they observe nothing).
_QUIET_OPS = ("mmap", "fork", "exit")


def record(paths: list[str], step_timeout: float = 5.0, console: Console | None = None) -> int:
    """Run each scenario file on the kernel until two runs in a row agree (at most KERNEL_RUNS)
    and write every step's answers into its ``expect`` (in place; a successful mmap, fork or exit
    gets none, and no step gets the fields of UNRECORDED). Returns the command's exit status:
    EXIT_DIFFERENT if some file's runs never agreed or it was skipped (it pages out and swap is
    unavailable); such a file is left as it was. Steps that left a note (blocked, process gone)
    are shown, to be read over. A large-folio scenario is skipped where the kernel cannot run it
    (``thp_unavailable``), and so is one whose every run was unreliable (a huge page fault fell
    back to small pages, or khugepaged collapsed pages)."""
    from .kernel import KernelRunner, oracle_unavailable, pin_unavailable, swap_unavailable, thp_unavailable

    console = console or Console()
    why = oracle_unavailable()
    if why is not None:
        console.print(f"kernel oracle unavailable: {why}")
        return EXIT_NO_ORACLE
    runner = KernelRunner(step_timeout=step_timeout)
    status = EXIT_OK
    for s in load_scenarios(paths):
        assert s.path is not None
        if needs_swap(s) and (no_swap := swap_unavailable()) is not None:
            console.print(f"[yellow]skipped[/yellow]  {s.name}: {no_swap}")
            status = EXIT_DIFFERENT
            continue
        if uses_thp(s) and (no_thp := thp_unavailable(s)) is not None:
            console.print(f"[yellow]skipped[/yellow]  {s.name}: {no_thp}")
            status = EXIT_DIFFERENT
            continue
        if uses_pin(s) and (no_pin := pin_unavailable()) is not None:
            console.print(f"[yellow]skipped[/yellow]  {s.name}: {no_pin}")
            status = EXIT_DIFFERENT
            continue
        last: list[dict[str, object]] | None = None
        why = None
        for _ in range(KERNEL_RUNS):
            again = runner.run(s)
            if (why := unreliable(again)) is not None:
                last = None  # a run that cannot be trusted agrees with nothing
                continue
            now = [r.compared() for r in again]
            if now == last:
                break
            last = now
        else:
            if why is not None:
                console.print(f"[yellow]skipped[/yellow]  {s.name}: unreliable kernel run: {why}")
            else:
                console.print(f"[red]unsettled[/red]  {s.name}: {KERNEL_RUNS} kernel runs, no two in a row agree")
            status = EXIT_DIFFERENT
            continue
        assert last is not None
        notes = [f"step {i}: {r.note}" for i, r in enumerate(again) if r.note]
        if notes:
            console.print(f"[yellow]noted[/yellow]  {s.name}: " + "; ".join(notes))
        doc = json.loads(Path(s.path).read_text())
        for st, got in zip(doc["steps"], last, strict=True):
            st.pop("expect", None)
            if st["op"] not in _QUIET_OPS or got.get("errno"):
                st["expect"] = {k: v for k, v in got.items() if k not in UNRECORDED}
        Path(s.path).write_text(_recorded(doc))
        console.print(f"[green]recorded[/green]  {s.name}  ({len(s.steps)} steps)")
    return status


async def shrink(scenario: Scenario, fails: Callable[[Scenario], Awaitable[bool]]) -> Scenario:
    """The smallest scenario (by removing steps, one at a time, to a fixed point) that still
    differs; a candidate that is no longer a valid scenario is skipped."""
    current = scenario
    changed = True
    while changed:
        changed = False
        for i in range(len(current.steps) - 1, -1, -1):
            steps = current.steps[:i] + current.steps[i + 1 :]
            try:
                cand = Scenario.from_dict({**current.to_dict(), "steps": steps})
            except ValueError:
                continue
            if await fails(cand):
                current, changed = cand, True
    return current


def render(outcome: Outcome, console: Console, kernel: str | None = None) -> None:
    """Print ``outcome``; ``kernel``: the kernel that ran it, where it was not this machine's."""
    s = outcome.scenario
    on = f"  [dim]on {kernel}[/dim]" if kernel else ""
    if outcome.skipped is not None:
        console.print(f"[yellow]skipped[/yellow]  {s.name}: {outcome.skipped}{on}")
        return
    only = "  (kernel only)" if outcome.kernel_only else ""
    if not outcome.differences:
        console.print(f"[green]same[/green]  {s.name}  ({len(s.steps)} steps){only}{on}")
        return
    console.print(f"[red]DIFFERENT[/red]  {s.name}  ({s.path or 'generated'}){only}{on}")
    table = Table(show_lines=False)
    table.add_column("step", justify="right")
    table.add_column("operation")
    if outcome.kernel_only:  # the kernel's answers against the scenario's expect fields
        table.add_column("expected")
        table.add_column("kernel")
    else:
        table.add_column("kernel")
        table.add_column("mmsim")
    for d in outcome.differences:
        mark = "expected: " if d.expected and not outcome.kernel_only else ""
        table.add_row(str(d.step), d.description, mark + _fmt(d.kernel), _fmt(d.mmsim))
    console.print(table)


def _fmt(fields: dict[str, object]) -> str:
    return " ".join(f"{k}={v}" for k, v in fields.items()) or "-"


async def conformance(
    paths: list[str],
    server: str | None = None,
    random_count: int = 0,
    seed: int = 0,
    step_timeout: float = 5.0,
    save: str | None = None,
    console: Console | None = None,
    swap: bool = False,
    thp: bool = False,
    pin: bool = False,
    cluster: str | None = None,
) -> int:
    """The command's body; returns its exit status. ``server``: the mmsim server to run on (None:
    servers started in this process, one per distinct THP settings). ``cluster``: a Dask
    scheduler's address; each random scenario is a task of its workers, run on the worker's
    kernel and an mmsim server started there, and shrunk there if it differs (random_on_worker;
    cluster.ClusterError when the cluster cannot be used). ``swap``: the random
    scenarios also page out, deactivate and observe PTEs (those that page out are skipped where
    the kernel has no usable swap). ``thp``: the random scenarios also map 2 MiB-aligned regions,
    ask for huge pages and move whole PMDs. ``pin``: the random scenarios also pin and unpin pages.
    Large-folio scenarios are skipped where the kernel cannot run them, pin scenarios where it
    cannot pin (``pin_unavailable``), and every scenario whose THP settings ``server`` does not
    have."""
    from .kernel import KernelRunner, oracle_unavailable, pin_unavailable, swap_unavailable, thp_unavailable

    console = console or Console()
    why = oracle_unavailable() if cluster is None or paths else None  # on a cluster, the workers' kernels
    if why is not None:
        console.print(f"kernel oracle unavailable: {why}")
        return EXIT_NO_ORACLE
    scenarios = load_scenarios(paths)
    no_swap = swap_unavailable() if swap or any(needs_swap(s) for s in scenarios) else None
    no_pin = pin_unavailable() if pin or any(uses_pin(s) for s in scenarios) else None
    runner = KernelRunner(step_timeout=step_timeout)
    different = skipped = 0
    reasons: list[str] = []

    def cannot(s: Scenario) -> str | None:
        """Why the kernel cannot run ``s`` here, or None."""
        if no_swap is not None and needs_swap(s):
            return no_swap
        if no_pin is not None and uses_pin(s):
            return no_pin
        return thp_unavailable(s) if uses_thp(s) else None

    async def attempt(s: Scenario) -> tuple[Outcome, Client | None]:
        """``s`` run on the kernel and on the mmsim server of its settings (and that server's
        client), or skipped with the reason."""
        if (no := cannot(s)) is not None:
            return Outcome(s, [], [], [], skipped=no), None
        try:
            client = await servers.client(s)
        except SettingsMismatch as e:
            return Outcome(s, [], [], [], skipped=e.reason), None
        return await run_one(s, runner, client), client

    def count(outcome: Outcome) -> None:
        nonlocal skipped
        if outcome.skipped is not None:
            skipped += 1
            reasons.append(outcome.skipped)

    async with MmsimServers(server) as servers:
        for s in scenarios:
            outcome, _ = await attempt(s)
            count(outcome)
            render(outcome, console)
            different += bool(outcome.differences)
        if random_count and cluster is None:
            from .generate import random_scenario

            rng = random.Random(seed)
            for n in range(random_count):
                s = random_scenario(rng, name=f"random-{seed}-{n}", swap=swap, thp=thp, pin=pin)
                outcome, client = await attempt(s)
                count(outcome)
                if outcome.skipped is not None:
                    render(outcome, console)
                if not outcome.differences or client is None:
                    continue
                different += 1

                async def fails(c: Scenario, client: Client = client) -> bool:
                    return bool((await run_one(c, runner, client)).differences)

                small = await shrink(s, fails)
                minimal = await run_one(small, runner, client)
                render(minimal, console)
                console.print_json(json.dumps(small.to_dict()))
                if save:
                    Path(save).mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - a command: nothing else runs
                    (Path(save) / f"{small.name}.json").write_text(json.dumps(small.to_dict(), indent=2) + "\n")
            console.print(f"{random_count} random scenarios (seed {seed}) run")
    if random_count and cluster is not None:
        from .generate import random_scenario

        rng = random.Random(seed)  # the same scenarios as here, in the same order
        docs = [random_scenario(rng, name=f"random-{seed}-{n}", swap=swap, thp=thp, pin=pin).to_dict()
                for n in range(random_count)]
        runs = await asyncio.to_thread(_on_cluster, cluster, docs, step_timeout, console)
        kernels: Counter[str] = Counter()
        for r in runs:
            kernels[r.kernel] += 1
            count(r.outcome)
            if r.small is None or r.minimal is None:
                continue
            different += 1
            if save:
                Path(save).mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - a command: nothing else runs
                (Path(save) / f"{r.small.name}.json").write_text(json.dumps(r.small.to_dict(), indent=2) + "\n")
        console.print(f"{random_count} random scenarios (seed {seed}) run on the cluster at {cluster}: "
                      + ", ".join(f"{n} on {k}" for k, n in sorted(kernels.items())))
    total = len(scenarios) + random_count - skipped
    notes = [f"{skipped} skipped: " + "; ".join(dict.fromkeys(reasons))] if skipped else []
    console.print(f"{total - different} of {total} scenarios behave the same on the kernel and on mmsim"
                  + (f" ({'; '.join(notes)})" if notes else ""))
    return EXIT_DIFFERENT if different else EXIT_OK


@dataclass
class RandomRun:
    """A random scenario run by a cluster worker: its outcome and, where it differs, its shrunk
    form and that one's outcome; ``kernel``: the worker's kernel release and host name."""

    outcome: Outcome
    kernel: str
    small: Scenario | None = None
    minimal: Outcome | None = None


def _on_cluster(address: str, docs: list[dict[str, Any]], step_timeout: float, console: Console) -> list[RandomRun]:
    """Run the scenarios ``docs`` on the cluster at ``address``, one task each; print each one
    skipped or different, with the kernel that ran it, in their order as they come in."""
    from ..cluster import run_in_order

    runs = []
    for r in run_in_order(address, random_on_worker, [(doc, step_timeout) for doc in docs]):
        runs.append(r)
        if r.outcome.skipped is not None:
            render(r.outcome, console, r.kernel)
        if r.small is not None and r.minimal is not None:
            render(r.minimal, console, r.kernel)
            console.print_json(json.dumps(r.small.to_dict()))
    return runs


def random_on_worker(doc: dict[str, Any], step_timeout: float = 5.0) -> RandomRun:
    """A cluster task: run the scenario ``doc`` on this machine's kernel and on an mmsim server
    started here, as ``conformance`` does, and shrink it here if it differs; skipped, with the
    reason, where this kernel cannot run it."""
    return asyncio.run(_random_here(Scenario.from_dict(doc), step_timeout))


async def _random_here(s: Scenario, step_timeout: float) -> RandomRun:
    from .kernel import KernelRunner, oracle_unavailable, pin_unavailable, swap_unavailable, thp_unavailable

    here = RandomRun(Outcome(s, [], [], []), f"Linux {platform.release()} ({platform.node()})")
    why = oracle_unavailable()
    why = why and f"kernel oracle unavailable: {why}"
    if why is None and needs_swap(s):
        why = swap_unavailable()
    if why is None and uses_pin(s):
        why = pin_unavailable()
    if why is None and uses_thp(s):
        why = thp_unavailable(s)
    if why is not None:
        here.outcome.skipped = why
        return here
    runner = KernelRunner(step_timeout=step_timeout)
    async with MmsimServers() as servers:
        try:
            client = await servers.client(s)
        except SettingsMismatch as e:
            here.outcome.skipped = e.reason
            return here
        here.outcome = await run_one(s, runner, client)
        if here.outcome.differences:

            async def fails(c: Scenario) -> bool:
                return bool((await run_one(c, runner, client)).differences)

            here.small = await shrink(s, fails)
            here.minimal = await run_one(here.small, runner, client)
    return here
