"""The deployment files (Dockerfile, docker-compose.yml, deploy/): they agree with each other and
with the ``mmsim`` command, nginx accepts the generated configuration, ``mmsim health-probe``
answers as grpc_health_probe does, and the compose topology works without Docker."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ipaddress
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from proxy import nginx_binary

from mmsim.client.testing import serve_subprocess
from mmsim.server import cli, deploy
from mmsim.server.deploy import nginx_config

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
DOCKERFILE = ROOT / "Dockerfile"
PAGE = 4096


# --- helpers ---------------------------------------------------------------------------------------

def mmsim_parser() -> argparse.ArgumentParser:
    """The ``mmsim`` command's parser, with deploy's subcommands."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "health-probe" not in sub.choices:  # until cli.py registers them itself
        deploy.add_commands(sub)
    return parser


def mmsim(*argv: str) -> int:
    """Run ``mmsim ARGV`` in this process, as cli.main does; its exit status."""
    try:
        args = mmsim_parser().parse_args(argv)
        return int(args.func(args))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def shard_services() -> dict[str, dict[str, Any]]:
    """The services that run ``mmsim serve``, by name."""
    return {name: svc for name, svc in compose()["services"].items() if svc.get("command", [None])[0] == "serve"}


def serve_args(command: list[str]) -> argparse.Namespace:
    """A ``mmsim serve`` command line as the real parser reads it."""
    parser = cli.build_parser()
    serve = parser.parse_args(["serve"]).parser
    flags = {o for a in serve._actions for o in a.option_strings}
    missing = {"--shard-index", "--peers", "--metrics-listen"} - flags
    if missing:
        pytest.skip(f"mmsim serve has no {', '.join(sorted(missing))} yet")
    try:
        return parser.parse_args(command)
    except SystemExit:
        pytest.fail(f"mmsim serve rejects {shlex.join(command)}")


def peers_of(args: argparse.Namespace) -> list[str]:
    return list(args.peers) if not isinstance(args.peers, str) else [p for p in args.peers.split(",") if p]


def nginx_upstreams(text: str) -> dict[str, list[str]]:
    """Each upstream block's name and its servers."""
    return {name: re.findall(r"^\s*server\s+([^\s;]+)[^;]*;", body, re.M)
            for name, body in re.findall(r"upstream\s+(\w+)\s*\{(.*?)\}", text, re.S)}


def nginx_map(text: str) -> dict[str, str]:
    body = re.search(r"map\s+\$http_x_mmsim_shard\s+\$mmsim_upstream\s*\{(.*?)\}", text, re.S)
    assert body is not None, "no map of the x-mmsim-shard header"
    return dict(re.findall(r'^\s*"?([\w]+)"?\s+(\w+);', body.group(1), re.M))


def nginx_listen_port(text: str) -> int:
    m = re.search(r"^\s*listen\s+(\d+)\s+http2;", text, re.M)
    assert m is not None, "no `listen PORT http2;`"
    return int(m.group(1))


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each line of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


# --- docker-compose.yml, deploy/, Dockerfile -------------------------------------------------------

def test_compose_services() -> None:
    services = compose()["services"]
    assert set(services) == {"proxy", "shard0", "shard1", "prometheus"}
    assert set(shard_services()) == {"shard0", "shard1"}
    proxy = services["proxy"]
    assert proxy["build"] == "." and proxy["image"] == "mmsim:latest"
    assert "network_mode" not in proxy, "the proxy owns the network namespace"
    for name, svc in services.items():
        if name != "proxy":
            assert svc["network_mode"] == "service:proxy", name
            assert "ports" not in svc, f"{name} shares the proxy's namespace: the proxy publishes ports"
    for name in shard_services():
        assert services[name]["image"] == proxy["image"]
        assert services[name].get("restart") == "unless-stopped"


