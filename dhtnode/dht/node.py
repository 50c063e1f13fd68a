"""The DHT node as a sans-I/O protocol engine (in the style of aioquic's QuicConnection).

Inputs: :meth:`DhtNode.receive` (a datagram and its source), :meth:`DhtNode.handle_timer`,
and operation calls (:meth:`bootstrap`, :meth:`lookup`, :meth:`announce`, ...).
Outputs: :meth:`datagrams_to_send`, :meth:`next_timer`, the
:class:`~dhtnode.dht.op.Op` handles the operations return, and :attr:`events` (stable event
names with fields, which the daemon logs). Operations use the time of the last input: a
driver calls :meth:`handle_timer` with the current monotonic time before starting one.
Wall-clock time (record seq numbers) comes from the ``wall`` callable given at construction.

This file owns the meaning of each command and the node's life cycle (client -> server).
It must not open sockets, sleep, or read the clock on its own: the asyncio layer
(``dhtnode.transport``) and the simulator (``dhtnode.sim``) drive it identically.
"""

from __future__ import annotations

import functools
import random
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from dhtnode.crypto.identity import Identity
from dhtnode.crypto.tokens import TokenIssuer
from dhtnode.dht.ids import ID_LEN, node_id_for
from dhtnode.dht.lookup import Lookup
from dhtnode.dht.op import Op, OperationError
from dhtnode.dht.records import (
    MAX_RECORDS_PER_MESSAGE,
    AddressKind,
    Record,
    RecordError,
    decode_record_list,
    decode_single_record,
    decode_withdrawal,
    encode_record_list,
    sign_record,
    sign_withdrawal,
)
from dhtnode.dht.routing import Contact, RoutingTable
from dhtnode.dht.sent import SentMemory
from dhtnode.dht.store import PutResult, RecordStore
from dhtnode.dht.timers import Timer, TimerQueue
from dhtnode.errors import DecodeError
from dhtnode.nat.observer import AddressObserver, NatClass
from dhtnode.nat.reflector import answer_binding
from dhtnode.wire import address as wire_address
from dhtnode.wire import messages as m
from dhtnode.wire.address import Address
from dhtnode.wire.demux import Kind, classify

#: Requests allowed in flight at once; past this new requests fail at once (backpressure).
MAX_INFLIGHT = 4096
#: Recent requesters remembered, as helpers for other nodes' reachability checks.
MAX_RECENT_REQUESTERS = 256
#: Seconds a requester counts as recent.
RECENT_REQUESTER_TTL = 120.0
#: Helpers each checked node's contact asks to send the probe; several, because a helper the
#: checked node happens to have contacted itself gives an inconclusive answer.
PROBE_HELPERS = 2
#: Servers a node not yet proven reachable learns of but deliberately never sends to, so that a
#: probe from them proves something even in a network so small that it has talked to all others.
PROBE_RESERVE = 2
#: Conclusively failed checks in a row after which a node stops keeping a probe reserve.
RESERVE_GIVE_UP = 3
#: Seconds to wait for a reachability probe after asking for one.
PROBE_WAIT = 3.0
#: Seconds after joining before the first reachability check (jittered like every check).
FIRST_CHECK_DELAY = 0.5
#: Seconds before the first retry of an unsuccessful reachability check; doubles each time.
FIRST_CHECK_RETRY = 1.0
#: Cap on the retry interval while still a client (a small network grows; check again soon).
MAX_CHECK_RETRY = 60.0
#: PROBE datagrams this node sends on others' behalf per maintenance tick, at most.
MAX_PROBES_PER_TICK = 32
#: Pings sent to strangers to learn our own public address, per maintenance tick.
MAX_ADDRESS_PINGS = 4
#: Seconds between maintenance ticks (expiry, pruning, rate-limit windows).
TICK_INTERVAL = 5.0
#: Seconds after joining before the first extra self-lookup of a thin routing table.
FIRST_GROW_DELAY = 2.0
#: Consecutive failed reachability checks before a server goes back to client mode.
DEMOTE_AFTER_FAILED_CHECKS = 2


def _ignore(_: m.Response | None) -> None:
    """Completion callback of fire-and-forget requests."""


@dataclass(frozen=True, slots=True)
class DhtParams:
    k: int = 20
    alpha: int = 3
    #: Seconds before an unanswered request fails.
    request_timeout: float = 1.0
    #: Seconds after which a lookup request stops counting against alpha.
    slow_after: float = 0.25
    #: Retransmissions for single requests (ping, announce); lookups move on instead.
    retries: int = 1
    bucket_refresh: float = 900.0
    record_ttl: float = 1200.0
    max_records: int = 65536
    max_records_per_topic: int = 32
    max_records_per_ip: int = 128
    #: Seconds between reachability re-checks once serving (and back-off cap while a client).
    reachability_recheck: float = 600.0
    #: Longest interval between self-lookups while the routing table has fewer than k nodes
    #: (the first comes after 2 s and the interval doubles up to this).
    rejoin_interval: float = 30.0


@dataclass(slots=True)
class _Pending:
    tid: int
    addr: Address
    datagram: bytes
    tries_left: int
    on_done: Callable[[m.Response | None], None]
    timer: Timer | None = None
    slow_timer: Timer | None = None


@dataclass(slots=True)
class _Announcement:
    topic: bytes
    timer: Timer | None = None
    storers: int = 0


@dataclass(slots=True)
class LookupResult:
    records: list[Record]
    nodes_asked: int
    responses: int
    hops: int
    #: The nearest nodes that answered, nearest first.
    closest: list[Address]


