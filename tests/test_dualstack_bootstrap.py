"""Joining a dual-stack bootstrap node through its IPv6 address (issue 8).

A node's id is ``H(public address)`` and every receiver checks it against the source it saw.
A dual-stack bootstrap node whose id follows its IPv4 address used to show that id to peers
that reach it over IPv6 too: they dropped every answer as ``drop_bad_id`` and never got a
routing table. Now a node shows each family the id of its address in that family
(``NodeContext.id_for``), learning that address first when it does not know it yet.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from dhtnode.crypto.identity import Identity
from dhtnode.dht.context import NodeContext
from dhtnode.dht.ids import node_id_for
from dhtnode.dht.node import DhtNode, DhtParams
from dhtnode.dht.routing import RoutingTable
from dhtnode.transport.udp import NodeEndpoint, open_udp_socket
from dhtnode.wire.address import Address, normalize
from tests.loopnet import has_ipv6_loopback

PARAMS = DhtParams(request_timeout=0.5, slow_after=0.15)



needs_v6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback here")


async def _endpoint(host: str, *, public: Address | None = None, assume: bool = False,
                    seeds: tuple[Address, ...] = ()) -> NodeEndpoint:
    sock = open_udp_socket(host, 0)
    node = DhtNode(Identity.generate(), PARAMS, now=time.monotonic(), wall=time.time,
                   public_address=public, assume_reachable=assume, seeds=seeds)
    return await NodeEndpoint.create_on(sock, node)


@pytest.fixture
async def endpoints() -> AsyncIterator[list[NodeEndpoint]]:
    eps: list[NodeEndpoint] = []
    yield eps
    for e in eps:
        e.close()


async def _join(ep: NodeEndpoint) -> int:
    return int(await asyncio.wait_for(ep.run(lambda n: n.bootstrap()), 10))


@needs_v6
async def test_join_through_v6_loopback_of_a_dual_stack_bootstrap(
        endpoints: list[NodeEndpoint]) -> None:
    """`dhtnode run --bootstrap-node --host ::` (its address learned from the network), a node
    joining through 127.0.0.1 first (so its id follows the IPv4 address), then one through
    [::1]: the second joiner's table fills at its first join, with no bad id."""
    boot = await _endpoint("::", assume=True)
    endpoints.append(boot)
    port = boot.local_address[1]
    v4 = await _endpoint("127.0.0.1", seeds=(("127.0.0.1", port),))
    endpoints.append(v4)
    assert await _join(v4) == 1
    assert boot.node.public == ("127.0.0.1", port)  # the id follows IPv4
    v6 = await _endpoint("::", seeds=(("::1", port),))
    endpoints.append(v6)
    assert await _join(v6) >= 1
    assert ("::1", port) in {c.addr for c in v6.node.table}
    assert v6.node.stats["drop_bad_id"] == 0
    # It shows each family the id of its address in that family.
    ctx = boot.node.ctx
    assert ctx.id_for(("::1", 1)) == node_id_for(("::1", port))
    assert ctx.id_for(("127.0.0.1", 1)) == node_id_for(("127.0.0.1", port))
    # ... and never puts itself in its table under its other address.
    assert ("::1", port) not in {c.addr for c in boot.node.table}


@needs_v6
async def test_bootstrap_with_a_fixed_v4_address_learns_its_v6_one(
        endpoints: list[NodeEndpoint]) -> None:
    """`--bootstrap-node --host :: --public-host 127.0.0.1`: the fixed address covers IPv4
    only. Towards IPv6 the node shows no id (rather than one dropped as bad) until an answer
    of an IPv6 peer tells it its IPv6 address; from then on IPv6 joiners get a table."""
    sock = open_udp_socket("::", 0)
    port = normalize(sock.getsockname())[1]
    node = DhtNode(Identity.generate(), PARAMS, now=time.monotonic(), wall=time.time,
                   public_address=("127.0.0.1", port), assume_reachable=True)
    boot = await NodeEndpoint.create_on(sock, node)
    endpoints.append(boot)
    v6 = await _endpoint("::", seeds=(("::1", port),))
    endpoints.append(v6)
    assert await _join(v6) == 0
    assert v6.node.stats["drop_bad_id"] == 0  # no id at all, not a wrong one
    # The bootstrap node talks to an IPv6 peer once (any request of its own does).
    await asyncio.wait_for(boot.run(lambda n: n.ping(("::1", v6.local_address[1]))), 5)
    assert await _join(v6) == 1
    assert {c.addr for c in v6.node.table} == {("::1", port)}
    assert v6.node.stats["drop_bad_id"] == 0
    assert boot.node.public == ("127.0.0.1", port)  # the fixed address is untouched


def test_id_for_is_none_for_a_family_whose_address_is_unknown() -> None:
    ctx = NodeContext(Identity.generate(), DhtParams(), now=0.0, wall=time.time,
                      rng=__import__("random").Random(1), secret_bytes=bytes,
                      table=RoutingTable(node_id_for(("192.0.2.1", 5)), 20))
    assert ctx.id_for(("2001:db8::1", 5)) is None  # a client: no id at all
    ctx.standing.server = True
    ctx.standing.public = ("192.0.2.1", 5)
    assert ctx.id_for(("198.51.100.9", 7)) == node_id_for(("192.0.2.1", 5))
    # Serving on IPv4, IPv6 address not known: no id rather than one the peer drops as bad.
    assert ctx.id_for(("2001:db8::1", 5)) is None
    ctx.other_family.add(("2001:db8::2", 9), ("2001:db8::77", 5))
    assert ctx.id_for(("2001:db8::1", 5)) == node_id_for(("2001:db8::77", 5))
    assert ctx.own_address(("2001:db8::77", 5)) and not ctx.own_address(("2001:db8::1", 5))
