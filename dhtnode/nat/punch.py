"""One hole-punching attempt as a plan: which datagram to send from which socket, and when.

Both sides of an introduction build a :class:`PunchPlan` from the two :class:`NatProfile`
(so both pick the same :class:`Strategy`), the peer's addresses, and the attempt id and punch
key the introduction gave them. Both send PROBEs toward the peer; a valid PROBE is answered
with a PROBE_ACK to its source from the socket it came in on; the first valid PROBE or ACK
received on socket *s* from address *a* means *s* can reach *a*: the plan's ``result``
becomes :class:`Punched`. A few bounded trailing probes then make sure the other side gets
one too. Strategies (constants below):

* DIRECT: probe every address of the peer, every 50 ms for the first half second, then with
  back-off; the open side's address answers the first probe that is not lost.
* SIMULTANEOUS: probe every address of the peer at 0, 50, 100, 200, 400, 800 ms, 1.6 s, then
  every second until the deadline; each side's probe opens its own NAT for the other's.
* BIRTHDAY: the random side opens :data:`BIRTHDAY_SOCKETS` extra sockets and sends one probe
  from each toward the consistent side's address (a few rounds); the consistent side probes
  random ports of the random side's IP from its one socket, one every
  :data:`BIRTHDAY_INTERVAL`, never the same port twice, up to :data:`BIRTHDAY_PROBES`.
* PREDICT: a sequential random side probes from its own socket first (so its next port is
  the predicted one) and then sprays like BIRTHDAY; the consistent side probes the
  :data:`PREDICT_PORTS` predicted ports first and then searches like BIRTHDAY. When both sides
  are sequential each probes the other's predicted ports from its own socket, in order, and
  nothing else: the i-th new flow of each side then meets the i-th prediction of the other.
* IMPOSSIBLE: ``result`` is a :class:`PunchFailed` at once, unless the peer claims IPv6
  addresses (below): then only those are raced, and the plan fails soon after.

Besides the introducer-seen address (and LAN addresses behind one public IP), a plan may get
*extra* addresses: the peer's own IPv6 addresses when the introduction ran over IPv4 and both
sides have IPv6 (``nat/candidates.py``). IPv6 has no NAT, at most a stateful firewall, so
they are probed like SIMULTANEOUS in the first :data:`EXTRA_ROUNDS` rounds, beside whatever
the IPv4 strategy does; the first path that answers wins.

Every loop is bounded in count, rate and time; :attr:`PunchPlan.send_cap` is the most this
plan can ever send. Slot 0 is the node's own UDP socket; slots 1..n are extra sockets the
driver opened because :meth:`PunchPlan.sockets_wanted` asked for them.

Sans-I/O: no sockets, no clock, no asyncio. The caller passes ``now`` and an ``rng``, sends
what :meth:`PunchPlan.sends` returns, and calls :meth:`PunchPlan.handle_timer` at
:meth:`PunchPlan.next_timer`. A successful punch proves only that a holder of the punch key
sent from that address; who the peer is, is authenticated by the connection made over it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dhtnode.nat.strategy import (
    HIGHEST_PORT,
    LOWEST_PORT,
    NatProfile,
    Strategy,
    choose,
    predict_ports,
)
from dhtnode.wire import punch as wire
from dhtnode.wire.address import Address

#: Seconds an attempt may take before it fails. Covers the whole birthday search
#: (2048 probes x 3 ms = 6.1 s) with room for a slow introduction; HyperDHT's random-NAT
#: search runs ~35 s but at 20 ms per probe, nat-facts measured successes in 1.2-12.5 s.
PUNCH_DEADLINE = 10.0
#: Peer addresses probed in every round (LAN ones, then the introducer-observed public
#: address): more would only multiply every round's datagrams for addresses that rarely work.
MAX_PEER_ADDRESSES = 4
#: Addresses the peer only claims (its IPv6 addresses beside an IPv4 introduction, see
#: ``nat/candidates.py``) probed at most; and the rounds they get: the first rounds of the
#: SIMULTANEOUS schedule (0-0.8 s). A stateful firewall on either side opens with its own
#: side's first probe, so a path that works answers within them; and a peer that names a
#: third party's address there makes us send it at most 6 probes of 31 bytes.
MAX_EXTRA_ADDRESSES = 2
EXTRA_ROUNDS = 6
#: Seconds an IMPOSSIBLE plan with claimed IPv6 addresses waits after its last round for an
#: answer before it fails (a peer's probes may come one RTT after ours).
EXTRA_LINGER = 1.0
#: First resend interval of the probe rounds: a lost first probe costs only 50 ms.
ROUND_FIRST_INTERVAL = 0.05
#: Longest gap between probe rounds: HyperDHT punches consistent pairs in rounds 1 s apart;
#: a NAT mapping (30 s unreplied on Linux) easily outlives it.
ROUND_MAX_INTERVAL = 1.0
#: DIRECT resends every :data:`ROUND_FIRST_INTERVAL` for this long before backing off: the
#: open side answers the first probe that arrives, so only loss makes a second one useful.
DIRECT_FAST_SPAN = 0.5
#: Hard cap on probe rounds, whatever the deadline (10 s gives 15 or 20 rounds).
MAX_ROUNDS = 32
#: Extra sockets of the random side: with 256 mapped ports among ~64k, 256 random probes
#: succeed 64%, 1,024 98.4%, 2,048 99.97% (nat-facts, Tailscale's birthday figures).
BIRTHDAY_SOCKETS = 256
#: Most random ports the consistent side probes: 99.97% with 256 sockets (see above).
BIRTHDAY_PROBES = 2048
#: Seconds between two search probes: 333 probes/s, ~20 KB/s with headers. A 2048-probe
#: search takes 6.1 s (HyperDHT's 20 ms pace would take 41 s for the same count).
BIRTHDAY_INTERVAL = 0.003
#: Search probes sent in one timer callback at most, when the driver's timer fired late: a
#: late timer must not turn into a burst.
BIRTHDAY_BURST = 8
#: Rounds of one probe per extra socket. The first round creates the mappings; later ones
#: cover loss and a consistent side that started late (its NAT may filter by address only).
BIRTHDAY_ROUNDS = 4
#: Seconds between two spray rounds.
BIRTHDAY_ROUND_INTERVAL = 1.0
#: Predicted ports probed before the birthday search: covers the random side's own socket
#: and its first extra sockets, or up to 15 flows other hosts opened through a sequential NAT
#: since the samples were taken.
PREDICT_PORTS = 16
#: After success on a received PROBE: trailing probes on the winning path at these delays,
#: until the peer ACKs one (then it certainly has its own success). Three of them plus the
#: ACK leave the peer without any with probability loss^4.
TRAILING_DELAYS = (0.05, 0.25, 0.75)
#: PROBEs on the winning path answered after success (the peer's ACKs may have been lost);
#: any other probe after success is ignored, so a replayed probe cannot make us send more.
MAX_TRAILING_ACKS = 4

REASON_IMPOSSIBLE = (
    "both sides are behind port-randomizing NATs (symmetric NAT): hole punching cannot work, "
    "a relay is needed"
)
REASON_CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Send:
    #: 0 = the node's own UDP socket; 1..n = extra sockets the driver opened for this plan.
    slot: int
    data: bytes
    addr: Address


@dataclass(frozen=True, slots=True)
class Punched:
    #: The socket that reached the peer, and the peer address it reached.
    slot: int
    addr: Address
    #: Datagrams this side had sent when it succeeded.
    probes_sent: int
    #: Seconds from the start of the plan.
    elapsed: float


@dataclass(frozen=True, slots=True)
class PunchFailed:
    #: Human-readable cause.
    reason: str


def round_offsets(strategy: Strategy, deadline: float) -> list[float]:
    """Seconds after the start at which the probe rounds to the peer's addresses go out."""
    offsets = [0.0]
    t = 0.0
    while len(offsets) < MAX_ROUNDS:
        if strategy is Strategy.DIRECT and t < DIRECT_FAST_SPAN - 1e-9:
            t += ROUND_FIRST_INTERVAL
        else:
            t = max(t + ROUND_FIRST_INTERVAL, min(2 * t, t + ROUND_MAX_INTERVAL))
        t = round(t, 6)  # keep 0.05 * k exact enough to compare with the span
        if t >= deadline:
            break
        offsets.append(t)
    return offsets


