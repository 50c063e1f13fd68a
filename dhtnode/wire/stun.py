"""STUN message codec (RFC 8489, and RFC 3489's classic form): bytes in, bytes out.

Header (20 bytes)::

    u16 type (first two bits zero) | u16 length (of the attributes, multiple of 4)
    u32 magic cookie 0x2112A442   | 12-byte transaction id
    (RFC 3489 clients put a 16-byte transaction id where cookie + id are; we keep it whole)

Attributes are TLVs padded to 4 bytes. FINGERPRINT (0x8028), if present, must be last and is
checked. Decoding raises only :class:`StunError`.

This module owns the layout; what to answer is ``dhtnode.nat.reflector``'s business.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import zlib
from dataclasses import dataclass

from dhtnode.errors import DecodeError
from dhtnode.wire.address import Address
from dhtnode.wire.demux import STUN_MAGIC_COOKIE

MAGIC_COOKIE = 0x2112A442
HEADER_LEN = 20
#: Largest STUN message we decode. Binding requests are tiny; RFC 8489 says 548 bytes fits
#: any path when the MTU is unknown.
MAX_MESSAGE_LEN = 548
#: Attributes allowed in one message before it counts as malformed.
MAX_ATTRIBUTES = 32

METHOD_BINDING = 0x001
CLASS_REQUEST = 0b00
CLASS_INDICATION = 0b01
CLASS_SUCCESS = 0b10
CLASS_ERROR = 0b11

ATTR_MAPPED_ADDRESS = 0x0001
ATTR_CHANGE_REQUEST = 0x0003  # RFC 3489 / 5780
ATTR_USERNAME = 0x0006
ATTR_MESSAGE_INTEGRITY = 0x0008
ATTR_ERROR_CODE = 0x0009
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028
FINGERPRINT_XOR = 0x5354554E

_HEADER = struct.Struct(">HHI12s")


class StunError(DecodeError):
    """A datagram is not a well-formed STUN message, or not the answer expected."""


@dataclass(frozen=True, slots=True)
class StunMessage:
    method: int
    cls: int
    #: 12 bytes (RFC 5389+) or 16 bytes (RFC 3489 classic, no magic cookie).
    transaction_id: bytes
    attributes: tuple[tuple[int, bytes], ...] = ()

    @property
    def classic(self) -> bool:
        return len(self.transaction_id) == 16

    @property
    def has_fingerprint(self) -> bool:
        return any(t == ATTR_FINGERPRINT for t, _ in self.attributes)

    def get(self, attr_type: int) -> bytes | None:
        for t, v in self.attributes:
            if t == attr_type:
                return v
        return None


def _type_to_method_class(t: int) -> tuple[int, int]:
    method = (t & 0x000F) | ((t & 0x00E0) >> 1) | ((t & 0x3E00) >> 2)
    cls = ((t >> 4) & 0x1) | ((t >> 7) & 0x2)
    return method, cls


def _method_class_to_type(method: int, cls: int) -> int:
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((cls & 0x1) << 4)
        | ((cls & 0x2) << 7)
    )


def _fingerprint(data: bytes) -> bytes:
    return struct.pack(">I", (zlib.crc32(data) & 0xFFFFFFFF) ^ FINGERPRINT_XOR)


def decode(data: bytes) -> StunMessage:
    """Parse a STUN message. Raises only :class:`StunError`."""
    if len(data) < HEADER_LEN:
        raise StunError("shorter than a STUN header")
    if len(data) > MAX_MESSAGE_LEN:
        raise StunError(f"STUN message of {len(data)} bytes is over {MAX_MESSAGE_LEN}")
    t, length, cookie, _ = _HEADER.unpack_from(data)
    if t & 0xC000:
        raise StunError("first two bits must be zero")
    if length % 4 or length != len(data) - HEADER_LEN:
        raise StunError("length field does not match the datagram")
    tid = data[8:20] if cookie == MAGIC_COOKIE else data[4:20]
    method, cls = _type_to_method_class(t)
    attrs: list[tuple[int, bytes]] = []
    pos = HEADER_LEN
    while pos < len(data):
        if len(attrs) >= MAX_ATTRIBUTES:
            raise StunError("too many attributes")
        if pos + 4 > len(data):
            raise StunError("truncated attribute header")
        at, alen = struct.unpack_from(">HH", data, pos)
        end = pos + 4 + alen
        if end > len(data):
            raise StunError("attribute runs past the end")
        value = data[pos + 4 : end]
        if at == ATTR_FINGERPRINT:
            if alen != 4 or end + (-alen % 4) != len(data):
                raise StunError("FINGERPRINT must be the last attribute, 4 bytes")
            if value != _fingerprint(data[:pos]):
                raise StunError("FINGERPRINT does not match")
        attrs.append((at, bytes(value)))
        pos = end + (-alen % 4)
    if pos != len(data):
        raise StunError("padding runs past the end")
    return StunMessage(method, cls, bytes(tid), tuple(attrs))


def encode(msg: StunMessage, *, fingerprint: bool = False) -> bytes:
    body = bytearray()
    for t, v in msg.attributes:
        body += struct.pack(">HH", t, len(v)) + v + b"\x00" * (-len(v) % 4)
    t = _method_class_to_type(msg.method, msg.cls)
    if msg.classic:
        head_tail = msg.transaction_id
    else:
        if len(msg.transaction_id) != 12:
            raise ValueError("transaction id must be 12 bytes (or 16 for RFC 3489)")
        head_tail = STUN_MAGIC_COOKIE + msg.transaction_id
    length = len(body) + (8 if fingerprint else 0)
    out = struct.pack(">HH", t, length) + head_tail + bytes(body)
    if fingerprint:
        out += struct.pack(">HH", ATTR_FINGERPRINT, 4) + _fingerprint(out)
    return out


def encode_xor_address(addr: Address, transaction_id: bytes) -> bytes:
    """XOR-MAPPED-ADDRESS value (RFC 8489 14.2)."""
    ip = ipaddress.ip_address(addr[0])
    port = addr[1] ^ (MAGIC_COOKIE >> 16)
    if isinstance(ip, ipaddress.IPv4Address):
        x = int(ip) ^ MAGIC_COOKIE
        return struct.pack(">BBHI", 0, 1, port, x)
    mask = int.from_bytes(STUN_MAGIC_COOKIE + transaction_id, "big")
    return struct.pack(">BBH", 0, 2, port) + (int(ip) ^ mask).to_bytes(16, "big")


def decode_xor_address(value: bytes, transaction_id: bytes) -> Address:
    if len(value) < 4:
        raise StunError("truncated XOR-MAPPED-ADDRESS")
    _, fam, xport = struct.unpack_from(">BBH", value)
    port = xport ^ (MAGIC_COOKIE >> 16)
    if fam == 1 and len(value) == 8:
        ip4 = int.from_bytes(value[4:8], "big") ^ MAGIC_COOKIE
        return (str(ipaddress.IPv4Address(ip4)), port)
    if fam == 2 and len(value) == 20 and len(transaction_id) == 12:
        mask = int.from_bytes(STUN_MAGIC_COOKIE + transaction_id, "big")
        ip6 = ipaddress.IPv6Address(int.from_bytes(value[4:20], "big") ^ mask)
        shown = ip6.ipv4_mapped or ip6
        return (str(shown), port)
    raise StunError("bad XOR-MAPPED-ADDRESS family or length")


def encode_plain_address(addr: Address) -> bytes:
    """MAPPED-ADDRESS value (RFC 3489 11.2.1; kept in RFC 8489 for old clients)."""
    ip = ipaddress.ip_address(addr[0])
    fam = 1 if isinstance(ip, ipaddress.IPv4Address) else 2
    return struct.pack(">BBH", 0, fam, addr[1]) + ip.packed


def decode_plain_address(value: bytes) -> Address:
    if len(value) < 4:
        raise StunError("truncated MAPPED-ADDRESS")
    _, fam, port = struct.unpack_from(">BBH", value)
    if fam == 1 and len(value) == 8:
        return (str(ipaddress.IPv4Address(value[4:8])), port)
    if fam == 2 and len(value) == 20:
        return (str(ipaddress.IPv6Address(value[4:20])), port)
    raise StunError("bad MAPPED-ADDRESS family or length")


def build_binding_request(
    transaction_id: bytes | None = None, fingerprint: bool = True
) -> tuple[bytes, bytes]:
    """A Binding request; returns (transaction id, datagram)."""
    tid = transaction_id or os.urandom(12)
    return tid, encode(StunMessage(METHOD_BINDING, CLASS_REQUEST, tid), fingerprint=fingerprint)


def parse_binding_response(data: bytes, expected_tid: bytes) -> Address:
    """The mapped address from a Binding success response to our request ``expected_tid``."""
    msg = decode(data)
    if msg.transaction_id != expected_tid:
        raise StunError("transaction id does not match our request")
    if msg.method != METHOD_BINDING:
        raise StunError("not a Binding response")
    if msg.cls == CLASS_ERROR:
        raise StunError("the server answered with a STUN error")
    if msg.cls != CLASS_SUCCESS:
        raise StunError("not a success response")
    xor = msg.get(ATTR_XOR_MAPPED_ADDRESS)
    if xor is not None:
        return decode_xor_address(xor, msg.transaction_id)
    plain = msg.get(ATTR_MAPPED_ADDRESS)
    if plain is not None:
        return decode_plain_address(plain)
    raise StunError("the response has no mapped address")
