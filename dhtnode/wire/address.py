"""UDP endpoint addresses: normalisation and the compact wire form shared by every codec.

An :data:`Address` is ``(ip, port)`` with ``ip`` in canonical text form. IPv4-mapped IPv6
addresses (``::ffff:a.b.c.d``), which a dual-stack socket reports for IPv4 peers, are always
normalised to plain IPv4 so that the same peer never appears under two names.

Compact form (used in DHT messages and records)::

    u8 family (4 or 6) | 4 or 16 bytes address | u16 port (big-endian)

This module owns address parsing and encoding only; it never resolves names or opens sockets.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import struct

from dhtnode.errors import DecodeError

Address = tuple[str, int]

FAMILY_V4 = 4
FAMILY_V6 = 6
#: Bytes one compact IPv4 address takes on the wire (family + 4 + port).
COMPACT_V4_LEN = 7
#: Bytes one compact IPv6 address takes on the wire (family + 16 + port).
COMPACT_V6_LEN = 19
#: IPv4 + UDP header bytes around every datagram (20 + 8, no options): what a reflected
#: answer really costs its target, so amplification is counted with it.
DATAGRAM_OVERHEAD_V4 = 28
#: IPv6 + UDP header bytes around every datagram (40 + 8, no extension headers).
DATAGRAM_OVERHEAD_V6 = 48


#: Addresses whose parsed or compact form is memoised. Parsing goes through ``ipaddress``,
#: which costs microseconds per call (3.5 µs a miss, 0.15 µs a hit); a node sees the same few
#: thousand peers over and over. 4,096 covers a routing table and its recent clients; a flood
#: from changing source ports misses at any size, and at 16,384 the two caches held ~10 MB of
#: its addresses (benchmarks/bench_flood_memory.py), 4x what they hold now.
ENCODE_CACHE_SIZE = 4096


class AddressError(DecodeError):
    """A compact address on the wire is malformed."""


def normalize(addr: tuple[object, ...]) -> Address:
    """Turn a socket-level address (2- or 4-tuple) into a canonical :data:`Address`."""
    return _normalize(addr)


@functools.lru_cache(maxsize=ENCODE_CACHE_SIZE)
def _normalize(addr: tuple[object, ...]) -> Address:
    host = str(addr[0])
    port = int(addr[1])  # type: ignore[call-overload]
    if "%" in host:  # scoped link-local: keep only the address part
        host = host.split("%", 1)[0]
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (str(ip), port)


def family_of(ip: str) -> int:
    """4 or 6 for a canonical IP string."""
    return FAMILY_V6 if ":" in ip else FAMILY_V4


def datagram_overhead(addr: Address) -> int:
    """IP + UDP header bytes of a datagram to or from ``addr``."""
    return DATAGRAM_OVERHEAD_V6 if ":" in addr[0] else DATAGRAM_OVERHEAD_V4


def compact_len(addr: Address) -> int:
    """Bytes of ``addr`` in compact form."""
    return COMPACT_V6_LEN if ":" in addr[0] else COMPACT_V4_LEN


@functools.lru_cache(maxsize=ENCODE_CACHE_SIZE)
def encode(addr: Address) -> bytes:
    """Compact wire form of ``addr``."""
    ip = ipaddress.ip_address(addr[0])
    if isinstance(ip, ipaddress.IPv4Address):
        return bytes((FAMILY_V4,)) + ip.packed + struct.pack(">H", addr[1])
    return bytes((FAMILY_V6,)) + ip.packed + struct.pack(">H", addr[1])


def decode(data: bytes | memoryview, offset: int = 0) -> tuple[Address, int]:
    """Parse one compact address at ``offset``; returns it and the offset after it."""
    if offset >= len(data):
        raise AddressError("truncated address: no family byte")
    fam = data[offset]
    if fam == FAMILY_V4:
        end = offset + COMPACT_V4_LEN
    elif fam == FAMILY_V6:
        end = offset + COMPACT_V6_LEN
    else:
        raise AddressError(f"unknown address family {fam}")
    if end > len(data):
        raise AddressError(f"truncated IPv{fam} address")
    return _decode_exact(bytes(data[offset:end])), end


@functools.lru_cache(maxsize=ENCODE_CACHE_SIZE)
def _decode_exact(raw: bytes) -> Address:
    if raw[0] == FAMILY_V4:
        ip = str(ipaddress.IPv4Address(raw[1:5]))
    else:
        ip6 = ipaddress.IPv6Address(raw[1:17])
        ip = str(ip6.ipv4_mapped) if ip6.ipv4_mapped is not None else str(ip6)
    port = (raw[-2] << 8) | raw[-1]
    if port == 0:
        raise AddressError("port 0 is not a usable UDP port")
    return (ip, port)


def parse_host_port(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """Parse ``host:port``, ``[v6]:port`` or (with ``default_port``) a bare host.

    The host may be a name; it is not resolved here. Raises ``ValueError`` with a message
    that says which form is expected.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty address; expected HOST:PORT, e.g. 203.0.113.7:49200")
    host: str
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']' in [IPv6]:PORT")
        host = text[1:end]
        rest = text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected ':' after ']'")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        host, port_text = text, None  # bare IPv6 address
    else:
        host, port_text = text, None
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{text!r}: no port; expected HOST:PORT, e.g. 203.0.113.7:49200")
        port = default_port
    else:
        if not port_text.isdigit():
            raise ValueError(f"{text!r}: port {port_text!r} is not a number in 1-65535")
        port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is outside 1-65535")
    if not host:
        raise ValueError(f"{text!r}: empty host; expected HOST:PORT")
    if ":" not in host and _NUMERIC_LAST_LABEL.search(host):
        # No DNS name ends in a number: this is meant as an IPv4 address. Parse it strictly,
        # or the resolver's legacy inet_aton rules turn "1.2.3" into 1.2.0.3.
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(
                f"{text!r}: {host!r} is not an IPv4 address (four numbers 0-255 separated by "
                "dots, e.g. 203.0.113.7)"
            ) from None
    return host, port


#: A host whose last dot-separated label is a (decimal or hex) number.
_NUMERIC_LAST_LABEL = re.compile(r"(?:^|\.)(?:[0-9]+|0[xX][0-9a-fA-F]*)\.?$")


@functools.lru_cache(maxsize=4096)
def is_loopback(ip: str) -> bool:
    """Whether ``ip`` (canonical text) is a loopback address: 127.0.0.0/8 or ::1."""
    return ipaddress.ip_address(ip).is_loopback


def format_addr(addr: Address) -> str:
    """``ip:port`` or ``[ip6]:port``."""
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
