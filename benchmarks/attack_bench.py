"""Hostile-client benchmark: Ping latency and the server's RSS while a client leaves work pending.

For each attack this starts a fresh ``mmsim serve`` (``--listen 127.0.0.1:0``, the access log
off) as a subprocess, warms it up (one fault slept on and resolved, one audit) and reads its RSS
(the baseline), then runs the attack while a pinger, a separate OS process with its own channel,
sends ``Ping`` every ``--interval-ms`` (5 ms) for ``--hold`` seconds (3), open-loop. It reports the
Pings answered, the failed ones by status code, the p50/p99 of the answered ones, and the server's
peak RSS (VmHWM) over the baseline next to the bound docs/server.md ("Memory") gives for that
server's flags.

Attacks:

  packed  20 concurrent Batches, each a UffdCopy of 4,000,000 one-byte packed values (4 MB on the
          wire, 32 MB decoded) and a read of a page in a MISSING-registered range, which sleeps on
          a userfault; ``--max-memory 64M``. Held for ``--hold`` seconds, then cancelled.
  faults  1,040 concurrent reads asleep on userfaults in one process (the current server gets
          ``--max-pending-faults-per-process 2000 --max-pending-faults 2000``), held for
          ``--hold`` seconds, then resolved with one UffdZeropage.

``--before DIR`` names a checkout of an earlier version: its server runs from a shim directory
mapping ``mmsim.server``, ``mmsim.client``, ``mmsim.loadgen`` and ``mmsim.v1`` onto that tree, in
the same invocation, alternating with the current one, ``--repeats`` times; the table shows the
medians and the after/before ratios.

    python benchmarks/attack_bench.py [--before DIR] [--repeats 3] [--only packed,faults]
        [--hold 3] [--interval-ms 5] [--ping-timeout 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from mmsim.client.testing import ServerProcess, serve_subprocess
from mmsim.v1 import mmsim_pb2 as pb
from mmsim.v1 import mmsim_pb2_grpc

P = 4096
MiB = 1 << 20
PACKED_CALLS = 20
PACKED_VALUES = 4_000_000
FAULTS = 1040
#: docs/server.md "Memory": RSS <= S + --max-memory + 48 MiB + --reserved-rpcs * 64 KiB + R.
SLACK = 48 * MiB
RESERVED_RPCS = 64
RESERVED_NOFAIL_BYTES = 64 << 10
DEFAULT_MAX_MEMORY = 4 << 30
COMMON_ARGS = ("--grace", "1")


# --- the pinger (a separate OS process) -------------------------------------------------------

async def _pinger(addr: str, seconds: float, interval: float, timeout: float) -> dict[str, Any]:
    """Send Ping every ``interval`` seconds for ``seconds`` (open-loop) once a line arrives on
    stdin; the latencies (ms) of the answered ones and the failed ones by status code."""
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = mmsim_pb2_grpc.MemoryManagerStub(ch)
        await stub.Ping(pb.Empty(), timeout=30)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        latencies: list[float] = []
        errors: Counter[str] = Counter()

        async def one() -> None:
            t0 = time.perf_counter()
            try:
                await stub.Ping(pb.Empty(), timeout=timeout)
                latencies.append((time.perf_counter() - t0) * 1e3)
            except grpc.aio.AioRpcError as e:
                errors[e.code().name] += 1

        tasks = []
        start = time.perf_counter()
        n = 0
        while (now := time.perf_counter()) - start < seconds:
            tasks.append(asyncio.create_task(one()))
            n += 1
            await asyncio.sleep(max(0.0, start + n * interval - now))
        await asyncio.gather(*tasks)
        return {"latencies_ms": latencies, "errors": dict(errors)}


class Pinger:
    """The pinger process, connected and waiting for ``go``."""

    def __init__(self, addr: str, args: argparse.Namespace) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--pinger", addr, "--hold", str(args.hold),
             "--interval-ms", str(args.interval_ms), "--ping-timeout", str(args.ping_timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"pinger did not start: {line!r}")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    async def result(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        out = await asyncio.get_running_loop().run_in_executor(None, self.proc.stdout.read)
        self.proc.wait(30)
        return json.loads(out)


# --- servers ----------------------------------------------------------------------------------

def make_shim(before: Path) -> Path:
    """A directory whose ``mmsim`` package maps onto the checkout ``before`` (the package layout:
    server/, client/, loadgen/, proto/mmsim/v1), checked to win over the installed one."""
    shim = Path(tempfile.mkdtemp(prefix="mmsim-before-shim-"))
    (shim / "mmsim").mkdir()
    for name, target in (("server", "server"), ("client", "client"), ("loadgen", "loadgen"),
                         ("v1", "proto/mmsim/v1")):
        (shim / "mmsim" / name).symlink_to(before.resolve() / target)
    where = subprocess.run([sys.executable, "-c", "import mmsim.server.app as a; print(a.__file__)"],
                           env={**os.environ, "PYTHONPATH": str(shim)}, capture_output=True, text=True, check=True)
    if not Path(where.stdout.strip()).resolve().is_relative_to(before.resolve()):
        raise RuntimeError(f"the shim does not win: mmsim.server.app is {where.stdout.strip()}")
    return shim


@contextmanager
def serve(pythonpath: str | None, args: list[str]) -> Iterator[ServerProcess]:
    """serve_subprocess with PYTHONPATH set to ``pythonpath`` (None: the installed code)."""
    saved = os.environ.get("PYTHONPATH")
    if pythonpath:
        os.environ["PYTHONPATH"] = pythonpath
    else:
        os.environ.pop("PYTHONPATH", None)
    cm = serve_subprocess(*COMMON_ARGS, *args, check_exit=False)
    try:
        server = cm.__enter__()
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    try:
        yield server
    finally:
        cm.__exit__(None, None, None)


async def warm(stub: mmsim_pb2_grpc.MemoryManagerStub) -> None:
    """Run the paths the attacks use once: a read that sleeps on a userfault, resolved by UffdCopy."""
    p = await stub.CreateProcess(pb.CreateProcessRequest(), timeout=30)
    v = await stub.Mmap(pb.MmapRequest(process=p.handle, length=4 * P, prot=pb.PROT_RW,
                                       uffd=pb.UFFD_MODE_MISSING), timeout=30)
    reader = stub.Read(pb.AccessRequest(process=p.handle, addr=v.start), timeout=30)
    deadline = time.monotonic() + 30
    while not (await stub.ListUserfaults(pb.ProcessRequest(process=p.handle), timeout=30)).waiting:
        if time.monotonic() > deadline:
            raise RuntimeError("the warm-up read never slept on its userfault")
        await asyncio.sleep(0.01)
    await stub.UffdCopy(pb.UffdCopyRequest(process=p.handle, dst=v.start, len=P, values=[1]), timeout=30)
    await reader
    await stub.Exit(pb.ProcessRequest(process=p.handle), timeout=30)
    await stub.CheckInvariants(pb.CheckInvariantsRequest(), timeout=60)
    await stub.Ping(pb.Empty(), timeout=30)


async def codes(calls: list[Any]) -> Counter[str]:
    """The status codes of the calls that ended (with the limit a RESOURCE_EXHAUSTED names);
    ``PENDING`` for the others."""
    out: Counter[str] = Counter()
    for c in calls:
        if not c.done():
            out["PENDING"] += 1
            continue
        code = (await c.code()).name
        status = await rpc_status.aio.from_call(c) if code == "RESOURCE_EXHAUSTED" else None
        for d in status.details if status is not None else ():
            info = error_details_pb2.ErrorInfo()
            if d.Unpack(info):
                code += f" ({info.metadata.get('limit') or info.reason})"
        out[code] += 1
    return out


# --- the attacks ------------------------------------------------------------------------------

def packed_request(handle: str, addr: int) -> pb.BatchRequest:
    copy = pb.UffdCopyRequest(process=handle, dst=addr, len=P, values=[1] * PACKED_VALUES)
    return pb.BatchRequest(ops=[pb.Op(uffd_copy=copy), pb.Op(read=pb.AccessRequest(process=handle, addr=addr + P))])


async def attack_packed(stub: mmsim_pb2_grpc.MemoryManagerStub, server: ServerProcess, pinger: Pinger,
                        hold: float) -> dict[str, Any]:
    p = await stub.CreateProcess(pb.CreateProcessRequest(), timeout=30)
    v = await stub.Mmap(pb.MmapRequest(process=p.handle, length=2 * P, prot=pb.PROT_RW,
                                       uffd=pb.UFFD_MODE_MISSING), timeout=30)
    request = packed_request(p.handle, v.start)
    pinger.go()
    calls = [stub.Batch(request, timeout=60) for _ in range(PACKED_CALLS)]
    await asyncio.sleep(hold)  # the attack's duration
    pings = await pinger.result()
    peak = server.status("VmHWM")
    outcome = await codes(calls)
    for c in calls:
        c.cancel()
    return {"pings": pings, "peak": peak, "outcome": dict(outcome), "wire_bytes": PACKED_CALLS * request.ByteSize()}


async def attack_faults(stub: mmsim_pb2_grpc.MemoryManagerStub, server: ServerProcess, pinger: Pinger,
                        hold: float) -> dict[str, Any]:
    p = await stub.CreateProcess(pb.CreateProcessRequest(), timeout=30)
    v = await stub.Mmap(pb.MmapRequest(process=p.handle, length=FAULTS * P, prot=pb.PROT_RW,
                                       uffd=pb.UFFD_MODE_MISSING), timeout=30)
    pinger.go()
    reads = [stub.Read(pb.AccessRequest(process=p.handle, addr=v.start + i * P), timeout=120) for i in range(FAULTS)]
    await asyncio.sleep(hold)  # the attack's duration
    pings = await pinger.result()
    peak = server.status("VmHWM")
    outcome = await codes(reads)
    try:
        await stub.UffdZeropage(pb.UffdZeropageRequest(process=p.handle, dst=v.start, len=FAULTS * P), timeout=10)
        resolved = "OK"
    except grpc.aio.AioRpcError as e:
        resolved = e.code().name
    waits = [asyncio.ensure_future(r) for r in reads]
    await asyncio.wait(waits, timeout=10)
    woke = sum(1 for w in waits if w.done() and not w.cancelled() and w.exception() is None)
    for w in waits:
        w.cancel()
    return {"pings": pings, "peak": peak, "outcome": dict(outcome), "resolve": resolved, "reads_ok_after": woke,
            "wire_bytes": 0}


ATTACKS = {"packed": attack_packed, "faults": attack_faults}


def server_args(attack: str, version: str) -> list[str]:
    if attack == "packed":
        return ["--max-memory", "64M"]
    return ["--max-pending-faults-per-process", "2000", "--max-pending-faults", "2000"] if version == "after" else []


def bound_bytes(attack: str, wire_bytes: int) -> int:
    """docs/server.md's bound on RSS over S for the attack's flags: the budget, the slack, the
    reserve's overdraft and the wire bytes of the requests being received."""
    budget = 64 * MiB if attack == "packed" else DEFAULT_MAX_MEMORY
    return budget + SLACK + RESERVED_RPCS * RESERVED_NOFAIL_BYTES + wire_bytes


