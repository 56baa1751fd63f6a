"""Exceptions raised by the SDK, and the translation from gRPC statuses to them.

Memory-semantics failures (a status whose ``google.rpc.ErrorInfo`` in domain ``mmsim.v1`` carries
an ``errno``) raise :class:`OSError` built from that errno, so Python's own subclasses apply
(``FileExistsError`` for EEXIST, ``BlockingIOError`` for EAGAIN, ...); it has ``.moved`` (bytes
moved before the error, for remap), ``.code`` (the :class:`grpc.StatusCode`) and ``.reason``.
Everything else raises a :class:`MmsimError` subclass. ``asyncio.CancelledError`` is never caught.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from mmsim.v1 import mmsim_pb2 as pb
from mmsim.v1 import wire

#: Trailing-metadata key of the serialized google.rpc.Status (as grpc_status uses it).
STATUS_DETAILS_KEY = "grpc-status-details-bin"


class MmsimError(Exception):
    """A failed call that is not a memory-semantics error.

    Attributes: ``code`` (:class:`grpc.StatusCode`), ``details`` (the status message, unchanged),
    ``reason`` and ``metadata`` (from the ``google.rpc.ErrorInfo``, if any), ``status`` (the whole
    ``google.rpc.Status`` when the server sent one). The gRPC error is the ``__cause__``.
    """

    def __init__(
        self,
        details: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        status: status_pb2.Status | None = None,
    ) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.reason = reason
        self.metadata = metadata or {}
        self.status = status


class ProcessNotFoundError(MmsimError):
    """The process handle is unknown to the server (exited, or from another server instance)."""

    @property
    def process(self) -> str | None:
        return self.metadata.get("process")


class WrongShardError(ProcessNotFoundError):
    """The call reached a shard other than the one its process (or ``create_process(shard=)``)
    names; ``shard`` is the right one."""

    @property
    def shard(self) -> int | None:
        return _int(self.metadata.get("shard")) if "shard" in self.metadata else None


class ShardRestartedError(ProcessNotFoundError):
    """The process's shard restarted since the handle was issued: the process is gone."""

    @property
    def shard(self) -> int | None:
        return _int(self.metadata.get("shard")) if "shard" in self.metadata else None


class UnauthenticatedError(MmsimError):
    """The server wants credentials (a bearer token) that the call did not carry or that are wrong."""


class InvalidRequestError(MmsimError):
    """A malformed request (INVALID_ARGUMENT without an errno)."""

    def __init__(
        self,
        details: str,
        *,
        field_violations: list[tuple[str, str]] | None = None,
        code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        status: status_pb2.Status | None = None,
    ) -> None:
        super().__init__(details, code=code, reason=reason, metadata=metadata, status=status)
        #: ``(field, description)`` of each google.rpc.BadRequest field violation.
        self.field_violations: list[tuple[str, str]] = field_violations or []


class LimitExceededError(MmsimError):
    """A server limit was reached (RESOURCE_EXHAUSTED without an errno)."""

    @property
    def limit(self) -> str | None:
        return self.metadata.get("limit")


class DeadlineExceededError(MmsimError):
    """The call's deadline passed."""


class ServerUnavailableError(MmsimError):
    """The server could not be reached (after the configured retries)."""


_BY_CODE: dict[grpc.StatusCode, type[MmsimError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: LimitExceededError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: ServerUnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}
_CODES: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def _os_error(err: int, message: str, moved: int, code: grpc.StatusCode, reason: str | None) -> OSError:
    exc = OSError(err, message)  # OSError.__new__ picks the subclass for the errno
    exc.moved = moved  # type: ignore[attr-defined]
    exc.code = code  # type: ignore[attr-defined]
    exc.reason = reason  # type: ignore[attr-defined]
    return exc


def _int(s: str | None) -> int:
    try:
        return int(s or 0)
    except ValueError:
        return 0


def status_from_metadata(metadata: object) -> status_pb2.Status | None:
    """The google.rpc.Status carried in trailing metadata, or None."""
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == STATUS_DETAILS_KEY:
            try:
                return status_pb2.Status.FromString(value)
            except (DecodeError, TypeError):
                return None
    return None


def from_status(code: grpc.StatusCode, message: str, status: status_pb2.Status | None) -> Exception:
    """The exception for a failed call with this code, message and rich status."""
    info: error_details_pb2.ErrorInfo | None = None
    violations: list[tuple[str, str]] = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            candidate = error_details_pb2.ErrorInfo()
            detail.Unpack(candidate)
            if candidate.domain == wire.DOMAIN and info is None:
                info = candidate
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            violations.extend((v.field, v.description) for v in br.field_violations)
    reason = info.reason if info is not None else None
    metadata = dict(info.metadata) if info is not None else {}
    err = _int(metadata.get("errno"))
    if err > 0:
        return _os_error(err, message, _int(metadata.get("moved")), code, reason)
    if reason == wire.PROCESS_NOT_FOUND:
        cls: type[MmsimError] = ProcessNotFoundError
    elif reason == wire.WRONG_SHARD:
        cls = WrongShardError
    elif reason == wire.SHARD_RESTARTED:
        cls = ShardRestartedError
    elif reason == wire.LIMIT_EXCEEDED:
        cls = LimitExceededError
    else:
        cls = _BY_CODE.get(code, MmsimError)
    if cls is InvalidRequestError:
        return InvalidRequestError(
            message, field_violations=violations, code=code, reason=reason, metadata=metadata, status=status
        )
    return cls(message, code=code, reason=reason, metadata=metadata, status=status)


def from_rpc_error(exc: grpc.aio.AioRpcError) -> Exception:
    """Translate a failed call; the caller raises the result ``from exc``."""
    return from_status(exc.code(), exc.details() or "", status_from_metadata(exc.trailing_metadata()))


def from_op_error(e: pb.OpError) -> Exception:
    """Translate the error result of one batch operation (no rich details on the wire)."""
    code = _CODES.get(e.code, grpc.StatusCode.UNKNOWN)
    if e.errno > 0:
        return _os_error(e.errno, e.message, e.moved, code, None)
    if code == grpc.StatusCode.NOT_FOUND:
        return ProcessNotFoundError(e.message, code=code, reason=wire.PROCESS_NOT_FOUND)
    return _BY_CODE.get(code, MmsimError)(e.message, code=code)


__all__ = [
    "DeadlineExceededError",
    "InvalidRequestError",
    "LimitExceededError",
    "MmsimError",
    "ProcessNotFoundError",
    "ServerUnavailableError",
    "ShardRestartedError",
    "UnauthenticatedError",
    "WrongShardError",
]
