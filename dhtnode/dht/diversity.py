"""Diversity of contacts: how many entries one host or one prefix may hold in a bucket or in a
closest set (an answer, a lookup's k nearest, the storers of a topic).

Ids are ``H(ip:port)``, so one host with many ports owns many ids and can grind ports until
some land next to any key it likes. Bounds (keys from ``wire/netgroup.py``):

* **host** (IPv4 address, IPv6 /64: :func:`contact_groups`): at most :data:`HOST_LIMIT` per
  bucket and per closest set, strictly. Several honest nodes on one VPS still all serve; each
  table and each set just holds two of them. A /64 is one subscriber's allocation (RFC 6177)
  and holds 2^64 addresses, so ids: keyed by the exact address (``netgroup.groups``, which
  routing.py and lookup.py still call), 1,000 addresses of one /64 ground next to a node's id
  took 138 of its 228 table entries and 10 of its 20 nearest (the /48 share); keyed by
  :func:`contact_groups`, 22 of 112 and 2 (tests/test_diversity.py).
* **prefix** (IPv4 /24, IPv6 /48): at most :func:`prefix_limit` (half of k) per bucket and per
  closest set *while others compete*: when fewer than k contacts of other prefixes exist, the
  nearest of the crowded prefix fill the rest. A network whose public nodes all share one /24
  (a lab, a Docker network, the simulator) therefore behaves exactly as without the bound,
  and a subnet never pushes out an honest node that is there to take its place.

Loopback is exempt. Pure: no clock, no I/O.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Protocol, TypeVar

from dhtnode.wire.netgroup import GROUP_CACHE_SIZE, source_keys
from dhtnode.wire.netgroup import groups as _address_groups


class Grouped(Protocol):
    """Anything with diversity keys: (host, prefix) from ``wire/netgroup.groups``, or None
    for an exempt (loopback) address."""

    @property
    def groups(self) -> tuple[str, str] | None: ...


G = TypeVar("G", bound=Grouped)

#: Entries one host (IPv4 address, IPv6 /64) may hold per bucket and per closest set: a VPS
#: running a few nodes keeps two in each; 500 ports of one IP get no more (S/Kademlia and
#: BEP 42 bind ids to addresses for the same reason).
HOST_LIMIT = 2
#: Share of a bucket or closest set one prefix (/24, /48) may hold while others compete: a
#: subnet can take at most half of the k nearest of any id, so half stays honest.
PREFIX_SHARE = 0.5


@functools.lru_cache(maxsize=GROUP_CACHE_SIZE)
def contact_groups(ip: str) -> tuple[str, str] | None:
    """The diversity keys of a contact at a canonical IP string: ``(host, prefix)`` as in
    ``netgroup.groups`` (IPv4 address and /24; None for loopback), except that an IPv6 host
    is its /64. The address observer keeps counting witnesses per address: a lab (or a LAN)
    whose nodes share one /64 must still give an IPv6-only node two witnesses."""
    g = _address_groups(ip)
    if g is None or ":" not in ip:
        return g
    return (source_keys(ip)[0], g[1])


def prefix_limit(k: int) -> int:
    """Entries one prefix may hold in a bucket or closest set of size ``k`` (others competing)."""
    return max(HOST_LIMIT, math.ceil(k * PREFIX_SHARE))


def pick_diverse(
    ranked: Sequence[G], n: int, k: int, available: int | None = None
) -> tuple[list[G], bool]:
    """The first ``n`` of ``ranked`` (nearest first) under the bounds: at most
    :data:`HOST_LIMIT` per host, at most ``prefix_limit(k)`` per prefix; when fewer than ``n``
    pass, the nearest held back by the prefix bound (never by the host bound) fill up.

    Returns the picks in ``ranked`` order and whether they are final: ``n`` picked without
    filling up, or (given ``available``, the most picks within the bounds that the whole
    source holds) every such pick made and the rest filled. If not final, items further out,
    were there any, could still displace a filler."""
    limit = prefix_limit(k)
    hosts: dict[str, int] = {}
    prefixes: dict[str, int] = {}
    picked: list[int] = []
    held: list[int] = []
    # The hot loop of every answer and lookup step while some prefix is crowded: kept flat.
    for i, item in enumerate(ranked):
        g = item.groups
        if g is not None:
            host, prefix = g
            h = hosts.get(host, 0)
            if h >= HOST_LIMIT:
                continue
            p = prefixes.get(prefix, 0)
            if p >= limit:
                held.append(i)
                continue
            hosts[host] = h + 1
            prefixes[prefix] = p + 1
        picked.append(i)
        if len(picked) >= n:
            return [ranked[j] for j in picked], True
    final = available is not None and len(picked) >= available
    if held:
        for i in held:
            g = ranked[i].groups
            assert g is not None
            h = hosts.get(g[0], 0)
            if h >= HOST_LIMIT:
                continue
            hosts[g[0]] = h + 1
            picked.append(i)
            if len(picked) >= n:
                break
        picked.sort()
    return [ranked[j] for j in picked], final and len(picked) >= n


def within_bounds(items: Sequence[G], k: int, *, prefixes: bool = True) -> bool:
    """Do ``items`` keep the bounds already (at most :data:`HOST_LIMIT` per host and, with
    ``prefixes``, ``prefix_limit(k)`` per prefix)? Then ``pick_diverse`` would return them
    unchanged: the check costs a set and a few dict operations, the pick a pass over more."""
    groups = [g for item in items if (g := item.groups) is not None]
    if len({g[0] for g in groups}) < len(groups):
        hosts: dict[str, int] = {}
        for g in groups:
            h = hosts[g[0]] = hosts.get(g[0], 0) + 1
            if h > HOST_LIMIT:
                return False
    limit = prefix_limit(k)
    if not prefixes or len(groups) <= limit:
        return True
    per_prefix: dict[str, int] = {}
    for g in groups:
        p = per_prefix[g[1]] = per_prefix.get(g[1], 0) + 1
        if p > limit:
            return False
    return True
