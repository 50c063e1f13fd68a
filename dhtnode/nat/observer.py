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

from dhtnode.wire.address import Address

#: Responders remembered; the oldest is forgotten first.
MAX_SAMPLES = 16
#: Share of samples the most common address needs for the mapping to count as consistent.
CONSISTENT_SHARE = 0.75


class NatClass(enum.Enum):
    UNKNOWN = "unknown"
    CONSISTENT = "consistent"
    RANDOM = "random"


class AddressObserver:
    def __init__(self) -> None:
        self._samples: OrderedDict[Address, Address] = OrderedDict()

    def add(self, responder: Address, seen_as: Address) -> bool:
        """Record one sample; True if the public address or NAT class changed."""
        before = (self.public_address, self.nat_class)
        self._samples[responder] = seen_as
        self._samples.move_to_end(responder)
        while len(self._samples) > MAX_SAMPLES:
            self._samples.popitem(last=False)
        return (self.public_address, self.nat_class) != before

    def clear(self) -> None:
        self._samples.clear()

    @property
    def sample_count(self) -> int:
        return len(self._samples)

    @property
    def public_address(self) -> Address | None:
        if not self._samples:
            return None
        (addr, n), *_ = Counter(self._samples.values()).most_common(1)
        if n >= 2 or len(self._samples) == 1:
            return addr
        return None

    @property
    def nat_class(self) -> NatClass:
        if len(self._samples) < 2:
            return NatClass.UNKNOWN
        counts = Counter(self._samples.values())
        top = counts.most_common(1)[0][1]
        if top / len(self._samples) >= CONSISTENT_SHARE:
            return NatClass.CONSISTENT
        return NatClass.RANDOM
