"""The iterative Kademlia lookup as a state machine (no I/O, no clock).

It keeps up to ``alpha`` requests in flight at all times rather than in synchronous rounds:
as soon as one answer arrives, the next nearest unqueried candidate is asked. A request that
is merely slow is marked so by the caller (:meth:`Lookup.on_slow`) and stops counting against
``alpha``, so one slow node never stalls the lookup; its answer is still used if it comes.

The lookup ends when the ``k`` nearest candidates that have not failed have all answered.
The caller sends the requests, feeds back answers and failures, and reads the result.

"Nearest" is diverse (``diversity.py``): answers come from strangers, and one host may name
hundreds of its own ports next to the target. So a lookup keeps at most two candidates per
host at all, at most half of its candidate list per prefix, and its k nearest (what it asks,
what ends it, and the storers an announce picks) hold at most half of k per prefix while
others compete.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from dhtnode.dht.diversity import (
    HOST_LIMIT,
    contact_groups,
    pick_diverse,
    prefix_limit,
    within_bounds,
)
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
    #: Diversity keys (host, prefix); None for loopback.
    groups: tuple[str, str] | None = None


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
        # Peers per host and per prefix (loopback not counted: exempt).
        self._hosts: dict[str, int] = {}
        self._prefixes: dict[str, int] = {}
        self._prefix_cap = CANDIDATE_FACTOR * prefix_limit(k)
        self._prefix_limit = prefix_limit(k)
        # Prefixes with more peers than a k-set may hold: while none (or a single prefix),
        # the k nearest need no diversity pass.
        self._crowded = 0
        # The k nearest live peers, until a peer is added, forgotten or fails.
        self._live: list[LookupPeer] | None = None
        #: Candidates turned away because their host already had two in this lookup.
        self.refused = 0

    def add_candidates(self, addrs: Iterable[Address], depth: int = 0) -> None:
        cap = self.k * CANDIDATE_FACTOR
        for addr in addrs:
            if addr in self._peers or addr in self._exclude:
                continue
            g = contact_groups(addr[0])
            if g is not None and self._hosts.get(g[0], 0) >= HOST_LIMIT:
                self.refused += 1
                continue
            d = int.from_bytes(node_id_for(addr), "big") ^ self._t
            # A prefix at its share of the list makes room only among its own candidates.
            if (
                g is not None
                and self._prefixes.get(g[1], 0) >= self._prefix_cap
                and not self._forget_farthest(d, g[1])
            ):
                continue
            if len(self._order) >= cap:
                if d >= self._order[-1][0]:
                    continue
                far = self._order[-1]
                if self._peers[far[1]].state is PeerState.CANDIDATE:
                    self._forget(far[1])
            self._peers[addr] = LookupPeer(d, addr, depth, groups=g)
            bisect.insort(self._order, (d, addr))
            self._live = None
            if g is not None:
                self._hosts[g[0]] = self._hosts.get(g[0], 0) + 1
                n = self._prefixes[g[1]] = self._prefixes.get(g[1], 0) + 1
                self._crowded += n == self._prefix_limit + 1

    def _forget_farthest(self, d: int, prefix: str) -> bool:
        """Make room for a candidate at distance ``d`` of ``prefix``: forget that prefix's
        farthest candidate if it is farther. False if the newcomer is the farthest."""
        for dist, addr in reversed(self._order):
            g = self._peers[addr].groups
            if g is None or g[1] != prefix:
                continue
            if dist <= d:
                return False
            if self._peers[addr].state is PeerState.CANDIDATE:
                self._forget(addr)
                return True
        return True  # only asked ones are farther: keep the newcomer as well

    def _forget(self, addr: Address) -> None:
        p = self._peers.pop(addr)
        self._order.remove((p.distance, addr))
        self._live = None
        g = p.groups
        if g is not None:
            self._crowded -= self._prefixes[g[1]] == self._prefix_limit + 1
            for table, key in ((self._hosts, g[0]), (self._prefixes, g[1])):
                n = table[key] - 1
                if n:
                    table[key] = n
                else:
                    del table[key]

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
        """The k nearest peers that have not failed, nearest first (diverse: at most half of
        k per prefix while others are there)."""
        if self._live is None:
            peers = self._peers
            failed = PeerState.FAILED
            live = [p for _, a in self._order if (p := peers[a]).state is not failed]
            top = live[: self.k]
            if not self._crowded or len(self._prefixes) <= 1 or within_bounds(top, self.k):
                self._live = top
            else:
                self._live = pick_diverse(live, self.k, self.k)[0]
        yield from self._live

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
        if self._settle(addr, PeerState.FAILED):
            self._live = None

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

    def closest_responded(
        self, n: int, accept: Callable[[Address], bool] | None = None
    ) -> list[Address]:
        """The ``n`` nearest peers that answered (and that ``accept`` takes), diverse like
        the k nearest: at most two per host and half of k per prefix while others compete."""
        done = [
            p
            for _, a in self._order
            if (p := self._peers[a]).state is PeerState.RESPONDED
            and (accept is None or accept(a))
        ]
        return [p.addr for p in pick_diverse(done, n, self.k)[0]]
