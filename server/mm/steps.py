"""Protocol steps and variants: a locking change is code that replaces the steps it changes.

The model's protocol is the kernel's as of 6.18 (the seed as merged: the mapping recheck in the
trylock fast path and in the slow path). A *step* is one of the kernel functions in ``STEPS``; the
model calls every step through the kernel's table (``k.ops.folio_lock_anon_vma_read(...)``), so a
variant that replaces a step changes every caller, and the default path has no branch on the
variant. A :class:`Variant` is a named set of replacements, chosen when the kernel model is built:

- a *protocol* (``applies_to`` empty): a kernel generation, or a user's change, on top of the
  default steps;
- a *mutant* (``applies_to`` names protocols): a deliberate deviation from the kernel, on top of
  one of those protocols, that the detectors should catch (``mmsim mutate`` scores them).

A replacement has the default's signature and contract (see ``docs/variants.md``); it may call the
default by importing it from its module (``from mmsim.server.mm.rmap import folio_referenced``),
and calls other steps through ``k.ops``. A user's variant is a Python file holding Variant objects:
``load_variant("path/to/file.py:NAME")``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any


@dataclass(frozen=True)
class Step:
    """A protocol function a variant may replace: where its default lives, and its lock contract."""

    name: str
    module: str  # the model module that holds the default, relative to this package
    expects: str  # what the caller holds
    takes: str  # what it takes, and what it still holds on return


STEPS: dict[str, Step] = {
    s.name: s
    for s in (
        Step("folio_referenced", "rmap", "a reference on the folio; no anon_vma lock, no PTL",
             "whatever the walk takes (rmap_walk_anon); holds nothing on return. Returns the RmapWalkControl"),
        Step("rmap_walk_anon", "rmap", "as folio_referenced (and the folio lock, if the protocol's walkers take it)",
             "the root rwsem for read (folio_lock_anon_vma_read), then each mapping's PTL in turn; holds nothing "
             "on return"),
        Step("folio_lock_anon_vma_read", "rmap", "no anon_vma lock, no PTL",
             "the RCU read lock, then the folio's anon_vma root rwsem for read. Returns the anon_vma with that "
             "rwsem held (rwc.locked is the root locked), or None holding nothing"),
        Step("anon_vma_clone", "rmap", "mmap_lock for write",
             "the src chain's root rwsem for write, around linking; holds nothing on return"),
        Step("anon_vma_fork", "rmap", "mmap_lock for write (parent and, nested, child)",
             "what anon_vma_clone takes, then the root rwsem for write to link the new anon_vma"),
        Step("anon_vma_free", "rmap", "no anon_vma lock; the refcount at zero",
             "the root rwsem for write once, if it is locked (waits out fast-path walkers); frees the anon_vma"),
        Step("move_pages_pte", "userfaultfd", "the dst and src VMAs read-locked (uffd_move_lock)",
             "the src folio lock, then its anon_vma root rwsem for write, then both PTLs (move_present_ptes); "
             "holds nothing on return. Returns the bytes moved or a negative errno (-EAGAIN: retry)"),
        Step("move_present_ptes", "userfaultfd",
             "the src folio locked (and what move_pages_pte takes before the PTLs); both PTLs free",
             "both PTLs (double_pt_lock) and the trylocks of a batch's further folios; holds nothing on return "
             "but the first folio's lock. Returns the bytes moved or a negative errno"),
        Step("double_pt_lock", "userfaultfd", "neither PTL held by the caller",
             "both PTLs (one, if they are the same), the second nested; holds them on return"),
        Step("move_folio_lock", "userfaultfd",
             "the dst and src VMAs read-locked; the src PTL, which still maps the folio; no folio lock",
             "lets the src PTL go; a reference (the task's pin) and the folio lock: 0 taken by trylock, 1 slept for "
             "(retry the step), or -EAGAIN holding nothing"),
        Step("move_split_large_folio", "userfaultfd",
             "the dst and src VMAs read-locked; the large src folio locked and referenced; no PTL",
             "what split_folio takes (the anon_vma root rwsem for write, each PMD lock and PTL); returns 0 with the "
             "head's lock and reference given back, or a negative errno with the folio still locked and referenced"),
        Step("move_swap_pte", "userfaultfd",
             "the dst and src VMAs read-locked; the swap-cache folio, if any, locked and referenced",
             "both PTLs (double_pt_lock); holds nothing on return but the folio's lock. Returns PAGE_SIZE or a "
             "negative errno (-EAGAIN: retry)"),
        Step("move_pages_huge_pmd", "huge_memory",
             "the dst and src VMAs read-locked (uffd_move_lock); the dst PMD none; no folio lock, no PMD lock",
             "a reference and the folio lock (sleeping for it), the folio's anon_vma root rwsem for write, then both "
             "PMD locks (double_pt_lock); the huge zero page: the PMD locks only. Holds nothing on return. Returns "
             "HPAGE_PMD_SIZE or a negative errno (-EAGAIN: retry)"),
    )
}


class VariantError(ValueError):
    """A variant that cannot be used: unknown name, unknown step, bad file."""


@dataclass(frozen=True)
class Variant:
    """A named set of step replacements (see the module doc). ``walkers_hold_folio_lock``: the
    design says every rmap walker holds the folio lock (the detectors check it); None keeps the
    protocol's. For a mutant: ``applies_to`` (the protocols it is applied to, the first where its
    killing scenario runs), ``kernel`` (the kernel line it changes), ``failure`` (what it should
    produce) and ``equivalent`` (no scenario the model can express tells it from the kernel); a
    mutant that brings back a bug the kernel had, ``fix``: the commit that fixed it, its id and
    title."""

    name: str
    summary: str
    replaces: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    walkers_hold_folio_lock: bool | None = None
    applies_to: tuple[str, ...] = ()
    kernel: str = ""
    failure: str = ""
    equivalent: bool = False
    fix: str = ""

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise VariantError("a variant needs a name")
        for step, fn in self.replaces.items():
            if step not in STEPS:
                raise VariantError(
                    f"variant {self.name!r} replaces unknown step {step!r}; the steps are {', '.join(STEPS)}"
                )
            if not callable(fn):
                raise VariantError(f"variant {self.name!r}: the replacement of {step} is not callable")
            if inspect.iscoroutinefunction(default_step(step)) and not inspect.iscoroutinefunction(fn):
                raise VariantError(f"variant {self.name!r}: the replacement of {step} must be an async def")
        object.__setattr__(self, "replaces", dict(self.replaces))

    def __reduce__(self) -> str | tuple[Any, ...]:
        from .variants import MUTANTS, PROTOCOLS

        if PROTOCOLS.get(self.name) is self or MUTANTS.get(self.name) is self:
            return (_builtin, (self.name,))  # a built-in pickles as its name
        return (Variant, tuple(getattr(self, f.name) for f in fields(self)))

    @property
    def mutant(self) -> bool:
        return bool(self.applies_to)

    @property
    def protocols(self) -> tuple[str, ...]:
        """The protocols a mutant applies to (the name the mutation tools use)."""
        return self.applies_to


def _builtin(name: str) -> Variant:
    from .variants import MUTANTS, PROTOCOLS

    return PROTOCOLS.get(name) or MUTANTS[name]


def default_step(name: str) -> Callable[..., Any]:
    """The kernel's own function for step ``name``."""
    step = STEPS[name]
    fn: Callable[..., Any] = getattr(importlib.import_module(f"{__package__}.{step.module}"), name)
    return fn


