"""The events the model emits for whoever watches it run (the schedule explorer's trace).

The protocol code marks the accesses a reader of the trace needs, as the kernel marks them:
``READ_ONCE`` / ``WRITE_ONCE`` of the fields walkers and movers race on (``folio->mapping``,
``folio->index``, ``anon_vma->root``), reference counts taken and dropped, RCU read sections, lock
acquisitions and releases, and the type-stable cache's frees and reuses. Each is one call that
costs an attribute test while nobody watches (``Kernel.trace`` is None).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
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

    def access(self, obj: Any, field: str, write: bool) -> None:
        """A marked read (``write`` False) or write of ``obj->field``, structured: which object,
        which field (what a partial-order search needs to tell which steps race). Sent after the
        access and its ``state`` text: at the hardware's granularity, other tasks may run here."""

    def refcount(self, obj: Any, old: int, new: int) -> None:
        """An atomic add to ``obj->refcount`` (atomic_add_return, atomic_inc_not_zero, a folio's
        folio_ref_add ...) took it from ``old`` to ``new`` (equal: an inc_not_zero that found it
        zero). Nothing else read the count: two adds commute while neither's test (the count
        reaching zero, or a folio's crossing GUP_PIN_COUNTING_BIAS) can come out differently.
        A point at the hardware's granularity, as ``access``."""


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
        k.trace.access(obj, field, False)
    return value


def WRITE_ONCE(k: Kernel, where: str, obj: Any, field: str, value: Any) -> None:
    """``WRITE_ONCE(obj->field, value)`` in the function ``where``: the store, shown in the trace."""
    setattr(obj, field, value)
    if k.trace is not None:
        k.trace.state(f"{where}: {name(obj)}->{field} = {name(value)}")
        k.trace.access(obj, field, True)


def atomic_add_return(k: Kernel, obj: Any, delta: int) -> int:
    """``atomic_add_return(delta, &obj->refcount)``: the count after. Watched (``Kernel.trace``),
    the add reaches the tracer as one (``Tracer.refcount``), not as a read and a store of the field."""
    tr = k.trace
    if tr is None:
        obj.refcount = new = obj.refcount + delta
        return int(new)
    global field_hook
    hook, field_hook = field_hook, None
    old = obj.refcount
    obj.refcount = new = old + delta
    field_hook = hook
    tr.refcount(obj, old, new)
    return int(new)


def atomic_inc_not_zero(k: Kernel, obj: Any) -> bool:
    """``atomic_inc_not_zero(&obj->refcount)``: a reference, unless the count is zero (the object
    is being freed)."""
    tr = k.trace
    if tr is None:
        if not obj.refcount:
            return False
        obj.refcount += 1
        return True
    global field_hook
    hook, field_hook = field_hook, None
    old = obj.refcount
    if old:
        obj.refcount = old + 1
    field_hook = hook
    tr.refcount(obj, old, old + 1 if old else 0)
    return bool(old)


def atomic_cmpxchg(k: Kernel, obj: Any, old: int, new: int) -> bool:
    """``atomic_cmpxchg(&obj->refcount, old, new) == old``: the count set to ``new`` if it was
    ``old``, in one step. Watched, a read of the count (a write where it took), not an add: an
    add beside it does not commute with it."""
    tr = k.trace
    if tr is None:
        if obj.refcount != old:
            return False
        obj.refcount = new
        return True
    global field_hook
    hook, field_hook = field_hook, None
    seen = obj.refcount
    done = bool(seen == old)
    if done:
        obj.refcount = new
    field_hook = hook
    tr.state(f"{name(obj)} refcount cmpxchg {old} → {new}: " + ("done" if done else f"fails ({seen})"))
    tr.access(obj, "refcount", done)
    return done


def trace_load(k: Kernel, where: str, obj: Any, field: str) -> None:
    """Show a read of ``obj->field`` just made (the hot paths' form of READ_ONCE)."""
    assert k.trace is not None
    k.trace.state(f"{where}: reads {name(obj)}->{field} = {name(getattr(obj, field))}")
    k.trace.access(obj, field, False)


