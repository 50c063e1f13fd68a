"""Memory of where this node has sent datagrams, for telling solicited traffic from strangers'.

Once we sent to an address, a NAT or stateful firewall in front of us lets that address's
answers in, and one that filters by IP only lets in anything from that IP. So a datagram from
such an address proves nothing about whether strangers can reach us. This module owns that
bounded, time-limited memory; it does not decide what to do with the answer.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

from dhtnode.wire.address import Address, is_loopback

#: Addresses remembered, at most (the oldest are forgotten first).
MAX_SENT_TO = 8192
#: Seconds an address stays remembered: longer than UDP NAT filters live. RFC 4787 asks for at
#: least 120 s and recommends 300 s; Linux conntrack keeps an answered UDP flow 120-180 s.
#: Twice the recommendation, because calling a filtered node reachable is the costly mistake.
SENT_TO_TTL = 600.0


class SentMemory:
    """Addresses (and their IPs) this node sent to in the last :data:`SENT_TO_TTL` seconds."""

    __slots__ = ("_addrs", "_ips")

    def __init__(self) -> None:
        self._addrs: OrderedDict[Address, float] = OrderedDict()
        self._ips: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._addrs)

    def __contains__(self, addr: object) -> bool:
        return addr in self._addrs

    def note(self, addr: Address, now: float) -> None:
        addrs = self._addrs
        if addr in addrs:
            addrs.move_to_end(addr)
        else:
            self._ips[addr[0]] += 1
        addrs[addr] = now
        if len(addrs) > MAX_SENT_TO:
            self._forget_oldest()

    def solicited(self, addr: Address) -> bool:
        """Could our NAT have let ``addr``'s datagram in because of our own traffic?

        True if we sent to the address, or to its IP (address-restricted NATs filter on the
        IP alone). Loopback IPs are judged by the full address: nothing filters there, and
        every node of a loopback network shares one IP.
        """
        if addr in self._addrs:
            return True
        return self._ips[addr[0]] > 0 and not is_loopback(addr[0])

    def expire(self, now: float) -> None:
        horizon = now - SENT_TO_TTL
        addrs = self._addrs
        while addrs and next(iter(addrs.values())) < horizon:
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        addr, _ = self._addrs.popitem(last=False)
        left = self._ips[addr[0]] - 1
        if left:
            self._ips[addr[0]] = left
        else:
            del self._ips[addr[0]]
