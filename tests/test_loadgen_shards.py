"""``mmsim loadgen`` against sharded deployments (``mmsim serve --shards 2``, one target), with the
servers' counters from GetStats or from the shards' Prometheus endpoints, and with a bearer token.
The proxy form is tested with nginx in test_sharding.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from servers import ServerProcess, mmsim_serve
from test_loadgen import options

from mmsim.client import Client
from mmsim.client.testing import write_test_certificates
from mmsim.loadgen import scrape
from mmsim.loadgen.access import Access
from mmsim.loadgen.cli import main
from mmsim.loadgen.report import validate
from mmsim.loadgen.runner import run

#: Counters a mixed run moves on every shard that holds a tree.
BUSY = ("walk", "move_pages", "fork")


@pytest.fixture(scope="module")
def two_shards() -> Iterator[ServerProcess]:
    with mmsim_serve("--shards", "2") as s:
        yield s


async def _per_shard(addr: str) -> list[dict[str, int]]:
    async with Client(addr) as mm:
        return [await mm.stats(shard=0), await mm.stats(shard=1)]


async def test_one_target_spreads_the_trees_over_the_shards(two_shards: ServerProcess) -> None:
    before = await _per_shard(two_shards.addr)
    report = await run(options(two_shards.addr, trees=None, workers=2), Console(quiet=True))
    validate(report)
    assert report["server"] == {"protocol": "recheck", "shards": 2, "routing": "direct"}
    assert report["options"]["trees"] == 2  # the default: one tree per shard, at least two
    assert report["overall"]["ok"] > 0 and report["overall"]["failures"] == {}, report["overall"]
    assert report["errnos"] == {} and set(report["statuses"]) == {"OK"}
    after = await _per_shard(two_shards.addr)
    for shard, (b, a) in enumerate(zip(before, after, strict=True)):
        assert all(a.get(k, 0) > b.get(k, 0) for k in BUSY), (shard, b, a)  # both shards did work
        assert a["processes"] == 0  # and the teardown reached both
    async with Client(two_shards.addr) as mm:
        assert await mm.check_invariants() == []


def test_several_targets_stay_static(two_shards: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    status = main(["--target", two_shards.addresses[0], "--target", two_shards.addresses[1], "--duration", "0.5",
                   "--warmup", "0.2", "--pages", "8", "--fork-depth", "1", "--workers", "1", "--quiet",
                   "--profile", "ping", "--json", str(out)])
    assert status == 0
    report = json.loads(out.read_text())
    assert report["server"]["shards"] == 2 and report["server"]["routing"] == "static"


async def test_counters_from_the_metrics_endpoints_match_getstats() -> None:
    with mmsim_serve("--shards", "2", "--metrics-listen", "127.0.0.1:0") as s:
        report = await run(options(s.addr, trees=None, stats_from="metrics"), Console(quiet=True))
        validate(report)
        assert report["server"]["shards"] == 2 and report["overall"]["failures"] == {}
        d = report["server_deltas"]
        assert all(d.get(k, 0) > 0 for k in BUSY), d
        assert d.get("violations", 0) == 0
        async with Client(s.addr) as mm:  # quiet now: every mapped counter equals GetStats'
            urls = await scrape.endpoints(mm, lambda: Access((s.addr,)))
            assert len(urls) == 2
            scraped, stats = await scrape.scrape(urls), await mm.stats()
        mapped = set(scrape.SAMPLES) | {"violations"} | {k for k in stats if k.startswith(("fault_", "violation_"))}
        assert {k: stats.get(k, 0) for k in mapped} == {k: scraped.get(k, 0) for k in mapped}
        assert scraped["walk"] > 0 and scraped["move_pages"] > 0
        # The endpoints given explicitly, as behind a proxy: the same counters.
        again = await run(options(s.addr, trees=None, stats_from="metrics", metrics_urls=tuple(urls), profile="remap"),
                          Console(quiet=True))
        assert again["server_deltas"].get("move_pages", 0) > 0


def test_metrics_text_maps_to_getstats_keys() -> None:
    text = (
        "# TYPE mmsim_walks counter\nmmsim_walks_total 7.0\n"
        "# TYPE mmsim_walk_recheck_retries counter\n"
        'mmsim_walk_recheck_retries_total{path="fast"} 2.0\nmmsim_walk_recheck_retries_total{path="slow"} 1.0\n'
        "# TYPE mmsim_detector_violations counter\n"
        'mmsim_detector_violations_total{kind="lockdep"} 1.0\nmmsim_detector_violations_total{kind="rcu"} 2.0\n'
        "# TYPE mmsim_processes gauge\nmmsim_processes 3.0\n"
        "# TYPE mmsim_moves counter\nmmsim_moves_total{errno=\"OK\"} 9.0\n"
    )
    assert scrape.parse(text) == {"walk": 7, "walk_fast_retries": 2, "walk_slow_retries": 1, "violation_lockdep": 1,
                                  "violation_rcu": 2, "violations": 3, "processes": 3}


def test_the_credentials_reach_the_runner_and_every_worker(tmp_path: Path, capsys: Any) -> None:
    """A token and mutual TLS on both shards: the run works with them, and is refused without the token."""
    token = tmp_path / "token"
    token.write_text("loadgen-test-token-0123456789\n")
    certs = {k: str(v) for k, v in write_test_certificates(tmp_path).items()}
    tls = ["--tls-cert", certs["server_cert"], "--tls-key", certs["server_key"], "--tls-client-ca", certs["ca"]]
    with mmsim_serve("--shards", "2", "--token-file", str(token), *tls) as s:
        argv = ["--target", s.addr, "--duration", "0.5", "--warmup", "0.2", "--pages", "8", "--fork-depth", "1",
                "--workers", "2", "--quiet", "--profile", "mixed", "--json", str(tmp_path / "r.json"),
                "--tls-ca", certs["ca"], "--tls-cert", certs["client_cert"], "--tls-key", certs["client_key"]]
        assert main([*argv, "--token-file", str(token)]) == 0, capsys.readouterr()
        report = json.loads((tmp_path / "r.json").read_text())
        assert report["overall"]["ok"] > 0 and report["overall"]["failures"] == {}
        assert report["server"]["shards"] == 2 and report["server"]["routing"] == "direct"
        capsys.readouterr()
        assert main(argv) == 1  # without the token: refused, one line
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "refused the calls" in err and "Traceback" not in err, err
