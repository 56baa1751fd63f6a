"""Which shard this server is, and what it knows of the other shards of its deployment.

A deployment of N shards serves one model sharded by process tree: each shard is a separate
``mmsim serve`` process, with its own event loop, gRPC server and model. Shard ``i`` has an index
(fixed for the deployment) and a *generation*: a number that grows with every start of that shard,
so that a handle issued before a restart is told apart from one issued after it. Handles carry both
(service.py).

Under ``mmsim serve --shards N`` the supervisor (supervisor.py) knows every shard's address,
generation and state, and feeds them to each shard on its standard input, one JSON document per
line (``{"shards": [{"index": 0, "address": ..., "generation": ..., "state": "serving",
"metrics_address": ...}, ...]}``). Shards started one by one (docker-compose) are told their peers'
addresses with ``--peers`` and know only their own generation and state.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import structlog

from mmsim.v1 import mmsim_pb2 as pb

log = structlog.get_logger("mmsim.server")

#: The largest shard index a handle may carry (three decimal digits).
MAX_SHARDS = 1000

SERVING = "serving"
DOWN = "down"
UNKNOWN = "unknown"
STATE_TO_PB = {SERVING: pb.SHARD_STATE_SERVING, DOWN: pb.SHARD_STATE_DOWN, UNKNOWN: pb.SHARD_STATE_UNSPECIFIED}


def new_generation(previous: int = 0) -> int:
    """A generation for a shard starting now: the wall-clock time in milliseconds, and in any case
    more than ``previous``, so that generations grow across restarts of a shard."""
    return max(time.time_ns() // 1_000_000, previous + 1)


@dataclass(frozen=True)
class ShardInfo:
    index: int
    address: str
    generation: int = 0  # 0: not known here
    state: str = UNKNOWN
    metrics_address: str = ""

    def to_pb(self) -> pb.ShardInfo:
        return pb.ShardInfo(index=self.index, address=self.address, generation=self.generation,
                            state=STATE_TO_PB[self.state], metrics_address=self.metrics_address)

    @classmethod
    def from_json(cls, d: dict[str, object]) -> ShardInfo:
        return cls(int(d["index"]), str(d["address"]), int(d.get("generation", 0)),  # type: ignore[call-overload]
                   str(d.get("state", UNKNOWN)), str(d.get("metrics_address", "")))

    def to_json(self) -> dict[str, object]:
        return {"index": self.index, "address": self.address, "generation": self.generation,
                "state": self.state, "metrics_address": self.metrics_address}


class Topology:
    """This shard's identity (``index``, ``generation``) and its view of the deployment."""

    def __init__(self, index: int, generation: int, shards: Sequence[ShardInfo]) -> None:
        if not 0 <= index < MAX_SHARDS:
            raise ValueError(f"the shard index must be within [0, {MAX_SHARDS})")
        self.index = index
        self.generation = generation
        self.shards: list[ShardInfo] = list(shards)
        #: Called with the ShardInfo of each peer whose entry changes (the health service's feed).
        self.on_change: Callable[[ShardInfo], object] | None = None

    @classmethod
    def standalone(cls, index: int, generation: int, address: str, peers: Sequence[str] = (),
                   metrics_address: str = "") -> Topology:
        """A shard started on its own: ``peers`` are the addresses of every shard in index order
        (empty: this shard alone)."""
        # Without peers the others are not known yet (a supervised shard learns them on stdin).
        addresses = list(peers) or [""] * index + [address]
        if index >= len(addresses):
            raise ValueError(f"shard index {index} is not among the {len(addresses)} peers")
        shards = [ShardInfo(i, a) for i, a in enumerate(addresses)]
        shards[index] = ShardInfo(index, addresses[index], generation, SERVING, metrics_address)
        return cls(index, generation, shards)

    def shard(self, index: int) -> ShardInfo | None:
        return self.shards[index] if 0 <= index < len(self.shards) else None

    def set_self(self, address: str, metrics_address: str = "") -> None:
        """Where this shard turned out to serve (its port may have been chosen at start)."""
        me = self.shard(self.index)
        if me is not None and (me.address.endswith(":0") or not me.address):
            self.shards[self.index] = replace(me, address=address)
        me = self.shards[self.index]
        self.shards[self.index] = replace(me, generation=self.generation, state=SERVING,
                                          metrics_address=metrics_address or me.metrics_address)

    def update(self, shards: Sequence[ShardInfo]) -> None:
        """The supervisor's view replaces ours; this shard's own entry stays as it knows itself."""
        old = {s.index: s for s in self.shards}
        me = self.shard(self.index)
        self.shards = [me if s.index == self.index and me is not None else s for s in sorted(shards, key=lambda s: s.index)]
        for s in self.shards:
            if s.index != self.index and old.get(s.index) != s and self.on_change is not None:
                self.on_change(s)

    def to_pb(self) -> pb.Topology:
        return pb.Topology(shards=[s.to_pb() for s in self.shards], shard=self.index)


async def follow_supervisor(topology: Topology, on_eof: Callable[[], object]) -> None:
    """Apply the topologies the supervisor writes on our standard input, until it closes it (it
    exited: ``on_eof`` stops this shard, so that no shard outlives its supervisor)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        try:
            doc = json.loads(line)
            topology.update([ShardInfo.from_json(d) for d in doc["shards"]])
        except (ValueError, KeyError, TypeError) as e:
            log.warning("bad topology from the supervisor", error=str(e))
    on_eof()
