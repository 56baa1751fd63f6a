"""Litmus scenarios for ``mmsim explore``: a small initial layout, then two to four threads.

A scenario is a text file (``tests/litmus/*.litmus``)::

    # the seed's race, slow path: a blocking walker sleeps on the old root while the page moves
    name: slow-path-race
    setup:
      p = process
      mmap p 0x100000 1              # ADDR PAGES [r|rw] [missing|wp|missing+wp]
      write p 0x100000 7
      mmap p 0x300000 1 rw missing
    thread mover:
      remap p 0x300000 0x100000 1    # DST SRC PAGES
    thread walker:
      walk p 0x100000 blocking       # trylock | blocking

The setup runs first, alone; the threads then run concurrently, each its operations in order, and
the explorer decides at every preemption point which thread goes on. Operations (``P`` names a
process of the setup, ``ADDR``/``VALUE`` are integers, decimal or 0x-hex):

- ``P = process``; ``C = fork P``; ``exit P``
- ``mmap P ADDR PAGES [r|rw] [missing|wp|missing+wp]``; ``munmap P ADDR PAGES``
- ``register P ADDR PAGES [missing|wp|missing+wp]``; ``unregister P ADDR PAGES``
- ``madvise P ADDR PAGES dontfork|dofork|wipeonfork|keeponfork``
- ``madvise P ADDR PAGES dontneed|pageout|cold``; ``madvise P ADDR PAGES hugepage|nohugepage``
  (a write fault in a 2 MiB-aligned hugepage range then maps a THP by a huge PMD);
  ``mprotect P ADDR PAGES none|r|rw``
- ``mremap P ADDR PAGES NEWADDR [dontunmap]`` (MREMAP_MAYMOVE | MREMAP_FIXED, same size)
- ``write P ADDR VALUE``; ``read P ADDR`` (a missing page of a MISSING range: the access sleeps
  until another thread's ``copy``, ``zeropage`` or ``remap`` fills it, or ``wake`` wakes it)
- ``remap P DST SRC PAGES``; ``walk P ADDR [trylock|blocking]``
- ``reclaim PAGES``: reclaim up to PAGES folios (shrink_lruvec: the active list aged by the
  unlocked rmap walker, the inactive list swapped out)
- ``copy P DST PAGES VALUE``; ``zeropage P DST PAGES``; ``wake P ADDR PAGES`` (UFFDIO_COPY,
  UFFDIO_ZEROPAGE, UFFDIO_WAKE)
- ``pin P ADDR PAGES`` (FOLL_PIN, GUP-fast first: lockless); ``unpin P ID`` (a process's pins are
  numbered from 1 in the order they were taken)

In a thread, ``C = fork P`` names a process the thread's later operations may use.

``known: PROTOCOL KIND...`` (repeatable) documents that under PROTOCOL this scenario is caught by
those detectors on purpose: a finding about the protocol (docs/protocol.md), which the safe
protocols' searches accept and ``mmsim mutate`` does not count as a kill.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from mmsim.v1.operations import BY_LITMUS, require

from ..mm.mm_types import PAGE_SIZE

PROTS = ("r", "rw")
UFFD_MODES = ("missing", "wp", "missing+wp")
ADVICE = ("dontfork", "dofork", "wipeonfork", "keeponfork", "dontneed", "pageout", "cold", "hugepage", "nohugepage")
MPROT = ("none", "r", "rw")
MAX_THREADS = 4


class ScenarioError(ValueError):
    """A scenario that does not parse: ``FILE:LINE: what``."""


@dataclass(frozen=True)
class Op:
    """One operation: ``kind`` and its arguments; ``name`` is what it defines (process, fork)."""

    kind: str
    args: tuple[object, ...]
    name: str | None = None
    line: int = 0

    def __str__(self) -> str:
        def fmt(a: object) -> str:
            return f"{a:#x}" if isinstance(a, int) and a >= 4096 else str(a)

        head = f"{self.name} = " if self.name else ""
        return head + " ".join([self.kind, *map(fmt, self.args)])


@dataclass
class Scenario:
    name: str
    text: str
    about: str = ""
    setup: list[Op] = field(default_factory=list)
    threads: list[tuple[str, list[Op]]] = field(default_factory=list)
    #: protocol -> the detector kinds that catch this scenario on purpose (``known:`` lines).
    known: dict[str, frozenset[str]] = field(default_factory=dict)


def _int(tok: str, where: str) -> int:
    try:
        return int(tok, 0)
    except ValueError:
        raise ScenarioError(f"{where}: expected a number, got {tok!r}") from None


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Proc:
    """An argument naming a process of the scenario (``P``)."""

    def usage(self) -> str:
        return "P"


@dataclass(frozen=True)
class Num:
    """An integer argument, decimal or 0x-hex: page-aligned where it is ``PAGE_SIZE`` or more,
    unless ``any_value``."""

    name: str
    any_value: bool = False

    def usage(self) -> str:
        return self.name


@dataclass(frozen=True)
class Word:
    """A word out of ``choices``; ``default`` where it may be left out (``optional``). A ``skip`` word
    is left out whenever the next word is not one of its choices, which the next argument then takes."""

    choices: tuple[str, ...]
    default: str | None = None
    optional: bool = False
    skip: bool = False

    def usage(self) -> str:
        return f"[{'|'.join(self.choices)}]" if self.optional else "|".join(self.choices)


@dataclass(frozen=True)
class Flag:
    """An optional word: True when it is there."""

    word: str

    def usage(self) -> str:
        return f"[{self.word}]"


Arg = Proc | Num | Word | Flag
P = Proc()

#: The arguments of each operation of the language, by keyword; every keyword is an operation's
#: (mmsim.v1.operations, Operation.litmus), and every operation with a keyword has its arguments here.
SYNTAX: dict[str, tuple[Arg, ...]] = {
    "process": (),
    "fork": (P,),
    "exit": (P,),
    "mmap": (P, Num("ADDR"), Num("PAGES"), Word(PROTS, "rw", optional=True, skip=True),
             Word(UFFD_MODES, None, optional=True)),
    "munmap": (P, Num("ADDR"), Num("PAGES")),
    "register": (P, Num("ADDR"), Num("PAGES"), Word(UFFD_MODES, "missing", optional=True)),
    "unregister": (P, Num("ADDR"), Num("PAGES")),
    "madvise": (P, Num("ADDR"), Num("PAGES"), Word(ADVICE)),
    "mprotect": (P, Num("ADDR"), Num("PAGES"), Word(MPROT)),
    "mremap": (P, Num("ADDR"), Num("PAGES"), Num("NEWADDR"), Flag("dontunmap")),
    "write": (P, Num("ADDR", any_value=True), Num("VALUE", any_value=True)),
    "read": (P, Num("ADDR")),
    "remap": (P, Num("DST"), Num("SRC"), Num("PAGES")),
    "walk": (P, Num("ADDR"), Word(("trylock", "blocking"), "trylock", optional=True)),
    "copy": (P, Num("DST", any_value=True), Num("PAGES", any_value=True), Num("VALUE", any_value=True)),
    "zeropage": (P, Num("DST"), Num("PAGES")),
    "wake": (P, Num("ADDR"), Num("PAGES")),
    "reclaim": (Num("PAGES", any_value=True),),
    "pin": (P, Num("ADDR"), Num("PAGES")),
    "unpin": (P, Num("ID", any_value=True)),
}
require(SYNTAX, BY_LITMUS, "the litmus language (litmus.SYNTAX)")
#: The operations that define a name (``C = fork P``): those whose result is a process.
DEFINES = frozenset(kw for kw, op in BY_LITMUS.items() if op.result_field == "process")


def usage(kind: str) -> str:
    """The arguments of an operation, as written: ``P ADDR PAGES [r|rw] [missing|wp|missing+wp]``
    for ``mmap``."""
    return " ".join(a.usage() for a in SYNTAX[kind])


def _op(line: str, where: str, lineno: int, known: set[str]) -> Op:
    name = None
    if "=" in line:
        left, _, line = line.partition("=")
        name = left.strip()
        if not _NAME.fullmatch(name):
            raise ScenarioError(f"{where}: {name!r} is not a name")
    toks = line.split()
    if not toks:
        raise ScenarioError(f"{where}: an operation is missing")
    kind, rest = toks[0], toks[1:]
    syntax = SYNTAX.get(kind)
    if syntax is None:
        raise ScenarioError(f"{where}: unknown operation {kind!r}")
    lo = sum(1 for a in syntax if isinstance(a, (Proc, Num)) or (isinstance(a, Word) and not a.optional))
    if not lo <= len(rest) <= len(syntax):
        want = str(lo) if lo == len(syntax) else f"{lo} to {len(syntax)}"
        raise ScenarioError(f"{where}: {kind} takes {want} arguments, not {len(rest)}")
    # After a word that may be left out, a word that fits no argument is told by the whole usage.
    told_by_usage = any(isinstance(a, Word) and a.skip for a in syntax)
    args: list[object] = []
    i = 0
    for a in syntax:
        tok = rest[i] if i < len(rest) else None
        if isinstance(a, Proc):
            if tok is None:
                raise ScenarioError(f"{where}: {kind} needs a process")
            if tok not in known:
                raise ScenarioError(f"{where}: no process {tok!r} here")
            args.append(tok)
        elif isinstance(a, Num):
            if tok is None:
                raise ScenarioError(f"{where}: {kind} takes {usage(kind)}")
            args.append(_int(tok, where))
        elif isinstance(a, Flag):
            if tok is not None and tok != a.word:
                raise ScenarioError(f"{where}: {tok!r} is not one of {a.word}")
            args.append(tok is not None)
        elif tok is None or (a.skip and tok not in a.choices):
            args.append(a.default)
            continue
        elif tok not in a.choices:
            if told_by_usage:
                raise ScenarioError(f"{where}: {kind} takes {usage(kind)}, not {tok!r}")
            raise ScenarioError(f"{where}: {tok!r} is not one of {', '.join(a.choices)}")
        else:
            args.append(tok)
        i += 1
    if i < len(rest):
        raise ScenarioError(f"{where}: {kind} takes {usage(kind)}")
    if kind in DEFINES and name is None:
        raise ScenarioError(f"{where}: {kind} needs a name: NAME = {kind} ...")
    if kind not in DEFINES and name is not None:
        raise ScenarioError(f"{where}: {kind} defines nothing")
    for a, v in zip(syntax, args, strict=True):
        if isinstance(a, Num) and not a.any_value and isinstance(v, int) and v % PAGE_SIZE and v >= PAGE_SIZE:
            raise ScenarioError(f"{where}: {v:#x} is not page-aligned")
    return Op(kind, tuple(args), name, lineno)


def parse(text: str, where: str = "<scenario>") -> Scenario:
    """The scenario in ``text`` (``where`` names it in errors), or ScenarioError."""
    scn = Scenario(name=Path(where).stem, text=text)
    section: list[Op] | None = None
    known: set[str] = set()
    thread_known: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].rstrip()
        at = f"{where}:{lineno}"
        if not line.strip():
            continue
        if not line[0].isspace():
            key, sep, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if not sep:
                raise ScenarioError(f"{at}: expected 'name:', 'about:', 'setup:' or 'thread NAME:'")
            if key == "name":
                scn.name = value
                section = None
            elif key == "about":
                scn.about = value
                section = None
            elif key == "known":
                words = value.split()
                if len(words) < 2:
                    raise ScenarioError(f"{at}: known: takes a protocol and the detector kinds it is caught by")
                scn.known[words[0]] = scn.known.get(words[0], frozenset()) | frozenset(words[1:])
                section = None
            elif key == "setup":
                if scn.threads:
                    raise ScenarioError(f"{at}: the setup comes before the threads")
                section = scn.setup
            elif key.startswith("thread "):
                tname = key.split(None, 1)[1].strip()
                if not _NAME.fullmatch(tname) or tname in (t for t, _ in scn.threads):
                    raise ScenarioError(f"{at}: bad or repeated thread name {tname!r}")
                if len(scn.threads) == MAX_THREADS:
                    raise ScenarioError(f"{at}: at most {MAX_THREADS} threads")
                scn.threads.append((tname, []))
                section = scn.threads[-1][1]
                thread_known = set(known)
            else:
                raise ScenarioError(f"{at}: unknown section {key!r}")
            if value and (key == "setup" or key.startswith("thread ")):
                raise ScenarioError(f"{at}: operations go on the lines below {key}:")
            continue
        if section is None:
            raise ScenarioError(f"{at}: an operation outside 'setup:' or a thread")
        in_thread = bool(scn.threads) and section is scn.threads[-1][1]
        op = _op(line.strip(), at, lineno, thread_known if in_thread else known)
        if op.name:
            (thread_known if in_thread else known).add(op.name)
        section.append(op)
    if not 2 <= len(scn.threads) <= MAX_THREADS:
        raise ScenarioError(f"{where}: a scenario has two to {MAX_THREADS} threads, not {len(scn.threads)}")
    if any(not ops for _, ops in scn.threads):
        raise ScenarioError(f"{where}: a thread with no operation")
    return scn


def load(path: str | Path) -> Scenario:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ScenarioError(f"{path}: {e.strerror or e}") from None
    return parse(text, str(path))
