"""Hole punching: the strategy choice, the punch datagram codec, the sans-I/O plan, and every
pair of NAT kinds punched back to back through simulated NATs in virtual time."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dhtnode.nat import punch as p
from dhtnode.nat.observer import NatClass
from dhtnode.nat.strategy import (
    MAX_PORT_STEP,
    NatProfile,
    Strategy,
    choose,
    port_step,
    predict_ports,
)
from dhtnode.sim.nat import NAT_KINDS, NatKind, SimNat
from dhtnode.sim.punchnet import punch_pair
from dhtnode.wire import punch as wire
from dhtnode.wire.demux import Kind, classify

CONSISTENT = NatProfile(NatClass.CONSISTENT, open=False, port_samples=(4000, 4000, 4000))
UNKNOWN = NatProfile(NatClass.UNKNOWN, open=False)
OPEN = NatProfile(NatClass.CONSISTENT, open=True)
RANDOM = NatProfile(NatClass.RANDOM, open=False, port_samples=(31337, 1999, 52011, 8080))
SEQUENTIAL = NatProfile(NatClass.RANDOM, open=False, port_samples=(20000, 20001, 20002, 20003))
KEY = bytes(range(32))
AID = b"attempt1"
PEER = ("203.0.113.9", 40000)


# --- strategy -------------------------------------------------------------------------------


def test_choose_table() -> None:
    assert choose(CONSISTENT, CONSISTENT) is Strategy.SIMULTANEOUS
    assert choose(UNKNOWN, CONSISTENT) is Strategy.SIMULTANEOUS  # unknown counts as consistent
    assert choose(UNKNOWN, UNKNOWN) is Strategy.SIMULTANEOUS
    assert choose(RANDOM, CONSISTENT) is Strategy.BIRTHDAY
    assert choose(RANDOM, UNKNOWN) is Strategy.BIRTHDAY
    assert choose(SEQUENTIAL, CONSISTENT) is Strategy.PREDICT
    assert choose(SEQUENTIAL, SEQUENTIAL) is Strategy.PREDICT
    assert choose(RANDOM, RANDOM) is Strategy.IMPOSSIBLE
    assert choose(RANDOM, SEQUENTIAL) is Strategy.IMPOSSIBLE
    # An open side is dialled directly, even by a random one.
    for other in (CONSISTENT, UNKNOWN, RANDOM, SEQUENTIAL, OPEN):
        assert choose(OPEN, other) is Strategy.DIRECT
    assert choose(NatProfile(NatClass.RANDOM, open=True), RANDOM) is Strategy.DIRECT


profiles = st.builds(
    NatProfile,
    st.sampled_from(list(NatClass)),
    st.booleans(),
    st.one_of(
        st.lists(st.integers(1, 65535), max_size=16).map(tuple),
        st.tuples(st.integers(1024, 60000), st.integers(1, 20), st.integers(0, 16)).map(
            lambda t: tuple(t[0] + t[1] * i for i in range(t[2]))
        ),
    ),
)


@given(profiles, profiles)
def test_choose_is_symmetric(a: NatProfile, b: NatProfile) -> None:
    assert choose(a, b) is choose(b, a)


def test_profile_rejects_too_many_or_bad_samples() -> None:
    with pytest.raises(ValueError):
        NatProfile(NatClass.RANDOM, False, tuple(range(1000, 1017)))
    with pytest.raises(ValueError):
        NatProfile(NatClass.RANDOM, False, (0, 1, 2))


def test_port_step() -> None:
    assert port_step((20000, 20001, 20002)) == 1
    assert port_step((100, 20000, 20004, 20008, 20012)) == 4  # the trailing run counts
    assert port_step((20000, 20016, 20032)) == MAX_PORT_STEP
    assert port_step((20000, 20017, 20034)) is None  # too big a step: noise
    assert port_step((20000, 20001)) is None  # two samples are one step: not enough
    assert port_step((20000, 20001, 20003)) is None
    # Answers come back in any order: the allocation order is recovered by sorting.
    assert port_step((20003, 20002, 20001)) == 1
    assert port_step((20004, 20005, 20007, 20006)) == 1
    assert port_step((65534, 1024, 65535, 1025)) == 1  # wrapping from 65535 to 1024
    assert port_step((20998, 20999, 20000)) is None  # a wrap inside a small pool: unknown
    assert port_step((20000, 20000, 20000)) is None  # consistent, not sequential
    assert port_step(()) is None
    assert port_step(RANDOM.port_samples) is None


def test_predict_ports() -> None:
    assert predict_ports((20000, 20001, 20002), 3) == [20003, 20004, 20005]
    assert predict_ports((20000, 20002, 20004), 2) == [20006, 20008]
    assert predict_ports((65533, 65534, 65535), 2) == [1024, 1025]  # wraps into the range
    assert predict_ports((20002, 20000, 20001), 2) == [20003, 20004]  # newest, not last
    assert predict_ports((65535, 1025, 1024), 1) == [1026]
    assert predict_ports(RANDOM.port_samples, 5) == []
    assert predict_ports((20000, 20001, 20002), 0) == []


@given(st.integers(1024, 65535), st.integers(1, 16), st.integers(3, 16), st.randoms())
def test_prediction_ignores_the_order_samples_arrived_in(
    first: int, step: int, n: int, rng: random.Random
) -> None:
    # A sequential NAT's ports, answered by several nodes at once: any order, maybe wrapping.
    span = 65535 - 1024 + 1
    ports = [1024 + (first - 1024 + step * i) % span for i in range(n)]
    shuffled = list(ports)
    rng.shuffle(shuffled)
    assert port_step(tuple(shuffled)) == step
    assert predict_ports(tuple(shuffled), 1) == [1024 + (ports[-1] - 1024 + step) % span]


# --- wire -----------------------------------------------------------------------------------

datagrams = st.builds(
    wire.PunchDatagram,
    st.sampled_from(list(wire.PunchType)),
    st.binary(min_size=8, max_size=8),
    st.integers(0, 2**32 - 1),
    st.booleans(),
)
keys = st.binary(min_size=32, max_size=32)


@given(datagrams, keys)
def test_punch_round_trip(d: wire.PunchDatagram, key: bytes) -> None:
    data = wire.encode(d, key)
    assert len(data) == wire.DATAGRAM_LEN
    assert classify(data) is Kind.PUNCH
    assert wire.attempt_id_of(data) == d.attempt_id
    assert wire.decode(data, key) == d


@given(st.binary(max_size=64), keys)
def test_arbitrary_bytes_raise_only_the_decode_error(data: bytes, key: bytes) -> None:
    for fn in (lambda: wire.decode(data, key), lambda: wire.attempt_id_of(data)):
        try:
            fn()
        except wire.PunchDecodeError:
            pass


@given(datagrams, keys, st.data())
def test_any_flipped_bit_fails(d: wire.PunchDatagram, key: bytes, data: st.DataObject) -> None:
    raw = bytearray(wire.encode(d, key))
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    raw[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(wire.PunchDecodeError):
        wire.decode(bytes(raw), key)


@given(datagrams, keys, keys)
def test_another_key_fails(d: wire.PunchDatagram, key: bytes, other: bytes) -> None:
    if key != other:
        with pytest.raises(wire.PunchDecodeError):
            wire.decode(wire.encode(d, key), other)


def test_ack_is_no_bigger_than_probe() -> None:
    probe = wire.encode(wire.PunchDatagram(wire.PunchType.PROBE, AID, 1, True), KEY)
    ack = wire.encode(wire.PunchDatagram(wire.PunchType.PROBE_ACK, AID, 1, False), KEY)
    assert len(ack) <= len(probe)
    assert 0x20 <= probe[0] <= 0x2F and 0x20 <= ack[0] <= 0x2F


# --- the plan alone -------------------------------------------------------------------------


def plan(
    ours: NatProfile,
    theirs: NatProfile,
    *,
    initiator: bool = True,
    now: float = 0.0,
    seed: int = 1,
    peer: tuple[tuple[str, int], ...] = (PEER,),
) -> p.PunchPlan:
    return p.PunchPlan(
        initiator=initiator,
        ours=ours,
        theirs=theirs,
        peer=peer,
        attempt_id=AID,
        punch_key=KEY,
        now=now,
        rng=random.Random(seed),
    )


def drain_to_end(pl: p.PunchPlan) -> list[tuple[float, p.Send]]:
    """Run a plan's timers until it stops asking, with nobody answering."""
    out = [(0.0, s) for s in pl.sends()]
    while (t := pl.next_timer()) is not None:
        pl.handle_timer(t)
        out.extend((t, s) for s in pl.sends())
    return out


