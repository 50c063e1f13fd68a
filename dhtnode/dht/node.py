"""The DHT node as a sans-I/O protocol engine (in the style of aioquic's QuicConnection).

Inputs: :meth:`DhtNode.receive` (a datagram and its source), :meth:`DhtNode.handle_timer`,
and operation calls (:meth:`bootstrap`, :meth:`lookup`, :meth:`announce`, ...).
Outputs: :meth:`datagrams_to_send`, :meth:`next_timer`, the
:class:`~dhtnode.dht.op.Op` handles the operations return, and :attr:`events` (stable event
names with fields, which the daemon logs). Operations use the time of the last input: a
driver calls :meth:`handle_timer` with the current monotonic time before starting one.
Wall-clock time (record seq numbers) comes from the ``wall`` callable given at construction.

This file composes the parts (``context``, ``rpc``, ``query``, ``maintenance``, ``storage``,
``topics``, ``reachability``), owns the node's standing (client -> server, the node id) and
routes each datagram by its first byte. Services from outside (``dhtnode.connect``) plug in
with :meth:`DhtNode.register`: their own commands, first-byte ranges and timers, sending
through the one send path. It must not open sockets, sleep, or read the clock on its own: the
asyncio layer (``dhtnode.transport``) and the simulator (``dhtnode.sim``) drive it identically.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from dhtnode.crypto.identity import Identity
from dhtnode.dht.context import NodeContext, OsSecrets
from dhtnode.dht.counters import with_zeros
from dhtnode.dht.ids import ID_LEN, node_id_for
from dhtnode.dht.lookup import Lookup
from dhtnode.dht.maintenance import Maintenance
from dhtnode.dht.op import Op
from dhtnode.dht.params import DhtParams
from dhtnode.dht.query import Queries
from dhtnode.dht.reachability import Reachability
from dhtnode.dht.routing import RoutingTable
from dhtnode.dht.rpc import Handler, Rpc
from dhtnode.dht.storage import Storage
from dhtnode.dht.store import RecordStore
from dhtnode.dht.topics import LookupResult, Topics
from dhtnode.errors import DecodeError
from dhtnode.nat import behaviour
from dhtnode.nat.observer import AddressObserver, NatClass
from dhtnode.nat.reflector import answer_binding
from dhtnode.wire import address as wire_address
from dhtnode.wire import messages as m
from dhtnode.wire.address import Address
from dhtnode.wire.demux import Kind, classify

__all__ = ["DhtNode", "DhtParams", "LookupResult", "Service"]

#: Datagram receivers a service may own (first-byte ranges of ``wire/demux.py``).
Receiver = Callable[[bytes, Address], None]


class Service:
    """Something plugged into the engine beside the core parts. Override what you need."""

    def handlers(self) -> Mapping[m.Command, Handler]:
        """Commands this service answers (registration fails on a clash)."""
        return {}

    def receivers(self) -> Mapping[Kind, Receiver]:
        """First-byte ranges this service owns (PUNCH, RELAY, QUIC)."""
        return {}

    def standing_changed(self) -> None:
        """The node's public address, NAT class or server mode changed."""

    def status(self) -> dict[str, Any]:
        """Keys merged into ``DhtNode.status()``."""
        return {}


