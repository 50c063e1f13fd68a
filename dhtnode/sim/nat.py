"""A simulated NAT (or firewall) for tests and benchmarks: mapping, filtering, timeouts.

Behaviour per kind, after nat-facts' measured nftables recipes and RFC 4787's terms:

===============  =================================  ===============================
kind             mapping                            filtering (inbound needs...)
===============  =================================  ===============================
open             none (public address)              nothing
firewalled       none (public address)              address-and-port-dependent
full-cone        endpoint-independent, port kept    endpoint-independent (a mapping)
restricted       endpoint-independent, port kept    address-dependent
port-restricted  endpoint-independent, port kept    address-and-port-dependent
symmetric        per destination, random port       address-and-port-dependent
sequential       per destination, next port         address-and-port-dependent
===============  =================================  ===============================

"Port kept": the mapped port is the inside port when no other mapping holds it (Linux
masquerade does this). An inbound datagram that the filter drops leaves no state behind, as a
real router that drops new inbound flows on its WAN side (nat-facts: a router that let such a
packet create a conntrack entry changed the host's next mapped port and broke punching).
Hairpinning is not modelled. Mappings expire :data:`MAPPING_TIMEOUT` after their last use.

Owns translation only: it delivers nothing and keeps no clock; the caller passes ``now``.
"""

from __future__ import annotations

import enum
import random
from typing import Literal

from dhtnode.wire.address import Address

NatKind = Literal[
    "open", "firewalled", "full-cone", "restricted", "port-restricted", "symmetric", "sequential"
]
NAT_KINDS: tuple[NatKind, ...] = (
    "open",
    "firewalled",
    "full-cone",
    "restricted",
    "port-restricted",
    "symmetric",
    "sequential",
)
#: Seconds a mapping lives after its last use: Linux conntrack keeps an unreplied UDP flow
#: 30 s (120 s once it is a stream); a punch never runs that long, so the shorter one is used.
MAPPING_TIMEOUT = 30.0
#: Port range a translating NAT allocates from (Linux masquerade's default).
LOWEST_PORT = 1024
HIGHEST_PORT = 65535
#: Distance between two ports a sequential NAT hands out (nat-facts' ``numgen inc`` map).
SEQUENTIAL_STEP = 1


class Mapping(enum.Enum):
    NONE = "none"
    ENDPOINT_INDEPENDENT = "endpoint-independent"
    RANDOM = "address-and-port-dependent, random"
    SEQUENTIAL = "address-and-port-dependent, sequential"


class Filtering(enum.Enum):
    NONE = "none"
    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS = "address-dependent"
    ADDRESS_AND_PORT = "address-and-port-dependent"


BEHAVIOUR: dict[NatKind, tuple[Mapping, Filtering]] = {
    "open": (Mapping.NONE, Filtering.NONE),
    "firewalled": (Mapping.NONE, Filtering.ADDRESS_AND_PORT),
    "full-cone": (Mapping.ENDPOINT_INDEPENDENT, Filtering.ENDPOINT_INDEPENDENT),
    "restricted": (Mapping.ENDPOINT_INDEPENDENT, Filtering.ADDRESS),
    "port-restricted": (Mapping.ENDPOINT_INDEPENDENT, Filtering.ADDRESS_AND_PORT),
    "symmetric": (Mapping.RANDOM, Filtering.ADDRESS_AND_PORT),
    "sequential": (Mapping.SEQUENTIAL, Filtering.ADDRESS_AND_PORT),
}


class _Binding:
    __slots__ = ("inside", "key", "last_used", "port", "remote_ips", "remotes")

    def __init__(self, key: tuple[Address, Address | None], inside: Address, port: int) -> None:
        self.key = key
        self.inside = inside
        self.port = port
        self.last_used = 0.0
        #: Remote endpoint (and IP) -> last time the inside host sent to it.
        self.remotes: dict[Address, float] = {}
        self.remote_ips: dict[str, float] = {}


class SimNat:
    def __init__(
        self,
        kind: NatKind,
        public_ip: str,
        rng: random.Random,
        *,
        mapping_timeout: float = MAPPING_TIMEOUT,
    ) -> None:
        if kind not in BEHAVIOUR:
            raise ValueError(f"unknown NAT kind {kind!r}; one of {', '.join(NAT_KINDS)}")
        self.kind = kind
        self.mapping, self.filtering = BEHAVIOUR[kind]
        self.public_ip = public_ip
        self.timeout = mapping_timeout
        self._rng = rng
        self._by_key: dict[tuple[Address, Address | None], _Binding] = {}
        self._by_port: dict[int, _Binding] = {}
        self._next_port = rng.randrange(20000, 60000)
        #: Counters: mappings created, inbound datagrams filtered.
        self.created = 0
        self.filtered = 0

    @property
    def translates(self) -> bool:
        """False for open and firewalled hosts: their inside address is the public one."""
        return self.mapping is not Mapping.NONE

    def outbound(self, inside: Address, dest: Address, now: float) -> Address:
        """The public source address of a datagram from ``inside`` to ``dest``."""
        if not self.translates and inside[0] != self.public_ip:
            raise ValueError(f"a {self.kind} host's address is its public one, not {inside[0]}")
        per_dest = self.mapping in (Mapping.RANDOM, Mapping.SEQUENTIAL)
        key = (inside, dest if per_dest else None)
        b = self._by_key.get(key)
        if b is not None and now - b.last_used > self.timeout:
            self._forget(b)
            b = None
        if b is None:
            b = _Binding(key, inside, self._allocate(inside))
            self._by_key[key] = b
            self._by_port[b.port] = b
            self.created += 1
        b.last_used = now
        b.remotes[dest] = now
        b.remote_ips[dest[0]] = now
        return (self.public_ip, b.port)

    def inbound(self, source: Address, mapped: Address, now: float) -> Address | None:
        """The inside address a datagram from ``source`` to ``mapped`` reaches, or None if
        the NAT drops it (no mapping, or filtered)."""
        if mapped[0] != self.public_ip:
            return None
        b = self._by_port.get(mapped[1])
        if b is not None and now - b.last_used > self.timeout:
            self._forget(b)
            b = None
        if self.filtering is Filtering.NONE:
            return mapped  # a public host: whatever port the datagram is for
        if b is None:
            self.filtered += 1
            return None
        if self.filtering is Filtering.ADDRESS:
            allowed = now - b.remote_ips.get(source[0], -1e18) <= self.timeout
        elif self.filtering is Filtering.ADDRESS_AND_PORT:
            allowed = now - b.remotes.get(source, -1e18) <= self.timeout
        else:
            allowed = True
        if not allowed:
            self.filtered += 1
            return None
        b.last_used = now
        return b.inside

    def _allocate(self, inside: Address) -> int:
        if not self.translates:
            return inside[1]
        if self.mapping is Mapping.ENDPOINT_INDEPENDENT and self._free(inside[1]):
            return inside[1]
        if self.mapping is Mapping.SEQUENTIAL:
            span = HIGHEST_PORT - LOWEST_PORT + 1
            while True:
                port = self._next_port
                self._next_port = LOWEST_PORT + (port + SEQUENTIAL_STEP - LOWEST_PORT) % span
                if self._free(port):
                    return port
        while True:
            port = self._rng.randint(LOWEST_PORT, HIGHEST_PORT)
            if self._free(port):
                return port

    def _free(self, port: int) -> bool:
        return port not in self._by_port

    def _forget(self, b: _Binding) -> None:
        self._by_key.pop(b.key, None)
        if self._by_port.get(b.port) is b:
            del self._by_port[b.port]
