"""First-byte demultiplexing of the one UDP socket (RFC 9443 ranges).

==========  ===========================================================
first byte  meaning
==========  ===========================================================
0x00-0x03   STUN (RFC 8489 with the magic cookie, or RFC 3489 classic without)
0x04-0x0F   reserved, dropped
0x10-0x1F   DHT RPC (this project's messages, see docs/PROTOCOL.md)
0x20-0x2F   holepunch probes (wire/punch.py)
0x30-0x3F   reserved for relayed datagrams (the relay issue)
0x40-0x7F   QUIC short header (fixed bit 0x40 set)
0x80-0xBF   never QUIC (fixed bit clear): dropped
0xC0-0xFF   QUIC long header
==========  ===========================================================

This module only classifies; it never parses past the bytes it needs.
"""

from __future__ import annotations

import enum

STUN_MAGIC_COOKIE = b"\x21\x12\xa4\x42"
#: First byte of a DHT request.
DHT_REQUEST = 0x10
#: First byte of a DHT response.
DHT_RESPONSE = 0x11


class Kind(enum.Enum):
    STUN = "stun"
    DHT = "dht"
    PUNCH = "punch"
    RELAY = "relay"
    QUIC = "quic"
    UNKNOWN = "unknown"


def classify(data: bytes) -> Kind:
    """Which subsystem a datagram belongs to, from its first byte (and STUN's cookie)."""
    if not data:
        return Kind.UNKNOWN
    b = data[0]
    if b <= 0x03:
        # Nothing else uses 0-3; the STUN decoder checks the rest (cookie, lengths).
        return Kind.STUN
    if 0x10 <= b <= 0x1F:
        return Kind.DHT
    if 0x20 <= b <= 0x2F:
        return Kind.PUNCH
    if 0x30 <= b <= 0x3F:
        return Kind.RELAY
    if b & 0x40:
        return Kind.QUIC
    return Kind.UNKNOWN
