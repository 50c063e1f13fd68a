"""Lookup hops and success rate on a simulated network of thousands of nodes.

The nodes are the real sans-I/O engine (dhtnode.dht.node); only the wire is simulated
(dhtnode.sim.network: 20-30 ms latency, optional loss). Reported per lookup: hops (depth of
the nearest answering node), requests sent, virtual time, whether the announced record was
found and whether the exact k nearest serving nodes were reached. Baseline for hops:
log2(N / k), Kademlia's expected depth.

Two scenarios: every node public with no loss; then 30% of the nodes behind filtering NATs
(clients that must never serve) and 2% datagram loss.

Environment: SIM_NODES (default 2000), SIM_LOOKUPS (200).
"""

from __future__ import annotations

import math
import os
import random
import statistics
import time

from dhtnode.dht.ids import distance, node_id_for, topic_from_name
from dhtnode.dht.node import DhtParams
from dhtnode.sim.network import build_network

N = int(os.environ.get("SIM_NODES", "2000"))
LOOKUPS = int(os.environ.get("SIM_LOOKUPS", "200"))
SCENARIOS = ((0.0, 0.0), (0.3, 0.02))  # (share behind filtering NATs, datagram loss)


def main() -> None:
    for firewalled, loss in SCENARIOS:
        scenario(firewalled, loss)
        print()


def scenario(firewalled: float, loss: float) -> None:
    t0 = time.perf_counter()
    params = DhtParams()
    net = build_network(
        N, seed=42, params=params, batch=100, settle=30.0, firewalled_share=firewalled
    )
    net.loss = loss
    build_s = time.perf_counter() - t0
    hosts = list(net.hosts.values())
    servers = [h for h in hosts if h.node.server]
    walled = [h for h in hosts if h.firewalled]
    open_hosts = [h for h in hosts if not h.firewalled]
    rng = random.Random(1)
    topics = [topic_from_name(f"bench-{i}") for i in range(LOOKUPS // 10 or 1)]
    announcers = rng.sample(hosts, len(topics))
    for topic, h in zip(topics, announcers, strict=True):
        net.run_op(h, lambda n, t=topic: n.announce(t, refresh=False))  # type: ignore[misc]
    hops: list[int] = []
    sent: list[int] = []
    refetched: list[int] = []
    times: list[float] = []
    found = exact = 0
    t1 = time.perf_counter()
    for i in range(LOOKUPS):
        topic = topics[i % len(topics)]
        owner = announcers[i % len(topics)].node.identity.public_key
        h = rng.choice(hosts)
        start = net.now
        res = net.run_op(h, lambda n, t=topic: n.lookup(t)).result()  # type: ignore[misc]
        times.append(net.now - start)
        hops.append(res.hops)
        # Storers asked again with their token for records withheld before we proved our
        # address (MORE): part of the lookup's cost.
        refetched.append(res.refetched)
        sent.append(res.nodes_asked + res.refetched)
        found += any(r.public_key == owner for r in res.records)
        truth = sorted(
            (s.addr for s in servers if s.alive and s.addr != h.node.public),
            key=lambda a: distance(node_id_for(a), topic),
        )[: params.k]
        exact += res.closest[:1] == truth[:1]
    lookup_s = time.perf_counter() - t1
    print(f"# simulated network: {N} nodes, {len(walled)} behind filtering NATs, "
          f"k={params.k}, alpha={params.alpha}, loss={loss:.0%}")
    print(f"public nodes serving        {sum(h.node.server for h in open_hosts):8d} "
          f"of {len(open_hosts)}")
    print(f"NATed nodes serving         {sum(h.node.server for h in walled):8d} "
          f"of {len(walled)}   (must be 0)")
    print(f"build+settle wall time      {build_s:8.1f} s   ({net.delivered} datagrams)")
    print(f"lookups                     {LOOKUPS:8d}      ({lookup_s:.1f} s wall)")
    print(f"success (record found)      {found / LOOKUPS:8.1%}")
    print(f"nearest node found          {exact / LOOKUPS:8.1%}")
    print(f"hops median / p95 / max     {statistics.median(hops):8.1f} / "
          f"{sorted(hops)[int(0.95 * len(hops)) - 1]} / {max(hops)}")
    print(f"baseline log2(N/k)          {math.log2(N / params.k):8.1f}")
    print(f"requests per lookup median  {statistics.median(sent):8.1f}   "
          f"(of which re-asks for withheld records {statistics.median(refetched):.1f})")
    print(f"virtual time median / p95   {statistics.median(times) * 1000:8.0f} / "
          f"{sorted(times)[int(0.95 * len(times)) - 1] * 1000:.0f} ms")


if __name__ == "__main__":
    main()