def peer_datagram(
    kind: wire.PunchType, seq: int = 7, *, key: bytes = KEY, from_initiator: bool = False
) -> bytes:
    return wire.encode(wire.PunchDatagram(kind, AID, seq, from_initiator), key)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (CONSISTENT, CONSISTENT),
        (CONSISTENT, OPEN),
        (RANDOM, CONSISTENT),
        (CONSISTENT, RANDOM),
        (SEQUENTIAL, CONSISTENT),
        (CONSISTENT, SEQUENTIAL),
        (SEQUENTIAL, SEQUENTIAL),
    ],
)
def test_unanswered_plan_fails_at_the_deadline_within_its_caps(
    ours: NatProfile, theirs: NatProfile
) -> None:
    pl = plan(ours, theirs)
    sends = [(0.0, s) for s in pl.sends()]
    if pl.sockets_wanted():
        pl.sockets_opened(pl.sockets_wanted(), 0.01)
    sends += drain_to_end(pl)
    assert isinstance(pl.result, p.PunchFailed)
    assert "within 10 s" in pl.result.reason and pl.strategy.value in pl.result.reason
    assert pl.next_timer() is None
    assert len(sends) == pl.sent <= pl.send_cap
    assert max(t for t, _ in sends) < p.PUNCH_DEADLINE
    # Nothing more, whatever arrives or however late the timer fires.
    pl.datagram_received(0, peer_datagram(wire.PunchType.PROBE), PEER, 11.0)
    pl.handle_timer(20.0)
    assert pl.sends() == [] and pl.next_timer() is None


