"""Result types of the SDK: plain frozen dataclasses, and their conversion from protobuf."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields

from mmsim.v1 import mmsim_pb2 as pb

PROT_TO_PB: Mapping[str, pb.Prot] = {"r": pb.PROT_R, "rw": pb.PROT_RW, "none": pb.PROT_NONE}
PROT_FROM_PB: Mapping[int, str] = {v: k for k, v in PROT_TO_PB.items()}
UFFD_TO_PB: Mapping[str | None, pb.UffdMode] = {
    None: pb.UFFD_MODE_NONE,
    "missing": pb.UFFD_MODE_MISSING,
    "wp": pb.UFFD_MODE_WP,
    "missing+wp": pb.UFFD_MODE_MISSING_WP,
}
UFFD_FROM_PB: Mapping[int, str | None] = {v: k for k, v in UFFD_TO_PB.items()}
ADVICE_TO_PB: Mapping[str, pb.Advice] = {
    "dontfork": pb.ADVICE_DONTFORK,
    "dofork": pb.ADVICE_DOFORK,
    "wipeonfork": pb.ADVICE_WIPEONFORK,
    "keeponfork": pb.ADVICE_KEEPONFORK,
    "dontneed": pb.ADVICE_DONTNEED,
    "cold": pb.ADVICE_COLD,
    "pageout": pb.ADVICE_PAGEOUT,
    "hugepage": pb.ADVICE_HUGEPAGE,
    "nohugepage": pb.ADVICE_NOHUGEPAGE,
}


def _hex(value: object) -> str:
    """An address or page offset as the kernel and the error messages print it: ``0x7f...``."""
    return hex(value) if isinstance(value, int) and not isinstance(value, bool) else repr(value)


def _hex_pairs(pairs: Iterable[object]) -> str:
    """``[(who, 0xaddr), ...]``: the first element as is (a process), the address in hex."""
    shown = []
    for pair in pairs:
        if isinstance(pair, tuple) and len(pair) == 2:
            shown.append(f"({pair[0]!r}, {_hex(pair[1])})")
        else:
            shown.append(repr(pair))
    return "[" + ", ".join(shown) + "]"


def _repr_in_hex(*hex_fields: str, pairs: tuple[str, ...] = ()) -> Callable[[object], str]:
    """A dataclass ``__repr__`` like the generated one, with ``hex_fields`` in hex and the
    addresses of the ``(who, addr)`` lists named by ``pairs`` in hex; the rest unchanged.

    Assigned in the class body, where ``@dataclass`` leaves it in place (it only adds a ``__repr__``
    a class does not define); equality and the fields are the generated ones.
    """

    def __repr__(self: object) -> str:
        shown = []
        for f in fields(self):  # type: ignore[arg-type]
            if not f.repr:
                continue
            value = getattr(self, f.name)
            if f.name in hex_fields:
                text = _hex(value)
            elif f.name in pairs:
                text = _hex_pairs(value)
            else:
                text = repr(value)
            shown.append(f"{f.name}={text}")
        return f"{type(self).__qualname__}({', '.join(shown)})"

    return __repr__


@dataclass(frozen=True)
class Vma:
    """A mapping of a process (for ``mmap``: the range just mapped)."""

    start: int
    end: int
    prot: str
    """``"none"``, ``"r"`` or ``"rw"``."""
    uffd: str | None
    """``None``, ``"missing"``, ``"wp"`` or ``"missing+wp"``."""
    dontfork: bool
    wipeonfork: bool
    pgoff: int
    anon_vma: int | None
    """Id of the VMA's anon_vma; ``None`` before the first fault."""

    __repr__ = _repr_in_hex("start", "end", "pgoff")


@dataclass(frozen=True)
class UserfaultEvent:
    """A page fault queued on a process's userfaultfd (see ``Process.userfaults``)."""

    addr: int
    """The faulting address, page-aligned."""
    write: bool
    """A write fault."""
    wp: bool
    """A write-protect fault."""

    __repr__ = _repr_in_hex("addr")


@dataclass(frozen=True)
class Userfaults:
    """What waits on a process's userfaultfd (see ``Process.list_userfaults``)."""

    queued: tuple[UserfaultEvent, ...]
    """Events queued and not yet delivered, in order."""
    waiting: tuple[UserfaultEvent, ...]
    """The faults asleep now, oldest first."""


@dataclass(frozen=True)
class FolioInfo:
    """The page mapped at an address (see ``Process.folio``)."""

    zero_page: bool
    value: int
    mapcount: int
    """The page's own mapcount (what /proc/kpagecount says of it)."""
    exclusive: bool
    index: int
    anon_vma: int | None
    writable: bool
    young: bool
    order: int = 0
    """The order of the folio the page belongs to: 0 for a small folio, 9 for a PMD-size THP
    (2 MiB), 2 to 8 for an mTHP (0 from a server without large folios)."""
    pmd: bool = False
    """Mapped here by a huge PMD rather than by a PTE."""
    pinned: bool = False
    """folio_maybe_dma_pinned: a pin holds the folio (see ``Process.pin``)."""

    __repr__ = _repr_in_hex("index")


