"""Connection limits of ``mmsim serve``: idle connections, silent ones, unanswered pings and
half-done handshakes are closed and their file descriptors released, while the SDK's client
reconnects transparently."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import grpc
import pytest
from servers import mmsim_serve

from mmsim.client import Client
from mmsim.server.cli import SERVE_FLAGS, main

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, PING, GOAWAY = 0x4, 0x6, 0x7
EMPTY_SETTINGS = struct.pack(">I", 0)[1:] + bytes([SETTINGS, 0]) + struct.pack(">I", 0)
SETTINGS_ACK = struct.pack(">I", 0)[1:] + bytes([SETTINGS, 1]) + struct.pack(">I", 0)
#: Time beyond a limit that the server may take to act on it, on a loaded machine.
MARGIN = 5.0


def _frames(data: bytes) -> list[tuple[int, int]]:
    """The (type, flags) of each whole HTTP/2 frame in ``data``, the server's side of a connection."""
    out = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        out.append((data[3], data[4]))
        data = data[9 + length:]
    return out


def _until_closed(sock: socket.socket, timeout: float) -> tuple[float, bytes]:
    """Read ``sock`` until the server closes it: the seconds that took and the bytes it sent.
    Fails if it is still open after ``timeout`` seconds."""
    t0 = time.monotonic()
    got = b""
    sock.settimeout(timeout)
    try:
        while chunk := sock.recv(65536):
            got += chunk
            sock.settimeout(max(0.01, timeout - (time.monotonic() - t0)))
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {timeout} s; it sent {_frames(got)}")
    return time.monotonic() - t0, got


@contextmanager
def _raw(addr: str, send: bytes = b"") -> Iterator[socket.socket]:
    """A TCP connection to ``addr`` that sends ``send`` and nothing more."""
    host, _, port = addr.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        if send:
            sock.sendall(send)
        yield sock


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_connection_that_sends_only_the_preface_is_closed_when_idle() -> None:
    with mmsim_serve("--max-connection-idle", "1", "--handshake-timeout", "600") as server:
        with _raw(server.addr, PREFACE + EMPTY_SETTINGS + SETTINGS_ACK) as sock:
            seconds, got = _until_closed(sock, 1 + MARGIN)
    assert (GOAWAY, 0) in _frames(got), _frames(got)  # told, then closed
    assert seconds < 1 + MARGIN


def test_a_silent_connection_and_an_unfinished_handshake_are_closed_after_the_handshake_timeout() -> None:
    with mmsim_serve("--handshake-timeout", "1", "--max-connection-idle", "0") as server:
        with _raw(server.addr) as silent, _raw(server.addr, PREFACE + EMPTY_SETTINGS) as unacknowledged:
            assert _until_closed(silent, 1 + MARGIN)[0] < 1 + MARGIN
            # The client's SETTINGS came, but it never acknowledged the server's.
            seconds, got = _until_closed(unacknowledged, 1 + MARGIN)
            assert seconds < 1 + MARGIN and (SETTINGS, 0) in _frames(got)


def test_a_client_that_never_answers_pings_is_closed_after_the_keepalive_timeout() -> None:
    with mmsim_serve("--keepalive-time", "1", "--keepalive-timeout", "1", "--max-connection-idle", "0",
                     "--handshake-timeout", "600") as server:
        with _raw(server.addr, PREFACE + EMPTY_SETTINGS + SETTINGS_ACK) as sock:
            seconds, got = _until_closed(sock, 2 + MARGIN)
    assert (PING, 0) in _frames(got), _frames(got)
    assert seconds < 2 + MARGIN


