"""The routing table's upkeep and the answers that come from it.

Owns: admitting contacts (only ids that match their source address, and only once they
answered one of our requests, as BEP 5 has it: a request from an unknown server earns it a
verification PING, at a bounded rate; ping-before-evict when a bucket is full), PING and
FIND_NODE answers, bucket refresh, growth lookups while the table is
thin, and rebuilding the table around a new local id when the node's standing changes.

Must not decide the node's standing (``node.py``) or touch records (``storage.py``).
"""

from __future__ import annotations

from collections.abc import Callable

from dhtnode.crypto import tokens
from dhtnode.dht.context import NodeContext
from dhtnode.dht.ids import node_id_for
from dhtnode.dht.query import Queries
from dhtnode.dht.ratelimit import TokenBucket
from dhtnode.dht.routing import Contact, RoutingTable
from dhtnode.dht.rpc import Rpc
from dhtnode.wire import address as wire_address
from dhtnode.wire import messages as m
from dhtnode.wire.address import Address
from dhtnode.wire.network import NETWORK_ID_LEN

#: Seconds after joining before the first extra self-lookup of a thin routing table.
FIRST_GROW_DELAY = 2.0
#: Verification PINGs to unknown requesters per second: forged requests can make the node
#: ping the addresses they name only this often.
VERIFY_RATE = 4.0
#: ... and in a burst: enough for the wave of newcomers a young network sees.
VERIFY_BURST = 32.0
#: Requesters remembered as being verified (not pinged again meanwhile).
MAX_VERIFYING = 256
#: Seconds before an unanswered verification may be tried again.
VERIFY_RETRY = 60.0


