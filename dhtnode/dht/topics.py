"""The announcer side of topics: look up, announce, refresh, withdraw.

``lookup(topic)`` collects records from the nodes nearest the topic and returns the verified
newest one per key. ``announce(topic)`` stores our signed record on the k nearest nodes that
gave us a write token, names up to three of them as our introducers in the record, and (with
``refresh``) re-announces before the record expires; :meth:`Topics.storers` says which nodes
acknowledged, which a listener needs to keep its NAT open towards them.

Must not answer other nodes' requests (``storage.py`` does).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from dhtnode.crypto.identity import Identity
from dhtnode.dht.context import NodeContext
from dhtnode.dht.ids import node_id_for
from dhtnode.dht.lookup import Lookup
from dhtnode.dht.op import NoAnswer, Op, gather
from dhtnode.dht.query import Queries
from dhtnode.dht.records import (
    AddressKind,
    Record,
    decode_record_list,
    sign_record,
    sign_withdrawal,
)
from dhtnode.dht.rpc import Rpc
from dhtnode.dht.storage import Storage
from dhtnode.dht.store import PutResult
from dhtnode.dht.timers import Timer
from dhtnode.errors import DecodeError
from dhtnode.wire import messages as m
from dhtnode.wire.address import Address

#: Introducers named in a record: enough that one gone leaves others, few enough that the
#: record stays small (each costs 8-20 bytes).
MAX_INTRODUCERS = 3
#: Re-asks (storers asked again, with their token, for records they withheld) a finished walk
#: leaves unanswered, at most, as a share: a lookup re-asks about k storers, so with 2% loss
#: waiting for every one of them would add a resend (slow_after) to half the lookups, while
#: three quarters of the storers' random shares already cover a busy topic.
REFETCH_MAY_MISS = 0.25


@dataclass(slots=True)
class LookupResult:
    records: list[Record]
    nodes_asked: int
    responses: int
    hops: int
    #: The nearest nodes that answered, nearest first.
    closest: list[Address]
    #: Write tokens the storers handed us, by storer (a token also proves our address to an
    #: introducer).
    tokens: dict[Address, bytes] = field(default_factory=dict)
    #: Storers asked a second time, with their token, for the records they withheld from us
    #: while we had not proven our address (MORE).
    refetched: int = 0


@dataclass(slots=True)
class _Announcement:
    topic: bytes
    #: The key the record is signed with (a listener's own key), else the node's.
    identity: Identity | None = None
    timer: Timer | None = None
    #: Nodes that acknowledged the last store.
    storers: list[Address] = field(default_factory=list)
    #: Storers the record names as introducers and that acknowledged it.
    introducers: list[Address] = field(default_factory=list)


class Topics:
    def __init__(self, ctx: NodeContext, rpc: Rpc, queries: Queries, storage: Storage) -> None:
        self._ctx = ctx
        self._rpc = rpc
        self._queries = queries
        self._storage = storage
        self._last_seq = 0
        self._announced: dict[bytes, _Announcement] = {}
        #: Called after every successful (re-)announcement: (topic, introducers that stored it).
        self.on_announced: Callable[[bytes, list[Address]], None] = lambda t, s: None

    @property
    def announced_topics(self) -> list[bytes]:
        return list(self._announced)

    def storers(self, topic: bytes) -> list[Address]:
        ann = self._announced.get(topic)
        return list(ann.storers) if ann else []

    def introducers(self, topic: bytes) -> list[Address]:
        """The nodes our record for ``topic`` names as introducers and that stored it."""
        ann = self._announced.get(topic)
        return list(ann.introducers) if ann else []

    def lookup(self, topic: bytes) -> Op[LookupResult]:
        """Find the verified records of ``topic``: one per public key, newest seq, newest first.

        A storer answers our first request without its records (MORE) until we prove our
        address with the token that answer carries: we ask it again at once, while the walk
        goes on, so the lookup ends about one round trip after the walk (once three quarters
        of the storers asked again have answered)."""
        ctx = self._ctx
        found: dict[bytes, dict[int, Record]] = {}
        tokens: dict[Address, bytes] = {}
        store = self._storage.store
        refetch: set[Address] = set()
        waiting = 0
        walked: list[Lookup] = []

        def collect(addr: Address, resp: m.Response) -> None:
            nonlocal waiting
            if resp.token is not None and resp.id == node_id_for(addr):
                tokens[addr] = resp.token
            if resp.more and resp.token is not None and addr not in refetch:
                refetch.add(addr)
                waiting += 1
                # The request echoes the token just received (Rpc keeps it); a loss is resent
                # after slow_after, as a walk's requests are.
                self._rpc.request(
                    addr,
                    m.Command.LOOKUP,
                    functools.partial(refetched, addr),
                    target=topic,
                    on_slow=lambda: None,
                    user_op=True,
                )
            if resp.value is None:
                return
            try:
                records = decode_record_list(resp.value)
            except DecodeError:
                ctx.stats["drop_bad_records"] += 1
                return
            for rec in records:
                if store.is_fresh(rec.seq, ctx.wall()):
                    found.setdefault(rec.public_key, {})[rec.seq] = rec

        op: Op[LookupResult] = Op()

        def refetched(addr: Address, resp: m.Response | None) -> None:
            nonlocal waiting
            waiting -= 1
            if resp is not None and not op.done:
                collect(addr, resp)
            if walked and waiting <= len(refetch) * REFETCH_MAY_MISS:
                finish()

        def walk_done(o: Op[Lookup]) -> None:
            walked.append(o.result())
            if waiting <= len(refetch) * REFETCH_MAY_MISS:
                finish()

        def finish() -> None:
            if op.done:
                return
            lk = walked[0]
            if ctx.standing.server:
                for rec in store.get(topic, ctx.now):
                    found.setdefault(rec.public_key, {})[rec.seq] = rec
            verified: list[Record] = []
            for versions in found.values():
                for seq in sorted(versions, reverse=True):
                    if versions[seq].verify(topic):
                        verified.append(versions[seq])
                        break
                    ctx.stats["drop_bad_signature"] += 1
            verified.sort(key=lambda r: r.seq, reverse=True)
            k = ctx.params.k
            op.set_result(
                LookupResult(
                    verified, lk.queried, lk.responses, lk.hops, lk.closest_responded(k), tokens,
                    len(refetch),
                )
            )

        self._queries.run(topic, m.Command.LOOKUP, collect, user_op=True).add_done_callback(
            walk_done
        )
        return op

    def announce(
        self, topic: bytes, *, refresh: bool = True, identity: Identity | None = None
    ) -> Op[int]:
        """Store our signed record on the k nodes closest to ``topic``; result: how many
        acknowledged. With ``refresh`` the record is re-announced before it expires until
        :meth:`unannounce` or :meth:`close`. ``identity`` signs instead of the node's key."""
        ctx = self._ctx
        if refresh:
            ann = self._announced.get(topic)
            if ann is None:
                ann = self._announced[topic] = _Announcement(topic, identity)
            if ann.timer is not None:
                ann.timer.cancel()
            interval = ctx.params.record_ttl * 0.45
            ann.timer = ctx.call_later(
                interval * (0.9 + 0.1 * ctx.rng.random()), lambda: self._refresh(topic)
            )
        return self._write(topic, withdraw=False, identity=identity)

    def unannounce(self, topic: bytes, *, identity: Identity | None = None) -> Op[int]:
        ann = self._announced.pop(topic, None)
        if ann is not None and ann.timer is not None:
            ann.timer.cancel()
        if ann is not None and identity is None:
            identity = ann.identity
        return self._write(topic, withdraw=True, identity=identity)

    def close(self) -> Op[int]:
        """Withdraw every announcement; the result counts acknowledged withdrawals."""
        op: Op[int] = Op()

        def done(o: Op[list[Op[int]]]) -> None:
            self._ctx.standing.closed = True
            op.set_result(sum(x.result() for x in o.result() if x.error is None))

        gather([self.unannounce(t) for t in list(self._announced)]).add_done_callback(done)
        return op

    def _next_seq(self) -> int:
        seq = max(int(self._ctx.wall() * 1000), self._last_seq + 1)
        self._last_seq = seq
        return seq

    def _record_addresses(self, storers: list[Address]) -> tuple[tuple[AddressKind, Address], ...]:
        ctx = self._ctx
        public = ctx.standing.public
        out: list[tuple[AddressKind, Address]] = []
        if public is not None:
            out.append((AddressKind.DIRECT, public))
        # A dual-stack node is also reachable (or punchable) at its other family's address.
        out.extend((AddressKind.DIRECT, a) for a in ctx.observer.public_addresses if a != public)
        out.extend((AddressKind.INTRODUCER, a) for a in storers[:MAX_INTRODUCERS])
        return tuple(out)

    def _write(self, topic: bytes, *, withdraw: bool, identity: Identity | None) -> Op[int]:
        ctx = self._ctx
        signer = identity or ctx.identity
        tokens: dict[Address, bytes] = {}

        def collect(addr: Address, resp: m.Response) -> None:
            if resp.token is not None and resp.id == node_id_for(addr):
                tokens[addr] = resp.token

        op: Op[int] = Op()

        def store(o: Op[Lookup]) -> None:
            lk = o.result()
            # The k nearest that gave a token, diverse (at most two per host, half per prefix
            # while others compete): one host with many ports cannot take a topic.
            storers = lk.closest_responded(ctx.params.k, accept=tokens.__contains__)
            seq = self._next_seq()
            local = 0
            held = self._storage.store
            if withdraw:
                w = sign_withdrawal(signer, topic, seq)
                value = w.encode()
                command = m.Command.UNANNOUNCE
                if ctx.standing.server and held.withdraw(topic, w, ctx.now, ctx.wall()):
                    local = 1
            else:
                rec = sign_record(signer, topic, seq, self._record_addresses(storers))
                value = rec.encode()
                command = m.Command.ANNOUNCE
                if ctx.standing.server:
                    own = ctx.standing.public[0] if ctx.standing.public else "self"
                    res = held.put(topic, rec, own, ctx.now, ctx.wall())
                    local = int(res in (PutResult.STORED, PutResult.REPLACED))
            if not storers:
                if local:
                    op.set_result(local)
                else:
                    op.set_error(NoAnswer("no DHT node answered; is a bootstrap reachable?"))
                return
            calls = [
                self._rpc.call(
                    a, command, target=topic, token=tokens[a], value=value,
                    retries=ctx.params.retries, user_op=True,
                )
                for a in storers
            ]

            def acked(g: Op[list[Op[m.Response]]]) -> None:
                ok = [a for a, c in zip(storers, g.result(), strict=True)
                      if c.error is None and c.result().error is None]
                ann = self._announced.get(topic)
                if ann is not None and not withdraw:
                    ann.storers = ok
                    ann.introducers = [a for a in storers[:MAX_INTRODUCERS] if a in ok]
                    if ok:
                        self.on_announced(topic, ann.introducers)
                op.set_result(local + len(ok))

            gather(calls).add_done_callback(acked)

        self._queries.run(topic, m.Command.LOOKUP, collect, user_op=True).add_done_callback(store)
        return op

    def _refresh(self, topic: bytes) -> None:
        if topic in self._announced and not self._ctx.standing.closed:
            self._ctx.emit("announce_refresh", topic=topic.hex())
            self.announce(topic, identity=self._announced[topic].identity)
