"""Transparent hugepage settings as ``mmsim serve --mthp-sizes`` writes them and as sysfs names them.

``--mthp-sizes`` is a comma-separated list of sizes, each ``SIZE`` or ``SIZE:POLICY`` (``2M``,
``64K:always``): a bare size follows ``--thp`` (``inherit``), a size not listed is ``never``. The
model takes the same as ``thp_orders``, order -> policy; GetStats reports every size by its sysfs
name (``hugepages-64kB``: ``"64kB"``).
"""

from __future__ import annotations

from collections.abc import Mapping

from .mm.kernel import THP_ORDER_POLICIES, THP_POLICIES, thp_size_order
from .mm.mm_types import HPAGE_PMD_ORDER, PAGE_SHIFT

#: The large folio orders the model has: 16 KiB (order 2) up to the PMD size, 2 MiB (order 9).
THP_ORDERS = tuple(range(2, HPAGE_PMD_ORDER + 1))
#: ``--mthp-sizes`` when not given: the PMD size alone, following ``--thp``.
DEFAULT_MTHP_SIZES = "2M"


def sysfs_size(order: int) -> str:
    """The size of a folio of ``order`` as sysfs names its directory: ``"64kB"``, ``"2048kB"``."""
    return f"{(1 << (order + PAGE_SHIFT)) >> 10}kB"


def short_size(order: int) -> str:
    """The size of a folio of ``order`` as ``--mthp-sizes`` writes it: ``"64K"``, ``"2M"``."""
    nbytes = 1 << (order + PAGE_SHIFT)
    return f"{nbytes >> 20}M" if nbytes >= 1 << 20 else f"{nbytes >> 10}K"


def parse_mthp_sizes(spec: str) -> dict[int, str]:
    """The order -> policy map that ``--mthp-sizes SPEC`` gives (empty: no large folio size).
    ValueError, saying what is wrong, for a bad size or policy or a size given twice."""
    orders: dict[int, str] = {}
    if not spec.strip():
        return orders
    for item in spec.split(","):
        size, sep, policy = item.strip().partition(":")
        policy = policy.strip() if sep else "inherit"
        if not size.strip():
            raise ValueError(f"expected SIZE or SIZE:POLICY, got {item.strip()!r}")
        order = thp_size_order(size)
        if policy not in THP_ORDER_POLICIES:
            raise ValueError(f"{size.strip()}: the policy must be one of {', '.join(THP_ORDER_POLICIES)}, "
                             f"not {policy!r}")
        if order in orders:
            raise ValueError(f"{short_size(order)} is given twice")
        orders[order] = policy
    return orders


def format_mthp_sizes(orders: Mapping[int, str]) -> str:
    """``orders`` written as ``--mthp-sizes`` reads it back, one way only: by size, a bare size for
    ``inherit``, sizes that are ``never`` left out."""
    return ",".join(
        short_size(order) if policy == "inherit" else f"{short_size(order)}:{policy}"
        for order, policy in sorted(orders.items())
        if policy != "never"
    )


def size_policies(orders: Mapping[int, str]) -> dict[str, str]:
    """Every size the model has, by its sysfs name, with its policy in ``orders`` (``never`` when
    it is not there), smallest first."""
    return {sysfs_size(order): orders.get(order, "never") for order in THP_ORDERS}


__all__ = [
    "DEFAULT_MTHP_SIZES",
    "THP_ORDERS",
    "THP_POLICIES",
    "format_mthp_sizes",
    "parse_mthp_sizes",
    "short_size",
    "size_policies",
    "sysfs_size",
]