def test_shard_commands_agree_with_nginx_and_prometheus() -> None:
    shards = {name: serve_args(svc["command"]) for name, svc in shard_services().items()}
    indices = sorted(a.shard_index for a in shards.values())
    assert indices == list(range(len(shards))), "shard indices are not 0..N-1, each once"
    by_index = {a.shard_index: a for a in shards.values()}
    listens = [by_index[i].listen for i in indices]
    upstreams = nginx_upstreams(NGINX_CONF.read_text())
    prometheus = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "mmsim"]
    targets = {t: sc.get("labels", {}).get("shard") for sc in job["static_configs"] for t in sc["targets"]}
    for name, a in shards.items():
        assert a.shards == 1, f"{name}: each service is one shard"
        assert peers_of(a) == listens, f"{name}: --peers is not every shard's --listen in index order"
        assert upstreams[f"mmsim_shard{a.shard_index}"] == [a.listen], f"{name}: nginx sends its calls elsewhere"
        assert is_loopback(a.listen) and is_loopback(a.metrics_listen), f"{name} listens outside the pod"
        assert not a.insecure, f"{name}: loopback needs no --insecure"
        assert targets.get(a.metrics_listen) == str(a.shard_index), f"{name}: Prometheus does not scrape it"
    assert sorted(upstreams["mmsim_any"]) == sorted(listens)
    assert set(targets) == {a.metrics_listen for a in shards.values()}
    assert nginx_map(NGINX_CONF.read_text()) == {"default": "mmsim_any",
                                                **{str(i): f"mmsim_shard{i}" for i in indices}}


def test_healthchecks_probe_the_service_itself() -> None:
    services = compose()["services"]
    parser = mmsim_parser()
    port = nginx_listen_port(NGINX_CONF.read_text())
    own = {"proxy": f"127.0.0.1:{port}"}
    own.update({name: serve_args(svc["command"]).listen for name, svc in shard_services().items()})
    for name, address in own.items():
        check = services[name]["healthcheck"]
        test = check["test"]
        assert test[:3] == ["CMD", "mmsim", "health-probe"], name
        args = parser.parse_args(test[2:])
        assert args.func is deploy.cmd_health_probe
        assert args.address == address, f"{name} probes {args.address}, not itself"
        for key in ("interval", "timeout", "retries", "start_period"):
            assert key in check, f"{name}: healthcheck without {key}"


def test_start_order() -> None:
    """The namespace owner starts first; nothing waits for a health that waits for it."""
    services = compose()["services"]
    graph = {name: dict(svc.get("depends_on", {})) for name, svc in services.items()}
    assert not graph["proxy"], "the proxy owns the namespace: it must not wait for the services in it"
    for name, svc in services.items():
        if "network_mode" in svc:
            owner = svc["network_mode"].removeprefix("service:")
            assert graph[name].get(owner, {}).get("condition") == "service_started", \
                f"{name} must start after {owner}, whose namespace it joins (started: its health needs a shard)"
        for dep, spec in graph[name].items():
            assert dep in services and spec["condition"] in ("service_started", "service_healthy")
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for the health of {dep}, which has none"
    order: list[str] = []
    while len(order) < len(graph):
        ready = [n for n in graph if n not in order and all(d in order for d in graph[n])]
        assert ready, f"depends_on has a cycle among {set(graph) - set(order)}"
        order += ready
    assert order[0] == "proxy"


def test_mounted_files_and_published_ports() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith("."):
                assert (ROOT / host).is_file(), f"{name} mounts {host}, which does not exist"
    proxy = services["proxy"]
    assert "./deploy/nginx.conf:/etc/mmsim/nginx.conf:ro" in proxy["volumes"]
    assert proxy["entrypoint"] == ["nginx"]
    command = proxy["command"]
    assert command[command.index("-c") + 1] == "/etc/mmsim/nginx.conf"
    assert "daemon off;" in command[command.index("-g") + 1]
    published = {p.rsplit(":", 1)[1]: p for p in proxy["ports"]}
    port = nginx_listen_port(NGINX_CONF.read_text())
    assert published[str(port)] == f"127.0.0.1:{port}:{port}", "nginx's port is not published on loopback"
    assert published["9090"] == "127.0.0.1:9090:9090"  # Prometheus's own port, in the same namespace
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]


