"""The routing table's upkeep and the answers that come from it.

Owns: admitting contacts (only ids that match their source address; ping-before-evict when a
bucket is full), PING and FIND_NODE answers, bucket refresh, growth lookups while the table is
thin, and rebuilding the table around a new local id when the node's standing changes.

Must not decide the node's standing (``node.py``) or touch records (``storage.py``).
"""

from __future__ import annotations

from dhtnode.dht.context import NodeContext
from dhtnode.dht.ids import node_id_for
from dhtnode.dht.query import Queries
from dhtnode.dht.routing import Contact, RoutingTable
from dhtnode.dht.rpc import Rpc
from dhtnode.wire import messages as m
from dhtnode.wire.address import Address

#: Seconds after joining before the first extra self-lookup of a thin routing table.
FIRST_GROW_DELAY = 2.0


class Maintenance:
    def __init__(self, ctx: NodeContext, rpc: Rpc, queries: Queries) -> None:
        self._ctx = ctx
        self._rpc = rpc
        self._queries = queries
        self._grow_delay = FIRST_GROW_DELAY
        rpc.register(m.Command.PING, self._on_ping)
        rpc.register(m.Command.FIND_NODE, self._on_find_node)
        ctx.call_later(ctx.params.bucket_refresh / 4, self._refresh_buckets)

    def start_growing(self) -> None:
        """After joining: look up our neighbourhood again while the table is thin."""
        self._ctx.call_later(self._grow_delay, self._grow_table)

    def seen(self, claimed_id: bytes, source: Address) -> None:
        """A request or response carried ``claimed_id``: admit the sender if the id is its."""
        ctx = self._ctx
        if claimed_id != node_id_for(source):
            ctx.stats["drop_bad_id"] += 1
            return
        if source == ctx.standing.public:
            return
        stale = ctx.table.add(claimed_id, source, ctx.now)
        if stale is not None:
            # Full bucket: keep the old contact if it still answers (Kademlia's rule).
            self._rpc.request(stale.addr, m.Command.PING)

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
        packed = [c.packed for c in self.closer_contacts(req.target, source)]
        ctx = self._ctx
        ctx.send(m.encode_nodes_response(req.command, req.tid, source, ctx.node_id, packed), source)

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
            self._queries.run(ctx.table.local_id, m.Command.FIND_NODE)
            self._grow_delay = min(self._grow_delay * 2, ctx.params.rejoin_interval)
        else:
            self._grow_delay = ctx.params.rejoin_interval
        ctx.call_later(self._grow_delay, self._grow_table)