def trace_store(k: Kernel, where: str, obj: Any, field: str) -> None:
    """Show a store to ``obj->field`` just made (the hot paths' form of WRITE_ONCE:
    ``if k.trace: trace_store(k, "move_present_ptes", folio, "index")``)."""
    assert k.trace is not None
    k.trace.state(f"{where}: {name(obj)}->{field} = {name(getattr(obj, field))}")
    k.trace.access(obj, field, True)


# ---------------------------------------------------------------------------------------------
# Watching every field


#: A field that was never set (its old value, for a first store).
UNSET: Any = object()

#: Who receives the watched classes' field accesses while a :func:`watch_fields` is installed:
#: ``hook(obj, field, write, old, new)`` (a read passes the value as both); None: nobody now.
field_hook: Callable[[Any, str, bool, Any, Any], None] | None = None


class _WatchedSlot:
    """Stands in for a slot's member descriptor while its class is watched: reports each read and
    store to ``field_hook`` and otherwise does what the slot does."""

    __slots__ = ("member", "field")

    def __init__(self, member: Any, field: str) -> None:
        self.member = member
        self.field = field

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        value = self.member.__get__(obj, owner)
        hook = field_hook
        if hook is not None:
            hook(obj, self.field, False, value, value)
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        hook = field_hook
        if hook is not None:
            try:
                old = self.member.__get__(obj, type(obj))
            except AttributeError:
                old = UNSET
            self.member.__set__(obj, value)
            hook(obj, self.field, True, old, value)
        else:
            self.member.__set__(obj, value)

    def __delete__(self, obj: Any) -> None:
        hook = field_hook
        if hook is not None:
            hook(obj, self.field, True, self.member.__get__(obj, type(obj)), UNSET)
        self.member.__delete__(obj)


def _watched_getattribute(self: Any, field: str) -> Any:
    value = object.__getattribute__(self, field)
    hook = field_hook
    if hook is not None and field in object.__getattribute__(self, "__dict__"):
        hook(self, field, False, value, value)
    return value


def _watched_setattr(self: Any, field: str, value: Any) -> None:
    hook = field_hook
    if hook is None:
        object.__setattr__(self, field, value)
        return
    old = object.__getattribute__(self, "__dict__").get(field, UNSET)
    object.__setattr__(self, field, value)
    hook(self, field, True, old, value)


def _watched_delattr(self: Any, field: str) -> None:
    hook = field_hook
    if hook is not None:
        hook(self, field, True, object.__getattribute__(self, "__dict__").get(field, UNSET), UNSET)
    object.__delattr__(self, field)


@contextmanager
def watch_fields(classes: tuple[type, ...]) -> Iterator[None]:
    """While in the block, every read and store of a field of an instance of ``classes`` (their
    slots, or their instance attributes) goes to :data:`field_hook` whenever one is set
    (:func:`set_field_hook`: the caller switches it on and off around the stretches it watches).
    Outside the block the classes are as they were: nothing costs anything while nobody watches."""
    global field_hook
    undo: list[tuple[type, str, Any]] = []
    try:
        for cls in classes:
            slots = cls.__dict__.get("__slots__")
            if slots is not None:
                for slot in (slots,) if isinstance(slots, str) else slots:
                    member = None if slot.startswith("__") else cls.__dict__.get(slot)
                    if member is not None and not isinstance(member, _WatchedSlot):
                        undo.append((cls, slot, member))
                        setattr(cls, slot, _WatchedSlot(member, slot))
            if cls.__dictoffset__ and "__getattribute__" not in cls.__dict__:
                for attr, fn in (("__getattribute__", _watched_getattribute), ("__setattr__", _watched_setattr),
                                 ("__delattr__", _watched_delattr)):
                    undo.append((cls, attr, None))
                    setattr(cls, attr, fn)
        yield
    finally:
        field_hook = None
        for cls, attr, member in reversed(undo):
            if member is None:
                delattr(cls, attr)
            else:
                setattr(cls, attr, member)


def set_field_hook(hook: Callable[[Any, str, bool, Any, Any], None] | None) -> None:
    """Switch the watched classes' reports to ``hook`` (None: off)."""
    global field_hook
    field_hook = hook
