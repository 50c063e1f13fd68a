"""The sealed introduction: a client's *hello* to a server and the server's *reply*, both
carried by a DHT node (the forwarder) that must not be able to read, forge or replay them.

This module owns the cryptography and byte layout of the hello and the reply, the replay
guard, and the derivation of the per-attempt ``punch_key`` and ``attempt_id``. It is pure: no
I/O, no clock (the caller passes wall-clock seconds), no knowledge of what the payloads mean
(see ``peerinfo.py``) or of how the forwarder frames them. Secrets come from ``os.urandom``
and libsodium (PyNaCl) only.

Keys. ``S`` is the server's Ed25519 public key, which the client already knows (from a signed
record); ``S_x`` its X25519 form (``crypto_sign_ed25519_pk_to_curve25519``; the server
converts its own secret). The client makes a fresh X25519 keypair ``(e, e_pub)`` per hello.
Both sides compute ``s = X25519(e, S_x)``; nobody else can. Every key is BLAKE2b keyed with
``s``, each with its own 16-byte personalisation, so no key is used for two purposes::

    k_hello    = BLAKE2b-256(key=s, person="dhtnode-hs-hello", e_pub | S)
    transcript = "dhtnode-hello-v1" | e_pub | S | C | u64 ts | payload
    th         = BLAKE2b-256(person="dhtnode-hs-trans", transcript)
    k_reply    = BLAKE2b-256(key=s, person="dhtnode-hs-reply", th)
    punch_key  = BLAKE2b-256(key=s, person="dhtnode-hs-punch", th)
    attempt_id = BLAKE2b-64 (key=s, person="dhtnode-hs-attid", th)

``S`` goes into every derivation (not only ``S_x``): the Ed25519 -> X25519 map sends ``S`` and
``-S`` to the same ``S_x``, and a hello must bind to one Ed25519 identity.

Hello (:data:`HELLO_OVERHEAD` = 177 bytes + payload)::

    offset size
         0    1  version (1)
         1   32  e_pub, the client's ephemeral X25519 public key
        33   24  nonce (os.urandom)
        57   16  Poly1305 tag  \\
        73   32  C, the client's Ed25519 public key      | XSalsa20-Poly1305 with k_hello
       105    8  ts, client wall clock, u64 ms, big-end. |   (crypto_secretbox)
       113   64  Ed25519 signature by C over transcript  |
       177    *  payload (<= MAX_PAYLOAD bytes)          /

Reply (:data:`REPLY_OVERHEAD` = 43 bytes + payload)::

         0    1  version (1)
         1   24  nonce (os.urandom)
        25   16  Poly1305 tag  \\
        41    1  status: 0 refused, 1 accepted          | XSalsa20-Poly1305 with k_reply
        42    1  reason code (0 = none)                 |
        43    *  payload (<= MAX_PAYLOAD bytes)         /

What this gives: the server authenticates ``C`` (signature over a transcript naming ``e_pub``
and ``S``, so a signed hello cannot be re-sealed for another server or another ephemeral key);
the client authenticates the server (only the holder of ``S``'s secret, or of ``e``, can make
``k_reply``, and ``k_reply`` depends on the whole hello, so a reply answers exactly one hello);
the forwarder sees only ``e_pub``, nonces and ciphertext. The server refuses a hello whose
``ts`` is more than :data:`HELLO_WINDOW` seconds from its clock and keeps every accepted
``e_pub`` in a :class:`ReplayGuard` until that hello could no longer pass the time check.
Not given: forward secrecy. Anyone who later learns ``S``'s secret can open recorded hellos
and replies (and learn ``C`` and the addresses); the QUIC session that follows has its own.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import os
import struct
from dataclasses import dataclass

import nacl.bindings
import nacl.exceptions

from dhtnode.crypto.identity import PUBLIC_KEY_LEN, SIGNATURE_LEN, Identity, verify
from dhtnode.errors import DecodeError

#: First byte of a hello and of a reply. A new layout gets a new number.
VERSION = 1
#: Seconds a hello's timestamp may differ from the server's wall clock, either way. Hellos are
#: answered within a second or two; the rest of the window is room for unsynchronised clocks.
HELLO_WINDOW = 60.0
#: Hellos remembered by a :class:`ReplayGuard` at most. An entry with a stored 233-byte reply
#: (a full PeerInfo) costs ~570 bytes, so ~9 MB when full. Full means more than ~270 new hellos/s
#: for a minute, an attack on a home node; the guard then stays safe by shrinking the window.
REPLAY_CACHE_ENTRIES = 16384
#: Largest payload of a hello or a reply: with the overheads below and ~100 bytes of DHT
#: framing, either still fits a 1200-byte datagram (the size no path is expected to fragment).
MAX_PAYLOAD = 900

NONCE_LEN = 24
KEY_LEN = 32
#: Poly1305 tag that crypto_secretbox adds.
TAG_LEN = 16
#: Length of :attr:`ClientHandshake.attempt_id`.
ATTEMPT_ID_LEN = 8

HELLO_TAG = b"dhtnode-hello-v1"
_PERSON_HELLO = b"dhtnode-hs-hello"
_PERSON_TRANSCRIPT = b"dhtnode-hs-trans"
_PERSON_REPLY = b"dhtnode-hs-reply"
_PERSON_PUNCH = b"dhtnode-hs-punch"
_PERSON_ATTEMPT = b"dhtnode-hs-attid"

_TS = struct.Struct(">Q")
_HELLO_HEAD = 1 + KEY_LEN + NONCE_LEN
_HELLO_SEALED_FIXED = PUBLIC_KEY_LEN + _TS.size + SIGNATURE_LEN
_REPLY_HEAD = 1 + NONCE_LEN
_REPLY_SEALED_FIXED = 2
#: Bytes a hello adds to its payload.
HELLO_OVERHEAD = _HELLO_HEAD + TAG_LEN + _HELLO_SEALED_FIXED
#: Bytes a reply adds to its payload.
REPLY_OVERHEAD = _REPLY_HEAD + TAG_LEN + _REPLY_SEALED_FIXED
#: Digest of a whole hello kept by the guard to tell a retransmission from a replay.
_DIGEST_LEN = 16

_STATUS_REFUSED = 0
_STATUS_ACCEPTED = 1


class HandshakeError(DecodeError):
    """A hello or reply was refused. ``kind`` is a short name for counters: "malformed",
    "tampered", "expired", "bad_signature", "replayed" or "busy". Receivers count and drop."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _tampered() -> HandshakeError:
    return HandshakeError("tampered", "tampered or not for this key")