@dataclass(frozen=True)
class ThpSettings:
    """The transparent hugepage settings a server runs with (see ``Client.thp``), as
    /sys/kernel/mm/transparent_hugepage/ shows them."""

    enabled: str
    """``"always"``, ``"madvise"`` or ``"never"``."""
    use_zero_page: bool
    """A read fault of a range that may have a huge page maps the huge zero page."""
    sizes: dict[str, str]
    """Every large folio size the server has, named as sysfs names it (``"64kB"``, ``"2048kB"``),
    with its policy: ``"always"``, ``"inherit"`` (as ``enabled``), ``"madvise"`` or ``"never"``."""

    def policy(self, size: str) -> str:
        """The policy of ``size`` (a sysfs name); ``"never"`` for a size the server does not have."""
        return self.sizes.get(size, "never")


@dataclass(frozen=True)
class PagemapEntry:
    """One page, without faulting (see ``Process.pagemap``): what /proc/PID/pagemap says of it
    (``present``, ``swap``, ``exclusive``: PM_MMAP_EXCLUSIVE, a present page mapped once;
    ``uffd_wp``, ``soft_dirty``), what mincore adds for a swap entry (``swapcache``), and what
    /proc/kpageflags and /proc/kpagecount say of a present page (``swapcache``, ``pmd``, ``thp``,
    ``head``, ``tail``, ``zero_page``, ``ksm``, ``anon_exclusive``: PG_anon_exclusive, and
    ``mapcount``, 0 for the zero page). ``PagemapEntry()``: no page there. Its repr shows the
    fields that are set."""

    present: bool = False
    swap: bool = False
    exclusive: bool = False
    uffd_wp: bool = False
    soft_dirty: bool = False
    swapcache: bool = False
    pmd: bool = False
    thp: bool = False
    head: bool = False
    tail: bool = False
    zero_page: bool = False
    ksm: bool = False
    anon_exclusive: bool = False
    mapcount: int = 0

    def __repr__(self) -> str:
        shown = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if getattr(self, f.name) != f.default]
        return f"{type(self).__qualname__}({', '.join(shown)})"


@dataclass(frozen=True)
class WalkResult:
    """The outcome of an rmap walk (``folio_referenced``) of one folio."""

    referenced: int
    """Number of mappings that referenced the folio; -1 when the trylock walk was contended."""
    contended: bool
    mappings: list[tuple[int, int]]
    """``(pid, addr)`` of each mapping found (``Process.pid`` names a process; it gives no access)."""
    fast_retries: int
    slow_retries: int

    __repr__ = _repr_in_hex(pairs=("mappings",))

    @property
    def retries(self) -> int:
        return self.fast_retries + self.slow_retries


@dataclass(frozen=True)
class AnonVma:
    """One anon_vma of a tree (see ``Process.anon_vma_tree``)."""

    id: int
    root: int
    parent: int
    refcount: int
    num_children: int
    num_active_vmas: int
    vmas: list[tuple[int, int]]
    """``(pid, vma start)`` of each VMA in the anon_vma's interval tree."""

    __repr__ = _repr_in_hex(pairs=("vmas",))


def vma_from_pb(m: pb.Vma) -> Vma:
    return Vma(
        start=m.start,
        end=m.end,
        prot=PROT_FROM_PB.get(m.prot, "?"),
        uffd=UFFD_FROM_PB.get(m.uffd),
        dontfork=m.dontfork,
        wipeonfork=m.wipeonfork,
        pgoff=m.pgoff,
        anon_vma=m.anon_vma or None,
    )


def folio_from_pb(m: pb.FolioResponse) -> FolioInfo | None:
    if not m.present:
        return None
    return FolioInfo(
        zero_page=m.zero_page,
        value=m.value,
        mapcount=m.mapcount,
        exclusive=m.exclusive,
        index=m.index,
        anon_vma=m.anon_vma or None,
        writable=m.writable,
        young=m.young,
        order=m.order,
        pmd=m.pmd,
        pinned=m.pinned,
    )


def thp_from_pb(m: pb.StatsResponse) -> ThpSettings | None:
    """The server's THP settings from its GetStats reply; None from a server that has none."""
    if not m.HasField("thp"):
        return None
    sizes = dict(sorted(m.thp.sizes.items(), key=lambda kv: (len(kv[0]), kv[0])))  # "16kB" ... "2048kB"
    return ThpSettings(enabled=m.thp.enabled, use_zero_page=m.thp.use_zero_page, sizes=sizes)


#: The fields of a pagemap entry, in the proto's order (the SDK's PagemapEntry has the same).
_PAGEMAP_FIELDS = tuple(f.name for f in pb.PagemapEntry.DESCRIPTOR.fields)


def pagemap_from_pb(m: pb.PagemapEntry) -> PagemapEntry:
    return PagemapEntry(**{name: getattr(m, name) for name in _PAGEMAP_FIELDS})


def walk_from_pb(m: pb.WalkResponse) -> WalkResult:
    return WalkResult(
        referenced=m.referenced,
        contended=m.contended,
        mappings=[(x.pid, x.addr) for x in m.mappings],
        fast_retries=m.fast_retries,
        slow_retries=m.slow_retries,
    )


def anon_vma_from_pb(m: pb.AnonVma) -> AnonVma:
    return AnonVma(
        id=m.id,
        root=m.root,
        parent=m.parent,
        refcount=m.refcount,
        num_children=m.num_children,
        num_active_vmas=m.num_active_vmas,
        vmas=[(x.pid, x.addr) for x in m.vmas],
    )


__all__ = ["AnonVma", "FolioInfo", "PagemapEntry", "ThpSettings", "Vma", "WalkResult"]


def userfault_from_pb(m: pb.UserfaultEvent) -> UserfaultEvent:
    return UserfaultEvent(addr=m.addr, write=m.write, wp=m.wp)