def test_a_probe_after_the_deadline_fails_the_plan_instead() -> None:
    pl = plan(CONSISTENT, CONSISTENT)
    pl.sends()
    pl.datagram_received(0, peer_datagram(wire.PunchType.PROBE), PEER, p.PUNCH_DEADLINE)
    assert isinstance(pl.result, p.PunchFailed) and pl.sends() == []
    assert pl.next_timer() is None


def test_simultaneous_rounds_back_off() -> None:
    pl = plan(CONSISTENT, CONSISTENT, peer=(PEER, ("192.168.1.5", 4000)))
    sends = drain_to_end(pl)
    times = sorted({t for t, _ in sends})
    assert times[:6] == [0.0, 0.05, 0.1, 0.2, 0.4, 0.8]
    assert all(b - a <= p.ROUND_MAX_INTERVAL + 1e-9 for a, b in itertools.pairwise(times))
    assert all(s.slot == 0 for _, s in sends)
    assert len(sends) == 2 * len(times)  # every round probes every peer address


def test_birthday_search_is_bounded_in_count_rate_and_ports() -> None:
    pl = plan(CONSISTENT, RANDOM)
    assert pl.strategy is Strategy.BIRTHDAY and pl.sockets_wanted() == 0
    sends = drain_to_end(pl)
    search = [(t, s) for t, s in sends if s.addr != PEER]
    ports = [s.addr[1] for _, s in search]
    assert len(ports) == p.BIRTHDAY_PROBES == len(set(ports))  # never the same port twice
    assert all(1024 <= port <= 65535 for port in ports)
    assert all(s.addr[0] == PEER[0] for _, s in search)
    # Never faster than one per BIRTHDAY_INTERVAL on average, over any window.
    times = [t for t, _ in search]
    for i in range(0, len(times) - 100, 97):
        assert times[i + 100] - times[i] >= 100 * p.BIRTHDAY_INTERVAL - 1e-9


def test_a_late_timer_does_not_burst() -> None:
    pl = plan(CONSISTENT, RANDOM)
    pl.sends()
    pl.handle_timer(2.0)  # the driver slept for two seconds
    assert len(pl.sends()) == p.BIRTHDAY_BURST + 1  # one round to the peer, a burst of search
    t = pl.next_timer()
    assert t is not None and t >= 2.0


