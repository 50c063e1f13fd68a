"""Eclipse from one IP (issue 6, item 3): one host with many ports, or one subnet, against a
node's routing table, its answers, and a topic. Ids are H(ip:port), so an attacker owns one id
per port and grinds ports until some sit next to any key.

Figures before the fix (the issue): one IP with many ports took 106 of 174 entries and all 20
nearest the node's own id; 20 ports next to a topic took every store and hid it; 30 of 30
forged PINGs entered the table."""

from __future__ import annotations

import random
import time
from collections import Counter

from dhtnode.dht.diversity import HOST_LIMIT, prefix_limit
from dhtnode.dht.ids import bucket_index, node_id_for, topic_from_name
from dhtnode.dht.maintenance import VERIFY_BURST, VERIFY_RATE
from dhtnode.dht.node import DhtParams
from dhtnode.sim.network import build_network
from dhtnode.wire import messages as m
from tests.adversarial.engine import (
    VICTIM,
    add_liars,
    answer_from,
    flush,
    grind_ports,
    honest_addresses,
    serving_node,
)

K = DhtParams().k
ATTACKER_IP = "203.0.113.66"


def test_one_ip_with_500_ports_holds_a_few_entries_per_bucket_and_none_of_the_nearest() -> None:
    node = serving_node()
    honest = honest_addresses(100)
    answer_from(node, honest, 1.0)
    honest_before = len(node.table)
    # The attacker's ports answer our requests too (the strongest case: no verification
    # needed), 500 of them, 250 ground to sit next to our own id.
    own = node_id_for(VICTIM)
    near = grind_ports(ATTACKER_IP, own, 250, range(1024, 40000))
    rng = random.Random(2)
    taken = {a[1] for a in near}
    rest = [(ATTACKER_IP, p) for p in rng.sample(range(40000, 65536), 250) if p not in taken]
    answer_from(node, near + rest, 2.0)

    table = list(node.table)
    ours = [c for c in table if c.addr[0] == ATTACKER_IP]
    local = int.from_bytes(node.table.local_id, "big")
    per_bucket = Counter(bucket_index(local, c.key) for c in ours)
    nearest = node.table.closest(own, K)
    in_nearest = sum(c.addr[0] == ATTACKER_IP for c in nearest)
    worst = 0
    for _ in range(200):
        target = rng.randbytes(32)
        worst = max(worst, sum(c.addr[0] == ATTACKER_IP for c in node.table.closest(target, K)))
    # A FIND_NODE for the neighbourhood the attacker ground its ports into.
    req = m.Request(m.Command.FIND_NODE, 7, None, own)
    node.receive(m.encode_request(req), ("198.19.0.1", 6000), 3.0)
    answers = [m.decode(d) for d, a in node.datagrams_to_send() if a == ("198.19.0.1", 6000)]
    named = [n for r in answers if isinstance(r, m.Response) for n in (r.nodes or ())]
    print(
        f"\n500 ports of one IP vs 100 honest contacts: attacker holds {len(ours)} of "
        f"{len(table)} entries (max {max(per_bucket.values())} per bucket, "
        f"{len(per_bucket)} buckets), {in_nearest} of the {K} nearest our id, at most "
        f"{worst} of any {K}-closest set (200 random ids), "
        f"{sum(a[0] == ATTACKER_IP for a in named)} of {len(named)} in a FIND_NODE answer; "
        f"{node.table.refused} refused; honest entries {honest_before} before and after"
    )
    assert max(per_bucket.values()) <= HOST_LIMIT
    assert in_nearest <= HOST_LIMIT
    assert worst <= HOST_LIMIT
    assert len(ours) <= HOST_LIMIT * len(per_bucket)
    assert sum(c.addr in honest for c in table) == honest_before  # nobody honest pushed out


def test_one_subnet_gets_a_bounded_share_and_a_lone_subnet_is_not_cut_off() -> None:
    node = serving_node(3)
    honest = honest_addresses(100)
    answer_from(node, honest, 1.0)
    own = node_id_for(VICTIM)
    subnet = [(f"203.0.113.{i}", p) for i in range(1, 101) for p in (7000, 7001)]
    answer_from(node, subnet, 2.0)
    limit = prefix_limit(K)
    rng = random.Random(4)
    worst = 0
    for target in [own] + [rng.randbytes(32) for _ in range(200)]:
        got = node.table.closest(target, K)
        worst = max(worst, sum(c.addr[0].startswith("203.0.113.") for c in got))
    held = sum(c.addr[0].startswith("203.0.113.") for c in node.table)
    print(f"\n200 ids of one /24 (100 IPs) vs 100 honest contacts: the /24 holds {held} of "
          f"{len(node.table)} entries and at most {worst} of any {K}-closest set "
          f"(bound {limit})")
    assert worst <= limit

    # A network whose nodes all share one /24 (a lab, a Docker network): nobody competes, so
    # nothing is held back, and closest() is the plain ranking.
    lone = serving_node(5)
    lab = [(f"203.0.113.{i}", 49200) for i in range(1, 61)]
    answer_from(lone, lab, 1.0)
    target = rng.randbytes(32)
    plain = sorted(lone.table, key=lambda c: c.key ^ int.from_bytes(target, "big"))[:K]
    assert lone.table.closest(target, K) == plain
    print(f"60 nodes all in one /24: table {len(lone.table)}, closest() = the plain {K} nearest")


