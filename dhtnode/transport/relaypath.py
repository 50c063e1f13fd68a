"""Relayed paths: a QUIC path through a blind relay, as the members of a session see it.

A :class:`RelayPath` is a ``DatagramPath`` for the QUIC bridge: ``send`` wraps a QUIC datagram
in relay DATA and sends it to the relay on the node's socket (through the engine's send path,
so the NAT mapping toward the relay is the one the introduction used). It binds to its
session at once, and again while unpaired, within bounds; ``paired`` resolves when the relay
says both members are bound. :class:`RelayPaths` routes the relay's BOUND and DATA datagrams
(handed over by the engine's relay service) to the right path, by session id and relay
address, and feeds DATA to the bridge as if it came from the peer's address.

Liveness: once a connection runs over a path (:meth:`RelayPath.watch`), every datagram from the
relay (DATA or BOUND) proves the relay alive; after :data:`HEARTBEAT_INTERVAL` of silence the
path sends a BIND again (the relay answers every valid BIND with BOUND, so this works on an
idle connection and whether or not the peer is still there), and after
:data:`RELAY_DEAD_AFTER` of silence it reports the relay dead, once. This signal is the
relay's, not QUIC's: a silent peer behind a live relay still gets BOUNDs, so a dead peer is not
mistaken for a dead relay (QUIC's idle timeout handles that), and it needs no aioquic
internals.

Must not decide when to use the relay, or what to do when it dies; ``connections.py`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
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
#: Seconds of silence from the relay after which a path in use sends a BIND as a heartbeat
#: (one 27-byte datagram per second at most, only while nothing else arrives).
HEARTBEAT_INTERVAL = 1.0
#: Seconds of silence from the relay (no DATA, no BOUND answering the heartbeats) after which
#: the relay counts as gone: three unanswered heartbeats, so one or two lost datagrams are no
#: false alarm, and a relayed transfer stalls for a few seconds only.
RELAY_DEAD_AFTER = 3.5


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
        #: The peer's key, as the introduction that offered this path authenticated it (the
        #: listener side of a later introduction may move an existing connection here).
        self.peer_key = b""
        #: When the relay was last heard from (any BOUND or DATA), ``time.monotonic()``.
        self.last_heard = time.monotonic()
        self._on_dead: Callable[[RelayPath], None] | None = None
        self._heartbeat: asyncio.TimerHandle | None = None

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
        self._send_bind()
        self._timer = asyncio.get_running_loop().call_later(BIND_INTERVAL, self.bind)

    def _send_bind(self) -> None:
        msg = wire.encode_bind(wire.Bind(self.role, self.offer.session, self.offer.token))
        self._paths.endpoint.send(msg, self.relay)

    @property
    def alive(self) -> bool:
        """Heard from the relay within :data:`RELAY_DEAD_AFTER`."""
        return not self.closed and time.monotonic() - self.last_heard < RELAY_DEAD_AFTER

    def watch(self, on_dead: Callable[[RelayPath], None]) -> None:
        """Check the relay's liveness from now on (see the module docstring): ``on_dead`` is
        called once when it has been silent for :data:`RELAY_DEAD_AFTER`. Stops on close."""
        self._on_dead = on_dead
        self.last_heard = max(self.last_heard, time.monotonic())
        if self._heartbeat is None:
            self._heartbeat = asyncio.get_running_loop().call_later(
                HEARTBEAT_INTERVAL, self._beat
            )

    def _beat(self) -> None:
        self._heartbeat = None
        if self.closed or self._on_dead is None:
            return
        silent = time.monotonic() - self.last_heard
        if silent >= RELAY_DEAD_AFTER:
            on_dead, self._on_dead = self._on_dead, None
            self._paths.stats["relay_lost"] += 1
            on_dead(self)
            return
        if silent >= HEARTBEAT_INTERVAL:
            self._send_bind()
            self._paths.stats["relay_heartbeat"] += 1
        self._heartbeat = asyncio.get_running_loop().call_later(HEARTBEAT_INTERVAL, self._beat)

    def on_bound(self, b: wire.Bound) -> None:
        self.last_heard = time.monotonic()
        if b.paired and not self.paired.done():
            self.paired.set_result(None)
            if self._timer is not None:
                self._timer.cancel()

    def close(self) -> None:
        self.closed = True
        self._on_dead = None
        if self._timer is not None:
            self._timer.cancel()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
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
                    path.last_heard = time.monotonic()
                    self._on_datagram(payload, path.peer, path)
                    return
        except DecodeError:
            pass
        self.stats["drop_relay_member"] += 1

    def close(self) -> None:
        for path in list(self._by_session.values()):
            with contextlib.suppress(Exception):
                path.close()
