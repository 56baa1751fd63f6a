"""Locust users for mmsim: :class:`MmsimUser` drives a server through a blocking gRPC client.

Locust runs its users as gevent greenlets, so this module patches gRPC for gevent when it is
imported (``grpc.experimental.gevent.init_gevent()``, before any channel exists) and uses the
synchronous stub; the SDK's asyncio client (``mmsim.client``) does not run under gevent. Import it
from a locustfile and subclass::

    from locust import constant
    from mmsim.loadgen.locust import MmsimUser

    class Mixed(MmsimUser):
        wait_time = constant(0)

and run ``locust -f locustfile.py --headless -u 20 -r 5 -t 10s --host 127.0.0.1:7077`` (``--host``
is the server's ``HOST:PORT``, with or without ``grpc://``). ``examples/locust/`` has the file and
the command lines for the web UI and for distributed runs.

**Credentials and shards.** A server started with ``--token-file`` or TLS needs them from the users
too: ``--mmsim-token-file FILE``, ``--mmsim-tls-ca FILE``, ``--mmsim-tls-cert FILE`` and
``--mmsim-tls-key FILE`` on Locust's command line (or ``MMSIM_TOKEN_FILE``, ``MMSIM_TLS_CA``,
``MMSIM_CLIENT_TLS_CERT``, ``MMSIM_CLIENT_TLS_KEY`` in the environment, or the class attributes of the same names,
which win), as ``mmsim loadgen`` takes them; a master passes them on to its workers, and each
process reads the files. TLS is on with a CA or a client certificate, or with ``--host
grpcs://HOST:PORT`` (the system's CAs). Every call on the user's process carries its shard in the
``x-mmsim-shard`` header, so that ``--host`` may be a proxy in front of the shards of a deployment
(the process is created wherever the proxy sends the first call); a shard itself ignores the header.

Each user opens its own channel (its own connection) and, in ``on_start``, builds its workload: a
process with a source region of :attr:`MmsimUser.pages` written pages, a destination region of as
many pages registered with userfaultfd in MISSING mode (the source is registered too, so that
pages can move back), both ``MADV_DONTFORK``, and a small "heap" region that ``fork`` copies. Its
tasks then move pages between the two regions and back (each page ping-pongs, so a run never runs
out of work), walk the rmap, fork and exit a child, write, read, map and unmap, and move pages 256
at a time in a ``Batch`` call and on a ``BatchStream``. ``on_stop`` exits every process the user
created; a user that Locust stops in the middle of a call finishes that call first, so no process
is left behind.

Every call is reported to Locust as a ``grpc`` request named after its operation. A
memory-semantics error (the status carries a ``google.rpc.ErrorInfo`` in domain ``mmsim.v1`` with
an ``errno``) is the outcome the kernel would give, not a failure: the call is reported as a success
under the operation's name with the errno's, e.g. ``remap [EBUSY]``, and counted in
:data:`outcomes`, which the master (or the single process) prints at the end; an operation of a
batch that fails with an errno is counted there too (``batch remap EBUSY``). Any other status
(UNAVAILABLE, INTERNAL, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED without an errno, ...) is a Locust
failure, and so is a result the model must not give (a read that does not return what was
written, a walk that does not find the page where it is mapped).

The ping-pong regions are ``MADV_DONTFORK`` because fork shares every page it copies: the parent's
page stays not exclusive after the child exits, and UFFDIO_MOVE answers EBUSY for it until it is
written again, as the kernel's does; fork copies the heap region instead.
"""

from __future__ import annotations

import errno as errno_mod
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import gevent
import grpc
import grpc.experimental.gevent as grpc_gevent
from gevent import GreenletExit
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from locust import User, events, task
from locust.exception import RescheduleTask, StopUser
from locust.runners import WorkerRunner

from mmsim.client import read_token, tls_credentials
from mmsim.client._client import SHARD_HEADER, shard_of
from mmsim.v1 import mmsim_pb2 as pb
from mmsim.v1 import mmsim_pb2_grpc, wire

# Before any channel exists: gRPC's waits must yield to the gevent hub, or one user blocks them all.
grpc_gevent.init_gevent()

