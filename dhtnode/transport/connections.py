"""Connecting by public key, in asyncio: introductions -> punching -> QUIC, on the node socket.

:class:`Connections` is the user-facing API of one node: ``await conns.listen(identity,
on_connection)`` and ``await conns.connect(public_key)``. It carries out what the sans-I/O
pieces decide: the introduction (``connect/connector.py``, ``connect/listen.py``), then hands
the punch to its :class:`~dhtnode.transport.punching.PunchDriver` (``transport/punching.py``:
the punch plans, their attempts, limits and extra sockets), and starts the QUIC connection
(``transport/quic.py``) on the path that punched: the node's own socket (so the NAT mapping
the DHT learned is the one used), or the winning extra socket for a port-randomizing side.
Behind a port-randomizing NAT it also keeps the port samples an introduction carries fresh
(a new socket asks known nodes for our mapping after punch attempts moved the NAT on).

When the introducer offered a relay (``transport/relaypath.py``), both sides bind to it at
once; the client starts QUIC on whichever path is ready first (the punch gets a short grace),
and a relayed connection moves to the direct path when the punch succeeds later, without the
application noticing (the QUIC bridge's path layer). Random NATs on both sides stay relayed.

If the relay of a relayed connection goes away (the path's own liveness check: no DATA and no
BOUND answering its heartbeat BINDs for a few seconds, ``relaypath.py``), the client runs the
introduction again through another introducer, which offers its own relay; once paired, the
connection moves there (``set_path``, as for the direct path) and the same QUIC connection and
streams go on. The listener takes the new introduction's relayed path as the same peer's (the
introduction authenticated its key) and moves too when the first authenticated packet of the
connection arrives on it. Bounded tries; without another relay the connection closes with
``CLOSE_RELAY_LOST`` and a reason. :func:`watch_peer` notices a peer that died without a word
in seconds (forwarding and swarms use it; ``transport/connection.py``).

Must not decide strategy, timing or crypto (those live in the pure modules), nor send a
probe, route a punch datagram or count attempts (the punch driver does).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from dhtnode.connect.connector import Introduced, introduce
from dhtnode.connect.listen import Introduction, Listening
from dhtnode.connect.peerinfo import PeerInfo
from dhtnode.connect.services import ConnectServices
from dhtnode.crypto.identity import Identity
from dhtnode.dht.node import Receiver, Service
from dhtnode.dht.op import OperationError
from dhtnode.nat.candidates import punch_targets
from dhtnode.nat.punch import PUNCH_DEADLINE, Punched
from dhtnode.transport.admission import IncomingLimits
from dhtnode.transport.connection import Connection
from dhtnode.transport.localaddr import lan_addresses, own_v6_for
from dhtnode.transport.punching import Attempt, PunchDriver, profile_of
from dhtnode.transport.quic import (
    CLOSE_RELAY_LOST,
    DatagramPath,
    PeerConnection,
    QuicBridge,
)
from dhtnode.transport.relaypath import RelayPath, RelayPaths
from dhtnode.transport.resample import Resampler
from dhtnode.transport.sockets import SocketPool
from dhtnode.transport.udp import NodeEndpoint
from dhtnode.wire import relay as wire_relay
from dhtnode.wire.address import Address, format_addr
from dhtnode.wire.demux import Kind, classify

#: Seconds the listener waits for the client's QUIC handshake after an introduction.
EXPECT_WINDOW = PUNCH_DEADLINE + 10.0
#: Seconds the client gives QUIC to finish its handshake on the punched path.
QUIC_HANDSHAKE_TIMEOUT = 5.0
#: Seconds a punch that may still succeed quickly (direct, simultaneous, predict: one or two
#: round trips on a LAN or a home connection) gets before a paired relay is used instead:
#: starting on the relay and moving at once would only churn.
RELAY_GRACE = 0.3
#: Seconds a relayed path keeps receiving after the connection moved to the direct path
#: (the peer moves when its own punch reports, a moment later).
RELAY_DRAIN = 3.0
#: Introductions a relayed connection whose relay died tries (each through an introducer not
#: tried before) before it closes: a record names a handful of introducers.
RESCUE_ATTEMPTS = 3
#: Seconds a new relay may take to pair us with the peer (the peer binds when the
#: introduction reaches it, about one round trip after us).
RESCUE_PAIR_TIMEOUT = 5.0
#: Seconds between two looks at our LAN and IPv6 addresses while we listen (a few syscalls,
#: no datagram): an IPv6 temporary address is replaced about daily, a DHCP lease in hours.
ADDRESS_REFRESH = 60.0


class PunchError(OperationError):
    """Hole punching found no path; the message names the cause."""

    code = "punch_failed"


@dataclass(slots=True)
class Server:
    """What ``listen()`` returns: the key served, and how to stop."""

    public_key: bytes
    listening: Listening
    _conns: Connections

    async def close(self) -> None:
        await self._conns.unlisten(self)


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
        self._servers: dict[bytes, Callable[[Connection], None]] = {}
        self.stats: Counter[str] = self.node.stats
        self._tasks: set[asyncio.Task[None]] = set()
        #: Incoming connections held per client key, per IP and in all (``admission.py``).
        self.incoming = IncomingLimits(self.stats, self._spawn)
        self.resampler = Resampler(self.pool, self.node, services.listeners, self.stats)
        self._addresses_refresh: asyncio.Task[None] | None = None
        self.relays = RelayPaths(endpoint, self._on_relayed, self.stats)
        self.punch = PunchDriver(
            endpoint, self.bridge, self.pool, self.stats, spawn=self._spawn,
            on_start=self.resampler.punch_started, on_result=self._punch_finished,
        )
        services.relay.member_sink = self.relays.receive
        services.listeners.admit = self.incoming.admit
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
            "punch_attempts": len(self.punch.attempts),
            "relayed_paths": len(self.relays),
            "extra_sockets": self.pool.open_sockets,
        }

    def _emit(self, name: str, **fields: Any) -> None:
        if self._on_event is not None:
            self._on_event(name, fields)

    def _on_node_quic(self, data: bytes, source: Address) -> None:
        self.bridge.datagram_received(data, source, self.punch.node_path)

    def _on_relayed(self, data: bytes, peer: Address, path: RelayPath) -> None:
        if classify(data) is Kind.QUIC:
            self.bridge.datagram_received(data, peer, path)
        else:
            self.stats["drop_relay_payload"] += 1

    def _on_node_punch(self, data: bytes, source: Address) -> None:
        self.punch.datagram(0, data, source)

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
        if profile_of(self.my_info()).random:
            # After the announcement's flows: the first client then gets our NAT's position.
            with contextlib.suppress(Exception):
                await self.resampler.start()
        if self._addresses_refresh is None or self._addresses_refresh.done():
            self._addresses_refresh = asyncio.get_running_loop().create_task(
                self._refresh_addresses_while_listening())
            self._tasks.add(self._addresses_refresh)
            self._addresses_refresh.add_done_callback(self._tasks.discard)
        return Server(identity.public_key, holder[0], self)

    async def _refresh_addresses_while_listening(self) -> None:
        """A listener answers introductions for days: its LAN and IPv6 addresses (the
        peer info of every reply) follow DHCP renewals and IPv6 privacy-address rotation."""
        while self._servers:
            await asyncio.sleep(ADDRESS_REFRESH)
            self._refresh_lan_addresses()

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
        if self.resampler.needed(info):
            # Behind a port-randomizing NAT whose samples are stale (our own attempts moved a
            # sequential NAT on) or show no sequence (the DHT keeps a few witnesses, not every
            # flow): tell the peer where the NAT is now (one round trip to known nodes).
            with contextlib.suppress(Exception):
                await self.resampler.start()
            info = self.my_info()
        intro: Introduced = await self.endpoint.run(
            lambda n: introduce(n, ident, public_key, info)
        )
        targets = punch_targets(intro.server_address, intro.server_info, info,
                                same_public_ip=self._same_public_ip(intro.server_address[0]))
        peer = targets.peer
        att = self.punch.start(
            initiator=True,
            ours=info,
            theirs=intro.server_info,
            peer=peer,
            attempt_id=intro.handshake.attempt_id,
            punch_key=intro.handshake.punch_key,
            extra=targets.extra,
        )
        if att is None:
            raise PunchError("too many punch attempts with this peer at once; try again")
        if intro.relay is not None:
            att.relay = self.relays.open(intro.relay, wire_relay.ROLE_CLIENT, peer[-1])
        strategy = att.plan.strategy.value
        offered = att.relay
        first = await self._first_path(att)
        if offered is not None and offered is not first:
            offered.close()  # the punch won: the relayed path is not needed
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
            self._relay_until_direct(conn, att, first, rescue=ident)
        else:
            path = self.punch.path_for(att, first.slot)
            try:
                quic = await self.bridge.connect(
                    path, first.addr, identity=ident, server_key=public_key,
                    timeout=QUIC_HANDSHAKE_TIMEOUT,
                )
            except BaseException:
                self.punch.release_slot(att, first.slot)
                raise
            self.punch.close_with(quic, att, first.slot)
            strategy = att.plan.strategy_of(first.addr).value  # IPv6 raced beside IPv4
            conn = Connection(quic, "direct", strategy, (time.monotonic() - started) * 1000,
                              first.slot)
        self._emit("connected", public_key=public_key.hex(), address=format_addr(quic.addr),
                   strategy=strategy, path=conn.path, connect_ms=round(conn.connect_ms, 1))
        return conn

    async def _first_path(self, att: Attempt) -> Punched | RelayPath:
        """The punched path, or the relay when it is paired first (after a short grace for a
        punch that is usually quick); raises when neither works."""
        relay = offered = att.relay
        waiting: set[asyncio.Future[Any]] = {att.result}
        if relay is not None:
            # This connect owns the relayed path now: the attempt's end (a failed punch ends
            # after a short linger) must not close it while the relay is still pairing us.
            att.relay = None
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
        if offered is not None:
            offered.close()
        why = failure or "hole punching found no path"
        why += "; the relay did not pair us" if offered else "; no relay was offered"
        raise PunchError(f"no path to the peer: {why}")

    def _relay_until_direct(
        self, conn: Connection, att: Attempt, relay: RelayPath, *, rescue: Identity | None = None
    ) -> None:
        """Keep a relayed connection on the relay until the punch succeeds, then move it to
        the direct path (QUIC does not notice: the path layer is under it); close the relayed
        path when the connection ends, or a little after the move. ``rescue``: the client's
        identity, to find another relay if this one dies (see :meth:`_rescue`)."""
        self._keep_relayed(conn, relay, rescue)

        async def watch() -> None:
            try:
                result = await att.result
                if not isinstance(result, Punched):
                    conn.settled.set()  # relayed for good
                if isinstance(result, Punched) and not conn.quic.closed:
                    conn.quic.set_path(self.punch.path_for(att, result.slot), result.addr)
                    self.punch.close_with(conn.quic, att, result.slot)
                    conn.path, conn.slot = "direct", result.slot
                    # The path that won: IPv6 raced beside an IPv4 strategy (even IMPOSSIBLE)
                    # is a simultaneous open.
                    conn.strategy = att.plan.strategy_of(result.addr).value
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
                if conn.relay is not None and (conn.quic.closed or conn.path == "direct"):
                    conn.relay.close()  # a relay it moved to after the first one died
                    conn.relay = None

        self._spawn(watch())

    # ------------------------------------------------------------------ relay failover

    def _keep_relayed(self, conn: Connection, path: RelayPath, rescue: Identity | None) -> None:
        """``conn`` runs over ``path`` from now on: watch the relay's liveness, and (listener)
        follow the client to a new relayed path of the same peer."""
        path.in_use = True
        path.peer_key = path.peer_key or conn.peer_key
        conn.relay = path
        path.watch(lambda dead: self._relay_lost(conn, dead, rescue))
        conn.quic.on_other_path = lambda p, addr: self._follow(conn, p, addr, rescue)

    def _move_relay(
        self, conn: Connection, path: RelayPath, addr: Address, rescue: Identity | None
    ) -> None:
        old = conn.relay
        conn.quic.set_path(path, addr)
        conn.moved_at = time.monotonic()
        self._keep_relayed(conn, path, rescue)
        if old is not None and old is not path:
            old.close()
        conn.quic.probe()  # resume loss recovery now rather than after a backed-off PTO
        self.stats["relay_moved"] += 1
        self._emit("relay_moved", public_key=conn.peer_key.hex(), relay=format_addr(path.relay))

    def _follow(
        self, conn: Connection, path: DatagramPath, addr: Address, rescue: Identity | None
    ) -> None:
        """An authenticated packet of ``conn`` came over another path: if it is a relayed path
        an introduction of the same peer key set up, the client moved there (its relay died):
        move too. Anything else (the direct path while the punch reports) is not ours."""
        if (
            isinstance(path, RelayPath)
            and not path.closed
            and path is not conn.relay
            and conn.path == "relayed"
            and path.peer_key == conn.peer_key
        ):
            self._move_relay(conn, path, addr, rescue)

    def _relay_lost(self, conn: Connection, dead: RelayPath, rescue: Identity | None) -> None:
        if conn.quic.closed or conn.relay is not dead or conn.path != "relayed":
            return
        self._emit("relay_lost", public_key=conn.peer_key.hex(), relay=format_addr(dead.relay))
        if rescue is not None:  # the listener waits for the client's move (_follow)
            self._spawn(self._rescue(conn, dead, rescue))

    async def _rescue(self, conn: Connection, dead: RelayPath, ident: Identity) -> None:
        """Find another relay for ``conn`` (the client side) after ``dead`` went silent: a
        new introduction through an introducer not tried yet (each offers its own relay),
        bind, and move the connection once the peer is paired. Closes ``conn`` with a reason
        when :data:`RESCUE_ATTEMPTS` introductions gave no relay."""
        tried = {dead.relay}
        why = "no other introducer offered a relay"
        for _ in range(RESCUE_ATTEMPTS):
            if conn.quic.closed or conn.relay is not dead:
                return
            info, exclude = self.my_info(), frozenset(tried)
            try:
                intro: Introduced = await self.endpoint.run(
                    lambda n, info=info, exclude=exclude: introduce(  # type: ignore[misc]
                        n, ident, conn.peer_key, info, exclude=exclude
                    )
                )
            except OperationError as exc:
                why = str(exc)
                break
            tried.add(intro.introducer)
            if intro.relay is None:
                continue
            path = self.relays.open(intro.relay, wire_relay.ROLE_CLIENT, intro.server_address)
            path.peer_key = conn.peer_key
            await asyncio.wait({path.paired}, timeout=RESCUE_PAIR_TIMEOUT)
            p = path.paired
            if not p.done() or p.cancelled() or p.exception() is not None:
                path.close()
                why = f"the relay at {format_addr(intro.relay.relay)} did not pair us"
                continue
            if conn.quic.closed or conn.relay is not dead:
                path.close()
                return
            self._move_relay(conn, path, intro.server_address, ident)
            return
        if conn.quic.closed or conn.relay is not dead:
            return
        if dead.alive:  # it was only quiet for a while: keep it
            dead.watch(lambda d: self._relay_lost(conn, d, ident))
            return
        self.stats["relay_rescue_failed"] += 1
        await conn.quic.close(
            CLOSE_RELAY_LOST, f"relay {format_addr(dead.relay)} went away and none took over: "
            + why,
        )

    async def close(self) -> None:
        self.punch.close()
        self.bridge.close()
        self.relays.close()
        self.resampler.close()
        for task in list(self._tasks):
            task.cancel()
        self.pool.close()

    # ------------------------------------------------------------------ listener side

    def _on_intro(self, intro: Introduction) -> None:
        """An accepted introduction (called inside the engine): expect the client's QUIC
        handshake and punch toward it."""
        client = intro.client_address
        ours = self.my_info()
        targets = punch_targets(client, intro.client_info, ours,
                                same_public_ip=self._same_public_ip(client[0]))
        peer = targets.peer
        ident = intro.listener.identity
        on_connection = self._servers.get(ident.public_key)
        if on_connection is None:
            return
        att = self.punch.start(
            initiator=False,
            ours=ours,
            theirs=intro.client_info,
            peer=peer,
            attempt_id=intro.handshake.attempt_id,
            punch_key=intro.handshake.punch_key,
            extra=targets.extra,
        )
        if att is None:
            self.stats["drop_intro_attempt_limit"] += 1
            return
        if intro.relay is not None:
            relay = att.relay = self.relays.open(intro.relay, wire_relay.ROLE_SERVER, client)
            # The hello proved the client's key: a relayed connection of that key whose relay
            # died may move here (_follow).
            relay.peer_key = intro.handshake.client_key
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
                self.punch.close_with(quic, att, slot)
                conn = Connection(quic, "direct", strategy, 0.0, slot)
            self.incoming.count(conn, client[0])
            on_connection(conn)

        for ip in dict.fromkeys(a[0] for a in peer + targets.extra):
            self.bridge.expect(
                ip, identity=ident, allowed_key=intro.handshake.client_key, deadline=deadline,
                on_connection=accepted,
            )

    # ------------------------------------------------------------------ port samples

    def _punch_finished(self) -> None:
        if profile_of(self.my_info()).random:
            # The next introduction (ours or a client's) should carry fresh samples.
            self.resampler.start()

    # ------------------------------------------------------------------ addresses

    def _same_public_ip(self, ip: str) -> bool:
        return any(a[0] == ip for a in self.node.observer.public_addresses)

    def _refresh_lan_addresses(self) -> None:
        """Our LAN addresses and our own IPv6 addresses (for the dual-stack race), with the
        node's port, as told to peers in introductions (``transport/localaddr.py``)."""
        local = self.endpoint.local_address
        peers = list(self.node.queries.seeds) + [c.addr for c in self.node.table][:4]
        listeners = self.services.listeners
        listeners.lan_addresses = lan_addresses(local[1], peers)
        if self.endpoint.is_v6:
            listeners.own_v6 = own_v6_for(local, peers)
