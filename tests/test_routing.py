"""Routing table: bucket placement, closest() against brute force, ping-before-evict."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from dhtnode.dht.ids import bucket_index, distance, node_id_for
from dhtnode.dht.routing import SMALL_TABLE, RoutingTable


def addr(i: int) -> tuple[str, int]:
    # One host each, over 250 prefixes: the diversity bounds (tested in tests/adversarial/)
    # never bind, so closest() must be the plain XOR ranking.
    return (f"198.18.{i % 250}.{i // 250 % 250 + 1}", 1000 + i)


@pytest.mark.parametrize("offered", [30, 3000])  # ranked whole, and by the bucket walk
def test_closest_matches_brute_force(offered: int) -> None:
    rng = random.Random(3)
    table = RoutingTable(rng.randbytes(32), k=20)
    for i in range(offered):
        a = addr(i)
        table.add(node_id_for(a), a, 0.0)
    everyone = list(table)
    assert (len(everyone) <= SMALL_TABLE) is (offered == 30), len(everyone)
    for _ in range(50):
        target = rng.randbytes(32)
        got = [c.addr for c in table.closest(target, 20)]
        want = [c.addr for c in sorted(everyone, key=lambda c: distance(c.id, target))[:20]]
        assert got == want


def test_full_bucket_asks_to_ping_oldest_and_replacement_takes_over() -> None:
    local = bytes(32)
    table = RoutingTable(local, k=2)
    # Find three addresses that land in the same bucket.
    same: list[tuple[str, int]] = []
    i = 0
    while len(same) < 3:
        a = addr(i)
        i += 1
        if bucket_index(0, int.from_bytes(node_id_for(a), "big")) == 0:
            same.append(a)
    assert table.add(node_id_for(same[0]), same[0], 1.0) is None
    assert table.add(node_id_for(same[1]), same[1], 2.0) is None
    stale = table.add(node_id_for(same[2]), same[2], 3.0)
    assert stale is not None and stale.addr == same[0]
    assert table.get(same[2]) is None  # waits in the replacement cache
    table.failed(same[0])  # the oldest does not answer: replaced at once
    assert table.get(same[0]) is None
    assert table.get(same[2]) is not None


def test_random_id_in_bucket_lands_in_that_bucket() -> None:
    rng = random.Random(5)
    local = rng.randbytes(32)
    table = RoutingTable(local, k=20)
    for i in (0, 1, 7, 100, 254, 255):
        rid = table.random_id_in_bucket(i, rng)
        assert bucket_index(int.from_bytes(local, "big"), int.from_bytes(rid, "big")) == i


class TableMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table = RoutingTable(bytes(range(32)), k=3)

    @rule(i=st.integers(0, 400))
    def add(self, i: int) -> None:
        a = addr(i)
        self.table.add(node_id_for(a), a, float(i))

    @rule(i=st.integers(0, 400))
    def fail(self, i: int) -> None:
        self.table.failed(addr(i))

    @invariant()
    def buckets_bounded_and_index_consistent(self) -> None:
        contacts = list(self.table)
        assert len(contacts) == len(self.table)
        assert len({c.addr for c in contacts}) == len(contacts)
        local = int.from_bytes(self.table.local_id, "big")
        per_bucket: dict[int, int] = {}
        for c in contacts:
            b = bucket_index(local, c.key)
            per_bucket[b] = per_bucket.get(b, 0) + 1
            assert c.id == node_id_for(c.addr)
        assert all(n <= 3 for n in per_bucket.values())


TestTable = TableMachine.TestCase
TestTable.settings = settings(max_examples=50, stateful_step_count=40, deadline=None)


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_bucket_index_range(a: bytes, b: bytes) -> None:
    if a != b:
        assert 0 <= bucket_index(int.from_bytes(a, "big"), int.from_bytes(b, "big")) <= 255
