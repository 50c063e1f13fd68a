"""Node ids and topics: the 256-bit keyspace and the XOR metric.

A node's id is bound to its public UDP address: ``BLAKE2b-256(compact address)``. Nobody can
pick an id without owning the address it hashes from, so an attacker cannot place itself next
to a chosen key at will (it would need an address whose hash lands there), and a receiver can
check any claimed id against the source address it actually saw.

Topics are 32-byte keys given as 64 hex characters, or derived from a human name with
:func:`topic_from_name`.
"""

from __future__ import annotations

import hashlib

from dhtnode.wire import address as wire_address
from dhtnode.wire.address import Address

#: Bytes in a node id or topic key.
ID_LEN = 32
#: Bits in the keyspace.
ID_BITS = ID_LEN * 8


def node_id_for(addr: Address) -> bytes:
    """The id of the node reachable at ``addr``."""
    return hashlib.blake2b(wire_address.encode(addr), digest_size=ID_LEN).digest()


def topic_from_name(name: str) -> bytes:
    """BLAKE2b-256 of the UTF-8 name: how ``--topic-name`` turns a name into a topic."""
    return hashlib.blake2b(name.encode("utf-8"), digest_size=ID_LEN).digest()


def listen_topic(public_key: bytes) -> bytes:
    """The topic a listener announces itself under: BLAKE2b-256 of its Ed25519 public key,
    personalised so that it never equals a topic named by a user."""
    return hashlib.blake2b(public_key, digest_size=ID_LEN, person=b"dhtnode-listen").digest()


def parse_topic(text: str) -> bytes:
    """A topic from 64 hex characters; ``ValueError`` with the expected form otherwise."""
    text = text.strip().lower()
    if len(text) != ID_LEN * 2:
        raise ValueError(
            f"a topic is {ID_LEN * 2} hex characters (32 bytes), got {len(text)} characters; "
            "use --topic-name NAME to derive one from a name"
        )
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ValueError("a topic must be hex digits 0-9a-f only") from None


def as_int(key: bytes) -> int:
    return int.from_bytes(key, "big")


def distance(a: bytes, b: bytes) -> int:
    """XOR distance between two keys, as an integer."""
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


def bucket_index(own: int, other: int) -> int:
    """Index 0..255 of the k-bucket ``other`` falls in, seen from ``own`` (255 = nearest half).

    Equal ids have no bucket; callers never insert themselves.
    """
    return ID_BITS - (own ^ other).bit_length()
