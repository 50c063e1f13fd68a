"""Two :class:`~dhtnode.nat.punch.PunchPlan` wired back to back through two simulated NATs,
in virtual time: the test bench of hole punching.

:func:`punch_pair` builds each side behind a :class:`~dhtnode.sim.nat.SimNat` of the given
kind, lets it talk to a few DHT responders first (the mapped ports they see become its
``port_samples``, and the real :class:`~dhtnode.nat.observer.AddressObserver` classifies
them), asks a stranger to reach it unsolicited (that decides ``open``), and introduces the two
through the last responder: each learns the other's address as that introducer saw it. Then
both plans run, the second starting ``skew`` seconds after the first; datagrams take
``latency`` plus up to ``jitter`` seconds and are lost with probability ``loss``.

For tests and benchmarks; owns no protocol logic, only the wiring and the event loop.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field

from dhtnode.nat.observer import AddressObserver
from dhtnode.nat.punch import PUNCH_DEADLINE, Punched, PunchFailed, PunchPlan
from dhtnode.nat.strategy import NatProfile, Strategy
from dhtnode.sim.nat import NatKind, SimNat
from dhtnode.wire import punch as wire
from dhtnode.wire.address import Address

#: DHT responders each side talks to before the punch (their view of it gives the samples).
RESPONDERS = 4
#: Virtual seconds between the sampling and the start of the punch.
START = 1.0
#: Seconds the driver takes to open the extra sockets a plan asks for.
SOCKET_OPEN_DELAY = 0.005
#: Virtual seconds the loop keeps running after the deadline (trailing datagrams).
LINGER = 2.0

_DELIVER, _TIMER, _START, _OPEN = range(4)


@dataclass(slots=True)
class SimSide:
    """One peer: a host (slot 0 at ``base_port``, slot i at ``base_port + i``) behind a NAT."""

    nat: SimNat
    inside_ip: str
    base_port: int
    profile: NatProfile
    public: Address
    plan: PunchPlan | None = None
    slots: int = 0
    timer_at: float | None = None
    result_at: float | None = None
    #: Datagrams sent after the plan succeeded (ACKs, trailing probes), and after it failed
    #: (which must stay 0).
    sent_after_success: int = 0
    sent_after_failure: int = 0

    def inside(self, slot: int) -> Address:
        return (self.inside_ip, self.base_port + slot)


@dataclass(frozen=True, slots=True)
class PairOutcome:
    strategy: Strategy
    results: tuple[Punched | PunchFailed | None, Punched | PunchFailed | None]
    sent: tuple[int, int]
    caps: tuple[int, int]
    #: Virtual seconds from the first plan's start to each side's result (None: no result).
    result_at: tuple[float | None, float | None]
    #: Datagrams each side sent in events after the one in which it succeeded, and after
    #: it had failed.
    sent_after_success: tuple[int, int]
    sent_after_failure: tuple[int, int]
    profiles: tuple[NatProfile, NatProfile]

    @property
    def ok(self) -> bool:
        return all(isinstance(r, Punched) for r in self.results)

    @property
    def connect_time(self) -> float | None:
        """Seconds until both sides had succeeded."""
        if not self.ok or None in self.result_at:
            return None
        return max(t for t in self.result_at if t is not None)


@dataclass(slots=True)
class PunchNet:
    rng: random.Random
    latency: float = 0.02
    jitter: float = 0.01
    loss: float = 0.0
    socket_pool: int = 1 << 16
    now: float = 0.0
    sides: list[SimSide] = field(default_factory=list)
    _events: list[tuple[float, int, int, int, object]] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def add_side(self, kind: NatKind, public_ip: str, inside_ip: str) -> SimSide:
        nat = SimNat(kind, public_ip, random.Random(self.rng.getrandbits(64)))
        host_ip = inside_ip if nat.translates else public_ip
        base = self.rng.randrange(10000, 60000)
        obs = AddressObserver()
        samples: list[int] = []
        seen: Address = (public_ip, base)
        for i in range(RESPONDERS):
            responder = (f"198.51.100.{10 + i}", 7000 + i)
            seen = nat.outbound((host_ip, base), responder, self.now)
            obs.add(responder, seen)
            samples.append(seen[1])
        stranger = ("192.0.2.99", 9999)
        is_open = nat.inbound(stranger, seen, self.now) is not None
        profile = NatProfile(obs.nat_class, is_open, tuple(samples))
        side = SimSide(nat, host_ip, base, profile, public=seen)
        self.sides.append(side)
        return side

    def start(self, i: int, at: float, plan: PunchPlan) -> None:
        """Hand side ``i`` its plan (built with ``now=at``) at virtual time ``at``."""
        self._push(at, _START, i, plan)

    def run(self, until: float) -> None:
        while self._events and self._events[0][0] <= until:
            when, _, kind, i, payload = heapq.heappop(self._events)
            self.now = when
            side = self.sides[i]
            if kind == _START:
                assert isinstance(payload, PunchPlan)
                side.plan = payload
            elif kind == _OPEN:
                assert side.plan is not None and isinstance(payload, int)
                side.slots = payload
                side.plan.sockets_opened(payload, when)
            elif kind == _TIMER:
                if side.timer_at != when or side.plan is None:
                    continue
                side.timer_at = None
                side.plan.handle_timer(when)
            else:
                assert isinstance(payload, tuple)
                self._deliver(side, *payload)
            self._service(i, opened=kind == _START)

    def _deliver(self, side: SimSide, source: Address, dest: Address, data: bytes) -> None:
        inside = side.nat.inbound(source, dest, self.now)
        plan = side.plan
        if inside is None or plan is None or inside[0] != side.inside_ip:
            return
        slot = inside[1] - side.base_port
        if not 0 <= slot <= side.slots:
            return  # no socket bound there: the host drops it
        try:
            if wire.attempt_id_of(data) != plan.attempt_id:
                return
        except wire.PunchDecodeError:
            return
        plan.datagram_received(slot, data, source, self.now)

    def _service(self, i: int, *, opened: bool) -> None:
        side = self.sides[i]
        plan = side.plan
        if plan is None:
            return
        if opened and plan.sockets_wanted():
            n = min(plan.sockets_wanted(), self.socket_pool)
            self._push(self.now + SOCKET_OPEN_DELAY, _OPEN, i, n)
        was_punched = isinstance(plan.result, Punched) and side.result_at is not None
        for send in plan.sends():
            if isinstance(plan.result, PunchFailed):
                side.sent_after_failure += 1
            elif was_punched:
                side.sent_after_success += 1
            mapped = side.nat.outbound(side.inside(send.slot), send.addr, self.now)
            if self.loss and self.rng.random() < self.loss:
                continue
            for j, other in enumerate(self.sides):
                if other is not side and other.nat.public_ip == send.addr[0]:
                    delay = self.latency + self.rng.random() * self.jitter
                    self._push(self.now + delay, _DELIVER, j, (mapped, send.addr, send.data))
        if plan.result is not None and side.result_at is None:
            side.result_at = self.now
        t = plan.next_timer()
        if t is not None:
            t = max(t, self.now)
            if side.timer_at is None or t < side.timer_at:
                side.timer_at = t
                self._push(t, _TIMER, i, None)

    def _push(self, t: float, kind: int, i: int, payload: object) -> None:
        heapq.heappush(self._events, (t, next(self._seq), kind, i, payload))


def punch_pair(
    kind_a: NatKind,
    kind_b: NatKind,
    *,
    seed: int,
    latency: float = 0.02,
    jitter: float = 0.01,
    loss: float = 0.0,
    skew: float = 0.0,
    socket_pool: int = 1 << 16,
    deadline: float = PUNCH_DEADLINE,
) -> PairOutcome:
    """One attempt between a host behind ``kind_a`` (the initiator) and one behind
    ``kind_b``, on a fresh network seeded with ``seed``."""
    rng = random.Random(seed)
    net = PunchNet(rng, latency=latency, jitter=jitter, loss=loss, socket_pool=socket_pool)
    a = net.add_side(kind_a, "203.0.113.1", "10.0.1.2")
    b = net.add_side(kind_b, "203.0.113.2", "10.0.2.2")
    attempt_id = rng.randbytes(wire.ATTEMPT_ID_LEN)
    key = rng.randbytes(wire.PUNCH_KEY_LEN)
    plans = []
    for me, other, t0, initiator in ((a, b, START, True), (b, a, START + skew, False)):
        plan = PunchPlan(
            initiator=initiator,
            ours=me.profile,
            theirs=other.profile,
            peer=(other.public,),
            attempt_id=attempt_id,
            punch_key=key,
            now=t0,
            rng=random.Random(rng.getrandbits(64)),
            deadline=deadline,
        )
        plans.append(plan)
    net.start(0, START, plans[0])
    net.start(1, START + skew, plans[1])
    net.run(START + skew + deadline + LINGER)

    def rel(t: float | None) -> float | None:
        return None if t is None else t - START

    return PairOutcome(
        strategy=plans[0].strategy,
        results=(plans[0].result, plans[1].result),
        sent=(plans[0].sent, plans[1].sent),
        caps=(plans[0].send_cap, plans[1].send_cap),
        result_at=(rel(a.result_at), rel(b.result_at)),
        sent_after_success=(a.sent_after_success, b.sent_after_success),
        sent_after_failure=(a.sent_after_failure, b.sent_after_failure),
        profiles=(a.profile, b.profile),
    )
