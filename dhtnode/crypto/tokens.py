"""Write tokens: proof that a storer's client owns the source address it writes from.

A serving node hands out ``token = BLAKE2b-128(key=secret, compact source address)`` in every
LOOKUP response and accepts an ANNOUNCE or UNANNOUNCE only with a token made for the address the
write comes from. The secret rotates every :data:`ROTATE_INTERVAL` seconds and the previous one
is still accepted, so a token lives between one and two intervals (BitTorrent BEP 5 style).
A spoofed source address therefore cannot write: the token went to the real owner.

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


class TokenIssuer:
    def __init__(self, random_bytes: Callable[[int], bytes], now: float) -> None:
        self._random = random_bytes
        self._current = random_bytes(_SECRET_LEN)
        self._previous = self._current
        self._rotated_at = now

    def _maybe_rotate(self, now: float) -> None:
        if now - self._rotated_at >= ROTATE_INTERVAL:
            # After a long idle gap both old secrets are stale: rotate twice.
            twice = now - self._rotated_at >= 2 * ROTATE_INTERVAL
            self._previous = self._random(_SECRET_LEN) if twice else self._current
            self._current = self._random(_SECRET_LEN)
            self._rotated_at = now

    @staticmethod
    def _mac(secret: bytes, addr: Address) -> bytes:
        return hashlib.blake2b(
            wire_address.encode(addr), key=secret, digest_size=TOKEN_LEN
        ).digest()

    def issue(self, addr: Address, now: float) -> bytes:
        self._maybe_rotate(now)
        return self._mac(self._current, addr)

    def check(self, token: bytes, addr: Address, now: float) -> bool:
        self._maybe_rotate(now)
        if len(token) != TOKEN_LEN:
            return False
        return hmac.compare_digest(token, self._mac(self._current, addr)) or hmac.compare_digest(
            token, self._mac(self._previous, addr)
        )