class PunchPlan:
    def __init__(
        self,
        *,
        initiator: bool,
        ours: NatProfile,
        theirs: NatProfile,
        peer: tuple[Address, ...],
        attempt_id: bytes,
        punch_key: bytes,
        now: float,
        rng: random.Random,
        deadline: float = PUNCH_DEADLINE,
        extra: tuple[Address, ...] = (),
    ) -> None:
        if not peer:
            raise ValueError("a punch needs at least one peer address")
        if len(attempt_id) != wire.ATTEMPT_ID_LEN:
            raise ValueError(f"attempt id must be {wire.ATTEMPT_ID_LEN} bytes")
        if len(punch_key) != wire.PUNCH_KEY_LEN:
            raise ValueError(f"punch key must be {wire.PUNCH_KEY_LEN} bytes")
        if deadline <= 0:
            raise ValueError("deadline must be positive")
        self.initiator = initiator
        self.attempt_id = attempt_id
        self.strategy = choose(ours, theirs)
        self.result: Punched | PunchFailed | None = None
        #: Datagrams queued so far, and received datagrams dropped (bad MAC, wrong attempt,
        #: our own role reflected, unknown slot, after the end).
        self.sent = 0
        self.dropped = 0
        self._key = punch_key
        self._start = now
        self._deadline = deadline
        self._deadline_at = now + deadline
        self._peer = peer[:MAX_PEER_ADDRESSES]
        self._queue: list[Send] = []
        self._seq = 0
        self._finished = False
        # Probe rounds from slot 0 to ``_targets``.
        self._targets: list[Address] = list(self._peer)
        self._rounds = [now + t for t in round_offsets(self.strategy, deadline)]
        self._round = 0
        # Claimed addresses, raced in the first rounds of their own schedule (whatever the
        # strategy: they are IPv6 without NAT, at most a stateful firewall).
        self._extra = [a for a in extra if a not in self._peer][:MAX_EXTRA_ADDRESSES]
        offsets = round_offsets(Strategy.SIMULTANEOUS, deadline)[:EXTRA_ROUNDS]
        self._extra_rounds = [now + t for t in offsets] if self._extra else []
        self._extra_round = 0
        # Random side of BIRTHDAY/PREDICT: one probe per extra socket, in rounds.
        self._wants_sockets = 0
        self._slots = 0
        self._no_sockets = False
        self._spray_at: list[float] = []
        # Consistent side of BIRTHDAY/PREDICT: random ports of the peer's IP.
        self._search: list[int] = []
        self._searched = 0
        self._search_start = now
        # After success.
        self._win: tuple[int, Address] | None = None
        self._trailing: list[float] = []
        self._trailing_acks = 0
        self._cancelled = False
        self._setup_roles(ours, theirs, rng)
        #: The most datagrams this plan can ever send (the documented bound, for tests).
        self.send_cap = (
            len(self._rounds) * len(self._targets)
            + len(self._extra_rounds) * len(self._extra)
            + BIRTHDAY_ROUNDS * self._wants_sockets
            + len(self._search)
            + 1  # the ACK that answers the winning probe
            + len(TRAILING_DELAYS)
            + MAX_TRAILING_ACKS
        )
        if self.strategy is Strategy.IMPOSSIBLE:
            if not self._extra:
                self.result = PunchFailed(REASON_IMPOSSIBLE)
                self._finished = True
                self.send_cap = 0
                return
            # IPv4 cannot be punched, IPv6 may: race only the claimed addresses.
            self.send_cap -= len(self._rounds) * len(self._targets)
            self._rounds = []
            self._deadline_at = min(self._deadline_at, self._extra_rounds[-1] + EXTRA_LINGER)
        self.handle_timer(now)

    def _setup_roles(self, ours: NatProfile, theirs: NatProfile, rng: random.Random) -> None:
        if self.strategy not in (Strategy.BIRTHDAY, Strategy.PREDICT):
            return
        peer_ip = self._peer[0][0]
        if ours.random and theirs.random:
            # Both sequential: predicted ports only, from slot 0, before anything else. Extra
            # sockets would take ports out of the sequence the other side predicts.
            predicted = predict_ports(theirs.port_samples, PREDICT_PORTS)
            self._targets = [(peer_ip, p) for p in predicted] + self._targets
        elif ours.random:
            # Slot 0 goes first (round 0 is sent now), so a sequential NAT gives it the port
            # the other side predicts first; the extra sockets follow in order.
            self._wants_sockets = BIRTHDAY_SOCKETS
        else:
            predicted = predict_ports(theirs.port_samples, PREDICT_PORTS)
            self._targets = [(peer_ip, p) for p in predicted] + self._targets
            skip = set(predicted)
            pool = rng.sample(range(LOWEST_PORT, HIGHEST_PORT + 1), BIRTHDAY_PROBES + len(skip))
            self._search = [p for p in pool if p not in skip][:BIRTHDAY_PROBES]
            # The predicted ports go out in round 0; the search follows.
            self._search_start = self._start + BIRTHDAY_INTERVAL

    # --- what the driver asks -------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """Nothing more will be sent on a timer (trailing ACKs may still answer probes)."""
        return self._finished

    def sockets_wanted(self) -> int:
        """Extra sockets to open: :data:`BIRTHDAY_SOCKETS` for the random side of a
        BIRTHDAY/PREDICT attempt against a consistent side, else 0."""
        return self._wants_sockets if self._slots == 0 and not self._no_sockets else 0

    def sockets_opened(self, n: int, now: float) -> None:
        """The driver opened ``n`` extra sockets (slots 1..n); fewer than wanted (a pool
        exhausted) only lowers the odds. Only the first call counts."""
        if self._finished or self.result is not None or self._slots or self._no_sockets:
            return
        n = max(0, min(n, self._wants_sockets))
        if n == 0:
            self._no_sockets = True  # slot 0 alone keeps probing; the failure will say why
            return
        self._slots = n
        self._spray_at = [
            now + i * BIRTHDAY_ROUND_INTERVAL
            for i in range(BIRTHDAY_ROUNDS)
            if now + i * BIRTHDAY_ROUND_INTERVAL < self._deadline_at
        ]
        self.handle_timer(now)

    def strategy_of(self, addr: Address) -> Strategy:
        """The strategy that reached ``addr``: a claimed IPv6 address is punched as
        SIMULTANEOUS whatever the plan's IPv4 strategy."""
        return Strategy.SIMULTANEOUS if addr in self._extra else self.strategy

    def sends(self) -> list[Send]:
        out, self._queue = self._queue, []
        return out

    def next_timer(self) -> float | None:
        if self._finished:
            return None
        if self.result is not None:
            return self._trailing[0] if self._trailing else None
        times = [self._deadline_at]
        if self._round < len(self._rounds):
            times.append(self._rounds[self._round])
        if self._extra_round < len(self._extra_rounds):
            times.append(self._extra_rounds[self._extra_round])
        if self._spray_at:
            times.append(self._spray_at[0])
        if self._searched < len(self._search):
            times.append(self._search_start + self._searched * BIRTHDAY_INTERVAL)
        return min(times)

    def handle_timer(self, now: float) -> None:
        if self._finished:
            return
        if self.result is not None:
            while self._trailing and self._trailing[0] <= now:
                self._trailing.pop(0)
                assert self._win is not None
                self._probe(*self._win)
            if not self._trailing:
                self._finished = True
            return
        if now >= self._deadline_at:
            self._fail_deadline()
            return
        # A late timer sends one round for all the rounds it missed, never a burst of them.
        due = self._round
        while due < len(self._rounds) and self._rounds[due] <= now:
            due += 1
        if due > self._round:
            self._round = due
            for addr in self._targets:
                self._probe(0, addr)
        due = self._extra_round
        while due < len(self._extra_rounds) and self._extra_rounds[due] <= now:
            due += 1
        if due > self._extra_round:
            self._extra_round = due
            for addr in self._extra:
                self._probe(0, addr)
        if self._spray_at and self._spray_at[0] <= now:
            while self._spray_at and self._spray_at[0] <= now:
                self._spray_at.pop(0)
            target = self._peer[0]
            for slot in range(1, self._slots + 1):
                self._probe(slot, target)
        burst = 0
        ip = self._peer[0][0]
        while (
            self._searched < len(self._search)
            and burst < BIRTHDAY_BURST
            and self._search_start + self._searched * BIRTHDAY_INTERVAL <= now
        ):
            self._probe(0, (ip, self._search[self._searched]))
            self._searched += 1
            burst += 1
        if burst == BIRTHDAY_BURST and self._searched < len(self._search):
            # Late timer: resume the pace from now instead of catching up in bursts.
            self._search_start = now + BIRTHDAY_INTERVAL - self._searched * BIRTHDAY_INTERVAL

    def datagram_received(self, slot: int, data: bytes, source: Address, now: float) -> None:
        """A punch datagram (first byte 0x20-0x2F) for this attempt arrived on ``slot``."""
        if self.result is None and now >= self._deadline_at:
            self._fail_deadline()  # the driver's timer has not fired yet: too late anyway
        if self._stopped() or not 0 <= slot <= self._slots:
            self.dropped += 1
            return
        try:
            dgram = wire.decode(data, self._key)
        except wire.PunchDecodeError:
            self.dropped += 1
            return
        if dgram.attempt_id != self.attempt_id or dgram.from_initiator == self.initiator:
            self.dropped += 1
            return
        if self.result is None:
            self._succeed(slot, source, now)
            if dgram.type is wire.PunchType.PROBE:
                self._ack(slot, source, dgram.seq)
                self._trailing = [now + d for d in TRAILING_DELAYS]
            else:
                # The peer answered our probe, so it holds a valid probe: it has succeeded.
                self._finished = True
            return
        if (slot, source) != self._win:
            return  # after success only the winning path matters
        if dgram.type is wire.PunchType.PROBE_ACK:
            self._trailing.clear()
            self._finished = True
        elif self._trailing_acks < MAX_TRAILING_ACKS:
            self._trailing_acks += 1
            self._ack(slot, source, dgram.seq)

    def cancel(self) -> None:
        """Stop now: nothing more is sent, received datagrams are ignored."""
        if self.result is None:
            self.result = PunchFailed(REASON_CANCELLED)
        self._queue.clear()
        self._trailing.clear()
        self._finished = True
        self._cancelled = True

    # --- internals ------------------------------------------------------------------------

    def _stopped(self) -> bool:
        """Failed or cancelled: the plan never answers again."""
        return self._cancelled or isinstance(self.result, PunchFailed)

    def _succeed(self, slot: int, source: Address, now: float) -> None:
        self.result = Punched(slot, source, self.sent, now - self._start)
        self._win = (slot, source)
        self._spray_at.clear()
        self._search = self._search[: self._searched]

    def _fail_deadline(self) -> None:
        if self.strategy is Strategy.IMPOSSIBLE:
            self.result = PunchFailed(
                f"{REASON_IMPOSSIBLE}; IPv6 ({', '.join(a[0] for a in self._extra)}) "
                "did not answer either"
            )
            self._finished = True
            return
        why = (
            f"no valid probe from the peer within {self._deadline:g} s "
            f"({self.strategy.value} strategy, {self.sent} probes sent)"
        )
        if self._no_sockets:
            why += "; no extra sockets were available for the birthday search"
        self.result = PunchFailed(why)
        self._finished = True

    def _probe(self, slot: int, addr: Address) -> None:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        dgram = wire.PunchDatagram(wire.PunchType.PROBE, self.attempt_id, self._seq, self.initiator)
        self._queue.append(Send(slot, wire.encode(dgram, self._key), addr))
        self.sent += 1

    def _ack(self, slot: int, addr: Address, seq: int) -> None:
        dgram = wire.PunchDatagram(wire.PunchType.PROBE_ACK, self.attempt_id, seq, self.initiator)
        self._queue.append(Send(slot, wire.encode(dgram, self._key), addr))
        self.sent += 1
