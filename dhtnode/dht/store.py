"""Bounded storage of topic records on a serving node, with expiry and replay protection.

Bounds and eviction rule (documented in docs/PROTOCOL.md, "Security: state and diversity").
A *source* is a host (IPv4 address, IPv6 /64) within a prefix (IPv4 /24, IPv6 /48), keys from
``wire/netgroup.py``: one IPv6 customer holds a whole /64, so counting exact addresses would
leave it unbounded.

* per source: at most ``max_per_ip`` records per host and :data:`PREFIX_BUDGET_FACTOR` times
  that per prefix. Past that, new records from the source are refused (FULL): one host or one
  subnet cannot push others out.
* per topic: at most ``max_per_topic`` records. A new key on a full topic evicts the oldest
  record of the prefix holding most of that topic (the newcomer's own prefix counted), so a
  flood of keys from one source replaces its own records, not the honest announcers'.
* in total: at most ``max_total`` records. A new record on a full store evicts the oldest
  record of the prefix holding the most records: the largest source pays.

Replay protection: per (topic, public key) only a strictly higher ``seq`` replaces what is held.
A withdrawal leaves a marker (tombstone) with its seq exactly as long as a record it cancels
could still be accepted (its seq inside the clock window), so replaying an old announce after
an unannounce is refused. Markers are budgeted per source like records; a source over its
budget loses its own oldest marker, and a full table loses the largest prefix's oldest: a flood
of withdrawals from elsewhere never flushes someone's marker. Records whose seq (announcer wall
clock, ms) lies outside [now - ttl - skew, now + skew] are refused as STALE.

Write rate: :meth:`RecordStore.allow_write` keeps a token bucket per source
(``dht/ratelimit.py``) for the requests that cost a signature check.

Signatures are checked by the caller before :meth:`RecordStore.put`, and only after
:meth:`RecordStore.precheck` says the record would be kept; this class only keeps state.
"""

from __future__ import annotations

import enum
import heapq
from collections import Counter, OrderedDict
from dataclasses import dataclass

from dhtnode.dht.ratelimit import SourceLimiter
from dhtnode.dht.records import Record, Withdrawal
from dhtnode.wire import netgroup
from dhtnode.wire.address import Address

#: How far an announcer's clock may be off ours, in seconds, before its records are refused.
MAX_CLOCK_SKEW = 600.0
#: A prefix's budget (records, markers) as a multiple of a host's: a data centre /24 or a
#: site's /48 running a few nodes stays under it, and it takes a quarter as many subnets as
#: hosts to fill the store.
PREFIX_BUDGET_FACTOR = 4
#: ANNOUNCE and UNANNOUNCE requests one host may make per second: each costs us a signature
#: check (~54 µs), so one host gets at most ~0.2 ms of CPU per second.
WRITE_RATE = 4.0
#: ... and in a burst: an announcer refreshes each topic every ~9 minutes and starts a few
#: (its topics, a listener's) at once.
WRITE_BURST = 32.0
#: Sources whose write rate is tracked at once (least recently seen forgotten first).
MAX_RATE_SOURCES = 4096

#: (topic, public key): what a record or a withdrawal marker is stored under.
Key = tuple[bytes, bytes]


class PutResult(enum.Enum):
    STORED = "stored"
    REPLACED = "replaced"
    STALE = "stale"
    FULL = "full"


@dataclass(slots=True)
class StoredRecord:
    topic: bytes
    record: Record
    source_ip: str
    expires: float
    #: The full address the record was written from: where an introducer forwards to.
    source: Address | None = None
    #: The source's budget keys (``wire/netgroup.py``).
    host: str = ""
    prefix: str = ""


@dataclass(slots=True)
class _Marker:
    """A withdrawal marker (tombstone): the withdrawn seq, until when it matters, from whom."""

    seq: int
    expires: float
    host: str
    prefix: str


