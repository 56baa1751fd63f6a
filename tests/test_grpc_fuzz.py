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
    st.sampled_from(
        [0, 1, P - 1, BASE, BASE + P, BASE + 7 * P, BASE + 8 * P, BASE + 15 * P, BASE + 100, U64, U64 - P + 1]
    ),
    st.integers(0, 16).map(lambda i: BASE + i * P),
    st.integers(0, U64),
)
lengths = st.one_of(
    st.sampled_from([0, 1, P, 2 * P, 8 * P, 16 * P, 64 * P, 65 * P, 1 << 40, U64]), st.integers(0, 32 * P)
)
enum_vals = st.one_of(st.integers(0, 5), st.integers(-(2**31), 2**31 - 1))
#: Ways to spoil a real handle "<shard>.<generation>.<pid>.<token>" (the pid part is a decimal number).
MUTATIONS = {
    "superscript": lambda h: h.replace("." + h.split(".")[2] + ".", ".\u00b2."),
    "arabic-indic": lambda h: h.replace("." + h.split(".")[2] + ".", ".\u0661."),
    "fullwidth": lambda h: h.replace("." + h.split(".")[2] + ".", ".\uff11."),
    "leading-zero": lambda h: h.replace("." + h.split(".")[2] + ".", ".0" + h.split(".")[2] + "."),
    "huge-pid": lambda h: h.replace("." + h.split(".")[2] + ".", "." + "9" * 5000 + "."),
    "wrong-token": lambda h: h[:-1] + ("0" if h[-1] != "0" else "1"),
    "upper-token": lambda h: h.upper(),
    "no-token": lambda h: h.rsplit(".", 1)[0],
    "trailing-newline": lambda h: h + "\n",
    "padded": lambda h: " " + h,
    "long": lambda h: h + "0" * 8192,
}
handle_choice = st.one_of(
    st.integers(0, 7),
    st.tuples(st.integers(0, 7), st.sampled_from(sorted(MUTATIONS))),
    st.sampled_from(["", "x", "0.1", "deadbeef.1", "....", "\u00e9.2", "\u00b2", "9" * 5000, "a" * 8192]),
    st.text(max_size=80),
)


def op_strategy() -> st.SearchStrategy[tuple[str, dict]]:
    return st.one_of(
        st.tuples(st.just("CreateProcess"), st.fixed_dictionaries({})),
        st.tuples(st.just("Fork"), st.fixed_dictionaries({"process": handle_choice})),
        st.tuples(st.just("Exit"), st.fixed_dictionaries({"process": handle_choice})),
        st.tuples(st.just("Mmap"), st.fixed_dictionaries({"process": handle_choice, "length": lengths,
                                                          "prot": enum_vals, "addr": st.none() | addrs,
                                                          "uffd": enum_vals})),
        st.tuples(st.just("Munmap"),
                  st.fixed_dictionaries({"process": handle_choice, "addr": addrs, "length": lengths})),
        st.tuples(st.just("Madvise"), st.fixed_dictionaries({"process": handle_choice, "addr": addrs,
                                                             "length": lengths, "advice": enum_vals})),
        st.tuples(st.just("UffdRegister"), st.fixed_dictionaries({"process": handle_choice, "addr": addrs,
                                                                  "length": lengths, "mode": enum_vals})),
        st.tuples(st.just("UffdUnregister"),
                  st.fixed_dictionaries({"process": handle_choice, "addr": addrs, "length": lengths})),
        st.tuples(st.just("Read"), st.fixed_dictionaries({"process": handle_choice, "addr": addrs})),
        st.tuples(st.just("Write"), st.fixed_dictionaries({"process": handle_choice, "addr": addrs,
                                                           "value": st.integers(0, U64)})),
        st.tuples(st.just("Remap"), st.fixed_dictionaries({"process": handle_choice, "dst": addrs, "src": addrs,
                                                           "len": lengths, "mode": st.integers(0, U64)})),
        st.tuples(st.just("Walk"), st.fixed_dictionaries({"process": handle_choice, "addr": addrs,
                                                          "blocking": st.booleans()})),
        st.tuples(st.just("GetFolio"), st.fixed_dictionaries({"process": handle_choice, "addr": addrs})),
        st.tuples(st.just("ListVmas"), st.fixed_dictionaries({"process": handle_choice})),
        st.tuples(st.just("DumpAnonVmaTree"),
                  st.fixed_dictionaries({"process": handle_choice, "addr": st.none() | addrs})),
    )


