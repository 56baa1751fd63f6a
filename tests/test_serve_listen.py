"""Where the server listens: every address of the name, a taken port as a one-line error, and a
warning when --insecure lets it be reachable from the network without TLS or a token (without
--insecure it refuses: tests/test_auth.py)."""

import asyncio
import json
import signal
import socket
import sys
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from mmsim.server.app import ListenError, RunningServer, ServerConfig, start_server
from mmsim.v1 import mmsim_pb2 as pb
from mmsim.v1 import mmsim_pb2_grpc


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _resolved(host: str) -> set[str]:
    return {str(i[4][0]) for i in socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)}


@pytest.fixture
def localhost_both(monkeypatch: pytest.MonkeyPatch) -> None:
    """``localhost`` resolves to 127.0.0.1 and ::1, as on most hosts (not on every container)."""
    if not _ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    real = socket.getaddrinfo

    def getaddrinfo(host: object, *args: object, **kw: object) -> list:
        if host == "localhost":
            return real("127.0.0.1", *args, **kw) + real("::1", *args, **kw)  # type: ignore[arg-type]
        return real(host, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest_asyncio.fixture
async def on_127() -> AsyncIterator[RunningServer]:
    running = await start_server(ServerConfig(listen="127.0.0.1:0", log_level="warning"))
    try:
        yield running
    finally:
        await running.stop(None)


async def _ping(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as ch:
        await mmsim_pb2_grpc.MemoryManagerStub(ch).Ping(pb.Empty(), timeout=10)


async def _mmsim_serve(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mmsim.server", "serve", *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        _, err = await proc.communicate()
    return proc.returncode or 0, err.decode()


async def test_a_taken_port_is_a_one_line_error_and_status_1(on_127: RunningServer) -> None:
    port = on_127.port
    status, err = await _mmsim_serve("--listen", f"localhost:{port}")
    assert status == 1
    assert err == f"mmsim serve: cannot listen on localhost:{port} (127.0.0.1:{port}): address already in use\n"
    status, err = await _mmsim_serve("--listen", f"127.0.0.1:{port}")
    assert (status, err) == (1, f"mmsim serve: cannot listen on 127.0.0.1:{port}: address already in use\n")
    status, err = await _mmsim_serve("--listen", "no-such-host.invalid:7077")
    assert status == 1 and err.startswith("mmsim serve: cannot listen on no-such-host.invalid:7077: ")
    assert err.count("\n") == 1
    await _ping(f"127.0.0.1:{port}")  # the first server is untouched


async def test_localhost_beside_a_server_on_127_fails_instead_of_binding_only_ipv6(
    on_127: RunningServer, localhost_both: None
) -> None:
    with pytest.raises(
        ListenError, match=rf"localhost:{on_127.port} \(127\.0\.0\.1:{on_127.port}\): address already in use"
    ):
        await start_server(ServerConfig(listen=f"localhost:{on_127.port}", log_level="warning"))


async def test_a_failed_bind_leaves_no_address_bound(localhost_both: None) -> None:
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenError, match=r"\(\[::1\]:\d+\): address already in use"):
            await start_server(ServerConfig(listen=f"localhost:{port}", log_level="warning"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # not left bound by the failed start


async def test_localhost_port_0_binds_every_resolved_address() -> None:
    resolved = _resolved("localhost")
    running = await start_server(ServerConfig(listen="localhost:0", log_level="warning"))
    try:
        expect = {f"[{ip}]:{running.port}" if ":" in ip else f"{ip}:{running.port}" for ip in resolved}
        assert set(running.addresses) == expect
        for address in running.addresses:
            await _ping(address)
    finally:
        await running.stop(None)


async def test_localhost_port_0_binds_ipv4_and_ipv6_on_one_port(localhost_both: None) -> None:
    running = await start_server(ServerConfig(listen="localhost:0", log_level="warning"))
    try:
        assert running.addresses == (f"127.0.0.1:{running.port}", f"[::1]:{running.port}")
        await _ping(f"127.0.0.1:{running.port}")
        await _ping(f"[::1]:{running.port}")
        await _ping(f"localhost:{running.port}")
    finally:
        await running.stop(None)


@pytest.mark.parametrize("fmt", ["json", "console"])
async def test_an_insecure_non_loopback_listen_warns_that_there_is_no_authentication(fmt: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mmsim.server", "serve", "--listen", "0.0.0.0:0", "--log-format", fmt, "--insecure",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(60):
            while "serving" not in (line := (await proc.stderr.readline()).decode()):
                assert line, f"the server exited: {''.join(lines)}"
                lines.append(line)
            proc.send_signal(signal.SIGTERM)
            await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    warnings = [line for line in lines if "without TLS or a token" in line]
    assert len(warnings) == 1
    if fmt == "json":
        record = json.loads(warnings[0])
        assert record["level"] == "warning" and record["listen"] == "0.0.0.0:0"
        assert record["event"] == "--insecure: the server is reachable from the network without TLS or a token"
    else:
        assert "warning" in warnings[0] and "reachable from the network" in warnings[0]


async def test_a_loopback_listen_does_not_warn() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mmsim.server", "serve", "--listen", "localhost:0", "--log-format", "json",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    async with asyncio.timeout(60):
        first = json.loads(await proc.stderr.readline())
        proc.send_signal(signal.SIGTERM)
        await proc.communicate()
    assert first["event"] == "serving" and proc.returncode == 0