async def run_one(attack: str, version: str, pythonpath: str | None, args: argparse.Namespace) -> dict[str, Any]:
    with serve(pythonpath, server_args(attack, version)) as server:
        options = [("grpc.max_send_message_length", 8 << 20), ("grpc.max_receive_message_length", 8 << 20)]
        async with grpc.aio.insecure_channel(server.addr, options=options) as ch:
            stub = mmsim_pb2_grpc.MemoryManagerStub(ch)
            await warm(stub)
            baseline = server.status("VmRSS")
            pinger = Pinger(server.addr, args)
            try:
                r = await ATTACKS[attack](stub, server, pinger, args.hold)
            finally:
                if pinger.proc.poll() is None:
                    pinger.proc.kill()
                    pinger.proc.wait()
    lat = sorted(r["pings"]["latencies_ms"])
    return {
        "attack": attack, "version": version, "ping_ok": len(lat), "ping_errors": r["pings"]["errors"],
        "p50_ms": percentile(lat, 0.50), "p99_ms": percentile(lat, 0.99),
        "baseline_mib": baseline / MiB, "peak_over_mib": (r["peak"] - baseline) / MiB,
        "bound_mib": bound_bytes(attack, r["wire_bytes"]) / MiB,
        **{k: v for k, v in r.items() if k not in ("pings", "peak", "wire_bytes")},
    }


