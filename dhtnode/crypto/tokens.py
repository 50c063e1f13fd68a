"""Write tokens: proof that a storer's client owns the source address it writes from.

A serving node hands out ``token = BLAKE2b-128(key=secret, compact source address)`` in every
LOOKUP response and accepts an ANNOUNCE or UNANNOUNCE only with a token made for the address the
write comes from. The secret rotates every :data:`ROTATE_INTERVAL` seconds and the previous one
is still accepted, so a token lives between one and two intervals (BitTorrent BEP 5 style).
A spoofed source address therefore cannot write: the token went to the real owner.

The same token is the node's **address proof** for every request (docs/PROTOCOL.md, "Security:
address validation"): a request that echoes a valid token comes from whoever received our
earlier answer at that address, so it may get a large answer or make us act for it.

Pure: the caller passes the clock and the random source.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

from dhtnode.wire import address as wire_address
from dhtnode.wire.address import Address

#: Seconds between secret rotations.
ROTATE_INTERVAL = 300.0
TOKEN_LEN = 16
_SECRET_LEN = 32
#: Tokens of the current secret remembered per address: a node answers the same few thousand
#: peers over and over, and a keyed BLAKE2b costs about a microsecond (a PING reply ~13 µs).
#: Cleared at each rotation and when full, so a flood of forged sources cannot grow it.
MEMO_SIZE = 4096

#: :meth:`TokenIssuer.verify` results.
INVALID = 0
#: Made with the current secret.
CURRENT = 1
#: Made with the previous secret: still valid, but the holder should get a fresh one.
PREVIOUS = 2


class TokenIssuer:
    def __init__(self, random_bytes: Callable[[int], bytes], now: float) -> None:
        self._random = random_bytes
        self._current = random_bytes(_SECRET_LEN)
        self._previous = self._current
        self._rotated_at = now
        self._memo: dict[Address, bytes] = {}

    def _maybe_rotate(self, now: float) -> None:
        if now - self._rotated_at >= ROTATE_INTERVAL:
            # After a long idle gap both old secrets are stale: rotate twice.
            twice = now - self._rotated_at >= 2 * ROTATE_INTERVAL
            self._previous = self._random(_SECRET_LEN) if twice else self._current
            self._current = self._random(_SECRET_LEN)
            self._rotated_at = now
            self._memo.clear()

    @staticmethod
    def _mac(secret: bytes, addr: Address) -> bytes:
        return hashlib.blake2b(
            wire_address.encode(addr), key=secret, digest_size=TOKEN_LEN
        ).digest()

    def issue(self, addr: Address, now: float) -> bytes:
        self._maybe_rotate(now)
        token = self._memo.get(addr)
        if token is None:
            if len(self._memo) >= MEMO_SIZE:
                self._memo.clear()
            token = self._memo[addr] = self._mac(self._current, addr)
        return token

    def verify(self, token: bytes, addr: Address, now: float) -> int:
        """:data:`CURRENT`, :data:`PREVIOUS` or :data:`INVALID` for ``token`` from ``addr``."""
        if len(token) != TOKEN_LEN:
            return INVALID
        if hmac.compare_digest(token, self.issue(addr, now)):
            return CURRENT
        if hmac.compare_digest(token, self._mac(self._previous, addr)):
            return PREVIOUS
        return INVALID

    def check(self, token: bytes, addr: Address, now: float) -> bool:
        return self.verify(token, addr, now) != INVALID
