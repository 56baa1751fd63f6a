"""What the server and its clients agree on beyond the messages of ``mmsim.proto``.

- How errors cross the wire: the mapping from the kernel's errno to a gRPC status code, and the
  names used in ``google.rpc.ErrorInfo`` details.
- The bearer-token file: one reader, the same rules on both sides.
- ``HOST:PORT`` addresses: one parser (:func:`split_hostport`) and its inverse
  (:func:`join_hostport`), an IPv6 address in brackets (``[::1]:7077``).

It imports nothing of ``mmsim.server`` or ``mmsim.client``: both import it.
"""

from __future__ import annotations

import errno
from pathlib import Path

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
    """The status code a failure with errno ``err`` is reported with."""
    return ERRNO_TO_CODE.get(err, grpc.StatusCode.FAILED_PRECONDITION)


class CredentialsError(OSError, ValueError):
    """A token, certificate or key file that cannot be used (``mmsim serve`` says so in one line
    and exits 1)."""


def read_token(path: str) -> str:
    """The bearer token in the file ``path``: its content, surrounding white space removed; an
    empty one, or one holding white space or non-printable or non-ASCII characters, is a
    :class:`CredentialsError` (the message never quotes the token)."""
    token = Path(path).read_text().strip()
    if not token:
        raise CredentialsError(f"the token file {path!r} is empty")
    if any(c.isspace() or not c.isprintable() or not c.isascii() for c in token):
        raise CredentialsError(f"the token file {path!r} holds white space or non-printable characters")
    return token


#: The largest TCP port.
MAX_PORT = 65535


def split_hostport(address: str) -> tuple[str, int]:
    """``HOST:PORT`` -> ``(HOST, PORT)``: a host name or IPv4 address, or an IPv6 address in
    brackets (returned without them: ``"[::1]:7077"`` -> ``("::1", 7077)``), and a decimal port
    from 0 to 65535. ValueError, saying what is wrong, for anything else: no host, no port, a port
    out of range, an IPv6 address without brackets (``::1:7077`` is ambiguous), white space."""

    def bad(why: str) -> ValueError:
        shown = address if len(address) <= 80 else f"{address[:80]}..."
        return ValueError(f"expected HOST:PORT, got {shown!r} ({why})")

    if any(c.isspace() for c in address):
        raise bad("white space")
    host, sep, port = address.rpartition(":")
    if not sep or not port or port.endswith("]"):
        raise bad("no port")
    if not (port.isascii() and port.isdigit()):
        raise bad(f"the port {port!r} is not a number")
    if len(port.lstrip("0")) > len(str(MAX_PORT)) or int(port) > MAX_PORT:
        raise bad(f"the port is above {MAX_PORT}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host or "[" in host or "]" in host:
            raise bad("not an address in brackets")
    elif "[" in host or "]" in host:
        raise bad("unbalanced brackets")
    elif ":" in host:
        raise bad("an IPv6 address goes in brackets: [ADDRESS]:PORT")
    if not host:
        raise bad("no host")
    return host, int(port)


def join_hostport(host: str, port: int) -> str:
    """``HOST:PORT`` for ``host`` and ``port``, an IPv6 address in brackets (``("::1", 7077)`` ->
    ``"[::1]:7077"``): the inverse of :func:`split_hostport`, which is left to tell a port out of
    range."""
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        host = f"[{host}]"
    return f"{host}:{port}"


def advertised_address(address: str, target: str) -> str:
    """An address a server advertises (a shard's, its metrics endpoint's) with an unspecified host
    (0.0.0.0, ::) replaced by the host of ``target``, the address the client reached it by; as it is
    when either is not ``HOST:PORT``."""
    try:
        host, port = split_hostport(address)
        target_host, _ = split_hostport(target)
    except ValueError:
        return address
    return join_hostport(target_host, port) if host in ("0.0.0.0", "::") else address


__all__ = ["DOMAIN", "ERRNO_TO_CODE", "LIMIT_EXCEEDED", "MAX_PORT", "PROCESS_NOT_FOUND", "SHARD_RESTARTED",
           "WRONG_SHARD", "CredentialsError", "advertised_address", "code_for_errno", "join_hostport", "read_token",
           "split_hostport"]
