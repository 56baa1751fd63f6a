"""Access control: the bearer token, TLS and mutual TLS, and the refusal to listen beyond loopback
without either; the certificates are made at test time (mmsim.client.testing)."""

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mmsim.client import Client, ServerUnavailableError, UnauthenticatedError, tls_credentials
from mmsim.client import read_token as client_read_token
from mmsim.client.testing import serve_in_process, serve_subprocess, write_test_certificates
from mmsim.server.app import RequestContextInterceptor
from mmsim.server.auth import (
    CredentialsError,
    TokenInterceptor,
    exposure_refusal,
    read_token,
    server_credentials,
)

TOKEN = "s3cret-token-0123456789"
REFUSAL = ("mmsim serve: refusing to listen on 0.0.0.0:0 (not loopback) without TLS or a token; "
           "give --tls-cert/--tls-key or --token-file, or --insecure\n")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {k: str(v) for k, v in write_test_certificates(tmp_path_factory.mktemp("certs")).items()}


@pytest.fixture
def token_file(tmp_path: Path) -> str:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return str(path)


async def _use(mm: Client) -> None:
    """The calls every test that should pass makes: a process, a mapping, a write and a read."""
    p = await mm.create_process()
    vma = await p.mmap(4096)
    await p.write(vma.start, 42)
    assert await p.read(vma.start) == 42


def _client(addr: str | Sequence[str], **kw: Any) -> Client:
    return Client(addr, timeout=10, retries=0, **kw)


# -- the pieces


def test_exposure_refusal() -> None:
    assert exposure_refusal(["127.0.0.1:7077", "[::1]:7077"], tls=False, token=False, insecure=False) is None
    why = exposure_refusal(["127.0.0.1:7077", "0.0.0.0:7077"], tls=False, token=False, insecure=False)
    assert why == ("refusing to listen on 0.0.0.0:7077 (not loopback) without TLS or a token; "
                   "give --tls-cert/--tls-key or --token-file, or --insecure")
    assert "[::]:7077" in (exposure_refusal(["[::]:7077"], tls=False, token=False, insecure=False) or "")
    assert exposure_refusal(["10.1.2.3:1"], tls=False, token=False, insecure=False) is not None
    for kw in ({"tls": True}, {"token": True}, {"insecure": True}):
        assert exposure_refusal(["0.0.0.0:7077"], **{"tls": False, "token": False, "insecure": False, **kw}) is None