REQUEST = {
    "CreateProcess": pb.CreateProcessRequest, "Fork": pb.ProcessRequest, "Exit": pb.ProcessRequest,
    "Mmap": pb.MmapRequest, "Munmap": pb.RangeRequest, "Madvise": pb.MadviseRequest,
    "UffdRegister": pb.UffdRegisterRequest, "UffdUnregister": pb.RangeRequest, "Read": pb.AccessRequest,
    "Write": pb.WriteRequest, "Remap": pb.RemapRequest, "Walk": pb.WalkRequest, "GetFolio": pb.AccessRequest,
    "ListVmas": pb.ProcessRequest, "DumpAnonVmaTree": pb.AnonVmaTreeRequest,
}
#: Never UNKNOWN or INTERNAL.
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
        elif "process" in fields and isinstance(fields["process"], tuple):
            i, how = fields["process"]
            fields["process"] = MUTATIONS[how](h.handles[i % len(h.handles)]) if h.handles else ""
        if fields.get("addr", 0) is None:
            del fields["addr"]
        reqs.append((name, REQUEST[name](**fields)))
    if batched:
        field_of = {"CreateProcess": "create_process", "Fork": "fork", "Exit": "exit", "Mmap": "mmap",
                    "Munmap": "munmap", "Madvise": "madvise", "UffdRegister": "uffd_register",
                    "UffdUnregister": "uffd_unregister", "Read": "read", "Write": "write", "Remap": "remap",
                    "Walk": "walk", "GetFolio": "get_folio"}
        batch = [pb.Op(**{field_of[n]: r}) for n, r in reqs if n in field_of]
        resp = await h.stub.Batch(pb.BatchRequest(ops=batch), timeout=10)
        assert len(resp.results) == len(batch)  # a failing operation fails alone
        for r in resp.results:
            if r.HasField("error"):
                assert grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == r.error.code)) in ALLOWED
                assert len(r.error.message) < 512  # echoed input is truncated
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
            assert len(e.details() or "") < 512


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op_strategy(), min_size=1, max_size=25), batched=st.booleans())
def test_random_requests_never_break_the_server(harness: Harness, ops: list[tuple[str, dict]], batched: bool) -> None:
    harness.loop.run_until_complete(asyncio.wait_for(run_ops(harness, ops, batched), 60))
    problems = harness.loop.run_until_complete(harness.stub.CheckInvariants(pb.CheckInvariantsRequest(), timeout=10))
    assert list(problems.problems) == []
    assert not harness.server.model.detectors.counts


