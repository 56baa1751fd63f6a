"""The operations of mmsim: one row per RPC of the MemoryManager service.

What ``mmsim.proto`` says is read from its descriptors: each RPC's name, request and response
messages and streaming; the ``Op`` field that carries it in a Batch (the ``Op.op`` oneof field
named as the RPC in snake_case, with the RPC's request type) and the ``OpResult`` field that holds
its result (the one of the response's type); whether its request carries packed values; whether
its response has a size bound. What the descriptors cannot say is written in ``_BY_HAND``, one
entry per RPC: whether it changes the model, whether admission keeps reserved slots for it, its
keyword in the litmus language, the SDK methods that call it, and which response field counts the
bytes it did before an error.

The server (servicer, admission), the SDK (``mmsim.client``), the litmus language and explorer and
the load generator read their lists of operations from here. An inconsistency between the proto
and ``_BY_HAND`` (an RPC without an entry, an ``Op`` field that names no RPC) fails at import.

It imports nothing of ``mmsim.server`` or ``mmsim.client``: both import it.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, TypeAlias

from . import mmsim_pb2 as pb

#: The protobuf descriptors the table is read from: of a message, of a field.
Descriptor: TypeAlias = Any
FieldDescriptor: TypeAlias = Any

#: The service every operation belongs to.
SERVICE = pb.DESCRIPTOR.services_by_name["MemoryManager"]
#: The ``Op.op`` oneof (the operations a Batch carries) and the ``OpResult.result`` oneof.
OP_ONEOF = pb.Op.DESCRIPTOR.oneofs_by_name["op"]
RESULT_ONEOF = pb.OpResult.DESCRIPTOR.oneofs_by_name["result"]
#: The OpResult field of a failed operation of a batch.
ERROR_FIELD = "error"


@dataclass(frozen=True)
class Operation:
    """One RPC of the service, and how each part of mmsim names and treats it."""

    #: The RPC's name in the service, e.g. ``"Remap"``.
    rpc: str
    #: The path gRPC calls it by: ``"/mmsim.v1.MemoryManager/Remap"``.
    full_method: str
    #: The request and response message classes.
    request: type[Any]
    response: type[Any]
    #: The client sends a stream of requests; the server answers with a stream.
    client_streaming: bool
    server_streaming: bool
    #: The ``Op`` oneof field that carries it in a Batch, and that field's number; None and 0
    #: where it cannot be batched.
    op_field: str | None
    op_number: int
    #: The ``OpResult`` oneof field that holds its result in a BatchResponse (None: not batchable).
    result_field: str | None
    #: The SDK methods that call it: methods of ``Process`` where the request names a process
    #: (``on_process``), of ``Client`` otherwise. The first is also the batch builder's name in
    #: ``mmsim.client.ops`` for a batchable operation.
    sdk: tuple[str, ...]
    on_process: bool
    #: Its keyword in the litmus language (``mmsim explore``); None: not in the language.
    litmus: str | None
    #: It may change the model: processes, mappings, pages, userfaultfd queues, sleeping faults
    #: (the accessed bits an rmap walk clears do not count).
    mutates: bool
    #: Admission keeps ``--reserved-rpcs`` slots for it: it resolves pending work or tells
    #: whether the server lives.
    reserved: bool
    #: The response field that counts the bytes done, which a failure reports as
    #: ``OpError.moved`` (and the ErrorInfo's "moved"); None where there is none.
    done: str | None
    #: Its request may hold packed repeated values (a request small on the wire, large decoded).
    packed_values: bool
    #: Its request is a list of ``Op`` (Batch, BatchStream).
    batch: bool
    #: Its response has no repeated field: its size is bounded whatever the model holds.
    bounded: bool

    @property
    def batchable(self) -> bool:
        """Whether a Batch can carry it."""
        return self.op_field is not None


@dataclass(frozen=True)
class _Hand:
    """What a row says that the descriptors cannot (see Operation)."""

    mutates: bool
    reserved: bool = False
    litmus: str | None = None
    sdk: tuple[str, ...] = ()  # default: the RPC's name in snake_case
    done: str | None = None


_BY_HAND: dict[str, _Hand] = {
    "CreateProcess": _Hand(mutates=True, litmus="process"),
    "Fork": _Hand(mutates=True, litmus="fork"),
    "Exit": _Hand(mutates=True, reserved=True, litmus="exit"),
    "Mmap": _Hand(mutates=True, litmus="mmap"),
    "Munmap": _Hand(mutates=True, reserved=True, litmus="munmap"),
    "Madvise": _Hand(mutates=True, litmus="madvise"),
    "UffdRegister": _Hand(mutates=True, litmus="register"),
    "UffdUnregister": _Hand(mutates=True, litmus="unregister"),
    "Mprotect": _Hand(mutates=True, litmus="mprotect"),
    "Mremap": _Hand(mutates=True, litmus="mremap"),
    "UffdCopy": _Hand(mutates=True, reserved=True, litmus="copy", done="copied"),
    "UffdZeropage": _Hand(mutates=True, reserved=True, litmus="zeropage", done="zeroed"),
    "UffdWake": _Hand(mutates=True, reserved=True, litmus="wake"),
    "Userfaults": _Hand(mutates=True, sdk=("userfaults", "read_userfaults")),
    "ListUserfaults": _Hand(mutates=False, reserved=True),
    "Read": _Hand(mutates=True, litmus="read"),
    "Write": _Hand(mutates=True, litmus="write"),
    "Remap": _Hand(mutates=True, reserved=True, litmus="remap", done="moved"),
    "Walk": _Hand(mutates=False, litmus="walk"),
    "Reclaim": _Hand(mutates=True, litmus="reclaim"),
    "Pin": _Hand(mutates=True, litmus="pin"),
    "Unpin": _Hand(mutates=True, reserved=True, litmus="unpin"),
    "GetFolio": _Hand(mutates=False, sdk=("folio",)),
    "Pagemap": _Hand(mutates=False),
    "ListVmas": _Hand(mutates=False, sdk=("vmas",)),
    "DumpAnonVmaTree": _Hand(mutates=False, sdk=("anon_vma_tree",)),
    "CheckInvariants": _Hand(mutates=False),
    "GetStats": _Hand(mutates=False, reserved=True, sdk=("stats", "protocol", "thp")),
    "Batch": _Hand(mutates=True),
    "BatchStream": _Hand(mutates=True, sdk=("batch_stream",)),
    "Ping": _Hand(mutates=False, reserved=True),
    "GetTopology": _Hand(mutates=False, reserved=True, sdk=("shards",)),
}


class OperationsError(LookupError):
    """The operations table and the proto, or a list of operations and the table, disagree."""


def snake_case(name: str) -> str:
    """``"UffdZeropage"`` -> ``"uffd_zeropage"``: how the proto names an RPC's Op field."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _message_class(desc: Descriptor) -> type[Any]:
    cls: type[Any] = getattr(pb, desc.name)
    if cls.DESCRIPTOR is not desc:
        raise OperationsError(f"{desc.full_name} is not a top-level message of mmsim.proto")
    return cls


