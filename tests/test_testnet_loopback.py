"""An in-process testnet of 50 nodes on real UDP sockets on 127.0.0.1.

Every node's lookup of an announced topic finds the announcer; after killing 30% of the
nodes at random, lookups still succeed; unrefreshed records vanish after their TTL.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from dhtnode.crypto.identity import Identity
from dhtnode.dht.ids import topic_from_name
from dhtnode.dht.node import DhtNode, DhtParams
from dhtnode.transport.udp import NodeEndpoint, open_udp_socket
from dhtnode.wire.address import normalize

pytestmark = pytest.mark.slow

N = 50
PARAMS = DhtParams(record_ttl=4.0, request_timeout=0.5, slow_after=0.15)


async def start_node(
    *, bootstrap: tuple[str, int] | None = None, first: bool = False
) -> NodeEndpoint:
    sock = open_udp_socket("127.0.0.1", 0)
    local = normalize(sock.getsockname())
    node = DhtNode(
        Identity.generate(),
        PARAMS,
        now=time.monotonic(),
        wall=time.time,
        public_address=local if first else None,
        seeds=[bootstrap] if bootstrap else [],
    )
    return await NodeEndpoint.create_on(sock, node)


async def wait_for(cond: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.05)
    return False


async def test_fifty_node_testnet_on_loopback() -> None:
    eps: list[NodeEndpoint] = []
    try:
        first = await start_node(first=True)
        eps.append(first)
        for _ in range(N - 1):
            eps.append(await start_node(bootstrap=first.local_address))
        await asyncio.gather(*(ep.run(lambda n: n.bootstrap()) for ep in eps[1:]))
        assert await wait_for(lambda: all(ep.node.server for ep in eps), 30.0), [
            (ep.node.server, ep.node.reachable, ep.node.public) for ep in eps
        ]
        # A second round of self-lookups lets everybody learn the now-serving nodes.
        await asyncio.gather(*(ep.run(lambda n: n.bootstrap()) for ep in eps[1:]))
        for ep in eps:
            assert ep.node.public == ep.local_address
            assert len(ep.node.table) >= 10

        topic = topic_from_name("loopback-testnet")
        announcer = eps[7]
        stored = await announcer.run(lambda n: n.announce(topic))
        assert stored >= PARAMS.k // 2
        key = announcer.node.identity.public_key
        results = await asyncio.gather(*(ep.run(lambda n: n.lookup(topic)) for ep in eps))
        assert all(any(r.public_key == key for r in res.records) for res in results)
        # The record carries the announcer's public address as seen by the network.
        rec = next(r for r in results[0].records if r.public_key == key)
        assert rec.addresses[0][1] == announcer.local_address

        # Kill 30% (not the announcer) without goodbyes.
        rng = random.Random(4)
        victims = rng.sample([ep for ep in eps if ep is not announcer], int(N * 0.3))
        for v in victims:
            v.close()
        alive = [ep for ep in eps if ep not in victims]
        results = await asyncio.gather(*(ep.run(lambda n: n.lookup(topic)) for ep in alive))
        assert all(any(r.public_key == key for r in res.records) for res in results)

        # Records not refreshed vanish after the TTL.
        other = topic_from_name("loopback-ttl")
        assert await announcer.run(lambda n: n.announce(other, refresh=False)) > 0
        res = await alive[3].run(lambda n: n.lookup(other))
        assert res.records
        await asyncio.sleep(PARAMS.record_ttl + 5.5)  # TTL plus one maintenance tick
        res = await alive[3].run(lambda n: n.lookup(other))
        assert res.records == []
    finally:
        for ep in eps:
            ep.close()