def test_dockerfile() -> None:
    instructions = dockerfile_instructions()
    kinds = [k for k, _ in instructions]
    assert instructions[0] == ("FROM", "python:3.11-slim-bookworm")
    runs = " ".join(a for k, a in instructions if k == "RUN")
    assert re.search(r"apt-get install -y --no-install-recommends nginx\b", runs)
    assert "pip install --no-cache-dir ." in runs
    (user,) = [a for k, a in instructions if k == "USER"]
    assert user not in ("root", "0")
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN"), "not root at run time"
    entrypoint = [a for k, a in instructions if k == "ENTRYPOINT"]
    assert entrypoint == ['["mmsim"]']
    (cmd,) = [yaml.safe_load(a) for k, a in instructions if k == "CMD"]
    assert cmd == ["serve", "--listen", "0.0.0.0:7077", "--insecure"]
    assert cli.build_parser().parse_args(cmd).listen == "0.0.0.0:7077"
    assert "7077" in " ".join(a for k, a in instructions if k == "EXPOSE").split()
    # Everything `pip install .` needs is copied: pyproject.toml, the readme, every package's sources.
    copied = {src.rstrip("/") for k, a in instructions if k == "COPY" for src in a.split()[:-1]}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"]}
    needed |= {d.split("/")[0] for d in project["tool"]["setuptools"]["package-dir"].values()}
    assert needed <= copied, f"the Dockerfile does not copy {needed - copied}"
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".venv", ".git", "benchmarks/out"):
        assert path in ignored


# --- mmsim nginx-config ----------------------------------------------------------------------------

def test_committed_nginx_conf_is_generated() -> None:
    assert NGINX_CONF.read_text() == nginx_config(2), \
        "deploy/nginx.conf drifted: mmsim nginx-config --shards 2 -o deploy/nginx.conf"


def test_nginx_config() -> None:
    text = nginx_config(4)
    ups = nginx_upstreams(text)
    assert {f"mmsim_shard{i}": [f"127.0.0.1:{7100 + i}"] for i in range(4)}.items() <= ups.items()
    assert ups["mmsim_any"] == [f"127.0.0.1:{7100 + i}" for i in range(4)]
    assert len(ups) == 5
    assert nginx_map(text) == {"default": "mmsim_any", **{str(i): f"mmsim_shard{i}" for i in range(4)}}
    assert nginx_listen_port(text) == 7077
    assert "grpc_pass grpc://$mmsim_upstream;" in text
    assert re.search(r"grpc_read_timeout 3600s;", text) and re.search(r"grpc_send_timeout 3600s;", text)
    assert "client_max_body_size 0;" in text
    assert not re.search(r"^\s*(pid|daemon)\b", text, re.M)
    assert "`mmsim nginx-config --shards 4`" in text
    other = nginx_config(1, listen_port=8080, shard_host="::1", shard_port=9000)
    assert nginx_upstreams(other)["mmsim_shard0"] == ["[::1]:9000"] and nginx_listen_port(other) == 8080
    assert "`mmsim nginx-config --shards 1 --listen-port 8080 --shard-address [::1]:9000`" in other
    from mmsim.client import _client

    assert deploy.SHARD_HEADER == getattr(_client, "SHARD_HEADER", deploy.SHARD_HEADER)  # the SDK's
    for bad in ({"shards": 0}, {"shards": 2, "listen_port": 7101}, {"shards": 2, "shard_host": "a b"},
                {"shards": 2, "shard_host": "x;y"}, {"shards": 2, "shard_port": 65535}):
        with pytest.raises(ValueError):
            nginx_config(**bad)


