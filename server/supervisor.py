"""``mmsim serve --shards N``: a supervisor of N shard processes.

Each shard is ``mmsim serve --shard-index=i --supervised`` with the flags of the supervisor's
configuration (cli.serve_argv): its own OS process, event loop, gRPC server and model, listening on
PORT+i (each its own free port with port 0). The configuration reaches a shard through its command
line alone: the shard's environment lacks the variables of cli.SERVE_FLAGS, so that a setting the
supervisor took from one reaches the shard as a flag, and one the supervisor's command line
overrode does not come back. The supervisor itself holds no gRPC object at all: it starts the shards, feeds
each the deployment's topology on its standard input (topology.py), restarts a shard that exits
while the deployment runs under a new generation, and on SIGTERM or SIGINT has every shard drain
and stop.

A shard says it serves with one JSON line on its standard output, ``{"event": "ready", "address":
..., "generation": ...}``; its log goes to the supervisor's standard error as it is. Shards run in
their own session, so a terminal's Ctrl-C reaches the supervisor only, which then stops them in
order; a shard whose supervisor is gone (its standard input closes) stops too.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import structlog

from mmsim.v1.wire import join_hostport, split_hostport

from .cli import SERVE_FLAGS, serve_argv
from .topology import DOWN, SERVING, UNKNOWN, ShardInfo, new_generation

if TYPE_CHECKING:
    from .app import ServerConfig

log = structlog.get_logger("mmsim.supervisor")

#: Seconds a shard may take to start before the supervisor gives up on that start.
START_TIMEOUT = 60.0
#: Restart backoff: the first delay, the longest, and how long a shard must have run to reset it.
BACKOFF_FIRST, BACKOFF_MAX, BACKOFF_RESET = 0.1, 5.0, 10.0


class StartFailed(Exception):
    """A shard exited (or said nothing) before it served."""


def _with_port(listen: str, offset: int) -> str:
    """``HOST:PORT`` moved ``offset`` ports up (port 0 stays 0: each shard gets a free one)."""
    host, port = split_hostport(listen)
    return join_hostport(host, port + offset if port else 0)


def shard_environment() -> dict[str, str]:
    """The supervisor's environment less the variables of SERVE_FLAGS: a shard's settings are its flags."""
    config_vars = {env for _, env, _, _, _ in SERVE_FLAGS}
    return {k: v for k, v in os.environ.items() if k not in config_vars}


def _status(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


@dataclass
class Shard:
    """One shard as the supervisor runs it."""

    index: int
    listen: str
    metrics_listen: str
    info: ShardInfo
    proc: asyncio.subprocess.Process | None = None
    starts: int = 0
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    drain: asyncio.Future[None] | None = field(default=None, repr=False)  # reads its stdout


class Supervisor:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.environment = shard_environment()
        self.shards = [
            Shard(i, _with_port(config.listen, i),
                  _with_port(config.metrics_listen, i) if config.metrics_listen else "",
                  ShardInfo(i, _with_port(config.listen, i), 0, UNKNOWN))
            for i in range(config.shards)
        ]
        self.stopping = False
        self.ready = asyncio.Event()

    def shard_config(self, shard: Shard, generation: int) -> ServerConfig:
        """The supervisor's configuration as ``shard`` runs under ``generation``."""
        return replace(self.config, shards=1, shard_index=shard.index, listen=shard.listen, peers=(),
                       generation=generation, supervised=True, metrics_listen=shard.metrics_listen)

    def command(self, shard: Shard, generation: int) -> list[str]:
        """The command line of ``shard`` under ``generation``."""
        return [sys.executable, "-m", "mmsim.server", "serve", *serve_argv(self.shard_config(shard, generation))]

    # -- topology
    def topology_line(self) -> bytes:
        return (json.dumps({"shards": [s.info.to_json() for s in self.shards]}) + "\n").encode()

    def broadcast(self) -> None:
        """Tell every running shard the deployment's topology."""
        line = self.topology_line()
        for s in self.shards:
            if s.proc is not None and s.proc.returncode is None and s.proc.stdin is not None:
                try:
                    s.proc.stdin.write(line)
                except (BrokenPipeError, ConnectionResetError, RuntimeError):
                    pass  # it is exiting; its watcher sees that

    # -- one shard
    async def start(self, shard: Shard, generation: int) -> None:
        """Start ``shard`` under ``generation`` and wait until it serves; StartFailed if it does not."""
        proc = await asyncio.create_subprocess_exec(
            *self.command(shard, generation), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env=self.environment, start_new_session=True,
        )
        shard.proc = proc
        shard.starts += 1
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
            ready = json.loads(line) if line.startswith(b"{") else {}
        except (TimeoutError, ValueError):
            ready = {}
        if ready.get("event") != "ready":
            if proc.returncode is None:
                proc.kill()
            status = await proc.wait()
            raise StartFailed(f"shard {shard.index} did not start ({_status(status)})")
        address = str(ready["address"])
        if shard.listen.endswith(":0"):  # keep its port across restarts, so the topology stays
            shard.listen = address
        metrics = str(ready.get("metrics_address", "")) or shard.metrics_listen
        if shard.metrics_listen.endswith(":0") and metrics:
            shard.metrics_listen = metrics
        shard.info = ShardInfo(shard.index, address, int(ready["generation"]), SERVING, metrics)
        # Anything more it prints on stdout is drained, so that it never blocks on a full pipe.
        shard.drain = asyncio.ensure_future(self._drain(proc))  # held: the loop keeps tasks weakly

    @staticmethod
    async def _drain(proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while await proc.stdout.readline():
            pass

    async def watch(self, shard: Shard) -> None:
        """Restart ``shard`` each time it exits while the deployment runs, with backoff."""
        loop = asyncio.get_running_loop()
        delay = BACKOFF_FIRST
        while True:
            assert shard.proc is not None
            started = loop.time()
            status = await shard.proc.wait()
            if self.stopping:
                return
            shard.info = replace(shard.info, state=DOWN)
            log.warning("shard exited", shard=shard.index, generation=shard.info.generation, status=_status(status))
            self.broadcast()
            if loop.time() - started > BACKOFF_RESET:
                delay = BACKOFF_FIRST
            while not self.stopping:
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                if self.stopping:
                    return
                generation = new_generation(shard.info.generation)
                try:
                    await self.start(shard, generation)
                except StartFailed as e:
                    log.error("shard restart failed", shard=shard.index, generation=generation, error=str(e))
                    continue
                log.warning("shard restarted", shard=shard.index, generation=generation, address=shard.info.address)
                self.broadcast()
                break

    # -- the deployment
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()
        signals = 0

        def on_signal(sig: signal.Signals) -> None:
            nonlocal signals
            signals += 1
            log.info("signal", signal=sig.name, action="drain shards" if signals == 1 else "cancel calls")
            self.stopping = True
            for s in self.shards:  # a second signal reaches them as a second signal: cancel calls
                if s.proc is not None and s.proc.returncode is None:
                    s.proc.send_signal(signal.SIGTERM)
            stopped.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        first = new_generation()
        results = await asyncio.gather(*(self.start(s, first) for s in self.shards), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed or self.stopping:
            for s in self.shards:
                if s.proc is not None and s.proc.returncode is None:
                    s.proc.send_signal(signal.SIGTERM)
            await asyncio.gather(*(s.proc.wait() for s in self.shards if s.proc is not None))
            if failed:
                print(f"mmsim serve: {failed[0]}", file=sys.stderr)
                return 1
            return 0
        self.broadcast()
        for s in self.shards:
            s.task = asyncio.ensure_future(self.watch(s))
        log.info("serving", listen=self.shards[0].info.address, shards=[s.info.address for s in self.shards],
                 generation=first, metrics=[s.info.metrics_address for s in self.shards if s.info.metrics_address])
        await stopped.wait()
        exited = [(s, s.proc) for s in self.shards if s.proc is not None]
        statuses = await asyncio.gather(*(proc.wait() for _, proc in exited))
        for s in self.shards:
            if s.task is not None:
                s.task.cancel()
        bad = {s.index: _status(st) for (s, _), st in zip(exited, statuses, strict=True) if st != 0}
        log.info("stopped", shards=len(self.shards), **({"failed": bad} if bad else {}))
        return 0


def exposure(config: ServerConfig) -> str | None:
    """Why the shards would refuse to listen where they are told (auth.exposure_refusal), said once
    here rather than by each shard; None when they may."""
    from .auth import exposure_refusal

    host, port = split_hostport(config.listen)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return None  # each shard says it cannot listen there
    addresses = [join_hostport(str(i[4][0]), port) for i in infos]
    return exposure_refusal(addresses, tls=bool(config.tls_cert), token=bool(config.token_file),
                            insecure=config.insecure)


def supervise(config: ServerConfig) -> int:
    """Run the supervisor until SIGTERM or SIGINT; the exit status (0, or 1 if a shard could not
    start)."""
    if (why := exposure(config)) is not None:
        print(f"mmsim serve: {why}", file=sys.stderr)
        return 1
    return asyncio.run(Supervisor(config).run())
