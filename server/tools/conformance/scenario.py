"""The conformance scenario format, and what running one step records.

A scenario is a JSON document::

    {
      "name": "basic-move",
      "description": "an exclusive page moves; src reads as not present",
      "processes": ["P"],
      "steps": [
        {"op": "mmap", "proc": "P", "region": "src", "pages": 4},
        {"op": "mmap", "proc": "P", "region": "dst", "pages": 4, "uffd": "wp"},
        {"op": "write", "proc": "P", "at": ["src", 0], "value": 42},
        {"op": "move", "proc": "P", "dst": ["dst", 0], "src": ["src", 0], "pages": 1},
        {"op": "present", "proc": "P", "at": ["src", 0]},
        {"op": "peek", "proc": "P", "at": ["dst", 0]},
        {"op": "mapcount", "proc": "P", "at": ["dst", 0]}
      ]
    }

Processes are named; ``processes`` lists the ones that exist at the start, ``fork`` adds a named
child (which inherits its parent's memory, regions included). Regions are named ranges of pages
created by ``mmap``; the address is chosen by the kernel when the kernel runs the scenario (on a
2 MiB boundary where the step asks for ``"align": "pmd"``), and mmsim maps the region at that
very address (run alone, mmsim chooses it, on a 2 MiB boundary likewise). A place is ``[region, page]`` or
``[region, page, byte_offset]`` (to test misalignment).

Steps (``proc`` names the process doing it):

==================  ===========================================================================
``mmap``            ``region``, ``pages``, ``prot`` ("rw", "r" or "none", default "rw"),
                    ``uffd`` (null, "missing" or "wp": register the new range with the
                    process's userfaultfd), ``align`` (optional, "pmd": the region starts on a
                    2 MiB boundary, so that a huge PMD can map its first 512 pages)
``munmap``          ``at``, ``pages``
``mprotect``        ``at``, ``pages``, ``prot`` ("none", "r" or "rw")
``madvise``         ``at``, ``pages``, ``advice`` (dontfork, dofork, wipeonfork, keeponfork,
                    dontneed, pageout, cold, hugepage, nohugepage). The kernel runner drains
                    every CPU's LRU batches before pageout and cold, and waits for the swap
                    writeback that pageout started to end (see ``pte``)
``mremap``          ``at`` (the old start), ``pages`` (the old length), ``new_pages``, ``flags``
                    (a list of "maymove", "fixed", "dontunmap"; default none), ``to`` (a place:
                    the MREMAP_FIXED target, required with "fixed", allowed only with it),
                    ``region`` (optional: a new region name bound to the address mremap
                    returned, ``new_pages`` long, whether it moved or not). Records ``errno``
                    and, on success, ``relocated`` (true when the range now starts elsewhere
                    than ``at``) and, not compared, ``addr`` (the address mremap returned, for
                    the mmsim runner to place the range there too). The old region name keeps
                    its old address and length.
``uffd_register``   ``at``, ``pages``, ``mode`` ("missing" or "wp")
``uffd_unregister`` ``at``, ``pages``
``write``           ``at``, ``value`` (a 64-bit word written at the start of the page)
``read``            ``at``: a faulting read (faults in the zero page); records ``value``
``peek``            ``at``: a non-faulting read; records ``present`` and, if present, ``value``
``present``         ``at``: records ``present``
``mapcount``        ``at``: records ``present`` and ``mapcount`` (0 for the zero page and the
                    huge zero page)
``pte``             ``at``: what the page table says of the page, without faulting: ``present``,
                    ``swap`` (a swap entry), ``exclusive`` (PM_MMAP_EXCLUSIVE: a present page
                    mapped once; never set for a swap entry), ``uffd_wp``, ``soft_dirty``
                    (pagemap bits 63, 62, 56, 57, 55); for a present page or a swap entry
                    ``swapcache`` (the folio is in the swap cache); for a present page
                    ``pmd`` (mapped by a huge PMD: PAGEMAP_SCAN's PAGE_IS_HUGE), ``thp``
                    (part of a large folio), ``head`` and ``tail`` (the folio's first page,
                    a later one: KPF_COMPOUND_HEAD/TAIL), ``zero_page`` (the zero page or the
                    huge zero page), ``ksm``, ``mapcount`` (0 for either zero page) and, for
                    an anonymous page, ``anon_exclusive`` (PG_anon_exclusive; not for a
                    tail page mapped by a PTE, whose own bit kpageflags does not show)
``move``            ``dst``, ``src`` (places), ``pages`` or ``len`` (bytes), ``mode``: a list of
                    "dontwake", "allow_src_holes", or an integer of raw mode bits; records
                    ``errno`` and ``moved`` (bytes moved before the error, as the SDK reports it)
``copy``            UFFDIO_COPY: ``dst`` (a place), ``pages`` or ``len`` (bytes, at most
                    ``COPY_MAX_PAGES`` pages), ``value`` (every page's first word) or ``values``
                    (one per page; pages past the list get 0), ``mode``: a list of "dontwake",
                    "wp", or an integer of raw mode bits. The source is a private buffer of the
                    process holding, in each page, the page's value as its first 64-bit word
                    and zeros after it. Records ``errno`` and ``copied``
``zeropage``        UFFDIO_ZEROPAGE: ``dst``, ``pages`` or ``len``, ``mode`` (a list of
                    "dontwake", or raw bits); records ``errno`` and ``zeroed``
``wake``            UFFDIO_WAKE: ``at``, ``pages`` or ``len``: wakes the faults waiting on the
                    range; records ``errno``
``fault``           ``at``, ``id`` (a name, unique in the scenario), ``write`` (bool, default
                    false), ``value`` (what a write stores, default 0): a user-mode access of
                    the page's first word in a thread of its own of the process. The step
                    returns once the thread has finished or is asleep waiting for the
                    userfaultfd (so an ``events`` step right after it sees its message);
                    records ``errno`` 0 once the thread started
``fault_status``    ``id`` (a fault started earlier by the same process): records ``blocked``
                    (the thread still waits) and, once finished, for a read ``value`` (what it
                    read). Ask only where the answer is settled: a fault that was woken and
                    whose page is now mapped finishes within the step; one never woken stays
                    blocked
``events``          reads every message queued on the process's userfaultfd (none waits);
                    records ``events``: a list of ``[region, page, kind]``, kind "r" (a read
                    fault), "w" (a write fault) or "wp" (a write-protect fault, with or without
                    the write flag), in the order queued
``fill_vmas``       ``region``, ``leave``: maps a region of ``FILL_VMAS_PAGES`` read-write pages
                    with an unmapped page on each side, then mprotects every other page of it
                    read-only (from its second page on, and its last page where one VMA more is
                    wanted) until the process has vm.max_map_count (65530) less ``leave``
                    VMAs. The two runners start from different counts (the kernel's helper has
                    its interpreter's mappings), so only the region's first page is laid out
                    alike in both; records ``errno``
``pin``             ``at``, ``pages`` (at least 1), ``pin`` (a name, unique in the scenario):
                    pins the pages that ``pages`` pages from ``at`` cover (with a byte
                    offset, one page more), as io_uring's buffer registration does
                    (pin_user_pages with FOLL_PIN, FOLL_WRITE and FOLL_LONGTERM: each page is
                    write-faulted, so a zero page or a page shared after fork is replaced by a
                    copy of the process's own, then pinned). All or nothing: over a hole, a
                    read-only or PROT_NONE page it records EFAULT and holds nothing (the pages
                    before that one stay faulted in). Records ``errno``
``unpin``           ``pin`` (a pin made earlier by the same process): releases it; records
                    ``errno`` (EINVAL where the pin step failed, so that there is nothing to
                    release). A process's pins end when it exits; a ``fork`` child has none
``fork``            ``child``: a new process named so
``exit``            the process exits
==================  ===========================================================================

A scenario may also carry ``"thp": {"enabled": "always"|"madvise"|"never", "use_zero_page":
true|false, "mthp": {"64kB": "always"|"inherit"|"madvise"|"never", ...}}``: the settings of
/sys/kernel/mm/transparent_hugepage/ the kernel runner applies before the scenario and restores
after it (``hugepages-64kB/enabled`` for an ``mthp`` size); mmsim runs the scenario on a server
started with the same settings (``mmsim serve --thp``, ``--mthp-sizes``, ``--thp-zero-page``). A
scenario with such settings, an aligned ``mmap`` or hugepage/nohugepage advice is a large-folio
scenario (``uses_thp``).

Every step records ``errno`` (0 on success). A scenario may mark a step ``"expect": {...}`` with
any of the recorded fields; both runners are then also checked against it. Recording (``mmsim
conformance --record``) leaves out the fields of ``UNRECORDED``, whose answer depends on the
kernel's configuration.

``copied`` and ``zeroed`` follow ``moved``: the length on success; after an error, the bytes
done before it (the ioctl's ``copy``/``zeropage`` field when positive, else 0). The kernel
reports progress followed by an error as that progress with EAGAIN (whatever stopped it), so
``errno`` is then EAGAIN.

Region names in ``events``: an address is named after the region that contains it, the one
bound most recently (by ``mmap`` or ``mremap``) where several do; ``page`` counts from that
region's start. A binding stays when its range is unmapped. An address in no region is
``["?", 0, kind]``.

Pins: a pin is the pinning process's alone, and lasts until its ``unpin`` or the process's
exit. A pinned page is never moved (UFFDIO_MOVE answers EBUSY) and a ``fork`` gives the child a
copy of it instead of sharing it. Pin only pages whose write fault cannot wait for a userfaultfd:
not a missing page of a MISSING-registered range, nor a page write-protected in a WP-registered
one (the step would block, and the kernel runner record ETIMEDOUT and kill the process); the
validator cannot tell this from the steps, so it is the scenario's to avoid. A ``pin`` takes
at least one page: the kernel runner pins through io_uring, which answers EFAULT for an empty
buffer, where mmsim's ``Process.pin`` answers EINVAL (and pin_user_pages pins nothing).

Faults and threads: ``fault`` threads belong to the process that started them. A ``fork`` child
has none of them (only the forking thread exists in a child), so ``fault_status`` in a child may
only name the child's own faults. A ``fault`` must address a mapped page the access is allowed
on (an access the kernel refuses kills the process: later steps of it answer ESRCH). At most
``MAX_PENDING_FAULTS`` faults of one process may be unfinished at a time. ``exit`` (and the end
of the run) ends a process together with its blocked fault threads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PAGE = 4096

OPS = {
    "mmap": {"region", "pages"},
    "munmap": {"at", "pages"},
    "mprotect": {"at", "pages", "prot"},
    "madvise": {"at", "pages", "advice"},
    "mremap": {"at", "pages", "new_pages"},
    "uffd_register": {"at", "pages", "mode"},
    "uffd_unregister": {"at", "pages"},
    "write": {"at", "value"},
    "read": {"at"},
    "peek": {"at"},
    "present": {"at"},
    "mapcount": {"at"},
    "pte": {"at"},
    "move": {"dst", "src"},
    "copy": {"dst"},
    "zeropage": {"dst"},
    "wake": {"at"},
    "fault": {"at", "id"},
    "fault_status": {"id"},
    "events": set(),
    "fork": {"child"},
    "exit": set(),
    "fill_vmas": {"region", "leave"},
    "pin": {"at", "pages", "pin"},
    "unpin": {"pin"},
}
OPTIONAL = {"prot", "uffd", "mode", "len", "expect", "note", "pages"}
#: Fields only some operations take, beyond OPS and OPTIONAL.
OP_OPTIONAL = {
    "mremap": {"flags", "to", "region"},
    "copy": {"value", "values"},
    "fault": {"write", "value"},
    "mmap": {"align"},
}
#: The ops that take a length as ``pages`` or ``len``.
LENGTH_OPS = ("move", "copy", "zeropage", "wake")
#: The madvise advice the random generator draws from (the fork flags).
ADVICE = ("dontfork", "dofork", "wipeonfork", "keeponfork")
#: The advice that reclaims: pageout swaps a page out, cold deactivates it.
RECLAIM_ADVICE = ("pageout", "cold")
#: The advice that asks for large folios (MADV_HUGEPAGE) or refuses them (MADV_NOHUGEPAGE).
THP_ADVICE = ("hugepage", "nohugepage")
#: Every advice a scenario may give.
ALL_ADVICE = (*ADVICE, "dontneed", *RECLAIM_ADVICE, *THP_ADVICE)
#: What ``mmap``'s ``align`` may ask for.
ALIGNS = ("pmd",)
#: The size a huge PMD maps (x86_64, 4 KiB pages).
PMD_SIZE = 2 << 20
#: The keys of a scenario's ``thp`` settings and the values each takes (``mthp`` maps a size such
#: as "64kB" to one of THP_MTHP_VALUES).
THP_ENABLED_VALUES = ("always", "madvise", "never")
THP_MTHP_VALUES = ("always", "inherit", "madvise", "never")
THP_KEYS = ("enabled", "use_zero_page", "mthp")
PROTS = ("none", "r", "rw")
MOVE_MODES = {"dontwake": 1 << 0, "allow_src_holes": 1 << 1}
COPY_MODES = {"dontwake": 1 << 0, "wp": 1 << 1}
ZEROPAGE_MODES = {"dontwake": 1 << 0}
REMAP_FLAGS = {"maymove": 1, "fixed": 2, "dontunmap": 4}
#: The longest copy (its source buffer is set aside before the regions are mapped).
COPY_MAX_PAGES = 64
#: Unfinished faults one process may have at a time (its fault threads are made in advance).
MAX_PENDING_FAULTS = 4
#: The most pages one ``pin`` takes (io_uring registers buffers of up to 1 GiB).
PIN_MAX_PAGES = (1 << 30) // PAGE
#: The VMA count ``fill_vmas`` aims at: vm.max_map_count's default (the kernel runner reads the
#: live sysctl, mmsim's server has this default).
MAX_MAP_COUNT = 65530
#: The pages of a ``fill_vmas`` region: room to split it into MAX_MAP_COUNT VMAs and more.
FILL_VMAS_PAGES = 2 * MAX_MAP_COUNT + 4
#: The fields a step result may carry, in table order.
FIELDS = (
    "errno", "moved", "copied", "zeroed", "relocated", "value", "present", "mapcount", "blocked", "events",
    "swap", "exclusive", "uffd_wp", "soft_dirty", "swapcache", "thp", "zero_page", "ksm", "anon_exclusive",
    "pmd", "head", "tail",
)
#: Fields whose answer depends on the kernel's configuration, not on the scenario: recording
#: leaves them out of ``expect``. pagemap's soft-dirty bit is set for every page of a VMA with
#: VM_SOFTDIRTY, which every new VMA has where the kernel has CONFIG_MEM_SOFT_DIRTY, and never
#: where it lacks it.
UNRECORDED = ("soft_dirty",)


class ScenarioError(ValueError):
    """The scenario document is malformed."""


@dataclass
class Scenario:
    name: str
    steps: list[dict[str, Any]]
    processes: list[str] = field(default_factory=lambda: ["P"])
    description: str = ""
    path: str | None = None
    #: The transparent-hugepage settings the kernel runner applies for the scenario (see the
    #: module's text), or None: the machine's own.
    thp: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, doc: dict[str, Any], path: str | None = None) -> Scenario:
        if not isinstance(doc, dict) or "steps" not in doc:
            raise ScenarioError(f"{path or 'scenario'}: a JSON object with 'steps' is required")
        s = cls(
            name=str(doc.get("name") or (Path(path).stem if path else "scenario")),
            steps=list(doc["steps"]),
            processes=list(doc.get("processes", ["P"])),
            description=str(doc.get("description", "")),
            path=path,
            thp=doc.get("thp"),
        )
        s.validate()
        return s

    @classmethod
    def load(cls, path: str | Path) -> Scenario:
        p = Path(path)
        try:
            doc = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ScenarioError(f"{p}: not valid JSON: {e}") from None
        return cls.from_dict(doc, str(p))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name}
        if self.description:
            d["description"] = self.description
        d["processes"] = self.processes
        if self.thp is not None:
            d["thp"] = self.thp
        d["steps"] = self.steps
        return d

    def validate(self) -> None:
        """Check the shape of every step and that names are used after they exist."""
        procs = set(self.processes)
        regions: set[str] = set()
        faults: dict[str, str] = {}  # fault id -> the process that started it
        pins: dict[str, str] = {}  # pin name -> the process that made it
        unpinned: set[str] = set()
        where = self.path or self.name
        if self.thp is not None:
            _validate_thp(self.thp, where)
        for i, st in enumerate(self.steps):
            op = st.get("op")
            if op not in OPS:
                raise ScenarioError(f"{where}: step {i}: unknown op {op!r}")
            missing = OPS[op] - set(st)
            if op in LENGTH_OPS and "pages" not in st and "len" not in st:
                missing.add("pages")
            if missing:
                raise ScenarioError(f"{where}: step {i} ({op}): missing {sorted(missing)}")
            unknown = set(st) - OPS[op] - OPTIONAL - OP_OPTIONAL.get(op, set()) - {"op", "proc"}
            if unknown:
                raise ScenarioError(f"{where}: step {i} ({op}): unknown fields {sorted(unknown)}")
            proc = st.get("proc", self.processes[0] if self.processes else None)
            if proc not in procs:
                raise ScenarioError(f"{where}: step {i} ({op}): unknown process {proc!r}")
            for key in ("at", "dst", "src", "to"):
                if key in st:
                    place = st[key]
                    if not (isinstance(place, list) and 2 <= len(place) <= 3 and place[0] in regions):
                        raise ScenarioError(f"{where}: step {i} ({op}): {key} must be [region, page(, byte)]")
            bad = _complainer(f"{where}: step {i} ({op})")
            if op in ("mmap", "mprotect") and st.get("prot", "rw") not in PROTS:
                raise bad(f"prot must be one of {PROTS}")
            if op == "mmap":
                if st.get("align", "pmd") not in ALIGNS:
                    raise bad(f"align must be one of {ALIGNS}")
                regions.add(st["region"])
            elif op == "fill_vmas":
                leave = st["leave"]
                if not isinstance(leave, int) or isinstance(leave, bool) or not 0 <= leave < MAX_MAP_COUNT:
                    raise bad(f"leave must be an integer in [0, {MAX_MAP_COUNT})")
                regions.add(st["region"])
            elif op == "fork":
                procs.add(st["child"])
            elif op == "madvise" and st["advice"] not in ALL_ADVICE:
                raise ScenarioError(f"{where}: step {i}: advice must be one of {ALL_ADVICE}")
            elif op == "mremap":
                flags = st.get("flags", [])
                if isinstance(flags, list):
                    if any(f not in REMAP_FLAGS for f in flags):
                        raise bad(f"flags must be a list of {sorted(REMAP_FLAGS)} or an integer")
                    if ("fixed" in flags) != ("to" in st):
                        raise bad("'to' is required with the flag 'fixed', and allowed only with it")
                elif not isinstance(flags, int) or isinstance(flags, bool):
                    raise bad("flags must be a list or an integer")
                if "region" in st:
                    if not isinstance(st["region"], str):
                        raise bad("region must be a name")
                    regions.add(st["region"])
            elif op in ("copy", "zeropage"):
                modes = COPY_MODES if op == "copy" else ZEROPAGE_MODES
                mode = st.get("mode", [])
                if not (isinstance(mode, int) or (isinstance(mode, list) and all(m in modes for m in mode))):
                    raise bad(f"mode must be a list of {sorted(modes)} or an integer")
                if op == "copy":
                    if "value" in st and "values" in st:
                        raise bad("give value or values, not both")
                    if "values" in st and not isinstance(st["values"], list):
                        raise bad("values must be a list")
                    if length(st) > COPY_MAX_PAGES * PAGE:
                        raise bad(f"a copy is at most {COPY_MAX_PAGES} pages")
            elif op == "fault":
                fid = st["id"]
                if not isinstance(fid, str) or fid in faults:
                    raise bad(f"id must be a name not used by another fault ({fid!r})")
                if not isinstance(st.get("write", False), bool):
                    raise bad("write must be true or false")
                faults[fid] = proc
            elif op == "fault_status":
                if faults.get(st["id"]) != proc:
                    raise bad(f"{st['id']!r} is not a fault started earlier by {proc}")
            elif op == "pin":
                name, pages = st["pin"], st["pages"]
                if not isinstance(name, str) or name in pins:
                    raise bad(f"pin must be a name not used by another pin ({name!r})")
                if not isinstance(pages, int) or isinstance(pages, bool) or not 1 <= pages <= PIN_MAX_PAGES:
                    raise bad(f"pages must be an integer in [1, {PIN_MAX_PAGES}]")
                pins[name] = proc
            elif op == "unpin":
                name = st["pin"]
                if not isinstance(name, str) or pins.get(name) != proc:
                    raise bad(f"{name!r} is not a pin made earlier by {proc}")
                if name in unpinned:
                    raise bad(f"{name!r} is unpinned already")
                unpinned.add(name)


def _validate_thp(thp: Any, where: str) -> None:
    """Check a scenario's ``thp`` settings."""
    bad = _complainer(f"{where}: thp")
    if not isinstance(thp, dict):
        raise bad("must be an object")
    unknown = set(thp) - set(THP_KEYS)
    if unknown:
        raise bad(f"unknown keys {sorted(unknown)} (known: {list(THP_KEYS)})")
    if "enabled" in thp and thp["enabled"] not in THP_ENABLED_VALUES:
        raise bad(f"enabled must be one of {THP_ENABLED_VALUES}")
    if "use_zero_page" in thp and not isinstance(thp["use_zero_page"], bool):
        raise bad("use_zero_page must be true or false")
    mthp = thp.get("mthp", {})
    if not isinstance(mthp, dict):
        raise bad("mthp must be an object of sizes")
    for size, value in mthp.items():
        if not mthp_size_ok(size):
            raise bad(f"mthp size {size!r} must be a power of two of kB between 8kB and 2048kB, as '64kB'")
        if value not in THP_MTHP_VALUES:
            raise bad(f"mthp {size} must be one of {THP_MTHP_VALUES}")