def _type_of(f: FieldDescriptor) -> str:
    """The full name of the message type of field ``f``; "" for a field of another type."""
    return f.message_type.full_name if f.message_type is not None else ""


def _has_packed(desc: Descriptor, seen: frozenset[str] = frozenset()) -> bool:
    """Whether a message of type ``desc`` may hold a repeated number (packed on the wire), in itself
    or in a message it holds."""
    for f in desc.fields:
        if f.message_type is not None:
            if f.message_type.full_name not in seen and _has_packed(f.message_type, seen | {desc.full_name}):
                return True
        elif f.is_repeated and f.cpp_type != f.CPPTYPE_STRING:
            return True
    return False


def _bounded(desc: Descriptor, seen: frozenset[str] = frozenset()) -> bool:
    """Whether a message of type ``desc`` has no repeated field, in itself or in a message it holds."""
    for f in desc.fields:
        if f.is_repeated or (f.message_type is not None and (
                f.message_type.full_name in seen or not _bounded(f.message_type, seen | {desc.full_name}))):
            return False
    return True


def _holds_ops(desc: Descriptor) -> bool:
    return any(f.is_repeated and _type_of(f) == pb.Op.DESCRIPTOR.full_name for f in desc.fields)


def _result_field(output: Descriptor) -> str:
    """The OpResult field that holds a response of type ``output``."""
    found = [f.name for f in RESULT_ONEOF.fields if f.name != ERROR_FIELD and _type_of(f) == output.full_name]
    if len(found) != 1:
        raise OperationsError(f"OpResult.result has {len(found)} fields of type {output.name}, not one")
    return found[0]


