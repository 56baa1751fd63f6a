"""Admission control: which calls start, and what every call in progress is charged.

The rules (docs/server.md, "Admission and pending work"):

- ``--max-concurrent-rpcs`` calls may *run* at once. A call asleep on a userfault, or a
  ``Userfaults`` stream waiting for an event, does not run: it gives its slot back while it sleeps
  (``park``) and takes one again, past the limit if need be, when it wakes. What sleeps is bounded
  by the model instead (``--max-pending-faults``, ``--max-pending-faults-per-process``,
  ``--max-userfault-streams``).
- ``--reserved-rpcs`` slots beyond those are kept for the calls that resolve pending work or tell
  whether the server lives (``RESERVED``): health checks, Ping, GetTopology, GetStats,
  ListUserfaults, UffdCopy, UffdZeropage, Remap (UFFDIO_MOVE), UffdWake, Exit and Munmap. They are
  admitted while a slot of either kind is free, so that no amount of other work keeps a fault
  handler from seeing and resolving the faults that block it, or an operator from seeing why.
- Every call is charged to ``--max-memory`` for as long as it runs: its request from when gRPC
  hands it over, before it is decoded (``request_bytes_bound``: its wire bytes and 8 for every
  packed value it may hold), and ``CALL_BYTES`` (what a call in progress costs the server: gRPC's
  call, the handler's task, a sleeping fault) from its admission. Calls in progress may hold at
  most half the budget (memcontrol.INFLIGHT_SHARE), so that what resolves them still finds room.
  A call that does not fit gets RESOURCE_EXHAUSTED (ENOMEM); a reserved call is charged even past
  the budget (its request only when at most ``RESERVED_NOFAIL_BYTES``), which ``--reserved-rpcs``
  bounds.

A call refused answers RESOURCE_EXHAUSTED with a ``google.rpc.QuotaFailure`` naming the limit.
"""

from __future__ import annotations

import contextvars

from mmsim.v1.operations import OPERATIONS

from .mm.memcontrol import MemCgroup
from .mm.mm_types import LimitExceeded
from .wire_encoding import varint

#: The methods admitted into the reserve: the health check and the operations marked reserved.
RESERVED = frozenset({"/grpc.health.v1.Health/Check", *(op.full_method for op in OPERATIONS if op.reserved)})
#: What one call in progress costs the server beyond its request, set above what was measured on
#: CPython 3.11 and grpcio 1.85 (the server's RSS grew by 24.5 KB a call with 2,000 calls asleep
#: on userfaults over loopback, and by 25.3 KB with 4,000): gRPC core's call and its buffers, the
#: handler's task and frames, the fault's queue entry.
CALL_BYTES = 28 << 10
#: A reserved call whose charge is at most this is admitted past the memory budget.
RESERVED_NOFAIL_BYTES = 64 << 10
#: What a repeated scalar value costs decoded (upb keeps 8 bytes for a uint64).
VALUE_BYTES = 8


#: The tags on the wire of the Op fields whose requests may carry packed values (uffd_copy: field
#: 16, length-delimited): a Batch without any of them has no such operation.
_VALUES_OP_TAGS = tuple(varint((op.op_number << 3) | 2) for op in OPERATIONS if op.packed_values and op.batchable)


_LOW_BYTES = bytes(range(0x80))
#: The methods whose requests may carry packed values: in themselves (UffdCopy), or in their Ops.
_VALUES_METHODS = frozenset(op.full_method for op in OPERATIONS if op.packed_values)
_BATCH_METHODS = frozenset(op.full_method for op in OPERATIONS if op.batch)


def request_bytes_bound(method: str, data: bytes) -> int:
    """At least what ``data`` will hold decoded as a request of ``method``, read off the wire
    bytes before any decoding: every packed varint ends in a byte below 0x80, so there are no
    more values than such bytes (a close bound for a request made of values). Lets a request of
    4M one-byte values be refused without decoding it into 32 MB."""
    if method not in _VALUES_METHODS and (method not in _BATCH_METHODS or not any(t in data for t in _VALUES_OP_TAGS)):
        return len(data)
    return len(data) + VALUE_BYTES * (len(data) - len(data.translate(None, _LOW_BYTES)))


