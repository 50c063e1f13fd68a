"""Connecting by public key, in asyncio: introductions -> punching -> QUIC, on the node socket.

:class:`Connections` is the user-facing API of one node: ``await conns.listen(identity,
on_connection)`` and ``await conns.connect(public_key)``. It carries out what the sans-I/O
pieces decide: the introduction (``connect/connector.py``, ``connect/listen.py``), the punch
plan (``nat/punch.py``: which probe leaves which socket, when), the extra sockets a birthday
search needs (``transport/sockets.py``, one bounded pool), and the QUIC connection
(``transport/quic.py``) on the path that punched: the node's own socket (so the NAT mapping
the DHT learned is the one used), or the winning extra socket for a port-randomizing side.

When the introducer offered a relay (``transport/relaypath.py``), both sides bind to it at
once; the client starts QUIC on whichever path is ready first (the punch gets a short grace),
and a relayed connection moves to the direct path when the punch succeeds later, without the
application noticing (the QUIC bridge's path layer). Random NATs on both sides stay relayed.

Every punch datagram on the node socket goes out through the engine's one send path
(``NodeContext.send``), so the sent-to memory sees it. Bounded: attempts per peer IP and in
all, sockets through the pool; no global throttle, so connects one after another and several
at once to one server all proceed.

Must not decide strategy, timing or crypto: those live in the pure modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from dhtnode.connect.connector import Introduced, introduce
from dhtnode.connect.listen import Introduction, Listening
from dhtnode.connect.peerinfo import PeerInfo
from dhtnode.connect.services import ConnectServices
from dhtnode.crypto.identity import Identity
from dhtnode.dht.node import Receiver, Service
from dhtnode.dht.op import OperationError
from dhtnode.nat.observer import NatClass
from dhtnode.nat.punch import PUNCH_DEADLINE, Punched, PunchFailed, PunchPlan
from dhtnode.nat.strategy import MIN_STEP_SAMPLES, NatProfile
from dhtnode.transport.quic import PeerConnection, QuicBridge
from dhtnode.transport.relaypath import RelayPath, RelayPaths
from dhtnode.transport.resample import stun_ports
from dhtnode.transport.sockets import KeptSocket, Lease, SocketPool
from dhtnode.transport.udp import NodeEndpoint
from dhtnode.wire import punch as wire_punch
from dhtnode.wire import relay as wire_relay
from dhtnode.wire.address import Address, format_addr
from dhtnode.wire.demux import Kind, classify

#: Punch attempts at once with one peer IP (a client retrying, several processes behind one
#: NAT); more are refused, not queued: each attempt may probe up to 2,048 times.
MAX_ATTEMPTS_PER_IP = 8
#: Punch attempts at once in all (lingering finished ones included: they still route).
MAX_ATTEMPTS = 256
#: Seconds an attempt stays routable after its result, for the trailing ACKs both sides send.
ATTEMPT_LINGER = 2.0
#: Seconds the listener waits for the client's QUIC handshake after an introduction.
EXPECT_WINDOW = PUNCH_DEADLINE + 10.0
#: Seconds the client gives QUIC to finish its handshake on the punched path.
QUIC_HANDSHAKE_TIMEOUT = 5.0
#: Seconds a punch that may still succeed quickly (direct, simultaneous, predict: one or two
#: round trips on a LAN or a home connection) gets before a paired relay is used instead:
#: starting on the relay and moving at once would only churn.
RELAY_GRACE = 0.3
#: Punch plans that may send more than this many probes search a peer's ports (birthday,
#: prediction). Those toward one IP are budgeted: an introducer that lies about a client's
#: address could otherwise aim thousands of probes at a victim. Above the budget the attempt
#: does not punch, and the connection goes over the relay.
SEARCH_SENDS = 100
#: Port searches toward one IP per :data:`SEARCH_WINDOW` (2,048 probes of 31 bytes each: at
#: most ~4 KB/s at a victim, while a client retrying a few times still gets direct paths).
SEARCHES_PER_IP = 4
SEARCH_WINDOW = 60.0
#: Seconds a relayed path keeps receiving after the connection moved to the direct path
#: (the peer moves when its own punch reports, a moment later).
RELAY_DRAIN = 3.0
#: Behind a sequential NAT every new flow takes the next port, so the samples the DHT gave us
#: go stale with each punch attempt (its probes and extra sockets are new flows). A fresh
#: socket then asks this many known nodes (STUN Binding: one new flow each) for our mapping,
#: so the next introduction carries the NAT's current position.
RESAMPLE_SERVERS = MIN_STEP_SAMPLES
#: Seconds to wait for those answers; one retransmission halfway.
RESAMPLE_TIMEOUT = 0.5


class PunchError(OperationError):
    """Hole punching found no path; the message names the cause."""

    code = "punch_failed"


@dataclass(slots=True, eq=False)
class Connection:
    """An authenticated, end-to-end encrypted QUIC connection to a peer, by its key."""

    quic: PeerConnection
    #: "direct", or "relayed" (until the punch succeeds and the connection moves).
    path: str
    strategy: str
    #: Milliseconds from connect() to an authenticated connection (client side; 0 on server).
    connect_ms: float
    #: The socket slot that punched: 0 the node's socket, else an extra socket.
    slot: int = 0
    #: Set once the path is final: direct from the start, moved to direct, or relayed for
    #: good (the punch failed).
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    #: The path the connection started on.
    first_path: str = ""

    def __post_init__(self) -> None:
        self.first_path = self.first_path or self.path
        if self.path == "direct":
            self.settled.set()

    @property
    def peer_key(self) -> bytes:
        return self.quic.peer_key

    @property
    def rtt(self) -> float:
        return self.quic.rtt

    @property
    def remote_address(self) -> Address:
        return self.quic.addr

    async def open_stream(self) -> tuple[asyncio.StreamReader, Any]:
        return await self.quic.open_stream()

    async def accept_stream(self) -> tuple[asyncio.StreamReader, Any]:
        return await self.quic.accept_stream()

    async def close(self, *, wait: bool = True) -> None:
        """Close; ``wait=False`` returns at once (see :meth:`PeerConnection.close`)."""
        await self.quic.close(wait=wait)

    async def wait_closed(self) -> None:
        await self.quic.wait_closed()


@dataclass(slots=True)
class Server:
    """What ``listen()`` returns: the key served, and how to stop."""

    public_key: bytes
    listening: Listening
    _conns: Connections

    async def close(self) -> None:
        await self._conns.unlisten(self)


class _NodePath:
    """The node's own socket as a QUIC path: sends go through the engine's send path."""

    def __init__(self, endpoint: NodeEndpoint) -> None:
        self._endpoint = endpoint

    def send(self, data: bytes, addr: Address) -> None:
        self._endpoint.send(data, addr)


class _KeptPath:
    def __init__(self, kept: KeptSocket) -> None:
        self.kept = kept

    def send(self, data: bytes, addr: Address) -> None:
        self.kept.send(data, addr)


@dataclass(eq=False)
class _Attempt:
    plan: PunchPlan
    peer_ip: str
    result: asyncio.Future[Punched | PunchFailed]
    lease: Lease | None = None
    kept: dict[int, _KeptPath] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None
    timer_at: float | None = None
    ended: bool = False
    #: Still counted against its peer IP's limit (until it has a result).
    counted: bool = True
    #: The relayed path of this attempt, until a connection takes it over (or it is closed).
    relay: RelayPath | None = None


def _profile(info: PeerInfo) -> NatProfile:
    return NatProfile(NatClass(info.nat_class), info.open, info.port_samples[-16:])


class Connections(Service):
    def __init__(
        self,
        endpoint: NodeEndpoint,
        services: ConnectServices,
        *,
        pool: SocketPool | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.node = endpoint.node
        self.services = services
        self._on_event = on_event
        self.bridge = QuicBridge(self.node.stats, on_event=on_event)
        self.pool = pool or SocketPool(bind_host="::" if endpoint.is_v6 else "0.0.0.0")
        self._node_path = _NodePath(endpoint)
        self._attempts: dict[bytes, _Attempt] = {}
        self._per_ip: Counter[str] = Counter()
        self._rng = random.Random()
        self._servers: dict[bytes, Callable[[Connection], None]] = {}
        self.stats: Counter[str] = self.node.stats
        self._tasks: set[asyncio.Task[None]] = set()
        #: Punch attempts since our last fresh port samples (see :data:`RESAMPLE_SERVERS`).
        self._samples_stale = False
        self._resampling: asyncio.Task[None] | None = None
        self.relays = RelayPaths(endpoint, self._on_relayed, self.stats)
        #: Recent port searches by peer IP (see :data:`SEARCHES_PER_IP`).
        self._searches: dict[str, list[float]] = {}
        services.relay.member_sink = self.relays.receive
        self.node.register(self)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ engine seam

    def receivers(self) -> Mapping[Kind, Receiver]:
        return {Kind.PUNCH: self._on_node_punch, Kind.QUIC: self._on_node_quic}

    def status(self) -> dict[str, Any]:
        return {
            "connections": [
                {
                    "public_key": c.peer_key.hex(),
                    "address": format_addr(c.addr),
                    "rtt_ms": round(c.rtt * 1000, 2),
                    "client": c.is_client,
                    "path": "relayed" if isinstance(c.path, RelayPath) else "direct",
                }
                for c in self.bridge.connections
                if c.peer_key
            ],
            "punch_attempts": len(self._attempts),
            "relayed_paths": len(self.relays),
            "extra_sockets": self.pool.open_sockets,
        }

    def _emit(self, name: str, **fields: Any) -> None:
        if self._on_event is not None:
            self._on_event(name, fields)

    def _on_node_quic(self, data: bytes, source: Address) -> None:
        self.bridge.datagram_received(data, source, self._node_path)

    def _on_relayed(self, data: bytes, peer: Address, path: RelayPath) -> None:
        if classify(data) is Kind.QUIC:
            self.bridge.datagram_received(data, peer, path)
        else:
            self.stats["drop_relay_payload"] += 1

    def _on_node_punch(self, data: bytes, source: Address) -> None:
        self._punch_datagram(0, data, source)

    def _punch_datagram(self, slot: int, data: bytes, source: Address) -> None:
        try:
            aid = wire_punch.attempt_id_of(data)
        except wire_punch.PunchDecodeError:
            self.stats["drop_punch_malformed"] += 1
            return
        att = self._attempts.get(aid)
        if att is None:
            self.stats["drop_punch_unknown"] += 1
            return
        att.plan.datagram_received(slot, data, source, time.monotonic())
        self._pump(att)

    # ------------------------------------------------------------------ the API

    def my_info(self) -> PeerInfo:
        return self.services.listeners.my_info()

    async def listen(
        self,
        identity: Identity,
        on_connection: Callable[[Connection], None],
        *,
        allow: Callable[[bytes], bool] | None = None,
    ) -> Server:
        """Serve ``identity``'s key: announce it, answer introductions, accept connections.
        Returns once the record is stored (raises if no DHT node took it)."""
        self._refresh_lan_addresses()
        listeners = self.services.listeners
        holder: list[Listening] = []

        def start(_: Any) -> Any:
            lst, op = listeners.listen(identity, self._on_intro, allow=allow)
            holder.append(lst)
            return op

        self._servers[identity.public_key] = on_connection
        try:
            await self.endpoint.run(start)
        except BaseException:
            self._servers.pop(identity.public_key, None)
            if holder:
                listeners.unlisten(holder[0])
            raise
        if _profile(self.my_info()).random:
            # After the announcement's flows: the first client then gets our NAT's position.
            with contextlib.suppress(Exception):
                await self._start_resample()
        return Server(identity.public_key, holder[0], self)

    async def unlisten(self, server: Server) -> None:
        self._servers.pop(server.public_key, None)
        with contextlib.suppress(OperationError):
            await asyncio.wait_for(
                self.endpoint.run(lambda n: self.services.listeners.unlisten(server.listening)),
                3.0,
            )

    async def connect(
        self, public_key: bytes, *, identity: Identity | None = None
    ) -> Connection:
        """Connect to the listener of ``public_key``: introduction through the DHT, hole
        punching chosen from both NAT classes, then QUIC with both keys pinned."""
        ident = identity or self.node.identity
        started = time.monotonic()
        self._refresh_lan_addresses()
        info = self.my_info()
        if self._needs_resample(info):
            # Behind a port-randomizing NAT whose samples are stale (our own attempts moved a
            # sequential NAT on) or show no sequence (the DHT keeps a few witnesses, not every
            # flow): tell the peer where the NAT is now (one round trip to known nodes).
            with contextlib.suppress(Exception):
                await self._start_resample()
            info = self.my_info()
        intro: Introduced = await self.endpoint.run(
            lambda n: introduce(n, ident, public_key, info)
        )
        peer = [intro.server_address]
        if self._same_public_ip(intro.server_address[0]):
            # Behind one NAT (no hairpin on most routers): the LAN address first.
            peer = [a for a in intro.server_info.lan_addresses if a != peer[0]][:2] + peer
        att = self._start_attempt(
            initiator=True,
            ours=info,
            theirs=intro.server_info,
            peer=tuple(peer),
            attempt_id=intro.handshake.attempt_id,
            punch_key=intro.handshake.punch_key,
        )
        if att is None:
            raise PunchError("too many punch attempts with this peer at once; try again")
        if intro.relay is not None:
            att.relay = self.relays.open(intro.relay, wire_relay.ROLE_CLIENT, peer[-1])
        strategy = att.plan.strategy.value
        first = await self._first_path(att)
        if isinstance(first, RelayPath):
            first.in_use = True
            att.relay = None
            try:
                quic = await self.bridge.connect(
                    first, first.peer, identity=ident, server_key=public_key,
                    timeout=QUIC_HANDSHAKE_TIMEOUT,
                )
            except BaseException:
                first.close()
                raise
            conn = Connection(quic, "relayed", strategy, (time.monotonic() - started) * 1000)
            self._relay_until_direct(conn, att, first)
        else:
            path = self._path_for(att, first.slot)
            try:
                quic = await self.bridge.connect(
                    path, first.addr, identity=ident, server_key=public_key,
                    timeout=QUIC_HANDSHAKE_TIMEOUT,
                )
            except BaseException:
                self._release_slot(att, first.slot)
                raise
            self._close_with(quic, att, first.slot)
            conn = Connection(quic, "direct", strategy, (time.monotonic() - started) * 1000,
                              first.slot)
        self._emit("connected", public_key=public_key.hex(), address=format_addr(quic.addr),
                   strategy=strategy, path=conn.path, connect_ms=round(conn.connect_ms, 1))
        return conn

    async def _first_path(self, att: _Attempt) -> Punched | RelayPath:
        """The punched path, or the relay when it is paired first (after a short grace for a
        punch that is usually quick); raises when neither works."""
        relay = att.relay
        waiting: set[asyncio.Future[Any]] = {att.result}
        if relay is not None:
            waiting.add(relay.paired)
        slow = att.plan.strategy.value in ("birthday", "impossible")
        grace_until = time.monotonic() + (0.0 if slow else RELAY_GRACE)
        relay_ready = False
        failure = ""
        while waiting or relay_ready:
            timeout = max(0.0, grace_until - time.monotonic()) if relay_ready else None
            done, waiting = await asyncio.wait(
                waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if att.result in done:
                result = att.result.result()
                if isinstance(result, Punched):
                    return result
                failure = result.reason
                grace_until = 0.0  # no punch will come: take the relay as soon as it is ready
            if relay is not None and relay.paired in done:
                if relay.paired.cancelled() or relay.paired.exception() is not None:
                    relay = None
                else:
                    relay_ready = True
            if relay_ready and relay is not None and (
                time.monotonic() >= grace_until or att.result.done()
            ):
                return relay
        offered = att.relay is not None
        if att.relay is not None:
            att.relay.close()
            att.relay = None
        why = failure or "hole punching found no path"
        why += "; the relay did not pair us" if offered else "; no relay was offered"
        raise PunchError(f"no path to the peer: {why}")

    def _relay_until_direct(self, conn: Connection, att: _Attempt, relay: RelayPath) -> None:
        """Keep a relayed connection on the relay until the punch succeeds, then move it to
        the direct path (QUIC does not notice: the path layer is under it); close the relayed
        path when the connection ends, or a little after the move."""

        async def watch() -> None:
            try:
                result = await att.result
                if not isinstance(result, Punched):
                    conn.settled.set()  # relayed for good
                if isinstance(result, Punched) and not conn.quic.closed:
                    conn.quic.set_path(self._path_for(att, result.slot), result.addr)
                    self._close_with(conn.quic, att, result.slot)
                    conn.path, conn.slot = "direct", result.slot
                    conn.settled.set()
                    self.stats["path_upgraded"] += 1
                    self._emit("path_upgraded", public_key=conn.peer_key.hex(),
                               address=format_addr(result.addr))
                    await asyncio.sleep(RELAY_DRAIN)
                else:
                    await conn.quic.wait_closed()
            except Exception:
                pass
            finally:
                conn.settled.set()
                relay.close()

        self._spawn(watch())

    async def close(self) -> None:
        for att in list(self._attempts.values()):
            att.plan.cancel()
            self._end(att)
        self.bridge.close()
        self.relays.close()
        if self._resampling is not None:
            self._resampling.cancel()
        for task in list(self._tasks):
            task.cancel()
        self.pool.close()

    # ------------------------------------------------------------------ listener side

    def _on_intro(self, intro: Introduction) -> None:
        """An accepted introduction (called inside the engine): expect the client's QUIC
        handshake and punch toward it."""
        client = intro.client_address
        peer = [client]
        if self._same_public_ip(client[0]):
            peer = [a for a in intro.client_info.lan_addresses if a != client][:2] + peer
        ident = intro.listener.identity
        on_connection = self._servers.get(ident.public_key)
        if on_connection is None:
            return
        att = self._start_attempt(
            initiator=False,
            ours=self.my_info(),
            theirs=intro.client_info,
            peer=tuple(peer),
            attempt_id=intro.handshake.attempt_id,
            punch_key=intro.handshake.punch_key,
        )
        if att is None:
            self.stats["drop_intro_attempt_limit"] += 1
            return
        if intro.relay is not None:
            relay = att.relay = self.relays.open(intro.relay, wire_relay.ROLE_SERVER, client)
            # Unused by then: the client connected directly, or never came.
            asyncio.get_running_loop().call_later(
                EXPECT_WINDOW, lambda: None if relay.in_use else relay.close()
            )
        strategy = att.plan.strategy.value
        deadline = time.monotonic() + EXPECT_WINDOW

        def accepted(quic: PeerConnection) -> None:
            path = "relayed" if isinstance(quic.path, RelayPath) else "direct"
            self._emit("accepted", public_key=quic.peer_key.hex(), address=format_addr(quic.addr),
                       strategy=strategy, path=path)
            if att.lease is not None and path == "direct":
                att.lease.close()  # the other extra sockets have served their purpose
            if isinstance(quic.path, RelayPath):
                quic.path.in_use = True
                att.relay = None
                conn = Connection(quic, "relayed", strategy, 0.0)
                self._relay_until_direct(conn, att, quic.path)
            else:
                # The socket the client's QUIC came in on (not necessarily where our punch won).
                slot = next((n for n, p in att.kept.items() if p is quic.path), 0)
                self._close_with(quic, att, slot)
                conn = Connection(quic, "direct", strategy, 0.0, slot)
            on_connection(conn)

        for ip in dict.fromkeys(a[0] for a in peer):
            self.bridge.expect(
                ip, identity=ident, allowed_key=intro.handshake.client_key, deadline=deadline,
                on_connection=accepted,
            )

    # ------------------------------------------------------------------ punching

    def _start_attempt(
        self,
        *,
        initiator: bool,
        ours: PeerInfo,
        theirs: PeerInfo,
        peer: tuple[Address, ...],
        attempt_id: bytes,
        punch_key: bytes,
    ) -> _Attempt | None:
        ip = peer[-1][0]
        if (
            self._per_ip[ip] >= MAX_ATTEMPTS_PER_IP
            or len(self._attempts) >= MAX_ATTEMPTS
            or attempt_id in self._attempts
        ):
            return None
        plan = PunchPlan(
            initiator=initiator,
            ours=_profile(ours),
            theirs=_profile(theirs),
            peer=peer,
            attempt_id=attempt_id,
            punch_key=punch_key,
            now=time.monotonic(),
            rng=self._rng,
        )
        if plan.send_cap > SEARCH_SENDS and not self._search_allowed(ip):
            plan.cancel()
            plan.result = PunchFailed(
                f"too many port searches toward {ip} in the last {SEARCH_WINDOW:g} s"
            )
            self.stats["punch_search_throttled"] += 1
        loop = asyncio.get_running_loop()
        att = _Attempt(plan, ip, loop.create_future())
        self._attempts[attempt_id] = att
        self._per_ip[ip] += 1
        self.stats["punch_attempts"] += 1
        self._samples_stale = True
        wanted = plan.sockets_wanted()
        if wanted:
            self._spawn(self._open_sockets(att, wanted))
        self._pump(att)
        return att

    def _search_allowed(self, ip: str) -> bool:
        now = time.monotonic()
        recent = [t for t in self._searches.get(ip, ()) if now - t < SEARCH_WINDOW]
        if len(recent) >= SEARCHES_PER_IP:
            self._searches[ip] = recent
            return False
        recent.append(now)
        self._searches[ip] = recent
        if len(self._searches) > MAX_ATTEMPTS * 4:  # bounded: forget the quietest IPs
            for old in [k for k, v in self._searches.items() if now - v[-1] >= SEARCH_WINDOW]:
                del self._searches[old]
        return True

    async def _open_sockets(self, att: _Attempt, n: int) -> None:
        def on_datagram(slot: int, data: bytes, source: Address) -> None:
            self._slot_datagram(att, slot, data, source)

        try:
            lease = await self.pool.acquire(n, on_datagram, min_n=1)
        except Exception:
            att.plan.sockets_opened(0, time.monotonic())
            self._pump(att)
            return
        if att.ended or att.plan.result is not None:
            lease.close()  # finished meanwhile: nothing more to spray
            return
        att.lease = lease
        att.plan.sockets_opened(len(lease.slots), time.monotonic())
        self._pump(att)

    def _slot_datagram(self, att: _Attempt, slot: int, data: bytes, source: Address) -> None:
        kind = classify(data)
        if kind is Kind.PUNCH:
            att.plan.datagram_received(slot, data, source, time.monotonic())
            self._pump(att)
        elif kind is Kind.QUIC:
            self.bridge.datagram_received(data, source, self._path_for(att, slot))
        else:
            self.stats["drop_extra_socket"] += 1

    def _path_for(self, att: _Attempt, slot: int) -> _NodePath | _KeptPath:
        if slot == 0:
            return self._node_path
        path = att.kept.get(slot)
        if path is None:
            assert att.lease is not None
            kept = att.lease.keep(slot)
            path = att.kept[slot] = _KeptPath(kept)

            def on_kept(data: bytes, source: Address, path: _KeptPath = path) -> None:
                kind = classify(data)
                if kind is Kind.QUIC:
                    self.bridge.datagram_received(data, source, path)
                elif kind is Kind.PUNCH:
                    self._punch_datagram(slot, data, source)

            kept.on_datagram = on_kept
        return path

    def _release_slot(self, att: _Attempt, slot: int) -> None:
        path = att.kept.pop(slot, None)
        if path is not None:
            path.kept.close()

    def _close_with(self, quic: PeerConnection, att: _Attempt, slot: int) -> None:
        """Close the winning extra socket when the connection it carries ends."""
        path = att.kept.pop(slot, None)
        if path is None:
            return

        async def closer() -> None:
            with contextlib.suppress(Exception):
                await quic.wait_closed()
            path.kept.close()

        self._spawn(closer())

    def _pump(self, att: _Attempt) -> None:
        plan = att.plan
        for s in plan.sends():
            if s.slot == 0:
                self.endpoint.send(s.data, s.addr)
            elif s.slot in att.kept:
                # The winning extra socket left the lease: its trailing probes and ACKs.
                att.kept[s.slot].send(s.data, s.addr)
            elif att.lease is not None:
                att.lease.send(s.slot, s.data, s.addr)
        if plan.result is not None and not att.result.done():
            att.result.set_result(plan.result)
            self._uncount(att)
            if isinstance(plan.result, Punched) and plan.result.slot:
                self._path_for(att, plan.result.slot)  # keep it before the lease closes
            if plan.initiator and att.lease is not None:
                # Our QUIC goes over the winning path only: give the other extra sockets back
                # now, not after the linger (back-to-back attempts would exhaust the pool). The
                # listener keeps its own until the client's QUIC arrives: the two sides may
                # have won on different sockets, and the client's choice is the one used.
                att.lease.close()
            self.stats["punch_ok" if isinstance(plan.result, Punched) else "punch_failed"] += 1
            if _profile(self.my_info()).random:
                # The next introduction (ours or a client's) should carry fresh samples.
                self._start_resample()
        deadline = plan.next_timer()
        if deadline is None and plan.result is not None:
            # Done: linger so the peer's trailing probes still get answered, then forget.
            deadline = time.monotonic() + ATTEMPT_LINGER
            if att.timer_at is not None and att.timer_at <= deadline:
                return
            self._arm(att, deadline, lambda: self._end(att))
            return
        if deadline is not None and att.timer_at != deadline:
            self._arm(att, deadline, lambda: self._on_timer(att))

    def _arm(self, att: _Attempt, deadline: float, fn: Callable[[], None]) -> None:
        if att.timer is not None:
            att.timer.cancel()
        att.timer_at = deadline
        att.timer = asyncio.get_running_loop().call_later(
            max(0.0, deadline - time.monotonic()), fn
        )

    def _on_timer(self, att: _Attempt) -> None:
        att.timer = None
        att.timer_at = None
        if att.ended:
            return
        att.plan.handle_timer(time.monotonic())
        self._pump(att)

    def _uncount(self, att: _Attempt) -> None:
        """A finished attempt lingers (trailing probes) but no longer counts as running."""
        if att.counted:
            att.counted = False
            self._per_ip[att.peer_ip] -= 1
            if self._per_ip[att.peer_ip] <= 0:
                del self._per_ip[att.peer_ip]

    def _end(self, att: _Attempt) -> None:
        if att.ended:
            return
        att.ended = True
        if att.timer is not None:
            att.timer.cancel()
        if not att.result.done():
            att.result.set_result(PunchFailed("cancelled"))
        self._attempts.pop(att.plan.attempt_id, None)
        self._uncount(att)
        if att.lease is not None:
            att.lease.close()
        for path in att.kept.values():
            path.kept.close()
        att.kept.clear()
        if att.relay is not None and att.plan.initiator:
            att.relay.close()  # never used: the connection went direct
            att.relay = None

    # ------------------------------------------------------------------ port samples

    def _needs_resample(self, info: PeerInfo) -> bool:
        prof = _profile(info)
        if not prof.random:
            return False
        running = self._resampling is not None and not self._resampling.done()
        return running or self._samples_stale or not prof.predictable

    def _start_resample(self) -> asyncio.Task[None]:
        """Take fresh mapped-port samples from a new socket (see :data:`RESAMPLE_SERVERS`),
        unless that is under way already; one run at a time."""
        if self._resampling is None or self._resampling.done():
            self._resampling = asyncio.get_running_loop().create_task(self._resample())
        return self._resampling

    async def _resample(self) -> None:
        # Stale from here on only if another attempt starts while we sample.
        self._samples_stale = False
        ports = await self._stun_ports()
        if len(ports) >= MIN_STEP_SAMPLES:
            self.services.listeners.set_fresh_samples(tuple(ports))
            self.stats["resample_ok"] += 1
        else:
            self.stats["resample_failed"] += 1

    async def _stun_ports(self) -> list[int]:
        """Our mapped ports as up to :data:`RESAMPLE_SERVERS` known nodes see a fresh socket."""
        known = [c.addr for c in self.node.table] + list(self.node.queries.seeds)
        # The samples' family: IPv4 whenever we know IPv4 nodes (the observer's primary).
        v4 = [a for a in known if ":" not in a[0]]
        servers = list(dict.fromkeys(v4 or known))[:RESAMPLE_SERVERS]
        return await stun_ports(self.pool, servers, RESAMPLE_TIMEOUT)

    # ------------------------------------------------------------------ addresses

    def _same_public_ip(self, ip: str) -> bool:
        return any(a[0] == ip for a in self.node.observer.public_addresses)

    def _refresh_lan_addresses(self) -> None:
        """Our LAN address and port, learnt by asking the kernel which source address it
        would use toward a known node (no datagram is sent)."""
        port = self.endpoint.local_address[1]
        peers = list(self.node.queries.seeds) + [c.addr for c in self.node.table][:4]
        out: list[Address] = []
        for peer in peers[:4]:
            fam = socket.AF_INET6 if ":" in peer[0] else socket.AF_INET
            with contextlib.suppress(OSError), socket.socket(fam, socket.SOCK_DGRAM) as s:
                s.connect(peer)
                ip = s.getsockname()[0]
                if (ip, port) not in out:
                    out.append((ip, port))
        self.services.listeners.lan_addresses = tuple(out[:4])
