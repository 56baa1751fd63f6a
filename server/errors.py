"""How errors cross the wire: the mapping from the kernel's errno to a gRPC status code, and the
names used in google.rpc.ErrorInfo details. Shared by the servicer and the client SDK."""

from __future__ import annotations

import errno

import grpc

#: ErrorInfo.domain for every error mmsim reports.
DOMAIN = "mmsim.v1"
#: ErrorInfo.reason for a process handle the server does not know (no errno).
PROCESS_NOT_FOUND = "PROCESS_NOT_FOUND"
#: ErrorInfo.reason for a handle (or a CreateProcess) that names another shard; metadata "shard".
WRONG_SHARD = "WRONG_SHARD"
#: ErrorInfo.reason for a handle of an earlier generation of the shard: it restarted since.
SHARD_RESTARTED = "SHARD_RESTARTED"
#: ErrorInfo.reason when a configured server limit is reached (no errno).
LIMIT_EXCEEDED = "LIMIT_EXCEEDED"

#: errno -> status code. Anything else maps to FAILED_PRECONDITION.
ERRNO_TO_CODE: dict[int, grpc.StatusCode] = {
    errno.EINVAL: grpc.StatusCode.INVALID_ARGUMENT,
    errno.ENOENT: grpc.StatusCode.NOT_FOUND,
    errno.ESRCH: grpc.StatusCode.NOT_FOUND,
    errno.EEXIST: grpc.StatusCode.ALREADY_EXISTS,
    errno.EBUSY: grpc.StatusCode.FAILED_PRECONDITION,
    errno.EAGAIN: grpc.StatusCode.ABORTED,
    errno.ENOMEM: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.EFAULT: grpc.StatusCode.INVALID_ARGUMENT,
    errno.EPERM: grpc.StatusCode.PERMISSION_DENIED,
    errno.EINTR: grpc.StatusCode.CANCELLED,
}


def code_for_errno(err: int) -> grpc.StatusCode:
    return ERRNO_TO_CODE.get(err, grpc.StatusCode.FAILED_PRECONDITION)
