"""The hand-made protobuf encoding of the servicer (server/wire_encoding.py): every byte it writes,
and every size it predicts, is what protobuf itself makes of the same message."""

import pytest
from google.protobuf.internal.encoder import _VarintBytes  # type: ignore[attr-defined]

from mmsim.server import wire_encoding as wire
from mmsim.v1 import mmsim_pb2 as pb

VARINTS = (0, 1, 127, 128, 300, 16_383, 16_384, 4 << 20, (1 << 64) - 1)

#: One response of every kind an operation answers with, not all of them small.
RESPONSES = [
    pb.Process(handle="0.1." + "7" * 19 + "." + "f" * 32, pid=(1 << 63) - 1),
    pb.Empty(),
    pb.Vma(start=0x7F0000000000, end=0x7F0000001000, prot=pb.PROT_RW, anon_vma=3),
    pb.ReadResponse(value=(1 << 64) - 1),
    pb.RemapResponse(moved=4096),
    pb.RemapResponse(moved=0),
    pb.WalkResponse(referenced=2, mappings=[pb.Mapping(pid=p, addr=p << 12) for p in range(1, 60)]),
    pb.FolioResponse(present=True, value=7, mapcount=2, index=9, anon_vma=4, writable=True),
    pb.ExitResponse(),
    pb.UffdCopyResponse(copied=8192),
    pb.UffdZeropageResponse(zeroed=4096),
]


def test_varints_match_protobuf() -> None:
    for n in VARINTS:
        assert wire.varint(n) == _VarintBytes(n) and wire.varint_len(n) == len(_VarintBytes(n))


def test_the_response_size_accounting_matches_protobuf() -> None:
    for pid, addr in [(0, 0), (1, 0x10000), (127, 1 << 47), (128, (1 << 64) - 1), (10_000, 0x7F0000000000)]:
        assert wire.mapping_size(pid, addr) == pb.Mapping(pid=pid, addr=addr).ByteSize()
        av = pb.AnonVma(vmas=[pb.Mapping(pid=pid, addr=addr)])
        m = wire.mapping_size(pid, addr)
        assert av.ByteSize() == m + 1 + wire.varint_len(m) == wire.field_size(m)


def test_field_size_is_what_an_entry_adds_to_its_message() -> None:
    for n in (0, 5, 127, 128, 20_000):  # lengths of one, two and three varint bytes
        walk = pb.WalkResponse(mappings=[pb.Mapping(pid=i + 1) for i in range(n)])
        assert wire.field_size(walk.ByteSize()) == pb.OpResult(walk=walk).ByteSize()
    vmas = [pb.Vma(), pb.Vma(start=1 << 47, end=(1 << 47) + 4096, prot=pb.PROT_R, pgoff=1 << 35)]
    assert sum(wire.field_size(v.ByteSize()) for v in vmas) == pb.ListVmasResponse(vmas=vmas).ByteSize()


@pytest.mark.parametrize("response", RESPONSES, ids=lambda r: type(r).__name__)
def test_a_result_is_the_op_result_protobuf_makes(response: object) -> None:
    data = wire.encode_result(response)
    assert pb.OpResult.FromString(data) == wire.op_result(response)
    assert data == wire.op_result(response).SerializeToString()
    field = pb.OpResult.FromString(data).WhichOneof("result")
    assert field == wire.RESULT_FIELD[type(response)]


def test_the_commonest_results_are_made_once() -> None:
    assert wire.encode_result(pb.Empty()) is wire.encode_result(pb.Empty())
    assert wire.encode_result(pb.RemapResponse(moved=12288)) is wire.remap_result(12288)
    assert pb.OpResult.FromString(wire.remap_result(12288)).remap.moved == 12288


def test_results_framed_by_hand_are_a_batch_response() -> None:
    """Every result, short or long, and an error, joined with their headers, parse as the
    BatchResponse protobuf would have made of them, byte for byte."""
    error = pb.OpError(code=8, message="x" * 200, errno=12, moved=4096)
    results = [wire.op_result(r) for r in RESPONSES] + [pb.OpResult(error=error)]
    data = [wire.encode_result(r) for r in RESPONSES] + [wire.encode_error(error)]
    assert any(len(d) >= 128 for d in data) and any(len(d) < 128 for d in data)
    framed = b"".join(wire.result_header(len(d)) + d for d in data)
    assert framed == pb.BatchResponse(results=results).SerializeToString()
    assert list(pb.BatchResponse.FromString(framed).results) == results


def test_result_header() -> None:
    for n in (0, 1, 127, 128, 300, 4 << 20):
        assert wire.result_header(n) == wire.RESULTS_TAG + _VarintBytes(n)
