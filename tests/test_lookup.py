"""The lookup state machine: alpha in flight, slow peers do not stall, termination."""

from __future__ import annotations

from dhtnode.dht.ids import node_id_for
from dhtnode.dht.lookup import Lookup


def addrs(n: int, base: int = 0) -> list[tuple[str, int]]:
    return [(f"198.51.100.{(base + i) % 250 + 1}", 2000 + base + i) for i in range(n)]


def test_keeps_alpha_in_flight_and_slow_peer_frees_a_slot() -> None:
    lk = Lookup(b"\x00" * 32, k=4, alpha=2)
    lk.add_candidates(addrs(10))
    first = lk.next_queries()
    assert len(first) == 2
    assert lk.next_queries() == []
    lk.on_slow(first[0])
    again = lk.next_queries()
    assert len(again) == 1 and again[0] not in first


def test_terminates_when_k_nearest_answered_and_skips_failures() -> None:
    target = b"\x55" * 32
    pool = addrs(12)
    lk = Lookup(target, k=3, alpha=3)
    lk.add_candidates(pool)
    rounds = 0
    while not lk.done and rounds < 50:
        rounds += 1
        for a in lk.next_queries():
            if a == pool[0]:
                lk.on_failure(a)
            else:
                lk.on_response(a, [])
    assert lk.done
    got = lk.closest_responded(3)
    nearest = sorted(
        (a for a in pool if a != pool[0]),
        key=lambda a: int.from_bytes(node_id_for(a), "big") ^ int.from_bytes(target, "big"),
    )[:3]
    assert got == nearest


def test_empty_lookup_is_done_at_once() -> None:
    lk = Lookup(b"\x01" * 32, k=20, alpha=3)
    assert lk.done and lk.next_queries() == []


def test_closer_nodes_from_answers_are_followed() -> None:
    target = b"\x00" * 32
    far, near = addrs(1, 0), addrs(30, 100)
    lk = Lookup(target, k=2, alpha=1)
    lk.add_candidates(far)
    (a,) = lk.next_queries()
    lk.on_response(a, near)
    asked = []
    while not lk.done:
        for b in lk.next_queries():
            asked.append(b)
            lk.on_response(b, [])
    best = sorted(near, key=lambda x: int.from_bytes(node_id_for(x), "big"))[:2]
    assert lk.closest_responded(2) == best
    assert set(best) <= set(asked)