def test_token_files_follow_one_rule_in_server_and_sdk(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    assert read_token(str(path)) == client_read_token(str(path)) == TOKEN
    for bad in ("", " \n", "two words", "tab\tinside", "caf\u00e9"):
        path.write_text(bad)
        for reader in (read_token, client_read_token):
            with pytest.raises(ValueError) as e:
                reader(str(path))
            assert bad.strip() not in str(e.value) or not bad.strip()


def test_credentials_that_do_not_load_are_an_error_before_binding(certs: dict[str, str]) -> None:
    with pytest.raises(CredentialsError, match="key values mismatch"):
        server_credentials(certs["server_cert"], certs["client_key"])
    with pytest.raises(CredentialsError, match="not a PEM certificate chain"):
        server_credentials(certs["server_key"], certs["server_key"])
    with pytest.raises(CredentialsError, match="client CA file"):
        server_credentials(certs["server_cert"], certs["server_key"], certs["server_key"])
    assert isinstance(server_credentials(certs["server_cert"], certs["server_key"], certs["ca"]),
                      grpc.ServerCredentials)


async def test_every_handler_kind_is_refused_without_the_token() -> None:
    """The refusal keeps the handler's kind, inside the access log's interceptor."""

    async def uu(request: bytes, context: Any) -> bytes:
        return request

    async def us(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield request

    async def su(requests: AsyncIterator[bytes], context: Any) -> bytes:
        return b"".join([r async for r in requests])

    async def ss(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for r in requests:
            yield r

    server = grpc.aio.server(interceptors=[RequestContextInterceptor(), TokenInterceptor(TOKEN)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {
        "UU": grpc.unary_unary_rpc_method_handler(uu),
        "US": grpc.unary_stream_rpc_method_handler(us),
        "SU": grpc.stream_unary_rpc_method_handler(su),
        "SS": grpc.stream_stream_rpc_method_handler(ss),
    }),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            # Refused streams get no request: a client write that meets the early end of the call
            # turns its status into INTERNAL on grpc.aio clients (grpc/grpc#36066).
            unary_unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary("/t.T/UU")
            unary_stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = ch.unary_stream("/t.T/US")
            calls: dict[str, Callable[[Any], Awaitable[Any]]] = {
                "UU": lambda md: unary_unary(b"x", metadata=md, timeout=10),
                "US": lambda md: _collect(unary_stream(b"x", metadata=md, timeout=10)),
                "SU": lambda md: _written(ch.stream_unary("/t.T/SU")(metadata=md, timeout=10), md, unary=True),
                "SS": lambda md: _written(ch.stream_stream("/t.T/SS")(metadata=md, timeout=10), md),
            }
            right = (("authorization", f"Bearer {TOKEN}"),)
            assert await calls["UU"](right) == b"x"
            assert await calls["US"](right) == [b"x"]
            assert await calls["SU"](right) == b"xy"
            assert await calls["SS"](right) == [b"x", b"y"]
            cases = [((), "missing bearer token"), ((("authorization", f"Basic {TOKEN}"),), "missing bearer token"),
                     ((("authorization", "Bearer nope"),), "wrong bearer token"),
                     ((("authorization", f"Bearer {TOKEN}x"),), "wrong bearer token")]
            for name, call in calls.items():
                for md, message in cases:
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await call(md)
                    assert (e.value.code(), e.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, message), name
    finally:
        await server.stop(None)


async def _collect(call: Any) -> list[Any]:
    return [r async for r in call]


async def _written(call: Any, metadata: Any, unary: bool = False) -> Any:
    """Write b"x" and b"y" to a streaming-request call (with the token only), half-close, and
    return what it answers."""
    if metadata and metadata[0][1] == f"Bearer {TOKEN}":
        await call.write(b"x")
        await call.write(b"y")
    await call.done_writing()
    return await call if unary else await _collect(call)


# -- the token


async def test_the_token_lets_calls_through_and_its_absence_does_not(token_file: str) -> None:
    async with serve_in_process(token_file=token_file) as addr:
        async with _client(addr, token=TOKEN) as mm:
            await _use(mm)
            handle = (await mm.create_process()).id
        for token, message in ((None, "missing bearer token"), ("wrong", "wrong bearer token")):
            async with _client(addr, token=token) as mm:
                with pytest.raises(UnauthenticatedError) as e:
                    await mm.create_process()
                assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and e.value.details == message
                assert TOKEN not in str(e.value)
            # A stream (no discovery with a list of targets) is refused too, before any request.
            async with _client([addr], token=token) as mm:
                with pytest.raises(UnauthenticatedError):
                    async with mm.batch_stream() as stream:
                        await stream.recv()
        # A handle is no way around it.
        async with grpc.aio.insecure_channel(addr) as ch:
            from mmsim.v1 import mmsim_pb2 as pb
            from mmsim.v1 import mmsim_pb2_grpc

            with pytest.raises(grpc.aio.AioRpcError) as rpc:
                await mmsim_pb2_grpc.MemoryManagerStub(ch).ListVmas(pb.ProcessRequest(process=handle), timeout=10)
            assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_health_is_exempt_and_reflection_is_not(token_file: str) -> None:
    async with serve_in_process(token_file=token_file) as addr:
        async with grpc.aio.insecure_channel(addr) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)  # type: ignore[attr-defined]  # the stubs' HealthStub has no methods
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            watch = health.Watch(health_pb2.HealthCheckRequest(service="mmsim.v1.MemoryManager"), timeout=10)  # type: ignore[attr-defined]  # the stubs' HealthStub has no methods
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
            reflect = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(  # type: ignore[arg-type, operator]  # the stubs' reflection stub is for a sync channel
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _collect(reflect)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


# -- TLS


async def test_tls(certs: dict[str, str]) -> None:
    async with serve_in_process(tls_cert=certs["server_cert"], tls_key=certs["server_key"]) as addr:
        async with _client(addr, credentials=tls_credentials(certs["ca"])) as mm:
            await _use(mm)
        async with _client(addr) as mm:  # plaintext to a TLS server
            with pytest.raises(ServerUnavailableError):
                await mm.ping()
        async with _client(addr, credentials=tls_credentials(certs["other_ca"])) as mm:
            with pytest.raises(ServerUnavailableError):
                await mm.ping()


async def test_mutual_tls(certs: dict[str, str]) -> None:
    async with serve_in_process(tls_cert=certs["server_cert"], tls_key=certs["server_key"],
                                tls_client_ca=certs["ca"]) as addr:
        async with _client(addr, credentials=tls_credentials(certs["ca"], certs["client_cert"],
                                                             certs["client_key"])) as mm:
            await _use(mm)
        for creds in (tls_credentials(certs["ca"]),
                      tls_credentials(certs["ca"], certs["other_client_cert"], certs["other_client_key"])):
            async with _client(addr, credentials=creds) as mm:
                with pytest.raises(ServerUnavailableError):
                    await mm.ping()


# -- mmsim serve


def _serve(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "mmsim.server", "serve", "--log-format", "json", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def stopped() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes to kill at the end if a test left them running."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_a_non_loopback_listen_without_tls_or_token_is_refused(stopped: list[subprocess.Popen[str]]) -> None:
    proc = _serve("--listen", "0.0.0.0:0")
    stopped.append(proc)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (1, REFUSAL)


async def test_a_non_loopback_listen_with_a_token_serves(token_file: str) -> None:
    with serve_subprocess("--listen", "0.0.0.0:0", "--token-file", token_file) as server:
        assert server.addr.startswith("0.0.0.0:")
        async with _client(f"127.0.0.1:{server.addr.rsplit(':', 1)[1]}", token=TOKEN) as mm:
            await _use(mm)


async def test_tls_and_token_from_the_command_line(
    certs: dict[str, str], token_file: str, stopped: list[subprocess.Popen[str]]
) -> None:
    proc = _serve("--listen", "127.0.0.1:0", "--tls-cert", certs["server_cert"], "--tls-key", certs["server_key"],
                  "--token-file", token_file)
    stopped.append(proc)
    assert proc.stderr is not None
    serving = json.loads(await asyncio.to_thread(proc.stderr.readline))
    assert serving["event"] == "serving" and (serving["tls"], serving["token"]) == ("on", True)
    creds = tls_credentials(certs["ca"])
    async with _client(serving["listen"], credentials=creds, token=TOKEN) as mm:
        await _use(mm)
    async with _client(serving["listen"], credentials=creds) as mm:
        with pytest.raises(UnauthenticatedError):
            await mm.ping()
    async with _client(serving["listen"], token=TOKEN) as mm:  # the token alone, in plaintext
        with pytest.raises(ServerUnavailableError):
            await mm.ping()
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 0
    assert TOKEN not in err
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]  # not gRPC core's own
    refused = [r for r in records if r.get("code") == "UNAUTHENTICATED"]
    assert refused and refused[0]["event"] == "rpc" and refused[0]["details"] == "missing bearer token"


@pytest.mark.parametrize("args, message", [
    (["--tls-cert", "{server_cert}"], "--tls-cert and --tls-key go together"),
    (["--tls-client-ca", "{ca}"], "--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key"),
])
def test_tls_usage_errors(certs: dict[str, str], args: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "mmsim.server", "serve", *(a.format(**certs) for a in args)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == f"mmsim serve: error: {message}"


def test_an_empty_token_file_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("\n")
    proc = subprocess.run([sys.executable, "-m", "mmsim.server", "serve", "--listen", "127.0.0.1:0",
                           "--token-file", str(tmp_path / "token")], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (1, f"mmsim serve: the token file {str(tmp_path / 'token')!r} is empty\n")
