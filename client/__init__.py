"""The Python client SDK of mmsim.

Example::

    from mmsim.client import Client, ops

    async with Client("127.0.0.1:7077") as mm:
        p = await mm.create_process()
        v = await p.mmap(8 * 4096, prot="rw")
        await p.write(v.start, 42)
        child = await p.fork()
        print(await p.walk(v.start), await child.read(v.start))
"""

from . import ops
from ._client import BatchStream, Client, Pin, Process, Result, Timeout
from ._types import AnonVma, FolioInfo, PagemapEntry, ThpSettings, UserfaultEvent, Userfaults, Vma, WalkResult
from .credentials import read_token, tls_credentials
from .errors import (
    DeadlineExceededError,
    InvalidRequestError,
    LimitExceededError,
    MmsimError,
    ProcessNotFoundError,
    ServerUnavailableError,
    ShardRestartedError,
    UnauthenticatedError,
    WrongShardError,
)

__all__ = [
    "AnonVma",
    "BatchStream",
    "Client",
    "DeadlineExceededError",
    "FolioInfo",
    "InvalidRequestError",
    "LimitExceededError",
    "MmsimError",
    "PagemapEntry",
    "Pin",
    "Process",
    "ProcessNotFoundError",
    "Result",
    "ServerUnavailableError",
    "ShardRestartedError",
    "ThpSettings",
    "Timeout",
    "UnauthenticatedError",
    "UserfaultEvent",
    "Userfaults",
    "Vma",
    "WalkResult",
    "WrongShardError",
    "ops",
    "read_token",
    "tls_credentials",
]
