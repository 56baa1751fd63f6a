"""Campaigns on a Dask distributed cluster: ``--cluster tcp://HOST:PORT`` on ``mmsim explore``,
``mmsim mutate`` and ``mmsim conformance --random``.

The work is cut into the same deterministic parts as on one machine (a search's schedules
w, w + parts, ...; one mutant and protocol against one scenario; one random scenario), each part is
a task of the cluster, and the results are taken in part order, so a seed gives the same result on
a cluster as here. Every worker runs the tasks with its own mmsim (installed there, the same
version) and, for conformance, its own kernel. Needs the ``distributed`` package (the ``cluster``
extra).
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from distributed import Client, Future

    from .explore import Bound, _Part

T = TypeVar("T")

#: Seconds to connect to the scheduler, and to wait for its first worker.
CONNECT_TIMEOUT = 10.0
#: Seconds between two reads of a search's shared bound by one part (each read asks the scheduler).
BOUND_POLL = 0.1


class ClusterError(Exception):
    """The cluster cannot be used: ``distributed`` is not installed, the scheduler cannot be
    reached or has no worker, or a worker could not run a task. Its text is one line."""


@contextmanager
def connect(address: str, timeout: float = CONNECT_TIMEOUT) -> Iterator[Client]:
    """A client of the Dask scheduler at ``address`` (tcp://HOST:PORT) that has at least one
    worker, closed at the end. ClusterError if there is none."""
    try:
        from distributed import Client
    except ImportError:
        raise ClusterError("--cluster needs the distributed package: pip install mmsim[cluster]") from None
    _reachable(address, timeout)
    try:
        client = Client(address, timeout=timeout, set_as_default=False)
    except (OSError, ValueError, TypeError) as e:  # refused, timed out, an address it cannot parse
        raise ClusterError(f"cannot reach the Dask scheduler at {address}: {_line(e)}") from None
    try:
        try:
            client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            raise ClusterError(f"the Dask scheduler at {address} has no worker (waited {timeout:g} s)") from None
        yield client
    finally:
        client.close()


def _reachable(address: str, timeout: float) -> None:
    """ClusterError for an address that Dask cannot parse, or a TCP one that refuses the connection
    (a Client would retry it until its timeout)."""
    from distributed.comm import parse_address
    from distributed.comm.addressing import parse_host_port
    from distributed.comm.registry import get_backend

    try:
        scheme, loc = parse_address(address)
        get_backend(scheme)
        host, port = parse_host_port(loc) if scheme == "tcp" else ("", 0)
    except ValueError as e:
        raise ClusterError(f"not a Dask scheduler address: {address!r} ({_line(e)}); give tcp://HOST:PORT") from None
    if scheme != "tcp":
        return
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise ClusterError(f"cannot reach the Dask scheduler at {address}: {e.strerror or _line(e)}") from None


def threads(client: Client) -> int:
    """The worker threads of the cluster: the tasks it runs at once."""
    return sum(client.nthreads().values())


def in_order(client: Client, fn: Callable[..., T], calls: Sequence[tuple[Any, ...]]) -> Generator[T, None, None]:
    """Submit ``fn(*args)`` for each of ``calls`` now, all at once; the results, in the order of
    ``calls``, each as soon as it and those before it are in. Closing the generator early cancels
    the tasks not taken. ClusterError if a worker could not run one (a task's own exception is
    raised as it is)."""
    futures = [client.submit(fn, *args, pure=False) for args in calls]
    return _results(client, futures)


def _results(client: Client, futures: list[Future]) -> Generator[Any, None, None]:
    from distributed import CancelledError, KilledWorker

    try:
        for f in futures:
            try:
                yield f.result()
            except KilledWorker as e:
                raise ClusterError(f"a worker died running a task: {_line(e)}") from None
            except (CancelledError, ModuleNotFoundError) as e:
                raise ClusterError(f"a task could not run on the cluster ({type(e).__name__}: {_line(e)}); "
                                   "is the same mmsim installed on every worker?") from None
    finally:
        pending = [f for f in futures if not f.done()]
        if pending and client.status == "running":
            client.cancel(pending)


def run_in_order(address: str, fn: Callable[..., T], calls: Sequence[tuple[Any, ...]]) -> Iterator[T]:
    """``in_order`` on a client of the scheduler at ``address``, closed once every result is in."""
    with connect(address) as client:
        yield from in_order(client, fn, calls)


class SharedBound:
    """A parallel search's bound (explore.Bound) kept in a Dask ``Variable`` named ``name``. A
    part reads it at most every BOUND_POLL seconds: a bound read late, or two catches lowering it at
    once (the higher one may win), only make parts run schedules past the lowest catch, which the
    merge leaves out; the result is the same."""

    def __init__(self, name: str, start: int) -> None:
        self.name = name
        self._seen = start
        self._read = float("-inf")

    def get(self) -> int:
        from distributed import Variable

        now = time.monotonic()
        if now - self._read >= BOUND_POLL:
            self._seen = min(self._seen, int(Variable(self.name).get()))
            self._read = now
        return self._seen

    def lower(self, i: int) -> None:
        from distributed import Variable

        v = Variable(self.name)
        if i < int(v.get()):
            v.set(i)
        self._seen = min(self._seen, i)


def explore_parts(address: str, part: Callable[..., _Part], args: tuple[Any, ...], schedules: int,
                  parts: int) -> list[_Part]:
    """A random or PCT search's parts (explore._explore_part with ``args``) on the cluster at
    ``address``: ``parts`` of them, or one per worker thread when ``parts`` is 1, sharing one
    SharedBound; their results in part order."""
    with connect(address) as client:
        from distributed import Variable

        n = max(1, min(parts if parts > 1 else threads(client), schedules))
        var = Variable(f"mmsim-bound-{uuid.uuid4().hex}", client=client)
        var.set(schedules)
        bound: Bound = SharedBound(var.name, schedules)
        try:
            return list(in_order(client, part, [(*args, w, n, bound) for w in range(n)]))
        finally:
            var.delete()


def _line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
