"""The Kademlia routing table: 256 k-buckets indexed by shared-prefix length with our id.

Holding one bucket per prefix length (rather than splitting a single bucket on demand) is the
same table a fully split Kademlia tree keeps along our own id's path, with O(1) bucket choice.
Each bucket keeps up to k contacts in least-recently-seen order plus a replacement cache of up
to k candidates. A full bucket never drops a live contact for a new one: the new one waits in
the replacement cache and the caller is asked to ping the least-recently-seen contact; a contact
that fails is replaced from the cache (Kademlia's preference for long-lived nodes).

Only verified servers go in here: the caller checks id == H(address) and that the contact
answered one of our requests (BEP 5). Diversity (``diversity.py``): at most two contacts of one
host per bucket (never cached beyond that either); a prefix holding more than half a full
bucket gives way to a newcomer of another prefix; ``closest`` answers hold at most two per host
and half per prefix while others compete.
Pure: takes ``now`` from the caller, never sends anything.
"""

from __future__ import annotations

import bisect
import random
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from dhtnode.dht.diversity import (
    HOST_LIMIT,
    contact_groups,
    pick_diverse,
    prefix_limit,
    within_bounds,
)
from dhtnode.dht.ids import ID_BITS, ID_LEN, bucket_index
from dhtnode.wire import address as wire_address
from dhtnode.wire.address import Address

#: Tables up to this size answer ``closest`` by ranking every contact: measured faster than the
#: bucket walk at 35 contacts (3.8 vs 4.4 µs for n = 20), slower from about 50 on.
SMALL_TABLE = 40
#: Consecutive failed requests after which a contact is dropped even with no replacement.
MAX_FAILURES = 2


@dataclass(slots=True)
class Contact:
    id: bytes
    key: int
    addr: Address
    last_seen: float
    failures: int = 0
    #: The address in compact wire form, kept because every FIND_NODE answer sends ~20.
    packed: bytes = b""
    #: Diversity keys (``wire/netgroup.py``): host and prefix; empty for loopback (exempt).
    host: str = ""
    prefix: str = ""
    #: The same as a pair, None for loopback (what ``diversity.pick_diverse`` reads).
    groups: tuple[str, str] | None = None
    #: Seconds the last answer to our request took; None before the first one.
    rtt: float | None = None