class RequestCharge:
    """What one decoded request is charged, given back when it is freed: the charge lives exactly
    as long as the message it stands for, whether or not a handler ever takes it."""

    __slots__ = ("memcg", "nbytes")

    def __init__(self, memcg: MemCgroup, nbytes: int) -> None:
        self.memcg = memcg
        self.nbytes = nbytes

    def __del__(self) -> None:
        self.memcg.uncharge_inflight(self.nbytes)


class Ticket:
    """One admitted call: the charge of its request now, and whether it holds a run slot."""

    __slots__ = ("parked", "request")

    def __init__(self, request: RequestCharge | None) -> None:
        self.request = request
        self.parked = False


#: The ticket of the call the running task serves (the model's sleeps find it here).
current_ticket: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar("mmsim_call", default=None)


class Admission:
    """The run slots (``max_calls``, and ``reserve`` more for ``RESERVED`` methods) and the charge
    of every call in progress to ``memcg``: its request's when it is received, before it is
    decoded (``charge_request``), and CALL_BYTES from its admission (``admit``) to its end."""

    def __init__(self, max_calls: int, reserve: int, memcg: MemCgroup, max_request_bytes: int = 16 << 20,
                 max_message_bytes: int = 4 << 20) -> None:
        self.max_calls = max_calls
        self.reserve = reserve
        self.memcg = memcg
        #: The most a request may hold decoded (request_bytes), and a response's wire size.
        self.max_request_bytes = max_request_bytes
        self.max_message_bytes = max_message_bytes
        self.running = 0  # admitted calls holding a run slot
        self.parked = 0  # admitted calls asleep on a userfault or a userfaultfd read

    def charge_request(self, method: str, data: bytes) -> RequestCharge:
        """Charge what ``data`` will hold decoded as a request of ``method`` (request_bytes_bound),
        before it is decoded. Raises LimitExceeded past --max-request-bytes, ENOMEM
        (MemoryLimitExceeded) past the budget's share for calls in progress; a small request of
        a reserved method is charged even past it."""
        nbytes = request_bytes_bound(method, data)
        if nbytes > self.max_request_bytes:
            raise LimitExceeded("max_request_bytes", self.max_request_bytes,
                          f"the request would hold {nbytes} bytes decoded, more than {self.max_request_bytes} "
                          "(max-request-bytes)")
        self.memcg.charge_inflight(nbytes, nofail=method in RESERVED and nbytes <= RESERVED_NOFAIL_BYTES)
        return RequestCharge(self.memcg, nbytes)

    def admit(self, method: str, request: RequestCharge | None) -> Ticket:
        """Admit a call of ``method`` whose request is charged ``request``, or raise
        LimitExceeded (no run slot) or ENOMEM (no room for CALL_BYTES)."""
        reserved = method in RESERVED
        slots = self.max_calls + (self.reserve if reserved else 0)
        if self.running >= slots:
            limit = "reserved_rpcs" if reserved else "max_concurrent_rpcs"
            raise LimitExceeded(limit, slots,
                          f"{self.running} calls in progress: the server takes no more now ({limit.replace('_', '-')})")
        self.memcg.charge_inflight(CALL_BYTES, nofail=reserved)
        self.running += 1
        ticket = Ticket(request)
        current_ticket.set(ticket)
        return ticket

    def done(self, ticket: Ticket) -> None:
        """The call ended: its slot (unless asleep), CALL_BYTES and its request's charge go back."""
        if ticket.parked:
            self.parked -= 1
        else:
            self.running -= 1
        ticket.request = None
        self.memcg.uncharge_inflight(CALL_BYTES)

    def on_uffd_sleep(self, asleep: bool) -> None:
        """The model's hook (Kernel.on_uffd_sleep): the running task's call sleeps (gives its run
        slot back) or wakes (takes one, even past the limit: it only finishes what it began)."""
        ticket = current_ticket.get()
        if ticket is None or ticket.parked is asleep:
            return
        ticket.parked = asleep
        if asleep:
            self.running -= 1
            self.parked += 1
        else:
            self.parked -= 1
            self.running += 1