def test_random_side_sprays_from_its_extra_sockets() -> None:
    pl = plan(RANDOM, CONSISTENT)
    first = pl.sends()
    assert [s.slot for s in first] == [0]  # its own socket goes first
    assert pl.sockets_wanted() == p.BIRTHDAY_SOCKETS
    pl.sockets_opened(10, 0.01)  # the pool had only ten
    assert pl.sockets_wanted() == 0
    spray = pl.sends()
    assert sorted(s.slot for s in spray) == list(range(1, 11))
    assert all(s.addr == PEER for s in spray)
    rest = drain_to_end(pl)
    assert sum(s.slot > 0 for _, s in rest) == 10 * (p.BIRTHDAY_ROUNDS - 1)
    assert pl.sent <= pl.send_cap


def test_no_extra_sockets_says_so_in_the_failure() -> None:
    pl = plan(RANDOM, CONSISTENT)
    pl.sockets_opened(0, 0.0)
    drain_to_end(pl)
    assert isinstance(pl.result, p.PunchFailed) and "no extra sockets" in pl.result.reason


def test_predicting_side_probes_predicted_ports_first() -> None:
    pl = plan(CONSISTENT, SEQUENTIAL)
    assert pl.strategy is Strategy.PREDICT
    first = [s.addr[1] for s in pl.sends()]
    assert first[: p.PREDICT_PORTS] == list(range(20004, 20004 + p.PREDICT_PORTS))
    later = [s.addr[1] for _, s in drain_to_end(pl) if s.addr[1] not in first]
    assert len(later) == p.BIRTHDAY_PROBES  # then the birthday search, other ports only
    both = plan(SEQUENTIAL, SEQUENTIAL)
    assert both.sockets_wanted() == 0  # extra sockets would break the other's prediction
    assert [s.addr[1] for s in both.sends()][: p.PREDICT_PORTS] == list(
        range(20004, 20004 + p.PREDICT_PORTS)
    )


def test_impossible_fails_at_once() -> None:
    pl = plan(RANDOM, RANDOM)
    assert pl.strategy is Strategy.IMPOSSIBLE
    assert isinstance(pl.result, p.PunchFailed)
    assert "port-randomizing" in pl.result.reason and "relay" in pl.result.reason
    assert pl.sends() == [] and pl.next_timer() is None and pl.sockets_wanted() == 0


def test_a_valid_probe_is_acked_from_its_slot_and_wins() -> None:
    pl = plan(RANDOM, CONSISTENT, initiator=False)
    pl.sockets_opened(4, 0.0)
    pl.sends()
    src = ("203.0.113.77", 5555)
    pl.datagram_received(3, peer_datagram(wire.PunchType.PROBE, 42, from_initiator=True), src, 0.3)
    assert pl.result == p.Punched(3, src, 1 + 4, 0.3)
    (ack,) = pl.sends()
    assert ack.slot == 3 and ack.addr == src
    assert wire.decode(ack.data, KEY) == wire.PunchDatagram(
        wire.PunchType.PROBE_ACK, AID, 42, False
    )
    # Trailing probes on the winning path only, until the peer ACKs one.
    t = pl.next_timer()
    assert t is not None
    pl.handle_timer(t)
    (trail,) = pl.sends()
    assert (trail.slot, trail.addr) == (3, src)
    pl.datagram_received(3, peer_datagram(wire.PunchType.PROBE_ACK, from_initiator=True), src, t)
    assert pl.next_timer() is None and pl.finished and pl.sends() == []


def test_after_success_only_a_few_acks_on_the_winning_path() -> None:
    pl = plan(CONSISTENT, CONSISTENT)
    pl.sends()
    pl.datagram_received(0, peer_datagram(wire.PunchType.PROBE), PEER, 0.1)
    assert len(pl.sends()) == 1
    for i in range(20):
        pl.datagram_received(0, peer_datagram(wire.PunchType.PROBE, i), PEER, 0.11)
        pl.datagram_received(0, peer_datagram(wire.PunchType.PROBE, i), ("198.51.100.1", 1), 0.11)
    assert len(pl.sends()) == p.MAX_TRAILING_ACKS
    drain_to_end(pl)
    assert pl.sent <= pl.send_cap
    assert isinstance(pl.result, p.Punched) and pl.result.addr == PEER


