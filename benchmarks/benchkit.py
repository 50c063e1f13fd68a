"""Helpers the benchmark scripts share (imported as a sibling module: the scripts run as
files, so their own folder is on ``sys.path``): percentiles, stopping a process, and a bulk
transfer measured against a receiver that counts what arrived."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dhtnode.connect.services import plug_in
from dhtnode.crypto.identity import Identity
from dhtnode.dht.node import DhtNode, DhtParams
from dhtnode.nat.relay import RelayLimits
from dhtnode.transport.connections import Connections
from dhtnode.transport.udp import NodeEndpoint, open_udp_socket
from dhtnode.wire.address import Address, normalize

#: Bytes per write and read in the bulk transfers.
CHUNK = 65536


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def stop(p: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM (a clean shutdown), then SIGKILL after ``timeout`` seconds."""
    if p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


async def sink(reader: asyncio.StreamReader, writer: Any) -> None:
    """Read to EOF, then answer with the byte count (the sender's clock stops on it)."""
    n = 0
    while data := await reader.read(CHUNK):
        n += len(data)
    writer.write(b"%d" % n)
    await writer.drain()
    writer.write_eof()


async def send_bulk(reader: asyncio.StreamReader, writer: Any, total: int) -> float:
    """Send ``total`` bytes, wait for the receiver's count; returns MB/s."""
    block = os.urandom(CHUNK)
    t0 = time.perf_counter()
    sent = 0
    while sent < total:
        writer.write(block)
        sent += len(block)
        await writer.drain()
    writer.write_eof()
    got = int(await asyncio.wait_for(reader.read(), 120))
    elapsed = time.perf_counter() - t0
    if got != total:
        raise RuntimeError(f"receiver counted {got} of {total} bytes")
    return total / elapsed / 1e6


#: Engine parameters of the in-process loopback DHTs: short timeouts, nothing is lost here.
PARAMS = DhtParams(request_timeout=0.5, slow_after=0.15)


@dataclass
class Peer:
    ep: NodeEndpoint
    conns: Connections


async def start_peer(
    bootstrap: Address | None = None, *, relay_limits: RelayLimits | None = None
) -> Peer:
    """One connect-capable node on 127.0.0.1 (a bootstrap node without ``bootstrap``)."""
    sock = open_udp_socket("127.0.0.1", 0)
    local = normalize(sock.getsockname())
    node = DhtNode(
        Identity.generate(), PARAMS, now=time.monotonic(), wall=time.time,
        public_address=None if bootstrap else local, seeds=[bootstrap] if bootstrap else [],
    )
    services = plug_in(node, relay_limits=relay_limits)
    ep = await NodeEndpoint.create_on(sock, node)
    return Peer(ep, Connections(ep, services))


async def start_dht(n: int, *, relay_limits: RelayLimits | None = None) -> list[Peer]:
    """``n`` nodes on 127.0.0.1, joined through the first; waits (up to 20 s) until all serve."""
    first = await start_peer(relay_limits=relay_limits)
    peers = [first]
    for _ in range(n - 1):
        peers.append(await start_peer(first.ep.local_address, relay_limits=relay_limits))
    await asyncio.gather(*(p.ep.run(lambda node: node.bootstrap()) for p in peers[1:]))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and sum(p.ep.node.server for p in peers) < n:
        await asyncio.sleep(0.05)
    return peers


def run_parts(parts: dict[str, Callable[[], object]], selected: str,
              line: Callable[[str, str], None], t0: float) -> None:
    """Run the ``parts`` whose names are in ``selected``; a part that raises becomes a
    "FAILED" figure line (a product failure is a figure, not a crash); then the total time."""
    for name, run in parts.items():
        if name in selected:
            try:
                run()
            except Exception as exc:
                line(f"part {name}", f"FAILED: {type(exc).__name__}: {str(exc)[:300]}")
    print(f"# total {time.monotonic() - t0:.0f} s", flush=True)
