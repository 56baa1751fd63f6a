"""The kernel oracle: run a conformance scenario on the live Linux kernel.

Every named process of a scenario is a real OS process, a *helper*, that performs the steps on
its own address space (mmap, munmap, madvise, userfaultfd, faulting accesses, UFFDIO_MOVE) and
reports what the kernel said. ``KernelRunner.run`` drives the helpers one step at a time and
returns one :class:`StepResult` per step.

Process tree and channels
-------------------------
``run`` starts one *anchor* (``python -m mmsim.server.tools.conformance.kernel --helper SPEC``) in a new
session. The anchor makes itself a child subreaper, ignores SIGCHLD (so every descendant that
exits is reaped at once, also orphans: this machine's init does not reap) and forks one helper
per scenario root process. Each helper talks to the runner over its own ``AF_UNIX``
``SOCK_SEQPACKET`` socket pair, one JSON message per command and per reply. A ``fork`` step makes
the parent's helper create a new socket pair and ``os.fork()``; the child keeps one end and
serves on it, the parent passes the other end to the runner with ``SCM_RIGHTS`` in its reply, once
the child has sent it word on that pair that it has closed what it inherited of the parent's alone
(its userfaultfd, the rings of its pins) and made its fault threads.

Cleanup
-------
A step that does not answer within ``step_timeout`` gets its helper killed (SIGKILL). When
``run`` ends, however it ends, the runner kills every helper it knows, waits until they are gone,
then closes the anchor's stdin; the anchor then kills whatever is still left in its process
group (e.g. a child whose fork reply never arrived), waits until it is gone and exits. Helpers
also exit when their channel reaches EOF, and the anchor when its stdin does, so a runner that
dies leaves nothing behind either.

How steps touch memory
----------------------
``write`` uses ``process_vm_writev`` on the helper's own pid (a GUP write fault, so the same
COW/reuse as a store, but EFAULT instead of SIGSEGV on a read-only page). ``read`` of a page that
is not present and not swapped out uses ``process_vm_readv`` (faults the zero page in). The value
of a page that *is* present (``read``, ``peek``), and the ``read`` of a swapped-out one (a swap-in
fault), are taken with a plain user-mode load: ``process_vm_readv`` pins (FOLL_PIN), and a pinning
read of a page shared after fork unshares it (copies it), which would change the mapcount being
observed. The userfaultfd is opened without ``UFFD_USER_MODE_ONLY``
(allowed for root; that flag is only the fallback), because with it the kernel-mode faults of
``process_vm_readv/writev`` on a missing page of a MISSING-registered range fail with EFAULT at
once, where the user-mode access they stand for blocks.

A present page the process may not read (PROT_NONE) is peeked through ``/proc/self/mem`` (a
forced access, not a pinning one); a ``read`` of it answers EFAULT, as the load would fault.
``mremap`` is the raw system call (libc's wrapper is variadic).

Swap: pageout, cold and the ``pte`` observation
-----------------------------------------------
``pte`` reads the page's ``/proc/self/pagemap`` entry (present, swap, PM_MMAP_EXCLUSIVE, uffd-wp
and soft-dirty bits) and, for a present page, ``/proc/kpageflags`` and ``/proc/kpagecount`` at its
PFN; ``anon_exclusive`` is the kpageflags bit KPF_OWNER_2 (34), the folio's PG_owner_2, which is
PG_anon_exclusive on an anonymous folio (exact for the small folios the scenarios make). For a
swap entry ``swapcache`` comes from ``mincore(2)``, which reports a swapped-out page resident
while its folio is in the swap cache. Before ``madvise`` pageout or cold the helper drains every
CPU's LRU batches with an empty ``move_pages(2)`` of itself (the kernel's ``lru_add_drain_all``):
a folio faulted on another CPU may still sit in that CPU's batch, off the LRU, where pageout
skips it. After a pageout it waits (up to ``_WRITEBACK_WAIT_S``) until none of the pages the
range had present is under writeback any more, polling KPF_WRITEBACK at the PFNs it read from
pagemap before the madvise (``sync`` does not cover swap, and a swap entry has no PFN); a written
folio stays in the swap cache, clean, until reclaim frees it, so what later steps see is
settled. ``swap_unavailable`` says why this cannot run (no oracle, no active swap, zram or
zswap, whose synchronous writes free the page at once).

Large folios
------------
``"align": "pmd"`` maps the region's length plus 2 MiB and unmaps the slack on both sides of
the 2 MiB boundary inside it. ``pte`` adds, for a present page, ``pmd`` from the PAGEMAP_SCAN
ioctl (PAGE_IS_HUGE over that one page) and ``head``/``tail`` from kpageflags; ``zero_page``
covers the huge zero page (KPF_ZERO_PAGE). A large-folio scenario (``uses_thp``) runs under its
THP settings (``thp_settings``: written to /sys/kernel/mm/transparent_hugepage/ under a lock,
journalled, restored after) with khugepaged kept asleep and held back, and every step is checked against the
counters that say its answer cannot be trusted (``thp_counters``): a step during which a huge
page fault fell back to small pages, khugepaged collapsed pages, a large folio was swapped out
whole or a huge page was split behind the scenario's back (the shrinker's splitting of underused
THPs is off while it runs) is marked ``unreliable``. ``thp_unavailable`` says why such scenarios cannot run.

Not disturbing the address space
--------------------------------
Helpers run with ``PYTHONMALLOC=malloc`` and ``MALLOC_ARENA_MAX=1`` (small allocations come from
the brk heap, not from mmap'd arenas, in every thread), import everything before touching
memory, make what later steps need (below), learn the zero page's PFN with a scratch mapping
that is unmapped again, fill the holes between the interpreter's mappings with PROT_NONE
placeholders and then map a PROT_NONE guard with ``mmap(NULL)`` that starts on a 2 MiB (PMD)
boundary. Regions, placed top-down by ``mmap(NULL)``, therefore start right below the guard,
never merge with the interpreter's own mappings, and share no PMD with anything the helper
touched (a PMD that has a page table changes what a fault or a move does there).

Made at setup, above the guard: the source of ``copy`` steps, ``COPY_MAX_PAGES`` of PROT_NONE
that a copy maps read-write (MAP_FIXED) over the pages it needs, fills with each page's value and
maps PROT_NONE again afterwards; and, only in a scenario that has ``fault`` steps, the fault
threads (below) with a spare PROT_NONE area.

Pins
----
A ``pin`` step pins the range the way io_uring's buffer registration does, with the raw system
calls (no liburing): ``io_uring_setup`` of a ring of its own (one entry; its rings are never
mapped, so the address space does not change) and ``io_uring_register(IORING_REGISTER_BUFFERS)``
of one iovec over the range, which takes pin_user_pages(FOLL_WRITE | FOLL_LONGTERM) of every
page, all or nothing (a failed registration unpins what it had pinned, and the step records its
errno). Root has CAP_IPC_LOCK, so RLIMIT_MEMLOCK does not limit it. The helper that made the pin
owns the ring; ``unpin`` is ``IORING_UNREGISTER_BUFFERS`` (which unpins the pages before it
returns) and the ring's ``close``. A fork child closes every ring it inherited at once, before
the ``fork`` step answers (the pins are its parent's alone); an exiting helper's rings go with
its files (the kernel frees them, and unpins their pages, a little later, in a worker: nothing a
later step can see, since the pages were the exiting process's alone). ``pin_unavailable`` says
why pins cannot be made (no oracle, io_uring disabled by ``kernel.io_uring_disabled`` or absent).

Fault threads and events
------------------------
A ``fault`` step hands a user-mode access to one of ``MAX_PENDING_FAULTS`` threads the helper
made at setup (256 KiB stacks). The access is a call of libc's ``memmove`` through ctypes, so the
thread holds no GIL while the kernel keeps it waiting and the helper's main thread goes on
serving steps. The step answers once the thread has finished or sleeps in the kernel with the
userfaultfd's fault handler in its ``wchan`` (its message is queued by then, so an ``events``
step right after it reads it). ``fault_status`` answers ``blocked: false`` once the thread has
finished, ``blocked: true`` once it has been seen asleep there for 50 ms in a row (a thread just
woken is runnable, not asleep) or after the step's wait bound (half the step timeout, at most
2.5 s). A thread is reused once its access has finished. ``events`` reads the userfaultfd
without blocking; the runner names each address after the scenario's regions.

A forked child has only the thread that forked: the parent's faults do not exist there. The
child makes fault threads of its own at once; their stacks come from libc's cache of the
parent's thread stacks (no new mapping), and the small frame stacks the interpreter maps for
them go into the spare area, which the child unmaps first and plugs again after, so nothing
lands below the guard. ``exit`` (``_exit``) and SIGKILL end a helper together with its waiting
threads; a fault the kernel refuses (SIGSEGV) ends the helper, and its steps then answer ESRCH.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import itertools
import json
import os
import platform
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from .scenario import (
    COPY_MAX_PAGES,
    FILL_VMAS_PAGES,
    MAX_PENDING_FAULTS,
    PAGE,
    PMD_SIZE,
    Scenario,
    StepResult,
    copy_mode,
    copy_values,
    event_entry,
    length,
    move_len,
    move_mode,
    place,
    remap_flags,
    uses_thp,
)

# ---------------------------------------------------------------------------------------------
# uAPI constants (the installed headers predate some of them)

_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}
_O_CLOEXEC = 0o2000000
_O_NONBLOCK = 0o4000
_UFFD_USER_MODE_ONLY = 1

_PROT_NONE, _PROT_READ, _PROT_WRITE = 0, 1, 2
_MAP_PRIVATE, _MAP_ANONYMOUS, _MAP_NORESERVE = 0x02, 0x20, 0x4000
_MAP_FIXED, _MAP_FIXED_NOREPLACE = 0x10, 0x100000
_MAP_FAILED = ctypes.c_void_p(-1).value
_PLUG_FLAGS = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED_NOREPLACE
_PROT = {"none": _PROT_NONE, "r": _PROT_READ, "rw": _PROT_READ | _PROT_WRITE}
_MADV = {
    "dontneed": 4, "dontfork": 10, "dofork": 11, "hugepage": 14, "nohugepage": 15, "wipeonfork": 18,
    "keeponfork": 19, "cold": 20, "pageout": 21,
}
_SYS_MREMAP = {"x86_64": 25, "aarch64": 216}
#: move_pages(2): an empty call with a node list drains every CPU's LRU batches (lru_add_drain_all).
_SYS_MOVE_PAGES = {"x86_64": 279, "aarch64": 239}
_PR_SET_CHILD_SUBREAPER = 36
#: io_uring's system calls (the same numbers on every architecture).
_SYS_IO_URING_SETUP, _SYS_IO_URING_REGISTER = 425, 427
_IORING_REGISTER_BUFFERS, _IORING_UNREGISTER_BUFFERS = 0, 1
#: sizeof(struct io_uring_params): io_uring_setup takes it zeroed (no flags) and fills it in.
_IO_URING_PARAMS_SIZE = 120


def _ioc(direction: int, typ: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (typ << 8) | nr


_IOC_READ_WRITE, _IOC_READ = 3, 2
UFFD_API = 0xAA
UFFD_FEATURE_MOVE = 1 << 16
UFFDIO_API = _ioc(_IOC_READ_WRITE, 0xAA, 0x3F, 24)
UFFDIO_REGISTER = _ioc(_IOC_READ_WRITE, 0xAA, 0x00, 32)
UFFDIO_UNREGISTER = _ioc(_IOC_READ, 0xAA, 0x01, 16)
UFFDIO_MOVE = _ioc(_IOC_READ_WRITE, 0xAA, 0x05, 40)
UFFDIO_WAKE = _ioc(_IOC_READ, 0xAA, 0x02, 16)
UFFDIO_COPY = _ioc(_IOC_READ_WRITE, 0xAA, 0x03, 40)
UFFDIO_ZEROPAGE = _ioc(_IOC_READ_WRITE, 0xAA, 0x04, 32)
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE, UFFD_PAGEFAULT_FLAG_WP = 1, 2
_UFFD_MSG = struct.Struct("<B7xQQQ")  # struct uffd_msg: event, then pagefault's flags, address, ptid
UFFDIO_REGISTER_MODE = {"missing": 1, "wp": 2}

# The userfaultfd is opened WITHOUT UFFD_USER_MODE_ONLY when the kernel lets us (root): the
# helper's accesses are kernel-mode (process_vm_readv/writev go through GUP), and with
# USER_MODE_ONLY a kernel-mode fault on a MISSING-registered page fails at once with EFAULT
# instead of waiting for a handler the way the user-mode access it stands for would.
_UFFD_FLAG_CHOICES = (_O_CLOEXEC | _O_NONBLOCK, _O_CLOEXEC | _O_NONBLOCK | _UFFD_USER_MODE_ONLY)

_PM_PRESENT = 1 << 63
_PM_SWAP = 1 << 62
_PM_UFFD_WP = 1 << 57
_PM_MMAP_EXCLUSIVE = 1 << 56
_PM_SOFT_DIRTY = 1 << 55
_PM_PFN_MASK = (1 << 55) - 1
# /proc/kpageflags bits (include/uapi/linux/kernel-page-flags.h, and KPF_OWNER_2 of
# include/linux/kernel-page-flags.h: the folio's PG_owner_2, which is PG_anon_exclusive on an
# anonymous folio since 6.12)
_KPF_WRITEBACK = 1 << 8
_KPF_ANON = 1 << 12
_KPF_SWAPCACHE = 1 << 13
_KPF_COMPOUND_HEAD = 1 << 15
_KPF_COMPOUND_TAIL = 1 << 16
_KPF_KSM = 1 << 21
_KPF_THP = 1 << 22
_KPF_ZERO_PAGE = 1 << 24
_KPF_OWNER_2 = 1 << 34
# PAGEMAP_SCAN (linux/fs.h): the page categories of a range of /proc/self/pagemap.
_PAGE_IS_PRESENT = 1 << 3
_PAGE_IS_SWAPPED = 1 << 4
_PAGE_IS_PFNZERO = 1 << 5
_PAGE_IS_HUGE = 1 << 6
_PM_SCAN_RETURN = _PAGE_IS_PRESENT | _PAGE_IS_SWAPPED | _PAGE_IS_PFNZERO | _PAGE_IS_HUGE
#: How long a pageout waits for the swap writeback it started to end.
_WRITEBACK_WAIT_S = 3.0
_U64 = (1 << 64) - 1


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _UffdioApi(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _UffdioRange(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _UffdioRegister(ctypes.Structure):
    _fields_ = [
        ("start", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    ]


class _UffdioMove(ctypes.Structure):
    _fields_ = [
        ("dst", ctypes.c_uint64),
        ("src", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("move", ctypes.c_int64),
    ]


class _UffdioCopy(ctypes.Structure):
    _fields_ = [
        ("dst", ctypes.c_uint64),
        ("src", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("copy", ctypes.c_int64),
    ]


class _UffdioZeropage(ctypes.Structure):
    _fields_ = [
        ("start", ctypes.c_uint64), ("len", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)
    ]


class _PmScanArg(ctypes.Structure):
    """struct pm_scan_arg."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages", "category_inverted",
            "category_mask", "category_anyof_mask", "return_mask",
        )
    ]


