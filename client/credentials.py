"""Credentials for the SDK, the load generator and the pytest plugin: TLS (optionally with a client
certificate, for mutual TLS) and the bearer token."""

from __future__ import annotations

from pathlib import Path

import grpc

# One reader of token files for the server and its clients (the same rules on both sides).
from mmsim.v1.wire import CredentialsError, read_token


def tls_credentials(ca_file: str | None = None, cert_file: str | None = None,
                    key_file: str | None = None) -> grpc.ChannelCredentials:
    """TLS channel credentials: trust the PEM CA certificates in ``ca_file`` (default: the
    system's), and present the client certificate ``cert_file`` with its key ``key_file`` (mutual
    TLS) when given."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate and its key go together")
    ca = Path(ca_file).read_bytes() if ca_file else None
    key = Path(key_file).read_bytes() if key_file else None
    cert = Path(cert_file).read_bytes() if cert_file else None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


__all__ = ["CredentialsError", "read_token", "tls_credentials"]
