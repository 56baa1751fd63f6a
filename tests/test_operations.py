"""The table of operations (mmsim.v1.operations) agrees with the proto, and every part of mmsim that
lists operations reads its list from it: the servicer, admission, the batch encoding, the SDK, the
litmus language and explorer, the load generator."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from mmsim.client import Client, Process, ops
from mmsim.client import _client as client_mod
from mmsim.loadgen import profiles
from mmsim.server import admission, wire_encoding
from mmsim.server.service import MemoryManagerServicer
from mmsim.server.tools import explore, litmus
from mmsim.v1 import mmsim_pb2 as pb
from mmsim.v1 import mmsim_pb2_grpc, operations
from mmsim.v1.operations import BATCHABLE, BY_LITMUS, BY_OP_FIELD, BY_RPC, OPERATIONS, OperationsError

SERVICE = pb.DESCRIPTOR.services_by_name["MemoryManager"]


# -- the table and the proto
def test_every_rpc_of_the_service_has_a_row_in_its_order() -> None:
    assert [op.rpc for op in OPERATIONS] == [m.name for m in SERVICE.methods]
    for op in OPERATIONS:
        m = SERVICE.methods_by_name[op.rpc]
        assert op.request.DESCRIPTOR.full_name == m.input_type.full_name
        assert op.response.DESCRIPTOR.full_name == m.output_type.full_name
        assert (op.client_streaming, op.server_streaming) == (m.client_streaming, m.server_streaming)
        assert op.full_method == f"/mmsim.v1.MemoryManager/{op.rpc}"


def test_every_op_field_has_a_row_and_every_result_field_a_batchable_row() -> None:
    fields = pb.Op.DESCRIPTOR.oneofs_by_name["op"].fields
    assert {f.name for f in fields} == set(BY_OP_FIELD)
    for f in fields:
        op = BY_OP_FIELD[f.name]
        assert f.message_type is not None and op.request.DESCRIPTOR.full_name == f.message_type.full_name
        assert op.op_number == f.number
        result = pb.OpResult.DESCRIPTOR.fields_by_name[op.result_field]  # type: ignore[index]
        assert result.message_type is not None and result.message_type.full_name == op.response.DESCRIPTOR.full_name
    results = {f.name for f in pb.OpResult.DESCRIPTOR.oneofs_by_name["result"].fields} - {"error"}
    assert results == operations.RESULT_FIELDS
    assert [op.rpc for op in OPERATIONS if not op.batchable and op.result_field is not None] == []


def test_what_the_descriptors_say() -> None:
    assert BY_OP_FIELD["get_folio"].rpc == "GetFolio" and BY_OP_FIELD["get_folio"].result_field == "folio"
    assert [op.rpc for op in OPERATIONS if op.packed_values] == ["UffdCopy"]
    assert [op.rpc for op in OPERATIONS if op.batch] == ["Batch", "BatchStream"]
    assert [op.rpc for op in BATCHABLE if not op.bounded] == ["Walk"]
    assert not BY_RPC["CreateProcess"].on_process and BY_RPC["Fork"].on_process
    assert [op.rpc for op in OPERATIONS if op.server_streaming] == ["Userfaults", "BatchStream"]


@pytest.mark.parametrize(("change", "why"), [
    (lambda hand: hand.pop("Walk"), r"RPCs without a row: \['Walk'\]"),
    (lambda hand: hand.update(Frob=operations._Hand(mutates=False)), r"rows without an RPC: \['Frob'\]"),
    (lambda hand: hand.update(Walk=operations._Hand(mutates=True, litmus="walk")), "Walk changes the model"),
    (lambda hand: hand.update(Walk=operations._Hand(mutates=False, litmus="read")), "litmus keyword names two"),
    (lambda hand: hand.update(Read=operations._Hand(mutates=True, done="moved")), "ReadResponse has no field"),
])
def test_a_row_that_disagrees_with_the_proto_fails_the_import(
    monkeypatch: pytest.MonkeyPatch, change: Any, why: str
) -> None:
    hand = dict(operations._BY_HAND)
    change(hand)
    monkeypatch.setattr(operations, "_BY_HAND", hand)
    with pytest.raises(OperationsError, match=why):
        operations._build()


# -- the SDK
def test_every_rows_sdk_methods_exist_on_the_client() -> None:
    for op in OPERATIONS:
        owner = Process if op.on_process else Client
        for name in op.sdk:
            assert callable(getattr(owner, name, None)), f"{op.rpc}: no {owner.__name__}.{name}"


class _FakeProcess:
    id = "0.1.2.00000000000000000000000000000000"


def test_every_batchable_row_has_a_builder_that_builds_its_op() -> None:
    assert set(ops.__all__) - {"Op"} == {op.sdk[0] for op in BATCHABLE}
    samples: dict[str, object] = {"p": _FakeProcess(), "advice": "dontneed", "prot": "rw"}
    for op in BATCHABLE:
        builder = getattr(ops, op.sdk[0])
        params = inspect.signature(builder).parameters.values()
        args = [samples.get(p.name, 4096) for p in params if p.default is inspect.Parameter.empty]
        built = builder(*args)
        assert built.kind == op.op_field and type(built.request) is op.request


def test_the_sdk_decodes_every_result_field() -> None:
    assert set(client_mod._DECODE) == operations.RESULT_FIELDS
    client = Client("fake:0")
    for op in BATCHABLE:
        message = op.response(present=True) if op.response is pb.FolioResponse else op.response()
        decoded = client_mod._op_result(None, client, pb.OpResult(**{op.result_field: message}))  # type: ignore[arg-type]
        if op.result_field == "process":
            assert isinstance(decoded, Process)
        elif op.response in (pb.Empty, pb.ExitResponse):
            assert decoded is None
        else:
            assert decoded is not None, op.rpc
    assert client_mod._DONE_ALIAS == {"uffd_copy": "copied", "uffd_zeropage": "zeroed"}


async def test_a_process_method_calls_the_rpc_its_row_names(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[str] = []

    async def call(self: Process, method: str, request: Any, timeout: Any) -> Any:
        called.append(method)
        return pb.ReadResponse(value=7)

    monkeypatch.setattr(Process, "_call", call)
    p = Client("fake:0").process(_FakeProcess.id)
    assert await p.read(4096) == 7 and called == ["Read"]
    # The row says which RPC: a row of another name is called by that name.
    monkeypatch.setitem(client_mod.BY_OP_FIELD, "read", dataclasses.replace(BY_OP_FIELD["read"], rpc="ReadAgain"))
    assert await p.read(4096) == 7 and called == ["Read", "ReadAgain"]


# -- the server
def test_the_servicer_runs_every_batchable_row_and_answers_every_rpc() -> None:
    from mmsim.server.mm.model import MemoryModel

    servicer = MemoryManagerServicer(MemoryModel())
    assert set(servicer._ops) == set(BY_OP_FIELD)
    base = mmsim_pb2_grpc.MemoryManagerServicer
    for op in OPERATIONS:  # none is left to the generated base class's UNIMPLEMENTED
        assert getattr(MemoryManagerServicer, op.rpc) is not getattr(base, op.rpc), op.rpc
    assert MemoryManagerServicer.Remap.__qualname__ == "MemoryManagerServicer.Remap"


def test_the_batch_and_admission_read_the_table() -> None:
    from mmsim.server import service

    assert service._UNBOUNDED == {field for field, op in BY_OP_FIELD.items() if not op.bounded} == {"walk"}
    assert wire_encoding.RESULT_FIELD == {op.response: op.result_field for op in BATCHABLE}
    assert admission.RESERVED == {"/grpc.health.v1.Health/Check"} | {op.full_method for op in OPERATIONS if op.reserved}
    assert "/mmsim.v1.MemoryManager/Remap" in admission.RESERVED
    assert "/mmsim.v1.MemoryManager/Mmap" not in admission.RESERVED
    # A Batch's packed values are counted when one of its ops may carry them, and only then.
    values = pb.BatchRequest(ops=[pb.Op(uffd_copy=pb.UffdCopyRequest(values=range(1, 100)))]).SerializeToString()
    plain = pb.BatchRequest(ops=[pb.Op(remap=pb.RemapRequest(dst=1, src=2, len=3))]).SerializeToString()
    batch = BY_RPC["Batch"].full_method
    assert admission.request_bytes_bound(batch, values) > len(values) + 99 * 7
    assert admission.request_bytes_bound(batch, plain) == len(plain)
    assert admission.request_bytes_bound(BY_RPC["Remap"].full_method, values) == len(values)


# -- the litmus language, the explorer, the load generator
def test_the_litmus_language_and_the_explorer_have_every_litmus_row() -> None:
    assert set(litmus.SYNTAX) == set(BY_LITMUS) == set(explore._MODEL_CALLS)
    assert litmus.DEFINES == {"process", "fork"}
    assert litmus.usage("mmap") == "P ADDR PAGES [r|rw] [missing|wp|missing+wp]"
    assert {op.rpc for op in BY_LITMUS.values()} >= {"Remap", "Walk", "UffdCopy", "CreateProcess"}


def test_the_load_generators_operations_name_rows() -> None:
    assert set(profiles.CALLS) == set(profiles.OPERATIONS)
    assert [op.rpc for op in profiles.CALLS["fork"]] == ["Fork", "Exit"]
    assert all(op in OPERATIONS for calls in profiles.CALLS.values() for op in calls)
    with pytest.raises(OperationsError, match="Frob"):
        operations.rows("Ping", "Frob")


# Each consumer, imported after a change to the table, fails at import: its own list is checked
# against the table's.
CHANGED_TABLE = {
    "litmus": ("o.BY_LITMUS = {**o.BY_LITMUS, 'frob': o.BY_RPC['Ping']}", "mmsim.server.tools.litmus", "frob"),
    "explore": ("import mmsim.server.tools.litmus\no.BY_LITMUS = {k: v for k, v in o.BY_LITMUS.items() if k != 'copy'}",
                "mmsim.server.tools.explore", "copy"),
    "servicer": ("o.BY_OP_FIELD = {**o.BY_OP_FIELD, 'frob': dataclasses.replace(o.BY_RPC['Read'], op_field='frob')}",
                 "mmsim.server.service", "frob"),
    "builders": ("o.BATCHABLE = (*o.BATCHABLE, dataclasses.replace(o.BY_RPC['Read'], op_field='frob', sdk=('frob',)))",
                 "mmsim.client.ops", "frob"),
    "decoders": ("o.RESULT_FIELDS = o.RESULT_FIELDS | {'frob'}", "mmsim.client._client", "frob"),
    "loadgen": ("o.BY_RPC = {k: v for k, v in o.BY_RPC.items() if k != 'Ping'}", "mmsim.loadgen.profiles", "Ping"),
}


@pytest.mark.parametrize("consumer", list(CHANGED_TABLE))
def test_a_consumer_whose_list_is_not_the_tables_fails_at_import(consumer: str) -> None:
    change, module, named = CHANGED_TABLE[consumer]
    script = textwrap.dedent("""\
        import dataclasses, importlib
        import mmsim.v1.operations as o
        {change}
        try:
            importlib.import_module({module!r})
        except o.OperationsError as e:
            print("refused:", e)
        else:
            print("imported")
    """).format(change=change, module=module)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("refused:") and named in out.stdout, out.stdout