def mthp_size_ok(size: Any) -> bool:
    """True for an mTHP size as sysfs names it: "8kB" to "2048kB", a power of two."""
    if not isinstance(size, str) or not size.endswith("kB") or not size[:-2].isdigit():
        return False
    kb = int(size[:-2])
    return 8 <= kb <= PMD_SIZE >> 10 and kb & (kb - 1) == 0 and size == f"{kb}kB"


def thp_steps(scenario: Scenario) -> list[int]:
    """The steps of ``scenario`` that ask for or refuse large folios: an ``mmap`` with ``align``
    and ``madvise`` hugepage or nohugepage."""
    return [
        i for i, st in enumerate(scenario.steps)
        if (st["op"] == "mmap" and "align" in st) or (st["op"] == "madvise" and st.get("advice") in THP_ADVICE)
    ]


def uses_thp(scenario: Scenario) -> bool:
    """True for a large-folio scenario: it has ``thp`` settings, an aligned ``mmap`` or hugepage
    or nohugepage advice."""
    return scenario.thp is not None or bool(thp_steps(scenario))


def reclaims(step: dict[str, Any]) -> bool:
    """True for a ``madvise`` step with pageout or cold advice."""
    return step["op"] == "madvise" and step.get("advice") in RECLAIM_ADVICE


