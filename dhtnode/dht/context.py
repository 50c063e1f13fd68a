"""What every part of the engine shares: the clock, randomness, the send path, timers, standing.

:class:`NodeContext` is handed to the core parts (rpc, maintenance, storage, topics,
reachability) and to services plugged in from outside (``dhtnode.connect``). It owns:

* the **one send path** (:meth:`NodeContext.send`): every datagram leaves through it, so the
  sent-to memory (``dht/sent.py``) sees all of them, QUIC and punch datagrams included;
* the **timer queue** (:meth:`NodeContext.call_at`): the node still has one ``next_timer()``;
* two sources of randomness: ``rng`` for jitter and sampling (seeded in the simulator), and
  ``secret_bytes`` for anything an attacker must not predict (transaction ids, nonces, token
  secrets), which comes from the OS in production;
* the **token issuer** (``crypto/tokens.py``): one secret for write tokens and address proofs,
  shared by the RPC layer (answer budgets), storage (writes) and services (introductions);
* the node's **standing** (client or server, reachable, public address), written only by
  ``dht/node.py`` and read by everyone else;
* **our id as a peer must see it** (:meth:`NodeContext.id_for`): a dual-stack node's id is
  bound to one address per family, since a receiver checks it against the source it saw.

Must not decide anything about the protocol; it is plumbing.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dhtnode.crypto.identity import Identity
from dhtnode.crypto.tokens import TokenIssuer
from dhtnode.dht.ids import node_id_for
from dhtnode.dht.routing import RoutingTable
from dhtnode.dht.sent import SentMemory
from dhtnode.dht.timers import Timer, TimerQueue
from dhtnode.nat.observer import AddressObserver
from dhtnode.wire.address import Address

#: Bytes of OS randomness fetched at once: one ``os.urandom`` system call per 1,024
#: transaction ids instead of one each (a reply costs ~13 µs; a syscall ~0.5 µs).
SECRET_BUFFER = 4096


class OsSecrets:
    """Unpredictable bytes from the OS (``os.urandom``), buffered. Secrets must never come
    from ``random.Random``: 624 of its 32-bit outputs on the wire give away its whole state."""

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def __call__(self, n: int) -> bytes:
        if n > SECRET_BUFFER:
            return os.urandom(n)
        if self._pos + n > len(self._buf):
            self._buf = os.urandom(SECRET_BUFFER)
            self._pos = 0
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out


@dataclass(slots=True)
class Standing:
    """Where the node stands; written by ``DhtNode`` only."""

    #: Serving: in others' routing tables, storing records, id bound to ``public``.
    server: bool = False
    #: A stranger's datagram reached us unsolicited (or we were told we are public).
    reachable: bool = False
    #: Our public address (the one the id follows), as others see it.
    public: Address | None = None
    #: A short-lived client (one-shot CLI verbs): never serves, never checks reachability.
    ephemeral: bool = False
    #: A bootstrap node's fixed, trusted public address.
    fixed_public: Address | None = None
    #: Serve as soon as the public address is known, without a probe.
    assume_reachable: bool = False
    #: close() finished: no more refreshes, checks or maintenance.
    closed: bool = False


class NodeContext:
    def __init__(
        self,
        identity: Identity,
        params: Any,
        *,
        now: float,
        wall: Callable[[], float],
        rng: random.Random,
        secret_bytes: Callable[[int], bytes],
        table: RoutingTable,
    ) -> None:
        self.identity = identity
        #: ``dhtnode.dht.node.DhtParams``.
        self.params = params
        self.now = now
        self.wall = wall
        self.rng = rng
        self.secret_bytes = secret_bytes
        #: Tokens bound to a requester's address: write tokens and proofs of address.
        self.tokens = TokenIssuer(secret_bytes, now)
        self.stats: Counter[str] = Counter()
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.out: list[tuple[bytes, Address]] = []
        self.timers = TimerQueue()
        self.sent_to = SentMemory()
        self.observer = AddressObserver()
        #: A node with a fixed public address (a bootstrap node) knows it in one family only;
        #: its address in the other family is learned here, for the id it shows that family.
        self.other_family = AddressObserver()
        #: The last id computed for a public address other than ``standing.public``.
        self._other_id: tuple[Address | None, bytes | None] = (None, None)
        self.standing = Standing()
        #: Rebuilt (new local id) when the node starts or stops serving; read it afresh.
        self.table = table

    @property
    def node_id(self) -> bytes | None:
        """Our id while serving (bound to our public address); None while a client."""
        return self.table.local_id if self.standing.server else None

    def id_for(self, peer: Address) -> bytes | None:
        """The id to put in a message to ``peer``, while serving: ``H(our public address in
        peer's family)``, since the receiver checks the id against the address the datagram
        came from. The table's own id follows the primary (IPv4) address; a dual-stack node
        reached over IPv6 shows the id of its IPv6 address, and none (as a client would) while
        it does not know that address yet: an id of the other family is dropped as bad."""
        local = self.node_id
        public = self.standing.public
        if local is None or public is None:
            return local
        v6 = ":" in peer[0]
        if (":" in public[0]) is v6:
            return local
        for addr in self.observer.public_addresses + self.other_family.public_addresses:
            if (":" in addr[0]) is v6:
                known, nid = self._other_id
                if known != addr:
                    nid = node_id_for(addr)
                    self._other_id = (addr, nid)
                return nid
        return None

    def own_address(self, addr: Address) -> bool:
        """Is ``addr`` one of our public addresses (any family)?"""
        return (addr == self.standing.public or addr in self.observer.public_addresses
                or addr in self.other_family.public_addresses)

    def send(self, data: bytes, addr: Address) -> None:
        """Queue a datagram on the node's socket. Every destination is remembered: once we
        sent to it, whatever NAT is in front of us lets its answers in, so they prove nothing
        about reachability."""
        self.out.append((data, addr))
        self.stats["tx"] += 1
        self.sent_to.note(addr, self.now)

    def call_at(self, deadline: float, callback: Callable[[], None]) -> Timer:
        return self.timers.call_at(deadline, callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self.timers.call_at(self.now + delay, callback)

    def emit(self, name: str, **fields: Any) -> None:
        """A stable event name with fields; the daemon logs it, the simulator drops it."""
        self.events.append((name, fields))

    def secret_u32(self) -> int:
        return int.from_bytes(self.secret_bytes(4), "big")

