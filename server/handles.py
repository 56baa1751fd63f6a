"""Process handles: the capabilities a shard gives out for its processes, and how it reads them back.

A handle is ``<shard>.<generation>.<pid>.<token>``: the shard's index, its generation (it grows with
every start of the shard, so a handle from before a restart is unknown, NOT_FOUND, never someone
else's), the pid, and 128 random bits per process, so that knowing one handle gives nothing else.
A handle is parsed strictly (ASCII, canonical, bounded): anything else is INVALID_ARGUMENT. A handle
of another shard is NOT_FOUND naming the right one (topology.py). Errors never quote a token.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Container

from mmsim.v1 import mmsim_pb2 as pb

from . import errors
from .topology import Topology

#: A process handle: shard, generation, pid, token. Anything else is not a handle.
HANDLE_RE = re.compile(r"(0|[1-9][0-9]{0,2})\.([1-9][0-9]{0,18})\.([1-9][0-9]{0,18})\.([0-9a-f]{32})", re.ASCII)
#: The longest handle (HANDLE_RE's own bound); longer input is rejected before the regex runs.
HANDLE_MAX = 3 + 1 + 19 + 1 + 19 + 1 + 32
#: What an echo leaves out: anything that may be (part of) a handle's token.
TOKEN_LIKE = re.compile(r"[0-9a-fA-F]{12,}")
#: How much of a client's input an error message echoes.
ECHO_MAX = 48


def echo(value: str) -> str:
    """A client's input as an error may quote it: bounded, and without a handle's token."""
    m = HANDLE_RE.fullmatch(value) if len(value) <= HANDLE_MAX else None
    if m is not None:
        return f"{m.group(1)}.{m.group(2)}.{m.group(3)}.…"
    cut = value if len(value) <= ECHO_MAX else value[:ECHO_MAX] + f"… ({len(value)} characters)"
    return TOKEN_LIKE.sub("…", cut)  # a malformed handle's token is no less a secret


class BadRequest(Exception):
    """A malformed request (a malformed handle is one): INVALID_ARGUMENT with google.rpc.BadRequest
    field violations."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.violations = [(field, description)]


class ProcessNotFound(Exception):
    """NOT_FOUND: ``reason`` says why (errors.PROCESS_NOT_FOUND, WRONG_SHARD, SHARD_RESTARTED)."""

    def __init__(self, handle: str, message: str | None = None, reason: str = errors.PROCESS_NOT_FOUND,
                 **metadata: str) -> None:
        self.handle = echo(handle)
        self.reason = reason
        self.metadata = {"process": self.handle, **metadata} if handle else metadata
        super().__init__(message or f"no process {self.handle!r} on this server")


class Handles:
    """The handles one shard has issued, for the processes of ``live`` (the model's process table,
    looked at, never changed). Looking a handle up whole is the fast path; a handle that is not
    known is parsed only to tell INVALID_ARGUMENT from NOT_FOUND and to say which NOT_FOUND."""

    def __init__(self, topology: Topology, live: Container[int]) -> None:
        self.topology = topology
        self._live = live
        #: What every handle of this shard's current generation starts with.
        self.prefix = f"{topology.index}.{topology.generation}."
        self._pids: dict[str, int] = {}
        self._handle_of: dict[int, str] = {}

    def issue(self, pid: int) -> pb.Process:
        """The handle of a new process: a fresh random token."""
        handle = f"{self.prefix}{pid}.{secrets.token_hex(16)}"
        self._pids[handle] = pid
        self._handle_of[pid] = handle
        return pb.Process(handle=handle, pid=pid)

    def revoke(self, pid: int) -> None:
        """The process is gone: its handle names nothing any more."""
        handle = self._handle_of.pop(pid, None)
        if handle is not None:
            del self._pids[handle]

    def pid(self, handle: str, field: str = "process") -> int:
        """The pid a handle names: BadRequest (INVALID_ARGUMENT) if it is not a handle,
        ProcessNotFound if it names no process of this shard (another shard, an earlier
        generation, an exited process, a wrong token), saying which."""
        pid = self._pids.get(handle)
        # A process whose exit is under way has left ``live`` before its handle is revoked: it is
        # not found here, as any exited process (the model would say ESRCH instead).
        if pid is not None and pid in self._live:
            return pid
        if not handle:
            raise BadRequest(field, "a process handle is required")
        m = HANDLE_RE.fullmatch(handle) if len(handle) <= HANDLE_MAX else None
        if m is None:
            raise BadRequest(field, f"{echo(handle)!r} is not a process handle (<shard>.<generation>.<pid>.<token>)")
        shard, generation, me = int(m.group(1)), int(m.group(2)), self.topology
        if shard != me.index:
            raise self.wrong_shard(shard, handle)
        if generation < me.generation:
            raise ProcessNotFound(
                handle, f"shard {me.index} restarted: the handle is of its generation {generation}, it now runs "
                f"generation {me.generation}, and the processes of earlier generations are gone",
                errors.SHARD_RESTARTED, shard=str(shard), generation=str(me.generation))
        raise ProcessNotFound(handle)  # a later generation, an exited process, a wrong token

    def wrong_shard(self, shard: int, handle: str = "") -> ProcessNotFound:
        """NOT_FOUND for a call that belongs to another shard, naming it (and where it serves)."""
        me = self.topology
        info = me.shard(shard)
        where = f" at {info.address}" if info is not None and info.address else ""
        what = f"the process {echo(handle)!r} belongs to" if handle else "the call asks for"
        return ProcessNotFound(handle, f"{what} shard {shard}{where}; this is shard {me.index}",
                               errors.WRONG_SHARD, shard=str(shard), address=info.address if info else "")


__all__ = ["ECHO_MAX", "HANDLE_MAX", "HANDLE_RE", "BadRequest", "Handles", "ProcessNotFound", "echo"]
