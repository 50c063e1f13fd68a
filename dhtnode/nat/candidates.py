"""Which addresses of a peer one punch attempt probes: the address the introducer saw, the
peer's LAN addresses when both sides share a public IP, and the peer's own IPv6 addresses
when both sides have IPv6 but the introduction ran over IPv4 (the dual-stack race).

The introducer-seen address is proven (the DHT node received the peer's packets from it);
the others are the peer's own claims, carried inside its signed, sealed introduction. A peer
could name a third party's address there, so claimed addresses are only ever probed a few
times (:data:`dhtnode.nat.punch.EXTRA_ROUNDS`) and only where they can make sense: LAN
addresses behind one shared public IP, IPv6 addresses when we have IPv6 ourselves.

Pure: no sockets, no clock. The driver finds our own addresses; ``nat/punch.py`` sends.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from dhtnode.connect.peerinfo import PeerInfo
from dhtnode.wire.address import FAMILY_V6, Address, family_of

#: LAN addresses of the peer probed besides its public one (same public IP only).
MAX_LAN_TARGETS = 2
#: Claimed IPv6 addresses of the peer raced beside an IPv4 introduction: one per interface
#: is the common case; a second covers a host with a temporary and a stable address.
MAX_V6_TARGETS = 2


@dataclass(frozen=True, slots=True)
class Targets:
    #: Probed in every round of the plan; the introducer-seen address is last (the punch
    #: driver keys its per-IP limits on it).
    peer: tuple[Address, ...]
    #: The peer's claimed IPv6 addresses, probed in the first few rounds only.
    extra: tuple[Address, ...] = ()


def usable_v6(ip: str) -> bool:
    """Whether ``ip`` is an IPv6 address a host elsewhere could send to: not loopback,
    link-local, multicast, unspecified or IPv4-mapped. Unique-local (fc00::/7) and the
    documentation prefix pass: both work between hosts of one site (the NAT lab uses the
    latter), and a probe that cannot arrive costs a few datagrams."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return isinstance(addr, ipaddress.IPv6Address) and not (
        addr.is_loopback
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_unspecified
        or addr.ipv4_mapped is not None
        or addr.is_site_local
    )


def v6_addresses(info: PeerInfo) -> tuple[Address, ...]:
    """The usable IPv6 addresses among ``info``'s public ones."""
    return tuple(
        a for a in info.public_addresses if family_of(a[0]) == FAMILY_V6 and usable_v6(a[0])
    )


def punch_targets(
    seen: Address, theirs: PeerInfo, ours: PeerInfo, *, same_public_ip: bool
) -> Targets:
    """The addresses to probe for a peer the introducer saw at ``seen``.

    * Behind one public IP (no hairpin on most routers): the peer's LAN addresses first.
    * Introduced over IPv4 while both sides have IPv6: the peer's IPv6 addresses are raced
      beside the IPv4 punch, and whichever path answers first wins. Not the other way round:
      an IPv4 address the peer claims is usually behind a NAT that needs the planned
      strategy, which the introducer-seen address already gets.
    """
    peer = [seen]
    if same_public_ip:
        lan = [a for a in theirs.lan_addresses if a != seen][:MAX_LAN_TARGETS]
        peer = lan + peer
    extra: tuple[Address, ...] = ()
    if family_of(seen[0]) != FAMILY_V6 and v6_addresses(ours):
        extra = tuple(a for a in v6_addresses(theirs) if a not in peer)[:MAX_V6_TARGETS]
    return Targets(tuple(peer), extra)