class Maintenance:
    def __init__(self, ctx: NodeContext, rpc: Rpc, queries: Queries) -> None:
        self._ctx = ctx
        self._rpc = rpc
        self._queries = queries
        self._grow_delay = FIRST_GROW_DELAY
        self._verify_budget = TokenBucket(VERIFY_RATE, VERIFY_BURST, ctx.now)
        self._verifying: dict[Address, float] = {}
        #: The table is empty and the next growth lookup falls back to the seeds: the driver
        #: may refresh them first (the daemon re-resolves bootstrap names; ``DhtNode.on_rejoin``).
        self.on_rejoin: Callable[[], None] = lambda: None
        rpc.register(m.Command.PING, self._on_ping)
        rpc.register(m.Command.FIND_NODE, self._on_find_node)
        ctx.call_later(ctx.params.bucket_refresh / 4, self._refresh_buckets)

    def start_growing(self) -> None:
        """After joining: look up our neighbourhood again while the table is thin."""
        self._ctx.call_later(self._grow_delay, self._grow_table)

    def seen(self, claimed_id: bytes, source: Address, *, answered: bool = True) -> None:
        """A response (``answered``) or a request carried ``claimed_id``. An answer to our own
        request admits the sender if the id is its; a request only refreshes a known contact,
        or earns an unknown one a verification PING (its source may be forged)."""
        ctx = self._ctx
        if claimed_id != node_id_for(source):
            ctx.stats["drop_bad_id"] += 1
            return
        if ctx.own_address(source):
            return  # ourselves, through our address of the other family
        if not answered:
            if not ctx.table.touch(source, ctx.now):
                self._verify(claimed_id, source)
            return
        stale = ctx.table.add(claimed_id, source, ctx.now)
        if stale is not None:
            # Full bucket: keep the old contact if it still answers (Kademlia's rule).
            self._rpc.request(stale.addr, m.Command.PING)

    def _verify(self, claimed_id: bytes, source: Address) -> None:
        """PING an unknown server that sent us a request, if the table would take it: its
        answer (through :meth:`seen`) admits it. Only servers do this; clients fill their
        tables from the answers their own lookups get."""
        ctx = self._ctx
        if not ctx.standing.server or not ctx.table.admits(claimed_id, source):
            return
        since = self._verifying.get(source)
        if since is not None and ctx.now - since < VERIFY_RETRY:
            return
        if not self._verify_budget.take(ctx.now):
            ctx.stats["verify_rate_limited"] += 1
            return
        self._verifying[source] = ctx.now
        while len(self._verifying) > MAX_VERIFYING:
            del self._verifying[next(iter(self._verifying))]
        ctx.stats["verify_ping"] += 1

        def done(_: m.Response | None) -> None:
            self._verifying.pop(source, None)

        self._rpc.request(source, m.Command.PING, done)

    def rebuild(self, local_id: bytes) -> None:
        old = list(self._ctx.table)
        table = RoutingTable(local_id, self._ctx.params.k)
        for c in old:
            table.add(c.id, c.addr, c.last_seen)
        self._ctx.table = table

    def closer_contacts(self, target: bytes, source: Address) -> list[Contact]:
        # Only the requester's address family (it may have no route to the other one), and
        # never the requester itself. Asking the table for exactly k first matters: k nearest
        # usually sit in one full bucket, k + 1 makes it rank every deeper bucket too.
        k = self._ctx.params.k
        v6 = ":" in source[0]
        want = k
        while True:
            near = self._ctx.table.closest(target, want)
            out = [c for c in near if (":" in c.addr[0]) is v6 and c.addr != source]
            if len(out) >= k or len(near) < want:
                return out[:k]
            want *= 2

    def closer_nodes(self, target: bytes, source: Address) -> tuple[Address, ...]:
        return tuple(c.addr for c in self.closer_contacts(target, source))

    def _on_ping(self, req: m.Request, source: Address) -> None:
        self._rpc.respond(req, source)

    def _on_find_node(self, req: m.Request, source: Address) -> None:
        if req.target is None:
            self._rpc.respond(req, source, error=m.ErrorCode.MISSING_FIELD)
            return
        ctx = self._ctx
        rpc = self._rpc
        packed = [c.packed for c in self.closer_contacts(req.target, source)]
        node_id = ctx.id_for(source)
        # The hot path of Rpc.respond: an unproven source gets a token (its next request is
        # proven) and the nearest nodes its amplification budget allows (requesters pad a
        # first request so that all k fit); an aging token is refreshed.
        proof = rpc.proof(req, source)
        token = None if proof == tokens.CURRENT else ctx.tokens.issue(source, ctx.now)
        if proof == tokens.INVALID:
            # Nodes are of the requester's family: all as long as its own address.
            alen = wire_address.compact_len(source)
            fixed = m.HEADER_LEN + alen + (32 if node_id else 0) + 1 + tokens.TOKEN_LEN + 1
            if ctx.params.network is not None:
                fixed += NETWORK_ID_LEN
            budget = rpc.answer_budget(req, source, proof)
            if budget < fixed:
                # Our PING to verify it took most of the budget: no room for a token either.
                token = None
                fixed -= 1 + tokens.TOKEN_LEN
                if budget < fixed:
                    ctx.stats["drop_over_budget"] += 1
                    return
            fit = (budget - fixed) // alen
            if fit < len(packed):
                ctx.stats["answer_trimmed"] += 1
                del packed[fit:]
        data = m.encode_nodes_response(req.command, req.tid, source, node_id, packed, token,
                                       ctx.params.network)
        ctx.send(data, source)

    def _refresh_buckets(self) -> None:
        ctx = self._ctx
        if ctx.standing.closed:
            return
        for i in ctx.table.stale_buckets(ctx.now, ctx.params.bucket_refresh)[:8]:
            ctx.table.touch_bucket(i, ctx.now)
            self._queries.run(ctx.table.random_id_in_bucket(i, ctx.rng), m.Command.FIND_NODE)
        ctx.call_later(ctx.params.bucket_refresh / 4, self._refresh_buckets)

    def _grow_table(self) -> None:
        """While the table is thin (a young network, or we joined early), look up our own
        neighbourhood again with a growing interval; an empty table falls back to the seeds."""
        ctx = self._ctx
        if ctx.standing.closed:
            return
        if len(ctx.table) < ctx.params.k:
            if len(ctx.table) == 0:
                ctx.emit("dht_rejoin", seeds=len(self._queries.seeds))
                self.on_rejoin()
            self._queries.run(ctx.table.local_id, m.Command.FIND_NODE)
            self._grow_delay = min(self._grow_delay * 2, ctx.params.rejoin_interval)
        else:
            self._grow_delay = ctx.params.rejoin_interval
        ctx.call_later(self._grow_delay, self._grow_table)
