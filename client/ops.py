"""Builders of batch operations, for :meth:`Client.batch` and :meth:`Client.batch_stream`.

Example::

    from mmsim.client import ops

    results = await mm.batch([ops.write(p, addr, 1), ops.remap(p, dst, addr, 4096), ops.read(p, dst)])
    # [None, 4096, 1]; a failed operation gives its exception instance instead of raising

Each builder takes the :class:`~mmsim.client.Process` it acts on; all the processes of one batch
must live on the same server.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from mmsim.v1 import mmsim_pb2 as pb
from mmsim.v1.operations import BATCHABLE, require

from ._types import ADVICE_TO_PB, PROT_TO_PB, UFFD_TO_PB

if TYPE_CHECKING:
    from ._client import Process

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class Op:
    """One operation of a batch: the process it acts on (None for create_process) and its message."""

    process: Process | None
    message: pb.Op

    @property
    def kind(self) -> str:
        """The name of the operation (the ``Op`` oneof field, ``mmsim.v1.operations.Operation.op_field``),
        e.g. ``"remap"``."""
        return self.message.WhichOneof("op") or ""

    @property
    def request(self) -> object:
        """The request message of the operation, as its unary RPC takes it."""
        return getattr(self.message, self.kind)


def _lookup(table: Mapping[K, V], value: K, what: str) -> V:
    try:
        return table[value]
    except KeyError:
        raise ValueError(f"unknown {what} {value!r}; one of {', '.join(map(repr, table))}") from None


def create_process() -> Op:
    return Op(None, pb.Op(create_process=pb.CreateProcessRequest()))


def fork(p: Process) -> Op:
    return Op(p, pb.Op(fork=pb.ProcessRequest(process=p.id)))


def exit(p: Process) -> Op:  # the name mirrors the RPC
    return Op(p, pb.Op(exit=pb.ProcessRequest(process=p.id)))


def mmap(p: Process, length: int, prot: str = "rw", uffd: str | None = None, addr: int | None = None) -> Op:
    req = pb.MmapRequest(
        process=p.id, length=length, prot=_lookup(PROT_TO_PB, prot, "prot"), uffd=_lookup(UFFD_TO_PB, uffd, "uffd")
    )
    if addr is not None:
        req.addr = addr
    return Op(p, pb.Op(mmap=req))


def munmap(p: Process, addr: int, length: int) -> Op:
    return Op(p, pb.Op(munmap=pb.RangeRequest(process=p.id, addr=addr, length=length)))


def madvise(p: Process, addr: int, length: int, advice: str) -> Op:
    req = pb.MadviseRequest(process=p.id, addr=addr, length=length, advice=_lookup(ADVICE_TO_PB, advice, "advice"))
    return Op(p, pb.Op(madvise=req))


def mprotect(p: Process, addr: int, length: int, prot: str) -> Op:
    """mprotect: ``prot`` is "none", "r" or "rw"."""
    req = pb.MprotectRequest(process=p.id, addr=addr, length=length, prot=_lookup(PROT_TO_PB, prot, "prot"))
    return Op(p, pb.Op(mprotect=req))


def mremap(p: Process, addr: int, old_length: int, new_length: int, *, maymove: bool = False,
           dontunmap: bool = False, fixed: int | None = None) -> Op:
    """mremap: shrink, grow in place, or move (``maymove``; ``dontunmap``; ``fixed``: to that address)."""
    req = pb.MremapRequest(process=p.id, addr=addr, old_length=old_length, new_length=new_length,
                           maymove=maymove, dontunmap=dontunmap)
    if fixed is not None:
        req.fixed = fixed
    return Op(p, pb.Op(mremap=req))


def uffd_copy(p: Process, dst: int, length: int, values: int | list[int], *, dontwake: bool = False,
              wp: bool = False, mode_bits: int = 0) -> Op:
    """UFFDIO_COPY: ``values`` is one value for every page, or a list of one per page. ``wp``
    (UFFDIO_COPY_MODE_WP): map the pages write-protected, in a range registered for WP."""
    vals = [values] if isinstance(values, int) else list(values)
    mode = (pb.FILL_MODE_DONTWAKE if dontwake else 0) | (pb.FILL_MODE_WP if wp else 0) | mode_bits
    return Op(p, pb.Op(uffd_copy=pb.UffdCopyRequest(process=p.id, dst=dst, len=length, values=vals, mode=mode)))


def uffd_zeropage(p: Process, dst: int, length: int, *, dontwake: bool = False, mode_bits: int = 0) -> Op:
    """UFFDIO_ZEROPAGE."""
    mode = (pb.FILL_MODE_DONTWAKE if dontwake else 0) | mode_bits
    return Op(p, pb.Op(uffd_zeropage=pb.UffdZeropageRequest(process=p.id, dst=dst, len=length, mode=mode)))


def uffd_wake(p: Process, addr: int, length: int) -> Op:
    """UFFDIO_WAKE: wake the faults waiting on the range."""
    return Op(p, pb.Op(uffd_wake=pb.RangeRequest(process=p.id, addr=addr, length=length)))


def uffd_register(p: Process, addr: int, length: int, mode: str = "missing") -> Op:
    if mode is None:
        raise ValueError("uffd_register needs a mode")
    req = pb.UffdRegisterRequest(process=p.id, addr=addr, length=length, mode=_lookup(UFFD_TO_PB, mode, "uffd mode"))
    return Op(p, pb.Op(uffd_register=req))


def uffd_unregister(p: Process, addr: int, length: int) -> Op:
    return Op(p, pb.Op(uffd_unregister=pb.RangeRequest(process=p.id, addr=addr, length=length)))


def read(p: Process, addr: int) -> Op:
    return Op(p, pb.Op(read=pb.AccessRequest(process=p.id, addr=addr)))


def write(p: Process, addr: int, value: int) -> Op:
    return Op(p, pb.Op(write=pb.WriteRequest(process=p.id, addr=addr, value=value)))


def remap(
    p: Process,
    dst: int,
    src: int,
    length: int,
    *,
    allow_src_holes: bool = False,
    dontwake: bool = False,
    mode_bits: int = 0,
) -> Op:
    """UFFDIO_MOVE. ``mode_bits`` adds raw mode bits (the server rejects unknown ones with EINVAL)."""
    mode = (pb.REMAP_MODE_ALLOW_SRC_HOLES if allow_src_holes else 0) | (pb.REMAP_MODE_DONTWAKE if dontwake else 0)
    mode |= mode_bits
    return Op(p, pb.Op(remap=pb.RemapRequest(process=p.id, dst=dst, src=src, len=length, mode=mode)))


def walk(p: Process, addr: int, blocking: bool = False) -> Op:
    return Op(p, pb.Op(walk=pb.WalkRequest(process=p.id, addr=addr, blocking=blocking)))


def folio(p: Process, addr: int) -> Op:
    return Op(p, pb.Op(get_folio=pb.AccessRequest(process=p.id, addr=addr)))


def pin(p: Process, addr: int, length: int) -> Op:
    """FOLL_PIN the pages covering [addr, addr + length) (its result: the pin's id)."""
    return Op(p, pb.Op(pin=pb.PinRequest(process=p.id, addr=addr, length=length)))


def unpin(p: Process, pin: int) -> Op:
    """Give back the pin ``pin`` (an id) of ``p``."""
    return Op(p, pb.Op(unpin=pb.UnpinRequest(process=p.id, pin=pin)))


def reclaim(pages: int) -> Op:
    """Reclaim up to ``pages`` folios of the server the batch runs on (its result: the folios freed)."""
    return Op(None, pb.Op(reclaim=pb.ReclaimRequest(pages=pages)))


__all__ = [
    "Op",
    "create_process",
    "exit",
    "fork",
    "folio",
    "madvise",
    "mmap",
    "mprotect",
    "mremap",
    "munmap",
    "pin",
    "read",
    "reclaim",
    "remap",
    "uffd_copy",
    "uffd_register",
    "uffd_unregister",
    "uffd_wake",
    "uffd_zeropage",
    "unpin",
    "walk",
    "write",
]
# A builder for every operation a Batch carries, named as its SDK method.
require([name for name in __all__ if name != "Op"], [op.sdk[0] for op in BATCHABLE], "the builders of mmsim.client.ops")