def test_nginx_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert mmsim("nginx-config", "--shards", "2") == 0
    assert capsys.readouterr().out == nginx_config(2)
    out = tmp_path / "n.conf"
    assert mmsim("nginx-config", "--shards", "3", "--listen-port", "8000", "--shard-address", "10.0.0.1:9000",
                 "-o", str(out)) == 0
    assert out.read_text() == nginx_config(3, listen_port=8000, shard_host="10.0.0.1", shard_port=9000)
    capsys.readouterr()
    for argv in (["--shards", "0"], [], ["--shards", "2", "--shard-address", "nohost"],
                 ["--shards", "2", "--listen-port", "7100"]):
        assert mmsim("nginx-config", *argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("mmsim nginx-config: error:") and err.count("\n") == 1, err
    assert mmsim("nginx-config", "--shards", "1", "--shard-address", "[::1]:9000", "-o", str(out)) == 0
    assert out.read_text() == nginx_config(1, shard_host="::1", shard_port=9000)
    assert mmsim("nginx-config", "--shards", "2", "-o", str(tmp_path / "missing" / "n.conf")) == 1


@pytest.fixture(scope="module")
def nginx() -> str:
    """The nginx binary, installed with apt-get when missing and this is root (tests/proxy.py)."""
    return nginx_binary()


@pytest.mark.parametrize("shards", [2, 4])
def test_nginx_accepts_config(nginx: str, tmp_path: Path, shards: int) -> None:
    conf = NGINX_CONF if shards == 2 else tmp_path / "nginx.conf"
    if shards != 2:
        conf.write_text(nginx_config(shards))
    done = subprocess.run([nginx, "-t", "-c", str(conf), "-g", f"pid {tmp_path}/nginx.pid;"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


# --- mmsim health-probe ----------------------------------------------------------------------------

def test_health_probe_against_mmsim(capsys: pytest.CaptureFixture[str]) -> None:
    with serve_subprocess() as server:
        assert mmsim("health-probe", server.addr) == 0
        assert capsys.readouterr().out == "status: SERVING\n"
        assert mmsim("health-probe", server.addr, "--service", "mmsim.v1.MemoryManager", "--timeout", "5") == 0
        capsys.readouterr()
        assert mmsim("health-probe", server.addr, "--service", "no.such.Service") == 3
        err = capsys.readouterr().err
        assert "no service 'no.such.Service'" in err and err.count("\n") == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_health_probe_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    assert mmsim("health-probe", f"127.0.0.1:{free_port()}") == 2
    err = capsys.readouterr().err
    assert err.startswith("mmsim health-probe: cannot reach") and err.count("\n") == 1
    # A listener that never answers: the timeout.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        start = time.monotonic()
        assert mmsim("health-probe", f"127.0.0.1:{s.getsockname()[1]}", "--timeout", "0.5") == 2
        assert time.monotonic() - start < 5
    assert "within 0.5 s" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    [], ["127.0.0.1:1", "--bogus"], ["127.0.0.1:1", "extra"], ["127.0.0.1:1", "--timeout", "0"],
    ["127.0.0.1:1", "--timeout", "x"], ["127.0.0.1:1", "--tls-cert", "c.pem"],
    ["127.0.0.1:1", "--tls-ca", "/no/such/ca.pem"], ["127.0.0.1:1", "--token-file", "/no/such/token"],
])
def test_health_probe_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert mmsim("health-probe", *argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("mmsim health-probe: error:") and err.count("\n") == 1, err


class _RequireToken(grpc.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self.token = token
        self.seen: list[str | None] = []

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        auth = dict(details.invocation_metadata or ()).get("authorization")
        self.seen.append(auth if isinstance(auth, str) else None)
        if auth != f"Bearer {self.token}":
            return grpc.unary_unary_rpc_method_handler(
                lambda request, context: context.abort(grpc.StatusCode.UNAUTHENTICATED, "a token is needed"))
        return continuation(details)


@contextlib.contextmanager
def health_server(credentials: grpc.ServerCredentials | None = None,
                  interceptors: tuple[grpc.ServerInterceptor, ...] = ()) -> Iterator[str]:
    """A plain gRPC server with the health service: "" SERVING, "down" NOT_SERVING."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=list(interceptors))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("down", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = (server.add_secure_port("127.0.0.1:0", credentials) if credentials
            else server.add_insecure_port("127.0.0.1:0"))
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait()


def test_health_probe_not_serving_and_token(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MMSIM_TOKEN_FILE", raising=False)
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    guard = _RequireToken("s3cret")
    with health_server(interceptors=(guard,)) as addr:
        assert mmsim("health-probe", addr) == 3
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert mmsim("health-probe", addr, "--token-file", str(token)) == 0
        assert mmsim("health-probe", addr, "--token-file", str(token), "--service", "down") == 4
        assert capsys.readouterr().err == "mmsim health-probe: status: NOT_SERVING\n"
        assert guard.seen == [None, "Bearer s3cret", "Bearer s3cret"]
        monkeypatch.setenv("MMSIM_TOKEN_FILE", str(token))  # as mmsim serve reads it
        assert mmsim("health-probe", addr) == 0
    (tmp_path / "blank").write_text("\n")
    assert mmsim("health-probe", addr, "--token-file", str(tmp_path / "blank")) == 1


def _certificates(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost and 127.0.0.1, and a client certificate (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(cn: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
              ca: bool = False, usage: Any = None, san: list[x509.GeneralName] | None = None) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(name(cn)).public_key(key.public_key())
             .issuer_name(issuer[0] if issuer else name(cn)).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if usage is not None:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(issuer[1] if issuer else key, hashes.SHA256())

    files: dict[str, Path] = {}

    def save(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        files[f"{stem}.pem"] = tmp_path / f"{stem}.pem"
        files[f"{stem}.pem"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{stem}.key"] = tmp_path / f"{stem}.key"
        files[f"{stem}.key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("mmsim test CA", ca_key, None, ca=True)
    save("ca", ca, ca_key)
    for stem, usage, san in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH,
         [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH, None),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        save(stem, issue(stem, key, (ca.subject, ca_key), usage=usage, san=san), key)
    return files


def test_health_probe_tls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = _certificates(tmp_path)
    mutual = grpc.ssl_server_credentials([(f["server.key"].read_bytes(), f["server.pem"].read_bytes())],
                                         root_certificates=f["ca.pem"].read_bytes(), require_client_auth=True)
    client = ["--tls-cert", str(f["client.pem"]), "--tls-key", str(f["client.key"])]
    with health_server(mutual) as addr:
        assert mmsim("health-probe", addr, "--tls-ca", str(f["ca.pem"]), *client) == 0
        assert mmsim("health-probe", addr, "--tls-ca", str(f["ca.pem"]), *client,
                     "--tls-server-name", "localhost") == 0
        assert mmsim("health-probe", addr, "--tls-ca", str(f["ca.pem"]), "--timeout", "1") == 2  # no client cert
        assert mmsim("health-probe", addr, *client, "--timeout", "1") == 2  # the system's CAs do not know it
        assert mmsim("health-probe", addr, "--timeout", "1") == 2  # plaintext
    capsys.readouterr()


# --- the compose topology, without Docker ----------------------------------------------------------

def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


async def _scenario(mm: Any, shard: int) -> dict[str, Any]:
    """mmap, write, remap, fork and walk in a new tree on ``shard``; what came out, pids as roles."""
    from mmsim.client._client import shard_of

    p = await mm.create_process(shard=shard)
    src = await p.mmap(2 * PAGE)
    dst = await p.mmap(2 * PAGE, uffd="missing")
    await p.write(src.start, 42)
    moved = await p.remap(dst.start, src.start, PAGE)
    child = await p.fork()
    walk = await p.walk(dst.start)
    folio = await p.folio(dst.start)
    roles = {p.pid: "parent", child.pid: "child"}
    out = {
        "shards": (shard_of(p.id), shard_of(child.id)),
        "moved": moved,
        "values": (await p.read(dst.start), await child.read(dst.start)),
        "walk": sorted((roles[pid], addr - dst.start) for pid, addr in walk.mappings),
        "folio": (folio.value, folio.mapcount, folio.exclusive) if folio else None,
        "vmas": [(v.start - src.start, v.end - src.start, v.prot, v.uffd) for v in await p.vmas()],
    }
    await child.exit()
    await p.exit()
    return out


def test_compose_topology_without_docker(nginx: str, tmp_path: Path) -> None:
    """The shards started as docker-compose.yml starts them, nginx with deploy/nginx.conf in front of
    them, and the SDK through the proxy as through a shard."""
    services = compose()["services"]
    shards = shard_services()
    args = {name: serve_args(svc["command"]) for name, svc in shards.items()}
    # The fixed ports of the compose file (7077, 7100, 7101, 9100, 9101): nginx listens on every address.
    fixed = [("0.0.0.0", nginx_listen_port(NGINX_CONF.read_text()))]
    for a in args.values():
        fixed += [(host, int(port)) for host, _, port in (x.rpartition(":") for x in (a.listen, a.metrics_listen))]
    for host, port in fixed:
        if _port_in_use(host, port):
            pytest.skip(f"port {port} is in use: this test runs the compose topology on its fixed ports")
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Any] = []

    def start(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"{name}.log", "wb")
        logs.append(log)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
        procs.append(proc)
        return proc

    def log_of(name: str) -> str:
        return (tmp_path / f"{name}.log").read_text(errors="replace")[-3000:]

    try:
        for name, svc in sorted(shards.items()):
            start(name, [sys.executable, "-m", "mmsim.server", *svc["command"]])
        for (name, a), proc in zip(sorted(args.items()), procs, strict=True):
            deadline = time.monotonic() + 60
            while (result := deploy.health_probe(a.listen, timeout=1.0)).status != deploy.PROBE_SERVING:
                assert proc.poll() is None, f"{name} exited {proc.returncode}:\n{log_of(name)}"
                assert time.monotonic() < deadline, f"{name} never SERVING ({result.message}):\n{log_of(name)}"
                time.sleep(0.1)
        proxy_cmd = services["proxy"]["command"]
        g = proxy_cmd[proxy_cmd.index("-g") + 1].replace("/tmp/nginx.pid", str(tmp_path / "nginx.pid"))
        nginx_proc = start("proxy", [nginx, "-c", str(NGINX_CONF), "-g", g])
        proxy = f"127.0.0.1:{nginx_listen_port(NGINX_CONF.read_text())}"
        deadline = time.monotonic() + 30
        while (result := deploy.health_probe(proxy, timeout=1.0)).status != deploy.PROBE_SERVING:
            assert nginx_proc.poll() is None, f"nginx exited {nginx_proc.returncode}:\n{log_of('proxy')}"
            assert time.monotonic() < deadline, f"the proxy never SERVING ({result.message}):\n{log_of('proxy')}"
            time.sleep(0.1)
        # The healthchecks of the compose file, as written there.
        for name in ("proxy", *sorted(shards)):
            assert mmsim(*services[name]["healthcheck"]["test"][2:]) == 0, name
        metrics = asyncio.run(_through_the_proxy(proxy, sorted(a.listen for a in args.values())))
        # Where a shard says it serves Prometheus metrics, deploy/prometheus.yml scrapes it.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for a in args.values():
            if metrics[a.shard_index]:
                assert metrics[a.shard_index] == a.metrics_listen
                with opener.open(f"http://{a.metrics_listen}/metrics", timeout=10) as r:
                    assert r.status == 200 and b"# TYPE" in r.read()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for (name, _), proc in zip([*sorted(shards.items()), ("proxy", None)], procs, strict=True):
            assert proc.wait(60) == 0, f"{name} exited {proc.returncode}:\n{log_of(name)}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # nginx's workers too, should its master be gone
            proc.wait()
        for log in logs:
            log.close()


async def _through_the_proxy(proxy: str, shard_addresses: list[str]) -> list[str]:
    """The scenario through the proxy and directly, and the proxy's routing; each shard's metrics
    address as it advertises it (empty: none)."""
    from mmsim.client import Client
    from mmsim.client.errors import WrongShardError, from_rpc_error
    from mmsim.v1 import mmsim_pb2 as pb
    from mmsim.v1 import mmsim_pb2_grpc

    async with Client(proxy) as mm:
        via_proxy = [await _scenario(mm, shard) for shard in range(len(shard_addresses))]
        assert mm.routing == "proxy"
        assert await mm.check_invariants() == []
        parked = await mm.create_process(shard=1)
        await parked.mmap(PAGE)
    async with Client(shard_addresses[0]) as mm:
        direct = [await _scenario(mm, shard) for shard in range(len(shard_addresses))]
        assert mm.routing == "direct"
    assert via_proxy == direct
    assert [r["shards"] for r in direct] == [(i, i) for i in range(len(shard_addresses))]
    assert via_proxy[0]["moved"] == PAGE and via_proxy[0]["values"] == (42, 42)
    assert via_proxy[0]["walk"] == [("child", 0), ("parent", 0)]

    async with grpc.aio.insecure_channel(proxy) as channel:
        stub = mmsim_pb2_grpc.MemoryManagerStub(channel)
        # The header picks the shard that answers.
        metrics = []
        for shard in range(len(shard_addresses)):
            topology = await stub.GetTopology(pb.TopologyRequest(), metadata=(("x-mmsim-shard", str(shard)),))
            assert topology.shard == shard
            assert [s.address for s in topology.shards] == shard_addresses
            metrics.append(topology.shards[shard].metrics_address)
        # A handle of shard 1 sent with the header of shard 0: shard 0 answers, naming shard 1.
        read = pb.AccessRequest(process=parked.id, addr=0)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetFolio(read, metadata=(("x-mmsim-shard", "0"),))
        error = from_rpc_error(info.value)
        assert isinstance(error, WrongShardError) and error.shard == 1, error
        # A header naming no shard goes to any shard (round-robin): shard 1 serves, shard 0 names shard 1.
        answered = set()
        for _ in range(4):
            try:
                await stub.GetFolio(read, metadata=(("x-mmsim-shard", "7"),))
                answered.add(1)
            except grpc.aio.AioRpcError as e:
                error = from_rpc_error(e)
                assert isinstance(error, WrongShardError) and error.shard == 1, error
                answered.add(0)
        assert answered == {0, 1}
    return metrics