class _Ledger:
    """Entries per source host and per prefix, oldest first, with the largest prefix at hand:
    what a budget needs to refuse a source, to evict a source's own oldest entry, and to make
    the largest source pay when the whole table is full. Every operation is O(1)."""

    def __init__(self) -> None:
        self._hosts: dict[str, OrderedDict[Key, None]] = {}
        self._prefixes: dict[str, OrderedDict[Key, None]] = {}
        # size -> prefixes holding that many entries, and the largest size.
        self._sizes: dict[int, dict[str, None]] = {}
        self._largest = 0

    def host_count(self, host: str) -> int:
        entries = self._hosts.get(host)
        return len(entries) if entries is not None else 0

    def prefix_count(self, prefix: str) -> int:
        entries = self._prefixes.get(prefix)
        return len(entries) if entries is not None else 0

    @property
    def sources(self) -> int:
        return len(self._hosts)

    def add(self, key: Key, host: str, prefix: str) -> None:
        self._hosts.setdefault(host, OrderedDict())[key] = None
        entries = self._prefixes.setdefault(prefix, OrderedDict())
        if key not in entries:
            self._resize(prefix, len(entries), len(entries) + 1)
        entries[key] = None

    def discard(self, key: Key, host: str, prefix: str) -> None:
        entries = self._hosts.get(host)
        if entries is not None:
            entries.pop(key, None)
            if not entries:
                del self._hosts[host]
        entries = self._prefixes.get(prefix)
        if entries is not None and key in entries:
            self._resize(prefix, len(entries), len(entries) - 1)
            del entries[key]
            if not entries:
                del self._prefixes[prefix]

    def oldest_of_host(self, host: str) -> Key:
        return next(iter(self._hosts[host]))

    def oldest_of_prefix(self, prefix: str) -> Key:
        return next(iter(self._prefixes[prefix]))

    def largest_prefix(self) -> str | None:
        if not self._largest:
            return None
        return next(iter(self._sizes[self._largest]))

    def _resize(self, prefix: str, old: int, new: int) -> None:
        if old:
            same = self._sizes[old]
            del same[prefix]
            if not same:
                del self._sizes[old]
        if new:
            self._sizes.setdefault(new, {})[prefix] = None
        if new > self._largest:
            self._largest = new
        elif old == self._largest and old not in self._sizes:
            self._largest = new  # sizes change by one: the prefix that shrank is now largest