def uses_swap(scenario: Scenario) -> bool:
    """True when ``scenario`` has a swap step: ``madvise`` pageout or cold, or ``pte``."""
    return any(st["op"] == "pte" or reclaims(st) for st in scenario.steps)


def needs_swap(scenario: Scenario) -> bool:
    """True when the kernel needs an active swap device for ``scenario`` (it pages out)."""
    return any(st["op"] == "madvise" and st.get("advice") == "pageout" for st in scenario.steps)


def uses_pin(scenario: Scenario) -> bool:
    """True when ``scenario`` has a ``pin`` step."""
    return any(st["op"] == "pin" for st in scenario.steps)


def _complainer(prefix: str) -> Any:
    return lambda msg: ScenarioError(f"{prefix}: {msg}")


@dataclass
class StepResult:
    """What one step gave. ``None`` means the step does not report that field."""

    errno: int = 0
    moved: int | None = None
    value: int | None = None
    present: bool | None = None
    mapcount: int | None = None
    copied: int | None = None  # copy: bytes copied before the error
    zeroed: int | None = None  # zeropage: bytes zeroed before the error
    relocated: bool | None = None  # mremap: the range starts elsewhere now
    blocked: bool | None = None  # fault_status: the fault still waits
    events: list[list[Any]] | None = None  # events: [region, page, kind] per message
    # pte: the page table entry (pagemap) and the page's flags (kpageflags)
    swap: bool | None = None
    exclusive: bool | None = None
    uffd_wp: bool | None = None
    soft_dirty: bool | None = None
    swapcache: bool | None = None
    thp: bool | None = None
    zero_page: bool | None = None
    ksm: bool | None = None
    anon_exclusive: bool | None = None
    pmd: bool | None = None  # mapped by a huge PMD
    head: bool | None = None  # the first page of a large folio
    tail: bool | None = None  # a later page of a large folio
    addr: int | None = None  # mmap, mremap: where the region was placed (not compared)
    #: mmap: the PROT_NONE guard page the kernel runner keeps right above the regions (not
    #: compared): the mmsim runner maps it too, so that growing a region in place meets it.
    guard: int | None = None
    note: str = ""  # e.g. why a step could not run (not compared)
    #: Why the kernel's answer here cannot be trusted, e.g. a huge page fault that fell back to
    #: small pages for want of memory (not compared; a run with one is not recorded).
    unreliable: str = ""

    def compared(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: d[k] for k in FIELDS if d[k] is not None}


