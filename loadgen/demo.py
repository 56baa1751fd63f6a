"""``make demo``: start a server, run the race profile against it, print the report, write the plot.

    .venv/bin/python -m mmsim.loadgen.demo [--duration 10] [--plot demo.png] [--protocol recheck]

The server is ``mmsim serve`` with the scheduler's preemption on (``--preempt 0.05``), so that walks
and moves interleave at the protocol's named points and the walkers' mapping recheck fires: the
report's server counters show the retries (and, with ``--protocol no-recheck``, the violations).
"""

from __future__ import annotations

import argparse
import sys

from mmsim.client.testing import serve_subprocess

from .cli import main as loadgen_main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mmsim-demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", default="10", help="measured seconds (default 10)")
    ap.add_argument("--plot", default="demo.png", help="where the plot goes (default demo.png)")
    ap.add_argument("--json", default="demo.json", help="where the report goes (default demo.json)")
    ap.add_argument("--protocol", default="recheck", help="the server's protocol (default recheck)")
    args = ap.parse_args(argv)
    with serve_subprocess("--protocol", args.protocol, "--preempt", "0.05") as server:
        print(f"mmsim-demo: server on {server.addr} (protocol {args.protocol}, preempt 0.05)", flush=True)
        status = loadgen_main(["--target", server.addr, "--profile", "race", "--duration", args.duration,
                               "--trees", "1", "--concurrency", "16", "--json", args.json, "--plot", args.plot])
        print(f"mmsim-demo: report in {args.json}, plot in {args.plot}")
    return status

if __name__ == "__main__":
    sys.exit(main())