def _kdf(s: bytes, person: bytes, data: bytes, size: int = KEY_LEN) -> bytes:
    return hashlib.blake2b(data, key=s, person=person, digest_size=size).digest()


def _transcript_hash(
    e_pub: bytes, server_key: bytes, client_key: bytes, ts_ms: int, payload: bytes
) -> tuple[bytes, bytes]:
    """The signed transcript and its hash."""
    transcript = b"".join((HELLO_TAG, e_pub, server_key, client_key, _TS.pack(ts_ms), payload))
    th = hashlib.blake2b(transcript, person=_PERSON_TRANSCRIPT, digest_size=KEY_LEN).digest()
    return transcript, th


@dataclass(frozen=True, slots=True)
class _SessionKeys:
    reply: bytes
    punch: bytes
    attempt_id: bytes

    @classmethod
    def derive(cls, s: bytes, th: bytes) -> _SessionKeys:
        return cls(
            reply=_kdf(s, _PERSON_REPLY, th),
            punch=_kdf(s, _PERSON_PUNCH, th),
            attempt_id=_kdf(s, _PERSON_ATTEMPT, th, ATTEMPT_ID_LEN),
        )


@dataclass(frozen=True, slots=True)
class Reply:
    """An opened reply. ``reason`` is the server's code (0 = none given); its meaning belongs
    to the caller's protocol."""

    accepted: bool
    payload: bytes
    reason: int = 0


