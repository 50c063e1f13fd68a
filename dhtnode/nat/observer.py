"""What the rest of the network says our address is, and what that tells about our NAT.

Every DHT response carries the address the responder saw our request come from. Samples are
kept per responder (most recent :data:`MAX_SAMPLES` responders). From them:

* the public address is the address most responders agree on (two agreeing samples, or the
  only one we have);
* the NAT mapping is CONSISTENT when different responders see the same address (endpoint-
  independent mapping: holepunching by simultaneous open works), RANDOM when they see
  different ports (endpoint-dependent mapping: needs a birthday search or a relay), UNKNOWN
  with fewer than two responders.

Reachability (can a stranger reach us unsolicited?) is decided elsewhere, by the probe in
``dhtnode.dht.node``; this class only classifies samples. Pure: no I/O, clock passed in.
"""

from __future__ import annotations

import enum
from collections import Counter, OrderedDict

from dhtnode.wire.address import FAMILY_V4, FAMILY_V6, Address, family_of

#: Responders remembered; the oldest is forgotten first.
MAX_SAMPLES = 16
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
        self._samples: dict[int, OrderedDict[Address, Address]] = {
            FAMILY_V4: OrderedDict(),
            FAMILY_V6: OrderedDict(),
        }
        self.public_address: Address | None = None
        #: Every family's agreed public address, the primary family's first.
        self.public_addresses: tuple[Address, ...] = ()
        self.nat_class = NatClass.UNKNOWN
        self.sample_count = 0

    def add(self, responder: Address, seen_as: Address) -> bool:
        """Record one sample; True if the public addresses or the NAT class changed."""
        before = (self.public_addresses, self.nat_class)
        samples = self._samples[family_of(seen_as[0])]
        samples[responder] = seen_as
        samples.move_to_end(responder)
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
        primary = self._samples[FAMILY_V4] or self._samples[FAMILY_V6]
        self.sample_count = len(primary)
        self.public_address = _agreed(primary)
        agreed = (_agreed(self._samples[FAMILY_V4]), _agreed(self._samples[FAMILY_V6]))
        self.public_addresses = tuple(a for a in agreed if a is not None)
        if len(primary) < 2:
            self.nat_class = NatClass.UNKNOWN
        else:
            top = Counter(primary.values()).most_common(1)[0][1]
            share = top / len(primary)
            self.nat_class = NatClass.CONSISTENT if share >= CONSISTENT_SHARE else NatClass.RANDOM


def _agreed(samples: OrderedDict[Address, Address]) -> Address | None:
    """The address most responders agree on: two agreeing samples, or the only one."""
    if not samples:
        return None
    (addr, n), *_ = Counter(samples.values()).most_common(1)
    if n >= 2 or len(samples) == 1:
        return addr
    return None