def test_garbage_bytes_are_rejected_cleanly(harness: Harness) -> None:
    async def go() -> None:
        raw: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = harness.channel.unary_unary(
            "/mmsim.v1.MemoryManager/Remap"
        )
        for junk in (b"\xff\xff\xff", b"\x0a\x05abc", bytes(range(40))):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await raw(junk, timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "does not parse" in (e.value.details() or "")
        await harness.stub.Ping(pb.Empty(), timeout=5)  # still serving

    harness.loop.run_until_complete(go())


def test_bad_handles_answer_invalid_argument_or_not_found(harness: Harness) -> None:
    """Every process RPC, unary and in a batch, with each spoilt form of a real handle: INVALID_ARGUMENT
    for what is not a handle, NOT_FOUND for a handle of no process; short messages that never echo a
    token; a batch whose bad operation fails alone while the others take effect."""

    async def go() -> None:
        real = (await harness.stub.CreateProcess(pb.CreateProcessRequest(), timeout=5)).handle
        token = real.rsplit(".", 1)[1]
        unary = {
            name: REQUEST[name] for name in REQUEST if name != "CreateProcess"
        }
        for how, spoil in MUTATIONS.items():
            bad = spoil(real)
            want = grpc.StatusCode.NOT_FOUND if how == "wrong-token" else grpc.StatusCode.INVALID_ARGUMENT
            for name, request in unary.items():
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await getattr(harness.stub, name)(request(process=bad), timeout=5)
                assert e.value.code() == want, (how, name, e.value.code(), e.value.details())
                details = e.value.details() or ""
                assert len(details) < 200 and token not in details
            batch = pb.BatchRequest(
                ops=[pb.Op(create_process=pb.CreateProcessRequest()), pb.Op(fork=pb.ProcessRequest(process=bad)),
                     pb.Op(create_process=pb.CreateProcessRequest())]
            )
            resp = await harness.stub.Batch(batch, timeout=5)
            assert [r.WhichOneof("result") for r in resp.results] == ["process", "error", "process"]
            assert resp.results[1].error.code == want.value[0]
            for r in (resp.results[0], resp.results[2]):
                await harness.stub.Exit(pb.ProcessRequest(process=r.process.handle), timeout=5)
        await harness.stub.Exit(pb.ProcessRequest(process=real), timeout=5)

    harness.loop.run_until_complete(go())


def test_handles_are_unguessable_capabilities(harness: Harness) -> None:
    """Knowing one handle gives nothing else: the handles of two processes share only the shard and
    its generation; a neighbour's pid with this handle's token is NOT_FOUND; walk results name
    other processes by pid, never by handle."""

    async def go() -> None:
        a = await harness.stub.CreateProcess(pb.CreateProcessRequest(), timeout=5)
        b = await harness.stub.Fork(pb.ProcessRequest(process=a.handle), timeout=5)
        shard_a, gen_a, pid_a, tok_a = a.handle.split(".")
        shard_b, gen_b, pid_b, tok_b = b.handle.split(".")
        inst_a = f"{shard_a}.{gen_a}"
        assert (shard_a, gen_a) == (shard_b, gen_b) and int(pid_a) == a.pid and int(pid_b) == b.pid
        assert len(tok_a) == len(tok_b) == 32 and tok_a != tok_b  # 128 random bits each
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await harness.stub.ListVmas(pb.ProcessRequest(process=f"{inst_a}.{pid_b}.{tok_a}"), timeout=5)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        v = await harness.stub.Mmap(pb.MmapRequest(process=a.handle, length=P, prot=pb.PROT_RW), timeout=5)
        await harness.stub.Write(pb.WriteRequest(process=a.handle, addr=v.start, value=7), timeout=5)
        c = await harness.stub.Fork(pb.ProcessRequest(process=a.handle), timeout=5)
        w = await harness.stub.Walk(pb.WalkRequest(process=a.handle, addr=v.start), timeout=5)
        assert sorted(m.pid for m in w.mappings) == sorted([a.pid, c.pid])
        assert tok_a not in str(w) and c.handle.split(".")[3] not in str(w)
        for h in (c.handle, b.handle, a.handle):
            await harness.stub.Exit(pb.ProcessRequest(process=h), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await harness.stub.ListVmas(pb.ProcessRequest(process=a.handle), timeout=5)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND  # an exited process's handle is dead

    harness.loop.run_until_complete(go())


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.tuples(st.sampled_from([0, 1, 10_000, 10_001, 12_000]), st.sampled_from(["", "\u00b2", "x" * 64])),
        st.tuples(st.integers(1, 60), st.sampled_from(["9" * 5000, "x" * 100_000])),
    )
)
def test_huge_repeated_fields(harness: Harness, case: tuple[int, str]) -> None:
    """Batches at and past the operation limit, with huge strings in them: RESOURCE_EXHAUSTED for
    too many operations (the server's limit) or too large a message, per-operation errors otherwise,
    never UNKNOWN or INTERNAL."""

    n, junk = case

    async def go() -> None:
        batch = pb.BatchRequest(ops=[pb.Op(get_folio=pb.AccessRequest(process=junk, addr=i)) for i in range(n)])
        try:
            resp = await harness.stub.Batch(batch, timeout=30)
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (n, len(junk), e.code(), e.details())
            assert n > 10_000 or batch.ByteSize() > 4 * 1024 * 1024
            return
        assert n <= 10_000
        codes = {r.error.code for r in resp.results}
        assert codes <= {grpc.StatusCode.INVALID_ARGUMENT.value[0], grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}
        assert len(resp.results) == n or resp.results[-1].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]

    harness.loop.run_until_complete(go())