class ClientHandshake:
    """The client's side of one hello: what it needs to open the reply, and the shared
    per-attempt values. Holds no long-term secret; the ephemeral secret is already gone."""

    __slots__ = ("_reply_key", "attempt_id", "punch_key", "server_key")

    def __init__(self, server_key: bytes, keys: _SessionKeys) -> None:
        self.server_key = server_key
        self.attempt_id = keys.attempt_id
        self.punch_key = keys.punch
        self._reply_key = keys.reply

    def open_reply(self, reply: bytes) -> Reply:
        """Authenticate and open the server's reply. Raises :class:`HandshakeError` for
        anything but a reply made for this hello by the holder of ``server_key``."""
        if len(reply) < REPLY_OVERHEAD:
            raise HandshakeError("malformed", f"malformed: reply of {len(reply)} bytes")
        if reply[0] != VERSION:
            raise HandshakeError("malformed", f"malformed: unknown reply version {reply[0]}")
        if len(reply) > REPLY_OVERHEAD + MAX_PAYLOAD:
            raise HandshakeError("malformed", f"malformed: reply of {len(reply)} bytes")
        nonce = bytes(reply[1:_REPLY_HEAD])
        try:
            plain = nacl.bindings.crypto_secretbox_open(
                bytes(reply[_REPLY_HEAD:]), nonce, self._reply_key
            )
        except nacl.exceptions.CryptoError:
            raise _tampered() from None
        status, reason = plain[0], plain[1]
        if status not in (_STATUS_REFUSED, _STATUS_ACCEPTED):
            # Authentic but not understood: a newer server. Refuse rather than guess.
            raise HandshakeError("malformed", f"malformed: unknown reply status {status}")
        return Reply(status == _STATUS_ACCEPTED, bytes(plain[2:]), reason)

    def __repr__(self) -> str:  # never print keys
        return f"ClientHandshake(server_key={self.server_key.hex()[:16]}…)"


def seal_hello(
    identity: Identity, server_key: bytes, payload: bytes, *, wall: float
) -> tuple[bytes, ClientHandshake]:
    """Seal ``payload`` for the server whose Ed25519 public key is ``server_key``, signed by
    ``identity``. ``wall`` is the client's wall clock (``time.time()``). Returns the hello to
    send through a forwarder and the state that opens the reply."""
    if len(server_key) != PUBLIC_KEY_LEN:
        raise ValueError(f"a server key is {PUBLIC_KEY_LEN} bytes, got {len(server_key)}")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"hello payload of {len(payload)} bytes; at most {MAX_PAYLOAD}")
    if wall < 0:
        raise ValueError("wall clock before 1970")
    server_key = bytes(server_key)
    try:
        server_x = nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(server_key)
    except nacl.exceptions.CryptoError:
        raise ValueError("server key is not a valid Ed25519 public key") from None
    e_secret = os.urandom(KEY_LEN)
    e_pub = nacl.bindings.crypto_scalarmult_base(e_secret)
    try:
        s = nacl.bindings.crypto_scalarmult(e_secret, server_x)
    except nacl.exceptions.CryptoError:  # low-order point: not a key anyone holds
        raise ValueError("server key is not a usable Ed25519 public key") from None
    del e_secret
    ts_ms = int(wall * 1000)
    transcript, th = _transcript_hash(e_pub, server_key, identity.public_key, ts_ms, payload)
    sealed = b"".join((identity.public_key, _TS.pack(ts_ms), identity.sign(transcript), payload))
    nonce = os.urandom(NONCE_LEN)
    k_hello = _kdf(s, _PERSON_HELLO, e_pub + server_key)
    box = nacl.bindings.crypto_secretbox(sealed, nonce, k_hello)
    hello = b"".join((bytes((VERSION,)), e_pub, nonce, box))
    return hello, ClientHandshake(server_key, _SessionKeys.derive(s, th))


