"""Requests made to hurt: a request id meant to flood the log, a reply too large to send, a Batch
whose forks would outgrow its response. Each gets a clear answer and leaves the model whole."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from typing import Any

import grpc
import pytest

from mmsim.client import Client, LimitExceededError, ops
from mmsim.client.testing import serve_in_process
from mmsim.server.app import REQUEST_ID_MAX, request_id
from mmsim.server.mm.mm_types import PAGE_SIZE as P
from mmsim.v1 import mmsim_pb2 as pb
from mmsim.v1 import mmsim_pb2_grpc


def test_request_ids_are_sanitised_and_truncated() -> None:
    assert request_id("req-7") == "req-7"
    assert request_id("a\nb\x1b[31mc d") == "a_b__31mc_d"
    assert len(request_id("x" * 7000)) == REQUEST_ID_MAX
    assert request_id(None) and request_id(None) != request_id(None)


async def test_the_access_log_holds_a_sanitised_request_id_and_the_status_the_client_got() -> None:
    """A 7 KB request id made to look like log fields is logged truncated and clean; a ListVmas reply
    over --max-message-bytes is RESOURCE_EXHAUSTED for the client and in the access log alike, and is
    never built past the limit."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmsim.server", "serve", "--listen", "127.0.0.1:0", "--log-format", "json",
         "--max-message-bytes", "65536"], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    lines: list[dict[str, Any]] = []
    try:
        while True:
            line = proc.stderr.readline()
            assert line, "the server exited"
            if line.startswith("{") and json.loads(line).get("event") == "serving":
                addr = json.loads(line)["listen"]
                break
        pump = threading.Thread(target=lambda: lines.extend(json.loads(x) for x in proc.stderr if x.startswith("{")))  # type: ignore[union-attr]
        pump.start()
        async with grpc.aio.insecure_channel(addr) as ch:
            stub = mmsim_pb2_grpc.MemoryManagerStub(ch)
            await stub.Ping(pb.Empty(), metadata=(("x-request-id", 'evil "} {"level": "critical" ' + "A" * 7000),))
            p = await stub.CreateProcess(pb.CreateProcessRequest())
            v = await stub.Mmap(pb.MmapRequest(process=p.handle, length=4000 * P, prot=pb.PROT_RW))
            for i in range(0, 4000, 2):  # 2,000 VMAs: about 40 KB of Vma messages... and more
                await stub.Mprotect(pb.MprotectRequest(process=p.handle, addr=v.start + i * P, length=P,
                                                       prot=pb.PROT_R))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.ListVmas(pb.ProcessRequest(process=p.handle), metadata=(("x-request-id", "list-1"),))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_message_bytes" in (e.value.details() or "") or "max-message-bytes" in (e.value.details() or "")
            await stub.Ping(pb.Empty())
        proc.terminate()
        assert proc.wait(60) == 0
        pump.join(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    access = {r["request_id"]: r for r in lines if r.get("event") == "rpc"}
    evil = [r for rid, r in access.items() if rid.startswith("evil")]
    assert len(evil) == 1 and len(evil[0]["request_id"]) == REQUEST_ID_MAX
    assert evil[0]["request_id"].startswith("evil___") and " " not in evil[0]["request_id"]
    assert access["list-1"]["code"] == "RESOURCE_EXHAUSTED"


async def test_a_batch_of_forks_never_creates_a_child_whose_handle_it_cannot_return() -> None:
    """The response limit is checked before each fork: every child made is named in the
    results, and the one that would not fit is not made."""
    async with serve_in_process(max_message_bytes=16 << 10, log_level="warning") as addr:
        async with Client(addr) as mm:
            p = await mm.create_process()
            # As many forks as the request can carry: their results (a handle each) take more.
            n = ((16 << 10) - 64) // (pb.Op(fork=pb.ProcessRequest(process=p.id)).ByteSize() + 2)
            results = await mm.batch([ops.fork(p) for _ in range(n)])
            children = [r for r in results if not isinstance(r, BaseException)]
            errors = [r for r in results if isinstance(r, BaseException)]
            assert children and len(errors) == 1 and isinstance(errors[0], LimitExceededError)
            assert len(results) < n  # the rest were not run
            stats = await mm.stats()
            assert stats["processes"] == 1 + len(children)  # no child without a handle
            for c in children:
                await c.exit()
            assert (await mm.stats())["processes"] == 1
            assert await mm.check_invariants() == []