class _PageRegion(ctypes.Structure):
    """struct page_region: one run of pages of the same categories."""

    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


PAGEMAP_SCAN = _ioc(_IOC_READ_WRITE, ord("f"), 16, ctypes.sizeof(_PmScanArg))
assert ctypes.sizeof(_PmScanArg) == 96 and ctypes.sizeof(_PageRegion) == 24
assert ctypes.sizeof(_UffdioCopy) == 40 and ctypes.sizeof(_UffdioZeropage) == 32 and _UFFD_MSG.size == 32
assert ctypes.sizeof(_UffdioApi) == 24 and ctypes.sizeof(_UffdioRegister) == 32
assert ctypes.sizeof(_UffdioRange) == 16 and ctypes.sizeof(_UffdioMove) == 40


class _Libc:
    """The few libc entry points the helpers use, typed."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        c = ctypes
        self.syscall = libc.syscall
        self.syscall.restype = c.c_long
        self.mmap = libc.mmap
        self.mmap.restype = c.c_void_p
        self.mmap.argtypes = [c.c_void_p, c.c_size_t, c.c_int, c.c_int, c.c_int, c.c_long]
        self.munmap = libc.munmap
        self.munmap.restype = c.c_int
        self.munmap.argtypes = [c.c_void_p, c.c_size_t]
        self.madvise = libc.madvise
        self.madvise.restype = c.c_int
        self.madvise.argtypes = [c.c_void_p, c.c_size_t, c.c_int]
        self.mprotect = libc.mprotect
        self.mprotect.restype = c.c_int
        self.mprotect.argtypes = [c.c_void_p, c.c_size_t, c.c_int]
        self.mincore = libc.mincore
        self.mincore.restype = c.c_int
        self.mincore.argtypes = [c.c_void_p, c.c_size_t, c.c_void_p]
        # The access of a fault thread: a libc call, so the GIL is released while it blocks.
        self.memmove = libc.memmove
        self.memmove.restype = c.c_void_p
        self.memmove.argtypes = [c.c_void_p, c.c_void_p, c.c_size_t]
        self.ioctl = libc.ioctl
        self.ioctl.restype = c.c_int
        self.ioctl.argtypes = [c.c_int, c.c_ulong, c.c_void_p]
        self.prctl = libc.prctl
        self.prctl.restype = c.c_int
        self.prctl.argtypes = [c.c_int, c.c_ulong, c.c_ulong, c.c_ulong, c.c_ulong]
        rw_args: list[Any] = [c.c_int, c.POINTER(_Iovec), c.c_ulong, c.POINTER(_Iovec), c.c_ulong, c.c_ulong]
        self.process_vm_readv = libc.process_vm_readv
        self.process_vm_readv.restype = c.c_ssize_t
        self.process_vm_readv.argtypes = rw_args
        self.process_vm_writev = libc.process_vm_writev
        self.process_vm_writev.restype = c.c_ssize_t
        self.process_vm_writev.argtypes = rw_args

    @staticmethod
    def errno() -> int:
        return ctypes.get_errno()

    def mremap(self, old: int, old_len: int, new_len: int, flags: int, new: int) -> int:
        """The raw system call (libc's is variadic): the new address, or -errno."""
        c = ctypes.c_long
        nr = _SYS_MREMAP[platform.machine()]
        rc = int(self.syscall(c(nr), c(old), c(old_len), c(new_len), c(flags), c(new)))
        return -self.errno() if rc == -1 else rc & _U64

    def userfaultfd(self, flags: int) -> int:
        nr = _SYS_USERFAULTFD[platform.machine()]
        return int(self.syscall(ctypes.c_long(nr), ctypes.c_long(flags)))

    def io_uring_setup(self, entries: int) -> int:
        """A new io_uring instance with ``entries`` submission entries (its rings left unmapped):
        its fd, or -errno."""
        c = ctypes.c_long
        params = ctypes.create_string_buffer(_IO_URING_PARAMS_SIZE)
        fd = int(self.syscall(c(_SYS_IO_URING_SETUP), c(entries), params))
        return -self.errno() if fd < 0 else fd

    def io_uring_register(self, fd: int, opcode: int, arg: int, nr_args: int) -> int:
        """io_uring_register(2): 0 or errno."""
        c = ctypes.c_long
        rc = int(self.syscall(c(_SYS_IO_URING_REGISTER), c(fd), c(opcode), ctypes.c_void_p(arg or None), c(nr_args)))
        return self.errno() if rc < 0 else 0

    def lru_add_drain_all(self) -> int:
        """Drain every CPU's LRU batches (an empty move_pages(2) of this process does it): 0 or
        errno."""
        c = ctypes.c_long
        node = ctypes.c_int(0)
        nr = _SYS_MOVE_PAGES[platform.machine()]
        rc = int(self.syscall(c(nr), c(0), c(0), ctypes.c_void_p(0), ctypes.byref(node), ctypes.c_void_p(0), c(0)))
        return self.errno() if rc else 0


def _open_uffd(libc: _Libc) -> tuple[int, int]:
    """Open a userfaultfd and do the API handshake asking for MOVE: ``(fd, 0)`` or ``(-1, errno)``."""
    err = errno.EINVAL
    for flags in _UFFD_FLAG_CHOICES:
        fd = libc.userfaultfd(flags)
        if fd >= 0:
            break
        err = libc.errno()
    else:
        return -1, err
    api = _UffdioApi(UFFD_API, UFFD_FEATURE_MOVE, 0)
    if libc.ioctl(fd, UFFDIO_API, ctypes.addressof(api)) != 0:
        err = libc.errno()
        os.close(fd)
        return -1, err
    if not api.features & UFFD_FEATURE_MOVE:
        os.close(fd)
        return -1, errno.EOPNOTSUPP
    return fd, 0


def oracle_unavailable() -> str | None:
    """Why the kernel oracle cannot run on this machine, or None if it can."""
    why = uffd_move_unavailable()
    if why is not None:
        return why
    try:
        with open("/proc/kpagecount", "rb", buffering=0) as f:
            if len(f.read(8)) != 8:
                return "/proc/kpagecount unreadable"
    except OSError as e:
        return f"/proc/kpagecount unreadable: {e.strerror}"
    try:
        buf = ctypes.create_string_buffer(8)
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            entry = struct.unpack("<Q", os.pread(f.fileno(), 8, (ctypes.addressof(buf) // PAGE) * 8))[0]
        if not entry & _PM_PRESENT or not entry & _PM_PFN_MASK:
            return "/proc/self/pagemap does not show PFNs"
    except OSError as e:
        return f"/proc/self/pagemap unreadable: {e.strerror}"
    return None


#: The free swap space that scenarios which page out want, at least.
SWAP_FREE_MIN = 16 << 20


def swap_unavailable() -> str | None:
    """Why scenarios that page out cannot run on this kernel (no oracle, no active swap, too
    little of it free, or swap that does not keep a written-out page in the swap cache), or None
    if they can."""
    why = oracle_unavailable()
    if why is not None:
        return why
    if platform.machine() not in _SYS_MOVE_PAGES:
        return f"unknown move_pages syscall number for {platform.machine()}"
    try:
        with open("/proc/kpageflags", "rb", buffering=0) as f:
            if len(f.read(8)) != 8:
                return "/proc/kpageflags unreadable"
        with open("/proc/swaps") as f:
            swaps = f.read()
        with open("/proc/meminfo") as f:
            meminfo = f.read()
    except OSError as e:
        return f"{e.filename} unreadable: {e.strerror}"
    try:
        with open("/sys/module/zswap/parameters/enabled") as f:
            zswap: str | None = f.read()
    except OSError:
        zswap = None
    return swap_unusable(swaps, meminfo, zswap)


def swap_unusable(swaps: str, meminfo: str, zswap: str | None) -> str | None:
    """Why the swap that ``/proc/swaps``, ``/proc/meminfo`` and zswap's ``enabled`` parameter
    (None: no zswap) describe does not give the answers the swap scenarios record, or None: there
    must be an active swap, not zram and without zswap (both write synchronously, so pageout
    frees the page at once instead of leaving it in the swap cache), with SWAP_FREE_MIN free."""
    devices = [line.split()[0] for line in swaps.splitlines()[1:] if line.strip()]
    if not devices:
        return "no active swap (swapon --show lists none; .ci/swapfile sets one up as root)"
    zram = [d for d in devices if os.path.basename(d).startswith("zram")]
    if zram:
        return f"the active swap {zram[0]} is zram: its synchronous writes free a page at pageout"
    if zswap is not None and zswap.strip() in ("Y", "1"):
        return "zswap is enabled: pageout stores pages compressed and frees them at once"
    fields = {k.strip(): v.split() for k, _, v in (line.partition(":") for line in meminfo.splitlines())}
    free = int((fields.get("SwapFree") or ["0"])[0]) * 1024
    if free < SWAP_FREE_MIN:
        return f"only {free >> 20} MiB of swap free ({SWAP_FREE_MIN >> 20} MiB wanted)"
    return None


def pin_unavailable() -> str | None:
    """Why ``pin`` steps cannot run on this machine (no kernel oracle; io_uring absent, disabled
    by the kernel.io_uring_disabled sysctl, or refusing to register a buffer), or None if they
    can: a ring is set up and one page of a scratch mapping registered and unregistered."""
    why = oracle_unavailable()
    if why is not None:
        return why
    libc = _Libc()
    ring = libc.io_uring_setup(1)
    if ring < 0:
        try:
            with open("/proc/sys/kernel/io_uring_disabled") as f:
                disabled = f.read().strip()
        except OSError:
            disabled = "?"
        return f"no io_uring: io_uring_setup: {errno.errorcode.get(-ring, -ring)} (kernel.io_uring_disabled {disabled})"
    flags = _MAP_PRIVATE | _MAP_ANONYMOUS
    page = libc.mmap(None, PAGE, _PROT_READ | _PROT_WRITE, flags, -1, 0)
    try:
        if page == _MAP_FAILED or page is None:
            return "cannot map a scratch page"
        iov = _Iovec(page, PAGE)
        err = libc.io_uring_register(ring, _IORING_REGISTER_BUFFERS, ctypes.addressof(iov), 1)
        if err:
            return f"io_uring cannot register a buffer: {errno.errorcode.get(err, err)}"
        err = libc.io_uring_register(ring, _IORING_UNREGISTER_BUFFERS, 0, 0)
        if err:
            return f"io_uring cannot unregister its buffers: {errno.errorcode.get(err, err)}"
    finally:
        os.close(ring)
        if page != _MAP_FAILED and page is not None:
            libc.munmap(page, PAGE)
    return None


def uffd_move_unavailable() -> str | None:
    """Why this process cannot use UFFDIO_MOVE (not Linux, not root, no userfaultfd, no
    UFFD_FEATURE_MOVE), or None if it can."""
    if sys.platform != "linux":
        return f"not Linux ({sys.platform})"
    if platform.machine() not in _SYS_USERFAULTFD:
        return f"unknown userfaultfd syscall number for {platform.machine()}"
    if os.sysconf("SC_PAGE_SIZE") != PAGE:
        return f"page size is {os.sysconf('SC_PAGE_SIZE')}, not {PAGE}"
    if os.geteuid() != 0:
        return "not root"
    try:
        libc = _Libc()
    except (OSError, AttributeError) as e:
        return f"libc lacks an entry point: {e}"
    fd = -1
    for flags in _UFFD_FLAG_CHOICES:
        fd = libc.userfaultfd(flags)
        if fd >= 0:
            break
    if fd < 0:
        return f"no userfaultfd: {errno.errorcode.get(libc.errno(), libc.errno())}"
    try:
        api = _UffdioApi(UFFD_API, UFFD_FEATURE_MOVE, 0)
        if libc.ioctl(fd, UFFDIO_API, ctypes.addressof(api)) != 0:
            return f"no UFFD_FEATURE_MOVE: UFFDIO_API: {errno.errorcode.get(libc.errno(), libc.errno())}"
        if not api.features & UFFD_FEATURE_MOVE:
            return "no UFFD_FEATURE_MOVE"
    finally:
        os.close(fd)
    return None


# ---------------------------------------------------------------------------------------------
# Transparent hugepages: the settings a large-folio scenario runs under, and its settling

#: Where the kernel keeps its transparent-hugepage settings.
THP_SYSFS = "/sys/kernel/mm/transparent_hugepage"
#: The settings every large-folio scenario starts from (a scenario's own ``thp`` settings go on
#: top): huge pages only where MADV_HUGEPAGE asks for them, the huge zero page for read faults, the
#: PMD size following ``enabled`` and no smaller size (every ``hugepages-*`` size but 2048kB that
#: has an ``enabled`` file: "never").
THP_BASELINE: dict[str, Any] = {"enabled": "madvise", "use_zero_page": True, "mthp": {"2048kB": "inherit"}}
#: khugepaged's scan_sleep_millisecs while a large-folio scenario runs (an hour): khugepaged,
#: woken by the write, scans once before the scenario's processes exist (and once more when the
#: first of them asks for MADV_HUGEPAGE, if its list of processes was empty), then sleeps through
#: the scenario instead of collapsing small pages into a huge one behind its back.
KHUGEPAGED_SLEEP_MS = 3_600_000
#: khugepaged's limits while a large-folio scenario runs: it collapses only a PMD range whose 512
#: PTEs all map pages of their own (no empty PTE or zero page, no swap entry, no page shared with
#: another process). A split THP with a hole, a zero page, a swap entry or a COW-shared page,
#: which every scenario that splits one leaves, is then never collapsed, even by the scan that a
#: partial unmap of a THP wakes khugepaged for at once (the sleep does not hold it back).
KHUGEPAGED_LIMITS = {"max_ptes_none": 0, "max_ptes_swap": 0, "max_ptes_shared": 0}
#: The deferred-split shrinker's splitting of underused THPs, off while a large-folio scenario runs
#: (where the kernel has the switch, 6.12 and later): with max_ptes_none at 0 every huge page that
#: has a page of zeroes counts as underused, and any reclaim anywhere on the machine (kswapd, a
#: memory cgroup at its limit, drop_caches) would split it behind the scenario's back.
SHRINK_UNDERUSED = "0"
#: The counters that say a large-folio scenario's answer cannot be trusted: a huge page fault that
#: fell back to smaller pages (no huge page, or no huge zero page, could be allocated or charged),
#: khugepaged collapsing pages after all, and a large folio swapped out whole (the recordings were
#: made with a swap file that takes no large folio, so pageout splits them: a swap device that
#: takes them answers otherwise), and a huge page split behind the scenario's back: by the
#: shrinker as underused (where it cannot be switched off) or by a migration that found no huge
#: page to move it to.
_THP_VMSTAT = (
    "thp_fault_fallback", "thp_zero_page_alloc_failed", "thp_swpout", "thp_underused_split_page",
    "thp_migration_split",
)
#: The per-size counters of the same (``hugepages-*/stats/``).
_MTHP_STATS = ("anon_fault_fallback", "swpout")
#: A setting that writing ``enabled`` may recompute (khugepaged's recommended minimum).
_MIN_FREE_KBYTES = "/proc/sys/vm/min_free_kbytes"
_CHOICE = re.compile(r"\[([a-z+]+)\]")


def _state_dir() -> str:
    """Where the settings lock and the restore journal live: /run (gone, like the settings,
    after a reboot) where it is writable, else the temporary directory."""
    return "/run" if os.access("/run", os.W_OK) else os.environ.get("TMPDIR", "/tmp")


def _thp_lock_path() -> str:
    return os.path.join(_state_dir(), "mmsim-conformance-thp.lock")


def _thp_journal_path() -> str:
    return os.path.join(_state_dir(), "mmsim-conformance-thp.restore.json")


def read_thp_setting(path: str) -> str:
    """A sysfs setting as it can be written back: the bracketed choice of a list ("always
    [madvise] never" -> "madvise"), else the value."""
    with open(path) as f:
        text = f.read().strip()
    m = _CHOICE.search(text)
    return m.group(1) if m else text


def _write_thp_setting(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)
    if read_thp_setting(path) != value:
        raise OSError(errno.EIO, f"{path} did not take {value!r}")


def thp_settings_for(thp: dict[str, Any] | None, root: str | None = None) -> dict[str, str]:
    """The sysfs files (paths under ``root``, default THP_SYSFS) and values a large-folio
    scenario runs under: khugepaged asleep and held to KHUGEPAGED_LIMITS, THP_BASELINE, then the
    scenario's own ``thp`` settings, in writing order."""
    thp = thp or {}
    root = root or THP_SYSFS
    mthp = {
        name.removeprefix("hugepages-"): "never"
        for name in sorted(os.listdir(root))
        if name.startswith("hugepages-") and os.path.exists(os.path.join(root, name, "enabled"))
    }
    mthp.update(THP_BASELINE["mthp"])
    mthp.update(thp.get("mthp", {}))
    out = {os.path.join(root, "khugepaged", "scan_sleep_millisecs"): str(KHUGEPAGED_SLEEP_MS)}
    for name, limit in KHUGEPAGED_LIMITS.items():
        out[os.path.join(root, "khugepaged", name)] = str(limit)
    if os.path.exists(shrink := os.path.join(root, "shrink_underused")):
        out[shrink] = SHRINK_UNDERUSED
    out[os.path.join(root, "enabled")] = str(thp.get("enabled", THP_BASELINE["enabled"]))
    out[os.path.join(root, "use_zero_page")] = "1" if thp.get("use_zero_page", THP_BASELINE["use_zero_page"]) else "0"
    for size, value in mthp.items():
        out[os.path.join(root, f"hugepages-{size}", "enabled")] = str(value)
    return out


def _restore_thp(saved: dict[str, str]) -> list[str]:
    """Write back the saved settings that differ now, in the reverse order of their change (so
    min_free_kbytes, saved first, comes last): the problems, if any."""
    problems = []
    for path, value in reversed(list(saved.items())):
        try:
            if read_thp_setting(path) != value:
                _write_thp_setting(path, value)
        except OSError as e:
            problems.append(f"{path}: {e.strerror or e}")
    return problems


def restore_pending_thp_settings() -> None:
    """Restore what a run that died while it had THP settings changed left in the journal."""
    path = _thp_journal_path()
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return
    problems = _restore_thp(saved)
    if problems:
        raise RuntimeError("cannot restore the transparent-hugepage settings: " + "; ".join(problems))
    os.unlink(path)


#: This process's mapping that keeps it on khugepaged's list (see _stay_on_khugepaged_list).
_KHUGEPAGED_KEEPER: list[int] = []


def _stay_on_khugepaged_list() -> None:
    """Put this process on khugepaged's list of processes to scan, and keep it there: MADV_HUGEPAGE
    on a 4 MiB mapping that is never touched and lives as long as the process. khugepaged wakes
    at once when a process joins an empty list; with this one always on it, a helper's first
    MADV_HUGEPAGE (or, with THP enabled always, its first mapping) does not wake it, so it sleeps
    through the scenario (KHUGEPAGED_SLEEP_MS). Done again for every scenario, since it takes
    only while THP is enabled."""
    libc = _Libc()
    if not _KHUGEPAGED_KEEPER:
        flags = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE
        p = libc.mmap(None, 2 * PMD_SIZE, _PROT_READ | _PROT_WRITE, flags, -1, 0)
        if p == _MAP_FAILED or p is None:
            return
        _KHUGEPAGED_KEEPER.append(p)
    libc.madvise(_KHUGEPAGED_KEEPER[0], 2 * PMD_SIZE, _MADV["hugepage"])


#: How long khugepaged must not have run to count as asleep, and how long to wait for that.
_KHUGEPAGED_QUIET_S, _KHUGEPAGED_WAIT_S = 0.03, 3.0


def _khugepaged_pid() -> int | None:
    """The khugepaged kernel thread's pid (a new one each time THP is switched back on), or None."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/comm") as f:
                    if f.read().strip() == "khugepaged":
                        return int(name)
            except OSError:
                continue
    return None


def _khugepaged_slices(pid: int | None) -> int:
    """How many times khugepaged has been on a CPU (schedstat's third field), or -1."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[2])
    except (OSError, IndexError, ValueError):
        return -1


def _wait_khugepaged_asleep(pid: int | None, slices: int) -> None:
    """Wait (up to _KHUGEPAGED_WAIT_S) until khugepaged (``pid``) has run since it had been on a
    CPU ``slices`` times (the scan a settings write woke it for: khugepaged runs at nice 19, so
    it may not have started yet) and has then sat for _KHUGEPAGED_QUIET_S in its own wait
    between scans (not in a lock or an allocation inside one) without running again."""
    if pid is None or slices < 0:
        return
    deadline = time.monotonic() + _KHUGEPAGED_WAIT_S
    last, since = slices, time.monotonic()
    while time.monotonic() < deadline:
        now_slices = _khugepaged_slices(pid)
        try:
            with open(f"/proc/{pid}/wchan") as f:
                waiting = f.read().strip() == "khugepaged"
        except OSError:
            return
        now = time.monotonic()
        if now_slices < 0:
            return
        if now_slices != last or not waiting:
            last, since = now_slices, now
        elif last != slices and now - since >= _KHUGEPAGED_QUIET_S:
            return
        time.sleep(0.002)


@contextlib.contextmanager
def thp_settings(scenario: Scenario | None) -> Iterator[None]:
    """Run a scenario under the settings it needs. Every kernel run holds a lock shared by this
    machine's runs: shared for a scenario that is not a large-folio one (so no other run changes
    the settings under it), exclusive for a large-folio one, which applies ``thp_settings_for``
    (writing only what differs; the old values go to a journal first, so that a run killed
    half-way is undone by the next one), keeps khugepaged asleep (_stay_on_khugepaged_list,
    then waits for the scan the writes woke it for to end) and restores exactly what it changed
    when it ends, however it ends."""
    try:
        lock: int | None = os.open(_thp_lock_path(), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        lock = None
    try:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX if scenario is not None else fcntl.LOCK_SH)
        if scenario is None:
            yield
            return
        restore_pending_thp_settings()
        wanted = thp_settings_for(scenario.thp)
        saved = {path: old for path, value in wanted.items() if (old := read_thp_setting(path)) != value}
        journal = _thp_journal_path()
        if saved:
            # Journalled first, so that a run killed half-way is undone by the next one; and
            # min_free_kbytes too, which switching THP on or off recomputes.
            saved = {_MIN_FREE_KBYTES: read_thp_setting(_MIN_FREE_KBYTES), **saved}
            with open(journal, "w") as f:
                json.dump(saved, f)
        try:
            for path in saved:
                pid = _khugepaged_pid()
                slices = _khugepaged_slices(pid)
                if path != _MIN_FREE_KBYTES:
                    _write_thp_setting(path, wanted[path])
                if path.endswith("scan_sleep_millisecs"):
                    # Written first: the scan it wakes khugepaged for ends before any other
                    # setting (THP enabled always, say) widens what that scan may collapse.
                    _wait_khugepaged_asleep(pid, slices)
            _stay_on_khugepaged_list()
            yield
        finally:
            problems = _restore_thp(saved)
            if problems:
                raise RuntimeError("cannot restore the transparent-hugepage settings: " + "; ".join(problems))
            if saved:
                os.unlink(journal)
    finally:
        if lock is not None:
            os.close(lock)


def thp_counters(root: str | None = None, vmstat: str = "/proc/vmstat") -> dict[str, int]:
    """The counters that move when a large-folio scenario's answer cannot be trusted (root:
    default THP_SYSFS): huge page faults that fell back to smaller pages, large folios swapped
    out whole (both per size too), the pages khugepaged collapsed and huge pages split as
    underused or by a migration."""
    root = root or THP_SYSFS
    out: dict[str, int] = {}
    with open(vmstat) as f:
        for line in f:
            name, _, value = line.partition(" ")
            if name in _THP_VMSTAT:
                out[name] = int(value)
    for name in sorted(os.listdir(root)):
        for counter in _MTHP_STATS:
            stat = os.path.join(root, name, "stats", counter)
            if name.startswith("hugepages-") and os.path.exists(stat):
                with open(stat) as f:
                    out[f"{name} {counter}"] = int(f.read())
    with open(os.path.join(root, "khugepaged", "pages_collapsed")) as f:
        out["khugepaged pages_collapsed"] = int(f.read())
    return out


def thp_disturbance(before: dict[str, int], after: dict[str, int]) -> str:
    """Why a step during which the counters went from ``before`` to ``after`` is unreliable
    ("" when none moved)."""
    moved = [k for k in after if after[k] != before.get(k, 0)]
    if not moved:
        return ""
    if any("fallback" in k or "failed" in k for k in moved):
        what = "a huge page fault fell back to smaller pages (no huge page could be allocated)"
    elif any("swpout" in k for k in moved):
        what = "a large folio was swapped out whole (this swap device takes large folios, unlike the recordings')"
    elif any("underused" in k for k in moved):
        what = "the shrinker split a huge page as underused (reclaim ran while the scenario ran)"
    elif any("migration" in k for k in moved):
        what = "a migration split a huge page (no huge page to move it to)"
    else:
        what = "khugepaged collapsed pages while the scenario ran"
    return f"{what}: " + ", ".join(f"{k} +{after[k] - before.get(k, 0)}" for k in moved)


def thp_unavailable(scenario: Scenario | None = None) -> str | None:
    """Why large-folio scenarios (or ``scenario``, with its mTHP sizes) cannot run on this
    machine: no kernel oracle, no /proc/kpageflags, no transparent hugepages or settings that
    cannot be written, a PMD size other than 2 MiB, no PAGEMAP_SCAN; or None if they can."""
    why = oracle_unavailable()
    if why is not None:
        return why
    try:
        with open("/proc/kpageflags", "rb", buffering=0) as f:
            if len(f.read(8)) != 8:
                return "/proc/kpageflags unreadable"
    except OSError as e:
        return f"/proc/kpageflags unreadable: {e.strerror}"
    try:
        with open(os.path.join(THP_SYSFS, "hpage_pmd_size")) as f:
            pmd = int(f.read())
        wanted = thp_settings_for(scenario.thp if scenario is not None else None)
        thp_counters()
    except FileNotFoundError as e:
        return f"no transparent hugepages: {e.filename} is missing"
    except (OSError, ValueError) as e:
        return f"transparent hugepages unreadable: {e}"
    if pmd != PMD_SIZE:
        return f"the PMD size is {pmd} bytes, not {PMD_SIZE}"
    for path in wanted:
        if not os.path.exists(path):
            return f"no {os.path.relpath(path, THP_SYSFS)} (a size or setting this kernel lacks)"
        if not os.access(path, os.W_OK):
            return f"{path} is not writable"
    libc = _Libc()
    buf = ctypes.create_string_buffer(PAGE)
    region = _PageRegion()
    arg = _PmScanArg(
        size=ctypes.sizeof(_PmScanArg), start=ctypes.addressof(buf) & ~(PAGE - 1), vec=ctypes.addressof(region),
        vec_len=1, return_mask=_PM_SCAN_RETURN,
    )
    arg.end = arg.start + PAGE
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.ioctl(fd, PAGEMAP_SCAN, ctypes.addressof(arg)) < 0:
            return f"no PAGEMAP_SCAN on /proc/self/pagemap (Linux 6.7): {errno.errorcode.get(libc.errno(), '?')}"
    finally:
        os.close(fd)
    return None


# ---------------------------------------------------------------------------------------------
# Helper side: runs inside the helper processes


class _BecameChild(Exception):
    """Raised in the child of a ``fork`` command: the serve loop carries on with a new channel."""


def _maps() -> list[tuple[int, int, str]]:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi, parts[5] if len(parts) > 5 else ""))
    return out


#: How long a fork waits for its child to close what it inherited of the parent's (milliseconds).
_FORK_SETTLE_MS = 5000
#: The stack size of fault threads (small: they run a few lines of Python and one libc call).
_FAULT_STACK = 256 * 1024
#: Room (above the guard) for what a fork child's new fault threads map (their stacks come from
#: libc's cache; the interpreter maps a small frame stack for each).
_SPARE = 256 * PAGE


def _task_asleep_in_uffd(tid: int) -> bool:
    """True while the thread sleeps in the kernel waiting for a userfaultfd to resolve a fault."""
    try:
        with open(f"/proc/self/task/{tid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/self/task/{tid}/wchan", "rb") as f:
            wchan = f.read()
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state in (b"S", b"D") and b"userfault" in wchan


class _Fault:
    """One access made by a fault thread."""

    def __init__(self, tid: int, addr: int, write: bool, value: int) -> None:
        self.tid, self.addr, self.write = tid, addr, write
        self.buf = ctypes.create_string_buffer(8)
        struct.pack_into("<Q", self.buf, 0, value & _U64)
        self.done = threading.Event()

    def value(self) -> int:
        return int(struct.unpack_from("<Q", self.buf)[0])


class _FaultThread:
    """A thread of a helper that makes user-mode accesses on request, one at a time."""

    def __init__(self, libc: _Libc) -> None:
        self.libc = libc
        self.go = threading.Semaphore(0)
        self.tid = 0
        self.job: _Fault | None = None
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        while not self.tid:
            time.sleep(0.0005)

    def _loop(self) -> None:
        self.tid = threading.get_native_id()
        while True:
            self.go.acquire()
            job = self.job
            assert job is not None
            buf = ctypes.addressof(job.buf)
            if job.write:
                self.libc.memmove(job.addr, buf, 8)
            else:
                self.libc.memmove(buf, job.addr, 8)
            job.done.set()

    @property
    def free(self) -> bool:
        return self.job is None or self.job.done.is_set()

    def start(self, addr: int, write: bool, value: int) -> _Fault:
        self.job = _Fault(self.tid, addr, write, value)
        self.go.release()
        return self.job


class _Helper:
    def __init__(self, chan: socket.socket, fault_threads: int = 0) -> None:
        self.chan = chan
        self.libc = _Libc()
        self.pid = os.getpid()
        self.uffd = -1
        self.pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self.kpagecount = os.open("/proc/kpagecount", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.kpageflags = os.open("/proc/kpageflags", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.kpageflags = -1  # a ``pte`` step then says so
        self.buf = ctypes.create_string_buffer(8)
        self.local = _Iovec(ctypes.addressof(self.buf), 8)
        self.remote = _Iovec(0, 8)
        self.zero_pfn = -1
        self.guard = 0
        self.copy_src = 0  # COPY_MAX_PAGES of PROT_NONE, the source of copies (made RW per copy)
        self.spare = 0  # _SPARE bytes of PROT_NONE, unmapped for what a fork child's threads map
        self.nthreads = fault_threads
        self.threads: list[_FaultThread] = []
        self.faults: dict[str, _Fault] = {}
        #: The pins this process holds: name -> the io_uring fd whose registered buffer they are.
        self.pins: dict[str, int] = {}

    # -- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        lib = self.libc
        # Everything the steps need is mapped now, above the guard: the fault threads' stacks
        # (a fork child's threads get their parent's stacks again from libc's stack cache) and
        # the place where copies take their source pages from.
        flags = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE
        if self.nthreads:
            threading.stack_size(_FAULT_STACK)
            self.threads = [_FaultThread(lib) for _ in range(self.nthreads)]
            sp = lib.mmap(None, _SPARE, _PROT_NONE, flags, -1, 0)
            self.spare = 0 if sp == _MAP_FAILED else sp
        c = lib.mmap(None, COPY_MAX_PAGES * PAGE, _PROT_NONE, flags, -1, 0)
        self.copy_src = 0 if c == _MAP_FAILED else c
        # The zero page's PFN: read-fault a scratch private page, then unmap it again.
        p = lib.mmap(None, PAGE, _PROT_READ, _MAP_PRIVATE | _MAP_ANONYMOUS, -1, 0)
        if p != _MAP_FAILED:
            ctypes.c_uint64.from_address(p).value  # noqa: B018  (a user-mode read fault)
            entry = self._pagemap(p)
            if entry & _PM_PRESENT:
                self.zero_pfn = entry & _PM_PFN_MASK
            lib.munmap(p, PAGE)
        self._fill_holes()
        # The guard starts on a PMD boundary: the regions below it then share no PMD with what
        # the helper touched above (a PMD with a page table changes what a fault or a move does
        # there: no huge page, a page table allocated for a move's destination).
        g = lib.mmap(None, PAGE, _PROT_NONE, _MAP_PRIVATE | _MAP_ANONYMOUS, -1, 0)
        if g != _MAP_FAILED and g & (PMD_SIZE - 1):
            # Grow it down to the boundary below (free: the guard is the lowest mapping).
            low = g & ~(PMD_SIZE - 1)
            flags = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED_NOREPLACE
            if lib.mmap(low, g - low, _PROT_NONE, flags, -1, 0) == low:
                g = low
        self.guard = 0 if g == _MAP_FAILED else g

    def _child_threads(self) -> None:
        """Make a fork child's fault threads without mapping anything below the guard: what
        they map goes into the spare room above it, whose rest is then plugged again."""
        lib = self.libc
        if self.spare:
            lib.munmap(self.spare, _SPARE)
        self.threads = [_FaultThread(lib) for _ in range(self.nthreads)]
        if self.spare:
            lo, hi = self.spare, self.spare + _SPARE
            used = sorted((max(a, lo), min(b, hi)) for a, b, _ in _maps() if a < hi and b > lo)
            for start, end in zip([lo] + [b for _, b in used], [a for a, _ in used] + [hi], strict=True):
                if end > start:
                    lib.mmap(start, end - start, _PROT_NONE, _PLUG_FLAGS, -1, 0)

    def _fill_holes(self) -> None:
        """Plug the holes between the interpreter's mappings in the mmap area (PROT_NONE)."""
        vmas = sorted((lo, hi) for lo, hi, name in _maps() if name not in ("[stack]", "[vsyscall]"))
        stack = [lo for lo, hi, name in _maps() if name == "[stack]"]
        if stack:
            vmas = [v for v in vmas if v[1] <= stack[0]]
        if len(vmas) < 2:
            return
        # The mmap area is everything above the largest gap (the one between brk and mmap).
        gaps = [(vmas[i + 1][0] - vmas[i][1], i) for i in range(len(vmas) - 1)]
        _, split = max(gaps)
        area = vmas[split + 1 :]
        for (_, hi), (lo, _) in itertools.pairwise(area):
            if lo > hi:
                self.libc.mmap(hi, lo - hi, _PROT_NONE, _PLUG_FLAGS, -1, 0)

    # -- primitives ----------------------------------------------------------------------------

    def _pagemap(self, addr: int) -> int:
        return struct.unpack("<Q", os.pread(self.pagemap, 8, (addr // PAGE) * 8))[0]

    def _vm_rw(self, addr: int, write: bool) -> int:
        self.remote.base = addr
        fn = self.libc.process_vm_writev if write else self.libc.process_vm_readv
        n = fn(self.pid, ctypes.byref(self.local), 1, ctypes.byref(self.remote), 1, 0)
        if n == 8:
            return 0
        return self.libc.errno() if n < 0 else errno.EFAULT

    def _uffd(self) -> int:
        """The process's userfaultfd, opened on first need: fd, or -errno."""
        if self.uffd < 0:
            fd, err = _open_uffd(self.libc)
            if fd < 0:
                return -err
            self.uffd = fd
        return self.uffd

    def _register(self, addr: int, length: int, mode: str) -> int:
        fd = self._uffd()
        if fd < 0:
            return -fd
        reg = _UffdioRegister(addr, length, UFFDIO_REGISTER_MODE[mode], 0)
        if self.libc.ioctl(fd, UFFDIO_REGISTER, ctypes.addressof(reg)) != 0:
            return self.libc.errno()
        return 0

    # -- commands ------------------------------------------------------------------------------

    def do_mmap(self, c: dict[str, Any]) -> dict[str, Any]:
        slack = PMD_SIZE if c.get("align") == "pmd" else 0
        p = self.libc.mmap(None, c["len"] + slack, _PROT[c["prot"]], _MAP_PRIVATE | _MAP_ANONYMOUS, -1, 0)
        if p == _MAP_FAILED or p is None:
            return {"errno": self.libc.errno()}
        if slack:
            # The 2 MiB boundary inside the mapping, and the slack below and above it unmapped.
            start = (p + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
            end = p + c["len"] + slack
            if (start > p and self.libc.munmap(p, start - p)) or (
                end > start + c["len"] and self.libc.munmap(start + c["len"], end - start - c["len"])
            ):
                return {"errno": self.libc.errno(), "note": "munmap of the alignment slack failed"}
            p = start
        out: dict[str, Any] = {"errno": 0, "addr": p, "guard": self.guard}
        if c.get("uffd"):
            err = self._register(p, c["len"], c["uffd"])
            if err:
                out.update(errno=err, note="UFFDIO_REGISTER failed")
        return out

    def do_munmap(self, c: dict[str, Any]) -> dict[str, Any]:
        rc = self.libc.munmap(c["addr"], c["len"])
        return {"errno": self.libc.errno() if rc else 0}

    def do_madvise(self, c: dict[str, Any]) -> dict[str, Any]:
        advice = c["advice"]
        if advice not in ("pageout", "cold"):
            rc = self.libc.madvise(c["addr"], c["len"], _MADV[advice])
            return {"errno": self.libc.errno() if rc else 0}
        return self._reclaim(c["addr"], c["len"], advice)

    def _reclaim(self, addr: int, length: int, advice: str) -> dict[str, Any]:
        """MADV_PAGEOUT or MADV_COLD, settled: every CPU's LRU batches are drained first (a
        folio still in a batch is not on the LRU, and reclaim skips it), and after a pageout the
        step waits until no page it may have written out is under writeback any more (the PFNs
        of the present pages are taken before, since a swapped-out page has none in pagemap),
        then drains them again (the written folios' rotation)."""
        pfns = []
        if advice == "pageout" and length > 0 and addr % PAGE == 0 and self.kpageflags >= 0:
            n = min(-(-length // PAGE), 1 << 16)
            try:
                raw = os.pread(self.pagemap, 8 * n, (addr // PAGE) * 8)
            except OSError:
                raw = b""
            for (entry,) in struct.iter_unpack("<Q", raw[: len(raw) // 8 * 8]):
                if entry & _PM_PRESENT and entry & _PM_PFN_MASK:
                    pfns.append(entry & _PM_PFN_MASK)
        err = self.libc.lru_add_drain_all()
        if err:
            return {"errno": err, "note": "move_pages (to drain the LRU batches) failed"}
        rc = self.libc.madvise(addr, length, _MADV[advice])
        out: dict[str, Any] = {"errno": self.libc.errno() if rc else 0}
        # A failed pageout (a hole: ENOMEM) still wrote out what came before the hole.
        deadline = time.monotonic() + _WRITEBACK_WAIT_S
        while pfns:
            pfns = [pfn for pfn in pfns if self._kpageflags(pfn) & _KPF_WRITEBACK]
            if not pfns:
                break
            if time.monotonic() >= deadline:
                out["note"] = f"swap writeback of {len(pfns)} page(s) did not end"
                break
            time.sleep(0.001)
        # The end of a write puts the folio, with a reference, in the rotate batch of the CPU
        # that completed it (folio_rotate_reclaimable): drain them all again, or a later write
        # fault on another CPU sees that reference and keeps the folio in the swap cache.
        if advice == "pageout":
            self.libc.lru_add_drain_all()
        return out

    def _kpageflags(self, pfn: int) -> int:
        return int(struct.unpack("<Q", os.pread(self.kpageflags, 8, pfn * 8))[0])

    def do_uffd_register(self, c: dict[str, Any]) -> dict[str, Any]:
        return {"errno": self._register(c["addr"], c["len"], c["mode"])}

    def do_uffd_unregister(self, c: dict[str, Any]) -> dict[str, Any]:
        fd = self._uffd()
        if fd < 0:
            return {"errno": -fd}
        rng = _UffdioRange(c["addr"], c["len"])
        rc = self.libc.ioctl(fd, UFFDIO_UNREGISTER, ctypes.addressof(rng))
        return {"errno": self.libc.errno() if rc else 0}

    def do_write(self, c: dict[str, Any]) -> dict[str, Any]:
        struct.pack_into("<Q", self.buf, 0, c["value"] & _U64)
        return {"errno": self._vm_rw(c["addr"], write=True)}

    def _load(self, addr: int) -> int:
        # A user-mode load of a page known to be present: no fault, and unlike a FOLL_PIN read
        # through process_vm_readv it does not unshare a page shared with another process.
        return int(ctypes.c_uint64.from_address(addr).value)

    def _readable(self, addr: int) -> bool:
        with open("/proc/self/maps", "rb") as f:
            for line in f:
                rng, perms = line.split(b" ", 2)[:2]
                lo, hi = (int(x, 16) for x in rng.split(b"-"))
                if lo <= addr < hi:
                    return perms[:1] == b"r"
        return False

    def _peek_unreadable(self, addr: int) -> int:
        # A present page the process may not read (PROT_NONE): /proc/self/mem reads it (a
        # forced, unpinned access that neither faults nor unshares it).
        fd = os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return int(struct.unpack("<Q", os.pread(fd, 8, addr))[0])
        finally:
            os.close(fd)

    def do_read(self, c: dict[str, Any]) -> dict[str, Any]:
        addr = c["addr"]
        if self._pagemap(addr) & (_PM_PRESENT | _PM_SWAP):
            # A present page, or a swapped-out one: a user-mode load swaps it in the way the
            # access it stands for would, where a pinning read would also unshare it.
            if not self._readable(addr):
                return {"errno": errno.EFAULT}  # the load it stands for would fault
            return {"errno": 0, "value": self._load(addr)}
        err = self._vm_rw(addr, write=False)  # faults the page in (the zero page)
        if err:
            return {"errno": err}
        return {"errno": 0, "value": struct.unpack_from("<Q", self.buf)[0]}

    def do_peek(self, c: dict[str, Any]) -> dict[str, Any]:
        addr = c["addr"]
        if not self._pagemap(addr) & _PM_PRESENT:
            return {"errno": 0, "present": False}
        value = self._load(addr) if self._readable(addr) else self._peek_unreadable(addr)
        return {"errno": 0, "present": True, "value": value}

    def do_present(self, c: dict[str, Any]) -> dict[str, Any]:
        return {"errno": 0, "present": bool(self._pagemap(c["addr"]) & _PM_PRESENT)}

    def do_mapcount(self, c: dict[str, Any]) -> dict[str, Any]:
        entry = self._pagemap(c["addr"])
        if not entry & _PM_PRESENT:
            return {"errno": 0, "present": False}
        pfn = entry & _PM_PFN_MASK
        if pfn == self.zero_pfn or (self.kpageflags >= 0 and self._kpageflags(pfn) & _KPF_ZERO_PAGE):
            return {"errno": 0, "present": True, "mapcount": 0, "pfn": pfn}
        count = struct.unpack("<Q", os.pread(self.kpagecount, 8, pfn * 8))[0]
        return {"errno": 0, "present": True, "mapcount": count, "pfn": pfn}

    def _scan(self, addr: int) -> int:
        """The PAGEMAP_SCAN categories of the page at ``addr`` (PAGE_IS_*), or -errno."""
        region = _PageRegion()
        arg = _PmScanArg(
            size=ctypes.sizeof(_PmScanArg), start=addr, end=addr + PAGE, vec=ctypes.addressof(region), vec_len=1,
            return_mask=_PM_SCAN_RETURN,
        )
        n = self.libc.ioctl(self.pagemap, PAGEMAP_SCAN, ctypes.addressof(arg))
        if n < 0:
            return -self.libc.errno()
        return int(region.categories) if n and region.start <= addr < region.end else 0

    def do_pte(self, c: dict[str, Any]) -> dict[str, Any]:
        """The page's pagemap entry and, for a present page, its kpageflags and kpagecount and
        whether a huge PMD maps it (PAGEMAP_SCAN); for a swap entry, whether its folio is in the
        swap cache (mincore(2) says resident then)."""
        addr = c["addr"] & ~(PAGE - 1)
        entry = self._pagemap(addr)
        out: dict[str, Any] = {
            "errno": 0,
            "present": bool(entry & _PM_PRESENT),
            "swap": bool(entry & _PM_SWAP),
            "exclusive": bool(entry & _PM_MMAP_EXCLUSIVE),
            "uffd_wp": bool(entry & _PM_UFFD_WP),
            "soft_dirty": bool(entry & _PM_SOFT_DIRTY),
        }
        if entry & _PM_PRESENT:
            if self.kpageflags < 0:
                return {"errno": errno.EIO, "note": "/proc/kpageflags unreadable"}
            pfn = entry & _PM_PFN_MASK
            flags = self._kpageflags(pfn)
            categories = self._scan(addr)
            if categories < 0:
                return {"errno": -categories, "note": "PAGEMAP_SCAN failed"}
            zero = bool(flags & _KPF_ZERO_PAGE) or pfn == self.zero_pfn
            pmd = bool(categories & _PAGE_IS_HUGE)
            tail = bool(flags & _KPF_COMPOUND_TAIL)
            out.update(
                swapcache=bool(flags & _KPF_SWAPCACHE),
                pmd=pmd,
                thp=bool(flags & (_KPF_THP | _KPF_COMPOUND_HEAD | _KPF_COMPOUND_TAIL)),
                head=bool(flags & _KPF_COMPOUND_HEAD),
                tail=tail,
                zero_page=zero,
                ksm=bool(flags & _KPF_KSM),
                mapcount=0 if zero else int(struct.unpack("<Q", os.pread(self.kpagecount, 8, pfn * 8))[0]),
                pfn=pfn,
                flags=flags,
            )
            # kpageflags shows PG_owner_2 of the folio's head: for a tail page that is its own
            # PG_anon_exclusive only while a huge PMD maps the folio (which keeps the bit of the
            # whole mapping on the head page).
            if flags & _KPF_ANON and not flags & _KPF_KSM and (pmd or not tail):
                out["anon_exclusive"] = bool(flags & _KPF_OWNER_2)
        elif entry & _PM_SWAP:
            vec = ctypes.create_string_buffer(1)
            if self.libc.mincore(addr, PAGE, ctypes.addressof(vec)) != 0:
                return {**out, "errno": self.libc.errno(), "note": "mincore failed"}
            out["swapcache"] = bool(vec.raw[0] & 1)
        return out

    def do_move(self, c: dict[str, Any]) -> dict[str, Any]:
        fd = self._uffd()
        if fd < 0:
            return {"errno": -fd, "moved": 0, "note": "no userfaultfd"}
        mv = _UffdioMove(c["dst"] & _U64, c["src"] & _U64, c["len"] & _U64, c["mode"] & _U64, 0)
        if self.libc.ioctl(fd, UFFDIO_MOVE, ctypes.addressof(mv)) == 0:
            return {"errno": 0, "moved": c["len"], "raw_move": mv.move}
        return {"errno": self.libc.errno(), "moved": max(mv.move, 0), "raw_move": mv.move}

    def do_mprotect(self, c: dict[str, Any]) -> dict[str, Any]:
        rc = self.libc.mprotect(c["addr"], c["len"], _PROT[c["prot"]])
        return {"errno": self.libc.errno() if rc else 0}

    def do_fill_vmas(self, c: dict[str, Any]) -> dict[str, Any]:
        """Map the region with a hole page on each side, then split it with read-only pages until
        the process has vm.max_map_count - leave VMAs (those of /proc/self/maps but the vsyscall
        page, which is no VMA of the mm)."""
        total = c["len"] + 2 * PAGE
        p = self.libc.mmap(None, total, _PROT["rw"], _MAP_PRIVATE | _MAP_ANONYMOUS, -1, 0)
        if p == _MAP_FAILED or p is None:
            return {"errno": self.libc.errno()}
        if self.libc.munmap(p, PAGE) or self.libc.munmap(p + total - PAGE, PAGE):
            return {"errno": self.libc.errno(), "note": "munmap of the hole pages failed"}
        start, pages = p + PAGE, c["len"] // PAGE
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
        count = sum(1 for _, _, name in _maps() if name != "[vsyscall]")
        need = limit - c["leave"] - count
        out: dict[str, Any] = {"errno": 0, "addr": start, "note": f"{count} VMAs, vm.max_map_count {limit}"}
        if not 0 <= need < pages - 1:
            return {**out, "errno": errno.ERANGE, "note": f"cannot fill {count} VMAs up to {limit} - {c['leave']}"}
        # Nothing big is allocated from here on: the heap cannot grow past the placeholders, and
        # what malloc would map instead would be VMAs of the count.
        mprotect, fail = self.libc.mprotect, {**out}
        for i in range(need // 2):
            if mprotect(start + (2 * i + 1) * PAGE, PAGE, _PROT_READ):
                fail["errno"] = self.libc.errno()
                return fail
        if need % 2 and mprotect(start + (pages - 1) * PAGE, PAGE, _PROT_READ):
            fail["errno"] = self.libc.errno()
            return fail
        return out

    def do_mremap(self, c: dict[str, Any]) -> dict[str, Any]:
        rc = self.libc.mremap(c["addr"], c["len"], c["new_len"], c["flags"], c["new_addr"])
        if rc < 0:
            return {"errno": -rc}
        return {"errno": 0, "addr": rc}

    def do_copy(self, c: dict[str, Any]) -> dict[str, Any]:
        fd = self._uffd()
        if fd < 0:
            return {"errno": -fd, "copied": 0, "note": "no userfaultfd"}
        values = c["values"]
        src, n = self.copy_src, len(values)
        if not src:
            return {"errno": errno.EIO, "copied": 0, "note": "no copy source"}
        fixed = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_FIXED
        if n and self.libc.mmap(src, n * PAGE, _PROT_READ | _PROT_WRITE, fixed, -1, 0) != src:
            return {"errno": errno.EIO, "copied": 0, "note": "cannot map the copy source"}
        try:
            for i, v in enumerate(values):
                ctypes.c_uint64.from_address(src + i * PAGE).value = v & _U64
            cp = _UffdioCopy(c["dst"] & _U64, src, c["len"] & _U64, c["mode"] & _U64, 0)
            if self.libc.ioctl(fd, UFFDIO_COPY, ctypes.addressof(cp)) == 0:
                return {"errno": 0, "copied": c["len"], "raw_copy": cp.copy}
            return {"errno": self.libc.errno(), "copied": max(cp.copy, 0), "raw_copy": cp.copy}
        finally:
            if n:  # back to the PROT_NONE reservation (it merges with the rest of it again)
                self.libc.mmap(src, n * PAGE, _PROT_NONE, fixed | _MAP_NORESERVE, -1, 0)

    def do_zeropage(self, c: dict[str, Any]) -> dict[str, Any]:
        fd = self._uffd()
        if fd < 0:
            return {"errno": -fd, "zeroed": 0, "note": "no userfaultfd"}
        zp = _UffdioZeropage(c["dst"] & _U64, c["len"] & _U64, c["mode"] & _U64, 0)
        if self.libc.ioctl(fd, UFFDIO_ZEROPAGE, ctypes.addressof(zp)) == 0:
            return {"errno": 0, "zeroed": c["len"], "raw_zeropage": zp.zeropage}
        return {"errno": self.libc.errno(), "zeroed": max(zp.zeropage, 0), "raw_zeropage": zp.zeropage}

    def do_wake(self, c: dict[str, Any]) -> dict[str, Any]:
        fd = self._uffd()
        if fd < 0:
            return {"errno": -fd, "note": "no userfaultfd"}
        rng = _UffdioRange(c["addr"] & _U64, c["len"] & _U64)
        rc = self.libc.ioctl(fd, UFFDIO_WAKE, ctypes.addressof(rng))
        return {"errno": self.libc.errno() if rc else 0}

    def do_pin(self, c: dict[str, Any]) -> dict[str, Any]:
        """Pin the range on a ring of its own: its buffer registration pins every page with
        FOLL_WRITE | FOLL_LONGTERM, or none (then the ring is closed again)."""
        ring = self.libc.io_uring_setup(1)
        if ring < 0:
            return {"errno": -ring, "note": "io_uring_setup failed"}
        iov = _Iovec(c["addr"], c["len"])
        err = self.libc.io_uring_register(ring, _IORING_REGISTER_BUFFERS, ctypes.addressof(iov), 1)
        if err:
            os.close(ring)
            return {"errno": err}
        self.pins[c["pin"]] = ring
        return {"errno": 0}

    def do_unpin(self, c: dict[str, Any]) -> dict[str, Any]:
        """Unregister the pin's buffer (unpinning its pages) and close its ring; EINVAL for a pin
        this process does not hold (its pin step failed)."""
        ring = self.pins.pop(c["pin"], None)
        if ring is None:
            return {"errno": errno.EINVAL}
        try:
            err = self.libc.io_uring_register(ring, _IORING_UNREGISTER_BUFFERS, 0, 0)
        finally:
            os.close(ring)
        return {"errno": err, "note": "IORING_UNREGISTER_BUFFERS failed"} if err else {"errno": 0}

    def do_fault(self, c: dict[str, Any]) -> dict[str, Any]:
        free = [t for t in self.threads if t.free]
        if not free:
            return {"errno": errno.EAGAIN, "note": f"no free fault thread (at most {len(self.threads)} pending)"}
        t = self.faults[c["id"]] = free[0].start(c["addr"], bool(c["write"]), int(c["value"]))
        # Return once the access has finished or sleeps waiting for the userfaultfd (its
        # message is queued before it sleeps), so that the next step sees a settled state.
        deadline = time.monotonic() + c["wait"]
        while not t.done.wait(0.0005):
            if _task_asleep_in_uffd(t.tid):
                return {"errno": 0, "state": "blocked"}
            if time.monotonic() >= deadline:
                return {"errno": 0, "state": "unknown", "note": "neither finished nor asleep in userfaultfd"}
        return {"errno": 0, "state": "finished"}

    def do_fault_status(self, c: dict[str, Any]) -> dict[str, Any]:
        t = self.faults.get(c["id"])
        if t is None:
            return {"errno": errno.ESRCH, "note": f"no fault {c['id']!r} in this process"}
        # Finished, or asleep in the userfaultfd for SETTLE seconds in a row (a thread that was
        # woken is runnable, not asleep, until it has run); after ``wait``, still blocked.
        settle = 0.05
        deadline = time.monotonic() + c["wait"]
        asleep_since: float | None = None
        while not t.done.wait(0.001):
            now = time.monotonic()
            if _task_asleep_in_uffd(t.tid):
                asleep_since = now if asleep_since is None else asleep_since
                if now - asleep_since >= settle:
                    return {"errno": 0, "blocked": True}
            else:
                asleep_since = None
            if now >= deadline:
                return {"errno": 0, "blocked": True, "note": "not finished, not asleep in userfaultfd"}
        out: dict[str, Any] = {"errno": 0, "blocked": False}
        if not t.write:
            out["value"] = t.value()
        return out

    def _settle_faults(self, wait: float) -> None:
        """Wait (at most ``wait``) until every pending fault has finished or sleeps in the
        userfaultfd. A fault that an earlier step woke (UFFDIO_WAKE, or a resolving ioctl) is
        runnable when that ioctl returns; it queues its next message, if any, before it sleeps."""
        deadline = time.monotonic() + wait
        pending = [t for t in self.faults.values() if not t.done.is_set()]
        while pending and time.monotonic() < deadline:
            pending = [t for t in pending if not t.done.is_set() and not _task_asleep_in_uffd(t.tid)]
            if pending:
                pending[0].done.wait(0.0005)

    def do_events(self, c: dict[str, Any]) -> dict[str, Any]:
        if self.uffd < 0:
            return {"errno": 0, "events": []}
        self._settle_faults(c.get("wait", 0.0))
        raw = b""
        while True:
            try:
                chunk = os.read(self.uffd, _UFFD_MSG.size * 64)
            except BlockingIOError:
                break
            except OSError as e:
                return {"errno": e.errno or errno.EIO, "events": []}
            if not chunk:
                break
            raw += chunk
        events = []
        for off in range(0, len(raw) - len(raw) % _UFFD_MSG.size, _UFFD_MSG.size):
            event, flags, address, _ = _UFFD_MSG.unpack_from(raw, off)
            events.append([event, flags, address])
        return {"errno": 0, "events": events}

    def do_fork(self, c: dict[str, Any]) -> dict[str, Any]:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            # The child: its own channel, no inherited uffd (registration was dropped at fork,
            # and UFFDIO_MOVE needs ctx->mm == current->mm), its own pagemap.
            mine.close()
            self.chan.close()
            self.chan = theirs
            if self.uffd >= 0:
                os.close(self.uffd)
                self.uffd = -1
            # The parent's pins are the parent's: close the rings that hold them at once.
            for ring in self.pins.values():
                os.close(ring)
            self.pins = {}
            os.close(self.pagemap)
            self.pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            self.pid = os.getpid()
            # Only this thread exists in the child: the parent's faults are not the child's, and
            # the child gets fault threads of its own (on the stacks libc kept of the others).
            self.faults = {}
            if self.nthreads:
                self._child_threads()
            theirs.send(b"ready")  # to the parent, which waits for it before it answers
            raise _BecameChild
        theirs.close()
        # The fork is done once the child has let go of what was the parent's alone (its rings,
        # so that its pins are the parent's only, and its userfaultfd): wait for its word.
        poller = select.poll()
        poller.register(mine, select.POLLIN | select.POLLHUP)
        if poller.poll(_FORK_SETTLE_MS):
            with contextlib.suppress(OSError):
                mine.recv(16)
        try:
            data = json.dumps({"errno": 0, "pid": pid}).encode()
            self.chan.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", mine.fileno()))])
        finally:
            mine.close()
        return {}  # already answered

    def do_maps(self, c: dict[str, Any]) -> dict[str, Any]:
        return {"errno": 0, "maps": open("/proc/self/maps").read(), "guard": self.guard}

    # -- loop ----------------------------------------------------------------------------------

    def serve(self) -> None:
        while True:
            try:
                data = self.chan.recv(16384)
            except OSError:
                os._exit(1)
            if not data:
                os._exit(0)  # the runner has gone
            cmd = json.loads(data)
            op = cmd["op"]
            if op == "exit":
                self.chan.send(b'{"errno": 0}')
                os._exit(0)
            try:
                reply = getattr(self, "do_" + op)(cmd)
            except _BecameChild:
                continue
            except Exception as e:  # noqa: BLE001 - a bug, not a kernel answer: report it, keep serving
                reply = {"errno": errno.EIO, "note": f"helper error: {type(e).__name__}: {e}"}
            if reply:
                self.chan.send(json.dumps(reply).encode())


def _helper_main(fd: int, fault_threads: int = 0) -> None:
    chan = socket.socket(fileno=fd)
    try:
        h = _Helper(chan, fault_threads)
        h.setup()
    except Exception as e:  # noqa: BLE001 - report at the first command
        err = f"helper setup failed: {type(e).__name__}: {e}"
        while chan.recv(16384):
            chan.send(json.dumps({"errno": errno.EIO, "note": err}).encode())
        os._exit(1)
    h.serve()


def _pgid_members(pgid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid:
            pids.append(int(name))
    return pids


def _anchor_main(spec: dict[str, Any]) -> int:
    """The anchor: subreaper of all helpers, forks the root helpers, sweeps up at the end."""
    libc = _Libc()
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # inherited by the helpers: no zombies
    fds = [int(fd) for _, fd in spec["procs"]]
    pids = {}
    for name, fd in spec["procs"]:
        pid = os.fork()
        if pid == 0:
            for other in fds:
                if other != fd:
                    os.close(other)
            os.close(0)
            os.close(1)
            _helper_main(fd, int(spec.get("fault_threads", 0)))
            os._exit(0)
        pids[name] = pid
    for fd in fds:
        os.close(fd)
    sys.stdout.write(json.dumps({"pids": pids}) + "\n")
    sys.stdout.flush()
    while sys.stdin.buffer.read(4096):
        pass
    me, pgid = os.getpid(), os.getpgrp()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = [p for p in _pgid_members(pgid) if p != me]
        if not left:
            break
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.005)
    return 0


# ---------------------------------------------------------------------------------------------
# Runner side


class _Proc:
    def __init__(self, name: str, pid: int, chan: socket.socket) -> None:
        self.name, self.pid, self.chan = name, pid, chan
        self.gone = False


def _alive(pid: int) -> bool:
    """True while the process exists (a zombie counts as existing)."""
    return os.path.exists(f"/proc/{pid}")


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return True


class _Timeout(Exception):
    pass


class _Gone(Exception):
    pass


class _Run:
    """One scenario's helpers."""

    def __init__(self, roots: list[str], startup_timeout: float, fault_threads: int = 0) -> None:
        self.procs: dict[str, _Proc] = {}
        self.pids: list[int] = []
        self.anchor: subprocess.Popen[bytes] | None = None
        ends = {name: socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for name in roots}
        try:
            spec = {
                "procs": [[name, theirs.fileno()] for name, (_, theirs) in ends.items()],
                "fault_threads": fault_threads,
            }
            # One malloc arena: a helper's threads then allocate from the brk heap too.
            env = dict(os.environ, PYTHONMALLOC="malloc", MALLOC_ARENA_MAX="1")
            self.anchor = subprocess.Popen(
                [sys.executable, "-m", "mmsim.server.tools.conformance.kernel", "--helper", json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=[theirs.fileno() for _, theirs in ends.values()],
                start_new_session=True,
                env=env,
            )
            self.pids.append(self.anchor.pid)
        finally:
            for _, theirs in ends.values():
                theirs.close()
        try:
            assert self.anchor.stdout is not None
            poller = select.poll()
            poller.register(self.anchor.stdout, select.POLLIN | select.POLLHUP)
            ready = poller.poll(int(startup_timeout * 1000))
            line = self.anchor.stdout.readline() if ready else b""
            if not line:
                raise RuntimeError("the kernel oracle's helpers did not start")
            pids = json.loads(line)["pids"]
        except BaseException:
            for mine, _ in ends.values():
                mine.close()
            self.close()
            raise
        for name, (mine, _) in ends.items():
            self.procs[name] = _Proc(name, int(pids[name]), mine)
            self.pids.append(int(pids[name]))

    def call(self, proc: _Proc, cmd: dict[str, Any], timeout: float) -> tuple[dict[str, Any], list[int]]:
        """Send one command and wait for its reply (and any passed fds)."""
        try:
            proc.chan.send(json.dumps(cmd).encode())
        except OSError:
            raise _Gone from None
        poller = select.poll()
        poller.register(proc.chan, select.POLLIN | select.POLLHUP | select.POLLERR)
        if not poller.poll(max(0, int(timeout * 1000))):
            raise _Timeout
        try:
            data, anc, _, _ = proc.chan.recvmsg(65536, socket.CMSG_SPACE(4 * struct.calcsize("i")))
        except OSError:
            raise _Gone from None
        fds: list[int] = []
        for level, typ, payload in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds.extend(struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4]))
        if not data:
            for fd in fds:
                os.close(fd)
            raise _Gone
        return json.loads(data), fds

    def kill(self, proc: _Proc, timeout: float = 5.0) -> None:
        if not proc.gone:
            proc.gone = True
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _wait_gone(proc.pid, timeout)
        proc.chan.close()

    def close(self) -> None:
        for proc in self.procs.values():
            if not proc.gone:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs.values():
            self.kill(proc)
        if self.anchor is not None:
            assert self.anchor.stdin is not None and self.anchor.stdout is not None
            try:
                self.anchor.stdin.close()
            except OSError:
                pass
            try:
                self.anchor.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.anchor.kill()
                self.anchor.wait()
            self.anchor.stdout.close()


#: The fields a ``pte`` step reports (those a reply lacks stay None: not reported).
_PTE_FIELDS = (
    "present", "swap", "exclusive", "uffd_wp", "soft_dirty", "swapcache", "thp", "zero_page", "ksm", "mapcount",
    "anon_exclusive", "pmd", "head", "tail",
)


class KernelRunner:
    """Runs scenarios on the live kernel, one helper process per scenario process."""

    def __init__(self, step_timeout: float = 5.0) -> None:
        self.step_timeout = step_timeout
        #: The pids of the last run's processes (anchor first), all gone once ``run`` returns.
        self.pids: list[int] = []

    def run(self, scenario: Scenario | dict[str, Any]) -> list[StepResult]:
        """Run ``scenario``: one result per step. A large-folio scenario runs under its THP
        settings (``thp_settings``), and a step during which a huge page fault fell back to
        smaller pages, or khugepaged collapsed pages, is marked ``unreliable``."""
        if isinstance(scenario, dict):
            scenario = Scenario.from_dict(scenario)
        thp = uses_thp(scenario)
        with thp_settings(scenario if thp else None):
            return self._run(scenario, thp)

    def _run(self, scenario: Scenario, thp: bool) -> list[StepResult]:
        self.pids = []
        # Fault threads are made at the start, in every process, only if the scenario has faults.
        threads = MAX_PENDING_FAULTS if any(st["op"] == "fault" for st in scenario.steps) else 0
        counters = thp_counters() if thp else {}
        run = _Run(list(scenario.processes), startup_timeout=max(15.0, self.step_timeout), fault_threads=threads)
        self.pids = run.pids
        addrs: dict[str, int] = {}
        regions: dict[str, tuple[int, int]] = {}  # name -> (start, pages), in binding order
        results: list[StepResult] = []
        try:
            for step in scenario.steps:
                res = self._step(run, scenario, addrs, step, regions)
                if thp:
                    now = thp_counters()
                    res.unreliable = thp_disturbance(counters, now)
                    counters = now
                results.append(res)
        finally:
            run.close()
        return results

    # -- one step ------------------------------------------------------------------------------

    @property
    def _wait(self) -> float:
        """How long a ``fault``, ``fault_status`` or ``events`` step waits for fault threads to settle."""
        return max(0.1, min(2.5, self.step_timeout / 2))

    def _step(
        self,
        run: _Run,
        sc: Scenario,
        addrs: dict[str, int],
        step: dict[str, Any],
        regions: dict[str, tuple[int, int]] | None = None,
    ) -> StepResult:
        regions = {} if regions is None else regions
        op = step["op"]
        name = step.get("proc", sc.processes[0] if sc.processes else None)
        proc = run.procs.get(name)  # type: ignore[arg-type]
        if proc is None or proc.gone:
            return StepResult(errno=errno.ESRCH, note="process gone")
        try:
            cmd = self._command(step, addrs)
            if op in ("fault", "fault_status", "events"):
                cmd["wait"] = self._wait
        except KeyError as e:
            return StepResult(errno=errno.EINVAL, note=f"region {e.args[0]!r} has no address")
        try:
            reply, fds = run.call(proc, cmd, self.step_timeout)
        except _Timeout:
            run.kill(proc)
            return StepResult(errno=errno.ETIMEDOUT, note="blocked")
        except _Gone:
            run.kill(proc)
            return StepResult(errno=errno.ESRCH, note="process gone")
        res = StepResult(errno=int(reply.get("errno", 0)), note=str(reply.get("note", "")))
        if op in ("mmap", "fill_vmas"):
            if "addr" in reply:
                res.addr = int(reply["addr"])
                res.guard = reply.get("guard") or None
                addrs[step["region"]] = res.addr
                regions.pop(step["region"], None)
                regions[step["region"]] = (res.addr, int(step["pages"]) if op == "mmap" else FILL_VMAS_PAGES)
        elif op == "mremap":
            if "addr" in reply:
                res.addr = int(reply["addr"])
                res.relocated = res.addr != cmd["addr"]
                if "region" in step:
                    addrs[step["region"]] = res.addr
                    regions.pop(step["region"], None)
                    regions[step["region"]] = (res.addr, int(step["new_pages"]))
        elif op == "copy":
            res.copied = int(reply.get("copied", 0))
        elif op == "zeropage":
            res.zeroed = int(reply.get("zeroed", 0))
        elif op == "fault_status":
            if "blocked" in reply:
                res.blocked = bool(reply["blocked"])
            res.value = reply.get("value")
        elif op == "events":
            res.events = [self._event(regions, *ev) for ev in reply.get("events", [])]
        elif op == "read":
            res.value = reply.get("value")
        elif op == "peek":
            res.present = bool(reply["present"]) if "present" in reply else None
            res.value = reply.get("value")
        elif op == "present":
            res.present = reply.get("present")
        elif op == "mapcount":
            res.present = reply.get("present")
            res.mapcount = reply.get("mapcount")
        elif op == "pte":
            for key in _PTE_FIELDS:
                setattr(res, key, reply.get(key))
        elif op == "move":
            res.moved = int(reply.get("moved", 0))
        elif op == "fork":
            if fds and "pid" in reply:
                chan = socket.socket(fileno=fds[0])
                for extra in fds[1:]:
                    os.close(extra)
                child = _Proc(step["child"], int(reply["pid"]), chan)
                run.procs[step["child"]] = child
                run.pids.append(child.pid)
            else:
                for fd in fds:
                    os.close(fd)
                res.errno = res.errno or errno.EIO
                res.note = res.note or "fork reply carried no channel"
        elif op == "exit":
            proc.gone = True
            if not _wait_gone(proc.pid, self.step_timeout):
                run.kill(proc)
                return StepResult(errno=errno.ETIMEDOUT, note="did not exit")
            proc.chan.close()
        return res

    @staticmethod
    def _event(regions: dict[str, tuple[int, int]], event: int, flags: int, address: int) -> list[Any]:
        """A userfaultfd message as ``[region, page, kind]``."""
        if event != UFFD_EVENT_PAGEFAULT:
            return ["?", 0, f"event-{event:#x}"]
        if flags & UFFD_PAGEFAULT_FLAG_WP:
            kind = "wp"
        else:
            kind = "w" if flags & UFFD_PAGEFAULT_FLAG_WRITE else "r"
        return event_entry(regions, address, kind)

    @staticmethod
    def _command(step: dict[str, Any], addrs: dict[str, int]) -> dict[str, Any]:
        op = step["op"]
        cmd: dict[str, Any] = {"op": op}
        if op == "mmap":
            cmd.update(len=int(step["pages"]) * PAGE, prot=step.get("prot", "rw"), uffd=step.get("uffd"))
            if "align" in step:
                cmd["align"] = step["align"]
        elif op == "fill_vmas":
            cmd.update(len=FILL_VMAS_PAGES * PAGE, leave=int(step["leave"]))
        elif op in ("munmap", "madvise", "uffd_register", "uffd_unregister", "mprotect"):
            cmd.update(addr=place(addrs, step["at"]), len=int(step["pages"]) * PAGE)
            if op == "madvise":
                cmd["advice"] = step["advice"]
            elif op == "uffd_register":
                cmd["mode"] = step["mode"]
            elif op == "mprotect":
                cmd["prot"] = step["prot"]
        elif op == "mremap":
            cmd.update(
                addr=place(addrs, step["at"]),
                len=int(step["pages"]) * PAGE,
                new_len=int(step["new_pages"]) * PAGE,
                flags=remap_flags(step),
                new_addr=place(addrs, step["to"]) if "to" in step else 0,
            )
        elif op == "copy":
            cmd.update(dst=place(addrs, step["dst"]), len=length(step), mode=copy_mode(step), values=copy_values(step))
        elif op == "zeropage":
            cmd.update(dst=place(addrs, step["dst"]), len=length(step), mode=copy_mode(step))
        elif op == "wake":
            cmd.update(addr=place(addrs, step["at"]), len=length(step))
        elif op == "fault":
            cmd.update(
                addr=place(addrs, step["at"]),
                id=step["id"],
                write=bool(step.get("write", False)),
                value=int(step.get("value", 0)),
            )
        elif op == "fault_status":
            cmd["id"] = step["id"]
        elif op == "write":
            cmd.update(addr=place(addrs, step["at"]), value=int(step["value"]))
        elif op in ("read", "peek", "present", "mapcount", "pte"):
            cmd["addr"] = place(addrs, step["at"])
        elif op == "pin":
            cmd.update(addr=place(addrs, step["at"]), len=int(step["pages"]) * PAGE, pin=step["pin"])
        elif op == "unpin":
            cmd["pin"] = step["pin"]
        elif op == "move":
            cmd.update(
                dst=place(addrs, step["dst"]),
                src=place(addrs, step["src"]),
                len=move_len(step),
                mode=move_mode(step),
            )
        return cmd


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--helper":
        return _anchor_main(json.loads(argv[1]))
    print("usage: python -m mmsim.server.tools.conformance.kernel --helper SPEC", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