class _Seen:
    """One accepted hello in the guard: how to recognise its exact retransmission, and the
    reply given to it (so a retransmission gets the same answer)."""

    __slots__ = ("digest", "expires_ms", "reply")

    def __init__(self, digest: bytes, expires_ms: int) -> None:
        self.digest = digest
        self.expires_ms = expires_ms
        self.reply: bytes | None = None


class ReplayGuard:
    """The ephemeral keys of hellos accepted within the time window, bounded.

    An entry lives until its hello's own timestamp leaves the window (``ts + window``), which is
    exactly as long as the time check alone would still let that hello in. When the guard is
    full of live entries it drops the one with the oldest timestamp and raises a floor: from
    then on a new hello not newer than the dropped one is refused ("busy"). Replays therefore
    stay impossible under a flood; the cost is that the effective window shrinks until the flood
    passes. Memory stays within ``max_entries`` entries (see :data:`REPLAY_CACHE_ENTRIES`).
    """

    def __init__(self, window: float = HELLO_WINDOW, max_entries: int = REPLAY_CACHE_ENTRIES):
        if window <= 0 or max_entries < 1:
            raise ValueError("a replay guard needs a positive window and at least one entry")
        self.window = window
        self.max_entries = max_entries
        #: The window in milliseconds, the unit of hello timestamps.
        self.window_ms = int(window * 1000)
        self._seen: dict[bytes, _Seen] = {}
        #: (expires_ms, e_pub), one per entry of _seen: expiry order is timestamp order.
        self._heap: list[tuple[int, bytes]] = []
        #: Hellos with ts <= this (ms) were possibly dropped from a full guard: refused.
        self._floor_ms = -1

    def __len__(self) -> int:
        return len(self._seen)

    def _expire(self, now_ms: int) -> None:
        heap = self._heap
        while heap and heap[0][0] < now_ms:
            _, e_pub = heapq.heappop(heap)
            del self._seen[e_pub]

    def check(self, e_pub: bytes, digest: bytes) -> _Seen | None:
        """Before any crypto: the entry of an exact retransmission, ``None`` for an unknown
        ``e_pub``; raises for another hello reusing a known ``e_pub``."""
        seen = self._seen.get(e_pub)
        if seen is None:
            return None
        if not hmac.compare_digest(seen.digest, digest):
            raise HandshakeError("replayed", "replayed: this ephemeral key was already used")
        return seen

    def add(self, e_pub: bytes, digest: bytes, ts_ms: int, now_ms: int) -> _Seen:
        """Remember a hello that passed every other check."""
        self._expire(now_ms)
        if ts_ms <= self._floor_ms:
            raise HandshakeError(
                "busy",
                "replayed or too old: the replay guard overflowed (a flood of hellos?); "
                "retry with a fresh hello",
            )
        while len(self._seen) >= self.max_entries:
            expires_ms, old = heapq.heappop(self._heap)
            del self._seen[old]
            self._floor_ms = max(self._floor_ms, expires_ms - self.window_ms)
        seen = _Seen(digest, ts_ms + self.window_ms)
        self._seen[e_pub] = seen
        heapq.heappush(self._heap, (seen.expires_ms, e_pub))
        return seen