PAGE = 4096
#: Where ``--host`` is not given: ``MMSIM_ADDR``, else the server's default address.
DEFAULT_TARGET = "127.0.0.1:7077"
#: The credential options: (Locust option, environment variable, MmsimUser attribute, help).
CREDENTIAL_OPTIONS: tuple[tuple[str, str, str, str], ...] = (
    ("--mmsim-token-file", "MMSIM_TOKEN_FILE", "token_file", "send the bearer token in this file on every call"),
    ("--mmsim-tls-ca", "MMSIM_TLS_CA", "tls_ca", "TLS: trust the PEM CA certificates in this file"),
    ("--mmsim-tls-cert", "MMSIM_CLIENT_TLS_CERT", "tls_cert", "TLS: present this PEM client certificate"),
    ("--mmsim-tls-key", "MMSIM_CLIENT_TLS_KEY", "tls_key", "the PEM private key of --mmsim-tls-cert"),
)
#: Trailing-metadata key of the serialized google.rpc.Status.
STATUS_DETAILS_KEY = "grpc-status-details-bin"

#: Expected outcomes, "<operation> <ERRNO>" -> calls (or batch operations), in this process since
#: the last report to the master. Workers send theirs with each report; the master adds them up.
outcomes: Counter[str] = Counter()

_log = logging.getLogger(__name__)
_console = logging.getLogger("locust.stats_logger")  # where Locust prints its own tables
_environments: list[Any] = []


class CallFailed(Exception):
    """A call that failed without a memory-semantics errno: a Locust failure."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


class CheckFailed(Exception):
    """A call that succeeded with a result the model must not give: a Locust failure."""


class Outcome(NamedTuple):
    """What a call ended with: its response, or the kernel's errno and the bytes moved before it."""

    response: Any
    errno: int = 0
    moved: int = 0


def errno_name(err: int) -> str:
    return errno_mod.errorcode.get(err, f"E{err}")


def status_errno(error: grpc.RpcError) -> tuple[int, int]:
    """(errno, moved) carried by a failed call's ``google.rpc.ErrorInfo`` in domain ``mmsim.v1``;
    (0, 0) when it has none: then it is not a memory-semantics error."""
    trailing = error.trailing_metadata() if isinstance(error, grpc.Call) else None
    key: str
    value: str | bytes
    for key, value in trailing or ():
        if key != STATUS_DETAILS_KEY:
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except (DecodeError, TypeError):
            return 0, 0
        for detail in status.details:
            if not detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                continue
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain != wire.DOMAIN:
                continue
            try:
                return max(int(info.metadata.get("errno", "0")), 0), max(int(info.metadata.get("moved", "0")), 0)
            except ValueError:
                return 0, 0
    return 0, 0


def target_of(host: str | None) -> str:
    """The gRPC target for Locust's ``--host``: ``HOST:PORT``, with or without ``grpc://`` or
    ``grpcs://`` (``http://`` and ``https://`` are taken too, as Locust's web form suggests them);
    None or empty: ``MMSIM_ADDR``, else ``127.0.0.1:7077``. Other gRPC target forms (``dns:///...``,
    ``unix:...``) pass as they are."""
    target = (host or "").strip() or os.environ.get("MMSIM_ADDR", "").strip() or DEFAULT_TARGET
    lower = target.lower()
    for scheme in ("grpc://", "grpcs://", "http://", "https://"):
        if lower.startswith(scheme):
            target = target[len(scheme) :].rstrip("/")
            break
    if not target:
        raise ValueError(f"no address in --host {host!r}: give it as HOST:PORT")
    return target


def tls_scheme(host: str | None) -> bool:
    """Whether ``--host`` asks for TLS by its scheme (``grpcs://``, ``https://``)."""
    return (host or "").strip().lower().startswith(("grpcs://", "https://"))


