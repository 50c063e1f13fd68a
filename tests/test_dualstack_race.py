"""The dual-stack race: a peer's own IPv6 addresses probed beside an IPv4 punch, in the
first few rounds only (they are claims, not addresses a DHT node saw), the candidate rules
that pick them, and this host's own IPv6 addresses from the interface list."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dhtnode.connect.peerinfo import PeerInfo
from dhtnode.nat import punch as p
from dhtnode.nat.candidates import MAX_V6_TARGETS, punch_targets, usable_v6
from dhtnode.nat.observer import NatClass
from dhtnode.nat.strategy import NatProfile, Strategy
from dhtnode.transport import localaddr
from dhtnode.wire import punch as wire

KEY = bytes(range(32))
AID = b"attempt1"
SEEN = ("203.0.113.9", 40000)
V6 = ("2001:db8:113::9", 40000)
CONSISTENT = NatProfile(NatClass.CONSISTENT, open=False, port_samples=(4000, 4000, 4000))
RANDOM = NatProfile(NatClass.RANDOM, open=False, port_samples=(31337, 1999, 52011, 8080))


def plan(ours: NatProfile, theirs: NatProfile, extra: tuple[tuple[str, int], ...]) -> p.PunchPlan:
    return p.PunchPlan(
        initiator=True, ours=ours, theirs=theirs, peer=(SEEN,), attempt_id=AID,
        punch_key=KEY, now=0.0, rng=random.Random(1), extra=extra,
    )


def run(pl: p.PunchPlan) -> list[tuple[float, p.Send]]:
    out = [(0.0, s) for s in pl.sends()]
    while (t := pl.next_timer()) is not None:
        pl.handle_timer(t)
        out.extend((t, s) for s in pl.sends())
    return out


def test_claimed_ipv6_gets_only_the_first_rounds() -> None:
    pl = plan(CONSISTENT, CONSISTENT, (V6,))
    sends = run(pl)
    to_v6 = [t for t, s in sends if s.addr == V6]
    to_v4 = [t for t, s in sends if s.addr == SEEN]
    assert to_v6 == [0.0, 0.05, 0.1, 0.2, 0.4, 0.8]
    assert len(to_v6) == p.EXTRA_ROUNDS and len(to_v4) > p.EXTRA_ROUNDS
    assert len(sends) == pl.sent <= pl.send_cap


def test_ipv6_answering_first_wins_and_is_simultaneous() -> None:
    pl = plan(RANDOM, CONSISTENT, (V6,))  # IPv4 would need a birthday search
    pl.sends()
    probe = wire.encode(wire.PunchDatagram(wire.PunchType.PROBE, AID, 5, False), KEY)
    pl.datagram_received(0, probe, V6, 0.06)
    assert isinstance(pl.result, p.Punched) and pl.result.addr == V6 and pl.result.slot == 0
    assert pl.strategy is Strategy.BIRTHDAY
    assert pl.strategy_of(V6) is Strategy.SIMULTANEOUS
    assert pl.strategy_of(SEEN) is Strategy.BIRTHDAY


def test_impossible_over_ipv4_still_races_ipv6_then_fails_soon() -> None:
    pl = plan(RANDOM, RANDOM, (V6,))
    assert pl.strategy is Strategy.IMPOSSIBLE and pl.result is None
    sends = run(pl)
    assert {s.addr for _, s in sends} == {V6}
    assert len(sends) == p.EXTRA_ROUNDS <= pl.send_cap
    assert isinstance(pl.result, p.PunchFailed)
    assert "port-randomizing" in pl.result.reason and "IPv6" in pl.result.reason
    # Failed within the last IPv6 round plus the linger, not the 10 s deadline.
    assert max(t for t, _ in sends) + p.EXTRA_LINGER < 2.0


def test_impossible_without_ipv6_fails_at_once_as_before() -> None:
    pl = plan(RANDOM, RANDOM, ())
    assert isinstance(pl.result, p.PunchFailed) and pl.sends() == []


def info(*public: tuple[str, int], lan: tuple[tuple[str, int], ...] = ()) -> PeerInfo:
    return PeerInfo(public_addresses=public, lan_addresses=lan)


def test_candidates_race_ipv6_only_when_both_sides_have_it() -> None:
    theirs = info(SEEN, V6)
    both = punch_targets(SEEN, theirs, info(("198.51.100.7", 1), ("2001:db8::7", 1)),
                         same_public_ip=False)
    assert both.peer == (SEEN,) and both.extra == (V6,)
    no_v6_here = punch_targets(SEEN, theirs, info(("198.51.100.7", 1)), same_public_ip=False)
    assert no_v6_here.extra == ()
    # Introduced over IPv6 already: nothing to race.
    over_v6 = punch_targets(V6, theirs, info(("2001:db8::7", 1)), same_public_ip=False)
    assert over_v6.peer == (V6,) and over_v6.extra == ()


def test_candidates_skip_unusable_ipv6_and_bound_the_count() -> None:
    theirs = info(("::1", 5), ("fe80::1", 5), ("::ffff:203.0.113.9", 5), ("2001:db8::a", 5))
    out = punch_targets(SEEN, theirs, info(("2001:db8::7", 1)), same_public_ip=False)
    assert out.extra == (("2001:db8::a", 5),)
    many = info(SEEN, ("2001:db8::a", 5), ("2001:db8::b", 5), ("2001:db8::c", 5))
    assert len(punch_targets(SEEN, many, info(("2001:db8::7", 1)),
                             same_public_ip=False).extra) == MAX_V6_TARGETS


def test_lan_addresses_only_behind_one_public_ip() -> None:
    theirs = info(SEEN, lan=(("100.64.1.5", 4000),))
    assert punch_targets(SEEN, theirs, info(), same_public_ip=True).peer == (
        ("100.64.1.5", 4000), SEEN)
    assert punch_targets(SEEN, theirs, info(), same_public_ip=False).peer == (SEEN,)


@given(st.text(max_size=60))
def test_usable_v6_never_raises(text: str) -> None:
    assert usable_v6(text) in (True, False)


def test_own_v6_from_the_interface_list(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    import pathlib

    assert isinstance(tmp_path, pathlib.Path)
    table = tmp_path / "if_inet6"
    table.write_text(
        "fe800000000000000000000000000001 02 40 20 80 eth0\n"  # link-local
        "20010db8011300000000000000000005 02 40 00 80 eth0\n"  # global, permanent
        "20010db8011300000000000000000006 02 40 00 40 eth0\n"  # tentative
        "20010db8011300000000000000000007 02 40 00 20 eth0\n"  # deprecated
        "00000000000000000000000000000001 01 80 10 80 lo\n"
        "garbage\n"
    )
    monkeypatch.setattr(localaddr, "IF_INET6", table)
    monkeypatch.setattr(localaddr, "_source_toward", lambda dest: None)
    assert localaddr.own_v6_addresses() == ["2001:db8:113::5"]
    monkeypatch.setattr(localaddr, "_source_toward", lambda dest: "2001:db8:113::9")
    assert localaddr.own_v6_addresses() == ["2001:db8:113::9", "2001:db8:113::5"]
    monkeypatch.setattr(localaddr, "IF_INET6", tmp_path / "missing")
    monkeypatch.setattr(localaddr, "_source_toward", lambda dest: None)
    assert localaddr.own_v6_addresses() == []
