"""Routing table: our table against the `kademlia` package's (2.2.3) side by side.

Both get the same contacts (kademlia's with the first 20 bytes of each id, since its keyspace
is hard-wired to 160 bits). Reported: microseconds per "k nearest to a random target" query
and how often the answer is exactly the k nearest by brute force.

This is the measurement behind the decision in docs/ARCHITECTURE.md to keep our own table.
"""

from __future__ import annotations

import asyncio
import random
import time

from dhtnode.dht.ids import node_id_for
from dhtnode.dht.routing import RoutingTable

CONTACTS = 2000
QUERIES = 2000
K = 20


class _NoPing:
    async def call_ping(self, node: object) -> None:
        return None


async def main() -> None:
    from kademlia.node import Node
    from kademlia.routing import RoutingTable as KadTable

    rng = random.Random(7)
    local = rng.randbytes(32)
    addrs = [(f"198.51.{100 + i // 250}.{i % 250 + 1}", 1000 + i) for i in range(CONTACTS)]
    ids = [node_id_for(a) for a in addrs]
    ours = RoutingTable(local, K)
    theirs = KadTable(_NoPing(), K, Node(local[:20]))
    for a, i in zip(addrs, ids, strict=True):
        ours.add(i, a, 0.0)
        theirs.add_contact(Node(i[:20], a[0], a[1]))
    await asyncio.sleep(0)
    targets = [rng.randbytes(32) for _ in range(QUERIES)]

    t0 = time.perf_counter()
    for t in targets:
        ours.closest(t, K)
    ours_us = (time.perf_counter() - t0) / QUERIES * 1e6
    t0 = time.perf_counter()
    for t in targets:
        theirs.find_neighbors(Node(t[:20]), K)
    theirs_us = (time.perf_counter() - t0) / QUERIES * 1e6

    ours_exact = theirs_exact = 0
    our_contacts = list(ours)
    their_contacts = [n for b in theirs.buckets for n in b.get_nodes()]
    for t in targets[:200]:
        ti, t20 = int.from_bytes(t, "big"), int.from_bytes(t[:20], "big")
        want = sorted(c.key ^ ti for c in our_contacts)[:K]
        ours_exact += sorted(c.key ^ ti for c in ours.closest(t, K)) == want
        want20 = sorted(n.long_id ^ t20 for n in their_contacts)[:K]
        got20 = sorted(n.long_id ^ t20 for n in theirs.find_neighbors(Node(t[:20]), K))
        theirs_exact += got20 == want20
    print(f"# routing table, {CONTACTS} offered contacts, k={K}, {QUERIES} queries")
    print(f"{'table':<22}{'contacts kept':>14}{'us/query':>10}{'exact k-nearest':>17}")
    print(f"{'dhtnode (256-bit)':<22}{len(ours):>14}{ours_us:>10.1f}{ours_exact / 200:>17.0%}")
    print(f"{'kademlia 2.2.3 (160)':<22}{len(their_contacts):>14}{theirs_us:>10.1f}"
          f"{theirs_exact / 200:>17.0%}")
    print(f"ratio (kademlia / dhtnode time per query): {theirs_us / ours_us:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