class ServerHandshake:
    """An authenticated hello, opened by the server.

    ``duplicate`` is true for an exact retransmission of a hello accepted before (through the
    same or another forwarder): the caller must not start a second attempt, and should resend
    ``previous_reply`` if there is one (``None`` while the first copy is still being answered).
    """

    __slots__ = (
        "_keys",
        "_seen",
        "attempt_id",
        "client_key",
        "duplicate",
        "payload",
        "previous_reply",
        "punch_key",
        "timestamp",
    )

    def __init__(
        self,
        client_key: bytes,
        payload: bytes,
        ts_ms: int,
        keys: _SessionKeys,
        seen: _Seen,
        duplicate: bool,
    ) -> None:
        self.client_key = client_key
        self.payload = payload
        #: The client's wall clock when it sealed the hello, in seconds.
        self.timestamp = ts_ms / 1000
        self.attempt_id = keys.attempt_id
        self.punch_key = keys.punch
        self.duplicate = duplicate
        self.previous_reply = seen.reply if duplicate else None
        self._keys = keys
        self._seen = seen

    def seal_reply(self, *, accepted: bool, payload: bytes, reason: int = 0) -> bytes:
        """Seal the answer. The first reply sealed for a hello is kept in the guard and handed
        to its retransmissions as ``previous_reply``."""
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"reply payload of {len(payload)} bytes; at most {MAX_PAYLOAD}")
        if not 0 <= reason <= 255:
            raise ValueError(f"reason code {reason} is outside 0-255")
        status = _STATUS_ACCEPTED if accepted else _STATUS_REFUSED
        nonce = os.urandom(NONCE_LEN)
        box = nacl.bindings.crypto_secretbox(
            bytes((status, reason)) + payload, nonce, self._keys.reply
        )
        reply = b"".join((bytes((VERSION,)), nonce, box))
        if self._seen.reply is None:
            self._seen.reply = reply
        return reply

    def __repr__(self) -> str:  # never print keys
        return f"ServerHandshake(client_key={self.client_key.hex()}, duplicate={self.duplicate})"


def open_hello(
    identity: Identity, hello: bytes, *, wall: float, guard: ReplayGuard
) -> ServerHandshake:
    """Open a hello sent to ``identity``. ``wall`` is the server's wall clock
    (``time.time()``); the time window is ``guard.window``. Raises :class:`HandshakeError`."""
    n = len(hello)
    if n < HELLO_OVERHEAD or n > HELLO_OVERHEAD + MAX_PAYLOAD:
        raise HandshakeError("malformed", f"malformed: hello of {n} bytes")
    if hello[0] != VERSION:
        raise HandshakeError("malformed", f"malformed: unknown hello version {hello[0]}")
    hello = bytes(hello)
    e_pub = hello[1 : 1 + KEY_LEN]
    nonce = hello[1 + KEY_LEN : _HELLO_HEAD]
    digest = hashlib.blake2b(hello, digest_size=_DIGEST_LEN).digest()
    # Cheap first: a second use of a known ephemeral key costs no crypto.
    seen = guard.check(e_pub, digest)
    server_key = identity.public_key
    # libsodium's Ed25519 secret key is seed | public key; conversion hashes the seed.
    server_x_secret = nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(identity.seed + server_key)
    try:
        s = nacl.bindings.crypto_scalarmult(server_x_secret, e_pub)
        plain = nacl.bindings.crypto_secretbox_open(
            hello[_HELLO_HEAD:], nonce, _kdf(s, _PERSON_HELLO, e_pub + server_key)
        )
    except nacl.exceptions.CryptoError:
        raise _tampered() from None
    client_key = plain[:PUBLIC_KEY_LEN]
    (ts_ms,) = _TS.unpack_from(plain, PUBLIC_KEY_LEN)
    signature = plain[PUBLIC_KEY_LEN + _TS.size : _HELLO_SEALED_FIXED]
    payload = plain[_HELLO_SEALED_FIXED:]
    now_ms = int(wall * 1000)
    if abs(now_ms - ts_ms) > guard.window_ms:
        raise HandshakeError(
            "expired",
            f"expired (clock skew > {guard.window:g} s?): hello is "
            f"{(now_ms - ts_ms) / 1000:+.1f} s from this clock",
        )
    transcript, th = _transcript_hash(e_pub, server_key, client_key, ts_ms, payload)
    if seen is None:
        # A retransmission was verified the first time; its bytes are identical.
        if not verify(client_key, transcript, signature):
            raise HandshakeError("bad_signature", "bad signature by the client key")
        seen = guard.add(e_pub, digest, ts_ms, now_ms)
        duplicate = False
    else:
        duplicate = True
    keys = _SessionKeys.derive(s, th)
    return ServerHandshake(client_key, payload, ts_ms, keys, seen, duplicate)
