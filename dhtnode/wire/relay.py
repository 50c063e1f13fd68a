"""Blind-relay datagrams (first byte 0x30-0x3F): the byte layout only.

::

    BIND   (member -> relay)  u8 0x30 | u8 version=1 | u8 role | 8 session id | 16 token   27 B
    BOUND  (relay -> member)  u8 0x31 | u8 version=1 | u8 role | 8 session id | u8 paired  12 B
    DATA   (member -> relay)  u8 0x32 | 8 session id | payload (a QUIC datagram)
    DATA   (relay -> member)  u8 0x33 | 8 session id | payload, byte for byte as received

``role`` is 0 for the client (the side that sent the hello), 1 for the listener. The token
is the relay's MAC over (session id, role, the member's address as the relay sees it): it
was handed out during the introduction, so only the address it was made for can use it.
BOUND is smaller than BIND and DATA is forwarded at the size it arrived: nothing amplifies.

Decoders raise only :class:`RelayDecodeError`. What the relay does lives in
``dhtnode.nat.relay``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from dhtnode.errors import DecodeError

RELAY_VERSION = 1
#: Bytes of a session id: random per introduction.
SESSION_ID_LEN = 8
#: Bytes of a session token (a truncated BLAKE2b MAC: out of reach of online guessing).
TOKEN_LEN = 16
ROLE_CLIENT = 0
ROLE_SERVER = 1

_BIND = struct.Struct(">BBB8s16s")
_BOUND = struct.Struct(">BBB8sB")
#: Header of a DATA datagram (type + session id).
DATA_HEADER_LEN = 1 + SESSION_ID_LEN


class RelayDecodeError(DecodeError):
    """A relay datagram is malformed."""


class RelayType(enum.IntEnum):
    BIND = 0x30
    BOUND = 0x31
    DATA_TO_RELAY = 0x32
    DATA_FROM_RELAY = 0x33


@dataclass(frozen=True, slots=True)
class Bind:
    role: int
    session: bytes
    token: bytes


@dataclass(frozen=True, slots=True)
class Bound:
    role: int
    session: bytes
    paired: bool


def encode_bind(b: Bind) -> bytes:
    return _BIND.pack(RelayType.BIND, RELAY_VERSION, b.role, b.session, b.token)


def encode_bound(b: Bound) -> bytes:
    return _BOUND.pack(RelayType.BOUND, RELAY_VERSION, b.role, b.session, int(b.paired))


def encode_data(kind: RelayType, session: bytes, payload: bytes) -> bytes:
    return bytes((kind,)) + session + payload


def decode_bind(data: bytes) -> Bind:
    if len(data) != _BIND.size:
        raise RelayDecodeError(f"BIND of {len(data)} bytes, expected {_BIND.size}")
    t, version, role, session, token = _BIND.unpack(data)
    if t != RelayType.BIND or version != RELAY_VERSION or role not in (0, 1):
        raise RelayDecodeError("BIND with a bad type, version or role")
    return Bind(role, session, token)


def decode_bound(data: bytes) -> Bound:
    if len(data) != _BOUND.size:
        raise RelayDecodeError(f"BOUND of {len(data)} bytes, expected {_BOUND.size}")
    t, version, role, session, paired = _BOUND.unpack(data)
    if t != RelayType.BOUND or version != RELAY_VERSION or role not in (0, 1) or paired > 1:
        raise RelayDecodeError("BOUND with a bad type, version, role or flag")
    return Bound(role, session, bool(paired))


def split_data(data: bytes) -> tuple[bytes, bytes]:
    """(session id, payload) of a DATA datagram of either direction."""
    if len(data) <= DATA_HEADER_LEN or data[0] not in (
        RelayType.DATA_TO_RELAY,
        RelayType.DATA_FROM_RELAY,
    ):
        raise RelayDecodeError("DATA too short or of another type")
    return data[1:DATA_HEADER_LEN], data[DATA_HEADER_LEN:]
