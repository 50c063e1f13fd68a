"""DHT message codec: round trips, and arbitrary bytes never raise anything but MessageError."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dhtnode.wire import address as wire_address
from dhtnode.wire import messages as m

addresses = st.one_of(
    st.tuples(st.ip_addresses(v=4).map(str), st.integers(1, 65535)),
    st.tuples(
        st.ip_addresses(v=6).filter(lambda ip: ip.ipv4_mapped is None).map(str),
        st.integers(1, 65535),
    ),
)
keys = st.binary(min_size=32, max_size=32)
commands = st.sampled_from(list(m.Command))


@given(
    commands,
    st.integers(0, 2**32 - 1),
    st.none() | keys,
    st.none() | keys,
    st.none() | st.binary(max_size=32),
    st.none() | st.binary(max_size=600),
    st.integers(0, 400),
)
def test_request_round_trip(cmd, tid, rid, target, token, value, pad) -> None:  # type: ignore[no-untyped-def]
    req = m.Request(cmd, tid, rid, target, token, value, pad)
    data = m.encode_request(req)
    assert m.decode(data) == req
    assert m.request_size(req) == len(data)  # the answer budget counts on this


@given(
    commands,
    st.integers(0, 2**32 - 1),
    addresses,
    st.none() | keys,
    st.none() | st.binary(max_size=32),
    st.none() | st.lists(addresses, max_size=20).map(tuple),
    st.none() | st.integers(0, 255),
    st.none() | st.binary(max_size=600),
    st.booleans(),
)
def test_response_round_trip(cmd, tid, to, rid, token, nodes, error, value, more) -> None:  # type: ignore[no-untyped-def]
    res = m.Response(cmd, tid, to, rid, token, nodes, error, value, more)
    assert m.decode(m.encode_response(res)) == res


@given(
    commands,
    st.integers(0, 2**32 - 1),
    addresses,
    st.none() | keys,
    st.lists(addresses, max_size=20),
    st.none() | st.binary(max_size=32),
)
def test_fast_nodes_encoder_matches_the_general_one(cmd, tid, to, rid, nodes, token) -> None:  # type: ignore[no-untyped-def]
    packed = [wire_address.encode(a) for a in nodes]
    fast = m.encode_nodes_response(cmd, tid, to, rid, packed, token)
    assert fast == m.encode_response(m.Response(cmd, tid, to, rid, token, tuple(nodes)))


@given(st.binary(max_size=2000))
def test_arbitrary_bytes_raise_only_message_error(data: bytes) -> None:
    try:
        m.decode(data)
    except m.MessageError:
        pass


@given(
    st.binary(min_size=8, max_size=8).map(lambda b: b"\x11\x01" + b[2:]),
    st.binary(max_size=200),
)
def test_plausible_headers_with_garbage_bodies(head: bytes, body: bytes) -> None:
    try:
        m.decode(head + body)
    except m.MessageError:
        pass


@given(st.data())
def test_truncations_and_bit_flips_of_valid_messages(data: st.DataObject) -> None:
    res = m.Response(m.Command.FIND_NODE, 7, ("203.0.113.5", 4000), b"\x01" * 32, b"t" * 16,
                     (("198.51.100.1", 1), ("2001:db8::1", 2)), None, b"xyz")
    raw = bytearray(m.encode_response(res))
    cut = data.draw(st.integers(0, len(raw)))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    for candidate in (bytes(raw), bytes(raw[:cut])):
        try:
            m.decode(candidate)
        except m.MessageError:
            pass


def test_rejects_trailing_bytes_and_oversize() -> None:
    raw = m.encode_request(m.Request(m.Command.PING, 1))
    with pytest.raises(m.MessageError, match="trailing"):
        m.decode(raw + b"\x00")
    with pytest.raises(m.MessageError, match="oversized"):
        m.decode(raw + b"\x00" * m.MAX_RECEIVE_SIZE)
    with pytest.raises(m.MessageError, match="version"):
        m.decode(raw[:1] + b"\x09" + raw[2:])


def test_first_byte_is_in_the_dht_range() -> None:
    from dhtnode.wire.demux import Kind, classify

    assert classify(m.encode_request(m.Request(m.Command.PING, 1))) is Kind.DHT
    assert classify(m.encode_response(m.Response(m.Command.PING, 1, ("127.0.0.1", 9)))) is Kind.DHT
