"""Punch datagrams (first byte 0x20-0x2F): the byte layout of PROBE and PROBE_ACK.

Every punch datagram is exactly :data:`DATAGRAM_LEN` (31) bytes::

    u8 type (0x20 PROBE, 0x21 PROBE_ACK) | u8 version=1 | u8 flags
    8 attempt id | u32 seq | 16 mac

* ``flags`` bit 0x01 is set when the sender is the attempt's initiator; other bits must be 0.
  A receiver drops datagrams carrying its own role, so a probe reflected back at its sender
  (by a NAT hairpin or an attacker) is never taken for the peer's.
* ``attempt id`` and ``punch key`` (32 bytes) both come from the introduction; the id is
  readable without the key (:func:`attempt_id_of`, for routing to the right attempt).
* ``seq`` numbers a PROBE; a PROBE_ACK echoes the seq of the PROBE it answers.
* ``mac`` = BLAKE2b(key=punch key, digest 16 bytes, person ``dhtnode punch v1``) over the
  first 15 bytes: strangers can neither forge a probe nor answer one.

A PROBE_ACK is the same size as the PROBE it answers, so a spoofed probe never amplifies.
This module owns the bytes only; when to send what lives in :mod:`dhtnode.nat.punch`.
Decoders raise only :class:`PunchDecodeError`.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from dataclasses import dataclass

from dhtnode.errors import DecodeError

PUNCH_VERSION = 1
#: Bytes of an attempt id: random per attempt, so 64 bits make collisions between a node's
#: concurrent attempts negligible; it only routes, the MAC authenticates.
ATTEMPT_ID_LEN = 8
#: Bytes of the shared punch key (a full BLAKE2b key strength).
PUNCH_KEY_LEN = 32
#: Bytes of the MAC: 128 bits, out of reach of online forgery.
MAC_LEN = 16
#: Flag: the sender is the attempt's initiator.
F_INITIATOR = 0x01
#: BLAKE2b personalisation: a MAC over these bytes means nothing in any other protocol.
MAC_PERSON = b"dhtnode punch v1"

_HEAD = struct.Struct(">BBB8sI")
#: Size of every punch datagram: 15 bytes covered by the MAC, then the MAC.
DATAGRAM_LEN = _HEAD.size + MAC_LEN


class PunchDecodeError(DecodeError):
    """A punch datagram is malformed or its MAC does not verify."""


class PunchType(enum.IntEnum):
    PROBE = 0x20
    PROBE_ACK = 0x21


_TYPES = frozenset(int(t) for t in PunchType)


@dataclass(frozen=True, slots=True)
class PunchDatagram:
    type: PunchType
    attempt_id: bytes
    seq: int
    #: Set by the initiator of the attempt, clear on the other side's datagrams.
    from_initiator: bool


def _mac(key: bytes, body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=MAC_LEN, key=key, person=MAC_PERSON).digest()


def encode(dgram: PunchDatagram, punch_key: bytes) -> bytes:
    if len(punch_key) != PUNCH_KEY_LEN:
        raise ValueError(f"punch key must be {PUNCH_KEY_LEN} bytes")
    if len(dgram.attempt_id) != ATTEMPT_ID_LEN:
        raise ValueError(f"attempt id must be {ATTEMPT_ID_LEN} bytes")
    flags = F_INITIATOR if dgram.from_initiator else 0
    body = _HEAD.pack(int(dgram.type), PUNCH_VERSION, flags, dgram.attempt_id, dgram.seq)
    return body + _mac(punch_key, body)


def attempt_id_of(data: bytes) -> bytes:
    """The attempt id of a punch datagram, without verifying it (for routing only)."""
    _check_layout(data)
    return data[3 : 3 + ATTEMPT_ID_LEN]


def decode(data: bytes, punch_key: bytes) -> PunchDatagram:
    """Parse and authenticate one punch datagram. Raises only :class:`PunchDecodeError`."""
    _check_layout(data)
    body = data[: _HEAD.size]
    # A key of the wrong length cannot have produced a valid MAC: reject, do not raise
    # ValueError (hashlib would), so a caller's mistake cannot crash the receive path.
    if len(punch_key) != PUNCH_KEY_LEN or not hmac.compare_digest(
        _mac(punch_key, body), data[_HEAD.size :]
    ):
        raise PunchDecodeError("bad MAC")
    kind, _version, flags, attempt_id, seq = _HEAD.unpack(body)
    return PunchDatagram(PunchType(kind), attempt_id, seq, bool(flags & F_INITIATOR))


def _check_layout(data: bytes) -> None:
    if len(data) != DATAGRAM_LEN:
        raise PunchDecodeError(f"punch datagram must be {DATAGRAM_LEN} bytes, not {len(data)}")
    if data[0] not in _TYPES:
        raise PunchDecodeError(f"unknown punch type 0x{data[0]:02x}")
    if data[1] != PUNCH_VERSION:
        raise PunchDecodeError(f"unsupported punch version {data[1]}")
    if data[2] & ~F_INITIATOR:
        raise PunchDecodeError("unknown punch flag")