def test_an_ack_wins_and_ends_at_once() -> None:
    pl = plan(CONSISTENT, OPEN)
    assert pl.strategy is Strategy.DIRECT
    pl.sends()
    pl.datagram_received(0, peer_datagram(wire.PunchType.PROBE_ACK), PEER, 0.04)
    assert isinstance(pl.result, p.Punched) and pl.result.elapsed == pytest.approx(0.04)
    assert pl.sends() == [] and pl.next_timer() is None


def test_strangers_and_reflections_are_ignored() -> None:
    pl = plan(CONSISTENT, CONSISTENT, initiator=True)
    pl.sends()
    bad = [
        peer_datagram(wire.PunchType.PROBE, key=bytes(32)),  # wrong key: a stranger
        peer_datagram(wire.PunchType.PROBE)[:-1] + b"\x00",  # forged MAC
        peer_datagram(wire.PunchType.PROBE, from_initiator=True),  # our own probe reflected
        wire.encode(wire.PunchDatagram(wire.PunchType.PROBE, b"otherone", 1, False), KEY),
        b"\x20" * 31,
        b"",
    ]
    for data in bad:
        pl.datagram_received(0, data, PEER, 0.01)
    pl.datagram_received(5, peer_datagram(wire.PunchType.PROBE), PEER, 0.01)  # no such slot
    assert pl.result is None and pl.sends() == [] and pl.dropped == len(bad) + 1


def test_cancel_stops_everything() -> None:
    pl = plan(CONSISTENT, RANDOM)
    pl.sends()
    pl.cancel()
    assert pl.result == p.PunchFailed(p.REASON_CANCELLED)
    pl.datagram_received(0, peer_datagram(wire.PunchType.PROBE), PEER, 0.01)
    pl.handle_timer(1.0)
    assert pl.sends() == [] and pl.next_timer() is None


# --- the simulated NAT ----------------------------------------------------------------------


def test_sim_nat_behaviours() -> None:
    inside, a, a2, b = (
        ("10.0.0.2", 5000),
        ("198.51.100.1", 1),
        ("198.51.100.1", 2),
        ("198.51.100.2", 1),
    )
    rng = random.Random(1)
    cone = SimNat("port-restricted", "203.0.113.1", rng)
    m = cone.outbound(inside, a, 0.0)
    assert m == ("203.0.113.1", 5000) and cone.outbound(inside, b, 0.0) == m  # EIM, port kept
    assert cone.inbound(a, m, 0.1) == inside
    assert cone.inbound(a2, m, 0.1) is None  # other port of a contacted IP
    restricted = SimNat("restricted", "203.0.113.1", rng)
    m = restricted.outbound(inside, a, 0.0)
    assert restricted.inbound(a2, m, 0.1) == inside and restricted.inbound(b, m, 0.1) is None
    full = SimNat("full-cone", "203.0.113.1", rng)
    m = full.outbound(inside, a, 0.0)
    assert full.inbound(b, m, 0.1) == inside
    assert full.inbound(b, m, 100.0) is None  # the mapping timed out
    sym = SimNat("symmetric", "203.0.113.1", rng)
    assert sym.outbound(inside, a, 0.0) != sym.outbound(inside, b, 0.0)
    seq = SimNat("sequential", "203.0.113.1", rng)
    ports = [seq.outbound(inside, (f"198.51.100.{i}", 1), 0.0)[1] for i in range(1, 5)]
    assert port_step(tuple(ports)) == 1
    opened = SimNat("open", "203.0.113.1", rng)
    assert opened.inbound(b, ("203.0.113.1", 7), 0.0) == ("203.0.113.1", 7)
    wall = SimNat("firewalled", "203.0.113.1", rng)
    me = ("203.0.113.1", 7)
    assert wall.inbound(a, me, 0.0) is None
    assert wall.outbound(me, a, 0.0) == me and wall.inbound(a, me, 0.1) == me


# --- every pair of NAT kinds, back to back --------------------------------------------------