class Ops:
    """The steps one kernel model runs: the defaults, then each variant's replacements in order."""

    __slots__ = tuple(STEPS)

    def __init__(self, *variants: Variant | None) -> None:
        for name in STEPS:
            setattr(self, name, default_step(name))
        for v in variants:
            if v is not None:
                for name, fn in v.replaces.items():
                    setattr(self, name, fn)

    @classmethod
    def of(cls, *variants: Variant | None) -> Ops:
        """The table for ``variants``, made once per process (a table is never changed once made;
        the explorer restores a pickled kernel for every schedule, and this keeps that cheap)."""
        key = tuple(
            None if v is None else tuple((step, id(fn)) for step, fn in v.replaces.items()) for v in variants
        )
        found = _OPS.get(key)
        if found is None:
            found = _OPS[key] = cls(*variants)
        return found

    # Typed views of the steps the model calls (the attributes themselves are set per instance).
    if TYPE_CHECKING:
        folio_referenced: Callable[..., Any]
        rmap_walk_anon: Callable[..., Any]
        folio_lock_anon_vma_read: Callable[..., Any]
        anon_vma_clone: Callable[..., Any]
        anon_vma_fork: Callable[..., Any]
        anon_vma_free: Callable[..., Any]
        move_pages_pte: Callable[..., Any]
        move_present_ptes: Callable[..., Any]
        double_pt_lock: Callable[..., Any]
        move_folio_lock: Callable[..., Any]
        move_split_large_folio: Callable[..., Any]
        move_swap_pte: Callable[..., Any]
        move_pages_huge_pmd: Callable[..., Any]