def test_forged_pings_from_addresses_that_do_not_exist_do_not_enter_the_table() -> None:
    node = serving_node(7)
    answer_from(node, honest_addresses(30), 1.0)
    before = len(node.table)
    forged = [(f"198.51.{100 + i // 200}.{i % 200 + 1}", 9000 + i) for i in range(30)]
    for i, src in enumerate(forged):
        req = m.Request(m.Command.PING, 1000 + i, node_id_for(src))
        node.receive(m.encode_request(req), src, 2.0)
    out = node.datagrams_to_send()
    verify = sum(1 for d, a in out if a in forged and isinstance(m.decode(d), m.Request))
    node.handle_timer(10.0)  # every verification times out: nobody is there
    node.datagrams_to_send()
    node.handle_timer(20.0)
    entered = sum(node.table.get(a) is not None for a in forged)
    print(f"\n30 forged PINGs (ids = H(source)): {entered} entered the table "
          f"({before} -> {len(node.table)} entries); {verify} verification PINGs sent")
    assert entered == 0
    assert len(node.table) == before

    # A flood of them makes the node send verification PINGs only at a bounded rate.
    t0 = time.perf_counter()
    sent = 0
    flood = 20_000
    for i in range(flood):
        src = (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 9999)
        req = m.Request(m.Command.PING, i, node_id_for(src))
        node.receive(m.encode_request(req), src, 30.0 + i / 10_000)  # 2 s of flood
        sent += sum(1 for d, a in node.datagrams_to_send() if a == src and m.decode(d).tid != i)
    dt = time.perf_counter() - t0
    bound = VERIFY_BURST + VERIFY_RATE * 2.0 + 1
    print(f"{flood} forged PINGs over 2 s (virtual; {flood / dt:,.0f}/s real): "
          f"{sent} verification PINGs to third parties (bound {bound:.0f}), table "
          f"{len(node.table)}")
    assert sent <= bound


def test_a_topic_is_found_while_one_ip_with_many_ports_sits_next_to_it() -> None:
    net = build_network(60, seed=21, params=DhtParams(record_ttl=600.0))
    honest = [h for h in net.hosts.values() if h.node.server]
    topic = topic_from_name("eclipse-me")
    sybils = add_liars(net, grind_ports(ATTACKER_IP, topic, 40))
    for s in sybils:
        s.join(h.addr for h in honest)
    flush(net, sybils)
    net.run_until(net.now + 60.0)
    in_tables = [sum(c.addr[0] == ATTACKER_IP for c in h.node.table) for h in honest]

    announcer = honest[7]
    stored = net.run_op(announcer, lambda n: n.announce(topic)).result()
    storers = announcer.node.topics.storers(topic)
    sybil_storers = sum(a[0] == ATTACKER_IP for a in storers)
    key = announcer.node.identity.public_key
    found = 0
    lookers = honest[10:40]
    for h in lookers:
        res = net.run_op(h, lambda n: n.lookup(topic)).result()
        found += any(r.public_key == key for r in res.records)
    print(f"\n40 ports of one IP ground next to a topic, 60-node network: at most "
          f"{max(in_tables)} of them in any honest table; announce stored on {stored} "
          f"({sybil_storers} of them the attacker's); found by {found} of {len(lookers)} lookups")
    assert max(in_tables) <= 2 * HOST_LIMIT * 4  # a few per bucket, a handful of buckets
    assert sybil_storers <= HOST_LIMIT
    assert found == len(lookers)


def test_several_honest_nodes_on_one_ip_all_join_and_serve() -> None:
    """A VPS running four nodes: the host bound holds each table to two of them per bucket,
    but all four join, serve, are known to others and have their records found."""
    net = build_network(40, seed=9, params=DhtParams(record_ttl=600.0))
    first = next(iter(net.hosts.values()))
    vps = [net.add_node(addr=("203.0.113.50", 49200 + i), seeds=(first.addr,)) for i in range(4)]
    for h in vps:
        net.start(h, lambda n: n.bootstrap())
    net.run_until(net.now + 120.0)
    others = [h for h in net.hosts.values() if h not in vps]
    known = [sum(h.addr in {c.addr for c in o.node.table} for o in others) for h in vps]
    found = 0
    for i, h in enumerate(vps):
        topic = topic_from_name(f"vps-{i}")
        assert net.run_op(h, lambda n, t=topic: n.announce(t)).result() > 0  # type: ignore[misc]
        res = net.run_op(others[i], lambda n, t=topic: n.lookup(t)).result()  # type: ignore[misc]
        found += any(r.public_key == h.node.identity.public_key for r in res.records)
    print(f"\n4 nodes on one IP in a 40-node network: serving {[h.node.server for h in vps]}, "
          f"in {known} of {len(others)} other tables; their records found {found} of 4")
    assert all(h.node.server for h in vps)
    assert all(n > 0 for n in known)
    assert found == 4