D, S, B, P, X = (
    Strategy.DIRECT,
    Strategy.SIMULTANEOUS,
    Strategy.BIRTHDAY,
    Strategy.PREDICT,
    Strategy.IMPOSSIBLE,
)
#: Rows and columns in NAT_KINDS order: open, firewalled, full-cone, restricted,
#: port-restricted, symmetric, sequential.
EXPECTED: dict[NatKind, tuple[Strategy, ...]] = {
    "open": (D, D, D, D, D, D, D),
    "firewalled": (D, S, D, S, S, B, P),
    "full-cone": (D, D, D, D, D, D, D),
    "restricted": (D, S, D, S, S, B, P),
    "port-restricted": (D, S, D, S, S, B, P),
    "symmetric": (D, B, D, B, B, X, X),
    "sequential": (D, P, D, P, P, X, P),
}


@pytest.mark.parametrize("kind_a", NAT_KINDS)
def test_every_pair_of_nat_kinds(kind_a: NatKind) -> None:
    for kind_b, want in zip(NAT_KINDS, EXPECTED[kind_a], strict=True):
        for seed in range(4):
            o = punch_pair(kind_a, kind_b, seed=seed, loss=0.02, skew=0.1 * seed)
            label = f"{kind_a} x {kind_b} seed {seed}"
            assert o.strategy is want, label
            assert o.sent[0] <= o.caps[0] and o.sent[1] <= o.caps[1], label
            assert o.sent_after_failure == (0, 0), label
            assert all(
                n <= 1 + len(p.TRAILING_DELAYS) + p.MAX_TRAILING_ACKS for n in o.sent_after_success
            ), label
            if want is Strategy.IMPOSSIBLE:
                assert o.results[0] == o.results[1] == p.PunchFailed(p.REASON_IMPOSSIBLE)
                assert o.sent == (0, 0), label
                # Each side fails the moment its plan starts.
                assert o.result_at[0] == 0.0 and o.result_at[1] == pytest.approx(0.1 * seed)
            else:
                assert o.ok, f"{label}: {o.results}"
                a, b = o.results
                assert isinstance(a, p.Punched) and isinstance(b, p.Punched)
                # Each side's winning address is the other side's public side of its socket.
                assert a.addr[0] == "203.0.113.2" and b.addr[0] == "203.0.113.1", label


def test_fewer_extra_sockets_still_mostly_works() -> None:
    wins = sum(
        punch_pair("symmetric", "port-restricted", seed=s, socket_pool=64).ok for s in range(20)
    )
    # 64 sockets, 2048 probes: 1 - (1 - 64/64512)^2048 = 87% expected.
    assert wins >= 14


BIRTHDAY_PAIRS: list[tuple[NatKind, NatKind]] = [
    ("symmetric", "port-restricted"),
    ("symmetric", "restricted"),
    ("symmetric", "firewalled"),
    ("sequential", "port-restricted"),
    ("sequential", "sequential"),
]


@pytest.mark.parametrize(("random_kind", "other"), BIRTHDAY_PAIRS)
def test_birthday_and_predict_success_rate(random_kind: NatKind, other: NatKind) -> None:
    """200 seeded attempts, 20-30 ms latency, 1% loss, up to 200 ms start skew, roles
    alternating: at least 95% succeed with the default constants."""
    attempts = 200
    wins, search, total, times = 0, [], [], []
    for seed in range(attempts):
        kinds = (random_kind, other) if seed % 2 else (other, random_kind)
        o = punch_pair(*kinds, seed=1000 + seed, loss=0.01, skew=(seed % 5) * 0.05)
        assert o.sent[0] <= o.caps[0] and o.sent[1] <= o.caps[1]
        if not o.ok:
            continue
        wins += 1
        consistent = [
            r for r, prof in zip(o.results, o.profiles, strict=True) if not prof.random
        ] or list(o.results)
        search.append(max(r.probes_sent for r in consistent if isinstance(r, p.Punched)))
        total.append(sum(o.sent))
        assert o.connect_time is not None
        times.append(o.connect_time)
    rate = wins / attempts
    print(
        f"\n{random_kind} x {other}: {rate:.1%} of {attempts}; median probes by the "
        f"{'searching' if other != random_kind else 'either'} side {statistics.median(search):g}"
        f", median datagrams both sides {statistics.median(total):g} (max {max(total)}), "
        f"median connect {statistics.median(times) * 1000:.0f} ms "
        f"(max {max(times) * 1000:.0f} ms)"
    )
    assert rate >= 0.95
