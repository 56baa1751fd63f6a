"""Helpers for tests of code that uses the SDK: a real mmsim server inside the test's process
(``serve_in_process``), or as a separate OS process (``serve_subprocess``), and throwaway TLS
certificates (``write_test_certificates``)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmsim.v1.wire import join_hostport, split_hostport


@asynccontextmanager
async def serve_in_process(**server_options: Any) -> AsyncIterator[str]:
    """Run an mmsim server in this process and event loop on 127.0.0.1 with a free port.

    Yields its address ``"127.0.0.1:PORT"``; the server is stopped on exit. ``server_options`` are
    fields of ``mmsim.server.app.ServerConfig`` (``protocol``, ``seed``, ``preempt``, limits, ...).

    Example::

        async with serve_in_process(protocol="recheck", seed=1) as addr:
            async with Client(addr) as mm:
                ...
    """
    from mmsim.server.app import ServerConfig, start_server

    options = {"listen": "127.0.0.1:0", **server_options}
    host, _ = split_hostport(options["listen"])
    running = await start_server(ServerConfig(**options))
    try:
        yield join_hostport(host, running.port)
    finally:
        await running.stop(None)


@dataclass(frozen=True)
class ServerProcess:
    """A running ``mmsim serve``: its address (shard 0's, with shards), its OS process, and the
    address of every shard."""

    addr: str
    proc: subprocess.Popen[str]
    addresses: tuple[str, ...] = ()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self, key: str) -> int:
        """A /proc/<pid>/status figure in bytes (VmRSS, VmHWM): Linux only."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)


@contextmanager
def serve_subprocess(*args: str, check_exit: bool = True) -> Iterator[ServerProcess]:
    """Run ``mmsim serve --listen 127.0.0.1:0 ARGS`` as a separate OS process (the access log off),
    and yield it once it serves (with ``--shards N``, once every shard serves: ``addr`` is shard 0's
    address and ``addresses`` every shard's). On exit it is stopped with SIGTERM; with
    ``check_exit``, an exit status other than 0 raises RuntimeError. Its log is read and dropped, so
    it never blocks.

    Example::

        with serve_subprocess("--protocol", "no-recheck") as server:
            ... Client(server.addr) ...
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmsim.server", "serve", "--listen", "127.0.0.1:0", "--log-format", "json",
         "--access-log-sample", "0", *args],
        stderr=subprocess.PIPE, text=True,
    )
    assert proc.stderr is not None
    # A supervisor's shards log their own "serving" first; the supervisor's line lists them all.
    supervised = any(a == "--shards" or a.startswith("--shards=") for a in args) and \
        _flag(args, "--shards") not in (None, "1")
    try:
        said = ""  # the last line that is not a log record: a one-line error before the exit
        while True:
            line = proc.stderr.readline()
            event = json.loads(line) if line.startswith("{") else {}
            if event.get("event") == "serving" and (not supervised or "shards" in event):
                break
            if not line or event.get("level") in ("error", "critical"):
                raise RuntimeError(f"mmsim serve did not start: {said or line.strip() or proc.wait(30)}")
            if not line.startswith("{") and not _GRPC_LOG_LINE.match(line):  # gRPC core's own lines go on
                said = line.strip()
                if proc.poll() is not None or not said:
                    raise RuntimeError(f"mmsim serve did not start: {said or proc.wait(30)}")
        threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
        yield ServerProcess(event["listen"], proc, tuple(event.get("shards", (event["listen"],))))
        proc.send_signal(signal.SIGCONT)  # in case it was left stopped
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(60)
        if check_exit and status != 0:
            raise RuntimeError(f"mmsim serve exited {status}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


#: A line gRPC core writes itself (glog style: severity, date, time, thread, file:line]).
_GRPC_LOG_LINE = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [\w./-]+:\d+\]")


def _flag(args: tuple[str, ...], flag: str) -> str | None:
    """The value of the last ``flag VALUE`` or ``flag=VALUE`` in ``args``."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def write_test_certificates(directory: str | Path) -> dict[str, Path]:
    """Write a throwaway PKI for TLS tests into ``directory`` (PEM files, valid for a day) and
    return their paths by name:

    - ``ca``: a CA certificate; ``server_cert``, ``server_key``: a server certificate it signed, for
      ``localhost``, ``127.0.0.1`` and ``::1``; ``client_cert``, ``client_key``: a client
      certificate it signed (mutual TLS);
    - ``other_ca``, ``other_client_cert``, ``other_client_key``: an unrelated CA and a client
      certificate it signed, for the cases that must fail.

    Needs the ``cryptography`` package (installed with ``mmsim[test]``).

    Example::

        certs = write_test_certificates(tmp_path)
        async with serve_in_process(tls_cert=str(certs["server_cert"]),
                                    tls_key=str(certs["server_key"])) as addr:
            async with Client(addr, credentials=tls_credentials(str(certs["ca"]))) as mm:
                ...
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    paths: dict[str, Path] = {}

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(key_name: str, data: bytes) -> Path:
        path = out / f"{key_name}.pem"
        path.write_bytes(data)
        paths[key_name] = path
        return path

    Issuer = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]

    def issue(subject: str, key: ec.EllipticCurvePrivateKey, issuer: Issuer | None,
              extensions: list[tuple[x509.ExtensionType, bool]]) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(issuer[0].subject if issuer else name(subject))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical=critical)
        return builder.sign(issuer[1] if issuer else key, hashes.SHA256())

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def ca(key_name: str, subject: str) -> Issuer:
        key = ec.generate_private_key(ec.SECP256R1())
        usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                              encipher_only=False, decipher_only=False)
        cert = issue(subject, key, None, [(x509.BasicConstraints(ca=True, path_length=0), True), (usage, True)])
        write(key_name, cert.public_bytes(serialization.Encoding.PEM))
        return cert, key

    def leaf(key_name: str, subject: str, issuer: Issuer, usage: x509.ObjectIdentifier,
             san: list[x509.GeneralName] | None = None) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        extensions: list[tuple[x509.ExtensionType, bool]] = [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.ExtendedKeyUsage([usage]), False),
        ]
        if san:
            extensions.append((x509.SubjectAlternativeName(san), False))
        cert = issue(subject, key, issuer, extensions)
        write(f"{key_name}_cert", cert.public_bytes(serialization.Encoding.PEM))
        write(f"{key_name}_key", pem_key(key)).chmod(0o600)

    root = ca("ca", "mmsim test CA")
    leaf("server", "localhost", root, ExtendedKeyUsageOID.SERVER_AUTH, [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ])
    leaf("client", "mmsim test client", root, ExtendedKeyUsageOID.CLIENT_AUTH)
    other = ca("other_ca", "unrelated test CA")
    leaf("other_client", "unrelated test client", other, ExtendedKeyUsageOID.CLIENT_AUTH)
    return paths


__all__ = ["ServerProcess", "serve_in_process", "serve_subprocess", "write_test_certificates"]
