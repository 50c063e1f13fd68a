"""An IPv6 /64 against a node's nearest contacts (issue 6): one /64 is usually one
subscriber, who holds 2^64 addresses and so as many ids, and can grind them next to any key.

``dht/diversity.py`` bounds a *host* to HOST_LIMIT per bucket and closest set, and its
``contact_groups`` keys an IPv6 host by its /64: the routing table and the lookup use it
(the address observer keeps ``wire/netgroup.groups``, per address, for its witnesses).

Measured with the table below (100 honest IPv4 and 100 honest IPv6 contacts, then 1,000
addresses of one /64 ground next to the node's own id): keyed by address, the /64 holds 138
of 228 table entries and 10 of the 20 nearest (the /48 share, k/2); keyed by /64, 22 of 112
and 2 of the 20 nearest, and no honest entry is pushed out.
"""

from __future__ import annotations

import random

from dhtnode.dht.diversity import HOST_LIMIT, contact_groups, prefix_limit
from dhtnode.dht.ids import distance, node_id_for
from dhtnode.dht.node import DhtNode, DhtParams
from dhtnode.wire.address import Address
from tests.adversarial.engine import VICTIM, answer_from, honest_addresses, serving_node

K = DhtParams().k
#: The attacker's /64 (documentation range) and how many of its addresses it brings.
SUBNET64 = "2001:db8:66:1"
CROWD = 1000
#: Interface ids the attacker grinds through to find the CROWD nearest the victim's id.
GRIND = 20000


def in_subnet(addr: Address) -> bool:
    return addr[0].startswith(SUBNET64 + ":")


def crowded_node() -> tuple[DhtNode, bytes, int]:
    """A serving node with honest contacts of both families, then CROWD addresses of one
    /64 ground next to its own id; returns the node, that id and the honest entries the
    table held before the crowd came."""
    node = serving_node(5)
    honest6 = [(f"2001:db8:{i + 256:x}::1", 5000) for i in range(100)]
    answer_from(node, honest_addresses(100) + honest6, 1.0)
    honest_before = len(node.table)
    own = node_id_for(VICTIM)
    candidates = [(f"{SUBNET64}::{i:x}", 7000) for i in range(1, GRIND + 1)]
    crowd = sorted(candidates, key=lambda a: distance(node_id_for(a), own))[:CROWD]
    answer_from(node, crowd, 2.0)
    return node, own, honest_before


def worst_share(node: DhtNode, own: bytes) -> int:
    """The most contacts of the /64 in the K nearest of our id or of 100 random ids."""
    rng = random.Random(6)
    targets = [own] + [rng.randbytes(32) for _ in range(100)]
    return max(sum(in_subnet(c.addr) for c in node.table.closest(t, K)) for t in targets)


def test_a_64_keyed_as_one_host_holds_at_most_host_limit_of_the_nearest() -> None:
    """With the /64 as the host key, the bounds that exist already do the rest: the table,
    its closest sets and FIND_NODE answers hold at most HOST_LIMIT of the /64."""
    node, own, honest_before = crowded_node()
    table = list(node.table)
    ours = sum(in_subnet(c.addr) for c in table)
    worst = worst_share(node, own)
    print(f"\n{CROWD} addresses of one /64: {ours} of {len(table)} table entries, at most "
          f"{worst} of any {K} nearest")
    assert worst <= HOST_LIMIT
    assert sum(not in_subnet(c.addr) for c in table) == honest_before  # nobody pushed out


def test_a_64_alone_is_not_cut_off_more_than_any_host() -> None:
    """Only the /64 in the table: the host bound is strict, so it keeps HOST_LIMIT per
    bucket; other /64s of its /48 fill up to the prefix share as before."""
    node = serving_node(7)
    site = [(f"2001:db8:77:{i:x}::1", 5000) for i in range(1, 41)]
    answer_from(node, site, 1.0)
    nearest = node.table.closest(node_id_for(VICTIM), K)
    assert len(nearest) == min(K, len(site))
    assert len(nearest) >= prefix_limit(K)


def test_contact_groups_key_ipv6_by_64_and_ipv4_by_address() -> None:
    assert contact_groups("2001:db8:66:1::5") == contact_groups("2001:db8:66:1:ffff::9")
    assert contact_groups("2001:db8:66:1::5") != contact_groups("2001:db8:66:2::5")
    assert contact_groups("198.51.100.7") != contact_groups("198.51.100.8")
    assert contact_groups("127.0.0.1") is None
