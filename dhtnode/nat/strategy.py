"""Which hole-punching strategy two nodes use, from what each knows about its own NAT.

Each side describes its NAT with a :class:`NatProfile` (its mapping class from
:mod:`dhtnode.nat.observer`, whether strangers reach it unsolicited, and the mapped ports other
nodes saw) and sends it to the other through the introduction. Both then call :func:`choose`
on the two profiles and, because the choice is symmetric, agree on the :class:`Strategy`
without another round trip.

This module owns only that decision and the port arithmetic behind it (:func:`port_step`,
:func:`predict_ports`). It sends nothing, keeps no state and reads no clock: the schedule of
an attempt lives in :mod:`dhtnode.nat.punch`, the bytes in :mod:`dhtnode.wire.punch`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from dhtnode.nat.observer import MAX_SAMPLES, NatClass

#: Mapped-port samples a profile carries: the observer keeps one per responder, at most this
#: many, so a longer list can only be a bug or a lie.
MAX_PORT_SAMPLES = MAX_SAMPLES
#: Largest port step taken for sequential allocation. A sequential NAT hands out ports in
#: steps of 1 (Linux ``snat ... numgen inc``), or a few more when other hosts behind it open
#: flows between two samples; a larger step is indistinguishable from noise.
MAX_PORT_STEP = 16
#: Samples needed (the newest in allocation order, with the same step between each two) before the
#: allocation counts as sequential: three samples give two equal small steps, which a random
#: NAT produces by chance with probability about 16 / 64512^2 (4e-9).
MIN_STEP_SAMPLES = 3
#: Lowest port a NAT allocates; predicted ports wrap from 65535 back to here (a sequential
#: NAT cycles through its range; 1024 and up is what Linux masquerade uses).
LOWEST_PORT = 1024
HIGHEST_PORT = 65535


@dataclass(frozen=True, slots=True)
class NatProfile:
    """What one side knows (and tells the other) about its NAT."""

    nat_class: NatClass
    #: Strangers reach it unsolicited (public address, or full-cone NAT): dial it directly.
    open: bool
    #: Mapped ports other nodes saw, oldest first (at most :data:`MAX_PORT_SAMPLES`).
    port_samples: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.port_samples) > MAX_PORT_SAMPLES:
            raise ValueError(f"at most {MAX_PORT_SAMPLES} port samples")
        if any(not 1 <= p <= HIGHEST_PORT for p in self.port_samples):
            raise ValueError("port samples must be in 1..65535")

    @property
    def random(self) -> bool:
        """Its NAT picks a new port per destination (UNKNOWN counts as consistent)."""
        return self.nat_class is NatClass.RANDOM

    @property
    def predictable(self) -> bool:
        """Random, but its samples show sequential allocation."""
        return self.random and port_step(self.port_samples) is not None


class Strategy(enum.Enum):
    #: The other side is open: just send to it (it answers from the address we sent to).
    DIRECT = "direct"
    #: Both consistent (or unknown): both probe each other's mapped address in rounds.
    SIMULTANEOUS = "simultaneous"
    #: One side random, the other consistent: the random side sprays from many sockets
    #: toward the consistent side, which probes random ports of the random side's IP.
    BIRTHDAY = "birthday"
    #: A random side whose samples show sequential allocation: probe the predicted ports
    #: first, then (if the other side is consistent) fall back to the birthday search.
    PREDICT = "predict"
    #: Random on both sides and not predictable: fail at once (a later issue relays).
    IMPOSSIBLE = "impossible"


def choose(ours: NatProfile, theirs: NatProfile) -> Strategy:
    """The strategy for this pair; symmetric, so ``choose(a, b) == choose(b, a)``."""
    if ours.open or theirs.open:
        # An open side is reached by just sending to it, whatever the other side's NAT does:
        # the answer goes back through the mapping the sender's own packet created.
        return Strategy.DIRECT
    if not ours.random and not theirs.random:
        return Strategy.SIMULTANEOUS
    if ours.random and theirs.random:
        # Birthday search on both sides needs ~65k probes per side for 64% (nat-facts):
        # only sequential allocation on both sides leaves a chance, by prediction.
        if ours.predictable and theirs.predictable:
            return Strategy.PREDICT
        return Strategy.IMPOSSIBLE
    random_side = ours if ours.random else theirs
    return Strategy.PREDICT if random_side.predictable else Strategy.BIRTHDAY


def allocation_order(samples: tuple[int, ...]) -> tuple[int, ...]:
    """The distinct sampled ports in the order a NAT allocating upward (and wrapping from
    65535 to :data:`LOWEST_PORT`) handed them out: sorted, starting after the largest
    (circular) gap between two of them.

    The order the samples arrive in says little: a node asks several nodes at once, so their
    answers (and the observer's per-responder samples) come back in any order (seen in the NAT
    lab: a sequential NAT's 20004, 20005, 20006, 20007 sampled as 20004, 20005, 20007, 20006).
    """
    ports = sorted(set(samples))
    n = len(ports)
    if n < 2:
        return tuple(ports)
    span = HIGHEST_PORT - LOWEST_PORT + 1
    gaps = [(ports[(i + 1) % n] - ports[i]) % span for i in range(n)]
    widest = max(range(n), key=lambda i: (gaps[i], i))
    return tuple(ports[widest + 1:] + ports[: widest + 1])


def port_step(samples: tuple[int, ...]) -> int | None:
    """The constant step (1..:data:`MAX_PORT_STEP`) between the last
    :data:`MIN_STEP_SAMPLES` or more ports in :func:`allocation_order`, else None.

    Only the trailing run counts: older samples taken before a gap (other hosts' flows, a
    restarted NAT) must not hide the allocation pattern the next flow will follow.
    """
    ports = allocation_order(samples)
    if len(ports) < MIN_STEP_SAMPLES:
        return None
    span = HIGHEST_PORT - LOWEST_PORT + 1
    step = (ports[-1] - ports[-2]) % span
    if not 1 <= step <= MAX_PORT_STEP:
        return None
    run = 2
    for i in range(len(ports) - 2, 0, -1):
        if (ports[i] - ports[i - 1]) % span != step:
            break
        run += 1
    return step if run >= MIN_STEP_SAMPLES else None


def predict_ports(samples: tuple[int, ...], count: int) -> list[int]:
    """The ``count`` ports a sequential NAT hands out next, after the newest sample in
    :func:`allocation_order`, wrapping from 65535 to :data:`LOWEST_PORT`. Empty when the
    samples show no constant step."""
    step = port_step(samples)
    if step is None or count <= 0:
        return []
    span = HIGHEST_PORT - LOWEST_PORT + 1
    last = allocation_order(samples)[-1]
    return [LOWEST_PORT + (last + step * i - LOWEST_PORT) % span for i in range(1, count + 1)]
