"""An in-process network of connect-capable nodes on 127.0.0.1, for tests: the ``net``
fixture gives eight nodes (the first a bootstrap node), joined and mostly serving; and
:func:`has_ipv6_loopback` for the tests that need ``::1``."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from dhtnode.connect.services import plug_in
from dhtnode.crypto.identity import Identity
from dhtnode.dht.node import DhtNode, DhtParams
from dhtnode.nat.relay import RelayLimits
from dhtnode.transport.connection import Connection
from dhtnode.transport.connections import Connections
from dhtnode.transport.udp import NodeEndpoint, open_udp_socket
from dhtnode.wire.address import normalize

PARAMS = DhtParams(request_timeout=0.5, slow_after=0.15)


def has_ipv6_loopback() -> bool:
    """Whether this machine can bind UDP on ``::1`` (containers without IPv6 cannot)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@dataclass
class Peer:
    ep: NodeEndpoint
    conns: Connections


async def start_peer(*, bootstrap: tuple[str, int] | None = None, first: bool = False) -> Peer:
    sock = open_udp_socket("127.0.0.1", 0)
    local = normalize(sock.getsockname())
    node = DhtNode(
        Identity.generate(), PARAMS, now=time.monotonic(), wall=time.time,
        public_address=local if first else None, seeds=[bootstrap] if bootstrap else [],
    )
    # Loopback moves hundreds of MB/s: relay limits that do not throttle the tests' transfers.
    services = plug_in(node, relay_limits=RelayLimits(session_rate=200e6, total_rate=400e6))
    ep = await NodeEndpoint.create_on(sock, node)
    return Peer(ep, Connections(ep, services))


@pytest.fixture
async def net() -> AsyncIterator[list[Peer]]:
    peers: list[Peer] = []
    try:
        first = await start_peer(first=True)
        peers.append(first)
        for _ in range(7):
            peers.append(await start_peer(bootstrap=first.ep.local_address))
        await asyncio.gather(*(p.ep.run(lambda n: n.bootstrap()) for p in peers[1:]))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and sum(p.ep.node.server for p in peers) < 6:
            await asyncio.sleep(0.05)
        yield peers
    finally:
        for p in peers:
            await p.conns.close()
            p.ep.close()


async def sha256_sink(conn: Connection, done: asyncio.Future[bytes]) -> None:
    """Serve one stream of ``conn``: read it to its end, answer its SHA-256 and length (8
    bytes), and set ``done`` to the digest (transfer tests check both ends agree)."""
    reader, writer = await conn.accept_stream()
    h = hashlib.sha256()
    n = 0
    while data := await reader.read(65536):
        h.update(data)
        n += len(data)
    writer.write(h.digest() + n.to_bytes(8, "big"))
    writer.write_eof()
    done.set_result(h.digest())
