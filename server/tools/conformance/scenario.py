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
created by ``mmap``; the address is chosen by the kernel when the kernel runs the scenario, and
mmsim maps the region at that very address. A place is ``[region, page]`` or
``[region, page, byte_offset]`` (to test misalignment).

Steps (``proc`` names the process doing it):

==================  ===========================================================================
``mmap``            ``region``, ``pages``, ``prot`` ("rw" or "r", default "rw"), ``uffd``
                    (null, "missing" or "wp": register the new range with the process's
                    userfaultfd)
``munmap``          ``at``, ``pages``
``madvise``         ``at``, ``pages``, ``advice`` (dontfork, dofork, wipeonfork, keeponfork)
``uffd_register``   ``at``, ``pages``, ``mode`` ("missing" or "wp")
``uffd_unregister`` ``at``, ``pages``
``write``           ``at``, ``value`` (a 64-bit word written at the start of the page)
``read``            ``at``: a faulting read (faults in the zero page); records ``value``
``peek``            ``at``: a non-faulting read; records ``present`` and, if present, ``value``
``present``         ``at``: records ``present``
``mapcount``        ``at``: records ``present`` and ``mapcount`` (0 for the zero page)
``move``            ``dst``, ``src`` (places), ``pages`` or ``len`` (bytes), ``mode``: a list of
                    "dontwake", "allow_src_holes", or an integer of raw mode bits; records
                    ``errno`` and ``moved`` (bytes moved before the error, as the SDK reports it)
``fork``            ``child``: a new process named so
``exit``            the process exits
==================  ===========================================================================

Every step records ``errno`` (0 on success). A scenario may mark a step ``"expect": {...}`` with
any of the recorded fields; both runners are then also checked against it.
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
    "madvise": {"at", "pages", "advice"},
    "uffd_register": {"at", "pages", "mode"},
    "uffd_unregister": {"at", "pages"},
    "write": {"at", "value"},
    "read": {"at"},
    "peek": {"at"},
    "present": {"at"},
    "mapcount": {"at"},
    "move": {"dst", "src"},
    "fork": {"child"},
    "exit": set(),
}
OPTIONAL = {"prot", "uffd", "mode", "len", "expect", "note", "pages"}
ADVICE = ("dontfork", "dofork", "wipeonfork", "keeponfork")
MOVE_MODES = {"dontwake": 1 << 0, "allow_src_holes": 1 << 1}
#: The fields a step result may carry, in table order.
FIELDS = ("errno", "moved", "value", "present", "mapcount")


class ScenarioError(ValueError):
    """The scenario document is malformed."""


@dataclass
class Scenario:
    name: str
    steps: list[dict[str, Any]]
    processes: list[str] = field(default_factory=lambda: ["P"])
    description: str = ""
    path: str | None = None

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
        d["steps"] = self.steps
        return d

    def validate(self) -> None:
        """Check the shape of every step and that names are used after they exist."""
        procs = set(self.processes)
        regions: set[str] = set()
        where = self.path or self.name
        for i, st in enumerate(self.steps):
            op = st.get("op")
            if op not in OPS:
                raise ScenarioError(f"{where}: step {i}: unknown op {op!r}")
            missing = OPS[op] - set(st)
            if op == "move" and "pages" not in st and "len" not in st:
                missing.add("pages")
            if missing:
                raise ScenarioError(f"{where}: step {i} ({op}): missing {sorted(missing)}")
            unknown = set(st) - OPS[op] - OPTIONAL - {"op", "proc"}
            if unknown:
                raise ScenarioError(f"{where}: step {i} ({op}): unknown fields {sorted(unknown)}")
            proc = st.get("proc", self.processes[0] if self.processes else None)
            if proc not in procs:
                raise ScenarioError(f"{where}: step {i} ({op}): unknown process {proc!r}")
            for key in ("at", "dst", "src"):
                if key in st:
                    place = st[key]
                    if not (isinstance(place, list) and 2 <= len(place) <= 3 and place[0] in regions):
                        raise ScenarioError(f"{where}: step {i} ({op}): {key} must be [region, page(, byte)]")
            if op == "mmap":
                regions.add(st["region"])
            elif op == "fork":
                procs.add(st["child"])
            elif op == "madvise" and st["advice"] not in ADVICE:
                raise ScenarioError(f"{where}: step {i}: advice must be one of {ADVICE}")


@dataclass
class StepResult:
    """What one step gave. ``None`` means the step does not report that field."""

    errno: int = 0
    moved: int | None = None
    value: int | None = None
    present: bool | None = None
    mapcount: int | None = None
    addr: int | None = None  # mmap: where the region was placed (not compared)
    note: str = ""  # e.g. why a step could not run (not compared)

    def compared(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: d[k] for k in FIELDS if d[k] is not None}


def move_mode(step: dict[str, Any]) -> int:
    mode = step.get("mode", [])
    if isinstance(mode, int):
        return mode
    bits = 0
    for m in mode:
        if m not in MOVE_MODES:
            raise ScenarioError(f"unknown move mode {m!r}")
        bits |= MOVE_MODES[m]
    return bits


def move_len(step: dict[str, Any]) -> int:
    return int(step["len"]) if "len" in step else int(step["pages"]) * PAGE


def place(addrs: dict[str, int], ref: list[Any]) -> int:
    """The address of ``[region, page(, byte)]``."""
    return addrs[ref[0]] + int(ref[1]) * PAGE + (int(ref[2]) if len(ref) > 2 else 0)