#: The step tables made, by the replacements' identities (the functions are module-level: they
#: live as long as the process, so their ids are not reused).
_OPS: dict[tuple[tuple[tuple[str, int], ...] | None, ...], Ops] = {}


# ---------------------------------------------------------------------------------------------
# Finding a variant: a built-in name, or FILE.py:NAME


def is_file_spec(spec: str) -> bool:
    """Whether ``spec`` names a variant in a file (``path/to/file.py:NAME``)."""
    path, sep, _ = spec.rpartition(":")
    return bool(sep) and path.endswith(".py")


def load_variant(spec: str) -> Variant:
    """The Variant ``NAME`` defined in the Python file of ``FILE.py:NAME``. VariantError (one line)
    if the file is missing, raises on import, has no such name, or that name is not a Variant (a
    Variant that replaces an unknown step raises when the file is imported)."""
    path_text, sep, attr = spec.rpartition(":")
    if not sep or not path_text.endswith(".py") or not attr:
        raise VariantError(f"{spec!r} is not FILE.py:NAME")
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise VariantError(f"no such variant file: {path_text}")
    modname = "mmsim_variant_" + hashlib.blake2b(str(path).encode(), digest_size=6).hexdigest()
    module = sys.modules.get(modname)
    if module is None:
        mspec = importlib.util.spec_from_file_location(modname, path)
        if mspec is None or mspec.loader is None:
            raise VariantError(f"cannot load {path_text} as Python")
        module = importlib.util.module_from_spec(mspec)
        sys.modules[modname] = module  # the model pickles (explorer snapshots): its functions must be found
        try:
            mspec.loader.exec_module(module)
        except VariantError as e:
            del sys.modules[modname]
            raise VariantError(f"{path_text}: {e}") from None
        except BaseException as e:  # noqa: BLE001 - whatever a user's file raises is one error line
            del sys.modules[modname]
            where = ""
            tb = e.__traceback__
            while tb is not None:
                if tb.tb_frame.f_code.co_filename == str(path):
                    where = f" (line {tb.tb_lineno})"
                tb = tb.tb_next
            raise VariantError(f"importing {path_text} raised {type(e).__name__}: {e}{where}") from None
    variant = getattr(module, attr, None)
    if not isinstance(variant, Variant):
        found = sorted(n for n, v in vars(module).items() if isinstance(v, Variant))
        have = f"; it defines {', '.join(found)}" if found else "; it defines no Variant"
        raise VariantError(f"{path_text} has no variant {attr}{have}")
    return variant


def resolve(spec: str | Variant, kind: str) -> Variant:
    """A protocol (``kind`` "protocol") or a mutant (``kind`` "mutant"): a Variant, a built-in name,
    or FILE.py:NAME."""
    from .variants import MUTANTS, PROTOCOLS

    if isinstance(spec, Variant):
        variant = spec
    elif is_file_spec(spec):
        variant = load_variant(spec)
    else:
        table = PROTOCOLS if kind == "protocol" else MUTANTS
        found = table.get(spec)
        if found is None:
            raise VariantError(f"unknown {kind} {spec!r}; one of {', '.join(table)}")
        variant = found
    if kind == "protocol" and variant.mutant:
        raise VariantError(f"{variant.name!r} is a mutant (it applies to {', '.join(variant.applies_to)}), "
                           "not a protocol")
    if kind == "mutant" and not variant.mutant:
        raise VariantError(f"{variant.name!r} is a protocol, not a mutant (it has no applies_to)")
    return variant
