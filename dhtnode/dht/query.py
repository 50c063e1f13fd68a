"""The iterative query: drive a :class:`~dhtnode.dht.lookup.Lookup` walk over the RPC layer.

``Queries.run(target, command, on_reply)`` keeps ``alpha`` requests in flight toward the
nodes nearest ``target``, feeds every answer's closer nodes back into the walk, and resolves
an :class:`Op` with the finished walk (``closest_responded`` etc.). Any command whose
responses carry closer nodes works (FIND_NODE, LOOKUP, ...); ``on_reply`` sees each answer.

Owns nothing but the pump; the walk's rules live in ``lookup.py``, sending in ``rpc.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

from dhtnode.crypto.tokens import TOKEN_LEN
from dhtnode.dht.context import NodeContext
from dhtnode.dht.lookup import Lookup
from dhtnode.dht.op import Op
from dhtnode.dht.rpc import Rpc
from dhtnode.wire import address as wire_address
from dhtnode.wire import messages as m
from dhtnode.wire.address import Address


def nodes_answer_size(addr: Address, k: int) -> int:
    """Bytes of a full closer-nodes answer from ``addr`` to a requester it has no proof from:
    header, ``to``, id, token and k addresses of its family. Each hop of a walk pads its
    request to a peer whose token we lack so that this fits the peer's amplification budget:
    the walk gets whole node lists without an extra round trip."""
    alen = wire_address.compact_len(addr)
    return m.HEADER_LEN + alen + 32 + 1 + TOKEN_LEN + 1 + k * alen


class Queries:
    def __init__(self, ctx: NodeContext, rpc: Rpc) -> None:
        self._ctx = ctx
        self._rpc = rpc
        #: Seeds tried when the routing table is empty.
        self.seeds: list[Address] = []
        #: Every answer's closer nodes: (who answered, the nodes it named).
        self.on_nodes: Callable[[Address, tuple[Address, ...]], None] = lambda a, n: None

    def run(
        self,
        target: bytes,
        command: m.Command,
        on_reply: Callable[[Address, m.Response], None] | None = None,
        *,
        extra: Iterable[Address] = (),
        user_op: bool = False,
    ) -> Op[Lookup]:
        """An iterative query. Maintenance queries obey the send policy (they leave the probe
        reserve alone); a user's lookup, announce or unannounce (``user_op``) may not lose
        storers to it."""
        ctx = self._ctx
        k = ctx.params.k
        public = ctx.standing.public
        # Never ourselves, under any of our addresses (a dual-stack node has one per family).
        own = {*ctx.observer.public_addresses, *ctx.other_family.public_addresses}
        if public is not None:
            own.add(public)
        lk = Lookup(target, k=k, alpha=ctx.params.alpha, exclude=own)
        lk.add_candidates(c.addr for c in ctx.table.closest(target, k))
        lk.add_candidates(extra)
        if len(ctx.table) == 0:
            lk.add_candidates(self.seeds)
        op: Op[Lookup] = Op()
        ctx.stats["lookups"] += 1

        def pump() -> None:
            if op.done:
                return
            for addr in lk.next_queries():
                # A request the send policy refuses fails at once (answered(None)), which
                # pumps the next candidate.
                self._rpc.request(
                    addr,
                    command,
                    functools.partial(answered, addr),
                    target=target,
                    on_slow=functools.partial(slow, addr),
                    user_op=user_op,
                    expect=nodes_answer_size(addr, k),
                )
            if lk.done:
                op.set_result(lk)

        def answered(addr: Address, resp: m.Response | None) -> None:
            if resp is None:
                lk.on_failure(addr)
            else:
                if resp.nodes:
                    self.on_nodes(addr, resp.nodes)
                lk.on_response(addr, resp.nodes or ())
                if on_reply is not None and not op.done:
                    on_reply(addr, resp)
            pump()

        def slow(addr: Address) -> None:
            lk.on_slow(addr)
            pump()

        pump()
        return op
