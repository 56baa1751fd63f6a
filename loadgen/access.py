"""How the load generator reaches a deployment: its targets, how calls are routed, and the
credential files, as plain data that crosses into the worker processes (each builds its own
credentials from the files: gRPC objects never cross processes)."""

from __future__ import annotations

from dataclasses import dataclass

from mmsim.client import Client, read_token, tls_credentials

#: Channel arguments: a shard that restarts is reached again within a second of its serving again
#: (gRPC's own reconnect backoff grows to minutes). The minimum backoff, which is also the least a
#: connection attempt is given, stays gRPC's.
RECONNECT: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


@dataclass(frozen=True)
class Access:
    """The targets and credentials of a run.

    One target: the client discovers the deployment (``routing`` "auto"), or is told what the
    runner found ("direct", "proxy"), and routes each process's calls to its shard. Several targets:
    "static", one channel each, no discovery. TLS is on when ``tls_ca`` or ``tls_cert`` is given.
    """

    targets: tuple[str, ...]
    routing: str = "auto"
    token_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    def client(self, *, timeout: float | None, retries: int) -> Client:
        """A new client of the deployment, with the credentials (read from their files now)."""
        credentials = tls_credentials(self.tls_ca, self.tls_cert, self.tls_key) if self.tls else None
        token = read_token(self.token_file) if self.token_file else None
        if len(self.targets) == 1:
            routing = self.routing if self.routing in ("direct", "proxy") else "auto"
            return Client(self.targets[0], timeout=timeout, retries=retries, credentials=credentials, token=token,
                          routing=routing, options=RECONNECT)
        return Client(list(self.targets), timeout=timeout, retries=retries, credentials=credentials, token=token,
                      options=RECONNECT)


__all__ = ["RECONNECT", "Access"]
