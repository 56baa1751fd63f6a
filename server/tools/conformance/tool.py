"""``mmsim conformance``: run scenarios on the live kernel and on mmsim, and show what differs."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mmsim.client import Client

from .mmsim_runner import Difference, MmsimRunner, compare
from .scenario import Scenario, StepResult

#: Exit statuses of the command.
EXIT_OK, EXIT_DIFFERENT, EXIT_USAGE, EXIT_NO_ORACLE = 0, 1, 2, 3


@dataclass
class Outcome:
    scenario: Scenario
    kernel: list[StepResult]
    mmsim: list[StepResult]
    differences: list[Difference]


def load_scenarios(paths: list[str]) -> list[Scenario]:
    """Scenario files, and every ``*.json`` under the directories given, in name order."""
    out: list[Scenario] = []
    for p in paths:
        path = Path(p)
        files = sorted(path.rglob("*.json")) if path.is_dir() else [path]
        out.extend(Scenario.load(f) for f in files)
    return out


@asynccontextmanager
async def mmsim_client(server: str | None) -> AsyncIterator[Client]:
    """A client of the given server, or of one started in this process."""
    if server is not None:
        async with Client(server) as c:
            yield c
        return
    from mmsim.client.testing import serve_in_process

    # No edge limits: every request must reach the model, whose answers are compared.
    async with serve_in_process(
        log_level="warning", max_remap_bytes=(1 << 64) - 1, max_munmap_bytes=(1 << 64) - 1
    ) as addr:
        async with Client(addr) as c:
            yield c


#: Kernel runs of a scenario that differs, at most, until two in a row agree (see run_one).
KERNEL_RUNS = 4


async def run_one(scenario: Scenario, kernel_runner: object, client: Client) -> Outcome:
    """Run ``scenario`` on the kernel and on mmsim and compare. The kernel is a live system that
    other activity can disturb (reclaim isolating a folio, a background scan holding its lock), so
    a scenario that differs is run on the kernel again: a difference counts only against kernel
    answers that two runs in a row agree on."""
    run = kernel_runner.run  # type: ignore[attr-defined]
    kernel = await asyncio.to_thread(run, scenario)
    mmsim = await MmsimRunner(client).run(scenario, kernel)
    diffs = compare(scenario, kernel, mmsim)
    for _ in range(KERNEL_RUNS - 1):
        if not diffs:
            break
        again = await asyncio.to_thread(run, scenario)
        if [r.compared() for r in again] == [r.compared() for r in kernel]:
            break  # the kernel says the same twice: the difference is real
        kernel = again
        mmsim = await MmsimRunner(client).run(scenario, kernel)
        diffs = compare(scenario, kernel, mmsim)
    return Outcome(scenario, kernel, mmsim, diffs)


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


def render(outcome: Outcome, console: Console) -> None:
    s = outcome.scenario
    if not outcome.differences:
        console.print(f"[green]same[/green]  {s.name}  ({len(s.steps)} steps)")
        return
    console.print(f"[red]DIFFERENT[/red]  {s.name}  ({s.path or 'generated'})")
    table = Table(show_lines=False)
    table.add_column("step", justify="right")
    table.add_column("operation")
    table.add_column("kernel")
    table.add_column("mmsim")
    for d in outcome.differences:
        table.add_row(str(d.step), d.description, ("expected: " if d.expected else "") + _fmt(d.kernel), _fmt(d.mmsim))
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
) -> int:
    """The command's body; returns its exit status."""
    from .kernel import KernelRunner, oracle_unavailable

    console = console or Console()
    why = oracle_unavailable()
    if why is not None:
        console.print(f"kernel oracle unavailable: {why}")
        return EXIT_NO_ORACLE
    scenarios = load_scenarios(paths)
    runner = KernelRunner(step_timeout=step_timeout)
    different = 0
    async with mmsim_client(server) as client:
        for s in scenarios:
            outcome = await run_one(s, runner, client)
            render(outcome, console)
            different += bool(outcome.differences)
        if random_count:
            from .generate import random_scenario

            rng = random.Random(seed)
            for n in range(random_count):
                s = random_scenario(rng, name=f"random-{seed}-{n}")
                outcome = await run_one(s, runner, client)
                if not outcome.differences:
                    continue
                different += 1

                async def fails(c: Scenario) -> bool:
                    return bool((await run_one(c, runner, client)).differences)

                small = await shrink(s, fails)
                minimal = await run_one(small, runner, client)
                render(minimal, console)
                console.print_json(json.dumps(small.to_dict()))
                if save:
                    Path(save).mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - a command: nothing else runs
                    (Path(save) / f"{small.name}.json").write_text(json.dumps(small.to_dict(), indent=2) + "\n")
            console.print(f"{random_count} random scenarios (seed {seed}) run")
    total = len(scenarios) + random_count
    console.print(f"{total - different} of {total} scenarios behave the same on the kernel and on mmsim")
    return EXIT_DIFFERENT if different else EXIT_OK
