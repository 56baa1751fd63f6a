"""The events the model emits for whoever watches it run (the schedule explorer's trace).

The protocol code marks the accesses a reader of the trace needs, as the kernel marks them:
``READ_ONCE`` / ``WRITE_ONCE`` of the fields walkers and movers race on (``folio->mapping``,
``folio->index``, ``anon_vma->root``), reference counts taken and dropped, RCU read sections, lock
acquisitions and releases, and the type-stable cache's frees and reuses. Each is one call that
costs an attribute test while nobody watches (``Kernel.trace`` is None).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .kernel import Kernel
    from .locks import _Lock

class Tracer(Protocol):
    """What receives the model's events (``Kernel.trace``, ``LockdepState.trace``, ``Rcu.trace``)."""

    def lock(self, op: str, lock: _Lock, result: bool | None) -> None:
        """``op`` (``down_read``, ``spin_unlock``, ...) on ``lock``; ``result``: a trylock's or a
        blocking acquisition's answer (False: it sleeps), None for a release or a spin_lock."""

    def state(self, text: str) -> None:
        """A change or a marked read of shared state, already put into words (by the running task)."""

    def finding(self, text: str) -> None:
        """A detector's report (violation or finding)."""


def name(obj: Any) -> str:
    """How the trace names a model object or a value."""
    trace_name = getattr(obj, "trace_name", None)
    if trace_name is not None:
        return str(trace_name)
    return "NULL" if obj is None else (f"{obj:#x}" if isinstance(obj, int) else repr(obj))


def READ_ONCE(k: Kernel, where: str, obj: Any, field: str) -> Any:
    """``READ_ONCE(obj->field)`` in the function ``where``: the read, shown in the trace."""
    value = getattr(obj, field)
    if k.trace is not None:
        k.trace.state(f"{where}: reads {name(obj)}->{field} = {name(value)}")
    return value


def WRITE_ONCE(k: Kernel, where: str, obj: Any, field: str, value: Any) -> None:
    """``WRITE_ONCE(obj->field, value)`` in the function ``where``: the store, shown in the trace."""
    setattr(obj, field, value)
    if k.trace is not None:
        k.trace.state(f"{where}: {name(obj)}->{field} = {name(value)}")


def refcount_add(k: Kernel, obj: Any, delta: int) -> int:
    """``atomic_add_return(delta, &obj->refcount)``: the count after, shown in the trace."""
    old = obj.refcount
    obj.refcount = new = old + delta
    if k.trace is not None:
        k.trace.state(f"{name(obj)} refcount {old} → {new}")
    return int(new)


def trace_refcount(k: Kernel, obj: Any, delta: int) -> None:
    """Show a change of ``obj->refcount`` by ``delta`` just made (hot paths change it inline and
    call this only while someone watches: ``if k.trace: trace_refcount(k, folio, 1)``)."""
    assert k.trace is not None
    k.trace.state(f"{name(obj)} refcount {obj.refcount - delta} → {obj.refcount}")


def trace_load(k: Kernel, where: str, obj: Any, field: str) -> None:
    """Show a read of ``obj->field`` just made (the hot paths' form of READ_ONCE)."""
    assert k.trace is not None
    k.trace.state(f"{where}: reads {name(obj)}->{field} = {name(getattr(obj, field))}")


def trace_store(k: Kernel, where: str, obj: Any, field: str) -> None:
    """Show a store to ``obj->field`` just made (the hot paths' form of WRITE_ONCE:
    ``if k.trace: trace_store(k, "move_present_ptes", folio, "index")``)."""
    assert k.trace is not None
    k.trace.state(f"{where}: {name(obj)}->{field} = {name(getattr(obj, field))}")