def test_the_file_descriptors_of_200_idle_connections_are_released() -> None:
    n = 200
    with mmsim_serve("--max-connection-idle", "2", "--handshake-timeout", "600") as server:
        before = _fds(server.pid)
        with ExitStack() as stack:
            socks = [stack.enter_context(_raw(server.addr, PREFACE + EMPTY_SETTINGS + SETTINGS_ACK)) for _ in range(n)]
            deadline = time.monotonic() + 2 + 2 * MARGIN
            peak = before
            while (now := _fds(server.pid)) > before + 5 or peak < before + n // 2:
                peak = max(peak, now)
                assert time.monotonic() < deadline, f"{now - before} of {n} connections still held (peak {peak})"
                time.sleep(0.05)
            assert peak >= before + n // 2  # they were held open for a while
            for sock in socks:  # and every one of them was closed by the server
                _until_closed(sock, MARGIN)


def test_connections_past_the_limit_are_closed_at_once() -> None:
    with mmsim_serve("--max-connections", "4", "--max-connection-idle", "0", "--handshake-timeout", "600") as server:
        with ExitStack() as stack:
            held = [stack.enter_context(_raw(server.addr, PREFACE + EMPTY_SETTINGS + SETTINGS_ACK)) for _ in range(4)]
            for sock in held:  # the server's SETTINGS: each was taken in
                sock.settimeout(MARGIN)
                assert (SETTINGS, 0) in _frames(sock.recv(65536))
            with _raw(server.addr, PREFACE + EMPTY_SETTINGS + SETTINGS_ACK) as extra:
                _, got = _until_closed(extra, MARGIN)
                assert (SETTINGS, 0) not in _frames(got)
            for sock in held:  # still open: whatever more the server sent, no end of stream
                sock.setblocking(False)
                with pytest.raises(BlockingIOError):
                    while True:
                        assert sock.recv(65536) != b"", "a connection within the limit was closed"
        with grpc.insecure_channel(server.addr) as ch:  # and a place for a new one once they are gone
            grpc.channel_ready_future(ch).result(timeout=MARGIN)


async def test_an_sdk_client_idle_past_the_limit_reconnects_on_its_next_call() -> None:
    with mmsim_serve("--max-connection-idle", "1") as server:
        async with Client(server.addr, retries=0) as mm:
            p = await mm.create_process()
            await p.mmap(4096, addr=0x10000)
            await p.write(0x10000, 7)
            channel = mm.conns[0].channel
            assert channel.get_state() == grpc.ChannelConnectivity.READY
            deadline = time.monotonic() + 1 + MARGIN
            while channel.get_state() == grpc.ChannelConnectivity.READY:  # the server's GOAWAY
                assert time.monotonic() < deadline, "the idle connection was not closed"
                await asyncio.sleep(0.05)
            assert await p.read(0x10000) == 7  # no error, no retry: a new connection
            assert channel.get_state() == grpc.ChannelConnectivity.READY
            await p.exit()


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--max-connection-idle", "-1", "must not be negative"),
    ("--keepalive-time", "soon", "expected a number, got 'soon'"),
    ("--handshake-timeout", "inf", "expected a finite number, got 'inf'"),
    ("--peer-probe-interval", "-0.5", "must not be negative"),
    ("--peer-probe-failures", "0", "must be positive"),
])
def test_bad_connection_and_probe_values_are_one_line_and_status_2(capsys, flag: str, value: str,
                                                                   message: str) -> None:
    with pytest.raises(SystemExit) as e:
        main(["serve", flag, value])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"mmsim serve: error: argument {flag}: {message}\n"


def test_every_connection_and_probe_flag_has_its_variable(capsys, monkeypatch) -> None:
    flags = {f[0]: f[1] for f in SERVE_FLAGS}
    for flag in ("--max-connection-idle", "--max-connection-age", "--max-connection-age-grace", "--keepalive-time",
                 "--keepalive-timeout", "--min-ping-interval", "--handshake-timeout", "--peer-probe-interval",
                 "--peer-probe-failures"):
        assert flags[flag] == "MMSIM_" + flag[2:].upper().replace("-", "_")
    monkeypatch.setenv("MMSIM_MAX_CONNECTION_AGE", "-3")
    with pytest.raises(SystemExit) as e:
        main(["serve"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        "mmsim serve: error: environment variable MMSIM_MAX_CONNECTION_AGE: must not be negative\n"
    )
