"""``make demo``: start a server, run the race profile against it, print the report, write the plot.

    .venv/bin/python -m mmsim.loadgen.demo [--duration 10] [--plot demo.png] [--protocol recheck]

The server is ``mmsim serve`` with the scheduler's preemption on (``--preempt 0.05``), so that walks
and moves interleave at the protocol's named points and the walkers' mapping recheck fires: the
report's server counters show the retries (and, with ``--protocol no-recheck``, the violations).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading

from .cli import main as loadgen_main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mmsim-demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", default="10", help="measured seconds (default 10)")
    ap.add_argument("--plot", default="demo.png", help="where the plot goes (default demo.png)")
    ap.add_argument("--json", default="demo.json", help="where the report goes (default demo.json)")
    ap.add_argument("--protocol", default="recheck", help="the server's protocol (default recheck)")
    args = ap.parse_args(argv)
    server = subprocess.Popen(
        [sys.executable, "-m", "mmsim.server", "serve", "--listen", "127.0.0.1:0", "--log-format", "json",
         "--access-log-sample", "0", "--protocol", args.protocol, "--preempt", "0.05"],
        stderr=subprocess.PIPE, text=True,
    )
    assert server.stderr is not None
    try:
        line = server.stderr.readline()
        event = json.loads(line) if line.startswith("{") else {}
        if event.get("event") != "serving":
            print(f"mmsim-demo: the server did not start: {line.strip()}", file=sys.stderr)
            return 1
        threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()  # type: ignore[union-attr]
        print(f"mmsim-demo: server on {event['listen']} (protocol {args.protocol}, preempt 0.05)", flush=True)
        status = loadgen_main(["--target", event["listen"], "--profile", "race", "--duration", args.duration,
                               "--trees", "1", "--concurrency", "16", "--json", args.json, "--plot", args.plot])
        print(f"mmsim-demo: report in {args.json}, plot in {args.plot}")
        return status
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        server.stderr.close()


if __name__ == "__main__":
    sys.exit(main())
