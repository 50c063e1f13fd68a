"""Reachability in small networks (virtual time), and the public seams netcheck uses:
``DhtNode.start_checks`` (checks without a join walk), ``ignore_probes_from`` (probes that
prove nothing) and ``reserved_helpers``."""

from __future__ import annotations

import pytest

from dhtnode.dht import reachability
from dhtnode.dht.node import DhtParams
from dhtnode.sim.network import SimNetwork, build_network, natlab_shape

#: Virtual seconds a public newcomer of the NAT lab's shape may take to serve: its first
#: checks (0.5 s, then 1 s and 2 s later, 3 s each at most) with room to spare. Before
#: ASIDE_AFTER_CHECKS and three helpers, 28 of 100 seeds took about 650 s.
LAB_SHAPE_BOUND = 15.0


@pytest.mark.parametrize("seed", range(20))
def test_public_newcomer_beside_two_bootstrap_nodes_serves_within_seconds(seed: int) -> None:
    net, pub2 = natlab_shape(seed)
    t0 = net.now
    net.run_until(t0 + LAB_SHAPE_BOUND, stop=lambda: pub2.node.server)
    assert pub2.node.server, f"not serving {net.now - t0:.1f} s after joining"
    # Proven by its contacts' helpers: it never had to set a contact aside.
    assert pub2.node.reserve_size == 0


def test_no_contact_is_set_aside_before_checks_have_failed_to_prove() -> None:
    """A contact set aside is one contact fewer to ask, and useful only 600 s later."""
    net = SimNetwork(seed=4, params=DhtParams())
    first = net.add_node(bootstrap_node=True)
    a, b = (net.add_node(seeds=(first.addr,)) for _ in range(2))
    for h in (a, b):
        net.start(h, lambda n: n.bootstrap())
    # The first ASIDE_AFTER_CHECKS checks end by about 0.5 + 1 + 2 + 4 s (x1.25) + 4 x 3 s.
    net.run_until(net.now + 9.0)
    for h in (a, b):
        assert h.node.server or h.node.reserve_size == 0
    net.run_until(net.now + 120.0)
    # Later, a node still unproven in this network of three does set one aside.
    for h in (a, b):
        assert h.node.server or h.node.reserve_size == 1
        assert h.node.reserved_helpers <= {first.addr, a.addr, b.addr}
    assert reachability.ASIDE_AFTER_CHECKS >= 1


def test_start_checks_without_a_join_and_ignored_probes() -> None:
    """netcheck's seams: checks begin without a join walk; a probe from a source the driver
    discounts makes the check inconclusive (never a verdict either way) and is counted."""
    net = build_network(12, seed=9, params=DhtParams(), batch=11)
    seed = next(iter(net.hosts.values()))
    for discount in (True, False):
        newcomer = net.add_node(seeds=(seed.addr,))
        if discount:
            newcomer.node.ignore_probes_from(lambda source: True)
        net.run_op(newcomer, lambda n: n.ping(seed.addr))
        net.act(newcomer, lambda n: n.start_checks())
        net.run_until(net.now + 30.0)
        node = newcomer.node
        if discount:
            assert not node.reachable
            assert node.stats["probe_ignored"] >= 1
            assert node.status()["nat_filtering"] == "unknown"
        else:
            assert node.reachable
            assert node.stats["probe_ignored"] == 0
