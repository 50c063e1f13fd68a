"""First-byte demultiplexing (RFC 9443 ranges) and the compact address codec."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dhtnode.errors import DecodeError
from dhtnode.wire import address as a
from dhtnode.wire.demux import STUN_MAGIC_COOKIE, Kind, classify


def test_demux_ranges() -> None:
    assert classify(b"") is Kind.UNKNOWN
    assert classify(b"\x00\x01\x00\x00" + STUN_MAGIC_COOKIE + b"\x00" * 12) is Kind.STUN
    assert classify(b"\x00\x01\x00\x00" + b"\x00" * 16) is Kind.STUN  # RFC 3489 classic
    assert classify(b"\x10rest") is Kind.DHT
    assert classify(b"\x25") is Kind.PUNCH
    assert classify(b"\x35") is Kind.RELAY
    assert classify(b"\x45") is Kind.QUIC
    assert classify(b"\xc3") is Kind.QUIC
    assert classify(b"\x85") is Kind.UNKNOWN
    assert classify(b"\x05") is Kind.UNKNOWN


@given(st.binary(max_size=64))
def test_classify_never_raises(data: bytes) -> None:
    assert isinstance(classify(data), Kind)


def test_normalize_maps_v4_mapped() -> None:
    assert a.normalize(("::ffff:127.0.0.1", 5, 0, 0)) == ("127.0.0.1", 5)
    assert a.normalize(("fe80::1%eth0", 5, 0, 2)) == ("fe80::1", 5)


@given(st.tuples(st.ip_addresses().map(str), st.integers(1, 65535)))
def test_compact_round_trip(addr: tuple[str, int]) -> None:
    norm = a.normalize(addr)
    assert a.decode(a.encode(norm)) == (norm, len(a.encode(norm)))


@given(st.binary(max_size=40))
def test_compact_decode_raises_only_decode_error(data: bytes) -> None:
    try:
        a.decode(data)
    except DecodeError:
        pass


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4:5", ("1.2.3.4", 5)),
        ("[::1]:80", ("::1", 80)),
        ("host.example:9", ("host.example", 9)),
    ],
)
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert a.parse_host_port(text) == expected


@pytest.mark.parametrize("text", ["", "1.2.3.4", "1.2.3.4:0", "1.2.3.4:99999", "h:x", "[::1"])
def test_parse_host_port_errors(text: str) -> None:
    with pytest.raises(ValueError):
        a.parse_host_port(text)
