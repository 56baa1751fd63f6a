"""How errors cross the wire: the mapping from the kernel's errno to a gRPC status code, and the
names used in google.rpc.ErrorInfo details. Defined in :mod:`mmsim.v1.wire`, which the client SDK
shares without importing the server."""

from __future__ import annotations

from mmsim.v1.wire import (
    DOMAIN,
    ERRNO_TO_CODE,
    LIMIT_EXCEEDED,
    PROCESS_NOT_FOUND,
    SHARD_RESTARTED,
    WRONG_SHARD,
    code_for_errno,
)

__all__ = ["DOMAIN", "ERRNO_TO_CODE", "LIMIT_EXCEEDED", "PROCESS_NOT_FOUND", "SHARD_RESTARTED", "WRONG_SHARD",
           "code_for_errno"]