class RecordStore:
    def __init__(
        self,
        *,
        ttl: float,
        max_total: int,
        max_per_topic: int,
        max_per_ip: int,
        max_skew: float = MAX_CLOCK_SKEW,
    ) -> None:
        self.ttl = ttl
        self.max_total = max_total
        self.max_per_topic = max_per_topic
        self.max_per_ip = max_per_ip
        #: Records (and markers) one prefix may hold.
        self.max_per_prefix = max_per_ip * PREFIX_BUDGET_FACTOR
        self.max_skew = max_skew
        self._topics: dict[bytes, dict[bytes, StoredRecord]] = {}
        self._records = _Ledger()
        self._count = 0
        # (expires, topic, public key); entries whose record has changed are skipped lazily.
        self._expiry: list[tuple[float, bytes, bytes]] = []
        self._tombstones: dict[Key, _Marker] = {}
        self._markers = _Ledger()
        #: Write requests per source (token buckets in a bounded table).
        self.limiter = SourceLimiter(
            rate=WRITE_RATE,
            burst=WRITE_BURST,
            prefix_factor=PREFIX_BUDGET_FACTOR,
            max_sources=MAX_RATE_SOURCES,
        )

    def __len__(self) -> int:
        return self._count

    @property
    def topic_count(self) -> int:
        return len(self._topics)

    @property
    def tombstone_count(self) -> int:
        """Withdrawal markers held."""
        return len(self._tombstones)

    def allow_write(self, source_ip: str, now: float) -> bool:
        """Spend one of the source's write tokens (ANNOUNCE, UNANNOUNCE); False if it has none
        left. Call it after the write token proved the source address, so that forged
        requests cannot spend someone else's budget."""
        return self.limiter.allow(source_ip, now)

    def is_fresh(self, seq: int, wall: float) -> bool:
        """Whether a seq (ms) is inside the window of acceptable announcer clocks."""
        now_ms = wall * 1000.0
        oldest = now_ms - (self.ttl + self.max_skew) * 1000.0
        return oldest <= seq <= now_ms + self.max_skew * 1000.0

    def precheck(
        self, topic: bytes, record: Record, source_ip: str, wall: float
    ) -> PutResult | None:
        """What :meth:`put` would refuse this record as (STALE, FULL), or None if it would keep
        it: the cheap checks a storer makes before it spends a signature check."""
        if not self.is_fresh(record.seq, wall):
            return PutResult.STALE
        tomb = self._tombstones.get((topic, record.public_key))
        if tomb is not None and record.seq <= tomb.seq:
            # The marker lives exactly as long as such a record could be fresh.
            return PutResult.STALE
        old = self._topics.get(topic, {}).get(record.public_key)
        if old is not None and record.seq <= old.record.seq:
            return PutResult.STALE
        host, prefix = netgroup.source_keys(source_ip)
        hosts = self._records.host_count(host)
        prefixes = self._records.prefix_count(prefix)
        if old is not None:  # a replaced record frees its own share
            hosts -= old.host == host
            prefixes -= old.prefix == prefix
        if hosts >= self.max_per_ip or prefixes >= self.max_per_prefix:
            return PutResult.FULL
        return None

    def put(
        self,
        topic: bytes,
        record: Record,
        source_ip: str,
        now: float,
        wall: float,
        source: Address | None = None,
    ) -> PutResult:
        refused = self.precheck(topic, record, source_ip, wall)
        if refused is not None:
            return refused
        key = (topic, record.public_key)
        if key in self._tombstones:
            self._drop_marker(key)  # a newer record supersedes the withdrawal
        host, prefix = netgroup.source_keys(source_ip)
        bucket = self._topics.get(topic)
        if bucket is not None and record.public_key in bucket:
            self._remove(topic, record.public_key)
            self._insert(topic, record, source_ip, now, source, host, prefix)
            return PutResult.REPLACED
        if bucket is not None and len(bucket) >= self.max_per_topic:
            # The prefix holding most of the topic (the newcomer's counted) loses its oldest:
            # a flood of keys from one source replaces its own records.
            counts = Counter(s.prefix for s in bucket.values())
            counts[prefix] += 1
            victim = min(bucket.values(), key=lambda s: (-counts[s.prefix], s.expires))
            self._remove(topic, victim.record.public_key)
        if self._count >= self.max_total:
            self._evict_largest()
        self._insert(topic, record, source_ip, now, source, host, prefix)
        return PutResult.STORED

    def precheck_withdrawal(self, topic: bytes, w: Withdrawal, wall: float) -> bool:
        """Would :meth:`withdraw` apply this withdrawal (fresh, newer than the record or
        marker held)? The cheap checks before the signature check."""
        if not self.is_fresh(w.seq, wall):
            return False
        held = self._topics.get(topic, {}).get(w.public_key)
        if held is not None and held.record.seq >= w.seq:
            return False
        tomb = self._tombstones.get((topic, w.public_key))
        return tomb is None or tomb.seq < w.seq

    def withdraw(
        self, topic: bytes, w: Withdrawal, now: float, wall: float, source_ip: str = "self"
    ) -> bool:
        """Apply a verified withdrawal from ``source_ip``. False if it is stale (not newer than
        what is held)."""
        if not self.precheck_withdrawal(topic, w, wall):
            return False
        key = (topic, w.public_key)
        if w.public_key in self._topics.get(topic, {}):
            self._remove(topic, w.public_key)
        if key in self._tombstones:
            self._drop_marker(key)
        host, prefix = netgroup.source_keys(source_ip)
        markers = self._markers
        # Over budget, a source loses its own oldest markers first; a full table, the largest
        # prefix's oldest. Either way a flood from elsewhere never flushes this marker.
        while markers.host_count(host) >= self.max_per_ip:
            self._drop_marker(markers.oldest_of_host(host))
        while markers.prefix_count(prefix) >= self.max_per_prefix:
            self._drop_marker(markers.oldest_of_prefix(prefix))
        if len(self._tombstones) >= self.max_total:
            largest = markers.largest_prefix()
            if largest is not None:
                self._drop_marker(markers.oldest_of_prefix(largest))
        # A record this withdrawal cancels (seq <= w.seq) stays fresh until the wall clock
        # passes w.seq + ttl + skew: the marker must live exactly that long, and no longer.
        lives = w.seq / 1000.0 + self.ttl + self.max_skew - wall
        self._tombstones[key] = _Marker(w.seq, now + max(0.0, lives) + 1.0, host, prefix)
        markers.add(key, host, prefix)
        return True

    def get(self, topic: bytes, now: float) -> list[Record]:
        """Every live record of ``topic`` (at most ``max_per_topic``), newest first."""
        bucket = self._topics.get(topic)
        if not bucket:
            return []
        live = [s.record for s in bucket.values() if s.expires > now]
        live.sort(key=lambda r: r.seq, reverse=True)
        return live

    def held(self, topic: bytes, public_key: bytes, now: float) -> StoredRecord | None:
        """The live record ``public_key`` stored under ``topic``, with where it came from."""
        held = self._topics.get(topic, {}).get(public_key)
        return held if held is not None and held.expires > now else None

    def expire(self, now: float) -> int:
        """Drop every record past its expiry; returns how many went."""
        dropped = 0
        while self._expiry and self._expiry[0][0] <= now:
            expires, topic, pub = heapq.heappop(self._expiry)
            held = self._topics.get(topic, {}).get(pub)
            if held is not None and held.expires == expires:
                self._remove(topic, pub)
                dropped += 1
        if len(self._expiry) > 2 * self._count + 64:
            self._compact()
        self._prune_tombstones(now)
        return dropped

    def _insert(
        self,
        topic: bytes,
        record: Record,
        source_ip: str,
        now: float,
        source: Address | None,
        host: str,
        prefix: str,
    ) -> None:
        expires = now + self.ttl
        self._topics.setdefault(topic, {})[record.public_key] = StoredRecord(
            topic, record, source_ip, expires, source, host, prefix
        )
        self._records.add((topic, record.public_key), host, prefix)
        self._count += 1
        heapq.heappush(self._expiry, (expires, topic, record.public_key))

    def _remove(self, topic: bytes, pub: bytes) -> None:
        bucket = self._topics[topic]
        held = bucket.pop(pub)
        if not bucket:
            del self._topics[topic]
        self._records.discard((topic, pub), held.host, held.prefix)
        self._count -= 1

    def _evict_largest(self) -> None:
        """Make room in a full store: the oldest record of the prefix holding the most."""
        largest = self._records.largest_prefix()
        if largest is not None:
            self._remove(*self._records.oldest_of_prefix(largest))

    def _drop_marker(self, key: Key) -> None:
        marker = self._tombstones.pop(key)
        self._markers.discard(key, marker.host, marker.prefix)

    def _compact(self) -> None:
        self._expiry = [
            (s.expires, s.topic, s.record.public_key)
            for bucket in self._topics.values()
            for s in bucket.values()
        ]
        heapq.heapify(self._expiry)

    def _prune_tombstones(self, now: float) -> None:
        for key in [k for k, t in self._tombstones.items() if t.expires <= now]:
            self._drop_marker(key)
