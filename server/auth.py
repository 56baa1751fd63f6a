"""Access control for ``mmsim serve``: TLS (mutual with a client CA), a bearer token, and the
refusal to listen beyond loopback with neither."""

from __future__ import annotations

import hmac
import ipaddress
import ssl
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

from mmsim.v1.wire import CredentialsError, read_token, split_hostport

#: Methods answered without a token: orchestrators probe health without secrets.
EXEMPT_PREFIX = "/grpc.health.v1.Health/"


def server_credentials(cert_file: str, key_file: str, client_ca_file: str | None = None) -> grpc.ServerCredentials:
    """TLS server credentials from the PEM certificate chain ``cert_file`` and its key
    ``key_file``; with ``client_ca_file``, mutual TLS: clients must present a certificate signed by
    one of its PEM CA certificates. Files that do not load are a :class:`CredentialsError` here,
    checked with the standard library's OpenSSL, rather than a failed bind later."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file, password=lambda: b"")  # never a passphrase prompt
    except ssl.SSLError as e:
        why = _ssl_reason(e, "not a PEM certificate chain and its unencrypted private key")
        raise CredentialsError(
            f"cannot use the TLS certificate {cert_file!r} with the key {key_file!r}: {why}") from None
    if client_ca_file:
        try:
            context.load_verify_locations(client_ca_file)
        except ssl.SSLError as e:
            why = _ssl_reason(e, "not PEM CA certificates")
            raise CredentialsError(f"cannot use the client CA file {client_ca_file!r}: {why}") from None
    chain = Path(cert_file).read_bytes()
    key = Path(key_file).read_bytes()
    ca = Path(client_ca_file).read_bytes() if client_ca_file else None
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=ca, require_client_auth=ca is not None)


def _ssl_reason(e: ssl.SSLError, default: str) -> str:
    reason = e.reason if isinstance(e.reason, str) and e.reason != "PEM_LIB" else None
    return reason.lower().replace("_", " ") if reason else default


def _refuse(message: str) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return refuse


def _refuse_stream(message: str) -> Callable[[Any, grpc.aio.ServicerContext], Any]:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # an async generator, as the handlers it stands for

    return refuse


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that answers UNAUTHENTICATED; it parses no request (raw bytes)."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_refuse(message))
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_refuse_stream(message))
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_refuse(message))
    return grpc.stream_stream_rpc_method_handler(_refuse_stream(message))


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with the metadata ``authorization: Bearer TOKEN``; any other call
    is answered UNAUTHENTICATED ("missing bearer token" or "wrong bearer token"). Health checks
    (``/grpc.health.v1.Health/*``) are exempt; server reflection is not."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the bearer token is empty")
        self._token = token.encode()

    def check(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        """None if ``metadata`` carries the token, else why not."""
        value = next((v for k, v in metadata or () if k == "authorization"), None)
        if isinstance(value, str):
            value = value.encode()
        if value is None or value[:7].lower() != b"bearer ":
            return "missing bearer token"
        if not hmac.compare_digest(value[7:].strip(b" "), self._token):
            return "wrong bearer token"
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None or details.method.startswith(EXEMPT_PREFIX):
            return handler
        why = self.check(details.invocation_metadata)
        return handler if why is None else _refusal(handler, why)


def exposure_refusal(addresses: Iterable[str], *, tls: bool, token: bool, insecure: bool) -> str | None:
    """Why not to listen on ``addresses`` (``IP:PORT`` or ``[IPv6]:PORT``), or None: one of them is
    not loopback and there is neither TLS nor a token, nor ``insecure``."""
    if tls or token or insecure:
        return None
    for address in addresses:
        host, _ = split_hostport(address)
        if not ipaddress.ip_address(host.split("%")[0]).is_loopback:
            return (f"refusing to listen on {address} (not loopback) without TLS or a token; "
                    "give --tls-cert/--tls-key or --token-file, or --insecure")
    return None


__all__ = ["EXEMPT_PREFIX", "CredentialsError", "TokenInterceptor", "exposure_refusal", "read_token",
           "server_credentials"]