def _bits(value: Any, names: dict[str, int], what: str) -> int:
    if isinstance(value, int):
        return value
    bits = 0
    for m in value:
        if m not in names:
            raise ScenarioError(f"unknown {what} {m!r}")
        bits |= names[m]
    return bits


def move_mode(step: dict[str, Any]) -> int:
    return _bits(step.get("mode", []), MOVE_MODES, "move mode")


def copy_mode(step: dict[str, Any]) -> int:
    """The mode bits of a ``copy`` (UFFDIO_COPY_MODE_*) or ``zeropage`` step."""
    names = COPY_MODES if step["op"] == "copy" else ZEROPAGE_MODES
    return _bits(step.get("mode", []), names, f"{step['op']} mode")


def remap_flags(step: dict[str, Any]) -> int:
    """The MREMAP_* bits of a ``mremap`` step."""
    return _bits(step.get("flags", []), REMAP_FLAGS, "mremap flag")


def length(step: dict[str, Any]) -> int:
    """The length in bytes of a step that takes ``pages`` or ``len``."""
    return int(step["len"]) if "len" in step else int(step["pages"]) * PAGE


move_len = length


def copy_values(step: dict[str, Any]) -> list[int]:
    """The first word of each source page of a ``copy`` (as many as the length touches)."""
    n = min(-(-max(length(step), 0) // PAGE), COPY_MAX_PAGES)
    if "values" in step:
        vals = [int(v) for v in step["values"]][:n]
        return vals + [0] * (n - len(vals))
    return [int(step.get("value", 0))] * n


def region_at(regions: dict[str, tuple[int, int]], addr: int) -> tuple[str, int] | None:
    """``(region, page)`` of an address: the region bound most recently (last in ``regions``,
    name -> (start, pages)) of those that contain it."""
    for name, (start, pages) in reversed(list(regions.items())):
        if start <= addr < start + pages * PAGE:
            return name, (addr - start) // PAGE
    return None


def event_entry(regions: dict[str, tuple[int, int]], addr: int, kind: str) -> list[Any]:
    """An ``events`` entry: ``[region, page, kind]`` of a fault at ``addr`` (``["?", 0, kind]``
    when no region holds it)."""
    where = region_at(regions, addr)
    return [where[0], where[1], kind] if where else ["?", 0, kind]


def place(addrs: dict[str, int], ref: list[Any]) -> int:
    """The address of ``[region, page(, byte)]``."""
    return addrs[ref[0]] + int(ref[1]) * PAGE + (int(ref[2]) if len(ref) > 2 else 0)