class RoutingTable:
    def __init__(self, local_id: bytes, k: int) -> None:
        self.k = k
        self.local_id = local_id
        self._local = int.from_bytes(local_id, "big")
        self._buckets: list[OrderedDict[int, Contact]] = [OrderedDict() for _ in range(ID_BITS)]
        self._replacements: list[OrderedDict[int, Contact]] = [
            OrderedDict() for _ in range(ID_BITS)
        ]
        self._touched: list[float] = [0.0] * ID_BITS
        self._by_addr: dict[Address, Contact] = {}
        # Sorted indices of non-empty buckets, so lookups skip the ~240 empty ones.
        self._occupied: list[int] = []
        self._prefix_limit = prefix_limit(k)
        # Table-wide counts per host and prefix, and how many of them exceed the closest-set
        # bounds: while none does, ``closest`` needs no diversity pass (the usual case).
        self._hosts: dict[str, int] = {}
        self._prefixes: dict[str, int] = {}
        self._crowded_hosts = 0
        self._crowded_prefixes = 0
        # Contacts a closest set could take within the prefix bound: loopback ones plus, per
        # prefix, at most its limit. Once a walk picked that many, further buckets add nothing.
        self._available = 0
        #: Newcomers turned away because their host already had its share of a bucket.
        self.refused = 0

    def __len__(self) -> int:
        return len(self._by_addr)

    def __iter__(self) -> Iterator[Contact]:
        return iter(list(self._by_addr.values()))

    def get(self, addr: Address) -> Contact | None:
        return self._by_addr.get(addr)

    def add(self, node_id: bytes, addr: Address, now: float) -> Contact | None:
        """Insert or refresh a verified contact.

        Returns the least-recently-seen contact of a full bucket that the caller should ping
        (the newcomer waits in the replacement cache meanwhile), or None.
        """
        key = int.from_bytes(node_id, "big")
        if key == self._local:
            return None
        i = bucket_index(self._local, key)
        bucket = self._buckets[i]
        self._touched[i] = now
        known = bucket.get(key)
        if known is not None:
            if known.addr != addr:
                return None  # ids are bound to addresses; a mismatch is not the same node
            known.last_seen = now
            known.failures = 0
            bucket.move_to_end(key)
            return None
        g = contact_groups(addr[0])
        host, prefix = g or ("", "")
        contact = Contact(node_id, key, addr, now, 0, wire_address.encode(addr), host, prefix, g)
        if host and _count_host(bucket, host) >= HOST_LIMIT:
            self.refused += 1
            return None
        if len(bucket) < self.k:
            self._place(i, contact)
            return None
        # A contact that already failed is replaced at once rather than pinged again.
        for old in bucket.values():
            if old.failures:
                self._drop(i, old, refill=False)
                self._place(i, contact)
                return None
        victim = self._crowded_victim(bucket, contact)
        if victim is not None:
            # A prefix over its share gives way to a newcomer from elsewhere: a subnet may
            # fill a bucket nobody else wants, never keep others out of it.
            self._drop(i, victim, refill=False)
            self._place(i, contact)
            return None
        repl = self._replacements[i]
        if host and key not in repl and _count_host(repl, host) >= HOST_LIMIT:
            self.refused += 1
            return None
        repl[key] = contact
        repl.move_to_end(key)
        while len(repl) > self.k:
            repl.popitem(last=False)
        return next(iter(bucket.values()))

    def admits(self, node_id: bytes, addr: Address) -> bool:
        """Would :meth:`add` place this unknown contact in its bucket right away? (Worth
        checking that it answers before doing so.)"""
        key = int.from_bytes(node_id, "big")
        if key == self._local or addr in self._by_addr:
            return False
        bucket = self._buckets[bucket_index(self._local, key)]
        host, prefix = contact_groups(addr[0]) or ("", "")
        if host and _count_host(bucket, host) >= HOST_LIMIT:
            return False
        if len(bucket) < self.k or any(c.failures for c in bucket.values()):
            return True
        probe = Contact(node_id, key, addr, 0.0, 0, b"", host, prefix)
        return self._crowded_victim(bucket, probe) is not None

    def touch(self, addr: Address, now: float) -> bool:
        """A known contact sent us a request: it was seen (it does not undo failures, which
        only an answer to our own request can). False if ``addr`` is not in the table."""
        c = self._by_addr.get(addr)
        if c is None:
            return False
        c.last_seen = now
        self._buckets[bucket_index(self._local, c.key)].move_to_end(c.key)
        return True

    def _crowded_victim(
        self, bucket: OrderedDict[int, Contact], newcomer: Contact
    ) -> Contact | None:
        """The least recently seen contact of a prefix holding more than its share of this
        full bucket, if ``newcomer`` comes from a prefix under its share."""
        if not self._crowded_prefixes or not newcomer.host:
            return None
        counts: dict[str, int] = {}
        for c in bucket.values():
            if c.host:
                counts[c.prefix] = counts.get(c.prefix, 0) + 1
        limit = self._prefix_limit
        if counts.get(newcomer.prefix, 0) >= limit:
            return None
        for c in bucket.values():
            if c.host and counts[c.prefix] > limit:
                return c
        return None

    def failed(self, addr: Address) -> bool:
        """Record a failed request to ``addr``; True if the contact was dropped."""
        c = self._by_addr.get(addr)
        if c is None:
            return False
        c.failures += 1
        i = bucket_index(self._local, c.key)
        if c.failures >= MAX_FAILURES or self._replacements[i]:
            self._drop(i, c)
            return True
        return False

    def remove(self, addr: Address) -> None:
        c = self._by_addr.get(addr)
        if c is not None:
            self._drop(bucket_index(self._local, c.key), c)

    def closest(self, target: bytes, n: int) -> list[Contact]:
        """The ``n`` contacts nearest ``target`` by XOR distance, nearest first, at most
        :data:`HOST_LIMIT` per host and half of k per prefix while others compete."""
        t = int.from_bytes(target, "big")
        if len(self._by_addr) <= SMALL_TABLE:
            # Ranking every contact beats the bucket walk for tables this small.
            ranked = sorted(self._by_addr.values(), key=lambda c: c.key ^ t)
            top = ranked[:n]
            if self._plain(top):
                return top
            return pick_diverse(ranked, n, self.k)[0]
        b = bucket_index(self._local, t) if t != self._local else ID_BITS - 1
        # Every contact in bucket b is nearer the target than any in a deeper bucket, and those
        # nearer than any in a shallower one; so whole groups are taken in that order and only
        # the gathered ones sorted.
        picked: list[Contact] = list(self._buckets[b].values())
        if len(picked) < n:
            occ = self._occupied
            split = bisect.bisect_right(occ, b)
            for j in occ[split:]:
                picked.extend(self._buckets[j].values())
            i = bisect.bisect_left(occ, b) - 1
            while len(picked) < n and i >= 0:
                picked.extend(self._buckets[occ[i]].values())
                i -= 1
        # A key function beats decorating with (distance, contact) tuples here: comparing
        # tuples costs more than the call (measured 3.0 vs 5.0 µs for 35 contacts).
        picked.sort(key=lambda c: c.key ^ t)
        top = picked[:n]
        if self._plain(top):
            return top
        # Some host or prefix is over its bound in the plain answer: pick under the bounds,
        # walking further out until the picks are final.
        picked = []
        for group in self._groups_outward(b):
            picked.extend(group)
            if len(picked) < n:
                continue
            picked.sort(key=lambda c: c.key ^ t)
            out, final = pick_diverse(picked, n, self.k, self._available)
            if final:
                return out
        picked.sort(key=lambda c: c.key ^ t)
        return pick_diverse(picked, n, self.k)[0]

    def _plain(self, top: list[Contact]) -> bool:
        """Is the plain ranking ``top`` already within the bounds? Always while no host or
        prefix anywhere in the table is over its bound (the usual case); a single prefix
        only has its hosts to check (the nearest held back would fill in again)."""
        many_prefixes = len(self._prefixes) > 1
        if not self._crowded_hosts and not (self._crowded_prefixes and many_prefixes):
            return True
        return within_bounds(top, self.k, prefixes=bool(self._crowded_prefixes) and many_prefixes)

    def _groups_outward(self, b: int) -> Iterator[list[Contact]]:
        """Contacts in groups of increasing distance from a target in bucket ``b``: bucket b,
        then every deeper bucket, then each shallower bucket in turn."""
        yield list(self._buckets[b].values())
        occ = self._occupied
        deeper: list[Contact] = []
        for j in occ[bisect.bisect_right(occ, b) :]:
            deeper.extend(self._buckets[j].values())
        yield deeper
        for i in range(bisect.bisect_left(occ, b) - 1, -1, -1):
            yield list(self._buckets[occ[i]].values())

    def stale_buckets(self, now: float, interval: float) -> list[int]:
        """Indices of buckets worth refreshing: not touched in ``interval`` and not beyond the
        deepest bucket that has a contact (deeper ones are empty by nature)."""
        deepest = self._occupied[-1] if self._occupied else -1
        return [i for i in range(min(deepest + 2, ID_BITS)) if now - self._touched[i] >= interval]

    def touch_bucket(self, i: int, now: float) -> None:
        self._touched[i] = now

    def random_id_in_bucket(self, i: int, rng: random.Random) -> bytes:
        """A random id that shares exactly ``i`` leading bits with ours."""
        flip = 1 << (ID_BITS - 1 - i)
        low = rng.getrandbits(ID_BITS - 1 - i) if i < ID_BITS - 1 else 0
        high = (self._local >> (ID_BITS - i)) << (ID_BITS - i) if i else 0
        own_bit = self._local & flip
        key = high | (flip ^ own_bit) | low
        return key.to_bytes(ID_LEN, "big")

    def _place(self, i: int, c: Contact) -> None:
        if not self._buckets[i]:
            bisect.insort(self._occupied, i)
        self._buckets[i][c.key] = c
        self._count(c, 1)
        old = self._by_addr.get(c.addr)
        if old is not None and old.key != c.key:
            self._drop(bucket_index(self._local, old.key), old)
        self._by_addr[c.addr] = c

    def _drop(self, i: int, c: Contact, *, refill: bool = True) -> None:
        bucket = self._buckets[i]
        if bucket.pop(c.key, None) is None:
            return
        self._count(c, -1)
        if self._by_addr.get(c.addr) is c:
            del self._by_addr[c.addr]
        if not bucket:
            self._occupied.remove(i)
        repl = self._replacements[i]
        if refill and repl:
            # The newest waiting contact whose host still has room in the bucket.
            for key in reversed(repl):
                cand = repl[key]
                if not cand.host or _count_host(bucket, cand.host) < HOST_LIMIT:
                    del repl[key]
                    self._place(i, cand)
                    break

    def _count(self, c: Contact, delta: int) -> None:
        if not c.host:
            self._available += delta
            return
        h = self._hosts.get(c.host, 0)
        self._hosts[c.host] = h + delta
        if not h + delta:
            del self._hosts[c.host]
        if (h <= HOST_LIMIT) != (h + delta <= HOST_LIMIT):
            self._crowded_hosts += delta
        p = self._prefixes.get(c.prefix, 0)
        self._prefixes[c.prefix] = p + delta
        if not p + delta:
            del self._prefixes[c.prefix]
        limit = self._prefix_limit
        if (p <= limit) != (p + delta <= limit):
            self._crowded_prefixes += delta
        if min(p, p + delta) < limit:
            self._available += delta


def _count_host(contacts: OrderedDict[int, Contact], host: str) -> int:
    n = 0
    for c in contacts.values():
        if c.host == host:
            n += 1
    return n
