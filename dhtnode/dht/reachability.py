"""Can strangers reach us? Our own checks, the probe reserve, and helper duty for others.

A node is reachable when a datagram reaches it from an address it has not sent to
(``dht/sent.py``): a PROBE sent by a helper on our behalf (CHECK_REACHABLE -> FORWARD_PROBE ->
PROBE), or any unsolicited request. In a network small enough that a newcomer soon talks to
everyone, it keeps a *probe reserve*: servers it heard of and never contacts (installed as the
RPC send policy), which it names as helpers. Verdicts go to ``on_verdict``; the node decides
what they mean for its standing.

No request makes a node send to an address that did not ask (docs/PROTOCOL.md, "Security:
address validation"): a CHECK_REACHABLE is served only for an asker that proved its address
with our token; helpers are picked only among requesters that proved theirs; a helper takes a
FORWARD_PROBE only from a node it deals with (in its table, or it answered our requests) that
proves its address too, and probes only the asker that node vouches for. A missing proof is
answered with error 2 (bad token) carrying a token; the asker retries once with it.

Owns CHECK_REACHABLE, FORWARD_PROBE and PROBE. Must not change the node's standing itself.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from dhtnode.crypto import tokens
from dhtnode.dht.context import NodeContext
from dhtnode.dht.rpc import Rpc
from dhtnode.dht.timers import Timer
from dhtnode.errors import DecodeError
from dhtnode.nat.observer import NatClass
from dhtnode.wire import address as wire_address
from dhtnode.wire import messages as m
from dhtnode.wire.address import Address

#: Recent requesters remembered, as helpers for other nodes' reachability checks.
MAX_RECENT_REQUESTERS = 256
#: Seconds a requester counts as recent.
RECENT_REQUESTER_TTL = 120.0
#: Helpers each checked node's contact asks to send the probe; several, because a helper the
#: checked node happens to have contacted itself gives an inconclusive answer, and a helper
#: still unproven may decline. Three, not two: in a small network the proven server picked
#: first is usually one the checked node talked to, and the second pick is the only chance
#: (benchmarks/bench_small_networks.py: a newcomer beside two bootstrap nodes and two NATed
#: nodes served within 1 s in 100 of 100 simulated runs with three; with two, up to 9.5 s; in
#: the NAT lab the symmetric-NAT node, which always helps, is then always asked). It costs one
#: more FORWARD_PROBE and PROBE per contact asked, all to addresses that proved themselves.
PROBE_HELPERS = 3
#: Servers a node not yet proven reachable learns of but deliberately never sends to, so that a
#: probe from them proves something even in a network so small that it has talked to all others.
PROBE_RESERVE = 2
#: Checks without a verdict a node runs before it sets one of its own contacts aside as a
#: reserved helper. A contact set aside is silent, so each check asks one contact fewer, and it
#: only helps once it is a stranger again (SENT_TO_TTL, 600 s): worth it only when the network
#: has nobody else to prove us, which a few checks tell. Setting it aside at the first check
#: made a public newcomer beside two bootstrap nodes and two NATed nodes wait for it in 28 of
#: 100 simulated runs (about 650 s); after four checks (about 30 s in), in none
#: (benchmarks/bench_small_networks.py); the three-node networks that need it get it about
#: 30 s later, on top of their SENT_TO_TTL wait (all 280 newcomers of 3-6 node networks still
#: serve within 680 s there).
ASIDE_AFTER_CHECKS = 4
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
#: PROBE datagrams this node sends on others' behalf per window, at most.
MAX_PROBES_PER_TICK = 32
#: Pings sent to strangers to learn our own public address, per window.
MAX_ADDRESS_PINGS = 4
#: Seconds of one rate window (probes, address pings) and of pruning recent requesters.
TICK_INTERVAL = 5.0
#: Consecutive failed reachability checks before a server goes back to client mode.
DEMOTE_AFTER_FAILED_CHECKS = 2
#: Bytes of a check's nonce.
NONCE_LEN = 16


@dataclass(slots=True)
class _Check:
    """One of our own reachability checks, waiting for its probe."""

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


class Reachability:
    def __init__(self, ctx: NodeContext, rpc: Rpc) -> None:
        self._ctx = ctx
        self._rpc = rpc
        #: Probe reserve: helper address -> the server that told us of it (and knows it).
        self.reserve: dict[Address, Address] = {}
        self._recent_requesters: OrderedDict[Address, float] = OrderedDict()
        self._probes_this_tick = 0
        self._address_pings = 0
        self._checks: dict[bytes, _Check] = {}
        self._failed_checks = 0
        #: Checks begun since we last got a verdict of "reachable" (see ASIDE_AFTER_CHECKS).
        self._checks_without_proof = 0
        self._check_backoff = FIRST_CHECK_RETRY
        #: A verdict: True once a stranger reached us, False after failed checks.
        self.on_verdict: Callable[[bool], None] = lambda v: None
        #: Sources that prove nothing even when we never sent to them (None: every stranger
        #: counts). A tool telling filtering kinds apart (``dhtnode netcheck``) sets it: a
        #: probe from an IP we know, on another port, passes an address-dependent filter too.
        #: Their probes make a check inconclusive ("probe_ignored"); their requests are
        #: answered as usual but prove nothing ("request_ignored").
        self.proves_nothing: Callable[[Address], bool] | None = None
        rpc.register(m.Command.CHECK_REACHABLE, self._on_check_reachable)
        rpc.register(m.Command.FORWARD_PROBE, self._on_forward_probe)
        rpc.register(m.Command.PROBE, self._on_probe)
        ctx.call_later(TICK_INTERVAL, self._tick)

    # ------------------------------------------------------------------ taps from the node

    @property
    def failed_checks(self) -> int:
        """Conclusively failed checks in a row (probes were sent, none came through)."""
        return self._failed_checks

    def reserved(self) -> frozenset[Address]:
        """Our reserved probe helpers: addresses we stay silent towards."""
        return frozenset(self.reserve)

    def allows(self, addr: Address) -> bool:
        """The RPC send policy: stay silent towards our reserved probe helpers."""
        return addr not in self.reserve

    def start(self) -> None:
        """After joining: start checking, unless we are told we are public."""
        st = self._ctx.standing
        if not st.ephemeral and st.fixed_public is None and not st.assume_reachable:
            self._schedule_check(FIRST_CHECK_DELAY)

    def request_seen(self, req: m.Request, source: Address) -> None:
        ctx = self._ctx
        if req.command is m.Command.PROBE:
            return  # judged by its nonce, in _on_probe
        if not ctx.standing.ephemeral and not ctx.sent_to.solicited(source):
            if self.proves_nothing is not None and self.proves_nothing(source):
                ctx.stats["request_ignored"] += 1
            else:
                self._on_unsolicited_request(req, source)
        if self._rpc.proof(req, source) != tokens.INVALID:
            # Only a requester that proved its address may be asked to help: a forged source
            # must not become the target of our FORWARD_PROBEs.
            self._recent_requesters[source] = ctx.now
            self._recent_requesters.move_to_end(source)
            if len(self._recent_requesters) > MAX_RECENT_REQUESTERS:
                self._recent_requesters.popitem(last=False)

    def nodes_heard(self, referrer: Address, nodes: Iterable[Address]) -> None:
        """Keep servers we have just heard of, and never talked to, out of our own traffic:
        the only helpers whose probe can prove us reachable once we have talked to all others."""
        if len(self.reserve) >= PROBE_RESERVE or not self._wants_reserve():
            return
        ctx = self._ctx
        # One helper only until two servers have told us how they see us: classifying the
        # NAT needs samples from several nodes, and in a 2-server network the second is both.
        limit = PROBE_RESERVE if ctx.observer.sample_count >= 2 else 1
        for addr in nodes:
            if len(self.reserve) >= limit:
                return
            if (
                addr != ctx.standing.public
                and addr not in self.reserve
                and addr not in ctx.sent_to
            ):
                self.reserve[addr] = referrer

    def standing_changed(self) -> None:
        if self._ctx.standing.reachable or self._ctx.observer.nat_class is NatClass.RANDOM:
            self.reserve.clear()

    # ------------------------------------------------------------------ our own checks

    def _on_unsolicited_request(self, req: m.Request, source: Address) -> None:
        """A request from an address we never sent to got through: whatever is in front of us
        lets strangers in, which is what reachability means. While our public address in its
        family is unknown (the first node of a network has nobody to ask), ask the stranger.

        The source may be forged: our PING comes out of the request's answer budget (Rpc
        counts it), so it is sent only if it leaves room for the smallest answer. A one-shot
        client's bare PING leaves room while we have no id (the first node of a network)."""
        ctx = self._ctx
        if not ctx.standing.reachable:
            ctx.emit("reachable_by_request", **{"from": wire_address.format_addr(source)})
            self.on_verdict(True)
        family = wire_address.family_of(source[0])
        if (
            ctx.standing.fixed_public is None
            and self._address_pings < MAX_ADDRESS_PINGS
            and all(wire_address.family_of(a[0]) != family for a in ctx.observer.public_addresses)
            and self._affords_ping(req, source)
        ):
            # Our address in the stranger's family is unknown (the first node of a network, or
            # the other family of a dual-stack node): its answer tells it.
            self._address_pings += 1
            # Without our id: the smallest request there is, to leave room for our answer.
            self._rpc.request(source, m.Command.PING, anonymous=True)

    def _affords_ping(self, req: m.Request, source: Address) -> bool:
        """Do our (anonymous) PING to ``source`` and the smallest answer to ``req`` fit its
        budget? The PING takes 36 bytes of an IPv4 budget, 56 of an IPv6 one."""
        id_len = 32 if self._ctx.node_id is not None else 0
        ping = m.HEADER_LEN + wire_address.datagram_overhead(source)
        answer = m.HEADER_LEN + wire_address.compact_len(source) + id_len
        return self._rpc.answer_budget(req, source) >= ping + answer

    def _check_reachability(self) -> None:
        ctx = self._ctx
        st = ctx.standing
        if st.closed or st.fixed_public is not None or st.assume_reachable:
            return
        servers = list(ctx.table)
        if not servers or ctx.observer.nat_class is NatClass.RANDOM:
            # A port-randomizing NAT can never serve, whatever a probe says: asking would only
            # spend other newcomers' helpers. Look again later (the mapping may change).
            self._schedule_check(self._check_backoff)
            self._check_backoff = min(self._check_backoff * 2, MAX_CHECK_RETRY)
            return
        nonce = ctx.secret_bytes(NONCE_LEN)
        check = _Check(ctx.now + PROBE_WAIT)
        self._checks[nonce] = check
        self._checks_without_proof += 1
        if (
            not self.reserve
            and len(servers) >= 2
            and self._checks_without_proof > ASIDE_AFTER_CHECKS
            and self._wants_reserve()
        ):
            # Nobody is left that we never talked to, and checks keep proving nothing: set a
            # contact aside and stay silent towards it until it is a stranger again
            # (SENT_TO_TTL), so that even a network of three eventually proves its public
            # nodes. Not sooner: the contacts' own helpers usually prove us first.
            aside, via = ctx.rng.sample(servers, 2)
            self.reserve[aside.addr] = via.addr
        # Ask the servers that told us of our reserved helpers to use them (once those are
        # strangers to us), and fill up with random servers that pick helpers of their own.
        asks: list[tuple[Address, Address | None]] = [
            (r, h) for h, r in self.reserve.items() if not ctx.sent_to.solicited(h)
        ]
        others = [
            c.addr
            for c in servers
            if c.addr not in self.reserve and all(c.addr != a for a, _ in asks)
        ]
        asks += [(a, None) for a in ctx.rng.sample(others, min(2 - len(asks), len(others)))]
        for addr, helper in asks[:2]:
            check.asked.append(addr)
            if helper is not None:
                check.named.append(helper)
            value = nonce if helper is None else nonce + wire_address.encode(helper)
            self._ask_check(nonce, check, addr, value, True)
        check.timer = ctx.call_at(check.expires, lambda: self._check_done(nonce))

    def _ask_check(
        self, nonce: bytes, check: _Check, addr: Address, value: bytes, first: bool
    ) -> None:
        self._rpc.request(
            addr,
            m.Command.CHECK_REACHABLE,
            functools.partial(self._check_answered, nonce, check, addr, value, first),
            value=value,
        )

    def _check_answered(
        self,
        nonce: bytes,
        check: _Check,
        addr: Address,
        value: bytes,
        first: bool,
        resp: m.Response | None,
    ) -> None:
        if (
            first
            and resp is not None
            and resp.error == m.ErrorCode.BAD_TOKEN
            and resp.token is not None
            and nonce in self._checks
        ):
            # It wants proof of our address first; its answer carried a token, which the
            # retry echoes (Rpc keeps it). One round trip more, on the first check only.
            self._ask_check(nonce, check, addr, value, False)
            return
        check.answers += 1
        if resp is not None and resp.error is None:
            check.forwarded = True
        elif check.answers == len(check.asked) and not check.forwarded:
            # Nobody could find a helper: no probe is coming, so do not wait for one.
            if check.timer is not None:
                check.timer.cancel()
            self._check_done(nonce)

    def _check_done(self, nonce: bytes) -> None:
        check = self._checks.pop(nonce, None)
        if check is None:
            return
        ctx = self._ctx
        if check.succeeded:
            self._failed_checks = 0
            self._checks_without_proof = 0
            self._check_backoff = FIRST_CHECK_RETRY
            self._schedule_check(ctx.params.reachability_recheck)
            return
        if check.forwarded and not check.inconclusive:
            # Probes were sent and none came through: evidence of a filtering NAT. The named
            # helpers may also be gone: let the reserve take others.
            for helper in check.named:
                self.reserve.pop(helper, None)
            self._failed_checks += 1
            if ctx.standing.reachable and self._failed_checks >= DEMOTE_AFTER_FAILED_CHECKS:
                self.on_verdict(False)
        if ctx.standing.reachable:
            delay = ctx.params.reachability_recheck
        else:
            delay = self._check_backoff
            self._check_backoff = min(self._check_backoff * 2, MAX_CHECK_RETRY)
        self._schedule_check(delay)

    def _schedule_check(self, delay: float) -> None:
        # Jitter: nodes that joined together must not keep checking (and helping each other,
        # which spoils each other's probes) in lockstep.
        delay *= self._ctx.rng.uniform(0.75, 1.25)
        self._ctx.call_later(delay, self._check_reachability)

    def _wants_reserve(self) -> bool:
        ctx = self._ctx
        st = ctx.standing
        if ctx.observer.nat_class is NatClass.RANDOM:
            return False  # a random mapping can never serve: no check to keep helpers for
        if self._failed_checks >= RESERVE_GIVE_UP:
            return False  # probes keep not coming through: a filtering NAT, not a small network
        return not (
            st.reachable
            or st.ephemeral
            or st.closed
            or st.fixed_public is not None
            or st.assume_reachable
        )

    def _on_probe(self, req: m.Request, source: Address) -> None:
        ctx = self._ctx
        check = self._checks.get(req.value or b"")
        if check is None:
            ctx.stats["drop_probe"] += 1
            return
        if ctx.sent_to.solicited(source):
            # Inconclusive: our own traffic may have opened our NAT to it.
            ctx.stats["probe_solicited"] += 1
            ctx.emit("probe_inconclusive", **{"from": wire_address.format_addr(source)})
            check.inconclusive = True
            return
        if self.proves_nothing is not None and self.proves_nothing(source):
            ctx.stats["probe_ignored"] += 1
            ctx.emit("probe_inconclusive", **{"from": wire_address.format_addr(source)})
            check.inconclusive = True
            return
        check.succeeded = True
        self.on_verdict(True)

    # ------------------------------------------------------------------ helper duty

    def _on_check_reachable(self, req: m.Request, source: Address) -> None:
        ctx = self._ctx
        if self._rpc.proof(req, source) == tokens.INVALID:
            # Helpers will send a PROBE to the source: it must prove it is there and asked.
            ctx.stats["check_reachable_unproven"] += 1
            self._rpc.respond(req, source, error=m.ErrorCode.BAD_TOKEN)
            return
        if req.value is None or len(req.value) < NONCE_LEN:
            self._rpc.respond(req, source, error=m.ErrorCode.MISSING_FIELD)
            return
        nonce = req.value[:NONCE_LEN]
        helpers: list[Address] = []
        if len(req.value) > NONCE_LEN:
            try:
                named, end = wire_address.decode(req.value, NONCE_LEN)
            except DecodeError:
                ctx.stats["drop_malformed"] += 1
                return
            if end != len(req.value):
                ctx.stats["drop_malformed"] += 1
                return
            # Only a node we deal with may be made to receive a FORWARD_PROBE: one in our
            # table or that answered our requests (an address we merely answered could be
            # planted with a forged request).
            if named != source and (
                ctx.table.get(named) is not None or self._rpc.answered_recently(named)
            ):
                helpers.append(named)
        helpers += [
            h for h in self._pick_probe_helpers(source, PROBE_HELPERS) if h not in helpers
        ][: PROBE_HELPERS - len(helpers)]
        if not helpers:
            self._rpc.respond(req, source, error=m.ErrorCode.NOT_SERVING)
            return
        # Answer once a helper says it sent the probe (or all declined): an asker told "sent"
        # counts a missing probe as evidence against itself.
        left = len(helpers)

        def ask(helper: Address, first: bool) -> None:
            self._rpc.request(
                helper, m.Command.FORWARD_PROBE, functools.partial(acked, helper, first),
                value=body,
            )

        def acked(helper: Address, first: bool, resp: m.Response | None) -> None:
            nonlocal left
            if (
                first
                and resp is not None
                and resp.error == m.ErrorCode.BAD_TOKEN
                and resp.token is not None
            ):
                # It wants proof of our address: echo its token, also once another helper has
                # acked (else only the helper that needs no token round trip, usually the
                # proven server the asker talked to, ever probes).
                ask(helper, False)
                return
            if left <= 0:
                return
            left -= 1
            if resp is not None and resp.error is None:
                left = 0
                self._rpc.respond(req, source)
            elif left == 0:
                self._rpc.respond(req, source, error=m.ErrorCode.NOT_SERVING)

        body = wire_address.encode(source) + nonce
        for helper in helpers:
            ask(helper, True)

    def _pick_probe_helpers(self, source: Address, n: int) -> list[Address]:
        """Nodes other than ``source`` that recently sent us a request with a proof of their
        address (so they accept our FORWARD_PROBE: they asked us, we answered), preferring
        other IPs than the checked node's. One proven server
        (from our table) comes first: it always helps, so the nodes behind NATs get their
        verdict without spending the probes of newcomers that still need their own."""
        ctx = self._ctx
        horizon = ctx.now - RECENT_REQUESTER_TTL
        fresh = [a for a, t in self._recent_requesters.items() if t >= horizon and a != source]
        other_ip = [a for a in fresh if a[0] != source[0]]
        pool = other_ip if len(other_ip) >= n else fresh
        proven = [a for a in pool if ctx.table.get(a) is not None]
        out = ctx.rng.sample(proven, min(1, len(proven), n))
        rest = [a for a in pool if a not in out]
        return out + ctx.rng.sample(rest, min(n - len(out), len(rest)))

    def _on_forward_probe(self, req: m.Request, source: Address) -> None:
        ctx = self._ctx
        # Only nodes we deal with (in our table, or they answered our requests: not merely an
        # address we answered, which a forged request can plant) may make us send a datagram
        # to a third party, and only once they proved their address, at a bounded rate.
        if req.value is None or not (
            ctx.table.get(source) is not None or self._rpc.answered_recently(source)
        ):
            ctx.stats["drop_forward_probe"] += 1
            return
        if self._rpc.proof(req, source) == tokens.INVALID:
            ctx.stats["forward_probe_unproven"] += 1
            self._rpc.respond(req, source, error=m.ErrorCode.BAD_TOKEN)
            return
        if self._probes_this_tick >= MAX_PROBES_PER_TICK:
            ctx.stats["drop_forward_probe_rate"] += 1
            self._rpc.respond(req, source, error=m.ErrorCode.NOT_SERVING)
            return
        try:
            target, pos = wire_address.decode(req.value)
        except DecodeError:
            ctx.stats["drop_malformed"] += 1
            return
        nonce = req.value[pos:]
        if len(nonce) != NONCE_LEN:
            ctx.stats["drop_malformed"] += 1
            return
        if target in self.reserve or self._guarding_own_check(target):
            # We stay silent towards our own reserved helpers; and while our own check runs,
            # probing the target would make its probe to us (maybe on its way now) look
            # solicited: two newcomers helping each other in step would never prove anything.
            ctx.stats["forward_probe_declined"] += 1
            self._rpc.respond(req, source, error=m.ErrorCode.NOT_SERVING)
            return
        self._probes_this_tick += 1
        ctx.stats["forward_probe_sent"] += 1
        self._rpc.respond(req, source)
        probe = m.Request(m.Command.PROBE, ctx.secret_u32(), None, None, None, nonce,
                          network=ctx.params.network)
        # Like any send, this opens our own NAT to the target: its later traffic is solicited.
        ctx.send(m.encode_request(probe), target)

    def _guarding_own_check(self, target: Address) -> bool:
        """Would probing ``target`` cost us a helper our own open verdict may need?

        Only a target we never sent to can still prove us reachable, so only those are worth
        guarding, and only while we are unproven: always while our own check waits for its
        probe, and every other time at random (so that two newcomers asking each other for
        help neither both refuse nor both spoil each other). Nodes behind a filtering or
        port-randomizing NAT have their verdict and help freely: they are the best helpers,
        since nobody has talked to them."""
        ctx = self._ctx
        if (
            ctx.standing.reachable
            or self._failed_checks > 0
            or ctx.observer.nat_class is NatClass.RANDOM
            or ctx.sent_to.solicited(target)
        ):
            return False
        return bool(self._checks) or ctx.rng.random() < 0.5

    def _tick(self) -> None:
        ctx = self._ctx
        self._probes_this_tick = 0
        self._address_pings = 0
        ctx.sent_to.expire(ctx.now)
        horizon = ctx.now - RECENT_REQUESTER_TTL
        while self._recent_requesters and next(iter(self._recent_requesters.values())) < horizon:
            self._recent_requesters.popitem(last=False)
        if not ctx.standing.closed:
            ctx.call_later(TICK_INTERVAL, self._tick)