def credential_files(user: Any) -> dict[str, str | None]:
    """The credential files of a user: its class attribute, else Locust's option, else the
    environment variable (``token_file``, ``tls_ca``, ``tls_cert``, ``tls_key`` -> path or None)."""
    parsed = getattr(getattr(user, "environment", None), "parsed_options", None)
    out: dict[str, str | None] = {}
    for option, env, attr, _ in CREDENTIAL_OPTIONS:
        value = getattr(user, attr, None) or getattr(parsed, option[2:].replace("-", "_"), None) or os.environ.get(env)
        out[attr] = value or None
    return out


def credentials(files: dict[str, str | None], tls: bool = False) -> tuple[grpc.ChannelCredentials | None, str | None]:
    """(channel credentials or None, token or None) from the files of :func:`credential_files`; TLS
    when a CA or a client certificate is given, or ``tls`` (the system's CAs)."""
    token_file = files.get("token_file")
    token = read_token(token_file) if token_file else None
    if tls or files.get("tls_ca") or files.get("tls_cert"):
        return tls_credentials(files.get("tls_ca"), files.get("tls_cert"), files.get("tls_key")), token
    return None, token


def _op_error_text(e: pb.OpError) -> str:
    codes = {c.value[0]: c.name for c in grpc.StatusCode}
    return f"{codes.get(e.code, e.code)}: {e.message}"


