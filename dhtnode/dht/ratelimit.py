"""Token buckets: one for a single budget, and a bounded table of them per source.

A bucket holds up to ``burst`` tokens and gains ``rate`` per second; each allowed event takes
one. :class:`SourceLimiter` keeps one bucket per host (IPv4 address, IPv6 /64) and one per
prefix (/24, /48; ``netgroup.source_keys``) so that neither one host nor one subnet can spend
more than its share of an expensive kind of request. The table is an LRU of bounded size: a
source pushed out comes back with a full bucket, which costs an attacker more sources than
the table holds to gain anything.

Pure: the caller passes ``now``.
"""

from __future__ import annotations

from collections import OrderedDict

from dhtnode.wire import netgroup


class TokenBucket:
    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one (refilling for the time passed first)."""
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class SourceLimiter:
    """Per-source token buckets: ``rate``/``burst`` per host, ``prefix_factor`` times that per
    prefix, at most ``max_sources`` buckets of each kind. Loopback is exempt."""

    def __init__(
        self, *, rate: float, burst: float, prefix_factor: float, max_sources: int
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.prefix_factor = prefix_factor
        self.max_sources = max_sources
        self._hosts: OrderedDict[str, TokenBucket] = OrderedDict()
        self._prefixes: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._hosts) + len(self._prefixes)

    def allow(self, ip: str, now: float) -> bool:
        if netgroup.groups(ip) is None:
            return True  # loopback
        host, prefix = netgroup.source_keys(ip)
        f = self.prefix_factor
        # The host pays first: a refused host spends nothing of its prefix's budget.
        return self._take(self._hosts, host, self.rate, self.burst, now) and self._take(
            self._prefixes, prefix, self.rate * f, self.burst * f, now
        )

    def _take(
        self,
        table: OrderedDict[str, TokenBucket],
        key: str,
        rate: float,
        burst: float,
        now: float,
    ) -> bool:
        bucket = table.get(key)
        if bucket is None:
            bucket = table[key] = TokenBucket(rate, burst, now)
            while len(table) > self.max_sources:
                table.popitem(last=False)
        else:
            table.move_to_end(key)
        return bucket.take(now)
