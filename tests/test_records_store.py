"""Signed records and the bounded record store: signatures, replay, eviction, expiry."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dhtnode.crypto.identity import Identity
from dhtnode.dht.records import (
    AddressKind,
    RecordError,
    decode_record_list,
    decode_single_record,
    decode_withdrawal,
    encode_record_list,
    sign_record,
    sign_withdrawal,
)
from dhtnode.dht.store import PutResult, RecordStore

TOPIC = b"\x42" * 32
WALL = 1_800_000_000.0
ADDRS = ((AddressKind.DIRECT, ("203.0.113.9", 4000)), (AddressKind.INTRODUCER, ("2001:db8::5", 77)))


def ident(i: int) -> Identity:
    return Identity.from_seed(bytes([i]) * 32)


def seq(offset_s: float = 0.0) -> int:
    return int((WALL + offset_s) * 1000)


def store(**kw: int) -> RecordStore:
    args = {"ttl": 100.0, "max_total": 100, "max_per_topic": 10, "max_per_ip": 50}
    args.update(kw)
    return RecordStore(**args)  # type: ignore[arg-type]


def test_sign_verify_and_round_trip() -> None:
    rec = sign_record(ident(1), TOPIC, seq(), ADDRS)
    assert rec.verify(TOPIC)
    assert not rec.verify(b"\x43" * 32)  # bound to its topic
    again = decode_single_record(rec.encode())
    assert again == rec and again.verify(TOPIC)
    assert decode_record_list(encode_record_list([rec, rec])) == [rec, rec]


def test_tampered_record_fails_verification() -> None:
    rec = sign_record(ident(1), TOPIC, seq(), ADDRS)
    raw = bytearray(rec.encode())
    raw[44] ^= 1  # inside the first address
    assert not decode_single_record(bytes(raw)).verify(TOPIC)


@given(st.binary(max_size=400))
def test_record_decoders_raise_only_record_error(data: bytes) -> None:
    for fn in (decode_single_record, decode_record_list, decode_withdrawal):
        try:
            fn(data)
        except RecordError:
            pass
        except Exception as exc:  # address errors are DecodeErrors too
            from dhtnode.errors import DecodeError

            assert isinstance(exc, DecodeError)


def test_newer_seq_replaces_and_replay_is_refused() -> None:
    s = store()
    old = sign_record(ident(1), TOPIC, seq(), ADDRS)
    new = sign_record(ident(1), TOPIC, seq(1), ADDRS)
    assert s.put(TOPIC, old, "198.51.100.1", 0.0, WALL) is PutResult.STORED
    assert s.put(TOPIC, old, "198.51.100.1", 0.0, WALL) is PutResult.STALE
    assert s.put(TOPIC, new, "198.51.100.1", 0.0, WALL) is PutResult.REPLACED
    assert s.put(TOPIC, old, "198.51.100.1", 0.0, WALL) is PutResult.STALE
    assert s.get(TOPIC, 0.0) == [new]
    assert len(s) == 1


def test_withdrawal_removes_and_blocks_replay() -> None:
    s = store()
    rec = sign_record(ident(1), TOPIC, seq(), ADDRS)
    s.put(TOPIC, rec, "198.51.100.1", 0.0, WALL)
    w = sign_withdrawal(ident(1), TOPIC, seq(1))
    assert w.verify(TOPIC)
    assert s.withdraw(TOPIC, w, 1.0, WALL + 1)
    assert s.get(TOPIC, 1.0) == []
    assert s.put(TOPIC, rec, "198.51.100.1", 2.0, WALL + 2) is PutResult.STALE
    newer = sign_record(ident(1), TOPIC, seq(3), ADDRS)
    assert s.put(TOPIC, newer, "198.51.100.1", 3.0, WALL + 3) is PutResult.STORED


def test_stale_and_future_records_refused() -> None:
    s = store()
    assert s.put(TOPIC, sign_record(ident(1), TOPIC, seq(-10_000), ADDRS), "x", 0.0, WALL) is (
        PutResult.STALE
    )
    assert s.put(TOPIC, sign_record(ident(1), TOPIC, seq(10_000), ADDRS), "x", 0.0, WALL) is (
        PutResult.STALE
    )


def test_expiry_after_ttl() -> None:
    s = store(ttl=100)
    s.put(TOPIC, sign_record(ident(1), TOPIC, seq(), ADDRS), "198.51.100.1", 0.0, WALL)
    assert s.expire(99.0) == 0 and len(s) == 1
    assert s.expire(100.0) == 1 and len(s) == 0
    assert s.get(TOPIC, 100.0) == []


def test_per_ip_cap_refuses_and_per_topic_cap_evicts_oldest() -> None:
    s = store(max_per_ip=2, max_per_topic=3)
    for i in range(2):
        assert s.put(TOPIC, sign_record(ident(i), TOPIC, seq(), ()), "a", float(i), WALL) is (
            PutResult.STORED
        )
    assert s.put(TOPIC, sign_record(ident(9), TOPIC, seq(), ()), "a", 5.0, WALL) is PutResult.FULL
    s.put(TOPIC, sign_record(ident(3), TOPIC, seq(), ()), "b", 3.0, WALL)
    s.put(TOPIC, sign_record(ident(4), TOPIC, seq(), ()), "c", 4.0, WALL)
    keys = {r.public_key for r in s.get(TOPIC, 4.0)}
    assert ident(0).public_key not in keys  # the one that expires first went
    assert len(keys) == 3


def test_total_cap_evicts_earliest_expiring() -> None:
    s = store(max_total=3, max_per_topic=10)
    topics = [bytes([i]) * 32 for i in range(4)]
    for i, t in enumerate(topics):
        s.put(t, sign_record(ident(i), t, seq(), ()), f"ip{i}", float(i), WALL)
    assert len(s) == 3
    assert s.get(topics[0], 4.0) == []


@pytest.mark.parametrize("n", [0, 1, 8])
def test_address_count_bounds(n: int) -> None:
    addrs = tuple((AddressKind.DIRECT, ("198.51.100.1", 1 + i)) for i in range(n))
    rec = sign_record(ident(1), TOPIC, seq(), addrs)
    assert decode_single_record(rec.encode()).addresses == addrs
