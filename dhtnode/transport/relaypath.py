"""Relayed paths: a QUIC path through a blind relay, as the members of a session see it.

A :class:`RelayPath` is a ``DatagramPath`` for the QUIC bridge: ``send`` wraps a QUIC datagram
in relay DATA and sends it to the relay on the node's socket (through the engine's send path,
so the NAT mapping toward the relay is the one the introduction used). It binds to its
session at once, and again while unpaired, within bounds; ``paired`` resolves when the relay
says both members are bound. :class:`RelayPaths` routes the relay's BOUND and DATA datagrams
(handed over by the engine's relay service) to the right path, by session id and relay
address, and feeds DATA to the bridge as if it came from the peer's address.

Must not decide when to use the relay; ``connections.py`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable

from dhtnode.connect.relay import RelayOffer
from dhtnode.errors import DecodeError
from dhtnode.transport.udp import NodeEndpoint
from dhtnode.wire import relay as wire
from dhtnode.wire.address import Address

#: Seconds between BINDs while the relay has not paired us (the peer binds at about the same
#: time; the relay tells us when it does).
BIND_INTERVAL = 0.25
#: BINDs sent at most per path while unpaired: a dead relay costs a few datagrams.
MAX_BINDS = 16


class RelayPath:
    def __init__(
        self,
        paths: RelayPaths,
        offer: RelayOffer,
        role: int,
        peer: Address,
    ) -> None:
        self._paths = paths
        self.offer = offer
        self.role = role
        #: The address the bridge is told datagrams come from (the peer as introduced).
        self.peer = peer
        self.paired: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._binds = 0
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False
        #: A connection runs over it (its owner closes it, not the attempt).
        self.in_use = False

    @property
    def relay(self) -> Address:
        return self.offer.relay

    def send(self, data: bytes, addr: Address) -> None:
        if self.closed:
            return
        self._paths.endpoint.send(
            wire.encode_data(wire.RelayType.DATA_TO_RELAY, self.offer.session, data), self.relay
        )
        self._paths.stats["relay_tx"] += 1

    def bind(self) -> None:
        if self.closed or self.paired.done():
            return
        if self._binds >= MAX_BINDS:
            self.paired.set_exception(ConnectionError(
                "the relay did not pair us with the peer"
            ))
            return
        self._binds += 1
        msg = wire.encode_bind(wire.Bind(self.role, self.offer.session, self.offer.token))
        self._paths.endpoint.send(msg, self.relay)
        self._timer = asyncio.get_running_loop().call_later(BIND_INTERVAL, self.bind)

    def on_bound(self, b: wire.Bound) -> None:
        if b.paired and not self.paired.done():
            self.paired.set_result(None)
            if self._timer is not None:
                self._timer.cancel()

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if not self.paired.done():
            self.paired.cancel()
        self._paths.forget(self)


class RelayPaths:
    """Every relayed path of the node, by session id."""

    def __init__(
        self,
        endpoint: NodeEndpoint,
        on_datagram: Callable[[bytes, Address, RelayPath], None],
        stats: Counter[str],
    ) -> None:
        self.endpoint = endpoint
        self._on_datagram = on_datagram
        self.stats = stats
        self._by_session: dict[bytes, RelayPath] = {}

    def __len__(self) -> int:
        return len(self._by_session)

    def open(self, offer: RelayOffer, role: int, peer: Address) -> RelayPath:
        old = self._by_session.get(offer.session)
        if old is not None:
            old.close()
        path = RelayPath(self, offer, role, peer)
        self._by_session[offer.session] = path
        path.bind()
        return path

    def forget(self, path: RelayPath) -> None:
        if self._by_session.get(path.offer.session) is path:
            del self._by_session[path.offer.session]

    def receive(self, data: bytes, source: Address) -> None:
        """BOUND or DATA-from-relay from ``source``; anything else is dropped."""
        try:
            if data[0] == wire.RelayType.BOUND:
                b = wire.decode_bound(data)
                path = self._by_session.get(b.session)
                if path is not None and path.relay == source:
                    path.on_bound(b)
                    return
            elif data[0] == wire.RelayType.DATA_FROM_RELAY:
                session, payload = wire.split_data(data)
                path = self._by_session.get(session)
                if path is not None and path.relay == source:
                    self.stats["relay_rx"] += 1
                    self._on_datagram(payload, path.peer, path)
                    return
        except DecodeError:
            pass
        self.stats["drop_relay_member"] += 1

    def close(self) -> None:
        for path in list(self._by_session.values()):
            with contextlib.suppress(Exception):
                path.close()
