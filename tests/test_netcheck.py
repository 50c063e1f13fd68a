"""`dhtnode netcheck` on loopback: public addresses, mapping (no NAT here), filtering not
measured (every prober shares the seed's IP), bootstrap round trips (null for a dead one), a
verdict; and the RFC 4787 mapping classification from hand-made samples. The NAT lab cases are
in test_lab_netcheck.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dhtnode.cli import netcheck as nc
from tests.daemon import running_daemon
from tests.loopnet import PARAMS, Peer, net

__all__ = ["net"]

pytestmark = pytest.mark.slow

KEYS = {"ok", "public_addresses", "nat_mapping", "nat_filtering", "reachable",
        "bootstrap_rtt_ms", "verdict"}


async def test_netcheck_loopback(net: list[Peer]) -> None:
    boot = net[0].ep.local_address
    dead = ("127.0.0.1", 9)  # discard: nothing answers there
    res = await nc.netcheck([boot, dead], params=PARAMS, host="127.0.0.1", wait=8.0)
    assert set(res) >= KEYS
    assert res["ok"] is True
    port = res["local_port"]
    assert res["public_addresses"] == {"ipv4": [f"127.0.0.1:{port}"]}
    assert res["nat_mapping"] == {"ipv4": "none"}
    assert res["bootstrap_rtt_ms"]["127.0.0.1:9"] is None
    assert res["bootstrap_rtt_ms"][f"127.0.0.1:{boot[1]}"] > 0
    # Every node here shares the seed's IP: a probe from an IP it sent to (another port)
    # would pass an address-dependent filter too, so it proves nothing: not measured.
    assert res["nat_filtering"] == "unknown" and res["reachable"] is None, res
    assert res["stats"]["probe_from_known_ip_ignored"] >= 1
    assert res["verdict"].startswith("stable mapping; reachability not measured")


def test_netcheck_cli_json(tmp_path: Path) -> None:
    with running_daemon(tmp_path / "boot", "--host", "127.0.0.1", "--bootstrap-node",
                        "--public-host", "127.0.0.1") as port:
        r = subprocess.run(
            [sys.executable, "-m", "dhtnode", "netcheck", "--json", "--host", "127.0.0.1",
             "--bootstrap", f"127.0.0.1:{port}", "--wait", "0", "--state-dir",
             str(tmp_path / "s")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert set(res) >= KEYS and res["ok"] is True
    assert res["nat_mapping"] == {"ipv4": "none"}  # it sees our own address: no NAT
    assert res["nat_filtering"] == "unknown" and res["reachable"] is None
    assert list(res["bootstrap_rtt_ms"]) == [f"127.0.0.1:{port}"]


def test_classify_mapping() -> None:
    a, b, c = ("198.51.100.1", 49200), ("198.51.100.2", 49200), ("198.51.100.1", 49201)
    m1, m2 = ("203.0.113.5", 40000), ("203.0.113.5", 40001)
    assert nc.classify_mapping([], 1) == "unknown"
    assert nc.classify_mapping([(a, m1)], 1) == "unknown"
    assert nc.classify_mapping([(a, m1), (b, m1)], 1) == "endpoint-independent"
    assert nc.classify_mapping([(a, m1), (b, m2)], 1) == "endpoint-dependent"
    assert nc.classify_mapping([(a, m1), (c, m2), (b, m2)], 1) == "address-and-port-dependent"
    assert nc.classify_mapping([(a, m1), (c, m1), (b, m2)], 1) == "address-dependent"