class DhtNode:
    def __init__(
        self,
        identity: Identity,
        params: DhtParams,
        *,
        now: float,
        wall: Callable[[], float],
        rng: random.Random | None = None,
        secret_bytes: Callable[[int], bytes] | None = None,
        public_address: Address | None = None,
        assume_reachable: bool = False,
        ephemeral: bool = False,
        seeds: Iterable[Address] = (),
    ) -> None:
        """``public_address``: a bootstrap node's fixed, trusted public address (serve at once).
        ``assume_reachable``: serve as soon as our public address is learned, without a probe
        (a bootstrap node on a public IP that was not told its address).
        ``ephemeral``: a short-lived client (one-shot CLI commands) that never serves.
        ``rng`` is for jitter and sampling; ``secret_bytes`` for what must not be predicted
        (the OS by default; the simulator passes a seeded one to replay runs)."""
        rng = rng or random.Random()
        local = node_id_for(public_address) if public_address else rng.randbytes(ID_LEN)
        ctx = self.ctx = NodeContext(
            identity,
            params,
            now=now,
            wall=wall,
            rng=rng,
            secret_bytes=secret_bytes or OsSecrets(),
            table=RoutingTable(local, params.k),
        )
        st = ctx.standing
        st.fixed_public = public_address
        st.ephemeral = ephemeral
        st.assume_reachable = assume_reachable and not ephemeral
        st.reachable = (public_address is not None or assume_reachable) and not ephemeral
        st.server = public_address is not None
        st.public = public_address
        self.identity = identity
        self.params = params
        self.rpc = Rpc(ctx)
        self.queries = Queries(ctx, self.rpc)
        self.queries.seeds = list(dict.fromkeys(seeds))
        self.maintenance = Maintenance(ctx, self.rpc, self.queries)
        self.storage = Storage(ctx, self.rpc, self.maintenance)
        self.topics = Topics(ctx, self.rpc, self.queries, self.storage)
        self.reachability = Reachability(ctx, self.rpc)
        self._services: list[Service] = []
        self._receivers: dict[Kind, Receiver] = {}
        self._checks_started = False
        self._growing = False
        # The seams between the parts: plain callbacks, wired here only.
        self.rpc.on_request = self._request_seen
        self.rpc.on_response = self._response_seen
        self.rpc.policy = self.reachability.allows
        self.rpc.on_failure = self._request_failed
        self.queries.on_nodes = self.reachability.nodes_heard
        self.reachability.on_verdict = self._set_reachable
        #: Called when the routing table is empty and the node rejoins through its seeds (a
        #: growth tick, at most every ``rejoin_interval``). Sans-I/O: a driver that knows where
        #: seeds come from (the daemon re-resolves bootstrap names) replaces ``queries.seeds``
        #: and may call :meth:`bootstrap` again.
        self.on_rejoin: Callable[[], None] = lambda: None
        self.maintenance.on_rejoin = lambda: self.on_rejoin()

    def register(self, service: Service) -> None:
        """Plug a service in: its commands and first-byte ranges route to it from now on."""
        for command, handler in service.handlers().items():
            self.rpc.register(command, handler)
        for kind, receiver in service.receivers().items():
            if kind in (Kind.STUN, Kind.DHT, Kind.UNKNOWN) or kind in self._receivers:
                raise ValueError(f"first-byte range {kind.value} is already owned")
            self._receivers[kind] = receiver
        self._services.append(service)

    # ------------------------------------------------------------------ standing (read-only)

    @property
    def stats(self) -> Counter[str]:
        return self.ctx.stats

    @property
    def events(self) -> list[tuple[str, dict[str, Any]]]:
        return self.ctx.events

    @events.setter
    def events(self, value: list[tuple[str, dict[str, Any]]]) -> None:
        self.ctx.events = value

    @property
    def node_id(self) -> bytes | None:
        """Our id while serving (bound to our public address); None while a client."""
        return self.ctx.node_id

    @property
    def table(self) -> RoutingTable:
        return self.ctx.table

    @property
    def store(self) -> RecordStore:
        return self.storage.store

    @property
    def observer(self) -> AddressObserver:
        return self.ctx.observer

    @property
    def nat_class(self) -> NatClass:
        return self.ctx.observer.nat_class

    @property
    def server(self) -> bool:
        return self.ctx.standing.server

    @property
    def reachable(self) -> bool:
        return self.ctx.standing.reachable

    @property
    def ephemeral(self) -> bool:
        return self.ctx.standing.ephemeral

    @property
    def public(self) -> Address | None:
        """Our public address (the one the node id follows), once known."""
        return self.ctx.standing.public

    @property
    def reserve_size(self) -> int:
        """Probe helpers currently kept aside (see ``reachability.py``)."""
        return len(self.reachability.reserve)

    # ------------------------------------------------------------------ driver interface

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        out, self.ctx.out = self.ctx.out, []
        return out

    def next_timer(self) -> float | None:
        return self.ctx.timers.next_deadline()

    def handle_timer(self, now: float) -> None:
        self.ctx.now = now
        self.ctx.timers.run_due(now)

    def receive(self, data: bytes, source: Address, now: float) -> bool:
        """Handle one datagram. False if it belongs to a first-byte range no service owns
        (the caller routes it on). Never raises on remote input: bad input is counted."""
        ctx = self.ctx
        ctx.now = now
        kind = classify(data)
        if kind is Kind.DHT:
            ctx.stats["rx_dht"] += 1
            if len(data) > m.MAX_RECEIVE_SIZE:
                ctx.stats["drop_oversized"] += 1
                return True
            try:
                msg = m.decode(data)
                if msg.network != ctx.params.network:
                    # A node of another network (a test swarm, or the public one): never
                    # answered and never learned from, so two networks cannot merge.
                    ctx.stats["drop_other_network"] += 1
                    return True
                self.rpc.receive(msg, source)
            except DecodeError:
                # Also bodies (records, withdrawals, addresses), which handlers decode lazily.
                ctx.stats["drop_malformed"] += 1
            return True
        if kind is Kind.STUN:
            ctx.stats["rx_stun"] += 1
            answer = answer_binding(data, source)
            if answer is None:
                ctx.stats["drop_stun"] += 1
            else:
                ctx.out.append((answer, source))
            return True
        if kind is Kind.UNKNOWN:
            ctx.stats["drop_unknown"] += 1
            return True
        receiver = self._receivers.get(kind)
        if receiver is None:
            return False
        receiver(data, source)
        return True

    # ------------------------------------------------------------------ operations

    def bootstrap(self, seeds: Iterable[Address] = ()) -> Op[int]:
        """Join: look up our own neighbourhood through ``seeds`` and the table, then check
        reachability. Result: routing table size."""
        known = self.queries.seeds
        known.extend(s for s in seeds if s not in known)
        op: Op[int] = Op()
        retried = False

        def walk() -> None:
            self.queries.run(
                self.ctx.table.local_id, m.Command.FIND_NODE, extra=known
            ).add_done_callback(joined)

        def joined(done: Op[Lookup]) -> None:
            nonlocal retried
            ctx = self.ctx
            if len(ctx.table) == 0 and not retried and done.result().closest_responded(1):
                # Answers came, but none with an id we could check: a seed that serves in one
                # address family, reached in its other one, first learns its address there
                # (it pings us, reachability.py) and only then shows the id we can verify
                # (ctx.id_for). One more walk, at once: its ping reached us before its answer.
                retried = True
                walk()
                return
            ctx.emit("dht_joined", table_size=len(ctx.table))
            if not self._growing and not ctx.standing.ephemeral:
                self._growing = True
                self.start_checks()
                self.maintenance.start_growing()
            op.set_result(len(ctx.table))

        walk()
        return op

    def start_checks(self) -> None:
        """Start the reachability checks now, without a join walk (``bootstrap`` does this
        after joining). For ``dhtnode netcheck``: a walk sends to dozens of nodes, whose probes
        then prove nothing. Once only; a one-shot (ephemeral) node never checks. Sans-I/O: the
        driver must service the node afterwards so that the check's timer is armed."""
        if not self._checks_started and not self.ctx.standing.ephemeral:
            self._checks_started = True
            self.reachability.start()

    def ignore_probes_from(self, proves_nothing: Callable[[Address], bool] | None) -> None:
        """Sources whose probes and requests must not prove us reachable even though we
        never sent to them (``Reachability.proves_nothing``); counted as "probe_ignored" and
        "request_ignored". None: every stranger counts again."""
        self.reachability.proves_nothing = proves_nothing

    @property
    def reserved_helpers(self) -> frozenset[Address]:
        """Our reserved probe helpers: requests to them fail locally (``reachability.py``)."""
        return self.reachability.reserved()

    def find_node(self, target: bytes) -> Op[list[Address]]:
        op: Op[list[Address]] = Op()
        lk = self.queries.run(target, m.Command.FIND_NODE, user_op=True)
        lk.add_done_callback(lambda o: op.set_result(o.result().closest_responded(self.params.k)))
        return op

    def ping(self, addr: Address) -> Op[m.Response]:
        return self.rpc.call(addr, m.Command.PING, retries=self.params.retries, user_op=True)

    def lookup(self, topic: bytes) -> Op[LookupResult]:
        """Find the verified records of ``topic``: one per public key, newest seq, newest first."""
        return self.topics.lookup(topic)

    def announce(self, topic: bytes, *, refresh: bool = True) -> Op[int]:
        """Store our signed record on the k nodes closest to ``topic``; result: how many
        acknowledged (see :meth:`Topics.announce`)."""
        return self.topics.announce(topic, refresh=refresh)

    def unannounce(self, topic: bytes) -> Op[int]:
        return self.topics.unannounce(topic)

    @property
    def announced_topics(self) -> list[bytes]:
        return self.topics.announced_topics

    def close(self) -> Op[int]:
        """Withdraw every announcement; the result counts acknowledged withdrawals."""
        return self.topics.close()

    def status(self) -> dict[str, Any]:
        ctx = self.ctx
        st = ctx.standing
        # A bootstrap node's address is fixed and public: no NAT changes its port (what it
        # tells peers too, connect/listen.py), not "unknown" forever.
        nat_class = NatClass.CONSISTENT if st.fixed_public else ctx.observer.nat_class
        out: dict[str, Any] = {
            "node_id": self.node_id.hex() if self.node_id else None,
            "public_address": wire_address.format_addr(st.public) if st.public else None,
            "nat_class": nat_class.value,
            # The same in RFC 4787 words, as `dhtnode netcheck` prints them (nat/behaviour.py).
            "nat_mapping": behaviour.mapping_of(nat_class),
            "nat_filtering": behaviour.filtering_of(
                st.reachable, self.reachability.failed_checks),
            "public_addresses": [
                wire_address.format_addr(a)
                for a in ((st.public,) if st.fixed_public else ctx.observer.public_addresses)
                if a is not None
            ],
            "reachable": st.reachable,
            "server": st.server,
            "routing_table_size": len(ctx.table),
            "records_stored": len(self.store),
            "topics_stored": self.store.topic_count,
            "announced_topics": [t.hex() for t in self.topics.announced_topics],
            "requests_in_flight": len(self.rpc),
            "stats": with_zeros(ctx.stats),
        }
        for service in self._services:
            out.update(service.status())
        return out

    # ------------------------------------------------------------------ the seams

    def _request_seen(self, req: m.Request, source: Address) -> None:
        if req.id is not None:
            # A request's source may be forged: it refreshes a known contact, or earns an
            # unknown one a verification PING; only an answer admits (BEP 5).
            self.maintenance.seen(req.id, source, answered=False)
        self.reachability.request_seen(req, source)

    def _request_failed(self, addr: Address) -> None:
        self.ctx.table.failed(addr)

    def _response_seen(self, source: Address, resp: m.Response) -> None:
        ctx = self.ctx
        fixed = ctx.standing.fixed_public
        if fixed is None:
            if ctx.observer.add(source, resp.to):
                self._on_address_change()
        elif (":" in resp.to[0]) is not (":" in fixed[0]):
            # A fixed address covers one family; our address in the other one is learned, for
            # the id peers of that family must see (ctx.id_for).
            ctx.other_family.add(source, resp.to)
        if resp.id is not None:
            self.maintenance.seen(resp.id, source)

    # ------------------------------------------------------------------ standing

    def _set_reachable(self, value: bool) -> None:
        st = self.ctx.standing
        if st.reachable != value:
            st.reachable = value
            self.ctx.emit("reachability_changed", reachable=value)
        self._update_mode()

    def _on_address_change(self) -> None:
        ctx = self.ctx
        ctx.standing.public = ctx.observer.public_address
        shown = wire_address.format_addr(ctx.standing.public) if ctx.standing.public else None
        ctx.emit(
            "public_address_changed",
            public_address=shown,
            nat_class=ctx.observer.nat_class.value,
        )
        self._update_mode()

    def _update_mode(self) -> None:
        """Serve (enter others' tables, store records) only when reachable at a known,
        consistently mapped address; the node id follows that address."""
        ctx = self.ctx
        st = ctx.standing
        self.reachability.standing_changed()
        if st.fixed_public is None:
            want = (
                st.reachable
                and st.public is not None
                and ctx.observer.nat_class is not NatClass.RANDOM
            )
            new_id = node_id_for(st.public) if want and st.public else None
            if want and (not st.server or new_id != ctx.table.local_id):
                assert new_id is not None
                self.maintenance.rebuild(new_id)
                st.server = True
                ctx.emit("serving", node_id=new_id.hex())
                # Tell our new neighbourhood about us: requests now carry our id.
                self.queries.run(new_id, m.Command.FIND_NODE)
            elif not want and st.server:
                st.server = False
                self.maintenance.rebuild(ctx.rng.randbytes(ID_LEN))
                ctx.emit("client_mode")
        for service in self._services:
            service.standing_changed()
