"""A folio's reference count (include/linux/page_ref.h): every change of ``folio->_refcount`` is
an atomic add, and a test of the count is the add's own (the zero test of a put, the inc_not_zero
of a speculative get). A plain read of the count (``folio_ref_count``: reclaim's ``== 2``, a
split's expected count) is a read of the field. Watched, an add is reported as an add
(trace.atomic_add_return): two adds commute unless one's test could come out differently.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .trace import atomic_add_return, atomic_cmpxchg, atomic_inc_not_zero

if TYPE_CHECKING:
    from .kernel import Kernel
    from .mm_types import Folio


def folio_ref_add(k: Kernel, folio: Folio, nr: int) -> None:
    """``folio_ref_add``: ``nr`` more references (the caller holds one already, or the folio is
    not yet visible to anybody else)."""
    atomic_add_return(k, folio, nr)


def folio_ref_sub(k: Kernel, folio: Folio, nr: int) -> None:
    """``folio_ref_sub``: ``nr`` references dropped that are never the last (another is held)."""
    atomic_add_return(k, folio, -nr)


def folio_ref_sub_and_test(k: Kernel, folio: Folio, nr: int) -> bool:
    """``folio_ref_sub_and_test``: ``nr`` references dropped; True if they were the last."""
    return atomic_add_return(k, folio, -nr) == 0


def folio_put_testzero(k: Kernel, folio: Folio) -> bool:
    """``folio_put_testzero``: one reference dropped; True if it was the last."""
    return atomic_add_return(k, folio, -1) == 0


def folio_try_get(k: Kernel, folio: Folio) -> bool:
    """``folio_try_get``: a reference unless the count is zero (the folio is being freed)."""
    return atomic_inc_not_zero(k, folio)


def folio_ref_freeze(k: Kernel, folio: Folio, count: int) -> bool:
    """``folio_ref_freeze``: the count set to zero if it is exactly ``count`` (the references the
    caller accounts for), so that every speculative get (folio_try_get) fails while it stays
    frozen; False if anyone else holds one."""
    return atomic_cmpxchg(k, folio, count, 0)
