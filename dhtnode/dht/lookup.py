"""The iterative Kademlia lookup as a state machine (no I/O, no clock).

It keeps up to ``alpha`` requests in flight at all times rather than in synchronous rounds:
as soon as one answer arrives, the next nearest unqueried candidate is asked. A request that
is merely slow is marked so by the caller (:meth:`Lookup.on_slow`) and stops counting against
``alpha``, so one slow node never stalls the lookup; its answer is still used if it comes.

The lookup ends when the ``k`` nearest candidates that have not failed have all answered.
The caller sends the requests, feeds back answers and failures, and reads the result.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from dhtnode.dht.ids import node_id_for
from dhtnode.wire.address import Address

#: Candidates kept per lookup, as a multiple of k: far ones beyond this are forgotten.
CANDIDATE_FACTOR = 4


class PeerState(enum.Enum):
    CANDIDATE = 0
    INFLIGHT = 1
    SLOW = 2
    RESPONDED = 3
    FAILED = 4


@dataclass(slots=True)
class LookupPeer:
    distance: int
    addr: Address
    #: Hops from the starting set: 0 for seeds, parent's depth + 1 for nodes learned later.
    depth: int = 0
    state: PeerState = PeerState.CANDIDATE


class Lookup:
    def __init__(
        self, target: bytes, *, k: int, alpha: int, exclude: Iterable[Address] = ()
    ) -> None:
        self.target = target
        self.k = k
        self.alpha = alpha
        self._t = int.from_bytes(target, "big")
        self._peers: dict[Address, LookupPeer] = {}
        self._order: list[tuple[int, Address]] = []
        self._exclude = set(exclude)
        self.inflight = 0
        self.queried = 0
        self.responses = 0

    def add_candidates(self, addrs: Iterable[Address], depth: int = 0) -> None:
        cap = self.k * CANDIDATE_FACTOR
        for addr in addrs:
            if addr in self._peers or addr in self._exclude:
                continue
            d = int.from_bytes(node_id_for(addr), "big") ^ self._t
            if len(self._order) >= cap:
                if d >= self._order[-1][0]:
                    continue
                far = self._order[-1]
                if self._peers[far[1]].state is PeerState.CANDIDATE:
                    self._order.pop()
                    del self._peers[far[1]]
            self._peers[addr] = LookupPeer(d, addr, depth)
            bisect.insort(self._order, (d, addr))

    def next_queries(self) -> list[Address]:
        """Candidates to ask now; each is marked in flight."""
        out: list[Address] = []
        if self.inflight >= self.alpha:
            return out
        for p in self._nearest_live():
            if p.state is PeerState.CANDIDATE:
                p.state = PeerState.INFLIGHT
                self.inflight += 1
                self.queried += 1
                out.append(p.addr)
                if self.inflight >= self.alpha:
                    break
        return out

    def _nearest_live(self) -> Iterator[LookupPeer]:
        """The k nearest peers that have not failed, nearest first."""
        live = 0
        for _, addr in self._order:
            p = self._peers[addr]
            if p.state is PeerState.FAILED:
                continue
            live += 1
            if live > self.k:
                return
            yield p

    def _settle(self, addr: Address, new: PeerState) -> bool:
        p = self._peers.get(addr)
        if p is None or p.state not in (PeerState.INFLIGHT, PeerState.SLOW):
            return False
        if p.state is PeerState.INFLIGHT:
            self.inflight -= 1
        p.state = new
        return True

    def on_response(self, addr: Address, closer: Iterable[Address]) -> None:
        if self._settle(addr, PeerState.RESPONDED):
            self.responses += 1
            self.add_candidates(closer, self._peers[addr].depth + 1)

    def on_failure(self, addr: Address) -> None:
        self._settle(addr, PeerState.FAILED)

    def on_slow(self, addr: Address) -> None:
        p = self._peers.get(addr)
        if p is not None and p.state is PeerState.INFLIGHT:
            p.state = PeerState.SLOW
            self.inflight -= 1

    @property
    def done(self) -> bool:
        """True once the k nearest candidates that have not failed have all answered
        (or no candidate is left). Answers still in flight further out cannot matter."""
        return all(p.state is PeerState.RESPONDED for p in self._nearest_live())

    @property
    def hops(self) -> int:
        """Depth of the nearest node that answered: how many hops the lookup needed."""
        for _, addr in self._order:
            p = self._peers[addr]
            if p.state is PeerState.RESPONDED:
                return p.depth + 1
        return 0

    def closest_responded(self, n: int) -> list[Address]:
        out: list[Address] = []
        for _, addr in self._order:
            if self._peers[addr].state is PeerState.RESPONDED:
                out.append(addr)
                if len(out) >= n:
                    break
        return out
