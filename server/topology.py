"""Which shard this server is, and what it knows of the other shards of its deployment.

A deployment of N shards serves one model sharded by process tree: each shard is a separate
``mmsim serve`` process, with its own event loop, gRPC server and model. Shard ``i`` has an index
(fixed for the deployment) and a *generation*: a number that grows with every start of that shard,
so that a handle issued before a restart is told apart from one issued after it. Handles carry both
(handles.py).

Under ``mmsim serve --shards N`` the supervisor (supervisor.py) knows every shard's address,
generation and state, and feeds them to each shard on its standard input, one JSON document per
line (``{"shards": [{"index": 0, "address": ..., "generation": ..., "state": "serving",
"metrics_address": ...}, ...]}``). Shards started one by one (docker-compose) are told their peers'
addresses with ``--peers`` and know only their own generation and state.

What the supervisor says is not the whole story: a shard that is stopped (SIGSTOP) or hung neither
exits nor answers. Each shard therefore also probes its peers (:class:`PeerProbe`: the standard
gRPC health check, every second or so) and reports a peer that stops answering as down, and up
again once it answers. A peer the supervisor reports down stays down until the supervisor says it
is back and it answers.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

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
        #: Every shard as this one sees it: what it was told, with the probe's findings (_seen).
        self.shards: list[ShardInfo] = list(shards)
        #: Every shard as the supervisor (or ``--peers``) tells.
        self._told: list[ShardInfo] = list(shards)
        #: Peer index -> whether it answered its latest probes; absent: not probed yet.
        self._answers: dict[int, bool] = {}
        #: Whether some probe was answered (see probed).
        self.probe_works = False
        self._probe: PeerProbe | None = None
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
        """The supervisor's view replaces what it told before; this shard's own entry stays as it
        knows itself. While the probe works, a peer it now reports down must also answer a probe
        again before it is up."""
        told = sorted(shards, key=lambda s: s.index)
        was_down = {s.index for s in self._told if s.state == DOWN}
        for s in told:
            if s.state == DOWN and s.index not in was_down and self.probe_works:
                self._answers[s.index] = False
        self._told = told
        self._refresh()

    def probed(self, index: int, answers: bool) -> None:
        """What the probe found of shard ``index``: it answers, or it failed enough probes in a
        row. An answer from any shard, this one included, shows that the probe gets through
        (``probe_works``); until one does, failures change nothing, since a probe that never
        got through cannot tell a down peer from one it cannot talk to (say, a TLS peer that
        refuses this shard's certificate): peers stay as the supervisor tells."""
        if answers:
            self.probe_works = True
        if index == self.index or self._answers.get(index) == answers or not (answers or self.probe_works):
            return
        self._answers[index] = answers
        self._refresh()

    def _seen(self, told: ShardInfo) -> ShardInfo:
        """A peer's entry as told, with the state the probe found where it found one: down while
        told down or not answering, else serving once it answered."""
        answers = self._answers.get(told.index)
        if answers is None or told.state == DOWN:
            return told
        state = SERVING if answers else DOWN
        return told if told.state == state else replace(told, state=state)

    def _refresh(self) -> None:
        """Recompute ``shards`` and tell ``on_change`` of each peer whose entry changed."""
        old = {s.index: s for s in self.shards}
        me = self.shard(self.index)
        self.shards = [me if s.index == self.index and me is not None else self._seen(s) for s in self._told]
        for s in self.shards:
            if s.index != self.index and old.get(s.index) != s and self.on_change is not None:
                self.on_change(s)

    def start_probe(self, interval: float, failures: int,
                    credentials: grpc.ChannelCredentials | None = None) -> None:
        """Probe every peer from now on (:class:`PeerProbe`), in the running event loop."""
        if self._probe is None:
            self._probe = PeerProbe(self, interval, failures, credentials)
            self._probe.start()

    async def stop_probe(self) -> None:
        """Stop probing the peers: the probe's task ends, its channels close."""
        probe, self._probe = self._probe, None
        if probe is not None:
            await probe.stop()

    def to_pb(self) -> pb.Topology:
        return pb.Topology(shards=[s.to_pb() for s in self.shards], shard=self.index)


def peer_credentials(cert_file: str, key_file: str, client_ca_file: str = "") -> grpc.ChannelCredentials | None:
    """The credentials a shard serving TLS with ``cert_file`` and ``key_file`` probes its peers
    with (None: plaintext, without ``cert_file``). A peer's certificate is checked against this
    shard's own chain (peers of one deployment serve the same certificate) and the client CAs of
    ``client_ca_file``; with those (mutual TLS) this shard presents its own certificate as a
    client's, which peers accept if it is signed by one of their client CAs for client use. The
    health check needs no token."""
    if not cert_file:
        return None
    chain = Path(cert_file).read_bytes()
    roots = chain + (b"\n" + Path(client_ca_file).read_bytes() if client_ca_file else b"")
    if client_ca_file:
        return grpc.ssl_channel_credentials(roots, Path(key_file).read_bytes(), chain)
    return grpc.ssl_channel_credentials(roots)


#: The longest wait between two health checks of a shard by itself that went unanswered.
SELF_CHECK_WAIT_MAX = 60.0


class PeerProbe:
    """Checks every peer's health (``grpc.health.v1.Health/Check`` of the whole server) every
    ``interval`` seconds, all peers at once, each with ``interval`` as its deadline, and tells the
    topology (:meth:`Topology.probed`): a peer that answers SERVING answers; one that fails
    ``failures`` checks in a row (no answer in time, unreachable, or not SERVING: it is draining)
    does not. First this shard checks itself the same way until it answers, which shows that the
    checks get through (``Topology.probe_works``: the right credentials). One channel per peer,
    reconnecting at most ``interval`` seconds apart once the peer is back."""

    def __init__(self, topology: Topology, interval: float, failures: int,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        if interval <= 0 or failures <= 0:
            raise ValueError("the probe interval and failure count must be positive")
        self.topology = topology
        self.interval = interval
        self.failures = failures
        self.credentials = credentials
        self._channels: dict[int, tuple[str, grpc.aio.Channel]] = {}
        self._missed: dict[int, int] = {}  # peer index -> checks failed in a row
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start probing in the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="mmsim-peer-probe")

    async def stop(self) -> None:
        """Cancel the probing (and a check in progress, by its task) and close the channels."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        channels, self._channels = list(self._channels.values()), {}
        for _, channel in channels:
            await channel.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        await self._check_self()
        next_round = loop.time()
        while True:
            me = self.topology.index
            peers = [s for s in self.topology.shards if s.index != me and s.address]
            await asyncio.gather(*(self._check(s) for s in peers))
            next_round = max(next_round + self.interval, loop.time())
            await asyncio.sleep(next_round - loop.time())

    async def _check_self(self) -> None:
        """Check this shard itself until it answers, waiting twice as long after each failure (at
        most SELF_CHECK_WAIT_MAX): until it does, the checks are not known to get through (over
        mutual TLS, a certificate not for client use is refused), and peers are not checked."""
        me = self.topology.index
        wait = self.interval
        while True:
            own = self.topology.shard(me)
            if own is not None and own.address:
                await self._check(own)
            if self.topology.probe_works:
                break
            await asyncio.sleep(wait)
            wait = min(2 * wait, SELF_CHECK_WAIT_MAX)
        own_channel = self._channels.pop(me, None)
        if own_channel is not None:
            await own_channel[1].close()

    async def _channel(self, peer: ShardInfo) -> grpc.aio.Channel:
        """The channel to ``peer``'s address (a new one if its address changed)."""
        known = self._channels.get(peer.index)
        if known is not None and known[0] == peer.address:
            return known[1]
        if known is not None:  # no check of this peer is in progress: they go one after another
            del self._channels[peer.index]
            await known[1].close()
        backoff = max(100, round(self.interval * 1000))
        options = [("grpc.enable_retries", 0), ("grpc.use_local_subchannel_pool", 1),
                   ("grpc.initial_reconnect_backoff_ms", backoff), ("grpc.min_reconnect_backoff_ms", backoff),
                   ("grpc.max_reconnect_backoff_ms", backoff)]
        channel = (grpc.aio.insecure_channel(peer.address, options=options) if self.credentials is None
                   else grpc.aio.secure_channel(peer.address, self.credentials, options=options))
        self._channels[peer.index] = (peer.address, channel)
        return channel

    async def _check(self, peer: ShardInfo) -> None:
        """One health check of ``peer``, and what it means for the topology."""
        stub = health_pb2_grpc.HealthStub(await self._channel(peer))
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.interval)  # type: ignore[attr-defined]  # the stubs' HealthStub has no methods
            why = None if reply.status == health_pb2.HealthCheckResponse.SERVING else \
                health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as e:
            why = f"{e.code().name}: {' '.join((e.details() or '').split())}"
        missed = 0 if why is None else self._missed.get(peer.index, 0) + 1
        if peer.index == self.topology.index:
            if missed == self.failures:
                log.warning("this shard does not answer its own health check: its peers are not checked, "
                            "and reported as the supervisor tells", address=peer.address, checks=missed, error=why)
            elif why is None and self._missed.get(peer.index, 0) >= self.failures:
                log.info("this shard answers its own health check: its peers are checked", address=peer.address)
        elif why is None and self._missed.get(peer.index, 0) >= self.failures:
            log.info("peer answers again", shard=peer.index, address=peer.address)
        elif missed == self.failures:
            log.warning("peer does not answer", shard=peer.index, address=peer.address, checks=missed, error=why)
        self._missed[peer.index] = missed
        if why is None:
            self.topology.probed(peer.index, True)
        elif missed >= self.failures:
            self.topology.probed(peer.index, False)


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
