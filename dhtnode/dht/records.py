"""Signed topic records and signed withdrawals: layout, signing and verification.

A record says "the holder of this Ed25519 key can be reached for this topic at these addresses".
Layout (see docs/PROTOCOL.md)::

    32 public key | u64 seq | u8 n | n x (u8 kind, compact address) | 64 signature

``seq`` is the announcer's wall clock in milliseconds: it orders announcements from one key
(a newer one replaces an older one) and bounds replay (storers refuse records older than the
TTL plus the allowed clock skew). The signature covers a domain tag, the topic and every byte
before the signature, so a record cannot be moved to another topic or edited.

A withdrawal (unannounce) is ``32 public key | u64 seq | 64 signature`` over its own tag.

This module is pure: no storage policy (see ``store.py``) and no I/O.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from dhtnode.crypto.identity import Identity, verify
from dhtnode.errors import DecodeError
from dhtnode.wire import address as wire_address
from dhtnode.wire.address import Address

ANNOUNCE_TAG = b"dhtnode/announce/v1\x00"
UNANNOUNCE_TAG = b"dhtnode/unannounce/v1\x00"
#: At most this many addresses in one record keeps a record under ~250 bytes.
MAX_RECORD_ADDRESSES = 8
SIGNATURE_LEN = 64
PUBLIC_KEY_LEN = 32
#: Records in one LOOKUP response are capped by this count as well as by datagram size.
MAX_RECORDS_PER_MESSAGE = 32

_HEAD = struct.Struct(">32sQB")


class RecordError(DecodeError):
    """A record or withdrawal is malformed (its signature is checked separately)."""


class AddressKind(enum.IntEnum):
    #: The announcer's own public address (direct or to be holepunched).
    DIRECT = 0
    #: A DHT node that stored the record and forwards introductions to the announcer
    #: (wire value 1; called "relay" before the blind relay gave that word its own meaning).
    INTRODUCER = 1


@dataclass(frozen=True, slots=True)
class Record:
    public_key: bytes
    seq: int
    addresses: tuple[tuple[AddressKind, Address], ...]
    signature: bytes

    def body(self) -> bytes:
        """Every byte of the encoded record before the signature."""
        out = [_HEAD.pack(self.public_key, self.seq, len(self.addresses))]
        for kind, addr in self.addresses:
            out.append(bytes((int(kind),)) + wire_address.encode(addr))
        return b"".join(out)

    def encode(self) -> bytes:
        return self.body() + self.signature

    def verify(self, topic: bytes) -> bool:
        return verify(self.public_key, ANNOUNCE_TAG + topic + self.body(), self.signature)


@dataclass(frozen=True, slots=True)
class Withdrawal:
    public_key: bytes
    seq: int
    signature: bytes

    def body(self) -> bytes:
        return struct.pack(">32sQ", self.public_key, self.seq)

    def encode(self) -> bytes:
        return self.body() + self.signature

    def verify(self, topic: bytes) -> bool:
        return verify(self.public_key, UNANNOUNCE_TAG + topic + self.body(), self.signature)


def sign_record(
    identity: Identity,
    topic: bytes,
    seq: int,
    addresses: tuple[tuple[AddressKind, Address], ...],
) -> Record:
    if len(addresses) > MAX_RECORD_ADDRESSES:
        raise ValueError(f"at most {MAX_RECORD_ADDRESSES} addresses per record")
    unsigned = Record(identity.public_key, seq, addresses, b"")
    sig = identity.sign(ANNOUNCE_TAG + topic + unsigned.body())
    return Record(identity.public_key, seq, addresses, sig)


def sign_withdrawal(identity: Identity, topic: bytes, seq: int) -> Withdrawal:
    unsigned = Withdrawal(identity.public_key, seq, b"")
    sig = identity.sign(UNANNOUNCE_TAG + topic + unsigned.body())
    return Withdrawal(identity.public_key, seq, sig)


def decode_record(data: bytes, pos: int = 0) -> tuple[Record, int]:
    """Parse one record at ``pos``; returns it and the offset after it."""
    if pos + _HEAD.size > len(data):
        raise RecordError("truncated record header")
    pub, seq, n = _HEAD.unpack_from(data, pos)
    if n > MAX_RECORD_ADDRESSES:
        raise RecordError(f"record has {n} addresses; at most {MAX_RECORD_ADDRESSES}")
    pos += _HEAD.size
    addrs: list[tuple[AddressKind, Address]] = []
    for _ in range(n):
        if pos >= len(data):
            raise RecordError("truncated record address")
        kind = data[pos]
        if kind not in (AddressKind.DIRECT, AddressKind.INTRODUCER):
            raise RecordError(f"unknown address kind {kind}")
        addr, pos = wire_address.decode(data, pos + 1)
        addrs.append((AddressKind(kind), addr))
    end = pos + SIGNATURE_LEN
    if end > len(data):
        raise RecordError("truncated record signature")
    return Record(pub, seq, tuple(addrs), bytes(data[pos:end])), end


def decode_single_record(data: bytes) -> Record:
    rec, end = decode_record(data)
    if end != len(data):
        raise RecordError("trailing bytes after record")
    return rec


def encode_record_list(records: list[Record]) -> bytes:
    return bytes((len(records),)) + b"".join(r.encode() for r in records)


def decode_record_list(data: bytes) -> list[Record]:
    if not data:
        raise RecordError("empty record list")
    n = data[0]
    if n > MAX_RECORDS_PER_MESSAGE:
        raise RecordError(f"{n} records in one message; at most {MAX_RECORDS_PER_MESSAGE}")
    pos = 1
    out: list[Record] = []
    for _ in range(n):
        rec, pos = decode_record(data, pos)
        out.append(rec)
    if pos != len(data):
        raise RecordError("trailing bytes after record list")
    return out


def decode_withdrawal(data: bytes) -> Withdrawal:
    if len(data) != PUBLIC_KEY_LEN + 8 + SIGNATURE_LEN:
        raise RecordError("a withdrawal is exactly 104 bytes")
    pub, seq = struct.unpack_from(">32sQ", data)
    return Withdrawal(pub, seq, bytes(data[40:]))
