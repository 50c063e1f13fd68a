"""Bounded storage of topic records on a serving node, with expiry and replay protection.

Bounds and eviction rule (documented in docs/PROTOCOL.md):

* per source IP: at most ``max_per_ip`` records. Past that, new records from that IP are
  refused (FULL), so one host cannot push others out.
* per topic: at most ``max_per_topic`` records. A new key on a full topic evicts the record
  of that topic that expires first (the one refreshed least recently).
* in total: at most ``max_total`` records. A new record on a full store evicts the record
  that expires first, store-wide.

Replay protection: per (topic, public key) only a strictly higher ``seq`` replaces what is held.
A withdrawal leaves a tombstone with its seq until any record it could have hidden is too old to
be accepted, so replaying an old announce after an unannounce is refused. Records whose seq
(announcer wall clock, ms) lies outside [now - ttl - skew, now + skew] are refused as STALE.

Signatures are checked by the caller before :meth:`RecordStore.put`; this class only keeps state.
"""

from __future__ import annotations

import enum
import heapq
from dataclasses import dataclass

from dhtnode.dht.records import Record, Withdrawal
from dhtnode.wire.address import Address

#: How far an announcer's clock may be off ours, in seconds, before its records are refused.
MAX_CLOCK_SKEW = 600.0


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
        self.max_skew = max_skew
        self._topics: dict[bytes, dict[bytes, StoredRecord]] = {}
        self._per_ip: dict[str, int] = {}
        self._count = 0
        # (expires, topic, public key); entries whose record has changed are skipped lazily.
        self._expiry: list[tuple[float, bytes, bytes]] = []
        # (topic, public key) -> (withdrawn seq, tombstone expiry)
        self._tombstones: dict[tuple[bytes, bytes], tuple[int, float]] = {}

    def __len__(self) -> int:
        return self._count

    @property
    def topic_count(self) -> int:
        return len(self._topics)

    def is_fresh(self, seq: int, wall: float) -> bool:
        """Whether a seq (ms) is inside the window of acceptable announcer clocks."""
        now_ms = wall * 1000.0
        oldest = now_ms - (self.ttl + self.max_skew) * 1000.0
        return oldest <= seq <= now_ms + self.max_skew * 1000.0

    def put(
        self,
        topic: bytes,
        record: Record,
        source_ip: str,
        now: float,
        wall: float,
        source: Address | None = None,
    ) -> PutResult:
        if not self.is_fresh(record.seq, wall):
            return PutResult.STALE
        key = (topic, record.public_key)
        tomb = self._tombstones.get(key)
        if tomb is not None:
            if tomb[1] <= now:
                del self._tombstones[key]
            elif record.seq <= tomb[0]:
                return PutResult.STALE
            else:
                del self._tombstones[key]
        bucket = self._topics.get(topic)
        old = bucket.get(record.public_key) if bucket is not None else None
        if old is not None:
            if record.seq <= old.record.seq:
                return PutResult.STALE
            if old.source_ip != source_ip and self._per_ip.get(source_ip, 0) >= self.max_per_ip:
                return PutResult.FULL
            self._remove(topic, record.public_key)
            self._insert(topic, record, source_ip, now, source)
            return PutResult.REPLACED
        if self._per_ip.get(source_ip, 0) >= self.max_per_ip:
            return PutResult.FULL
        if bucket is not None and len(bucket) >= self.max_per_topic:
            victim = min(bucket.values(), key=lambda s: s.expires)
            self._remove(topic, victim.record.public_key)
        if self._count >= self.max_total:
            self._evict_earliest(now)
        self._insert(topic, record, source_ip, now, source)
        return PutResult.STORED

    def withdraw(self, topic: bytes, w: Withdrawal, now: float, wall: float) -> bool:
        """Apply a verified withdrawal. False if it is stale (not newer than what is held)."""
        if not self.is_fresh(w.seq, wall):
            return False
        key = (topic, w.public_key)
        bucket = self._topics.get(topic)
        held = bucket.get(w.public_key) if bucket is not None else None
        if held is not None:
            if held.record.seq >= w.seq:
                return False
            self._remove(topic, w.public_key)
        tomb = self._tombstones.get(key)
        if tomb is not None and tomb[0] >= w.seq:
            return False
        if len(self._tombstones) >= self.max_total:
            self._prune_tombstones(now)
            if len(self._tombstones) >= self.max_total:
                # Full of live tombstones: drop the oldest one rather than refuse the withdrawal.
                oldest = min(self._tombstones.items(), key=lambda kv: kv[1][1])[0]
                del self._tombstones[oldest]
        self._tombstones[key] = (w.seq, now + self.ttl + 2 * self.max_skew)
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
        self, topic: bytes, record: Record, source_ip: str, now: float, source: Address | None
    ) -> None:
        expires = now + self.ttl
        self._topics.setdefault(topic, {})[record.public_key] = StoredRecord(
            topic, record, source_ip, expires, source
        )
        self._per_ip[source_ip] = self._per_ip.get(source_ip, 0) + 1
        self._count += 1
        heapq.heappush(self._expiry, (expires, topic, record.public_key))

    def _remove(self, topic: bytes, pub: bytes) -> None:
        bucket = self._topics[topic]
        held = bucket.pop(pub)
        if not bucket:
            del self._topics[topic]
        n = self._per_ip[held.source_ip] - 1
        if n:
            self._per_ip[held.source_ip] = n
        else:
            del self._per_ip[held.source_ip]
        self._count -= 1

    def _evict_earliest(self, now: float) -> None:
        while self._expiry:
            expires, topic, pub = heapq.heappop(self._expiry)
            held = self._topics.get(topic, {}).get(pub)
            if held is not None and held.expires == expires:
                self._remove(topic, pub)
                return

    def _compact(self) -> None:
        self._expiry = [
            (s.expires, s.topic, s.record.public_key)
            for bucket in self._topics.values()
            for s in bucket.values()
        ]
        heapq.heapify(self._expiry)

    def _prune_tombstones(self, now: float) -> None:
        for key in [k for k, (_, exp) in self._tombstones.items() if exp <= now]:
            del self._tombstones[key]
