"""The blind relay: pairs two members' flows and forwards their datagrams, nothing else.

Sans-I/O: :meth:`RelayTable.receive` takes a relay datagram, its source and ``now`` and
returns the datagrams to send. Sessions are created by a member's BIND carrying a token the
relay minted for that member's address during the introduction (:meth:`RelayTable.mint`), so
the relay only ever sends to addresses that asked for the session, and keeps no state for
introductions nobody binds. What is forwarded is the members' QUIC ciphertext, byte for byte:
the relay can neither read nor inject (QUIC authenticates every packet end to end).

Bounded: sessions in all and per member IP, bytes/s per session and in all (token buckets;
excess is dropped and counted, as a congested link would), session lifetime, idle timeout.
Must not open sockets or read clocks.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from dhtnode.errors import DecodeError
from dhtnode.nat.relay_limits import RelayLimits
from dhtnode.wire import address as wire_address
from dhtnode.wire import relay as wire
from dhtnode.wire.address import Address

__all__ = ["RelayLimits", "RelayTable"]

_FROM_RELAY = bytes((wire.RelayType.DATA_FROM_RELAY,))

#: Seconds between secret rotations; a minted token is accepted for one to two intervals, long
#: enough for a connect, and a relayed member re-binds (with a fresh token) by reconnecting.
SECRET_ROTATE = 300.0
#: Seconds a member may stay silent before its session is dropped (QUIC keep-alives every
#: 10 s keep a live one going).
IDLE_TIMEOUT = 30.0


@dataclass(slots=True)
class _Bucket:
    rate: float
    tokens: float
    at: float

    def take(self, n: int, now: float) -> bool:
        # Burst of one second's worth: a QUIC flight fits, a flood does not.
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < n:
            return False
        self.tokens -= n
        return True


@dataclass(slots=True)
class Session:
    id: bytes
    created: float
    bucket: _Bucket
    members: list[Address | None] = field(default_factory=lambda: [None, None])
    last_seen: list[float] = field(default_factory=lambda: [0.0, 0.0])
    forwarded: int = 0

    @property
    def paired(self) -> bool:
        return self.members[0] is not None and self.members[1] is not None


class RelayTable:
    def __init__(
        self,
        limits: RelayLimits,
        secret_bytes: Callable[[int], bytes],
        now: float,
    ) -> None:
        self.limits = limits
        self._secret_bytes = secret_bytes
        self._current = secret_bytes(32)
        self._previous = self._current
        self._rotated = now
        self._sessions: dict[bytes, Session] = {}
        self._per_ip: Counter[str] = Counter()
        self._total = _Bucket(limits.total_rate, limits.total_rate, now)
        self.stats: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def forwarded_bytes(self) -> int:
        return self.stats["relay_bytes"]

    # ------------------------------------------------------------------ tokens

    def _rotate(self, now: float) -> None:
        if now - self._rotated >= SECRET_ROTATE:
            twice = now - self._rotated >= 2 * SECRET_ROTATE
            self._previous = self._secret_bytes(32) if twice else self._current
            self._current = self._secret_bytes(32)
            self._rotated = now

    @staticmethod
    def _mac(secret: bytes, session: bytes, role: int, addr: Address) -> bytes:
        msg = session + bytes((role,)) + wire_address.encode(addr)
        return hashlib.blake2b(msg, key=secret, digest_size=wire.TOKEN_LEN).digest()

    def new_session_id(self) -> bytes:
        return self._secret_bytes(wire.SESSION_ID_LEN)

    def mint(self, session: bytes, role: int, member: Address, now: float) -> bytes:
        """The token that lets ``member`` (an address we saw, proven by a write token) bind
        to ``session`` in ``role``."""
        self._rotate(now)
        return self._mac(self._current, session, role, member)

    def _valid(self, b: wire.Bind, source: Address, now: float) -> bool:
        self._rotate(now)
        return any(
            hmac.compare_digest(b.token, self._mac(s, b.session, b.role, source))
            for s in (self._current, self._previous)
        )

    # ------------------------------------------------------------------ datagrams

    def receive(self, data: bytes, source: Address, now: float) -> list[tuple[bytes, Address]]:
        """One relay datagram addressed to us as a relay; returns what to send."""
        try:
            if data[0] == wire.RelayType.BIND:
                return self._bind(wire.decode_bind(data), source, now)
            if data[0] == wire.RelayType.DATA_TO_RELAY:
                return self._data(data, source, now)
        except DecodeError:
            self.stats["drop_relay_malformed"] += 1
            return []
        self.stats["drop_relay_type"] += 1
        return []

    def _bind(self, b: wire.Bind, source: Address, now: float) -> list[tuple[bytes, Address]]:
        s = self._sessions.get(b.session)
        # A member already bound at this address proved it with a token once; its later BINDs
        # are heartbeats, still answered after the secret that minted the token rotated out.
        known = s is not None and s.members[b.role] == source
        if not known and not self._valid(b, source, now):
            self.stats["drop_relay_bad_token"] += 1
            return []
        if s is None:
            lim = self.limits
            if len(self._sessions) >= lim.max_sessions:
                self.stats["drop_relay_full"] += 1
                return []
            if self._per_ip[source[0]] >= lim.max_sessions_per_ip:
                self.stats["drop_relay_ip_full"] += 1
                return []
            s = self._sessions[b.session] = Session(
                b.session, now, _Bucket(lim.session_rate, lim.session_rate, now)
            )
            self.stats["relay_sessions"] += 1
        old = s.members[b.role]
        if old != source:
            if old is not None:
                self._release_ip(old)  # the member's NAT mapping changed: follow it
            if self._per_ip[source[0]] >= self.limits.max_sessions_per_ip:
                self.stats["drop_relay_ip_full"] += 1
                return []
            self._per_ip[source[0]] += 1
            s.members[b.role] = source
        s.last_seen[b.role] = now
        out = [(wire.encode_bound(wire.Bound(b.role, b.session, s.paired)), source)]
        other = s.members[1 - b.role]
        if s.paired and old != source and other is not None:
            # Tell the waiting member its peer arrived, so it can start at once.
            out.append((wire.encode_bound(wire.Bound(1 - b.role, b.session, True)), other))
        return out

    def _data(self, data: bytes, source: Address, now: float) -> list[tuple[bytes, Address]]:
        # The hot path: read the session id without copying the payload.
        if len(data) <= wire.DATA_HEADER_LEN:
            raise wire.RelayDecodeError("DATA without payload")
        s = self._sessions.get(data[1 : wire.DATA_HEADER_LEN])
        if s is None or now - s.created > self.limits.max_duration:
            self.stats["drop_relay_no_session"] += 1
            return []
        if source == s.members[0]:
            role = 0
        elif source == s.members[1]:
            role = 1
        else:
            self.stats["drop_relay_stranger"] += 1  # not a member: never forwarded
            return []
        s.last_seen[role] = now
        other = s.members[1 - role]
        if other is None:
            self.stats["drop_relay_unpaired"] += 1
            return []
        n = len(data)
        if not s.bucket.take(n, now) or not self._total.take(n, now):
            self.stats["drop_relay_rate"] += 1
            return []
        s.forwarded += n
        self.stats["relay_bytes"] += n
        self.stats["relay_datagrams"] += 1
        return [(_FROM_RELAY + memoryview(data)[1:], other)]  # one copy

    def _release_ip(self, addr: Address) -> None:
        self._per_ip[addr[0]] -= 1
        if self._per_ip[addr[0]] <= 0:
            del self._per_ip[addr[0]]

    def _expire(self, now: float) -> None:
        lim = self.limits
        dead = [
            s for s in self._sessions.values()
            if now - s.created > lim.max_duration
            or all(m is None or now - t > IDLE_TIMEOUT
                   for m, t in zip(s.members, s.last_seen, strict=True))
        ]
        for s in dead:
            del self._sessions[s.id]
            for m in s.members:
                if m is not None:
                    self._release_ip(m)
            self.stats["relay_sessions_ended"] += 1

    def tick(self, now: float) -> None:
        """Drop expired and idle sessions (called every few seconds, not per datagram:
        the forwarding path stays O(1))."""
        self._expire(now)

    def status(self) -> dict[str, int]:
        return {
            "sessions": len(self._sessions),
            "paired": sum(s.paired for s in self._sessions.values()),
            "bytes": self.stats["relay_bytes"],
        }