def _build() -> tuple[Operation, ...]:
    methods = {m.name: m for m in SERVICE.methods}
    if set(methods) != set(_BY_HAND):
        raise OperationsError(f"the RPCs without a row: {sorted(set(methods) - set(_BY_HAND))}; "
                              f"the rows without an RPC: {sorted(set(_BY_HAND) - set(methods))}")
    op_fields = {f.name: f for f in OP_ONEOF.fields}
    rows = []
    for name, m in methods.items():
        hand = _BY_HAND[name]
        field = op_fields.pop(snake_case(name), None)
        if field is not None and _type_of(field) != m.input_type.full_name:
            raise OperationsError(f"Op.{field.name} is a {_type_of(field)}, but {name} takes a {m.input_type.name}")
        result = _result_field(m.output_type) if field is not None else None
        rows.append(Operation(
            rpc=name,
            full_method=f"/{SERVICE.full_name}/{name}",
            request=_message_class(m.input_type),
            response=_message_class(m.output_type),
            client_streaming=m.client_streaming,
            server_streaming=m.server_streaming,
            op_field=field.name if field is not None else None,
            op_number=field.number if field is not None else 0,
            result_field=result,
            sdk=hand.sdk or (snake_case(name),),
            on_process="process" in m.input_type.fields_by_name,
            litmus=hand.litmus,
            mutates=hand.mutates,
            reserved=hand.reserved,
            done=hand.done,
            packed_values=_has_packed(m.input_type) and not _holds_ops(m.input_type),
            batch=_holds_ops(m.input_type),
            bounded=_bounded(m.output_type),
        ))
    if op_fields:
        raise OperationsError(f"Op fields that name no RPC: {sorted(op_fields)}")
    for row in rows:
        if row.done is not None and row.done not in row.response.DESCRIPTOR.fields_by_name:
            raise OperationsError(f"{row.rpc}: {row.response.__name__} has no field {row.done!r}")
        if row.batchable and row.mutates and not row.bounded:
            # A Batch runs an operation only when its result will fit; one without a bound it runs
            # first and measures after, which only an operation that changes nothing allows.
            raise OperationsError(f"{row.rpc} changes the model, and its result has no size bound")
    keywords = [row.litmus for row in rows if row.litmus is not None]
    if len(set(keywords)) != len(keywords):
        raise OperationsError(f"a litmus keyword names two operations: {keywords}")
    return tuple(rows)


#: Every operation, in the order of the service's RPCs.
OPERATIONS: tuple[Operation, ...] = _build()
#: By RPC name (``"Remap"``), by Op oneof field (``"remap"``), by litmus keyword (``"copy"``).
BY_RPC: dict[str, Operation] = {op.rpc: op for op in OPERATIONS}
BY_OP_FIELD: dict[str, Operation] = {op.op_field: op for op in OPERATIONS if op.op_field is not None}
BY_LITMUS: dict[str, Operation] = {op.litmus: op for op in OPERATIONS if op.litmus is not None}
#: The operations a Batch can carry, in the order of the service's RPCs.
BATCHABLE: tuple[Operation, ...] = tuple(op for op in OPERATIONS if op.batchable)
#: The OpResult fields of their results (every field of OpResult.result but the error).
RESULT_FIELDS: frozenset[str] = frozenset(op.result_field for op in BATCHABLE if op.result_field is not None)


def rows(*rpcs: str) -> tuple[Operation, ...]:
    """The rows of the RPCs named ``rpcs``, in order; an OperationsError names one that is none."""
    unknown = [rpc for rpc in rpcs if rpc not in BY_RPC]
    if unknown:
        raise OperationsError(f"not RPCs of {SERVICE.full_name}: {unknown}")
    return tuple(BY_RPC[rpc] for rpc in rpcs)


def require(names: Collection[str], expected: Collection[str], what: str) -> None:
    """Check that ``names`` (the keys of a consumer's own table, ``what``) are exactly ``expected``
    (e.g. the keys of BY_LITMUS): an OperationsError names those extra and those missing."""
    extra, missing = set(names) - set(expected), set(expected) - set(names)
    if extra or missing:
        raise OperationsError(f"{what}: not operations: {sorted(extra)}; operations missing: {sorted(missing)}")


__all__ = ["BATCHABLE", "BY_LITMUS", "BY_OP_FIELD", "BY_RPC", "ERROR_FIELD", "OPERATIONS", "OP_ONEOF", "RESULT_FIELDS",
           "RESULT_ONEOF", "SERVICE", "Operation", "OperationsError", "require", "rows",
           "snake_case"]
