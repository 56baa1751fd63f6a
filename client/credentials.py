"""Credentials for the SDK, the load generator and the pytest plugin: TLS (optionally with a client
certificate, for mutual TLS) and the bearer token."""

from __future__ import annotations

from pathlib import Path

import grpc


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


def read_token(path: str) -> str:
    """The bearer token in the file ``path``: its content, surrounding white space removed."""
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"the token file {path!r} is empty")
    if any(c.isspace() or not c.isprintable() or not c.isascii() for c in token):
        raise ValueError(f"the token file {path!r} holds white space or non-printable characters")
    return token


__all__ = ["read_token", "tls_credentials"]
