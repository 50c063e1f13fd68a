"""What the rest of the network says our address is, and what that tells about our NAT.

Every DHT response carries the address the responder saw our request come from. Samples are
kept per *witness* (most recent :data:`MAX_SAMPLES` witnesses): a witness is an IP address,
not an ip:port, since one attacker owns every port of its IP; at most
:data:`MAX_PREFIX_VOTES` witnesses of one prefix (/24, /48; ``wire/netgroup.py``) count.
Loopback responders are each a witness of their own (test networks). From them:

* the public address is the address most witnesses agree on (two agreeing witnesses, or the
  only one we have); an agreed address gives way only to one that :data:`QUORUM` witnesses
  back and that more witnesses back than the old one;
* the NAT mapping is CONSISTENT when different witnesses see the same address (endpoint-
  independent mapping: holepunching by simultaneous open works), RANDOM when they see
  different ports (endpoint-dependent mapping: needs a birthday search or a relay), UNKNOWN
  with fewer than two witnesses. Once decided, it flips only when :data:`QUORUM` witnesses
  back the change (to RANDOM: that many disagree with the most common address).

Reachability (can a stranger reach us unsolicited?) is decided elsewhere, by the probe in
``dhtnode.dht.node``; this class only classifies samples. Pure: no I/O, clock passed in.
``nat/behaviour.py`` names the classes in RFC 4787 words for users (CONSISTENT:
endpoint-independent mapping; RANDOM: endpoint-dependent, since one witness per IP cannot tell
address- from address-and-port-dependent).
"""

from __future__ import annotations

import enum
from collections import Counter, OrderedDict

from dhtnode.wire import netgroup
from dhtnode.wire.address import FAMILY_V4, FAMILY_V6, Address, family_of

#: Witnesses remembered; the oldest is forgotten first.
MAX_SAMPLES = 16
#: Witnesses one prefix (IPv4 /24, IPv6 /48) may have at once: a subnet of liars gets no more
#: votes than this, while a lab or Docker network whose servers share one /24 still has three
#: witnesses (enough for a newcomer to a 3-node network to learn its address and NAT class).
MAX_PREFIX_VOTES = 3
#: Distinct witnesses that must back a change of an agreed public address or a decided NAT
#: class: one host, however many sockets it opens, cannot flip either.
QUORUM = 2
#: Share of samples the most common address needs for the mapping to count as consistent.
CONSISTENT_SHARE = 0.75


class NatClass(enum.Enum):
    UNKNOWN = "unknown"
    CONSISTENT = "consistent"
    RANDOM = "random"


class AddressObserver:
    """Samples per address family: a dual-stack node has one public address per family, and
    two of them are not a NAT handing out different ports. The *primary* family is IPv4 when
    any IPv4 sample exists (it reaches more of the network), else IPv6; ``public_address``,
    ``nat_class`` and ``sample_count`` describe the primary family. The verdicts are
    recomputed on each sample, not on each read: a server reads them per request."""

    def __init__(self) -> None:
        # Keyed by witness: (prefix, host) keys, or ("", "ip:port") for loopback responders.
        self._samples: dict[int, OrderedDict[tuple[str, str], Address]] = {
            FAMILY_V4: OrderedDict(),
            FAMILY_V6: OrderedDict(),
        }
        # The agreed address per family, kept until a quorum backs another.
        self._agreed: dict[int, Address | None] = {FAMILY_V4: None, FAMILY_V6: None}
        self.public_address: Address | None = None
        #: Every family's agreed public address, the primary family's first.
        self.public_addresses: tuple[Address, ...] = ()
        self.nat_class = NatClass.UNKNOWN
        self.sample_count = 0

    def add(self, responder: Address, seen_as: Address) -> bool:
        """Record one sample; True if the public addresses or the NAT class changed."""
        before = (self.public_addresses, self.nat_class)
        samples = self._samples[family_of(seen_as[0])]
        g = netgroup.groups(responder[0])
        witness = ("", f"{responder[0]}|{responder[1]}") if g is None else (g[1], g[0])
        known = samples.get(witness)
        samples[witness] = seen_as
        samples.move_to_end(witness)
        if known == seen_as:
            return False  # the same vote again: nothing to recount
        if witness[0]:
            same = [w for w in samples if w[0] == witness[0]]
            for w in same[: max(0, len(same) - MAX_PREFIX_VOTES)]:
                del samples[w]  # the prefix's oldest witnesses give way
        while len(samples) > MAX_SAMPLES:
            samples.popitem(last=False)
        self._recompute()
        return (self.public_addresses, self.nat_class) != before

    @property
    def port_samples(self) -> tuple[int, ...]:
        """The primary family's mapped ports, in the order responders were (re)sampled: what
        a peer needs to see a sequential port allocation and predict our next mapping."""
        primary = self._samples[FAMILY_V4] or self._samples[FAMILY_V6]
        return tuple(a[1] for a in primary.values())

    def clear(self) -> None:
        for samples in self._samples.values():
            samples.clear()
        self._recompute()

    def _recompute(self) -> None:
        for family, samples in self._samples.items():
            self._agreed[family] = _agreed(samples, self._agreed[family])
        primary_family = FAMILY_V4 if self._samples[FAMILY_V4] else FAMILY_V6
        primary = self._samples[primary_family]
        self.sample_count = len(primary)
        self.public_address = self._agreed[primary_family]
        agreed = (self._agreed[FAMILY_V4], self._agreed[FAMILY_V6])
        self.public_addresses = tuple(a for a in agreed if a is not None)
        self.nat_class = _classify(primary, self.nat_class)


def _agreed(
    samples: OrderedDict[tuple[str, str], Address], current: Address | None
) -> Address | None:
    """The address most witnesses agree on: two agreeing witnesses, or the only one. An agreed
    ``current`` address stays while no other has more witnesses (ties keep it)."""
    if not samples:
        return None
    counts = Counter(samples.values())
    (addr, n), *_ = counts.most_common(1)
    if n >= QUORUM:
        if current is not None and counts.get(current, 0) >= n:
            return current
        return addr
    if len(samples) == 1:
        return addr
    return None


def _classify(samples: OrderedDict[tuple[str, str], Address], previous: NatClass) -> NatClass:
    """The NAT class the witnesses show; a decided class flips only with :data:`QUORUM`
    witnesses behind the change."""
    if len(samples) < 2:
        return NatClass.UNKNOWN
    top = Counter(samples.values()).most_common(1)[0][1]
    share = top / len(samples)
    verdict = NatClass.CONSISTENT if share >= CONSISTENT_SHARE else NatClass.RANDOM
    if previous is NatClass.UNKNOWN or verdict is previous:
        return verdict
    backers = len(samples) - top if verdict is NatClass.RANDOM else top
    return verdict if backers >= QUORUM else previous
