"""The protobuf encoding the servicer does by hand: BatchResponse framing and response sizes.

A BatchResponse is only its repeated ``results`` field (1), so the servicer builds one as the
concatenation of each result's field header (:func:`result_header`) and its serialized OpResult,
each result serialized as soon as it is known. The commonest results (a remap, an empty answer)
are serialized once and reused. The size functions say what an entry will take on the wire before
it is added, so that a response can stop growing at the message size limit.
"""

from __future__ import annotations

import functools
from typing import Any

from mmsim.v1 import mmsim_pb2 as pb
from mmsim.v1.operations import BATCHABLE

#: BatchResponse.results: field 1, length-delimited.
RESULTS_TAG = bytes([(1 << 3) | 2])
#: The tag and length of a result shorter than 128 bytes (most are a few bytes).
SHORT_RESULT_HEADERS = [RESULTS_TAG + bytes([n]) for n in range(128)]

#: The OpResult field that holds each kind of response (of an operation a Batch carries).
RESULT_FIELD: dict[type[Any], str] = {op.response: op.result_field for op in BATCHABLE if op.result_field is not None}

#: The serialized OpResult of every operation that answers Empty.
EMPTY_RESULT = pb.OpResult(empty=pb.Empty()).SerializeToString()


def varint(n: int) -> bytes:
    """``n`` (unsigned) as a protobuf varint."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def varint_len(n: int) -> int:
    """The bytes ``varint(n)`` takes."""
    return max(1, (n.bit_length() + 6) // 7)


def field_size(n: int) -> int:
    """The bytes a length-delimited field with a one-byte tag takes on the wire when its message
    (or string) takes ``n``: tag, length, then the ``n`` bytes."""
    return 1 + varint_len(n) + n


def mapping_size(pid: int, addr: int) -> int:
    """The encoded size of Mapping(pid, addr): each non-zero field is a tag byte and a varint."""
    return (1 + varint_len(addr) if addr else 0) + (1 + varint_len(pid) if pid else 0)


def result_header(n: int) -> bytes:
    """The tag and length that put an OpResult of ``n`` bytes into BatchResponse.results."""
    return SHORT_RESULT_HEADERS[n] if n < 128 else RESULTS_TAG + varint(n)


@functools.lru_cache(maxsize=4096)
def remap_result(moved: int) -> bytes:
    """The serialized OpResult of a remap that moved ``moved`` bytes (made once per length)."""
    return pb.OpResult(remap=pb.RemapResponse(moved=moved)).SerializeToString()


def op_result(response: Any) -> pb.OpResult:
    """The OpResult holding ``response`` in the field for its kind."""
    return pb.OpResult(**{RESULT_FIELD[type(response)]: response})


def encode_result(response: Any) -> bytes:
    """A serialized OpResult holding ``response``; the commonest (a remap, an empty answer) are
    made once."""
    kind = type(response)
    if kind is pb.RemapResponse:
        return remap_result(response.moved)
    if kind is pb.Empty:
        return EMPTY_RESULT
    return op_result(response).SerializeToString()


def encode_error(error: pb.OpError) -> bytes:
    """A serialized OpResult holding ``error``."""
    return pb.OpResult(error=error).SerializeToString()


__all__ = [
    "EMPTY_RESULT",
    "RESULTS_TAG",
    "encode_error",
    "encode_result",
    "field_size",
    "mapping_size",
    "op_result",
    "remap_result",
    "result_header",
    "varint",
    "varint_len",
]