@dataclass(slots=True)
class _PendingProbe:
    expires: float
    timer: Timer | None = None
    succeeded: bool = False
    #: Some contact confirmed it asked helpers to probe us (else the check says nothing).
    forwarded: bool = False
    #: A probe came from a node we had sent to: says nothing either way.
    inconclusive: bool = False
    answers: int = 0
    asked: list[Address] = field(default_factory=list)
    #: Reserved helpers this check named.
    named: list[Address] = field(default_factory=list)


class DhtNode:
    def __init__(
        self,
        identity: Identity,
        params: DhtParams,
        *,
        now: float,
        wall: Callable[[], float],
        rng: random.Random | None = None,
        public_address: Address | None = None,
        assume_reachable: bool = False,
        ephemeral: bool = False,
        seeds: Iterable[Address] = (),
    ) -> None:
        """``public_address``: a bootstrap node's fixed, trusted public address (serve at once).
        ``assume_reachable``: serve as soon as our public address is learned, without a probe
        (a bootstrap node on a public IP that was not told its address).
        ``ephemeral``: a short-lived client (one-shot CLI commands) that never serves."""
        self.identity = identity
        self.params = params
        self._wall = wall
        self._rng = rng or random.Random()
        self._now = now
        self.stats: Counter[str] = Counter()
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._out: list[tuple[bytes, Address]] = []
        self._timers = TimerQueue()
        self._pending: dict[int, _Pending] = {}
        self._sent_to = SentMemory()
        #: Probe reserve: helper address -> the server that told us of it (and knows it).
        self._reserve: dict[Address, Address] = {}
        self._recent_requesters: OrderedDict[Address, float] = OrderedDict()
        self._probes_this_tick = 0
        self._address_pings = 0
        self._probe_nonces: dict[bytes, _PendingProbe] = {}
        self._failed_checks = 0
        self._checks_started = False
        self._grow_delay = FIRST_GROW_DELAY
        self._check_backoff = FIRST_CHECK_RETRY
        self._last_seq = 0
        self._announced: dict[bytes, _Announcement] = {}
        self._seeds: list[Address] = list(dict.fromkeys(seeds))
        self.observer = AddressObserver()
        self.tokens = TokenIssuer(self._rng.randbytes, now)
        self.store = RecordStore(
            ttl=params.record_ttl,
            max_total=params.max_records,
            max_per_topic=params.max_records_per_topic,
            max_per_ip=params.max_records_per_ip,
        )
        #: Fixed public address of a bootstrap node (trusted, not learned).
        self._fixed_public = public_address
        self.ephemeral = ephemeral
        self._assume_reachable = assume_reachable and not ephemeral
        self.reachable = (public_address is not None or assume_reachable) and not ephemeral
        self.server = public_address is not None
        self.public: Address | None = public_address
        local = node_id_for(public_address) if public_address else self._rng.randbytes(ID_LEN)
        self.table = RoutingTable(local, params.k)
        self._closed = False
        self._timers.call_at(now + TICK_INTERVAL, self._tick)
        self._timers.call_at(now + params.bucket_refresh / 4, self._refresh_buckets)

    # ------------------------------------------------------------------ driver interface

    @property
    def node_id(self) -> bytes | None:
        """Our id while serving (bound to our public address); None while a client."""
        return self.table.local_id if self.server else None

    @property
    def nat_class(self) -> NatClass:
        return self.observer.nat_class

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        out, self._out = self._out, []
        return out

    def next_timer(self) -> float | None:
        return self._timers.next_deadline()

    def handle_timer(self, now: float) -> None:
        self._now = now
        self._timers.run_due(now)

    def receive(self, data: bytes, source: Address, now: float) -> bool:
        """Handle one datagram. False if it belongs to another subsystem (QUIC, punch, relay),
        which the caller routes on. Never raises on remote input: bad input is counted."""
        self._now = now
        kind = classify(data)
        if kind is Kind.STUN:
            self.stats["rx_stun"] += 1
            answer = answer_binding(data, source)
            if answer is None:
                self.stats["drop_stun"] += 1
            else:
                self._out.append((answer, source))
            return True
        if kind is not Kind.DHT:
            if kind is Kind.UNKNOWN:
                self.stats["drop_unknown"] += 1
                return True
            return False
        self.stats["rx_dht"] += 1
        if len(data) > m.MAX_RECEIVE_SIZE:
            self.stats["drop_oversized"] += 1
            return True
        try:
            msg = m.decode(data)
        except DecodeError:
            self.stats["drop_malformed"] += 1
            return True
        try:
            if isinstance(msg, m.Request):
                self._on_request(msg, source)
            else:
                self._on_response(msg, source)
        except DecodeError:
            # Bodies (records, withdrawals, addresses) are decoded lazily by the handlers.
            self.stats["drop_malformed"] += 1
        return True

    # ------------------------------------------------------------------ operations

    def bootstrap(self, seeds: Iterable[Address] = ()) -> Op[int]:
        """Join: look up our own neighbourhood through ``seeds`` and the table, then check
        reachability. Result: routing table size."""
        for s in seeds:
            if s not in self._seeds:
                self._seeds.append(s)
        op: Op[int] = Op()
        lk_op = self._lookup(self.table.local_id, m.Command.FIND_NODE, None, extra=self._seeds)

        def joined(_: Op[Lookup]) -> None:
            self.events.append(("dht_joined", {"table_size": len(self.table)}))
            if not self._checks_started and not self.ephemeral:
                self._checks_started = True
                if not self._fixed_public and not self._assume_reachable:
                    self._schedule_check(FIRST_CHECK_DELAY)
                self._timers.call_at(self._now + self._grow_delay, self._grow_table)
            op.set_result(len(self.table))

        lk_op.add_done_callback(joined)
        return op

    def find_node(self, target: bytes) -> Op[list[Address]]:
        op: Op[list[Address]] = Op()
        lk = self._lookup(target, m.Command.FIND_NODE, None, bypass_reserve=True)
        lk.add_done_callback(lambda o: op.set_result(o.result().closest_responded(self.params.k)))
        return op

    def ping(self, addr: Address) -> Op[m.Response]:
        op: Op[m.Response] = Op()

        def done(resp: m.Response | None) -> None:
            if resp is None:
                op.set_error(OperationError(f"no answer from {wire_address.format_addr(addr)}"))
            else:
                op.set_result(resp)

        self._request(addr, m.Command.PING, done, retries=self.params.retries, bypass_reserve=True)
        return op

    def lookup(self, topic: bytes) -> Op[LookupResult]:
        """Find the verified records of ``topic``: one per public key, newest seq, newest first."""
        found: dict[bytes, dict[int, Record]] = {}

        def collect(_: Address, resp: m.Response) -> None:
            if resp.value is None:
                return
            try:
                records = decode_record_list(resp.value)
            except DecodeError:
                self.stats["drop_bad_records"] += 1
                return
            for rec in records:
                if self.store.is_fresh(rec.seq, self._wall()):
                    found.setdefault(rec.public_key, {})[rec.seq] = rec

        op: Op[LookupResult] = Op()
        lk_op = self._lookup(topic, m.Command.LOOKUP, collect, bypass_reserve=True)

        def finish(o: Op[Lookup]) -> None:
            lk = o.result()
            if self.server:
                for rec in self.store.get(topic, self._now):
                    found.setdefault(rec.public_key, {})[rec.seq] = rec
            verified: list[Record] = []
            for versions in found.values():
                for seq in sorted(versions, reverse=True):
                    if versions[seq].verify(topic):
                        verified.append(versions[seq])
                        break
                    self.stats["drop_bad_signature"] += 1
            verified.sort(key=lambda r: r.seq, reverse=True)
            op.set_result(
                LookupResult(
                    verified, lk.queried, lk.responses, lk.hops,
                    lk.closest_responded(self.params.k),
                )
            )

        lk_op.add_done_callback(finish)
        return op

    def announce(self, topic: bytes, *, refresh: bool = True) -> Op[int]:
        """Store our signed record on the k nodes closest to ``topic``; result: how many
        acknowledged. With ``refresh`` the record is re-announced before it expires until
        :meth:`unannounce` or :meth:`close`."""
        if refresh:
            ann = self._announced.get(topic)
            if ann is None:
                ann = self._announced[topic] = _Announcement(topic)
            if ann.timer is not None:
                ann.timer.cancel()
            interval = self.params.record_ttl * 0.45
            ann.timer = self._timers.call_at(
                self._now + interval * (0.9 + 0.1 * self._rng.random()),
                lambda: self._refresh_announcement(topic),
            )
        return self._write(topic, withdraw=False)

    def unannounce(self, topic: bytes) -> Op[int]:
        ann = self._announced.pop(topic, None)
        if ann is not None and ann.timer is not None:
            ann.timer.cancel()
        return self._write(topic, withdraw=True)

    @property
    def announced_topics(self) -> list[bytes]:
        return list(self._announced)

    def close(self) -> Op[int]:
        """Withdraw every announcement; the result counts acknowledged withdrawals."""
        topics = list(self._announced)
        op: Op[int] = Op()
        if not topics:
            self._closed = True
            op.set_result(0)
            return op
        remaining = [len(topics)]
        total = [0]

        def one(o: Op[int]) -> None:
            total[0] += 0 if o.error else o.result()
            remaining[0] -= 1
            if remaining[0] == 0:
                self._closed = True
                op.set_result(total[0])

        for t in topics:
            self.unannounce(t).add_done_callback(one)
        return op

    def status(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id.hex() if self.node_id else None,
            "public_address": wire_address.format_addr(self.public) if self.public else None,
            "nat_class": self.observer.nat_class.value,
            "public_addresses": [
                wire_address.format_addr(a)
                for a in ((self.public,) if self._fixed_public else self.observer.public_addresses)
                if a is not None
            ],
            "reachable": self.reachable,
            "server": self.server,
            "routing_table_size": len(self.table),
            "records_stored": len(self.store),
            "topics_stored": self.store.topic_count,
            "announced_topics": [t.hex() for t in self._announced],
            "requests_in_flight": len(self._pending),
            "stats": dict(self.stats),
        }

    # ------------------------------------------------------------------ sending

    def _next_tid(self) -> int:
        while True:
            tid = self._rng.getrandbits(32)
            if tid not in self._pending:
                return tid

    def _send(self, data: bytes, addr: Address) -> None:
        """Queue a datagram. Every destination is remembered: once we sent to it, whatever
        NAT is in front of us lets its answers in, so they prove nothing about reachability."""
        self._out.append((data, addr))
        self.stats["tx"] += 1
        self._sent_to.note(addr, self._now)

    def _request(
        self,
        addr: Address,
        command: m.Command,
        on_done: Callable[[m.Response | None], None],
        *,
        target: bytes | None = None,
        token: bytes | None = None,
        value: bytes | None = None,
        retries: int = 0,
        on_slow: Callable[[], None] | None = None,
        bypass_reserve: bool = False,
    ) -> None:
        if len(self._pending) >= MAX_INFLIGHT:
            self.stats["request_backpressure"] += 1
            on_done(None)
            return
        if addr in self._reserve and not bypass_reserve:
            self.stats["request_to_reserve_skipped"] += 1  # kept a stranger, as a probe helper
            on_done(None)
            return
        tid = self._next_tid()
        req = m.Request(command, tid, self.node_id, target, token, value)
        data = m.encode_request(req)
        p = _Pending(tid, addr, data, retries, on_done)
        self._pending[tid] = p
        self._send(data, addr)
        p.timer = self._timers.call_at(
            self._now + self.params.request_timeout, lambda: self._on_timeout(tid)
        )
        if on_slow is not None:
            p.slow_timer = self._timers.call_at(
                self._now + self.params.slow_after, lambda: self._on_slow(tid, on_slow)
            )

    def _on_slow(self, tid: int, on_slow: Callable[[], None]) -> None:
        """A lookup request unanswered after ``slow_after``: it stops counting against alpha,
        and is sent once more, because on a lossy path it is far more likely lost than slow,
        and a lookup cannot finish while one of its k nearest is still owed an answer."""
        p = self._pending.get(tid)
        if p is None:
            return
        p.slow_timer = None
        self.stats["retransmit_slow"] += 1
        self._send(p.datagram, p.addr)
        on_slow()

    def _on_timeout(self, tid: int) -> None:
        p = self._pending.get(tid)
        if p is None:
            return
        if p.tries_left > 0:
            p.tries_left -= 1
            self.stats["retransmit"] += 1
            self._send(p.datagram, p.addr)
            p.timer = self._timers.call_at(
                self._now + self.params.request_timeout, lambda: self._on_timeout(tid)
            )
            return
        del self._pending[tid]
        self.stats["request_timeout"] += 1
        if p.slow_timer is not None:
            p.slow_timer.cancel()
        self.table.failed(p.addr)
        p.on_done(None)

    def _respond(self, req: m.Request, to: Address, **fields: Any) -> None:
        resp = m.Response(req.command, req.tid, to, self.node_id, **fields)
        self._send(m.encode_response(resp), to)

    # ------------------------------------------------------------------ receiving

    def _on_response(self, resp: m.Response, source: Address) -> None:
        p = self._pending.get(resp.tid)
        if p is None or p.addr != source:
            # Late, duplicated, replayed or spoofed: tid AND source must match a request.
            self.stats["drop_unmatched"] += 1
            return
        del self._pending[resp.tid]
        if p.timer is not None:
            p.timer.cancel()
        if p.slow_timer is not None:
            p.slow_timer.cancel()
        self.stats["rx_response"] += 1
        if self._fixed_public is None and self.observer.add(source, resp.to):
            self._on_address_change()
        if resp.id is not None:
            self._maybe_add(resp.id, source)
        p.on_done(resp)

    def _maybe_add(self, claimed_id: bytes, source: Address) -> None:
        if claimed_id != node_id_for(source):
            self.stats["drop_bad_id"] += 1
            return
        if source == self.public:
            return
        stale = self.table.add(claimed_id, source, self._now)
        if stale is not None:
            # Full bucket: keep the old contact if it still answers (Kademlia's rule).
            self._request(stale.addr, m.Command.PING, _ignore)

    def _on_request(self, req: m.Request, source: Address) -> None:
        self.stats["rx_request"] += 1
        if req.id is not None:
            self._maybe_add(req.id, source)
        if (
            not self.ephemeral
            and req.command is not m.Command.PROBE  # judged by its nonce, in _on_probe
            and not self._sent_to.solicited(source)
        ):
            self._on_unsolicited_request(source)
        if req.command is not m.Command.PROBE:
            self._recent_requesters[source] = self._now
            self._recent_requesters.move_to_end(source)
            if len(self._recent_requesters) > MAX_RECENT_REQUESTERS:
                self._recent_requesters.popitem(last=False)
        handler = self._handlers.get(req.command)
        if handler is None:
            self._respond(req, source, error=m.ErrorCode.UNKNOWN_COMMAND)
            return
        handler(self, req, source)

    def _on_unsolicited_request(self, source: Address) -> None:
        """A request from an address we never sent to got through: whatever is in front of us
        lets strangers in, which is what reachability means. While our public address in its
        family is unknown (the first node of a network has nobody to ask), ask the stranger."""
        if not self.reachable:
            self.events.append(("reachable_by_request", {"from": wire_address.format_addr(source)}))
            self._set_reachable(True)
        family = wire_address.family_of(source[0])
        if (
            self._fixed_public is None
            and self._address_pings < MAX_ADDRESS_PINGS
            and all(wire_address.family_of(a[0]) != family for a in self.observer.public_addresses)
        ):
            # Our address in the stranger's family is unknown (the first node of a network, or
            # the other family of a dual-stack node): its answer tells it.
            self._address_pings += 1
            self._request(source, m.Command.PING, _ignore)

    def _on_ping(self, req: m.Request, source: Address) -> None:
        self._respond(req, source)

    def _closer_contacts(self, target: bytes, source: Address) -> list[Contact]:
        # Only the requester's address family (it may have no route to the other one), and
        # never the requester itself. Asking the table for exactly k first matters: k nearest
        # usually sit in one full bucket, k + 1 makes it rank every deeper bucket too.
        k = self.params.k
        v6 = ":" in source[0]
        want = k
        while True:
            near = self.table.closest(target, want)
            out = [c for c in near if (":" in c.addr[0]) is v6 and c.addr != source]
            if len(out) >= k or len(near) < want:
                return out[:k]
            want *= 2

    def _closer_nodes(self, target: bytes, source: Address) -> tuple[Address, ...]:
        return tuple(c.addr for c in self._closer_contacts(target, source))

    def _on_find_node(self, req: m.Request, source: Address) -> None:
        if req.target is None:
            self._respond(req, source, error=m.ErrorCode.MISSING_FIELD)
            return
        packed = [c.packed for c in self._closer_contacts(req.target, source)]
        self._send(
            m.encode_nodes_response(req.command, req.tid, source, self.node_id, packed), source
        )

    def _on_lookup(self, req: m.Request, source: Address) -> None:
        if req.target is None:
            self._respond(req, source, error=m.ErrorCode.MISSING_FIELD)
            return
        nodes = self._closer_nodes(req.target, source)
        if not self.server:
            self._respond(req, source, nodes=nodes)
            return
        token = self.tokens.issue(source, self._now)
        base = m.Response(req.command, req.tid, source, self.node_id, token, nodes)
        budget = m.MAX_SEND_SIZE - len(m.encode_response(base)) - 3
        # A busy topic holds more than one answer fits: each answer is a fresh random share,
        # so that a lookup, which asks k storers, collects nearly all of it (not k copies of
        # the newest few).
        live = self.store.get(req.target, self._now)
        self._rng.shuffle(live)
        picked: list[Record] = []
        used = 0
        for rec in live[:MAX_RECORDS_PER_MESSAGE]:
            size = len(rec.body()) + len(rec.signature)
            if used + size > budget:
                continue  # a smaller record may still fit
            picked.append(rec)
            used += size
        value = encode_record_list(picked) if picked else None
        self._respond(req, source, token=token, nodes=nodes, value=value)

    def _check_write(self, req: m.Request, source: Address) -> bool:
        if not self.server:
            self._respond(req, source, error=m.ErrorCode.NOT_SERVING)
            return False
        if req.target is None or req.value is None or req.token is None:
            self._respond(req, source, error=m.ErrorCode.MISSING_FIELD)
            return False
        if not self.tokens.check(req.token, source, self._now):
            self.stats["drop_bad_token"] += 1
            self._respond(req, source, error=m.ErrorCode.BAD_TOKEN)
            return False
        return True

    def _on_announce(self, req: m.Request, source: Address) -> None:
        if not self._check_write(req, source):
            return
        assert req.target is not None and req.value is not None
        try:
            rec = decode_single_record(req.value)
        except RecordError:
            self.stats["drop_bad_records"] += 1
            self._respond(req, source, error=m.ErrorCode.BAD_RECORD)
            return
        # Cheap checks first; the signature is verified only for a record we would keep.
        if not self.store.is_fresh(rec.seq, self._wall()):
            self.stats["drop_stale_record"] += 1
            self._respond(req, source, error=m.ErrorCode.STALE)
            return
        if not rec.verify(req.target):
            self.stats["drop_bad_signature"] += 1
            self._respond(req, source, error=m.ErrorCode.BAD_RECORD)
            return
        result = self.store.put(req.target, rec, source[0], self._now, self._wall())
        if result is PutResult.STALE:
            self.stats["drop_replayed_record"] += 1
            self._respond(req, source, error=m.ErrorCode.STALE)
        elif result is PutResult.FULL:
            self.stats["drop_store_full"] += 1
            self._respond(req, source, error=m.ErrorCode.FULL)
        else:
            self.stats["records_stored"] += 1
            self._respond(req, source)

    def _on_unannounce(self, req: m.Request, source: Address) -> None:
        if not self._check_write(req, source):
            return
        assert req.target is not None and req.value is not None
        try:
            w = decode_withdrawal(req.value)
        except RecordError:
            self._respond(req, source, error=m.ErrorCode.BAD_RECORD)
            return
        if not w.verify(req.target):
            self.stats["drop_bad_signature"] += 1
            self._respond(req, source, error=m.ErrorCode.BAD_RECORD)
            return
        if self.store.withdraw(req.target, w, self._now, self._wall()):
            self._respond(req, source)
        else:
            self._respond(req, source, error=m.ErrorCode.STALE)

    def _on_check_reachable(self, req: m.Request, source: Address) -> None:
        if req.value is None or len(req.value) < 16:
            self._respond(req, source, error=m.ErrorCode.MISSING_FIELD)
            return
        nonce = req.value[:16]
        helpers: list[Address] = []
        if len(req.value) > 16:
            try:
                named, end = wire_address.decode(req.value, 16)
            except DecodeError:
                self.stats["drop_malformed"] += 1
                return
            if end != len(req.value):
                self.stats["drop_malformed"] += 1
                return
            # Only a node we know may be made to receive a FORWARD_PROBE (no reflection to
            # arbitrary addresses).
            if named != source and (named in self._sent_to or self.table.get(named)):
                helpers.append(named)
        helpers += [
            h for h in self._pick_probe_helpers(source, PROBE_HELPERS) if h not in helpers
        ][: PROBE_HELPERS - len(helpers)]
        if not helpers:
            self._respond(req, source, error=m.ErrorCode.NOT_SERVING)
            return
        # Answer once a helper says it sent the probe (or all declined): an asker told "sent"
        # counts a missing probe as evidence against itself.
        left = [len(helpers)]

        def acked(resp: m.Response | None) -> None:
            if left[0] <= 0:
                return
            left[0] -= 1
            if resp is not None and resp.error is None:
                left[0] = 0
                self._respond(req, source)
            elif left[0] == 0:
                self._respond(req, source, error=m.ErrorCode.NOT_SERVING)

        body = wire_address.encode(source) + nonce
        for helper in helpers:
            self._request(helper, m.Command.FORWARD_PROBE, acked, value=body)

    def _pick_probe_helpers(self, source: Address, n: int) -> list[Address]:
        """Nodes other than ``source`` that recently sent us a request (so they accept our
        FORWARD_PROBE), preferring other IPs than the checked node's. One proven server
        (from our table) comes first: it always helps, so the nodes behind NATs get their
        verdict without spending the probes of newcomers that still need their own."""
        horizon = self._now - RECENT_REQUESTER_TTL
        fresh = [a for a, t in self._recent_requesters.items() if t >= horizon and a != source]
        other_ip = [a for a in fresh if a[0] != source[0]]
        pool = other_ip if len(other_ip) >= n else fresh
        proven = [a for a in pool if self.table.get(a) is not None]
        out = self._rng.sample(proven, min(1, len(proven), n))
        rest = [a for a in pool if a not in out]
        return out + self._rng.sample(rest, min(n - len(out), len(rest)))

    def _on_forward_probe(self, req: m.Request, source: Address) -> None:
        # Only nodes we use may make us send a datagram to a third party, at a bounded rate.
        if source not in self._sent_to or req.value is None:
            self.stats["drop_forward_probe"] += 1
            return
        if self._probes_this_tick >= MAX_PROBES_PER_TICK:
            self.stats["drop_forward_probe_rate"] += 1
            self._respond(req, source, error=m.ErrorCode.NOT_SERVING)
            return
        try:
            target, pos = wire_address.decode(req.value)
        except DecodeError:
            self.stats["drop_malformed"] += 1
            return
        nonce = req.value[pos:]
        if len(nonce) != 16:
            self.stats["drop_malformed"] += 1
            return
        if target in self._reserve or self._guarding_own_check(target):
            # We stay silent towards our own reserved helpers; and while our own check runs,
            # probing the target would make its probe to us (maybe on its way now) look
            # solicited: two newcomers helping each other in step would never prove anything.
            self.stats["forward_probe_declined"] += 1
            self._respond(req, source, error=m.ErrorCode.NOT_SERVING)
            return
        self._probes_this_tick += 1
        self.stats["forward_probe_sent"] += 1
        self._respond(req, source)
        probe = m.Request(m.Command.PROBE, self._rng.getrandbits(32), None, None, None, nonce)
        # Like any send, this opens our own NAT to the target: its later traffic is solicited.
        self._send(m.encode_request(probe), target)

    def _guarding_own_check(self, target: Address) -> bool:
        """Would probing ``target`` cost us a helper our own open verdict may need?

        Only a target we never sent to can still prove us reachable, so only those are worth
        guarding, and only while we are unproven: always while our own check waits for its
        probe, and every other time at random (so that two newcomers asking each other for
        help neither both refuse nor both spoil each other). Nodes behind a filtering or
        port-randomizing NAT have their verdict and help freely: they are the best helpers,
        since nobody has talked to them."""
        if (
            self.reachable
            or self._failed_checks > 0
            or self.observer.nat_class is NatClass.RANDOM
            or self._sent_to.solicited(target)
        ):
            return False
        return bool(self._probe_nonces) or self._rng.random() < 0.5

    def _on_probe(self, req: m.Request, source: Address) -> None:
        check = self._probe_nonces.get(req.value or b"")
        if check is None:
            self.stats["drop_probe"] += 1
            return
        if self._sent_to.solicited(source):
            # Inconclusive: our own traffic may have opened our NAT to it.
            self.stats["probe_solicited"] += 1
            self.events.append(("probe_inconclusive", {"from": wire_address.format_addr(source)}))
            check.inconclusive = True
            return
        check.succeeded = True
        self._set_reachable(True)

    _handlers: ClassVar[dict[m.Command, Callable[[DhtNode, m.Request, Address], None]]] = {
        m.Command.PING: _on_ping,
        m.Command.FIND_NODE: _on_find_node,
        m.Command.LOOKUP: _on_lookup,
        m.Command.ANNOUNCE: _on_announce,
        m.Command.UNANNOUNCE: _on_unannounce,
        m.Command.CHECK_REACHABLE: _on_check_reachable,
        m.Command.FORWARD_PROBE: _on_forward_probe,
        m.Command.PROBE: _on_probe,
    }

    # ------------------------------------------------------------------ lookups and writes

    def _lookup(
        self,
        target: bytes,
        command: m.Command,
        on_reply: Callable[[Address, m.Response], None] | None,
        *,
        extra: Iterable[Address] = (),
        bypass_reserve: bool = False,
    ) -> Op[Lookup]:
        """An iterative lookup. Maintenance lookups leave the probe reserve alone; a user's
        lookup, announce or unannounce (``bypass_reserve``) may not lose storers to it."""
        exclude = {self.public} if self.public else set()
        lk = Lookup(target, k=self.params.k, alpha=self.params.alpha, exclude=exclude)
        lk.add_candidates(c.addr for c in self.table.closest(target, self.params.k))
        lk.add_candidates(extra)
        if len(self.table) == 0:
            lk.add_candidates(self._seeds)
        op: Op[Lookup] = Op()
        self.stats["lookups"] += 1

        def pump() -> None:
            if op.done:
                return
            for addr in lk.next_queries():
                # A request to a reserved probe helper fails at once (answered(None)), which
                # pumps the next candidate.
                self._request(
                    addr,
                    command,
                    functools.partial(answered, addr),
                    target=target,
                    on_slow=functools.partial(slow, addr),
                    bypass_reserve=bypass_reserve,
                )
            if lk.done:
                op.set_result(lk)

        def answered(addr: Address, resp: m.Response | None) -> None:
            if resp is None:
                lk.on_failure(addr)
            else:
                if resp.nodes and len(self._reserve) < PROBE_RESERVE and self._wants_reserve():
                    self._fill_reserve(addr, resp.nodes)
                lk.on_response(addr, resp.nodes or ())
                if on_reply is not None and not op.done:
                    on_reply(addr, resp)
            pump()

        def slow(addr: Address) -> None:
            lk.on_slow(addr)
            pump()

        pump()
        return op

    def _next_seq(self) -> int:
        seq = max(int(self._wall() * 1000), self._last_seq + 1)
        self._last_seq = seq
        return seq

    def _record_addresses(self, storers: list[Address]) -> tuple[tuple[AddressKind, Address], ...]:
        out: list[tuple[AddressKind, Address]] = []
        if self.public is not None:
            out.append((AddressKind.DIRECT, self.public))
        # A dual-stack node is also reachable (or punchable) at its other family's address.
        out.extend(
            (AddressKind.DIRECT, a) for a in self.observer.public_addresses if a != self.public
        )
        out.extend((AddressKind.RELAY, a) for a in storers[:3])
        return tuple(out)

    def _write(self, topic: bytes, *, withdraw: bool) -> Op[int]:
        tokens: dict[Address, bytes] = {}

        def collect(addr: Address, resp: m.Response) -> None:
            if resp.token is not None and resp.id == node_id_for(addr):
                tokens[addr] = resp.token

        op: Op[int] = Op()
        lk_op = self._lookup(topic, m.Command.LOOKUP, collect, bypass_reserve=True)

        def store(o: Op[Lookup]) -> None:
            lk = o.result()
            storers = [a for a in lk.closest_responded(2 * self.params.k) if a in tokens]
            storers = storers[: self.params.k]
            seq = self._next_seq()
            local = 0
            if withdraw:
                w = sign_withdrawal(self.identity, topic, seq)
                value = w.encode()
                command = m.Command.UNANNOUNCE
                if self.server and self.store.withdraw(topic, w, self._now, self._wall()):
                    local = 1
            else:
                rec = sign_record(self.identity, topic, seq, self._record_addresses(storers))
                value = rec.encode()
                command = m.Command.ANNOUNCE
                if self.server:
                    own = self.public[0] if self.public else "self"
                    res = self.store.put(topic, rec, own, self._now, self._wall())
                    local = int(res in (PutResult.STORED, PutResult.REPLACED))
            if not storers:
                if local:
                    op.set_result(local)
                else:
                    op.set_error(OperationError("no DHT node answered; is a bootstrap reachable?"))
                return
            acks = [local]
            waiting = [len(storers)]

            def acked(resp: m.Response | None) -> None:
                if resp is not None and resp.error is None:
                    acks[0] += 1
                waiting[0] -= 1
                if waiting[0] == 0:
                    ann = self._announced.get(topic)
                    if ann is not None and not withdraw:
                        ann.storers = acks[0]
                    op.set_result(acks[0])

            for a in storers:
                self._request(
                    a, command, acked, target=topic, token=tokens[a], value=value,
                    retries=self.params.retries, bypass_reserve=True,
                )

        lk_op.add_done_callback(store)
        return op

    def _refresh_announcement(self, topic: bytes) -> None:
        if topic in self._announced and not self._closed:
            self.events.append(("announce_refresh", {"topic": topic.hex()}))
            self.announce(topic)

    # ------------------------------------------------------------------ reachability

    def _check_reachability(self) -> None:
        if self._closed or self._fixed_public is not None or self._assume_reachable:
            return
        servers = list(self.table)
        if not servers or self.observer.nat_class is NatClass.RANDOM:
            # A port-randomizing NAT can never serve, whatever a probe says: asking would only
            # spend other newcomers' helpers. Look again later (the mapping may change).
            self._schedule_check(self._check_backoff)
            self._check_backoff = min(self._check_backoff * 2, MAX_CHECK_RETRY)
            return
        nonce = self._rng.randbytes(16)
        check = _PendingProbe(self._now + PROBE_WAIT)
        self._probe_nonces[nonce] = check
        if not self._reserve and len(servers) >= 2 and self._wants_reserve():
            # Nobody is left that we never talked to: set a contact aside and stay silent
            # towards it until it is a stranger again (SENT_TO_TTL), so that even a network of
            # three eventually proves its public nodes.
            aside, via = self._rng.sample(servers, 2)
            self._reserve[aside.addr] = via.addr
        # Ask the servers that told us of our reserved helpers to use them (once those are
        # strangers to us), and fill up with random servers that pick helpers of their own.
        asks: list[tuple[Address, Address | None]] = [
            (r, h) for h, r in self._reserve.items() if not self._sent_to.solicited(h)
        ]
        others = [
            c.addr
            for c in servers
            if c.addr not in self._reserve and all(c.addr != a for a, _ in asks)
        ]
        asks += [(a, None) for a in self._rng.sample(others, min(2 - len(asks), len(others)))]
        for addr, helper in asks[:2]:
            check.asked.append(addr)
            if helper is not None:
                check.named.append(helper)
            value = nonce if helper is None else nonce + wire_address.encode(helper)
            self._request(
                addr,
                m.Command.CHECK_REACHABLE,
                functools.partial(self._check_answered, nonce, check),
                value=value,
            )
        check.timer = self._timers.call_at(check.expires, lambda: self._check_done(nonce))

    def _check_answered(self, nonce: bytes, check: _PendingProbe, resp: m.Response | None) -> None:
        check.answers += 1
        if resp is not None and resp.error is None:
            check.forwarded = True
        elif check.answers == len(check.asked) and not check.forwarded:
            # Nobody could find a helper: no probe is coming, so do not wait for one.
            if check.timer is not None:
                check.timer.cancel()
            self._check_done(nonce)

    def _check_done(self, nonce: bytes) -> None:
        check = self._probe_nonces.pop(nonce, None)
        if check is None:
            return
        if check.succeeded:
            self._failed_checks = 0
            self._check_backoff = FIRST_CHECK_RETRY
            self._schedule_check(self.params.reachability_recheck)
            return
        if check.forwarded and not check.inconclusive:
            # Probes were sent and none came through: evidence of a filtering NAT. The named
            # helpers may also be gone: let the reserve take others.
            for helper in check.named:
                self._reserve.pop(helper, None)
            self._failed_checks += 1
            if self.reachable and self._failed_checks >= DEMOTE_AFTER_FAILED_CHECKS:
                self._set_reachable(False)
        if self.reachable:
            delay = self.params.reachability_recheck
        else:
            delay = self._check_backoff
            self._check_backoff = min(self._check_backoff * 2, MAX_CHECK_RETRY)
        self._schedule_check(delay)

    def _schedule_check(self, delay: float) -> None:
        # Jitter: nodes that joined together must not keep checking (and helping each other,
        # which spoils each other's probes) in lockstep.
        delay *= self._rng.uniform(0.75, 1.25)
        self._timers.call_at(self._now + delay, self._check_reachability)

    def _wants_reserve(self) -> bool:
        if self.observer.nat_class is NatClass.RANDOM:
            return False  # a random mapping can never serve: no check to keep helpers for
        if self._failed_checks >= RESERVE_GIVE_UP:
            return False  # probes keep not coming through: a filtering NAT, not a small network
        return not (
            self.reachable
            or self.ephemeral
            or self._closed
            or self._fixed_public is not None
            or self._assume_reachable
        )

    def _fill_reserve(self, referrer: Address, nodes: Iterable[Address]) -> None:
        """Keep servers we have just heard of, and never talked to, out of our own traffic:
        the only helpers whose probe can prove us reachable once we have talked to all others."""
        # One helper only until two servers have told us how they see us: classifying the
        # NAT needs samples from several nodes, and in a 2-server network the second is both.
        limit = PROBE_RESERVE if self.observer.sample_count >= 2 else 1
        for addr in nodes:
            if len(self._reserve) >= limit:
                return
            if addr != self.public and addr not in self._reserve and addr not in self._sent_to:
                self._reserve[addr] = referrer

    def _set_reachable(self, value: bool) -> None:
        if value:
            self._reserve.clear()
        if self.reachable != value:
            self.reachable = value
            self.events.append(("reachability_changed", {"reachable": value}))
        self._update_mode()

    def _on_address_change(self) -> None:
        self.public = self.observer.public_address
        if self.observer.nat_class is NatClass.RANDOM:
            self._reserve.clear()
        shown = wire_address.format_addr(self.public) if self.public else None
        self.events.append(
            (
                "public_address_changed",
                {"public_address": shown, "nat_class": self.observer.nat_class.value},
            )
        )
        self._update_mode()

    def _update_mode(self) -> None:
        """Serve (enter others' tables, store records) only when reachable at a known,
        consistently mapped address; the node id follows that address."""
        if self._fixed_public is not None:
            return
        want = (
            self.reachable
            and self.public is not None
            and self.observer.nat_class is not NatClass.RANDOM
        )
        new_id = node_id_for(self.public) if want and self.public else None
        if want and (not self.server or new_id != self.table.local_id):
            assert new_id is not None
            self._rebuild_table(new_id)
            self.server = True
            self.events.append(("serving", {"node_id": new_id.hex()}))
            # Tell our new neighbourhood about us: requests now carry our id.
            self._lookup(new_id, m.Command.FIND_NODE, None)
        elif not want and self.server:
            self.server = False
            self._rebuild_table(self._rng.randbytes(ID_LEN))
            self.events.append(("client_mode", {}))

    def _rebuild_table(self, local_id: bytes) -> None:
        old = list(self.table)
        self.table = RoutingTable(local_id, self.params.k)
        for c in old:
            self.table.add(c.id, c.addr, c.last_seen)

    # ------------------------------------------------------------------ periodic work

    def _tick(self) -> None:
        now = self._now
        self._probes_this_tick = 0
        self._address_pings = 0
        expired = self.store.expire(now)
        if expired:
            self.stats["records_expired"] += expired
        self._sent_to.expire(now)
        horizon = now - RECENT_REQUESTER_TTL
        while self._recent_requesters and next(iter(self._recent_requesters.values())) < horizon:
            self._recent_requesters.popitem(last=False)
        if not self._closed:
            self._timers.call_at(now + TICK_INTERVAL, self._tick)

    def _refresh_buckets(self) -> None:
        if self._closed:
            return
        for i in self.table.stale_buckets(self._now, self.params.bucket_refresh)[:8]:
            self.table.touch_bucket(i, self._now)
            self._lookup(self.table.random_id_in_bucket(i, self._rng), m.Command.FIND_NODE, None)
        self._timers.call_at(self._now + self.params.bucket_refresh / 4, self._refresh_buckets)

    def _grow_table(self) -> None:
        """While the table is thin (a young network, or we joined early), look up our own
        neighbourhood again with a growing interval; an empty table falls back to the seeds."""
        if self._closed:
            return
        if len(self.table) < self.params.k:
            self._lookup(self.table.local_id, m.Command.FIND_NODE, None)
            self._grow_delay = min(self._grow_delay * 2, self.params.rejoin_interval)
        else:
            self._grow_delay = self.params.rejoin_interval
        self._timers.call_at(self._now + self._grow_delay, self._grow_table)
