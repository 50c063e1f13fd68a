"""Requests and responses: transaction ids, retries, slow resends, matching, dispatch.

:class:`Rpc` owns the table of requests in flight and the command -> handler registry. A
response is accepted only if its tid AND its source match a request we sent (anything else is
late, duplicated, replayed or spoofed). Transaction ids come from ``ctx.secret_bytes``: they
are the only thing that keeps an off-path attacker from answering for someone else.

Parts and services register handlers (:meth:`Rpc.register`); a clash is an error. Two taps
let the node see traffic without the parts knowing of each other: ``on_response`` (every
matched response, before its callback) and ``on_request`` (every request, before its handler).
A send ``policy`` may refuse a request before it leaves (the probe reserve does).

**Address validation** (docs/PROTOCOL.md, "Security: address validation"). A request's source
address may be forged, so an answer must not be a way to flood a third party. A requester
proves it receives at its address by echoing a token of ours (``ctx.tokens``) that an earlier
answer gave it; :meth:`Rpc.respond` keeps every answer to an unproven source within
:data:`AMPLIFICATION_LIMIT` times the request on the wire (trimming closer-node lists, then
withholding the value with the MORE flag) and hands such a source a token, so that its next
request is proven. On the requesting side every matched answer's token is kept
(:meth:`Rpc.peer_token`) and echoed in our next requests to that peer; a caller that expects a
large answer before it holds a token pads its request instead (``expect``), as QUIC pads its
first packet.

**Debug trace** (``params.rpc_trace``, on at log level debug): an ``rpc_request`` event for
every request received (command, peer, what we did: ``answered``, ``trimmed``, ``error:NAME``,
``over_budget``, or ``unanswered``, which includes answers a handler sends later) and an
``rpc_reply`` event for every answer to, or timeout of, a request of ours (command, peer,
``ok`` / ``more`` / ``error:NAME`` / ``timeout``, rtt). Sampled by a token bucket
(:data:`RPC_LOG_RATE`), so that a flood cannot fill a disk; what it leaves out is counted in
an ``rpc_log_suppressed`` event every :data:`RPC_LOG_REPORT_INTERVAL`. Off, it costs one
attribute test per datagram.

Must not know what any command means.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from dhtnode.crypto import tokens
from dhtnode.dht.context import NodeContext
from dhtnode.dht.op import NoAnswer, Op
from dhtnode.dht.ratelimit import TokenBucket
from dhtnode.dht.timers import Timer
from dhtnode.wire import address as wire_address
from dhtnode.wire import messages as m
from dhtnode.wire.address import Address

#: Requests allowed in flight at once; past this new requests fail at once (backpressure).
MAX_INFLIGHT = 4096
#: Most bytes on the wire (IP and UDP headers included) we answer per request byte on the wire
#: to a source that has not proven its address: QUIC's limit before address validation
#: (RFC 9000 section 8.1). A forged-source flood then gains an attacker at most 3x.
AMPLIFICATION_LIMIT = 3
#: Bytes of answer (headers excluded) that even the smallest request (a bare 8-byte header
#: over IPv4) may get: answers this small need no budget reckoning.
SMALLEST_BUDGET = AMPLIFICATION_LIMIT * (m.HEADER_LEN + 28) - 28
#: Peers whose token (and last answer) we remember; the least recently heard are forgotten.
MAX_PEER_TOKENS = 4096
#: Seconds we echo a peer's token after receiving it: a token stays valid until the second
#: secret rotation after it was made (``crypto/tokens.py``), at least one interval and at most
#: two. An expired echo costs one trimmed answer, which carries a fresh token.
PEER_TOKEN_TTL = 2 * tokens.ROTATE_INTERVAL
#: Seconds a peer that answered one of our requests counts as one we deal with (helpers and
#: listeners act only for such peers): as long as the sent-to memory (``dht/sent.py``).
ANSWERED_TTL = 600.0
#: Debug trace events (``rpc_request``, ``rpc_reply``) per second at most: a flood of 50k
#: requests per second must not become 50k log lines per second.
RPC_LOG_RATE = 20.0
#: ... and in a burst (a lookup's dozen exchanges all show).
RPC_LOG_BURST = 20.0
#: Seconds between ``rpc_log_suppressed`` events, which count the trace events left out.
RPC_LOG_REPORT_INTERVAL = 10.0

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
    command: m.Command = m.Command.PING
    #: ``ctx.now`` when first sent (latency includes retransmissions).
    sent_at: float = 0.0


@dataclass(slots=True)
class _Peer:
    """What we know of a peer from its answers to our requests."""

    token: bytes | None
    token_at: float
    answered_at: float


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
        #: Seconds from a request's first send to its matched answer (metrics); None: off.
        self.on_rtt: Callable[[m.Command, float], None] | None = None
        #: Peers that answered our requests: their token for us, and when they last answered.
        self._peers: OrderedDict[Address, _Peer] = OrderedDict()
        #: The last request whose proof was checked, and the verdict: taps and the handler
        #: all ask about the same request.
        self._proved: tuple[m.Request | None, int] = (None, tokens.INVALID)
        #: The last request that made the taps send to its source, and those bytes on the wire.
        self._spent: tuple[m.Request | None, int] = (None, 0)
        #: Debug trace: its budget, what it left out since the last report, the report timer,
        #: and what :meth:`respond` did with the last request it answered.
        self._log_budget = TokenBucket(RPC_LOG_RATE, RPC_LOG_BURST, ctx.now)
        self._log_suppressed = 0
        self._log_report: Timer | None = None
        self._outcome: tuple[m.Request | None, str] = (None, "")

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
        expect: int = 0,
        anonymous: bool = False,
    ) -> None:
        """Send a request; ``on_done`` gets the response, or None after the last timeout.
        ``user_op``: a user's operation, which the send policy may not hold back.
        ``token``: defaults to the token ``addr`` last gave us (our proof of address to it).
        ``expect``: bytes of the answer we hope for; without a token the request is padded
        so that an answer that large fits the peer's budget for unproven sources.
        ``anonymous``: without our id, to keep the request as small as it can be."""
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
        if token is None:
            token = self.peer_token(addr)
        req = m.Request(command, tid, None if anonymous else ctx.id_for(addr), target, token,
                        value, network=ctx.params.network)
        if expect and token is None:
            overhead = wire_address.datagram_overhead(addr)
            need = -(-(expect + overhead) // AMPLIFICATION_LIMIT) - overhead
            short = need - m.request_size(req)
            if short > 0:
                # The PAD field's own two length bytes count towards the size too.
                req = replace(req, pad=max(1, short - 2))
        data = m.encode_request(req)
        wait = timeout if timeout is not None else ctx.params.request_timeout
        p = _Pending(tid, addr, data, retries, on_done, wait, command=command,
                     sent_at=ctx.now)
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
        """Answer ``req``. To an unproven source the answer carries a token and stays within
        :meth:`answer_budget` (closer nodes trimmed from the far end, then the value withheld
        with MORE); a proven source whose token is aging gets a fresh one."""
        ctx = self._ctx
        proof = self.proof(req, to)
        if proof != tokens.CURRENT and fields.get("token") is None:
            fields["token"] = ctx.tokens.issue(to, ctx.now)
        resp = m.Response(req.command, req.tid, to, ctx.id_for(to), network=ctx.params.network,
                          **fields)
        data = m.encode_response(resp)
        outcome = "answered"
        if proof == tokens.INVALID and (len(data) > SMALLEST_BUDGET or self._spent[0] is req):
            budget = self.answer_budget(req, to, proof)
            if len(data) > budget:
                fitted = _fit(resp, len(data) - budget)
                if fitted is None:
                    ctx.stats["drop_over_budget"] += 1
                    if ctx.params.rpc_trace:
                        self._outcome = (req, "over_budget")
                    return
                ctx.stats["answer_trimmed"] += 1
                data = fitted
                outcome = "trimmed"
        if ctx.params.rpc_trace:
            error = fields.get("error")
            self._outcome = (req, outcome if error is None else f"error:{_error_name(error)}")
        ctx.send(data, to)

    # ------------------------------------------------------------------ address validation

    def proof(self, req: m.Request, source: Address) -> int:
        """Did ``source`` prove it receives at its address (echo a token of ours)?
        :data:`~dhtnode.crypto.tokens.CURRENT`, ``PREVIOUS`` (valid, aging) or ``INVALID``."""
        if req.token is None:
            return tokens.INVALID
        last, verdict = self._proved
        if last is req:
            return verdict
        verdict = self._ctx.tokens.verify(req.token, source, self._ctx.now)
        self._proved = (req, verdict)
        return verdict

    def answer_budget(self, req: m.Request, source: Address, proof: int | None = None) -> int:
        """Largest DHT answer (bytes, headers excluded) ``req`` from ``source`` may get: the
        datagram limit once the source is proven, else :data:`AMPLIFICATION_LIMIT` times the
        request, both counted on the wire with their IP and UDP headers, less whatever else
        the request made us send to ``source``."""
        if proof is None:
            proof = self.proof(req, source)
        if proof != tokens.INVALID:
            return m.MAX_SEND_SIZE
        overhead = wire_address.datagram_overhead(source)
        allowed = AMPLIFICATION_LIMIT * (m.request_size(req) + overhead) - overhead
        if self._spent[0] is req:
            allowed -= self._spent[1]
        return min(m.MAX_SEND_SIZE, allowed)

    def peer_token(self, addr: Address) -> bytes | None:
        """The token ``addr`` gave us, while it may still be valid."""
        peer = self._peers.get(addr)
        if peer is None or peer.token is None:
            return None
        if self._ctx.now - peer.token_at > PEER_TOKEN_TTL:
            return None
        return peer.token

    def answered_recently(self, addr: Address) -> bool:
        """Did ``addr`` answer one of our requests lately? Answers match a tid we chose and
        the address we sent to, so, unlike an address we merely answered, this cannot be
        planted with forged requests."""
        peer = self._peers.get(addr)
        return peer is not None and self._ctx.now - peer.answered_at <= ANSWERED_TTL

    def _note_peer(self, addr: Address, token: bytes | None) -> None:
        now = self._ctx.now
        peer = self._peers.get(addr)
        if peer is None:
            self._peers[addr] = _Peer(token, now, now)
            if len(self._peers) > MAX_PEER_TOKENS:
                self._peers.popitem(last=False)
            return
        self._peers.move_to_end(addr)
        peer.answered_at = now
        if token is not None:
            peer.token = token
            peer.token_at = now

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
        if ctx.params.rpc_trace:
            self._trace_reply(p, None)
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
        if self._ctx.params.rpc_trace:
            self._trace_reply(p, resp)
        rtt = self._ctx.now - p.sent_at
        if self.on_rtt is not None:
            self.on_rtt(p.command, rtt)
        known = self._ctx.table.get(source)
        if known is not None:
            known.rtt = rtt  # what `dhtnode peers` shows
        self._note_peer(source, resp.token)
        self.on_response(source, resp)
        p.on_done(resp)

    def _on_request(self, req: m.Request, source: Address) -> None:
        ctx = self._ctx
        ctx.stats["rx_request"] += 1
        mark = len(ctx.out)
        self.on_request(req, source)
        if len(ctx.out) > mark:
            # What the taps sent the source because of this request (a PING to verify a new
            # contact or to learn our own address) comes out of the answer's budget.
            overhead = wire_address.datagram_overhead(source)
            spent = sum(len(d) + overhead for d, a in ctx.out[mark:] if a == source)
            self._spent = (req, spent)
        handler = self._handlers.get(req.command)
        if handler is None:
            self.respond(req, source, error=m.ErrorCode.UNKNOWN_COMMAND)
        else:
            handler(req, source)
        if ctx.params.rpc_trace:
            self._trace_request(req, source, mark)

    # ------------------------------------------------------------------ debug trace

    def _trace_request(self, req: m.Request, source: Address, mark: int) -> None:
        """``rpc_request``: what we did with ``req`` (its handler has run). ``mark``: the
        send queue's length before its taps and handler ran."""
        if not self._log_take():
            return
        last, outcome = self._outcome
        if last is not req:
            # Not through respond() (FIND_NODE's hot path sends itself), or not yet.
            sent = any(a == source for _, a in self._ctx.out[mark:])
            outcome = "answered" if sent else "unanswered"
        self._ctx.emit("rpc_request", command=req.command.name, peer=_shown(source),
                       outcome=outcome)

    def _trace_reply(self, p: _Pending, resp: m.Response | None) -> None:
        """``rpc_reply``: how a request of ours ended (``resp`` None: it timed out)."""
        if not self._log_take():
            return
        if resp is None:
            outcome = "timeout"
        elif resp.error is not None:
            outcome = f"error:{_error_name(resp.error)}"
        else:
            outcome = "more" if resp.more else "ok"
        self._ctx.emit("rpc_reply", command=p.command.name, peer=_shown(p.addr),
                       outcome=outcome, rtt_ms=round((self._ctx.now - p.sent_at) * 1000, 2))

    def _log_take(self) -> bool:
        """May a trace event go out now? Else count it for the next suppression report."""
        ctx = self._ctx
        if self._log_budget.take(ctx.now):
            return True
        self._log_suppressed += 1
        if self._log_report is None:
            self._log_report = ctx.call_later(RPC_LOG_REPORT_INTERVAL, self._report_suppressed)
        return False

    def _report_suppressed(self) -> None:
        self._log_report = None
        if self._log_suppressed:
            self._ctx.emit("rpc_log_suppressed", count=self._log_suppressed,
                           seconds=RPC_LOG_REPORT_INTERVAL)
            self._log_suppressed = 0


def _shown(addr: Address) -> str:
    return wire_address.format_addr(addr)


def _error_name(code: int) -> str:
    """An error code's name for the trace (``bad_token``), or its number if unknown."""
    try:
        return m.ErrorCode(code).name.lower()
    except ValueError:
        return str(code)


def _fit(resp: m.Response, excess: int) -> bytes | None:
    """``resp`` encoded ``excess`` bytes smaller, or None: drop closer nodes from the far end
    (a nodes list is "up to k, nearest first"), then the value (flagged MORE), then the
    token."""
    nodes = list(resp.nodes or ())
    while nodes and excess > 0:
        excess -= wire_address.compact_len(nodes.pop())
    if resp.nodes is not None:
        resp = replace(resp, nodes=tuple(nodes))
    if excess > 0 and resp.value is not None:
        excess -= 2 + len(resp.value)
        resp = replace(resp, value=None, more=True)
    if excess > 0 and resp.token is not None:
        excess -= 1 + len(resp.token)
        resp = replace(resp, token=None)
    if excess > 0:
        return None
    return m.encode_response(resp)
