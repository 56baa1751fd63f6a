"""``mmsim.v1.wire``: what the server and its clients share, importable by the client without the
server; its HOST:PORT parser and the places that use it."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from mmsim.server import cli
from mmsim.v1.wire import advertised_address, join_hostport, split_hostport


def test_the_client_imports_nothing_of_the_server() -> None:
    probe = ("import sys\n"
             "import mmsim.client, mmsim.client.credentials, mmsim.client.errors, mmsim.client.ops\n"
             "import mmsim.client.testing, mmsim.client.pytest_plugin\n"
             "print(sorted(m for m in sys.modules if m == 'mmsim.server' or m.startswith('mmsim.server.')))\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize(("address", "parts"), [
    ("127.0.0.1:7077", ("127.0.0.1", 7077)),
    ("localhost:0", ("localhost", 0)),
    ("mmsim-shard-1.example:65535", ("mmsim-shard-1.example", 65535)),
    ("[::1]:7077", ("::1", 7077)),
    ("[::]:0", ("::", 0)),
    ("[fe80::1%eth0]:9", ("fe80::1%eth0", 9)),
])
def test_split_hostport_takes_hosts_and_bracketed_ipv6(address: str, parts: tuple[str, int]) -> None:
    assert split_hostport(address) == parts
    assert join_hostport(*parts) == address


@pytest.mark.parametrize(("address", "why"), [
    ("7077", "no port"),
    ("localhost", "no port"),
    ("localhost:", "no port"),
    ("[::1]", "no port"),
    (":7077", "no host"),
    ("[]:7077", "not an address in brackets"),
    ("h:70000", "the port is above 65535"),
    ("h:" + "9" * 5000, "the port is above 65535"),
    ("h:-1", "the port '-1' is not a number"),
    ("h:x", "the port 'x' is not a number"),
    ("h:\u0663", "is not a number"),
    ("::1:7077", "an IPv6 address goes in brackets"),
    ("::1", "an IPv6 address goes in brackets"),
    ("[::1:7077", "unbalanced brackets"),
    ("::1]:7077", "unbalanced brackets"),
    ("a b:7077", "white space"),
    ("h:7077\n", "white space"),
])
def test_split_hostport_says_what_is_wrong(address: str, why: str) -> None:
    with pytest.raises(ValueError, match=r"^expected HOST:PORT, got .*\(.*" + why) as e:
        split_hostport(address)
    assert len(str(e.value)) < 200


def test_join_hostport_brackets_ipv6_once() -> None:
    assert join_hostport("::1", 7077) == join_hostport("[::1]", 7077) == "[::1]:7077"
    assert join_hostport("10.0.0.1", 0) == "10.0.0.1:0"


def test_flags_share_the_parser() -> None:
    for good in ("127.0.0.1:7077", "[::1]:0", "localhost:65535"):
        assert cli._listen(good) == good
    for bad in ("::1:7077", "localhost", "h:65536", "[::1]"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected HOST:PORT"):
            cli._listen(bad)


def test_an_unspecified_advertised_host_becomes_the_targets() -> None:
    advertised = advertised_address
    assert advertised("0.0.0.0:7101", "[::1]:7100") == "[::1]:7101"
    assert advertised("[::]:7101", "mmsim.example:7100") == "mmsim.example:7101"
    assert advertised("10.0.0.2:7101", "[::1]:7100") == "10.0.0.2:7101"
    assert advertised("0.0.0.0:7101", "unix:/run/mmsim.sock") == "0.0.0.0:7101"