class MmsimClient:
    """A blocking client of one mmsim server, for one Locust user: each call is timed and reported
    to Locust (``environment.events.request``) as a ``grpc`` request.

    Calls run to completion even when Locust stops the user in the middle of one: the stop
    (``GreenletExit``) takes effect when the call has been reported, or, inside ``with
    client.atomic():``, at the end of the block, so that what a sequence of calls creates (a
    child process) is always known to whoever must clean it up.
    """

    def __init__(
        self,
        target: str,
        environment: Any,
        *,
        timeout: float | None = 10.0,
        options: Sequence[tuple[str, Any]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        self.environment = environment
        self.timeout = timeout
        # A connection of its own per user (gRPC shares one between channels of equal arguments).
        merged: dict[str, Any] = {"grpc.use_local_subchannel_pool": 1}
        merged.update(options)
        if credentials is not None:
            self.channel = grpc.secure_channel(target, credentials, options=list(merged.items()))
        else:
            self.channel = grpc.insecure_channel(target, options=list(merged.items()))
        self.stub = mmsim_pb2_grpc.MemoryManagerStub(self.channel)
        self._base: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._metadata: tuple[tuple[str, str], ...] | None = self._base or None
        self._shard: int | None = None
        self._atomic = 0
        self._exit_pending = False

    @property
    def shard(self) -> int | None:
        """The shard every call names in the ``x-mmsim-shard`` header (None: no header)."""
        return self._shard

    @shard.setter
    def shard(self, shard: int | None) -> None:
        self._shard = shard
        self._metadata = (*self._base, (SHARD_HEADER, str(shard))) if shard is not None else (self._base or None)

    def close(self) -> None:
        self.channel.close()

    # -- stopping only between calls
    @contextmanager
    def atomic(self) -> Iterator[None]:
        """A stop of the user during the block takes effect at its end (calls inside all run)."""
        self._atomic += 1
        try:
            yield
        finally:
            self._atomic -= 1
            self._exit_if_stopped()

    def _exit_if_stopped(self) -> None:
        if self._exit_pending and not self._atomic:
            self._exit_pending = False
            raise GreenletExit

    def _shielded(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a greenlet of its own; a GreenletExit thrown at this one meanwhile is
        kept for later and the wait goes on, so the call always completes."""
        g = gevent.spawn(fn, *args)
        while True:
            try:
                return g.get()
            except GreenletExit:
                self._exit_pending = True

    # -- calls
    def _invoke(self, method: str, request: Any) -> tuple[Any, grpc.RpcError | None, float]:
        start = time.perf_counter()
        try:
            if method == "BatchStream":  # request: the BatchRequests to send; response: the list received
                stream = self.stub.BatchStream(iter(request), timeout=self.timeout, metadata=self._metadata)
                response: Any = list(stream)
            else:
                response = getattr(self.stub, method)(request, timeout=self.timeout, metadata=self._metadata)
            error = None
        except grpc.RpcError as exc:
            response, error = None, exc
        return response, error, (time.perf_counter() - start) * 1000.0

    def report(self, name: str, response_time: float, response_length: int, exception: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=response_time,
            response_length=response_length,
            exception=exception,
            context={},
        )

    def call(
        self, name: str, method: str, request: Any, *, check: Callable[[Any], str | None] | None = None
    ) -> Outcome:
        """Call the RPC ``method`` and report it as ``name``.

        Success: the response, reported as a success unless ``check(response)`` returns a message
        (then a failure, :class:`CheckFailed`; the response is returned all the same, for the
        caller's bookkeeping). A memory-semantics error: ``Outcome(None, errno, moved)``, reported
        as a success named ``"name [ERRNO]"``. Any other failure is reported and raises
        ``RescheduleTask`` (the rest of the task is skipped).
        """
        try:
            response, error, ms = self._shielded(self._invoke, method, request)
            if error is None:
                items = response if isinstance(response, list) else [response]
                problem = check(response) if check is not None else None
                self.report(name, ms, sum(r.ByteSize() for r in items), CheckFailed(problem) if problem else None)
                return Outcome(response)
            err, moved = status_errno(error)
            if err:
                ename = errno_name(err)
                outcomes[f"{name} {ename}"] += 1
                self.report(f"{name} [{ename}]", ms, 0, None)
                return Outcome(None, err, moved)
            code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
            details = (error.details() if isinstance(error, grpc.Call) else None) or str(error)
            self.report(name, ms, 0, CallFailed(code, details))
            raise RescheduleTask()
        finally:
            self._exit_if_stopped()


def _batch_check(n: int) -> Callable[[pb.BatchResponse], str | None]:
    def check(reply: pb.BatchResponse) -> str | None:
        if len(reply.results) != n:
            return f"{len(reply.results)} results for {n} operations"
        for r in reply.results:
            if r.WhichOneof("result") == "error" and r.error.errno <= 0:
                return f"an operation failed: {_op_error_text(r.error)}"
        return None

    return check


def _stream_check(n: int) -> Callable[[list[pb.BatchResponse]], str | None]:
    one = _batch_check(n)

    def check(replies: list[pb.BatchResponse]) -> str | None:
        return one(replies[0]) if len(replies) == 1 else f"{len(replies)} responses for 1 request"

    return check


class MmsimUser(User):
    """A Locust user with its own process on an mmsim server and the "mixed" set of tasks.

    Subclass it in a locustfile (it is abstract) and set ``wait_time``; to run another mix, set
    ``tasks = {MmsimUser.remap: 3, MmsimUser.walk: 1}`` (any of the task methods, with weights) in
    the subclass. The class attributes below size each user's workload.
    """

    abstract = True
    #: Pages of each ping-pong region; the first 64 move together (``remap64``), the others one by
    #: one (``remap``) and :attr:`batch_ops` at a time (``batch``, ``stream``).
    pages = 512
    #: Pages of the region that ``fork`` copies.
    heap_pages = 16
    #: Pages that ``mmap_munmap`` maps and unmaps.
    mmap_pages = 1
    #: Single-page moves per ``Batch`` call and per ``BatchStream`` request.
    batch_ops = 256
    #: Deadline of each call, in seconds.
    timeout: float | None = 10.0
    #: Extra channel arguments.
    channel_options: Sequence[tuple[str, Any]] = ()
    #: Credential files (None: ``--mmsim-token-file`` and the others, or their environment variables).
    token_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    BLOCK = 64

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        if self.pages < self.BLOCK + self.batch_ops:
            raise ValueError(f"{type(self).__name__}.pages must be at least {self.BLOCK + self.batch_ops}")
        self.client: MmsimClient | None = None
        self.processes: list[str] = []  # handles this user created and has not exited
        self.handle = ""
        self.pid = 0
        self._resync = False

    # -- lifecycle
    def on_start(self) -> None:
        creds, token = credentials(credential_files(self), tls_scheme(self.host))
        self.client = MmsimClient(
            target_of(self.host), self.environment, timeout=self.timeout, options=self.channel_options,
            credentials=creds, token=token,
        )
        with self.client.atomic():
            try:
                self._build()
            except (RescheduleTask, StopUser):
                # The failed call is reported. Stop as Locust's own stop does: before the first
                # task, with on_stop exiting what was created (StopUser here would log a traceback).
                _log.warning("an mmsim user could not set up its workload on %s; stopping it", self.client.target)
                self.stop()

    def on_stop(self) -> None:
        client = self.client
        if client is None:
            return
        try:
            with client.atomic():
                for handle in list(self.processes):
                    try:
                        client.call("exit", "Exit", pb.ProcessRequest(process=handle))
                    except RescheduleTask:
                        continue  # reported as a failure; nothing more to do for it
                    self.processes.remove(handle)
        finally:
            client.close()
            self.client = None

    @property
    def mm(self) -> MmsimClient:
        """This user's client (from ``on_start`` to ``on_stop``)."""
        assert self.client is not None, "on_start has not run"
        return self.client

    def _need(self, outcome: Outcome) -> Any:
        if outcome.response is None:  # an errno where setting up must succeed (ENOMEM, ...)
            raise StopUser()
        return outcome.response

    def _build(self) -> None:
        c = self.mm
        proc = self._need(c.call("create_process", "CreateProcess", pb.CreateProcessRequest()))
        self.processes.append(proc.handle)
        self.handle, self.pid = proc.handle, proc.pid
        c.shard = shard_of(proc.handle)  # through a proxy, every later call goes to this shard
        n, length = self.pages, self.pages * PAGE
        src = self._need(c.call("mmap", "Mmap", pb.MmapRequest(process=self.handle, length=length, prot=pb.PROT_RW)))
        dst = self._need(
            c.call(
                "mmap",
                "Mmap",
                pb.MmapRequest(process=self.handle, length=length, prot=pb.PROT_RW, uffd=pb.UFFD_MODE_MISSING),
            )
        )
        heap = self._need(
            c.call("mmap", "Mmap", pb.MmapRequest(process=self.handle, length=self.heap_pages * PAGE, prot=pb.PROT_RW))
        )
        for region in (src, dst):
            advice = pb.MadviseRequest(process=self.handle, addr=region.start, length=length, advice=pb.ADVICE_DONTFORK)
            self._need(c.call("madvise", "Madvise", advice))
        self.base = [src.start, dst.start]
        self.heap = heap.start
        self.loc = bytearray(n)  # where each ping-pong page is: 0 in src, 1 in dst
        self.values = [random.getrandbits(64) for _ in range(n + self.heap_pages)]
        writes = [
            pb.Op(write=pb.WriteRequest(process=self.handle, addr=self.addr(i), value=v))
            for i, v in enumerate(self.values)
        ]
        reply = self._need(c.call("write_all", "Batch", pb.BatchRequest(ops=writes, stop_on_error=True)))
        if len(reply.results) != len(writes) or any(r.WhichOneof("result") == "error" for r in reply.results):
            raise StopUser()
        # Registered only now: a write to a missing page of a MISSING range would wait for a handler.
        register = pb.UffdRegisterRequest(process=self.handle, addr=src.start, length=length, mode=pb.UFFD_MODE_MISSING)
        self._need(c.call("uffd_register", "UffdRegister", register))
        self._cursor = 0

    # -- the pages
    def addr(self, i: int) -> int:
        """Where page ``i`` is now: a ping-pong page (``i < pages``) or a heap page."""
        if i < self.pages:
            return self.base[self.loc[i]] + i * PAGE
        return self.heap + (i - self.pages) * PAGE

    def _singles(self, count: int) -> list[int]:
        """The next ``count`` pages moved one at a time, round-robin."""
        span = self.pages - self.BLOCK
        start, self._cursor = self._cursor, (self._cursor + count) % span
        return [self.BLOCK + (start + k) % span for k in range(count)]

    def _remap_request(self, i: int, count: int = 1) -> pb.RemapRequest:
        here = self.loc[i]
        return pb.RemapRequest(
            process=self.handle,
            dst=self.base[1 - here] + i * PAGE,
            src=self.base[here] + i * PAGE,
            len=count * PAGE,
        )

    def _moved(self, i: int, moved: int) -> None:
        for k in range(i, i + moved // PAGE):
            self.loc[k] ^= 1

    def _sync(self) -> None:
        """After a failed call whose effect is unknown (a deadline, a lost connection), learn where
        every page is and what it holds from the server (one Batch of GetFolio)."""
        if not self._resync:
            return
        c = self.mm
        n = self.pages
        at = [a for i in range(n) for a in (self.base[0] + i * PAGE, self.base[1] + i * PAGE)]
        at += [self.heap + j * PAGE for j in range(self.heap_pages)]
        ops = [pb.Op(get_folio=pb.AccessRequest(process=self.handle, addr=a)) for a in at]
        reply = c.call("resync", "Batch", pb.BatchRequest(ops=ops), check=_batch_check(len(ops))).response
        if reply is None or len(reply.results) != len(ops):
            return
        folios = [r.folio if r.WhichOneof("result") == "folio" else None for r in reply.results]
        for i in range(n):
            s, d = folios[2 * i], folios[2 * i + 1]
            f = s if s is not None and s.present else d
            if f is not None and f.present:
                self.loc[i] = 0 if f is s else 1
                self.values[i] = f.value
        for j in range(self.heap_pages):
            f = folios[2 * n + j]
            if f is not None and f.present:
                self.values[n + j] = f.value
        self._resync = False

    @contextmanager
    def _mutating(self) -> Iterator[None]:
        """Around a task that changes pages: a failed call leaves their state unknown until resync."""
        self._sync()
        try:
            yield
        except RescheduleTask:
            self._resync = True
            raise

    # -- the tasks: the weights of the load generator's "mixed" profile, plus batch and stream
    @task(4)
    def remap(self) -> None:
        """UFFDIO_MOVE of one page, to the other region."""
        (i,) = self._singles(1)
        with self._mutating():
            out = self.mm.call("remap", "Remap", self._remap_request(i))
            self._moved(i, out.response.moved if out.response is not None else out.moved)

    @task(1)
    def remap64(self) -> None:
        """UFFDIO_MOVE of the 64-page block (of its leading pages on one side, after a short move)."""
        with self._mutating():
            run = 1
            while run < self.BLOCK and self.loc[run] == self.loc[0]:
                run += 1
            out = self.mm.call("remap64", "Remap", self._remap_request(0, run))
            self._moved(0, out.response.moved if out.response is not None else out.moved)

    def _walk(self, name: str, blocking: bool) -> None:
        self._sync()
        addr = self.addr(random.randrange(self.pages + self.heap_pages))

        def check(w: pb.WalkResponse) -> str | None:
            if w.contended or any(m.pid == self.pid and m.addr == addr for m in w.mappings):
                return None
            return f"the rmap walk did not find the page where it is mapped (found {len(w.mappings)} mappings)"

        self.mm.call(
            name, "Walk", pb.WalkRequest(process=self.handle, addr=addr, blocking=blocking), check=check
        )

    @task(3)
    def walk(self) -> None:
        """The rmap walk (folio_referenced) in trylock mode: "contended" is a result, not an error."""
        self._walk("walk", False)

    @task(1)
    def walk_blocking(self) -> None:
        """The rmap walk that sleeps on the anon_vma lock."""
        self._walk("walk_blocking", True)

    @task(1)
    def fork_exit(self) -> None:
        """fork() of the user's process (copying the heap region), then exit() of the child."""
        c = self.mm
        with c.atomic():  # the child's handle is recorded before a stop can take effect
            child = c.call("fork", "Fork", pb.ProcessRequest(process=self.handle)).response
            if child is None:
                return  # an errno (ENOMEM): counted
            self.processes.append(child.handle)
            if c.call("exit", "Exit", pb.ProcessRequest(process=child.handle)).errno == 0:
                self.processes.remove(child.handle)

    @task(2)
    def write(self) -> None:
        i = random.randrange(self.pages + self.heap_pages)
        value = random.getrandbits(64)
        with self._mutating():
            out = self.mm.call(
                "write", "Write", pb.WriteRequest(process=self.handle, addr=self.addr(i), value=value)
            )
            if out.errno == 0:
                self.values[i] = value

    @task(2)
    def read(self) -> None:
        """A read fault; the value must be the last one written to the page, wherever it moved."""
        self._sync()
        i = random.randrange(self.pages + self.heap_pages)
        want = self.values[i]

        def check(r: pb.ReadResponse) -> str | None:
            return None if r.value == want else "a read did not return the value last written"

        self.mm.call("read", "Read", pb.AccessRequest(process=self.handle, addr=self.addr(i)), check=check)

    @task(1)
    def mmap_munmap(self) -> None:
        """mmap() of a region, then munmap() of it."""
        c = self.mm
        length = self.mmap_pages * PAGE
        vma = c.call("mmap", "Mmap", pb.MmapRequest(process=self.handle, length=length, prot=pb.PROT_RW)).response
        if vma is not None:
            c.call("munmap", "Munmap", pb.RangeRequest(process=self.handle, addr=vma.start, length=length))

    def _batched(self, name: str, method: str) -> None:
        with self._mutating():
            pages = self._singles(self.batch_ops)
            ops = [pb.Op(remap=self._remap_request(i)) for i in pages]
            request = pb.BatchRequest(ops=ops)
            if method == "Batch":
                reply = self.mm.call(name, method, request, check=_batch_check(len(ops))).response
            else:
                replies = self.mm.call(name, method, [request], check=_stream_check(len(ops))).response
                reply = replies[0] if replies else None
            if reply is None or len(reply.results) != len(ops):
                self._resync = True
                return
            for i, r in zip(pages, reply.results, strict=True):
                kind = r.WhichOneof("result")
                if kind == "remap":
                    self._moved(i, r.remap.moved)
                elif kind == "error":
                    if r.error.errno > 0:
                        outcomes[f"{name} remap {errno_name(r.error.errno)}"] += 1
                    self._moved(i, r.error.moved)

    @task(1)
    def batch(self) -> None:
        """One ``Batch`` call of :attr:`batch_ops` single-page moves."""
        self._batched("batch", "Batch")

    @task(1)
    def stream(self) -> None:
        """The same moves as one request on a ``BatchStream`` (one request, one response)."""
        self._batched("stream", "BatchStream")


@events.init_command_line_parser.add_listener
def _on_parser(parser: Any, **_: Any) -> None:
    for option, env, _attr, help_ in CREDENTIAL_OPTIONS:
        parser.add_argument(option, env_var=env, metavar="FILE", default=None, include_in_web_ui=False,
                           help=f"{help_} (env {env})")


# -- the expected outcomes: across workers, and printed at the end
@events.init.add_listener
def _on_init(environment: Any, **_: Any) -> None:
    _environments.append(environment)


@events.report_to_master.add_listener
def _on_report_to_master(client_id: str, data: dict[str, Any], **_: Any) -> None:
    data["mmsim_outcomes"] = dict(outcomes)
    outcomes.clear()


@events.worker_report.add_listener
def _on_worker_report(client_id: str, data: dict[str, Any], **_: Any) -> None:
    outcomes.update(data.get("mmsim_outcomes") or {})


@events.reset_stats.add_listener
def _on_reset_stats(**_: Any) -> None:
    outcomes.clear()


def summary() -> list[str]:
    """The lines printed at the end: each expected outcome and its count."""
    if not outcomes:
        return ["mmsim: no operation ended with an errno"]
    width = max(len(k) for k in outcomes)
    lines = ["mmsim: operations that ended with the kernel's errno (expected outcomes, not failures)"]
    lines += [f"  {k:<{width}}  {n:>10}" for k, n in sorted(outcomes.items())]
    return lines


@events.quit.add_listener
def _on_quit(**_: Any) -> None:
    if any(isinstance(env.runner, WorkerRunner) for env in _environments):
        return  # the master prints what its workers reported
    for line in summary():
        _console.info(line)


__all__ = [
    "CREDENTIAL_OPTIONS",
    "CallFailed",
    "CheckFailed",
    "MmsimClient",
    "MmsimUser",
    "Outcome",
    "errno_name",
    "outcomes",
    "status_errno",
    "credential_files",
    "credentials",
    "summary",
    "target_of",
    "tls_scheme",
]
