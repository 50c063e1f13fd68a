"""Network names and their ids (the F_NETWORK field of DHT messages, docs/PROTOCOL.md 3.1).

Its own module, apart from the message codec, so that the configuration can name the public
network without importing the codec (start-up time of every CLI command).
"""

from __future__ import annotations

import hashlib

__all__ = ["NETWORK_ID_LEN", "PUBLIC_NETWORK", "network_id"]

#: Bytes of a network id (F_NETWORK). 32 bits: two test swarms picking names collide with
#: odds of one in four billion, and every message of a private network pays only 4 bytes.
NETWORK_ID_LEN = 4
#: The network name that sends no network id (the flag clear): the public network, so its
#: packets and every deployment from before networks existed stay byte for byte the same.
PUBLIC_NETWORK = "public"
#: Domain separation of the network id hash, so it never equals another hash of the name.
_NETWORK_PERSON = b"dhtnode-network:"


def network_id(name: str) -> bytes | None:
    """The id of the network called ``name``: None for :data:`PUBLIC_NETWORK` (no F_NETWORK),
    else the first :data:`NETWORK_ID_LEN` bytes of BLAKE2b-256(``"dhtnode-network:"`` ||
    UTF-8 name)."""
    if name == PUBLIC_NETWORK:
        return None
    digest = hashlib.blake2b(_NETWORK_PERSON + name.encode("utf-8"), digest_size=32).digest()
    return digest[:NETWORK_ID_LEN]
