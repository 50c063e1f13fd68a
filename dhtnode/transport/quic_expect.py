"""QUIC between nodes: expectations, the gate for incoming connections.

Owns: :class:`Expectation` (permission for one incoming connection from one IP until a
deadline, optionally pinned to one key) and :class:`_BridgeExpectations`, the expectation
half of :class:`~dhtnode.transport.quic.QuicBridge` (``expect`` and the bookkeeping that
finds, prunes and claims expectations). ``_BridgeExpectations`` is a mixin of ``QuicBridge``
only: its methods run with ``self`` a ``QuicBridge`` and use that class's state.

Must not own sockets or log. An expectation admits a handshake only; the peer is trusted once
``PeerConnection`` has pinned its key and claimed the expectation with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from dhtnode.crypto.identity import PUBLIC_KEY_LEN, Identity
from dhtnode.transport.quic_errors import QuicError, QuicExpectationLimit
from dhtnode.wire.address import normalize

if TYPE_CHECKING:
    from dhtnode.transport.quic_conn import PeerConnection

#: Pending expectations, all peers together: each is small, but a flood of hole-punch
#: requests must not grow memory without bound.
MAX_EXPECTATIONS = 1024


class Expectation:
    """Permission for one incoming QUIC connection from ``peer_ip`` until ``deadline``."""

    __slots__ = (
        "_bridge",
        "_done",
        "allowed_key",
        "deadline",
        "identity",
        "on_connection",
        "peer_ip",
    )

    def __init__(
        self,
        bridge: _BridgeExpectations,
        peer_ip: str,
        identity: Identity,
        allowed_key: bytes | None,
        deadline: float,
        on_connection: Callable[[PeerConnection], None],
    ) -> None:
        self._bridge = bridge
        self._done = False
        self.peer_ip = peer_ip
        self.identity = identity
        self.allowed_key = allowed_key
        self.deadline = deadline
        self.on_connection = on_connection

    @property
    def active(self) -> bool:
        """Not yet used, cancelled or expired."""
        return not self._done and time.monotonic() < self.deadline

    def cancel(self) -> None:
        """Withdraw the permission. A handshake already under way is refused at its end."""
        if not self._done:
            self._done = True
            self._bridge._drop_expectation(self)

    def __repr__(self) -> str:
        key = self.allowed_key.hex()[:16] if self.allowed_key else "any"
        return f"Expectation(peer_ip={self.peer_ip}, allowed_key={key}, done={self._done})"



class _BridgeExpectations:
    """The expectation half of :class:`~dhtnode.transport.quic.QuicBridge` (a mixin)."""

    if TYPE_CHECKING:  # QuicBridge's state these methods use
        max_expectations: int
        _expectations: dict[str, list[Expectation]]
        _expectation_count: int
        _closed: bool

    def expect(
        self,
        peer_ip: str,
        *,
        identity: Identity,
        allowed_key: bytes | None,
        deadline: float,
        on_connection: Callable[[PeerConnection], None],
    ) -> Expectation:
        """Allow one incoming connection from ``peer_ip`` until ``deadline`` (monotonic).

        The client must present a certificate; with ``allowed_key`` its key must equal it.
        ``on_connection`` is called once the client is authenticated. The expectation is used
        up by the first connection that authenticates against it.
        """
        try:
            ip = normalize((peer_ip, 0))[0]
        except ValueError:
            raise ValueError(f"expect(): {peer_ip!r} is not an IP address") from None
        if allowed_key is not None and len(allowed_key) != PUBLIC_KEY_LEN:
            raise ValueError(
                f"expect(): allowed_key must be a {PUBLIC_KEY_LEN}-byte Ed25519 public key, "
                f"got {len(allowed_key)} bytes"
            )
        if self._closed:
            raise QuicError("the QUIC bridge is closed")
        if self._expectation_count >= self.max_expectations:
            self._prune_expectations()
            if self._expectation_count >= self.max_expectations:
                raise QuicExpectationLimit(
                    f"{self._expectation_count} QUIC connections are already expected (limit "
                    f"{self.max_expectations}); cancel unused ones or wait for them to expire"
                )
        expectation = Expectation(self, ip, identity, allowed_key, deadline, on_connection)
        self._expectations.setdefault(ip, []).append(expectation)
        self._expectation_count += 1
        return expectation


    # ----------------------------------------------------------------- private

    def _live_expectations(self, ip: str) -> list[Expectation]:
        pending = self._expectations.get(ip)
        if not pending:
            return []
        now = time.monotonic()
        live = [e for e in pending if not e._done and now < e.deadline]
        if len(live) != len(pending):
            self._expectation_count -= len(pending) - len(live)
            for e in pending:
                if e not in live:
                    e._done = True
            if live:
                self._expectations[ip] = live
            else:
                del self._expectations[ip]
        return live

    def _prune_expectations(self) -> None:
        for ip in list(self._expectations):
            self._live_expectations(ip)

    def _drop_expectation(self, expectation: Expectation) -> None:
        pending = self._expectations.get(expectation.peer_ip)
        if pending and expectation in pending:
            pending.remove(expectation)
            self._expectation_count -= 1
            if not pending:
                del self._expectations[expectation.peer_ip]

    def _claim_expectation(self, candidates: list[Expectation], key: bytes) -> Expectation | None:
        """Use up the best expectation ``key`` satisfies: a pinned one before an open one.
        Expiry after the Initial arrived does not matter; the handshake was allowed then."""
        usable = [e for e in candidates if not e._done]
        chosen = next((e for e in usable if e.allowed_key == key), None)
        if chosen is None:
            chosen = next((e for e in usable if e.allowed_key is None), None)
        if chosen is not None:
            chosen._done = True
            self._drop_expectation(chosen)
        return chosen
