"""What each side of a connection attempt tells the other about how to reach it: the payload
of the sealed hello and of its reply (``handshake.py``).

Layout (every count bounded; at most :data:`MAX_ENCODED_LEN` = 190 bytes)::

    u8 nat_class (0 unknown, 1 consistent, 2 random)
    u8 open (0 or 1: reachable without hole punching)
    u8 flags (reserved for future capabilities, e.g. relay support; sent as given, kept as read)
    u8 n | n x u16 port_samples (big-endian, n <= 16, ports 1-65535)
    u8 n | n x compact address  public_addresses (n <= 4; see wire/address.py)
    u8 n | n x compact address  lan_addresses    (n <= 4)

This module owns the codec only; it does not decide what to put in a PeerInfo (NAT detection)
nor what to do with one (punching). The decoder raises only :class:`PeerInfoError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dhtnode.errors import DecodeError
from dhtnode.wire import address as wire_address
from dhtnode.wire.address import Address

#: NAT classes in wire order: "consistent" maps one local port to the same public port for
#: every destination (punch the port seen by STUN); "random" picks a new port per destination
#: (punch with many sockets / port guesses); "unknown" was not measured.
NAT_CLASSES = ("unknown", "consistent", "random")
#: Port samples carried at most: enough to see a port-allocation pattern, small on the wire.
MAX_PORT_SAMPLES = 16
#: Public (respectively LAN) addresses carried at most, e.g. one IPv4 and a few IPv6.
MAX_ADDRESSES = 4
#: Largest encoding: 6 counts and flags, 16 ports, 8 IPv6 addresses.
MAX_ENCODED_LEN = 6 + 2 * MAX_PORT_SAMPLES + 2 * MAX_ADDRESSES * wire_address.COMPACT_V6_LEN

_HEAD = struct.Struct(">BBB")


class PeerInfoError(DecodeError):
    """A PeerInfo on the wire is malformed."""


def _check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is outside 1-65535")


@dataclass(frozen=True, slots=True)
class PeerInfo:
    nat_class: str = "unknown"
    open: bool = False
    port_samples: tuple[int, ...] = ()
    public_addresses: tuple[Address, ...] = ()
    lan_addresses: tuple[Address, ...] = ()
    #: Reserved capability bits; 0 until a later version gives them a meaning.
    flags: int = 0

    def __post_init__(self) -> None:
        if self.nat_class not in NAT_CLASSES:
            raise ValueError(f"nat_class {self.nat_class!r}; expected one of {NAT_CLASSES}")
        if len(self.port_samples) > MAX_PORT_SAMPLES:
            raise ValueError(f"{len(self.port_samples)} port samples; at most {MAX_PORT_SAMPLES}")
        for port in self.port_samples:
            _check_port(port)
        for name, addrs in (("public", self.public_addresses), ("lan", self.lan_addresses)):
            if len(addrs) > MAX_ADDRESSES:
                raise ValueError(f"{len(addrs)} {name} addresses; at most {MAX_ADDRESSES}")
            for addr in addrs:
                _check_port(addr[1])
        if not 0 <= self.flags <= 255:
            raise ValueError(f"flags {self.flags} do not fit one byte")

    def encode(self) -> bytes:
        out = [
            _HEAD.pack(NAT_CLASSES.index(self.nat_class), int(self.open), self.flags),
            bytes((len(self.port_samples),)),
            struct.pack(f">{len(self.port_samples)}H", *self.port_samples),
        ]
        for addrs in (self.public_addresses, self.lan_addresses):
            out.append(bytes((len(addrs),)))
            out.extend(wire_address.encode(a) for a in addrs)
        return b"".join(out)

    @classmethod
    def decode(cls, data: bytes) -> PeerInfo:
        """Parse exactly one PeerInfo (no trailing bytes)."""
        if len(data) > MAX_ENCODED_LEN:
            raise PeerInfoError(f"peer info of {len(data)} bytes; at most {MAX_ENCODED_LEN}")
        if len(data) < _HEAD.size + 1:
            raise PeerInfoError("truncated peer info header")
        nat, is_open, flags = _HEAD.unpack_from(data)
        if nat >= len(NAT_CLASSES):
            raise PeerInfoError(f"unknown NAT class {nat}")
        if is_open > 1:
            raise PeerInfoError(f"open flag is {is_open}; expected 0 or 1")
        pos = _HEAD.size
        n = data[pos]
        pos += 1
        if n > MAX_PORT_SAMPLES:
            raise PeerInfoError(f"{n} port samples; at most {MAX_PORT_SAMPLES}")
        if pos + 2 * n > len(data):
            raise PeerInfoError("truncated port samples")
        ports = struct.unpack_from(f">{n}H", data, pos)
        if 0 in ports:
            raise PeerInfoError("port sample 0 is not a usable UDP port")
        pos += 2 * n
        lists: list[tuple[Address, ...]] = []
        for name in ("public", "lan"):
            if pos >= len(data):
                raise PeerInfoError(f"truncated peer info: no {name} address count")
            n = data[pos]
            pos += 1
            if n > MAX_ADDRESSES:
                raise PeerInfoError(f"{n} {name} addresses; at most {MAX_ADDRESSES}")
            addrs: list[Address] = []
            for _ in range(n):
                try:
                    addr, pos = wire_address.decode(data, pos)
                except DecodeError as exc:
                    raise PeerInfoError(f"{name} address: {exc}") from None
                addrs.append(addr)
            lists.append(tuple(addrs))
        if pos != len(data):
            raise PeerInfoError(f"{len(data) - pos} trailing bytes after peer info")
        return cls(NAT_CLASSES[nat], bool(is_open), ports, lists[0], lists[1], flags)
