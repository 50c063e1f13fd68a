"""The protocol on a simulated network (virtual time): joining, announce/lookup, churn,
TTL expiry, firewalled nodes staying clients, and hostile input."""

from __future__ import annotations

import random

import pytest

from dhtnode.dht.ids import topic_from_name
from dhtnode.dht.node import DhtParams
from dhtnode.dht.sent import SENT_TO_TTL
from dhtnode.sim.network import SimNetwork, build_network

PARAMS = DhtParams(record_ttl=120.0)


@pytest.fixture(scope="module")
def net() -> SimNetwork:
    return build_network(120, seed=7, params=PARAMS, firewalled_share=0.2)


def test_reachable_nodes_serve_and_firewalled_ones_stay_clients(net: SimNetwork) -> None:
    open_hosts = [h for h in net.hosts.values() if not h.firewalled]
    walled = [h for h in net.hosts.values() if h.firewalled]
    assert walled, "the fixture should have firewalled hosts"
    assert all(not h.node.server for h in walled)
    serving = sum(h.node.server for h in open_hosts)
    assert serving == len(open_hosts)
    for h in open_hosts:
        assert h.node.public == h.addr
        assert h.node.node_id is not None
    # Nobody's routing table holds a firewalled node.
    walled_addrs = {h.addr for h in walled}
    for h in net.hosts.values():
        assert not walled_addrs & {c.addr for c in h.node.table}


def test_every_node_finds_an_announcer(net: SimNetwork) -> None:
    hosts = list(net.hosts.values())
    topic = topic_from_name("sim-every-node")
    announcer = hosts[17]
    op = net.run_op(announcer, lambda n: n.announce(topic))
    assert op.result() >= PARAMS.k // 2
    found = 0
    for h in hosts:
        res = net.run_op(h, lambda n: n.lookup(topic)).result()
        keys = {r.public_key for r in res.records}
        found += announcer.node.identity.public_key in keys
    assert found == len(hosts)


def test_lookups_survive_killing_30_percent() -> None:
    net = build_network(100, seed=11, params=PARAMS)
    hosts = list(net.hosts.values())
    topic = topic_from_name("churn")
    announcer = hosts[5]
    assert net.run_op(announcer, lambda n: n.announce(topic)).result() > 0
    rng = random.Random(3)
    victims = rng.sample([h for h in hosts if h is not announcer], 30)
    for v in victims:
        net.kill(v.addr)
    alive = [h for h in hosts if h.alive]
    ok = 0
    for h in alive:
        res = net.run_op(h, lambda n: n.lookup(topic)).result()
        ok += any(r.public_key == announcer.node.identity.public_key for r in res.records)
    assert ok == len(alive)


def test_records_vanish_after_ttl_without_refresh() -> None:
    net = build_network(40, seed=5, params=PARAMS)
    hosts = list(net.hosts.values())
    topic = topic_from_name("ttl")
    assert net.run_op(hosts[3], lambda n: n.announce(topic, refresh=False)).result() > 0
    assert net.run_op(hosts[9], lambda n: n.lookup(topic)).result().records
    net.run_until(net.now + PARAMS.record_ttl + 10)
    assert net.run_op(hosts[9], lambda n: n.lookup(topic)).result().records == []
    assert all(len(h.node.store) == 0 for h in hosts)


def test_refreshed_records_outlive_ttl_and_unannounce_removes_them() -> None:
    net = build_network(40, seed=6, params=PARAMS)
    hosts = list(net.hosts.values())
    topic = topic_from_name("refresh")
    assert net.run_op(hosts[4], lambda n: n.announce(topic)).result() > 0
    net.run_until(net.now + 3 * PARAMS.record_ttl)
    assert net.run_op(hosts[8], lambda n: n.lookup(topic)).result().records
    assert net.run_op(hosts[4], lambda n: n.unannounce(topic)).result() > 0
    assert net.run_op(hosts[8], lambda n: n.lookup(topic)).result().records == []


def test_hostile_datagrams_are_counted_and_dropped(net: SimNetwork) -> None:
    victim = next(h for h in net.hosts.values() if h.node.server)
    rng = random.Random(9)
    before = sum(victim.node.stats.values())
    for i in range(500):
        junk = bytes([0x10 + (i % 2)]) + rng.randbytes(rng.randrange(0, 300))
        assert victim.node.receive(junk, ("203.0.113.66", 4000 + i), net.now) is True
    assert victim.node.stats["drop_malformed"] + victim.node.stats["drop_unmatched"] > 0
    assert sum(victim.node.stats.values()) > before


@pytest.mark.parametrize("firewalled", [False, True])
def test_late_joiner_of_a_tiny_network_is_judged_right(firewalled: bool) -> None:
    """In a network so small that a newcomer soon talks to every node, only its probe reserve
    (servers it heard of and never contacted) can show it is reachable; a firewalled one must
    still stay a client."""
    net = build_network(6, seed=5, params=PARAMS, batch=5)
    assert all(h.node.server for h in net.hosts.values())
    first = next(iter(net.hosts.values()))
    late = net.add_node(firewalled=firewalled, seeds=(first.addr,))
    net.run_op(late, lambda n: n.bootstrap())
    net.run_until(net.now + 60.0)
    others = [h for h in net.hosts.values() if h is not late]
    assert late.node.server is not firewalled
    assert late.node.reachable is not firewalled
    holders = sum(late.addr in {c.addr for c in h.node.table} for h in others)
    if firewalled:
        assert holders == 0
    else:
        assert holders >= 1
        # It has talked to everyone by now: its lookups skip nobody any more.
        assert late.node.reserve_size == 0


def test_public_nodes_of_a_three_node_network_all_serve_eventually() -> None:
    """Two public newcomers that joined together spoil each other's probes (helping one
    another opens each one's filter to the other); setting a contact aside until it is a
    stranger again (SENT_TO_TTL) still proves both."""
    net = build_network(3, seed=3, params=PARAMS, batch=2, settle=2 * SENT_TO_TTL + 120.0)
    assert all(h.node.server for h in net.hosts.values())
    for h in net.hosts.values():
        assert {c.addr for c in h.node.table} == set(net.hosts) - {h.addr}


def test_a_busy_topic_is_found_whole(net: SimNetwork) -> None:
    """More announcers than fit in one LOOKUP answer: storers answer with a fresh random
    share each time, so one lookup across k storers still collects (nearly) all of them."""
    hosts = list(net.hosts.values())
    topic = topic_from_name("sim-busy-topic")
    announcers = hosts[30:54]  # 24: over four answers' worth of records
    for h in announcers:
        assert net.run_op(h, lambda n: n.announce(topic, refresh=False)).result() > 0
    want = {h.node.identity.public_key for h in announcers}
    for looker in hosts[90:95]:
        res = net.run_op(looker, lambda n: n.lookup(topic)).result()
        got = {r.public_key for r in res.records}
        assert got <= want
        assert len(got) >= len(want) - 1, (len(got), len(want))
