"""mmsim.loadgen.locust: a headless Locust run of examples/locust/locustfile.py against a real
server completes with no failure, every task runs, and every process the users created is exited;
memory-semantics errors count as successes (named with the errno), other errors as failures; a
user stopped in the middle of a call finishes it and cleans up.

Importing locust monkey-patches the whole process with gevent, so Locust runs only in
subprocesses here: the server is one too, and the test talks to it with a plain blocking stub."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from mmsim.v1 import mmsim_pb2 as pb
from mmsim.v1 import mmsim_pb2_grpc

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("locust") is None,
    reason="locust is not installed: it is the 'locust' extra (pip install 'mmsim[locust]'; make test installs it)",
)

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "examples" / "locust" / "locustfile.py"
#: What the users' tasks report (fork_exit: fork and exit; mmap_munmap: mmap and munmap), and on_start.
TASK_NAMES = ["remap", "remap64", "walk", "walk_blocking", "fork", "exit", "write", "read", "mmap", "munmap"]
TASK_NAMES += ["batch", "stream", "create_process", "madvise", "write_all", "uffd_register"]


def _env() -> dict[str, str]:
    """This environment without pytest's or Locust's own variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "LOCUST_"))}


@pytest.fixture(scope="module")
def live_server() -> Iterator[str]:
    """``mmsim serve`` on a free loopback port, as a subprocess: its address. Stopped with SIGTERM,
    after which it must exit 0 (it audits the model on the way out)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmsim.server", "serve", "--listen", "127.0.0.1:0"]
        + ["--log-format", "json", "--access-log-sample", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    assert proc.stderr is not None
    rest: list[str] = []
    drain = threading.Thread(target=lambda: rest.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    try:
        first = proc.stderr.readline()
        try:
            started = json.loads(first)
        except ValueError:
            pytest.fail(f"the server did not start: {first!r}{proc.stderr.read()!r}")
        assert started["event"] == "serving", started
        drain.start()  # the pipe must never fill up
        yield started["listen"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        if drain.ident is not None:
            drain.join(timeout=10)
        proc.stderr.close()
    assert rc == 0, "".join(rest)


def _server_state(addr: str) -> tuple[list[str], dict[str, int]]:
    """The server's audit problems and its counters."""
    with grpc.insecure_channel(addr) as channel:
        stub = mmsim_pb2_grpc.MemoryManagerStub(channel)
        problems = list(stub.CheckInvariants(pb.CheckInvariantsRequest(), timeout=30).problems)
        counters = dict(stub.GetStats(pb.StatsRequest(), timeout=30).counters)
    return problems, counters


def _assert_clean(addr: str) -> None:
    problems, counters = _server_state(addr)
    assert problems == []
    assert counters["processes"] == 0, "a process the users created was not exited"
    assert counters["violations"] == 0, counters


def test_headless_run_of_the_example_completes_with_no_failures(live_server: str, tmp_path: Path) -> None:
    # The JSON file is written once the users have stopped; the CSV files are rewritten each second
    # while Locust runs, so their last state can miss the final second (the exits of on_stop).
    result = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "10", "-r", "5", "-t", "5s"]
        + ["--host", live_server, "--only-summary", "--json-file", str(tmp_path / "run")],
        cwd=tmp_path,  # no locust.conf or pyproject.toml of ours is read
        env=_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "All users spawned" in output and "Traceback" not in output, output
    stats = {(e["method"], e["name"]): e for e in json.loads((tmp_path / "run.json").read_text())}
    ran = {name: e["num_requests"] for (method, name), e in stats.items() if method == "grpc"}
    assert all(ran.get(name, 0) > 0 for name in TASK_NAMES), ran
    assert ran["create_process"] == 10 and ran["write_all"] == 10, ran  # every user set up once
    assert {name: e["num_failures"] for (_, name), e in stats.items() if e["num_failures"]} == {}, output
    assert "mmsim: " in output, output  # the table of expected outcomes, printed at the end
    _assert_clean(live_server)


