"""Requests and responses: transaction ids, retries, slow resends, matching, dispatch.

:class:`Rpc` owns the table of requests in flight and the command -> handler registry. A
response is accepted only if its tid AND its source match a request we sent (anything else is
late, duplicated, replayed or spoofed). Transaction ids come from ``ctx.secret_bytes``: they
are the only thing that keeps an off-path attacker from answering for someone else.

Parts and services register handlers (:meth:`Rpc.register`); a clash is an error. Two taps
let the node see traffic without the parts knowing of each other: ``on_response`` (every
matched response, before its callback) and ``on_request`` (every request, before its handler).
A send ``policy`` may refuse a request before it leaves (the probe reserve does).

Must not know what any command means.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dhtnode.dht.context import NodeContext
from dhtnode.dht.op import NoAnswer, Op
from dhtnode.dht.timers import Timer
from dhtnode.wire import address as wire_address
from dhtnode.wire import messages as m
from dhtnode.wire.address import Address

#: Requests allowed in flight at once; past this new requests fail at once (backpressure).
MAX_INFLIGHT = 4096

#: A request handler: (request, source address).
Handler = Callable[[m.Request, Address], None]


def ignore(_: m.Response | None) -> None:
    """Completion callback of fire-and-forget requests."""


class RpcError(Exception):
    """A handler registration clashes with another (a programming error)."""


@dataclass(slots=True)
class _Pending:
    tid: int
    addr: Address
    datagram: bytes
    tries_left: int
    on_done: Callable[[m.Response | None], None]
    timeout: float
    timer: Timer | None = None
    slow_timer: Timer | None = None


class Rpc:
    def __init__(self, ctx: NodeContext) -> None:
        self._ctx = ctx
        self._pending: dict[int, _Pending] = {}
        self._handlers: dict[m.Command, Handler] = {}
        #: Called for every matched response before its callback: (source, response).
        self.on_response: Callable[[Address, m.Response], None] = lambda a, r: None
        #: Called for every request before its handler: (request, source).
        self.on_request: Callable[[m.Request, Address], None] = lambda r, a: None
        #: May a (non-user) request go to this address? The probe reserve says no to some.
        self.policy: Callable[[Address], bool] = lambda a: True
        #: A request to this address timed out for good (the routing table forgets it).
        self.on_failure: Callable[[Address], None] = lambda a: None

    def __len__(self) -> int:
        return len(self._pending)

    def register(self, command: m.Command, handler: Handler) -> None:
        if command in self._handlers:
            raise RpcError(f"a handler for {command.name} is already registered")
        self._handlers[command] = handler

    # ------------------------------------------------------------------ sending

    def _next_tid(self) -> int:
        while True:
            tid = self._ctx.secret_u32()
            if tid not in self._pending:
                return tid

    def request(
        self,
        addr: Address,
        command: m.Command,
        on_done: Callable[[m.Response | None], None] = ignore,
        *,
        target: bytes | None = None,
        token: bytes | None = None,
        value: bytes | None = None,
        retries: int = 0,
        timeout: float | None = None,
        on_slow: Callable[[], None] | None = None,
        user_op: bool = False,
    ) -> None:
        """Send a request; ``on_done`` gets the response, or None after the last timeout.
        ``user_op``: a user's operation, which the send policy may not hold back."""
        ctx = self._ctx
        if len(self._pending) >= MAX_INFLIGHT:
            ctx.stats["request_backpressure"] += 1
            on_done(None)
            return
        if not user_op and not self.policy(addr):
            ctx.stats["request_to_reserve_skipped"] += 1  # kept a stranger, as a probe helper
            on_done(None)
            return
        tid = self._next_tid()
        data = m.encode_request(m.Request(command, tid, ctx.node_id, target, token, value))
        wait = timeout if timeout is not None else ctx.params.request_timeout
        p = _Pending(tid, addr, data, retries, on_done, wait)
        self._pending[tid] = p
        ctx.send(data, addr)
        p.timer = ctx.call_later(wait, lambda: self._on_timeout(tid))
        if on_slow is not None:
            p.slow_timer = ctx.call_later(
                ctx.params.slow_after, lambda: self._on_slow(tid, on_slow)
            )

    def call(self, addr: Address, command: m.Command, **kw: Any) -> Op[m.Response]:
        """:meth:`request` as an :class:`Op`: the response, or an error naming the address."""
        op: Op[m.Response] = Op()

        def done(resp: m.Response | None) -> None:
            if resp is None:
                op.set_error(NoAnswer(f"no answer from {wire_address.format_addr(addr)}"))
            else:
                op.set_result(resp)

        self.request(addr, command, done, **kw)
        return op

    def respond(self, req: m.Request, to: Address, **fields: Any) -> None:
        resp = m.Response(req.command, req.tid, to, self._ctx.node_id, **fields)
        self._ctx.send(m.encode_response(resp), to)

    def _on_slow(self, tid: int, on_slow: Callable[[], None]) -> None:
        """A lookup request unanswered after ``slow_after``: it stops counting against alpha,
        and is sent once more, because on a lossy path it is far more likely lost than slow,
        and a lookup cannot finish while one of its k nearest is still owed an answer."""
        p = self._pending.get(tid)
        if p is None:
            return
        p.slow_timer = None
        self._ctx.stats["retransmit_slow"] += 1
        self._ctx.send(p.datagram, p.addr)
        on_slow()

    def _on_timeout(self, tid: int) -> None:
        p = self._pending.get(tid)
        if p is None:
            return
        ctx = self._ctx
        if p.tries_left > 0:
            p.tries_left -= 1
            ctx.stats["retransmit"] += 1
            ctx.send(p.datagram, p.addr)
            p.timer = ctx.call_later(p.timeout, lambda: self._on_timeout(tid))
            return
        del self._pending[tid]
        ctx.stats["request_timeout"] += 1
        if p.slow_timer is not None:
            p.slow_timer.cancel()
        self.on_failure(p.addr)
        p.on_done(None)

    # ------------------------------------------------------------------ receiving

    def receive(self, msg: m.Request | m.Response, source: Address) -> None:
        if isinstance(msg, m.Request):
            self._on_request(msg, source)
        else:
            self._on_response(msg, source)

    def _on_response(self, resp: m.Response, source: Address) -> None:
        p = self._pending.get(resp.tid)
        if p is None or p.addr != source:
            # Late, duplicated, replayed or spoofed: tid AND source must match a request.
            self._ctx.stats["drop_unmatched"] += 1
            return
        del self._pending[resp.tid]
        if p.timer is not None:
            p.timer.cancel()
        if p.slow_timer is not None:
            p.slow_timer.cancel()
        self._ctx.stats["rx_response"] += 1
        self.on_response(source, resp)
        p.on_done(resp)

    def _on_request(self, req: m.Request, source: Address) -> None:
        self._ctx.stats["rx_request"] += 1
        self.on_request(req, source)
        handler = self._handlers.get(req.command)
        if handler is None:
            self.respond(req, source, error=m.ErrorCode.UNKNOWN_COMMAND)
            return
        handler(req, source)
