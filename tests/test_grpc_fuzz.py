"""Random and malformed requests through gRPC: never INTERNAL, never a hang, never a broken model."""

import asyncio
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmsim.server.app import RunningServer, ServerConfig, start_server
from mmsim.v1 import mmsim_pb2 as pb
from mmsim.v1 import mmsim_pb2_grpc

P = 4096
BASE = 0x40000000
U64 = (1 << 64) - 1


class Harness:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)  # grpc.aio looks the loop up
        self.server: RunningServer = self.loop.run_until_complete(
            start_server(ServerConfig(listen="127.0.0.1:0", log_level="error", max_remap_bytes=64 * P))
        )
        self.channel = self.loop.run_until_complete(self._connect())
        self.stub = mmsim_pb2_grpc.MemoryManagerStub(self.channel)
        self.handles: list[str] = []

    async def _connect(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(f"127.0.0.1:{self.server.port}")  # bound to this loop

    def close(self) -> None:
        self.loop.run_until_complete(self.channel.close())
        self.loop.run_until_complete(self.server.stop(None))
        self.loop.close()
        asyncio.set_event_loop(None)


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


addrs = st.one_of(
    st.sampled_from([0, 1, P - 1, BASE, BASE + P, BASE + 7 * P, BASE + 8 * P, BASE + 15 * P, BASE + 100, U64, U64 - P + 1]),
    st.integers(0, 16).map(lambda i: BASE + i * P),
    st.integers(0, U64),
)
lengths = st.one_of(
    st.sampled_from([0, 1, P, 2 * P, 8 * P, 16 * P, 64 * P, 65 * P, 1 << 40, U64]), st.integers(0, 32 * P)
)
enum_vals = st.one_of(st.integers(0, 5), st.integers(-(2**31), 2**31 - 1))
handle_choice = st.one_of(st.integers(0, 7), st.sampled_from(["", "x", "0.1", "deadbeef.1", "....", "\u00e9.2"]))


def op_strategy() -> st.SearchStrategy[tuple[str, dict]]:
    return st.one_of(
        st.tuples(st.just("CreateProcess"), st.fixed_dictionaries({})),
        st.tuples(st.just("Fork"), st.fixed_dictionaries({"process": handle_choice})),
        st.tuples(st.just("Exit"), st.fixed_dictionaries({"process": handle_choice})),
        st.tuples(st.just("Mmap"), st.fixed_dictionaries({"process": handle_choice, "length": lengths, "prot": enum_vals, "addr": st.none() | addrs, "uffd": enum_vals})),
        st.tuples(st.just("Munmap"), st.fixed_dictionaries({"process": handle_choice, "addr": addrs, "length": lengths})),
        st.tuples(st.just("Madvise"), st.fixed_dictionaries({"process": handle_choice, "addr": addrs, "length": lengths, "advice": enum_vals})),
        st.tuples(st.just("UffdRegister"), st.fixed_dictionaries({"process": handle_choice, "addr": addrs, "length": lengths, "mode": enum_vals})),
        st.tuples(st.just("UffdUnregister"), st.fixed_dictionaries({"process": handle_choice, "addr": addrs, "length": lengths})),
        st.tuples(st.just("Read"), st.fixed_dictionaries({"process": handle_choice, "addr": addrs})),
        st.tuples(st.just("Write"), st.fixed_dictionaries({"process": handle_choice, "addr": addrs, "value": st.integers(0, U64)})),
        st.tuples(st.just("Remap"), st.fixed_dictionaries({"process": handle_choice, "dst": addrs, "src": addrs, "len": lengths, "mode": st.integers(0, U64)})),
        st.tuples(st.just("Walk"), st.fixed_dictionaries({"process": handle_choice, "addr": addrs, "blocking": st.booleans()})),
        st.tuples(st.just("GetFolio"), st.fixed_dictionaries({"process": handle_choice, "addr": addrs})),
        st.tuples(st.just("ListVmas"), st.fixed_dictionaries({"process": handle_choice})),
        st.tuples(st.just("DumpAnonVmaTree"), st.fixed_dictionaries({"process": handle_choice, "addr": st.none() | addrs})),
    )


REQUEST = {
    "CreateProcess": pb.CreateProcessRequest, "Fork": pb.ProcessRequest, "Exit": pb.ProcessRequest,
    "Mmap": pb.MmapRequest, "Munmap": pb.RangeRequest, "Madvise": pb.MadviseRequest,
    "UffdRegister": pb.UffdRegisterRequest, "UffdUnregister": pb.RangeRequest, "Read": pb.AccessRequest,
    "Write": pb.WriteRequest, "Remap": pb.RemapRequest, "Walk": pb.WalkRequest, "GetFolio": pb.AccessRequest,
    "ListVmas": pb.ProcessRequest, "DumpAnonVmaTree": pb.AnonVmaTreeRequest,
}
ALLOWED = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
}


async def run_ops(h: Harness, ops: list[tuple[str, dict]], batched: bool) -> None:
    reqs = []
    for name, fields in ops:
        fields = dict(fields)
        if "process" in fields and isinstance(fields["process"], int):
            fields["process"] = h.handles[fields["process"] % len(h.handles)] if h.handles else ""
        if fields.get("addr", 0) is None:
            del fields["addr"]
        reqs.append((name, REQUEST[name](**fields)))
    if batched:
        field_of = {"CreateProcess": "create_process", "Fork": "fork", "Exit": "exit", "Mmap": "mmap", "Munmap": "munmap",
                    "Madvise": "madvise", "UffdRegister": "uffd_register", "UffdUnregister": "uffd_unregister",
                    "Read": "read", "Write": "write", "Remap": "remap", "Walk": "walk", "GetFolio": "get_folio"}
        batch = [pb.Op(**{field_of[n]: r}) for n, r in reqs if n in field_of]
        resp = await h.stub.Batch(pb.BatchRequest(ops=batch), timeout=10)
        assert len(resp.results) == len(batch)
        for r in resp.results:
            if r.HasField("error"):
                assert grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == r.error.code)) in ALLOWED
            elif r.HasField("process"):
                h.handles.append(r.process.handle)
        return
    for name, req in reqs:
        try:
            resp = await getattr(h.stub, name)(req, timeout=10)
            if isinstance(resp, pb.Process):
                h.handles.append(resp.handle)
        except grpc.aio.AioRpcError as e:
            assert e.code() in ALLOWED, (name, req, e.code(), e.details())


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op_strategy(), min_size=1, max_size=25), batched=st.booleans())
def test_random_requests_never_break_the_server(harness: Harness, ops: list[tuple[str, dict]], batched: bool) -> None:
    harness.loop.run_until_complete(asyncio.wait_for(run_ops(harness, ops, batched), 60))
    problems = harness.loop.run_until_complete(harness.stub.CheckInvariants(pb.CheckInvariantsRequest(), timeout=10))
    assert list(problems.problems) == []
    assert not harness.server.model.detectors.counts


def test_garbage_bytes_are_rejected_cleanly(harness: Harness) -> None:
    async def go() -> None:
        raw = harness.channel.unary_unary("/mmsim.v1.MemoryManager/Remap")
        for junk in (b"\xff\xff\xff", b"\x0a\x05abc", bytes(range(40))):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await raw(junk, timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "does not parse" in (e.value.details() or "")
        await harness.stub.Ping(pb.Empty(), timeout=5)  # still serving

    harness.loop.run_until_complete(go())
