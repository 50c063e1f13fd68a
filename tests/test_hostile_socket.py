"""A real daemon on a dual-stack socket takes a bounded storm of garbage, truncated, oversized
and replayed datagrams over IPv4 and IPv6 loopback: it counts and drops them and keeps serving
both families (DHT ping and STUN)."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dhtnode.daemon import control
from dhtnode.dht.ids import node_id_for
from dhtnode.wire import messages as m
from tests.daemon import running_daemon
from tests.loopnet import has_ipv6_loopback

pytestmark = pytest.mark.slow

#: Datagrams in the storm, per address family (bounded, like every sending loop here).
STORM = 1500



@pytest.fixture
def dual_stack_node(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    if not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    state = tmp_path / "node"
    with running_daemon(state, "--host", "::", "--bootstrap-node") as port:
        yield port, state
    assert "receive_failed" not in (state / "log").read_text()


def _storm(rng: random.Random, valid: bytes) -> Iterator[bytes]:
    """Garbage in every first-byte range, truncations and extensions of a valid request,
    oversized datagrams, and DHT responses nobody asked for."""
    firsts = [0, 1, 2, 3, 0x10, 0x11, 0x20, 0x30, 0x45, 0xC3, 0x80, 0xFF]
    for i in range(STORM):
        kind = i % 5
        if kind == 0:
            n = rng.randrange(0, 1400)
            yield bytes([rng.choice(firsts)]) + rng.randbytes(n)
        elif kind == 1:
            yield valid[: rng.randrange(0, len(valid))]
        elif kind == 2:
            yield valid + rng.randbytes(rng.randrange(1, 64))
        elif kind == 3:
            yield bytes([0x10]) + rng.randbytes(1999)  # over MAX_RECEIVE_SIZE
        else:
            fake = m.Response(m.Command.PING, rng.getrandbits(32), ("127.0.0.1", 9))
            yield m.encode_response(fake)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dhtnode", *args], capture_output=True,
                          text=True, timeout=30)


def test_storm_is_counted_and_dropped_and_both_families_still_served(
    dual_stack_node: tuple[int, Path],
) -> None:
    port, state = dual_stack_node
    rng = random.Random(2026)
    valid = m.encode_request(m.Request(m.Command.PING, 7))
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.settimeout(2.0)
            # A real request first: its answer is then replayed at the node.
            s.sendto(valid, (host, port))
            answer = b""
            for _ in range(5):  # a node still learning its address may ping us first
                data, _ = s.recvfrom(2048)
                msg = m.decode(data)
                if isinstance(msg, m.Response) and msg.tid == 7:
                    answer = data
                    break
            assert answer
            for _ in range(3):
                s.sendto(answer, (host, port))
            for i, data in enumerate(_storm(rng, valid)):
                s.sendto(data, (host, port))
                if i % 200 == 199:
                    time.sleep(0.01)  # stay within the socket buffer: count drops, not overflow

    st = asyncio.run(control.request(state / "control.sock", "status", timeout=5))
    stats = st["stats"]
    dropped = sum(v for k, v in stats.items() if k.startswith("drop_"))
    assert stats.get("drop_malformed", 0) > 0
    assert stats.get("drop_oversized", 0) > 0
    assert stats.get("drop_unmatched", 0) > 0
    assert stats.get("drop_stun", 0) > 0
    assert dropped > STORM  # most of both storms; valid-looking leftovers may be answered
    assert stats.get("receive_error", 0) == 0

    # Still serving, on both families.
    # A bootstrap node without --public-host learns its address by pinging its first callers
    # back, so it may answer the very first ping before it has an id.
    for _ in range(2):
        ids = set()
        for target in (f"127.0.0.1:{port}", f"[::1]:{port}"):
            out = _cli("ping", target, "--json")
            assert out.returncode == 0, out.stderr
            ids.add(json.loads(out.stdout)["node_id"])
    st = asyncio.run(control.request(state / "control.sock", "status", timeout=5))
    # Each family sees the id of the node's address in that family (an id is checked
    # against the source address its receiver saw); status shows the primary (IPv4) one.
    assert st["node_id"] is not None
    assert ids == {st["node_id"], node_id_for(("::1", port)).hex()}
    # Its id follows its IPv4 address; it knows its IPv6 one too.
    assert st["public_address"] == f"127.0.0.1:{port}"
    assert st["public_addresses"] == [f"127.0.0.1:{port}", f"[::1]:{port}"]
    out = _cli("stun", f"[::1]:{port}", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["mapped_address"].startswith("[::1]:")