def percentile(xs: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of the sorted ``xs`` (NaN when empty)."""
    return xs[max(0, math.ceil(q * len(xs)) - 1)] if xs else math.nan


# --- the table --------------------------------------------------------------------------------

def med(rows: list[dict[str, Any]], key: str) -> float:
    xs = [r[key] for r in rows if not math.isnan(r[key])]
    return statistics.median(xs) if xs else math.nan


def table(results: list[dict[str, Any]], versions: list[str]) -> str:
    lines = ["| attack | server | Ping OK | Ping errors (all runs) | p50 ms | p99 ms | peak RSS over baseline MiB "
             "| documented bound MiB | attack calls (last run) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for attack in ATTACKS:
        per = {v: [r for r in results if r["attack"] == attack and r["version"] == v] for v in versions}
        if not any(per.values()):
            continue
        for v in versions:
            rows = per[v]
            if not rows:
                continue
            errs: Counter[str] = Counter()
            for r in rows:
                errs.update(r["ping_errors"])
            last = rows[-1]
            calls = ", ".join(f"{k} {n}" for k, n in sorted(last["outcome"].items()))
            if "resolve" in last:
                calls += f"; UffdZeropage {last['resolve']}, reads woken {last['reads_ok_after']}"
            lines.append(
                f"| {attack} | {v} | {med(rows, 'ping_ok'):.0f} | "
                f"{', '.join(f'{k} {n}' for k, n in sorted(errs.items())) or '0'} | {med(rows, 'p50_ms'):.1f} | "
                f"{med(rows, 'p99_ms'):.1f} | {med(rows, 'peak_over_mib'):.0f} | {med(rows, 'bound_mib'):.0f} | "
                f"{calls} |")
        if len(versions) == 2 and all(per[v] for v in versions):
            a, b = per["after"], per["before"]
            ratio = [med(a, k) / med(b, k) if med(b, k) else math.nan
                     for k in ("ping_ok", "p50_ms", "p99_ms", "peak_over_mib")]
            lines.append(f"| {attack} | after/before | {ratio[0]:.2f} | | {ratio[1]:.2f} | {ratio[2]:.2f} | "
                         f"{ratio[3]:.2f} | | |")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> None:
    attacks = args.only.split(",") if args.only else list(ATTACKS)
    shim = make_shim(Path(args.before)) if args.before else None
    versions = ["before", "after"] if shim else ["after"]
    results: list[dict[str, Any]] = []
    try:
        for rep in range(args.repeats):
            for attack in attacks:
                order = versions if rep % 2 == 0 else versions[::-1]
                for v in order:
                    r = await run_one(attack, v, str(shim) if v == "before" else None, args)
                    results.append(r)
                    print(f"[{rep + 1}/{args.repeats}] {attack:6} {v:6} ping ok {r['ping_ok']:4} "
                          f"errors {r['ping_errors']} p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms "
                          f"peak +{r['peak_over_mib']:.0f} MiB (bound {r['bound_mib']:.0f}) calls {r['outcome']}"
                          + (f" resolve {r['resolve']} woken {r['reads_ok_after']}" if "resolve" in r else ""),
                          flush=True)
    finally:
        if shim:
            shutil.rmtree(shim)
    print(f"\n{os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}, "
          f"grpcio {grpc.__version__}, medians of {args.repeats}\n")
    print(table(results, versions))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))  # noqa: ASYNC240 - the run is over


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", help="a checkout of the earlier version to compare with")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", help="comma-separated attacks: " + ",".join(ATTACKS))
    ap.add_argument("--hold", type=float, default=3.0, help="seconds each attack is held while Pings run")
    ap.add_argument("--interval-ms", type=float, default=5.0)
    ap.add_argument("--ping-timeout", type=float, default=2.0)
    ap.add_argument("--json", help="write every run's figures here")
    ap.add_argument("--pinger", metavar="ADDR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.pinger:
        print(json.dumps(asyncio.run(_pinger(args.pinger, args.hold, args.interval_ms / 1e3, args.ping_timeout))))
        return
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
