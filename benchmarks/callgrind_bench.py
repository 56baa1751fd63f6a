#!/usr/bin/env python3
"""The model's hot paths in instructions, before and after a change, in one run.

    .venv/bin/python benchmarks/callgrind_bench.py --before COMMIT [--after COMMIT]

Each tree is checked out into a temporary git worktree (``--after`` defaults to the working tree)
and imported through a shim package directory, so that both run with this checkout's virtual
environment. For each path, ``valgrind --tool=callgrind`` counts the instructions of two runs of
different lengths, and the difference divided by the difference in operations is the cost of one
operation (start-up and set-up cancel out). PYTHONHASHSEED is fixed, so two runs of one tree give
the same counts within a few hundred instructions.

- ``move``: one single-page UFFDIO_MOVE (``model_bench.bench_moves``, 12,000 against 2,000);
- ``walk``: one rmap walk over 64 mappings (``model_bench.bench_walks``, 2,500 against 500);
- ``fault``: one write fault of a new page, the folio allocated and mapped (12,000 against 2,000);
- ``explore:SCENARIO``: one random schedule of a litmus scenario under ``recheck`` (1,200 against
  200 schedules, nothing caught).

Prints a table of instructions per operation and after/before ratios; ``--json FILE`` writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"

#: path -> (long run, short run): operations counted by each.
RUNS = {
    "move": (12_000, 2_000),
    "walk": (2_500, 500),
    "fault": (12_000, 2_000),
    "explore:fast-path-race": (1_200, 200),
    "explore:slow-path-race": (1_200, 200),
}

#: What one run executes, in the tree on sys.path (argv: path, count, tree root).
DRIVER = """
import asyncio, sys
from pathlib import Path
path, n, root = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
if path in ("move", "walk"):
    sys.path.insert(0, str(root / "benchmarks"))
    import model_bench as mb
    asyncio.run(mb.bench_moves(n, 1) if path == "move" else mb.bench_walks(n, 64))
elif path == "fault":
    from mmsim.server.mm.model import MemoryModel
    async def faults():
        m = MemoryModel()
        p = await m.create_process()
        v = await m.mmap(p, n * 4096)
        for i in range(n):
            await m.write(p, v.start + i * 4096, i)
    asyncio.run(faults())
else:
    from mmsim.server.tools.explore import explore
    from mmsim.server.tools.litmus import load
    scn = load(root / "tests" / "litmus" / (path.split(":", 1)[1] + ".litmus"))
    explore(scn, "recheck", strategy="random", schedules=n, seed=0, stop_on_catch=False)
import mmsim.server.mm.model as model
assert Path(model.__file__).resolve().is_relative_to(root.resolve()), model.__file__
"""


def shim(tree: Path, into: Path) -> Path:
    """A directory whose ``mmsim`` package is ``tree``'s (the layout setuptools' package-dir gives)."""
    pkg = into / "mmsim"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for name, sub in (("server", "server"), ("client", "client"), ("loadgen", "loadgen"), ("v1", "proto/mmsim/v1")):
        (pkg / name).symlink_to(tree / sub)
    return into


@contextmanager
def checkouts(work: Path, before: str, after: str | None) -> Iterator[dict[str, Path]]:
    """``{"before": tree, "after": tree}``: each commit checked out into a git worktree under
    ``work`` (removed again on the way out); an ``after`` of None is this working tree."""
    trees: dict[str, Path] = {}
    try:
        for label, commit in (("before", before), ("after", after)):
            if commit is None:
                trees[label] = ROOT
                continue
            trees[label] = work / label
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(trees[label]), commit],
                           check=True)
        yield trees
    finally:
        for tree in trees.values():
            if tree != ROOT:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)


def instructions(tree: Path, path: str, count: int, shim_dir: Path, work: Path) -> int:
    out = work / f"cg.{os.getpid()}.{path.replace(':', '_')}.{count}"
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(shim_dir)}
    subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", str(PYTHON), "-c", DRIVER, path,
         str(count), str(tree)],
        check=True, env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise RuntimeError(f"no summary line in {out}")


def per_op(tree: Path, path: str, shim_dir: Path, work: Path) -> float:
    long, short = RUNS[path]
    return (instructions(tree, path, long, shim_dir, work) - instructions(tree, path, short, shim_dir, work)) / (
        long - short
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="the baseline commit")
    ap.add_argument("--after", help="the candidate commit (default: the working tree)")
    ap.add_argument("--paths", nargs="*", choices=list(RUNS), default=list(RUNS), help="what to measure")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        print("callgrind_bench: valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="callgrind-bench-") as tmp:
        work = Path(tmp)
        with checkouts(work, args.before, args.after) as trees:
            shims = {label: shim(tree, work / f"shim-{label}") for label, tree in trees.items()}
            rows = []
            for path in args.paths:
                b = per_op(trees["before"], path, shims["before"], work)
                a = per_op(trees["after"], path, shims["after"], work)
                rows.append({"path": path, "before": round(b), "after": round(a), "ratio": round(a / b, 3)})
                print(f"{path:24} before {b:>12,.0f}  after {a:>12,.0f}  after/before {a / b:.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"before": args.before, "after": args.after or "working tree",
                                               "python": sys.version.split()[0], "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