# Runs one user in process (without a runner) with a capture of its reports.
SCRIPT = r"""
import json, sys
import gevent, gevent.event
from locust import constant
from locust.env import Environment
from locust.exception import RescheduleTask
from mmsim.loadgen import locust as ml
from mmsim.v1 import mmsim_pb2 as pb

class User(ml.MmsimUser):
    wait_time = constant(0)
    pages = 320

User.host = "grpc://" + sys.argv[1]
env = Environment(user_classes=[User])
seen = []
env.events.request.add_listener(
    lambda name, exception, **kw: seen.append([name, None if exception is None else repr(exception)])
)
out = {"targets": [ml.target_of("grpc://h:1"), ml.target_of("http://h:2/"), ml.target_of(" h:3 ")]}
user = User(env)
user.on_start()
created = list(user.processes)

# EEXIST: the destination page is there (both pages are in the source region): an expected outcome.
r = user.mm.call("remap", "Remap", pb.RemapRequest(process=user.handle, dst=user.addr(65), src=user.addr(64), len=4096))
out["eexist"] = r.errno
# INVALID_ARGUMENT with an errno (EINVAL, unaligned): expected; without one (a malformed handle): a failure.
unaligned = pb.RemapRequest(process=user.handle, dst=user.addr(65), src=user.addr(64) + 1, len=4096)
r = user.mm.call("remap", "Remap", unaligned)
out["einval"] = r.errno
try:
    user.mm.call("remap", "Remap", pb.RemapRequest(process="no-such-handle", dst=4096, src=8192, len=4096))
    out["malformed"] = "returned"
except RescheduleTask:
    out["malformed"] = "rescheduled"

# A batch whose first move starts where the page is not: that operation's errno is counted.
user.loc[64] ^= 1
before = len(seen)
user.batch()
out["batch_events"] = seen[before:]

# Stopped during a Fork: the call completes, the child is exited, then the user stops.
forking = gevent.event.Event()
invoke = user.mm._invoke
def spy(method, request):
    if method == "Fork":
        forking.set()
    return invoke(method, request)
user.mm._invoke = spy
before = len(seen)
g = gevent.spawn(user.fork_exit)
forking.wait()
g.kill(block=True)
out["killed"] = type(g.value).__name__
out["after_kill"] = seen[before:]
out["left_after_kill"] = len(user.processes) - len(created)
user.mm._invoke = invoke

before = len(seen)
user.on_stop()
out["on_stop"] = seen[before:]
out["seen"] = seen
out["outcomes"] = dict(ml.outcomes)
out["summary"] = ml.summary()
print(json.dumps(out))
"""


def test_errnos_are_outcomes_other_errors_failures_and_a_stop_waits_for_the_call(
    live_server: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, live_server],
        cwd=tmp_path,
        env=_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    seen = out["seen"]
    assert out["targets"] == ["h:1", "h:2", "h:3"]

    assert out["eexist"] == 17 and ["remap [EEXIST]", None] in seen  # a success, named with the errno
    assert out["einval"] == 22 and ["remap [EINVAL]", None] in seen
    failures = [(name, exc) for name, exc in seen if exc is not None]
    assert out["malformed"] == "rescheduled" and len(failures) == 1, failures
    assert failures[0][0] == "remap" and "INVALID_ARGUMENT" in failures[0][1], failures

    assert out["batch_events"] == [["batch", None]], out["batch_events"]
    batch_errnos = {k: n for k, n in out["outcomes"].items() if k.startswith("batch remap ")}
    assert sum(batch_errnos.values()) >= 1, out["outcomes"]
    assert out["outcomes"]["remap EEXIST"] == 1 and out["outcomes"]["remap EINVAL"] == 1, out["outcomes"]
    assert any(line.strip().startswith("remap EEXIST") for line in out["summary"]), out["summary"]

    # The stop came during the Fork; the fork and the child's exit were still made and reported.
    assert out["killed"] == "GreenletExit"
    assert out["after_kill"] == [["fork", None], ["exit", None]], out["after_kill"]
    assert out["left_after_kill"] == 0
    assert out["on_stop"] == [["exit", None]], out["on_stop"]
    _assert_clean(live_server)


def test_the_credential_options_reach_every_user(tmp_path: Path) -> None:
    """A server that requires a bearer token: the users send it from --mmsim-token-file (or
    MMSIM_TOKEN_FILE), and every call they make succeeds."""
    from mmsim.client.testing import serve_subprocess

    token = tmp_path / "token"
    token.write_text("locust-test-token-0123456789\n")
    with serve_subprocess("--token-file", str(token)) as server:
        for extra, env in ((["--mmsim-token-file", str(token)], {}), ([], {"MMSIM_TOKEN_FILE": str(token)})):
            result = subprocess.run(
                [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "2", "-r", "2", "-t", "2s"]
                + ["--host", server.addr, "--only-summary", "--json-file", str(tmp_path / "run"), *extra],
                cwd=tmp_path, env={**_env(), **env}, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                timeout=120,
            )
            output = result.stdout + result.stderr
            assert result.returncode == 0, output
            stats = json.loads((tmp_path / "run.json").read_text())
            assert sum(e["num_requests"] for e in stats) > 0 and sum(e["num_failures"] for e in stats) == 0, output
